#!/usr/bin/env bash
# Compatibility sweep (not run by CI: ~1.5 min an element): builds `debian-minimal X` for
# every Debian-applicable element X of dib's own (diskimage-builder from PyPI, set up by
# tests/dib_env.sh), one at a time, as tar, each with the variables it needs, then runs each
# successful build again (every step must come from the cache). Writes a Markdown table:
# element, result, time of the cold build, steps run / cached on the rerun, and for failures
# the last lines of the log.
#
#   tests/dib_sweep.sh [-o RESULTS_DIR] [ELEMENT...]     (default: every element below)
#
# RESULTS_DIR (default ./dib-sweep) gets table.md and each element's JSON events
# (`--progress json`). Builds run one at a time in a temp folder under $TMPDIR (or /var/tmp);
# each build's layer cache is removed after it (dib's download cache, DIB_IMAGE_CACHE, is
# shared). DIB_VENV reuses a venv that has diskimage-builder. Run as root, e.g. with
# `nice -n 10 tests/dib_sweep.sh -o /var/tmp/sweep` beside other work. Never run two sweeps
# (or any two builds with dib's dpkg element) on one DIB_IMAGE_CACHE at once: dib binds
# DIB_IMAGE_CACHE/apt into each image and apt fails on the other build's archives lock.
set -euo pipefail
# shellcheck source=tests/dib_env.sh
. "$(dirname "$0")/dib_env.sh"

# One line an element: NAME | ELEMENTS (default: debian-minimal NAME) | VARIABLES it needs.
# The first 21 are the ones issue 14 tried; the rest follow (a partial run still covers those).
# @FILES@ in a value is a folder of input files this script writes (see write_files).
specs='
devuser                     | | DIB_DEV_USER_PASSWORD=strata DIB_DEV_USER_PWDLESS_SUDO=yes
growroot                    | |
cloud-init                  | |
cloud-init-datasources      | debian-minimal cloud-init cloud-init-datasources | DIB_CLOUD_INIT_DATASOURCES=NoCloud,ConfigDrive
cloud-init-nocloud          | debian-minimal cloud-init cloud-init-nocloud |
openssh-server              | |
runtime-ssh-host-keys       | |
dhcp-all-interfaces         | | DIB_DHCP_TIMEOUT=42
enable-serial-console       | |
install-static              | |
journal-to-console          | |
disable-nouveau             | |
modprobe                    | | DIB_MODPROBE_BLACKLIST=floppy
sysctl                      | |
apt-conf                    | | DIB_APT_CONF=@FILES@/apt.conf
apt-preferences             | | DIB_DPKG_MANIFEST=@FILES@/dpkg-manifest.json
dynamic-login               | |
iscsi-boot                  | |
stable-interface-names      | |
debian                      | |
debian base                 | debian base |
cloud-init-growpart         | debian-minimal cloud-init cloud-init-growpart | DIB_CLOUD_INIT_GROWPART_DEVICES=[/dev/vda1]
cloud-init-disable-resizefs | debian-minimal cloud-init cloud-init-disable-resizefs |
apt-sources                 | | DIB_APT_SOURCES=@FILES@/sources.list
local-config                | |
posix                       | |
element-manifest            | |
select-boot-kernel-initrd   | |
cleanup-kernel-initrd       | |
autoupdates                 | | DIB_DEB_UPDATES_CONF=@FILES@/50unattended-upgrades
fail2ban                    | | DIB_FAIL2BAN_CONF=@FILES@/jail.local
'

# Elements expected to fail on bookworm, and why (the table says "failed (expected)").
expected_failure() {
    case $1 in
        stable-interface-names) echo "wants the biosdevname package, which bookworm does not have" ;;
        *) return 1 ;;
    esac
}

out=$PWD/dib-sweep
if [ "${1:-}" = -o ]; then
    out=$(mkdir -p "$2" && cd "$2" && pwd)
    shift 2
fi
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/strata-dib-sweep.XXXXXX")
trap 'rm -rf "$work"' EXIT
dib_env "$work"

