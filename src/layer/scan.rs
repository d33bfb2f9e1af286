//! Scanning: one `lstat` per path of a tree into a sorted [`Scan`] that [`super::diff`] compares.
//!
//! The walk never follows symlinks. It does NOT stop at file-system boundaries (a rootfs may
//! legitimately span several, e.g. a separate /boot); mount points that must not be captured
//! (proc, sys, dev, tmp/in_target.d) are skipped with [`ScanOptions::exclude`], which drops the
//! path itself and its whole subtree.
//!
//! Folders are read by as many threads as there are cores (at most 4), started by the scan
//! itself, and each entry is stat'ed relative to its open folder: 0.13 s → 0.047 s for the
//! 20,000 paths of debian-minimal in tmpfs on 2 cores (`strata build -v` prints the figure).
//!
//! [`rescan`] brings an earlier scan up to date by looking again only at the paths a caller
//! knows may have changed (on an overlay: what changed in its upper folder), instead of
//! walking the whole tree:
//!
//! ```text
//! rescan(root, before, dirty):  excludes differ from before's ──► scan(root) (a full walk)
//!   dirty += every other name of a hardlinked inode in dirty (its link count, ctime, content
//!            are the same inode's)
//!   each dirty path, parents first ──► lstat
//!     gone                     ──► it and its subtree dropped
//!     a folder that was one    ──► its entry updated; its names listed again: names gone
//!                                  drop their subtrees, new names are walked in full
//!     anything else            ──► its old subtree dropped, walked in full (a file: one entry)
//! ```
//!
//! The result equals what [`scan`] would give provided `dirty` holds every path that appeared,
//! disappeared or whose `lstat` changed, except that a path may be left out when its folder's
//! list of names changed and that folder is in `dirty`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::{PathKey, path_cmp};

/// What to leave out of a scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Paths relative to the root (e.g. `proc`, `tmp/in_target.d`); each is skipped with its
    /// whole subtree. A leading `/` or `./` is ignored.
    pub exclude: Vec<PathBuf>,
}

/// The type of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    /// Sockets are scanned but never packed (tar cannot carry them; GNU tar skips them too).
    Socket,
}

/// The metadata of one path, as `lstat` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
    pub ino: u64,
    pub dev: u64,
    pub nlink: u64,
    pub rdev: u64,
    /// The target of a symlink, as raw bytes.
    pub link_target: Option<Vec<u8>>,
}

impl Meta {
    pub(crate) fn from_std(md: &std::fs::Metadata, link_target: Option<Vec<u8>>) -> Meta {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_char_device() {
            FileKind::Char
        } else if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::File
        };
        Meta {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
            nlink: md.nlink(),
            rdev: md.rdev(),
            link_target,
        }
    }

    /// Whether a path with `self` before and `other` after counts as changed: type, mode, owner,
    /// size, mtime, ctime, inode, link count, device number or link target differ. (ctime
    /// catches xattr-only and same-second content changes.)
    pub fn changed(&self, other: &Meta) -> bool {
        self.kind != other.kind
            || self.mode != other.mode
            || self.uid != other.uid
            || self.gid != other.gid
            || self.size != other.size
            || self.mtime != other.mtime
            || self.mtime_nsec != other.mtime_nsec
            || self.ctime != other.ctime
            || self.ctime_nsec != other.ctime_nsec
            || self.ino != other.ino
            || self.nlink != other.nlink
            || self.rdev != other.rdev
            || self.link_target != other.link_target
    }
}

/// A scanned tree: relative paths (raw bytes, "" is the root itself) in [`path_cmp`] order.
#[derive(Debug, Clone)]
pub struct Scan {
    entries: Vec<(Vec<u8>, Meta)>,
    /// The excluded paths (mount points): what is at or below them was not seen, so a diff
    /// must not read their absence as a deletion.
    excluded: Vec<Vec<u8>>,
}

impl Scan {
    /// Number of paths, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The metadata of a relative path ("" for the root).
    pub fn get(&self, rel: &Path) -> Option<&Meta> {
        self.get_bytes(rel.as_os_str().as_bytes())
    }

    pub(crate) fn get_bytes(&self, rel: &[u8]) -> Option<&Meta> {
        self.entries
            .binary_search_by(|(p, _)| path_cmp(p, rel))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// All (relative path, metadata) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Meta)> {
        self.entries
            .iter()
            .map(|(p, m)| (Path::new(OsStr::from_bytes(p)), m))
    }

    pub(crate) fn entries(&self) -> &[(Vec<u8>, Meta)] {
        &self.entries
    }

    /// True if `rel` is at or below a path this scan excluded.
    pub(crate) fn hides(&self, rel: &[u8]) -> bool {
        self.excluded
            .iter()
            .any(|x| rel == x.as_slice() || super::is_below(rel, x))
    }
}

fn normalize_exclude(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for c in p.components() {
        if let Component::Normal(n) = c {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(n.as_bytes());
        }
    }
    out
}

