//! `strata build` and `strata plan`: settings from the command line and the environment, the
//! cache levels, the executor, and what they print (progress, timing table, plan table,
//! manifest).
//!
//! ```text
//! BuildArgs ──request()──► Settings::resolve ──► Prepared::new (elements; bad input stops here)
//!   ──► check_tools ──► cache levels (local | none) ──► sweep what dead builds left (their
//!   build folders in TMP_DIR, partial outputs, cache temp files: by lock, never a live one's)
//!   ──► BuildDir (tmpfs) ──► Executor (with the image's kept tree: --keep-tree)
//!   ──► walk + outputs ──(a refused cached layer: drop its step, start again)──► checksums
//!   ──► NAME.strata.json ──► build history ──► timing table, summary, build-end event
//! PlanArgs ──► the same up to the cache (read-only) ──► Executor in plan mode ──► table / JSON
//! ```

use super::request;
use crate::cache::{Local, MultiLevel, NoCache, ReadOnly, StepCache};
use crate::cli::{BuildArgs, PlanArgs};
use crate::exec::prepare::Prepared;
use crate::exec::snapshot::RefusedLayer;
use crate::exec::{Executor, Mode};
use crate::exit::{Exit, Failure};
use crate::fsutil::now;
use crate::key;
use crate::manifest::{self, Manifest, ManifestElement};
use crate::outputs::{self, Written};
use crate::progress::{self, Event, Reporter};
use crate::sandbox::{self, BuildDir};
use crate::settings::{self, BuildPaths, Settings};
use crate::store::{Broken, BuildRecord, Store};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Instant;

