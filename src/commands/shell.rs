//! `strata shell --at STEP [--before] ELEMENTS... [-- CMD...]`: a shell (or one command) in the
//! image as it is at a step, restored from the cache (steps that are not cached are built first,
//! as a build would, and cached).
//!
//! ```text
//! ShellArgs ──► Settings ──► Prepared (the --at hook must exist) ──► cache ──► BuildDir
//!   ──► Executor walk, stopping at the step ──► Executor::shell ──► its exit status
//!   ──► BuildDir cleaned up (the shell's changes are thrown away)
//! ```

use super::request;
use crate::cli::ShellArgs;
use crate::exec::prepare::{Prepared, check_hook_exists};
use crate::exec::{Executor, Mode};
use crate::exit::{Exit, Failure};
use crate::plan::StopAt;
use crate::progress::{self, Reporter};
use crate::sandbox::{self, BuildDir};
use crate::settings::{self, BuildPaths, Settings};
use anyhow::{Context, Result};

/// Runs `strata shell`; returns the shell's (or the command's) exit status.
pub fn run(args: ShellArgs, progress: progress::Mode) -> Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::new(
            Exit::Environment,
            "strata shell must run as root: it mounts and chroots (try sudo)",
        )
        .into());
    }
    sandbox::enter_private_namespace()?;
    let settings = Settings::resolve(
        &request(&args.options),
        &settings::process_env(),
        crate::arch::host_arch,
    )?;
    let prep = Prepared::new(settings)?;
    if let Some(hook) = &args.at.hook {
        check_hook_exists(&prep.tree, args.at.phase, hook).context("--at")?;
    }
    if crate::plan::DISK_PHASES.contains(&args.at.phase) {
        return Err(Failure::bad_input(format!(
            "--at {}: the phases of the disk step (block-device.d .. cleanup.d) run on a disk that \
             exists only while the disk step runs; pick a step up to post-root.d",
            args.at.phase
        ))
        .into());
    }
    let reporter = Reporter::new(None, false, progress)?;
    let cache = super::build::open_cache(&prep.settings)?;
    let settings = &prep.settings;
    std::fs::create_dir_all(&settings.tmp_dir)
        .with_context(|| format!("cannot create TMP_DIR {}", settings.tmp_dir.display()))?;
    std::fs::create_dir_all(&settings.image_cache)?;
    let use_tmpfs = settings.use_tmpfs && sandbox::tmpfs_allowed(settings.min_tmpfs);
    let build_dir = BuildDir::create(&settings.tmp_dir, super::build::BUILD_DIR_PREFIX, use_tmpfs)?;
    let paths = BuildPaths::under(&build_dir.path);
    let mut exec = Executor::new(
        &prep,
        cache.as_ref(),
        paths.clone(),
        Mode::Build { explain: false },
        &reporter,
    );
    if crate::exec::kept_tree::on_by_default()
        && let Some(kept) = super::build::open_kept_tree(settings, cache.as_ref())
    {
        exec.keep_tree(kept);
    }
    exec.stop_at(StopAt {
        phase: args.at.phase,
        hook: args.at.hook.clone(),
        before: args.before,
    });
    let result = (|| -> Result<i32> {
        for d in [&paths.image_dir, &paths.mount_dir] {
            std::fs::create_dir_all(d)?;
        }
        prep.tree
            .materialize(&paths.hooks_dir)
            .context("cannot write the merged hook tree")?;
        exec.walk()?;
        let Some((phase, label)) = exec.stopped_at().cloned() else {
            return Err(Failure::bad_input(format!(
                "--at {}: this build has no such step (`strata plan` lists them)",
                args.at.hook.as_deref().map_or_else(
                    || args.at.phase.to_string(),
                    |h| format!("{}/{h}", args.at.phase)
                )
            ))
            .into());
        };
        reporter.finish();
        exec.shell(phase, &label, &args.command)
    })();
    let flushed = cache.flush();
    let cleanup = build_dir.cleanup();
    let status = result?;
    flushed?;
    cleanup?;
    crate::cancel::check()?;
    Ok(u8::try_from(status).unwrap_or(1))
}
