#!/usr/bin/env bash
# The element developer's loop on the default image, side by side in one run: a cold
# `vm debian-minimal -t qcow2` build, then rebuilds after editing the last install.d hook, and
# the restore of the cached steps before it (from each rebuild's timing table). Targets:
#   rebuild after the edit / cold build           <= 1/10
#   restoring the cached steps before the edit     <= 0.3 s
# Usage (as root): benches/e2e_vm.sh [RUNS] [BUILD ARGS...]   (default 3 rebuilds; ~4 min)
# e.g. benches/e2e_vm.sh 3 (no SOURCE_DATE_EPOCH), SOURCE_DATE_EPOCH=1700000000 benches/e2e_vm.sh
# KEEP_TREE=1: then as many rebuilds again with --keep-tree (the first fills the kept tree and
# is reported apart; the others restore from it), restore times side by side.
set -euo pipefail
runs=${1:-3}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release --quiet)
strata=${CARGO_TARGET_DIR:-$here/target}/release/strata
work=$(mktemp -d /var/tmp/strata-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
export STRATA_ELEMENTS_DIR=$here/elements DIB_IMAGE_CACHE=$work/image-cache
unset ELEMENTS_PATH

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
build() { # LOG [ARGS...]
    local log=$1 t0 t1
    shift
    t0=$(now)
    "$strata" build -t qcow2 -o vm --cache-dir cache --progress plain "$@" vm debian-minimal \
        > "$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

echo "cold build" >&2
cold=$(build cold.log "$@")
last=$("$strata" plan --json -t qcow2 -o vm --cache-dir cache "$@" vm debian-minimal |
    python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["phase"]=="install.d"][-1]; print(s["hook"], s["elements"][0])')
read -r hook element <<< "$last"
mkdir -p over
cp -a "$here/elements/$element" over/
: > edit; : > restore; : > reuse
for i in $(seq "$runs"); do
    echo "rebuild $i/$runs after editing install.d/$hook ($element)" >&2
    printf '\n# benchmark edit %s\ntrue\n' "$i" >> "over/$element/install.d/$hook"
    ELEMENTS_PATH=$work/over build "edit$i.log" "$@" >> edit
    awk '/\(restore cached steps\)/ { print $NF }' "edit$i.log" | tail -1 >> restore
    grep -o '[0-9]* reused from the previous image' "edit$i.log" | head -1 >> reuse || true
done

if [ "${KEEP_TREE:-0}" = 1 ]; then
    : > kedit; : > krestore
    for i in $(seq 0 "$runs"); do
        echo "rebuild $i/$runs with --keep-tree after editing install.d/$hook ($element)" >&2
        printf '\n# benchmark kept-tree edit %s\ntrue\n' "$i" >> "over/$element/install.d/$hook"
        t=$(ELEMENTS_PATH=$work/over build "kedit$i.log" --keep-tree "$@")
        r=$(awk '/\(restore cached steps\)/ { print $NF }' "kedit$i.log" | tail -1)
        if [ "$i" = 0 ]; then kfirst=$t; kfirst_r=$r; else echo "$t" >> kedit; echo "$r" >> krestore; fi
    done
fi

e=$(median < edit); r=$(median < restore)
printf '\n%-52s %10s\n' "measure (median of $runs rebuilds)" "seconds"
printf '%-52s %10.2f\n' "cold vm debian-minimal -t qcow2" "$cold" \
    "rebuild after editing install.d/$hook" "$e" "restoring the cached steps before it" "$r"
printf '%-52s %10.4f  (1/%.1f; target <= 1/10)\n' "rebuild / cold" "$(echo "$e / $cold" | bc -l)" \
    "$(echo "$cold / $e" | bc -l)"
if [ "${KEEP_TREE:-0}" = 1 ]; then
    printf '%-52s %10.2f  (restore %.3f s)\n' "first --keep-tree rebuild (fills the kept tree)" \
        "$kfirst" "$kfirst_r"
    printf '%-52s %10.2f\n' "rebuild with --keep-tree" "$(median < kedit)"
    printf '%-52s %10.3f\n' "restoring from the kept tree" "$(median < krestore)"
fi
echo "qcow2 clusters reused per rebuild: $(tr '\n' ';' < reuse)"
echo "where a rebuild's time goes (last one):"
sed -n '/Target: build/,/END PROFILING/p' "edit$runs.log" | grep -v '^$' | sed 's/^/  /'
