//! The executor: walks the steps in order, asks the cache for each, restores the last cached
//! snapshot once (lazily, at the first miss), runs the rest in the sandbox, keeps what each
//! changed as a layer, and writes the outputs.
//!
//! ```text
//! Prepared (prepare.rs) + dyn StepCache + BuildPaths
//! for each phase:  live hook folder ──► plan::phase_steps (keys chained from the previous step)
//!   cache.lookup   hit  ──► snapshots.remember (its hook-tree layer now; the rootfs layer waits)
//!                  miss ──► snapshots.restore() once (layers, then the hook mounts the last
//!                           cached step left, made again); hooks::run_phase_hooks in the
//!                           sandbox; snapshots.note_mounts() (what hooks left mounted below
//!                           the root); snapshots.after(): scan ─ diff ─ pack ─► cache
//!                           (record_step, with those mounts)
//!                  unusable ──► dropped (writable cache) and run as a miss
//! tree builds: core/finalise-base ──► hook mounts unmounted ──► outputs::tree (cached by the
//!              last key)
//! disk builds: plan::disk_step ──► disk_step::run (block-device.d .. cleanup.d + disk outputs)
//! ──► ManifestStep per step, Written per output (the command writes NAME.strata.json)
//! ```
//!
//! In [`Mode::Plan`] the same walk runs without running anything (the cache given is
//! read-only): `strata plan` and the cache state of each step come from here too. In
//! [`Mode::Check`] (`build --check`, see `check.rs`) every cached step runs again from its
//! cached parent tree and its new layer is compared with the cached one.

pub mod check;
pub mod disk_step;
pub mod hooks;
pub mod kept_tree;
pub mod prepare;
pub mod shell;
pub mod snapshot;

use crate::cache::{Hit, Lookup, StepCache};
use crate::exit::{Exit, Failure};
use crate::fsutil::now;
use crate::key::{self, KeyInputs};
use crate::layer::PackOptions;
use crate::manifest::{Manifest, ManifestStep, StepInputs};
use crate::outputs::{self, OutputType, Written};
use crate::phase::Phase;
use crate::plan::{self, Action, BreakPoint, DiskStep, Step, StepId, StepView, StopAt};
use crate::progress::{Event, Reporter};
use crate::sandbox::ChrootMounts;
use crate::settings::{self, BuildPaths, Settings};
use crate::store::Broken;
use anyhow::{Context, Result};
use prepare::Prepared;
use snapshot::Snapshots;
use std::fs;
use std::path::Path;
use std::time::Instant;

/// Whether the walk runs steps or only looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run every step that misses; `explain` prints why each miss missed.
    Build { explain: bool },
    /// Run nothing (`strata plan`): report keys and cache state; `explain` prints why the
    /// first miss missed.
    Plan { explain: bool },
    /// Run every cached step again and compare (`strata build --check`).
    Check,
}

/// The pack settings of a build's layers and tar outputs.
pub fn pack_options(settings: &Settings) -> PackOptions {
    PackOptions {
        source_date_epoch: settings.source_date_epoch,
        level: 3,
        workers: 2,
    }
}

/// How a build's container image outputs are made.
pub fn image_settings(settings: &Settings) -> outputs::ImageSettings {
    outputs::ImageSettings {
        arch: settings.arch.clone(),
        compression: settings.oci_compression,
        source_date_epoch: settings.source_date_epoch,
    }
}

/// One build's walk over its steps.
pub struct Executor<'a> {
    prep: &'a Prepared,
    cache: &'a dyn StepCache,
    paths: BuildPaths,
    mode: Mode,
    reporter: &'a Reporter,
    snapshots: Snapshots<'a>,
    parent: Option<String>,
    forcing: bool,
    ran_any: bool,
    /// DISTRO_NAME as the current phase's environment.d sets it (names the cache-mount folders).
    distro: String,
    /// The disk step, once the rootfs steps are walked (disk builds).
    disk: Option<DiskStep>,
    /// `build --check`'s state.
    check: Option<check::Check>,
    /// `strata shell --at`: where the walk stops; `stopped` once it did (phase, label).
    stop_at: Option<StopAt>,
    stopped: Option<(Phase, String)>,
    /// A `break=` shell ran: nothing more is cached (the shell may have changed the tree).
    tainted: bool,
    /// Every step walked, as the manifest records it.
    pub steps: Vec<ManifestStep>,
    /// Every step walked, as `plan` shows it.
    pub views: Vec<StepView>,
    /// What took how long, for the build's timing table.
    pub timings: Vec<(String, f64)>,
}

