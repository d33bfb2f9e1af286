//! The executor: walks the phases, keys each step, skips cached steps, restores the last cached
//! snapshot once (lazily, at the first miss), runs the rest in the sandbox, and stores each
//! executed step's change as a layer.
//!
//! ```text
//! Settings ──► Prepared (elements, hook tree, element digest, hook environment)
//! for each phase:  live hook folder ──► plan::phase_steps (keys chained from the previous step)
//!   step cached?   yes ──► remember it (apply its hook-tree layer now: later phases list hooks
//!                          from that folder); the rootfs layer waits
//!                  no  ──► restore the remembered rootfs layers once; run in the sandbox;
//!                          scan ─ diff ─ pack ─► blob store + index
//! final tree ──► outputs (`crate::output`, cached by the last key) ──► NAME.strata.json manifest
//! ```
//!
//! With a disk output (`-t qcow2,raw,vhd`) the walk stops after post-root.d: block-device.d to
//! cleanup.d and the clean-up run on the real disk as one output step (`output/disk`, see
//! `crate::disk`), keyed over those phases' hooks, the block-device config and the options.
//!
//! `strata plan` walks the same loop without running anything.

use crate::cli::{BuildArgs, Granularity, PlanArgs};
use crate::disk;
use crate::elements::{self, Element};
use crate::error::{Exit, Failure};
use crate::key::{self, KeyInputs};
use crate::layer::{self, PackOptions, Scan, ScanOptions, UnpackOptions};
use crate::output;
use crate::phase::Phase;
use crate::plan::{self, Action, KeyContext, Step, StepView};
use crate::runner::{self, HookRun, Reporter};
use crate::sandbox::{self, BuildDir, ChrootMounts};
use crate::settings::{self, BuildPaths, Settings};
use crate::store::{LayerRecord, StepRecord, Store};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The resolved element set and everything derived from it once per build.
struct Prepared {
    settings: Settings,
    elements: Vec<Element>,
    tree: elements::hooks::HookTree,
    key_ctx: KeyContext,
    image_element: String,
    image_element_yaml: String,
    elements_path: String,
    /// Image paths (relative) that get a host cache folder bound on them during every step.
    /// Sorted: parents are bound before what is below them, and every build takes the
    /// folders' locks in the same order.
    cache_mounts: BTreeSet<PathBuf>,
    disk: disk::DiskOptions,
}

fn prepare(opts: &crate::cli::BuildOptions) -> Result<Prepared> {
    let env = settings::process_env();
    let settings = Settings::resolve(opts, &env, crate::arch::host_arch)?;
    let search = elements::discover::build_search_path(
        &settings.element_dirs,
        settings
            .elements_path_env
            .as_deref()
            .map(std::ffi::OsStr::new),
        elements::discover::builtin_elements_dir().as_deref(),
    );
    let catalog = elements::discover::Catalog::scan(&search)?;
    let resolved = elements::deps::resolve(
        &catalog,
        &elements::deps::Request {
            names: &settings.elements,
            skip_base: settings.skip_base,
            arch: &settings.arch,
        },
    )?
    .elements;
    let tree = elements::hooks::HookTree::build(&resolved)?;
    let element_files =
        key::element_files_digest(resolved.iter().map(|e| (e.name.as_str(), e.path.as_path())))
            .context("cannot read element files")?;
    let mut extra = BTreeMap::new();
    let mut cache_mounts = BTreeSet::new();
    for e in &resolved {
        extra.extend(key::cache_inputs(&e.name, &e.path)?);
        cache_mounts.extend(read_cache_mounts(e)?);
    }
    let image_element = resolved
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let image_element_yaml = resolved
        .iter()
        .map(|e| format!("{}: {}\n", e.name, e.path.display()))
        .collect();
    let elements_path = catalog
        .search_path()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let key_ctx = KeyContext {
        element_files,
        arch: settings.arch.clone(),
        extra,
        granularity: settings.granularity,
    };
    Ok(Prepared {
        settings,
        elements: resolved,
        tree,
        key_ctx,
        image_element,
        image_element_yaml,
        elements_path,
        cache_mounts,
        disk: disk::DiskOptions::from_cli(opts),
    })
}

/// An element's `cache-mounts` file (a strata extension, like BuildKit's cache mounts): one
/// absolute image path per line (`#` comments, blank lines ignored). During every step strata
/// binds a host folder under DIB_IMAGE_CACHE there, so what hooks download is kept between
/// builds and never enters the step layers.
fn read_cache_mounts(e: &Element) -> Result<Vec<PathBuf>> {
    let file = e.path.join("cache-mounts");
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(Failure::bad_input(format!(
                "element {}: cannot read {}: {err}",
                e.name,
                file.display()
            ))
            .into());
        }
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = Path::new(line);
        let ok = p.is_absolute()
            && p.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            })
            && p.components().count() > 1;
        if !ok {
            return Err(Failure::bad_input(format!(
                "element {}: {} line {}: '{line}' is not an absolute path below / without '..'",
                e.name,
                file.display(),
                n + 1
            ))
            .into());
        }
        out.push(p.strip_prefix("/").unwrap_or(p).to_path_buf());
    }
    Ok(out)
}

