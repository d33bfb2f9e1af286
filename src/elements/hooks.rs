//! The merged hook tree (dib's `generate_hooks`, TMP_HOOKS_PATH) and dib-run-parts' choice and
//! order of the hooks that run in one phase folder.
//!
//! ```text
//! resolved elements ──► HookTree::build ──► rel path → (source file, element)
//!                                         └─ materialize(dest) ──► real folder (cp -a)
//! real phase folder ──► run_parts(dir) ──► Vec<RunPart> in `LANG=C sort -n` order
//! ```
//!
//! Merge rules:
//! - Every subfolder of every element is merged (phase folders, `environment.d`, `bin`, `static`,
//!   ...), except `tests`, `test-elements` and `__pycache__`. A top-level symlink to a folder
//!   counts as a folder (dib's `find -follow`). Inside, folders merge; files and symlinks are
//!   leaves, and a symlink is kept as a symlink.
//! - The same relative path as a leaf in two elements (or a leaf in one and a folder in another)
//!   is an error naming both elements and the path. dib checks this only one level deep and
//!   silently overwrites deeper files; strata checks every level.
//! - Top-level files (element-deps, README.rst, pkg-map, ...; not `*.pyc`) are copied too and
//!   silently overwritten as dib does: the last element in resolved order wins (logged at
//!   debug level).
//!
//! Run order is computed from a real folder because the build changes the tree while it runs
//! (dib's install-types adds symlinks to install.d in extra-data.d).

use super::{Element, ElementError};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

/// Element subfolders that are never merged into the hook tree.
pub const SKIPPED_DIRS: [&str; 3] = ["tests", "test-elements", "__pycache__"];

/// What one path of the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
}

/// One path of the merged tree: where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// The file, folder or symlink in the element that is copied (a symlink is copied as one).
    pub source: PathBuf,
    /// The element it comes from (for a folder: the first element that has it).
    pub element: String,
    pub kind: EntryKind,
}

/// The merged hook tree of a set of elements, as paths relative to its root.
#[derive(Debug, Clone, Default)]
pub struct HookTree {
    entries: BTreeMap<PathBuf, TreeEntry>,
}

impl HookTree {
    /// Merges the elements' folders and top-level files, in the given (resolved) order.
    pub fn build(elements: &[Element]) -> Result<HookTree, ElementError> {
        let mut tree = HookTree::default();
        for element in elements {
            tree.add_element(element)?;
        }
        Ok(tree)
    }

