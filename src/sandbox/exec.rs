//! Running one command on the host or chrooted, in its own pid namespace, so that it and every
//! process it starts die when it ends or when strata dies (even by SIGKILL).
//!
//! ```text
//! strata ──spawn──► C  intermediate (strata's pid ns): PDEATHSIG=SIGKILL, unshare(CLONE_NEWPID),
//!                   │  ignores SIGINT/SIGQUIT, waits for I, exits as the hook did (re-raising
//!                   │  the hook's signal, so strata sees "killed by SIGx")
//!                   └─► I  pid 1 of the new pid ns: PDEATHSIG=SIGKILL, a tiny init that reaps
//!                       │  orphans and exits when the hook exits; the kernel then kills every
//!                       │  process left in the namespace
//!                       └─► H  the hook: chroot(root) if asked, chdir(cwd), exec
//! ```
//! Why a tiny init instead of exec'ing the hook as pid 1 (as `unshare --fork` does): pid 1
//! ignores every signal it has no handler for, so a Ctrl-C would not stop a hook that was pid 1,
//! and a hook that does not reap its children would leave zombies. With I in between, the hook
//! gets the terminal's SIGINT like any process of strata's process group.
//!
//! Everything between fork and exec uses only raw syscalls (no allocation, no locks): strata may
//! be multi-threaded. PDEATHSIG fires when the *thread* that spawned the child exits, so spawn
//! from the thread that waits for it. stdout and stderr share one pipe so lines keep their order.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsString};
use std::io::{self, PipeReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

/// One command to run in the sandbox.
#[derive(Debug, Clone)]
pub struct Exec {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The WHOLE environment of the command (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Chroot into this directory before exec; `program` and `cwd` are then paths inside it.
    pub chroot: Option<PathBuf>,
    pub cwd: PathBuf,
}

/// A running sandboxed command. Dropping it kills and reaps it if it still runs.
#[derive(Debug)]
pub struct SandboxChild {
    child: Child,
    output: Option<PipeReader>,
}

impl SandboxChild {
    /// The host pid of the intermediate process (not of the command itself).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The read end of the merged stdout+stderr pipe (once).
    pub fn take_output(&mut self) -> Option<PipeReader> {
        self.output.take()
    }

    /// Kills the command and everything it started (SIGKILL to the intermediate process;
    /// PDEATHSIG takes down the pid namespace's init, and with it the whole namespace).
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()
    }

    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }

    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for SandboxChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Starts `exec` in a new pid namespace (see the module docs). stdout and stderr go to one pipe,
/// available from `take_output`; stdin is /dev/null or inherited.
pub fn spawn(exec: &Exec, stdin_null: bool) -> io::Result<SandboxChild> {
    spawn_with(exec, stdin_null, false)
}

/// Like [`spawn`], with stdin, stdout and stderr all inherited (an interactive shell, or a
/// command whose output goes straight to the user): `take_output` gives nothing.
pub fn spawn_attached(exec: &Exec) -> io::Result<SandboxChild> {
    spawn_with(exec, false, true)
}

fn spawn_with(exec: &Exec, stdin_null: bool, attached: bool) -> io::Result<SandboxChild> {
    let root = match &exec.chroot {
        Some(r) => Some(cstring(r.as_os_str().as_bytes(), "the chroot path")?),
        None => None,
    };
    let cwd = cstring(exec.cwd.as_os_str().as_bytes(), "the working directory")?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&exec.program);
    cmd.args(&exec.args).env_clear().envs(&exec.env);
    let reader = if attached {
        cmd.stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        None
    } else {
        let (reader, writer) = io::pipe()?;
        let writer2 = writer.try_clone()?;
        cmd.stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .stdin(if stdin_null {
                Stdio::null()
            } else {
                Stdio::inherit()
            });
        Some(reader)
    };
    // SAFETY: the closure only makes raw syscalls (no allocation, no locks), as required
    // between fork and exec; the CStrings it uses were built before the fork.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, root.as_deref(), &cwd));
    }
    let child = cmd.spawn()?;
    // `cmd` holds our copies of the pipe's write end: drop it so the reader sees EOF.
    drop(cmd);
    Ok(SandboxChild {
        child,
        output: reader,
    })
}

fn set_signal(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: a zeroed sigaction with a plain handler value is valid; sigaction is
    // async-signal-safe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
}

/// Closes every descriptor above 3, after moving `keep` to 3.
fn keep_only_fd(keep: libc::c_int) {
    // SAFETY: plain syscalls on descriptor numbers.
    unsafe {
        if keep != 3 {
            libc::dup2(keep, 3);
        }
        if libc::close_range(4, libc::c_uint::MAX, 0) != 0 {
            for fd in 4..4096 {
                libc::close(fd);
            }
        }
    }
}

fn exit_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        125
    }
}

/// Runs in C (the forked child), before exec. Returns only in H.
fn child_setup(parent: libc::pid_t, root: Option<&CStr>, cwd: &CStr) -> io::Result<()> {
    // SAFETY: raw syscalls only; see the module docs for the process layout.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            // strata died between fork and prctl.
            libc::_exit(125);
        }
        // strata's own handlers must not run in the helpers.
        set_signal(libc::SIGTERM, libc::SIG_DFL);
        set_signal(libc::SIGINT, libc::SIG_IGN);
        set_signal(libc::SIGQUIT, libc::SIG_IGN);
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut status_pipe = [0 as libc::c_int; 2];
        if libc::pipe2(status_pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        let init = libc::fork();
        if init < 0 {
            return Err(io::Error::last_os_error());
        }
        if init > 0 {
            libc::close(status_pipe[1]);
            keep_only_fd(status_pipe[0]);
            intermediate(init, 3);
        }
        // I: pid 1 of the new pid namespace.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        set_signal(libc::SIGINT, libc::SIG_DFL);
        set_signal(libc::SIGQUIT, libc::SIG_DFL);
        libc::close(status_pipe[0]);
        let hook = libc::fork();
        if hook < 0 {
            libc::_exit(125);
        }
        if hook > 0 {
            keep_only_fd(status_pipe[1]);
            init_loop(hook, 3);
        }
        // H: the command.
        libc::close(status_pipe[1]);
        if let Some(root) = root
            && libc::chroot(root.as_ptr()) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// C: waits for I and exits the way the hook did.
fn intermediate(init: libc::pid_t, status_fd: libc::c_int) -> ! {
    // SAFETY: raw syscalls only.
    unsafe {
        let mut status: libc::c_int = 0;
        loop {
            let r = libc::waitpid(init, &mut status, 0);
            if r == init {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
        let mut buf = [0u8; 4];
        let n = libc::read(status_fd, buf.as_mut_ptr().cast(), 4);
        if n == 4 {
            let hook_status = libc::c_int::from_ne_bytes(buf);
            if libc::WIFSIGNALED(hook_status) {
                let sig = libc::WTERMSIG(hook_status);
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                set_signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
            }
            libc::_exit(exit_code(hook_status));
        }
        libc::_exit(exit_code(status));
    }
}

/// I: reaps everything; when the hook exits, reports its status to C and exits (the kernel
/// then kills whatever is left in the namespace).
fn init_loop(hook: libc::pid_t, status_fd: libc::c_int) -> ! {
    // SAFETY: raw syscalls only.
    unsafe {
        loop {
            let mut status: libc::c_int = 0;
            let r = libc::waitpid(-1, &mut status, 0);
            if r == hook {
                let bytes = status.to_ne_bytes();
                libc::write(status_fd, bytes.as_ptr().cast(), 4);
                libc::_exit(exit_code(status));
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
    }
}
