//! Cache maintenance: usage (`du`), LRU garbage collection (`gc`), re-hashing every blob and
//! having every layer parsed by the caller (`verify`), and removing one step (`rm`). gc, verify
//! and rm hold the exclusive lock.
//!
//! ```text
//! load the index into a Model ─► decide a Removal (steps, layers, outputs, blobs)
//!   ─► one IMMEDIATE transaction deletes the rows ─► then the blob files go
//! ```
//! Rows go before files: a crash in between leaves orphan blobs (the next gc deletes them),
//! never a row naming a missing blob.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::blobs::{hash_file, list_blobs, stale_tmp};
use super::index::{all_layers, all_outputs, all_steps, delete_steps};
use super::{LayerRecord, OutputRecord, StepRecord, Store, StoreError};

/// What `du` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Blob files and their bytes on disk.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Blobs no layer or output names (left by a crash or a lost race; gc deletes them).
    pub orphan_blobs: u64,
    pub orphan_bytes: u64,
    pub steps: u64,
    pub layers: u64,
    /// Sum of the layers' uncompressed sizes.
    pub layer_bytes: u64,
    pub outputs: u64,
    pub builds: u64,
    /// index.sqlite plus its WAL.
    pub index_bytes: u64,
    pub tmp_files: u64,
    pub tmp_bytes: u64,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub max_bytes: u64,
    /// Blob bytes on disk before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Steps evicted as least recently used (a step goes only after its descendants).
    pub steps_removed: Vec<String>,
    pub outputs_removed: Vec<String>,
    /// Steps dropped because a blob they need was missing or had the wrong size.
    pub broken_steps: Vec<String>,
    pub layers_removed: u64,
    /// Blob files deleted, orphans included.
    pub blobs_removed: u64,
    pub orphan_blobs: u64,
    pub tmp_files_removed: u64,
    pub tmp_bytes_removed: u64,
    /// Stray files in the blob folder (not named by a digest) that were deleted.
    pub junk_removed: u64,
}

/// What `verify` found (and dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Blobs whose bytes did not match their name; deleted.
    pub corrupt: Vec<String>,
    /// Blobs the index names that are not on disk.
    pub missing: Vec<String>,
    pub steps_dropped: Vec<String>,
    pub layers_dropped: u64,
    pub outputs_dropped: Vec<String>,
    /// Layers the caller's check parsed.
    pub layers_checked: u64,
    /// Layers whose blob hashes right but that the caller's check refused (an unsafe entry, a
    /// malformed tar, another diff id): (diff id, why); dropped with the steps that need them.
    pub refused: Vec<(String, String)>,
    /// SQLite's `PRAGMA quick_check` answer ("ok" when the index is sound).
    pub index_check: String,
}

impl VerifyReport {
    /// True if nothing was wrong.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.missing.is_empty()
            && self.refused.is_empty()
            && self.index_check == "ok"
    }
}

/// How `verify_with` has each layer checked: given the layer and its blob's bytes (as stored,
/// already known to hash to their name), answer `Ok(None)` when it is sound, `Ok(Some(why))`
/// to refuse it, or `Err` to stop verify (an I/O error, a cancellation).
pub type LayerCheck<'a> =
    &'a dyn Fn(&LayerRecord, &mut dyn std::io::Read) -> std::io::Result<Option<String>>;

/// What `rm` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RmReport {
    /// The step and its descendants.
    pub steps: Vec<String>,
    pub outputs: Vec<String>,
    pub layers_removed: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

/// The index, loaded whole (fine under the exclusive lock: nobody else writes).
struct Model {
    steps: BTreeMap<String, StepRecord>,
    layers: BTreeMap<String, LayerRecord>,
    outputs: BTreeMap<String, OutputRecord>,
}

impl Model {
    fn load(conn: &Connection) -> rusqlite::Result<Model> {
        Ok(Model {
            steps: all_steps(conn)?
                .into_iter()
                .map(|s| (s.key.clone(), s))
                .collect(),
            layers: all_layers(conn)?
                .into_iter()
                .map(|l| (l.diff_id.clone(), l))
                .collect(),
            outputs: all_outputs(conn)?
                .into_iter()
                .map(|o| (o.key.clone(), o))
                .collect(),
        })
    }

