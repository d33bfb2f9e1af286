//! Scanning: one `lstat` per path of a tree into a sorted [`Scan`] that [`super::diff`] compares.
//!
//! The walk never follows symlinks. It does NOT stop at file-system boundaries (a rootfs may
//! legitimately span several, e.g. a separate /boot); mount points that must not be captured
//! (proc, sys, dev, tmp/in_target.d) are skipped with [`ScanOptions::exclude`], which drops the
//! path itself and its whole subtree.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::path_cmp;

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

/// Scans `root` (which must be a directory) without following symlinks.
pub fn scan(root: &Path, opts: &ScanOptions) -> io::Result<Scan> {
    let excludes: Vec<Vec<u8>> = opts
        .exclude
        .iter()
        .map(|p| normalize_exclude(p))
        .filter(|p| !p.is_empty())
        .collect();
    let root_md = std::fs::metadata(root)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot scan {}: {e}", root.display())))?;
    if !root_md.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("cannot scan {}: not a directory", root.display()),
        ));
    }
    let prefix_len = root.as_os_str().len();
    let rel_of = |p: &Path| -> Vec<u8> {
        let b = p.as_os_str().as_bytes();
        let r = b.get(prefix_len..).unwrap_or_default();
        r.strip_prefix(b"/").unwrap_or(r).to_vec()
    };
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .follow_root_links(true)
        .same_file_system(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()))
        .into_iter()
        .filter_entry(|e| {
            if excludes.is_empty() || e.depth() == 0 {
                return true;
            }
            let rel = rel_of(e.path());
            !excludes.contains(&rel)
        });
    let mut entries = Vec::new();
    for item in walker {
        let item = item.map_err(|e| {
            let path = e
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let io = e.into_io_error();
            let kind = io
                .as_ref()
                .map(|e| e.kind())
                .unwrap_or(io::ErrorKind::Other);
            let msg = io
                .map(|e| e.to_string())
                .unwrap_or_else(|| "filesystem loop".into());
            io::Error::new(kind, format!("cannot scan {path}: {msg}"))
        })?;
        let path = item.path();
        let md = if item.depth() == 0 {
            root_md.clone()
        } else {
            std::fs::symlink_metadata(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot lstat {}: {e}", path.display()))
            })?
        };
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
        let rel = if item.depth() == 0 {
            Vec::new()
        } else {
            rel_of(path)
        };
        entries.push((rel, Meta::from_std(&md, target)));
    }
    entries.sort_by(|a, b| path_cmp(&a.0, &b.0));
    Ok(Scan {
        entries,
        excluded: excludes,
    })
}

use std::os::unix::ffi::OsStringExt;