    fn add_element(&mut self, element: &Element) -> Result<(), ElementError> {
        let listing =
            fs::read_dir(&element.path).map_err(|e| ElementError::io("list", &element.path, e))?;
        let mut names = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| ElementError::io("list", &element.path, e))?;
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let source = element.path.join(&name);
            let rel = PathBuf::from(&name);
            // Follow symlinks at the top level (find -follow).
            let Ok(meta) = fs::metadata(&source) else {
                debug!(path = %source.display(), "dangling symlink in element; skipped");
                continue;
            };
            if meta.is_dir() {
                if name.to_str().is_some_and(|n| SKIPPED_DIRS.contains(&n)) {
                    continue;
                }
                self.add_dir(element, &source, rel)?;
            } else if meta.is_file() {
                if rel.extension().is_some_and(|e| e == "pyc") {
                    continue;
                }
                self.add_top_file(element, source, rel)?;
            } else {
                debug!(path = %source.display(), "not a file or folder; skipped");
            }
        }
        Ok(())
    }

    fn add_top_file(
        &mut self,
        element: &Element,
        source: PathBuf,
        rel: PathBuf,
    ) -> Result<(), ElementError> {
        let kind = leaf_kind(&source)?;
        if let Some(old) = self.entries.get(&rel) {
            if old.kind == EntryKind::Dir {
                return Err(self.conflict(&rel, element, &source));
            }
            debug!(
                file = %rel.display(),
                winner = element.name,
                loser = old.element,
                "top-level element file overwritten"
            );
        }
        self.entries.insert(
            rel,
            TreeEntry {
                source,
                element: element.name.clone(),
                kind,
            },
        );
        Ok(())
    }

    /// Merges the folder `source` (which may be a symlink to a folder) at `rel`.
    fn add_dir(
        &mut self,
        element: &Element,
        source: &Path,
        rel: PathBuf,
    ) -> Result<(), ElementError> {
        match self.entries.get(&rel) {
            Some(old) if old.kind != EntryKind::Dir => {
                return Err(self.conflict(&rel, element, source));
            }
            Some(_) => {}
            None => {
                self.entries.insert(
                    rel.clone(),
                    TreeEntry {
                        source: source.to_path_buf(),
                        element: element.name.clone(),
                        kind: EntryKind::Dir,
                    },
                );
            }
        }
        let listing = fs::read_dir(source).map_err(|e| ElementError::io("list", source, e))?;
        let mut children = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| ElementError::io("list", source, e))?;
            children.push(entry.file_name());
        }
        children.sort();
        for name in children {
            let child = source.join(&name);
            let child_rel = rel.join(&name);
            let meta =
                fs::symlink_metadata(&child).map_err(|e| ElementError::io("read", &child, e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.add_dir(element, &child, child_rel)?;
                continue;
            }
            let kind = if ft.is_symlink() {
                EntryKind::Symlink
            } else if ft.is_file() {
                EntryKind::File
            } else {
                warn!(path = %child.display(), "not a file, folder or symlink; not copied into the hook tree");
                continue;
            };
            if self.entries.contains_key(&child_rel) {
                return Err(self.conflict(&child_rel, element, &child));
            }
            self.entries.insert(
                child_rel,
                TreeEntry {
                    source: child,
                    element: element.name.clone(),
                    kind,
                },
            );
        }
        Ok(())
    }

    fn conflict(&self, rel: &Path, element: &Element, source: &Path) -> ElementError {
        let (first, first_path) = self
            .entries
            .get(rel)
            .map(|e| (e.element.clone(), e.source.clone()))
            .unwrap_or_default();
        ElementError::DuplicateHook {
            rel: rel.to_path_buf(),
            first,
            first_path,
            second: element.name.clone(),
            second_path: source.to_path_buf(),
        }
    }

    /// The element a relative path of the tree comes from.
    pub fn origin(&self, rel: impl AsRef<Path>) -> Option<&str> {
        self.entries.get(rel.as_ref()).map(|e| e.element.as_str())
    }

    /// One path of the tree.
    pub fn get(&self, rel: impl AsRef<Path>) -> Option<&TreeEntry> {
        self.entries.get(rel.as_ref())
    }

    /// Every path of the tree, sorted (a folder before its contents).
    pub fn entries(&self) -> impl Iterator<Item = (&Path, &TreeEntry)> {
        self.entries.iter().map(|(p, e)| (p.as_path(), e))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Copies the tree into `dest` (created if missing; must be empty) like `cp -a`: modes,
    /// modification times and (when running as root) owners are kept, symlinks are copied as
    /// symlinks.
    pub fn materialize(&self, dest: &Path) -> Result<(), ElementError> {
        match fs::read_dir(dest) {
            Ok(mut listing) => {
                if listing.next().is_some() {
                    return Err(ElementError::DestinationNotEmpty {
                        path: dest.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dest).map_err(|e| ElementError::io("create", dest, e))?;
            }
            Err(e) => return Err(ElementError::io("list", dest, e)),
        }
        let as_root = nix::unistd::geteuid().is_root();
        let mut dirs = Vec::new();
        for (rel, entry) in &self.entries {
            let target = dest.join(rel);
            let src = &entry.source;
            match entry.kind {
                EntryKind::Dir => {
                    fs::create_dir(&target).map_err(|e| ElementError::io("create", &target, e))?;
                    dirs.push((target, src));
                }
                EntryKind::File => {
                    fs::copy(src, &target).map_err(|e| ElementError::io("copy", src, e))?;
                    let meta = fs::metadata(src).map_err(|e| ElementError::io("read", src, e))?;
                    copy_times_and_owner(&meta, &target, as_root)?;
                }
                EntryKind::Symlink => {
                    let link = fs::read_link(src).map_err(|e| ElementError::io("read", src, e))?;
                    std::os::unix::fs::symlink(&link, &target)
                        .map_err(|e| ElementError::io("create symlink", &target, e))?;
                    let meta =
                        fs::symlink_metadata(src).map_err(|e| ElementError::io("read", src, e))?;
                    copy_times_and_owner(&meta, &target, as_root)?;
                }
            }
        }
        // Folder modes and times last (deepest first), so read-only folders can be filled.
        for (target, src) in dirs.iter().rev() {
            let meta = fs::metadata(src).map_err(|e| ElementError::io("read", *src, e))?;
            fs::set_permissions(target, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| ElementError::io("set the mode of", target, e))?;
            copy_times_and_owner(&meta, target, as_root)?;
        }
        Ok(())
    }
}

/// A top-level element file: a symlink stays a symlink, anything else is a file.
fn leaf_kind(source: &Path) -> Result<EntryKind, ElementError> {
    let meta = fs::symlink_metadata(source).map_err(|e| ElementError::io("read", source, e))?;
    Ok(if meta.file_type().is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::File
    })
}

fn copy_times_and_owner(
    meta: &fs::Metadata,
    target: &Path,
    as_root: bool,
) -> Result<(), ElementError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        target,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| ElementError::io("set the times of", target, e.into()))?;
    if as_root {
        std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| ElementError::io("set the owner of", target, e))?;
    }
    Ok(())
}

