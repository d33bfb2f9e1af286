//! strata's own qcow2 writer: a raw image to a compressed (zlib or zstd) or plain qcow2 v2/v3,
//! deterministic, on every core, reusing the compressed clusters of the previous output.
//!
//! ```text
//! raw ──reader thread: chunks of clusters (holes found with SEEK_DATA/SEEK_HOLE are not read),
//!       at most CHUNKS_IN_FLIGHT ahead of the writer (bounded memory)
//!     ──rayon pool, a task per chunk, per cluster: all zero? → unallocated
//!                                blake3 → in the previous ClusterMap? → its stored bytes, read
//!                                          from the previous qcow2 and checked against their hash
//!                                otherwise compress (raw deflate, 4 KiB window | zstd level 3);
//!                                not smaller than the cluster → stored uncompressed
//!     ──writer thread, chunks put back in order: the data area from host cluster 1 (compressed
//!       clusters packed byte after byte, uncompressed ones cluster-aligned)
//! end: L2 tables, L1 table, refcount blocks, refcount table, then the header in cluster 0
//!      ──► a locked .strata-out.* temp file beside dest ──rename──► dest;  + the ClusterMap
//! ```
//!
//! The layout is a pure function of the raw bytes and the options (compression is the same
//! per-cluster function whether it ran now or in the build that made the previous output), so
//! two writes give the same bytes with any thread count, and an incremental write equals a full
//! one. Every host cluster is referenced, so `qemu-img check` finds no leak.
//!
//! What qemu does that this copies: all-zero clusters stay unallocated (`qemu-img convert`
//! skips them); a compressed cluster whose deflate/zstd form needs `cluster_size` bytes or more
//! is written uncompressed; zlib clusters are raw deflate with `windowBits -12`, level 6,
//! `memLevel 9` (qcow2-threads.c); a last partial cluster is padded with zeros; the virtual size
//! is the raw size rounded up to 512 bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};

use rayon::prelude::*;

/// The qcow2 format version (`compat=0.10` is 2, `compat=1.1` is 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Version {
    V2,
    V3,
}

/// How data clusters are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain data clusters (`qemu-img convert` without `-c`); the header says zlib.
    None,
    /// Raw deflate, 4 KiB window (qcow2 compression type 0).
    Zlib,
    /// zstd level 3 (qcow2 compression type 1, v3 only).
    Zstd,
}

/// What the writer makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Options {
    pub version: Qcow2Version,
    /// log2 of the cluster size: 9 (512 B) ..= 21 (2 MiB); qemu's default is 16 (64 KiB).
    pub cluster_bits: u32,
    pub compression: Compression,
    /// Compression threads; 0 means one per available core. The output does not depend on it.
    pub threads: usize,
}

impl Default for Qcow2Options {
    /// What `qemu-img convert -c -O qcow2` makes without `-o`: v3, 64 KiB clusters, zlib.
    fn default() -> Self {
        Qcow2Options {
            version: Qcow2Version::V3,
            cluster_bits: 16,
            compression: Compression::Zlib,
            threads: 0,
        }
    }
}

impl Qcow2Options {
    /// Refuses what qcow2 (or qemu) cannot open: cluster sizes outside 512 B..2 MiB, zstd in v2.
    pub fn validate(&self) -> Result<(), Qcow2Error> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Qcow2Error::Options(format!(
                "cluster_bits {} is outside 9..=21 (cluster sizes 512 B to 2 MiB)",
                self.cluster_bits
            )));
        }
        if self.version == Qcow2Version::V2 && self.compression == Compression::Zstd {
            return Err(Qcow2Error::Options(
                "zstd compression needs qcow2 version 3 (compat=1.1)".into(),
            ));
        }
        Ok(())
    }
}

/// The result of [`parse_qemu_img_options`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedOptions {
    /// The native writer makes exactly this.
    Native(Qcow2Options),
    /// Something the native writer does not implement (or qemu-img would refuse with its own
    /// message): call `qemu-img convert` instead.
    FallBack { reason: String },
}

/// Reads qemu-img `-o` option text (dib's `QEMU_IMG_OPTIONS`, e.g. `compat=0.10,cluster_size=128k`)
/// for a qcow2 output, `compress` being `-c` (strata's default; `-u` turns it off).
///
/// Only `compat` (`0.10`/`v2`, `1.1`/`v3`), `cluster_size` (bytes, or with a `k`/`M` suffix; a
/// power of two from 512 to 2M) and `compression_type` (`zlib`, `zstd`) are native; any other
/// key, value or syntax (`,,` escapes, a key without `=`, an empty item, a repeated key) falls
/// back to qemu-img, which then also reports what it finds wrong.
pub fn parse_qemu_img_options(text: Option<&str>, compress: bool) -> ParsedOptions {
    let fall_back = |reason: String| ParsedOptions::FallBack { reason };
    let mut opts = Qcow2Options {
        compression: if compress {
            Compression::Zlib
        } else {
            Compression::None
        },
        ..Qcow2Options::default()
    };
    let mut zstd = false;
    let text = text.map(str::trim).unwrap_or("");
    if !text.is_empty() {
        if text.contains(",,") {
            return fall_back(format!("qemu-img options {text:?} use a ,, escape"));
        }
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(',') {
            let Some((key, value)) = item.split_once('=') else {
                return fall_back(format!("qemu-img option {item:?} is not key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return fall_back(format!("qemu-img option {key} is given twice"));
            }
            seen.push(key);
            match (key, value) {
                ("compat", "0.10" | "v2") => opts.version = Qcow2Version::V2,
                ("compat", "1.1" | "v3") => opts.version = Qcow2Version::V3,
                ("compression_type", "zlib") => zstd = false,
                ("compression_type", "zstd") => zstd = true,
                ("cluster_size", v) => match parse_size(v) {
                    Some(size)
                        if size.is_power_of_two()
                            && (1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&size) =>
                    {
                        opts.cluster_bits = size.trailing_zeros();
                    }
                    _ => {
                        return fall_back(format!(
                            "cluster_size={v} is not a power of two from 512 to 2M"
                        ));
                    }
                },
                _ => {
                    return fall_back(format!(
                        "qemu-img option {key}={value} is not implemented by the native writer"
                    ));
                }
            }
        }
    }
    if zstd {
        if !compress {
            return fall_back("compression_type=zstd on an uncompressed image".into());
        }
        if opts.version == Qcow2Version::V2 {
            return fall_back("compression_type=zstd needs compat=1.1".into());
        }
        opts.compression = Compression::Zstd;
    }
    ParsedOptions::Native(opts)
}

/// qemu's size syntax, the common part: digits with an optional `b`, `k` or `m` suffix.
fn parse_size(v: &str) -> Option<u64> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'b' | b'B' => (&v[..v.len() - 1], 0),
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        _ => (v, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Errors of the qcow2 writer and of reading a [`ClusterMap`].
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("qcow2 write cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qcow2 options: {0}")]
    Options(String),
    #[error("{raw}: {detail}")]
    TooLarge { raw: PathBuf, detail: String },
    #[error("compressing cluster {cluster} of {raw}: {detail}")]
    Compress {
        raw: PathBuf,
        cluster: u64,
        detail: String,
    },
    #[error("qcow2 cluster map refused ({0}); write without it (a full write)")]
    BadMap(String),
}

impl Qcow2Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Qcow2Error::Io {
            context: context.into(),
            source,
        }
    }
}

