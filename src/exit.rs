//! The documented exit statuses, and `Failure`: an error whose status is known where it is
//! raised. A leaf module: every layer may raise a `Failure`; only the `error` module maps errors
//! to statuses.

/// The documented exit statuses of `strata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success. (`strata diff`: the builds match.)
    Ok = 0,
    /// A build step (hook) failed, or the build could not finish. (`strata diff`: the builds
    /// differ.)
    BuildFailed = 1,
    /// Bad input: arguments, elements, element files, configuration. (`strata diff`: any
    /// trouble.)
    BadInput = 2,
    /// The host lacks something strata needs (a tool, root, a kernel feature).
    Environment = 3,
    /// The cache is unusable (locked too long, damaged index).
    Cache = 4,
    /// `strata build --check`: a rebuilt step gave another layer than the cached one.
    Divergent = 5,
    /// A registry could not be used by a command that needs it (`strata cache push/pull`).
    Remote = 6,
    /// Interrupted by SIGINT (Ctrl-C).
    Interrupted = 130,
    /// Stopped by SIGTERM.
    Terminated = 143,
}

/// An error whose exit status is known where it is raised. Library code returns
/// `anyhow::Error`; wrapping a message in `Failure` (or returning one of the typed errors that
/// [`exit_code`] maps) picks the status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }

    pub fn bad_input(message: impl Into<String>) -> Self {
        Failure::new(Exit::BadInput, message)
    }
}

/// The error chain as one message: each cause appended with ": ", unless the text so far already
/// says it (many errors put their source in their own message).
pub fn render(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
