#!/usr/bin/env bash
# dib's own elements, unchanged, build `debian-minimal -t tar` with strata: downloads
# diskimage-builder from PyPI into a temporary virtualenv (dib's host-side Python hooks import
# it through DIB_PYTHON_EXEC), points ELEMENTS_PATH at its elements and checks the rootfs.
# The Debian mirror comes from the host's apt sources. Run as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
strata=${STRATA:-$here/target/debug/strata}
[ -x "$strata" ] || (cd "$here" && cargo build --quiet)
work=$(mktemp -d /tmp/strata-dib-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "diskimage-builder==${DIB_VERSION:-3.43.0}"
elements=$(echo "$work"/venv/lib/python3*/site-packages/diskimage_builder/elements)
[ -d "$elements" ] || { echo "dib_build: no elements folder in the wheel" >&2; exit 1; }

mirror=${DIB_DISTRIBUTION_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "dib_build: no Debian mirror in the host's apt sources; set DIB_DISTRIBUTION_MIRROR" >&2; exit 1; }

mkdir -p "$work/none"
cd "$work"
# dib defaults to DIB_RELEASE=stable with updates and security suites; pin the release and
# use the one mirror the host has.
ELEMENTS_PATH=$elements \
    DIB_PYTHON_EXEC=$work/venv/bin/python3 \
    DIB_RELEASE=bookworm \
    DIB_DISTRIBUTION_MIRROR=$mirror \
    DIB_APT_SOURCES_CONF="default:deb $mirror bookworm main" \
    DIB_IMAGE_CACHE=$work/image-cache \
    STRATA_ELEMENTS_DIR=$work/none \
    "$strata" build -t tar -o dibdeb --cache-dir cache debian-minimal 2> build.log ||
    { tail -40 build.log >&2; exit 1; }

fail=0
check() { if ! "$@"; then echo "dib_build: check failed: $*" >&2; fail=1; fi; }
listing=$(tar -tf dibdeb.tar)
has() { grep -qx -- "$1" <<< "$listing"; }
check has etc/debian_version
check has boot/
status=$(tar -xOf dibdeb.tar var/lib/dpkg/status)
for pkg in systemd-sysv linux-image-amd64 lsb-release; do
    check grep -q "^Package: $pkg\$" <<< "$status"
done
check test -s dibdeb.d/dib-manifests/dib_arguments
if ! has usr/sbin/policy-rc.d; then :; else echo "dib_build: policy-rc.d left in the image" >&2; fail=1; fi
grep -E 'steps: ' build.log >&2
exit $fail
