//! Snapshots: bringing the tree up to date with cached steps (lazily, once, at the first step
//! that runs), and turning what a step changed into layers kept in the cache.
//!
//! ```text
//! cached step ──remember(hit)──► pending (its hook-tree layer is applied right away: later
//!                                phases list their hooks from that folder)
//! first miss  ──restore()──► every pending rootfs layer, oldest first:
//!                cache.open_blob ─► layer::unpack (diff id recomputed) ─► blob digest checked
//!                a layer that is refused (unsafe entry, wrong diff id, damaged blob)
//!                ──► RefusedLayer (the caller drops that step and builds again)
//! run a step  ──before()──► scans of the tree and the hook folder (kept from the last step)
//!             ──after()───► scan again ─ diff ─ pack ─► cache.blob_sink ─► LayerRecords
//! ```
//!
//! Mount points below the tree (cache mounts, hooks' own mounts) are left out of every scan.
//!
//! With a kept tree (`build --keep-tree`, see `kept_tree.rs`) the first restore brings the
//! image's kept tree to the last cached step instead (often with nothing to unpack) and mounts
//! an overlay of it on the tree; diffs then leave out what overlayfs' copy-up alone changed.

use super::kept_tree::{ChainStep, KeptTree, Overlay, SlotPlan, UpperState};
use crate::cache::{Hit, LayerRecord, StepCache};
use crate::layer::{self, LayerError, PackOptions, Scan, ScanOptions, UnpackOptions};
use crate::sandbox;
use crate::settings::BuildPaths;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use std::time::Instant;

