#!/usr/bin/env bash
# Times whole `debian-minimal -t tar` builds against a real registry (Debian's docker-registry
# on 127.0.0.1), side by side in one run, and prints medians and ratios for the targets:
#   cold build with --cache-to REG           vs  the same cold build without it  (target <= 1.10x)
#   build with an EMPTY local cache pulling every step (and the output) from REG
#                                            vs  the cold build                   (target <= 1/10)
# Usage (as root): benches/registry_e2e.sh [RUNS]   (default 3; each cold build is ~1.5 min)
# Every cold build gets a fresh layer cache, a fresh DIB_IMAGE_CACHE and a fresh repository.
set -euo pipefail
runs=${1:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release --quiet)
strata=$here/target/release/strata
work=$(mktemp -d /var/tmp/strata-reg.XXXXXX)
reg_pid=
cleanup() {
    if [ -n "$reg_pid" ]; then kill "$reg_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
export STRATA_ELEMENTS_DIR=$here/elements
unset ELEMENTS_PATH

# The registry: loopback only, its own storage, never the packaged service.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p registry
cat > registry/config.yml <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry/storage}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve registry/config.yml > registry/log 2>&1 &
reg_pid=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/v2/" > /dev/null && break
    sleep 0.1
done

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
build() { # DIR [ARGS...]: builds DIR/deb.tar with DIR/cache and DIR/image-cache
    local dir=$work/$1
    shift
    mkdir -p "$dir"
    local t0 t1
    t0=$(now)
    # The same -o name everywhere: hooks see IMAGE_NAME, so it is part of every key.
    (cd "$dir" && DIB_IMAGE_CACHE=$dir/image-cache "$strata" build -t tar -o deb \
        --cache-dir "$dir/cache" "$@" debian-minimal > "$dir/log" 2>&1) ||
        { tail -30 "$dir/log" >&2; exit 1; }
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

: > cold; : > coldto; : > warm
for i in $(seq "$runs"); do
    ref="http://127.0.0.1:$port/bench/run$i"
    echo "run $i/$runs: cold build" >&2
    build "cold$i" >> cold
    echo "run $i/$runs: cold build with --cache-to" >&2
    build "to$i" --cache-to "$ref" >> coldto
    echo "run $i/$runs: empty local cache, every step from the registry" >&2
    build "from$i" --cache-from "$ref" >> warm
    if ! grep -q "steps: .* cached, 0 run" "from$i/log"; then
        echo "the build from the registry ran steps:" >&2
        tail -5 "from$i/log" >&2
        exit 1
    fi
    cmp "to$i/deb.tar" "from$i/deb.tar"
done

c=$(median < cold); t=$(median < coldto); w=$(median < warm)
printf '\n%-52s %10s\n' "measure ($runs runs each)" "median s"
printf '%-52s %10.2f\n' "cold build" "$c" "cold build, --cache-to" "$t" \
    "empty local cache, --cache-from (all steps pulled)" "$w"
printf '\n%-52s %10.3f  (target <= 1.10)\n' "cold with --cache-to / cold" "$(echo "$t / $c" | bc -l)"
printf '%-52s %10.4f  (1/%.0f; target <= 1/10)\n' "from the registry / cold" \
    "$(echo "$w / $c" | bc -l)" "$(echo "$c / $w" | bc -l)"