write_files() {
    local files=$1
    mkdir -p "$files"
    printf 'Acquire::Retries "3";\n' > "$files/apt.conf"
    printf '{"packages": [{"package": "strata-sweep-pin", "version": "1.0"}]}\n' > "$files/dpkg-manifest.json"
    printf 'deb %s bookworm main\n' "$DIB_DISTRIBUTION_MIRROR" > "$files/sources.list"
    # shellcheck disable=SC2016 # ${distro_codename} is unattended-upgrades' own variable
    printf 'Unattended-Upgrade::Origins-Pattern { "origin=Debian,codename=${distro_codename}"; };\n' \
        > "$files/50unattended-upgrades"
    printf '[sshd]\nenabled = true\n' > "$files/jail.local"
}
write_files "$work/files"
# The sweep tests each element, not debootstrap: dib's debootstrap element keeps its first
# result as a tarball in DIB_IMAGE_CACHE and later builds unpack it (about 2 of a build's
# minutes saved each). DIB_DEBOOTSTRAP_CACHE=0 turns that off.
export DIB_DEBOOTSTRAP_CACHE=${DIB_DEBOOTSTRAP_CACHE:-1}
[ "$DIB_DEBOOTSTRAP_CACHE" = 0 ] || export DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1

# The build-end event's field $2 from the JSON events in $1 (empty when there is none).
build_end() { jq -r "select(.event == \"build-end\") | .$2" "$1" 2>/dev/null | tail -1; }

table=$out/table.md
{
    echo "| element | result | cold build | steps run; cached on rerun | last lines of a failure |"
    echo "|---|---|---|---|---|"
} > "$table"
built=0
total=0
while IFS='|' read -r name elements vars; do
    name=$(echo "$name" | xargs)
    [ -n "$name" ] || continue
    if [ "$#" -gt 0 ] && ! printf '%s\n' "$@" | grep -qxF -- "$name"; then
        continue
    fi
    elements=$(echo "$elements" | xargs)
    [ -n "$elements" ] || elements="debian-minimal $name"
    vars=$(echo "$vars" | xargs)
    vars=${vars//@FILES@/$work/files}
    slug=${name// /-}
    dir=$work/$slug
    mkdir -p "$dir"
    total=$((total + 1))
    echo "dib_sweep: $elements ${vars:+($vars)}" >&2
    # shellcheck disable=SC2086 # the element list and the VAR=value words split on purpose
    build() { (cd "$dir" && env $vars "$strata" build -t tar -o img --cache-dir cache --progress json $elements); }
    started=$(date +%s.%N)
    status=0
    build 2> "$out/$slug.jsonl" || status=$?
    seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    steps=$(build_end "$out/$slug.jsonl" steps)
    if [ "$status" -eq 0 ]; then
        rerun=0
        build 2> "$out/$slug.rerun.jsonl" || rerun=$?
        cached=$(build_end "$out/$slug.rerun.jsonl" cached)
        if [ "$rerun" -eq 0 ]; then
            result=built
            built=$((built + 1))
        else
            result="rerun failed ($rerun)"
        fi
        tail=""
    else
        cached=-
        result="failed ($status)"
        if why=$(expected_failure "$name"); then
            result="failed, expected: $why"
        fi
        # The last hook output and error lines, one table cell.
        tail=$(jq -r 'select(.event == "hook-output" or (.event == "log" and .level == "error"))
                | (.line // .message)' "$out/$slug.jsonl" 2>/dev/null | tail -6 |
            sed -E 's/\|/\\|/g; s/`//g; s#(https?://)[^/ ]+#\1MIRROR#g' | awk 'NR > 1 { printf "<br>" } { printf "`%s`", $0 }')
    fi
    printf '| %s | %s | %.0f s | %s; %s of %s | %s |\n' "\`$elements\`${vars:+ ($vars)}" "$result" \
        "$seconds" "${steps:-?}" "${cached:-?}" "${steps:-?}" "$tail" | sed "s|$work/files|FILES|g" >> "$table"
    rm -rf "$dir"
done <<< "$specs"

{
    echo
    echo "$built of $total builds succeeded ($(date -u +%Y-%m-%d), diskimage-builder" \
        "${DIB_VERSION:-3.43.0}, DIB_RELEASE=$DIB_RELEASE, strata $("$strata" --version | awk '{ print $2 }'))."
} >> "$table"
cat "$table"