const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const SECTOR: u64 = 512;
/// L1/L2 "refcount is exactly one" flag (qcow2's OFLAG_COPIED).
const COPIED: u64 = 1 << 63;
/// L2 "compressed cluster" flag.
const COMPRESSED: u64 = 1 << 62;
/// qemu refuses L1 tables larger than 32 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Raw bytes read per chunk (at least; more for big clusters and many threads).
const CHUNK_BYTES: usize = 8 << 20;

/// One cluster of a previous output: the blake3 of its raw content, and where its stored
/// (compressed) bytes are in that qcow2 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapEntry {
    content: [u8; 32],
    /// Compression did not make it smaller: it is stored uncompressed (nothing to read back).
    raw: bool,
    offset: u64,
    len: u32,
    /// blake3 of the stored bytes (zero for `raw`), checked before they are reused.
    stored: [u8; 32],
}

const MAP_MAGIC: &[u8; 8] = b"STRQ2MAP";
const MAP_FORMAT: u32 = 1;
const MAP_HEAD: usize = 8 + 4 + 32 + 4 + 8 + 8;
const MAP_ENTRY: usize = 32 + 1 + 8 + 4 + 32;

/// Per distinct cluster content of one qcow2 output: blake3 of the raw cluster → where its
/// stored bytes are in that file, plus the identity of the compressor (kind, parameters,
/// library fingerprint, cluster size) that made them. A map is only used with the same identity
/// and the same file length, and each reused range is checked against its blake3, so a stale or
/// foreign map costs only speed.
///
/// Bytes (little endian): `STRQ2MAP`, format u32 = 1, identity [32], cluster_bits u32, file
/// length u64, entry count u64, entries sorted by content hash (content [32], raw u8, offset
/// u64, len u32, stored hash [32]), then blake3 of everything before [32].
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterMap {
    identity: [u8; 32],
    cluster_bits: u32,
    file_len: u64,
    entries: Vec<MapEntry>,
}

impl std::fmt::Debug for ClusterMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMap")
            .field("cluster_bits", &self.cluster_bits)
            .field("file_len", &self.file_len)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl ClusterMap {
    /// Distinct cluster contents described.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The length of the qcow2 file the map describes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAP_HEAD + self.entries.len() * MAP_ENTRY + 32);
        b.extend_from_slice(MAP_MAGIC);
        b.extend_from_slice(&MAP_FORMAT.to_le_bytes());
        b.extend_from_slice(&self.identity);
        b.extend_from_slice(&self.cluster_bits.to_le_bytes());
        b.extend_from_slice(&self.file_len.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.content);
            b.push(u8::from(e.raw));
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.extend_from_slice(&e.stored);
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Reads a map back; a damaged, truncated, foreign-format or inconsistent map (ranges outside
    /// the file, unsorted entries, impossible lengths) is a [`Qcow2Error::BadMap`].
    pub fn from_bytes(b: &[u8]) -> Result<ClusterMap, Qcow2Error> {
        let bad = |what: &str| Qcow2Error::BadMap(what.to_string());
        if b.len() < MAP_HEAD + 32 || &b[..8] != MAP_MAGIC {
            return Err(bad("not a strata qcow2 cluster map"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch: the map is damaged"));
        }
        let mut r = Cursor(&body[8..]);
        if r.u32() != MAP_FORMAT {
            return Err(bad("unknown map format version"));
        }
        let identity = r.array();
        let cluster_bits = r.u32();
        let file_len = r.u64();
        let count = r.u64();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad("cluster size out of range"));
        }
        if Some(r.0.len() as u64) != count.checked_mul(MAP_ENTRY as u64) {
            return Err(bad("entry count does not match the map's length"));
        }
        let cs = 1u64 << cluster_bits;
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let content = r.array();
            let raw = match r.u8() {
                0 => false,
                1 => true,
                _ => return Err(bad("unknown entry kind")),
            };
            let e = MapEntry {
                content,
                raw,
                offset: r.u64(),
                len: r.u32(),
                stored: r.array(),
            };
            let end = e.offset.checked_add(u64::from(e.len));
            let fits = end.is_some_and(|end| end <= file_len) && e.offset >= cs;
            let shape_ok = if e.raw {
                u64::from(e.len) == cs && e.offset.is_multiple_of(cs)
            } else {
                e.len > 0 && u64::from(e.len) < cs
            };
            if !fits || !shape_ok {
                return Err(bad(
                    "an entry lies outside the qcow2 file or has an impossible size",
                ));
            }
            if entries
                .last()
                .is_some_and(|p: &MapEntry| p.content >= e.content)
            {
                return Err(bad("entries are not sorted"));
            }
            entries.push(e);
        }
        Ok(ClusterMap {
            identity,
            cluster_bits,
            file_len,
            entries,
        })
    }

    fn find(&self, content: &[u8; 32]) -> Option<&MapEntry> {
        self.entries
            .binary_search_by(|e| e.content.cmp(content))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// A little-endian reader over bytes whose length was checked before.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.0[..N]);
        self.0 = &self.0[N..];
        a
    }
    fn array(&mut self) -> [u8; 32] {
        self.take()
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// The previous output of the same image and its map (see [`write`]).
pub struct Previous<'a> {
    pub image: &'a Path,
    pub map: ClusterMap,
}

/// What [`write`] did. `zero + reused + compressed + stored_raw == clusters`.
#[derive(Debug, Clone)]
pub struct Written {
    /// The map of the new output (keep it beside it for the next incremental write).
    pub map: ClusterMap,
    /// Guest clusters (virtual size / cluster size, rounded up).
    pub clusters: u64,
    /// All-zero clusters, left unallocated.
    pub zero: u64,
    /// Clusters whose stored form came from the previous output's map (compressed bytes read
    /// back, or the knowledge that compression does not help).
    pub reused: u64,
    /// Clusters compressed in this write and stored compressed.
    pub compressed: u64,
    /// Clusters compressed in this write that did not get smaller, or every data cluster when
    /// uncompressed; stored as plain clusters.
    pub stored_raw: u64,
    /// Map hits whose bytes in the previous file did not match (then compressed again).
    pub reuse_rejected: u64,
    /// Why the previous map was not used at all, if it was given and was not.
    pub previous_ignored: Option<String>,
    /// Bytes of the qcow2 file.
    pub file_size: u64,
}

/// Writes `raw` as a qcow2 image at `dest` (through a temporary file beside it, renamed at the
/// end; `dest` may be the previous output itself). `previous` (an earlier output of the same
/// image and its map) only makes it faster: the bytes are the same without it. `cancelled` is
/// polled for every cluster and chunk; when it says yes the write stops with
/// [`Qcow2Error::Cancelled`] and leaves no file behind.
pub fn write(
    raw: &Path,
    dest: &Path,
    opts: &Qcow2Options,
    previous: Option<Previous>,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Written, Qcow2Error> {
    opts.validate()?;
    let raw_file =
        File::open(raw).map_err(|e| Qcow2Error::io(format!("opening {}", raw.display()), e))?;
    let raw_len = raw_file
        .metadata()
        .map_err(|e| Qcow2Error::io(format!("reading the size of {}", raw.display()), e))?
        .len();
    let geo = Geometry::new(raw, raw_len, opts.cluster_bits)?;
    let identity = compressor_identity(opts.compression, opts.cluster_bits)
        .map_err(|detail| compress_error(raw, 0, detail))?;
    let (prev, previous_ignored) = match previous {
        None => (None, None),
        Some(p) => match open_previous(p, &identity, opts) {
            Ok(open) => (Some(open), None),
            Err(reason) => (None, Some(reason)),
        },
    };

    let file_name = dest
        .file_name()
        .ok_or_else(|| Qcow2Error::Options(format!("{} has no file name", dest.display())))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Locked while alive, so a later build can tell a dead writer's leftover (see fsutil).
    let _ = file_name;
    let tmp =
        crate::fsutil::locked_temp_in(dir, crate::fsutil::OUTPUT_TEMP_PREFIX).map_err(|e| {
            Qcow2Error::io(format!("creating a temporary file in {}", dir.display()), e)
        })?;
    let shown = tmp.path().display().to_string();
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("strata-qcow2-{i}"))
        .build()
        .map_err(|e| {
            Qcow2Error::io("starting the compression threads", std::io::Error::other(e))
        })?;

    let job = Job {
        raw,
        geo,
        compression: opts.compression,
        prev: prev.as_ref(),
        cancelled,
    };
    let data = run_pipeline(&job, &raw_file, tmp.as_file(), threads, &pool)?;
    if cancelled() {
        return Err(Qcow2Error::Cancelled);
    }
    let written = finish(&job, opts, data, tmp.as_file(), identity)
        .map_err(|e| Qcow2Error::io(format!("writing {shown}"), e))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Qcow2Error::io(format!("setting the mode of {shown}"), e))?;
    crate::fsutil::persist_replacing(tmp, dest)
        .map_err(|e| Qcow2Error::io(format!("renaming {shown} to {}", dest.display()), e))?;
    Ok(Written {
        previous_ignored,
        ..written
    })
}

