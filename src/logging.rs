//! Logging set-up: tracing to stderr, filtered by `-v` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

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
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}
