#!/usr/bin/env bash
# Many of dib's own elements in ONE build (CI time: one debian-minimal build): each element gets
# the variables it needs (the list below, from each element's README in dib 3.43.0), and its
# visible effect in the tree is checked where it has one (a user, a service enabled, a config
# file, a package, a tool). The set-up is tests/dib_env.sh's. Run as root.
#
#   tests/dib_many.sh [OUT_DIR]     (default: a temp folder, removed at the end)
# shellcheck disable=SC2317 # the helpers below run through check()
set -euo pipefail
# shellcheck source=tests/dib_env.sh
. "$(dirname "$0")/dib_env.sh"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/strata-dib-many.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
if [ "$#" -gt 0 ]; then
    mkdir -p "$1"
    out=$(cd "$1" && pwd)
fi
mkdir -p "$out" "$work/files"
files=$work/files
dib_env "$work"

# Input files some elements read from the build host.
printf 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStrataDibManyTestKeyOnly strata@ci\n' > "$files/authorized_keys"
printf 'Acquire::Retries "3";\n' > "$files/apt.conf"
printf '{"packages": [{"package": "strata-pin-test", "version": "1.2.3"}]}\n' > "$files/dpkg-manifest.json"

# element -> the variables it needs (one VAR=value a line; an element without any has none).
declare -A needs=(
    [devuser]="DIB_DEV_USER_USERNAME=stratadev
DIB_DEV_USER_SHELL=/bin/bash
DIB_DEV_USER_GROUPS=adm
DIB_DEV_USER_PWDLESS_SUDO=yes
DIB_DEV_USER_PASSWORD=strata
DIB_DEV_USER_AUTHORIZED_KEYS=$files/authorized_keys"
    # Required (the build fails without it). cloud-init-nocloud's environment.d sets it to
    # NoCloud whatever the caller says, so the two agree here.
    [cloud-init-datasources]="DIB_CLOUD_INIT_DATASOURCES=NoCloud"
    [dhcp-all-interfaces]="DIB_DHCP_TIMEOUT=42"
    [modprobe]="DIB_MODPROBE_BLACKLIST=floppy pcspkr"
    [apt-conf]="DIB_APT_CONF=$files/apt.conf"
    [apt-preferences]="DIB_DPKG_MANIFEST=$files/dpkg-manifest.json"
    [openssh-server]="DIB_OPENSSH_SERVER_HARDENING=1"
)
# cloud-init: what cloud-init-datasources and -nocloud configure (/etc/cloud/cloud.cfg.d).
elements=(
    debian-minimal devuser growroot cloud-init cloud-init-datasources cloud-init-nocloud
    openssh-server runtime-ssh-host-keys dhcp-all-interfaces enable-serial-console install-static
    journal-to-console disable-nouveau sysctl modprobe apt-conf apt-preferences dynamic-login
    element-manifest
)
for e in "${elements[@]}"; do
    [ -n "${needs[$e]:-}" ] || continue
    while IFS= read -r assignment; do
        export "${assignment?}"
    done <<< "${needs[$e]}"
done

cd "$out"
started=$(date +%s)
dib_build build.log -t tar -o many --cache-dir "$work/cache" "${elements[@]}"
echo "dib_many: built in $(($(date +%s) - started)) s" >&2

fail=0
check() { if ! "$@"; then echo "dib_many: check failed: $*" >&2; fail=1; fi; }
listing=$(tar -tf many.tar)
verbose=$(tar -tvf many.tar)
has() { grep -qx -- "$1" <<< "$listing"; }
member() { tar -xOf many.tar "$1" 2>/dev/null; }
contains() { member "$1" | grep -qF -- "$2"; }
# A unit enabled the systemd way: a symlink in /etc/systemd/system/<target>.wants/.
enabled() { grep -qE "^l.* etc/systemd/system/[^/]+\.wants/$1 -> " <<< "$verbose"; }
status=$(member var/lib/dpkg/status)
installed() { grep -qx "Package: $1" <<< "$status"; }

