//! Runs one hook (like dib-run-parts does for each of its scripts), streams and logs its output,
//! and formats dib's timing table.
//!
//! ```text
//! HookRun ─► env: caller's env (+ in a chroot: HOME=/root, no TMPDIR/VIRTUAL_ENV, a sane PATH)
//!         ─► sandbox::spawn(bash -c RUNNER strata-hook SCRIPT ENV_FILE...)
//!              RUNNER: set -eu; set -o pipefail; . each env file in order
//!                      (with set -x when DIB_DEBUG_TRACE > 0); exec SCRIPT
//!         ─► every output line: "[install.d/50-foo] line" above the spinner (progress::Reporter)
//!            and, timestamped, in the build log; the last 20 lines kept for the error report
//!         ─► HookOutcome { success, code, signal, seconds, tail }
//! ```
//! Ctrl-C: `Reporter::new` installs the SIGINT/SIGTERM handlers of [`crate::cancel`], which
//! only set a flag (a second signal exits at once; the hooks then die by PDEATHSIG). The terminal's SIGINT reaches the
//! hook through the process group; when the hook has ended, `run_hook` sees the flag and returns
//! `SandboxError::Interrupted`. A hook that ignores the signal is killed after 5 seconds.
//! Between steps the caller checks `interrupted()`.

use crate::phase::Phase;
use crate::progress::Reporter;
use crate::sandbox::{self, Exec, SandboxError};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The PATH a chroot hook gets (dib's run_in_target list, without its literal `$PATH` quirk).
pub const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How many output lines a failure report keeps.
pub const TAIL_LINES: usize = 20;
/// A hook's output line longer than this is shown in pieces.
const MAX_LINE: usize = 64 * 1024;

/// How long a hook may outlive an interrupt before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// One hook to run.
#[derive(Debug, Clone)]
pub struct HookRun<'a> {
    pub phase: Phase,
    pub hook: &'a str,
    pub element: &'a str,
    /// The hook's path as seen where it runs (e.g. `/tmp/in_target.d/install.d/50-foo`).
    pub script: PathBuf,
    /// environment.d files to source first, in order, as seen where the hook runs.
    pub env_files: Vec<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub chroot: Option<PathBuf>,
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq)]
pub struct HookOutcome {
    pub success: bool,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub seconds: f64,
    /// The last `TAIL_LINES` output lines, without prefix.
    pub tail: Vec<String>,
}

/// True once SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    crate::cancel::requested().is_some()
}

/// The shell text that sources the env files and execs the hook (`$1` = hook, rest = files).
fn runner_script(trace: bool, posix_sh: bool) -> String {
    let pipefail = if posix_sh {
        // Probed in a subshell: in dash `set` is a special builtin, so an unknown option
        // would exit the shell itself before any `|| true` could run.
        "(set -o pipefail) 2>/dev/null && set -o pipefail"
    } else {
        "set -o pipefail"
    };
    let (on, off) = if trace {
        ("set -x\n    ", "\n    { set +x; } 2>/dev/null")
    } else {
        ("", "")
    };
    format!(
        "set -eu\n{pipefail}\n__strata_hook=$1\nshift\nfor __strata_env in \"$@\"; do\n    \
         {on}. \"$__strata_env\"{off}\ndone\nunset __strata_env\nexec \"$__strata_hook\"\n"
    )
}

/// True when `path` (absolute, as seen inside `root`) exists there, following symlinks as the
/// chroot would (absolute links resolve inside `root`, `..` never leaves it).
fn exists_in_root(root: &Path, path: &Path) -> bool {
    let mut pending: Vec<OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut stack: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let mut host = root.to_path_buf();
        host.extend(&stack);
        host.push(&name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                let Ok(target) = std::fs::read_link(&host) else {
                    return false;
                };
                if hops > 40 {
                    return false;
                }
                if target.is_absolute() {
                    stack.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => stack.push(name),
            Err(_) => return false,
        }
    }
    true
}

