//! dib's package-installs: parse every element's `package-installs.{json,yaml}` and squash them
//! into per-phase install / uninstall lists with exactly dib's precedence rules.
//!
//! ```text
//! element names + search path
//!   └─ for each name, for EACH dir with <dir>/<name>: package-installs.json, then .yaml
//!        └─ parse (JSON, YAML fallback) ──► Raw document (keys in file order)
//!             └─ collect: per package, per parameter mapping:
//!                  install/uninstall interaction ─► installtype ─► arch ─► dib_python_version ─► when
//! PackageInstalls { phase ─► PhaseLists { install, uninstall: [(package, element)] } }
//!   ├─ to_dib_json()  ─► dib's `package-installs-squash` output
//!   └─ resolve(..)    ─► final names per phase through each element's pkg-map (as dib's
//!                        `package-installs-v2` does with `pkg-map --missing-ok`)
//! ```
//!
//! Where strata follows dib on purpose, even though it is surprising:
//! - An element overridden on the search path is read from EVERY path entry that has it, so its
//!   package-installs from the shadowed copy are merged too (dib's loop has no `break`).
//! - Both `package-installs.json` and `package-installs.yaml` are read when both exist, json
//!   first; each is parsed as JSON first with a YAML fallback, whatever its extension.
//! - A plain install of P in phase X drops P from X's uninstall list *before* the filters run, so
//!   even a filtered-out install (wrong arch, false `when`) cancels an earlier uninstall.
//! - Filters and their errors are lazy, in dib's order: an unset `when` variable is only an
//!   error if installtype and arch let the entry through.
//! - `uninstall` / `build-only` count by presence: `uninstall: false` still uninstalls.
//!
//! Where strata deliberately differs (each one a dib bug or crash):
//! - arch list items are trimmed (dib's `map(str.strip, ...)` is a lazy no-op in Python 3).
//! - `phase` must be one of the three package phases (dib writes any string through).
//! - a key given as null (`arch: ~`, `dib_python_version: ~`) means "not given" (dib compares
//!   the string "None" for dib_python_version).
//! - an empty file is an empty package list (dib crashes on `None.items()`); bad shapes are
//!   errors naming the file and package (dib crashes with a traceback).
//! - empty ELEMENTS_PATH entries are skipped (dib would look relative to its working folder).

use super::pkgmap::{self, PkgMap};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The phases a package can be installed in.
pub const PACKAGE_PHASES: [&str; 3] = ["pre-install.d", "install.d", "post-install.d"];

/// The keys dib knows in a package's parameter mapping.
const KNOWN_KEYS: [&str; 8] = [
    "phase",
    "uninstall",
    "build-only",
    "installtype",
    "arch",
    "not-arch",
    "dib_python_version",
    "when",
];

/// Everything that can go wrong reading package-installs or pkg-map files, or writing their
/// outputs. Each message is one line naming the file (and package) involved. Bad input.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read {}: {err}", path.display())]
    Read { path: PathBuf, err: std::io::Error },
    #[error("cannot write {}: {err}", path.display())]
    Write { path: PathBuf, err: std::io::Error },
    /// A syntax error; `message` carries the parser's line and column.
    #[error("{}: not valid {what}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    /// The document parsed but has the wrong shape.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// One package's parameters are wrong.
    #[error("{}: package '{package}': {message}", path.display())]
    Package {
        path: PathBuf,
        package: String,
        message: String,
    },
    /// A `when` expression names a variable that is not set.
    #[error(
        "{}: package '{package}': `when` uses {var}, which is not set; set it (e.g. from an \
         element's environment.d) before package-installs runs",
        path.display()
    )]
    WhenUnset {
        path: PathBuf,
        package: String,
        var: String,
    },
    /// Anything else the caller got wrong (a missing variable, a bad element name).
    #[error("{0}")]
    Usage(String),
}

/// One phase's lists; each entry is `(package, element that asked for it)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseLists {
    pub install: Vec<(String, String)>,
    pub uninstall: Vec<(String, String)>,
}

/// The squashed package-installs of a whole element set. A phase is present once any entry
/// named it, even if every entry was filtered out (dib does the same).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageInstalls {
    /// Key: `"pre-install.d"`, `"install.d"` or `"post-install.d"`.
    pub phases: BTreeMap<String, PhaseLists>,
}

