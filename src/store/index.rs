//! The SQLite index: schema and hand-rolled migrations (`PRAGMA user_version`), and the queries
//! over steps, layers, outputs and builds.
//!
//! ```text
//! open(path) ─► busy_timeout, WAL ─► migrate (IMMEDIATE txn, re-reads user_version inside)
//! record_step ─► IMMEDIATE txn: layer rows (blobs must exist) ─► step row (INSERT OR IGNORE)
//! lookup_step ─► step row ─► its layer rows ─► their blob files; anything missing = drop + miss
//! ```

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use tracing::warn;

use super::{
    BUSY_TIMEOUT, BuildRecord, LayerRecord, OutputRecord, SCHEMA_VERSION, StepMount, StepRecord,
    Store, StoreError, check_digest,
};

/// The fewest hex digits a key prefix given by a user may have (`cache rm`, `cache explain`).
pub const MIN_KEY_PREFIX: usize = 6;

/// `MIGRATIONS[i]` takes the schema from version i to i + 1.
pub(super) const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "CREATE TABLE steps (
        key         TEXT PRIMARY KEY NOT NULL,
        parent      TEXT,
        phase       TEXT NOT NULL,
        hook        TEXT NOT NULL,
        layer       TEXT,
        hooks_layer TEXT,
        inputs      TEXT NOT NULL,
        created     INTEGER NOT NULL,
        last_used   INTEGER NOT NULL,
        hits        INTEGER NOT NULL DEFAULT 0,
        seconds     REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX steps_parent ON steps(parent);
    CREATE INDEX steps_position ON steps(phase, hook, last_used);
    CREATE INDEX steps_layer ON steps(layer);
    CREATE INDEX steps_hooks_layer ON steps(hooks_layer);
    CREATE TABLE layers (
        diff_id   TEXT PRIMARY KEY NOT NULL,
        blob      TEXT NOT NULL,
        size      INTEGER NOT NULL,
        blob_size INTEGER NOT NULL
    );
    CREATE INDEX layers_blob ON layers(blob);
    CREATE TABLE outputs (
        key       TEXT PRIMARY KEY NOT NULL,
        blob      TEXT NOT NULL,
        size      INTEGER NOT NULL,
        created   INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    CREATE INDEX outputs_blob ON outputs(blob);
    CREATE TABLE builds (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        elements  TEXT NOT NULL,
        arguments TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        step_keys TEXT NOT NULL,
        started   INTEGER NOT NULL,
        seconds   REAL NOT NULL
    );",
    // 1 -> 2: the sha256 of blobs, computed once when a blob is first pushed to a registry
    // (registries address blobs by sha256, the store by blake3).
    "CREATE TABLE blob_sha256 (
        blob   TEXT PRIMARY KEY NOT NULL,
        sha256 TEXT NOT NULL
    );",
    // 2 -> 3: the mounts a step's hooks left below the image root (JSON array of StepMount;
    // NULL for none, and for every step recorded before this version).
    "ALTER TABLE steps ADD COLUMN mounts TEXT;",
];

const STEP_COLUMNS: &str = "key, parent, phase, hook, layer, hooks_layer, inputs, created, \
     last_used, hits, seconds, mounts";