/// Runs one hook and reports how it ended. A failing hook is an `Ok` outcome with
/// `success == false`; `Err` means it could not be run, or the build was interrupted.
pub fn run_hook(run: &HookRun, reporter: &Reporter) -> Result<HookOutcome, SandboxError> {
    let label = format!("{}/{} ({})", run.phase, run.hook, run.element);
    if interrupted() {
        return Err(SandboxError::Interrupted { hook: label });
    }
    let mut env = run.env.clone();
    let (shell, cwd) = match &run.chroot {
        Some(root) => {
            env.insert("HOME".into(), "/root".into());
            env.remove("TMPDIR");
            env.remove("VIRTUAL_ENV");
            env.insert("PATH".into(), CHROOT_PATH.into());
            let shell = if exists_in_root(root, Path::new("/bin/bash")) {
                "/bin/bash"
            } else {
                "/bin/sh"
            };
            (shell, PathBuf::from("/"))
        }
        None => (
            "/bin/bash",
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        ),
    };
    let trace = env
        .get("DIB_DEBUG_TRACE")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|n| n > 0);
    let mut args: Vec<OsString> = vec![
        "-c".into(),
        runner_script(trace, shell == "/bin/sh").into(),
        "strata-hook".into(),
        run.script.clone().into_os_string(),
    ];
    args.extend(run.env_files.iter().map(|p| p.clone().into_os_string()));
    let exec = Exec {
        program: shell.into(),
        args,
        env,
        chroot: run.chroot.clone(),
        cwd,
    };

    reporter.start_hook(run.phase, run.hook, run.element);
    let started = Instant::now();
    let mut child = sandbox::spawn(&exec, true).map_err(|source| SandboxError::Spawn {
        hook: label.clone(),
        source,
    })?;
    let step = format!("{}/{}", run.phase, run.hook);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES + 1);
    // When exec of the hook fails (a binary for another machine, a file that is not a
    // program), bash says why and then repeats the `exec` failure with errno already reset:
    // "strata-hook: line N: SCRIPT: Success". That second line says nothing; it is dropped.
    let stray_success = format!(": {}: Success", run.script.display());
    let mut emit = |raw: &[u8]| {
        let text = String::from_utf8_lossy(raw);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if text.starts_with("strata-hook: ") && text.ends_with(&stray_success) {
            return;
        }
        // Progress meters redraw with \r: keep what the terminal would finally show.
        let shown = text.rsplit('\r').find(|s| !s.is_empty()).unwrap_or("");
        reporter.hook_line(&step, shown);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(shown.to_string());
    };

    if let Some(mut out) = child.take_output() {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        let mut interrupted_at: Option<Instant> = None;
        loop {
            if interrupted() {
                let since = *interrupted_at.get_or_insert_with(Instant::now);
                if since.elapsed() > INTERRUPT_GRACE {
                    let _ = child.kill();
                }
            }
            let mut pfd = libc::pollfd {
                fd: out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a descriptor we own.
            let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SandboxError::io("read the output of hook", &run.script, e));
            }
            let ready = ready > 0;
            if !ready {
                continue;
            }
            let n = match out.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SandboxError::io("read the output of hook", &run.script, e)),
            };
            if n == 0 {
                break;
            }
            let start = pending.len();
            pending.extend_from_slice(&buf[..n]);
            // Only the new bytes are searched; complete lines go out in one pass, and a line
            // longer than MAX_LINE (a progress meter redrawn with \r) is cut there.
            let end = match pending[start..].iter().rposition(|&b| b == b'\n') {
                Some(i) => start + i + 1,
                None if pending.len() > MAX_LINE => pending.len(),
                None => continue,
            };
            let mut lines = pending[..end].split(|&b| b == b'\n');
            let mut line = lines.next();
            while let Some(l) = line {
                let next = lines.next();
                if next.is_some() || !l.is_empty() {
                    emit(l);
                }
                line = next;
            }
            pending.drain(..end);
        }
        if !pending.is_empty() {
            emit(&pending);
        }
    }
    let status = child
        .wait()
        .map_err(|e| SandboxError::io("wait for hook", &run.script, e))?;
    let seconds = started.elapsed().as_secs_f64();
    if interrupted() || died_of_our_interrupt(status.signal(), status.code()) {
        return Err(SandboxError::Interrupted { hook: label });
    }
    Ok(HookOutcome {
        success: status.success(),
        code: status.code(),
        signal: status.signal(),
        seconds,
        tail: tail.into(),
    })
}

