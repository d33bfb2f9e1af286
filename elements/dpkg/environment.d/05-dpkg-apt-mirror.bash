# Defines dib_apt_find_mirror, used by the operating-system elements'
# environment files (sourced after this one) to pick a default mirror.
#
# dib_apt_find_mirror FLAVOUR prints the first URI of this system's apt
# sources that serves FLAVOUR suites, or nothing. FLAVOUR is one of:
#   debian           a Debian suite that is not -security
#   debian-security  a Debian -security suite
#   ubuntu           an Ubuntu suite (or $DIB_RELEASE) that is not -security
#
# "This system" is the host when sourced for a host phase and the image when
# sourced inside the chroot; the image's sources were written from the same
# mirror, so both sides agree.
dib_apt_find_mirror() {
    local flavour=$1
    local -a files=()
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources; do
        if [ -f "$f" ]; then
            files+=("$f")
        fi
    done
    if [ ${#files[@]} -eq 0 ]; then
        return 0
    fi
    awk -v want="$flavour" -v release="${DIB_RELEASE:-}" '
        BEGIN {
            n = split("hamm slink potato woody sarge etch lenny squeeze wheezy " \
                "jessie stretch buster bullseye bookworm trixie forky duke sid " \
                "stable testing unstable oldstable oldoldstable experimental", d, " ")
            for (i = 1; i <= n; i++) debian[d[i]] = 1
            n = split("trusty xenial bionic focal jammy kinetic lunar mantic " \
                "noble oracular plucky questing resolute devel", u, " ")
            for (i = 1; i <= n; i++) ubuntu[u[i]] = 1
        }
        function matches(suite,    base, security) {
            security = (suite ~ /-security$/ || suite ~ /\/updates$/)
            base = suite
            sub(/\/updates$/, "", base)
            sub(/-(security|updates|backports|proposed)$/, "", base)
            if (want == "debian") return !security && (base in debian)
            if (want == "debian-security") return security && (base in debian)
            if (want == "ubuntu") return !security && ((base in ubuntu) || (release != "" && base == release && !(base in debian)))
            return 0
        }
        function usable(uri) {
            return uri ~ /^(https?|ftp|file):/
        }
        function consider(types, uris, suites,    nu, ns, i, j, us, ss) {
            if (types !~ /(^|[ \t])deb([ \t]|$)/) return
            nu = split(uris, us, /[ \t]+/)
            ns = split(suites, ss, /[ \t]+/)
            for (j = 1; j <= ns; j++) {
                if (ss[j] == "" || !matches(ss[j])) continue
                for (i = 1; i <= nu; i++) {
                    if (usable(us[i])) {
                        sub(/\/+$/, "", us[i])
                        print us[i]
                        found = 1
                        exit
                    }
                }
            }
        }
        function flush() {
            if (s_types != "" && tolower(s_enabled) != "no") consider(s_types, s_uris, s_suites)
            s_types = s_uris = s_suites = s_enabled = ""
        }
        FNR == 1 { flush() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]*#/ || $0 ~ /^[ \t]/) next
            key = tolower($1)
            val = $0
            sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types:") s_types = val
            else if (key == "uris:") s_uris = val
            else if (key == "suites:") s_suites = val
            else if (key == "enabled:") s_enabled = val
            next
        }
        {
            line = $0
            sub(/#.*/, "", line)
            nf = split(line, w, /[ \t]+/)
            i = 1
            if (w[1] == "") i = 2
            if (w[i] != "deb") next
            i++
            if (substr(w[i], 1, 1) == "[") {
                while (i <= nf && w[i] !~ /\]$/) i++
                i++
            }
            if (i + 1 <= nf) consider("deb", w[i], w[i + 1])
        }
        END { if (!found) flush() }
    ' "${files[@]}"
}
