//! Layers: scanning a tree, diffing two scans into an OCI changeset, packing it as a deterministic
//! zstd tar, and unpacking one safely (a layer from a shared cache is untrusted input).
//!
//! ```text
//! scan(root) ──► Scan ─┐
//! scan(root) ──► Scan ─┴► diff() ──► Changeset ──► pack(root, ..) ──► zstd tar blob + LayerInfo
//!                                     (full())      write_tar()  ──► plain tar (no compression)
//!                                                   write_tar_dense() ──► same, no sparse entries
//! blob ──► unpack(target) ──► files, whiteouts applied, UnpackStats (diff id recomputed)
//! blob ──► check() ──► the same refusals, nothing written, CheckStats (diff id recomputed)
//! ```
//!
//! Format (OCI changeset): entries in component-wise path order (a directory before its
//! children, siblings by name bytes), GNU headers with numeric owners and empty uname/gname,
//! mtimes in whole seconds (clamped to `SOURCE_DATE_EPOCH` when given), xattrs as PAX
//! `SCHILY.xattr.*`, hardlinks as `Link` entries, deletions as `.wh.<name>`, a replaced directory
//! as `.wh..wh..opq` right after its own entry. Runs of zeros of at least [`SPARSE_CHUNK`] (aligned)
//! are stored as GNU sparse holes, decided from the file's *content* (not from how the file
//! system happens to allocate it), so the tar bytes do not depend on the machine.
//!
//! The diff id is the blake3 of the uncompressed tar stream (OCI's DiffID idea with blake3).
//! This module knows nothing of elements, steps or caches.

mod check;
mod diff;
mod pack;
pub(crate) mod read;
mod scan;
mod sys;
mod unpack;

use std::path::PathBuf;

pub use check::{CheckStats, check};
pub use diff::{Change, ChangeKind, Changeset, diff, diff_with};
pub use pack::{LayerInfo, PackOptions, pack, write_tar, write_tar_dense};
pub use scan::{FileKind, Meta, Scan, ScanOptions, rescan, scan};
pub use unpack::{UnpackOptions, UnpackStats, unpack};

/// Granularity of content-defined sparse holes: an aligned run of this many zero bytes in a file
/// of at least twice this size is stored as a hole.
pub const SPARSE_CHUNK: u64 = 64 * 1024;

/// Errors of the layer module. Every message names the path involved and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading the source tree failed while packing.
    #[error("cannot read {} while packing a layer: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source tree changed under the packer.
    #[error("{} changed while being packed ({what}); rerun the step, nothing may write to the tree while it is snapshotted", path.display())]
    Changed { path: PathBuf, what: &'static str },
    /// Writing the layer stream failed.
    #[error("cannot write the layer stream: {0}")]
    Write(#[source] std::io::Error),
    /// The blob is not a readable zstd-compressed tar.
    #[error("the layer blob is corrupt ({0}); delete it from the cache and rebuild the step")]
    Corrupt(String),
    /// An entry would write outside the target or through a symlink: the layer is hostile or broken.
    #[error(
        "refusing layer entry {path:?}: {reason}; the layer is corrupt or hostile, delete it from the cache"
    )]
    Unsafe { path: String, reason: String },
    /// Applying an entry to the target failed.
    #[error("cannot unpack {path:?} into {}: {source}", target.display())]
    Apply {
        path: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The recomputed diff id differs from the expected one.
    #[error(
        "layer diff id mismatch: expected {expected}, unpacked {actual}; the cached blob is corrupt, delete it and rebuild the step"
    )]
    DiffIdMismatch { expected: String, actual: String },
}

/// Compares two relative paths (as bytes) component by component: `a` < `a/b` < `a-b`. This is
/// the order of a depth-first walk with each directory's names sorted by bytes, which keeps a
/// directory's whole subtree contiguous and its own entry first.
pub fn path_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    for (&x, &y) in a.iter().zip(b.iter()) {
        if x != y {
            return key(x).cmp(&key(y));
        }
    }
    a.len().cmp(&b.len())
}

/// A relative byte path ordered as [`path_cmp`] orders it (a folder's subtree right after it),
/// for ordered maps of paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathKey(pub Vec<u8>);

impl Ord for PathKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        path_cmp(&self.0, &other.0)
    }
}

impl PartialOrd for PathKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The parent of a relative byte path ("" for a top-level name) and its last component.
pub(crate) fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Whether `path` lies strictly below `dir` (both relative byte paths; "" is the root).
pub(crate) fn is_below(path: &[u8], dir: &[u8]) -> bool {
    if dir.is_empty() {
        return !path.is_empty();
    }
    path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/'
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod order_tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn component_order_puts_children_right_after_their_directory() {
        let mut v: Vec<&[u8]> = vec![b"a-b", b"a/b", b"a", b"", b"a/b/c", b"b", b"a.", b"a/.wh.x"];
        v.sort_by(|x, y| path_cmp(x, y));
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/.wh.x", b"a/b", b"a/b/c", b"a-b", b"a.", b"b"];
        assert_eq!(v, want);
        assert_eq!(path_cmp(b"x", b"x"), Ordering::Equal);
    }

    #[test]
    fn split_parent_and_is_below() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
        assert!(is_below(b"a/b", b"a"));
        assert!(!is_below(b"ab", b"a"));
        assert!(!is_below(b"a", b"a"));
        assert!(is_below(b"a", b""));
    }
}
