//! A shell in the image as it is at a step — `strata shell --at STEP`, dib's `break=` — with
//! the mounts and the environment a hook of that phase gets (exported, so the developer can run
//! the hook by hand from `/tmp/in_target.d/<phase>/`), or one command instead of the shell.
//!
//! ```text
//! walk with a stop point ──► steps before it restored from the cache (or built, as a build
//!   would) ──► tree live ──► phase mounts (chroot: proc, dev, sys, hooks, resolv.conf, cache
//!   mounts; host phases: TARGET_ROOT set) ──► bash --rcfile RC (RC sources environment.d in
//!   order, sets the prompt) | bash -c '. RC; exec CMD…' ──► its exit status
//! break=before-<phase> | after-<phase> | after-error: the same shell in the middle of a build;
//!   the build then goes on, but caches nothing more (the shell may have changed the tree)
//! ```
//!
//! While the shell runs, Ctrl-C belongs to it: strata ignores SIGINT until it exits. The
//! changes made in `strata shell` are thrown away with the build folder.

use super::Executor;
use crate::elements;
use crate::phase::Phase;
use crate::plan::BreakPoint;
use crate::sandbox::{self, ChrootMounts, Exec};
use crate::settings;
use anyhow::{Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

impl Executor<'_> {
    /// True once the walk reached its stop point (`strata shell`).
    pub fn stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// The phase and label of the step the walk stopped at.
    pub fn stopped_at(&self) -> Option<&(Phase, String)> {
        self.stopped.as_ref()
    }

    /// Opens a shell (or runs `command`) in the tree as it is now, in `phase`'s context.
    /// Returns the shell's exit status.
    pub fn shell(&mut self, phase: Phase, label: &str, command: &[String]) -> Result<i32> {
        let r = self.snapshots.restore()?;
        self.note_restore(r);
        let paths = self.paths.clone();
        let base = if crate::plan::DISK_PHASES.contains(&phase) {
            self.prep.disk_env(&paths)
        } else {
            self.prep.base_env(&paths)
        };
        let mut env = settings::phase_environment(&base, phase, &paths);
        let chroot = phase.in_chroot();
        if !chroot {
            env.insert("TARGET_ROOT".into(), paths.mount_dir.display().to_string());
        }
        env.insert(
            "TERM".into(),
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
        let env_dir = paths.hooks_dir.join("environment.d");
        let files = elements::env::env_files(&env_dir)
            .with_context(|| format!("cannot list {}", env_dir.display()))?;
        let seen: Vec<PathBuf> = if chroot {
            files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|n| {
                    Path::new(sandbox::IN_TARGET_DIR)
                        .join("environment.d")
                        .join(n)
                })
                .collect()
        } else {
            files
        };
        // The rc file: environment.d sourced in order (as before every hook), a prompt that
        // says where the shell is.
        let (rc_host, rc_seen) = if chroot {
            let tmp = paths.mount_dir.join("tmp");
            std::fs::create_dir_all(&tmp)?;
            (
                tmp.join(".strata-shell-rc"),
                PathBuf::from("/tmp/.strata-shell-rc"),
            )
        } else {
            let p = paths.build_dir.join("strata-shell-rc");
            (p.clone(), p)
        };
        let mut rc = String::from("set -a\n");
        for f in &seen {
            rc.push_str(&format!(". '{}'\n", f.display()));
        }
        rc.push_str("set +a\n");
        let hooks_at = if chroot {
            format!("{}/{}", sandbox::IN_TARGET_DIR, phase.dir_name())
        } else {
            paths.hooks_dir.join(phase.dir_name()).display().to_string()
        };
        rc.push_str(&format!(
            "PS1='[strata {label}] \\w\\$ '\necho 'strata shell at {label}: hooks in {hooks_at}; \
             changes are thrown away when the shell exits'\n"
        ));
        if !chroot {
            rc.push_str("cd \"$TARGET_ROOT\"\n");
        }
        std::fs::write(&rc_host, rc)
            .with_context(|| format!("cannot write {}", rc_host.display()))?;

        let mut mounts = if chroot {
            ChrootMounts::mount(&paths.mount_dir, &paths.hooks_dir)?
        } else {
            ChrootMounts::host(&paths.mount_dir)?
        };
        let ran = (|| -> Result<i32> {
            let locks = self.bind_cache_mounts(&mut mounts)?;
            let shell = if !chroot || paths.mount_dir.join("bin/bash").exists() {
                "/bin/bash"
            } else {
                "/bin/sh"
            };
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            if command.is_empty() {
                if shell == "/bin/bash" {
                    args.extend([
                        "--rcfile".into(),
                        rc_seen.clone().into_os_string(),
                        "-i".into(),
                    ]);
                } else {
                    env.insert("ENV".into(), rc_seen.display().to_string());
                    args.push("-i".into());
                }
            } else {
                args.push("-c".into());
                args.push(format!(". '{}' >/dev/null && exec \"$@\"", rc_seen.display()).into());
                args.push("strata-shell".into());
                args.extend(command.iter().map(Into::into));
            }
            let exec = Exec {
                program: shell.into(),
                args,
                env: env.clone(),
                chroot: chroot.then(|| paths.mount_dir.clone()),
                cwd: if chroot {
                    PathBuf::from("/")
                } else {
                    paths.mount_dir.clone()
                },
            };
            let _ignore_sigint = crate::cancel::interactive();
            let mut child = sandbox::spawn_attached(&exec)
                .with_context(|| format!("cannot start {shell} for the shell at {label}"))?;
            let status = child.wait()?;
            drop(locks);
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        })();
        let unmounted = mounts.unmount();
        let _ = std::fs::remove_file(&rc_host);
        let status = ran?;
        unmounted?;
        Ok(status)
    }

    /// dib's `break=`: a shell at this point of the build; the build then goes on without
    /// caching anything more.
    pub(super) fn break_shell(&mut self, phase: Phase, what: &str) -> Result<()> {
        self.reporter.finish();
        eprintln!("break={what}: a shell in the image; exit it to go on with the build");
        self.shell(phase, what, &[])?;
        if !self.tainted {
            tracing::warn!(
                "break={what}: the shell may have changed the tree, so the steps after it are not \
                 cached"
            );
        }
        self.tainted = true;
        self.forcing = true;
        Ok(())
    }

    pub(super) fn breaks_at(&self, point: BreakPoint) -> bool {
        self.prep.settings.break_points.contains(&point)
    }
}