/// The cache a build reads and writes: the local store (then `--cache-from` registries, and
/// the `--cache-to` one, as later levels), or none with `--no-cache`. The temp files of local
/// cache writers that died are removed first.
pub(crate) fn open_cache(settings: &Settings) -> Result<Arc<dyn StepCache>> {
    if settings.cache.no_cache {
        return Ok(Arc::new(NoCache));
    }
    let store = Store::open(&settings.cache.dir)?;
    match store.sweep_dead_temp_files() {
        Ok(gone) if !gone.is_empty() => tracing::info!(
            "removed {} temp files ({} bytes) that killed builds left in {}",
            gone.len(),
            gone.iter().map(|(_, n)| n).sum::<u64>(),
            settings.cache.dir.join("tmp").display()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
    let local = Arc::new(Local::new(store));
    let remote = super::remote::build_levels(&settings.cache.registries, Some(local.clone()))?;
    if remote.is_empty() {
        return Ok(local);
    }
    let mut levels: Vec<Arc<dyn StepCache>> = vec![local];
    levels.extend(remote);
    Ok(Arc::new(MultiLevel::new(levels)))
}

/// Removes what builds killed mid-way left (their folders in TMP_DIR, partial outputs beside
/// this build's outputs). "Dead" is decided by the lock each live build holds on its folder
/// and files, so another running build's are never touched. Failures only warn.
fn sweep_dead_builds(settings: &Settings) {
    match sandbox::sweep_dead_build_dirs(&settings.tmp_dir, BUILD_DIR_PREFIX) {
        Ok(gone) if !gone.is_empty() => tracing::info!(
            "removed {} build folders that killed builds left in {}",
            gone.len(),
            settings.tmp_dir.display()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
    let out_dir = crate::fsutil::parent_or_dot(std::path::Path::new(&settings.image_name));
    match crate::fsutil::sweep_dead(out_dir, crate::fsutil::OUTPUT_TEMP_PREFIX) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "removed {n} partial outputs that killed builds left in {}",
            out_dir.display()
        ),
        Err(e) => tracing::warn!("cannot clean up {}: {e}", out_dir.display()),
    }
}

/// The files a build may put under its outputs' names (each output, its checksums, the
/// manifest), with the identity each had before the build, so a failed or cancelled build can
/// remove those it renamed into place.
struct OutputFiles(Vec<(std::path::PathBuf, Option<FileId>)>);

/// Device, inode and change time: a file renamed into place is another file.
type FileId = (u64, u64, i64, i64);

fn file_id(path: &std::path::Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

impl OutputFiles {
    fn snapshot(settings: &Settings) -> OutputFiles {
        let mut paths = vec![Manifest::path_for(&settings.image_name)];
        for t in &settings.image_types {
            let p = t.path(&settings.image_name);
            for ext in [".md5", ".sha256"] {
                let mut s = p.clone().into_os_string();
                s.push(ext);
                paths.push(s.into());
            }
            paths.push(p);
        }
        OutputFiles(
            paths
                .into_iter()
                .map(|p| {
                    let id = file_id(&p);
                    (p, id)
                })
                .collect(),
        )
    }

    fn remove_rewritten(&self) {
        for (path, id) in &self.0 {
            let now = file_id(path);
            if now.is_some() && now != *id {
                // An OCI layout output is a folder.
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_file(path)
                };
                match removed {
                    Ok(()) => tracing::info!(
                        "removed {}: the build that wrote it did not finish",
                        path.display()
                    ),
                    Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
    }
}

/// The name prefix of build folders in TMP_DIR.
pub(crate) const BUILD_DIR_PREFIX: &str = "strata_build.";

/// The cache `plan` looks at: every level read-only, and nothing is created when there is no
/// local cache yet.
fn open_cache_read_only(settings: &Settings) -> Result<Arc<dyn StepCache>> {
    if settings.cache.no_cache {
        return Ok(Arc::new(NoCache));
    }
    let local: Arc<dyn StepCache> = if settings.cache.dir.join("index.sqlite").exists() {
        Arc::new(ReadOnly(Local::new(Store::open_read_only(
            &settings.cache.dir,
        )?)))
    } else {
        Arc::new(NoCache)
    };
    let remote = super::remote::build_levels(&settings.cache.registries, None)?;
    if remote.is_empty() {
        return Ok(local);
    }
    let mut levels = vec![local];
    levels.extend(
        remote
            .into_iter()
            .map(|l| Arc::new(ReadOnly(l)) as Arc<dyn StepCache>),
    );
    Ok(Arc::new(ReadOnly(MultiLevel::new(levels))))
}

fn resolve(args: &crate::cli::BuildOptions) -> Result<Prepared> {
    let settings = Settings::resolve(
        &request(args),
        &settings::process_env(),
        crate::arch::host_arch,
    )?;
    Prepared::new(settings)
}

/// What one attempt at the build produced: the outputs (or why not), and the steps walked and
/// the timings either way.
struct Walked {
    outputs: Result<Vec<Written>>,
    steps: Vec<crate::manifest::ManifestStep>,
    timings: Vec<(String, f64)>,
}

/// `strata build`.
pub fn build(args: BuildArgs, progress: progress::Mode) -> Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::new(
            Exit::Environment,
            "strata build must run as root: it mounts, chroots and creates device nodes (try sudo)",
        )
        .into());
    }
    if args.watch {
        // Each rebuild is its own `strata build` (a child process, its own namespace).
        let prep = resolve(&args.options)?;
        return super::watch::run(&prep);
    }
    // First, while single-threaded: everything mounted from here on dies with this process.
    sandbox::enter_private_namespace()?;
    let prep = resolve(&args.options)?;
    let settings = &prep.settings;
    outputs::check_tools(
        &settings.image_types,
        std::env::var_os("PATH").as_deref(),
        settings.source_date_epoch,
    )?;
    let reporter = Reporter::new(args.logfile.as_deref(), false, progress)?;
    reporter.event(&Event::BuildStart {
        image: &settings.image_name,
        types: settings.image_types.iter().map(|t| t.name()).collect(),
        elements: &settings.elements,
    });
    let cache = open_cache(settings)?;
    std::fs::create_dir_all(&settings.tmp_dir)
        .with_context(|| format!("cannot create TMP_DIR {}", settings.tmp_dir.display()))?;
    sweep_dead_builds(settings);
    std::fs::create_dir_all(&settings.image_cache).with_context(|| {
        format!(
            "cannot create the image cache {}",
            settings.image_cache.display()
        )
    })?;

    if args.check {
        let result = check(&prep, cache.as_ref(), &reporter, &args);
        reporter.finish();
        return result;
    }

    let before = OutputFiles::snapshot(settings);
    // A cached layer refused while restoring is dropped with its step, and the build starts
    // again in a fresh folder: the steps before it are still cached, so it resumes there.
    let mut attempt = 0;
    let walked = loop {
        attempt += 1;
        let walked = walk_once(
            &prep,
            cache.as_ref(),
            &reporter,
            args.explain,
            args.keep_tree,
        )?;
        if let Err(e) = &walked.outputs
            && attempt < 16
            && let Some(refused) = e.chain().find_map(|c| c.downcast_ref::<RefusedLayer>())
        {
            tracing::warn!("{refused}; dropping it from the cache and building it again");
            cache.drop_step(&refused.key, Broken::Refused(refused.layer.clone()))?;
            continue;
        }
        break walked;
    };
    let Walked {
        outputs,
        steps,
        timings,
    } = walked;
    let steps_for_summary = steps.clone();
    let result = outputs.and_then(|outputs| {
        if settings.disk.checksum {
            for o in &outputs {
                crate::cancel::check()?;
                outputs::checksums::refresh(&o.path)
                    .with_context(|| format!("cannot write checksums of {}", o.path.display()))?;
            }
        }
        if let Some(reference) = &settings.push {
            let layout = crate::outputs::OutputType::Oci.path(&settings.image_name);
            let pushed =
                super::remote::push_image(reference, &layout, &settings.cache.registries.insecure)?;
            reporter.println(&format!("pushed the image: {pushed}"));
        }
        let manifest = build_manifest(&prep, steps, outputs, started)?;
        let text = manifest.write(&Manifest::path_for(&settings.image_name))?;
        if args.json {
            use std::io::Write;
            writeln!(std::io::stdout().lock(), "{text}")?;
        }
        crate::cancel::check()?;
        Ok(())
    });
    if result.is_err() {
        // A failed or cancelled build leaves no output of its own under an output's name (a
        // half-done set would look like a finished build's); what it did not touch stays.
        before.remove_rewritten();
    }
    let flushed = cache.flush();
    let outcome = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!(
            "failed: {}",
            crate::error::render(e).lines().next().unwrap_or_default()
        ),
    };
    // Recorded, but a failure to record never hides the build's own error.
    let recorded = if cache.writable() {
        cache.record_build(&BuildRecord {
            elements: prep.image_element.clone(),
            arguments: settings.dib_args(),
            outcome,
            step_keys: steps_for_summary.iter().map(|s| s.key.clone()).collect(),
            started: now() - started.elapsed().as_secs() as i64,
            seconds: started.elapsed().as_secs_f64(),
        })
    } else {
        Ok(())
    };
    let mut timings = timings;
    timings.push(("total".into(), started.elapsed().as_secs_f64()));
    reporter.finish();
    if reporter.mode() != progress::Mode::Json {
        eprintln!("{}", progress::timing_table("build", &timings));
    }
    let cached = steps_for_summary.iter().filter(|s| s.cached).count();
    let total = steps_for_summary.len();
    if reporter.mode() != progress::Mode::Json && result.is_ok() {
        eprintln!("{total} steps: {cached} cached, {} run", total - cached);
    }
    let exit = match &result {
        Ok(()) => 0,
        Err(e) => crate::error::exit_code(e),
    };
    reporter.event(&Event::BuildEnd {
        outcome: match (&result, crate::cancel::requested()) {
            (Ok(()), _) => "ok",
            (Err(_), Some(_)) => "cancelled",
            (Err(_), None) => "failed",
        },
        exit,
        seconds: started.elapsed().as_secs_f64(),
        steps: total,
        cached,
    });
    result?;
    flushed?;
    recorded?;
    Ok(())
}

/// One walk in a fresh build folder: the steps, then the outputs. The build folder is cleaned
/// up whatever happens; a failure to clean up is returned only when the walk succeeded.
fn walk_once(
    prep: &Prepared,
    cache: &dyn StepCache,
    reporter: &Reporter,
    explain: bool,
    keep_tree: bool,
) -> Result<Walked> {
    let settings = &prep.settings;
    let use_tmpfs = settings.use_tmpfs && sandbox::tmpfs_allowed(settings.min_tmpfs);
    let build_dir = BuildDir::create(&settings.tmp_dir, BUILD_DIR_PREFIX, use_tmpfs)?;
    let paths = BuildPaths::under(&build_dir.path);
    let mut exec = Executor::new(
        prep,
        cache,
        paths.clone(),
        Mode::Build { explain },
        reporter,
    );
    if keep_tree && let Some(kept) = open_kept_tree(settings, cache) {
        exec.keep_tree(kept);
    }
    let result = (|| -> Result<Vec<Written>> {
        for d in [&paths.image_dir, &paths.mount_dir] {
            std::fs::create_dir_all(d)?;
        }
        prep.tree
            .materialize(&paths.hooks_dir)
            .context("cannot write the merged hook tree")?;
        // Nothing is restored until the first miss; from then on the tree is live and cached
        // steps (possible after a --cache-ttl rerun) are applied as they come.
        exec.walk()?;
        exec.outputs()
    })();
    let cleanup = build_dir.cleanup();
    let outputs = match (result, cleanup) {
        (Ok(w), Ok(())) => Ok(w),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e),
    };
    Ok(Walked {
        outputs,
        steps: std::mem::take(&mut exec.steps),
        timings: std::mem::take(&mut exec.timings),
    })
}

