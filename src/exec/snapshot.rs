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
//!                           (on a kept tree the tree is not walked again: only the paths
//!                           that changed in the overlay's upper folder are, layer::rescan;
//!                           0.13 s → 0.005 s a step on debian-minimal's 20,000 paths)
//! ```
//!
//! Mount points below the tree (cache mounts, hooks' own mounts) are left out of every scan.
//!
//! Hook mounts (what a hook leaves mounted below the image root, such as dib's apt cache bind
//! from root.d) are part of what a step did, but no layer can hold them:
//!
//! ```text
//! after a step runs ──note_mounts(step)──► sandbox::left_below(root): every mount there, the
//!     ones already known keep the step that made them, new ones get this step ─► StepMount
//!     records (a bind's source relative to the image root, DIB_IMAGE_CACHE or the build folder
//!     when it lies there, so another builder's folders are used) ─► kept with the step
//! restore() ──► hook mounts below the root unmounted (a layer is never unpacked through one)
//!     ─► layers applied ─► the LAST restored step's mounts made again, in mount order
//!     (sandbox::mount_again; a failure names the step that made the mount)
//! restore_for_outputs() ──► the same without making them (outputs unmount them anyway)
//! ```
//!
//! Each step keeps every mount live after it (not only the new ones), so a hook that unmounts
//! what an earlier one mounted is followed too; the list is tiny. Steps recorded before strata
//! kept mounts have none, and a restore to them makes none (as before).

//! With a kept tree (`build --keep-tree`, see `kept_tree.rs`) the first restore brings the
//! image's kept tree to the last cached step instead (often with nothing to unpack) and mounts
//! an overlay of it on the tree; diffs then leave out what overlayfs' copy-up alone changed.

use super::kept_tree::{ChainStep, KeptTree, Overlay, SlotPlan, UpperState};
use crate::cache::{Hit, LayerRecord, StepCache, StepMount};
use crate::layer::{self, LayerError, PackOptions, Scan, ScanOptions, UnpackOptions};
use crate::sandbox;
use crate::settings::BuildPaths;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
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
    /// DIB_IMAGE_CACHE (bind sources there are recorded relative to it).
    image_cache: PathBuf,
    /// The hook mounts live below the root, by mount id, as recorded.
    mounts: Vec<(u64, StepMount)>,
    /// Mount ids already warned about as impossible to make again (warned once).
    unrecorded: Vec<u64>,
    /// The image's kept tree, when the build may use it (`--keep-tree`).
    kept: Option<KeptTree>,
    /// The overlay of the kept tree on the tree, once mounted.
    overlay: Option<Overlay>,
    /// True once anything was restored into (or mounted on) the tree.
    touched: bool,
}

