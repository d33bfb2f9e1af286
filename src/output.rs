//! Tree outputs (`tar`, `tgz`, `squashfs`): written from a finished root folder (the restored
//! rootfs, or the mounted disk), each stored in the cache as a zstd blob under a key the caller
//! chooses, and written back from that blob on a no-op rebuild.
//!
//! ```text
//! check_tools(types, PATH, SOURCE_DATE_EPOCH)   before any hook runs (a missing tool: exit 3)
//! write(store, root, scan, [(type, key)], ..)
//!   tar, tgz   ONE deterministic tar stream (layer::write_tar) ─┬─► NAME.tar            (+ blob)
//!                                                               └─► gzip -9 ─► NAME.tgz (+ blob)
//!              (flate2: no file name, mtime 0, so NAME.tgz is gunzip-equal to NAME.tar)
//!   squashfs   mksquashfs ROOT NAME.squash -comp xz -noappend [-all-time T -mkfs-time T]
//!              -e proc/* sys/*  ─► hashed ─► blob
//! restore(store, blob digest, path)              the blob back into the file, hashed
//! ```
//!
//! The squashfs file is `NAME.squash`, as dib names it. With SOURCE_DATE_EPOCH set, every time
//! in it is that value (mksquashfs has no clamp: the tar keeps older mtimes, the squashfs does
//! not); without it, mksquashfs records the files' times and the current time.
//! dib's `DIB_GZIP_BIN` is not used: the gzip stream is made in-process, so its bytes do not
//! depend on the host's gzip.

use crate::error::{Exit, Failure};
use crate::layer::{self, Changeset, PackOptions, Scan};
use crate::store::{BlobWriter, Store};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The output types written from a root folder.
pub const TREE_TYPES: &[&str] = &["tar", "tgz", "squashfs"];

/// True for `tar`, `tgz` and `squashfs`.
pub fn is_tree_type(t: &str) -> bool {
    TREE_TYPES.contains(&t)
}

/// True when writing `types` needs a scan of the root (the tar stream of `tar` / `tgz`).
pub fn needs_scan<S: AsRef<str>>(types: &[S]) -> bool {
    types.iter().any(|t| matches!(t.as_ref(), "tar" | "tgz"))
}

/// The file an output type is written to: `NAME.<type>`, except `NAME.squash` for squashfs.
pub fn path(image_name: &str, t: &str) -> PathBuf {
    let ext = if t == "squashfs" { "squash" } else { t };
    PathBuf::from(format!("{image_name}.{ext}"))
}

/// Host tools some output types need: (type, program, Debian package).
const TOOLS: &[(&str, &str, &str)] = &[
    ("squashfs", "mksquashfs", "squashfs-tools"),
    ("qcow2", "qemu-img", "qemu-utils"),
    ("vhd", "qemu-img", "qemu-utils"),
];

/// dib's tool checks, made before anything runs: every requested type's host tool must be on
/// `path_env` (exit status 3 otherwise), and a squashfs's SOURCE_DATE_EPOCH must fit its 32-bit
/// times.
pub fn check_tools(
    types: &[String],
    path_env: Option<&OsStr>,
    source_date_epoch: Option<i64>,
) -> Result<(), Failure> {
    for (ty, tool, package) in TOOLS {
        if types.iter().any(|t| t == ty) && crate::tools::find_program(tool, path_env).is_none() {
            return Err(Failure::new(
                Exit::Environment,
                format!(
                    "-t {ty} needs {tool}, which is not on PATH: install the Debian package {package}"
                ),
            ));
        }
    }
    if types.iter().any(|t| t == "squashfs")
        && let Some(sde) = source_date_epoch
        && u32::try_from(sde).is_err()
    {
        return Err(Failure::bad_input(format!(
            "SOURCE_DATE_EPOCH={sde}: -t squashfs stores times as unsigned 32-bit seconds; \
             use a value from 0 to {}",
            u32::MAX
        )));
    }
    Ok(())
}

/// What took how long (seconds), for the build's timing table.
pub type Timings = Vec<(String, f64)>;

/// One output written.
#[derive(Debug, Clone)]
pub struct Written {
    pub r#type: String,
    pub path: PathBuf,
    pub blake3: String,
}