/// The image's kept tree (`--keep-tree`), locked for this build; None without a writable
/// local cache, or when another build holds it (this one then unpacks as without).
pub(crate) fn open_kept_tree(
    settings: &Settings,
    cache: &dyn StepCache,
) -> Option<crate::exec::kept_tree::KeptTree> {
    if settings.cache.no_cache || !cache.writable() {
        return None;
    }
    match crate::exec::kept_tree::KeptTree::open(&settings.cache.dir, &settings.image_name) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("{e:#}; restoring by unpacking instead");
            None
        }
    }
}

/// `build --check`: walks in check mode until no step diverges (a divergent step counts as
/// cached in the next walk, so the steps after it are checked from its cached tree), then
/// reports. Exit 5 when any step diverged.
fn check(
    prep: &Prepared,
    cache: &dyn StepCache,
    reporter: &Reporter,
    args: &BuildArgs,
) -> Result<()> {
    use crate::exec::check::{Check, Diverged};
    let settings = &prep.settings;
    let scratch = tempfile::Builder::new()
        .prefix("strata-check.")
        .tempdir_in(&settings.tmp_dir)
        .context("cannot make a scratch cache for the rebuilt layers")?;
    let keep_dir = args
        .keep_failed
        .then(|| std::path::PathBuf::from(format!("{}.check", settings.image_name)));
    let mut skip = std::collections::HashSet::new();
    let mut diverged: Vec<Diverged> = Vec::new();
    let passed = loop {
        let use_tmpfs = settings.use_tmpfs && sandbox::tmpfs_allowed(settings.min_tmpfs);
        let build_dir = BuildDir::create(&settings.tmp_dir, BUILD_DIR_PREFIX, use_tmpfs)?;
        let paths = BuildPaths::under(&build_dir.path);
        let mut exec = Executor::new(prep, cache, paths.clone(), Mode::Check, reporter);
        exec.set_check(Check::new(
            args.check_from.clone(),
            skip.clone(),
            Local::new(Store::open(scratch.path())?),
            keep_dir.clone(),
        ));
        let walked = (|| -> Result<()> {
            for d in [&paths.image_dir, &paths.mount_dir] {
                std::fs::create_dir_all(d)?;
            }
            prep.tree
                .materialize(&paths.hooks_dir)
                .context("cannot write the merged hook tree")?;
            exec.walk()
        })();
        let cleanup = build_dir.cleanup();
        match walked {
            Ok(()) => {
                cleanup?;
                break exec.checked().to_vec();
            }
            Err(e) => match e.downcast::<Diverged>() {
                Ok(d) if skip.len() <= exec.steps.len() + diverged.len() + 1 => {
                    reporter.println(&format!("[{}] {d}", d.step));
                    skip.insert(d.key.clone());
                    diverged.push(d);
                    cleanup?;
                }
                Ok(d) => return Err(d.into()),
                Err(e) => return Err(e),
            },
        }
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if args.json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            schema: u32,
            checked: usize,
            diverged: Vec<serde_json::Value>,
            passed: &'a [String],
        }
        let report = Report {
            schema: 1,
            checked: passed.len() + diverged.len(),
            diverged: diverged
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "step": d.step, "key": d.key, "cached": d.cached, "rebuilt": d.rebuilt,
                        "files": d.files, "kept": d.kept,
                    })
                })
                .collect(),
            passed: &passed,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for d in &diverged {
            writeln!(out, "{d}")?;
            if let Some(files) = &d.files {
                for f in &files.files {
                    for line in f.to_string().lines() {
                        writeln!(out, "    {line}")?;
                    }
                }
            }
            if let Some(k) = &d.kept {
                writeln!(out, "    both layers kept in {}", k.display())?;
            }
        }
        writeln!(
            out,
            "check: {} steps rebuilt to their cached layers, {} did not",
            passed.len(),
            diverged.len()
        )?;
    }
    if diverged.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Divergent,
            format!(
                "{} of {} checked steps did not rebuild to their cached layers: {}",
                diverged.len(),
                passed.len() + diverged.len(),
                diverged
                    .iter()
                    .map(|d| d.step.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .into())
    }
}

