//! File-level differences between two layers (uncompressed OCI changeset tars in
//! [`crate::layer::path_cmp`] order), one file's content out of a layer, and diffoscope on two files.
//!
//! ```text
//! tar A ──► LayerStream (TarReader, one entry: metadata + blake3 of its data) ─┐ merge join
//! tar B ──► LayerStream ───────────────────────────────────────────────────────┴► FileDiff ──► emit
//!            entries keyed by their tar path; a whiteout `d/.wh.x` is matched with an entry `d/x`
//!            of the other layer through a small pending map (only while the join is inside `d`)
//! ```
//!
//! Memory: one entry's metadata per layer (its xattrs included, its data never), plus the paths
//! of one-sided whiteouts/entries of the current directory waiting for their counterpart.
//! Content is compared by the blake3 of the file's bytes with sparse holes expanded, so a file
//! stored sparse in one layer and dense in the other compares equal if its bytes are.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tar::EntryType;

use super::{AuditError, ByteName};
use crate::layer::read::{RawEntry, TarReader};
use crate::layer::{PathKey, path_cmp};

/// Name of a whiteout file's prefix and of the opaque-directory marker (OCI image spec).
const WH: &[u8] = b".wh.";
const OPQ: &[u8] = b".wh..wh..opq";
/// Read buffer for entry data.
const BUF: usize = 1 << 20;
/// Zeros hashed for sparse holes.
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// The type of a layer entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A tar hardlink entry: the same inode as an earlier path of the layer.
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Char => "char",
            EntryKind::Block => "block",
            EntryKind::Fifo => "fifo",
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attribute of an entry that can differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldName {
    /// File type (file, dir, symlink, hardlink, char, block, fifo).
    Kind,
    /// blake3 of a regular file's bytes, sparse holes expanded.
    Content,
    /// A regular file's size in bytes.
    Size,
    /// Permission bits with setuid, setgid and sticky, in octal.
    Mode,
    /// `uid:gid`.
    Owner,
    /// Extended attributes: only the names that differ are shown.
    Xattrs,
    /// Modification time in seconds.
    Mtime,
    /// A symlink's or hardlink's target.
    LinkTarget,
    /// `major,minor` of a device node.
    Device,
    /// Whether a directory hides the lower layers' contents (`.wh..wh..opq`).
    Opaque,
}

impl FieldName {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldName::Kind => "kind",
            FieldName::Content => "content",
            FieldName::Size => "size",
            FieldName::Mode => "mode",
            FieldName::Owner => "owner",
            FieldName::Xattrs => "xattrs",
            FieldName::Mtime => "mtime",
            FieldName::LinkTarget => "link_target",
            FieldName::Device => "device",
            FieldName::Opaque => "opaque",
        }
    }
}

impl fmt::Display for FieldName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attribute that differs, with both values rendered as text (`(none)` when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: FieldName,
    pub before: String,
    pub after: String,
    /// For [`FieldName::Xattrs`]: the attribute names whose value differs or that only one side
    /// has (`before`/`after` show just those). Empty for other fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattr_names: Vec<ByteName>,
}

/// How a path differs between the first layer (A) and the second (B).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// B writes the path and A does not: A has no entry there (`over_whiteout: false`) or
    /// deletes it with a whiteout (`over_whiteout: true`). `opaque`: B's directory is opaque.
    Added {
        kind: EntryKind,
        #[serde(default, skip_serializing_if = "is_false")]
        opaque: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        over_whiteout: bool,
    },
    /// A writes or keeps the path and B does not: `kind` is A's entry (None when A has no entry),
    /// `by_whiteout` says B deletes it with a whiteout rather than just not having it.
    Removed {
        kind: Option<EntryKind>,
        #[serde(default, skip_serializing_if = "is_false")]
        by_whiteout: bool,
    },
    /// A deletes the path with a whiteout; B has no entry there (it leaves the path to the layers
    /// below).
    WhiteoutDropped,
    /// Both write the path; these attributes differ (in [`FieldName`] order).
    Changed { fields: Vec<Field> },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One differing path (relative to the image root; "" is the root itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDiff {
    pub path: ByteName,
    #[serde(flatten)]
    pub change: Change,
}

impl FileDiff {
    /// The names of the changed fields (empty unless [`Change::Changed`]).
    pub fn field_names(&self) -> Vec<FieldName> {
        match &self.change {
            Change::Changed { fields } => fields.iter().map(|f| f.name).collect(),
            _ => Vec::new(),
        }
    }
}

/// Text form: one line (`+ path [kind]`, `- path [kind]`, `~ path: field, field`, `! path`),
/// then for a change one indented `field: before -> after` line per field.
impl fmt::Display for FileDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = if self.path.0.is_empty() {
            "/".to_string()
        } else {
            self.path.to_string()
        };
        match &self.change {
            Change::Added {
                kind,
                opaque,
                over_whiteout,
            } => {
                write!(f, "+ {p} [{kind}")?;
                if *opaque {
                    f.write_str(", opaque")?;
                }
                if *over_whiteout {
                    f.write_str(", the first layer deletes it")?;
                }
                f.write_str("]")
            }
            Change::Removed { kind, by_whiteout } => {
                write!(f, "- {p} [")?;
                match (kind, by_whiteout) {
                    (Some(k), false) => write!(f, "{k}")?,
                    (Some(k), true) => write!(f, "{k}, the second layer deletes it")?,
                    (None, _) => f.write_str("the second layer deletes it")?,
                }
                f.write_str("]")
            }
            Change::WhiteoutDropped => write!(f, "! {p} [only the first layer deletes it]"),
            Change::Changed { fields } => {
                let names: Vec<&str> = fields.iter().map(|x| x.name.as_str()).collect();
                write!(f, "~ {p}: {}", names.join(", "))?;
                for x in fields {
                    write!(f, "\n    {}: {} -> {}", x.name, x.before, x.after)?;
                }
                Ok(())
            }
        }
    }
}

/// Counts over one comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffSummary {
    /// Tar entries read from each layer (whiteouts counted, opaque markers folded into their
    /// directory).
    pub first_entries: u64,
    pub second_entries: u64,
    pub added: u64,
    pub removed: u64,
    pub whiteout_dropped: u64,
    pub changed: u64,
}

impl DiffSummary {
    /// Number of differing paths.
    pub fn differences(&self) -> u64 {
        self.added + self.removed + self.whiteout_dropped + self.changed
    }

    fn count(&mut self, d: &FileDiff) {
        match d.change {
            Change::Added { .. } => self.added += 1,
            Change::Removed { .. } => self.removed += 1,
            Change::WhiteoutDropped => self.whiteout_dropped += 1,
            Change::Changed { .. } => self.changed += 1,
        }
    }
}

impl fmt::Display for DiffSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} differences ({} added, {} removed, {} changed, {} whiteouts only in the first) over {} and {} entries",
            self.differences(),
            self.added,
            self.removed,
            self.changed,
            self.whiteout_dropped,
            self.first_entries,
            self.second_entries
        )
    }
}