/// Sizes derived from the raw length and the cluster size.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    raw_len: u64,
    virtual_size: u64,
    cluster_bits: u32,
    cluster_size: u64,
    clusters: u64,
    l2_entries: u64,
    l1_size: u64,
}

impl Geometry {
    fn new(raw: &Path, raw_len: u64, cluster_bits: u32) -> Result<Geometry, Qcow2Error> {
        let cluster_size = 1u64 << cluster_bits;
        let too_large = |detail: String| Qcow2Error::TooLarge {
            raw: raw.to_path_buf(),
            detail,
        };
        let virtual_size = raw_len
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| too_large("size overflows".into()))?;
        let clusters = virtual_size.div_ceil(cluster_size);
        let l2_entries = cluster_size / 8;
        let l1_size = clusters.div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(too_large(format!(
                "{virtual_size} bytes need an L1 table over qemu's 32 MiB limit with \
                 {cluster_size}-byte clusters; use a larger cluster_size"
            )));
        }
        Ok(Geometry {
            raw_len,
            virtual_size,
            cluster_bits,
            cluster_size,
            clusters,
            l2_entries,
            l1_size,
        })
    }
}

/// The previous output, opened and checked against its map.
struct OpenPrevious {
    file: File,
    map: ClusterMap,
}

fn open_previous(
    p: Previous,
    identity: &[u8; 32],
    opts: &Qcow2Options,
) -> Result<OpenPrevious, String> {
    if opts.compression == Compression::None {
        return Err("an uncompressed image has nothing to reuse".into());
    }
    if p.map.identity != *identity || p.map.cluster_bits != opts.cluster_bits {
        return Err("the map was made with other compression settings".into());
    }
    let file = File::open(p.image).map_err(|e| format!("opening {}: {e}", p.image.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("reading {}: {e}", p.image.display()))?
        .len();
    if len != p.map.file_len {
        return Err(format!(
            "{} is {len} bytes, its map describes {} bytes",
            p.image.display(),
            p.map.file_len
        ));
    }
    Ok(OpenPrevious { file, map: p.map })
}

/// What every stage shares.
struct Job<'a> {
    raw: &'a Path,
    geo: Geometry,
    compression: Compression,
    prev: Option<&'a OpenPrevious>,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// Raw clusters `first..first + count`, zero-padded to whole clusters.
struct Chunk {
    seq: u64,
    first: u64,
    count: usize,
    data: Vec<u8>,
    /// Per cluster: does it overlap a data range of the raw file (if not, it is a hole).
    has_data: Vec<bool>,
}

/// How one cluster is stored.
enum Stored {
    Zero,
    Compressed {
        content: [u8; 32],
        bytes: Vec<u8>,
        hash: [u8; 32],
        reused: bool,
    },
    Raw {
        content: [u8; 32],
        reused: bool,
    },
}

struct Processed {
    first: u64,
    data: Vec<u8>,
    clusters: Vec<Stored>,
    rejected: u64,
}

/// The data area as the writer left it.
struct DataArea {
    /// End of the data written (bytes; the data area starts at one cluster).
    end: u64,
    /// L1 index → L2 table (entries as written, before byte order).
    l2: BTreeMap<u64, Vec<u64>>,
    /// Refcount per host cluster of the data area (index 0 is the header).
    refcounts: Vec<u16>,
    entries: Vec<MapEntry>,
    zero: u64,
    reused: u64,
    compressed: u64,
    stored_raw: u64,
    rejected: u64,
}

fn run_pipeline(
    job: &Job,
    raw_file: &File,
    out: &File,
    threads: usize,
    pool: &rayon::ThreadPool,
) -> Result<DataArea, Qcow2Error> {
    let cs = job.geo.cluster_size as usize;
    let chunk_clusters = (CHUNK_BYTES / cs).max(threads * 4);
    std::thread::scope(|s| {
        let (chunk_tx, chunk_rx) = sync_channel::<Chunk>(1);
        let (done_tx, done_rx) = channel::<(u64, Result<Processed, Qcow2Error>)>();
        let (credit_tx, credit_rx) = channel::<Vec<u8>>();
        let reader =
            s.spawn(move || read_chunks(job, raw_file, chunk_clusters, chunk_tx, credit_rx));
        let writer = s.spawn(move || write_chunks(job, out, done_rx, credit_tx));
        compute(job, pool, chunk_rx, done_tx);
        let read = reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        read?;
        let area = written?;
        let done: u64 = area.zero + area.reused + area.compressed + area.stored_raw;
        if done != job.geo.clusters {
            return Err(Qcow2Error::io(
                format!("reading {}", job.raw.display()),
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("got {done} of {} clusters", job.geo.clusters),
                ),
            ));
        }
        Ok(area)
    })
}

/// Chunks read or being compressed or written at once (the memory bound: about this many
/// chunks of raw data plus their compressed form).
const CHUNKS_IN_FLIGHT: usize = 4;