impl Prepared {
    fn base_env(&self, paths: &BuildPaths) -> BTreeMap<String, String> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("strata"));
        settings::base_environment(
            &self.settings,
            paths,
            &self.image_element,
            &self.image_element_yaml,
            &self.elements_path,
            &exe,
        )
    }

    /// The environment a phase's hooks get, as it enters keys: environment.d captured against
    /// placeholder paths, then normalised.
    fn key_env(&self, phase: Phase, hooks_dir: &Path) -> Result<BTreeMap<String, String>> {
        let placeholder = BuildPaths::placeholder();
        let mut base =
            settings::phase_environment(&self.base_env(&placeholder), phase, &placeholder);
        // environment.d files see the real hook folder (some read files beside themselves).
        base.insert("TMP_HOOKS_PATH".into(), hooks_dir.display().to_string());
        let captured = elements::env::capture_dir(&hooks_dir.join("environment.d"), &base)?;
        Ok(settings::normalise_for_key(&captured))
    }
}

/// One step's line in the manifest.
#[derive(Debug, Clone, Serialize)]
struct ManifestStep {
    phase: String,
    hook: String,
    key: String,
    diff_id: Option<String>,
    cached: bool,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct ManifestOutput {
    r#type: String,
    path: String,
    blake3: String,
    cached: bool,
}

#[derive(Debug, Serialize)]
struct Manifest {
    strata_version: &'static str,
    cache_format_version: u32,
    image_name: String,
    arch: String,
    elements: Vec<String>,
    steps: Vec<ManifestStep>,
    outputs: Vec<ManifestOutput>,
    seconds: f64,
}

/// The walk over all steps, shared by `build` (runs misses) and `plan` (only looks).
struct Executor<'a> {
    prep: &'a Prepared,
    store: Option<&'a Store>,
    paths: BuildPaths,
    dry_run: bool,
    explain: bool,
    reporter: Option<&'a Reporter>,
    parent: Option<String>,
    forcing: bool,
    /// Cached steps whose rootfs layers are not applied yet (restore is lazy).
    pending: Vec<StepRecord>,
    /// True once the rootfs in `paths.mount_dir` reflects every step so far.
    restored: bool,
    rootfs_scan: Option<Scan>,
    manifest: Vec<ManifestStep>,
    views: Vec<StepView>,
    timings: Vec<(String, f64)>,
    ran_any: bool,
    /// DISTRO_NAME as the current phase's environment.d sets it (names the cache-mount folders).
    distro: String,
}

