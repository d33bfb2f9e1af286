//! A registry (OCI distribution: CNCF distribution, Harbor, GHCR, ECR, Quay, zot) as a cache
//! level: one OCI image manifest per cached step, tagged by the step key, whose config blob is
//! the (optionally signed) step record and whose layers are the step's zstd layer blobs.
//!
//! ```text
//! lookup(K): GET manifest REPO:K ─► config blob (sha256-checked) = StepDoc
//!            ─► signature over (K, config digest) checked against --cache-trust keys
//!            ─► Hit { StepRecord, LayerRecords (blake3 names) }; blake3 → sha256 remembered
//! open_blob(blake3): GET blob by its sha256, streamed through a pipe; sha256 checked by the
//!            client, blake3 checked here at the end (the caller checks the diff id)
//! record_step / put_output (--cache-to): queued for a background thread, so pushes overlap
//!            the build: each blob's sha256 (computed once, kept in the local index) ─► blob
//!            pushed unless present ─► config blob ─► manifest PUT under tag K (signed when a
//!            --cache-sign-key is given) ─► flush() waits for the queue at the end of the build
//! ```
//!
//! Why one manifest per step, tagged by its key: concurrent writers never overwrite each other's
//! entries (BuildKit's single `:cache` tag is last-writer-wins), entries can be pruned one by
//! one, and every registry accepts a plain image manifest. Content addressing makes a layer
//! verify itself; the claim "key K gave diff id D" does not, so it is signed (Nix's model): the
//! signature covers the key and the config digest, and the config names every layer by diff id,
//! blake3 and sha256. Readers with `--cache-trust` keys ignore any record without a valid
//! signature from one of them. The layout is documented in `cache/README.md`.
//!
//! A failing registry never breaks a build: errors come back as `CacheError::Remote`, and the
//! multi-level composition drops the level with one warning.

use super::{
    BlobRead, BlobSink, BuildRecord, CacheError, Hit, LayerRecord, Local, Lookup, OutputRecord,
    StepCache, StepMount, StepRecord,
};
use crate::registry::manifest::{Descriptor, ImageManifest};
use crate::registry::media_types;
use crate::registry::sign::{PublicKey, SigningKey};
use crate::registry::{Client, Digest, Reference, RegistryError, Transfer};
use crate::store::Broken;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The media type of a step record (the manifest's config blob).
pub const STEP_CONFIG: &str = "application/vnd.strata.step.v1+json";
/// The media type of an output record.
pub const OUTPUT_CONFIG: &str = "application/vnd.strata.output.v1+json";
/// The media type of a cached output's blob (zstd of the output file).
pub const OUTPUT_BLOB: &str = "application/vnd.strata.output.v1+zstd";
/// Manifest annotation holding the signature.
pub const SIGNATURE: &str = "org.strata.signature";
/// Manifest annotation holding the record's creation time (RFC 3339), for `cache prune`.
pub const CREATED: &str = "org.opencontainers.image.created";
/// The largest config blob strata reads (a record is a few KiB).
const MAX_CONFIG: u64 = 4 << 20;

/// What a signature signs: the key (tag) and the config's digest.
pub fn signed_message(kind: &str, key: &str, config_digest: &str) -> Vec<u8> {
    format!("strata {kind} record v1\n{key}\n{config_digest}\n").into_bytes()
}

/// The step record pushed as a manifest's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDoc {
    pub strata_version: String,
    pub cache_format_version: u32,
    pub key: String,
    pub parent: Option<String>,
    pub phase: String,
    pub hook: String,
    pub layer: Option<String>,
    pub hooks_layer: Option<String>,
    pub layers: Vec<LayerDoc>,
    /// The key's inputs as JSON (for explaining misses).
    pub inputs: String,
    pub created: i64,
    pub seconds: f64,
    /// The mounts the step's hooks left below the image root (records pushed before strata
    /// kept them have none). Part of the config, so a signature covers them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<StepMount>,
}