    fn children(&self) -> HashMap<&str, Vec<&str>> {
        let mut map: HashMap<&str, Vec<&str>> = HashMap::new();
        for step in self.steps.values() {
            if let Some(p) = step.parent.as_deref()
                && self.steps.contains_key(p)
            {
                map.entry(p).or_default().push(step.key.as_str());
            }
        }
        map
    }

    /// Adds `key` and its descendants to `out`.
    fn subtree_into(
        &self,
        key: &str,
        children: &HashMap<&str, Vec<&str>>,
        out: &mut BTreeSet<String>,
    ) {
        let mut todo = vec![key.to_string()];
        while let Some(k) = todo.pop() {
            if !self.steps.contains_key(&k) || !out.insert(k.clone()) {
                continue;
            }
            for c in children.get(k.as_str()).into_iter().flatten() {
                todo.push((*c).to_string());
            }
        }
    }

    /// Drops the layers named `bad_layers`, the layers whose blob is in `bad_blobs`, every step
    /// needing one of those (or a layer the index lacks) with its descendants, and the outputs
    /// whose blob is bad.
    fn drop_broken(&self, bad_blobs: &BTreeSet<String>, removal: &mut Removal) {
        for layer in self.layers.values() {
            if bad_blobs.contains(&layer.blob_digest) {
                removal.layers.insert(layer.diff_id.clone());
            }
        }
        let children = self.children();
        for step in self.steps.values() {
            let broken = step
                .layers()
                .any(|d| !self.layers.contains_key(d) || removal.layers.contains(d));
            if broken && !removal.steps.contains(&step.key) {
                let mut sub = BTreeSet::new();
                self.subtree_into(&step.key, &children, &mut sub);
                for k in &sub {
                    if let Some(s) = self.steps.get(k) {
                        warn!(
                            "cache step {k} ({}/{}) needs a damaged, missing or refused layer; dropping it",
                            s.phase, s.hook
                        );
                    }
                }
                removal.steps.extend(sub);
            }
        }
        for out in self.outputs.values() {
            if bad_blobs.contains(&out.blob_digest) {
                warn!(
                    "cache output {} needs a damaged or missing blob; dropping it",
                    out.key
                );
                removal.outputs.insert(out.key.clone());
            }
        }
    }

