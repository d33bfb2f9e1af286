//! The cache store: a content-addressed blob folder and a SQLite index of steps, layers, outputs
//! and builds, shared safely by several strata processes at once.
//!
//! ```text
//! <cache>/CACHEDIR.TAG               standard signature (backup tools skip the folder)
//! <cache>/lock                       flock: SHARED for every open Store, EXCLUSIVE for gc/verify/rm
//! <cache>/gc.lock                    flock: EXCLUSIVE while a gc/verify/rm waits for or holds
//!                                    `lock`; an opening Store passes it (SHARED, briefly) first
//! <cache>/index.sqlite               WAL; PRAGMA user_version = SCHEMA_VERSION
//! <cache>/blobs/blake3/ab/<64 hex>   content addressed: the name is the blake3 of the bytes
//! <cache>/tmp/                       temp files; renamed into blobs/ after fsync
//! ```
//!
//! API sketch:
//! * [`Store::open`] creates the layout, migrates the index, checks it (`quick_check`) and holds
//!   a shared lock until drop; [`Store::open_read_only`] creates and writes nothing (`ls`, `du`,
//!   `explain` on a read-only folder).
//! * [`Store::blob_writer`] → write → [`BlobWriter::finish`] = `(digest, size)`; then
//!   [`Store::record_step`] indexes a step and its layers (the blobs must already exist).
//! * [`Store::lookup_step`] / [`Store::chain`] / [`Store::layer_for`] → [`Store::open_blob`], a
//!   reader that re-hashes and fails at EOF (or at [`VerifiedBlob::finish`]) on corruption.
//! * [`Store::gc`], [`Store::verify_with`], [`Store::rm`] take the exclusive lock and delete.
//! * [`Store::sweep_dead_temp_files`] removes the temp files of writers that died (every temp
//!   file is `flock`ed by its writer while it lives), safe while other builds run.
//!
//! Fairness: a maintenance command first takes `gc.lock` exclusively, then waits for `lock`.
//! A Store being opened waits for `gc.lock` (shared) before taking `lock`, so builds that start
//! while a gc waits queue behind it, and the gc runs as soon as the builds already running end.
//!
//! The store knows nothing of elements, of what a phase means, or of the tar format: diff ids,
//! keys and `inputs` are opaque text to it. It keeps two invariants: an index row only names a
//! blob that was fsynced and renamed into place before the row was committed, and a step's parent
//! is either absent from the index or present (dropping a step drops its descendants, whose
//! layers are diffs on top of it and useless without it).

mod blobs;
mod index;
mod maint;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use blobs::{BlobWriter, VerifiedBlob};
pub use index::Broken;
pub use maint::{GcReport, LayerCheck, RmReport, Usage, VerifyReport};

/// Version of the index schema, kept in `PRAGMA user_version`. Bump it and add a migration in
/// `index::MIGRATIONS` whenever the tables change.
pub const SCHEMA_VERSION: i64 = 3;

/// How often a process waiting for the cache lock says so.
const LOCK_NOTICE_EVERY: Duration = Duration::from_secs(5);
/// How often a waiter tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// How long one SQLite statement waits for another process's write transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by strata.\n\
# For information about cache directory tags, see https://bford.info/cachedir/\n";

