//! The step cache seam: one trait for everything the executor asks of a cache, and its levels
//! (the local store, a read-only view, "no cache", and a multi-level composition).
//!
//! ```text
//!                     ┌── Local(Store)        content-addressed blobs + SQLite index
//! executor ──► dyn StepCache ─┼── ReadOnly(level)     what `plan` and `--explain` use
//!                     ├── NoCache             `--no-cache`: every lookup misses, nothing kept
//!                     ├── MultiLevel[L0, L1…] L0 first, later levels on a miss; a hit from a
//!                     │                       later level is copied (verified) into L0
//!                     └── RegistryLevel       an OCI registry (registry.rs): `--cache-from`
//!                                             reads, `--cache-to` pushes in the background
//! ```
//!
//! # The contract
//!
//! * **Lookup** ([`StepCache::lookup`]) answers [`Lookup::Hit`] only when the step and every
//!   layer it names can be read now: the index rows exist and every blob is present with its
//!   recorded size and (for the local store) hashes to its name. [`Lookup::Miss`] means the
//!   key is not there. [`Lookup::Unusable`] means it is there but cannot be used (a missing,
//!   truncated or corrupt blob); the caller treats it as a miss and, on a writable cache, asks
//!   for it to be dropped ([`StepCache::drop_step`]), which drops its descendants too (their
//!   layers are diffs on top of it). `Err` is for the cache itself failing (an unreadable index,
//!   an I/O error), never for a missing entry.
//! * **Who checks digests**: a level checks a blob's digest while it is read
//!   ([`BlobRead::finish`] fails on a mismatch); the reader of a layer (the executor) checks the
//!   layer's diff id (blake3 of the uncompressed tar) after applying it. A hit copied from a
//!   later level into the first is checked against both its blob digest and its diff id before
//!   it is recorded, so nothing unverified from a remote level is ever applied. The claim "key K
//!   gave diff id D" is only as good as the level that holds it (a remote level may require
//!   signed records).
//! * **Read-only**: a read-only cache ([`ReadOnly`]) never writes, deletes or touches anything:
//!   its [`StepCache::writable`] is false, [`StepCache::blob_sink`] gives none, and every
//!   mutating call returns [`CacheError::ReadOnly`]. Callers check `writable()` first.
//! * **No cache** ([`NoCache`]): every lookup misses; nothing is kept; mutating calls succeed
//!   doing nothing.
//! * **Failures of later levels** never break a build: [`MultiLevel`] drops a level that fails
//!   for the rest of its life, with one warning, and carries on with the others.

mod local;
mod multi;
mod none;
mod readonly;
pub mod registry;

pub use local::Local;
pub use multi::MultiLevel;
pub use none::NoCache;
pub use readonly::ReadOnly;

pub use crate::store::{BuildRecord, LayerRecord, OutputRecord, StepMount, StepRecord, StoreError};

use std::io::{self, Read, Write};

/// What can go wrong in a cache. Each message is one line naming the cache and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A write was asked of a read-only view (a bug in the caller).
    #[error("the cache {cache} is read-only here; cannot {action}")]
    ReadOnly { cache: String, action: &'static str },
    /// A blob a level named cannot be found there.
    #[error("{cache}: blob {digest} is not there")]
    NoBlob { cache: String, digest: String },
    /// A copied layer did not match its digest or diff id.
    #[error("{cache}: layer {diff_id} of step {key} does not match its {what}; refused")]
    Mismatch {
        cache: String,
        key: String,
        diff_id: String,
        what: &'static str,
    },
    #[error("{cache}: {message}")]
    Other { cache: String, message: String },
    /// A registry level failed.
    #[error("{cache}: {source}")]
    Remote {
        cache: String,
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Hit(Hit),
    Miss,
    /// The step is there but cannot be used; `broken` says why (for [`StepCache::drop_step`]).
    Unusable {
        step: StepRecord,
        broken: crate::store::Broken,
        level: String,
    },
}

impl Lookup {
    pub fn is_hit(&self) -> bool {
        matches!(self, Lookup::Hit(_))
    }
}

/// A usable cached step.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub step: StepRecord,
    /// The layers the step names (rootfs layer first), each with the blob that holds it.
    pub layers: Vec<LayerRecord>,
    /// The level it came from (for messages and `plan`).
    pub level: String,
}

impl Hit {
    /// The layer record of diff id `diff_id`, if the step names it.
    pub fn layer(&self, diff_id: &str) -> Option<&LayerRecord> {
        self.layers.iter().find(|l| l.diff_id == diff_id)
    }
}

/// A blob being read: compressed bytes, checked against the blob's digest. A reader that may
/// stop before the end (a zstd decoder stops at the end of its frame) must call `finish`.
pub trait BlobRead: Read + Send {
    /// Reads whatever is left and checks the digest. Returns the blob's size.
    fn finish(self: Box<Self>) -> io::Result<u64>;
}