/// Reader stage: chunks in order, at most [`CHUNKS_IN_FLIGHT`] ahead of the writer (which
/// hands each written chunk's buffer back as a credit); stops quietly when the writer has gone.
fn read_chunks(
    job: &Job,
    raw_file: &File,
    chunk_clusters: usize,
    tx: SyncSender<Chunk>,
    credits: Receiver<Vec<u8>>,
) -> Result<(), Qcow2Error> {
    let geo = job.geo;
    let cs = geo.cluster_size;
    let read_err = |e| Qcow2Error::io(format!("reading {}", job.raw.display()), e);
    let mut first = 0u64;
    let mut seq = 0u64;
    while first < geo.clusters {
        if (job.cancelled)() {
            return Err(Qcow2Error::Cancelled);
        }
        let mut data = if seq < CHUNKS_IN_FLIGHT as u64 {
            Vec::new()
        } else {
            match credits.recv() {
                Ok(buffer) => buffer,
                Err(_) => return Ok(()),
            }
        };
        let count = (geo.clusters - first).min(chunk_clusters as u64) as usize;
        let start = first * cs;
        let end = (start + count as u64 * cs).min(geo.raw_len);
        data.clear();
        data.resize(count * cs as usize, 0);
        let mut has_data = vec![false; count];
        for (from, to) in data_ranges(raw_file, start, end).map_err(read_err)? {
            raw_file
                .read_exact_at(
                    &mut data[(from - start) as usize..(to - start) as usize],
                    from,
                )
                .map_err(read_err)?;
            let (a, b) = ((from - start) / cs, (to - start).div_ceil(cs));
            has_data[a as usize..b as usize].fill(true);
        }
        let chunk = Chunk {
            seq,
            first,
            count,
            data,
            has_data,
        };
        if tx.send(chunk).is_err() {
            return Ok(());
        }
        first += count as u64;
        seq += 1;
    }
    Ok(())
}

/// The data ranges of `file` within `start..end` (SEEK_DATA/SEEK_HOLE; everything where the
/// file system does not tell).
fn data_ranges(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a file descriptor we own; it moves only that descriptor's offset,
        // which nothing here uses (reads are positioned).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    ranges.push((at, end));
                    Ok(ranges)
                }
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        ranges.push((data, hole));
        at = hole;
    }
    Ok(ranges)
}

/// Compute stage: each chunk becomes a task on the pool (its clusters in parallel inside), so
/// one chunk's last clusters overlap the next chunk's first; results go to the writer tagged with
/// the chunk's sequence number. Returns when every task has ended.
fn compute(
    job: &Job,
    pool: &rayon::ThreadPool,
    rx: Receiver<Chunk>,
    tx: Sender<(u64, Result<Processed, Qcow2Error>)>,
) {
    let cs = job.geo.cluster_size as usize;
    let min_len = ((256 << 10) / cs).max(1);
    pool.in_place_scope(|scope| {
        for chunk in rx {
            let tx = tx.clone();
            scope.spawn(move |_| {
                let results: Result<Vec<(Stored, bool)>, Qcow2Error> = chunk
                    .data
                    .par_chunks(cs)
                    .zip(chunk.has_data.par_iter())
                    .enumerate()
                    .with_min_len(min_len)
                    .map(|(i, (cluster, &has_data))| {
                        if (job.cancelled)() {
                            return Err(Qcow2Error::Cancelled);
                        }
                        store_cluster(job, chunk.first + i as u64, cluster, has_data)
                    })
                    .collect();
                let processed = results.map(|results| {
                    debug_assert_eq!(results.len(), chunk.count);
                    let rejected = results.iter().filter(|(_, r)| *r).count() as u64;
                    Processed {
                        first: chunk.first,
                        data: chunk.data,
                        clusters: results.into_iter().map(|(s, _)| s).collect(),
                        rejected,
                    }
                });
                // The writer has gone only after an error it reports itself.
                let _ = tx.send((chunk.seq, processed));
            });
        }
    });
}

/// How one cluster is stored, and whether a map hit was rejected on the way.
fn store_cluster(
    job: &Job,
    index: u64,
    cluster: &[u8],
    has_data: bool,
) -> Result<(Stored, bool), Qcow2Error> {
    if !has_data || is_zero(cluster) {
        return Ok((Stored::Zero, false));
    }
    let content = *blake3::hash(cluster).as_bytes();
    let mut rejected = false;
    if let Some(prev) = job.prev
        && let Some(e) = prev.map.find(&content)
    {
        if e.raw {
            return Ok((
                Stored::Raw {
                    content,
                    reused: true,
                },
                false,
            ));
        }
        let mut bytes = vec![0u8; e.len as usize];
        if prev.file.read_exact_at(&mut bytes, e.offset).is_ok()
            && blake3::hash(&bytes).as_bytes() == &e.stored
        {
            return Ok((
                Stored::Compressed {
                    content,
                    bytes,
                    hash: e.stored,
                    reused: true,
                },
                false,
            ));
        }
        rejected = true;
    }
    let stored = match compress(job.compression, cluster)
        .map_err(|detail| compress_error(job.raw, index, detail))?
    {
        Some(bytes) => Stored::Compressed {
            content,
            hash: *blake3::hash(&bytes).as_bytes(),
            bytes,
            reused: false,
        },
        None => Stored::Raw {
            content,
            reused: false,
        },
    };
    Ok((stored, rejected))
}

fn compress_error(raw: &Path, cluster: u64, detail: String) -> Qcow2Error {
    Qcow2Error::Compress {
        raw: raw.to_path_buf(),
        cluster,
        detail,
    }
}

fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// The compressed form of one cluster, or `None` when it would take `cluster.len()` bytes or
/// more (qemu gives the compressor `cluster_size - 1` bytes of room and writes the cluster
/// uncompressed when that is not enough).
fn compress(kind: Compression, cluster: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let room = cluster.len() - 1;
    match kind {
        Compression::None => Ok(None),
        Compression::Zlib => {
            let mut out = vec![0u8; room];
            let config = zlib_rs::DeflateConfig {
                level: 6,
                method: zlib_rs::Method::Deflated,
                window_bits: -12,
                mem_level: 9,
                strategy: zlib_rs::Strategy::Default,
            };
            let (done, rc) = zlib_rs::compress_slice(&mut out, cluster, config);
            match rc {
                zlib_rs::ReturnCode::Ok => {
                    let n = done.len();
                    out.truncate(n);
                    Ok(Some(out))
                }
                zlib_rs::ReturnCode::BufError => Ok(None),
                other => Err(format!("deflate failed ({other:?})")),
            }
        }
        Compression::Zstd => {
            thread_local! {
                static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            ZSTD.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(
                        zstd::bulk::Compressor::new(ZSTD_LEVEL)
                            .map_err(|e| format!("zstd setup failed ({e})"))?,
                    );
                }
                let Some(c) = cell.as_mut() else {
                    return Err("zstd setup failed".to_string());
                };
                let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(cluster.len()));
                c.compress_to_buffer(cluster, &mut out)
                    .map_err(|e| format!("zstd failed ({e})"))?;
                Ok((out.len() <= room).then_some(out))
            })
        }
    }
}

