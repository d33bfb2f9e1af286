#!/bin/bash
# Lint the elements strata ships (elements/): shellcheck plus dib's element
# conventions. Exits non-zero and names file and rule for every violation.
#
#   tests/elements_lint.sh [ELEMENTS_DIR]
#
# Rules:
#   - every element has a README.md;
#   - phase hooks and bin/ tools: a shebang (#!/bin/bash; bin/ may use
#     #!/bin/sh), the executable bit, a run-parts friendly name, the
#     DIB_DEBUG_TRACE idiom, "set -eu" and "set -o pipefail" (bash), bash -n /
#     sh -n, shellcheck clean;
#   - environment.d files: not executable, no "set -x", shellcheck clean as bash;
#   - element-deps and element-provides: sorted, no repeats, every dependency
#     is an element here or provided by one;
#   - no tabs, 4-space indentation in shell code (heredoc bodies and
#     continuation lines excepted), no `which`;
#   - no two elements ship the same file name in the same phase folder,
#     bin/ or environment.d/ (the merged hooks tree would clash);
#   - package-installs as YAML only (parsed when python3-yaml is present),
#     pkg-map files valid JSON;
#   - no URL with a host name (mirrors come from the host or the user).

set -u
set -o pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
elements=${1:-$root/elements}
failures=0

fail() {
    echo "elements-lint: $*" >&2
    failures=$((failures + 1))
}

if ! command -v shellcheck > /dev/null; then
    echo "elements-lint: shellcheck is not installed (apt-get install shellcheck)" >&2
    exit 2
fi
if [ ! -d "$elements" ]; then
    echo "elements-lint: no elements folder at $elements" >&2
    exit 2
fi

phases="root.d extra-data.d pre-install.d install.d post-install.d post-root.d block-device.d pre-finalise.d finalise.d cleanup.d"