impl BlobRead for crate::store::VerifiedBlob {
    fn finish(self: Box<Self>) -> io::Result<u64> {
        crate::store::VerifiedBlob::finish(*self)
    }
}

/// A blob being written into a cache; `finish` makes it visible and returns (digest, size).
pub trait BlobSink: Write + Send {
    fn finish(self: Box<Self>) -> Result<(String, u64), CacheError>;
}

impl BlobSink for crate::store::BlobWriter {
    fn finish(self: Box<Self>) -> Result<(String, u64), CacheError> {
        Ok(crate::store::BlobWriter::finish(*self)?)
    }
}

/// What the executor asks of a step cache. See the module docs for the contract.
pub trait StepCache: Send + Sync {
    /// A short name for messages: `local cache ./cache`, `registry host/repo`.
    fn name(&self) -> String;

    /// True when the cache keeps what it is given (steps, layers, outputs).
    fn writable(&self) -> bool;

    /// Looks a step up by key.
    fn lookup(&self, key: &str) -> Result<Lookup, CacheError>;

    /// True when this cache holds a usable copy of the layer (indexed, blob present).
    fn has_layer(&self, _diff_id: &str) -> Result<bool, CacheError> {
        Ok(false)
    }

    /// Drops an unusable step and its descendants (see [`Lookup::Unusable`]).
    fn drop_step(&self, key: &str, broken: crate::store::Broken) -> Result<(), CacheError>;

    /// Marks a step used now (for least-recently-used eviction).
    fn touch_step(&self, key: &str, now: i64) -> Result<(), CacheError>;

    /// The most recently used step at the same position (phase and hook) with another key, to
    /// explain a miss. None when the cache has none (or keeps no such history).
    fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        key: &str,
    ) -> Result<Option<StepRecord>, CacheError>;

    /// Opens a blob this cache holds (a layer's or an output's), checked while read.
    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError>;

    /// A writer for a new blob, or None when this cache keeps nothing.
    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError>;

    /// The local file that holds a blob (which may not exist), for a writer that reads parts
    /// of an earlier blob at random (the tar output's chunked blob); None when this cache has
    /// no local files. Unverified: the reader checks the blob's digest itself.
    fn blob_file(&self, _digest: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Records a step and its layers (whose blobs were written through [`Self::blob_sink`]).
    fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), CacheError>;

    /// The output cached under `key`, if any.
    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError>;

    /// Records an output blob (written through [`Self::blob_sink`]) under `key`.
    fn put_output(&self, key: &str, digest: &str, size: u64, now: i64) -> Result<(), CacheError>;

    /// Marks an output used now.
    fn touch_output(&self, key: &str, now: i64) -> Result<(), CacheError>;

    /// A step this build found cached: levels that collect what builds use (a `--cache-to`
    /// registry behind a composition) get it too. Default: nothing.
    fn share_hit(&self, _hit: &Hit) -> Result<(), CacheError> {
        Ok(())
    }

    /// The same for an output found cached. Default: nothing.
    fn share_output(&self, _output: &OutputRecord) -> Result<(), CacheError> {
        Ok(())
    }

    /// Keeps a record of one build (the local store's history). Default: nothing.
    fn record_build(&self, _build: &BuildRecord) -> Result<(), CacheError> {
        Ok(())
    }

    /// Waits for background work (e.g. pushes) to end. Default: nothing to wait for.
    fn flush(&self) -> Result<(), CacheError> {
        Ok(())
    }
}

/// A shared level is a level (levels are shared between a composition and the registry levels
/// that push from the local one).
impl<T: StepCache + ?Sized> StepCache for std::sync::Arc<T> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn writable(&self) -> bool {
        (**self).writable()
    }
    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        (**self).lookup(key)
    }
    fn has_layer(&self, diff_id: &str) -> Result<bool, CacheError> {
        (**self).has_layer(diff_id)
    }
    fn drop_step(&self, key: &str, broken: crate::store::Broken) -> Result<(), CacheError> {
        (**self).drop_step(key, broken)
    }
    fn touch_step(&self, key: &str, now: i64) -> Result<(), CacheError> {
        (**self).touch_step(key, now)
    }
    fn nearest_step(
        &self,
        phase: &str,
        hook: &str,
        key: &str,
    ) -> Result<Option<StepRecord>, CacheError> {
        (**self).nearest_step(phase, hook, key)
    }
    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        (**self).open_blob(digest)
    }
    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        (**self).blob_sink()
    }
    fn blob_file(&self, digest: &str) -> Option<std::path::PathBuf> {
        (**self).blob_file(digest)
    }
    fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), CacheError> {
        (**self).record_step(step, layers)
    }
    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError> {
        (**self).get_output(key)
    }
    fn put_output(&self, key: &str, digest: &str, size: u64, now: i64) -> Result<(), CacheError> {
        (**self).put_output(key, digest, size, now)
    }
    fn touch_output(&self, key: &str, now: i64) -> Result<(), CacheError> {
        (**self).touch_output(key, now)
    }
    fn share_hit(&self, hit: &Hit) -> Result<(), CacheError> {
        (**self).share_hit(hit)
    }
    fn share_output(&self, output: &OutputRecord) -> Result<(), CacheError> {
        (**self).share_output(output)
    }
    fn record_build(&self, build: &BuildRecord) -> Result<(), CacheError> {
        (**self).record_build(build)
    }
    fn flush(&self) -> Result<(), CacheError> {
        (**self).flush()
    }
}

