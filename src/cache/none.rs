//! "No cache" (`--no-cache`): every lookup misses and nothing is kept, as in a plain dib build.

use super::StepRecord;
use super::{BlobRead, BlobSink, CacheError, LayerRecord, Lookup, OutputRecord, StepCache};
use crate::store::Broken;

/// The cache that holds nothing.
#[derive(Debug, Default)]
pub struct NoCache;

impl StepCache for NoCache {
    fn name(&self) -> String {
        "no cache".into()
    }

    fn writable(&self) -> bool {
        false
    }

    fn lookup(&self, _key: &str) -> Result<Lookup, CacheError> {
        Ok(Lookup::Miss)
    }

    fn drop_step(&self, _key: &str, _broken: Broken) -> Result<(), CacheError> {
        Ok(())
    }

    fn touch_step(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        Ok(())
    }

    fn nearest_step(&self, _: &str, _: &str, _: &str) -> Result<Option<StepRecord>, CacheError> {
        Ok(None)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        Err(CacheError::NoBlob {
            cache: self.name(),
            digest: digest.to_string(),
        })
    }

    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        Ok(None)
    }

    fn record_step(&self, _step: &StepRecord, _layers: &[LayerRecord]) -> Result<(), CacheError> {
        Ok(())
    }

    fn get_output(&self, _key: &str) -> Result<Option<OutputRecord>, CacheError> {
        Ok(None)
    }

    fn put_output(&self, _: &str, _: &str, _: u64, _: i64) -> Result<(), CacheError> {
        Ok(())
    }

    fn touch_output(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        Ok(())
    }
}