/// qemu's zstd level (the library default).
const ZSTD_LEVEL: i32 = 3;

/// The identity of the compressor for one cluster size: kind, parameters, library version and a
/// fingerprint of its output on a fixed sample, so maps from another build of the libraries
/// that compresses differently are not used.
fn compressor_identity(kind: Compression, cluster_bits: u32) -> Result<[u8; 32], String> {
    let mut h = blake3::Hasher::new_derive_key("strata qcow2 cluster map identity v1");
    h.update(&cluster_bits.to_le_bytes());
    let cs = 1usize << cluster_bits;
    let params = match kind {
        Compression::None => "none".to_string(),
        Compression::Zlib => "zlib-rs raw deflate level 6 window 12 memlevel 9".to_string(),
        Compression::Zstd => format!(
            "zstd level {ZSTD_LEVEL} library {}",
            zstd::zstd_safe::version_number()
        ),
    };
    h.update(params.as_bytes());
    // A sample that compresses part way: text-like runs and pseudo-random bytes.
    let mut sample = Vec::with_capacity(cs);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while sample.len() < cs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = format!("strata-{} ", x % 1000);
        sample.extend_from_slice(word.as_bytes());
        sample.push((x >> 32) as u8);
    }
    sample.truncate(cs);
    match compress(kind, &sample)? {
        Some(bytes) => h.update(&bytes),
        None => h.update(b"stored raw"),
    };
    Ok(*h.finalize().as_bytes())
}

