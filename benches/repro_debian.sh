#!/usr/bin/env bash
# Reproducibility of a real Debian image, step by step: two cold `debian-minimal -t tar`
# builds with the same SOURCE_DATE_EPOCH, in two folders with two caches, compared with
# `strata diff` (timed: target <= 5 s); then the same with the opt-in `reproducible` element.
# Prints how many steps gave identical layers, with and without the element, and the time of
# each `strata diff`.
# Usage (as root): benches/repro_debian.sh [ELEMENTS...]   (default: debian-minimal; ~6 min)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release --quiet)
strata=$here/target/release/strata
work=$(mktemp -d /var/tmp/strata-repro.XXXXXX)
trap 'rm -rf "$work"' EXIT
export STRATA_ELEMENTS_DIR=$here/elements SOURCE_DATE_EPOCH=1700000000
unset ELEMENTS_PATH
elements=("${@:-debian-minimal}")

now() { date +%s.%N; }
build() { # DIR ELEMENTS...: a cold build with its own cache and download cache
    local dir=$work/$1
    shift
    mkdir -p "$dir"
    (cd "$dir" && DIB_IMAGE_CACHE=$dir/image-cache "$strata" build -t tar -o deb \
        --cache-dir "$dir/cache" "$@" > "$dir/log" 2>&1) || { tail -30 "$dir/log" >&2; exit 1; }
}
compare() { # A B: strata diff, timed; prints "identical same-key seconds"
    local t0 t1 json
    t0=$(now)
    json=$("$strata" diff --json "$work/$1/deb.strata.json" "$work/$2/deb.strata.json" \
        --cache-dir "$work/$1/cache" --cache-dir "$work/$2/cache" || true)
    t1=$(now)
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["identical_steps"], d["same_key_steps"], end=" ")' "$json"
    echo "$t1 - $t0" | bc -l
    "$strata" diff "$work/$1/deb.strata.json" "$work/$2/deb.strata.json" \
        --cache-dir "$work/$1/cache" --cache-dir "$work/$2/cache" > "$work/$1-$2.diff" || true
}

echo "building ${elements[*]} twice" >&2
build a "${elements[@]}"
build b "${elements[@]}"
compare a b > "$work/a-b.counts"  # finishes before the trap removes $work
read -r same1 total1 secs1 < "$work/a-b.counts"
echo "building ${elements[*]} reproducible twice" >&2
build c "${elements[@]}" reproducible
build d "${elements[@]}" reproducible
compare c d > "$work/c-d.counts"
read -r same2 total2 secs2 < "$work/c-d.counts"

printf '\n%-44s %8s %10s\n' "two cold builds, SOURCE_DATE_EPOCH" "identical" "diff (s)"
printf '%-44s %4d/%-4d %10.2f\n' "${elements[*]}" "$same1" "$total1" "$secs1"
printf '%-44s %4d/%-4d %10.2f\n' "${elements[*]} reproducible" "$same2" "$total2" "$secs2"
echo
echo "what differs without the element:"
sed 's/^/  /' "$work/a-b.diff" | head -40
