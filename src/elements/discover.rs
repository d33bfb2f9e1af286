//! Element discovery: builds the element search path and scans it into a `Catalog` of every
//! element by name, earlier path entries overriding later ones (dib's `_find_all_elements`).
//!
//! ```text
//! --element-path DIR...  ┐
//! ELEMENTS_PATH (a:b:c)  ├─ search_path() ──► Vec<PathBuf> ──► Catalog::scan ──► Catalog
//! built-in elements dir  ┘   (in this order)                  (name → Element)
//! ```
//!
//! Rules (dib's, with the differences noted):
//! - The search path is every `--element-path DIR` (in order), then every `ELEMENTS_PATH` entry,
//!   then the built-in elements folder, always last (see [`builtin_elements_dir`]). Empty
//!   `ELEMENTS_PATH` entries are ignored (dib fails on them); an entry that appears twice (same
//!   real path) is searched once, at its first position.
//! - An element is any directory (or symlink to one) directly inside a search path entry. Its
//!   name is the basename of its *real* path, as dib does: a symlink `alias -> real` is known
//!   only as `real`.
//! - An element in an earlier entry overrides one of the same name in a later entry; each
//!   override is logged at debug level naming both paths, with one summary line at info.
//! - A search path entry that is not a directory is an error naming it. So is an element folder
//!   whose name is not UTF-8, and two entries of one folder that resolve to the same element
//!   name (dib picks one at random).

use super::{Element, ElementError};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use tracing::{debug, info};

/// Where strata's own elements live, by the first rule that applies:
/// 1. `$STRATA_ELEMENTS_DIR` if set and not empty (used as is; if it is not a directory,
///    scanning fails naming it);
/// 2. `<folder of the executable>/../../elements` if that is a directory — the repository's
///    `elements/` when running from cargo's `target/debug` or `target/release`;
/// 3. `/usr/share/strata/elements` if that is a directory (an installed strata);
/// 4. `<CARGO_MANIFEST_DIR>/elements` as baked in at compile time, if that is a directory.
///
/// `None` when no rule applies: then there is no built-in folder.
pub fn builtin_elements_dir() -> Option<PathBuf> {
    let env = std::env::var_os("STRATA_ELEMENTS_DIR");
    let exe = std::env::current_exe()
        .ok()
        .and_then(|e| std::fs::canonicalize(e).ok());
    pick_builtin_dir(env.as_deref(), exe.as_deref())
}

/// [`builtin_elements_dir`]'s rule with its inputs made explicit.
pub fn pick_builtin_dir(env_override: Option<&OsStr>, exe: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = env_override.filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let from_exe = exe
        .and_then(Path::parent)
        .map(|bin_dir| bin_dir.join("../../elements"))
        .filter(|d| d.is_dir());
    let candidates = from_exe.into_iter().chain([
        PathBuf::from("/usr/share/strata/elements"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("elements"),
    ]);
    for dir in candidates {
        if dir.is_dir() {
            return Some(std::fs::canonicalize(&dir).unwrap_or(dir));
        }
    }
    None
}

/// The search path from the process environment: `cli_dirs`, then `$ELEMENTS_PATH`, then the
/// built-in folder.
pub fn search_path(cli_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let elements_path = std::env::var_os("ELEMENTS_PATH");
    build_search_path(
        cli_dirs,
        elements_path.as_deref(),
        builtin_elements_dir().as_deref(),
    )
}

/// The search path with its inputs made explicit: `cli_dirs`, then the entries of
/// `elements_path` (colon separated, empty entries ignored), then `builtin`.
pub fn build_search_path(
    cli_dirs: &[PathBuf],
    elements_path: Option<&OsStr>,
    builtin: Option<&Path>,
) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut dirs: Vec<PathBuf> = cli_dirs.to_vec();
    if let Some(ep) = elements_path {
        dirs.extend(
            ep.as_bytes()
                .split(|&b| b == b':')
                .filter(|part| !part.is_empty())
                .map(|part| PathBuf::from(OsStr::from_bytes(part))),
        );
    }
    dirs.extend(builtin.map(Path::to_path_buf));
    dirs
}