pub(super) fn sql_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        // A value that is not what the schema stores (bytes that are not UTF-8 in a TEXT
        // column, a text where a number belongs) can only come from damage to the file.
        if matches!(
            source,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::Utf8Error(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
        ) {
            return StoreError::DamagedIndex {
                path: path.to_path_buf(),
                reason: format!("a value does not fit its column: {source}"),
            };
        }
        let code = source.sqlite_error_code();
        if code == Some(rusqlite::ErrorCode::NotADatabase)
            || code == Some(rusqlite::ErrorCode::DatabaseCorrupt)
        {
            let reason = match &source {
                rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
                other => other.to_string(),
            };
            StoreError::DamagedIndex {
                path: path.to_path_buf(),
                reason,
            }
        } else {
            StoreError::Sqlite {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Opens the index, switches it to WAL and brings its schema up to date. SQLite answers
/// SQLITE_BUSY at once, without its busy handler, while another process is switching a new
/// index to WAL; that is retried for up to `BUSY_TIMEOUT`.
pub(super) fn open(path: &Path) -> Result<Connection, StoreError> {
    let start = std::time::Instant::now();
    loop {
        match try_open(path) {
            Err(StoreError::Sqlite { source, .. })
                if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && start.elapsed() < BUSY_TIMEOUT =>
            {
                tracing::debug!(
                    "cache index {} busy while opening; retrying",
                    path.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens the index read-only: no WAL switch, no migration. On a read-only folder SQLite cannot
/// create the `-shm` file a WAL index needs; when nobody has the index open (no `-shm`), it
/// is then opened as immutable.
pub(super) fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let read = |conn: Connection| -> Result<Connection, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(path))?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(path))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        if (1..3).contains(&found) {
            // An older index is read as it is: its steps have no mounts column (schema 3), so
            // a temporary view (temp names shadow main ones; nothing is written to the file)
            // shows them with none.
            conn.execute_batch(
                "CREATE TEMP VIEW steps AS SELECT *, NULL AS mounts FROM main.steps;",
            )
            .map_err(sql_err(path))?;
        }
        Ok(conn)
    };
    let plain = Connection::open_with_flags(path, flags)
        .map_err(sql_err(path))
        .and_then(read);
    match plain {
        Err(StoreError::Sqlite { source, .. })
            if matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
            ) && !shm_path(path).exists() =>
        {
            let uri = format!("file:{}?immutable=1", uri_escape(path));
            Connection::open_with_flags(uri, flags)
                .map_err(sql_err(path))
                .and_then(read)
        }
        other => other,
    }
}

fn shm_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push("-shm");
    p.into()
}

/// A path as the path part of an SQLite `file:` URI.
fn uri_escape(path: &Path) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'%' | b'?' | b'#' => {
                let _ = write!(out, "%{b:02x}");
            }
            _ if b.is_ascii() && !b.is_ascii_control() => out.push(*b as char),
            _ => {
                let _ = write!(out, "%{b:02x}");
            }
        }
    }
    out
}

/// `PRAGMA quick_check`: a damaged index is refused with the one-line
/// [`StoreError::DamagedIndex`] (builds would otherwise go on writing into it).
pub(super) fn check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let answer: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(sql_err(path))?;
    if answer == "ok" {
        return Ok(());
    }
    Err(StoreError::DamagedIndex {
        path: path.to_path_buf(),
        reason: format!(
            "quick_check: {}",
            answer.lines().next().unwrap_or_default().trim()
        ),
    })
}

fn try_open(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path).map_err(sql_err(path))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(path))?;
    // The first statement that reads the file: a garbage file fails here as NotADatabase.
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .map_err(sql_err(path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err(path))?;
    }
    // In WAL mode NORMAL stays consistent after a crash; a power cut may lose the last commits,
    // which only turns a few hits into misses.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql_err(path))?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = SCHEMA_VERSION;
    let read = |c: &Connection| -> Result<i64, StoreError> {
        c.pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(path))
    };
    let found = read(conn)?;
    if found == known {
        return Ok(());
    }
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err(path))?;
    // Another process may have migrated while we waited for the write lock.
    let mut version = read(&tx)?;
    if version > known {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    while version < known {
        let step = MIGRATIONS
            .get(version as usize)
            .ok_or_else(|| StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                known,
            })?;
        tx.execute_batch(step).map_err(sql_err(path))?;
        version += 1;
    }
    tx.pragma_update(None, "user_version", version)
        .map_err(sql_err(path))?;
    tx.commit().map_err(sql_err(path))
}

fn step_from_row(row: &Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        key: row.get(0)?,
        parent: row.get(1)?,
        phase: row.get(2)?,
        hook: row.get(3)?,
        layer: row.get(4)?,
        hooks_layer: row.get(5)?,
        inputs: row.get(6)?,
        created: row.get(7)?,
        last_used: row.get(8)?,
        hits: row.get(9)?,
        seconds: row.get(10)?,
        mounts: mounts_col(row, 11)?,
    })
}

