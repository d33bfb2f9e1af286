#!/usr/bin/env bash
# Times, in one run on the same tree, GNU tar + zstd against strata's layer pack/unpack.
#
#   benches/pack_vs_tar.sh ROOTFS [RUNS]
#
# pack:   tar --sort=name --numeric-owner --xattrs -cf - -C ROOTFS . | zstd -T0 -3 > x
#         vs  layer_tool pack ROOTFS > y           (zstd level 3, all cores, blake3 diff id)
# unpack: zstd -dc x | tar -x (--xattrs --xattrs-include='*' --numeric-owner -p)
#         vs  layer_tool unpack y DIR
# Unpacks go to a directory next to the archives (WORK, default a temp dir under /tmp; set
# WORK=/dev/shm/... to measure tmpfs). Every timed command starts after a `sync`, so neither
# side pays for the other's writeback. Prints each run, then medians and strata/tar ratios.
# Outside tmpfs the unpacked trees are kept until the end instead of deleted before each run:
# ext4 without a journal (this machine's /) skips, when it allocates an inode, every inode
# deleted in the last five minutes (ten if not yet written back), so a timed unpack right after
# deleting 40 000 files measured mostly that scan. Leave ten minutes between two such runs.
set -euo pipefail

ROOTFS=${1:?usage: $0 ROOTFS [RUNS]}
RUNS=${2:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TOOL=${LAYER_TOOL:-$HERE/target/release/examples/layer_tool}
if [ ! -x "$TOOL" ]; then
    (cd "$HERE" && cargo build --release --example layer_tool)
fi
WORK=${WORK:-$(mktemp -d /tmp/strata-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -a TP SP TU SU
# Runs a command after a sync and prints its wall time in seconds.
timed() { sync; local t0; t0=$(now); "$@"; echo "$(now) - $t0" | bc; }
pack_tar() { tar --sort=name --numeric-owner --xattrs -cf - -C "$ROOTFS" . | zstd -q -T0 -3 > "$WORK/tar.zst"; }
pack_strata() { "$TOOL" pack "$ROOTFS" > "$WORK/strata.zst" 2>/dev/null; }
unpack_tar() { zstd -q -dc "$WORK/tar.zst" | tar --xattrs --xattrs-include='*' --numeric-owner -p -xf - -C "$UT"; }
unpack_strata() { "$TOOL" unpack "$WORK/strata.zst" "$US" 2>/dev/null; }
if [ "$(stat -f -c %T "$WORK")" = tmpfs ]; then KEEP=''; else KEEP=1; fi

for i in $(seq 1 "$RUNS"); do
    TP+=("$(timed pack_tar)")
    SP+=("$(timed pack_strata)")
    if [ -n "$KEEP" ]; then
        UT=$WORK/u-tar.$i US=$WORK/u-strata.$i
    else
        UT=$WORK/u-tar US=$WORK/u-strata
        rm -rf "$UT" "$US"
    fi
    mkdir "$UT" "$US"
    TU+=("$(timed unpack_tar)")
    SU+=("$(timed unpack_strata)")
    printf 'run %d: pack tar+zstd %.3fs strata %.3fs | unpack zstd+tar %.3fs strata %.3fs\n' \
        "$i" "${TP[-1]}" "${SP[-1]}" "${TU[-1]}" "${SU[-1]}"
done

mtp=$(printf '%s\n' "${TP[@]}" | median); msp=$(printf '%s\n' "${SP[@]}" | median)
mtu=$(printf '%s\n' "${TU[@]}" | median); msu=$(printf '%s\n' "${SU[@]}" | median)
echo "tree: $(du -sh --apparent-size "$ROOTFS" | cut -f1), $(find "$ROOTFS" | wc -l) paths; blobs: tar.zst $(stat -c %s "$WORK/tar.zst") B, strata $(stat -c %s "$WORK/strata.zst") B"
printf 'median pack:   tar+zstd %.3fs  strata %.3fs  ratio strata/tar %.2f\n' "$mtp" "$msp" "$(echo "$msp / $mtp" | bc -l)"
printf 'median unpack: zstd+tar %.3fs  strata %.3fs  ratio strata/tar %.2f\n' "$mtu" "$msu" "$(echo "$msu / $mtu" | bc -l)"
