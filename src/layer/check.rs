//! Checking a stored layer without applying it: decompress it, walk its entries with the
//! unpacker's reader and refuse what `unpack` would refuse on any target, writing nothing.
//!
//! ```text
//! blob ──► zstd decode ──► blake3 + count ──► TarReader entries ──► per entry:
//!     path sanitized (no absolute path, no `..`), owners in range, entry type known,
//!     whiteout names valid, no parent that this layer made a symlink or a non-directory,
//!     symlink targets non-empty, hardlink targets inside the tree and not through such a parent,
//!     GNU sparse maps in order and within the file (the reader checks them)
//! ──► the rest of the stream drained ──► diff id compared with the expected one
//! ```
//!
//! What only a real target shows (a symlink planted by an *earlier* layer that this one writes
//! through, a whiteout whose subtree crosses a mount) is still refused by `unpack` when the
//! layer is applied; `check` sees each layer on its own.

use std::collections::BTreeSet;
use std::io::{self, Read};

use tar::EntryType;

use super::read::TarReader;
use super::unpack::sanitize;
use super::{LayerError, split_parent};

/// What a check read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStats {
    /// blake3 (hex) of the uncompressed tar stream.
    pub diff_id: String,
    /// Tar entries (whiteouts and opaque markers included).
    pub entries: u64,
    /// Length of the uncompressed stream.
    pub tar_size: u64,
}

/// Counts and hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

fn unsafe_err(path: &[u8], reason: impl Into<String>) -> LayerError {
    LayerError::Unsafe {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// Checks a zstd-compressed layer (as stored) without writing anything: every refusal `unpack`
/// would make whatever the target holds is an error ([`LayerError::Unsafe`] for an entry that
/// could write outside the tree, [`LayerError::Corrupt`] for a stream or tar that cannot be
/// read, [`LayerError::DiffIdMismatch`] when `expected_diff_id` is given and differs).
pub fn check(blob: impl Read, expected_diff_id: Option<&str>) -> Result<CheckStats, LayerError> {
    let corrupt = |e: io::Error| LayerError::Corrupt(e.to_string());
    let mut dec = zstd::Decoder::new(blob).map_err(corrupt)?;
    dec.window_log_max(31).map_err(corrupt)?;
    let mut tr = TarReader::new(Hashing {
        inner: dec,
        hasher: blake3::Hasher::new(),
        len: 0,
    });
    // Paths this layer made something other than a directory (a symlink, a file, a device):
    // `unpack` refuses to walk through them.
    let mut nondirs: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut entries = 0u64;
    while let Some(e) = tr.next_entry().map_err(corrupt)? {
        entries += 1;
        let path = sanitize(&e.path).map_err(|r| unsafe_err(&e.path, r))?;
        e.header.mode().map_err(corrupt)?;
        if u32::try_from(e.uid).is_err() {
            return Err(unsafe_err(&e.path, "uid out of range"));
        }
        if u32::try_from(e.gid).is_err() {
            return Err(unsafe_err(&e.path, "gid out of range"));
        }
        let (parent, name) = split_parent(&path);
        check_parents(
            &nondirs,
            parent,
            &path,
            "a parent directory is a symlink or not a directory in the target",
        )?;
        if let Some(target) = name.strip_prefix(b".wh.") {
            if target == b".wh..opq" || target.starts_with(b".wh.") {
                continue;
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(unsafe_err(&path, "whiteout of an invalid name"));
            }
            let mut gone = parent.to_vec();
            if !gone.is_empty() {
                gone.push(b'/');
            }
            gone.extend_from_slice(target);
            forget_subtree(&mut nondirs, &gone);
            nondirs.remove(&gone);
            continue;
        }
        if path.is_empty() && e.kind != EntryType::Directory {
            return Err(unsafe_err(&path, "non-directory entry for the target root"));
        }
        match e.kind {
            EntryType::Directory => {
                nondirs.remove(&path);
                continue;
            }
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            EntryType::Symlink => {
                if e.link.as_deref().is_none_or(<[u8]>::is_empty) {
                    return Err(unsafe_err(&path, "empty symlink target"));
                }
            }
            EntryType::Link => {
                let raw = e.link.clone().unwrap_or_default();
                let target = sanitize(&raw)
                    .map_err(|r| unsafe_err(&raw, format!("hardlink target: {r}")))?;
                if target.is_empty() || target == path {
                    return Err(unsafe_err(&raw, "invalid hardlink target"));
                }
                let (tparent, _) = split_parent(&target);
                check_parents(
                    &nondirs,
                    tparent,
                    &raw,
                    "hardlink target goes through a symlink or a non-directory",
                )?;
            }
            EntryType::XGlobalHeader => continue,
            other => {
                return Err(unsafe_err(
                    &path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        }
        // A non-directory replaces whatever was there, a directory's subtree included.
        forget_subtree(&mut nondirs, &path);
        nondirs.insert(path);
    }
    // The end blocks and padding count in the diff id too.
    let mut rest = tr.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
    let diff_id = rest.hasher.finalize().to_hex().to_string();
    if let Some(want) = expected_diff_id
        && want != diff_id
    {
        return Err(LayerError::DiffIdMismatch {
            expected: want.to_string(),
            actual: diff_id,
        });
    }
    Ok(CheckStats {
        diff_id,
        entries,
        tar_size: rest.len,
    })
}

/// Fails when `dir` or any folder above it is in `nondirs`.
fn check_parents(
    nondirs: &BTreeSet<Vec<u8>>,
    dir: &[u8],
    shown: &[u8],
    reason: &str,
) -> Result<(), LayerError> {
    if nondirs.is_empty() || dir.is_empty() {
        return Ok(());
    }
    for (i, &c) in dir.iter().enumerate() {
        if c == b'/' && nondirs.contains(&dir[..i]) {
            return Err(unsafe_err(shown, reason));
        }
    }
    if nondirs.contains(dir) {
        return Err(unsafe_err(shown, reason));
    }
    Ok(())
}

/// Removes every path strictly below `dir` from `set`.
fn forget_subtree(set: &mut BTreeSet<Vec<u8>>, dir: &[u8]) {
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'/' + 1);
    let below: Vec<Vec<u8>> = set.range(lo..hi).cloned().collect();
    for p in below {
        set.remove(&p);
    }
}