/// One phase's final package names after pkg-map, de-duplicated, in order of first appearance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedLists {
    pub install: Vec<String>,
    pub uninstall: Vec<String>,
}

impl PackageInstalls {
    /// dib's output format: `{phase: {"install": [[pkg, element], ...], "uninstall": [...]}}`.
    /// dib may omit an empty `install` key where this writes `[]`; its readers treat both alike.
    pub fn to_dib_json(&self) -> serde_json::Value {
        let pairs = |list: &[(String, String)]| -> serde_json::Value {
            list.iter()
                .map(|(p, e)| serde_json::json!([p, e]))
                .collect::<Vec<_>>()
                .into()
        };
        let mut out = serde_json::Map::new();
        for (phase, lists) in &self.phases {
            out.insert(
                phase.clone(),
                serde_json::json!({
                    "install": pairs(&lists.install),
                    "uninstall": pairs(&lists.uninstall),
                }),
            );
        }
        serde_json::Value::Object(out)
    }

    /// Maps every entry through its element's pkg-map (`pkgmap::find`: the pkg-map of the first
    /// `<dir>/<element>` on `search`), as dib's `package-installs-v2` does with `pkg-map --missing-ok`: a name mapped
    /// to `""` disappears, a multi-word value becomes several packages, an unmapped name (or an
    /// element without a pkg-map) passes through. Names are de-duplicated keeping the first.
    pub fn resolve(
        &self,
        search: &[PathBuf],
        distro: &str,
        release: &str,
    ) -> Result<BTreeMap<String, ResolvedLists>, PackageError> {
        let mut maps: HashMap<String, Option<PkgMap>> = HashMap::new();
        let mut map_list = |list: &[(String, String)]| -> Result<Vec<String>, PackageError> {
            let mut out: Vec<String> = Vec::new();
            for (pkg, element) in list {
                if !maps.contains_key(element) {
                    let map = match pkgmap::find(element, search) {
                        Some(path) => Some(PkgMap::load(&path)?),
                        None => None,
                    };
                    maps.insert(element.clone(), map);
                }
                let mapped = maps
                    .get(element)
                    .and_then(|m| m.as_ref())
                    .and_then(|m| m.lookup(pkg, distro, release))
                    .unwrap_or(pkg.as_str());
                for name in mapped.split_whitespace() {
                    if !out.iter().any(|o| o == name) {
                        out.push(name.to_string());
                    }
                }
            }
            Ok(out)
        };
        let mut resolved = BTreeMap::new();
        for (phase, lists) in &self.phases {
            let install = map_list(&lists.install)?;
            let uninstall = map_list(&lists.uninstall)?;
            resolved.insert(phase.clone(), ResolvedLists { install, uninstall });
        }
        Ok(resolved)
    }
}

/// Squashes the package-installs of `elements` (in the given order) found on `search`.
/// `env` supplies `when` variables, `DIB_INSTALLTYPE_*`, `DIB_DEFAULT_INSTALLTYPE` and
/// `DIB_PYTHON_VERSION`; `arch` is dib's `ARCH` (empty = unset: an error only if an entry
/// actually needs it).
pub fn squash(
    elements: &[String],
    search: &[PathBuf],
    env: &BTreeMap<String, String>,
    arch: &str,
) -> Result<PackageInstalls, PackageError> {
    let ctx = Ctx { env, arch };
    let mut out = PackageInstalls::default();
    for element in elements {
        for dir in search {
            if dir.as_os_str().is_empty() {
                continue;
            }
            let element_dir = dir.join(element);
            if !element_dir.exists() {
                continue;
            }
            for ext in ["json", "yaml"] {
                let file = element_dir.join(format!("package-installs.{ext}"));
                if !file.exists() {
                    continue;
                }
                let doc = read_document(&file)?;
                collect(&mut out.phases, doc, element, &file, &ctx)?;
            }
        }
    }
    Ok(out)
}

struct Ctx<'a> {
    env: &'a BTreeMap<String, String>,
    arch: &'a str,
}