impl<'a> Snapshots<'a> {
    pub fn new(
        cache: &'a dyn StepCache,
        paths: BuildPaths,
        pack: PackOptions,
        image_cache: PathBuf,
    ) -> Snapshots<'a> {
        Snapshots {
            cache,
            paths,
            pack,
            pending: Vec::new(),
            restored: false,
            scan: None,
            image_cache,
            mounts: Vec::new(),
            unrecorded: Vec::new(),
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

    /// Brings the tree up to date with every cached step so far (once), with the mounts the
    /// last of them left below the root made again, so the next hook sees what it would see
    /// in a cold build.
    pub fn restore(&mut self) -> Result<Restored> {
        self.restore_with(true)
    }

    /// Like [`Snapshots::restore`] without making the hook mounts again: for outputs, which
    /// unmount them first anyway.
    pub fn restore_for_outputs(&mut self) -> Result<Restored> {
        self.restore_with(false)
    }

    fn restore_with(&mut self, remount: bool) -> Result<Restored> {
        let mut done = Restored::default();
        if self.restored {
            return Ok(done);
        }
        let started = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        let Some(last) = pending.last() else {
            self.restored = true;
            self.touched = true;
            return Ok(done);
        };
        let mounts = last.step.mounts.clone();
        // A live tree (`remember` after steps ran): no layer is unpacked through a mount.
        self.unmount_hook_mounts()?;
        let first = !self.touched;
        self.touched = true;
        let mut from_kept = false;
        if first && self.kept.is_some() {
            match self.restore_kept(&pending) {
                Ok(bytes) => {
                    done.steps = pending.len();
                    done.bytes = bytes;
                    from_kept = true;
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
        let pending = if from_kept { Vec::new() } else { pending };
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
        self.restored = true;
        self.scan = None;
        if remount {
            for m in &mounts {
                self.mount_again(m)?;
            }
        }
        done.seconds = started.elapsed().as_secs_f64();
        Ok(done)
    }

    /// Unmounts every hook mount below the root (deepest first, one line each).
    pub fn unmount_hook_mounts(&mut self) -> Result<()> {
        if !sandbox::unmount_below(&self.paths.mount_dir)?.is_empty() {
            self.scan = None;
        }
        self.mounts.clear();
        Ok(())
    }

    /// Makes one recorded hook mount again on the restored tree.
    fn mount_again(&mut self, m: &StepMount) -> Result<()> {
        let kind = self.kind_of(m);
        let what = describe(&kind);
        let id = sandbox::mount_again(
            &self.paths.mount_dir,
            Path::new(&m.target),
            &kind,
            &m.options,
        )
        .with_context(|| {
            format!(
                "cannot make again the mount that hook {} left on /{} ({what}), which the steps \
                 after it expect; make it possible (or drop that step from the cache with \
                 `strata cache rm`, or build with --no-cache)",
                m.step, m.target
            )
        })?;
        tracing::info!(
            "mounted /{} again ({what}), as hook {} left it",
            m.target,
            m.step
        );
        self.mounts.push((id, m.clone()));
        Ok(())
    }

    /// What a recorded mount is, with its source resolved for this build.
    fn kind_of(&self, m: &StepMount) -> sandbox::MountKind {
        if m.kind != "bind" {
            return sandbox::MountKind::Fresh {
                fstype: m.kind.clone(),
                source: m.source.clone(),
                data: m.fs_options.clone(),
            };
        }
        let base = match m.base.as_str() {
            "image" => self.paths.mount_dir.clone(),
            "image-cache" => self.image_cache.clone(),
            "build" => self.paths.build_dir.clone(),
            "host" => PathBuf::from("/"),
            other => {
                return sandbox::MountKind::Unreachable {
                    reason: format!(
                        "its source is relative to {other:?}, which this strata does not know"
                    ),
                };
            }
        };
        let rel = Path::new(&m.source);
        if rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return sandbox::MountKind::Unreachable {
                reason: format!("its source {:?} leaves its base", m.source),
            };
        }
        sandbox::MountKind::Bind {
            from: base.join(rel.strip_prefix("/").unwrap_or(rel)),
        }
    }

    /// Reads the hook mounts live below the root after `step` ran; those already known keep
    /// the step that made them. Returns the step's mount list (see the module docs).
    pub fn note_mounts(&mut self, step: &str) -> Result<Vec<StepMount>> {
        let left = sandbox::left_below(&self.paths.mount_dir)?;
        let mut now = Vec::new();
        for l in left {
            if let Some((_, known)) = self.mounts.iter().find(|(id, _)| *id == l.id) {
                now.push((l.id, known.clone()));
                continue;
            }
            match self.record_of(&l, step) {
                Ok(m) => {
                    tracing::info!(
                        "{step} left /{} mounted ({}); later steps restored from the cache get \
                         it again",
                        m.target,
                        describe(&self.kind_of(&m))
                    );
                    now.push((l.id, m));
                }
                Err(_) if self.unrecorded.contains(&l.id) => {}
                Err(why) => {
                    tracing::warn!(
                        "{step} left /{} mounted, but it cannot be made again for later steps \
                         restored from the cache: {why}",
                        l.target.display()
                    );
                    self.unrecorded.push(l.id);
                }
            }
        }
        self.mounts = now;
        Ok(self.mounts.iter().map(|(_, m)| m.clone()).collect())
    }

    /// The record of a mount `step` left.
    fn record_of(&self, l: &sandbox::LeftMount, step: &str) -> Result<StepMount, String> {
        let text = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{} is not UTF-8", p.display()))
        };
        let target = text(&l.target)?;
        let (kind, base, source, fs_options) = match &l.kind {
            sandbox::MountKind::Bind { from } => {
                let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                let bases = [
                    ("image", real(&self.paths.mount_dir)),
                    ("image-cache", real(&self.image_cache)),
                    ("build", real(&self.paths.build_dir)),
                ];
                let (base, rel) = bases
                    .iter()
                    .find_map(|(name, dir)| from.strip_prefix(dir).ok().map(|r| (*name, r)))
                    .unwrap_or(("host", from.as_path()));
                (
                    "bind".to_string(),
                    base.to_string(),
                    text(rel)?,
                    String::new(),
                )
            }
            sandbox::MountKind::Fresh {
                fstype,
                source,
                data,
            } => (fstype.clone(), String::new(), source.clone(), data.clone()),
            sandbox::MountKind::Unreachable { reason } => return Err(reason.clone()),
        };
        Ok(StepMount {
            step: step.to_string(),
            target,
            kind,
            source,
            base,
            options: l.options.clone(),
            fs_options,
        })
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
        let started = Instant::now();
        let after_root = match (&self.overlay, &before.upper) {
            // On a kept tree, only what changed in the overlay's upper folder is looked at.
            (Some(o), Some(start)) => {
                let dirty = o.dirty_since(start)?;
                rescan_excluding_mounts(&self.paths.mount_dir, &before.root, dirty)?
            }
            _ => scan_excluding_mounts(&self.paths.mount_dir)?,
        };
        let scanned = started.elapsed().as_secs_f64();
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
        tracing::debug!(
            "snapshot: scan {scanned:.3} s ({} entries), diff and pack {:.3} s",
            after_root.len(),
            started.elapsed().as_secs_f64() - scanned
        );
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

/// A mount's source in words, for messages.
fn describe(kind: &sandbox::MountKind) -> String {
    match kind {
        sandbox::MountKind::Bind { from } => format!("a bind of {}", from.display()),
        sandbox::MountKind::Fresh { fstype, source, .. } => format!("{fstype} from {source}"),
        sandbox::MountKind::Unreachable { reason } => reason.clone(),
    }
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
    layer::scan(dir, &mounts_excluded(dir)?)
        .with_context(|| format!("cannot scan {}", dir.display()))
}

/// Brings `before`, a scan of `dir`, up to date from the paths that may have changed
/// ([`layer::rescan`]), leaving out whatever is mounted below it.
fn rescan_excluding_mounts(dir: &Path, before: &Scan, dirty: Vec<Vec<u8>>) -> Result<Scan> {
    layer::rescan(dir, before, dirty, &mounts_excluded(dir)?)
        .with_context(|| format!("cannot scan {}", dir.display()))
}

fn mounts_excluded(dir: &Path) -> Result<ScanOptions> {
    let exclude = sandbox::mount_points_under(dir)?
        .into_iter()
        .filter_map(|m| m.strip_prefix(dir).ok().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    Ok(ScanOptions { exclude })
}
