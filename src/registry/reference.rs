//! Registry references (`[http://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]`) and sha256 digests,
//! parsed and validated as the OCI distribution spec names them.
//!
//! ```text
//! "http://127.0.0.1:5000/strata/cache:KEY"
//!     scheme ─► Http (explicit), or Https unless the host is in the insecure list
//!     host   ─► "127.0.0.1:5000"   (a dot, a port, `localhost` or [IPv6])
//!     repo   ─► "strata/cache"     (path components [a-z0-9]+ joined by `.` `_` `__` `-+`)
//!     tag    ─► "KEY"              ([A-Za-z0-9_][A-Za-z0-9._-]{0,127})
//! ```

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Longest repository name (with its host) the distribution reference grammar allows.
const MAX_NAME_LEN: usize = 255;
/// Longest tag the distribution spec allows.
const MAX_TAG_LEN: usize = 128;

/// Why a reference, tag, repository name or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "registry reference `{reference}`: {why} (write [http://]HOST[:PORT]/REPO[:TAG], e.g. registry.example:5000/strata/cache)"
    )]
    Reference { reference: String, why: String },
    #[error(
        "repository name `{name}`: {why} (lower-case letters and digits in /-separated parts, joined by `.`, `_`, `__` or dashes)"
    )]
    Repository { name: String, why: String },
    #[error("tag `{tag}`: {why} (1 to 128 of A-Z a-z 0-9 _ . -, not starting with `.` or `-`)")]
    Tag { tag: String, why: String },
    #[error("digest `{digest}`: {why} (write sha256:<64 lower-case hex digits>)")]
    Digest { digest: String, why: String },
}

/// A content digest. Only `sha256` is supported: it is what every registry computes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lower-case hex>`.
    pub fn parse(s: &str) -> Result<Digest, ReferenceError> {
        let bad = |why: &str| ReferenceError::Digest {
            digest: s.to_string(),
            why: why.to_string(),
        };
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(bad("no algorithm prefix"));
        };
        if algorithm != "sha256" {
            return Err(bad(&format!("algorithm `{algorithm}` is not supported")));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("not 64 lower-case hex digits"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// The digest whose sha256 is `hash`.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in hash {
            s.push_str(&format!("{b:02x}"));
        }
        Digest(s)
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part alone.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// How a registry is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Https,
    /// Plain HTTP: only for `http://` references or hosts in the insecure list.
    Http,
}

/// One registry endpoint: scheme and `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registry {
    pub scheme: Scheme,
    /// `host[:port]`, as written (IPv6 in brackets).
    pub host: String,
}

impl Registry {
    /// A registry at `host[:port]`: HTTPS, or plain HTTP when [`is_insecure`] says so.
    pub fn new(host: &str, insecure: &[String]) -> Result<Registry, ReferenceError> {
        validate_host(host).map_err(|why| ReferenceError::Reference {
            reference: host.to_string(),
            why,
        })?;
        let scheme = if is_insecure(host, insecure) {
            Scheme::Http
        } else {
            Scheme::Https
        };
        Ok(Registry {
            scheme,
            host: host.to_string(),
        })
    }

    /// `https://host[:port]` or `http://host[:port]`, no trailing slash.
    pub fn base_url(&self) -> String {
        match self.scheme {
            Scheme::Https => format!("https://{}", self.host),
            Scheme::Http => format!("http://{}", self.host),
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Https => f.write_str(&self.host),
            Scheme::Http => write!(f, "http://{}", self.host),
        }
    }
}

