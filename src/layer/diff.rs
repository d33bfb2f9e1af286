//! Diffing: two [`Scan`]s of the same tree in, the sorted OCI [`Changeset`] between them out.
//!
//! A merge join over both sorted scans:
//! * only after, or changed ([`Meta::changed`]) → written;
//! * only before → one whiteout for the topmost deleted path (its children are covered),
//!   unless `after` excluded that path (a mount point hides it: unseen is not deleted);
//! * a type change (dir ↔ file …) → just written: the unpacker replaces what is there;
//! * a directory whose inode changed (removed and recreated) → written as *opaque*, with its
//!   whole new subtree, so nothing of the old contents survives.
//!
//! Every ancestor directory of a written path or whiteout is written too (with its current
//! metadata), so a layer applied to any base recreates its parents with the right modes.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::scan::{FileKind, Meta, Scan};
use super::{is_below, path_cmp, split_parent};

/// What a changeset does at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// Write the path with this metadata; `opaque` (directories only) first hides everything the
    /// lower layers had below it (`.wh..wh..opq`).
    Write { meta: Meta, opaque: bool },
    /// Delete the path (`.wh.<name>` in its parent).
    Whiteout,
}

/// One change: a relative path (raw bytes; "" is the root) and what happens there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: Vec<u8>,
    pub kind: ChangeKind,
}

impl Change {
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }

    /// The path as it appears in the tar stream (a whiteout's `.wh.` name, without a trailing `/`).
    pub(crate) fn tar_path(&self) -> Vec<u8> {
        match self.kind {
            ChangeKind::Write { .. } => self.path.clone(),
            ChangeKind::Whiteout => {
                let (parent, name) = split_parent(&self.path);
                let mut p = Vec::with_capacity(self.path.len() + 4);
                if !parent.is_empty() {
                    p.extend_from_slice(parent);
                    p.push(b'/');
                }
                p.extend_from_slice(b".wh.");
                p.extend_from_slice(name);
                p
            }
        }
    }
}

/// The sorted list of changes a layer records (tar-path order, see [`super::path_cmp`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changeset {
    entries: Vec<Change>,
}

impl Changeset {
    /// Every path of `after` (sockets excluded), no whiteouts: a full snapshot.
    pub fn full(after: &Scan) -> Changeset {
        let entries = after
            .entries()
            .iter()
            .filter(|(_, m)| m.kind != FileKind::Socket)
            .map(|(p, m)| Change {
                path: p.clone(),
                kind: ChangeKind::Write {
                    meta: m.clone(),
                    opaque: false,
                },
            })
            .collect();
        Changeset { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of entries (written paths and whiteouts).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Change> {
        self.entries.iter()
    }

    /// Paths deleted by this changeset.
    pub fn deleted(&self) -> impl Iterator<Item = &Path> {
        self.entries
            .iter()
            .filter(|c| c.kind == ChangeKind::Whiteout)
            .map(|c| c.path())
    }

    /// Directories marked opaque.
    pub fn opaque(&self) -> impl Iterator<Item = &Path> {
        self.entries
            .iter()
            .filter(|c| matches!(c.kind, ChangeKind::Write { opaque: true, .. }))
            .map(|c| c.path())
    }

    /// Paths written (added or changed), ancestors included.
    pub fn written(&self) -> impl Iterator<Item = &Path> {
        self.entries
            .iter()
            .filter(|c| matches!(c.kind, ChangeKind::Write { .. }))
            .map(|c| c.path())
    }
}

/// Computes the changes that turn the tree of `before` into the tree of `after`.
pub fn diff(before: &Scan, after: &Scan) -> Changeset {
    diff_with(before, after, &|_, _, _| false)
}

/// [`diff`], where a path present on both sides whose metadata differs is left out when
/// `unchanged(path, before, after)` says the difference means nothing (a kept tree's overlay
/// copying a file up, see `exec::kept_tree`).
pub fn diff_with(
    before: &Scan,
    after: &Scan,
    unchanged: &dyn Fn(&[u8], &Meta, &Meta) -> bool,
) -> Changeset {
    let b = before.entries();
    let a = after.entries();
    let mut out: Vec<Change> = Vec::new();
    // Subtree whose before-side paths need no whiteout (deleted, replaced or opaque above them).
    let mut covered: Option<Vec<u8>> = None;
    // Subtree (an opaque directory) whose after-side paths are all written.
    let mut forced: Option<Vec<u8>> = None;
    let (mut i, mut j) = (0, 0);

    let write = |out: &mut Vec<Change>, p: &[u8], m: &Meta, opaque: bool| {
        if m.kind != FileKind::Socket {
            out.push(Change {
                path: p.to_vec(),
                kind: ChangeKind::Write {
                    meta: m.clone(),
                    opaque,
                },
            });
        }
    };
    let under = |p: &[u8], c: &Option<Vec<u8>>| c.as_deref().is_some_and(|d| is_below(p, d));

    while i < b.len() || j < a.len() {
        let ord = match (b.get(i), a.get(j)) {
            (Some((bp, _)), Some((ap, _))) => path_cmp(bp, ap),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                let (bp, _) = &b[i];
                // Hidden by a mount in `after` (a hook's bind mount): unseen, not deleted.
                if !under(bp, &covered) && !after.hides(bp) {
                    out.push(Change {
                        path: bp.clone(),
                        kind: ChangeKind::Whiteout,
                    });
                    covered = Some(bp.clone());
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let (ap, am) = &a[j];
                write(&mut out, ap, am, false);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (p, bm) = &b[i];
                let am = &a[j].1;
                if under(p, &forced) {
                    write(&mut out, p, am, false);
                } else if bm.kind == FileKind::Dir && am.kind == FileKind::Dir && bm.ino != am.ino {
                    write(&mut out, p, am, true);
                    forced = Some(p.clone());
                    covered = Some(p.clone());
                } else if bm.kind != am.kind {
                    write(&mut out, p, am, false);
                    if bm.kind == FileKind::Dir {
                        covered = Some(p.clone());
                    }
                } else if bm.changed(am) && !unchanged(p, bm, am) {
                    write(&mut out, p, am, false);
                }
                i += 1;
                j += 1;
            }
        }
    }

    // Ancestors of every entry, taken from `after` (they are directories there).
    let present: HashSet<Vec<u8>> = out.iter().map(|c| c.path.clone()).collect();
    let mut extra: HashSet<Vec<u8>> = HashSet::new();
    for c in &out {
        let mut p: &[u8] = &c.path;
        while !p.is_empty() {
            let (parent, _) = split_parent(p);
            if present.contains(parent) || !extra.insert(parent.to_vec()) {
                break;
            }
            p = parent;
        }
    }
    for p in extra {
        if let Some(m) = after.get_bytes(&p) {
            out.push(Change {
                path: p,
                kind: ChangeKind::Write {
                    meta: m.clone(),
                    opaque: false,
                },
            });
        }
    }
    let mut keyed: Vec<(Vec<u8>, Change)> = out.into_iter().map(|c| (c.tar_path(), c)).collect();
    keyed.sort_by(|x, y| path_cmp(&x.0, &y.0));
    Changeset {
        entries: keyed.into_iter().map(|(_, c)| c).collect(),
    }
}
