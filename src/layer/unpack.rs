//! Unpacking: a zstd tar layer (untrusted: it may come from a shared cache) applied onto a
//! target directory without ever writing outside it or through a symlink.
//!
//! ```text
//! blob ─► [decoder thread] zstd decode ─► 1 MiB pieces ─┬─► channel (8 deep) ─► [caller]
//!                                                       └─► channel ─► [hash thread] blake3
//! [caller] tar entries ─► sanitize path
//!    ─► parent: the cached open directories of the previous entry's parent, the rest
//!       opened component by component with openat(O_NOFOLLOW|O_DIRECTORY)
//!    ─► whiteout / opaque / create (O_EXCL, unlink + retry)
//!    ─► file data written from the piece in place (no copy) ─► chown, chmod only when
//!       creation did not already give them, xattrs, mtime
//!    ─► directory mtimes last (utimensat by name, no follow) ─► drain the stream
//!    ─► join: diff id and length from the hash thread
//! ```
//!
//! Speed: `zstd -dc | tar -x` overlaps decoding and writing in separate processes (and zstd
//! reads and writes on threads of its own). Here the decoder thread only decodes (it is the
//! slowest stage), blake3 runs on its own thread over the same shared pieces (a piece's buffer
//! is reused once both the caller and the hasher returned it), and file data goes from the
//! piece straight to `write`. New files and directories are created with their permission
//! bits, so the owner and mode calls are skipped when they would change nothing.
//!
//! Safety rules: an absolute path or a `..` component fails the whole unpack; every parent is
//! opened component by component from a descriptor of the target with `O_NOFOLLOW|O_DIRECTORY`
//! (a symlink anywhere in a parent fails the unpack, whether an earlier layer or an earlier entry
//! of this layer planted it); files are created with `O_CREAT|O_EXCL|O_NOFOLLOW` after unlinking
//! what was there; hardlink targets are resolved the same way; recursive deletes never follow a
//! symlink and refuse to cross into another mount.
//!
//! The cached parent (`Unpacker::stack`, the open descriptors of the previous entry's parent
//! path) is cut back to the common prefix with each entry's parent *before* the entry is
//! applied. An entry only changes its own name in that parent (and, for a whiteout, opaque
//! marker or replaced directory, what lies below the name; a directory entry then pushes the
//! directory it made or kept), so no cached descriptor can stand
//! for a directory the entry replaces or removes: a later entry below that name opens it again,
//! and meets the symlink or file now there (refused) or the directory made again.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use tar::EntryType;

use super::read::TarReader;
use super::sys;
use super::{LayerError, split_parent};

/// Size of the pieces the decoder sends.
const CHUNK: usize = 1 << 20;

/// How to unpack.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// chown every entry to its recorded numeric owner (default true).
    pub preserve_owners: bool,
    /// Apply `SCHILY.xattr.*` records (default true).
    pub xattrs: bool,
    /// Apply `security.*` xattrs, e.g. file capabilities (default: when running as root).
    pub security_xattrs: bool,
    /// Fail (after unpacking) if the recomputed diff id differs.
    pub expected_diff_id: Option<String>,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            preserve_owners: true,
            xattrs: true,
            // SAFETY: geteuid has no failure mode.
            security_xattrs: unsafe { libc::geteuid() } == 0,
            expected_diff_id: None,
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// blake3 (hex) of the whole uncompressed tar stream, recomputed while reading.
    pub diff_id: String,
    /// Tar entries applied (whiteouts and opaque markers included).
    pub entries: u64,
    /// Length of the uncompressed stream.
    pub tar_size: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// One piece of the decoded stream, shared by the applying and the hashing thread.
type Piece = Arc<Vec<u8>>;

/// The decoded stream as the caller sees it: the pieces the decoder thread sends, lent out in
/// place through `BufRead` (file data goes from the piece straight to `write`, no copy in
/// between).
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Piece>>,
    back: mpsc::Sender<Piece>,
    cur: Piece,
    pos: usize,
}

