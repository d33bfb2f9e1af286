//! The cached copy of a tar output, written in time proportional to what changed since the
//! previous output of the same image: a sequence of independent zstd frames, one per
//! content-defined chunk of the tar stream, where a chunk the previous output also had is not
//! compressed again but its frame is copied from the previous blob (the way the qcow2 writer
//! reuses the compressed clusters of the previous image).
//!
//! ```text
//! tar stream ─► Chunker: cut before a tar entry whose name hashes to 0 mod CUT_EVERY, once
//!               the chunk has MIN_CHUNK bytes; at MAX_CHUNK bytes in any case
//!            ─► jobs (bounded) ─► workers ×N: blake3(chunk) in the previous index?
//!                                   yes ─► Reuse(offset, len in the previous blob)
//!                                   no  ─► zstd::bulk(level) ─► a new frame
//!            ─► writer thread, in stream order ─► BlobSink
//!                 Reuse: pread from the previous blob file, once its digest checked out
//!                        (hashed by a thread started with the writer); a previous blob that
//!                        does not check out, or a frame whose header disagrees with the
//!                        index, is compressed instead (a debug line says so)
//! finish ─► (blob digest, size) + ChunkIndex [(chunk blake3, raw length, frame offset, length)]
//! ```
//!
//! A concatenation of zstd frames is one valid zstd stream, so every reader of output blobs
//! (restore, `cache verify`, registry push and pull, `zstd -d`) reads it unchanged. The blob
//! bytes depend only on the tar bytes, the zstd level and the zstd library version (each frame
//! is a one-shot compression of its chunk), so an incremental write and a write from scratch
//! give the same blob; an index from another level or library version is not used.
//!
//! The cut points depend only on the bytes: a tar entry's start is found by parsing the
//! headers as they pass (GNU `L`/`K` long names, PAX `x`/`g` records and GNU sparse extension
//! headers belong to the entry that follows them). An edit changes the chunks that hold the
//! changed entries; the cuts after them fall where they fell before.

use crate::cache::BlobSink;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A chunk ends only once it has this many bytes (at an entry start)...
pub const MIN_CHUNK: usize = 1 << 20;
/// ...and always at this many (inside an entry if need be).
pub const MAX_CHUNK: usize = 8 << 20;
/// One entry start in this many (by a hash of its name) ends a chunk of at least MIN_CHUNK.
const CUT_EVERY: u64 = 8;

const INDEX_MAGIC: &[u8; 16] = b"strata-chunks-1\n";

/// Where each chunk of a chunked blob is: what the next write of the same image reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIndex {
    /// `zstd::zstd_safe::version_number()` of the writer.
    pub zstd: u32,
    pub level: i32,
    /// The blob's digest and size.
    pub blob: String,
    pub blob_size: u64,
    pub chunks: Vec<Chunk>,
}

/// One chunk: the blake3 of its uncompressed bytes, their length, and its frame in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub hash: [u8; 32],
    pub raw: u64,
    pub offset: u64,
    pub len: u64,
}

impl ChunkIndex {
    /// Magic, bincode body, blake3 of the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("a chunk index always encodes");
        let mut out = INDEX_MAGIC.to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<ChunkIndex, String> {
        let rest = b
            .strip_prefix(INDEX_MAGIC)
            .ok_or("not a chunk index (no magic)")?;
        if rest.len() < 32 {
            return Err("chunk index truncated".into());
        }
        let (body, sum) = rest.split_at(rest.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err("chunk index damaged (checksum)".into());
        }
        let (idx, used): (ChunkIndex, usize) =
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map_err(|e| format!("chunk index does not decode: {e}"))?;
        if used != body.len() {
            return Err("chunk index has trailing bytes".into());
        }
        Ok(idx)
    }
}

/// The zstd library version frames are made with.
pub fn zstd_version() -> u32 {
    zstd::zstd_safe::version_number()
}

/// The previous blob of the same output, open for reads, and where its chunks are.
pub struct Previous {
    file: File,
    digest: String,
    size: u64,
    /// chunk blake3 → (frame offset, frame length, raw length)
    map: HashMap<[u8; 32], (u64, u64, u64)>,
}

