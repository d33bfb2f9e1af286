//! dib's pkg-map: an element's JSON table translating generic package names into the names a
//! distro family, distro or release uses.
//!
//! ```text
//! <element dir>/pkg-map (JSON) ──► PkgMap::load
//!   sections: default{name: value}
//!             family{family: {name: value}}           (family(distro), see below)
//!             distro{distro: {name: value}}
//!             release{distro: {release: {name: value}}} (release through major_release)
//!   precedence: default < family < distro < release (the most specific wins)
//! PkgMap::lookup(name, distro, release) ──► Some(value) | Some("") = skip | None = unmapped
//! PkgMap::flatten(distro, release)      ──► the whole effective map
//! ```
//!
//! A value of `null` is read as `""` (dib's `if pkg_name:` treats both as "skip"). Any other
//! non-string value is an error here (dib would print Python's repr of it as a package name).

use super::packages::PackageError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Table = BTreeMap<String, String>;

/// One parsed pkg-map file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PkgMap {
    path: PathBuf,
    default: Table,
    family: BTreeMap<String, Table>,
    distro: BTreeMap<String, Table>,
    release: BTreeMap<String, BTreeMap<String, Table>>,
}

/// dib's `os_family`: the family a distro belongs to.
pub fn family(distro: &str) -> Option<&'static str> {
    match distro {
        "almalinux" | "fedora" | "rhel" | "centos" | "openeuler" | "rocky" => Some("redhat"),
        "debian" | "ubuntu" => Some("debian"),
        "opensuse" => Some("suse"),
        "gentoo" => Some("gentoo"),
        _ => None,
    }
}

/// dib's `os_major_release`: `8-stream` is looked up as `8`; everything else as given.
pub fn major_release(release: &str) -> &str {
    match release {
        "8-stream" => "8",
        other => other,
    }
}

/// The pkg-map file of `element`: `<element dir>/pkg-map`, where the element dir is the first
/// `<dir>/<element>` folder on `search` (the element that wins an override, as dib copies it).
/// A shadowed copy's pkg-map is never used.
pub fn find(element: &str, search: &[PathBuf]) -> Option<PathBuf> {
    search
        .iter()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(element))
        .find(|p| p.is_dir())
        .map(|d| d.join("pkg-map"))
        .filter(|p| p.is_file())
}

impl PkgMap {
    /// Reads and checks one pkg-map file.
    pub fn load(path: &Path) -> Result<PkgMap, PackageError> {
        let text = std::fs::read_to_string(path).map_err(|err| PackageError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| PackageError::Syntax {
                path: path.to_path_buf(),
                what: "JSON",
                message: e.to_string(),
            })?;
        let bad = |message: String| PackageError::Format {
            path: path.to_path_buf(),
            message,
        };
        let serde_json::Value::Object(top) = doc else {
            return Err(bad("a pkg-map must be a JSON object".into()));
        };
        let mut map = PkgMap {
            path: path.to_path_buf(),
            ..PkgMap::default()
        };
        for (section, value) in &top {
            match section.as_str() {
                "default" => map.default = table(value, "default", &bad)?,
                "family" | "distro" => {
                    let mut out = BTreeMap::new();
                    for (key, v) in object(value, section, &bad)? {
                        out.insert(key.clone(), table(v, &format!("{section}.{key}"), &bad)?);
                    }
                    if section == "family" {
                        map.family = out;
                    } else {
                        map.distro = out;
                    }
                }
                "release" => {
                    for (distro, v) in object(value, "release", &bad)? {
                        let mut releases = BTreeMap::new();
                        for (rel, t) in object(v, &format!("release.{distro}"), &bad)? {
                            let where_ = format!("release.{distro}.{rel}");
                            releases.insert(rel.clone(), table(t, &where_, &bad)?);
                        }
                        map.release.insert(distro.clone(), releases);
                    }
                }
                other => tracing::debug!("{}: unknown section {other:?} ignored", path.display()),
            }
        }
        Ok(map)
    }

    /// The file this map was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The effective map for one distro and release (an empty release means none).
    pub fn flatten(&self, distro: &str, release: &str) -> BTreeMap<String, String> {
        let mut out = self.default.clone();
        for t in self.layers(distro, release) {
            out.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }

    /// The mapping of one name: `Some("")` means "skip this package", `None` means the name
    /// has no mapping.
    pub fn lookup(&self, name: &str, distro: &str, release: &str) -> Option<&str> {
        self.layers(distro, release)
            .into_iter()
            .rev()
            .chain(std::iter::once(&self.default))
            .find_map(|t| t.get(name))
            .map(String::as_str)
    }

    /// The family, distro and release tables that apply, least specific first (without
    /// `default`).
    fn layers(&self, distro: &str, release: &str) -> Vec<&Table> {
        let mut out = Vec::new();
        if let Some(t) = family(distro).and_then(|f| self.family.get(f)) {
            out.push(t);
        }
        if let Some(t) = self.distro.get(distro) {
            out.push(t);
        }
        if !release.is_empty()
            && let Some(t) = self
                .release
                .get(distro)
                .and_then(|r| r.get(major_release(release)))
        {
            out.push(t);
        }
        out
    }
}

fn object<'a>(
    v: &'a serde_json::Value,
    at: &str,
    bad: &dyn Fn(String) -> PackageError,
) -> Result<&'a serde_json::Map<String, serde_json::Value>, PackageError> {
    match v {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(bad(format!("{at} must be a JSON object"))),
    }
}