/// A whole comparison, as `strata diff --json` embeds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDiff {
    pub files: Vec<FileDiff>,
    pub summary: DiffSummary,
}

impl fmt::Display for LayerDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.files {
            writeln!(f, "{d}")?;
        }
        write!(f, "{}", self.summary)
    }
}

/// The metadata of one (non-whiteout) entry, as far as the tar carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: EntryKind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    /// Regular files: real size and blake3 of the expanded content.
    size: Option<u64>,
    content: Option<blake3::Hash>,
    /// Symlink or hardlink target.
    link: Option<Vec<u8>>,
    device: Option<(u32, u32)>,
    /// Sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Whiteout,
    Node(Node),
}

/// One logical entry of a layer.
#[derive(Debug)]
struct Entry {
    /// The tar path, normalised (no `./` prefix, no trailing `/`): the merge order key.
    key: Vec<u8>,
    /// The path the entry is about (a whiteout's deleted path).
    path: Vec<u8>,
    body: Body,
}

/// Where a chunk of expanded file content comes from.
enum Chunk<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

/// A normalised tar path: no leading `./` (or `/`), no trailing `/`; `.` is the root "".
fn normalise(mut p: &[u8]) -> Vec<u8> {
    while let Some(rest) = p.strip_prefix(b"./") {
        p = rest;
    }
    while let Some(rest) = p.strip_prefix(b"/") {
        p = rest;
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    if p == b"." {
        return Vec::new();
    }
    p.to_vec()
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// The tar path of the whiteout that would delete `path` (None for the root).
fn whiteout_key(path: &[u8]) -> Option<Vec<u8>> {
    if path.is_empty() {
        return None;
    }
    let (parent, name) = split_parent(path);
    let mut n = WH.to_vec();
    n.extend_from_slice(name);
    Some(join(parent, &n))
}

/// A layer's tar stream read as [`Entry`]s, order checked.
struct LayerStream<R> {
    tar: TarReader<R>,
    layer: &'static str,
    /// The next raw entry, read while looking for an opaque marker; its data is still unread.
    peeked: Option<(RawEntry, Vec<u8>)>,
    last_key: Option<Vec<u8>>,
    entries: u64,
    buf: Vec<u8>,
}

impl<R: Read> LayerStream<R> {
    fn new(inner: R, layer: &'static str) -> Self {
        LayerStream {
            tar: TarReader::new(inner),
            layer,
            peeked: None,
            last_key: None,
            entries: 0,
            buf: vec![0u8; BUF],
        }
    }

    fn read_err(&self, e: io::Error) -> AuditError {
        AuditError::Read {
            layer: self.layer,
            source: e,
        }
    }

    fn format(&self, path: &[u8], what: impl Into<String>) -> AuditError {
        AuditError::Format {
            layer: self.layer,
            path: ByteName::new(path),
            what: what.into(),
        }
    }

    fn raw(&mut self) -> Result<Option<(RawEntry, Vec<u8>)>, AuditError> {
        if let Some(p) = self.peeked.take() {
            return Ok(Some(p));
        }
        match self.tar.next_entry() {
            Ok(Some(e)) => {
                let path = normalise(&e.path);
                Ok(Some((e, path)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.read_err(e)),
        }
    }

    /// Streams the current entry's content (holes of a sparse entry as zeros) into `sink`.
    fn content(
        &mut self,
        raw: &RawEntry,
        cancelled: &dyn Fn() -> bool,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<(), AuditError>,
    ) -> Result<u64, AuditError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.content_with(raw, cancelled, sink, &mut buf);
        self.buf = buf;
        r
    }

    fn content_with(
        &mut self,
        raw: &RawEntry,
        cancelled: &dyn Fn() -> bool,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<(), AuditError>,
        buf: &mut [u8],
    ) -> Result<u64, AuditError> {
        match &raw.sparse {
            None => {
                let size = raw.header.entry_size().map_err(|e| self.read_err(e))?;
                self.copy_data(size, buf, cancelled, sink)?;
                Ok(size)
            }
            Some((segments, real)) => {
                let mut pos = 0u64;
                for &(off, len) in segments {
                    if off > pos {
                        sink(Chunk::Zeros(off - pos))?;
                    }
                    self.copy_data(len, buf, cancelled, sink)?;
                    pos = off + len;
                }
                if *real > pos {
                    sink(Chunk::Zeros(real - pos))?;
                }
                Ok(*real)
            }
        }
    }

    /// Passes the next `n` data bytes of the current entry to `sink`.
    fn copy_data(
        &mut self,
        mut n: u64,
        buf: &mut [u8],
        cancelled: &dyn Fn() -> bool,
        sink: &mut dyn FnMut(Chunk<'_>) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        while n > 0 {
            if cancelled() {
                return Err(AuditError::Cancelled);
            }
            let want = (n as usize).min(buf.len());
            let got = self
                .tar
                .read_data(&mut buf[..want])
                .map_err(|e| self.read_err(e))?;
            if got == 0 {
                return Err(self.read_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "entry data ends early",
                )));
            }
            sink(Chunk::Data(&buf[..got]))?;
            n -= got as u64;
        }
        Ok(())
    }

    /// The next entry with its content hashed, or None at the end of the archive.
    fn next(&mut self, cancelled: &dyn Fn() -> bool) -> Result<Option<Entry>, AuditError> {
        if cancelled() {
            return Err(AuditError::Cancelled);
        }
        let Some((raw, key)) = self.raw()? else {
            return Ok(None);
        };
        let (parent, name) = split_parent(&key);
        if name == OPQ {
            return Err(self.format(
                &key,
                "an opaque marker that does not follow its own directory entry",
            ));
        }
        if let Some(deleted) = name.strip_prefix(WH) {
            if deleted.is_empty() {
                return Err(self.format(&key, "a whiteout without a name"));
            }
            let path = join(parent, deleted);
            self.check_order(&key)?;
            self.entries += 1;
            return Ok(Some(Entry {
                key,
                path,
                body: Body::Whiteout,
            }));
        }
        self.check_order(&key)?;
        let body = Body::Node(self.node(&raw, &key, cancelled)?);
        self.entries += 1;
        let mut entry = Entry {
            path: key.clone(),
            key,
            body,
        };
        // The opaque marker strata (and Docker) writes right after its directory.
        if let Body::Node(n) = &mut entry.body
            && n.kind == EntryKind::Dir
            && let Some((next, next_key)) = self.raw()?
        {
            if split_parent(&next_key) == (entry.path.as_slice(), OPQ) {
                n.opaque = true;
            } else {
                self.peeked = Some((next, next_key));
            }
        }
        Ok(Some(entry))
    }

    fn check_order(&mut self, key: &[u8]) -> Result<(), AuditError> {
        if let Some(last) = &self.last_key
            && path_cmp(last, key) != std::cmp::Ordering::Less
        {
            return Err(AuditError::Unsorted {
                layer: self.layer,
                path: ByteName::new(key),
                previous: ByteName::new(last.clone()),
            });
        }
        self.last_key = Some(key.to_vec());
        Ok(())
    }

    fn node(
        &mut self,
        raw: &RawEntry,
        key: &[u8],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Node, AuditError> {
        let kind = match raw.kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => EntryKind::File,
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => EntryKind::Symlink,
            EntryType::Link => EntryKind::Hardlink,
            EntryType::Char => EntryKind::Char,
            EntryType::Block => EntryKind::Block,
            EntryType::Fifo => EntryKind::Fifo,
            other => {
                return Err(
                    self.format(key, format!("tar entry type {:?}", other.as_byte() as char))
                );
            }
        };
        let mode = raw.header.mode().map_err(|e| self.read_err(e))? & 0o7777;
        let (mut size, mut content) = (None, None);
        if kind == EntryKind::File {
            let mut h = blake3::Hasher::new();
            let n = self.content(raw, cancelled, &mut |c| {
                match c {
                    Chunk::Data(d) => {
                        h.update(d);
                    }
                    Chunk::Zeros(mut n) => {
                        while n > 0 {
                            let k = (n as usize).min(ZEROS.len());
                            h.update(&ZEROS[..k]);
                            n -= k as u64;
                        }
                    }
                }
                Ok(())
            })?;
            size = Some(n);
            content = Some(h.finalize());
        }
        let link = match kind {
            EntryKind::Symlink => Some(raw.link.clone().unwrap_or_default()),
            EntryKind::Hardlink => Some(normalise(raw.link.as_deref().unwrap_or_default())),
            _ => None,
        };
        let device = match kind {
            EntryKind::Char | EntryKind::Block => {
                let major = raw.header.device_major().map_err(|e| self.read_err(e))?;
                let minor = raw.header.device_minor().map_err(|e| self.read_err(e))?;
                Some((major.unwrap_or(0), minor.unwrap_or(0)))
            }
            _ => None,
        };
        let mut xattrs = raw.xattrs.clone();
        xattrs.sort();
        Ok(Node {
            kind,
            mode,
            uid: raw.uid,
            gid: raw.gid,
            mtime: raw.mtime,
            size,
            content,
            link,
            device,
            xattrs,
            opaque: false,
        })
    }
}

/// What one side has at a path, for one-sided and paired reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Absent,
    Whiteout,
    Node(EntryKind, bool),
}

