# Ubuntu defaults. There is no built-in mirror: set DIB_DISTRIBUTION_MIRROR
# (or DIB_UBUNTU_DISTRIBUTION_MIRROR), or have an Ubuntu source in the apt
# sources of the system this file is sourced on (found by dpkg's
# 05-dpkg-apt-mirror.bash). Left empty when none is found; root.d hooks then
# stop with a message saying what to set.
export DISTRO_NAME=${DISTRO_NAME:-ubuntu}
export DIB_RELEASE=${DIB_RELEASE:-noble}
export DIB_DEBIAN_COMPONENTS=${DIB_DEBIAN_COMPONENTS:-main,universe}
export EFI_BOOT_DIR="EFI/ubuntu"

if [ -n "${DIB_UBUNTU_DISTRIBUTION_MIRROR:-}" ]; then
    DIB_DISTRIBUTION_MIRROR=$DIB_UBUNTU_DISTRIBUTION_MIRROR
fi
if [ -z "${DIB_DISTRIBUTION_MIRROR:-}" ] && declare -F dib_apt_find_mirror > /dev/null; then
    DIB_DISTRIBUTION_MIRROR=$(dib_apt_find_mirror ubuntu)
fi
export DIB_DISTRIBUTION_MIRROR=${DIB_DISTRIBUTION_MIRROR:-}