/// The `mounts` column: NULL (none, or a step recorded before schema 3) or a JSON array.
fn mounts_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Vec<StepMount>> {
    let text: Option<String> = row.get(i)?;
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        }),
    }
}

/// The `mounts` column of a step: NULL when it left none.
fn mounts_text(mounts: &[StepMount]) -> Option<String> {
    (!mounts.is_empty()).then(|| serde_json::to_string(mounts).unwrap_or_default())
}

fn layer_from_row(row: &Row<'_>) -> rusqlite::Result<LayerRecord> {
    Ok(LayerRecord {
        diff_id: row.get(0)?,
        blob_digest: row.get(1)?,
        size: u64_col(row, 2)?,
        blob_size: u64_col(row, 3)?,
    })
}

fn output_from_row(row: &Row<'_>) -> rusqlite::Result<OutputRecord> {
    Ok(OutputRecord {
        key: row.get(0)?,
        blob_digest: row.get(1)?,
        size: u64_col(row, 2)?,
        created: row.get(3)?,
        last_used: row.get(4)?,
    })
}

/// SQLite integers are i64; sizes are stored as such (a blob over 8 EiB is not a concern).
fn u64_col(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(i)?;
    Ok(v.max(0) as u64)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn get_step_in(conn: &Connection, key: &str) -> rusqlite::Result<Option<StepRecord>> {
    conn.prepare_cached(&format!("SELECT {STEP_COLUMNS} FROM steps WHERE key = ?1"))?
        .query_row([key], step_from_row)
        .optional()
}

pub(super) fn layer_in(conn: &Connection, diff_id: &str) -> rusqlite::Result<Option<LayerRecord>> {
    conn.prepare_cached("SELECT diff_id, blob, size, blob_size FROM layers WHERE diff_id = ?1")?
        .query_row([diff_id], layer_from_row)
        .optional()
}

/// `key` and every step descending from it (cycle-safe: UNION de-duplicates).
pub(super) fn subtree_in(conn: &Connection, key: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE sub(key) AS (
             SELECT key FROM steps WHERE key = ?1
             UNION SELECT s.key FROM steps s JOIN sub ON s.parent = sub.key)
         SELECT key FROM sub",
    )?;
    let keys = stmt
        .query_map([key], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(keys)
}

pub(super) fn delete_steps(tx: &Transaction<'_>, keys: &[String]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached("DELETE FROM steps WHERE key = ?1")?;
    for key in keys {
        stmt.execute([key])?;
    }
    Ok(())
}

pub(super) fn all_steps(conn: &Connection) -> rusqlite::Result<Vec<StepRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {STEP_COLUMNS} FROM steps ORDER BY created, key"
    ))?;
    stmt.query_map([], step_from_row)?.collect()
}

pub(super) fn all_layers(conn: &Connection) -> rusqlite::Result<Vec<LayerRecord>> {
    let mut stmt =
        conn.prepare_cached("SELECT diff_id, blob, size, blob_size FROM layers ORDER BY diff_id")?;
    stmt.query_map([], layer_from_row)?.collect()
}

pub(super) fn all_outputs(conn: &Connection) -> rusqlite::Result<Vec<OutputRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, blob, size, created, last_used FROM outputs ORDER BY created, key",
    )?;
    stmt.query_map([], output_from_row)?.collect()
}

/// Why a step cannot be used, if it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The step names a layer the index lacks.
    NoLayerRow(String),
    /// The layer's blob is not on disk.
    NoBlob(LayerRecord),
    /// The layer's blob has another size than recorded (truncated?).
    WrongSize(LayerRecord, u64),
    /// The blob's bytes do not hash to its name.
    Corrupt(LayerRecord),
    /// The layer was refused when applied (unsafe entry, or content other than its diff id).
    Refused(LayerRecord),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::NoLayerRow(d) => write!(f, "its layer {d} is not in the index"),
            Broken::NoBlob(l) => write!(f, "the blob of layer {} is missing", l.diff_id),
            Broken::WrongSize(l, n) => write!(
                f,
                "the blob of layer {} is {n} bytes, not {} (truncated?)",
                l.diff_id, l.blob_size
            ),
            Broken::Corrupt(l) => write!(f, "the blob of layer {} is corrupt", l.diff_id),
            Broken::Refused(l) => write!(f, "layer {} was refused when applied", l.diff_id),
        }
    }
}