/// Everything that can go wrong in the store. Each message is one line naming the file or key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache index {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "cache index {} is damaged ({reason}); move it aside (the blobs stay, and `strata cache gc` collects them once a new index exists) or use another --cache-dir",
        path.display()
    )]
    DamagedIndex { path: PathBuf, reason: String },
    #[error(
        "cache index {} has schema version {found}, newer than this strata knows ({known}); upgrade strata or use another --cache-dir",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cache blob {digest} is missing ({}); run `strata cache verify`", path.display())]
    MissingBlob { digest: String, path: PathBuf },
    #[error(
        "cache blob {} is {actual} bytes but its layer record says {recorded}; pass the size BlobWriter::finish returned",
        path.display()
    )]
    WrongBlobSize {
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    #[error("cache: {digest:?} is not a blob digest (64 lowercase hex digits expected)")]
    BadDigest { digest: String },
    #[error(
        "cache: step {key} names layer {diff_id}, which is neither given nor in the index; pass its LayerRecord to record_step"
    )]
    MissingLayer { key: String, diff_id: String },
    #[error(
        "{prefix:?} is not a key prefix: give at least {} hex digits of a key (`strata cache ls` lists them)",
        index::MIN_KEY_PREFIX
    )]
    BadKeyPrefix { prefix: String },
    #[error("cache {}: no step or output has key {key}; `strata cache ls` lists them", root.display())]
    UnknownKey { key: String, root: PathBuf },
    #[error("cache {}: key prefix {prefix} matches several steps ({}); give more digits", root.display(), matches.join(", "))]
    AmbiguousKey {
        prefix: String,
        matches: Vec<String>,
        root: PathBuf,
    },
    #[error(
        "cache lock {} still held by another strata after {waited:?}; wait for it to finish or use another --cache-dir",
        path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("bad size {input:?}: {reason} (examples: 123, 500M, 10G, 1.5GiB)")]
    BadSize { input: String, reason: &'static str },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// One cached step: what went in (`key`, `inputs`) and what came out (`layer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub key: String,
    /// The key of the step before it; None for the first step.
    pub parent: Option<String>,
    pub phase: String,
    pub hook: String,
    /// Diff id of the rootfs layer, None if the step changed nothing.
    pub layer: Option<String>,
    /// Diff id of a layer of changes to the hook tree, usually None.
    pub hooks_layer: Option<String>,
    /// JSON text of the key's inputs, for explaining a miss.
    pub inputs: String,
    pub created: i64,
    pub last_used: i64,
    pub hits: i64,
    pub seconds: f64,
    /// The mounts the step's hooks had left below the image root when it ended (those of
    /// earlier steps still there included), in mount order: made again on a tree restored to
    /// this step. Empty for steps recorded before schema 3 and registry records without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<StepMount>,
}

/// One mount a step's hooks left below the image root (see `exec::snapshot`). The store keeps
/// it as JSON in `steps.mounts` and does not interpret it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepMount {
    /// The step whose hook made it (`root.d/50-shared-apt-cache`).
    pub step: String,
    /// The mount point, relative to the image root.
    pub target: String,
    /// `bind`, or the file-system type of a mount of its own (`tmpfs`).
    pub kind: String,
    /// Where a bind's source is: relative to `base`; for a mount of its own, the source as
    /// the kernel shows it (`tmpfs`, a device).
    pub source: String,
    /// What a bind's `source` is relative to: `image` (the image root), `image-cache`
    /// (DIB_IMAGE_CACHE of the build that restores it), `build` (its build folder), or `host`
    /// (an absolute host path). Empty for a mount of its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base: String,
    /// Per-mount options as the kernel listed them (`rw,nosuid,relatime`).
    pub options: String,
    /// The file system's own options for a mount of its own (`size=1024k,mode=755`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_options: String,
}

impl StepRecord {
    /// The diff ids this step needs, rootfs layer first.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.layer
            .iter()
            .chain(self.hooks_layer.iter())
            .map(String::as_str)
    }
}

/// A layer: its identity (the diff id, blake3 of the uncompressed tar) and the blob holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub diff_id: String,
    pub blob_digest: String,
    /// Uncompressed size.
    pub size: u64,
    /// Size of the blob (compressed).
    pub blob_size: u64,
}

/// One `strata build` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub elements: String,
    pub arguments: String,
    pub outcome: String,
    pub step_keys: Vec<String>,
    pub started: i64,
    pub seconds: f64,
}

/// A final output (e.g. a disk image) cached under a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub key: String,
    pub blob_digest: String,
    pub size: u64,
    pub created: i64,
    pub last_used: i64,
}

/// How [`Store::open_with`] behaves.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Give up waiting for the cache lock after this long (None: wait for ever, saying so every
    /// few seconds).
    pub lock_timeout: Option<Duration>,
}

/// The prefix of a blob being written in `<cache>/tmp`.
const BLOB_TEMP_PREFIX: &str = "blob-";

