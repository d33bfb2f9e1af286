# shellcheck shell=bash
# Sourced by the scripts that build with dib's own elements (tests/dib_build.sh, dib_vm.sh,
# dib_many.sh, dib_sweep.sh): the one place that sets up what a dib user would have.
#
#   . tests/dib_env.sh
#   dib_env WORK           # WORK: an existing folder for the venv and the download cache
#   dib_build LOG ARGS...  # strata build ARGS with that environment, in the current folder
#
# dib_env installs diskimage-builder ($DIB_VERSION, default 3.43.0) from PyPI into WORK/venv
# (or uses the venv in $DIB_VENV when it already has it: reruns by hand skip the download),
# then exports what a dib user sets:
#   ELEMENTS_PATH            dib's elements, inside the installed wheel
#   DIB_PYTHON_EXEC          the venv's python: dib's host-side Python hooks import
#                            diskimage_builder through it
#   DIB_RELEASE              bookworm (dib's default is "stable", which moves)
#   DIB_DISTRIBUTION_MIRROR  the host's apt mirror (or the caller's DIB_DISTRIBUTION_MIRROR)
#   DIB_APT_SOURCES_CONF     that one mirror for the image's sources (dib adds the updates and
#                            security suites otherwise)
#   DIB_IMAGE_CACHE          WORK/image-cache (or the caller's): dib's download cache
#   STRATA_ELEMENTS_DIR      an empty folder, so only dib's elements are found
# and sets `strata` (the binary: $STRATA, else the cargo target dir's debug build, built when
# missing) and `dib_elements`. Run as root.

dib_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
strata=${STRATA:-${CARGO_TARGET_DIR:-$dib_repo/target}/debug/strata}

dib_env() {
    local work=$1 venv mirror
    if [ ! -x "$strata" ]; then
        (cd "$dib_repo" && cargo build --quiet) || return 1
    fi
    venv=${DIB_VENV:-$work/venv}
    if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -c 'import diskimage_builder' 2>/dev/null; then
        if ! { python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet "diskimage-builder==${DIB_VERSION:-3.43.0}"; }; then
            echo "dib_env: could not install diskimage-builder into $venv" >&2
            return 1
        fi
    fi
    dib_elements=$(echo "$venv"/lib/python3*/site-packages/diskimage_builder/elements)
    [ -d "$dib_elements" ] || { echo "dib_env: no elements folder in the wheel ($venv)" >&2; return 1; }

    mirror=${DIB_DISTRIBUTION_MIRROR:-}
    if [ -z "$mirror" ]; then
        mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" && $3 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$mirror" ] || {
        echo "dib_env: no Debian mirror in the host's apt sources; set DIB_DISTRIBUTION_MIRROR" >&2
        return 1
    }

    mkdir -p "$work/no-strata-elements"
    export ELEMENTS_PATH=$dib_elements
    export DIB_PYTHON_EXEC=$venv/bin/python3
    export DIB_RELEASE=bookworm
    export DIB_DISTRIBUTION_MIRROR=$mirror
    export DIB_APT_SOURCES_CONF="default:deb $mirror bookworm main"
    export DIB_IMAGE_CACHE=${DIB_IMAGE_CACHE:-$work/image-cache}
    export STRATA_ELEMENTS_DIR=$work/no-strata-elements
}

# dib_build LOG ARGS...: `strata build ARGS` in the current folder, its output in LOG; on
# failure the last 40 lines go to stderr and the status is strata's.
dib_build() {
    local log=$1 status=0
    shift
    "$strata" build "$@" 2> "$log" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "dib_build: strata build $* failed ($status); last lines of $log:" >&2
        tail -40 "$log" >&2
    fi
    return "$status"
}
