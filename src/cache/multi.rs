//! Several cache levels as one: the first level (the local store) first, later levels (remote
//! registries) on a miss, and a hit from a later level copied into the first, verified.
//!
//! ```text
//! lookup(key):  L0 hit ──► hit
//!               L0 miss ──► L1, L2, … in order ──hit──► copy its layers into L0 (blob digest
//!                           and diff id checked) ──► record in L0 ──► hit "from L1"
//!                                        refused copy ──► one warning, miss (the step runs)
//! record/put:   L0 (its errors are the build's), then every later writable level
//! a later level that fails ──► one warning, dropped for the rest of this MultiLevel's life
//! ```
//!
//! When L0 is not writable (a read-only view for `plan`), a later level's hit is returned as
//! it is, so `plan` can say where each step would come from without copying anything.

use super::{
    BlobRead, BlobSink, BuildRecord, CacheError, Hit, LayerRecord, Lookup, OutputRecord, StepCache,
    StepRecord, copy_blob, copy_layer,
};
use crate::store::Broken;
use std::sync::{Arc, Mutex};

/// Levels in lookup order; the first is where hits are copied and new steps recorded first.
pub struct MultiLevel {
    levels: Vec<Arc<dyn StepCache>>,
    /// Levels (by index) dropped after a failure.
    dropped: Mutex<Vec<bool>>,
}

impl MultiLevel {
    /// `levels[0]` is the first level; there must be at least one.
    pub fn new(levels: Vec<Arc<dyn StepCache>>) -> MultiLevel {
        let n = levels.len();
        MultiLevel {
            levels,
            dropped: Mutex::new(vec![false; n]),
        }
    }

    fn first(&self) -> &dyn StepCache {
        self.levels[0].as_ref()
    }

    /// The later levels still in use, with their index.
    fn later(&self) -> Vec<(usize, &dyn StepCache)> {
        let dropped = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        self.levels
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(i, _)| !dropped[*i])
            .map(|(i, l)| (i, l.as_ref()))
            .collect()
    }

    /// Drops level `i` for the rest of the build, with one warning.
    fn drop_level(&self, i: usize, err: &CacheError) {
        let mut dropped = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        if !dropped[i] {
            dropped[i] = true;
            let name = self.levels[i].name();
            let text = err.to_string();
            let text = if text.starts_with(&name) {
                text
            } else {
                format!("{name}: {text}")
            };
            tracing::warn!("{text}; not using it for the rest of this build");
        }
    }

    /// Copies a later level's hit into the first level. Ok(false) when the copy was refused
    /// (a warning says why; the level stays in use).
    fn backfill(&self, i: usize, level: &dyn StepCache, hit: &Hit) -> Result<bool, CacheError> {
        let first = self.first();
        for layer in &hit.layers {
            if first.has_layer(&layer.diff_id)? {
                continue;
            }
            match copy_layer(level, first, &hit.step.key, layer) {
                Ok(()) => {}
                Err(e @ CacheError::Mismatch { .. }) => {
                    tracing::warn!(
                        "step {}/{} ({}) from {}: {e}; running it here instead",
                        hit.step.phase,
                        hit.step.hook,
                        &hit.step.key[..hit.step.key.len().min(12)],
                        level.name()
                    );
                    return Ok(false);
                }
                Err(e) => {
                    self.drop_level(i, &e);
                    return Ok(false);
                }
            }
        }
        let mut step = hit.step.clone();
        let now = crate::fsutil::now();
        step.created = now;
        step.last_used = now;
        step.hits = 0;
        first.record_step(&step, &hit.layers)?;
        Ok(true)
    }
}

impl StepCache for MultiLevel {
    fn name(&self) -> String {
        self.levels
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn writable(&self) -> bool {
        self.first().writable()
    }

    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        let first = self.first().lookup(key)?;
        if let Lookup::Hit(_) = first {
            return Ok(first);
        }
        for (i, level) in self.later() {
            let hit = match level.lookup(key) {
                Ok(Lookup::Hit(hit)) => hit,
                Ok(_) => continue,
                Err(e) => {
                    self.drop_level(i, &e);
                    continue;
                }
            };
            if !self.first().writable() {
                return Ok(Lookup::Hit(hit));
            }
            if self.backfill(i, level, &hit)? {
                return Ok(match self.first().lookup(key)? {
                    Lookup::Hit(mut h) => {
                        h.level = level.name();
                        Lookup::Hit(h)
                    }
                    other => other,
                });
            }
        }
        Ok(first)
    }

