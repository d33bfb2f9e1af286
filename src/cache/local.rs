//! The local cache level: the store folder (content-addressed blobs + SQLite index) behind the
//! [`StepCache`] trait.
//!
//! ```text
//! lookup(key) ──► Store::inspect_step (rows, blob presence and size)
//!             ──► every layer blob re-hashed (a corrupt one makes the step Unusable)
//! ```

use super::{BlobRead, BlobSink, CacheError, Hit, LayerRecord, Lookup, OutputRecord, StepCache};
use super::{BuildRecord, StepRecord};
use crate::store::{Broken, Store};

/// The local store as a cache level.
#[derive(Debug)]
pub struct Local {
    store: Store,
}

impl Local {
    pub fn new(store: Store) -> Local {
        Local { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl StepCache for Local {
    fn name(&self) -> String {
        format!("local cache {}", self.store.root().display())
    }

    fn writable(&self) -> bool {
        true
    }

    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        let Some((step, broken)) = self.store.inspect_step(key)? else {
            return Ok(Lookup::Miss);
        };
        let unusable = |step, broken| {
            Ok(Lookup::Unusable {
                step,
                broken,
                level: self.name(),
            })
        };
        if let Some(broken) = broken {
            return unusable(step, broken);
        }
        let mut layers = Vec::new();
        let diffs: Vec<String> = step.layers().map(str::to_string).collect();
        for diff in &diffs {
            let Some(layer) = self.store.layer_for(diff)? else {
                let broken = Broken::NoLayerRow(diff.clone());
                return unusable(step, broken);
            };
            if !self.store.verify_blob(&layer.blob_digest)? {
                return unusable(step, Broken::Corrupt(layer));
            }
            layers.push(layer);
        }
        Ok(Lookup::Hit(Hit {
            step,
            layers,
            level: self.name(),
        }))
    }

    fn has_layer(&self, diff_id: &str) -> Result<bool, CacheError> {
        Ok(self.store.usable_layer(diff_id)?.is_some())
    }

    fn drop_step(&self, key: &str, broken: Broken) -> Result<(), CacheError> {
        Ok(self.store.drop_step(key, broken)?)
    }

    fn touch_step(&self, key: &str, now: i64) -> Result<(), CacheError> {
        Ok(self.store.touch_step(key, now)?)
    }

    fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        key: &str,
    ) -> Result<Option<StepRecord>, CacheError> {
        Ok(self.store.nearest_step(phase, hook, key)?)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        Ok(Box::new(self.store.open_blob(digest)?))
    }

    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        Ok(Some(Box::new(self.store.blob_writer()?)))
    }

    fn blob_file(&self, digest: &str) -> Option<std::path::PathBuf> {
        crate::store::is_digest(digest).then(|| self.store.blob_path(digest))
    }

    fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), CacheError> {
        Ok(self.store.record_step(step, layers)?)
    }

    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError> {
        Ok(self.store.get_output(key)?)
    }

    fn put_output(&self, key: &str, digest: &str, size: u64, now: i64) -> Result<(), CacheError> {
        Ok(self.store.put_output(key, digest, size, now)?)
    }

    fn touch_output(&self, key: &str, now: i64) -> Result<(), CacheError> {
        Ok(self.store.touch_output(key, now)?)
    }

    fn record_build(&self, build: &BuildRecord) -> Result<(), CacheError> {
        self.store.record_build(build)?;
        Ok(())
    }
}
