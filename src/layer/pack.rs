//! Packing: a [`Changeset`] of a tree into a deterministic tar (GNU headers, PAX xattrs), hashed
//! as it is written (the diff id), optionally compressed with multithreaded zstd.
//!
//! ```text
//! Changeset ──► TarWriter (headers by hand, file data with a 1 MiB buffer)
//!           ──► BufWriter (1 MiB) ──► HashWriter (blake3 + byte count) ──► zstd (workers ≥ 1) ──► out
//! ```
//! The tar crate is used for header field encoding only: its `append_*` helpers read metadata
//! themselves (non-clamped mtimes, no device nodes, no xattrs) and copy with 8 KiB buffers.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tar::{EntryType, GnuExtSparseHeader, Header};

use super::diff::{ChangeKind, Changeset};
use super::scan::{FileKind, Meta};
use super::{LayerError, SPARSE_CHUNK};

const BUF: usize = 1 << 20;

/// (PAX key, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Clamp every mtime to at most this (seconds since the epoch): `min(mtime, epoch)`.
    pub source_date_epoch: Option<i64>,
    /// zstd level (default 3).
    pub level: i32,
    /// zstd worker threads; values below 1 are raised to 1 (0 would switch zstd to its
    /// single-threaded mode, whose output differs from the multithreaded one).
    pub workers: u32,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            source_date_epoch: None,
            level: 3,
            workers: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        }
    }
}

/// What a pack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// blake3 (hex) of the uncompressed tar stream.
    pub diff_id: String,
    /// Length of the uncompressed tar stream.
    pub tar_size: u64,
    /// Number of tar entries (whiteouts and opaque markers included; GNU long-name and PAX
    /// records not counted).
    pub entries: u64,
}

struct HashWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    n: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.hasher.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `changes` (paths relative to `root`) as a zstd-compressed tar into `out`.
pub fn pack(
    root: &Path,
    changes: &Changeset,
    out: impl Write,
    opts: &PackOptions,
) -> Result<LayerInfo, LayerError> {
    let mut enc = zstd::Encoder::new(out, opts.level).map_err(LayerError::Write)?;
    enc.multithread(opts.workers.max(1))
        .map_err(LayerError::Write)?;
    enc.include_checksum(true).map_err(LayerError::Write)?;
    let info = write_tar(root, changes, &mut enc, opts)?;
    enc.finish().map_err(LayerError::Write)?;
    Ok(info)
}

/// Writes `changes` as an uncompressed deterministic tar into `out`: the core of [`pack`].
pub fn write_tar(
    root: &Path,
    changes: &Changeset,
    out: impl Write,
    opts: &PackOptions,
) -> Result<LayerInfo, LayerError> {
    write_tar_as(root, changes, out, opts, true)
}

/// [`write_tar`] without GNU sparse entries: holes are written as zeros, every file is a plain
/// regular entry. For container images: Go's `archive/tar` users (docker, containerd, umoci)
/// refuse GNU sparse entries (`unknown typeflag 'S'`).
pub fn write_tar_dense(
    root: &Path,
    changes: &Changeset,
    out: impl Write,
    opts: &PackOptions,
) -> Result<LayerInfo, LayerError> {
    write_tar_as(root, changes, out, opts, false)
}

fn write_tar_as(
    root: &Path,
    changes: &Changeset,
    out: impl Write,
    opts: &PackOptions,
    sparse: bool,
) -> Result<LayerInfo, LayerError> {
    let hw = HashWriter {
        inner: out,
        hasher: blake3::Hasher::new(),
        n: 0,
    };
    let mut tw = TarWriter {
        w: BufWriter::with_capacity(BUF, hw),
        buf: vec![0u8; BUF],
        epoch: opts.source_date_epoch,
        entries: 0,
        full: PathBuf::new(),
        root,
        links: HashMap::new(),
        sparse,
    };
    for change in changes.iter() {
        match &change.kind {
            ChangeKind::Whiteout => tw.marker(&change.tar_path())?,
            ChangeKind::Write { meta, opaque } => {
                tw.entry(&change.path, meta)?;
                if *opaque {
                    let mut p = change.path.clone();
                    if !p.is_empty() {
                        p.push(b'/');
                    }
                    p.extend_from_slice(b".wh..wh..opq");
                    tw.marker(&p)?;
                }
            }
        }
    }
    let entries = tw.entries;
    let mut w = tw.w;
    // End of archive: two zero blocks.
    w.write_all(&[0u8; 1024]).map_err(LayerError::Write)?;
    let hw = w
        .into_inner()
        .map_err(|e| LayerError::Write(e.into_error()))?;
    let mut inner = hw.inner;
    inner.flush().map_err(LayerError::Write)?;
    Ok(LayerInfo {
        diff_id: hw.hasher.finalize().to_hex().to_string(),
        tar_size: hw.n,
        entries,
    })
}

