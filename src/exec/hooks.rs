//! The phase hook loop shared by tree steps and the disk step, the `-p` packages step, and the
//! small pieces of dib's driver that run between phases (install-type environment, the
//! root.d check, `finalise_base`).
//!
//! ```text
//! run_phase_hooks(phase, hooks): mounts (chroot: proc, dev, sys, hooks ro, resolv.conf;
//!     host: resolv.conf) + cache mounts ─► each hook: runner::run_hook ─► first failure ends it
//!     ─► unmount ─► timing table   (the hook's error or the interrupt wins over an unmount error)
//! run_packages(pkgs): the same, for one generated `install-packages` script
//! ```

use crate::elements;
use crate::exit::{Exit, Failure};
use crate::phase::Phase;
use crate::plan::PlannedHook;
use crate::progress::Reporter;
use crate::runner::{self, HookOutcome, HookRun};
use crate::sandbox::{self, ChrootMounts};
use crate::settings::BuildPaths;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Holds what a step's cache mounts lock (released when dropped).
pub type CacheLocks = Vec<fs::File>;

/// Binds the cache mounts of a step into its mounts (or none).
pub type CacheMountFn<'a> = &'a dyn Fn(&mut ChrootMounts) -> Result<CacheLocks>;

/// Runs one phase's hooks in order inside the phase's mounts plus whatever `cache_mounts`
/// binds, and reports the phase's timing table. The first failure ends it with the one-line
/// hook error; an interrupt stops it before the next hook. Returns each hook's outcome.
pub fn run_phase_hooks(
    phase: Phase,
    hooks: &[PlannedHook],
    paths: &BuildPaths,
    env: &BTreeMap<String, String>,
    reporter: &Reporter,
    cache_mounts: CacheMountFn,
) -> Result<Vec<HookOutcome>> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let started = std::time::Instant::now();
    let mut mounts = if phase.in_chroot() {
        ChrootMounts::mount(&paths.mount_dir, &paths.hooks_dir)?
    } else {
        ChrootMounts::host(&paths.mount_dir)?
    };
    let cache_locks = cache_mounts(&mut mounts)?;
    let mounted = started.elapsed().as_secs_f64();
    let env_dir = paths.hooks_dir.join("environment.d");
    let files = elements::env::env_files(&env_dir)
        .with_context(|| format!("cannot list {}", env_dir.display()))?;
    let in_target_files: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.file_name())
        .map(|n| {
            Path::new(sandbox::IN_TARGET_DIR)
                .join("environment.d")
                .join(n)
        })
        .collect();
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();
    let mut result = Ok(());
    for hook in hooks {
        if let Err(c) = crate::cancel::check() {
            result =
                Err(anyhow::Error::new(c)
                    .context(format!("interrupted before {phase}/{}", hook.name)));
            break;
        }
        let (script, env_files, chroot) = if phase.in_chroot() {
            (
                Path::new(sandbox::IN_TARGET_DIR)
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
    let ran = started.elapsed().as_secs_f64();
    let unmounted = mounts.unmount();
    drop(cache_locks);
    tracing::debug!(
        "{phase}: mounts {mounted:.3} s, hooks {:.3} s ({}), unmount {:.3} s",
        ran - mounted,
        rows.iter()
            .map(|(h, s)| format!("{h} {s:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64() - ran
    );
    if hooks.len() > 1 {
        reporter.table(phase.dir_name(), &rows);
    }
    result?;
    unmounted?;
    Ok(outcomes)
}

/// Runs `install-packages PKGS` in the chroot (dib's `-p`), after install.d. The script is
/// written into the tree's /tmp and removed again whatever happens; the hook's own error (or
/// the interrupt) wins over a failure to unmount or remove.
pub fn run_packages(
    pkgs: &[String],
    paths: &BuildPaths,
    env: &BTreeMap<String, String>,
    reporter: &Reporter,
    cache_mounts: CacheMountFn,
) -> Result<()> {
    let rel = "tmp/strata-extra-packages";
    let script = paths.mount_dir.join(rel);
    fs::create_dir_all(paths.mount_dir.join("tmp"))?;
    let quoted: Vec<String> = pkgs.iter().map(|p| shell_quote(p)).collect();
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -eu\nexec install-packages {}\n",
            quoted.join(" ")
        ),
    )
    .with_context(|| format!("cannot write {}", script.display()))?;
    crate::fsutil::set_mode(&script, 0o755)?;
    let ran = (|| -> Result<()> {
        let mut mounts = ChrootMounts::mount(&paths.mount_dir, &paths.hooks_dir)?;
        let outcome = cache_mounts(&mut mounts).and_then(|locks| {
            let run = HookRun {
                phase: Phase::Install,
                hook: "packages",
                element: "-p",
                script: PathBuf::from("/").join(rel),
                env_files: Vec::new(),
                env: env.clone(),
                chroot: Some(paths.mount_dir.clone()),
            };
            let outcome = runner::run_hook(&run, reporter);
            drop(locks);
            Ok(outcome?)
        });
        let unmounted = mounts.unmount();
        let outcome = outcome?;
        if !outcome.success {
            return Err(hook_failure(
                Phase::Install,
                "packages (-p)",
                "-p",
                &outcome,
            ));
        }
        unmounted?;
        Ok(())
    })();
    let removed =
        fs::remove_file(&script).with_context(|| format!("cannot remove {}", script.display()));
    ran?;
    removed
}

/// The one error a failed hook gives: element, phase, hook, status, and its last lines.
pub fn hook_failure(
    phase: Phase,
    hook: &str,
    element: &str,
    outcome: &HookOutcome,
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

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What dib's core writes into the hook tree after root.d (so root.d does not see it): the
/// default install type, unless an element ships that file itself.
pub fn write_install_type_env(hooks_dir: &Path) -> Result<()> {
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
pub fn check_root_deployed(root: &Path) -> Result<()> {
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
pub fn finalise_base(root: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalise_base_empties_tmp_and_truncates_logs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("tmp/sub")).unwrap();
        fs::write(root.join("tmp/sub/x"), "x").unwrap();
        fs::write(root.join("tmp/y"), "y").unwrap();
        fs::create_dir_all(root.join("var/log/apt")).unwrap();
        fs::write(root.join("var/log/apt/history.log"), "lots").unwrap();
        finalise_base(root).unwrap();
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::metadata(root.join("var/log/apt/history.log"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn a_root_with_only_tmp_is_not_deployed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        let e = check_root_deployed(dir.path()).unwrap_err();
        assert!(e.to_string().contains("root.d left the image root empty"));
        fs::create_dir(dir.path().join("etc")).unwrap();
        check_root_deployed(dir.path()).unwrap();
    }

    #[test]
    fn the_install_type_file_is_written_once_and_an_element_copy_wins() {
        let dir = tempfile::tempdir().unwrap();
        write_install_type_env(dir.path()).unwrap();
        let f = dir.path().join("environment.d/11-dib-install-type.bash");
        assert!(
            fs::read_to_string(&f)
                .unwrap()
                .contains("DIB_DEFAULT_INSTALLTYPE")
        );
        fs::write(&f, "# the element's own\n").unwrap();
        write_install_type_env(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "# the element's own\n");
    }

    #[test]
    fn package_names_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("vim"), "'vim'");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
