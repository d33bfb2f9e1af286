#!/usr/bin/env bash
# Times whole `debian-minimal -t tar` builds side by side, in one run, and prints medians and
# ratios for the issue's targets:
#   cold build with caching      vs  the same build with --no-cache     (target <= 1.10x)
#   no-op rebuild                vs  cold build                          (target <= 1/50)
#   rebuild after editing the last install.d hook  vs  cold build       (target <= 1/10)
#   cache size after one cold build (layers)  vs  final rootfs compressed alone (target <= 1.3x)
# Usage (as root): benches/e2e_debian.sh [RUNS]   (default 3; each cold build is ~1.5 min)
# Every cold build gets a fresh layer cache AND a fresh DIB_IMAGE_CACHE (no warm apt cache).
# KEEP_TREE=1: then as many edit rebuilds again with --keep-tree (the first fills the kept tree
# and is reported apart; the others restore from it). Prints the tar output's chunk reuse and
# where the last edit rebuild's time goes.
set -euo pipefail
runs=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release --quiet)
strata=${CARGO_TARGET_DIR:-$here/target}/release/strata
work=$(mktemp -d /var/tmp/strata-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
export STRATA_ELEMENTS_DIR=$here/elements
unset ELEMENTS_PATH

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
build() { # NAME CACHE IMAGE_CACHE [ARGS...]; the log is $LOG, else NAME.log
    local name=$1 cache=$2 icache=$3 log=${LOG:-$1.log}
    shift 3
    local t0 t1
    t0=$(now)
    DIB_IMAGE_CACHE=$icache "$strata" build -t tar -o "$name" --cache-dir "$cache" --progress plain \
        "$@" debian-minimal > "$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
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
restore_of() { awk '/\(restore cached steps\)/ { print $NF }' "$1" | tail -1; }
output_of() { awk '/^output tar/ { print $NF }' "$1" | tail -1; }
reuse_of() { grep -o '[0-9]* chunks, [0-9]* reused' "$1" | head -1 | tr -d ','; }
: > erestore; : > eoutput; : > reuse
for i in $(seq "$runs"); do
    echo "run $i/$runs: rebuild after editing install.d/$hook ($element)" >&2
    printf '\n# benchmark edit %s\ntrue\n' "$i" >> "over/$element/install.d/$hook"
    ELEMENTS_PATH=$work/over LOG=edit$i.log build cold1 cache1 icache-c1 >> edit
    restore_of "edit$i.log" >> erestore; output_of "edit$i.log" >> eoutput
    printf '%s\n' "$(reuse_of "edit$i.log")" >> reuse
done
last_log=edit$runs.log
if [ "${KEEP_TREE:-0}" = 1 ]; then
    : > kedit; : > krestore; : > koutput
    for i in $(seq 0 "$runs"); do
        echo "rebuild $i/$runs with --keep-tree after editing install.d/$hook ($element)" >&2
        printf '\n# benchmark kept-tree edit %s\ntrue\n' "$i" >> "over/$element/install.d/$hook"
        t=$(ELEMENTS_PATH=$work/over LOG=kedit$i.log build cold1 cache1 icache-c1 --keep-tree)
        r=$(restore_of "kedit$i.log")
        if [ "$i" = 0 ]; then kfirst=$t; kfirst_r=$r; else
            echo "$t" >> kedit; echo "$r" >> krestore; output_of "kedit$i.log" >> koutput
            printf '%s\n' "$(reuse_of "kedit$i.log")" >> reuse
        fi
    done
    last_log=kedit$runs.log
fi

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
printf '\n%-46s %10.2f\n' "edit rebuild: restoring the cached steps" "$(median < erestore)" \
    "edit rebuild: output tar" "$(median < eoutput)"
if [ "${KEEP_TREE:-0}" = 1 ]; then
    k=$(median < kedit)
    printf '%-46s %10.2f  (restore %.3f s)\n' "first --keep-tree rebuild (fills the kept tree)" \
        "$kfirst" "$kfirst_r"
    printf '%-46s %10.2f\n' "rebuild with --keep-tree" "$k" \
        "  restoring from the kept tree" "$(median < krestore)" "  output tar" "$(median < koutput)"
    printf '%-46s %10.4f  (1/%.0f; target <= 1/30)\n' "--keep-tree edit rebuild / cold" \
        "$(echo "$k / $c" | bc -l)" "$(echo "$c / $k" | bc -l)"
fi
echo "tar output chunks reused per edit rebuild: $(tr '\n' ';' < reuse)"
echo "where the last edit rebuild's time goes ($last_log):"
sed -n '/Target: build/,/END PROFILING/p' "$last_log" | grep -v '^$' | sed 's/^/  /'
