#!/usr/bin/env bash
# Times, on one raw image, `qemu-img convert -c -O qcow2` against strata's qcow2 writer.
#
#   benches/qcow2.sh RAW [RUNS]
#
# qemu:        qemu-img convert -c -O qcow2 RAW q.qcow2              (zlib, one thread)
# full:        qcow2 write RAW s.qcow2                                (zlib, all cores)
# incremental: qcow2 write EDITED s2.qcow2 --previous s.qcow2         (EDITED = RAW with 4 MiB of
#              random bytes written at 1/8, 3/8, 5/8 and 7/8 of its size, 1 MiB each)
# Before timing, checks that both qcow2 outputs pass `qemu-img check` and compare equal to RAW,
# and that the incremental output is byte-identical to a full write of EDITED. Every timed
# command starts after a `sync`. Prints each run (wall, user+sys CPU seconds, the load average),
# the medians and the ratios; on a shared machine the CPU ratio is the steadier one (the wall
# ratio depends on how many cores the other work leaves). Outputs go to WORK (default a temp dir
# under /var/tmp).
set -euo pipefail

RAW=${1:?usage: $0 RAW [RUNS]}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TOOL=${QCOW2_TOOL:-$HERE/target/release/examples/qcow2}
if [ ! -x "$TOOL" ]; then
    (cd "$HERE" && cargo build --release --example qcow2)
fi
WORK=${WORK:-$(mktemp -d /var/tmp/strata-qcow2-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# Runs a command after a sync; prints "wall cpu" (seconds).
timed() {
    sync
    local TIMEFORMAT='%R %U %S' t
    t=$({ time "$@" >/dev/null 2>&1; } 2>&1)
    awk '{printf "%.3f %.3f\n", $1, $2 + $3}' <<<"$t"
}

size=$(stat -c %s "$RAW")
cp --sparse=always "$RAW" "$WORK/edited.raw"
for k in 1 3 5 7; do
    dd if=/dev/urandom of="$WORK/edited.raw" bs=1M count=1 conv=notrunc status=none \
        seek=$((size * k / 8 / 1048576))
done

echo "checking outputs"
qemu() { qemu-img convert -c -O qcow2 "$RAW" "$WORK/q.qcow2"; }
full() { "$TOOL" write "$RAW" "$WORK/s.qcow2"; }
incremental() { "$TOOL" write "$WORK/edited.raw" "$WORK/s2.qcow2" --previous "$WORK/s.qcow2"; }
qemu
full
"$TOOL" write "$WORK/edited.raw" "$WORK/edited-full.qcow2"
"$TOOL" write "$WORK/edited.raw" "$WORK/s2.qcow2" --previous "$WORK/s.qcow2" 2>&1 | sed 's/^/incremental: /'
for f in q s s2; do qemu-img check -q "$WORK/$f.qcow2"; done
qemu-img compare -q "$RAW" "$WORK/s.qcow2"
qemu-img compare -q "$WORK/edited.raw" "$WORK/s2.qcow2"
cmp "$WORK/s2.qcow2" "$WORK/edited-full.qcow2"
echo "sizes: qemu $(stat -c %s "$WORK/q.qcow2") strata $(stat -c %s "$WORK/s.qcow2") bytes"

declare -a QW QC FW FC IW IC
for i in $(seq 1 "$RUNS"); do
    read -r w c < <(timed qemu); QW+=("$w"); QC+=("$c")
    read -r w c < <(timed full); FW+=("$w"); FC+=("$c")
    read -r w c < <(timed incremental); IW+=("$w"); IC+=("$c")
    echo "run $i: qemu-img ${QW[-1]} s (cpu ${QC[-1]}), full ${FW[-1]} s (cpu ${FC[-1]}), incremental ${IW[-1]} s (cpu ${IC[-1]}) [load $(cut -d' ' -f1 /proc/loadavg)]"
done
m() { printf '%s\n' "$@" | median; }
qw=$(m "${QW[@]}"); qc=$(m "${QC[@]}"); fw=$(m "${FW[@]}"); fc=$(m "${FC[@]}")
iw=$(m "${IW[@]}"); ic=$(m "${IC[@]}")
echo "median wall: qemu-img $qw s, strata full $fw s, incremental $iw s"
echo "median cpu:  qemu-img $qc s, strata full $fc s, incremental $ic s"
echo "qemu-img / full: $(echo "scale=2; $qw / $fw" | bc)x wall, $(echo "scale=2; $qc / $fc" | bc)x cpu"
echo "qemu-img / incremental: $(echo "scale=2; $qw / $iw" | bc)x wall, $(echo "scale=2; $qc / $ic" | bc)x cpu"
