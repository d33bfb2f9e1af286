//! Tree outputs (`tar`, `tgz`, `squashfs`): written from a finished root folder (the restored
//! rootfs, or the mounted disk), each kept in the cache as a zstd blob under a key the caller
//! chooses, and written back from that blob on a no-op rebuild; and the sparse, verified copy
//! of any cached output blob back into a file.
//!
//! ```text
//! write(cache, root, scan, [(type, key)], ..)
//!   tar, tgz   ONE deterministic tar stream (layer::write_tar, which hashes it: the tar's digest)
//!                ├─► NAME.tar (temp file, renamed into place)
//!                │     └─► chunked blob (chunked.rs): zstd frames of content-defined chunks;
//!                │         a chunk the previous tar output of NAME had is not compressed
//!                │         again, its frame is copied from that output's blob
//!                │         + its chunk index, kept as the output key(blake3(path), "tar-chunk-index")
//!                └─► gzip -9 ─► NAME.tgz (+ one zstd stream of it as its blob; hashed)
//!              (flate2: no file name, mtime 0, so NAME.tgz is gunzip-equal to NAME.tar)
//!   squashfs   mksquashfs ROOT NAME.squash -comp xz -noappend [-all-time T -mkfs-time T]
//!              -e proc/* sys/*  ─► hashed ─► blob
//! keep(cache, key, reader, copy_to)   one pass: blake3 + zstd blob (+ a sparse copy); keep_as
//!                                     with Packing::Stored: raw zstd blocks, for content that
//!                                     is compressed already (stored.rs)
//! restore(cache, digest, path)        blob ─► temp file beside path (sparse) ─► digest checked
//!                                     ─► renamed into place (a bad blob never leaves a file)
//! ```
//!
//! The chunk index of the last tar output written to a path is kept under an output key of
//! that path (its folder canonicalized), so the next write of the same name finds it; the
//! previous blob it names is read at random from its local file ([`StepCache::blob_file`]) once
//! its digest checked out. Whatever is missing or does not check out (no index, an evicted
//! blob, a damaged one, another zstd level) means a full write, with a debug line saying why;
//! the blob's bytes are the same either way. The log
//! says how many chunks were reused (`NAME.tar: cached copy in N chunks, K reused from the
//! previous output, M MB compressed`). The tgz's blob stays one zstd stream: the gzip stream
//! it holds is made anew every time (`gzip -9` bytes cannot be reused by chunk), and zstd of it
//! gains nothing from chunks.
//!
//! Measured on `debian-minimal -t tar` (825 MB tar, 380 chunks), rebuilds after an edit of the
//! last install.d hook with `--keep-tree`, this writer against the one-stream one, interleaved
//! on the same (loaded, 2-core) machine: `output tar` 1.34-1.53 s against 3.50-4.17 s, the
//! whole rebuild 4.3-4.9 s against 6.5-7.2 s (376 chunks reused, 5 MB compressed). What is left
//! is ~1.6 s of CPU: reading the tree, writing the file, blake3 of the tar, of its chunks, of
//! the previous blob (checked) and of the new one. The blob is 2.5 % larger than one zstd
//! stream of the tar (265 against 258.5 MB; fixed 1 MiB chunks would cost 5.7 %).
//!
//! The squashfs file is `NAME.squash`, as dib names it. With SOURCE_DATE_EPOCH set, every time
//! in it is that value (mksquashfs has no clamp: the tar keeps older mtimes, the squashfs does
//! not); without it, mksquashfs records the files' times and the current time.
//! dib's `DIB_GZIP_BIN` is not used: the gzip stream is made in-process, so its bytes do not
//! depend on the host's gzip. Every loop here stops on SIGINT/SIGTERM ([`crate::cancel`]).

mod chunked;

