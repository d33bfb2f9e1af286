# Debian defaults. The mirror is never built in: it is DIB_DISTRIBUTION_MIRROR
# (or DIB_DEBIAN_DISTRIBUTION_MIRROR), else the first Debian mirror of the
# apt sources of the system this file is sourced on (see dpkg's
# 05-dpkg-apt-mirror.bash). Left empty when none is found; root.d hooks then
# stop with a message saying what to set.
export DISTRO_NAME=debian
export DIB_RELEASE=${DIB_RELEASE:-bookworm}
export DIB_INIT_SYSTEM=systemd
export EFI_BOOT_DIR="EFI/debian"

if [ -n "${DIB_DEBIAN_DISTRIBUTION_MIRROR:-}" ]; then
    DIB_DISTRIBUTION_MIRROR=$DIB_DEBIAN_DISTRIBUTION_MIRROR
fi
if [ -z "${DIB_DISTRIBUTION_MIRROR:-}" ] && declare -F dib_apt_find_mirror > /dev/null; then
    DIB_DISTRIBUTION_MIRROR=$(dib_apt_find_mirror debian)
fi
export DIB_DISTRIBUTION_MIRROR=${DIB_DISTRIBUTION_MIRROR:-}

# The security archive: the host's -security source when it has one,
# otherwise "<mirror>-security", the layout Debian's own mirrors use.
if [ -z "${DIB_DEBIAN_SECURITY_MIRROR:-}" ] && declare -F dib_apt_find_mirror > /dev/null; then
    DIB_DEBIAN_SECURITY_MIRROR=$(dib_apt_find_mirror debian-security)
fi
if [ -z "${DIB_DEBIAN_SECURITY_MIRROR:-}" ] && [ -n "$DIB_DISTRIBUTION_MIRROR" ]; then
    DIB_DEBIAN_SECURITY_MIRROR=${DIB_DISTRIBUTION_MIRROR%/}-security
fi
export DIB_DEBIAN_SECURITY_MIRROR=${DIB_DEBIAN_SECURITY_MIRROR:-}
export DIB_DEBIAN_SECURITY_SUBPATH=${DIB_DEBIAN_SECURITY_SUBPATH:-}

export DIB_DEBIAN_COMPONENTS=${DIB_DEBIAN_COMPONENTS:-main}
export DIB_DEBIAN_COMPONENTS_WS=${DIB_DEBIAN_COMPONENTS//,/ }

# One "name:apt source line" per line; each becomes
# /etc/apt/sources.list.d/<name>.list. Rolling releases have no -updates or
# -security suites.
case $DIB_RELEASE in
    testing | unstable | sid)
        _dib_debian_sources="default:deb $DIB_DISTRIBUTION_MIRROR $DIB_RELEASE $DIB_DEBIAN_COMPONENTS_WS"
        ;;
    *)
        _dib_debian_sources="default:deb $DIB_DISTRIBUTION_MIRROR $DIB_RELEASE $DIB_DEBIAN_COMPONENTS_WS
updates:deb $DIB_DISTRIBUTION_MIRROR $DIB_RELEASE-updates $DIB_DEBIAN_COMPONENTS_WS
security:deb $DIB_DEBIAN_SECURITY_MIRROR $DIB_RELEASE-security$DIB_DEBIAN_SECURITY_SUBPATH $DIB_DEBIAN_COMPONENTS_WS"
        ;;
esac
export DIB_APT_SOURCES_CONF=${DIB_APT_SOURCES_CONF:-$_dib_debian_sources}
unset _dib_debian_sources