# devuser: the user with its shell, group, password, key and sudo rule.
check grep -q '^stratadev:x:[0-9]*:[0-9]*::/home/stratadev:/bin/bash$' <<< "$(member etc/passwd)"
check grep -qE '^adm:x:[0-9]+:(.*,)?stratadev(,|$)' <<< "$(member etc/group)"
check grep -qE '^stratadev:\$' <<< "$(member etc/shadow)"
check contains home/stratadev/.ssh/authorized_keys StrataDibManyTestKeyOnly
check contains etc/sudoers.d/stratadev 'stratadev ALL=(ALL) NOPASSWD:ALL'
check installed sudo
# growroot: its tool (install-static), its unit enabled, growpart installed.
check has usr/local/sbin/growroot
check enabled growroot.service
check installed cloud-utils
# cloud-init and its data sources: the package, its units, the data source list, the seed.
check installed cloud-init
check enabled cloud-init.service
check contains etc/cloud/cloud.cfg.d/91-dib-cloud-init-datasources.cfg 'datasource_list: [  NoCloud, None ]'
check has var/lib/cloud/seed/nocloud/user-data
check has var/lib/cloud/seed/nocloud/meta-data
# openssh-server: installed, enabled, hardened.
check installed openssh-server
check enabled ssh.service
check grep -q '^KexAlgorithms curve25519-sha256@libssh.org' <<< "$(member etc/ssh/sshd_config)"
# runtime-ssh-host-keys: keys made at first boot, none in the image.
check enabled ssh-keygen.service
check has usr/local/sbin/runtime-ssh-host-keys.sh
if grep -q '^etc/ssh/ssh_host_' <<< "$listing"; then
    echo "dib_many: ssh host keys left in the image" >&2
    fail=1
fi
# dhcp-all-interfaces: the script and units with DIB_DHCP_TIMEOUT, its packages, a bare
# /etc/network/interfaces.
check contains usr/local/sbin/dhcp-all-interfaces.sh 42
check contains usr/lib/systemd/system/dhcp-interface@.service 'TimeoutStartSec=84s'
check has etc/udev/rules.d/99-dhcp-all-interfaces.rules
for pkg in isc-dhcp-client ifupdown ndisc6; do check installed "$pkg"; done
check contains etc/network/interfaces 'iface lo inet loopback'
# enable-serial-console: a getty on every active serial port, through udev.
check has etc/udev/rules.d/99-serial-console.rules
# journal-to-console
check contains etc/systemd/journald.conf.d/log-to-console.conf 'ForwardToConsole=true'
# disable-nouveau (through modprobe's modprobe.d copy) and modprobe's own blacklist.
check contains etc/modprobe.d/disable-nouveau.conf 'blacklist nouveau'
check contains etc/modprobe.d/blacklist.conf 'blacklist floppy'
check contains etc/modprobe.d/blacklist.conf 'blacklist pcspkr'
# sysctl: its tools in the image (install-bin).
check grep -qE '^-rwx.* usr/local/bin/sysctl-set-value$' <<< "$verbose"
# apt-conf: the host's file as the image's apt.conf.
check test "$(member etc/apt/apt.conf)" = "$(cat "$files/apt.conf")"
# apt-preferences: a pin for every package of the manifest.
check contains etc/apt/preferences 'Package: strata-pin-test'
check contains etc/apt/preferences 'Pin: version 1.2.3'
check contains etc/apt/preferences 'Pin-Priority: 1001'
# dynamic-login: its tool and unit.
check has usr/local/bin/dynamic-login
check enabled dynamic-login.service
# element-manifest: every element of the build, one a line.
for e in "${elements[@]}"; do
    check grep -qx "$e" <<< "$(member etc/dib-manifests/dib-element-manifest)"
done
grep -E 'steps: ' build.log >&2 || true
exit $fail