use super::{OutputType, Timings, Written};
use crate::cache::{BlobSink, StepCache};
use crate::exit::{Exit, Failure};
use crate::fsutil::{now, temp_beside};
use crate::layer::{self, Changeset, PackOptions, Scan};
use anyhow::{Context, Result};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Writes the tree outputs `wanted` (type, cache key) of the folder `root` as `NAME.<ext>`,
/// keeping each as a blob under its key in `cache`. `scan` (of `root`) is needed for `tar`
/// and `tgz` ([`OutputType::needs_scan`]). Returns the outputs in `wanted` order and their
/// timings.
pub fn write(
    cache: &dyn StepCache,
    root: &Path,
    scan: Option<&Scan>,
    wanted: &[(OutputType, String)],
    image_name: &str,
    opts: &PackOptions,
) -> Result<(Vec<Written>, Timings)> {
    let mut written = Vec::new();
    let mut timings = Vec::new();
    let key_of = |ty: OutputType| {
        wanted
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, k)| k.as_str())
    };
    let (tar_key, tgz_key) = (key_of(OutputType::Tar), key_of(OutputType::Tgz));
    if tar_key.is_some() || tgz_key.is_some() {
        let started = Instant::now();
        let scan = scan.context("a tar output needs a scan of the root folder")?;
        let mut fan = Fan {
            tar: tar_key
                .map(|_| FileSink::create_tar(&OutputType::Tar.path(image_name), cache, opts))
                .transpose()?,
            tgz: match tgz_key {
                Some(_) => {
                    let sink = FileSink::create(&OutputType::Tgz.path(image_name), cache, opts)?;
                    // OS 3 (Unix) as gzip writes it; no name, mtime 0: reproducible bytes.
                    Some(
                        flate2::GzBuilder::new()
                            .mtime(0)
                            .operating_system(3)
                            .write(sink, flate2::Compression::best()),
                    )
                }
                None => None,
            },
        };
        let info = match layer::write_tar(root, &Changeset::full(scan), &mut fan, opts) {
            Ok(info) => {
                tracing::debug!(
                    "tar stream of {} written in {:.3} s",
                    root.display(),
                    started.elapsed().as_secs_f64()
                );
                info
            }
            Err(e) => {
                // An output file that could not be written (a full output folder) is the
                // cause, not "the layer stream".
                let failed = fan
                    .tar
                    .as_ref()
                    .and_then(|t| t.failed.clone())
                    .or_else(|| fan.tgz.as_ref().and_then(|g| g.get_ref().failed.clone()));
                return Err(match failed {
                    Some(why) => anyhow::anyhow!(why),
                    None => e.into(),
                });
            }
        };
        let label: Vec<&str> = [("tar", &tar_key), ("tgz", &tgz_key)]
            .into_iter()
            .filter(|(_, k)| k.is_some())
            .map(|(t, _)| t)
            .collect();
        if let (Some(mut sink), Some(key)) = (fan.tar, tar_key) {
            // The tar file's digest is the stream's, which write_tar hashed already.
            sink.blake3 = Some(info.diff_id.clone());
            written.push(sink.finish(cache, key, OutputType::Tar, image_name)?);
        }
        if let (Some(gz), Some(key)) = (fan.tgz, tgz_key) {
            let sink = gz.finish().with_context(|| {
                format!(
                    "cannot write {}",
                    OutputType::Tgz.path(image_name).display()
                )
            })?;
            written.push(sink.finish(cache, key, OutputType::Tgz, image_name)?);
        }
        timings.push((
            format!("output {}", label.join("+")),
            started.elapsed().as_secs_f64(),
        ));
    }
    if let Some(key) = key_of(OutputType::Squashfs) {
        let started = Instant::now();
        written.push(write_squashfs(cache, root, key, image_name, opts)?);
        timings.push(("output squashfs".into(), started.elapsed().as_secs_f64()));
    }
    written.sort_by_key(|w| wanted.iter().position(|(t, _)| *t == w.r#type));
    Ok((written, timings))
}

/// `mksquashfs ROOT NAME.squash -comp xz -noappend` into a temp file beside the output, then
/// hashed (and stored) and renamed into place.
fn write_squashfs(
    cache: &dyn StepCache,
    root: &Path,
    key: &str,
    image_name: &str,
    opts: &PackOptions,
) -> Result<Written> {
    let dest = OutputType::Squashfs.path(image_name);
    let tmp = temp_beside(&dest)?;
    let mut cmd = Command::new("mksquashfs");
    cmd.arg(root)
        .arg(tmp.path())
        .args(["-comp", "xz", "-noappend", "-no-progress", "-quiet"])
        // mksquashfs refuses SOURCE_DATE_EPOCH together with the time options below.
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null());
    if let Some(sde) = opts.source_date_epoch {
        let t = u32::try_from(sde).map_err(|_| {
            Failure::bad_input(format!(
                "SOURCE_DATE_EPOCH={sde}: too large or negative for a squashfs (32-bit times)"
            ))
        })?;
        cmd.arg("-all-time")
            .arg(t.to_string())
            .arg("-mkfs-time")
            .arg(t.to_string());
    }
    // Like dib's tar: leave out what lives under the API file systems' mount points.
    cmd.args(["-wildcards", "-e", "proc/*", "sys/*"]);
    let shown = format!("mksquashfs {} {}", root.display(), dest.display());
    let out = match crate::tools::output(&mut cmd) {
        Ok(out) => out,
        Err(e)
            if e.get_ref()
                .is_some_and(|i| i.is::<crate::cancel::Cancelled>()) =>
        {
            return Err(e.into());
        }
        Err(e) => {
            return Err(Failure::new(
                Exit::Environment,
                format!("cannot run mksquashfs ({e}); install the Debian package squashfs-tools"),
            )
            .into());
        }
    };
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        anyhow::bail!("{shown} failed ({}): {}", out.status, last.trim());
    }
    crate::fsutil::set_mode(tmp.path(), 0o644)
        .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
    let blake3 = store_file(cache, key, tmp.path())?;
    crate::fsutil::persist_replacing(tmp, &dest)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(Written {
        r#type: OutputType::Squashfs,
        path: dest,
        blake3,
        cached: false,
    })
}