/// True when a hook that ended by SIGINT/SIGTERM (or bash's 130/143 for them) was stopped by
/// the signal that interrupts the build. A Ctrl-C reaches the whole process group at once, and
/// our handler may run on another thread (the progress bar's) just after `wait` returned, so
/// give it a moment to land before calling the hook's death a failure of its own.
fn died_of_our_interrupt(signal: Option<i32>, code: Option<i32>) -> bool {
    let by_signal =
        matches!(signal, Some(libc::SIGINT | libc::SIGTERM)) || matches!(code, Some(130 | 143));
    if !by_signal {
        return false;
    }
    let deadline = Instant::now() + Duration::from_millis(250);
    while Instant::now() < deadline {
        if interrupted() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    interrupted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_death_is_ours_only_by_sigint_or_sigterm_and_only_once_we_were_interrupted() {
        // (This test process is never interrupted, so every answer is false; the point is
        // which statuses wait for the handler and that the wait is bounded.)
        assert!(!died_of_our_interrupt(None, Some(1)));
        assert!(!died_of_our_interrupt(Some(libc::SIGKILL), None));
        let t = Instant::now();
        assert!(!died_of_our_interrupt(Some(libc::SIGINT), None));
        assert!(!died_of_our_interrupt(None, Some(130)));
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "waited for the handler"
        );
    }

    #[test]
    fn runner_script_traces_only_when_asked() {
        let plain = runner_script(false, false);
        assert!(plain.starts_with("set -eu\nset -o pipefail\n"));
        assert!(!plain.contains("set -x"));
        assert!(plain.contains("exec \"$__strata_hook\""));
        let traced = runner_script(true, true);
        assert!(traced.contains("set -x"));
        assert!(traced.contains("(set -o pipefail) 2>/dev/null && set -o pipefail"));
    }

    #[test]
    fn the_posix_runner_script_runs_under_every_host_sh() {
        // bash, busybox sh and dash (no pipefail, and `set` exits on an unknown option).
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("hook");
        std::fs::write(&hook, "#!/bin/sh\necho ran\n").unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let script = runner_script(false, true);
        let mut tried = 0;
        for shell in [&["bash"][..], &["dash"], &["busybox", "sh"]] {
            let Ok(out) = std::process::Command::new(shell[0])
                .args(&shell[1..])
                .arg("-c")
                .arg(&script)
                .arg("runner")
                .arg(&hook)
                .output()
            else {
                continue; // not installed here
            };
            tried += 1;
            assert!(
                out.status.success(),
                "{shell:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n", "{shell:?}");
        }
        assert!(tried > 0);
    }

    #[test]
    fn exists_in_root_resolves_links_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/bash"), "").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::fs::create_dir(root.join("sbin")).unwrap();
        // An absolute link resolves inside the root, not on the host.
        std::os::unix::fs::symlink("/usr/bin/bash", root.join("sbin/abs")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("sbin/host")).unwrap();
        std::os::unix::fs::symlink("../../../../../usr/bin/bash", root.join("sbin/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(exists_in_root(root, Path::new("/bin/bash")));
        assert!(exists_in_root(root, Path::new("/sbin/abs")));
        assert!(exists_in_root(root, Path::new("/sbin/up")));
        assert!(!exists_in_root(root, Path::new("/sbin/host")));
        assert!(!exists_in_root(root, Path::new("/bin/sh")));
        assert!(!exists_in_root(root, Path::new("/loop")));
    }
}