fn side_of(body: &Body) -> Side {
    match body {
        Body::Whiteout => Side::Whiteout,
        Body::Node(n) => Side::Node(n.kind, n.opaque),
    }
}

/// The change between what A and B have at a path when at most one of them writes it.
fn presence_change(a: Side, b: Side) -> Option<Change> {
    match (a, b) {
        (Side::Node(..), Side::Node(..)) => None,
        (Side::Absent | Side::Whiteout, Side::Node(kind, opaque)) => Some(Change::Added {
            kind,
            opaque,
            over_whiteout: a == Side::Whiteout,
        }),
        (Side::Node(kind, _), Side::Absent) => Some(Change::Removed {
            kind: Some(kind),
            by_whiteout: false,
        }),
        (Side::Node(kind, _), Side::Whiteout) => Some(Change::Removed {
            kind: Some(kind),
            by_whiteout: true,
        }),
        (Side::Absent, Side::Whiteout) => Some(Change::Removed {
            kind: None,
            by_whiteout: true,
        }),
        (Side::Whiteout, Side::Absent) => Some(Change::WhiteoutDropped),
        (Side::Absent, Side::Absent) | (Side::Whiteout, Side::Whiteout) => None,
    }
}

fn opt<T>(v: &Option<T>, show: impl Fn(&T) -> String) -> String {
    v.as_ref().map(show).unwrap_or_else(|| "(none)".into())
}

fn show_time(t: i64) -> String {
    if t >= 0 {
        let st = UNIX_EPOCH + Duration::from_secs(t as u64);
        format!("{t} ({})", humantime::format_rfc3339_seconds(st))
    } else {
        t.to_string()
    }
}

/// An xattr value: quoted text when it is printable UTF-8, else hex.
fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(|c| c.is_control()) => format!("{s:?}"),
        _ => {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

fn xattr_field(a: &[(Vec<u8>, Vec<u8>)], b: &[(Vec<u8>, Vec<u8>)]) -> Option<Field> {
    let mut names: Vec<&[u8]> = Vec::new();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let get = |list: &[(Vec<u8>, Vec<u8>)], n: &[u8]| -> Option<Vec<u8>> {
        list.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    };
    let mut all: Vec<&[u8]> = a.iter().chain(b).map(|(k, _)| k.as_slice()).collect();
    all.sort();
    all.dedup();
    for n in all {
        let (va, vb) = (get(a, n), get(b, n));
        if va != vb {
            names.push(n);
            let show = |v: &Option<Vec<u8>>| {
                v.as_ref()
                    .map(|v| format!("{}={}", ByteName::new(n), show_value(v)))
            };
            before.extend(show(&va));
            after.extend(show(&vb));
        }
    }
    if names.is_empty() {
        return None;
    }
    let text = |v: Vec<String>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(" ")
        }
    };
    Some(Field {
        name: FieldName::Xattrs,
        before: text(before),
        after: text(after),
        xattr_names: names.into_iter().map(ByteName::new).collect(),
    })
}

/// The fields that differ between two entries at the same path. When the type differs, the
/// type-specific fields (content, size, link target, device) are implied and not listed.
fn node_fields(a: &Node, b: &Node) -> Vec<Field> {
    let mut out = Vec::new();
    let mut push = |name: FieldName, before: String, after: String| {
        out.push(Field {
            name,
            before,
            after,
            xattr_names: Vec::new(),
        })
    };
    let same_kind = a.kind == b.kind;
    if !same_kind {
        push(FieldName::Kind, a.kind.to_string(), b.kind.to_string());
    }
    if same_kind && a.content != b.content {
        let show = |h: &blake3::Hash| format!("blake3:{}", h.to_hex());
        push(
            FieldName::Content,
            opt(&a.content, show),
            opt(&b.content, show),
        );
    }
    if same_kind && a.size != b.size {
        let show = |s: &u64| s.to_string();
        push(FieldName::Size, opt(&a.size, show), opt(&b.size, show));
    }
    if a.mode != b.mode {
        push(
            FieldName::Mode,
            format!("{:04o}", a.mode),
            format!("{:04o}", b.mode),
        );
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        push(
            FieldName::Owner,
            format!("{}:{}", a.uid, a.gid),
            format!("{}:{}", b.uid, b.gid),
        );
    }
    let xattrs = xattr_field(&a.xattrs, &b.xattrs);
    if a.mtime != b.mtime {
        push(FieldName::Mtime, show_time(a.mtime), show_time(b.mtime));
    }
    if same_kind && a.link != b.link {
        let show = |l: &Vec<u8>| ByteName::new(l.clone()).to_string();
        push(
            FieldName::LinkTarget,
            opt(&a.link, show),
            opt(&b.link, show),
        );
    }
    if same_kind && a.device != b.device {
        let show = |d: &(u32, u32)| format!("{},{}", d.0, d.1);
        push(
            FieldName::Device,
            opt(&a.device, show),
            opt(&b.device, show),
        );
    }
    if a.opaque != b.opaque {
        push(
            FieldName::Opaque,
            a.opaque.to_string(),
            b.opaque.to_string(),
        );
    }
    out.extend(xattrs);
    out.sort_by_key(|f| f.name);
    out
}