impl Previous {
    /// `file` holds the blob `index.blob`; its digest is checked before any frame is copied.
    pub fn new(file: File, index: &ChunkIndex) -> Previous {
        let map = index
            .chunks
            .iter()
            .map(|c| (c.hash, (c.offset, c.len, c.raw)))
            .collect();
        Previous {
            file,
            digest: index.blob.clone(),
            size: index.blob_size,
            map,
        }
    }

    /// Whether the file's bytes hash to the digest (and it has the recorded size).
    fn check(&self) -> Result<(), String> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = self
                .file
                .read_at(&mut buf, off)
                .map_err(|e| format!("cannot read the previous blob: {e}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        if off != self.size {
            return Err(format!(
                "the previous blob is {off} bytes, its index says {}",
                self.size
            ));
        }
        if h.finalize().to_hex().as_str() != self.digest {
            return Err("the previous blob does not match its digest".into());
        }
        Ok(())
    }
}

/// What a chunked write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub chunks: u64,
    /// Frames copied from the previous blob.
    pub reused: u64,
    /// Uncompressed bytes compressed anew.
    pub compressed_bytes: u64,
}

/// Cuts a tar stream into chunks (see the module docs). A pure function of the bytes.
pub struct Chunker {
    cur: Vec<u8>,
    pos: u64,
    /// Stream position of the next header block.
    next_header: u64,
    hdr: Box<[u8; 512]>,
    hdr_len: usize,
    /// The next header block is a GNU sparse extension header.
    ext: bool,
    /// Data after the extension headers.
    ext_data: u64,
    /// Where (in `cur`) the entry whose records are being read began.
    entry_start: Option<usize>,
}

impl Default for Chunker {
    fn default() -> Self {
        Chunker {
            cur: Vec::with_capacity(MAX_CHUNK + 512),
            pos: 0,
            next_header: 0,
            hdr: Box::new([0u8; 512]),
            hdr_len: 0,
            ext: false,
            ext_data: 0,
            entry_start: None,
        }
    }
}

fn round512(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

/// FNV-1a of an entry's name field: cheap and stable (only the cut points depend on it).
fn name_hash(name: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in name.iter().take_while(|&&b| b != 0) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (h >> 29)
}

impl Chunker {
    /// Takes `data`, pushing every chunk it completes onto `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Vec<u8>>) {
        while !data.is_empty() {
            if self.pos < self.next_header {
                let n = ((self.next_header - self.pos).min(data.len() as u64) as usize)
                    .min(MAX_CHUNK.saturating_sub(self.cur.len()).max(1));
                self.cur.extend_from_slice(&data[..n]);
                self.pos += n as u64;
                data = &data[n..];
                self.cut_if_full(out);
                continue;
            }
            let n = (512 - self.hdr_len).min(data.len());
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[..n]);
            self.hdr_len += n;
            data = &data[n..];
            if self.hdr_len == 512 {
                self.hdr_len = 0;
                self.block(out);
            }
        }
    }

    /// The last chunk (None when the stream was empty).
    pub fn finish(mut self) -> Option<Vec<u8>> {
        self.cur.extend_from_slice(&self.hdr[..self.hdr_len]);
        (!self.cur.is_empty()).then_some(self.cur)
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.cur, Vec::with_capacity(MAX_CHUNK + 512))
    }

    fn cut_if_full(&mut self, out: &mut Vec<Vec<u8>>) {
        if self.cur.len() >= MAX_CHUNK {
            out.push(self.take());
            self.entry_start = None;
        }
    }

    /// A whole header block in `hdr`.
    fn block(&mut self, out: &mut Vec<Vec<u8>>) {
        let h = &*self.hdr;
        let mut data = 0u64;
        if self.ext {
            self.ext = h[504] != 0;
            if !self.ext {
                data = self.ext_data;
            }
        } else if h.iter().all(|&b| b == 0) {
            // End of archive.
        } else {
            let kind = h[156];
            let size = tar::Header::from_byte_slice(h).entry_size().unwrap_or(0);
            let start = *self.entry_start.get_or_insert(self.cur.len());
            if matches!(kind, b'L' | b'K' | b'x' | b'g') {
                data = round512(size);
            } else {
                // The entry's own header: the chunk may end where the entry began.
                self.entry_start = None;
                if start >= MIN_CHUNK && name_hash(&h[..100]).is_multiple_of(CUT_EVERY) {
                    let mut rest = Vec::with_capacity(MAX_CHUNK + 512);
                    rest.extend_from_slice(&self.cur[start..]);
                    self.cur.truncate(start);
                    out.push(std::mem::replace(&mut self.cur, rest));
                }
                if kind == b'S' && h[482] != 0 {
                    self.ext = true;
                    self.ext_data = round512(size);
                } else {
                    data = round512(size);
                }
            }
        }
        self.cur.extend_from_slice(&self.hdr[..]);
        self.pos += 512;
        self.next_header = self.pos + data;
        self.cut_if_full(out);
    }
}