/// One layer of a step record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDoc {
    pub diff_id: String,
    pub blob_blake3: String,
    pub blob_sha256: String,
    pub size: u64,
    pub blob_size: u64,
}

/// The output record pushed as a manifest's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDoc {
    pub strata_version: String,
    pub cache_format_version: u32,
    pub key: String,
    pub blob_blake3: String,
    pub blob_sha256: String,
    pub blob_size: u64,
    pub created: i64,
}

/// How a registry level is used.
#[derive(Default)]
pub struct LevelOptions {
    /// Look steps up in it (`--cache-from`).
    pub read: bool,
    /// Push what the build makes to it (`--cache-to`); needs `local` as the blob source.
    pub write: bool,
    pub sign_key: Option<SigningKey>,
    /// When not empty, only records signed by one of these keys are used.
    pub trusted: Vec<PublicKey>,
}

enum Job {
    Step(StepRecord, Vec<LayerRecord>),
    Output(String, String, u64, i64),
}

/// What the push thread did.
#[derive(Debug, Default, Clone)]
pub struct PushReport {
    pub steps: usize,
    pub outputs: usize,
    pub blobs_sent: usize,
    pub bytes_sent: u64,
    pub failed: Option<String>,
}

struct Pusher {
    tx: mpsc::Sender<Job>,
    thread: JoinHandle<PushReport>,
}

/// A registry repository as a cache level.
pub struct RegistryLevel {
    inner: Arc<Inner>,
    options_read: bool,
    options_write: bool,
    pusher: Mutex<Option<Pusher>>,
}

struct Inner {
    name: String,
    repo: String,
    client: Client,
    local: Option<Arc<Local>>,
    sign_key: Option<SigningKey>,
    trusted: Vec<PublicKey>,
    /// blake3 blob digest → sha256, learned from lookups.
    known: Mutex<HashMap<String, Digest>>,
}

fn remote(inner: &Inner) -> impl Fn(RegistryError) -> CacheError + '_ {
    move |source| CacheError::Remote {
        cache: inner.name.clone(),
        source: Box::new(source),
    }
}

fn transfer_cancelled() -> bool {
    crate::cancel::requested().is_some()
}

impl RegistryLevel {
    /// A level for the repository of `reference` (its tag, if any, is ignored).
    pub fn new(
        reference: &Reference,
        client: Client,
        local: Option<Arc<Local>>,
        options: LevelOptions,
    ) -> RegistryLevel {
        let inner = Inner {
            name: format!("registry {}/{}", reference.registry, reference.repository),
            repo: reference.repository.clone(),
            client,
            local,
            sign_key: options.sign_key,
            trusted: options.trusted,
            known: Mutex::new(HashMap::new()),
        };
        RegistryLevel {
            inner: Arc::new(inner),
            options_read: options.read,
            options_write: options.write,
            pusher: Mutex::new(None),
        }
    }