/// A one-sided entry waiting for the other layer's entry under its counterpart key (`d/x` for a
/// whiteout `d/.wh.x`, and the reverse), which the join has not reached yet.
struct Pending {
    path: Vec<u8>,
    in_first: bool,
    side: Side,
}

/// What A and B have at a path when only one of them (`in_first` says which) has `side` there.
fn one_side(in_first: bool, side: Side) -> (Side, Side) {
    if in_first {
        (side, Side::Absent)
    } else {
        (Side::Absent, side)
    }
}

/// The difference at `path` between what A and B have there (None when they agree).
fn presence_diff(path: Vec<u8>, (a, b): (Side, Side)) -> Option<FileDiff> {
    presence_change(a, b).map(|change| FileDiff {
        path: ByteName(path),
        change,
    })
}

/// The merge join's state besides the two streams: counts, the caller's sink, and the one-sided
/// entries waiting for their counterpart.
struct Join<F> {
    summary: DiffSummary,
    emit: F,
    /// Keyed by the counterpart's key (where the other layer's matching entry would be).
    pending: BTreeMap<PathKey, Pending>,
}

impl<F: FnMut(FileDiff)> Join<F> {
    fn out(&mut self, d: Option<FileDiff>) {
        if let Some(d) = d {
            self.summary.count(&d);
            (self.emit)(d);
        }
    }

    /// Reports the pending entries whose counterpart key sorts before `at` (None: all of them):
    /// the join has passed that key, so they have no counterpart.
    fn flush(&mut self, at: Option<&[u8]>) {
        while let Some(entry) = self.pending.first_entry() {
            if at.is_some_and(|at| path_cmp(&entry.key().0, at) != std::cmp::Ordering::Less) {
                break;
            }
            let p = entry.remove();
            self.out(presence_diff(p.path, one_side(p.in_first, p.side)));
        }
    }

    /// An entry only one layer has under its key: paired with a pending entry of the other
    /// layer for the same path, kept pending until its counterpart key, or reported as is.
    fn one_sided(&mut self, e: Entry, in_first: bool) {
        let side = side_of(&e.body);
        if let Some(p) = self.pending.remove(&PathKey(e.key.clone())) {
            if p.in_first != in_first {
                let sides = if in_first {
                    (side, p.side)
                } else {
                    (p.side, side)
                };
                self.out(presence_diff(e.path, sides));
                return;
            }
            // A path and its whiteout in one layer (not strata's format): report both.
            self.out(presence_diff(p.path, one_side(p.in_first, p.side)));
        }
        let counterpart = match e.body {
            Body::Whiteout => Some(e.path.clone()),
            Body::Node(_) => whiteout_key(&e.path),
        };
        match counterpart {
            Some(c) if path_cmp(&c, &e.key) == std::cmp::Ordering::Greater => {
                let p = Pending {
                    path: e.path,
                    in_first,
                    side,
                };
                self.pending.insert(PathKey(c), p);
            }
            _ => self.out(presence_diff(e.path, one_side(in_first, side))),
        }
    }
}

/// Compares two layers given as uncompressed tar streams (`first` = A, `second` = B), calling
/// `emit` for every path that differs, and returns the counts. Both streams must be in
/// [`path_cmp`] order (as strata packs them); entries are read once, in step, so memory does not
/// grow with the layers. `cancelled` is polled between entries and every MiB of data.
pub fn diff_layers<A: Read, B: Read>(
    first: A,
    second: B,
    cancelled: &dyn Fn() -> bool,
    emit: impl FnMut(FileDiff),
) -> Result<DiffSummary, AuditError> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let mut sa = LayerStream::new(first, "first");
    let mut sb = LayerStream::new(second, "second");
    let mut join = Join {
        summary: DiffSummary::default(),
        emit,
        pending: BTreeMap::new(),
    };
    let mut a = sa.next(cancelled)?;
    let mut b = sb.next(cancelled)?;
    loop {
        let ord = match (&a, &b) {
            (None, None) => break,
            (Some(x), Some(y)) => path_cmp(&x.key, &y.key),
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
        };
        let at = if ord == Greater { &b } else { &a };
        join.flush(at.as_ref().map(|e| e.key.as_slice()));
        match ord {
            Equal => {
                if let (Some(x), Some(y)) = (a.take(), b.take())
                    && let (Body::Node(na), Body::Node(nb)) = (&x.body, &y.body)
                {
                    let fields = node_fields(na, nb);
                    if !fields.is_empty() {
                        join.out(Some(FileDiff {
                            path: ByteName(x.path),
                            change: Change::Changed { fields },
                        }));
                    }
                }
                a = sa.next(cancelled)?;
                b = sb.next(cancelled)?;
            }
            Less => {
                if let Some(x) = a.take() {
                    join.one_sided(x, true);
                }
                a = sa.next(cancelled)?;
            }
            Greater => {
                if let Some(y) = b.take() {
                    join.one_sided(y, false);
                }
                b = sb.next(cancelled)?;
            }
        }
    }
    join.flush(None);
    let mut summary = join.summary;
    summary.first_entries = sa.entries;
    summary.second_entries = sb.entries;
    Ok(summary)
}

/// [`diff_layers`] collecting every difference (memory grows with the number of differences,
/// not with the layers).
pub fn diff_layers_all<A: Read, B: Read>(
    first: A,
    second: B,
    cancelled: &dyn Fn() -> bool,
) -> Result<LayerDiff, AuditError> {
    let mut files = Vec::new();
    let summary = diff_layers(first, second, cancelled, |d| files.push(d))?;
    Ok(LayerDiff { files, summary })
}

/// What [`extract_file`] found at the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "found", rename_all = "snake_case")]
pub enum Extracted {
    /// A regular file: its bytes (holes written as holes) are now at the destination.
    File { size: u64 },
    /// A hardlink to an earlier path of the layer: nothing written; extract `target` instead
    /// (from a fresh stream of the same layer).
    Hardlink { target: ByteName },
    /// Not a regular file (its type is given); nothing written.
    Other { kind: EntryKind },
}