impl<'a> Executor<'a> {
    fn new(
        prep: &'a Prepared,
        store: Option<&'a Store>,
        paths: BuildPaths,
        dry_run: bool,
        explain: bool,
        reporter: Option<&'a Reporter>,
    ) -> Executor<'a> {
        Executor {
            prep,
            store,
            paths,
            dry_run,
            explain,
            reporter,
            parent: None,
            forcing: false,
            pending: Vec::new(),
            restored: false,
            rootfs_scan: None,
            manifest: Vec::new(),
            views: Vec::new(),
            timings: Vec::new(),
            ran_any: false,
            distro: "any".into(),
        }
    }

    /// Binds every cache mount whose image folder exists, each under an exclusive lock on its
    /// host folder (held until the returned files drop), so concurrent builds sharing an image
    /// cache take turns instead of tripping over apt's own locks.
    fn bind_cache_mounts(&self, mounts: &mut ChrootMounts) -> Result<Vec<fs::File>> {
        let mut locks = Vec::new();
        let base = self
            .prep
            .settings
            .image_cache
            .join("strata-cache-mounts")
            .join(format!("{}-{}", self.distro, self.prep.settings.arch));
        for rel in &self.prep.cache_mounts {
            let name = rel.to_string_lossy().replace('/', "_");
            let source = base.join(&name);
            fs::create_dir_all(&base)?;
            let lock = fs::File::create(base.join(format!("{name}.lock")))?;
            lock.lock()
                .with_context(|| format!("cannot lock the cache folder {}", source.display()))?;
            if mounts.bind_cache(rel, &source)? {
                locks.push(lock);
            }
        }
        Ok(locks)
    }

    fn is_cached(&self, step: &Step) -> Result<Option<StepRecord>> {
        let Some(store) = self.store else {
            return Ok(None);
        };
        if self.forcing {
            return Ok(None);
        }
        let Some(rec) = store.lookup_step(&step.key)? else {
            return Ok(None);
        };
        if let Some(ttl) = self.prep.settings.cache_ttl
            && now() - rec.created > ttl.as_secs() as i64
        {
            tracing::info!(
                "{}: cached step is older than --cache-ttl; running it again",
                step.label()
            );
            return Ok(None);
        }
        // A layer whose blob is damaged is dropped and the step runs again.
        for diff in [&rec.layer, &rec.hooks_layer].into_iter().flatten() {
            let Some(l) = store.layer_for(diff)? else {
                return Ok(None);
            };
            if !store.verify_blob(&l.blob_digest)? {
                if self.dry_run {
                    // `strata plan` only looks: it reports a miss and changes nothing.
                    tracing::warn!("{}: cached layer {} is corrupt", step.label(), &diff[..12]);
                    return Ok(None);
                }
                tracing::warn!(
                    "{}: cached layer {} is corrupt; dropping it and running the step again",
                    step.label(),
                    &diff[..12]
                );
                store.drop_corrupt_step(&rec.key, l)?;
                return Ok(None);
            }
        }
        Ok(Some(rec))
    }

    fn update_forcing(&mut self, step: &Step) {
        if let Some(rf) = &self.prep.settings.rebuild_from {
            let phase_index = Phase::ALL.iter().position(|p| p.dir_name() == step.phase);
            let rf_index = Phase::ALL.iter().position(|p| *p == rf.phase);
            if step.matches(rf.phase, rf.hook.as_deref())
                || matches!((phase_index, rf_index), (Some(a), Some(b)) if a > b)
                || (step.phase == "core" && rf_index.is_some() && self.ran_any)
            {
                self.forcing = true;
            }
        }
    }

    fn explain_miss(&self, step: &Step) -> Result<()> {
        let Some(store) = self.store else {
            return Ok(());
        };
        let nearest = store.nearest_step(&step.phase, &step.name, &step.key)?;
        let label = step.label();
        let Some(near) = nearest else {
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

    /// Applies a cached step's hook-tree layer to the live hook folder right away.
    fn apply_hooks_layer(&self, rec: &StepRecord) -> Result<()> {
        let (Some(store), Some(diff)) = (self.store, &rec.hooks_layer) else {
            return Ok(());
        };
        apply_layer(store, diff, &self.paths.hooks_dir)
    }

    /// Brings the rootfs up to date with every cached step so far (once).
    fn restore(&mut self) -> Result<()> {
        if self.restored {
            return Ok(());
        }
        if self.pending.is_empty() {
            self.restored = true;
            return Ok(());
        }
        let store = self.store.context("restoring needs the cache")?;
        let started = Instant::now();
        let n = self.pending.len();
        for rec in self.pending.drain(..) {
            if let Some(diff) = &rec.layer {
                apply_layer(store, diff, &self.paths.mount_dir).with_context(|| {
                    format!(
                        "cannot restore the cached result of {}/{}; run `strata cache verify`",
                        rec.phase, rec.hook
                    )
                })?;
            }
        }
        if n > 0 {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!("restored {n} cached steps in {secs:.2}s");
            self.timings.push(("(restore cached steps)".into(), secs));
        }
        self.restored = true;
        self.rootfs_scan = None;
        Ok(())
    }

    fn scan_rootfs(&self) -> Result<Scan> {
        scan_excluding_mounts(&self.paths.mount_dir)
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
        if phase == Phase::Root && steps.is_empty() && !self.dry_run {
            return Err(Failure::new(
                Exit::BadInput,
                "no element has a root.d hook, so nothing creates the image root (is an \
                 operating-system element such as debian-minimal in the element list?)",
            )
            .into());
        }
        // Steps are keyed in one chain per phase; a hook-tree change by an earlier step of the
        // same phase cannot change this phase's hook list (dib lists a phase's hooks once, too).
        for step in steps {
            self.walk_step(step)?;
        }
        if phase == Phase::Install
            && let Some(step) = plan::packages_step(
                &self.prep.key_ctx,
                &self.prep.settings.packages,
                &key_env,
                self.parent.as_deref(),
            )
        {
            self.walk_step(step)?;
        }
        Ok(())
    }

    fn walk_step(&mut self, step: Step) -> Result<()> {
        self.update_forcing(&step);
        let cached = self.is_cached(&step)?;
        self.views.push(StepView::of(&step, cached.is_some()));
        if let Some(rec) = cached {
            if !self.dry_run {
                if let Some(r) = self.reporter {
                    r.println(&format!("[{}] cached ({})", step.label(), &step.key[..12]));
                }
                if let Some(store) = self.store {
                    store.touch_step(&rec.key, now())?;
                }
            }
            self.apply_hooks_layer(&rec)?;
            self.manifest.push(ManifestStep {
                phase: step.phase.clone(),
                hook: step.name.clone(),
                key: step.key.clone(),
                diff_id: rec.layer.clone(),
                cached: true,
                seconds: 0.0,
            });
            self.parent = Some(step.key.clone());
            self.pending.push(rec);
            if self.restored {
                // The tree is live already: apply this layer now to keep it current.
                self.restored = false;
                self.restore()?;
            }
            return Ok(());
        }
        if self.dry_run {
            self.parent = Some(step.key.clone());
            return Ok(());
        }
        if runner::interrupted() {
            return Err(Failure::new(
                Exit::Interrupted,
                format!("interrupted before {}", step.label()),
            )
            .into());
        }
        if self.explain {
            self.explain_miss(&step)?;
        }
        self.restore()?;
        self.run_step(&step)?;
        self.parent = Some(step.key.clone());
        Ok(())
    }

    fn run_step(&mut self, step: &Step) -> Result<()> {
        let started = Instant::now();
        let snapshot = self.store.is_some();
        let before_root = if snapshot {
            match self.rootfs_scan.take() {
                Some(s) => Some(s),
                None => Some(self.scan_rootfs()?),
            }
        } else {
            None
        };
        let before_hooks = if snapshot {
            Some(scan_excluding_mounts(&self.paths.hooks_dir)?)
        } else {
            None
        };

        self.execute(step)?;
        self.ran_any = true;

        let mut layer_rec = None;
        let mut hooks_rec = None;
        if let (Some(store), Some(before_root), Some(before_hooks)) =
            (self.store, before_root, before_hooks)
        {
            let after_root = self.scan_rootfs()?;
            layer_rec = store_layer(
                store,
                &self.paths.mount_dir,
                &before_root,
                &after_root,
                &self.prep.settings,
            )?;
            let after_hooks = scan_excluding_mounts(&self.paths.hooks_dir)?;
            hooks_rec = store_layer(
                store,
                &self.paths.hooks_dir,
                &before_hooks,
                &after_hooks,
                &self.prep.settings,
            )?;
            self.rootfs_scan = Some(after_root);
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some(store) = self.store {
            let t = now();
            let record = StepRecord {
                key: step.key.clone(),
                parent: step.inputs.parent.clone(),
                phase: step.phase.clone(),
                hook: step.name.clone(),
                layer: layer_rec.as_ref().map(|l: &LayerRecord| l.diff_id.clone()),
                hooks_layer: hooks_rec.as_ref().map(|l: &LayerRecord| l.diff_id.clone()),
                inputs: step.inputs.to_json(),
                created: t,
                last_used: t,
                hits: 0,
                seconds,
            };
            let layers: Vec<LayerRecord> =
                layer_rec.iter().chain(hooks_rec.iter()).cloned().collect();
            store.record_step(&record, &layers)?;
        }
        self.manifest.push(ManifestStep {
            phase: step.phase.clone(),
            hook: step.name.clone(),
            key: step.key.clone(),
            diff_id: layer_rec.map(|l| l.diff_id),
            cached: false,
            seconds,
        });
        self.timings.push((step.label(), seconds));
        Ok(())
    }

    fn execute(&mut self, step: &Step) -> Result<()> {
        let reporter = self.reporter.context("running needs a reporter")?;
        let base = self.prep.base_env(&self.paths);
        match &step.action {
            Action::Hooks { phase, hooks } => {
                let env = settings::phase_environment(&base, *phase, &self.paths);
                run_phase_hooks(*phase, hooks, &self.paths, &env, reporter, &|m| {
                    self.bind_cache_mounts(m)
                })?;
                if *phase == Phase::Root {
                    check_root_deployed(&self.paths.mount_dir)?;
                }
            }
            Action::Packages(pkgs) => {
                let script = self.paths.mount_dir.join("tmp/strata-extra-packages");
                fs::create_dir_all(self.paths.mount_dir.join("tmp"))?;
                let quoted: Vec<String> = pkgs.iter().map(|p| shell_quote(p)).collect();
                fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\nset -eu\nexec install-packages {}\n",
                        quoted.join(" ")
                    ),
                )?;
                set_mode(&script, 0o755)?;
                let mut mounts = ChrootMounts::mount(&self.paths.mount_dir, &self.paths.hooks_dir)?;
                let cache_locks = self.bind_cache_mounts(&mut mounts)?;
                let env = settings::phase_environment(&base, Phase::Install, &self.paths);
                let run = HookRun {
                    phase: Phase::Install,
                    hook: "packages",
                    element: "-p",
                    script: PathBuf::from("/tmp/strata-extra-packages"),
                    env_files: Vec::new(),
                    env,
                    chroot: Some(self.paths.mount_dir.clone()),
                };
                let outcome = runner::run_hook(&run, reporter);
                mounts.unmount()?;
                drop(cache_locks);
                fs::remove_file(&script)?;
                let outcome = outcome?;
                if !outcome.success {
                    return Err(hook_failure(
                        Phase::Install,
                        "packages (-p)",
                        "-p",
                        &outcome,
                    ));
                }
            }
            Action::FinaliseBase => finalise_base(&self.paths.mount_dir)?,
        }
        Ok(())
    }
}