fn table(
    v: &serde_json::Value,
    at: &str,
    bad: &dyn Fn(String) -> PackageError,
) -> Result<Table, PackageError> {
    let mut out = Table::new();
    for (name, value) in object(v, at, bad)? {
        let value = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            _ => {
                return Err(bad(format!(
                    "{at}.{name} must be a string (\"\" to skip the package)"
                )));
            }
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("pkg-map");
        std::fs::write(&p, text).unwrap();
        p
    }

    const MAP: &str = r#"{
      "default": {"a": "a-default", "b": "b-default", "c": "c-default", "d": "d-default",
                  "skip": "", "nul": null},
      "family": {"debian": {"b": "b-family", "c": "c-family", "d": "d-family"},
                 "redhat": {"b": "b-redhat"}},
      "distro": {"ubuntu": {"c": "c-distro", "d": "d-distro"}},
      "release": {"ubuntu": {"noble": {"d": "d-release", "a": ""}},
                  "centos": {"8": {"a": "a-centos8"}}},
      "unknown-section": 3
    }"#;

    #[test]
    fn precedence_default_family_distro_release() {
        let dir = tempfile::tempdir().unwrap();
        let m = PkgMap::load(&write(dir.path(), MAP)).unwrap();
        assert_eq!(m.lookup("a", "ubuntu", "jammy"), Some("a-default"));
        assert_eq!(m.lookup("b", "ubuntu", "jammy"), Some("b-family"));
        assert_eq!(m.lookup("c", "ubuntu", "jammy"), Some("c-distro"));
        assert_eq!(m.lookup("d", "ubuntu", "noble"), Some("d-release"));
        assert_eq!(m.lookup("d", "ubuntu", "jammy"), Some("d-distro"));
        assert_eq!(m.lookup("d", "debian", "noble"), Some("d-family"));
        assert_eq!(m.lookup("b", "fedora", ""), Some("b-redhat"));
        assert_eq!(m.lookup("b", "gentoo", ""), Some("b-default"));
        // A release overrides with "" (skip).
        assert_eq!(m.lookup("a", "ubuntu", "noble"), Some(""));
        // 8-stream is looked up as release 8.
        assert_eq!(m.lookup("a", "centos", "8-stream"), Some("a-centos8"));
        assert_eq!(m.lookup("a", "centos", "9"), Some("a-default"));
    }

    #[test]
    fn empty_and_null_mean_skip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let m = PkgMap::load(&write(dir.path(), MAP)).unwrap();
        assert_eq!(m.lookup("skip", "ubuntu", ""), Some(""));
        assert_eq!(m.lookup("nul", "ubuntu", ""), Some(""));
        assert_eq!(m.lookup("nope", "ubuntu", ""), None);
    }

    #[test]
    fn flatten_matches_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let m = PkgMap::load(&write(dir.path(), MAP)).unwrap();
        for (distro, release) in [("ubuntu", "noble"), ("debian", ""), ("centos", "8-stream")] {
            let flat = m.flatten(distro, release);
            for name in ["a", "b", "c", "d", "skip", "nul", "nope"] {
                assert_eq!(
                    flat.get(name).map(String::as_str),
                    m.lookup(name, distro, release),
                    "{name} on {distro}/{release}"
                );
            }
        }
        let flat = m.flatten("ubuntu", "noble");
        assert_eq!(flat["a"], "");
        assert_eq!(flat["d"], "d-release");
        assert_eq!(flat.len(), 6);
    }

    #[test]
    fn families() {
        for d in [
            "almalinux",
            "fedora",
            "rhel",
            "centos",
            "openeuler",
            "rocky",
        ] {
            assert_eq!(family(d), Some("redhat"));
        }
        assert_eq!(family("debian"), Some("debian"));
        assert_eq!(family("ubuntu"), Some("debian"));
        assert_eq!(family("opensuse"), Some("suse"));
        assert_eq!(family("gentoo"), Some("gentoo"));
        assert_eq!(family("arch"), None);
    }

    #[test]
    fn bad_files_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "{\n  \"default\": {\"a\": \"b\",}\n}");
        let e = PkgMap::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let p = write(dir.path(), r#"{"default": {"a": ["x"]}}"#);
        let e = PkgMap::load(&p).unwrap_err().to_string();
        assert!(e.contains("default.a must be a string"), "{e}");
        let p = write(dir.path(), r#"["x"]"#);
        assert!(PkgMap::load(&p).is_err());
        let e = PkgMap::load(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(e, PackageError::Read { .. }));
    }

    #[test]
    fn find_uses_the_winning_element_folder_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(b.path().join("el")).unwrap();
        let search = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find("el", &search), None);
        std::fs::write(b.path().join("el/pkg-map"), "{}").unwrap();
        assert_eq!(find("el", &search), Some(b.path().join("el/pkg-map")));
        // An override in an earlier path entry hides the later copy, pkg-map and all.
        std::fs::create_dir_all(a.path().join("el")).unwrap();
        assert_eq!(find("el", &search), None);
        std::fs::write(a.path().join("el/pkg-map"), "{}").unwrap();
        assert_eq!(find("el", &search), Some(a.path().join("el/pkg-map")));
    }
}
