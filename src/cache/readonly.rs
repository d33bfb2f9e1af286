//! A read-only view of a cache level: lookups pass through, nothing is ever written, deleted
//! or touched. What `strata plan` and `--explain` use.

use super::StepRecord;
use super::{BlobRead, BlobSink, CacheError, LayerRecord, Lookup, OutputRecord, StepCache};
use crate::store::Broken;

/// Wraps a level so that it can only be read.
pub struct ReadOnly<C>(pub C);

impl<C: StepCache> ReadOnly<C> {
    fn refuse<T>(&self, action: &'static str) -> Result<T, CacheError> {
        Err(CacheError::ReadOnly {
            cache: self.0.name(),
            action,
        })
    }
}

impl<C: StepCache> StepCache for ReadOnly<C> {
    fn name(&self) -> String {
        self.0.name()
    }

    fn writable(&self) -> bool {
        false
    }

    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        self.0.lookup(key)
    }

    fn has_layer(&self, diff_id: &str) -> Result<bool, CacheError> {
        self.0.has_layer(diff_id)
    }

    fn drop_step(&self, _key: &str, _broken: Broken) -> Result<(), CacheError> {
        self.refuse("drop a step")
    }

    fn touch_step(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        self.refuse("mark a step used")
    }

    fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        key: &str,
    ) -> Result<Option<StepRecord>, CacheError> {
        self.0.nearest_step(phase, hook, key)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        self.0.open_blob(digest)
    }

    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        Ok(None)
    }

    fn record_step(&self, _step: &StepRecord, _layers: &[LayerRecord]) -> Result<(), CacheError> {
        self.refuse("record a step")
    }

    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError> {
        self.0.get_output(key)
    }

    fn put_output(&self, _: &str, _: &str, _: u64, _: i64) -> Result<(), CacheError> {
        self.refuse("keep an output")
    }

    fn touch_output(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        self.refuse("mark an output used")
    }

    fn record_build(&self, _build: &super::BuildRecord) -> Result<(), CacheError> {
        self.refuse("record a build")
    }
}