fn normalized_excludes(opts: &ScanOptions) -> Vec<Vec<u8>> {
    let mut excludes: Vec<Vec<u8>> = opts
        .exclude
        .iter()
        .map(|p| normalize_exclude(p))
        .filter(|p| !p.is_empty())
        .collect();
    excludes.sort();
    excludes.dedup();
    excludes
}

/// Scans `root` (which must be a directory) without following symlinks.
pub fn scan(root: &Path, opts: &ScanOptions) -> io::Result<Scan> {
    let excludes = normalized_excludes(opts);
    let root_md = std::fs::metadata(root)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot scan {}: {e}", root.display())))?;
    if !root_md.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("cannot scan {}: not a directory", root.display()),
        ));
    }
    let mut entries = Vec::new();
    walk(root, &[], root_md, &excludes, &mut entries)?;
    entries.sort_by(|a, b| path_cmp(&a.0, &b.0));
    Ok(Scan {
        entries,
        excluded: excludes,
    })
}

/// Walks `root/start` (`start` relative, "" for the root itself; `start_md` is its metadata)
/// without following symlinks, pushing (relative path, metadata) for it and everything below
/// it that `excludes` leaves in, in no particular order. Folders are read by a few threads
/// started here (so they are in the caller's mount namespace, which a thread pool made
/// earlier may not be), each entry stat'ed relative to its open folder.
fn walk(
    root: &Path,
    start: &[u8],
    start_md: std::fs::Metadata,
    excludes: &[Vec<u8>],
    entries: &mut Vec<(Vec<u8>, Meta)>,
) -> io::Result<()> {
    use std::sync::{Condvar, Mutex};
    let top = root.join(OsStr::from_bytes(start));
    entries.push((start.to_vec(), meta_of(&top, &start_md)?));
    if !start_md.is_dir() {
        return Ok(());
    }
    /// Folders to read, how many are being read, and the first error.
    struct Work {
        todo: Vec<Vec<u8>>,
        busy: usize,
        failed: Option<io::Error>,
        found: Vec<(Vec<u8>, Meta)>,
    }
    let work = Mutex::new(Work {
        todo: vec![start.to_vec()],
        busy: 0,
        failed: None,
        found: Vec::new(),
    });
    let wake = Condvar::new();
    let lock = || work.lock().unwrap_or_else(|p| p.into_inner());
    let worker = || {
        loop {
            let rel = {
                let mut w = lock();
                loop {
                    if w.failed.is_some() {
                        return;
                    }
                    if let Some(rel) = w.todo.pop() {
                        w.busy += 1;
                        break rel;
                    }
                    if w.busy == 0 {
                        return;
                    }
                    w = wake.wait(w).unwrap_or_else(|p| p.into_inner());
                }
            };
            let read = read_folder(root, &rel, excludes);
            let mut w = lock();
            w.busy -= 1;
            match read {
                Ok((batch, folders)) => {
                    w.found.extend(batch);
                    w.todo.extend(folders);
                }
                Err(e) => {
                    w.failed.get_or_insert(e);
                }
            }
            wake.notify_all();
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(worker);
        }
        worker();
    });
    let w = work.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = w.failed {
        return Err(e);
    }
    entries.extend(w.found);
    Ok(())
}

/// One folder's entries (those `excludes` leaves in) and which of them are folders.
#[allow(clippy::type_complexity)]
fn read_folder(
    root: &Path,
    rel: &[u8],
    excludes: &[Vec<u8>],
) -> io::Result<(Vec<(Vec<u8>, Meta)>, Vec<Vec<u8>>)> {
    let dir = root.join(OsStr::from_bytes(rel));
    let cannot = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("cannot {what} {}: {e}", p.display()))
    };
    let mut batch = Vec::new();
    let mut folders = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| cannot("scan", &dir, e))? {
        let e = e.map_err(|e| cannot("scan", &dir, e))?;
        let mut child = rel.to_vec();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(e.file_name().as_bytes());
        if excludes.contains(&child) {
            continue;
        }
        // fstatat on the open folder: no walk of the whole path per entry.
        let md = e
            .metadata()
            .map_err(|err| cannot("lstat", &e.path(), err))?;
        if md.is_dir() {
            folders.push(child.clone());
        }
        batch.push((child, meta_of(&e.path(), &md)?));
    }
    Ok((batch, folders))
}

/// The metadata of `path` from its `lstat`, with its target read if it is a symlink.
fn meta_of(path: &Path, md: &std::fs::Metadata) -> io::Result<Meta> {
    let target = if md.file_type().is_symlink() {
        Some(
            std::fs::read_link(path)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot readlink {}: {e}", path.display()))
                })?
                .into_os_string()
                .into_vec(),
        )
    } else {
        None
    };
    Ok(Meta::from_std(md, target))
}