impl<'a> Executor<'a> {
    pub fn new(
        prep: &'a Prepared,
        cache: &'a dyn StepCache,
        paths: BuildPaths,
        mode: Mode,
        reporter: &'a Reporter,
    ) -> Executor<'a> {
        let snapshots = Snapshots::new(
            cache,
            paths.clone(),
            pack_options(&prep.settings),
            prep.settings.image_cache.clone(),
        );
        Executor {
            prep,
            cache,
            paths,
            mode,
            reporter,
            snapshots,
            parent: None,
            forcing: false,
            ran_any: false,
            distro: "any".into(),
            disk: None,
            check: None,
            stop_at: None,
            stopped: None,
            tainted: false,
            steps: Vec::new(),
            views: Vec::new(),
            timings: Vec::new(),
        }
    }

    fn settings(&self) -> &'a Settings {
        &self.prep.settings
    }

    fn building(&self) -> bool {
        matches!(self.mode, Mode::Build { .. } | Mode::Check)
    }

    /// Makes the walk stop at `stop` (`strata shell --at`).
    pub fn stop_at(&mut self, stop: StopAt) {
        self.stop_at = Some(stop);
    }

    /// Lets the build restore from the image's kept tree (see `kept_tree.rs`).
    pub fn keep_tree(&mut self, kept: kept_tree::KeptTree) {
        self.snapshots.keep_tree(kept);
    }

    /// Sets up `build --check` (see `check.rs`).
    pub fn set_check(&mut self, check: check::Check) {
        self.check = Some(check);
    }

    /// The steps `build --check` found to rebuild to their cached layers.
    pub fn checked(&self) -> &[String] {
        self.check.as_ref().map_or(&[], |c| c.passed.as_slice())
    }

    /// Walks every rootfs step (and, for disk builds, keys the disk step).
    pub fn walk(&mut self) -> Result<()> {
        let disk = self.settings().wants_disk();
        for phase in Phase::ALL
            .into_iter()
            .filter(|p| !disk || *p <= Phase::PostRoot)
        {
            if self.stopped.is_some() {
                return Ok(());
            }
            self.walk_phase(phase)?;
            if phase == Phase::Root {
                hooks::write_install_type_env(&self.paths.hooks_dir)?;
            }
        }
        if self.stopped.is_some() {
            return Ok(());
        }
        if disk {
            // The disk step stands for block-device.d .. cleanup.d: rebuilding from any of them
            // reruns it.
            if self
                .settings()
                .cache
                .rebuild_from
                .as_ref()
                .is_some_and(|r| r.phase >= Phase::BlockDevice)
            {
                self.forcing = true;
            }
            let step = self.disk_step()?;
            let cached = !self.forcing && self.disk_cached(&step.key)?;
            self.views.push(StepView {
                phase: StepId::Disk.phase_name().into(),
                hook: StepId::Disk.hook_name().into(),
                key: step.key.clone(),
                cached,
                from: None,
                elements: Vec::new(),
            });
            self.disk = Some(step);
            return Ok(());
        }
        let step = plan::finalise_base_step(&self.prep.key_ctx, self.parent.as_deref());
        self.walk_step(step)
    }

    fn walk_phase(&mut self, phase: Phase) -> Result<()> {
        let key_env = self.prep.key_env(phase, &self.paths.hooks_dir)?;
        self.distro = key_env
            .get("DISTRO_NAME")
            .filter(|d| !d.is_empty() && !d.contains('/'))
            .cloned()
            .unwrap_or_else(|| "any".into());
        let tree = &self.prep.tree;
        let origin = |rel: &Path| tree.origin(rel).map(str::to_string);
        let steps = plan::phase_steps(
            &self.prep.key_ctx,
            phase,
            &self.paths.hooks_dir,
            &key_env,
            &origin,
            self.parent.as_deref(),
        )?;
        if phase == Phase::Root && steps.is_empty() && self.building() {
            return Err(Failure::new(
                Exit::BadInput,
                "no element has a root.d hook, so nothing creates the image root (is an \
                 operating-system element such as debian-minimal in the element list?)",
            )
            .into());
        }
        let stop_here = self
            .stop_at
            .as_ref()
            .is_some_and(|s| s.phase == phase && s.hook.is_none());
        if stop_here && self.stop_at.as_ref().is_some_and(|s| s.before) {
            self.stopped = Some((phase, format!("before {phase}")));
            return Ok(());
        }
        if matches!(self.mode, Mode::Build { .. }) && self.breaks_at(BreakPoint::Before(phase)) {
            self.break_shell(phase, &format!("before-{}", phase.name()))?;
        }
        // Steps are keyed in one chain per phase; a hook-tree change by an earlier step of the
        // same phase cannot change this phase's hook list (dib lists a phase's hooks once, too).
        for step in steps {
            if self.stopped.is_some() {
                return Ok(());
            }
            self.walk_step(step)?;
        }
        if self.stopped.is_some() {
            return Ok(());
        }
        if phase == Phase::Install
            && let Some(step) = plan::packages_step(
                &self.prep.key_ctx,
                &self.settings().packages,
                &key_env,
                self.parent.as_deref(),
            )
        {
            self.walk_step(step)?;
        }
        if stop_here {
            self.stopped = Some((phase, format!("after {phase}")));
            return Ok(());
        }
        if matches!(self.mode, Mode::Build { .. }) && self.breaks_at(BreakPoint::After(phase)) {
            self.break_shell(phase, &format!("after-{}", phase.name()))?;
        }
        Ok(())
    }

    /// True when `step` is the `--at` step of `strata shell`.
    fn is_stop_step(&self, step: &Step) -> bool {
        match (&self.stop_at, &step.id) {
            (Some(s), StepId::Hook { phase, hook }) => {
                s.phase == *phase && s.hook.as_deref().is_some_and(|h| h == hook || hook == "*")
            }
            _ => false,
        }
    }

    fn update_forcing(&mut self, step: &Step) {
        if let Some(rf) = &self.settings().cache.rebuild_from {
            let from_here = step.matches(rf)
                || step.id.phase().is_some_and(|p| p > rf.phase)
                || (step.id.phase().is_none() && self.ran_any);
            if from_here {
                self.forcing = true;
            }
        }
    }

    /// The cached step for `step`, if it may be used.
    fn lookup(&mut self, step: &Step) -> Result<Option<Hit>> {
        if self.forcing {
            return Ok(None);
        }
        match self.cache.lookup(&step.key)? {
            Lookup::Miss => Ok(None),
            Lookup::Hit(hit) => {
                if let Some(ttl) = self.settings().cache.ttl
                    && now() - hit.step.created > ttl.as_secs() as i64
                {
                    tracing::info!(
                        "{}: cached step is older than --cache-ttl; running it again",
                        step.label()
                    );
                    return Ok(None);
                }
                Ok(Some(hit))
            }
            Lookup::Unusable { broken, level, .. } => {
                if self.cache.writable() {
                    if matches!(broken, Broken::Corrupt(_)) {
                        tracing::warn!(
                            "{}: {broken} in the {level}; dropping the step, it runs again",
                            step.label()
                        );
                    }
                    self.cache.drop_step(&step.key, broken)?;
                } else {
                    tracing::warn!("{}: {broken} in the {level}", step.label());
                }
                Ok(None)
            }
        }
    }

    fn walk_step(&mut self, step: Step) -> Result<()> {
        if self.is_stop_step(&step) {
            let phase = step.id.phase().unwrap_or(Phase::Install);
            let label = step.label();
            if self.stop_at.as_ref().is_some_and(|s| s.before) {
                self.stopped = Some((phase, format!("before {label}")));
                return Ok(());
            }
            self.walk_step_now(step)?;
            self.stopped = Some((phase, format!("after {label}")));
            return Ok(());
        }
        self.walk_step_now(step)
    }

    fn walk_step_now(&mut self, step: Step) -> Result<()> {
        self.update_forcing(&step);
        let label = step.label();
        let hit = self.lookup(&step)?;
        self.views
            .push(StepView::of(&step, hit.as_ref().map(|h| h.level.as_str())));
        if hit.is_some() && self.check.as_mut().is_some_and(|c| c.wants(&step)) {
            let r = self.snapshots.restore()?;
            self.note_restore(r);
            let hit = hit.context("checked above")?;
            return self.check_step(step, hit);
        }
        if let Some(hit) = hit {
            if self.building() {
                self.reporter
                    .println(&format!("[{label}] cached ({})", &step.key[..12]));
                self.reporter.event(&Event::StepEnd {
                    step: &label,
                    key: &step.key,
                    state: "cached",
                    seconds: 0.0,
                    bytes_packed: 0,
                });
                if self.cache.writable() {
                    self.cache.touch_step(&step.key, now())?;
                    self.cache.share_hit(&hit)?;
                }
            }
            let diff_id = hit.step.layer.clone();
            if let Some(r) = self.snapshots.remember(hit)? {
                self.note_restore(r);
            }
            self.steps.push(manifest_step(&step, diff_id, true, 0.0));
            self.parent = Some(step.key);
            return Ok(());
        }
        if !self.building() {
            let first_miss = self.views.iter().filter(|v| !v.cached).count() == 1;
            if first_miss && self.mode == (Mode::Plan { explain: true }) {
                self.explain_miss(&step)?;
            }
            self.parent = Some(step.key);
            return Ok(());
        }
        crate::cancel::check().with_context(|| format!("interrupted before {label}"))?;
        if self.mode == (Mode::Build { explain: true }) {
            self.explain_miss(&step)?;
        }
        let r = self.snapshots.restore()?;
        self.note_restore(r);
        if let Err(e) = self.run_step(&step) {
            if self.breaks_at(BreakPoint::AfterError) && crate::cancel::requested().is_none() {
                let phase = step.id.phase().unwrap_or(Phase::Install);
                if let Err(shell) = self.break_shell(phase, "after-error") {
                    tracing::warn!("break=after-error: {shell:#}");
                }
            }
            return Err(e);
        }
        self.parent = Some(step.key);
        Ok(())
    }

    fn note_restore(&mut self, r: snapshot::Restored) {
        if r.steps == 0 {
            return;
        }
        tracing::info!("restored {} cached steps in {:.2}s", r.steps, r.seconds);
        self.timings
            .push(("(restore cached steps)".into(), r.seconds));
        self.reporter.event(&Event::Restore {
            steps: r.steps,
            bytes: r.bytes,
            seconds: r.seconds,
        });
    }

    fn explain_miss(&self, step: &Step) -> Result<()> {
        let label = step.label();
        let Some(near) =
            self.cache
                .nearest_step(step.id.phase_name(), step.id.hook_name(), &step.key)?
        else {
            eprintln!("explain {label}: no earlier step at this position in the cache");
            return Ok(());
        };
        let before: KeyInputs = match serde_json::from_str(&near.inputs) {
            Ok(k) => k,
            Err(_) => {
                eprintln!("explain {label}: the nearest cached step has unreadable inputs");
                return Ok(());
            }
        };
        for line in explain_lines(&before, &step.inputs) {
            eprintln!("explain {label}: {line}");
        }
        Ok(())
    }

    fn run_step(&mut self, step: &Step) -> Result<()> {
        let label = step.label();
        let started = Instant::now();
        self.reporter.event(&Event::StepStart {
            step: &label,
            key: &step.key,
        });
        let before = if self.tainted {
            None
        } else {
            self.snapshots.before()?
        };
        let t_before = started.elapsed().as_secs_f64();
        if let Err(e) = self.execute(step) {
            self.reporter.event(&Event::StepEnd {
                step: &label,
                key: &step.key,
                state: "failed",
                seconds: started.elapsed().as_secs_f64(),
                bytes_packed: 0,
            });
            return Err(e);
        }
        self.ran_any = true;
        let t_run = started.elapsed().as_secs_f64();
        let mounts = self.snapshots.note_mounts(&label)?;
        let layers = self.snapshots.after(before)?;
        let seconds = started.elapsed().as_secs_f64();
        let t_after = seconds;
        if self.cache.writable() && !self.tainted {
            let t = now();
            let record = crate::cache::StepRecord {
                key: step.key.clone(),
                parent: step.inputs.parent.clone(),
                phase: step.id.phase_name().to_string(),
                hook: step.id.hook_name().to_string(),
                layer: layers.rootfs.as_ref().map(|l| l.diff_id.clone()),
                hooks_layer: layers.hooks.as_ref().map(|l| l.diff_id.clone()),
                inputs: step.inputs.to_json(),
                created: t,
                last_used: t,
                hits: 0,
                seconds,
                mounts,
            };
            self.cache.record_step(&record, &layers.records())?;
        }
        tracing::debug!(
            "{label}: before {:.3} s, run {:.3} s, snapshot {:.3} s, record {:.3} s",
            t_before,
            t_run - t_before,
            t_after - t_run,
            started.elapsed().as_secs_f64() - t_after
        );
        self.steps.push(manifest_step(
            step,
            layers.rootfs.as_ref().map(|l| l.diff_id.clone()),
            false,
            seconds,
        ));
        self.timings.push((label.clone(), seconds));
        self.reporter.event(&Event::StepEnd {
            step: &label,
            key: &step.key,
            state: "run",
            seconds,
            bytes_packed: layers.bytes(),
        });
        Ok(())
    }

    fn execute(&mut self, step: &Step) -> Result<()> {
        let base = self.prep.base_env(&self.paths);
        let binder = |m: &mut ChrootMounts| self.bind_cache_mounts(m);
        match &step.action {
            Action::Hooks { phase, hooks } => {
                let env = settings::phase_environment(&base, *phase, &self.paths);
                hooks::run_phase_hooks(*phase, hooks, &self.paths, &env, self.reporter, &binder)?;
                if *phase == Phase::Root {
                    hooks::check_root_deployed(&self.paths.mount_dir)?;
                }
            }
            Action::Packages(pkgs) => {
                let env = settings::phase_environment(&base, Phase::Install, &self.paths);
                hooks::run_packages(pkgs, &self.paths, &env, self.reporter, &binder)?;
            }
            Action::FinaliseBase => hooks::finalise_base(&self.paths.mount_dir)?,
        }
        Ok(())
    }

    /// Binds every cache mount whose image folder exists, each under an exclusive lock on its
    /// host folder (held until the returned files drop), so concurrent builds sharing an image
    /// cache take turns instead of tripping over apt's own locks.
    fn bind_cache_mounts(&self, mounts: &mut ChrootMounts) -> Result<hooks::CacheLocks> {
        let mut locks = Vec::new();
        let settings = self.settings();
        let base = settings
            .image_cache
            .join("strata-cache-mounts")
            .join(format!("{}-{}", self.distro, settings.arch));
        for rel in &self.prep.cache_mounts {
            let name = rel.to_string_lossy().replace('/', "_");
            let source = base.join(&name);
            fs::create_dir_all(&base)
                .with_context(|| format!("cannot create {}", base.display()))?;
            let lock = fs::File::create(base.join(format!("{name}.lock")))?;
            lock.lock()
                .with_context(|| format!("cannot lock the cache folder {}", source.display()))?;
            if mounts.bind_cache(rel, &source)? {
                locks.push(lock);
            }
        }
        Ok(locks)
    }

    /// Keys the disk step from the live hook folder.
    fn disk_step(&self) -> Result<DiskStep> {
        let prep = self.prep;
        let origin = |rel: &Path| prep.tree.origin(rel).map(str::to_string);
        let config = prep
            .disk_config
            .as_ref()
            .context("a disk build has a block-device config")?;
        let types = self
            .settings()
            .image_types
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        plan::disk_step(
            &prep.key_ctx,
            &self.paths.hooks_dir,
            &|phase| prep.key_env(phase, &self.paths.hooks_dir),
            &origin,
            self.parent.as_deref(),
            types,
            self.settings().disk.key_fields(),
            &config.text,
        )
    }

    /// True when every output of the disk step is cached under its key.
    fn disk_cached(&self, key: &str) -> Result<bool> {
        for t in &self.settings().image_types {
            if self
                .cache
                .get_output(&key::output_key(key, t.name()))?
                .is_none()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes every requested output (tree builds: from the tree; disk builds: the disk step).
    pub fn outputs(&mut self) -> Result<Vec<Written>> {
        let prev = Manifest::read(&Manifest::path_for(&self.settings().image_name)).ok();
        let mut out = if self.settings().wants_disk() {
            self.disk_outputs(prev.as_ref())?
        } else {
            self.tree_outputs(prev.as_ref())?
        };
        // In the order the user asked for them.
        let types = &self.settings().image_types;
        out.sort_by_key(|o| types.iter().position(|t| *t == o.r#type));
        Ok(out)
    }

    fn output_event(&self, t: OutputType, path: &Path, state: &str, seconds: f64) {
        self.reporter.event(&Event::Output {
            r#type: t.name(),
            path: &path.display().to_string(),
            state,
            seconds,
        });
    }

    /// Tree outputs, cached by the last step's key and type; those neither unchanged on disk
    /// nor in the cache are written in one go from the final tree.
    fn tree_outputs(&mut self, prev: Option<&Manifest>) -> Result<Vec<Written>> {
        let settings = self.settings();
        let last = self.parent.clone().unwrap_or_default();
        let reuse = !self.ran_any && !self.forcing;
        let mut out = Vec::new();
        let mut missing: Vec<(OutputType, String)> = Vec::new();
        for t in &settings.image_types {
            let path = t.path(&settings.image_name);
            let out_key = key::output_key(&last, t.name());
            let started = Instant::now();
            if reuse && let Some(digest) = unchanged_output(prev, *t, &last, &path) {
                out.push(Written {
                    r#type: *t,
                    path: path.clone(),
                    blake3: digest,
                    cached: true,
                });
                let secs = started.elapsed().as_secs_f64();
                self.timings.push((format!("output {t} (unchanged)"), secs));
                self.output_event(*t, &path, "unchanged", secs);
                continue;
            }
            if reuse
                && let Some(digest) = outputs::tree::restore_cached(
                    self.cache,
                    &out_key,
                    *t,
                    &path,
                    "writing it again from the layers",
                )?
            {
                let secs = started.elapsed().as_secs_f64();
                self.timings.push((format!("output {t} (cached)"), secs));
                self.output_event(*t, &path, "cached", secs);
                out.push(Written {
                    r#type: *t,
                    path,
                    blake3: digest,
                    cached: true,
                });
                continue;
            }
            missing.push((*t, out_key));
        }
        if !missing.is_empty() {
            crate::cancel::check()?;
            let r = self.snapshots.restore_for_outputs()?;
            self.note_restore(r);
            // What hooks left mounted below the tree stays out of the outputs (dib unmounts it
            // before making images).
            self.snapshots.unmount_hook_mounts()?;
            let scan = if missing.iter().any(|(t, _)| t.needs_scan()) {
                Some(self.snapshots.take_scan()?)
            } else {
                None
            };
            let started = Instant::now();
            let written = outputs::write_from_tree(
                self.cache,
                &self.paths.mount_dir,
                scan.as_ref(),
                &missing,
                &settings.image_name,
                &pack_options(settings),
                &image_settings(settings),
            );
            if let Some(scan) = scan {
                self.snapshots.keep_scan(scan);
            }
            let (written, timings) = written?;
            let secs = started.elapsed().as_secs_f64();
            for w in &written {
                self.output_event(w.r#type, &w.path, "written", secs);
            }
            self.timings.extend(timings);
            out.extend(written);
        }
        Ok(out)
    }

    /// The disk step (see `disk_step`): block-device.d to cleanup.d on a real disk, then every
    /// requested output, cached whole under one key.
    fn disk_outputs(&mut self, prev: Option<&Manifest>) -> Result<Vec<Written>> {
        let started = Instant::now();
        let step = self.disk.take().context("the disk step was not keyed")?;
        let settings = self.settings();
        let key = step.key.clone();
        let label = StepId::Disk.to_string();
        let mut found = None;
        if !self.ran_any && !self.forcing {
            let unchanged: Option<Vec<Written>> = settings
                .image_types
                .iter()
                .map(|t| {
                    let path = t.path(&settings.image_name);
                    unchanged_output(prev, *t, &key, &path).map(|blake3| Written {
                        r#type: *t,
                        path,
                        blake3,
                        cached: true,
                    })
                })
                .collect();
            if let Some(outputs) = unchanged {
                self.timings.push((
                    "output disk (unchanged)".into(),
                    started.elapsed().as_secs_f64(),
                ));
                found = Some(outputs);
            } else if let Some(outputs) = disk_step::restore_cached(self.cache, &key, settings)? {
                self.timings.push((
                    "output disk (cached)".into(),
                    started.elapsed().as_secs_f64(),
                ));
                found = Some(outputs);
            }
        }
        let cached = found.is_some();
        let outputs = match found {
            Some(o) => {
                self.reporter
                    .println(&format!("[{label}] cached ({})", &key[..12]));
                self.reporter.event(&Event::StepEnd {
                    step: &label,
                    key: &key,
                    state: "cached",
                    seconds: 0.0,
                    bytes_packed: 0,
                });
                o
            }
            None => {
                crate::cancel::check().context("interrupted before output/disk")?;
                let r = self.snapshots.restore_for_outputs()?;
                self.note_restore(r);
                self.reporter.event(&Event::StepStart {
                    step: &label,
                    key: &key,
                });
                let config = self
                    .prep
                    .disk_config
                    .as_ref()
                    .context("a disk build has a block-device config")?;
                let job = disk_step::Job {
                    settings,
                    paths: &self.paths,
                    image_element: &self.prep.image_element,
                    base_env: self.prep.disk_env(&self.paths),
                    hooks: &step.hooks,
                    config,
                    key: &key,
                    cache: self.cache,
                    reporter: self.reporter,
                };
                let produced = disk_step::run(&job);
                self.snapshots.forget_scan();
                let produced = match produced {
                    Ok(p) => p,
                    Err(e) => {
                        self.reporter.event(&Event::StepEnd {
                            step: &label,
                            key: &key,
                            state: "failed",
                            seconds: started.elapsed().as_secs_f64(),
                            bytes_packed: 0,
                        });
                        return Err(e);
                    }
                };
                self.timings.extend(produced.timings);
                self.reporter.event(&Event::StepEnd {
                    step: &label,
                    key: &key,
                    state: "run",
                    seconds: started.elapsed().as_secs_f64(),
                    bytes_packed: 0,
                });
                produced.outputs
            }
        };
        for w in &outputs {
            let state = if w.cached { "cached" } else { "written" };
            self.output_event(w.r#type, &w.path, state, 0.0);
        }
        self.steps.push(ManifestStep {
            phase: StepId::Disk.phase_name().into(),
            hook: StepId::Disk.hook_name().into(),
            key,
            diff_id: None,
            cached,
            seconds: if cached {
                0.0
            } else {
                started.elapsed().as_secs_f64()
            },
            inputs: Some(StepInputs::Disk(step.inputs)),
        });
        Ok(outputs)
    }
}

fn manifest_step(step: &Step, diff_id: Option<String>, cached: bool, seconds: f64) -> ManifestStep {
    ManifestStep {
        phase: step.id.phase_name().to_string(),
        hook: step.id.hook_name().to_string(),
        key: step.key.clone(),
        diff_id,
        cached,
        seconds,
        inputs: Some(StepInputs::Step(step.inputs.clone())),
    }
}

/// The digest of `path` if the previous manifest says it was written from the same last step
/// and the file still hashes to what that manifest recorded; then it need not be written again.
fn unchanged_output(
    prev: Option<&Manifest>,
    t: OutputType,
    last_key: &str,
    path: &Path,
) -> Option<String> {
    let prev = prev?;
    if prev.last_key()? != last_key {
        return None;
    }
    let recorded = prev.output(t)?.blake3.clone();
    (outputs::identity(t, path)? == recorded).then_some(recorded)
}

/// Why a step missed, in lines a user can act on.
pub fn explain_lines(before: &KeyInputs, after: &KeyInputs) -> Vec<String> {
    let changes = key::diff_inputs(before, after);
    if changes.is_empty() {
        return vec!["inputs equal the nearest cached step's (its layer was dropped?)".into()];
    }
    let only_parent = changes.iter().all(|c| c.input == "parent");
    changes
        .iter()
        .map(|c| {
            let name = c
                .name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default();
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            if c.input == "parent" {
                if only_parent {
                    "an earlier step ran again (parent key changed), so this one runs too"
                        .to_string()
                } else {
                    "parent key changed".to_string()
                }
            } else {
                format!(
                    "{}{name}: {} → {}",
                    c.input,
                    show(&c.before),
                    show(&c.after)
                )
            }
        })
        .collect()
}