/// Holds what a step's cache mounts lock (released when dropped).
pub(crate) type CacheLocks = Vec<fs::File>;

/// Runs one phase's hooks in order inside the phase's mounts (chroot: proc, dev, sys, the hook
/// tree, resolv.conf; host: resolv.conf) plus whatever `cache_mounts` binds, and prints the
/// phase's timing table. The first failure ends it with the one-line hook error; an interrupt
/// stops it before the next hook. Returns each hook's outcome, in order.
pub(crate) fn run_phase_hooks(
    phase: Phase,
    hooks: &[plan::PlannedHook],
    paths: &BuildPaths,
    env: &BTreeMap<String, String>,
    reporter: &Reporter,
    cache_mounts: &dyn Fn(&mut ChrootMounts) -> Result<CacheLocks>,
) -> Result<Vec<runner::HookOutcome>> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let mut mounts = if phase.in_chroot() {
        ChrootMounts::mount(&paths.mount_dir, &paths.hooks_dir)?
    } else {
        ChrootMounts::host(&paths.mount_dir)?
    };
    let cache_locks = cache_mounts(&mut mounts)?;
    let env_dir = paths.hooks_dir.join("environment.d");
    let files = elements::env::env_files(&env_dir)
        .with_context(|| format!("cannot list {}", env_dir.display()))?;
    let in_target_files: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.file_name())
        .map(|n| {
            Path::new(crate::sandbox::IN_TARGET_DIR)
                .join("environment.d")
                .join(n)
        })
        .collect();
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();
    let mut result = Ok(());
    for hook in hooks {
        if runner::interrupted() {
            let what = format!("interrupted before {phase}/{}", hook.name);
            result = Err(Failure::new(Exit::Interrupted, what).into());
            break;
        }
        let (script, env_files, chroot) = if phase.in_chroot() {
            (
                Path::new(crate::sandbox::IN_TARGET_DIR)
                    .join(phase.dir_name())
                    .join(&hook.name),
                in_target_files.clone(),
                Some(paths.mount_dir.clone()),
            )
        } else {
            (hook.path.clone(), files.clone(), None)
        };
        let run = HookRun {
            phase,
            hook: &hook.name,
            element: &hook.element,
            script,
            env_files,
            env: env.clone(),
            chroot,
        };
        let outcome = match runner::run_hook(&run, reporter) {
            Ok(o) => o,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        rows.push((hook.name.clone(), outcome.seconds));
        let failed = !outcome.success;
        if failed {
            result = Err(hook_failure(phase, &hook.name, &hook.element, &outcome));
        }
        outcomes.push(outcome);
        if failed {
            break;
        }
    }
    let unmounted = mounts.unmount();
    drop(cache_locks);
    if hooks.len() > 1 {
        reporter.println(&runner::timing_table(phase.dir_name(), &rows));
    }
    result?;
    unmounted?;
    Ok(outcomes)
}

