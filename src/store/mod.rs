//! The cache store: a content-addressed blob folder and a SQLite index of steps, layers, outputs
//! and builds, shared safely by several strata processes at once.
//!
//! ```text
//! <cache>/CACHEDIR.TAG               standard signature (backup tools skip the folder)
//! <cache>/lock                       flock: SHARED for every open Store, EXCLUSIVE for gc/verify/rm
//! <cache>/index.sqlite               WAL; PRAGMA user_version = SCHEMA_VERSION
//! <cache>/blobs/blake3/ab/<64 hex>   content addressed: the name is the blake3 of the bytes
//! <cache>/tmp/                       temp files; renamed into blobs/ after fsync
//! ```
//!
//! API sketch:
//! * [`Store::open`] creates the layout, migrates the index and holds a shared lock until drop.
//! * [`Store::blob_writer`] → write → [`BlobWriter::finish`] = `(digest, size)`; then
//!   [`Store::record_step`] indexes a step and its layers (the blobs must already exist).
//! * [`Store::lookup_step`] / [`Store::chain`] / [`Store::layer_for`] → [`Store::open_blob`], a
//!   reader that re-hashes and fails at EOF (or at [`VerifiedBlob::finish`]) on corruption.
//! * [`Store::gc`], [`Store::verify`], [`Store::rm`] take the exclusive lock and delete.
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

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use blobs::{BlobWriter, VerifiedBlob};
pub use index::Broken;
pub use maint::{GcReport, RmReport, Usage, VerifyReport};

/// Version of the index schema, kept in `PRAGMA user_version`. Bump it and add a migration in
/// `index::MIGRATIONS` whenever the tables change.
pub const SCHEMA_VERSION: i64 = 2;

/// How often a process waiting for the cache lock says so.
const LOCK_NOTICE_EVERY: Duration = Duration::from_secs(5);
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

/// An open cache folder. Holds a shared lock on `<cache>/lock` until dropped, so maintenance
/// (gc, verify, rm, which need the exclusive lock) never runs under a live build. `Store` is
/// `Sync`: its one SQLite connection sits behind a mutex.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    lock: File,
    lock_path: PathBuf,
    options: StoreOptions,
    /// Temp files of this Store's live BlobWriters, which gc must not delete.
    live_tmp: Arc<Mutex<HashSet<PathBuf>>>,
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
    /// held for the Store's life, opens the index in WAL mode and migrates it.
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        for dir in [
            root.to_path_buf(),
            root.join("blobs").join("blake3"),
            root.join("tmp"),
        ] {
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create folder", &dir))?;
        }
        write_cachedir_tag(root)?;

        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(StoreError::io("open lock file", &lock_path))?;
        wait_for_lock(&lock, &lock_path, false, options.lock_timeout)?;

        let db_path = root.join("index.sqlite");
        let conn = index::open(&db_path)?;
        Ok(Store {
            root: root.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
            lock,
            lock_path,
            options,
            live_tmp: Arc::default(),
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
    /// shared lock back. While waiting this Store holds no lock at all.
    fn exclusive<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.lock
            .unlock()
            .map_err(StoreError::io("unlock", &self.lock_path))?;
        debug!(
            "cache {}: {what} takes the exclusive lock",
            self.root.display()
        );
        let locked = wait_for_lock(&self.lock, &self.lock_path, true, self.options.lock_timeout);
        let result = locked.and_then(|()| f());
        // Converting exclusive -> shared never blocks; from no lock it may wait for another gc.
        let relocked = wait_for_lock(&self.lock, &self.lock_path, false, None);
        let value = result?;
        relocked?;
        Ok(value)
    }
}

fn write_cachedir_tag(root: &Path) -> Result<(), StoreError> {
    let tag = root.join("CACHEDIR.TAG");
    if tag.exists() {
        return Ok(());
    }
    // Written to a temp file and renamed, so a reader never sees half a tag.
    let mut tmp = tempfile::Builder::new()
        .prefix("tag-")
        .tempfile_in(root.join("tmp"))
        .map_err(StoreError::io("create temp file in", &root.join("tmp")))?;
    tmp.write_all(CACHEDIR_TAG.as_bytes())
        .map_err(StoreError::io("write", tmp.path()))?;
    tmp.persist(&tag)
        .map_err(|e| StoreError::io("create", &tag)(e.error))?;
    Ok(())
}

/// Takes the lock (shared or exclusive), polling so a waiter can say why it waits.
fn wait_for_lock(
    file: &File,
    path: &Path,
    exclusive: bool,
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
            let holder = if exclusive {
                "strata processes using the cache"
            } else {
                "`strata cache gc/verify/rm`"
            };
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
        std::thread::sleep(Duration::from_millis(100));
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