    fn has_layer(&self, diff_id: &str) -> Result<bool, CacheError> {
        self.first().has_layer(diff_id)
    }

    fn drop_step(&self, key: &str, broken: Broken) -> Result<(), CacheError> {
        self.first().drop_step(key, broken)
    }

    fn touch_step(&self, key: &str, now: i64) -> Result<(), CacheError> {
        self.first().touch_step(key, now)
    }

    fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        key: &str,
    ) -> Result<Option<StepRecord>, CacheError> {
        if let Some(s) = self.first().nearest_step(phase, hook, key)? {
            return Ok(Some(s));
        }
        for (i, level) in self.later() {
            match level.nearest_step(phase, hook, key) {
                Ok(Some(s)) => return Ok(Some(s)),
                Ok(None) => {}
                Err(e) => self.drop_level(i, &e),
            }
        }
        Ok(None)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        match self.first().open_blob(digest) {
            Ok(b) => Ok(b),
            Err(first_err) => {
                for (_, level) in self.later() {
                    if let Ok(b) = level.open_blob(digest) {
                        return Ok(b);
                    }
                }
                Err(first_err)
            }
        }
    }

    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        self.first().blob_sink()
    }

    fn blob_file(&self, digest: &str) -> Option<std::path::PathBuf> {
        self.first().blob_file(digest)
    }

    fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), CacheError> {
        self.first().record_step(step, layers)?;
        for (i, level) in self.later() {
            if level.writable()
                && let Err(e) = level.record_step(step, layers)
            {
                self.drop_level(i, &e);
            }
        }
        Ok(())
    }

    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError> {
        if let Some(o) = self.first().get_output(key)? {
            return Ok(Some(o));
        }
        for (i, level) in self.later() {
            let found = match level.get_output(key) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(e) => {
                    self.drop_level(i, &e);
                    continue;
                }
            };
            if !self.first().writable() {
                return Ok(Some(found));
            }
            match copy_blob(level, self.first(), &found.blob_digest, found.size) {
                Ok(()) => {
                    self.first().put_output(
                        key,
                        &found.blob_digest,
                        found.size,
                        crate::fsutil::now(),
                    )?;
                    return self.first().get_output(key);
                }
                Err(e @ CacheError::Remote { .. }) => self.drop_level(i, &e),
                Err(e) => tracing::warn!(
                    "output {} from {}: {e}; making it here instead",
                    &key[..key.len().min(12)],
                    level.name()
                ),
            }
        }
        Ok(None)
    }

    fn put_output(&self, key: &str, digest: &str, size: u64, now: i64) -> Result<(), CacheError> {
        self.first().put_output(key, digest, size, now)?;
        for (i, level) in self.later() {
            if level.writable()
                && let Err(e) = level.put_output(key, digest, size, now)
            {
                self.drop_level(i, &e);
            }
        }
        Ok(())
    }

    fn touch_output(&self, key: &str, now: i64) -> Result<(), CacheError> {
        self.first().touch_output(key, now)
    }

    fn share_hit(&self, hit: &Hit) -> Result<(), CacheError> {
        for (i, level) in self.later() {
            if level.writable()
                && level.name() != hit.level
                && let Err(e) = level.record_step(&hit.step, &hit.layers)
            {
                self.drop_level(i, &e);
            }
        }
        Ok(())
    }

    fn share_output(&self, output: &OutputRecord) -> Result<(), CacheError> {
        for (i, level) in self.later() {
            if level.writable()
                && let Err(e) = level.put_output(
                    &output.key,
                    &output.blob_digest,
                    output.size,
                    output.created,
                )
            {
                self.drop_level(i, &e);
            }
        }
        Ok(())
    }

    fn record_build(&self, build: &BuildRecord) -> Result<(), CacheError> {
        self.first().record_build(build)
    }

    fn flush(&self) -> Result<(), CacheError> {
        self.first().flush()?;
        for (i, level) in self.later() {
            if let Err(e) = level.flush() {
                self.drop_level(i, &e);
            }
        }
        Ok(())
    }
}