/// The one error a failed hook gives: element, phase, hook, status, and its last lines.
pub(crate) fn hook_failure(
    phase: Phase,
    hook: &str,
    element: &str,
    outcome: &runner::HookOutcome,
) -> anyhow::Error {
    let status = match (outcome.code, outcome.signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".to_string(),
    };
    let mut msg = format!("hook {phase}/{hook} of element {element} failed with {status}");
    if !outcome.tail.is_empty() {
        msg.push_str(&format!("; its last {} lines:", outcome.tail.len()));
        for line in &outcome.tail {
            msg.push_str("\n    ");
            msg.push_str(line);
        }
    }
    Failure::new(Exit::BuildFailed, msg).into()
}

fn explain_lines(before: &KeyInputs, after: &KeyInputs) -> Vec<String> {
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

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// What dib's core writes into the hook tree after root.d (so root.d does not see it): the
/// default install type, unless an element ships that file itself.
fn write_install_type_env(hooks_dir: &Path) -> Result<()> {
    let dir = hooks_dir.join("environment.d");
    let file = dir.join("11-dib-install-type.bash");
    if file.symlink_metadata().is_ok() {
        return Ok(());
    }
    fs::create_dir_all(&dir)?;
    fs::write(
        &file,
        "export DIB_DEFAULT_INSTALLTYPE=${DIB_DEFAULT_INSTALLTYPE:-\"source\"}\n",
    )
    .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}

/// dib fails a build whose root.d left nothing but `lost+found`/`tmp` in the tree.
fn check_root_deployed(root: &Path) -> Result<()> {
    let mut any = false;
    for e in fs::read_dir(root)? {
        let name = e?.file_name();
        if name != "lost+found" && name != "tmp" {
            any = true;
            break;
        }
    }
    if !any {
        return Err(Failure::new(
            Exit::BuildFailed,
            "root.d left the image root empty: no element deployed an operating system tree \
             (is an operating-system element such as debian-minimal in the element list?)",
        )
        .into());
    }
    Ok(())
}

/// dib's finalise_base clean-up: empty /tmp and truncate every file under /var/log.
pub(crate) fn finalise_base(root: &Path) -> Result<()> {
    let tmp = root.join("tmp");
    if tmp.is_dir() && !tmp.is_symlink() {
        if !sandbox::mount_points_under(&tmp)?.is_empty() {
            anyhow::bail!("{} still has mounts in it; not emptying it", tmp.display());
        }
        for e in fs::read_dir(&tmp)? {
            let p = e?.path();
            if p.symlink_metadata()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
    }
    let log = root.join("var/log");
    if log.is_dir() && !log.is_symlink() {
        for e in walkdir::WalkDir::new(&log).follow_links(false) {
            let e = e?;
            if e.file_type().is_file() {
                fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(e.path())?;
            }
        }
    }
    Ok(())
}

fn scan_excluding_mounts(dir: &Path) -> Result<Scan> {
    let exclude = sandbox::mount_points_under(dir)?
        .into_iter()
        .filter_map(|m| m.strip_prefix(dir).ok().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    layer::scan(dir, &ScanOptions { exclude })
        .with_context(|| format!("cannot scan {}", dir.display()))
}

pub(crate) fn pack_options(settings: &Settings) -> PackOptions {
    PackOptions {
        source_date_epoch: settings.source_date_epoch,
        level: 3,
        workers: 2,
    }
}

/// Packs what changed between two scans of `root` into the store (None if nothing changed).
fn store_layer(
    store: &Store,
    root: &Path,
    before: &Scan,
    after: &Scan,
    settings: &Settings,
) -> Result<Option<LayerRecord>> {
    let changes = layer::diff(before, after);
    if changes.is_empty() {
        return Ok(None);
    }
    let mut writer = store.blob_writer()?;
    let info = layer::pack(root, &changes, &mut writer, &pack_options(settings))?;
    let (digest, blob_size) = writer.finish()?;
    Ok(Some(LayerRecord {
        diff_id: info.diff_id,
        blob_digest: digest,
        size: info.tar_size,
        blob_size,
    }))
}

fn apply_layer(store: &Store, diff_id: &str, target: &Path) -> Result<()> {
    let l = store
        .layer_for(diff_id)?
        .with_context(|| format!("layer {diff_id} is not in the index"))?;
    let mut blob = store.open_blob(&l.blob_digest)?;
    let stats = layer::unpack(&mut blob, target, &UnpackOptions::default())?;
    // The decoder may stop before EOF; the blob's digest is only checked at its end.
    blob.finish()?;
    if stats.diff_id != diff_id {
        anyhow::bail!(
            "layer {diff_id} unpacked to different content ({}); the cache is corrupt",
            stats.diff_id
        );
    }
    Ok(())
}

/// `strata build`.
pub fn build(args: BuildArgs) -> Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::new(
            Exit::Environment,
            "strata build must run as root: it mounts, chroots and creates device nodes (try sudo)",
        )
        .into());
    }
    // First, while single-threaded: everything mounted from here on dies with this process.
    sandbox::enter_private_namespace()?;
    let prep = prepare(&args.options)?;
    let settings = &prep.settings;
    output::check_tools(
        &settings.image_types,
        std::env::var_os("PATH").as_deref(),
        settings.source_date_epoch,
    )?;
    let reporter = Reporter::new(args.logfile.as_deref(), false)?;
    let store = if settings.no_cache {
        None
    } else {
        Some(Store::open(&settings.cache_dir)?)
    };

    let use_tmpfs = settings.use_tmpfs && sandbox::tmpfs_allowed(settings.min_tmpfs);
    fs::create_dir_all(&settings.tmp_dir)
        .with_context(|| format!("cannot create TMP_DIR {}", settings.tmp_dir.display()))?;
    let build_dir = BuildDir::create(&settings.tmp_dir, "strata_build.", use_tmpfs)?;
    let paths = BuildPaths::under(&build_dir.path);
    for d in [&paths.image_dir, &paths.mount_dir] {
        fs::create_dir_all(d)?;
    }
    prep.tree
        .materialize(&paths.hooks_dir)
        .context("cannot write the merged hook tree")?;
    fs::create_dir_all(&settings.image_cache).with_context(|| {
        format!(
            "cannot create the image cache {}",
            settings.image_cache.display()
        )
    })?;

    let mut exec = Executor::new(
        &prep,
        store.as_ref(),
        paths.clone(),
        false,
        args.explain,
        Some(&reporter),
    );
    // Nothing is restored until the first miss; from then on the tree is live and cached steps
    // (possible after a --cache-ttl rerun) are applied as they come.
    let result = walk_all(&mut exec)
        .and_then(|()| write_outputs(&mut exec))
        .and_then(|outputs| {
            if wants_checksums(&prep.disk, settings) {
                for o in &outputs {
                    crate::image::refresh_checksums(Path::new(&o.path))
                        .with_context(|| format!("cannot write checksums of {}", o.path))?;
                }
            }
            let manifest = Manifest {
                strata_version: env!("CARGO_PKG_VERSION"),
                cache_format_version: key::CACHE_FORMAT_VERSION,
                image_name: settings.image_name.clone(),
                arch: settings.arch.clone(),
                elements: prep.elements.iter().map(|e| e.name.clone()).collect(),
                steps: exec.manifest.clone(),
                outputs,
                seconds: started.elapsed().as_secs_f64(),
            };
            let text = serde_json::to_string_pretty(&manifest)?;
            write_atomic(
                Path::new(&format!("{}.strata.json", settings.image_name)),
                text.as_bytes(),
            )?;
            if args.json {
                println!("{text}");
            }
            Ok(())
        });
    let outcome = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!(
            "failed: {}",
            crate::error::render(e).lines().next().unwrap_or_default()
        ),
    };
    // Recorded, but a failure to record never hides the build's own error.
    let recorded = store.as_ref().map_or(Ok(()), |store| {
        store
            .record_build(&crate::store::BuildRecord {
                elements: prep.image_element.clone(),
                arguments: settings.dib_args(),
                outcome,
                step_keys: exec.manifest.iter().map(|s| s.key.clone()).collect(),
                started: now() - started.elapsed().as_secs() as i64,
                seconds: started.elapsed().as_secs_f64(),
            })
            .map(drop)
    });
    let cleanup = build_dir.cleanup();
    let cached = exec.manifest.iter().filter(|s| s.cached).count();
    exec.timings
        .push(("total".into(), started.elapsed().as_secs_f64()));
    reporter.finish();
    eprintln!("{}", runner::timing_table("build", &exec.timings));
    eprintln!(
        "{} steps: {} cached, {} run",
        exec.manifest.len(),
        cached,
        exec.manifest.len() - cached
    );
    result?;
    recorded?;
    cleanup?;
    Ok(())
}

