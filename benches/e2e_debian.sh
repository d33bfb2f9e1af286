#!/usr/bin/env bash
# Times whole `debian-minimal -t tar` builds side by side, in one run, and prints medians and
# ratios for the issue's targets:
#   cold build with caching      vs  the same build with --no-cache     (target <= 1.10x)
#   no-op rebuild                vs  cold build                          (target <= 1/50)
#   rebuild after editing the last install.d hook  vs  cold build       (target <= 1/10)
#   cache size after one cold build (layers)  vs  final rootfs compressed alone (target <= 1.3x)
# Usage (as root): benches/e2e_debian.sh [RUNS]   (default 3; each cold build is ~1.5 min)
# Every cold build gets a fresh layer cache AND a fresh DIB_IMAGE_CACHE (no warm apt cache).
set -euo pipefail
runs=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release --quiet)
strata=$here/target/release/strata
work=$(mktemp -d /var/tmp/strata-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
export STRATA_ELEMENTS_DIR=$here/elements
unset ELEMENTS_PATH

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
build() { # NAME CACHE IMAGE_CACHE [ARGS...]
    local name=$1 cache=$2 icache=$3
    shift 3
    local t0 t1
    t0=$(now)
    DIB_IMAGE_CACHE=$icache "$strata" build -t tar -o "$name" --cache-dir "$cache" "$@" debian-minimal \
        > "$name.log" 2>&1 || { tail -30 "$name.log" >&2; exit 1; }
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

: > cold; : > nocache; : > noop; : > edit
for i in $(seq "$runs"); do
    echo "run $i/$runs: cold build with caching" >&2
    build "cold$i" "cache$i" "icache-c$i" >> cold
    echo "run $i/$runs: cold build with --no-cache" >&2
    build "nocache$i" "nocache-cache$i" "icache-n$i" --no-cache >> nocache
    echo "run $i/$runs: no-op rebuild" >&2
    build "cold$i" "cache$i" "icache-c$i" >> noop
done

# The last install.d hook and its element, from the plan.
last=$("$strata" plan --json -t tar -o cold1 --cache-dir cache1 debian-minimal |
    python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["phase"]=="install.d"][-1]; print(s["hook"], s["elements"][0])')
read -r hook element <<< "$last"
mkdir -p over
cp -a "$here/elements/$element" over/
for i in $(seq "$runs"); do
    echo "run $i/$runs: rebuild after editing install.d/$hook ($element)" >&2
    printf '\n# benchmark edit %s\ntrue\n' "$i" >> "over/$element/install.d/$hook"
    ELEMENTS_PATH=$work/over build cold1 cache1 icache-c1 >> edit
done

layers=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select sum(blob_size) from layers").fetchone()[0])' cache1/index.sqlite)
final=$(zstd -3 -T0 -q -c cold1.tar | wc -c)

c=$(median < cold); n=$(median < nocache); o=$(median < noop); e=$(median < edit)
printf '\n%-46s %10s\n' "measure ($runs runs each)" "median s"
printf '%-46s %10.2f\n' "cold build, caching" "$c" "cold build, --no-cache" "$n" \
    "no-op rebuild" "$o" "rebuild after editing install.d/$hook" "$e"
printf '\n%-46s %10.3f  (target <= 1.10)\n' "cold with caching / --no-cache" "$(echo "$c / $n" | bc -l)"
printf '%-46s %10.4f  (1/%.0f; target <= 1/50)\n' "no-op / cold" "$(echo "$o / $c" | bc -l)" "$(echo "$c / $o" | bc -l)"
printf '%-46s %10.4f  (1/%.0f; target <= 1/10)\n' "edit last install.d hook / cold" "$(echo "$e / $c" | bc -l)" "$(echo "$c / $e" | bc -l)"
printf '%-46s %10.3f  (%d MB / %d MB; target <= 1.3)\n' "layers / final rootfs tar.zst" \
    "$(echo "$layers / $final" | bc -l)" "$((layers / 1000000))" "$((final / 1000000))"