/// A cached layer that could not be applied: its step (and what was built on it) must be
/// dropped from the cache and built again.
#[derive(Debug, thiserror::Error)]
#[error("the cached layer {} of step {step} ({}) was refused: {reason}", layer.diff_id, &key[..key.len().min(12)])]
pub struct RefusedLayer {
    pub key: String,
    pub step: String,
    pub layer: LayerRecord,
    pub reason: String,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restored {
    pub steps: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// The layers one step produced.
#[derive(Debug, Clone, Default)]
pub struct StepLayers {
    /// The rootfs change (None: the step changed nothing there).
    pub rootfs: Option<LayerRecord>,
    /// The hook-tree change (usually None).
    pub hooks: Option<LayerRecord>,
}

impl StepLayers {
    pub fn records(&self) -> Vec<LayerRecord> {
        self.rootfs
            .iter()
            .chain(self.hooks.iter())
            .cloned()
            .collect()
    }

    /// Compressed bytes written.
    pub fn bytes(&self) -> u64 {
        self.records().iter().map(|l| l.blob_size).sum()
    }
}

/// The scans a step's layers are diffed against.
pub struct Before {
    root: Scan,
    hooks: Scan,
    /// The overlay's upper folder (kept-tree builds).
    upper: Option<UpperState>,
}

/// The tree's state with respect to the cache.
pub struct Snapshots<'a> {
    cache: &'a dyn StepCache,
    paths: BuildPaths,
    pack: PackOptions,
    /// Cached steps whose rootfs layers are not applied yet.
    pending: Vec<Hit>,
    /// True once the tree reflects every step so far.
    restored: bool,
    /// A scan of the tree as it is now, when known.
    scan: Option<Scan>,
    /// The image's kept tree, when the build may use it (`--keep-tree`).
    kept: Option<KeptTree>,
    /// The overlay of the kept tree on the tree, once mounted.
    overlay: Option<Overlay>,
    /// True once anything was restored into (or mounted on) the tree.
    touched: bool,
}

impl<'a> Snapshots<'a> {
    pub fn new(cache: &'a dyn StepCache, paths: BuildPaths, pack: PackOptions) -> Snapshots<'a> {
        Snapshots {
            cache,
            paths,
            pack,
            pending: Vec::new(),
            restored: false,
            scan: None,
            kept: None,
            overlay: None,
            touched: false,
        }
    }

    /// Lets the first restore use `kept` (see `kept_tree.rs`).
    pub fn keep_tree(&mut self, kept: KeptTree) {
        self.kept = Some(kept);
    }

    /// True when the tree is an overlay of a kept tree.
    pub fn on_kept_tree(&self) -> bool {
        self.overlay.is_some()
    }

    /// True when steps that run are snapshotted (the cache keeps layers).
    pub fn keeps_layers(&self) -> bool {
        self.cache.writable()
    }

    /// A cached step: its hook-tree layer is applied now, its rootfs layer waits for
    /// [`Snapshots::restore`] (or is applied now if the tree is already live).
    pub fn remember(&mut self, hit: Hit) -> Result<Option<Restored>> {
        if let Some(diff) = &hit.step.hooks_layer {
            let layer = hit
                .layer(diff)
                .cloned()
                .with_context(|| format!("the cache named no blob for layer {diff}"))?;
            apply(self.cache, &hit, &layer, &self.paths.hooks_dir)?;
        }
        self.pending.push(hit);
        if self.restored {
            self.restored = false;
            return self.restore().map(Some);
        }
        Ok(None)
    }

    /// Brings the tree up to date with every cached step so far (once).
    pub fn restore(&mut self) -> Result<Restored> {
        let mut done = Restored::default();
        if self.restored {
            return Ok(done);
        }
        let started = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        let first = !self.touched;
        self.touched = true;
        if first && !pending.is_empty() && self.kept.is_some() {
            match self.restore_kept(&pending) {
                Ok(bytes) => {
                    done.steps = pending.len();
                    done.bytes = bytes;
                    done.seconds = started.elapsed().as_secs_f64();
                    self.restored = true;
                    self.scan = None;
                    return Ok(done);
                }
                Err(e)
                    if e.downcast_ref::<RefusedLayer>().is_some()
                        || crate::cancel::requested().is_some() =>
                {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!("{e:#}; restoring by unpacking instead");
                }
            }
        }
        for hit in pending {
            if let Some(diff) = &hit.step.layer {
                let layer = hit
                    .layer(diff)
                    .cloned()
                    .with_context(|| format!("the cache named no blob for layer {diff}"))?;
                apply(self.cache, &hit, &layer, &self.paths.mount_dir)?;
                done.bytes += layer.blob_size;
            }
            done.steps += 1;
        }
        done.seconds = started.elapsed().as_secs_f64();
        self.restored = true;
        if done.steps > 0 {
            self.scan = None;
        }
        Ok(done)
    }

    /// Brings the kept tree to the last of `pending` and mounts an overlay of it on the tree.
    /// Returns the compressed bytes applied to the kept tree.
    fn restore_kept(&mut self, pending: &[Hit]) -> Result<u64> {
        let mut kept = self.kept.take().context("no kept tree")?;
        let chain: Vec<ChainStep> = pending
            .iter()
            .map(|h| (h.step.key.clone(), h.step.layer.clone()))
            .collect();
        let cache = self.cache;
        let mut bytes = 0;
        let brought = kept.bring_to(&chain, |i, tree| {
            let hit = &pending[i];
            let diff = hit.step.layer.as_ref().context("a step without a layer")?;
            let layer = hit
                .layer(diff)
                .cloned()
                .with_context(|| format!("the cache named no blob for layer {diff}"))?;
            bytes += layer.blob_size;
            apply(cache, hit, &layer, tree)
        });
        let mounted = brought.and_then(|b| {
            let how = match b.plan {
                SlotPlan::Reuse => "at the wanted step already".to_string(),
                SlotPlan::Advance { .. } => format!("advanced by {} layers", b.applied),
                SlotPlan::Fresh => format!("unpacked afresh ({} layers)", b.applied),
            };
            tracing::info!("kept tree: {how} ({})", kept.tree().display());
            kept.mount(
                &self.paths.mount_dir,
                &self.paths.build_dir.join("kept-tree"),
            )
        });
        // Held until the build ends (the overlay must never see its lower folder change).
        self.kept = Some(kept);
        self.overlay = Some(mounted?);
        Ok(bytes)
    }

    /// A scan of the tree as it is now (kept from the last step when possible).
    pub fn take_scan(&mut self) -> Result<Scan> {
        match self.scan.take() {
            Some(s) => Ok(s),
            None => scan_excluding_mounts(&self.paths.mount_dir),
        }
    }

    /// Keeps a scan of the tree as it is now, for the next step or the outputs.
    pub fn keep_scan(&mut self, scan: Scan) {
        self.scan = Some(scan);
    }

    /// Forgets the kept scan (the tree changed behind the snapshots' back).
    pub fn forget_scan(&mut self) {
        self.scan = None;
    }

    /// The scans a step that is about to run will be diffed against (None without layers).
    pub fn before(&mut self) -> Result<Option<Before>> {
        if !self.keeps_layers() {
            return Ok(None);
        }
        self.before_always().map(Some)
    }

    /// The scans a step will be diffed against, whether or not the cache keeps layers (for
    /// `build --check`, which packs into a scratch cache).
    pub fn before_always(&mut self) -> Result<Before> {
        let upper = match &self.overlay {
            Some(o) => Some(o.upper_state()?),
            None => None,
        };
        Ok(Before {
            root: self.take_scan()?,
            hooks: scan_excluding_mounts(&self.paths.hooks_dir)?,
            upper,
        })
    }

    /// Packs what the step changed (tree and hook folder) into the cache.
    pub fn after(&mut self, before: Option<Before>) -> Result<StepLayers> {
        let Some(before) = before else {
            return Ok(StepLayers::default());
        };
        let cache = self.cache;
        self.after_into(before, cache)
    }

    /// Packs what the step changed into `into` (the build's cache, or a scratch one).
    pub fn after_into(&mut self, before: Before, into: &dyn StepCache) -> Result<StepLayers> {
        let after_root = scan_excluding_mounts(&self.paths.mount_dir)?;
        let changes = match (&self.overlay, &before.upper) {
            (Some(o), Some(start)) => layer::diff_with(&before.root, &after_root, &|p, b, a| {
                o.is_copy_up_noise(start, p, b, a)
            }),
            _ => layer::diff(&before.root, &after_root),
        };
        let rootfs = self.store(into, &self.paths.mount_dir, &changes)?;
        let after_hooks = scan_excluding_mounts(&self.paths.hooks_dir)?;
        let changes = layer::diff(&before.hooks, &after_hooks);
        let hooks = self.store(into, &self.paths.hooks_dir, &changes)?;
        self.scan = Some(after_root);
        Ok(StepLayers { rootfs, hooks })
    }

    /// Packs `changes` of `root` into a blob (None if nothing changed).
    fn store(
        &self,
        into: &dyn StepCache,
        root: &Path,
        changes: &layer::Changeset,
    ) -> Result<Option<LayerRecord>> {
        if changes.is_empty() {
            return Ok(None);
        }
        let Some(mut sink) = into.blob_sink()? else {
            return Ok(None);
        };
        // Packing a large layer takes a while: SIGINT/SIGTERM stops it at the next write.
        let info = layer::pack(root, changes, &mut CancelWrite(&mut sink), &self.pack)?;
        let (digest, blob_size) = sink.finish()?;
        Ok(Some(LayerRecord {
            diff_id: info.diff_id,
            blob_digest: digest,
            size: info.tar_size,
            blob_size,
        }))
    }
}

/// Applies one cached layer of `hit` onto `target`: blob digest and diff id are checked; a
/// layer that is refused becomes a [`RefusedLayer`].
fn apply(cache: &dyn StepCache, hit: &Hit, layer: &LayerRecord, target: &Path) -> Result<()> {
    crate::cancel::check()?;
    let refused = |reason: String| RefusedLayer {
        key: hit.step.key.clone(),
        step: format!("{}/{}", hit.step.phase, hit.step.hook),
        layer: layer.clone(),
        reason,
    };
    let mut blob = cache.open_blob(&layer.blob_digest)?;
    let opts = UnpackOptions {
        expected_diff_id: Some(layer.diff_id.clone()),
        ..UnpackOptions::default()
    };
    let unpacked = layer::unpack(CancelRead(&mut blob), target, &opts);
    // The decoder may stop before EOF; the blob's digest is only checked at its end.
    let checked = blob.finish();
    match unpacked {
        Ok(_) => {}
        Err(e @ (LayerError::Unsafe { .. } | LayerError::DiffIdMismatch { .. })) => {
            return Err(refused(e.to_string()).into());
        }
        Err(LayerError::Corrupt(msg)) => {
            if let Some(c) = crate::cancel::requested() {
                return Err(c.into());
            }
            return Err(refused(format!("the layer is not a readable zstd tar ({msg})")).into());
        }
        Err(e) => return Err(e.into()),
    }
    if let Err(e) = checked {
        return Err(refused(e.to_string()).into());
    }
    Ok(())
}

/// A reader that stops with a cancellation error once SIGINT/SIGTERM arrived.
struct CancelRead<'r, R: ?Sized>(&'r mut R);

impl<R: Read + ?Sized> Read for CancelRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        crate::cancel::check_io()?;
        self.0.read(buf)
    }
}

/// A writer that stops with a cancellation error once SIGINT/SIGTERM arrived.
struct CancelWrite<'w, W: ?Sized>(&'w mut W);

impl<W: std::io::Write + ?Sized> std::io::Write for CancelWrite<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::cancel::check_io()?;
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Scans `dir`, leaving out whatever is mounted below it.
pub fn scan_excluding_mounts(dir: &Path) -> Result<Scan> {
    let exclude = sandbox::mount_points_under(dir)?
        .into_iter()
        .filter_map(|m| m.strip_prefix(dir).ok().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    layer::scan(dir, &ScanOptions { exclude })
        .with_context(|| format!("cannot scan {}", dir.display()))
}
