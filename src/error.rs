//! Exit statuses, and the one mapping from every typed error strata raises to one of them.
//!
//! ```text
//! error chain ──► first cause that is a known typed error ──► Exit (exhaustive match per type)
//!             ──► a cancellation anywhere in the chain wins: 130 (SIGINT) / 143 (SIGTERM)
//!             ──► anything else: 1 (the build failed)
//! ```
//!
//! Every error type of the crate is listed in [`exit_of_cause`], and each type's variants are
//! matched without a wildcard, so a new variant does not compile until it has a status; a test
//! ([`tests::every_error_type_has_an_exit_status`]) fails when a new error type is not listed.
//! README's "Exit statuses" table documents the codes.

use crate::audit::AuditError;
use crate::cache::CacheError;
use crate::cancel::Cancelled;
use crate::elements::ElementError;
use crate::elements::packages::PackageError;
use crate::exec::check::Diverged;
use crate::exec::snapshot::RefusedLayer;
use crate::image::ImageError;
use crate::layer::LayerError;
use crate::outputs::oci::OciError;
use crate::registry::RegistryError;
use crate::registry::auth::AuthError;
use crate::registry::reference::ReferenceError;
use crate::registry::sign::SignError;
use crate::sandbox::SandboxError;
use crate::store::StoreError;

pub use crate::exit::{Exit, Failure, render};

fn store_exit(e: &StoreError) -> Exit {
    match e {
        StoreError::BadSize { .. }
        | StoreError::UnknownKey { .. }
        | StoreError::AmbiguousKey { .. }
        | StoreError::BadDigest { .. }
        | StoreError::BadKeyPrefix { .. } => Exit::BadInput,
        StoreError::Io { .. }
        | StoreError::Sqlite { .. }
        | StoreError::DamagedIndex { .. }
        | StoreError::NewerSchema { .. }
        | StoreError::MissingBlob { .. }
        | StoreError::WrongBlobSize { .. }
        | StoreError::MissingLayer { .. }
        | StoreError::LockTimeout { .. } => Exit::Cache,
    }
}

fn sandbox_exit(e: &SandboxError) -> Exit {
    match e {
        SandboxError::Namespace(_) | SandboxError::Mount { .. } => Exit::Environment,
        SandboxError::Io { .. }
        | SandboxError::Unmount { .. }
        | SandboxError::UnsafePath { .. }
        | SandboxError::StillMounted { .. }
        | SandboxError::Spawn { .. } => Exit::BuildFailed,
        SandboxError::Interrupted { .. } => Exit::Interrupted,
    }
}

fn element_exit(e: &ElementError) -> Exit {
    match e {
        ElementError::NotADirectory { .. }
        | ElementError::Io { .. }
        | ElementError::NonUtf8Name { .. }
        | ElementError::AmbiguousName { .. }
        | ElementError::BadListFile { .. }
        | ElementError::NotFound { .. }
        | ElementError::DuplicateProvider { .. }
        | ElementError::ProvidedByOther { .. }
        | ElementError::ProviderUnreachable { .. }
        | ElementError::NoOperatingSystem { .. }
        | ElementError::DuplicateHook { .. }
        | ElementError::DestinationNotEmpty { .. }
        | ElementError::EnvFileFailed { .. }
        | ElementError::Other(_) => Exit::BadInput,
    }
}

fn package_exit(e: &PackageError) -> Exit {
    match e {
        PackageError::Read { .. }
        | PackageError::Write { .. }
        | PackageError::Syntax { .. }
        | PackageError::Format { .. }
        | PackageError::Package { .. }
        | PackageError::WhenUnset { .. }
        | PackageError::Usage(_) => Exit::BadInput,
    }
}

fn layer_exit(e: &LayerError) -> Exit {
    match e {
        LayerError::Read { .. }
        | LayerError::Changed { .. }
        | LayerError::Write(_)
        | LayerError::Apply { .. } => Exit::BuildFailed,
        LayerError::Corrupt(_) | LayerError::Unsafe { .. } | LayerError::DiffIdMismatch { .. } => {
            Exit::Cache
        }
    }
}

fn image_exit(e: &ImageError) -> Exit {
    match e {
        ImageError::Config(_) => Exit::BadInput,
        ImageError::Command { .. } | ImageError::Io { .. } | ImageError::Device(_) => {
            Exit::BuildFailed
        }
        ImageError::Cancelled(_) => Exit::Interrupted,
    }
}

fn cache_exit(e: &CacheError) -> Exit {
    match e {
        CacheError::Store(s) => store_exit(s),
        CacheError::ReadOnly { .. } => Exit::BuildFailed,
        CacheError::NoBlob { .. } | CacheError::Mismatch { .. } | CacheError::Other { .. } => {
            Exit::Cache
        }
        CacheError::Remote { source, .. } => registry_exit(source),
    }
}

fn audit_exit(e: &AuditError) -> Exit {
    match e {
        AuditError::Cancelled => Exit::Interrupted,
        AuditError::NotFound { .. } => Exit::BadInput,
        AuditError::Read { .. }
        | AuditError::Unsorted { .. }
        | AuditError::Format { .. }
        | AuditError::Write { .. }
        | AuditError::Diffoscope { .. } => Exit::BuildFailed,
    }
}

fn oci_exit(e: &OciError) -> Exit {
    match e {
        OciError::Cancelled => Exit::Interrupted,
        OciError::Arch(_) | OciError::Tag(_) => Exit::BadInput,
        OciError::Layer(l) => layer_exit(l),
        OciError::Write { .. } | OciError::Read { .. } | OciError::Invalid { .. } => {
            Exit::BuildFailed
        }
    }
}