/// Every element found on a search path, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    elements: BTreeMap<String, Element>,
    search: Vec<PathBuf>,
}

impl Catalog {
    /// Scans each search path entry (earlier entries win). Fails on the first entry that is not
    /// a directory, cannot be listed, or holds an element whose name is not UTF-8.
    pub fn scan(dirs: &[PathBuf]) -> Result<Catalog, ElementError> {
        let mut catalog = Catalog::default();
        let mut seen_dirs: Vec<PathBuf> = Vec::new();
        let mut overridden: Vec<String> = Vec::new();
        for dir in dirs {
            if !dir.is_dir() {
                return Err(ElementError::NotADirectory { path: dir.clone() });
            }
            let real = std::fs::canonicalize(dir)
                .map_err(|e| ElementError::io("resolve element path entry", dir, e))?;
            catalog.search.push(dir.clone());
            if seen_dirs.contains(&real) {
                debug!(dir = %dir.display(), "element path entry already searched; skipping");
                continue;
            }
            seen_dirs.push(real);
            for element in scan_dir(dir)? {
                match catalog.elements.get(&element.name) {
                    Some(earlier) if earlier.path != element.path => {
                        debug!(
                            "element '{}' at {} overrides {}",
                            element.name,
                            earlier.path.display(),
                            element.path.display()
                        );
                        overridden.push(element.name.clone());
                    }
                    Some(_) => {}
                    None => {
                        catalog.elements.insert(element.name.clone(), element);
                    }
                }
            }
        }
        if !overridden.is_empty() {
            overridden.sort();
            overridden.dedup();
            info!(
                "{} elements earlier on the element search path override ones of the same name \
                 later on it (-v lists them)",
                overridden.len()
            );
        }
        Ok(catalog)
    }

    /// The element of this name, if any.
    pub fn get(&self, name: &str) -> Option<&Element> {
        self.elements.get(name)
    }