impl Store {
    /// Whether the layer's blob is on disk with the recorded size.
    fn check_layer(&self, layer: LayerRecord) -> Option<Broken> {
        match std::fs::metadata(self.blob_path(&layer.blob_digest)) {
            Ok(m) if m.is_file() && m.len() == layer.blob_size => None,
            Ok(m) if m.is_file() => {
                let len = m.len();
                Some(Broken::WrongSize(layer, len))
            }
            _ => Some(Broken::NoBlob(layer)),
        }
    }

    /// The step with this key, if it is usable: every layer it names is indexed and its blob is
    /// on disk with the recorded size. A step whose blob is missing or truncated is dropped
    /// (with its descendants, which were built on top of it) with a warning, and is a miss.
    pub fn lookup_step(&self, key: &str) -> Result<Option<StepRecord>, StoreError> {
        match self.inspect_step(key)? {
            None => Ok(None),
            Some((step, None)) => Ok(Some(step)),
            Some((step, Some(broken))) => {
                self.drop_broken_step(&step, broken)?;
                Ok(None)
            }
        }
    }

    /// The step with this key and, if it cannot be used, why (its layers, their rows and
    /// their blobs' presence and sizes are checked; blob contents are not). Changes nothing:
    /// this is what a read-only view of the cache uses.
    pub fn inspect_step(
        &self,
        key: &str,
    ) -> Result<Option<(StepRecord, Option<Broken>)>, StoreError> {
        let conn = self.conn();
        let Some(step) = get_step_in(&conn, key).map_err(self.sql())? else {
            return Ok(None);
        };
        let mut broken = None;
        for diff_id in step.layers() {
            match layer_in(&conn, diff_id).map_err(self.sql())? {
                None => broken = Some(Broken::NoLayerRow(diff_id.to_string())),
                Some(layer) => broken = self.check_layer(layer),
            }
            if broken.is_some() {
                break;
            }
        }
        Ok(Some((step, broken)))
    }

    /// Drops the step `key` (and the steps built on it) for the reason `broken` found by
    /// [`Store::inspect_step`] or by the caller (a corrupt or refused layer: its blob and layer
    /// row go too, so the step's next run writes them again). Checked again under the write
    /// lock first: another build may have repaired it meanwhile.
    pub fn drop_step(&self, key: &str, broken: Broken) -> Result<(), StoreError> {
        let Some(step) = get_step_in(&self.conn(), key).map_err(self.sql())? else {
            return Ok(());
        };
        self.drop_broken_step(&step, broken)
    }

