//! Host programs strata runs itself (mkfs, mcopy, qemu-img, mksquashfs, …): finding them on a
//! PATH, and running them so that SIGINT/SIGTERM stops them promptly.
//!
//! ```text
//! output(cmd) ──spawn (stdout/stderr piped, read on two threads; PDEATHSIG=SIGKILL, so a
//!               strata killed by SIGKILL takes the tool with it)──► poll every 50 ms:
//!     exited ──► Output      cancelled ──► kill, wait ──► Err(Cancelled)
//! ```

use std::ffi::OsStr;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `cmd` to the end like `Command::output`, but kills it and returns a `Cancelled` io
/// error as soon as SIGINT/SIGTERM arrives ([`crate::cancel`]). stdin is closed. The tool dies
/// with strata (PDEATHSIG): nothing strata started keeps a disk or a temp file busy after a
/// kill.
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    use std::os::unix::process::CommandExt;
    crate::cancel::check_io()?;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // strata died between fork and prctl.
                libc::_exit(125);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(c) = crate::cancel::requested() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(c));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The first executable file named `name` in the `:`-separated folders of `path_env`.
pub fn find_program(name: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path_env?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// [`find_program`] on this process's PATH (`/usr/bin:/bin` when it has none).
pub fn on_host_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    find_program(name, Some(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_files_are_found_in_path_order() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(a.join("tool")).unwrap(); // a folder, not a program
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_program("tool", Some(&path)), None, "not executable");
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_program("tool", Some(&path)), Some(b.join("tool")));
        assert_eq!(find_program("tool", None), None);
        assert!(on_host_path("sh").is_some());
    }

    #[test]
    fn output_collects_both_streams_and_the_status() {
        let out =
            output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }
}