/// A parsed JSON/YAML value that keeps mapping keys in file order (dib iterates them in order,
/// and the order decides install/uninstall interactions).
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Raw>),
    /// Duplicate keys: the last value wins at the first key's position (a Python dict).
    Map(Vec<(Raw, Raw)>),
}

impl Raw {
    /// Python truthiness.
    fn truthy(&self) -> bool {
        match self {
            Raw::Null => false,
            Raw::Bool(b) => *b,
            Raw::Int(i) => *i != 0,
            Raw::Float(f) => *f != 0.0,
            Raw::Str(s) => !s.is_empty(),
            Raw::Seq(v) => !v.is_empty(),
            Raw::Map(m) => !m.is_empty(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Raw::Null => "null",
            Raw::Bool(_) => "boolean",
            Raw::Int(_) | Raw::Float(_) => "number",
            Raw::Str(_) => "string",
            Raw::Seq(_) => "list",
            Raw::Map(_) => "mapping",
        }
    }

    /// Python's `str()` of a scalar; None for lists and mappings.
    fn python_str(&self) -> Option<String> {
        match self {
            Raw::Null => Some("None".into()),
            Raw::Bool(true) => Some("True".into()),
            Raw::Bool(false) => Some("False".into()),
            Raw::Int(i) => Some(i.to_string()),
            Raw::Float(f) if f.is_finite() && f.fract() == 0.0 => Some(format!("{f:.1}")),
            Raw::Float(f) => Some(f.to_string()),
            Raw::Str(s) => Some(s.clone()),
            Raw::Seq(_) | Raw::Map(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON/YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Raw>()? {
            out.push(v);
        }
        Ok(Raw::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut out: Vec<(Raw, Raw)> = Vec::new();
        while let Some((k, v)) = map.next_entry::<Raw, Raw>()? {
            match out.iter_mut().find(|(ek, _)| *ek == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        Ok(Raw::Map(out))
    }
}

/// Reads one package-installs file the way dib does: JSON first, YAML if that fails.
fn read_document(path: &Path) -> Result<Raw, PackageError> {
    let text = std::fs::read_to_string(path).map_err(|err| PackageError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    if text.trim().is_empty() {
        return Ok(Raw::Null);
    }
    let json_err = match serde_json::from_str::<Raw>(&text) {
        Ok(doc) => return Ok(doc),
        Err(e) => e,
    };
    match yaml_serde::from_str::<Raw>(&text) {
        Ok(doc) => Ok(doc),
        Err(yaml_err) => {
            let is_json = path.extension().is_some_and(|e| e == "json");
            let (what, message) = if is_json {
                (
                    "JSON",
                    format!("{json_err} (nor YAML: {})", one_line(&yaml_err.to_string())),
                )
            } else {
                ("YAML", one_line(&yaml_err.to_string()))
            };
            Err(PackageError::Syntax {
                path: path.to_path_buf(),
                what,
                message,
            })
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// dib's `collect_data` for one file.
fn collect(
    phases: &mut BTreeMap<String, PhaseLists>,
    doc: Raw,
    element: &str,
    file: &Path,
    ctx: &Ctx,
) -> Result<(), PackageError> {
    let entries = match doc {
        Raw::Null => return Ok(()),
        Raw::Map(m) => m,
        other => {
            return Err(PackageError::Format {
                path: file.to_path_buf(),
                message: format!(
                    "the top level must map package names to parameters, found a {}",
                    other.kind()
                ),
            });
        }
    };
    for (key, params) in entries {
        let package = match &key {
            Raw::Str(s) => s.clone(),
            Raw::Int(_) | Raw::Float(_) | Raw::Bool(_) => key.python_str().unwrap_or_default(),
            other => {
                return Err(PackageError::Format {
                    path: file.to_path_buf(),
                    message: format!("package names must be strings, found a {}", other.kind()),
                });
            }
        };
        let bad = |message: String| PackageError::Package {
            path: file.to_path_buf(),
            package: package.clone(),
            message,
        };
        let empty: Vec<(Raw, Raw)> = Vec::new();
        let list: Vec<&Vec<(Raw, Raw)>> = if !params.truthy() {
            vec![&empty]
        } else {
            match &params {
                Raw::Map(m) => vec![m],
                Raw::Seq(items) => {
                    let mut v = Vec::new();
                    for item in items {
                        match item {
                            Raw::Map(m) => v.push(m),
                            other => {
                                return Err(bad(format!(
                                    "each item of the parameter list must be a mapping, found a {}",
                                    other.kind()
                                )));
                            }
                        }
                    }
                    v
                }
                other => {
                    return Err(bad(format!(
                        "parameters must be empty, a mapping or a list of mappings, found a {}",
                        other.kind()
                    )));
                }
            }
        };
        for param in list {
            apply(phases, &package, param, element, file, ctx)?;
        }
    }
    Ok(())
}

fn get<'a>(param: &'a [(Raw, Raw)], key: &str) -> Option<&'a Raw> {
    param
        .iter()
        .find(|(k, _)| matches!(k, Raw::Str(s) if s == key))
        .map(|(_, v)| v)
}

/// A key that is absent or null is "not given".
fn given<'a>(param: &'a [(Raw, Raw)], key: &str) -> Option<&'a Raw> {
    get(param, key).filter(|v| **v != Raw::Null)
}

#[derive(Clone, Copy)]
enum List {
    Install,
    Uninstall,
}

/// dib's per-parameter step: the install/uninstall interaction, then the filters in dib's
/// order (installtype, arch, dib_python_version, when), then the append.
fn apply(
    phases: &mut BTreeMap<String, PhaseLists>,
    package: &str,
    param: &[(Raw, Raw)],
    element: &str,
    file: &Path,
    ctx: &Ctx,
) -> Result<(), PackageError> {
    let bad = |message: String| PackageError::Package {
        path: file.to_path_buf(),
        package: package.to_string(),
        message,
    };
    for (k, _) in param {
        match k {
            Raw::Str(s) if KNOWN_KEYS.contains(&s.as_str()) => {}
            other => tracing::warn!(
                "{}: package '{package}': unknown key {:?} ignored",
                file.display(),
                other.python_str().unwrap_or_default()
            ),
        }
    }
    let phase = match given(param, "phase") {
        None => "install.d",
        Some(Raw::Str(s)) if PACKAGE_PHASES.contains(&s.as_str()) => s.as_str(),
        Some(other) => {
            return Err(bad(format!(
                "phase must be one of {}, found {:?}",
                PACKAGE_PHASES.join(", "),
                other
                    .python_str()
                    .unwrap_or_else(|| other.kind().to_string())
            )));
        }
    };
    let lists = phases.entry(phase.to_string()).or_default();
    let uninstall = get(param, "uninstall").is_some();
    let build_only = get(param, "build-only").is_some();

    let mut targets: &[List] = &[List::Install];
    if uninstall || build_only {
        // Something else already installs it without removing it: an uninstall has nothing
        // to do, and build-only degrades to a plain install.
        let in_install = lists.install.iter().any(|(p, _)| p == package);
        let not_in_uninstall = lists.uninstall.iter().all(|(p, _)| p != package);
        if in_install && not_in_uninstall {
            if !build_only {
                return Ok(());
            }
        } else {
            if uninstall {
                targets = &[List::Uninstall];
            }
            if build_only {
                targets = &[List::Install, List::Uninstall];
            }
        }
    } else {
        // A plain install cancels earlier uninstalls, before (and whatever) the filters say.
        lists.uninstall.retain(|(p, _)| p != package);
    }

    // installtype: a non-string never equals the element's install type (as in Python).
    if let Some(want) = given(param, "installtype") {
        let var = format!("DIB_INSTALLTYPE_{}", element.replace('-', "_"));
        let have = ctx
            .env
            .get(&var)
            .or_else(|| ctx.env.get("DIB_DEFAULT_INSTALLTYPE"))
            .map(String::as_str)
            .unwrap_or("source");
        if !matches!(want, Raw::Str(s) if s == have) {
            return Ok(());
        }
    }

    if !valid_for_arch(param, ctx.arch, &bad)? {
        return Ok(());
    }

    if let Some(want) = given(param, "dib_python_version") {
        let want = want
            .python_str()
            .ok_or_else(|| bad("dib_python_version must be a string or a number".into()))?;
        let have = ctx
            .env
            .get("DIB_PYTHON_VERSION")
            .map(String::as_str)
            .unwrap_or("");
        if !want.is_empty() && want != have {
            return Ok(());
        }
    }

    if let Some(when) = given(param, "when")
        && !eval_when(when, ctx.env, file, package)?
    {
        return Ok(());
    }

    for t in targets {
        let entry = (package.to_string(), element.to_string());
        match t {
            List::Install => lists.install.push(entry),
            List::Uninstall => lists.uninstall.push(entry),
        }
    }
    Ok(())
}

/// `arch` / `not-arch`: comma lists compared with ARCH; both given is an error.
fn valid_for_arch(
    param: &[(Raw, Raw)],
    arch: &str,
    bad: &dyn Fn(String) -> PackageError,
) -> Result<bool, PackageError> {
    let list = |key: &str| -> Result<Option<&str>, PackageError> {
        match given(param, key) {
            None => Ok(None),
            Some(Raw::Str(s)) if s.is_empty() => Ok(None),
            Some(Raw::Str(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(bad(format!(
                "{key} must be a comma separated string, found a {}",
                other.kind()
            ))),
        }
    };
    let (only, not) = (list("arch")?, list("not-arch")?);
    let in_list = |l: &str| -> Result<bool, PackageError> {
        if arch.is_empty() {
            return Err(bad(
                "arch / not-arch need ARCH, which is not set; set ARCH (e.g. amd64)".into(),
            ));
        }
        // dib writes `map(str.strip, items)`, a lazy no-op in Python 3, so " ppc64le" (after a
        // comma and a space) never matches there. That is a bug; strata strips the items.
        Ok(l.split(',').map(str::trim).any(|item| item == arch))
    };
    match (only, not) {
        (Some(_), Some(_)) => Err(bad(
            "both arch and not-arch are given; keep only one of them".into(),
        )),
        (Some(l), None) => in_list(l),
        (None, Some(l)) => Ok(!in_list(l)?),
        (None, None) => Ok(true),
    }
}

/// `when`: one `VAR=val` / `VAR!=val` string, or a list of them (all must hold). Every
/// statement is checked (dib does not stop at the first false one), so an unset variable or a
/// malformed statement is an error anywhere in the list.
fn eval_when(
    when: &Raw,
    env: &BTreeMap<String, String>,
    file: &Path,
    package: &str,
) -> Result<bool, PackageError> {
    let bad = |message: String| PackageError::Package {
        path: file.to_path_buf(),
        package: package.to_string(),
        message,
    };
    let statements: Vec<&Raw> = match when {
        Raw::Seq(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut all = true;
    for s in statements {
        let Raw::Str(text) = s else {
            return Err(bad(format!(
                "malformed when: expected \"VAR=value\" or \"VAR!=value\", found a {}",
                s.kind()
            )));
        };
        let Some((var, equal, value)) = parse_when(text) else {
            return Err(bad(format!(
                "malformed when: {text:?}; expected \"VAR=value\" or \"VAR!=value\""
            )));
        };
        let Some(have) = env.get(var) else {
            return Err(PackageError::WhenUnset {
                path: file.to_path_buf(),
                package: package.to_string(),
                var: var.to_string(),
            });
        };
        if (have == value) != equal {
            all = false;
        }
    }
    Ok(all)
}

/// dib's `re.match(r"(\w+)(\s*)(=|!=)(\s*)(.*)", s)`: a prefix match; the value runs to the
/// first newline. Returns (variable, is `=`, value).
fn parse_when(s: &str) -> Option<(&str, bool, &str)> {
    let var_end = s
        .char_indices()
        .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
        .map_or(s.len(), |(i, _)| i);
    if var_end == 0 {
        return None;
    }
    let var = &s[..var_end];
    let rest = s[var_end..].trim_start();
    let (equal, rest) = if let Some(r) = rest.strip_prefix("!=") {
        (false, r)
    } else if let Some(r) = rest.strip_prefix('=') {
        (true, r)
    } else {
        return None;
    };
    let rest = rest.trim_start();
    let value = rest.split('\n').next().unwrap_or("");
    Some((var, equal, value))
}

#[cfg(test)]
mod tests;