/// Streams `layer` (an uncompressed strata layer tar) up to `path` (relative, as in
/// [`FileDiff::path`]) and writes that file's content to `dest` (through a temp file in the
/// same folder and a rename, so `dest` is never half written). Stops reading at the path.
pub fn extract_file(
    layer: impl Read,
    path: &[u8],
    dest: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<Extracted, AuditError> {
    let want = normalise(path);
    let mut s = LayerStream::new(layer, "given");
    loop {
        if cancelled() {
            return Err(AuditError::Cancelled);
        }
        let Some((raw, key)) = s.raw()? else {
            return Err(AuditError::NotFound {
                path: ByteName(want),
            });
        };
        if split_parent(&key).1 == OPQ {
            // Right after its directory, so out of path order: not a file anyway.
            continue;
        }
        s.check_order(&key)?;
        match path_cmp(&key, &want) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Greater => {
                return Err(AuditError::NotFound {
                    path: ByteName(want),
                });
            }
            std::cmp::Ordering::Equal => {}
        }
        return match raw.kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = write_content(&mut s, &raw, dest, cancelled)?;
                Ok(Extracted::File { size })
            }
            EntryType::Link => Ok(Extracted::Hardlink {
                target: ByteName(normalise(raw.link.as_deref().unwrap_or_default())),
            }),
            _ => Ok(Extracted::Other {
                kind: s.node(&raw, &key, cancelled)?.kind,
            }),
        };
    }
}

fn write_content<R: Read>(
    s: &mut LayerStream<R>,
    raw: &RawEntry,
    dest: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<u64, AuditError> {
    let werr = |e: io::Error| AuditError::Write {
        path: dest.to_path_buf(),
        source: e,
    };
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".strata-extract.")
        .tempfile_in(&dir)
        .map_err(werr)?;
    let size = {
        let f: &mut File = tmp.as_file_mut();
        s.content(raw, cancelled, &mut |c| match c {
            Chunk::Data(d) => f.write_all(d).map_err(werr),
            Chunk::Zeros(n) => {
                let n = i64::try_from(n).map_err(|_| werr(io::Error::other("hole too large")))?;
                f.seek(SeekFrom::Current(n)).map(|_| ()).map_err(werr)
            }
        })?
    };
    tmp.as_file().set_len(size).map_err(werr)?;
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    Ok(size)
}