/// One hook dib-run-parts would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPart {
    /// The file name (the hook's name, e.g. `50-foo`).
    pub name: String,
    /// `dir/name`.
    pub path: PathBuf,
}

/// True for names dib-run-parts runs: `^[0-9A-Za-z_-]+$`.
pub fn is_run_parts_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The hooks dib-run-parts would run from `dir`, in its order: executable regular files (or
/// symlinks to them) directly in `dir` whose names match `^[0-9A-Za-z_-]+$`, sorted like
/// `LANG=C sort -n` ([`run_parts_cmp`]). Everything else is skipped with a debug log.
pub fn run_parts(dir: &Path) -> io::Result<Vec<RunPart>> {
    let mut parts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            debug!(path = %path.display(), "skipped: name is not UTF-8");
            continue;
        };
        // Follow symlinks like `find -xtype f`.
        match fs::metadata(&path) {
            Err(_) => {
                debug!(path = %path.display(), "skipped: dangling symlink");
                continue;
            }
            Ok(m) if !m.is_file() => {
                debug!(path = %path.display(), "skipped: not a regular file");
                continue;
            }
            Ok(_) => {}
        }
        // `find -executable` asks access(2), so root sees any x bit as executable.
        if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() {
            debug!(path = %path.display(), "skipped: not executable");
            continue;
        }
        if !is_run_parts_name(&name) {
            debug!(path = %path.display(), "skipped: name does not match ^[0-9A-Za-z_-]+$");
            continue;
        }
        parts.push(RunPart { name, path });
    }
    parts.sort_by(|a, b| run_parts_cmp(&a.name, &b.name));
    Ok(parts)
}

