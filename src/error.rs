//! Exit statuses, and the mapping from an error chain to one of them (the one place that decides).

/// The documented exit statuses of `strata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// A build step (hook) failed, or the build could not finish.
    BuildFailed = 1,
    /// Bad input: arguments, elements, element files, configuration.
    BadInput = 2,
    /// The host lacks something strata needs (a tool, root, a kernel feature).
    Environment = 3,
    /// The cache is unusable (locked too long, corrupt index).
    Cache = 4,
    /// Interrupted by a signal.
    Interrupted = 130,
}

/// An error whose exit status is known where it is raised. Library code returns
/// `anyhow::Error`; wrapping a message in `Failure` (or returning one of the typed errors that
/// `exit_code` knows) picks the status.
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

/// Picks the exit status for an error: the first typed error in the chain decides; anything
/// else is a failed build.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.exit as u8;
        }
        if let Some(e) = cause.downcast_ref::<crate::store::StoreError>() {
            return e.exit() as u8;
        }
        if let Some(crate::sandbox::SandboxError::Interrupted { .. }) = cause.downcast_ref() {
            return Exit::Interrupted as u8;
        }
        if cause
            .downcast_ref::<crate::elements::ElementError>()
            .is_some()
            || cause.is::<crate::elements::packages::PackageError>()
        {
            return Exit::BadInput as u8;
        }
    }
    Exit::BuildFailed as u8
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_skips_causes_already_in_the_message() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(io).context("cannot start hook x: No such file");
        assert_eq!(render(&err), "cannot start hook x: No such file");
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render(&err), "outer: inner");
    }

    #[test]
    fn typed_errors_pick_their_exit_status() {
        let e: anyhow::Error = Failure::bad_input("x").into();
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("plain")), 1);
    }
}