/// The `diffoscope` executable on `PATH`, if there is one.
fn find_diffoscope() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("diffoscope"))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `diffoscope --text - A B` when diffoscope is on `PATH`: its text report (empty when the
/// files are the same), or None when diffoscope is not installed. `cancelled` is polled while
/// it runs; a cancel kills it.
pub fn diffoscope(
    a: &Path,
    b: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<String>, AuditError> {
    let Some(exe) = find_diffoscope() else {
        return Ok(None);
    };
    let fail = |what: String| AuditError::Diffoscope {
        a: a.to_path_buf(),
        b: b.to_path_buf(),
        what,
    };
    // Output to temp files: no pipe to drain while polling for cancellation.
    let out = tempfile::tempfile().map_err(|e| fail(format!("no temp file: {e}")))?;
    let err = tempfile::tempfile().map_err(|e| fail(format!("no temp file: {e}")))?;
    let mut child = Command::new(&exe)
        .arg("--no-progress")
        .arg("--text")
        .arg("-")
        .arg("--")
        .arg(a.as_os_str())
        .arg(b.as_os_str())
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| fail(e.to_string()))?)
        .stderr(err.try_clone().map_err(|e| fail(e.to_string()))?)
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", exe.display())))?;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| fail(e.to_string()))? {
            break st;
        }
        if cancelled() {
            // Ignore errors: it may have exited between the two calls.
            let _ = child.kill();
            let _ = child.wait();
            return Err(AuditError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read_all = |mut f: File| -> Result<String, AuditError> {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut v))
            .map_err(|e| fail(format!("cannot read its output: {e}")))?;
        Ok(String::from_utf8_lossy(&v).into_owned())
    };
    match status.code() {
        Some(0) | Some(1) => Ok(Some(read_all(out)?)),
        _ => {
            let stderr = read_all(err)?;
            let last = stderr.lines().last().unwrap_or("").to_string();
            Err(fail(format!("{status}: {last}")))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Layers packed by `crate::layer::pack` from real temp trees (root needed for owners and
    //! device nodes), decompressed, and compared.

    use std::ffi::OsStr;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::layer::{Changeset, PackOptions, Scan, ScanOptions, diff, pack, scan};

    const T: i64 = 1_600_000_000;

    fn is_root() -> bool {
        // SAFETY: no arguments, no side effects.
        unsafe { libc::geteuid() == 0 }
    }

    fn never() -> bool {
        false
    }

    use crate::layer::tests::{mknod as mknod_dev, set_mtime};

    fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
        mknod_dev(p, mode, libc::makedev(major, minor));
    }

    /// Every mtime under `root` set to `T`, deepest first.
    fn settle(root: &Path) {
        let mut paths: Vec<PathBuf> = walkdir::WalkDir::new(root)
            .into_iter()
            .map(|e| e.unwrap().into_path())
            .collect();
        paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in paths {
            set_mtime(&p, T);
        }
    }

    fn opts() -> PackOptions {
        PackOptions {
            workers: 1,
            ..PackOptions::default()
        }
    }

    fn unzstd(blob: &[u8]) -> Vec<u8> {
        zstd::decode_all(blob).unwrap()
    }

    /// The whole tree as one layer (uncompressed tar).
    fn full_layer(root: &Path) -> Vec<u8> {
        let s = scan(root, &ScanOptions::default()).unwrap();
        let mut out = Vec::new();
        pack(root, &Changeset::full(&s), &mut out, &opts()).unwrap();
        unzstd(&out)
    }

    /// The change of `root` since `before` as a layer (uncompressed tar).
    fn change_layer(root: &Path, before: &Scan) -> Vec<u8> {
        let after = scan(root, &ScanOptions::default()).unwrap();
        let mut out = Vec::new();
        pack(root, &diff(before, &after), &mut out, &opts()).unwrap();
        unzstd(&out)
    }

    fn compare(a: &[u8], b: &[u8]) -> LayerDiff {
        diff_layers_all(a, b, &never).unwrap()
    }

    fn w(p: &Path, data: &[u8]) {
        fs::write(p, data).unwrap();
    }

    /// A small tree with every entry type: dirs, files, an xattr, a symlink, a hardlink, a FIFO,
    /// device nodes, a sparse file and a non-UTF-8 name.
    fn make_tree(root: &Path) {
        fs::create_dir_all(root.join("etc/ssl")).unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::create_dir_all(root.join("var/lib")).unwrap();
        w(&root.join("etc/hostname"), b"strata\n");
        xattr::set(root.join("etc/hostname"), "user.comment", b"hello").unwrap();
        fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o644)).unwrap();
        // gzip carries the data, zcat is its hardlink; other has the same bytes, its own inode.
        w(&root.join("usr/bin/gzip"), b"gzip body");
        fs::hard_link(root.join("usr/bin/gzip"), root.join("usr/bin/zcat")).unwrap();
        w(&root.join("usr/bin/other"), b"gzip body");
        symlink("../usr/bin/gzip", root.join("etc/gz")).unwrap();
        mknod(&root.join("dev/null"), libc::S_IFCHR | 0o666, 1, 3);
        mknod(&root.join("dev/sda"), libc::S_IFBLK | 0o660, 8, 0);
        mknod(&root.join("dev/fifo"), libc::S_IFIFO | 0o600, 0, 0);
        // 1 MiB: data, a 512 KiB hole, data (packed as GNU sparse).
        let mut sparse = vec![0u8; 1 << 20];
        sparse[..100].fill(7);
        sparse[(1 << 20) - 100..].fill(9);
        w(&root.join("var/lib/sparse.img"), &sparse);
        w(
            &root.join(OsStr::from_bytes(b"etc/caf\xe9")),
            b"latin-1 name",
        );
        settle(root);
    }

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        make_tree(&a);
        make_tree(&b);
        (t, a, b)
    }

    #[test]
    fn identical_trees_have_no_differences() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        let (_t, a, b) = pair();
        let (la, lb) = (full_layer(&a), full_layer(&b));
        let d = compare(&la, &lb);
        assert!(d.files.is_empty(), "{d}");
        assert_eq!(d.summary.first_entries, d.summary.second_entries);
        // root, etc, etc/caf\xe9, etc/gz, etc/hostname, etc/ssl, dev + 3, usr, usr/bin + 3, var,
        // var/lib, var/lib/sparse.img
        assert_eq!(d.summary.first_entries, 18);
        // The sparse file really is stored sparse, so holes were expanded to compare it.
        assert!(la.len() < 512 * 1024, "layer of {} bytes", la.len());
    }

    /// Applies `change` to the second tree only and returns the differences.
    fn one_change(change: impl FnOnce(&Path)) -> LayerDiff {
        let (_t, a, b) = pair();
        change(&b);
        compare(&full_layer(&a), &full_layer(&b))
    }

    fn assert_only(d: &LayerDiff, path: &[u8], want: &[FieldName]) -> Field {
        assert_eq!(d.files.len(), 1, "{d}");
        assert_eq!(d.files[0].path.as_bytes(), path, "{d}");
        assert_eq!(d.files[0].field_names(), want, "{d}");
        match &d.files[0].change {
            Change::Changed { fields } => fields[0].clone(),
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn each_attribute_change_alone_is_reported_as_exactly_that_field() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        use FieldName as F;
        let host = b"etc/hostname";
        let d = one_change(|b| {
            w(&b.join("etc/hostname"), b"strbta\n");
            set_mtime(&b.join("etc/hostname"), T);
        });
        let f = assert_only(&d, host, &[F::Content]);
        assert!(f.before.starts_with("blake3:") && f.before != f.after);

        let d = one_change(|b| {
            w(&b.join("etc/hostname"), b"strata-longer\n");
            set_mtime(&b.join("etc/hostname"), T);
        });
        let f = assert_only(&d, host, &[F::Content, F::Size]);
        assert_eq!(d.files[0].to_string().lines().count(), 3, "{d}");
        assert!(
            matches!(&d.files[0].change, Change::Changed { fields } if fields[1].before == "7" && fields[1].after == "14"),
            "{f:?}"
        );

        let d = one_change(|b| {
            fs::set_permissions(b.join("etc/hostname"), fs::Permissions::from_mode(0o4600))
                .unwrap();
        });
        let f = assert_only(&d, host, &[F::Mode]);
        assert_eq!((f.before.as_str(), f.after.as_str()), ("0644", "4600"));

        let d =
            one_change(|b| std::os::unix::fs::lchown(b.join("etc/gz"), Some(7), Some(8)).unwrap());
        let f = assert_only(&d, b"etc/gz", &[F::Owner]);
        assert_eq!((f.before.as_str(), f.after.as_str()), ("0:0", "7:8"));

        let d = one_change(|b| {
            xattr::set(b.join("etc/hostname"), "user.comment", b"bye").unwrap();
            xattr::set(b.join("etc/hostname"), "user.new", &[0u8, 1, 0x0a]).unwrap();
        });
        let f = assert_only(&d, host, &[F::Xattrs]);
        let names: Vec<String> = f.xattr_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["user.comment", "user.new"]);
        assert_eq!(f.before, "user.comment=\"hello\"");
        assert_eq!(f.after, "user.comment=\"bye\" user.new=0x00010a");

        let d = one_change(|b| set_mtime(&b.join("etc/hostname"), T + 1));
        let f = assert_only(&d, host, &[F::Mtime]);
        assert_eq!(f.before, "1600000000 (2020-09-13T12:26:40Z)");

        let d = one_change(|b| {
            fs::remove_file(b.join("etc/gz")).unwrap();
            symlink("../usr/bin/zcat", b.join("etc/gz")).unwrap();
            set_mtime(&b.join("etc/gz"), T);
            set_mtime(&b.join("etc"), T);
        });
        let f = assert_only(&d, b"etc/gz", &[F::LinkTarget]);
        assert_eq!(f.after, "../usr/bin/zcat");

        let d = one_change(|b| {
            fs::remove_file(b.join("dev/sda")).unwrap();
            mknod(&b.join("dev/sda"), libc::S_IFBLK | 0o660, 8, 16);
            set_mtime(&b.join("dev/sda"), T);
            set_mtime(&b.join("dev"), T);
        });
        let f = assert_only(&d, b"dev/sda", &[F::Device]);
        assert_eq!((f.before.as_str(), f.after.as_str()), ("8,0", "8,16"));

        // A type change lists only the type (content, size, target are implied).
        let d = one_change(|b| {
            fs::remove_file(b.join("etc/hostname")).unwrap();
            mknod(&b.join("etc/hostname"), libc::S_IFIFO | 0o644, 0, 0);
            set_mtime(&b.join("etc/hostname"), T);
            set_mtime(&b.join("etc"), T);
        });
        let f = assert_only(&d, host, &[F::Kind, F::Xattrs]);
        assert_eq!((f.before.as_str(), f.after.as_str()), ("file", "fifo"));

        // A non-UTF-8 name is matched by its bytes and shown escaped.
        let d = one_change(|b| {
            let p = b.join(OsStr::from_bytes(b"etc/caf\xe9"));
            w(&p, b"LATIN-1 NAME");
            set_mtime(&p, T);
        });
        assert_only(&d, b"etc/caf\xe9", &[F::Content]);
        assert!(
            d.to_string().starts_with("~ etc/caf\\xe9: content\n"),
            "{d}"
        );
    }

    #[test]
    fn hardlink_and_symlink_targets() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        // zcat links to gzip; in B it links to `other` (same bytes): only its target differs.
        let d = one_change(|b| {
            fs::remove_file(b.join("usr/bin/zcat")).unwrap();
            fs::hard_link(b.join("usr/bin/other"), b.join("usr/bin/zcat")).unwrap();
            set_mtime(&b.join("usr/bin"), T);
        });
        let f = assert_only(&d, b"usr/bin/zcat", &[FieldName::LinkTarget]);
        assert_eq!(
            (f.before.as_str(), f.after.as_str()),
            ("usr/bin/gzip", "usr/bin/other")
        );

        // A hardlink that becomes a file of its own is a type change.
        let d = one_change(|b| {
            fs::remove_file(b.join("usr/bin/zcat")).unwrap();
            w(&b.join("usr/bin/zcat"), b"gzip body");
            set_mtime(&b.join("usr/bin/zcat"), T);
            set_mtime(&b.join("usr/bin"), T);
        });
        let f = assert_only(&d, b"usr/bin/zcat", &[FieldName::Kind]);
        assert_eq!((f.before.as_str(), f.after.as_str()), ("hardlink", "file"));

        // Symlink target (alone) is covered above; a dangling one compares the same way.
        let d = one_change(|b| {
            fs::remove_file(b.join("etc/gz")).unwrap();
            symlink("/nowhere", b.join("etc/gz")).unwrap();
            set_mtime(&b.join("etc/gz"), T);
            set_mtime(&b.join("etc"), T);
        });
        let f = assert_only(&d, b"etc/gz", &[FieldName::LinkTarget]);
        assert_eq!(
            (f.before.as_str(), f.after.as_str()),
            ("../usr/bin/gzip", "/nowhere")
        );
    }

    #[test]
    fn sparse_content_is_compared_with_holes_expanded_and_extracted_as_is() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        let (t, a, b) = pair();
        // One byte in the middle of the hole: still sparse around it, different content.
        let p = b.join("var/lib/sparse.img");
        let mut data = fs::read(&p).unwrap();
        data[700_000] = 1;
        w(&p, &data);
        set_mtime(&p, T);
        let (la, lb) = (full_layer(&a), full_layer(&b));
        let d = compare(&la, &lb);
        let f = assert_only(&d, b"var/lib/sparse.img", &[FieldName::Content]);
        assert_eq!(
            f.after,
            format!("blake3:{}", blake3::hash(&data).to_hex()),
            "the digest is of the expanded bytes"
        );

        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let (ea, eb) = (out.join("a.img"), out.join("b.img"));
        let got = extract_file(&la[..], b"var/lib/sparse.img", &ea, &never).unwrap();
        assert_eq!(got, Extracted::File { size: 1 << 20 });
        extract_file(&lb[..], b"var/lib/sparse.img", &eb, &never).unwrap();
        assert_eq!(
            fs::read(&ea).unwrap(),
            fs::read(a.join("var/lib/sparse.img")).unwrap()
        );
        assert_eq!(fs::read(&eb).unwrap(), data);
        // The hole stays a hole (on file systems that have them).
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(&ea).unwrap();
        assert!(md.blocks() * 512 <= md.len(), "{} blocks", md.blocks());

        // Hardlinks name their target; other types are not written; absent paths are errors.
        let got = extract_file(&la[..], b"usr/bin/zcat", &out.join("x"), &never).unwrap();
        assert_eq!(
            got,
            Extracted::Hardlink {
                target: ByteName::new(&b"usr/bin/gzip"[..])
            }
        );
        let got = extract_file(&la[..], b"dev/null", &out.join("x"), &never).unwrap();
        assert_eq!(
            got,
            Extracted::Other {
                kind: EntryKind::Char
            }
        );
        assert!(!out.join("x").exists());
        let err = extract_file(&la[..], b"etc/nope", &out.join("x"), &never).unwrap_err();
        assert!(matches!(err, AuditError::NotFound { .. }), "{err}");

        match diffoscope(&ea, &eb, &never).unwrap() {
            None => eprintln!("diffoscope is not installed; its run is not checked"),
            Some(report) => {
                assert!(
                    report.contains("a.img") && report.contains("b.img"),
                    "{report}"
                )
            }
        }
        match diffoscope(&ea, &ea, &never).unwrap() {
            None => {}
            Some(report) => assert_eq!(report, "", "identical files have an empty report"),
        }
    }

    /// Two copies of a base tree, each scanned, changed its own way and packed as a layer.
    #[test]
    fn added_removed_whiteouts_and_opaque_directories() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let base = |root: &Path| {
            fs::create_dir_all(root.join("d/o")).unwrap();
            for n in [
                "-dash", "zed", "keep", "del-a", "del-b", "del-both", "zz-last",
            ] {
                w(&root.join("d").join(n), n.as_bytes());
            }
            w(&root.join("d/o/f"), b"in o");
            settle(root);
        };
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        base(&a);
        base(&b);
        let (sa, sb) = (
            scan(&a, &ScanOptions::default()).unwrap(),
            scan(&b, &ScanOptions::default()).unwrap(),
        );
        // A: deletes -dash, zed, del-a, del-both and zz-last (whose whiteout waits for a
        // counterpart past the end of both layers); rewrites o/f with the same bytes; adds only-a.
        for n in ["-dash", "zed", "del-a", "del-both", "zz-last"] {
            fs::remove_file(a.join("d").join(n)).unwrap();
        }
        w(&a.join("d/o/f"), b"in o");
        w(&a.join("d/only-a"), b"a");
        // B: rewrites -dash and zed (new bytes), deletes del-b and del-both, replaces the whole
        // directory o (same content: opaque), adds only-b.
        w(&b.join("d/-dash"), b"new");
        w(&b.join("d/zed"), b"new");
        fs::remove_file(b.join("d/del-b")).unwrap();
        fs::remove_file(b.join("d/del-both")).unwrap();
        // (renamed away before the new one is made, so the inode number cannot be reused)
        fs::rename(b.join("d/o"), b.join("old-o")).unwrap();
        fs::create_dir(b.join("d/o")).unwrap();
        fs::remove_dir_all(b.join("old-o")).unwrap();
        w(&b.join("d/o/f"), b"in o");
        w(&b.join("d/only-b"), b"b");
        for root in [&a, &b] {
            for p in [
                "d/o/f", "d/o", "d/-dash", "d/zed", "d/only-a", "d/only-b", "d", "",
            ] {
                if root.join(p).exists() {
                    set_mtime(&root.join(p), T);
                }
            }
        }
        let (la, lb) = (change_layer(&a, &sa), change_layer(&b, &sb));
        let d = compare(&la, &lb);
        let mut got: Vec<(String, Change)> = d
            .files
            .iter()
            .map(|f| (f.path.to_string(), f.change.clone()))
            .collect();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        let file = EntryKind::File;
        let want = vec![
            (
                "d/-dash".to_string(),
                Change::Added {
                    kind: file,
                    opaque: false,
                    over_whiteout: true,
                },
            ),
            ("d/del-a".into(), Change::WhiteoutDropped),
            (
                "d/del-b".into(),
                Change::Removed {
                    kind: None,
                    by_whiteout: true,
                },
            ),
            (
                "d/o".into(),
                Change::Changed {
                    fields: vec![Field {
                        name: FieldName::Opaque,
                        before: "false".into(),
                        after: "true".into(),
                        xattr_names: vec![],
                    }],
                },
            ),
            (
                "d/only-a".into(),
                Change::Removed {
                    kind: Some(file),
                    by_whiteout: false,
                },
            ),
            (
                "d/only-b".into(),
                Change::Added {
                    kind: file,
                    opaque: false,
                    over_whiteout: false,
                },
            ),
            (
                "d/zed".into(),
                Change::Added {
                    kind: file,
                    opaque: false,
                    over_whiteout: true,
                },
            ),
            ("d/zz-last".into(), Change::WhiteoutDropped),
        ];
        assert_eq!(got, want, "{d}");
        assert_eq!(
            (
                d.summary.added,
                d.summary.removed,
                d.summary.whiteout_dropped,
                d.summary.changed
            ),
            (3, 2, 2, 1)
        );
        // The other way round, each change is mirrored.
        let r = compare(&lb, &la);
        let mut back: Vec<(String, Change)> = r
            .files
            .iter()
            .map(|f| (f.path.to_string(), f.change.clone()))
            .collect();
        back.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            back[0],
            (
                "d/-dash".to_string(),
                Change::Removed {
                    kind: Some(file),
                    by_whiteout: true
                }
            ),
            "{r}"
        );
        assert_eq!(
            back[2],
            ("d/del-b".to_string(), Change::WhiteoutDropped),
            "{r}"
        );
        assert_eq!(r.summary.differences(), 8);
    }

    #[test]
    fn text_and_json_forms() {
        let d = LayerDiff {
            files: vec![
                FileDiff {
                    path: ByteName::new(&b"etc/a\xff"[..]),
                    change: Change::Added {
                        kind: EntryKind::Dir,
                        opaque: true,
                        over_whiteout: false,
                    },
                },
                FileDiff {
                    path: ByteName::new(&b"etc/b"[..]),
                    change: Change::Removed {
                        kind: None,
                        by_whiteout: true,
                    },
                },
                FileDiff {
                    path: ByteName::new(&b"etc/c"[..]),
                    change: Change::Changed {
                        fields: vec![Field {
                            name: FieldName::Mode,
                            before: "0644".into(),
                            after: "0600".into(),
                            xattr_names: vec![],
                        }],
                    },
                },
            ],
            summary: DiffSummary {
                first_entries: 4,
                second_entries: 5,
                added: 1,
                removed: 1,
                whiteout_dropped: 0,
                changed: 1,
            },
        };
        let text = d.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "+ etc/a\\xff [dir, opaque]",
                "- etc/b [the second layer deletes it]",
                "~ etc/c: mode",
                "    mode: 0644 -> 0600",
            ]
        );
        assert!(lines[4].starts_with("3 differences (1 added, 1 removed, 1 changed"));
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(
            json["files"][0],
            serde_json::json!({"path": "etc/a\\xff", "change": "added", "kind": "dir", "opaque": true})
        );
        assert_eq!(
            json["files"][1],
            serde_json::json!({"path": "etc/b", "change": "removed", "kind": null, "by_whiteout": true})
        );
        assert_eq!(
            json["files"][2]["fields"][0],
            serde_json::json!({"name": "mode", "before": "0644", "after": "0600"})
        );
        let back: LayerDiff = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn unsorted_and_foreign_streams_are_typed_errors() {
        let tar_of = |names: &[&str]| {
            let mut b = tar::Builder::new(Vec::new());
            for n in names {
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, n, &[][..]).unwrap();
            }
            b.into_inner().unwrap()
        };
        let good = tar_of(&["a", "b"]);
        let bad = tar_of(&["b", "a"]);
        let err = diff_layers_all(&good[..], &bad[..], &never).unwrap_err();
        assert!(
            matches!(&err, AuditError::Unsorted { layer: "second", path, .. } if path.as_bytes() == b"a"),
            "{err}"
        );
        let stray = tar_of(&["a", "b/.wh..wh..opq"]);
        let err = diff_layers_all(&stray[..], &good[..], &never).unwrap_err();
        assert!(
            matches!(err, AuditError::Format { layer: "first", .. }),
            "{err}"
        );
        let err = diff_layers_all(&b"not a tar at all"[..], &good[..], &never).unwrap_err();
        assert!(matches!(err, AuditError::Read { .. }), "{err}");
        // An empty stream is an empty layer.
        let d = diff_layers_all(&[][..], &good[..], &never).unwrap();
        assert_eq!(d.summary.added, 2);
    }

    /// A generated tree of many files, most identical: streamed, counted, and cancellable.
    #[test]
    fn large_generated_layers_stream() {
        if !is_root() {
            eprintln!("skipping: needs root (device nodes, owners)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let gen_tree = |root: &Path, variant: bool| {
            for d in 0..200 {
                let dir = root.join(format!("d{d:03}"));
                fs::create_dir_all(&dir).unwrap();
                for f in 0..100 {
                    let n = d * 100 + f;
                    let mut body = format!("file {n}\n").repeat(1 + n % 50).into_bytes();
                    if variant && n % 97 == 0 {
                        body.push(b'!');
                    }
                    w(&dir.join(format!("f{f:03}")), &body);
                }
                if variant && d % 50 == 0 {
                    w(&dir.join("extra"), b"x");
                }
            }
            settle(root);
        };
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        gen_tree(&a, false);
        gen_tree(&b, true);
        let (la, lb) = (full_layer(&a), full_layer(&b));
        let mut seen = 0u64;
        let s = diff_layers(&la[..], &lb[..], &never, |d| {
            seen += 1;
            assert!(
                matches!(d.change, Change::Added { .. })
                    || d.field_names() == [FieldName::Content, FieldName::Size],
                "{d}"
            );
        })
        .unwrap();
        let changed = (0..20_000).filter(|n| n % 97 == 0).count() as u64;
        assert_eq!((s.changed, s.added, s.removed), (changed, 4, 0));
        assert_eq!(seen, s.differences());
        assert_eq!(s.first_entries, 1 + 200 + 20_000);
        assert_eq!(s.second_entries, s.first_entries + 4);

        let calls = std::cell::Cell::new(0u32);
        let stop_later = || {
            calls.set(calls.get() + 1);
            calls.get() > 1000
        };
        let err = diff_layers(&la[..], &lb[..], &stop_later, |_| {}).unwrap_err();
        assert!(matches!(err, AuditError::Cancelled), "{err}");
    }
}