/// Brings `before`, a scan of `root`, up to date by looking again only at `dirty` (relative
/// paths) and what the module docs say follows from them. Falls back to a full [`scan`] when
/// the paths `opts` excludes are not the ones `before` excluded (a mount came or went).
pub fn rescan(
    root: &Path,
    before: &Scan,
    dirty: impl IntoIterator<Item = Vec<u8>>,
    opts: &ScanOptions,
) -> io::Result<Scan> {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    let excludes = normalized_excludes(opts);
    if excludes != before.excluded {
        return scan(root, opts);
    }
    let mut dirty: BTreeSet<PathKey> = dirty.into_iter().map(PathKey).collect();
    // The other names of a hardlinked inode change with it (link count, ctime, content).
    let linked: Vec<u64> = dirty
        .iter()
        .filter_map(|p| before.get_bytes(&p.0))
        .filter(|m| m.kind != FileKind::Dir && m.nlink > 1)
        .map(|m| m.ino)
        .collect();
    if !linked.is_empty() {
        let mut by_ino: HashMap<u64, Vec<&[u8]>> = HashMap::new();
        for (p, m) in before.entries() {
            if m.kind != FileKind::Dir && m.nlink > 1 {
                by_ino.entry(m.ino).or_default().push(p);
            }
        }
        for ino in linked {
            for p in by_ino.get(&ino).into_iter().flatten() {
                dirty.insert(PathKey(p.to_vec()));
            }
        }
    }
    let mut tree: BTreeMap<PathKey, Meta> = before
        .entries()
        .iter()
        .map(|(p, m)| (PathKey(p.clone()), m.clone()))
        .collect();
    let hidden = |rel: &[u8]| {
        excludes
            .iter()
            .any(|x| rel == x.as_slice() || super::is_below(rel, x))
    };
    fn drop_subtree(tree: &mut BTreeMap<PathKey, Meta>, rel: &[u8]) {
        let gone: Vec<PathKey> = tree
            .range(PathKey(rel.to_vec())..)
            .map(|(k, _)| k)
            .take_while(|k| k.0 == rel || super::is_below(&k.0, rel))
            .cloned()
            .collect();
        for k in gone {
            tree.remove(&k);
        }
    }
    let walk_into = |tree: &mut BTreeMap<PathKey, Meta>, rel: &[u8], md| -> io::Result<()> {
        let mut found = Vec::new();
        walk(root, rel, md, &excludes, &mut found)?;
        tree.extend(found.into_iter().map(|(p, m)| (PathKey(p), m)));
        Ok(())
    };
    for PathKey(rel) in dirty {
        if hidden(&rel) {
            continue;
        }
        // Below anything but a folder (gone, or now a symlink: lstat would follow it out of
        // the tree) there is nothing. Parents come first, so the tree knows what they are now.
        let (parent, _) = super::split_parent(&rel);
        if !rel.is_empty()
            && !tree
                .get(&PathKey(parent.to_vec()))
                .is_some_and(|m| m.kind == FileKind::Dir)
        {
            drop_subtree(&mut tree, &rel);
            continue;
        }
        let path = root.join(OsStr::from_bytes(&rel));
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::libc::ENOTDIR) =>
            {
                if !rel.is_empty() {
                    drop_subtree(&mut tree, &rel);
                }
                continue;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot lstat {}: {e}", path.display()),
                ));
            }
        };
        let key = PathKey(rel.clone());
        let was_dir = tree.get(&key).is_some_and(|m| m.kind == FileKind::Dir);
        if !(was_dir && md.is_dir()) {
            drop_subtree(&mut tree, &rel);
            walk_into(&mut tree, &rel, md)?;
            continue;
        }
        tree.insert(key, meta_of(&path, &md)?);
        let mut listed = BTreeSet::new();
        for e in std::fs::read_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot list {}: {e}", path.display())))?
        {
            let e = e.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot list {}: {e}", path.display()))
            })?;
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(e.file_name().as_bytes());
            listed.insert(child);
        }
        let known: Vec<Vec<u8>> = tree
            .range(PathKey(rel.clone())..)
            .map(|(k, _)| &k.0)
            .skip(1)
            .take_while(|k| super::is_below(k, &rel))
            .filter(|k| super::split_parent(k).0 == rel.as_slice())
            .cloned()
            .collect();
        for k in &known {
            if !listed.contains(k) {
                drop_subtree(&mut tree, k);
            }
        }
        for n in listed {
            if hidden(&n) || tree.contains_key(&PathKey(n.clone())) {
                continue;
            }
            let p = root.join(OsStr::from_bytes(&n));
            let md = std::fs::symlink_metadata(&p).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot lstat {}: {e}", p.display()))
            })?;
            walk_into(&mut tree, &n, md)?;
        }
    }
    Ok(Scan {
        entries: tree.into_iter().map(|(k, m)| (k.0, m)).collect(),
        excluded: excludes,
    })
}

use std::os::unix::ffi::OsStringExt;