# Indentation: every indented shell line starts with a multiple of 4 spaces,
# except inside heredocs and on continuation lines.
check_indent() {
    awk -v file="$1" '
        function report(msg) { print "elements-lint: " file ":" FNR ": " msg > "/dev/stderr"; bad = 1 }
        heredoc != "" {
            line = $0
            if (strip) sub(/^\t+/, "", line)
            if (line == heredoc) heredoc = ""
            prev = $0
            next
        }
        {
            if ($0 ~ /\t/) report("tab character")
            cont = (prev ~ /(\\|\||&&|\(|\{)[ ]*$/)
            match($0, /^ */)
            if (!cont && RLENGTH % 4 != 0 && $0 !~ /^ *$/ && $0 !~ /^ *#/) report("indent of " RLENGTH " spaces is not a multiple of 4")
            if ($0 ~ /(^|[;&|(`] *|\$\( *)which[ \t]/ && $0 !~ /^ *#/) report("uses which (use command -v)")
            if (match($0, /<<-?[ ]*["\047]?[A-Za-z_][A-Za-z_0-9]*["\047]?/) && $0 !~ /<<</) {
                tag = substr($0, RSTART, RLENGTH)
                strip = (tag ~ /^<<-/)
                gsub(/^<<-?[ ]*|["\047]/, "", tag)
                heredoc = tag
            }
            prev = $0
        }
        END { exit bad }
    ' "$1"
}

check_bash_conventions() {
    local file=$1
    if ! grep -q -E '^if \[ "?\$\{DIB_DEBUG_TRACE:-[01]\}"? -gt 0 \]; then$' "$file" ||
        ! grep -q -x '    set -x' "$file"; then
        fail "$file: missing the DIB_DEBUG_TRACE idiom (if [ \"\${DIB_DEBUG_TRACE:-0}\" -gt 0 ]; then set -x; fi)"
    fi
    if ! grep -q -x -E 'set -eu( -o pipefail)?' "$file"; then
        fail "$file: missing 'set -eu'"
    fi
    if ! grep -q -x -E 'set (-eu )?-o pipefail' "$file"; then
        fail "$file: missing 'set -o pipefail'"
    fi
}

# check_script FILE KIND: KIND is hook or tool.
check_script() {
    local file=$1 kind=$2 shebang
    shebang=$(head -n 1 "$file")
    if [ ! -x "$file" ]; then
        fail "$file: not executable"
    fi
    case $shebang in
        '#!/bin/bash')
            bash -n "$file" || fail "$file: bash -n failed"
            check_bash_conventions "$file"
            ;;
        '#!/bin/sh')
            if [ "$kind" = hook ]; then
                fail "$file: hooks use #!/bin/bash"
            fi
            sh -n "$file" || fail "$file: sh -n failed"
            grep -q -x 'set -eu' "$file" || fail "$file: missing 'set -eu'"
            ;;
        *)
            fail "$file: first line must be #!/bin/bash (or #!/bin/sh for bin/ tools), got '$shebang'"
            return
            ;;
    esac
    shellcheck "$file" || fail "$file: shellcheck reported problems"
    check_indent "$file" || fail "$file: indentation/style problems (above)"
}

declare -A known=()
# Two elements that provide the same virtual name can never be in one build (dib refuses), so
# the same file name in both is not a clash.
alternatives() {
    local a="$1" b="$2"
    [ -f "$elements/$a/element-provides" ] && [ -f "$elements/$b/element-provides" ] || return 1
    [ -n "$(LC_ALL=C comm -12 <(LC_ALL=C sort "$elements/$a/element-provides") \
        <(LC_ALL=C sort "$elements/$b/element-provides"))" ]
}

for dir in "$elements"/*/; do
    known[$(basename "$dir")]=1
done
for provides in "$elements"/*/element-provides; do
    [ -f "$provides" ] || continue
    while read -r name; do
        [ -n "$name" ] && known[$name]=1
    done < "$provides"
done

declare -A hook_owner=()
for dir in "$elements"/*/; do
    element=$(basename "$dir")
    dir=${dir%/}

    [ -f "$dir/README.md" ] || fail "$element: no README.md"
    [ ! -e "$dir/package-installs.json" ] || fail "$element: package-installs.json; write package-installs.yaml"

    for list in element-deps element-provides; do
        [ -f "$dir/$list" ] || continue
        if ! LC_ALL=C sort -c -u "$dir/$list" 2> /dev/null; then
            fail "$element/$list: not sorted (LC_ALL=C) or has repeats"
        fi
        if grep -q -v -E '^[A-Za-z0-9_.-]+$' "$dir/$list"; then
            fail "$element/$list: every line must be one element name"
        fi
    done
    if [ -f "$dir/element-deps" ]; then
        while read -r dep; do
            [ -n "$dep" ] || continue
            [ -n "${known[$dep]:-}" ] || fail "$element/element-deps: no element named or providing '$dep'"
        done < "$dir/element-deps"
    fi

    for phase in $phases; do
        [ -d "$dir/$phase" ] || continue
        for hook in "$dir/$phase"/*; do
            [ -e "$hook" ] || continue
            name=$(basename "$hook")
            if [ -d "$hook" ]; then
                continue
            fi
            if ! [[ $name =~ ^[0-9A-Za-z_-]+$ ]]; then
                fail "$element/$phase/$name: the phase runner skips names with characters other than [0-9A-Za-z_-]"
            fi
            if [ -n "${hook_owner[$phase/$name]:-}" ] && ! alternatives "${hook_owner[$phase/$name]}" "$element"; then
                fail "$phase/$name is shipped by both ${hook_owner[$phase/$name]} and $element"
            fi
            hook_owner[$phase/$name]=$element
            check_script "$hook" hook
        done
    done

    if [ -d "$dir/bin" ]; then
        for tool in "$dir"/bin/*; do
            [ -f "$tool" ] || continue
            name=$(basename "$tool")
            if [ -n "${hook_owner[bin/$name]:-}" ] && ! alternatives "${hook_owner[bin/$name]}" "$element"; then
                fail "bin/$name is shipped by both ${hook_owner[bin/$name]} and $element"
            fi
            hook_owner[bin/$name]=$element
            check_script "$tool" tool
        done
    fi

    if [ -d "$dir/environment.d" ]; then
        for env in "$dir"/environment.d/*; do
            [ -f "$env" ] || continue
            name=$(basename "$env")
            if [ -n "${hook_owner[environment.d/$name]:-}" ] && ! alternatives "${hook_owner[environment.d/$name]}" "$element"; then
                fail "environment.d/$name is shipped by both ${hook_owner[environment.d/$name]} and $element"
            fi
            hook_owner[environment.d/$name]=$element
            if [ -x "$env" ]; then
                fail "$element/environment.d/$name: environment files must not be executable"
            fi
            if ! [[ $name =~ ^[0-9A-Za-z_.-]+$ ]]; then
                fail "$element/environment.d/$name: name has characters other than [0-9A-Za-z_.-]"
            fi
            if grep -q -E '^[[:space:]]*set -[a-z]*x' "$env"; then
                fail "$element/environment.d/$name: environment files must not turn on set -x"
            fi
            bash -n "$env" || fail "$element/environment.d/$name: bash -n failed"
            shellcheck -s bash "$env" || fail "$element/environment.d/$name: shellcheck reported problems"
            check_indent "$env" || fail "$element/environment.d/$name: indentation/style problems (above)"
        done
    fi

    if [ -f "$dir/pkg-map" ]; then
        python3 -m json.tool "$dir/pkg-map" > /dev/null ||
            fail "$element/pkg-map: not valid JSON"
    fi
    if [ -f "$dir/package-installs.yaml" ]; then
        if grep -q "$(printf '\t')" "$dir/package-installs.yaml"; then
            fail "$element/package-installs.yaml: tab character"
        fi
        if python3 -c 'import yaml' 2> /dev/null; then
            python3 - "$dir/package-installs.yaml" <<'PY' || fail "$element/package-installs.yaml: not a YAML mapping of package names"
import sys, yaml
with open(sys.argv[1]) as f:
    data = yaml.safe_load(f)
sys.exit(0 if isinstance(data, dict) and data else 1)
PY
        fi
    fi
done

# Mirrors and registries are never named: they come from the host's apt
# sources or from the user.
if grep -r -n -I -E '(https?|ftp)://[A-Za-z0-9-]+\.[A-Za-z0-9.-]+' "$elements"; then
    fail "a URL with a host name appears in the elements (above); take mirrors from the host's apt sources or DIB_* variables"
fi

if [ "$failures" -gt 0 ]; then
    echo "elements-lint: $failures problem(s)" >&2
    exit 1
fi
count=$(find "$elements" -mindepth 1 -maxdepth 1 -type d | wc -l)
echo "elements-lint: $count elements clean"