/// Whether `host[:port]` is named by the insecure list (strata's `--insecure-registry HOST`):
/// an entry matches its exact `host:port`, and an entry without a port matches the host on any
/// port.
pub fn is_insecure(host: &str, insecure: &[String]) -> bool {
    let bare = split_port(host).0;
    insecure.iter().any(|entry| {
        let entry = entry.trim();
        entry == host || (split_port(entry).1.is_none() && entry == bare)
    })
}

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: Registry,
    /// The repository path, e.g. `strata/cache`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `[http://|https://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]`. `http://` (or a host in
    /// `insecure`) selects plain HTTP; everything else is HTTPS. The host must look like one
    /// (contain a dot or a port, be `localhost`, or a bracketed IPv6 address): strata has no
    /// default registry.
    pub fn parse(s: &str, insecure: &[String]) -> Result<Reference, ReferenceError> {
        let bad = |why: String| ReferenceError::Reference {
            reference: s.to_string(),
            why,
        };
        let (explicit, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (Some(Scheme::Http), rest)
        } else if let Some(rest) = s.strip_prefix("https://") {
            (Some(Scheme::Https), rest)
        } else if let Some((scheme, _)) = s.split_once("://") {
            return Err(bad(format!("scheme `{scheme}` is not http or https")));
        } else {
            (None, s)
        };
        let (rest, digest) = match rest.rsplit_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest)?)),
            None => (rest, None),
        };
        let Some((host, path)) = rest.split_once('/') else {
            return Err(bad("no repository after the host".to_string()));
        };
        validate_host(host).map_err(&bad)?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (path, None),
        };
        validate_repository(repository)?;
        if host.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(bad(format!(
                "name is longer than {MAX_NAME_LEN} characters"
            )));
        }
        if let Some(tag) = tag {
            validate_tag(tag)?;
        }
        let scheme = match explicit {
            Some(scheme) => scheme,
            None if is_insecure(host, insecure) => Scheme::Http,
            None => Scheme::Https,
        };
        Ok(Reference {
            registry: Registry {
                scheme,
                host: host.to_string(),
            },
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(tag)?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// What a manifest request names: the digest when there is one, else the tag.
    pub fn manifest_reference(&self) -> Option<String> {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Some(d.to_string()),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Splits `host[:port]` (or `[v6]:port`) into host and port text.
fn split_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => match host[end + 1..].strip_prefix(':') {
                Some(port) => (&host[..=end], Some(port)),
                None => (host, None),
            },
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    }
}

fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host".to_string());
    }
    let (name, port) = split_port(host);
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && !port.starts_with('+') => {}
            _ => return Err(format!("port `{port}` is not a number from 1 to 65535")),
        }
    }
    if let Some(v6) = name.strip_prefix('[') {
        let Some(inner) = v6.strip_suffix(']') else {
            return Err(format!("host `{name}` has an unclosed `[`"));
        };
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("`{inner}` is not an IPv6 address"));
    }
    if name.is_empty() {
        return Err("empty host".to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name.split('.').all(label_ok) {
        return Err(format!("`{name}` is not a host name"));
    }
    if port.is_none() && !name.contains('.') && name != "localhost" {
        return Err(format!(
            "`{name}` is not a registry host (a host has a dot or a port, or is localhost)"
        ));
    }
    Ok(())
}

/// Checks a repository name against the distribution spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_repository(name: &str) -> Result<(), ReferenceError> {
    let bad = |why: String| ReferenceError::Repository {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty".to_string()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!("longer than {MAX_NAME_LEN} characters")));
    }
    for part in name.split('/') {
        if part.is_empty() {
            return Err(bad("an empty path part".to_string()));
        }
        let bytes = part.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(bad(format!(
                "part `{part}` must start and end with a lower-case letter or digit"
            )));
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if alnum(b) {
                i += 1;
                continue;
            }
            // A separator run: `.`, `_`, `__` or one or more `-`.
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let sep = &part[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(bad(format!("part `{part}` has the separator `{sep}`")));
            }
        }
    }
    Ok(())
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let bad = |why: &str| ReferenceError::Tag {
        tag: tag.to_string(),
        why: why.to_string(),
    };
    let Some(first) = tag.bytes().next() else {
        return Err(bad("empty"));
    };
    if tag.len() > MAX_TAG_LEN {
        return Err(bad("longer than 128 characters"));
    }
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err(bad("bad first character"));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(bad("bad character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s, &[])
    }

    #[test]
    fn https_by_default_with_port_and_tag() {
        let r = parse("registry.example:5000/strata/cache:abc").unwrap();
        assert_eq!(r.registry.scheme, Scheme::Https);
        assert_eq!(r.registry.host, "registry.example:5000");
        assert_eq!(r.registry.base_url(), "https://registry.example:5000");
        assert_eq!(r.repository, "strata/cache");
        assert_eq!(r.tag.as_deref(), Some("abc"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "registry.example:5000/strata/cache:abc");
    }

    #[test]
    fn http_prefix_and_insecure_list_select_plain_http() {
        let r = parse("http://localhost:5000/cache").unwrap();
        assert_eq!(r.registry.scheme, Scheme::Http);
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), "http://localhost:5000/cache");
        let insecure = vec!["reg.lan".to_string()];
        let r = Reference::parse("reg.lan:5000/x", &insecure).unwrap();
        assert_eq!(
            r.registry.scheme,
            Scheme::Http,
            "a bare host covers any port"
        );
        let insecure = vec!["reg.lan:5001".to_string()];
        let r = Reference::parse("reg.lan:5000/x", &insecure).unwrap();
        assert_eq!(
            r.registry.scheme,
            Scheme::Https,
            "another port is not covered"
        );
        let r = Reference::parse("reg.lan:5001/x", &insecure).unwrap();
        assert_eq!(r.registry.scheme, Scheme::Http);
        let r = Reference::parse("https://reg.lan:5001/x", &insecure).unwrap();
        assert_eq!(
            r.registry.scheme,
            Scheme::Https,
            "an explicit https:// wins"
        );
    }

    #[test]
    fn digest_and_ipv6() {
        let d = Digest::of(b"hello");
        let r = parse(&format!("[::1]:5000/a/b:t@{d}")).unwrap();
        assert_eq!(r.registry.host, "[::1]:5000");
        assert_eq!(r.digest.as_ref(), Some(&d));
        assert_eq!(r.manifest_reference(), Some(d.to_string()));
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.hex().len(), 64);
    }

    #[test]
    fn repository_grammar() {
        for ok in ["a", "a/b", "a.b", "a_b", "a__b", "a---b", "0/1.2-3"] {
            validate_repository(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a._b", "ä",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad} accepted");
        }
        assert!(validate_repository(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tag_grammar() {
        validate_tag("_x.y-Z9").unwrap();
        validate_tag(&"a".repeat(128)).unwrap();
        for bad in ["", ".a", "-a", "a:b", "a/b", &"a".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_references_have_one_line_errors() {
        let cases = [
            ("ubuntu:22.04", "no repository"),
            ("library/ubuntu", "not a registry host"),
            ("ftp://reg.example/a", "scheme `ftp`"),
            ("reg.example:99999/a", "port"),
            ("reg.example/Upper", "repository name"),
            ("reg.example/a:", "tag"),
            ("reg.example/a@sha256:abc", "digest"),
            ("reg.example/a@md5:abc", "algorithm"),
            ("reg..example/a", "not a host name"),
            ("[::1/a", "unclosed"),
        ];
        for (input, needle) in cases {
            let e = parse(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{input}: {e}");
            assert!(!e.contains('\n'), "{input}: multi-line error");
        }
    }

    #[test]
    fn registry_new_validates_and_applies_insecure() {
        let r = Registry::new("127.0.0.1:5000", &["127.0.0.1".to_string()]).unwrap();
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        assert!(Registry::new("nohost", &[]).is_err());
    }

    #[test]
    fn digest_parse_rejects_upper_case_and_short() {
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse("sha256:abcd").is_err());
        let d = Digest::of(b"");
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    }
}