/// An open cache folder. Holds a shared lock on `<cache>/lock` until dropped, so maintenance
/// (gc, verify, rm, which need the exclusive lock) never runs under a live build. `Store` is
/// `Sync`: its one SQLite connection sits behind a mutex.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    /// `<cache>/lock` (None: a read-only folder without one).
    lock: Option<File>,
    lock_path: PathBuf,
    /// `<cache>/gc.lock` (None: a read-only folder without one).
    gate: Option<File>,
    gate_path: PathBuf,
    options: StoreOptions,
    read_only: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the cache at `root`, waiting for ever for the lock.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, StoreOptions::default())
    }

    /// Opens (creating if needed) the cache at `root`: creates the layout, takes a shared lock
    /// held for the Store's life (after any gc waiting for the cache), opens the index in WAL
    /// mode, migrates it and checks it (`PRAGMA quick_check`: a damaged index is refused).
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        for dir in [
            root.to_path_buf(),
            root.join("blobs").join("blake3"),
            root.join("tmp"),
        ] {
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create folder", &dir))?;
        }
        let open_rw = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(StoreError::io("open lock file", path))
        };
        let lock_path = root.join("lock");
        let gate_path = root.join("gc.lock");
        let lock = open_rw(&lock_path)?;
        let gate = open_rw(&gate_path)?;
        take_shared(
            &lock,
            &lock_path,
            Some(&gate),
            &gate_path,
            options.lock_timeout,
        )?;
        // Under the lock: gc (exclusive) cannot be sweeping tmp/ while the tag is written.
        write_cachedir_tag(root)?;

        let db_path = root.join("index.sqlite");
        let conn = index::open(&db_path)?;
        index::check(&conn, &db_path)?;
        Ok(Store {
            root: root.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
            lock: Some(lock),
            lock_path,
            gate: Some(gate),
            gate_path,
            options,
            read_only: false,
        })
    }

    /// Opens an existing cache for reading only: creates, migrates and writes nothing, so it
    /// works on a read-only folder (`cache ls`, `du`, `explain`). Takes the shared lock when the
    /// lock file is there (opened read-only). Every method that writes fails.
    pub fn open_read_only(root: &Path) -> Result<Store, StoreError> {
        let options = StoreOptions::default();
        let open_ro = |path: &Path| match File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("open lock file", path)(e)),
        };
        let lock_path = root.join("lock");
        let gate_path = root.join("gc.lock");
        let lock = open_ro(&lock_path)?;
        let gate = open_ro(&gate_path)?;
        if let Some(lock) = &lock {
            take_shared(lock, &lock_path, gate.as_ref(), &gate_path, None)?;
        }
        let db_path = root.join("index.sqlite");
        let conn = index::open_read_only(&db_path)?;
        index::check(&conn, &db_path)?;
        Ok(Store {
            root: root.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
            lock,
            lock_path,
            gate,
            gate_path,
            options,
            read_only: true,
        })
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists). The digest should be a
    /// valid one (see [`is_digest`]); methods that open blobs check it.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let prefix = digest.get(..2).unwrap_or("__");
        self.root
            .join("blobs")
            .join("blake3")
            .join(prefix)
            .join(digest)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the guard cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned mutex is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        index::sql_err(&self.db_path)
    }

    /// Swaps the shared lock for the exclusive one for the duration of `f`, then takes the
    /// shared lock back. First `gc.lock` is taken exclusively, so Stores opened from then on
    /// wait behind this one; then `lock`, once the Stores already open have closed. While
    /// waiting this Store holds no lock on `lock`.
    fn exclusive<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (Some(lock), Some(gate), false) = (&self.lock, &self.gate, self.read_only) else {
            return Err(StoreError::io("lock", &self.lock_path)(
                std::io::Error::new(
                    std::io::ErrorKind::ReadOnlyFilesystem,
                    "the cache was opened read-only",
                ),
            ));
        };
        lock.unlock()
            .map_err(StoreError::io("unlock", &self.lock_path))?;
        debug!(
            "cache {}: {what} takes the exclusive lock",
            self.root.display()
        );
        let started = Instant::now();
        let timeout = self.options.lock_timeout;
        let gated = wait_for_lock(
            gate,
            &self.gate_path,
            true,
            "another `strata cache gc/verify/rm`",
            timeout,
        );
        let locked = gated.and_then(|()| {
            wait_for_lock(
                lock,
                &self.lock_path,
                true,
                "strata processes using the cache (new ones wait for this one)",
                timeout.map(|t| t.saturating_sub(started.elapsed())),
            )
        });
        let result = locked.and_then(|()| f());
        // Converting exclusive -> shared never blocks; from no lock it may wait for another gc.
        let relocked = wait_for_lock(
            lock,
            &self.lock_path,
            false,
            "`strata cache gc/verify/rm`",
            None,
        );
        // Only now may new Stores open (ours holds the shared lock again).
        let _ = gate.unlock();
        let value = result?;
        relocked?;
        Ok(value)
    }

    /// Removes the temp files in `<cache>/tmp` that writers killed mid-write left behind (a
    /// live writer holds a lock on its file, in whatever process, container or namespace on
    /// this kernel, so it is never touched). Safe while other builds run. Returns the files
    /// removed with their sizes.
    pub fn sweep_dead_temp_files(&self) -> Result<Vec<(PathBuf, u64)>, StoreError> {
        let tmp = self.tmp_dir();
        crate::fsutil::sweep_dead_files(&tmp, BLOB_TEMP_PREFIX)
            .map_err(StoreError::io("clean up", &tmp))
    }
}