impl ChunkReader {
    /// Takes the next piece; false at the end of the stream.
    fn next_chunk(&mut self) -> io::Result<bool> {
        match self.rx.recv() {
            Ok(Ok(next)) => {
                let old = std::mem::replace(&mut self.cur, next);
                let _ = self.back.send(old);
                self.pos = 0;
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            if !self.next_chunk()? {
                break;
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Decodes `blob` to the end and sends each piece to the hashing thread and to the caller.
/// A piece's buffer comes back through `back` from both; the second return frees it for reuse.
fn decode(
    blob: impl Read,
    to_apply: mpsc::SyncSender<io::Result<Piece>>,
    to_hash: mpsc::SyncSender<Piece>,
    back: mpsc::Receiver<Piece>,
) {
    let mut dec = match zstd::Decoder::new(blob).and_then(|mut d| {
        d.window_log_max(31)?;
        Ok(d)
    }) {
        Ok(d) => d,
        Err(e) => {
            let _ = to_apply.send(Err(e));
            return;
        }
    };
    loop {
        // The first buffer both other threads are done with, else a new one.
        let mut buf = back
            .try_iter()
            .find_map(|p| Arc::try_unwrap(p).ok())
            .unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut n = 0;
        while n < CHUNK {
            match dec.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = to_apply.send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        let piece = Arc::new(buf);
        if to_hash.send(Arc::clone(&piece)).is_err() || to_apply.send(Ok(piece)).is_err() {
            return;
        }
    }
}

/// Hashes the pieces in order; returns the diff id hasher and the stream length.
fn hash(rx: mpsc::Receiver<Piece>, back: mpsc::Sender<Piece>) -> (blake3::Hasher, u64) {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    for piece in rx {
        hasher.update(&piece);
        total += piece.len() as u64;
        let _ = back.send(piece);
    }
    (hasher, total)
}

/// Unpacks a zstd-compressed layer onto `target` (an existing directory), applying whiteouts.
///
/// Decompression and hashing run on two more threads (hence `Send`), overlapping the file
/// writes the way `zstd -dc | tar -x` overlaps its processes. On any error the target is left
/// partly written and must be discarded; nothing outside it has been touched.
pub fn unpack(
    blob: impl Read + Send,
    target: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, LayerError> {
    let root = sys::open_dir(target).map_err(|e| LayerError::Apply {
        path: ".".into(),
        target: target.to_path_buf(),
        source: e,
    })?;
    let (to_apply, rx) = mpsc::sync_channel(8);
    let (to_hash, hash_rx) = mpsc::sync_channel(8);
    let (back_tx, back_rx) = mpsc::channel();
    let hash_back = back_tx.clone();
    std::thread::scope(|s| {
        let decoder = s.spawn(move || decode(blob, to_apply, to_hash, back_rx));
        let hasher = s.spawn(move || hash(hash_rx, hash_back));
        let reader = ChunkReader {
            rx,
            back: back_tx,
            cur: Arc::new(Vec::new()),
            pos: 0,
        };
        let mut u = Unpacker {
            target,
            root,
            stack: Vec::new(),
            opts,
            dirs: Vec::new(),
            written: HashSet::new(),
            entries: 0,
            whiteouts: 0,
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
            umask: current_umask(),
            setgid: None,
        };
        let mut tr = TarReader::new(reader);
        let applied = u.apply_all(&mut tr);
        // Read what the tar reader did not consume (end blocks, padding) so that the decoder
        // reaches the end and the hash covers the whole stream; on error, dropping the reader
        // stops the decoder (and so the hasher).
        let drained = match applied {
            Ok(()) => drain(&mut tr.into_inner()).map_err(|e| LayerError::Corrupt(e.to_string())),
            Err(e) => {
                drop(tr);
                Err(e)
            }
        };
        decoder
            .join()
            .map_err(|_| LayerError::Corrupt("the decoder thread panicked".into()))?;
        let (hasher, total) = hasher
            .join()
            .map_err(|_| LayerError::Corrupt("the hashing thread panicked".into()))?;
        drained?;
        let diff_id = hasher.finalize().to_hex().to_string();
        if let Some(want) = &opts.expected_diff_id
            && *want != diff_id
        {
            return Err(LayerError::DiffIdMismatch {
                expected: want.clone(),
                actual: diff_id,
            });
        }
        Ok(UnpackStats {
            diff_id,
            entries: u.entries,
            tar_size: total,
            whiteouts: u.whiteouts,
        })
    })
}

/// Reads `r` to its end, discarding the bytes.
fn drain(r: &mut impl BufRead) -> io::Result<()> {
    loop {
        let n = r.fill_buf()?.len();
        if n == 0 {
            return Ok(());
        }
        r.consume(n);
    }
}

/// Normalizes an entry path: `./` and empty components dropped; absolute paths and `..` refused.
pub(super) fn sanitize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("`..` component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn components(p: &[u8]) -> Vec<&[u8]> {
    if p.is_empty() {
        Vec::new()
    } else {
        p.split(|&c| c == b'/').collect()
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

struct Unpacker<'a> {
    target: &'a Path,
    root: OwnedFd,
    /// Open descriptors of the directories on the path of the previous entry's parent.
    stack: Vec<(Vec<u8>, OwnedFd)>,
    opts: &'a UnpackOptions,
    /// Directories whose mtime is set at the end.
    dirs: Vec<(Vec<u8>, i64)>,
    /// Paths this layer wrote (an opaque marker must not delete them).
    written: HashSet<Vec<u8>>,
    entries: u64,
    whiteouts: u64,
    /// Who new files belong to and what the umask leaves of a mode, to skip the chown and
    /// chmod calls that would change nothing (most of a root file system).
    euid: u32,
    egid: u32,
    umask: u32,
    /// Whether the directory at this path has the setgid bit (new files then take its group).
    setgid: Option<(Vec<u8>, bool)>,
}

/// The process's umask, read without changing it (`umask(2)` would, for every thread).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        // Unknown: assume the strictest, so chmod is never skipped wrongly.
        .unwrap_or(0o777)
}

struct Rec {
    path: Vec<u8>,
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    link: Option<Vec<u8>>,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: Option<(Vec<(u64, u64)>, u64)>,
}

impl Unpacker<'_> {
    fn unsafe_err(path: &[u8], reason: impl Into<String>) -> LayerError {
        LayerError::Unsafe {
            path: lossy(path),
            reason: reason.into(),
        }
    }

    fn apply_err(&self, path: &[u8], e: io::Error) -> LayerError {
        LayerError::Apply {
            path: lossy(path),
            target: PathBuf::from(self.target),
            source: e,
        }
    }

    fn apply_all<R: BufRead>(&mut self, tr: &mut TarReader<R>) -> Result<(), LayerError> {
        let corrupt = |e: io::Error| LayerError::Corrupt(e.to_string());
        while let Some(e) = tr.next_entry().map_err(corrupt)? {
            let path = sanitize(&e.path).map_err(|r| Self::unsafe_err(&e.path, r))?;
            let h = &e.header;
            let rec = Rec {
                path,
                kind: e.kind,
                mode: h.mode().map_err(corrupt)? & 0o7777,
                uid: u32::try_from(e.uid)
                    .map_err(|_| Self::unsafe_err(&e.path, "uid out of range"))?,
                gid: u32::try_from(e.gid)
                    .map_err(|_| Self::unsafe_err(&e.path, "gid out of range"))?,
                mtime: e.mtime,
                link: e.link,
                dev: (
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                ),
                xattrs: e.xattrs,
                sparse: e.sparse,
            };
            self.entries += 1;
            self.apply(rec, tr)?;
        }
        self.finish_dirs()
    }

    /// The descriptor of the directory `comps` (relative to the target), opened component by
    /// component without following symlinks; missing ones are created (0755) when `create`.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<Option<RawFdRef>, LayerError> {
        let mut i = 0;
        while i < self.stack.len() && i < comps.len() && self.stack[i].0 == comps[i] {
            i += 1;
        }
        self.stack.truncate(i);
        for c in &comps[i..] {
            let dir = match self.stack.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let fd = match sys::open_dir_at(dir, c) {
                Ok(fd) => fd,
                Err(e) if is_errno(&e, libc::ENOENT) && create => {
                    match sys::mkdir_at(dir, c, 0o755) {
                        Ok(()) => {}
                        Err(e) if is_errno(&e, libc::EEXIST) => {}
                        Err(e) => return Err(self.apply_err(&comps.join(&b'/'), e)),
                    }
                    sys::open_dir_at(dir, c).map_err(|e| self.walk_err(comps, e))?
                }
                Err(e) if is_errno(&e, libc::ENOENT) => return Ok(None),
                Err(e) => return Err(self.walk_err(comps, e)),
            };
            self.stack.push((c.to_vec(), fd));
        }
        Ok(Some(RawFdRef(match self.stack.last() {
            Some((_, fd)) => fd.as_raw_fd(),
            None => self.root.as_raw_fd(),
        })))
    }

    fn walk_err(&self, comps: &[&[u8]], e: io::Error) -> LayerError {
        if is_errno(&e, libc::ELOOP) || is_errno(&e, libc::ENOTDIR) {
            Self::unsafe_err(
                &comps.join(&b'/'),
                "a parent directory is a symlink or not a directory in the target",
            )
        } else {
            self.apply_err(&comps.join(&b'/'), e)
        }
    }

    fn apply<R: BufRead>(&mut self, rec: Rec, data: &mut TarReader<R>) -> Result<(), LayerError> {
        let (parent, name) = split_parent(&rec.path);
        let parent = parent.to_vec();
        let name = name.to_vec();
        let comps = components(&parent);

        // Whiteouts and opaque markers.
        if let Some(target) = name.strip_prefix(b".wh.") {
            self.whiteouts += 1;
            // A directory whose setgid bit we know may go, and be made again by a later walk.
            self.setgid = None;
            if target == b".wh..opq" {
                let Some(dir) = self.walk(&comps, false)? else {
                    return Ok(());
                };
                return self.empty_dir(&parent, dir.get());
            }
            if target.starts_with(b".wh.") {
                // Other aufs metadata (.wh..wh.plnk, …): nothing to apply.
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Self::unsafe_err(&rec.path, "whiteout of an invalid name"));
            }
            let Some(dir) = self.walk(&comps, false)? else {
                return Ok(());
            };
            return self
                .remove_existing(dir.get(), target)
                .map_err(|e| self.or_apply(&rec.path, e));
        }

        if rec.path.is_empty() && rec.kind != EntryType::Directory {
            return Err(Self::unsafe_err(
                &rec.path,
                "non-directory entry for the target root",
            ));
        }
        let dir = match self.walk(&comps, true)? {
            Some(d) => d,
            None => return Err(self.apply_err(&rec.path, io::ErrorKind::NotFound.into())),
        };
        let d = dir.get();
        let r = match rec.kind {
            EntryType::Directory => self.directory(d, &parent, &name, &rec),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.regular(d, &parent, &name, &rec, data)
            }
            EntryType::Symlink => self.symlink(d, &parent, &name, &rec),
            EntryType::Link => self.hardlink(d, &name, &rec),
            EntryType::Char | EntryType::Block | EntryType::Fifo => self.special(d, &name, &rec),
            EntryType::XGlobalHeader => Ok(()),
            other => {
                return Err(Self::unsafe_err(
                    &rec.path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        };
        r.map_err(|e| self.or_apply(&rec.path, e))?;
        self.written.insert(rec.path);
        Ok(())
    }

    fn or_apply(&self, path: &[u8], e: Failure) -> LayerError {
        match e {
            Failure::Io(e) => self.apply_err(path, e),
            Failure::Layer(l) => l,
        }
    }

    fn xattrs_to_apply<'r>(&self, rec: &'r Rec) -> impl Iterator<Item = &'r (Vec<u8>, Vec<u8>)> {
        let (all, sec) = (self.opts.xattrs, self.opts.security_xattrs);
        rec.xattrs
            .iter()
            .filter(move |(k, _)| all && (sec || !k.starts_with(b"security.")))
    }

    /// Metadata of an open directory or file: chown, chmod, xattrs (mtime is set by the caller).
    fn meta_fd(&self, fd: i32, rec: &Rec) -> Result<(), Failure> {
        if self.opts.preserve_owners {
            sys::fchown(fd, rec.uid, rec.gid)?;
        }
        sys::fchmod(fd, rec.mode)?;
        for (k, v) in self.xattrs_to_apply(rec) {
            sys::fsetxattr(fd, k, v)?;
        }
        Ok(())
    }

    /// True when a node just created in `dir` (at relative path `parent`) already belongs to
    /// `rec`'s owner: it was made by this process, owned by its euid, and by its egid unless
    /// the directory is setgid (then by the directory's group).
    fn owned_already(&mut self, dir: BorrowedFd<'_>, parent: &[u8], rec: &Rec) -> io::Result<bool> {
        if rec.uid != self.euid || rec.gid != self.egid {
            return Ok(false);
        }
        let setgid = match &self.setgid {
            Some((p, s)) if p.as_slice() == parent => *s,
            _ => {
                let s = sys::fstat(dir.as_raw_fd())?.st_mode & libc::S_ISGID != 0;
                self.setgid = Some((parent.to_vec(), s));
                s
            }
        };
        Ok(!setgid)
    }

    /// Metadata of a non-directory node by name (symlinks, devices, FIFOs) without following it.
    fn meta_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        rec: &Rec,
        chmod: bool,
        owned: bool,
    ) -> Result<(), Failure> {
        if self.opts.preserve_owners && !owned {
            sys::lchown_at(dir, name, rec.uid, rec.gid)?;
        }
        if chmod {
            sys::chmod_at(dir, name, rec.mode)?;
        }
        for (k, v) in self.xattrs_to_apply(rec) {
            sys::lsetxattr_at(dir, name, k, v)?;
        }
        sys::lutimes_at(dir, name, rec.mtime)?;
        Ok(())
    }

    fn directory(
        &mut self,
        dir: BorrowedFd<'_>,
        parent: &[u8],
        name: &[u8],
        rec: &Rec,
    ) -> Result<(), Failure> {
        // Its mode may change: forget what we knew about it.
        if self.setgid.as_ref().is_some_and(|(p, _)| *p == rec.path) {
            self.setgid = None;
        }
        if rec.path.is_empty() {
            self.meta_fd(self.root.as_raw_fd(), rec)?;
            self.dirs.push((Vec::new(), rec.mtime));
            return Ok(());
        }
        // Made with its permission bits (less the umask), like files, so that a new directory
        // of the process's own owner needs no chown and usually no chmod.
        let perm = rec.mode & 0o777;
        let made = match sys::mkdir_at(dir, name, perm) {
            Ok(()) => true,
            Err(e) if is_errno(&e, libc::EEXIST) => {
                let st = sys::lstat_at(dir, name)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    self.remove_existing(dir, name)?;
                    sys::mkdir_at(dir, name, perm)?;
                    true
                } else {
                    false
                }
            }
            Err(e) => return Err(e.into()),
        };
        let fd = sys::open_dir_at(dir, name)?;
        // An existing directory gets its owner and mode set whatever they were; a new one in a
        // setgid parent took the parent's group and setgid bit, so it is not `owned`.
        let owned = made && self.owned_already(dir, parent, rec)?;
        if self.opts.preserve_owners && !owned {
            sys::fchown(fd.as_raw_fd(), rec.uid, rec.gid)?;
        }
        let exact = owned && rec.mode == perm & !self.umask;
        if !exact {
            sys::fchmod(fd.as_raw_fd(), rec.mode)?;
        }
        for (k, v) in self.xattrs_to_apply(rec) {
            sys::fsetxattr(fd.as_raw_fd(), k, v)?;
        }
        if exact {
            // Its children are likely next: no need to fstat it for its setgid bit.
            self.setgid = Some((rec.path.clone(), false));
        }
        self.dirs.push((rec.path.clone(), rec.mtime));
        // The next entries are most likely its children.
        let comps = components(&rec.path);
        if self.stack.len() + 1 == comps.len() {
            self.stack.push((name.to_vec(), fd));
        }
        Ok(())
    }

    fn create<T>(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        mut make: impl FnMut() -> io::Result<T>,
    ) -> Result<T, Failure> {
        match make() {
            Ok(t) => Ok(t),
            Err(e) if is_errno(&e, libc::EEXIST) => {
                self.remove_existing(dir, name)?;
                Ok(make()?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn regular<R: BufRead>(
        &mut self,
        dir: BorrowedFd<'_>,
        parent: &[u8],
        name: &[u8],
        rec: &Rec,
        data: &mut TarReader<R>,
    ) -> Result<(), Failure> {
        // Created with its permission bits (less the umask), so that most files need no chmod.
        let perm = rec.mode & 0o777;
        let mut f: File = self.create(dir, name, || sys::create_file_at(dir, name, perm))?;
        let corrupt = |e: io::Error| Failure::Layer(LayerError::Corrupt(e.to_string()));
        match &rec.sparse {
            // Straight from the decoded chunk to the file.
            None => loop {
                let b = data.data_buf().map_err(corrupt)?;
                let n = b.len();
                if n == 0 {
                    break;
                }
                f.write_all(b)?;
                data.consume_data(n);
            },
            Some((segs, real)) => {
                // Holes are never written: the file stays sparse.
                for &(off, mut len) in segs {
                    f.seek(SeekFrom::Start(off))?;
                    while len > 0 {
                        let b = data.data_buf().map_err(corrupt)?;
                        let n = usize::try_from(len).map_or(b.len(), |l| l.min(b.len()));
                        if n == 0 {
                            return Err(corrupt(io::Error::other("sparse data ends early")));
                        }
                        f.write_all(&b[..n])?;
                        data.consume_data(n);
                        len -= n as u64;
                    }
                }
                f.set_len(*real)?;
            }
        }
        let fd = f.as_raw_fd();
        let owned = self.owned_already(dir, parent, rec)?;
        if self.opts.preserve_owners && !owned {
            sys::fchown(fd, rec.uid, rec.gid)?;
        }
        // A chown clears setuid/setgid bits, and special bits and umasked bits need chmod.
        if rec.mode != perm & !self.umask || (self.opts.preserve_owners && !owned) {
            sys::fchmod(fd, rec.mode)?;
        }
        for (k, v) in self.xattrs_to_apply(rec) {
            sys::fsetxattr(fd, k, v)?;
        }
        sys::futimes(fd, rec.mtime)?;
        Ok(())
    }

    fn symlink(
        &mut self,
        dir: BorrowedFd<'_>,
        parent: &[u8],
        name: &[u8],
        rec: &Rec,
    ) -> Result<(), Failure> {
        let target = rec.link.clone().unwrap_or_default();
        if target.is_empty() {
            return Err(Failure::Layer(Self::unsafe_err(
                &rec.path,
                "empty symlink target",
            )));
        }
        self.create(dir, name, || sys::symlink_at(&target, dir, name))?;
        let owned = self.owned_already(dir, parent, rec)?;
        self.meta_at(dir, name, rec, false, owned)
    }

    fn special(&mut self, dir: BorrowedFd<'_>, name: &[u8], rec: &Rec) -> Result<(), Failure> {
        let (ty, dev) = match rec.kind {
            EntryType::Char => (libc::S_IFCHR, libc::makedev(rec.dev.0, rec.dev.1)),
            EntryType::Block => (libc::S_IFBLK, libc::makedev(rec.dev.0, rec.dev.1)),
            _ => (libc::S_IFIFO, 0),
        };
        self.create(dir, name, || sys::mknod_at(dir, name, ty | 0o600, dev))?;
        self.meta_at(dir, name, rec, true, false)
    }

    fn hardlink(&mut self, dir: BorrowedFd<'_>, name: &[u8], rec: &Rec) -> Result<(), Failure> {
        let raw = rec.link.clone().unwrap_or_default();
        let tpath = sanitize(&raw)
            .map_err(|r| Failure::Layer(Self::unsafe_err(&raw, format!("hardlink target: {r}"))))?;
        if tpath.is_empty() || tpath == rec.path {
            return Err(Failure::Layer(Self::unsafe_err(
                &raw,
                "invalid hardlink target",
            )));
        }
        let (tparent, tname) = split_parent(&tpath);
        // A fresh walk (the cached stack belongs to the entry's own parent).
        let mut held: Option<OwnedFd> = None;
        for c in components(tparent) {
            let base = match &held {
                Some(fd) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let next = sys::open_dir_at(base, c).map_err(|e| {
                if is_errno(&e, libc::ELOOP) || is_errno(&e, libc::ENOTDIR) {
                    Failure::Layer(Self::unsafe_err(
                        &raw,
                        "hardlink target goes through a symlink or a non-directory",
                    ))
                } else {
                    Failure::Io(e)
                }
            })?;
            held = Some(next);
        }
        let tdir = match &held {
            Some(fd) => fd.as_fd(),
            None => self.root.as_fd(),
        };
        self.create(dir, name, || sys::link_at(tdir, tname, dir, name))
    }

    /// Deletes `dir/name` whatever it is; a directory is deleted recursively without following
    /// symlinks and without crossing into another mount.
    fn remove_existing(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Failure> {
        match sys::unlink_at(dir, name, false) {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) if is_errno(&e, libc::EISDIR) => self.remove_tree(dir, name),
            Err(e) => Err(e.into()),
        }
    }

    fn remove_tree(&self, parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Failure> {
        let pmnt = sys::mount_id(parent.as_raw_fd());
        let pdev = sys::fstat(parent.as_raw_fd())?.st_dev;
        let open_checked = |base: BorrowedFd<'_>, n: &[u8]| -> Result<OwnedFd, Failure> {
            let fd = sys::open_dir_at(base, n)?;
            let dev = sys::fstat(fd.as_raw_fd())?.st_dev;
            if dev != pdev || sys::mount_id(fd.as_raw_fd()) != pmnt {
                return Err(Failure::Layer(Self::unsafe_err(
                    n,
                    "refusing to delete across a mount point",
                )));
            }
            Ok(fd)
        };
        let top = open_checked(parent, name)?;
        let names = sys::list_dir(top.as_fd())?;
        let mut stack: Vec<(OwnedFd, Vec<Vec<u8>>, Vec<u8>)> = vec![(top, names, name.to_vec())];
        while let Some((fd, names, _)) = stack.last_mut() {
            if let Some(child) = names.pop() {
                match sys::unlink_at(fd.as_fd(), &child, false) {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::ENOENT) => {}
                    Err(e) if is_errno(&e, libc::EISDIR) => {
                        let cfd = open_checked(fd.as_fd(), &child)?;
                        let cnames = sys::list_dir(cfd.as_fd())?;
                        stack.push((cfd, cnames, child));
                    }
                    Err(e) => return Err(e.into()),
                }
            } else if let Some((_, _, done)) = stack.pop() {
                let base = match stack.last() {
                    Some((fd, _, _)) => fd.as_fd(),
                    None => parent,
                };
                sys::unlink_at(base, &done, true)?;
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq`: removes everything in the directory that this layer did not write.
    fn empty_dir(&self, rel: &[u8], dir: BorrowedFd<'_>) -> Result<(), LayerError> {
        let names = sys::list_dir(dir).map_err(|e| self.apply_err(rel, e))?;
        for n in names {
            let mut p = rel.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&n);
            if self.written.contains(&p) {
                continue;
            }
            self.remove_existing(dir, &n)
                .map_err(|e| self.or_apply(&p, e))?;
        }
        Ok(())
    }

    /// Directory mtimes, last (creating children changed them), deepest first.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (path, mtime) in dirs.iter().rev() {
            let r = if path.is_empty() {
                sys::futimes(self.root.as_raw_fd(), *mtime)
            } else {
                let (parent, name) = split_parent(path);
                let comps = components(parent);
                let Some(d) = self.walk(&comps, false)? else {
                    continue;
                };
                // Only if it is still a directory (a later entry may have replaced it);
                // utimensat by name, without following a symlink, needs no descriptor.
                match sys::lstat_at(d.get(), name) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        sys::lutimes_at(d.get(), name, *mtime)
                    }
                    // Replaced or removed by a later entry: nothing to restore.
                    _ => continue,
                }
            };
            r.map_err(|e| self.apply_err(path, e))?;
        }
        self.stack.clear();
        Ok(())
    }
}

/// A raw descriptor owned by the unpacker's root or stack, valid until the stack changes.
#[derive(Clone, Copy)]
struct RawFdRef(i32);

impl RawFdRef {
    fn get<'x>(self) -> BorrowedFd<'x> {
        // SAFETY: the descriptor is owned by `Unpacker::root` or `Unpacker::stack`; callers use
        // it only while handling one entry, during which the stack below the entry's parent is
        // never truncated (only pushed to).
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

/// An error while applying one entry: plain I/O (wrapped with the path later) or already typed.
enum Failure {
    Io(io::Error),
    Layer(LayerError),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}