/// Copies a blob (an output's) from `from` into `to`, checked against its digest and size.
pub fn copy_blob(
    from: &dyn StepCache,
    to: &dyn StepCache,
    digest: &str,
    size: u64,
) -> Result<(), CacheError> {
    let Some(mut sink) = to.blob_sink()? else {
        return Err(CacheError::ReadOnly {
            cache: to.name(),
            action: "copy a blob in",
        });
    };
    let io_err = |e: io::Error| CacheError::Other {
        cache: from.name(),
        message: format!("cannot copy blob {digest}: {e}"),
    };
    let mut blob = from.open_blob(digest)?;
    io::copy(&mut blob, &mut sink).map_err(io_err)?;
    blob.finish().map_err(io_err)?;
    let (got, got_size) = sink.finish()?;
    if got != digest || got_size != size {
        return Err(CacheError::Other {
            cache: from.name(),
            message: format!("blob {digest} arrived as {got} ({got_size} bytes); refused"),
        });
    }
    Ok(())
}

/// Copies the blob of `layer` from `from` into `to`, checking the copy against the blob
/// digest and the layer's diff id (blake3 of the uncompressed tar) on the way; only a copy
/// that matches both is kept. `key` names the step (for the error).
pub fn copy_layer(
    from: &dyn StepCache,
    to: &dyn StepCache,
    key: &str,
    layer: &LayerRecord,
) -> Result<(), CacheError> {
    let Some(mut sink) = to.blob_sink()? else {
        return Err(CacheError::ReadOnly {
            cache: to.name(),
            action: "copy a layer in",
        });
    };
    let mismatch = |what| CacheError::Mismatch {
        cache: from.name(),
        key: key.to_string(),
        diff_id: layer.diff_id.clone(),
        what,
    };
    let io_err = |e: io::Error| CacheError::Other {
        cache: from.name(),
        message: format!("cannot copy layer {}: {e}", layer.diff_id),
    };
    let mut blob = from.open_blob(&layer.blob_digest)?;
    // Tee the compressed bytes into the sink and a decoder that hashes the tar. A stream that
    // does not decode is bad data (the transfer's own failures show at `finish`).
    let mut tar_hash = blake3::Hasher::new();
    let decoded = (|| -> io::Result<()> {
        let tee = Tee {
            inner: &mut blob,
            copy: &mut sink,
        };
        let mut dec = zstd::Decoder::new(tee)?;
        dec.window_log_max(31)?;
        io::copy(&mut dec, &mut tar_hash)?;
        Ok(())
    })();
    if let Some(c) = crate::cancel::requested() {
        return Err(CacheError::Other {
            cache: from.name(),
            message: c.to_string(),
        });
    }
    // The decoder may stop at its frame's end: copy (and check) the rest too.
    let mut rest = Vec::new();
    let rest_read = blob.read_to_end(&mut rest);
    let finished = blob.finish();
    match finished {
        Err(e) if e.kind() != io::ErrorKind::InvalidData => return Err(io_err(e)),
        Err(_) => return Err(mismatch("blob digest")),
        Ok(_) => {}
    }
    if decoded.is_err() || rest_read.is_err() {
        return Err(mismatch("content (it does not decompress)"));
    }
    sink.write_all(&rest).map_err(io_err)?;
    if tar_hash.finalize().to_hex().as_str() != layer.diff_id {
        return Err(mismatch("diff id"));
    }
    let (digest, size) = sink.finish()?;
    if digest != layer.blob_digest || size != layer.blob_size {
        return Err(mismatch("blob digest"));
    }
    Ok(())
}

/// A reader that copies what it reads into a writer.
struct Tee<'a, R: Read + ?Sized, W: Write + ?Sized> {
    inner: &'a mut R,
    copy: &'a mut W,
}

impl<R: Read + ?Sized, W: Write + ?Sized> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