/// Writer stage: stored clusters appended in order from host cluster 1.
fn write_chunks(
    job: &Job,
    out: &File,
    rx: Receiver<(u64, Result<Processed, Qcow2Error>)>,
    credits: Sender<Vec<u8>>,
) -> Result<DataArea, Qcow2Error> {
    let geo = job.geo;
    let cs = geo.cluster_size;
    let cb = geo.cluster_bits;
    let werr = |e| Qcow2Error::io("writing the qcow2 data area".to_string(), e);
    let mut f = out;
    f.seek(SeekFrom::Start(cs)).map_err(werr)?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut area = DataArea {
        end: cs,
        l2: BTreeMap::new(),
        refcounts: vec![1],
        entries: Vec::new(),
        zero: 0,
        reused: 0,
        compressed: 0,
        stored_raw: 0,
        rejected: 0,
    };
    // Compressed cluster descriptor: offset in the low `x` bits, additional sectors above.
    let x = 62 - (cb - 8);
    let zeros = vec![0u8; cs as usize];
    // Chunks finished out of order wait here for their turn.
    let mut early: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut next = 0u64;
    let in_order = std::iter::from_fn(|| {
        loop {
            if let Some(p) = early.remove(&next) {
                next += 1;
                return Some(Ok(p));
            }
            match rx.recv() {
                Ok((seq, Ok(p))) => {
                    early.insert(seq, p);
                }
                Ok((_, Err(e))) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
    });
    for p in in_order {
        let p = p?;
        if (job.cancelled)() {
            return Err(Qcow2Error::Cancelled);
        }
        area.rejected += p.rejected;
        for (i, stored) in p.clusters.into_iter().enumerate() {
            let index = p.first + i as u64;
            let entry = match stored {
                Stored::Zero => {
                    area.zero += 1;
                    continue;
                }
                Stored::Compressed {
                    content,
                    bytes,
                    hash,
                    reused,
                } => {
                    // A host cluster's refcount is a u16: start a new one if this is full.
                    let at = (area.end >> cb) as usize;
                    if area.refcounts.get(at).copied().unwrap_or(0) == u16::MAX {
                        let pad = area.end.next_multiple_of(cs) - area.end;
                        w.write_all(&zeros[..pad as usize]).map_err(werr)?;
                        area.end += pad;
                    }
                    let off = area.end;
                    let len = bytes.len() as u64;
                    let last = off + len - 1;
                    if off >= 1 << x {
                        return Err(Qcow2Error::TooLarge {
                            raw: job.raw.to_path_buf(),
                            detail: "compressed data beyond qcow2's offset limit; use a \
                                     smaller cluster_size"
                                .into(),
                        });
                    }
                    w.write_all(&bytes).map_err(werr)?;
                    area.end += len;
                    for c in (off >> cb)..=(last >> cb) {
                        bump(&mut area.refcounts, c);
                    }
                    if reused {
                        area.reused += 1;
                    } else {
                        area.compressed += 1;
                    }
                    area.entries.push(MapEntry {
                        content,
                        raw: false,
                        offset: off,
                        len: len as u32,
                        stored: hash,
                    });
                    let extra_sectors = (last / SECTOR) - (off / SECTOR);
                    COMPRESSED | (extra_sectors << x) | off
                }
                Stored::Raw { content, reused } => {
                    let pad = area.end.next_multiple_of(cs) - area.end;
                    w.write_all(&zeros[..pad as usize]).map_err(werr)?;
                    area.end += pad;
                    let off = area.end;
                    let at = i * cs as usize;
                    w.write_all(&p.data[at..at + cs as usize]).map_err(werr)?;
                    area.end += cs;
                    bump(&mut area.refcounts, off >> cb);
                    if reused {
                        area.reused += 1;
                    } else {
                        area.stored_raw += 1;
                    }
                    area.entries.push(MapEntry {
                        content,
                        raw: true,
                        offset: off,
                        len: cs as u32,
                        stored: [0; 32],
                    });
                    COPIED | off
                }
            };
            let table = area
                .l2
                .entry(index / geo.l2_entries)
                .or_insert_with(|| vec![0; geo.l2_entries as usize]);
            table[(index % geo.l2_entries) as usize] = entry;
        }
        let _ = credits.send(p.data);
    }
    w.flush().map_err(werr)?;
    Ok(area)
}

fn bump(refcounts: &mut Vec<u16>, cluster: u64) {
    let c = cluster as usize;
    if refcounts.len() <= c {
        refcounts.resize(c + 1, 0);
    }
    refcounts[c] += 1;
}

/// Metadata after the data area: L2 tables, L1, refcount blocks, refcount table; then the
/// header.
fn finish(
    job: &Job,
    opts: &Qcow2Options,
    mut area: DataArea,
    out: &File,
    identity: [u8; 32],
) -> std::io::Result<Written> {
    let geo = job.geo;
    let cs = geo.cluster_size;
    let cb = geo.cluster_bits;
    let data_end = area.end.next_multiple_of(cs);
    let mut next = data_end >> cb; // next free host cluster
    let l2_at: Vec<(u64, u64)> = area
        .l2
        .keys()
        .map(|&i| {
            next += 1;
            (i, next - 1)
        })
        .collect();
    let l1_clusters = (geo.l1_size * 8).div_ceil(cs);
    let l1_at = if geo.l1_size == 0 { 0 } else { next };
    next += l1_clusters;
    // Refcount blocks and table cover every cluster, themselves included.
    let per_block = cs * 8 / 16;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = next + blocks + table;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, table) {
            break;
        }
        (blocks, table) = (b, t);
    }
    let blocks_at = next;
    let table_at = next + blocks;
    let total = table_at + table;
    area.refcounts.resize(total as usize, 0);
    for c in (data_end >> cb)..total {
        area.refcounts[c as usize] = 1;
    }

    let mut f = out;
    f.seek(SeekFrom::Start(area.end))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.write_all(&vec![0u8; (data_end - area.end) as usize])?;
    let mut buf = Vec::with_capacity(cs as usize);
    for (table, _) in area.l2.values().zip(&l2_at) {
        buf.clear();
        for e in table {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        w.write_all(&buf)?;
    }
    if geo.l1_size > 0 {
        let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
        for &(i, c) in &l2_at {
            let at = i as usize * 8;
            l1[at..at + 8].copy_from_slice(&(COPIED | (c << cb)).to_be_bytes());
        }
        w.write_all(&l1)?;
    }
    for rc in area.refcounts.chunks(per_block as usize) {
        buf.clear();
        for r in rc {
            buf.extend_from_slice(&r.to_be_bytes());
        }
        buf.resize(cs as usize, 0);
        w.write_all(&buf)?;
    }
    let mut rt = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        let at = b as usize * 8;
        rt[at..at + 8].copy_from_slice(&((blocks_at + b) << cb).to_be_bytes());
    }
    w.write_all(&rt)?;
    w.flush()?;
    drop(w);

    let mut header = vec![0u8; cs as usize];
    let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    let version: u32 = match opts.version {
        Qcow2Version::V2 => 2,
        Qcow2Version::V3 => 3,
    };
    put(4, &version.to_be_bytes());
    put(20, &cb.to_be_bytes());
    put(24, &geo.virtual_size.to_be_bytes());
    put(36, &(geo.l1_size as u32).to_be_bytes());
    put(40, &(l1_at << cb).to_be_bytes());
    put(48, &(table_at << cb).to_be_bytes());
    put(56, &(table as u32).to_be_bytes());
    if opts.version == Qcow2Version::V3 {
        let zstd = opts.compression == Compression::Zstd;
        let incompatible: u64 = if zstd { 1 << 3 } else { 0 };
        put(72, &incompatible.to_be_bytes());
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
        put(100, &112u32.to_be_bytes()); // header_length, with compression_type and padding
        put(104, &[u8::from(zstd)]);
    }
    out.write_all_at(&header, 0)?;
    let file_size = total * cs;
    out.set_len(file_size)?;

    let mut entries = std::mem::take(&mut area.entries);
    entries.sort_by(|a, b| a.content.cmp(&b.content).then(a.offset.cmp(&b.offset)));
    entries.dedup_by_key(|e| e.content);
    Ok(Written {
        map: ClusterMap {
            identity,
            cluster_bits: cb,
            file_len: file_size,
            entries,
        },
        clusters: geo.clusters,
        zero: area.zero,
        reused: area.reused,
        compressed: area.compressed,
        stored_raw: area.stored_raw,
        reuse_rejected: area.rejected,
        previous_ignored: None,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn have_qemu_img() -> bool {
        let ok = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipped: qemu-img is not installed (qemu-utils)");
        }
        ok
    }

    /// Deterministic pseudo-random bytes.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Compressible bytes: words from a small vocabulary.
    fn text(seed: u64, n: usize) -> Vec<u8> {
        let words = [
            "strata ",
            "qcow2 ",
            "cluster ",
            "debian ",
            "\n",
            "/usr/lib/ ",
            "0000 ",
        ];
        let pick = noise(seed, n);
        let mut out = Vec::with_capacity(n + 16);
        let mut i = 0;
        while out.len() < n {
            out.extend_from_slice(words[pick[i % n] as usize % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }

    /// (offset, bytes) to write into a sparse file.
    type Parts = Vec<(u64, Vec<u8>)>;

    /// Writes `parts` (offset, bytes) into a sparse file of `len` bytes.
    fn raw_file(path: &Path, len: u64, parts: &[(u64, Vec<u8>)]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for (at, bytes) in parts {
            f.write_all_at(bytes, *at).unwrap();
        }
    }

    fn qemu(args: &[&str]) -> (bool, String) {
        let o = Command::new("qemu-img").args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }

    /// qemu-img check is clean, compare finds the raw's content, info shows the right size,
    /// version and compression type.
    fn assert_qemu_reads(raw: &Path, out: &Path, opts: &Qcow2Options, what: &str) {
        let (s, o) = (raw.to_str().unwrap(), out.to_str().unwrap());
        let (ok, text) = qemu(&["check", o]);
        assert!(
            ok && text.contains("No errors were found"),
            "{what}: check: {text}"
        );
        assert!(!text.contains("leak"), "{what}: check: {text}");
        let (ok, text) = qemu(&["compare", "-f", "raw", "-F", "qcow2", s, o]);
        assert!(ok, "{what}: compare: {text}");
        let (ok, text) = qemu(&["info", "--output=json", o]);
        assert!(ok, "{what}: info: {text}");
        let info: serde_json::Value = serde_json::from_str(&text).unwrap();
        let raw_len = std::fs::metadata(raw).unwrap().len();
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(raw_len.next_multiple_of(512)),
            "{what}"
        );
        assert_eq!(info["cluster-size"].as_u64(), Some(1 << opts.cluster_bits));
        let data = &info["format-specific"]["data"];
        let compat = match opts.version {
            Qcow2Version::V2 => "0.10",
            Qcow2Version::V3 => "1.1",
        };
        assert_eq!(data["compat"].as_str(), Some(compat), "{what}: {text}");
        let ctype = match opts.compression {
            Compression::Zstd => "zstd",
            _ => "zlib",
        };
        assert_eq!(
            data["compression-type"].as_str(),
            Some(ctype),
            "{what}: {text}"
        );
    }

    fn never() -> bool {
        false
    }

    fn opts(version: Qcow2Version, cluster_bits: u32, compression: Compression) -> Qcow2Options {
        Qcow2Options {
            version,
            cluster_bits,
            compression,
            threads: 2,
        }
    }

    /// The raw images every format case is written from: (name, length, parts).
    fn raw_cases() -> Vec<(&'static str, u64, Parts)> {
        let mb = 1u64 << 20;
        vec![
            ("empty", 0, vec![]),
            ("all-zero", 3 * mb, vec![(mb, vec![0; 4096])]),
            (
                "sparse",
                9 * mb,
                vec![
                    (0, text(1, 5000)),
                    (4 * mb + 123, noise(2, 70_000)),
                    (9 * mb - 1, vec![7]),
                ],
            ),
            ("random", 3 * mb, vec![(0, noise(3, 3 << 20))]),
            (
                "mixed-odd",
                5 * mb + 333,
                vec![
                    (0, text(4, 2 * mb as usize)),
                    (2 * mb, noise(5, mb as usize)),
                    (3 * mb + 4096, text(6, 300_000)),
                    (5 * mb, noise(7, 333)),
                ],
            ),
            ("one-byte", 1, vec![(0, vec![0xff])]),
        ]
    }

    #[test]
    fn qemu_img_reads_every_format_the_writer_makes_and_writes_repeat() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut configs = Vec::new();
        for cb in [9, 12, 16, 21] {
            configs.push(opts(Qcow2Version::V3, cb, Compression::Zlib));
            configs.push(opts(Qcow2Version::V3, cb, Compression::Zstd));
            configs.push(opts(Qcow2Version::V2, cb, Compression::Zlib));
        }
        configs.push(opts(Qcow2Version::V3, 16, Compression::None));
        configs.push(opts(Qcow2Version::V2, 12, Compression::None));
        for (name, len, parts) in raw_cases() {
            let raw = dir.path().join(format!("{name}.raw"));
            raw_file(&raw, len, &parts);
            for o in &configs {
                let what = format!("{name} {o:?}");
                let out = dir.path().join("out.qcow2");
                let w = write(&raw, &out, o, None, &never).unwrap();
                assert_qemu_reads(&raw, &out, o, &what);
                assert_eq!(
                    w.clusters,
                    len.next_multiple_of(512).div_ceil(1 << o.cluster_bits)
                );
                assert_eq!(w.zero + w.reused + w.compressed + w.stored_raw, w.clusters);
                assert_eq!(w.reused, 0);
                assert_eq!(w.file_size, std::fs::metadata(&out).unwrap().len());
                if o.compression == Compression::None {
                    assert_eq!(w.compressed, 0, "{what}");
                }
                // Same bytes on a second write, with another thread count.
                let again = dir.path().join("again.qcow2");
                let o1 = Qcow2Options {
                    threads: 1,
                    ..o.clone()
                };
                let w1 = write(&raw, &again, &o1, None, &never).unwrap();
                assert_eq!(
                    std::fs::read(&out).unwrap(),
                    std::fs::read(&again).unwrap(),
                    "{what}"
                );
                assert_eq!(w.map, w1.map, "{what}");
            }
        }
    }

    #[test]
    fn counts_and_fallbacks_follow_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("r.raw");
        let cs = 4096usize;
        // cluster 0 zero, 1 text, 2 random (incompressible), 3 hole, 4 text again.
        let mut parts = vec![(cs as u64, text(1, cs)), (2 * cs as u64, noise(2, cs))];
        parts.push((4 * cs as u64, text(1, cs)));
        raw_file(&raw, 5 * cs as u64, &parts);
        let out = dir.path().join("o.qcow2");
        let w = write(
            &raw,
            &out,
            &opts(Qcow2Version::V3, 12, Compression::Zlib),
            None,
            &never,
        )
        .unwrap();
        assert_eq!(
            (w.clusters, w.zero, w.compressed, w.stored_raw),
            (5, 2, 2, 1)
        );
        // Two text clusters share one map entry (same content).
        assert_eq!(w.map.len(), 2);
        let u = write(
            &raw,
            &out,
            &opts(Qcow2Version::V3, 12, Compression::None),
            None,
            &never,
        )
        .unwrap();
        assert_eq!((u.zero, u.compressed, u.stored_raw), (2, 0, 3));
        // zlib output is raw deflate with a 4 KiB window: inflate with windowBits -12.
        let w = write(
            &raw,
            &out,
            &opts(Qcow2Version::V3, 12, Compression::Zlib),
            None,
            &never,
        )
        .unwrap();
        let file = std::fs::read(&out).unwrap();
        let e = w.map.entries.iter().find(|e| !e.raw).unwrap();
        let stored = &file[e.offset as usize..(e.offset + u64::from(e.len)) as usize];
        let mut back = vec![0u8; cs];
        let (got, rc) = zlib_rs::decompress_slice(
            &mut back,
            stored,
            zlib_rs::InflateConfig { window_bits: -12 },
        );
        assert_eq!(rc, zlib_rs::ReturnCode::Ok);
        assert_eq!(got, &text(1, cs)[..]);
    }

    /// Raw A, then raw B = A with a few clusters changed and one copied elsewhere.
    fn edited_pair(dir: &Path) -> (PathBuf, PathBuf, u64) {
        let cs = 65536usize;
        let mut a = Vec::new();
        for i in 0..40u64 {
            let c = if i % 5 == 4 {
                noise(100 + i, cs)
            } else {
                text(i, cs)
            };
            a.push((i * cs as u64, c));
        }
        let b_path = dir.join("b.raw");
        let a_path = dir.join("a.raw");
        raw_file(&a_path, 48 * cs as u64 + 100, &a);
        let mut b = a.clone();
        b[3].1 = text(1003, cs); // changed
        b[9].1 = noise(1009, cs); // changed, incompressible
        b[20].1[77] ^= 1; // one byte
        b.push((44 * cs as u64, a[7].1.clone())); // A's cluster 7, also at index 44
        raw_file(&b_path, 48 * cs as u64 + 100, &b);
        // B's non-zero clusters: 41; new content: 3 → 38 reusable.
        (a_path, b_path, 38)
    }

    #[test]
    fn incremental_write_equals_full_write_and_reuses_unchanged_clusters() {
        if !have_qemu_img() {
            return;
        }
        for compression in [Compression::Zlib, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let (a, b, reusable) = edited_pair(dir.path());
            let o = opts(Qcow2Version::V3, 16, compression);
            let prev = dir.path().join("img.qcow2");
            let wa = write(&a, &prev, &o, None, &never).unwrap();
            let map = ClusterMap::from_bytes(&wa.map.to_bytes()).unwrap();
            assert_eq!(map, wa.map);
            let full = dir.path().join("full.qcow2");
            let wf = write(&b, &full, &o, None, &never).unwrap();
            // Incremental, writing over the previous output itself.
            let previous = Previous { image: &prev, map };
            let wi = write(&b, &prev, &o, Some(previous), &never).unwrap();
            assert_eq!(std::fs::read(&full).unwrap(), std::fs::read(&prev).unwrap());
            assert_eq!(wi.reused, reusable, "{compression:?}");
            assert_eq!(wi.compressed + wi.stored_raw, 3);
            assert_eq!((wi.reuse_rejected, wi.previous_ignored), (0, None));
            assert_eq!((wf.reused, wf.zero, wi.zero), (0, wi.zero, wf.zero));
            assert_eq!(wi.map, wf.map);
            assert_qemu_reads(&b, &prev, &o, "incremental");
        }
    }

    #[test]
    fn damaged_foreign_or_stale_maps_are_refused_or_ignored() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b, _) = edited_pair(dir.path());
        let zlib = opts(Qcow2Version::V3, 16, Compression::Zlib);
        let prev = dir.path().join("prev.qcow2");
        let wa = write(&a, &prev, &zlib, None, &never).unwrap();
        let full = dir.path().join("full.qcow2");
        write(&b, &full, &zlib, None, &never).unwrap();
        let full_bytes = std::fs::read(&full).unwrap();
        let good = wa.map.to_bytes();

        // Damaged bytes: any flipped byte, a truncation, another file.
        for at in [0, 9, 20, 60, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(ClusterMap::from_bytes(&bad), Err(Qcow2Error::BadMap(_))),
                "{at}"
            );
        }
        assert!(ClusterMap::from_bytes(&good[..good.len() - 1]).is_err());
        assert!(ClusterMap::from_bytes(b"").is_err());
        assert!(ClusterMap::from_bytes(&full_bytes[..4096]).is_err());
        // A well-formed map whose entry points past the file is refused too.
        let mut past = wa.map.clone();
        past.entries[0].offset = past.file_len - 1;
        let e = ClusterMap::from_bytes(&past.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("outside the qcow2 file"), "{e}");

        let out = dir.path().join("out.qcow2");
        let check = |w: &Written, what: &str| {
            assert_eq!(std::fs::read(&out).unwrap(), full_bytes, "{what}");
            assert_eq!(w.zero + w.reused + w.compressed + w.stored_raw, w.clusters);
        };
        // Foreign settings: made with zstd, or another cluster size: ignored.
        let zstd = opts(Qcow2Version::V3, 16, Compression::Zstd);
        let zprev = dir.path().join("zprev.qcow2");
        let wz = write(&a, &zprev, &zstd, None, &never).unwrap();
        let p = Previous {
            image: &zprev,
            map: wz.map,
        };
        let w = write(&b, &out, &zlib, Some(p), &never).unwrap();
        assert_eq!(w.reused, 0);
        assert!(
            w.previous_ignored
                .as_deref()
                .unwrap()
                .contains("other compression")
        );
        check(&w, "zstd map");
        let small = opts(Qcow2Version::V3, 15, Compression::Zlib);
        let sprev = dir.path().join("sprev.qcow2");
        let ws = write(&a, &sprev, &small, None, &never).unwrap();
        let p = Previous {
            image: &sprev,
            map: ws.map,
        };
        let w = write(&b, &out, &zlib, Some(p), &never).unwrap();
        assert!(w.previous_ignored.is_some() && w.reused == 0);
        check(&w, "32 KiB map");
        // The map of another file of another length: ignored.
        let longer = dir.path().join("longer.qcow2");
        let mut bytes = std::fs::read(&prev).unwrap();
        bytes.extend_from_slice(&[0; 512]);
        std::fs::write(&longer, &bytes).unwrap();
        let p = Previous {
            image: &longer,
            map: wa.map.clone(),
        };
        let w = write(&b, &out, &zlib, Some(p), &never).unwrap();
        assert!(w.previous_ignored.as_deref().unwrap().contains("bytes"));
        check(&w, "longer file");
        // Another image (the zstd one) cut to the same length: no compressed bytes match.
        let other = dir.path().join("other.qcow2");
        let mut bytes = std::fs::read(&zprev).unwrap();
        bytes.resize(wa.file_size as usize, 0);
        std::fs::write(&other, &bytes).unwrap();
        let p = Previous {
            image: &other,
            map: wa.map.clone(),
        };
        let w = write(&b, &out, &zlib, Some(p), &never).unwrap();
        let compressed_hits = wa.map.entries.iter().filter(|e| !e.raw).count() as u64;
        assert!(w.reuse_rejected >= compressed_hits - 3, "{w:?}");
        check(&w, "other file");
        // The previous file changed under its map (same length): those clusters are
        // compressed again, the rest reused.
        let mut changed = std::fs::read(&prev).unwrap();
        let victims: Vec<_> = wa.map.entries.iter().filter(|e| !e.raw).take(2).collect();
        for e in &victims {
            changed[e.offset as usize] ^= 0xff;
        }
        let cprev = dir.path().join("cprev.qcow2");
        std::fs::write(&cprev, &changed).unwrap();
        let p = Previous {
            image: &cprev,
            map: wa.map.clone(),
        };
        let w = write(&b, &out, &zlib, Some(p), &never).unwrap();
        assert_eq!(w.reuse_rejected, 2);
        assert!(w.reused > 0 && w.previous_ignored.is_none());
        check(&w, "changed previous");
    }

    #[test]
    fn cancelling_leaves_no_file_and_keeps_the_old_output() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("r.raw");
        raw_file(&raw, 12 << 20, &[(0, text(1, 12 << 20))]);
        let out = dir.path().join("o.qcow2");
        std::fs::write(&out, b"old output").unwrap();
        for after in [0, 1, 5, 100] {
            let calls = AtomicUsize::new(0);
            let cancel = || calls.fetch_add(1, Ordering::SeqCst) >= after;
            let o = opts(Qcow2Version::V3, 16, Compression::Zlib);
            let e = write(&raw, &out, &o, None, &cancel).unwrap_err();
            assert!(matches!(e, Qcow2Error::Cancelled), "{after}: {e}");
            let mut names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["o.qcow2", "r.raw"], "{after}");
            assert_eq!(std::fs::read(&out).unwrap(), b"old output");
        }
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.raw");
        let e = write(
            &missing,
            &dir.path().join("o"),
            &Qcow2Options::default(),
            None,
            &never,
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing.raw"), "{e}");
        let bad = Qcow2Options {
            cluster_bits: 22,
            ..Qcow2Options::default()
        };
        assert!(matches!(bad.validate(), Err(Qcow2Error::Options(_))));
        let v2zstd = opts(Qcow2Version::V2, 16, Compression::Zstd);
        assert!(v2zstd.validate().is_err());
    }

    #[test]
    fn parses_qemu_img_options_or_falls_back() {
        let native =
            |text: Option<&str>, compress: bool| match parse_qemu_img_options(text, compress) {
                ParsedOptions::Native(o) => o,
                ParsedOptions::FallBack { reason } => panic!("{text:?}: {reason}"),
            };
        assert_eq!(native(None, true), Qcow2Options::default());
        assert_eq!(native(Some(""), false).compression, Compression::None);
        let o = native(Some("compat=0.10,cluster_size=131072"), true);
        assert_eq!(
            (o.version, o.cluster_bits, o.compression),
            (Qcow2Version::V2, 17, Compression::Zlib)
        );
        let o = native(
            Some("compat=v3, cluster_size=2M,compression_type=zstd"),
            true,
        );
        assert_eq!(
            (o.version, o.cluster_bits, o.compression),
            (Qcow2Version::V3, 21, Compression::Zstd)
        );
        assert_eq!(native(Some("cluster_size=512"), true).cluster_bits, 9);
        assert_eq!(
            native(Some("cluster_size=64k,compat=1.1"), true).cluster_bits,
            16
        );
        assert_eq!(
            native(Some("compression_type=zlib"), false).compression,
            Compression::None
        );
        for text in [
            "lazy_refcounts=on",
            "refcount_bits=8",
            "preallocation=metadata",
            "cluster_size=1000",
            "cluster_size=4M",
            "cluster_size=256",
            "cluster_size=1.5k",
            "compat=0.9",
            "compat=0.10,compression_type=zstd",
            "compression_type=lz4",
            "compat",
            "compat=1.1,",
            "compat=1.1,compat=0.10",
            "backing_file=a,,b",
        ] {
            assert!(
                matches!(
                    parse_qemu_img_options(Some(text), true),
                    ParsedOptions::FallBack { .. }
                ),
                "{text}"
            );
        }
        assert!(matches!(
            parse_qemu_img_options(Some("compression_type=zstd"), false),
            ParsedOptions::FallBack { .. }
        ));
    }
}