    fn queue(&self, job: Job) -> Result<(), CacheError> {
        let mut guard = self.pusher.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let inner = Arc::clone(&self.inner);
            let thread = std::thread::spawn(move || push_all(&inner, rx));
            *guard = Some(Pusher { tx, thread });
        }
        let sent = guard.as_ref().is_some_and(|p| p.tx.send(job).is_ok());
        match sent {
            true => Ok(()),
            false => Err(CacheError::Other {
                cache: self.inner.name.clone(),
                message: "the push thread stopped".into(),
            }),
        }
    }

    /// Pushes one step now (for `strata cache push`); returns bytes sent.
    pub fn push_step_now(
        &self,
        step: &StepRecord,
        layers: &[LayerRecord],
        progress: &dyn Fn(u64),
    ) -> Result<u64, CacheError> {
        push_step(&self.inner, step, layers, progress)
    }

    /// Pushes one output now (for `strata cache push`); returns bytes sent.
    pub fn push_output_now(
        &self,
        key: &str,
        blob: &str,
        size: u64,
        created: i64,
        progress: &dyn Fn(u64),
    ) -> Result<u64, CacheError> {
        push_output(&self.inner, key, blob, size, created, progress)
    }

    /// Every tag of the repository.
    pub fn tags(&self) -> Result<Vec<String>, CacheError> {
        self.inner
            .client
            .list_tags(&self.inner.repo, None)
            .map_err(remote(&self.inner))
    }

    /// The manifest under `tag`: its digest and whether it is a step (with its parent) or an
    /// output, and its creation time. None for a tag that is not a strata record.
    pub fn entry(&self, tag: &str) -> Result<Option<Entry>, CacheError> {
        let inner = &self.inner;
        let m = match inner
            .client
            .get_manifest(&inner.repo, tag, &[media_types::OCI_MANIFEST])
        {
            Ok(m) => m,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(remote(inner)(e)),
        };
        let Ok(manifest) = ImageManifest::from_bytes(&m.bytes) else {
            return Ok(None);
        };
        let created = manifest
            .annotations
            .get(CREATED)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        let kind = match manifest.config.media_type.as_str() {
            STEP_CONFIG => EntryKind::Step,
            OUTPUT_CONFIG => EntryKind::Output,
            _ => return Ok(None),
        };
        Ok(Some(Entry {
            tag: tag.to_string(),
            digest: m.digest,
            kind,
            created,
        }))
    }

    /// Deletes the manifest `digest` (the registry's own garbage collection frees the blobs).
    pub fn delete(&self, digest: &Digest) -> Result<(), CacheError> {
        self.inner
            .client
            .delete_manifest(&self.inner.repo, digest)
            .map_err(remote(&self.inner))
    }

    /// The step record under `key`, checked like a lookup (for `cache pull`, which follows
    /// parents).
    pub fn step(&self, key: &str) -> Result<Option<Hit>, CacheError> {
        match self.lookup_any(key)? {
            Lookup::Hit(h) => Ok(Some(h)),
            _ => Ok(None),
        }
    }

    fn lookup_any(&self, key: &str) -> Result<Lookup, CacheError> {
        let inner = &self.inner;
        let Some((manifest, config)) = fetch_record(inner, key, STEP_CONFIG)? else {
            return Ok(Lookup::Miss);
        };
        let doc: StepDoc = match serde_json::from_slice(&config) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(
                    "{}: step {key} has an unreadable record ({e}); ignoring it",
                    inner.name
                );
                return Ok(Lookup::Miss);
            }
        };
        if doc.key != key || doc.cache_format_version != crate::key::CACHE_FORMAT_VERSION {
            return Ok(Lookup::Miss);
        }
        let served: Vec<&str> = manifest.layers.iter().map(|d| d.digest.as_str()).collect();
        let mut layers = Vec::new();
        let mut known = inner.known.lock().unwrap_or_else(|p| p.into_inner());
        for l in &doc.layers {
            let Ok(sha) = Digest::parse(&l.blob_sha256) else {
                return Ok(Lookup::Miss);
            };
            if !served.contains(&sha.as_str()) || !crate::store::is_digest(&l.blob_blake3) {
                tracing::warn!(
                    "{}: step {key}'s record names a layer its manifest does not serve; ignoring it",
                    inner.name
                );
                return Ok(Lookup::Miss);
            }
            known.insert(l.blob_blake3.clone(), sha);
            layers.push(LayerRecord {
                diff_id: l.diff_id.clone(),
                blob_digest: l.blob_blake3.clone(),
                size: l.size,
                blob_size: l.blob_size,
            });
        }
        for d in [&doc.layer, &doc.hooks_layer].into_iter().flatten() {
            if !layers.iter().any(|l| &l.diff_id == d) {
                return Ok(Lookup::Miss);
            }
        }
        let step = StepRecord {
            key: doc.key,
            parent: doc.parent,
            phase: doc.phase,
            hook: doc.hook,
            layer: doc.layer,
            hooks_layer: doc.hooks_layer,
            inputs: doc.inputs,
            created: doc.created,
            last_used: doc.created,
            hits: 0,
            seconds: doc.seconds,
            mounts: doc.mounts,
        };
        Ok(Lookup::Hit(Hit {
            step,
            layers,
            level: inner.name.clone(),
        }))
    }
}

