//! A blocking client for OCI distribution registries (the `/v2/` API), the credentials and auth
//! flows container tools use, and ed25519 signing of step records.
//!
//! ```text
//! "[http://]HOST[:PORT]/REPO[:TAG]" ──Reference::parse(insecure hosts)──► Registry + repository
//! Registry + ClientOptions ──Client::new──► ureq Agent (timeouts, CA roots) + auth state
//!   request ─► 401 + WWW-Authenticate ─► Basic (credential) | Bearer (token per scope, cached)
//!            ─► retried request ─► 2xx | typed RegistryError
//!   blobs:     HEAD (exists, size) · GET streamed + sha256-checked · POST upload + PUT ?digest=
//!   manifests: PUT (tag or digest) · GET/HEAD (Accept list, digest checked) · DELETE by digest
//!   listings:  tags/list and _catalog, following `Link: <…>; rel="next"`
//! credentials: $DOCKER_CONFIG/config.json (auths, credsStore, credHelpers) ─► auth::Credential
//! sign: NAME:BASE64 key files ─► SigningKey::sign(msg) = "NAME:BASE64SIG" ─► verify(trusted, …)
//! ```
//!
//! # Why ureq and not an OCI client crate
//!
//! strata is synchronous. The maintained OCI client crate (`oci-client`) is async on tokio +
//! reqwest: using it would mean a private runtime in this module, bridging its streams to our
//! `Write`rs and `cancelled?` checks, and it leaves docker config files and credential helpers
//! to the caller anyway. The part of the distribution API strata needs is about ten requests, so
//! this module speaks it directly over `ureq` 3 — a well-kept blocking HTTP client (rustls,
//! connection pooling, redirects, proxies from `HTTPS_PROXY`/`NO_PROXY`) with per-read and
//! connect timeouts and streaming bodies both ways. A [`Client`] is `Send + Sync` (the agent is
//! reference counted; auth state sits behind a mutex), so pushes can run on a background thread.
//!
//! Uploads are monolithic: `POST` opens an upload, one streamed `PUT ?digest=` with a
//! `Content-Length` sends the bytes (constant memory at any size). Chunked `PATCH` uploads would
//! only add a resume point, which registries implement unevenly; a broken upload is retried from
//! its start instead (readers are `Seek`). Retries cover idempotent requests only (and whole
//! uploads); `progress` counts bytes moved, so a retried transfer counts its bytes again.
//!
//! # Trusting a registry's certificate
//!
//! HTTPS is the default. Certificates are checked against the system CA store (read through
//! `rustls-native-certs`: `/etc/ssl/certs/ca-certificates.crt` on Debian, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` when set) plus, for one registry only, every `*.crt` file in
//! `/etc/docker/certs.d/HOST[:PORT]/` or `/etc/containers/certs.d/HOST[:PORT]/`, as docker,
//! podman and skopeo read them. To trust a private CA:
//!
//! ```text
//! # for every program on the host (Debian/Ubuntu): a PEM file whose name ends in .crt
//! cp my-ca.pem /usr/local/share/ca-certificates/my-ca.crt && update-ca-certificates
//! # or for one registry only (the port is part of the folder name when there is one)
//! mkdir -p /etc/docker/certs.d/registry.example:5000
//! cp my-ca.pem /etc/docker/certs.d/registry.example:5000/ca.crt
//! ```
//!
//! A registry without TLS is reached with `http://HOST[:PORT]/REPO` or by naming the host in
//! `--insecure-registry HOST` (a bare host covers every port; `HOST:PORT` only that port).
//!
//! # Credentials
//!
//! As docker, podman and skopeo keep them: `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json` — `credHelpers` for the host, else `credsStore`, else `auths`
//! (`auth` = base64 `user:password`, or `username`/`password`, or `identitytoken`). `docker
//! login HOST` writes them. Without an entry, access is anonymous.
//!
//! # What the registry accepts
//!
//! An OCI image manifest (`application/vnd.oci.image.manifest.v1+json`) whose config has any
//! media type (strata uses its own for the signed step record) and whose layers have any media
//! type (`application/vnd.oci.image.layer.v1.tar+zstd` included) is stored by distribution 2.8
//! as long as every referenced blob was pushed first; its tests here push exactly that.

pub mod auth;
mod client;
pub mod manifest;
pub mod reference;
pub mod sign;
mod tls;

#[cfg(test)]
#[path = "../../tests/support/registry_server.rs"]
mod server;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use auth::{AuthError, Credential};
pub use client::{Client, ClientOptions, Manifest, ManifestInfo, PushedBlob};
pub use reference::{Digest, Reference, ReferenceError, Registry, Scheme};

/// Progress and cancellation for one long operation: `progress` is told how many bytes moved
/// since its last call; `cancelled` is polled between chunks and between retries.
#[derive(Clone, Copy)]
pub struct Transfer<'a> {
    pub progress: &'a dyn Fn(u64),
    pub cancelled: &'a dyn Fn() -> bool,
}

impl Transfer<'static> {
    /// No progress reports, never cancelled.
    pub fn none() -> Transfer<'static> {
        Transfer {
            progress: &|_| {},
            cancelled: &|| false,
        }
    }
}

impl std::fmt::Debug for Transfer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transfer")
    }
}

/// Everything a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "registry {registry} is unreachable: {reason} (is it running? for plain HTTP use http://HOST/… or --insecure-registry HOST)"
    )]
    Unreachable { registry: String, reason: String },
    #[error(
        "registry {registry} refused access to {what}: {detail} (log in with `docker login {registry}` or add credentials to $DOCKER_CONFIG/config.json)"
    )]
    Unauthorized {
        registry: String,
        what: String,
        detail: String,
    },
    #[error("{what} not found on registry {registry}")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} refused {what}: HTTP {status}: {body}")]
    Refused {
        registry: String,
        what: String,
        status: u16,
        /// The error code of the registry's JSON error body, e.g. `MANIFEST_BLOB_UNKNOWN`.
        code: Option<String>,
        /// A short, one-line excerpt of the answer.
        body: String,
    },
    #[error(
        "{what} from registry {registry} does not match its digest: expected {expected}, got {actual} (the data was discarded)"
    )]
    DigestMismatch {
        registry: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} on registry {registry} was cancelled")]
    Cancelled { registry: String, what: String },
    #[error("registry {registry} gave a malformed answer to {what}: {detail}")]
    Protocol {
        registry: String,
        what: String,
        detail: String,
    },
    #[error(
        "TLS with registry {registry} failed: {detail} (trust its CA: see `/etc/docker/certs.d/HOST:PORT/ca.crt` or update-ca-certificates; for plain HTTP use --insecure-registry)"
    )]
    Tls { registry: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] AuthError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

impl RegistryError {
    /// Whether trying the same request again may help: a connection failure, a timeout, or a
    /// 5xx / 408 / 429 answer.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Refused { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }
}

/// Well-known media types.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// What [`crate::registry::Client::get_manifest`] asks for when given no Accept list.
    pub const DEFAULT_ACCEPT: &[&str] = &[
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
    ];
}
