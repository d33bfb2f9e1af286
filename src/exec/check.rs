//! `strata build --check`: every cached step runs again, each from its cached parent tree (so
//! one difference does not cascade into every later step), and its new layer is compared with
//! the cached one. Nix's `--check`, per step.
//!
//! ```text
//! walk: cached step S (from --check-from on, not yet found divergent)
//!   tree restored to S's parent ─► S runs in the sandbox ─► its change packed into a SCRATCH
//!   cache (the build's cache keeps its entries) ─► diff ids compared (rootfs and hook tree)
//!     same      ─► the tree is now what the cached S gives; on to the next step
//!     different ─► Diverged { files: audit::diff_layers(cached, rebuilt) } (both layers kept
//!                  in NAME.check/ with --keep-failed); the command notes it and walks again
//!                  from the start with S counted as cached, so the next steps are checked
//!                  from S's cached tree
//! ```
//!
//! The disk step and the outputs are not checked (they are not written at all): the cached
//! layers are what `--check` audits.

use super::Executor;
use crate::audit::{LayerDiff, diff_layers_all};
use crate::cache::{Hit, LayerRecord, Local, StepCache};
use crate::plan::{RebuildFrom, Step};
use crate::progress::Event;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

/// The state of a check walk.
pub struct Check {
    from: Option<RebuildFrom>,
    reached: bool,
    /// Steps already found divergent (treated as cached from now on).
    skip: HashSet<String>,
    /// Where rebuilt layers are packed.
    scratch: Local,
    /// `--keep-failed`: where both layers of a divergent step are copied.
    keep_dir: Option<PathBuf>,
    /// Labels of the steps that rebuilt to their cached layers.
    pub passed: Vec<String>,
}

impl Check {
    pub fn new(
        from: Option<RebuildFrom>,
        skip: HashSet<String>,
        scratch: Local,
        keep_dir: Option<PathBuf>,
    ) -> Check {
        Check {
            reached: from.is_none(),
            from,
            skip,
            scratch,
            keep_dir,
            passed: Vec::new(),
        }
    }

    /// True when `step` (a cached one) is to be checked.
    pub fn wants(&mut self, step: &Step) -> bool {
        if !self.reached
            && let Some(f) = &self.from
        {
            self.reached = step.matches(f) || step.id.phase().is_some_and(|p| p > f.phase);
        }
        self.reached && !self.skip.contains(&step.key)
    }
}

/// A step whose rebuilt layer differs from its cached one.
#[derive(Debug, thiserror::Error)]
#[error("step {step} ({}) rebuilt to another layer than the cached one", &key[..key.len().min(12)])]
pub struct Diverged {
    pub step: String,
    pub key: String,
    pub cached: Option<String>,
    pub rebuilt: Option<String>,
    /// File-level differences (cached → rebuilt).
    pub files: Option<LayerDiff>,
    /// Where both layers were kept (`--keep-failed`).
    pub kept: Option<PathBuf>,
}

fn tar_of(cache: &dyn StepCache, layer: Option<&LayerRecord>) -> Result<Box<dyn Read + Send>> {
    match layer {
        // No layer: the step changed nothing; an empty tar.
        None => Ok(Box::new(std::io::Cursor::new(vec![0u8; 1024]))),
        Some(l) => {
            let blob = cache.open_blob(&l.blob_digest)?;
            let mut dec = zstd::Decoder::new(blob)?;
            dec.window_log_max(31)?;
            Ok(Box::new(dec))
        }
    }
}

impl Executor<'_> {
    /// Runs the cached step again from its (restored) parent tree and compares.
    pub(super) fn check_step(&mut self, step: Step, hit: Hit) -> Result<()> {
        let label = step.label();
        let started = Instant::now();
        crate::cancel::check().with_context(|| format!("interrupted before {label}"))?;
        self.reporter.event(&Event::StepStart {
            step: &label,
            key: &step.key,
        });
        let before = self.snapshots.before_always()?;
        self.execute(&step)?;
        self.ran_any = true;
        self.snapshots.note_mounts(&label)?;
        let check = self.check.as_ref().context("a check walk has its state")?;
        let rebuilt = self.snapshots.after_into(before, &check.scratch)?;
        let seconds = started.elapsed().as_secs_f64();
        let cached_root = hit.step.layer.as_ref().and_then(|d| hit.layer(d)).cloned();
        let same = rebuilt.rootfs.as_ref().map(|l| &l.diff_id) == hit.step.layer.as_ref()
            && rebuilt.hooks.as_ref().map(|l| &l.diff_id) == hit.step.hooks_layer.as_ref();
        self.reporter.event(&Event::StepEnd {
            step: &label,
            key: &step.key,
            state: if same { "checked" } else { "diverged" },
            seconds,
            bytes_packed: rebuilt.bytes(),
        });
        if same {
            self.reporter
                .println(&format!("[{label}] checked: rebuilt to the cached layer"));
            self.timings.push((format!("{label} (check)"), seconds));
            let diff_id = hit.step.layer.clone();
            self.steps
                .push(super::manifest_step(&step, diff_id, true, seconds));
            if let Some(c) = self.check.as_mut() {
                c.passed.push(label);
            }
            self.parent = Some(step.key);
            return Ok(());
        }
        // File-level differences (rootfs layer), and the layers kept for inspection.
        let cancelled = || crate::cancel::requested().is_some();
        let files = diff_layers_all(
            tar_of(self.cache, cached_root.as_ref())?,
            tar_of(&check.scratch, rebuilt.rootfs.as_ref())?,
            &cancelled,
        )
        .ok();
        let kept = match &check.keep_dir {
            Some(dir) => {
                let dest = dir.join(format!(
                    "{:02}-{}-{}",
                    self.steps.len() + 1,
                    step.id.phase_name(),
                    step.id.hook_name().replace('*', "phase")
                ));
                std::fs::create_dir_all(&dest)
                    .with_context(|| format!("cannot create {}", dest.display()))?;
                for (name, cache, layer) in [
                    ("cached", self.cache, cached_root.as_ref()),
                    (
                        "rebuilt",
                        &check.scratch as &dyn StepCache,
                        rebuilt.rootfs.as_ref(),
                    ),
                ] {
                    if let Some(l) = layer {
                        let mut blob = cache.open_blob(&l.blob_digest)?;
                        let path = dest.join(format!("{name}.layer.tar.zst"));
                        let mut out = std::fs::File::create(&path)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        std::io::copy(&mut blob, &mut out)?;
                        blob.finish()?;
                    }
                }
                Some(dest)
            }
            None => None,
        };
        Err(Diverged {
            step: label,
            key: step.key,
            cached: hit.step.layer,
            rebuilt: rebuilt.rootfs.map(|l| l.diff_id),
            files,
            kept,
        }
        .into())
    }
}
