//! Logging set-up: tracing to stderr, filtered by `-v` or `RUST_LOG`, drawn around the live
//! progress display so log lines never tear it.

use indicatif::ProgressBar;
use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use tracing_subscriber::EnvFilter;

/// The progress bar on screen, if any: log lines are written while it is hidden.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Registers (or, with None, forgets) the bar that log output must be drawn around.
pub fn set_progress_bar(bar: Option<ProgressBar>) {
    let mut guard = ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner());
    *guard = bar;
}

/// stderr, suspending the active progress bar around each write.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Installs the global subscriber. `verbose` 0 shows info and up, 1 debug, 2+ trace.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        .with_ansi(io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}