    /// After `removal`'s steps and outputs go, adds the layers no remaining step names (among
    /// `layer_scope`, or all) and the blobs (among `candidates`) no remaining layer or output
    /// names.
    fn complete(
        &self,
        removal: &mut Removal,
        layer_scope: Option<&BTreeSet<String>>,
        candidates: &BTreeSet<String>,
    ) {
        let mut used_layers = BTreeSet::new();
        for step in self.steps.values() {
            if !removal.steps.contains(&step.key) {
                used_layers.extend(step.layers().map(str::to_string));
            }
        }
        for diff_id in self.layers.keys() {
            if !used_layers.contains(diff_id) && layer_scope.is_none_or(|s| s.contains(diff_id)) {
                removal.layers.insert(diff_id.clone());
            }
        }
        let mut used_blobs = BTreeSet::new();
        for layer in self.layers.values() {
            if !removal.layers.contains(&layer.diff_id) {
                used_blobs.insert(layer.blob_digest.clone());
            }
        }
        for out in self.outputs.values() {
            if !removal.outputs.contains(&out.key) {
                used_blobs.insert(out.blob_digest.clone());
            }
        }
        for blob in candidates {
            if !used_blobs.contains(blob) {
                removal.blobs.insert(blob.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct Removal {
    steps: BTreeSet<String>,
    layers: BTreeSet<String>,
    outputs: BTreeSet<String>,
    blobs: BTreeSet<String>,
}

impl Store {
    /// Deletes the rows in one transaction, then the blob files. Returns the bytes freed.
    fn commit_removal(&self, conn: &mut Connection, removal: &Removal) -> Result<u64, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let steps: Vec<String> = removal.steps.iter().cloned().collect();
        delete_steps(&tx, &steps).map_err(self.sql())?;
        {
            let mut del_layer = tx
                .prepare_cached("DELETE FROM layers WHERE diff_id = ?1")
                .map_err(self.sql())?;
            for d in &removal.layers {
                del_layer.execute([d]).map_err(self.sql())?;
            }
            let mut del_out = tx
                .prepare_cached("DELETE FROM outputs WHERE key = ?1")
                .map_err(self.sql())?;
            for k in &removal.outputs {
                del_out.execute([k]).map_err(self.sql())?;
            }
        }
        tx.commit().map_err(self.sql())?;
        let mut freed = 0;
        for digest in &removal.blobs {
            let path = self.blob_path(digest);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path)(e)),
            }
        }
        Ok(freed)
    }

    /// How much space the cache uses. Needs no exclusive lock (orphans may include blobs a
    /// running build is about to record).
    pub fn du(&self) -> Result<Usage, StoreError> {
        let listing = list_blobs(self)?;
        let conn = self.conn();
        let model = Model::load(&conn).map_err(self.sql())?;
        let builds: i64 = conn
            .query_row("SELECT count(*) FROM builds", [], |r| r.get(0))
            .map_err(self.sql())?;
        drop(conn);
        let named: BTreeSet<&str> = model
            .layers
            .values()
            .map(|l| l.blob_digest.as_str())
            .chain(model.outputs.values().map(|o| o.blob_digest.as_str()))
            .collect();
        let mut usage = Usage {
            blobs: listing.blobs.len() as u64,
            blob_bytes: listing.blobs.values().sum(),
            steps: model.steps.len() as u64,
            layers: model.layers.len() as u64,
            layer_bytes: model.layers.values().map(|l| l.size).sum(),
            outputs: model.outputs.len() as u64,
            builds: builds.max(0) as u64,
            ..Usage::default()
        };
        for (digest, len) in &listing.blobs {
            if !named.contains(digest.as_str()) {
                usage.orphan_blobs += 1;
                usage.orphan_bytes += len;
            }
        }
        for name in ["index.sqlite", "index.sqlite-wal"] {
            usage.index_bytes += std::fs::metadata(self.root.join(name))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        for (_, len) in stale_tmp(self)? {
            usage.tmp_files += 1;
            usage.tmp_bytes += len;
        }
        Ok(usage)
    }

    /// Evicts least recently used steps and outputs until the blobs take at most `max_bytes`.
    /// A step's time is the latest `last_used` among it and its descendants (restoring one of
    /// them needs its layer); a step is evicted only after all its descendants,
    /// and a blob is deleted only when no remaining layer or output names it, so a kept step
    /// always keeps its layers. Also deletes orphan blobs, stray files, stale temp files, and
    /// steps whose blobs are missing. Holds the exclusive lock.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, StoreError> {
        self.exclusive("gc", || self.gc_locked(max_bytes))
    }

    fn gc_locked(&self, max_bytes: u64) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            max_bytes,
            ..GcReport::default()
        };
        // Temp files nobody holds a lock on: their writers died.
        let tmp = self.tmp_dir();
        for (path, len) in
            crate::fsutil::sweep_dead_files(&tmp, "").map_err(StoreError::io("clean up", &tmp))?
        {
            debug!("removed stale temp file {}", path.display());
            report.tmp_files_removed += 1;
            report.tmp_bytes_removed += len;
        }
        // Nothing strata runs makes folders there; with the exclusive lock held, any is junk.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    match std::fs::remove_dir_all(&path) {
                        Ok(()) => report.tmp_files_removed += 1,
                        Err(e) => warn!("cannot remove stale temp folder {}: {e}", path.display()),
                    }
                }
            }
        }
        let listing = list_blobs(self)?;
        for path in &listing.junk {
            warn!(
                "removing stray file {} from the blob folder",
                path.display()
            );
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            match removed {
                Ok(()) => report.junk_removed += 1,
                Err(e) => warn!("cannot remove {}: {e}", path.display()),
            }
        }
        report.bytes_before = listing.blobs.values().sum();

        let mut conn = self.conn();
        let model = Model::load(&conn).map_err(self.sql())?;
        let mut removal = Removal::default();

        // Steps and outputs whose blobs are gone or the wrong size cannot be used: drop them.
        let mut bad_blobs = BTreeSet::new();
        for layer in model.layers.values() {
            if listing.blobs.get(&layer.blob_digest) != Some(&layer.blob_size) {
                bad_blobs.insert(layer.blob_digest.clone());
            }
        }
        for out in model.outputs.values() {
            if !listing.blobs.contains_key(&out.blob_digest) {
                bad_blobs.insert(out.blob_digest.clone());
            }
        }
        model.drop_broken(&bad_blobs, &mut removal);
        report.broken_steps = removal.steps.iter().cloned().collect();
        let on_disk: BTreeSet<String> = listing.blobs.keys().cloned().collect();
        model.complete(&mut removal, None, &on_disk);
        report.orphan_blobs = removal
            .blobs
            .iter()
            .filter(|b| !bad_blobs.contains(*b))
            .count() as u64;

        // Reference counts of what remains.
        let mut layer_refs: HashMap<&str, u32> = HashMap::new();
        let mut child_count: HashMap<&str, u32> = HashMap::new();
        for step in model.steps.values() {
            if removal.steps.contains(&step.key) {
                continue;
            }
            for d in step.layers() {
                *layer_refs.entry(d).or_default() += 1;
            }
            if let Some(p) = step.parent.as_deref()
                && model.steps.contains_key(p)
                && !removal.steps.contains(p)
            {
                *child_count.entry(p).or_default() += 1;
            }
        }
        let mut blob_refs: HashMap<&str, u32> = HashMap::new();
        for layer in model.layers.values() {
            if !removal.layers.contains(&layer.diff_id) {
                *blob_refs.entry(layer.blob_digest.as_str()).or_default() += 1;
            }
        }
        for out in model.outputs.values() {
            if !removal.outputs.contains(&out.key) {
                *blob_refs.entry(out.blob_digest.as_str()).or_default() += 1;
            }
        }
        let mut total: u64 = listing
            .blobs
            .iter()
            .filter(|(d, _)| !removal.blobs.contains(*d))
            .map(|(_, len)| len)
            .sum();

        // A step counts as used when any descendant was (restoring the descendant needs its
        // layer): its effective time is the latest last_used in its subtree. Evicting leaves
        // least recently used first then never revisits a newer time.
        let mut effective: HashMap<&str, i64> = HashMap::new();
        for step in model.steps.values() {
            if removal.steps.contains(&step.key) {
                continue;
            }
            let mut at = Some(step.key.as_str());
            // Bounded walk up the parents (a cycle cannot loop for ever).
            for _ in 0..=model.steps.len() {
                let Some(k) = at else { break };
                let Some(s) = model.steps.get(k) else { break };
                let e = effective.entry(s.key.as_str()).or_insert(i64::MIN);
                *e = (*e).max(step.last_used);
                at = s.parent.as_deref();
            }
        }
        let time = |key: &str| effective.get(key).copied().unwrap_or(i64::MIN);
        // Least recently used first; among equals outputs before steps, then by key.
        let mut heap: BinaryHeap<Reverse<(i64, u8, String)>> = BinaryHeap::new();
        for step in model.steps.values() {
            if !removal.steps.contains(&step.key) && !child_count.contains_key(step.key.as_str()) {
                heap.push(Reverse((time(&step.key), 1, step.key.clone())));
            }
        }
        for out in model.outputs.values() {
            if !removal.outputs.contains(&out.key) {
                heap.push(Reverse((out.last_used, 0, out.key.clone())));
            }
        }
        let mut release_blob = |digest: &str, removal: &mut Removal, total: &mut u64| {
            if let Some(n) = blob_refs.get_mut(digest) {
                *n = n.saturating_sub(1);
                if *n == 0
                    && listing.blobs.contains_key(digest)
                    && removal.blobs.insert(digest.to_string())
                {
                    *total = total.saturating_sub(listing.blobs[digest]);
                }
            }
        };
        while total > max_bytes {
            let Some(Reverse((_, kind, key))) = heap.pop() else {
                break;
            };
            if kind == 0 {
                let out = &model.outputs[&key];
                removal.outputs.insert(key.clone());
                report.outputs_removed.push(key.clone());
                release_blob(&out.blob_digest, &mut removal, &mut total);
                continue;
            }
            let step = &model.steps[&key];
            removal.steps.insert(key.clone());
            report.steps_removed.push(key.clone());
            for d in step.layers() {
                if let Some(n) = layer_refs.get_mut(d) {
                    *n = n.saturating_sub(1);
                    if *n == 0
                        && let Some(layer) = model.layers.get(d)
                    {
                        removal.layers.insert(d.to_string());
                        release_blob(&layer.blob_digest, &mut removal, &mut total);
                    }
                }
            }
            if let Some(p) = step.parent.as_deref()
                && let Some(n) = child_count.get_mut(p)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    child_count.remove(p);
                    if let Some(parent) = model.steps.get(p) {
                        heap.push(Reverse((time(&parent.key), 1, parent.key.clone())));
                    }
                }
            }
        }

        report.layers_removed = removal.layers.len() as u64;
        report.blobs_removed = removal.blobs.len() as u64;
        self.commit_removal(&mut conn, &removal)?;
        drop(conn);
        report.bytes_after = list_blobs(self)?.blobs.values().sum();
        info!(
            "cache gc: {} → {} bytes of blobs; {} steps, {} outputs evicted; {} blobs removed ({} orphans); {} broken steps dropped; {} temp files removed",
            report.bytes_before,
            report.bytes_after,
            report.steps_removed.len(),
            report.outputs_removed.len(),
            report.blobs_removed,
            report.orphan_blobs,
            report.broken_steps.len(),
            report.tmp_files_removed
        );
        Ok(report)
    }

    /// Re-hashes every blob; deletes the damaged ones and drops the layers, steps (with their
    /// descendants) and outputs that need a damaged or missing blob. Holds the exclusive lock.
    /// Layers are not parsed: see [`Store::verify_with`].
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.verify_with(&|_, _| Ok(None), &|| Ok(()))
    }

    /// [`Store::verify`], and every layer whose blob is sound is handed to `check_layer` (the
    /// store does not know the layer format); a layer it refuses is dropped with its blob (when
    /// nothing else names it) and the steps that need it, with their descendants.
    /// `keep_going` is asked between blobs; its error stops verify before anything is dropped.
    pub fn verify_with(
        &self,
        check_layer: LayerCheck<'_>,
        keep_going: &dyn Fn() -> std::io::Result<()>,
    ) -> Result<VerifyReport, StoreError> {
        self.exclusive("verify", || self.verify_locked(check_layer, keep_going))
    }

    fn verify_locked(
        &self,
        check_layer: LayerCheck<'_>,
        keep_going: &dyn Fn() -> std::io::Result<()>,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let listing = list_blobs(self)?;
        let stop = |e| StoreError::io("verify", &self.root)(e);
        let mut bad = BTreeSet::new();
        for (digest, len) in &listing.blobs {
            keep_going().map_err(stop)?;
            let path = self.blob_path(digest);
            report.blobs_checked += 1;
            report.bytes_checked += len;
            match hash_file(&path)? {
                Some(actual) if actual == *digest => {}
                Some(actual) => {
                    warn!(
                        "cache blob {} is damaged (hashes to {actual}); removing it",
                        path.display()
                    );
                    report.corrupt.push(digest.clone());
                    bad.insert(digest.clone());
                }
                None => {}
            }
        }
        let mut conn = self.conn();
        report.index_check = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(self.sql())?;
        if report.index_check != "ok" {
            warn!(
                "cache index {}: quick_check says {}",
                self.db_path.display(),
                report.index_check
            );
        }
        let model = Model::load(&conn).map_err(self.sql())?;
        let named: BTreeSet<&str> = model
            .layers
            .values()
            .map(|l| l.blob_digest.as_str())
            .chain(model.outputs.values().map(|o| o.blob_digest.as_str()))
            .collect();
        for digest in named {
            if !listing.blobs.contains_key(digest) {
                warn!("cache blob {} is missing", self.blob_path(digest).display());
                report.missing.push(digest.to_string());
                bad.insert(digest.to_string());
            }
        }
        let mut removal = Removal::default();
        // Every layer whose blob is sound is parsed by the caller.
        for layer in model.layers.values() {
            if bad.contains(&layer.blob_digest) {
                continue;
            }
            keep_going().map_err(stop)?;
            let path = self.blob_path(&layer.blob_digest);
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => return Err(StoreError::io("open", &path)(e)),
            };
            report.layers_checked += 1;
            if let Some(why) = check_layer(layer, &mut file).map_err(stop)? {
                warn!(
                    "cache layer {} (blob {}) is refused: {why}; dropping it and the steps that need it",
                    layer.diff_id,
                    path.display()
                );
                report.refused.push((layer.diff_id.clone(), why));
                removal.layers.insert(layer.diff_id.clone());
            }
        }
        model.drop_broken(&bad, &mut removal);
        // The damaged blobs go, and the refused layers' blobs nothing else names; orphans are
        // gc's business.
        removal.blobs = report.corrupt.iter().cloned().collect();
        let still_named: BTreeSet<&str> = model
            .layers
            .values()
            .filter(|l| !removal.layers.contains(&l.diff_id))
            .map(|l| l.blob_digest.as_str())
            .chain(
                model
                    .outputs
                    .values()
                    .filter(|o| !removal.outputs.contains(&o.key))
                    .map(|o| o.blob_digest.as_str()),
            )
            .collect();
        for (diff_id, _) in &report.refused {
            if let Some(layer) = model.layers.get(diff_id)
                && !still_named.contains(layer.blob_digest.as_str())
            {
                removal.blobs.insert(layer.blob_digest.clone());
            }
        }
        report.steps_dropped = removal.steps.iter().cloned().collect();
        report.layers_dropped = removal.layers.len() as u64;
        report.outputs_dropped = removal.outputs.iter().cloned().collect();
        self.commit_removal(&mut conn, &removal)?;
        Ok(report)
    }

    /// Removes the step `key` and its descendants (their layers are diffs on top of it, useless
    /// without it), or the output `key`, and the layers and blobs nothing else needs. Holds the
    /// exclusive lock.
    pub fn rm(&self, key: &str) -> Result<RmReport, StoreError> {
        self.exclusive("rm", || self.rm_locked(key))
    }

    fn rm_locked(&self, key: &str) -> Result<RmReport, StoreError> {
        let mut conn = self.conn();
        let model = Model::load(&conn).map_err(self.sql())?;
        let mut removal = Removal::default();
        if model.steps.contains_key(key) {
            model.subtree_into(key, &model.children(), &mut removal.steps);
        }
        if model.outputs.contains_key(key) {
            removal.outputs.insert(key.to_string());
        }
        if removal.steps.is_empty() && removal.outputs.is_empty() {
            return Err(StoreError::UnknownKey {
                key: key.to_string(),
                root: self.root.clone(),
            });
        }
        // Candidate blobs: those of the removed steps' layers and of the removed output.
        let mut candidates = BTreeSet::new();
        for k in &removal.steps {
            for d in model.steps[k].layers() {
                if let Some(l) = model.layers.get(d) {
                    candidates.insert(l.blob_digest.clone());
                }
            }
        }
        for k in &removal.outputs {
            candidates.insert(model.outputs[k].blob_digest.clone());
        }
        // Unrelated unreferenced layer rows are gc's business: only the layers the removed
        // steps named may go.
        let named: BTreeSet<String> = removal
            .steps
            .iter()
            .flat_map(|k| model.steps[k].layers().map(str::to_string))
            .collect();
        model.complete(&mut removal, Some(&named), &candidates);
        let bytes_freed = self.commit_removal(&mut conn, &removal)?;
        Ok(RmReport {
            steps: removal.steps.into_iter().collect(),
            outputs: removal.outputs.into_iter().collect(),
            layers_removed: removal.layers.len() as u64,
            blobs_removed: removal.blobs.len() as u64,
            bytes_freed,
        })
    }
}
