#!/usr/bin/env bash
# dib's own elements, unchanged and with dib's defaults (DIB_APT_LOCAL_CACHE on: the dpkg
# element bind-mounts dib's apt download cache onto the image's /var/cache/apt/archives),
# build `vm debian-minimal` as a qcow2 disk image (and a tar of the same tree) with strata:
#
#   tests/dib_vm.sh OUT_DIR     writes OUT_DIR/vm.qcow2, vm.tar, vm.strata.json, build.log
#
# The set-up is tests/dib_env.sh's. Checks the tree (a kernel, GRUB, no downloaded packages
# left in it, nothing mounted); tests/integration/debian.rs boots the qcow2 under qemu.
# Run as root.
set -euo pipefail
# shellcheck source=tests/dib_env.sh
. "$(dirname "$0")/dib_env.sh"
[ "$#" -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/strata-dib-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
dib_env "$work"
cd "$out"
dib_build build.log -t qcow2,tar -o vm --cache-dir "$work/cache" vm debian-minimal

fail=0
check() { if ! "$@"; then echo "dib_vm: check failed: $*" >&2; fail=1; fi; }
listing=$(tar -tf vm.tar)
check grep -q '^boot/vmlinuz-' <<< "$listing"
check grep -q '^boot/grub/grub.cfg$' <<< "$listing"
# The apt cache mount kept the downloads out of the image (and was unmounted before the disk).
if grep '^var/cache/apt/archives/.*\.deb$' <<< "$listing" | head -3 | grep .; then
    echo "dib_vm: downloaded packages left in the image" >&2
    fail=1
fi
check qemu-img check -q vm.qcow2
if grep -q "$work" /proc/self/mountinfo; then
    echo "dib_vm: mounts left below $work" >&2
    fail=1
fi
grep -E 'steps: ' build.log >&2 || true
exit $fail