/// `--checksum`, or dib's `DIB_CHECKSUM` (1, md5, sha256, md5,sha256; 0 or empty is off): a
/// `.md5` and a `.sha256` beside every output, tree or disk.
fn wants_checksums(options: &disk::DiskOptions, settings: &Settings) -> bool {
    options.checksum
        || settings
            .user_env
            .get("DIB_CHECKSUM")
            .is_some_and(|v| !v.is_empty() && v != "0")
}

fn walk_all(exec: &mut Executor) -> Result<()> {
    // With a disk output, block-device.d .. cleanup.d and the clean-up are the disk step.
    let disk = disk::wants_disk(&exec.prep.settings.image_types);
    for phase in Phase::ALL
        .into_iter()
        .filter(|p| !disk || *p <= Phase::PostRoot)
    {
        exec.walk_phase(phase)?;
        if phase == Phase::Root {
            write_install_type_env(&exec.paths.hooks_dir)?;
        }
    }
    if disk {
        // The disk step stands for block-device.d .. cleanup.d: rebuilding from any of them
        // reruns it.
        if exec
            .prep
            .settings
            .rebuild_from
            .as_ref()
            .is_some_and(|r| r.phase >= Phase::BlockDevice)
        {
            exec.forcing = true;
        }
        return Ok(());
    }
    let step = plan::finalise_base_step(&exec.prep.key_ctx, exec.parent.as_deref());
    exec.walk_step(step)
}