/// A chunk to hash and compress: its number in the stream, its bytes.
type Job = (u64, Vec<u8>);

/// What a worker made of one chunk.
enum Work {
    New(Vec<u8>),
    /// In the previous blob at (offset, length); the chunk's bytes in case it cannot be read.
    Reuse(u64, u64, Vec<u8>),
    Failed(io::Error),
}

struct Done {
    seq: u64,
    hash: [u8; 32],
    raw: u64,
    work: Work,
}

/// What the writer thread hands back.
struct Written {
    sink: Box<dyn BlobSink>,
    chunks: Vec<Chunk>,
    stats: Stats,
}

/// A blob being written as chunked zstd frames; see the module docs.
pub struct ChunkedBlob {
    chunker: Chunker,
    seq: u64,
    ready: Vec<Vec<u8>>,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<Written>>>,
}

impl ChunkedBlob {
    /// Writes into `sink` with `workers` compressing threads at zstd `level`, copying the
    /// frames of chunks `previous` has.
    pub fn new(
        sink: Box<dyn BlobSink>,
        previous: Option<Previous>,
        level: i32,
        workers: u32,
    ) -> ChunkedBlob {
        let workers = workers.max(1) as usize;
        let previous = previous.map(Arc::new);
        // The previous blob is hashed while the first chunks are made.
        let check = previous
            .clone()
            .map(|p| std::thread::spawn(move || p.check()));
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let handles = (0..workers)
            .map(|_| {
                let (rx, tx, prev) = (job_rx.clone(), done_tx.clone(), previous.clone());
                std::thread::spawn(move || worker(rx, tx, prev, level))
            })
            .collect();
        drop(done_tx);
        let writer =
            std::thread::spawn(move || write_frames(sink, done_rx, previous, check, level));
        ChunkedBlob {
            chunker: Chunker::default(),
            seq: 0,
            ready: Vec::new(),
            jobs: Some(job_tx),
            workers: handles,
            writer: Some(writer),
        }
    }

    fn send_ready(&mut self) -> io::Result<()> {
        for chunk in self.ready.drain(..) {
            let sent = self
                .jobs
                .as_ref()
                .is_some_and(|j| j.send((self.seq, chunk)).is_ok());
            if !sent {
                // The writer stopped: its error is the cause (a full cache folder).
                return Err(match self.writer.take().map(|w| w.join()) {
                    Some(Ok(Err(e))) => e,
                    _ => io::Error::other("the cached copy's writer stopped"),
                });
            }
            self.seq += 1;
        }
        Ok(())
    }

    /// Ends the stream: the sink (to finish), the chunks written and what was reused.
    pub fn finish(mut self) -> io::Result<(Box<dyn BlobSink>, Vec<Chunk>, Stats)> {
        let chunker = std::mem::take(&mut self.chunker);
        match chunker.finish() {
            Some(last) => self.ready.push(last),
            // An empty stream is one empty frame (zero bytes would not be a zstd stream).
            None if self.seq == 0 => self.ready.push(Vec::new()),
            None => {}
        }
        let sent = self.send_ready();
        self.jobs = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| io::Error::other("a chunk compressing thread panicked"))?;
        }
        let written = self
            .writer
            .take()
            .map(|w| w.join())
            .ok_or_else(|| io::Error::other("the cached copy was finished twice"))?
            .map_err(|_| io::Error::other("the cached copy's writer thread panicked"))??;
        sent?;
        if written.stats.chunks != self.seq {
            return Err(io::Error::other(format!(
                "the cached copy has {} of {} chunks",
                written.stats.chunks, self.seq
            )));
        }
        Ok((written.sink, written.chunks, written.stats))
    }
}

