#!/bin/bash
# dib compatibility check for `strata elements`.
#
# Downloads diskimage-builder from PyPI (with pip) into a temp folder, points ELEMENTS_PATH at its
# elements, and checks for `vm debian-minimal` and `vm ubuntu-minimal` that:
#   1. `strata elements` prints exactly the element set dib resolves, and the
#      same set dib's own resolver (element_dependencies.get_elements) returns, when importable;
#   2. `strata elements --hooks` lists, per phase, the hooks dib would run, in dib-run-parts
#      order, each from the right element. dib's expectation is computed here the way dib does:
#      the phase folder of every element, `find -xtype f -executable`, the run-parts name regex,
#      `LC_ALL=C sort -n`.
# Exits non-zero on any mismatch.
#
# Environment:
#   STRATA       the strata binary (default: ${CARGO_TARGET_DIR:-<repo>/target}/debug/strata, built if missing)
#   DIB_VERSION  diskimage-builder version to download (default 3.43.0; "latest" for the newest)
set -eu -o pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
strata=${STRATA:-${CARGO_TARGET_DIR:-$repo/target}/debug/strata}
dib_version=${DIB_VERSION:-3.43.0}

if [ ! -x "$strata" ]; then
    (cd "$repo" && cargo build --quiet)
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-dib-compat.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

spec=diskimage-builder
[ "$dib_version" = latest ] || spec="diskimage-builder==$dib_version"
python3 -m pip download --quiet --no-deps --only-binary :all: "$spec" -d "$tmp/dl" >&2
wheel=$(ls "$tmp"/dl/diskimage_builder-*.whl)
mkdir "$tmp/x"
if command -v unzip >/dev/null; then
    unzip -q "$wheel" -d "$tmp/x"
else
    # zipfile does not restore modes; apply the ones the wheel records.
    python3 - "$wheel" "$tmp/x" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o7777
        if mode:
            os.chmod(path, mode)
EOF
fi
elements_dir="$tmp/x/diskimage_builder/elements"
mkdir "$tmp/empty"
export ELEMENTS_PATH="$elements_dir"
export STRATA_ELEMENTS_DIR="$tmp/empty"
unset RUST_LOG

echo "diskimage-builder: $(basename "$wheel")"
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# check_case LABEL "REQUEST..." "EXPECTED ELEMENTS..." "DIB ROOTS..."
check_case() {
    local label=$1 request=$2 expected=$3 dib_roots=$4
    local got want

    # 1. The element set.
    # shellcheck disable=SC2086
    got=$("$strata" elements $request | LC_ALL=C sort)
    want=$(tr ' ' '\n' <<<"$expected" | LC_ALL=C sort)
    if [ "$got" != "$want" ]; then
        fail "$label: element set differs (< strata, > expected)"
        diff <(echo "$got") <(echo "$want") || true
    else
        echo "ok: $label: element set ($(wc -l <<<"$got") elements)"
    fi

    # dib's own resolver, given the roots disk-image-create would pass it.
    local dib_set
    # shellcheck disable=SC2086
    if dib_set=$(cd "$tmp/x" && python3 -c '
import sys
from diskimage_builder.element_dependencies import get_elements
print("\n".join(sorted(n for n, _ in get_elements(sys.argv[1:]))))
' $dib_roots 2>/dev/null); then
        dib_set=$(LC_ALL=C sort <<<"$dib_set")
        if [ "$got" != "$dib_set" ]; then
            fail "$label: element set differs from dib's resolver (< strata, > dib)"
            diff <(echo "$got") <(echo "$dib_set") || true
        else
            echo "ok: $label: same set as dib's element_dependencies"
        fi
    else
        echo "skip: $label: dib's resolver is not importable here (python3-yaml missing?)"
    fi

    # 2. Hooks per phase: "phase name element" lines, in run order.
    local strata_hooks dib_hooks phase e
    # shellcheck disable=SC2086
    strata_hooks=$("$strata" elements --hooks --json $request | python3 -c '
import json, sys
out = json.load(sys.stdin)
for phase, hooks in out.get("hooks", {}).items():
    for h in hooks:
        print(phase, h["name"], h["element"])
')
    dib_hooks=$(
        for phase in root.d extra-data.d pre-install.d install.d post-install.d post-root.d \
            block-device.d pre-finalise.d finalise.d cleanup.d; do
            for e in $expected; do
                [ -d "$elements_dir/$e/$phase" ] || continue
                find "$elements_dir/$e/$phase/" -maxdepth 1 -xtype f -executable -printf '%f\n' \
                    | { grep -E '^[0-9A-Za-z_-]+$' || true; } \
                    | sed "s/\$/ $e/"
            done | LC_ALL=C sort -n | sed "s/^/$phase /"
        done
    )
    if [ "$strata_hooks" != "$dib_hooks" ]; then
        fail "$label: hooks differ (< strata, > dib)"
        diff <(echo "$strata_hooks") <(echo "$dib_hooks") || true
    else
        echo "ok: $label: $(wc -l <<<"$strata_hooks") hooks in $(cut -d' ' -f1 <<<"$strata_hooks" | uniq | wc -l) phases, same order and elements as dib-run-parts"
    fi
}

# The block-device default for `vm` follows the host arch, as in strata and dib.
bd=block-device-mbr
case "$(dpkg --print-architecture 2>/dev/null || uname -m)" in
    arm64 | aarch64) bd=block-device-efi ;;
esac
common="base $bd bootloader debootstrap dib-init-system dpkg install-bin install-types manifests modprobe package-installs pkg-map sysprep vm"

check_case "vm debian-minimal" "vm debian-minimal" \
    "$common debian-minimal" "base vm debian-minimal $bd"
check_case "vm ubuntu-minimal" "vm ubuntu-minimal" \
    "$common ubuntu-common ubuntu-minimal" "base vm ubuntu-minimal $bd"

if [ "$failures" -ne 0 ]; then
    echo "dib compatibility: $failures check(s) FAILED"
    exit 1
fi
echo "dib compatibility: all checks passed"