    /// Every element, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Element> {
        self.elements.values()
    }

    pub fn len(&self) -> usize {
        self.elements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// The search path that was scanned, as given.
    pub fn search_path(&self) -> &[PathBuf] {
        &self.search
    }

    /// The search path joined with `:`, for error messages.
    pub fn searched(&self) -> String {
        if self.search.is_empty() {
            return "(no element folders)".to_string();
        }
        self.search
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Shorthand for [`Catalog::scan`].
pub fn scan(dirs: &[PathBuf]) -> Result<Catalog, ElementError> {
    Catalog::scan(dirs)
}

/// The elements directly inside one search path entry, sorted by name.
fn scan_dir(dir: &Path) -> Result<Vec<Element>, ElementError> {
    let listing = std::fs::read_dir(dir).map_err(|e| ElementError::io("list", dir, e))?;
    let mut by_name: BTreeMap<String, (PathBuf, Element)> = BTreeMap::new();
    let mut entries = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| ElementError::io("list", dir, e))?;
        entries.push(entry.path());
    }
    entries.sort();
    for entry in entries {
        // `is_dir` follows symlinks, like dib's os.path.isdir; dangling links are not elements.
        if !entry.is_dir() {
            continue;
        }
        let real =
            std::fs::canonicalize(&entry).map_err(|e| ElementError::io("resolve", &entry, e))?;
        let name = match real.file_name().map(|n| n.to_str()) {
            Some(Some(name)) => name.to_string(),
            _ => return Err(ElementError::NonUtf8Name { path: real }),
        };
        if let Some((first, earlier)) = by_name.get(&name) {
            if earlier.path == real {
                continue;
            }
            return Err(ElementError::AmbiguousName {
                name,
                dir: dir.to_path_buf(),
                first: first.clone(),
                second: entry,
            });
        }
        by_name.insert(name.clone(), (entry, Element { name, path: real }));
    }
    Ok(by_name.into_values().map(|(_, e)| e).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn mkdirs(root: &Path, names: &[&str]) {
        for n in names {
            fs::create_dir_all(root.join(n)).unwrap();
        }
    }

    #[test]
    fn search_path_puts_cli_dirs_first_and_builtin_last_skipping_empty_entries() {
        let p = build_search_path(
            &[PathBuf::from("/cli1"), PathBuf::from("/cli2")],
            Some(OsStr::new("/a::/b:")),
            Some(Path::new("/builtin")),
        );
        let want: Vec<PathBuf> = ["/cli1", "/cli2", "/a", "/b", "/builtin"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(p, want);
        assert_eq!(
            build_search_path(&[], None, None),
            Vec::<PathBuf>::new(),
            "no inputs, no entries"
        );
    }

    #[test]
    fn builtin_dir_prefers_env_then_the_exe_layout() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            pick_builtin_dir(Some(OsStr::new("/nowhere")), None),
            Some(PathBuf::from("/nowhere"))
        );
        // target/debug/strata → ../../elements
        mkdirs(t.path(), &["repo/target/debug", "repo/elements"]);
        let exe = t.path().join("repo/target/debug/strata");
        let got = pick_builtin_dir(Some(OsStr::new("")), Some(&exe)).unwrap();
        assert_eq!(
            got,
            fs::canonicalize(t.path().join("repo/elements")).unwrap()
        );
    }

    #[test]
    fn earlier_entries_override_later_ones() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["first/foo", "second/foo", "second/bar"]);
        let cat = Catalog::scan(&[t.path().join("first"), t.path().join("second")]).unwrap();
        assert_eq!(cat.len(), 2);
        assert!(cat.get("foo").unwrap().path.ends_with("first/foo"));
        assert!(cat.get("bar").unwrap().path.ends_with("second/bar"));
    }

    #[test]
    fn element_name_is_the_real_folder_name() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["elsewhere/real", "p"]);
        std::os::unix::fs::symlink(t.path().join("elsewhere/real"), t.path().join("p/alias"))
            .unwrap();
        fs::write(t.path().join("p/a-file"), "").unwrap();
        let cat = Catalog::scan(&[t.path().join("p")]).unwrap();
        assert!(cat.get("alias").is_none());
        assert!(cat.get("real").is_some());
        assert!(cat.get("a-file").is_none(), "files are not elements");
    }

    #[test]
    fn two_entries_naming_one_element_in_one_folder_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["elsewhere/real", "p/real"]);
        std::os::unix::fs::symlink(t.path().join("elsewhere/real"), t.path().join("p/alias"))
            .unwrap();
        let err = Catalog::scan(&[t.path().join("p")]).unwrap_err();
        assert!(matches!(err, ElementError::AmbiguousName { ref name, .. } if name == "real"));
    }

    #[test]
    fn an_entry_that_is_not_a_directory_is_named_in_the_error() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("plain-file");
        fs::write(&f, "").unwrap();
        let err = Catalog::scan(std::slice::from_ref(&f)).unwrap_err();
        assert!(err.to_string().contains(&f.display().to_string()), "{err}");
        let missing = t.path().join("missing");
        let err = Catalog::scan(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(err, ElementError::NotADirectory { path } if path == missing));
    }

    #[test]
    fn non_utf8_element_names_are_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("p").join(OsStr::from_bytes(b"bad\xff"))).unwrap();
        let err = Catalog::scan(&[t.path().join("p")]).unwrap_err();
        assert!(matches!(err, ElementError::NonUtf8Name { .. }), "{err}");
    }

    #[test]
    fn the_same_folder_twice_is_searched_once() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["p/foo"]);
        let cat = Catalog::scan(&[t.path().join("p"), t.path().join("p/../p")]).unwrap();
        assert_eq!(cat.len(), 1);
        assert_eq!(cat.search_path().len(), 2);
    }
}