impl Write for ChunkedBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chunker.push(buf, &mut self.ready);
        self.send_ready()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChunkedBlob {
    fn drop(&mut self) {
        // Abandoned (an error elsewhere): stop the threads; the sink is dropped unfinished.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    previous: Option<Arc<Previous>>,
    level: i32,
) {
    let mut zc = zstd::bulk::Compressor::new(level).map_err(|e| e.to_string());
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((seq, data)) = job else { break };
        let hash = *blake3::hash(&data).as_bytes();
        let raw = data.len() as u64;
        let found = previous
            .as_ref()
            .and_then(|p| p.map.get(&hash))
            .filter(|f| f.2 == raw);
        let work = match (found, zc.as_mut()) {
            (Some(&(off, len, _)), _) => Work::Reuse(off, len, data),
            (None, Ok(c)) => match c.compress(&data) {
                Ok(frame) => Work::New(frame),
                Err(e) => Work::Failed(e),
            },
            (None, Err(e)) => Work::Failed(io::Error::other(format!("zstd: {e}"))),
        };
        if done
            .send(Done {
                seq,
                hash,
                raw,
                work,
            })
            .is_err()
        {
            break;
        }
    }
}

fn write_frames(
    mut sink: Box<dyn BlobSink>,
    done: Receiver<Done>,
    previous: Option<Arc<Previous>>,
    mut check: Option<JoinHandle<Result<(), String>>>,
    level: i32,
) -> io::Result<Written> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut chunks = Vec::new();
    let mut stats = Stats::default();
    let mut offset = 0u64;
    // Whether frames may be copied from the previous blob (decided at the first reuse).
    let mut usable: Option<bool> = None;
    let mut buf = Vec::new();
    for d in done {
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&stats.chunks) {
            let frame: &[u8] = match d.work {
                Work::Failed(e) => return Err(e),
                Work::New(f) => {
                    stats.compressed_bytes += d.raw;
                    buf = f;
                    &buf
                }
                Work::Reuse(off, len, data) => {
                    let ok = *usable.get_or_insert_with(|| {
                        let checked = match check.take().map(|h| h.join()) {
                            Some(Ok(r)) => r,
                            Some(Err(_)) => Err("its check panicked".into()),
                            None => Err("there is none".into()),
                        };
                        if let Err(why) = &checked {
                            tracing::debug!(
                                "tar output: not reusing the previous cached copy ({why}); compressing every chunk"
                            );
                        }
                        checked.is_ok()
                    });
                    let copied = match (&previous, ok) {
                        (Some(p), true) => read_frame(p, off, len, d.raw, &mut buf),
                        _ => Err(String::new()),
                    };
                    match copied {
                        Ok(()) => {
                            stats.reused += 1;
                            &buf
                        }
                        Err(why) => {
                            if !why.is_empty() {
                                tracing::debug!(
                                    "tar output: chunk {} of the previous copy not reused ({why}); compressing it",
                                    stats.chunks
                                );
                            }
                            stats.compressed_bytes += d.raw;
                            buf = zstd::bulk::compress(&data, level)?;
                            &buf
                        }
                    }
                }
            };
            sink.write_all(frame)?;
            chunks.push(Chunk {
                hash: d.hash,
                raw: d.raw,
                offset,
                len: frame.len() as u64,
            });
            offset += frame.len() as u64;
            stats.chunks += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("a chunk of the cached copy went missing"));
    }
    Ok(Written {
        sink,
        chunks,
        stats,
    })
}

/// Reads the frame at `off` (`len` bytes) of the previous blob into `buf`, checking that it is
/// a zstd frame of `raw` bytes.
fn read_frame(p: &Previous, off: u64, len: u64, raw: u64, buf: &mut Vec<u8>) -> Result<(), String> {
    if off.checked_add(len).is_none_or(|end| end > p.size) || len > (MAX_CHUNK as u64) * 2 {
        return Err(format!("frame at {off}+{len} is outside the blob"));
    }
    buf.resize(len as usize, 0);
    p.file
        .read_exact_at(buf, off)
        .map_err(|e| format!("cannot read it: {e}"))?;
    match zstd::zstd_safe::get_frame_content_size(buf) {
        Ok(Some(n)) if n == raw => Ok(()),
        _ => Err(format!("no zstd frame of {raw} bytes at {off}")),
    }
}

#[cfg(test)]
mod tests;