/// Writes every requested output. Tree outputs are cached by the last step's key and type;
/// those neither unchanged on disk nor in the store are written in one go from the final tree.
fn write_outputs(exec: &mut Executor) -> Result<Vec<ManifestOutput>> {
    let settings = &exec.prep.settings;
    if disk::wants_disk(&settings.image_types) {
        return disk_outputs(exec);
    }
    let last = exec.parent.clone().unwrap_or_default();
    let reuse = !exec.ran_any && !exec.forcing;
    let mut out = Vec::new();
    let mut missing: Vec<(String, String)> = Vec::new();
    for t in &settings.image_types {
        let path = output::path(&settings.image_name, t);
        let out_key = output::type_key(&last, t);
        let started = Instant::now();
        let record = |blake3: String| ManifestOutput {
            r#type: t.clone(),
            path: path.display().to_string(),
            blake3,
            cached: true,
        };
        if reuse && let Some(digest) = unchanged_output(&settings.image_name, t, &last, &path) {
            out.push(record(digest));
            exec.timings.push((
                format!("output {t} (unchanged)"),
                started.elapsed().as_secs_f64(),
            ));
            continue;
        }
        if let Some(store) = exec.store
            && reuse
            && let Some(digest) = output::restore_cached(
                store,
                &out_key,
                t,
                &path,
                now(),
                "writing it again from the layers",
            )?
        {
            exec.timings.push((
                format!("output {t} (cached)"),
                started.elapsed().as_secs_f64(),
            ));
            out.push(record(digest));
            continue;
        }
        missing.push((t.clone(), out_key));
    }
    if !missing.is_empty() {
        exec.restore()?;
        let types: Vec<&str> = missing.iter().map(|m| m.0.as_str()).collect();
        let scan = match exec.rootfs_scan.take() {
            Some(s) => Some(s),
            None if output::needs_scan(&types) => Some(exec.scan_rootfs()?),
            None => None,
        };
        let written = output::write(
            exec.store,
            &exec.paths.mount_dir,
            scan.as_ref(),
            &missing,
            &settings.image_name,
            &pack_options(settings),
        );
        exec.rootfs_scan = scan;
        let (written, timings) = written?;
        exec.timings.extend(timings);
        out.extend(written.into_iter().map(|w| ManifestOutput {
            r#type: w.r#type,
            path: w.path.display().to_string(),
            blake3: w.blake3,
            cached: false,
        }));
    }
    // In the order the user asked for them.
    out.sort_by_key(|o| settings.image_types.iter().position(|t| *t == o.r#type));
    Ok(out)
}

/// The hooks of the disk step's phases (listed from the live hook folder) and the key chained
/// over them (one link per phase, covering its hooks and environment) from the last step's.
fn disk_phase_hooks(exec: &Executor) -> Result<(disk::PhaseHooks, String)> {
    let prep = exec.prep;
    let ctx = KeyContext {
        granularity: Granularity::Phase,
        ..prep.key_ctx.clone()
    };
    let origin = |rel: &Path| prep.tree.origin(rel).map(str::to_string);
    let mut parent = exec.parent.clone().unwrap_or_default();
    let mut hooks = Vec::new();
    for phase in disk::PHASES {
        let key_env = prep.key_env(phase, &exec.paths.hooks_dir)?;
        let steps = plan::phase_steps(
            &ctx,
            phase,
            &exec.paths.hooks_dir,
            &key_env,
            &origin,
            Some(&parent),
        )?;
        for step in steps {
            parent = step.key.clone();
            if let Action::Hooks { hooks: h, .. } = step.action {
                hooks.push((phase, h));
            }
        }
    }
    Ok((hooks, parent))
}

/// The disk output step as keyed: its key, its phases' hooks, the block-device config it uses.
struct DiskStep {
    key: String,
    hooks: disk::PhaseHooks,
    config: disk::ConfigSource,
}

fn disk_step(exec: &Executor) -> Result<DiskStep> {
    let prep = exec.prep;
    let settings = &prep.settings;
    let (hooks, parent) = disk_phase_hooks(exec)?;
    let config = disk::select_config(&settings.user_env, &prep.elements, &settings.arch)?;
    let key = disk::output_key(&parent, &settings.image_types, &prep.disk, &config);
    Ok(DiskStep { key, hooks, config })
}

/// The disk output step (see `crate::disk`): block-device.d to cleanup.d on a real disk, then
/// every requested output, cached whole under one key.
fn disk_outputs(exec: &mut Executor) -> Result<Vec<ManifestOutput>> {
    let prep = exec.prep;
    let settings = &prep.settings;
    let started = Instant::now();
    let DiskStep { key, hooks, config } = disk_step(exec)?;
    let mut found = None;
    if !exec.ran_any && !exec.forcing {
        let unchanged: Option<Vec<disk::Output>> = settings
            .image_types
            .iter()
            .map(|t| {
                let path = output::path(&settings.image_name, t);
                unchanged_output(&settings.image_name, t, &key, &path).map(|blake3| disk::Output {
                    r#type: t.clone(),
                    path,
                    blake3,
                    cached: true,
                })
            })
            .collect();
        if let Some(outputs) = unchanged {
            exec.timings.push((
                "output disk (unchanged)".into(),
                started.elapsed().as_secs_f64(),
            ));
            found = Some(outputs);
        } else if let Some(store) = exec.store
            && let Some(outputs) = disk::restore_cached(store, &key, settings, now())?
        {
            exec.timings.push((
                "output disk (cached)".into(),
                started.elapsed().as_secs_f64(),
            ));
            found = Some(outputs);
        }
    }
    let cached = found.is_some();
    let outputs = match found {
        Some(o) => o,
        None => {
            if runner::interrupted() {
                return Err(
                    Failure::new(Exit::Interrupted, "interrupted before output/disk").into(),
                );
            }
            exec.restore()?;
            let reporter = exec.reporter.context("running needs a reporter")?;
            let job = disk::Job {
                settings,
                options: &prep.disk,
                paths: &exec.paths,
                image_element: &prep.image_element,
                base_env: prep.base_env(&exec.paths),
                hooks,
                config: &config,
                key: &key,
                store: exec.store,
                reporter,
            };
            let produced = disk::run(&job)?;
            exec.rootfs_scan = None;
            exec.timings.extend(produced.timings);
            produced.outputs
        }
    };
    exec.manifest.push(ManifestStep {
        phase: "output".into(),
        hook: "disk".into(),
        key,
        diff_id: None,
        cached,
        seconds: if cached {
            0.0
        } else {
            started.elapsed().as_secs_f64()
        },
    });
    Ok(outputs
        .into_iter()
        .map(|o| ManifestOutput {
            r#type: o.r#type,
            path: o.path.display().to_string(),
            blake3: o.blake3,
            cached: o.cached,
        })
        .collect())
}

/// The digest of `path` if the previous manifest says it was written from the same final step
/// and the file still hashes to what that manifest recorded; then it need not be written again.
fn unchanged_output(image_name: &str, kind: &str, last_key: &str, path: &Path) -> Option<String> {
    let text = fs::read_to_string(format!("{image_name}.strata.json")).ok()?;
    let prev: serde_json::Value = serde_json::from_str(&text).ok()?;
    let prev_last = prev["steps"].as_array()?.last()?["key"].as_str()?;
    if prev_last != last_key {
        return None;
    }
    let recorded = prev["outputs"]
        .as_array()?
        .iter()
        .find(|o| o["type"] == kind)?["blake3"]
        .as_str()?
        .to_string();
    let mut file = fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    io::copy(&mut file, &mut hasher).ok()?;
    (hasher.finalize().to_hex().as_str() == recorded).then_some(recorded)
}

/// A temp file beside `path`, so the final rename is atomic.
pub(crate) fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".strata-out.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    // Outputs are ordinary files (tempfile creates them 0600).
    set_mode(tmp.path(), 0o644)?;
    Ok(tmp)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes)?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `strata plan`: every step with its key and whether it is cached, without running anything.
pub fn plan(args: PlanArgs) -> Result<()> {
    let prep = prepare(&args.options)?;
    let store = if prep.settings.no_cache || !prep.settings.cache_dir.join("index.sqlite").exists()
    {
        None
    } else {
        Some(Store::open(&prep.settings.cache_dir)?)
    };
    let scratch = tempfile::Builder::new().prefix("strata-plan.").tempdir()?;
    let paths = BuildPaths::under(scratch.path());
    prep.tree
        .materialize(&paths.hooks_dir)
        .context("cannot write the merged hook tree")?;
    let mut exec = Executor::new(&prep, store.as_ref(), paths, true, false, None);
    walk_all(&mut exec)?;
    if disk::wants_disk(&prep.settings.image_types) {
        let key = disk_step(&exec)?.key;
        let cached = match &store {
            Some(_) if exec.forcing => false,
            Some(s) => {
                let mut all = true;
                for t in &prep.settings.image_types {
                    all &= s.get_output(&output::type_key(&key, t))?.is_some();
                }
                all
            }
            None => false,
        };
        exec.views.push(StepView {
            phase: "output".into(),
            hook: "disk".into(),
            key,
            cached,
            elements: Vec::new(),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&exec.views)?);
    } else {
        for v in &exec.views {
            let state = if v.cached { "cached" } else { "run" };
            println!("{:<7} {}  {}/{}", state, &v.key[..16], v.phase, v.hook);
        }
        let cached = exec.views.iter().filter(|v| v.cached).count();
        println!(
            "{} steps: {} cached, {} to run",
            exec.views.len(),
            cached,
            exec.views.len() - cached
        );
    }
    Ok(())
}