/// Takes the shared `lock`, after waiting while a maintenance command holds `gate` (it waits for
/// the cache, and Stores opened meanwhile queue behind it).
fn take_shared(
    lock: &File,
    lock_path: &Path,
    gate: Option<&File>,
    gate_path: &Path,
    timeout: Option<Duration>,
) -> Result<(), StoreError> {
    let started = Instant::now();
    if let Some(gate) = gate {
        wait_for_lock(
            gate,
            gate_path,
            false,
            "`strata cache gc/verify/rm`, which waits for the builds already running",
            timeout,
        )?;
    }
    let locked = wait_for_lock(
        lock,
        lock_path,
        false,
        "`strata cache gc/verify/rm`",
        timeout.map(|t| t.saturating_sub(started.elapsed())),
    );
    if let Some(gate) = gate {
        let _ = gate.unlock();
    }
    locked
}

fn write_cachedir_tag(root: &Path) -> Result<(), StoreError> {
    let tag = root.join("CACHEDIR.TAG");
    if tag.exists() {
        return Ok(());
    }
    // Written to a (locked) temp file and renamed, so a reader never sees half a tag.
    let mut tmp = crate::fsutil::locked_temp_in(&root.join("tmp"), "tag-")
        .map_err(StoreError::io("create temp file in", &root.join("tmp")))?;
    tmp.write_all(CACHEDIR_TAG.as_bytes())
        .map_err(StoreError::io("write", tmp.path()))?;
    crate::fsutil::set_mode(tmp.path(), 0o644).map_err(StoreError::io("chmod", tmp.path()))?;
    tmp.persist(&tag)
        .map_err(|e| StoreError::io("create", &tag)(e.error))?;
    Ok(())
}

/// Takes the lock (shared or exclusive), polling so a waiter can say why it waits (`holder`:
/// who holds it).
fn wait_for_lock(
    file: &File,
    path: &Path,
    exclusive: bool,
    holder: &str,
    timeout: Option<Duration>,
) -> Result<(), StoreError> {
    let start = Instant::now();
    let mut last_notice = start;
    let mut first = true;
    loop {
        let attempt = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::io("lock", path)(e));
            }
        }
        if first || last_notice.elapsed() >= LOCK_NOTICE_EVERY {
            info!(
                "waiting for the cache lock {} (held by {holder}; {}s so far)",
                path.display(),
                start.elapsed().as_secs()
            );
            last_notice = Instant::now();
            first = false;
        }
        if let Some(limit) = timeout
            && start.elapsed() >= limit
        {
            return Err(StoreError::LockTimeout {
                path: path.to_path_buf(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(LOCK_POLL);
    }
}

/// True if `s` is a blob digest: 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_digest(digest: &str) -> Result<(), StoreError> {
    if is_digest(digest) {
        Ok(())
    } else {
        Err(StoreError::BadDigest {
            digest: digest.to_string(),
        })
    }
}

/// Parses a size: a number (fractions allowed) with an optional binary suffix, case-insensitive:
/// none or `B` = bytes, `K`/`KB`/`KiB` = 1024, `M`/`MB`/`MiB` = 1024², `G`… = 1024³,
/// `T`… = 1024⁴. So "10G" is 10 × 1024³ bytes and "1.5GiB" is 1.5 × 1024³. Fractions of a byte
/// are rounded down.
pub fn parse_size(s: &str) -> Result<u64, StoreError> {
    let bad = |reason| StoreError::BadSize {
        input: s.to_string(),
        reason,
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad("unknown unit (use B, K, M, G or T)")),
    };
    let unit = 1u64 << shift;
    match number.split_once('.') {
        None => {
            let n: u64 = number.parse().map_err(|_| bad("not a number"))?;
            n.checked_mul(unit).ok_or_else(|| bad("too large"))
        }
        Some((whole, frac)) => {
            if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
                return Err(bad("not a number"));
            }
            let w: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| bad("not a number"))?
            };
            let mut bytes = w.checked_mul(unit).ok_or_else(|| bad("too large"))?;
            // Exact decimal fraction: frac_digits / 10^len × unit, computed in u128.
            let frac = frac.get(..frac.len().min(18)).unwrap_or(frac);
            if !frac.is_empty() {
                let digits: u128 = frac.parse().map_err(|_| bad("not a number"))?;
                let scale = 10u128.pow(frac.len() as u32);
                let part = digits * unit as u128 / scale;
                bytes = bytes
                    .checked_add(part as u64)
                    .ok_or_else(|| bad("too large"))?;
            }
            Ok(bytes)
        }
    }
}