fn build_manifest(
    prep: &Prepared,
    steps: Vec<crate::manifest::ManifestStep>,
    outputs: Vec<Written>,
    started: Instant,
) -> Result<Manifest> {
    let settings = &prep.settings;
    let elements = prep
        .elements
        .iter()
        .map(|e| {
            Ok(ManifestElement {
                name: e.name.clone(),
                digest: key::element_digest(&e.path)
                    .with_context(|| format!("cannot read element {}", e.name))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rootfs_digest = manifest::rootfs_digest(steps.iter().filter_map(|s| s.diff_id.as_deref()));
    Ok(Manifest {
        schema: manifest::SCHEMA,
        strata_version: env!("CARGO_PKG_VERSION").to_string(),
        cache_format_version: key::CACHE_FORMAT_VERSION,
        image_name: settings.image_name.clone(),
        arch: settings.arch.clone(),
        arguments: settings.dib_args(),
        source_date_epoch: settings.source_date_epoch,
        elements,
        steps,
        rootfs_digest: Some(rootfs_digest),
        outputs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `strata plan`: every step with its key and whether (and where) it is cached, without
/// running or changing anything.
pub fn plan(args: PlanArgs) -> Result<()> {
    let prep = resolve(&args.options)?;
    let cache = open_cache_read_only(&prep.settings)?;
    let scratch = tempfile::Builder::new().prefix("strata-plan.").tempdir()?;
    let paths = BuildPaths::under(scratch.path());
    prep.tree
        .materialize(&paths.hooks_dir)
        .context("cannot write the merged hook tree")?;
    let reporter = Reporter::silent();
    let mut exec = Executor::new(
        &prep,
        cache.as_ref(),
        paths,
        Mode::Plan {
            explain: args.explain,
        },
        &reporter,
    );
    exec.walk()?;
    print_plan(&exec.views, args.json)
}

fn print_plan(views: &[crate::plan::StepView], json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(views)?)?;
        return Ok(());
    }
    for v in views {
        let state = if v.cached { "cached" } else { "run" };
        let from = match &v.from {
            Some(f) if !f.starts_with("local cache") => format!("  (from {f})"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<7} {}  {}/{}{from}",
            state,
            &v.key[..16],
            v.phase,
            v.hook
        )?;
    }
    let cached = views.iter().filter(|v| v.cached).count();
    writeln!(
        out,
        "{} steps: {} cached, {} to run",
        views.len(),
        cached,
        views.len() - cached
    )?;
    Ok(())
}