/// A strata record in a registry (for `cache prune`).
#[derive(Debug, Clone)]
pub struct Entry {
    pub tag: String,
    pub digest: Digest,
    pub kind: EntryKind,
    /// When it was pushed (seconds since 1970), if the manifest says.
    pub created: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Step,
    Output,
}

/// The manifest and config blob of the record tagged `key`, if it is one of `config_type` and
/// (with trusted keys) signed by one of them.
fn fetch_record(
    inner: &Inner,
    key: &str,
    config_type: &str,
) -> Result<Option<(ImageManifest, Vec<u8>)>, CacheError> {
    if crate::registry::reference::validate_tag(key).is_err() {
        return Ok(None);
    }
    let m = match inner
        .client
        .get_manifest(&inner.repo, key, &[media_types::OCI_MANIFEST])
    {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(remote(inner)(e)),
    };
    let Ok(manifest) = ImageManifest::from_bytes(&m.bytes) else {
        return Ok(None);
    };
    if manifest.config.media_type != config_type || manifest.config.size > MAX_CONFIG {
        return Ok(None);
    }
    if !inner.trusted.is_empty() {
        let kind = if config_type == STEP_CONFIG {
            "step"
        } else {
            "output"
        };
        let msg = signed_message(kind, key, &manifest.config.digest);
        let verdict = match manifest.annotations.get(SIGNATURE) {
            None => Err("it is not signed".to_string()),
            Some(sig) => crate::registry::sign::verify(&inner.trusted, &msg, sig)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(why) = verdict {
            tracing::warn!(
                "{}: the {kind} record {} is refused: {why}; only records signed by a --cache-trust key are used",
                inner.name,
                &key[..key.len().min(12)]
            );
            return Ok(None);
        }
    }
    let digest = Digest::parse(&manifest.config.digest)
        .map_err(|e| remote(inner)(RegistryError::from(e)))?;
    let mut config = Vec::new();
    inner
        .client
        .pull_blob(&inner.repo, &digest, &mut config, &Transfer::none())
        .map_err(remote(inner))?;
    Ok(Some((manifest, config)))
}

impl StepCache for RegistryLevel {
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    fn writable(&self) -> bool {
        self.options_write && self.inner.local.is_some()
    }

    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        if !self.options_read {
            return Ok(Lookup::Miss);
        }
        self.lookup_any(key)
    }

    fn drop_step(&self, _key: &str, _broken: Broken) -> Result<(), CacheError> {
        // A registry entry is never deleted by a reader; a bad one is refused at each lookup.
        Ok(())
    }

    fn touch_step(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        Ok(())
    }

    fn nearest_step(&self, _: &str, _: &str, _: &str) -> Result<Option<StepRecord>, CacheError> {
        Ok(None)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        let sha = self
            .inner
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
            .ok_or_else(|| CacheError::NoBlob {
                cache: self.inner.name.clone(),
                digest: digest.to_string(),
            })?;
        let (reader, mut writer) = io::pipe().map_err(|e| CacheError::Other {
            cache: self.inner.name.clone(),
            message: format!("cannot make a pipe: {e}"),
        })?;
        let inner = Arc::clone(&self.inner);
        let thread = std::thread::spawn(move || {
            let transfer = Transfer {
                progress: &|_| {},
                cancelled: &transfer_cancelled,
            };
            inner
                .client
                .pull_blob(&inner.repo, &sha, &mut writer, &transfer)
                .map(drop)
        });
        Ok(Box::new(RemoteBlob {
            reader,
            hasher: blake3::Hasher::new(),
            expected: digest.to_string(),
            thread: Some(thread),
            name: self.inner.name.clone(),
        }))
    }

    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        // New blobs go to the local level; this level receives them by record_step.
        Ok(None)
    }

    fn record_step(&self, step: &StepRecord, layers: &[LayerRecord]) -> Result<(), CacheError> {
        if !self.writable() {
            return Ok(());
        }
        self.queue(Job::Step(step.clone(), layers.to_vec()))
    }

    fn get_output(&self, key: &str) -> Result<Option<OutputRecord>, CacheError> {
        if !self.options_read {
            return Ok(None);
        }
        let inner = &self.inner;
        let Some((manifest, config)) = fetch_record(inner, key, OUTPUT_CONFIG)? else {
            return Ok(None);
        };
        let Ok(doc) = serde_json::from_slice::<OutputDoc>(&config) else {
            return Ok(None);
        };
        if doc.key != key || doc.cache_format_version != crate::key::CACHE_FORMAT_VERSION {
            return Ok(None);
        }
        let Ok(sha) = Digest::parse(&doc.blob_sha256) else {
            return Ok(None);
        };
        if !manifest.layers.iter().any(|d| d.digest == sha.as_str())
            || !crate::store::is_digest(&doc.blob_blake3)
        {
            return Ok(None);
        }
        inner
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(doc.blob_blake3.clone(), sha);
        Ok(Some(OutputRecord {
            key: doc.key,
            blob_digest: doc.blob_blake3,
            size: doc.blob_size,
            created: doc.created,
            last_used: doc.created,
        }))
    }

    fn put_output(&self, key: &str, digest: &str, size: u64, now: i64) -> Result<(), CacheError> {
        if !self.writable() {
            return Ok(());
        }
        self.queue(Job::Output(key.into(), digest.into(), size, now))
    }

    fn touch_output(&self, _key: &str, _now: i64) -> Result<(), CacheError> {
        Ok(())
    }

    fn record_build(&self, _build: &BuildRecord) -> Result<(), CacheError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), CacheError> {
        let pusher = self.pusher.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(Pusher { tx, thread }) = pusher else {
            return Ok(());
        };
        drop(tx);
        let report = thread.join().map_err(|_| CacheError::Other {
            cache: self.inner.name.clone(),
            message: "the push thread panicked".into(),
        })?;
        if let Some(why) = report.failed {
            return Err(CacheError::Other {
                cache: self.inner.name.clone(),
                message: format!("pushing stopped: {why}"),
            });
        }
        tracing::info!(
            "{}: pushed {} steps and {} outputs ({} blobs, {:.1} MiB sent)",
            self.inner.name,
            report.steps,
            report.outputs,
            report.blobs_sent,
            report.bytes_sent as f64 / (1 << 20) as f64
        );
        Ok(())
    }
}