struct TarWriter<'a, W: Write> {
    w: BufWriter<HashWriter<W>>,
    buf: Vec<u8>,
    epoch: Option<i64>,
    entries: u64,
    full: PathBuf,
    root: &'a Path,
    /// (dev, ino) of multiply-linked non-directories already written → their tar path.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Whether runs of zeros may become GNU sparse holes.
    sparse: bool,
}

fn pad_len(n: u64) -> usize {
    ((512 - (n % 512)) % 512) as usize
}

fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    let all = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0);
    all && chunks.remainder().iter().all(|&x| x == 0)
}

impl<W: Write> TarWriter<'_, W> {
    fn werr(e: io::Error) -> LayerError {
        LayerError::Write(e)
    }

    fn set_full(&mut self, rel: &[u8]) -> &Path {
        self.full.clear();
        self.full.push(self.root);
        if !rel.is_empty() {
            self.full.push(OsStr::from_bytes(rel));
        }
        &self.full
    }

    fn read_err(&self, e: io::Error) -> LayerError {
        if e.kind() == io::ErrorKind::NotFound {
            LayerError::Changed {
                path: self.full.clone(),
                what: "it vanished",
            }
        } else {
            LayerError::Read {
                path: self.full.clone(),
                source: e,
            }
        }
    }

    fn pad(&mut self, n: u64) -> io::Result<()> {
        let p = pad_len(n);
        if p > 0 {
            self.w.write_all(&[0u8; 512][..p])?;
        }
        Ok(())
    }

    /// A metadata record that applies to the next entry: a fixed pseudo-name, root-owned,
    /// mtime 0, `body` as its data.
    fn meta_record(&mut self, name: &[u8], kind: EntryType, body: &[u8]) -> io::Result<()> {
        let mut h = Header::new_gnu();
        if let Some(g) = h.as_gnu_mut() {
            g.name[..name.len()].copy_from_slice(name);
        }
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(body.len() as u64);
        h.set_entry_type(kind);
        h.set_cksum();
        self.w.write_all(h.as_bytes())?;
        self.w.write_all(body)?;
        self.pad(body.len() as u64)
    }

    /// A GNU `././@LongLink` record (`L` for a long name, `K` for a long link target); the
    /// data carries a terminating NUL.
    fn long_record(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        let mut body = Vec::with_capacity(data.len() + 1);
        body.extend_from_slice(data);
        body.push(0);
        self.meta_record(b"././@LongLink", EntryType::new(kind), &body)
    }

    /// A PAX extended header record set for the next entry.
    fn pax(&mut self, records: &Xattrs) -> io::Result<()> {
        let mut body = Vec::new();
        for (k, v) in records {
            let base = k.len() + v.len() + 3;
            let mut len = base + base.to_string().len();
            if len.to_string().len() > base.to_string().len() {
                len += 1;
            }
            body.extend_from_slice(len.to_string().as_bytes());
            body.push(b' ');
            body.extend_from_slice(k);
            body.push(b'=');
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.meta_record(b"././@PaxHeader", EntryType::XHeader, &body)
    }

    /// Sets name (and link name), emitting long-name records first when needed, then writes
    /// the header block itself.
    fn header(&mut self, h: &mut Header, name: &[u8], link: Option<&[u8]>) -> io::Result<()> {
        if name.len() > 100 {
            self.long_record(b'L', name)?;
        }
        if let Some(l) = link
            && l.len() > 100
        {
            self.long_record(b'K', l)?;
        }
        if let Some(g) = h.as_gnu_mut() {
            let n = name.len().min(100);
            g.name[..n].copy_from_slice(&name[..n]);
            if let Some(l) = link {
                let n = l.len().min(100);
                g.linkname[..n].copy_from_slice(&l[..n]);
            }
        }
        h.set_cksum();
        self.w.write_all(h.as_bytes())?;
        self.entries += 1;
        Ok(())
    }

    fn base_header(&self, meta: &Meta, kind: EntryType) -> Header {
        let mut h = Header::new_gnu();
        let mut mtime = meta.mtime.max(0);
        if let Some(e) = self.epoch {
            mtime = mtime.min(e.max(0));
        }
        h.set_mode(meta.mode & 0o7777);
        h.set_uid(meta.uid as u64);
        h.set_gid(meta.gid as u64);
        h.set_mtime(mtime as u64);
        h.set_size(0);
        h.set_entry_type(kind);
        h
    }

    /// An empty whiteout or opaque marker file.
    fn marker(&mut self, name: &[u8]) -> Result<(), LayerError> {
        let mut h = Header::new_gnu();
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_entry_type(EntryType::Regular);
        self.header(&mut h, name, None).map_err(Self::werr)
    }

    fn xattrs(&mut self) -> Result<Xattrs, LayerError> {
        let names = match xattr::list(&self.full) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(self.read_err(e)),
        };
        let mut names: Vec<_> = names.collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(v) = xattr::get(&self.full, &n).map_err(|e| self.read_err(e))? {
                let mut k = b"SCHILY.xattr.".to_vec();
                k.extend_from_slice(n.as_bytes());
                out.push((k, v));
            }
        }
        Ok(out)
    }

    fn entry(&mut self, rel: &[u8], meta: &Meta) -> Result<(), LayerError> {
        if meta.kind == FileKind::Socket {
            return Ok(());
        }
        self.set_full(rel);
        let name: Vec<u8> = if rel.is_empty() {
            b"./".to_vec()
        } else if meta.kind == FileKind::Dir {
            let mut n = rel.to_vec();
            n.push(b'/');
            n
        } else {
            rel.to_vec()
        };
        // Hardlinks: the first path of an inode in this layer carries the data.
        if meta.kind != FileKind::Dir && meta.nlink > 1 {
            let key = (meta.dev, meta.ino);
            if let Some(first) = self.links.get(&key).cloned() {
                let mut h = self.base_header(meta, EntryType::Link);
                return self.header(&mut h, &name, Some(&first)).map_err(Self::werr);
            }
            self.links.insert(key, rel.to_vec());
        }
        let xattrs = self.xattrs()?;
        if !xattrs.is_empty() {
            self.pax(&xattrs).map_err(Self::werr)?;
        }
        match meta.kind {
            FileKind::Dir => {
                let mut h = self.base_header(meta, EntryType::Directory);
                self.header(&mut h, &name, None).map_err(Self::werr)
            }
            FileKind::Symlink => {
                let target = meta.link_target.clone().unwrap_or_default();
                let mut h = self.base_header(meta, EntryType::Symlink);
                self.header(&mut h, &name, Some(&target))
                    .map_err(Self::werr)
            }
            FileKind::Char | FileKind::Block | FileKind::Fifo => {
                let kind = match meta.kind {
                    FileKind::Char => EntryType::Char,
                    FileKind::Block => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let mut h = self.base_header(meta, kind);
                if meta.kind != FileKind::Fifo {
                    let dev = meta.rdev;
                    h.set_device_major(libc::major(dev as libc::dev_t))
                        .map_err(Self::werr)?;
                    h.set_device_minor(libc::minor(dev as libc::dev_t))
                        .map_err(Self::werr)?;
                }
                self.header(&mut h, &name, None).map_err(Self::werr)
            }
            FileKind::File => self.file(&name, meta),
            FileKind::Socket => Ok(()),
        }
    }

    fn changed(&self, what: &'static str) -> LayerError {
        LayerError::Changed {
            path: self.full.clone(),
            what,
        }
    }

    fn file(&mut self, name: &[u8], meta: &Meta) -> Result<(), LayerError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&self.full)
            .map_err(|e| self.read_err(e))?;
        let md = f.metadata().map_err(|e| self.read_err(e))?;
        if !md.is_file() || md.ino() != meta.ino || md.len() != meta.size {
            return Err(self.changed("its type, inode or size differs from the scan"));
        }
        let size = meta.size;
        let mut preloaded = false;
        let mut segments: Option<Vec<(u64, u64)>> = None;
        if self.sparse && size >= 2 * SPARSE_CHUNK {
            let (segs, pre) = self.sparse_map(&f, size)?;
            preloaded = pre;
            if !(segs.len() == 1 && segs[0] == (0, size)) {
                segments = Some(segs);
            }
        }
        let mut h = self.base_header(meta, EntryType::Regular);
        match segments {
            None => {
                h.set_size(size);
                self.header(&mut h, name, None).map_err(Self::werr)?;
                if preloaded {
                    let n = size as usize;
                    self.w.write_all(&self.buf[..n]).map_err(Self::werr)?;
                } else {
                    self.copy_range(&f, 0, size)?;
                }
                self.pad(size).map_err(Self::werr)
            }
            Some(mut segs) => {
                let on_disk: u64 = segs.iter().map(|s| s.1).sum();
                if segs.last().is_none_or(|s| s.0 + s.1 != size) {
                    segs.push((size, 0));
                }
                h.set_entry_type(EntryType::GNUSparse);
                h.set_size(on_disk);
                if let Some(g) = h.as_gnu_mut() {
                    g.set_real_size(size);
                    for (s, slot) in segs.iter().zip(g.sparse.iter_mut()) {
                        slot.set_offset(s.0);
                        slot.set_length(s.1);
                    }
                    g.set_is_extended(segs.len() > 4);
                }
                self.header(&mut h, name, None).map_err(Self::werr)?;
                let mut rest = segs.iter().skip(4).peekable();
                while rest.peek().is_some() {
                    let mut ext = GnuExtSparseHeader::new();
                    for slot in ext.sparse.iter_mut() {
                        match rest.next() {
                            Some(s) => {
                                slot.set_offset(s.0);
                                slot.set_length(s.1);
                            }
                            None => break,
                        }
                    }
                    ext.set_is_extended(rest.peek().is_some());
                    self.w.write_all(ext.as_bytes()).map_err(Self::werr)?;
                }
                for &(off, len) in &segs {
                    if len == 0 {
                        continue;
                    }
                    if preloaded {
                        let (s, e) = (off as usize, (off + len) as usize);
                        self.w.write_all(&self.buf[s..e]).map_err(Self::werr)?;
                    } else {
                        self.copy_range(&f, off, len)?;
                    }
                }
                self.pad(on_disk).map_err(Self::werr)
            }
        }
    }

    /// Copies `len` bytes at `off` of `f` into the stream; a short file is an error.
    fn copy_range(&mut self, f: &File, mut off: u64, len: u64) -> Result<(), LayerError> {
        let end = off + len;
        while off < end {
            let want = ((end - off) as usize).min(self.buf.len());
            let n = f
                .read_at(&mut self.buf[..want], off)
                .map_err(|e| self.read_err(e))?;
            if n == 0 {
                return Err(self.changed("it shrank"));
            }
            self.w.write_all(&self.buf[..n]).map_err(Self::werr)?;
            off += n as u64;
        }
        Ok(())
    }

    /// The data segments of a file from its content: aligned all-zero [`SPARSE_CHUNK`]s are
    /// holes (the last, partial chunk is always data). Files that fit the buffer are read once
    /// and kept there (returns `true`); bigger ones skip file-system holes with `SEEK_DATA`.
    fn sparse_map(&mut self, f: &File, size: u64) -> Result<(Vec<(u64, u64)>, bool), LayerError> {
        let chunk = SPARSE_CHUNK;
        let mut segs: Vec<(u64, u64)> = Vec::new();
        let add = |segs: &mut Vec<(u64, u64)>, off: u64, len: u64| match segs.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => segs.push((off, len)),
        };
        let preload = size <= self.buf.len() as u64;
        let mut off = 0u64;
        while off < size {
            if !preload {
                // SAFETY: lseek on an owned, open descriptor.
                let d = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
                let next = if d < 0 {
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::ENXIO) => size,
                        _ => off,
                    }
                } else {
                    d as u64
                };
                off = (next / chunk * chunk).max(off);
                if off >= size {
                    break;
                }
            }
            let want = ((size - off) as usize).min(self.buf.len());
            let mut got = 0;
            while got < want {
                let n = f
                    .read_at(&mut self.buf[got..want], off + got as u64)
                    .map_err(|e| self.read_err(e))?;
                if n == 0 {
                    return Err(self.changed("it shrank"));
                }
                got += n;
            }
            let mut k = 0usize;
            while k < want {
                let clen = (chunk as usize).min(want - k);
                let abs = off + k as u64;
                let partial_tail = abs + chunk > size;
                if partial_tail || !is_zero(&self.buf[k..k + clen]) {
                    add(&mut segs, abs, clen as u64);
                }
                k += clen;
            }
            off += want as u64;
        }
        Ok((segs, preload))
    }
}