/// Hashes the file at `p` and keeps it as a zstd blob under `key` (if the cache keeps any).
fn store_file(cache: &dyn StepCache, key: &str, p: &Path) -> Result<String> {
    let mut src = fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    keep(cache, key, &mut src, None)
}

/// How [`keep_as`] puts an output into its zstd blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// Compressed (zstd level 3, two threads).
    Zstd,
    /// Stored in raw blocks: for content that is compressed already (a compressed qcow2).
    Stored,
}

/// The encoder of one blob, either packing.
enum BlobEncoder<'a> {
    Zstd(zstd::Encoder<'static, &'a mut Box<dyn BlobSink>>),
    Stored(super::stored::StoredFrame<&'a mut Box<dyn BlobSink>>),
}

impl BlobEncoder<'_> {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            BlobEncoder::Zstd(e) => e.write_all(data),
            BlobEncoder::Stored(e) => e.write_all(data),
        }
    }

    fn finish(self) -> io::Result<()> {
        match self {
            BlobEncoder::Zstd(e) => e.finish().map(drop),
            BlobEncoder::Stored(e) => e.finish().map(drop),
        }
    }
}

/// Reads `src` once: hashes it, keeps it zstd-compressed as an output blob under `key` (if the
/// cache keeps any), and writes it sparse to `copy_to` (when given). Returns the blake3 of the
/// content.
pub fn keep(
    cache: &dyn StepCache,
    key: &str,
    src: &mut impl Read,
    copy_to: Option<&Path>,
) -> Result<String> {
    keep_as(cache, key, src, copy_to, Packing::Zstd)
}