/// The push thread: every job in order; after the first failure the rest are skipped (the
/// failure is reported by `flush`).
fn push_all(inner: &Inner, rx: mpsc::Receiver<Job>) -> PushReport {
    let mut report = PushReport::default();
    for job in rx {
        if report.failed.is_some() || crate::cancel::requested().is_some() {
            continue;
        }
        let sent = std::cell::Cell::new(0u64);
        let count = |n: u64| sent.set(sent.get() + n);
        let result = match &job {
            Job::Step(step, layers) => push_step(inner, step, layers, &count).map(|_| {
                report.steps += 1;
            }),
            Job::Output(key, blob, size, created) => {
                push_output(inner, key, blob, *size, *created, &count).map(|_| {
                    report.outputs += 1;
                })
            }
        };
        report.bytes_sent += sent.get();
        match result {
            Ok(()) => {}
            Err(e) => report.failed = Some(e.to_string()),
        }
    }
    report
}

/// The sha256 of a local blob: from the index, or computed once and kept there.
fn sha256_of(inner: &Inner, local: &Local, blob: &str) -> Result<Digest, CacheError> {
    let store = local.store();
    if let Some(s) = store.blob_sha256(blob)?
        && let Ok(d) = Digest::parse(&s)
    {
        return Ok(d);
    }
    use sha2::Digest as _;
    let path = store.blob_path(blob);
    let mut file = std::fs::File::open(&path).map_err(|e| CacheError::Other {
        cache: inner.name.clone(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| CacheError::Other {
            cache: inner.name.clone(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = Digest::from_sha256(h.finalize().into());
    store.set_blob_sha256(blob, digest.as_str())?;
    Ok(digest)
}

fn push_blob(
    inner: &Inner,
    local: &Local,
    blob: &str,
    progress: &dyn Fn(u64),
) -> Result<(Digest, u64), CacheError> {
    let sha = sha256_of(inner, local, blob)?;
    let path = local.store().blob_path(blob);
    let transfer = Transfer {
        progress,
        cancelled: &transfer_cancelled,
    };
    let pushed = inner
        .client
        .push_blob_file(&inner.repo, &path, Some(&sha), &transfer)
        .map_err(remote(inner))?;
    Ok((sha, if pushed.uploaded { pushed.size } else { 0 }))
}

fn put_record(
    inner: &Inner,
    kind: &str,
    key: &str,
    config_type: &str,
    config: &[u8],
    layers: Vec<Descriptor>,
    created: i64,
) -> Result<(), CacheError> {
    let pushed = inner
        .client
        .push_blob_bytes(&inner.repo, config)
        .map_err(remote(inner))?;
    let mut manifest = ImageManifest::new(
        Descriptor {
            media_type: config_type.to_string(),
            digest: pushed.digest.as_str().to_string(),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers,
    );
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(created.max(0) as u64);
    manifest.annotations.insert(
        CREATED.into(),
        humantime::format_rfc3339_seconds(when).to_string(),
    );
    if let Some(k) = &inner.sign_key {
        let msg = signed_message(kind, key, pushed.digest.as_str());
        manifest.annotations.insert(SIGNATURE.into(), k.sign(&msg));
    }
    inner
        .client
        .put_manifest(
            &inner.repo,
            key,
            media_types::OCI_MANIFEST,
            &manifest.to_bytes(),
        )
        .map_err(remote(inner))?;
    Ok(())
}

fn no_local(inner: &Inner) -> CacheError {
    CacheError::Other {
        cache: inner.name.clone(),
        message: "pushing needs the local cache as the source of the blobs".into(),
    }
}

fn push_step(
    inner: &Inner,
    step: &StepRecord,
    layers: &[LayerRecord],
    progress: &dyn Fn(u64),
) -> Result<u64, CacheError> {
    let local = inner.local.as_ref().ok_or_else(|| no_local(inner))?;
    let mut sent = 0;
    let mut docs = Vec::new();
    let mut descs = Vec::new();
    for diff in [&step.layer, &step.hooks_layer].into_iter().flatten() {
        let layer = match layers.iter().find(|l| &l.diff_id == diff) {
            Some(l) => l.clone(),
            None => local
                .store()
                .layer_for(diff)?
                .ok_or_else(|| CacheError::Other {
                    cache: inner.name.clone(),
                    message: format!(
                        "layer {diff} of step {} is not in the local cache",
                        step.key
                    ),
                })?,
        };
        let (sha, bytes) = push_blob(inner, local, &layer.blob_digest, progress)?;
        sent += bytes;
        let mut annotations = BTreeMap::new();
        annotations.insert("org.strata.diff-id".to_string(), layer.diff_id.clone());
        descs.push(Descriptor {
            media_type: media_types::OCI_LAYER_ZSTD.to_string(),
            digest: sha.as_str().to_string(),
            size: layer.blob_size,
            annotations,
        });
        docs.push(LayerDoc {
            diff_id: layer.diff_id.clone(),
            blob_blake3: layer.blob_digest.clone(),
            blob_sha256: sha.as_str().to_string(),
            size: layer.size,
            blob_size: layer.blob_size,
        });
    }
    let doc = StepDoc {
        strata_version: env!("CARGO_PKG_VERSION").to_string(),
        cache_format_version: crate::key::CACHE_FORMAT_VERSION,
        key: step.key.clone(),
        parent: step.parent.clone(),
        phase: step.phase.clone(),
        hook: step.hook.clone(),
        layer: step.layer.clone(),
        hooks_layer: step.hooks_layer.clone(),
        layers: docs,
        inputs: step.inputs.clone(),
        created: step.created,
        seconds: step.seconds,
        mounts: step.mounts.clone(),
    };
    let config = serde_json::to_vec(&doc).map_err(|e| CacheError::Other {
        cache: inner.name.clone(),
        message: e.to_string(),
    })?;
    put_record(
        inner,
        "step",
        &step.key,
        STEP_CONFIG,
        &config,
        descs,
        step.created,
    )?;
    Ok(sent)
}

fn push_output(
    inner: &Inner,
    key: &str,
    blob: &str,
    size: u64,
    created: i64,
    progress: &dyn Fn(u64),
) -> Result<u64, CacheError> {
    let local = inner.local.as_ref().ok_or_else(|| no_local(inner))?;
    let (sha, sent) = push_blob(inner, local, blob, progress)?;
    let doc = OutputDoc {
        strata_version: env!("CARGO_PKG_VERSION").to_string(),
        cache_format_version: crate::key::CACHE_FORMAT_VERSION,
        key: key.to_string(),
        blob_blake3: blob.to_string(),
        blob_sha256: sha.as_str().to_string(),
        blob_size: size,
        created,
    };
    let config = serde_json::to_vec(&doc).map_err(|e| CacheError::Other {
        cache: inner.name.clone(),
        message: e.to_string(),
    })?;
    let desc = Descriptor {
        media_type: OUTPUT_BLOB.to_string(),
        digest: sha.as_str().to_string(),
        size,
        annotations: BTreeMap::new(),
    };
    put_record(
        inner,
        "output",
        key,
        OUTPUT_CONFIG,
        &config,
        vec![desc],
        created,
    )?;
    Ok(sent)
}

/// A blob streamed from the registry through a pipe: the client checks the sha256 (its result
/// comes at `finish`), this reader checks the blake3 name.
struct RemoteBlob {
    reader: io::PipeReader,
    hasher: blake3::Hasher,
    expected: String,
    thread: Option<JoinHandle<Result<(), RegistryError>>>,
    name: String,
}

impl Read for RemoteBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl BlobRead for RemoteBlob {
    fn finish(mut self: Box<Self>) -> io::Result<u64> {
        let n = io::copy(&mut *self, &mut io::sink())?;
        let pulled = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => {
                return Err(io::Error::other(format!(
                    "{}: the pull thread failed",
                    self.name
                )));
            }
        };
        pulled.map_err(|e| match e {
            // Bad data is InvalidData; a failed transfer is another kind of error.
            RegistryError::DigestMismatch { .. } => {
                io::Error::new(io::ErrorKind::InvalidData, e.to_string())
            }
            other => io::Error::other(other.to_string()),
        })?;
        let got = self.hasher.finalize().to_hex().to_string();
        if got != self.expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: blob {} hashes to {got}; refused",
                    self.name, self.expected
                ),
            ));
        }
        Ok(n)
    }
}

impl Drop for RemoteBlob {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Unblock the writer (it fails on a closed pipe), then reap it.
            let (dead, _) = match io::pipe() {
                Ok(p) => p,
                Err(_) => return,
            };
            self.reader = dead;
            let _ = t.join();
        }
    }
}
