#!/usr/bin/env bash
# dib's own elements, unchanged, build `debian-minimal -t tar` with strata (the set-up a dib user
# has, from tests/dib_env.sh: diskimage-builder from PyPI in a virtualenv, ELEMENTS_PATH,
# DIB_PYTHON_EXEC, the host's mirror), and the rootfs is checked. Run as root.
set -euo pipefail
# shellcheck source=tests/dib_env.sh
. "$(dirname "$0")/dib_env.sh"
work=$(mktemp -d /tmp/strata-dib-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
dib_env "$work"
cd "$work"
dib_build build.log -t tar -o dibdeb --cache-dir cache debian-minimal

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