    pub(crate) fn drop_broken_step(
        &self,
        step: &StepRecord,
        broken: Broken,
    ) -> Result<(), StoreError> {
        let key = &step.key;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        // Checked again under the write lock: another build may have repaired it meanwhile.
        let still_broken = match &broken {
            Broken::NoLayerRow(diff_id) => layer_in(&tx, diff_id).map_err(self.sql())?.is_none(),
            Broken::NoBlob(layer) | Broken::WrongSize(layer, _) => {
                match layer_in(&tx, &layer.diff_id).map_err(self.sql())? {
                    Some(now) => self.check_layer(now).is_some(),
                    None => true,
                }
            }
            Broken::Corrupt(_) | Broken::Refused(_) => true,
        };
        if !still_broken || get_step_in(&tx, key).map_err(self.sql())?.is_none() {
            return Ok(());
        }
        match &broken {
            Broken::NoLayerRow(diff_id) => warn!(
                "cache step {key} ({}/{}) names layer {diff_id}, which the index lacks; dropping the step, it will run again",
                step.phase, step.hook
            ),
            Broken::NoBlob(layer)
            | Broken::WrongSize(layer, _)
            | Broken::Corrupt(layer)
            | Broken::Refused(layer) => {
                let path = self.blob_path(&layer.blob_digest);
                match &broken {
                    Broken::WrongSize(_, len) => warn!(
                        "cache blob {} is {len} bytes, not {} (truncated?); removing it and the steps that need it, they will run again",
                        path.display(),
                        layer.blob_size
                    ),
                    Broken::NoBlob(_) => warn!(
                        "cache blob {} (layer {} of step {key}, {}/{}) is missing; dropping the step, it will run again",
                        path.display(),
                        layer.diff_id,
                        step.phase,
                        step.hook
                    ),
                    Broken::Refused(_) => warn!(
                        "cache layer {} of step {key} ({}/{}) was refused when applied; removing it and the steps that need it, they will run again",
                        layer.diff_id, step.phase, step.hook
                    ),
                    _ => {}
                }
                if !matches!(broken, Broken::NoBlob(_))
                    && let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    warn!("cannot remove damaged blob {}: {e}", path.display());
                }
                tx.execute("DELETE FROM layers WHERE diff_id = ?1", [&layer.diff_id])
                    .map_err(self.sql())?;
            }
        }
        let doomed = subtree_in(&tx, key).map_err(self.sql())?;
        delete_steps(&tx, &doomed).map_err(self.sql())?;
        tx.commit().map_err(self.sql())?;
        Ok(())
    }

    /// The step with this key as indexed, without checking its blobs (for explaining).
    pub fn get_step(&self, key: &str) -> Result<Option<StepRecord>, StoreError> {
        get_step_in(&self.conn(), key).map_err(self.sql())
    }

    /// The steps from the first one down to `key`, following parents (first step first): the
    /// layers to apply, in order, to restore the tree after `key`. Stops at a parent the index
    /// does not hold.
    pub fn chain(&self, key: &str) -> Result<Vec<StepRecord>, StoreError> {
        let conn = self.conn();
        let mut chain = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = Some(key.to_string());
        while let Some(k) = next {
            if !seen.insert(k.clone()) {
                break;
            }
            match get_step_in(&conn, &k).map_err(self.sql())? {
                Some(step) => {
                    next = step.parent.clone();
                    chain.push(step);
                }
                None => break,
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Records a step and the layers it names in one IMMEDIATE transaction. Every given layer's
    /// blob must already be on disk. Idempotent: an existing step is kept as it is (unless its
    /// layers are gone, then it is replaced), an existing layer row is kept unless its blob is
    /// gone.
    pub fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), StoreError> {
        for layer in layers {
            check_digest(&layer.blob_digest)?;
            let path = self.blob_path(&layer.blob_digest);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() && m.len() == layer.blob_size => {}
                // A wrong size would make every later lookup take the blob for truncated.
                Ok(m) if m.is_file() => {
                    return Err(StoreError::WrongBlobSize {
                        path,
                        recorded: layer.blob_size,
                        actual: m.len(),
                    });
                }
                _ => {
                    return Err(StoreError::MissingBlob {
                        digest: layer.blob_digest.clone(),
                        path,
                    });
                }
            }
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        for layer in layers {
            let usable = match layer_in(&tx, &layer.diff_id).map_err(self.sql())? {
                Some(old) => self.check_layer(old).is_none(),
                None => false,
            };
            if !usable {
                tx.execute(
                    "INSERT OR REPLACE INTO layers (diff_id, blob, size, blob_size)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        layer.diff_id,
                        layer.blob_digest,
                        to_i64(layer.size),
                        to_i64(layer.blob_size)
                    ],
                )
                .map_err(self.sql())?;
            }
        }
        for diff_id in step.layers() {
            match layer_in(&tx, diff_id).map_err(self.sql())? {
                None => {
                    return Err(StoreError::MissingLayer {
                        key: step.key.clone(),
                        diff_id: diff_id.to_string(),
                    });
                }
                Some(layer) => {
                    if self.check_layer(layer.clone()).is_some() {
                        return Err(StoreError::MissingBlob {
                            path: self.blob_path(&layer.blob_digest),
                            digest: layer.blob_digest,
                        });
                    }
                }
            }
        }
        let old_usable = match get_step_in(&tx, &step.key).map_err(self.sql())? {
            None => false,
            Some(old) => old.layers().all(|d| {
                layer_in(&tx, d)
                    .ok()
                    .flatten()
                    .is_some_and(|l| self.check_layer(l).is_none())
            }),
        };
        if !old_usable {
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO steps ({STEP_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    step.key,
                    step.parent,
                    step.phase,
                    step.hook,
                    step.layer,
                    step.hooks_layer,
                    step.inputs,
                    step.created,
                    step.last_used,
                    step.hits,
                    step.seconds,
                    mounts_text(&step.mounts)
                ],
            )
            .map_err(self.sql())?;
        }
        tx.commit().map_err(self.sql())
    }

    /// Marks a step used: `last_used = now`, `hits += 1`.
    pub fn touch_step(&self, key: &str, now: i64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE steps SET last_used = ?2, hits = hits + 1 WHERE key = ?1")
            .and_then(|mut s| s.execute(params![key, now]))
            .map_err(self.sql())?;
        Ok(())
    }

    /// The most recently used step at the same position (phase and hook) other than
    /// `exclude_key`, to explain a miss by diffing inputs.
    pub fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        exclude_key: &str,
    ) -> Result<Option<StepRecord>, StoreError> {
        self.conn()
            .prepare_cached(&format!(
                "SELECT {STEP_COLUMNS} FROM steps WHERE phase = ?1 AND hook = ?2 AND key != ?3
                 ORDER BY last_used DESC, created DESC, key LIMIT 1"
            ))
            .and_then(|mut s| {
                s.query_row(params![phase, hook, exclude_key], step_from_row)
                    .optional()
            })
            .map_err(self.sql())
    }

    /// The sha256 (`sha256:<hex>`) of the blob `blob` (a blake3 digest), if it was recorded.
    pub fn blob_sha256(&self, blob: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .prepare_cached("SELECT sha256 FROM blob_sha256 WHERE blob = ?1")
            .and_then(|mut s| s.query_row([blob], |r| r.get(0)).optional())
            .map_err(self.sql())
    }

    /// Records the sha256 of a blob (see [`Store::blob_sha256`]).
    pub fn set_blob_sha256(&self, blob: &str, sha256: &str) -> Result<(), StoreError> {
        check_digest(blob)?;
        self.conn()
            .prepare_cached("INSERT OR REPLACE INTO blob_sha256 (blob, sha256) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![blob, sha256]))
            .map_err(self.sql())?;
        Ok(())
    }

    /// The layer with this diff id, if indexed and its blob is on disk with the right size.
    pub fn usable_layer(&self, diff_id: &str) -> Result<Option<LayerRecord>, StoreError> {
        Ok(self
            .layer_for(diff_id)?
            .filter(|l| self.check_layer(l.clone()).is_none()))
    }

    /// The layer with this diff id, if indexed.
    pub fn layer_for(&self, diff_id: &str) -> Result<Option<LayerRecord>, StoreError> {
        layer_in(&self.conn(), diff_id).map_err(self.sql())
    }

    /// Every step, oldest first.
    pub fn list_steps(&self) -> Result<Vec<StepRecord>, StoreError> {
        all_steps(&self.conn()).map_err(self.sql())
    }

    /// Every layer, by diff id.
    pub fn list_layers(&self) -> Result<Vec<LayerRecord>, StoreError> {
        all_layers(&self.conn()).map_err(self.sql())
    }

    /// The full key of the one step whose key starts with `prefix` (an exact key always wins).
    pub fn resolve_key(&self, prefix: &str) -> Result<String, StoreError> {
        let conn = self.conn();
        if !prefix.is_empty() && get_step_in(&conn, prefix).map_err(self.sql())?.is_some() {
            return Ok(prefix.to_string());
        }
        if prefix.len() < MIN_KEY_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::BadKeyPrefix {
                prefix: prefix.to_string(),
            });
        }
        let mut matches: Vec<String> = conn
            .prepare_cached(
                "SELECT key FROM steps WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key LIMIT 6",
            )
            .and_then(|mut s| s.query_map([prefix], |r| r.get(0))?.collect())
            .map_err(self.sql())?;
        match matches.len() {
            0 => Err(StoreError::UnknownKey {
                key: prefix.to_string(),
                root: self.root.clone(),
            }),
            1 => Ok(matches.remove(0)),
            _ => Err(StoreError::AmbiguousKey {
                prefix: prefix.to_string(),
                matches,
                root: self.root.clone(),
            }),
        }
    }

    /// Records one build; returns its id.
    pub fn record_build(&self, b: &BuildRecord) -> Result<i64, StoreError> {
        let keys = serde_json::to_string(&b.step_keys).unwrap_or_else(|_| "[]".to_string());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        tx.execute(
            "INSERT INTO builds (elements, arguments, outcome, step_keys, started, seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                b.elements,
                b.arguments,
                b.outcome,
                keys,
                b.started,
                b.seconds
            ],
        )
        .map_err(self.sql())?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(self.sql())?;
        Ok(id)
    }

    /// Every recorded build with its id, oldest first.
    pub fn list_builds(&self) -> Result<Vec<(i64, BuildRecord)>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT id, elements, arguments, outcome, step_keys, started, seconds
                 FROM builds ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    let keys: String = r.get(4)?;
                    Ok((
                        r.get(0)?,
                        BuildRecord {
                            elements: r.get(1)?,
                            arguments: r.get(2)?,
                            outcome: r.get(3)?,
                            step_keys: serde_json::from_str(&keys).unwrap_or_default(),
                            started: r.get(5)?,
                            seconds: r.get(6)?,
                        },
                    ))
                })?
                .collect()
            })
            .map_err(self.sql())
    }

    /// Caches a final output under `key` (replacing an older one). The blob must exist.
    pub fn put_output(
        &self,
        key: &str,
        blob_digest: &str,
        size: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        check_digest(blob_digest)?;
        let path = self.blob_path(blob_digest);
        if !path.is_file() {
            return Err(StoreError::MissingBlob {
                digest: blob_digest.to_string(),
                path,
            });
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        tx.execute(
            "INSERT INTO outputs (key, blob, size, created, last_used) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT(key) DO UPDATE SET blob = excluded.blob, size = excluded.size,
                 created = excluded.created, last_used = excluded.last_used",
            params![key, blob_digest, to_i64(size), now],
        )
        .map_err(self.sql())?;
        tx.commit().map_err(self.sql())
    }

    /// The output cached under `key`, if its blob is still on disk (else the row is dropped with
    /// a warning and this is a miss).
    pub fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, StoreError> {
        let conn = self.conn();
        let out = conn
            .prepare_cached(
                "SELECT key, blob, size, created, last_used FROM outputs WHERE key = ?1",
            )
            .and_then(|mut s| s.query_row([key], output_from_row).optional())
            .map_err(self.sql())?;
        let Some(out) = out else { return Ok(None) };
        if self.blob_path(&out.blob_digest).is_file() {
            return Ok(Some(out));
        }
        warn!(
            "cache blob {} of output {key} is missing; dropping the output",
            self.blob_path(&out.blob_digest).display()
        );
        conn.execute("DELETE FROM outputs WHERE key = ?1", [key])
            .map_err(self.sql())?;
        Ok(None)
    }

    /// Marks an output used.
    pub fn touch_output(&self, key: &str, now: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE outputs SET last_used = ?2 WHERE key = ?1",
                params![key, now],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// Every cached output, oldest first.
    pub fn list_outputs(&self) -> Result<Vec<OutputRecord>, StoreError> {
        all_outputs(&self.conn()).map_err(self.sql())
    }
}