/// [`keep`], with the blob packed as `packing` says.
pub fn keep_as(
    cache: &dyn StepCache,
    key: &str,
    src: &mut impl Read,
    copy_to: Option<&Path>,
    packing: Packing,
) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut sparse = match copy_to {
        Some(p) => Some((SparseFile::create(p)?, p)),
        None => None,
    };
    let mut blob: Option<Box<dyn BlobSink>> = cache.blob_sink()?;
    {
        let mut enc = match (blob.as_mut(), packing) {
            (Some(b), Packing::Zstd) => {
                let mut e = zstd::Encoder::new(b, 3)?;
                e.multithread(2)?;
                Some(BlobEncoder::Zstd(e))
            }
            (Some(b), Packing::Stored) => {
                Some(BlobEncoder::Stored(super::stored::StoredFrame::new(b)))
            }
            (None, _) => None,
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            crate::cancel::check()?;
            let n = read_full(src, &mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            if let Some(e) = enc.as_mut() {
                e.write_all(chunk)?;
            }
            if let Some((f, p)) = sparse.as_mut() {
                f.write(chunk)
                    .map_err(|e| anyhow::anyhow!(crate::fsutil::write_error(p, &e)))?;
            }
        }
        if let Some(e) = enc {
            e.finish()?;
        }
    }
    if let Some((f, p)) = sparse {
        f.persist(p)?;
    }
    if let Some(blob) = blob {
        let (digest, size) = blob.finish()?;
        cache.put_output(key, &digest, size, now())?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The output cached under `out_key`, written to `path` (and marked used): its blake3, or None
/// when there is none or its blob turns out damaged (a warning says so, ending with `then`,
/// what the build does instead).
pub fn restore_cached(
    cache: &dyn StepCache,
    out_key: &str,
    kind: OutputType,
    path: &Path,
    then: &str,
) -> Result<Option<String>> {
    let Some(rec) = cache.get_output(out_key)? else {
        return Ok(None);
    };
    let restored = if kind == OutputType::Oci {
        super::folder::restore(cache, &rec.blob_digest, path)
            .and_then(|()| super::oci::layout_blake3(path).map_err(anyhow::Error::new))
    } else {
        restore(cache, &rec.blob_digest, path)
    };
    match restored {
        Ok(digest) => {
            if cache.writable() {
                cache.touch_output(out_key, now())?;
                cache.share_output(&rec)?;
            }
            Ok(Some(digest))
        }
        Err(e) if crate::cancel::find(&e).is_some() => Err(e),
        Err(e) => {
            tracing::warn!(
                "cached {kind} output is corrupt ({}); {then}",
                crate::exit::render(&e)
            );
            Ok(None)
        }
    }
}

/// Writes a cached output blob (zstd) to `path`, sparse: into a temp file beside it that is
/// renamed into place only once the blob's digest checked out, so a damaged blob never leaves
/// a bad file under the output's name (the cache sees the mismatch and deletes the blob).
/// Returns the blake3 of what was written.
pub fn restore(cache: &dyn StepCache, digest: &str, path: &Path) -> Result<String> {
    let mut blob = cache.open_blob(digest)?;
    let mut out = SparseFile::create(path)?;
    let written = (|| -> Result<String> {
        let mut dec = zstd::Decoder::new(&mut blob)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            crate::cancel::check()?;
            let n = read_full(&mut dec, &mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write(&buf[..n])
                .map_err(|e| anyhow::anyhow!(crate::fsutil::write_error(path, &e)))?;
        }
        Ok(hasher.finalize().to_hex().to_string())
    })();
    let checked = blob.finish();
    let digest = written?;
    checked.with_context(|| format!("the cached copy of {} is damaged", path.display()))?;
    out.persist(path)?;
    Ok(digest)
}

fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The tar stream's destinations: the tar file and/or the gzip encoder of the tgz file.
struct Fan {
    tar: Option<FileSink>,
    tgz: Option<flate2::write::GzEncoder<FileSink>>,
}

impl Write for Fan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::cancel::check_io()?;
        if let Some(t) = self.tar.as_mut() {
            t.write_all(buf)?;
        }
        if let Some(g) = self.tgz.as_mut() {
            g.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        // Not the gzip encoder: its flush is a deflate sync point, which would put bytes in
        // the stream that `gzip -9` does not write. `GzEncoder::finish` writes everything.
        if let Some(t) = self.tar.as_mut() {
            t.flush()?;
        }
        Ok(())
    }
}

/// What the output key of a tar output's chunk index is derived from, with its path.
const TAR_CHUNKS: &str = "tar-chunk-index";

/// The output key under which the chunk index of the last tar output written to `dest` is
/// kept: one per output path (its folder as the file system names it), so that the next write
/// of the same name finds it.
fn chunk_index_key(dest: &Path) -> String {
    let abs = std::path::absolute(dest).unwrap_or_else(|_| dest.to_path_buf());
    let abs = match (abs.parent(), abs.file_name()) {
        (Some(p), Some(f)) => fs::canonicalize(p)
            .map(|p| p.join(f))
            .unwrap_or(abs.clone()),
        _ => abs,
    };
    let name = blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex();
    crate::key::output_key(name.as_str(), TAR_CHUNKS)
}

/// Where an output file's cached copy goes.
enum BlobOut {
    /// One zstd stream (the tgz: zstd of the gzip bytes, which would gain nothing from chunks).
    Stream(zstd::Encoder<'static, Box<dyn BlobSink>>),
    /// zstd frames of chunks, reusing the previous output's (the tar), at this level.
    Chunked(chunked::ChunkedBlob, i32),
}

/// One output file being written: a temp file beside it, hashed, and copied into a zstd blob
/// when the cache keeps outputs.
struct FileSink {
    file: BufWriter<tempfile::NamedTempFile>,
    /// Hashes the file as it is written; None when the caller sets `blake3`.
    hasher: Option<blake3::Hasher>,
    blake3: Option<String>,
    blob: Option<BlobOut>,
    /// The output's final name, for messages.
    dest: std::path::PathBuf,
    /// Why writing the file failed, once it did.
    failed: Option<String>,
}

impl FileSink {
    fn new(dest: &Path, blob: Option<BlobOut>, hash: bool) -> Result<FileSink> {
        let tmp = temp_beside(dest)?;
        Ok(FileSink {
            file: BufWriter::with_capacity(1 << 20, tmp),
            hasher: hash.then(blake3::Hasher::new),
            blake3: None,
            blob,
            dest: dest.to_path_buf(),
            failed: None,
        })
    }

    /// A file hashed as it is written, kept as one zstd stream.
    fn create(dest: &Path, cache: &dyn StepCache, opts: &PackOptions) -> Result<FileSink> {
        let blob = match cache.blob_sink()? {
            Some(sink) => {
                let mut enc = zstd::Encoder::new(sink, opts.level)?;
                enc.multithread(opts.workers.max(1))?;
                Some(BlobOut::Stream(enc))
            }
            None => None,
        };
        FileSink::new(dest, blob, true)
    }

    /// The tar file (its digest is set by the caller), kept as chunked frames that reuse the
    /// last tar output's written to `dest`.
    fn create_tar(dest: &Path, cache: &dyn StepCache, opts: &PackOptions) -> Result<FileSink> {
        let blob = match cache.blob_sink()? {
            Some(sink) => {
                let previous = previous_tar(cache, dest, opts.level);
                let previous = match previous {
                    Ok(p) => Some(p),
                    Err(why) => {
                        tracing::debug!("{}: compressing every chunk ({why})", dest.display());
                        None
                    }
                };
                let blob = chunked::ChunkedBlob::new(sink, previous, opts.level, opts.workers);
                Some(BlobOut::Chunked(blob, opts.level))
            }
            None => None,
        };
        FileSink::new(dest, blob, false)
    }

    /// Keeps the blob under `key`, renames the file into place, returns what was written.
    fn finish(
        self,
        cache: &dyn StepCache,
        key: &str,
        ty: OutputType,
        image_name: &str,
    ) -> Result<Written> {
        let dest = ty.path(image_name);
        match self.blob {
            Some(BlobOut::Stream(enc)) => {
                let (digest, size) = enc.finish()?.finish()?;
                cache.put_output(key, &digest, size, now())?;
            }
            Some(BlobOut::Chunked(blob, level)) => {
                let t = Instant::now();
                let (sink, chunks, stats) = blob.finish()?;
                let joined = t.elapsed().as_secs_f64();
                let (digest, size) = sink.finish()?;
                tracing::debug!(
                    "{}: cached copy: last frames written in {joined:.3} s, blob synced in {:.3} s",
                    dest.display(),
                    t.elapsed().as_secs_f64() - joined
                );
                cache.put_output(key, &digest, size, now())?;
                let index = chunked::ChunkIndex {
                    zstd: chunked::zstd_version(),
                    level,
                    blob: digest,
                    blob_size: size,
                    chunks,
                };
                keep(
                    cache,
                    &chunk_index_key(&dest),
                    &mut &index.to_bytes()[..],
                    None,
                )?;
                tracing::debug!(
                    "{}: cached copy recorded, {:.3} s after the stream ended",
                    dest.display(),
                    t.elapsed().as_secs_f64()
                );
                tracing::info!(
                    "{}: cached copy in {} chunks, {} reused from the previous output, {} MB compressed",
                    dest.display(),
                    stats.chunks,
                    stats.reused,
                    stats.compressed_bytes / 1_000_000
                );
            }
            None => {}
        }
        let blake3 = match (self.blake3, self.hasher) {
            (Some(d), _) => d,
            (None, Some(h)) => h.finalize().to_hex().to_string(),
            (None, None) => anyhow::bail!("no digest for {}", dest.display()),
        };
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| anyhow::anyhow!(crate::fsutil::write_error(&dest, e.error())))?;
        crate::fsutil::persist_replacing(tmp, &dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(Written {
            r#type: ty,
            path: dest,
            blake3,
            cached: false,
        })
    }
}

/// The blob of the last tar output written to `dest`, with its chunk index, if its frames can
/// be reused at zstd `level`; else why not.
fn previous_tar(
    cache: &dyn StepCache,
    dest: &Path,
    level: i32,
) -> Result<chunked::Previous, String> {
    let rec = cache
        .get_output(&chunk_index_key(dest))
        .map_err(|e| e.to_string())?
        .ok_or("no chunk index of a previous tar output of this name in the cache")?;
    let bytes = (|| -> Result<Vec<u8>> {
        let mut blob = cache.open_blob(&rec.blob_digest)?;
        let mut bytes = Vec::new();
        zstd::Decoder::new(&mut blob)?.read_to_end(&mut bytes)?;
        blob.finish()?;
        Ok(bytes)
    })()
    .map_err(|e| format!("cannot read the chunk index: {e}"))?;
    let index = chunked::ChunkIndex::from_bytes(&bytes)?;
    if index.level != level || index.zstd != chunked::zstd_version() {
        return Err("the previous output was compressed at another level or zstd version".into());
    }
    let path = cache
        .blob_file(&index.blob)
        .ok_or("the cache keeps no local blob files")?;
    let file = fs::File::open(&path).map_err(|e| format!("cannot open the previous blob: {e}"))?;
    Ok(chunked::Previous::new(file, &index))
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = self.file.write_all(buf) {
            self.failed = Some(crate::fsutil::write_error(&self.dest, &e));
            return Err(e);
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(buf);
        }
        match self.blob.as_mut() {
            Some(BlobOut::Stream(b)) => b.write_all(buf)?,
            Some(BlobOut::Chunked(b, _)) => b.write_all(buf)?,
            None => {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Err(e) = self.file.flush() {
            self.failed = Some(crate::fsutil::write_error(&self.dest, &e));
            return Err(e);
        }
        if let Some(BlobOut::Stream(b)) = self.blob.as_mut() {
            b.flush()?;
        }
        Ok(())
    }
}

/// A temp file beside its destination that skips all-zero 4 KiB blocks (leaving holes), and is
/// renamed into place by `persist`.
struct SparseFile {
    tmp: tempfile::NamedTempFile,
    pos: u64,
}

impl SparseFile {
    const BLOCK: usize = 4096;

    fn create(dest: &Path) -> Result<SparseFile> {
        let tmp = temp_beside(dest)?;
        Ok(SparseFile { tmp, pos: 0 })
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let file = self.tmp.as_file();
        let mut start = None;
        for (i, block) in chunk.chunks(Self::BLOCK).enumerate() {
            let zero = block.iter().all(|&b| b == 0);
            match (zero, start) {
                (false, None) => start = Some(i * Self::BLOCK),
                (true, Some(s)) => {
                    file.write_all_at(&chunk[s..i * Self::BLOCK], self.pos + s as u64)?;
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            file.write_all_at(&chunk[s..], self.pos + s as u64)?;
        }
        self.pos += chunk.len() as u64;
        Ok(())
    }

    fn persist(self, dest: &Path) -> Result<()> {
        self.tmp
            .as_file()
            .set_len(self.pos)
            .with_context(|| format!("cannot size {}", dest.display()))?;
        crate::fsutil::persist_replacing(self.tmp, dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Local, NoCache};
    use crate::store::Store;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn tree(dir: &Path) -> PathBuf {
        let root = dir.join("root");
        fs::create_dir_all(root.join("etc/app")).unwrap();
        fs::create_dir_all(root.join("proc/1")).unwrap();
        fs::create_dir_all(root.join("sys/kernel")).unwrap();
        fs::write(root.join("etc/app/conf"), "hello\n".repeat(1000)).unwrap();
        fs::write(root.join("proc/1/status"), "not kept\n").unwrap();
        std::os::unix::fs::symlink("app/conf", root.join("etc/link")).unwrap();
        root
    }

    fn b3(p: &Path) -> String {
        blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
    }

    fn gunzip(p: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(p).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn unsquash_list(p: &Path) -> String {
        let out = Command::new("unsquashfs")
            .arg("-l")
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wanted(types: &[OutputType]) -> Vec<(OutputType, String)> {
        types.iter().map(|t| (*t, format!("key-of-{t}"))).collect()
    }

    fn local(dir: &Path) -> Local {
        Local::new(Store::open(&dir.join("cache")).unwrap())
    }

    fn opts(sde: Option<i64>) -> PackOptions {
        PackOptions {
            source_date_epoch: sde,
            level: 3,
            workers: 1,
        }
    }

    #[test]
    fn tar_tgz_and_squashfs_from_one_tree_stored_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path());
        let cache = local(dir.path());
        let name = dir.path().join("img").display().to_string();
        let scan = layer::scan(&root, &Default::default()).unwrap();
        let want = wanted(&[OutputType::Squashfs, OutputType::Tgz, OutputType::Tar]);
        let (written, timings) =
            write(&cache, &root, Some(&scan), &want, &name, &opts(None)).unwrap();
        let types: Vec<OutputType> = written.iter().map(|w| w.r#type).collect();
        assert_eq!(
            types,
            [OutputType::Squashfs, OutputType::Tgz, OutputType::Tar]
        );
        assert_eq!(timings.len(), 2, "{timings:?}");
        let (tar, tgz, squash) = (
            OutputType::Tar.path(&name),
            OutputType::Tgz.path(&name),
            OutputType::Squashfs.path(&name),
        );
        for w in &written {
            assert_eq!(b3(&w.path), w.blake3, "{}", w.r#type);
            assert_eq!(
                fs::metadata(&w.path).unwrap().permissions().mode() & 0o777,
                0o644
            );
        }
        // The tgz is exactly the tar, gzipped, with no name and no time in its header.
        assert_eq!(gunzip(&tgz), fs::read(&tar).unwrap());
        let head = fs::read(&tgz).unwrap();
        assert_eq!(&head[..4], &[0x1f, 0x8b, 8, 0], "no FNAME flag");
        assert_eq!(&head[4..8], &[0, 0, 0, 0], "mtime 0");
        // The squashfs holds the tree, without what lives under proc and sys.
        let list = unsquash_list(&squash);
        assert!(list.contains("squashfs-root/etc/app/conf"), "{list}");
        assert!(list.contains("squashfs-root/etc/link"), "{list}");
        assert!(list.lines().any(|l| l == "squashfs-root/proc"), "{list}");
        assert!(!list.contains("proc/1"), "{list}");
        assert!(!list.contains("sys/kernel"), "{list}");

        // Every output is in the cache under its key, and restores byte for byte.
        for w in &written {
            let rec = cache
                .get_output(&format!("key-of-{}", w.r#type))
                .unwrap()
                .unwrap();
            fs::remove_file(&w.path).unwrap();
            assert_eq!(
                restore(&cache, &rec.blob_digest, &w.path).unwrap(),
                w.blake3
            );
            assert_eq!(b3(&w.path), w.blake3);
        }
    }

    #[test]
    fn a_damaged_cached_output_never_appears_under_the_output_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = local(dir.path());
        let data = vec![7u8; 3 << 20];
        keep(&cache, "k", &mut &data[..], None).unwrap();
        let rec = cache.get_output("k").unwrap().unwrap();
        // Flip a byte of the blob, keeping its size.
        let blob = cache.store().blob_path(&rec.blob_digest);
        let mut bytes = fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&blob, bytes).unwrap();
        let dest = dir.path().join("img.raw");
        assert!(restore(&cache, &rec.blob_digest, &dest).is_err());
        assert!(!dest.exists(), "a bad output was left under its name");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| {
                n.to_string_lossy()
                    .starts_with(crate::fsutil::OUTPUT_TEMP_PREFIX)
            })
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }

    #[test]
    fn sparse_copy_keeps_content_and_leaves_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[5000] = 1; // in the 2nd block
        data[(6 << 20) + 10] = 7;
        let last = data.len() - 1;
        data[last] = 9;
        let dest = dir.path().join("out.raw");
        let digest = keep(&NoCache, "k", &mut &data[..], Some(&dest)).unwrap();
        assert_eq!(digest, blake3::hash(&data).to_hex().to_string());
        assert_eq!(fs::read(&dest).unwrap(), data);
        let md = fs::metadata(&dest).unwrap();
        assert_eq!(md.len(), data.len() as u64);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            md.blocks()
        );
        // A file ending in a hole still has its full length.
        let zeros = vec![0u8; 3 << 20];
        let dest2 = dir.path().join("zeros.raw");
        keep(&NoCache, "k", &mut &zeros[..], Some(&dest2)).unwrap();
        assert_eq!(fs::metadata(&dest2).unwrap().len(), 3 << 20);
    }

    #[test]
    fn stored_output_restores_byte_identical_and_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = local(dir.path());
        let mut data = vec![0u8; 4 << 20];
        data[123] = 42;
        data[3 << 20] = 1;
        let digest = keep(&cache, "out-key", &mut &data[..], None).unwrap();
        let rec = cache.get_output("out-key").unwrap().unwrap();
        let dest = dir.path().join("back.raw");
        assert_eq!(restore(&cache, &rec.blob_digest, &dest).unwrap(), digest);
        assert_eq!(fs::read(&dest).unwrap(), data);
        assert!(fs::metadata(&dest).unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn with_source_date_epoch_the_outputs_do_not_depend_on_file_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path());
        let want = wanted(&[OutputType::Tgz, OutputType::Squashfs]);
        let mut digests = Vec::new();
        for round in 0..2 {
            if round == 1 {
                // Touch everything: new mtimes, same content.
                let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
                for e in walkdir::WalkDir::new(&root) {
                    let e = e.unwrap();
                    if !e.path_is_symlink() {
                        let f = fs::File::open(e.path()).unwrap();
                        f.set_modified(later).unwrap();
                    }
                }
            }
            let scan = layer::scan(&root, &Default::default()).unwrap();
            let name = dir.path().join(format!("img{round}")).display().to_string();
            let (written, _) = write(
                &NoCache,
                &root,
                Some(&scan),
                &want,
                &name,
                &opts(Some(1_000_000)),
            )
            .unwrap();
            digests.push(written.into_iter().map(|w| w.blake3).collect::<Vec<_>>());
        }
        assert_eq!(digests[0], digests[1]);
    }

    #[test]
    fn a_mksquashfs_failure_names_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("img").display().to_string();
        let missing = dir.path().join("no-such-root");
        let e = write(
            &NoCache,
            &missing,
            None,
            &wanted(&[OutputType::Squashfs]),
            &name,
            &opts(None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mksquashfs"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(!OutputType::Squashfs.path(&name).exists());
        // No temp file left beside the output.
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Times `write` of a tar output of a real tree: `STRATA_BENCH_ROOT=/path/to/rootfs
/// STRATA_BENCH_WORK=/var/tmp/dir cargo test --release --lib outputs::tree::bench -- --ignored
/// --nocapture`. Round 1 writes with an empty cache, round 2 the same tree again, round 3 after
/// `STRATA_BENCH_EDIT` (a file under the root) was appended to.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::cache::Local;
    use crate::store::Store;

    #[test]
    #[ignore]
    fn tar_output_rounds() {
        let (Ok(root), Ok(work)) = (
            std::env::var("STRATA_BENCH_ROOT"),
            std::env::var("STRATA_BENCH_WORK"),
        ) else {
            eprintln!("set STRATA_BENCH_ROOT and STRATA_BENCH_WORK");
            return;
        };
        let (root, work) = (Path::new(&root), Path::new(&work));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        let cache = Local::new(Store::open(&work.join("cache")).unwrap());
        let name = work.join("out").display().to_string();
        let opts = PackOptions::default();
        for round in 1..=3 {
            if round == 3
                && let Ok(edit) = std::env::var("STRATA_BENCH_EDIT")
            {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(root.join(edit))
                    .unwrap();
                writeln!(f, "# bench edit").unwrap();
            }
            let scan = layer::scan(root, &Default::default()).unwrap();
            let t = Instant::now();
            let cpu0 = cpu_seconds();
            let last = format!("bench-last-{round}");
            let want = vec![(OutputType::Tar, crate::key::output_key(&last, "tar"))];
            let (written, _) = write(&cache, root, Some(&scan), &want, &name, &opts).unwrap();
            eprintln!(
                "round {round}: {:.3} s wall, {:.3} s cpu, {}",
                t.elapsed().as_secs_f64(),
                cpu_seconds() - cpu0,
                written[0].blake3
            );
        }
    }

    fn cpu_seconds() -> f64 {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}
