//! Cancellation: SIGINT and SIGTERM set one process-wide flag that every long stretch of work
//! polls (hooks, restore, pack, outputs, the disk step, qemu-img, checksums, pushes).
//!
//! ```text
//! install_handlers()  SIGINT/SIGTERM ──► flag = signal number (a second one: _exit(128+sig))
//! long loops          cancel::check()? every few MB / between steps ──► Err(Cancelled)
//! main                Cancelled ──► exit 130 (SIGINT) or 143 (SIGTERM), after cleaning up
//! ```
//!
//! The handler only stores an atomic; everything else (unmounting, removing temp files) happens
//! on the normal error path, so a cancelled build cleans up like a failed one and never exits 0.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked us to stop (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static HANDLERS: std::sync::Once = std::sync::Once::new();

/// The build was cancelled by a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled by {}", signal_name(*.signal))]
pub struct Cancelled {
    pub signal: i32,
}

impl Cancelled {
    /// The conventional exit status for it: 128 + the signal number (130 for SIGINT, 143 for
    /// SIGTERM).
    pub fn exit_status(self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(130)
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // Second signal: leave now; PDEATHSIG and the private namespace take the hooks and
        // mounts down with us.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the SIGINT/SIGTERM handlers (once per process).
pub fn install_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    HANDLERS.call_once(|| {
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only touches an atomic and calls _exit.
            if let Err(e) = unsafe { sigaction(sig, &action) } {
                tracing::warn!("cannot install a handler for {sig}: {e}");
            }
        }
    });
}

/// While alive, SIGINT and SIGQUIT are ignored by strata (they are for the interactive shell
/// or command strata waits for, as `system()` does); dropped, strata's handlers are back.
/// SIGTERM still cancels.
pub struct Interactive(());

/// See [`Interactive`].
pub fn interactive() -> Interactive {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: installing SIG_IGN has no handler code to be unsafe in.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    Interactive(())
}

impl Drop for Interactive {
    fn drop(&mut self) {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler only touches an atomic and calls _exit.
        let _ = unsafe { sigaction(Signal::SIGINT, &action) };
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: restoring the default disposition.
        let _ = unsafe { sigaction(Signal::SIGQUIT, &default) };
    }
}

/// The cancellation, if a signal arrived.
pub fn requested() -> Option<Cancelled> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(Cancelled { signal }),
    }
}

/// `Err(Cancelled)` once a signal arrived.
pub fn check() -> Result<(), Cancelled> {
    requested().map_or(Ok(()), Err)
}

/// As an `io::Error` (for loops that return io results); [`find`] recognises it again.
pub fn check_io() -> std::io::Result<()> {
    check().map_err(std::io::Error::other)
}

/// The cancellation in an error chain, if any (also inside an `io::Error`).
pub fn find(err: &anyhow::Error) -> Option<Cancelled> {
    err.chain().find_map(|cause| {
        cause.downcast_ref::<Cancelled>().copied().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Cancelled>())
                .copied()
        })
    })
}

/// For tests: pretend `signal` arrived (0 clears it).
#[doc(hidden)]
pub fn set_for_test(signal: i32) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_follows_the_signal() {
        assert_eq!(
            Cancelled {
                signal: libc::SIGINT
            }
            .exit_status(),
            130
        );
        assert_eq!(
            Cancelled {
                signal: libc::SIGTERM
            }
            .exit_status(),
            143
        );
    }

    #[test]
    fn a_cancellation_is_found_inside_io_errors_and_contexts() {
        let c = Cancelled {
            signal: libc::SIGTERM,
        };
        let err = anyhow::Error::new(std::io::Error::other(c)).context("writing the tar");
        assert_eq!(find(&err), Some(c));
        assert_eq!(find(&anyhow::anyhow!("plain")), None);
    }
}