/// Writes the tree outputs `wanted` (type, cache key) of the folder `root` as `NAME.<ext>`,
/// storing each as a blob under its key when there is a store. `scan` (of `root`) is needed
/// for `tar` and `tgz` (see [`needs_scan`]). Returns the outputs in `wanted` order and their
/// timings.
pub fn write(
    store: Option<&Store>,
    root: &Path,
    scan: Option<&Scan>,
    wanted: &[(String, String)],
    image_name: &str,
    opts: &PackOptions,
) -> Result<(Vec<Written>, Timings)> {
    let mut written = Vec::new();
    let mut timings = Vec::new();
    let key_of = |ty: &str| {
        wanted
            .iter()
            .find(|(t, _)| t == ty)
            .map(|(_, k)| k.as_str())
    };
    let (tar_key, tgz_key) = (key_of("tar"), key_of("tgz"));
    if tar_key.is_some() || tgz_key.is_some() {
        let started = Instant::now();
        let scan = scan.context("a tar output needs a scan of the root folder")?;
        let mut fan = Fan {
            tar: tar_key
                .map(|_| FileSink::create(&path(image_name, "tar"), store, opts))
                .transpose()?,
            tgz: match tgz_key {
                Some(_) => {
                    let sink = FileSink::create(&path(image_name, "tgz"), store, opts)?;
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
        layer::write_tar(root, &Changeset::full(scan), &mut fan, opts)?;
        let label: Vec<&str> = [("tar", &tar_key), ("tgz", &tgz_key)]
            .into_iter()
            .filter(|(_, k)| k.is_some())
            .map(|(t, _)| t)
            .collect();
        if let (Some(sink), Some(key)) = (fan.tar, tar_key) {
            written.push(sink.finish(store, key, "tar", image_name)?);
        }
        if let (Some(gz), Some(key)) = (fan.tgz, tgz_key) {
            let sink = gz
                .finish()
                .with_context(|| format!("cannot write {}", path(image_name, "tgz").display()))?;
            written.push(sink.finish(store, key, "tgz", image_name)?);
        }
        timings.push((
            format!("output {}", label.join("+")),
            started.elapsed().as_secs_f64(),
        ));
    }
    if let Some(key) = key_of("squashfs") {
        let started = Instant::now();
        written.push(write_squashfs(store, root, key, image_name, opts)?);
        timings.push(("output squashfs".into(), started.elapsed().as_secs_f64()));
    }
    written.sort_by_key(|w| wanted.iter().position(|(t, _)| *t == w.r#type));
    Ok((written, timings))
}

/// `mksquashfs ROOT NAME.squash -comp xz -noappend` into a temp file beside the output, then
/// hashed (and stored) and renamed into place.
fn write_squashfs(
    store: Option<&Store>,
    root: &Path,
    key: &str,
    image_name: &str,
    opts: &PackOptions,
) -> Result<Written> {
    let dest = path(image_name, "squashfs");
    let tmp = crate::build::temp_beside(&dest)?;
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
    let out = cmd.output().map_err(|e| {
        Failure::new(
            Exit::Environment,
            format!("cannot run mksquashfs ({e}); install the Debian package squashfs-tools"),
        )
    })?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        anyhow::bail!("{shown} failed ({}): {}", out.status, last.trim());
    }
    crate::build::set_mode(tmp.path(), 0o644)
        .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
    let blake3 = store_file(store, key, tmp.path())?;
    tmp.persist(&dest)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(Written {
        r#type: "squashfs".into(),
        path: dest,
        blake3,
    })
}

/// The cache key of one output of type `t`, from the key of what it is made of (the last
/// step's key for tree outputs, the disk step's key for disk builds).
pub fn type_key(base: &str, t: &str) -> String {
    blake3::Hasher::new_derive_key("strata 2026-11 output key v1")
        .update(base.as_bytes())
        .update(b"\0")
        .update(t.as_bytes())
        .finalize()
        .to_hex()
        .to_string()
}

/// Hashes the file at `p` and, with a store, keeps it as a zstd blob under `key`.
fn store_file(store: Option<&Store>, key: &str, p: &Path) -> Result<String> {
    let mut src = fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    keep(store, key, &mut src, None)
}

/// Reads `src` once: hashes it, keeps it zstd-compressed as an output blob under `key` (with a
/// store), and writes it sparse to `copy_to` (when given). Returns the blake3 of the content.
pub fn keep(
    store: Option<&Store>,
    key: &str,
    src: &mut impl Read,
    copy_to: Option<&Path>,
) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut sparse = match copy_to {
        Some(p) => Some((SparseFile::create(p)?, p)),
        None => None,
    };
    let mut blob = match store {
        Some(s) => Some(s.blob_writer()?),
        None => None,
    };
    {
        let mut enc = match blob.as_mut() {
            Some(b) => {
                let mut e = zstd::Encoder::new(b, 3)?;
                e.multithread(2)?;
                Some(e)
            }
            None => None,
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = read_full(src, &mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            if let Some(e) = enc.as_mut() {
                e.write_all(chunk)?;
            }
            if let Some((f, _)) = sparse.as_mut() {
                f.write(chunk)?;
            }
        }
        if let Some(e) = enc {
            e.finish()?;
        }
    }
    if let Some((f, p)) = sparse {
        f.persist(p)?;
    }
    if let (Some(store), Some(blob)) = (store, blob) {
        let (digest, size) = blob.finish()?;
        store.put_output(key, &digest, size, crate::build::now())?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The output cached under `out_key`, written to `path` (and marked used at `now`): its blake3,
/// or None when there is none or its blob turns out damaged (a warning says so, ending with
/// `then`, what the build does instead).
pub fn restore_cached(
    store: &Store,
    out_key: &str,
    kind: &str,
    path: &Path,
    now: i64,
    then: &str,
) -> Result<Option<String>> {
    let Some(rec) = store.get_output(out_key)? else {
        return Ok(None);
    };
    match restore(store, &rec.blob_digest, path) {
        Ok(digest) => {
            store.touch_output(out_key, now)?;
            Ok(Some(digest))
        }
        Err(e) => {
            tracing::warn!(
                "cached {kind} output is corrupt ({}); {then}",
                crate::error::render(&e)
            );
            Ok(None)
        }
    }
}

/// Writes a cached output blob (zstd) to `path`, sparse; on a damaged blob, reads it to the
/// end so the store sees the digest mismatch and deletes it. Returns the blake3 of what was
/// written.
pub fn restore(store: &Store, digest: &str, path: &Path) -> Result<String> {
    let mut blob = store.open_blob(digest)?;
    let written = (|| -> Result<String> {
        let mut dec = zstd::Decoder::new(&mut blob)?;
        let mut out = SparseFile::create(path)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = read_full(&mut dec, &mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write(&buf[..n])?;
        }
        out.persist(path)?;
        Ok(hasher.finalize().to_hex().to_string())
    })();
    let checked = blob.finish();
    let digest = written?;
    checked?;
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

/// One output file being written: a temp file beside it, hashed, and copied into a zstd blob
/// when there is a store.
struct FileSink {
    file: Hashing<BufWriter<tempfile::NamedTempFile>>,
    blob: Option<zstd::Encoder<'static, BlobWriter>>,
}

impl FileSink {
    fn create(dest: &Path, store: Option<&Store>, opts: &PackOptions) -> Result<FileSink> {
        let tmp = crate::build::temp_beside(dest)?;
        let blob = match store {
            Some(s) => {
                let mut enc = zstd::Encoder::new(s.blob_writer()?, opts.level)?;
                enc.multithread(opts.workers.max(1))?;
                Some(enc)
            }
            None => None,
        };
        Ok(FileSink {
            file: Hashing {
                inner: BufWriter::with_capacity(1 << 20, tmp),
                hasher: blake3::Hasher::new(),
            },
            blob,
        })
    }

    /// Stores the blob under `key`, renames the file into place, returns what was written.
    fn finish(
        self,
        store: Option<&Store>,
        key: &str,
        ty: &str,
        image_name: &str,
    ) -> Result<Written> {
        let dest = path(image_name, ty);
        if let (Some(store), Some(enc)) = (store, self.blob) {
            let (digest, size) = enc.finish()?.finish()?;
            store.put_output(key, &digest, size, crate::build::now())?;
        }
        let blake3 = self.file.hasher.finalize().to_hex().to_string();
        let tmp = self
            .file
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", dest.display()))?;
        tmp.persist(&dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(Written {
            r#type: ty.into(),
            path: dest,
            blake3,
        })
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all(buf)?;
        if let Some(b) = self.blob.as_mut() {
            b.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if let Some(b) = self.blob.as_mut() {
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
        let tmp = crate::build::temp_beside(dest)?;
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
        self.tmp
            .persist(dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(())
    }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

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

    fn wanted(types: &[&str]) -> Vec<(String, String)> {
        types
            .iter()
            .map(|t| (t.to_string(), format!("key-of-{t}")))
            .collect()
    }

    fn opts(sde: Option<i64>) -> PackOptions {
        PackOptions {
            source_date_epoch: sde,
            level: 3,
            workers: 1,
        }
    }

    #[test]
    fn squashfs_is_named_squash_and_the_rest_by_type() {
        assert_eq!(path("out/img", "squashfs"), Path::new("out/img.squash"));
        assert_eq!(path("img", "tgz"), Path::new("img.tgz"));
        assert_eq!(path("img", "tar"), Path::new("img.tar"));
        assert!(needs_scan(&["squashfs", "tgz"]));
        assert!(!needs_scan(&["squashfs"]));
        assert!(is_tree_type("tgz") && !is_tree_type("qcow2"));
    }

    #[test]
    fn a_missing_tool_is_an_environment_failure_naming_tool_and_package() {
        let dir = tempfile::tempdir().unwrap();
        let types = vec!["tar".to_string(), "squashfs".to_string()];
        let e = check_tools(&types, Some(dir.path().as_os_str()), None).unwrap_err();
        assert_eq!(e.exit, Exit::Environment);
        assert!(e.message.contains("mksquashfs"), "{}", e.message);
        assert!(e.message.contains("squashfs-tools"), "{}", e.message);
        assert!(!e.message.contains('\n'));
        // A non-executable file of that name does not count; an executable one does.
        let tool = dir.path().join("mksquashfs");
        fs::write(&tool, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_tools(&types, Some(dir.path().as_os_str()), None).is_err());
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
        check_tools(&types, Some(dir.path().as_os_str()), None).unwrap();
        // No tool needed for tar / tgz, even with no PATH at all.
        check_tools(&["tar".into(), "tgz".into()], None, None).unwrap();
        let q = check_tools(&["qcow2".into()], Some(dir.path().as_os_str()), None).unwrap_err();
        assert!(q.message.contains("qemu-img") && q.message.contains("qemu-utils"));
        // squashfs times are 32-bit.
        let late = check_tools(&types, Some(dir.path().as_os_str()), Some(1 << 33)).unwrap_err();
        assert_eq!(late.exit, Exit::BadInput);
        assert!(
            late.message.contains("SOURCE_DATE_EPOCH"),
            "{}",
            late.message
        );
        check_tools(&["tar".into()], None, Some(-5)).unwrap();
    }

    #[test]
    fn tar_tgz_and_squashfs_from_one_tree_stored_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path());
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let name = dir.path().join("img").display().to_string();
        let scan = layer::scan(&root, &Default::default()).unwrap();
        let want = wanted(&["squashfs", "tgz", "tar"]);
        let (written, timings) =
            write(Some(&store), &root, Some(&scan), &want, &name, &opts(None)).unwrap();
        let types: Vec<&str> = written.iter().map(|w| w.r#type.as_str()).collect();
        assert_eq!(types, ["squashfs", "tgz", "tar"]);
        assert_eq!(timings.len(), 2, "{timings:?}");
        let (tar, tgz, squash) = (
            path(&name, "tar"),
            path(&name, "tgz"),
            path(&name, "squashfs"),
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

        // Every output is in the store under its key, and restores byte for byte.
        for w in &written {
            let rec = store
                .get_output(&format!("key-of-{}", w.r#type))
                .unwrap()
                .unwrap();
            fs::remove_file(&w.path).unwrap();
            assert_eq!(
                restore(&store, &rec.blob_digest, &w.path).unwrap(),
                w.blake3
            );
            assert_eq!(b3(&w.path), w.blake3);
        }
    }

    #[test]
    fn with_source_date_epoch_the_outputs_do_not_depend_on_file_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = tree(dir.path());
        let want = wanted(&["tgz", "squashfs"]);
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
                None,
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
            None,
            &missing,
            None,
            &wanted(&["squashfs"]),
            &name,
            &opts(None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mksquashfs"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(!path(&name, "squashfs").exists());
        // No temp file left beside the output.
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