/// `LANG=C sort -n` on two names: the numeric value of the leading number first (an optional
/// `-` then digits; no number counts as 0), then the whole names' bytes.
pub fn run_parts_cmp(a: &str, b: &str) -> Ordering {
    numeric_prefix_cmp(a.as_bytes(), b.as_bytes()).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// GNU `sort -n`'s key in the C locale: leading blanks skipped, an optional `-`, integer digits,
/// and an optional `.` with fraction digits. Returns (negative, integer digits without leading
/// zeros, fraction digits without trailing zeros); zero is never negative.
fn sort_n_key(s: &[u8]) -> (bool, &[u8], &[u8]) {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let s = &s[start..];
    let (neg, rest) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    let int = &rest[..end];
    let int = &int[int.iter().position(|&b| b != b'0').unwrap_or(int.len())..];
    let frac = match rest.get(end) {
        Some(b'.') => {
            let f = &rest[end + 1..];
            let f = &f[..f
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(f.len())];
            &f[..f.iter().rposition(|&b| b != b'0').map_or(0, |i| i + 1)]
        }
        _ => &[][..],
    };
    let zero = int.is_empty() && frac.is_empty();
    (neg && !zero, int, frac)
}

fn numeric_prefix_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let (a_neg, ai, af) = sort_n_key(a);
    let (b_neg, bi, bf) = sort_n_key(b);
    let magnitude = ai.len().cmp(&bi.len()).then(ai.cmp(bi)).then(af.cmp(bf));
    match (a_neg, b_neg) {
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, body: &str, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn element(root: &Path, name: &str) -> Element {
        let path = root.join(name);
        fs::create_dir_all(&path).unwrap();
        Element {
            name: name.to_string(),
            path: fs::canonicalize(path).unwrap(),
        }
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        v.sort_by(|a, b| run_parts_cmp(a, b));
        v
    }

    #[test]
    fn run_parts_order_matches_dib_examples() {
        assert_eq!(
            sorted(&["100-x", "10-b", "foo", "10-a", "9-z"]),
            ["foo", "9-z", "10-a", "10-b", "100-x"]
        );
        assert_eq!(sorted(&["foo", "Zed", "00-a"]), ["00-a", "Zed", "foo"]);
        assert_eq!(sorted(&["010-a", "9-b", "10-a"]), ["9-b", "010-a", "10-a"]);
        assert_eq!(sorted(&["1", "-5", "-x", "a"]), ["-5", "-x", "a", "1"]);
    }

    /// Runs the real `LC_ALL=C sort -n` on the names.
    fn gnu_sort_n(names: &[String]) -> Vec<String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sort")
            .arg("-n")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = names.join("\n");
        input.push('\n');
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn run_parts_cmp_agrees_with_gnu_sort_n(
            names in proptest::collection::vec("[-0-9A-Za-z_.]{1,8}", 1..20)
        ) {
            let mut ours = names.clone();
            ours.sort_by(|a, b| run_parts_cmp(a, b));
            prop_assert_eq!(ours, gnu_sort_n(&names));
        }
    }

    #[test]
    fn run_parts_takes_only_executable_conforming_files_and_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("install.d");
        for n in ["100-x", "10-b", "foo", "10-a", "9-z", "Zed", "00-a"] {
            write(&d.join(n), "#!/bin/sh\n", 0o755);
        }
        write(&d.join("50-not-exec"), "", 0o644);
        write(&d.join("50-has.dot"), "", 0o755);
        write(&d.join("50-tilde~"), "", 0o755);
        write(&t.path().join("elsewhere/target"), "", 0o755);
        symlink(t.path().join("elsewhere/target"), d.join("60-link")).unwrap();
        symlink(t.path().join("nowhere"), d.join("61-dangling")).unwrap();
        fs::create_dir(d.join("70-a-dir")).unwrap();
        let got: Vec<String> = run_parts(&d).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(
            got,
            [
                "00-a", "Zed", "foo", "9-z", "10-a", "10-b", "60-link", "100-x"
            ]
        );
        let parts = run_parts(&d).unwrap();
        assert_eq!(parts[0].path, d.join("00-a"));
        assert!(run_parts(&t.path().join("missing")).is_err());
    }

    #[test]
    fn tree_merges_folders_and_records_origins() {
        let t = tempfile::tempdir().unwrap();
        let a = element(t.path(), "a");
        let b = element(t.path(), "b");
        write(&a.path.join("install.d/10-a"), "a", 0o755);
        write(
            &a.path.join("install.d/src-source-install/10-x"),
            "x",
            0o755,
        );
        write(&b.path.join("install.d/20-b"), "b", 0o700);
        write(
            &b.path.join("install.d/src-source-install/20-y"),
            "y",
            0o755,
        );
        write(&b.path.join("bin/tool"), "t", 0o755);
        write(&a.path.join("tests/10-test"), "", 0o755);
        write(&a.path.join("test-elements/x/element-deps"), "", 0o644);
        write(&a.path.join("__pycache__/x.pyc"), "", 0o644);
        write(&a.path.join("compiled.pyc"), "", 0o644);
        let tree = HookTree::build(&[a, b]).unwrap();
        assert_eq!(tree.origin("install.d/10-a"), Some("a"));
        assert_eq!(tree.origin("install.d/20-b"), Some("b"));
        assert_eq!(tree.origin("install.d/src-source-install/20-y"), Some("b"));
        assert_eq!(tree.origin("install.d"), Some("a"));
        assert_eq!(tree.origin("bin/tool"), Some("b"));
        for skipped in ["tests", "test-elements", "__pycache__", "compiled.pyc"] {
            assert_eq!(tree.origin(skipped), None, "{skipped}");
        }
    }

    #[test]
    fn duplicate_hook_names_both_elements_and_the_path() {
        let t = tempfile::tempdir().unwrap();
        let a = element(t.path(), "alpha");
        let b = element(t.path(), "beta");
        write(&a.path.join("install.d/50-same"), "a", 0o755);
        write(&b.path.join("install.d/50-same"), "b", 0o755);
        let err = HookTree::build(&[a.clone(), b.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("'install.d/50-same' is in two elements: 'alpha' (")
                && err.contains("and 'beta' ("),
            "{err}"
        );
        // Deeper levels too, and a file against a folder.
        let t = tempfile::tempdir().unwrap();
        let a = element(t.path(), "alpha");
        let b = element(t.path(), "beta");
        write(&a.path.join("static/etc/conf"), "a", 0o644);
        write(&b.path.join("static/etc/conf/inner"), "b", 0o644);
        let err = HookTree::build(&[a, b]).unwrap_err().to_string();
        assert!(
            err.starts_with("'static/etc/conf' is in two elements"),
            "{err}"
        );
    }

    #[test]
    fn top_level_files_are_overwritten_by_the_last_element() {
        let t = tempfile::tempdir().unwrap();
        let a = element(t.path(), "a");
        let b = element(t.path(), "b");
        write(&a.path.join("pkg-map"), "from a", 0o644);
        write(&b.path.join("pkg-map"), "from b", 0o644);
        write(&a.path.join("README.rst"), "only a", 0o644);
        let tree = HookTree::build(&[a, b]).unwrap();
        assert_eq!(tree.origin("pkg-map"), Some("b"));
        assert_eq!(tree.origin("README.rst"), Some("a"));
        let dest = t.path().join("out");
        tree.materialize(&dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("pkg-map")).unwrap(), "from b");
    }

    #[test]
    fn materialize_copies_modes_times_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let a = element(t.path(), "a");
        write(&a.path.join("install.d/10-run"), "#!/bin/sh\n", 0o750);
        write(&a.path.join("install.d/data"), "d", 0o640);
        symlink("../bin/tool", a.path.join("install.d/20-link")).unwrap();
        write(&a.path.join("bin/tool"), "t", 0o755);
        fs::set_permissions(a.path.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        // A top-level symlink to a folder counts as a folder.
        let outside = t.path().join("outside-root.d");
        write(&outside.join("10-root"), "r", 0o755);
        symlink(&outside, a.path.join("root.d")).unwrap();
        let tree = HookTree::build(std::slice::from_ref(&a)).unwrap();
        let dest = t.path().join("hooks");
        tree.materialize(&dest).unwrap();
        let mode = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("install.d/10-run"), 0o750);
        assert_eq!(mode("install.d/data"), 0o640);
        assert_eq!(mode("bin"), 0o555);
        assert_eq!(
            fs::read_link(dest.join("install.d/20-link")).unwrap(),
            Path::new("../bin/tool")
        );
        assert!(fs::symlink_metadata(dest.join("root.d")).unwrap().is_dir());
        assert_eq!(
            fs::read_to_string(dest.join("root.d/10-root")).unwrap(),
            "r"
        );
        let src_m = fs::metadata(a.path.join("install.d/10-run")).unwrap();
        let dst_m = fs::metadata(dest.join("install.d/10-run")).unwrap();
        assert_eq!(src_m.mtime(), dst_m.mtime());
        assert_eq!(src_m.mtime_nsec(), dst_m.mtime_nsec());
        // The materialized phase folder runs the hooks dib would.
        let names: Vec<_> = run_parts(&dest.join("install.d"))
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["10-run", "20-link"]);
        // A second materialize into the same, now non-empty, folder is refused.
        let err = tree.materialize(&dest).unwrap_err();
        assert!(matches!(err, ElementError::DestinationNotEmpty { .. }));
        fs::set_permissions(dest.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(a.path.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
    }
}