fn reference_exit(e: &ReferenceError) -> Exit {
    match e {
        ReferenceError::Reference { .. }
        | ReferenceError::Repository { .. }
        | ReferenceError::Tag { .. }
        | ReferenceError::Digest { .. } => Exit::BadInput,
    }
}

fn auth_exit(e: &AuthError) -> Exit {
    match e {
        AuthError::ConfigRead { .. }
        | AuthError::ConfigParse { .. }
        | AuthError::BadAuthField { .. } => Exit::BadInput,
        AuthError::HelperMissing { .. } => Exit::Environment,
        AuthError::HelperFailed { .. } => Exit::Remote,
    }
}

fn registry_exit(e: &RegistryError) -> Exit {
    match e {
        RegistryError::Cancelled { .. } => Exit::Interrupted,
        RegistryError::Credentials(a) => auth_exit(a),
        RegistryError::Reference(r) => reference_exit(r),
        RegistryError::Unreachable { .. }
        | RegistryError::Unauthorized { .. }
        | RegistryError::NotFound { .. }
        | RegistryError::Refused { .. }
        | RegistryError::DigestMismatch { .. }
        | RegistryError::Protocol { .. }
        | RegistryError::Tls { .. }
        | RegistryError::Io { .. }
        | RegistryError::Write { .. } => Exit::Remote,
    }
}

fn sign_exit(e: &SignError) -> Exit {
    match e {
        SignError::Io { .. } => Exit::Environment,
        SignError::Exists { .. }
        | SignError::BadName { .. }
        | SignError::Malformed { .. }
        | SignError::UnknownKey { .. }
        | SignError::BadSignature { .. } => Exit::BadInput,
    }
}

/// The status of one cause, if it is one of strata's typed errors.
fn exit_of_cause(cause: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    if let Some(e) = cause.downcast_ref::<Failure>() {
        return Some(e.exit);
    }
    if let Some(e) = cause.downcast_ref::<Cancelled>() {
        return Some(if e.signal == libc::SIGTERM {
            Exit::Terminated
        } else {
            Exit::Interrupted
        });
    }
    if let Some(e) = cause.downcast_ref::<StoreError>() {
        return Some(store_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<CacheError>() {
        return Some(cache_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<SandboxError>() {
        return Some(sandbox_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<ElementError>() {
        return Some(element_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<PackageError>() {
        return Some(package_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<LayerError>() {
        return Some(layer_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<ImageError>() {
        return Some(image_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<AuditError>() {
        return Some(audit_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<OciError>() {
        return Some(oci_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<RegistryError>() {
        return Some(registry_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<ReferenceError>() {
        return Some(reference_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<AuthError>() {
        return Some(auth_exit(e));
    }
    if let Some(e) = cause.downcast_ref::<SignError>() {
        return Some(sign_exit(e));
    }
    if cause.is::<Diverged>() {
        return Some(Exit::Divergent);
    }
    if cause.is::<RefusedLayer>() {
        // Only seen when a cache keeps refusing layers after strata dropped them (see build).
        return Some(Exit::Cache);
    }
    None
}

/// The names of the error types [`exit_of_cause`] maps (kept beside it for the test below).
#[cfg(test)]
const MAPPED: &[&str] = &[
    "Failure",
    "Cancelled",
    "StoreError",
    "CacheError",
    "SandboxError",
    "ElementError",
    "PackageError",
    "LayerError",
    "ImageError",
    "RefusedLayer",
    "OciError",
    "AuditError",
    "Diverged",
    "RegistryError",
    "ReferenceError",
    "AuthError",
    "SignError",
];

/// Picks the exit status for an error: a cancellation (in the chain, or a signal that arrived)
/// wins; otherwise the first typed error in the chain decides; anything else is a failed build.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // Whatever failed after SIGINT/SIGTERM arrived failed because of it.
    if let Some(c) = crate::cancel::find(err).or_else(crate::cancel::requested) {
        return c.exit_status();
    }
    err.chain()
        .find_map(exit_of_cause)
        .unwrap_or(Exit::BuildFailed) as u8
}

/// True when the error (or its cause) is a closed pipe on stdout: a reader such as `head`
/// went away, which is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
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
        let ns: anyhow::Error = SandboxError::Namespace(nix::Error::EPERM).into();
        assert_eq!(exit_code(&ns), Exit::Environment as u8);
        let term: anyhow::Error = anyhow::Error::new(Cancelled {
            signal: libc::SIGTERM,
        })
        .context("writing the qcow2");
        assert_eq!(exit_code(&term), 143);
        let int = anyhow::Error::new(std::io::Error::other(Cancelled {
            signal: libc::SIGINT,
        }));
        assert_eq!(exit_code(&int), 130);
    }

    /// Every `thiserror` type in `src/` must be one `exit_of_cause` maps.
    #[test]
    fn every_error_type_has_an_exit_status() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut missing = Vec::new();
        for entry in walkdir::WalkDir::new(&src) {
            let entry = entry.unwrap();
            if entry.path().extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let line = line.trim_start();
                if !(line.starts_with("#[derive(") && line.contains("thiserror::Error")) {
                    continue;
                }
                // The type is declared on one of the next few lines (after attributes).
                let name = lines[i + 1..]
                    .iter()
                    .take(8)
                    .find_map(|l| {
                        let l = l.trim_start().trim_start_matches("pub ");
                        let l = l.trim_start_matches("pub(crate) ");
                        l.strip_prefix("enum ")
                            .or_else(|| l.strip_prefix("struct "))
                            .map(|rest| {
                                rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                                    .next()
                                    .unwrap_or_default()
                                    .to_string()
                            })
                    })
                    .unwrap_or_default();
                if !MAPPED.contains(&name.as_str()) {
                    missing.push(format!("{} ({})", name, entry.path().display()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "error types without an exit status in error::exit_of_cause: {missing:?}"
        );
    }
}
