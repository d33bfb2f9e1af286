//! The blocking registry client: one [`Client`] per registry endpoint, speaking the distribution
//! `/v2/` API over a ureq agent, with auth, retries, streaming and digest checks.
//!
//! ```text
//! op (pull_blob, put_manifest, …) ─► retrying(attempt) ─► send(call, body)
//!   send: Authorization from AuthState (Basic, or Bearer token cached per scope)
//!         ─► ureq ─► 401? learn the challenge (drop a rejected token) and send once more
//!   ─► expect(status) ─► typed RegistryError (NotFound, Unauthorized, Refused{status, code})
//! retrying: Unreachable / 5xx / 408 / 429 ─► backoff (polls cancelled) ─► again, a few times
//! ```

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use ureq::http::{self, HeaderMap, Method, Response, StatusCode};
use url::Url;

use super::auth::{self, Credential, DockerConfig, TokenAnswer, one_line};
use super::reference::{validate_repository, validate_tag};
use super::{Digest, Registry, RegistryError, Transfer, media_types, tls};

/// Largest manifest read (distribution refuses larger ones too).
const MAX_MANIFEST: u64 = 4 << 20;
/// Largest error body, token answer or listing page read.
const MAX_SMALL_BODY: u64 = 4 << 20;
/// How much of an error body is kept in a message.
const ERROR_EXCERPT: usize = 300;
/// Streaming buffer.
const CHUNK: usize = 256 << 10;
/// Longest backoff between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// A bearer token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// Most pages a listing follows.
const MAX_PAGES: usize = 10_000;

/// How a [`Client`] connects and authenticates.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit for opening a connection (TCP and TLS handshake).
    pub connect_timeout: Duration,
    /// Limit for each read and write once connected: a registry silent this long is unreachable.
    pub read_timeout: Duration,
    /// How many times a failed idempotent request is tried again (connection errors, timeouts,
    /// 5xx, 408, 429), with exponential backoff from `retry_delay`.
    pub retries: u32,
    pub retry_delay: Duration,
    /// A PEM file of extra CA certificates to trust (on top of the system store and certs.d).
    pub extra_ca_file: Option<PathBuf>,
    /// Folders holding `HOST[:PORT]/*.crt` CA files, as docker and podman read them.
    pub certs_dirs: Vec<PathBuf>,
    /// The folder holding `config.json` (default: `$DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
    /// PATH used to find `docker-credential-*` helpers (default: the process's PATH).
    pub helper_path: Option<OsString>,
    /// A credential to use instead of reading docker's configuration.
    pub credential: Option<Credential>,
    /// Whether to use a proxy named by `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` (honouring
    /// `NO_PROXY`), as curl and docker do.
    pub proxy_from_env: bool,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            retries: 3,
            retry_delay: Duration::from_millis(250),
            extra_ca_file: None,
            certs_dirs: vec![
                PathBuf::from("/etc/docker/certs.d"),
                PathBuf::from("/etc/containers/certs.d"),
            ],
            docker_config_dir: None,
            helper_path: None,
            credential: None,
            proxy_from_env: true,
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A blob after [`Client::push_blob`]: `uploaded` is false when the registry already had it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedBlob {
    pub digest: Digest,
    pub size: u64,
    pub uploaded: bool,
}

/// A fetched manifest: its exact bytes, media type and (checked) digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// What a `HEAD` on a manifest tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    /// The registry's `Docker-Content-Digest`, when it sent one.
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A blocking client for one registry endpoint. `Send + Sync`; cheap to share behind an `Arc`.
pub struct Client {
    registry: Registry,
    base: Url,
    agent: ureq::Agent,
    options: ClientOptions,
    /// `Some(c)` once the credential was looked up (`c` is `None` for anonymous).
    credential: Mutex<Option<Option<Credential>>>,
    auth: Mutex<AuthState>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct AuthState {
    scheme: AuthScheme,
    /// Bearer tokens by scope (`""` for none).
    tokens: HashMap<String, CachedToken>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum AuthScheme {
    /// No challenge seen yet: requests go out anonymously.
    #[default]
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: String,
    renew_at: Instant,
}

/// One request, before auth.
struct Call<'a> {
    method: Method,
    url: String,
    headers: Vec<(&'static str, String)>,
    /// The token scope it needs, e.g. `repository:a/b:pull`.
    scope: Option<String>,
    what: &'a str,
}

enum Body<'a> {
    /// No body at all (GET, HEAD, DELETE).
    None,
    /// A byte body (an empty one is sent as `Content-Length: 0`).
    Bytes(&'a [u8]),
    /// A streamed body of known length; it can only be sent once.
    Stream(&'a mut dyn Read, u64),
}

/// A failed attempt, and whether another may succeed.
struct Failure {
    error: RegistryError,
    retry: bool,
}

impl From<RegistryError> for Failure {
    fn from(error: RegistryError) -> Self {
        let retry = error.is_transient();
        Failure { error, retry }
    }
}

fn pull_scope(repo: &str) -> Option<String> {
    Some(format!("repository:{repo}:pull"))
}

fn push_scope(repo: &str) -> Option<String> {
    Some(format!("repository:{repo}:pull,push"))
}

fn delete_scope(repo: &str) -> Option<String> {
    Some(format!("repository:{repo}:delete"))
}

impl Client {
    /// A client for `registry`. Reads the CA roots now; credentials are looked up the first
    /// time the registry asks for them.
    pub fn new(registry: &Registry, options: ClientOptions) -> Result<Client, RegistryError> {
        let base = Url::parse(&registry.base_url()).map_err(|e| RegistryError::Protocol {
            registry: registry.to_string(),
            what: "its address".to_string(),
            detail: e.to_string(),
        })?;
        let roots = tls::roots(
            registry,
            &options.certs_dirs,
            options.extra_ca_file.as_deref(),
        )?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::from(roots))
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(options.connect_timeout))
            .timeout_per_read(Some(options.read_timeout))
            .timeout_per_write(Some(options.read_timeout))
            .user_agent(options.user_agent.as_str())
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .max_redirects(5)
            .proxy(if options.proxy_from_env {
                ureq::Proxy::try_from_env()
            } else {
                None
            })
            .tls_config(tls)
            .build();
        Ok(Client {
            registry: registry.clone(),
            base,
            agent: ureq::Agent::new_with_config(config),
            options,
            credential: Mutex::new(None),
            auth: Mutex::new(AuthState::default()),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `GET /v2/`: the registry answers and accepts our credentials (anonymous when there are
    /// none). For a token registry this fetches a token without a scope, as `docker login` does.
    pub fn ping(&self) -> Result<(), RegistryError> {
        let what = "the API check (GET /v2/)";
        self.retrying(what, &Transfer::none(), || {
            let call = self.call(Method::GET, "/v2/".to_string(), None, what);
            let resp = self.send(&call, Body::None)?;
            self.expect(resp, &[StatusCode::OK], what)?;
            Ok(())
        })
    }

    /// `HEAD` on a blob: its size when the repository has it, `None` when not.
    pub fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        validate_repository(repo)?;
        let what = format!("blob {digest} in {repo}");
        self.retrying(&what, &Transfer::none(), || {
            let call = self.call(
                Method::HEAD,
                format!("/v2/{repo}/blobs/{digest}"),
                pull_scope(repo),
                &what,
            );
            let resp = self.send(&call, Body::None)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let resp = self.expect(resp, &[StatusCode::OK], &what)?;
            Ok(Some(content_length(resp.headers()).unwrap_or(0)))
        })
    }

    /// Streams a blob into `out`, checking its sha256 as it goes. On a digest mismatch (or any
    /// error) `out` may hold part or all of the bytes and must be discarded: the error is the
    /// only verdict. A failure before the first byte is retried; one after it is not (use
    /// [`Client::pull_blob_to_file`] for that). Returns the size.
    pub fn pull_blob(
        &self,
        repo: &str,
        digest: &Digest,
        out: &mut dyn Write,
        transfer: &Transfer,
    ) -> Result<u64, RegistryError> {
        validate_repository(repo)?;
        let what = format!("blob {digest} in {repo}");
        self.retrying(&what, transfer, || {
            let mut wrote = false;
            self.pull_attempt(repo, digest, &mut *out, transfer, &what, &mut wrote)
                .map_err(|error| {
                    let retry = !wrote && error.is_transient();
                    Failure { error, retry }
                })
        })
    }

    /// Pulls a blob into `path` through a temp file beside it, renamed into place only once the
    /// sha256 matched (retrying from the start after a broken connection). Returns the size.
    pub fn pull_blob_to_file(
        &self,
        repo: &str,
        digest: &Digest,
        path: &Path,
        transfer: &Transfer,
    ) -> Result<u64, RegistryError> {
        validate_repository(repo)?;
        let what = format!("blob {digest} in {repo}");
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let io = |source: std::io::Error| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".strata-pull-")
            .tempfile_in(dir)
            .map_err(io)?;
        let size = self.retrying(&what, transfer, || {
            let file = tmp.as_file_mut();
            file.set_len(0).map_err(io)?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            let mut out = std::io::BufWriter::with_capacity(CHUNK, &mut *file);
            let mut wrote = false;
            let size = self.pull_attempt(repo, digest, &mut out, transfer, &what, &mut wrote)?;
            out.flush().map_err(io)?;
            Ok(size)
        })?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(size)
    }

    fn pull_attempt(
        &self,
        repo: &str,
        digest: &Digest,
        out: &mut dyn Write,
        transfer: &Transfer,
        what: &str,
        wrote: &mut bool,
    ) -> Result<u64, RegistryError> {
        let call = self.call(
            Method::GET,
            format!("/v2/{repo}/blobs/{digest}"),
            pull_scope(repo),
            what,
        );
        let resp = self.send(&call, Body::None)?;
        let resp = self.expect(resp, &[StatusCode::OK], what)?;
        let mut reader = resp.into_body().into_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            if (transfer.cancelled)() {
                return Err(self.cancelled(what));
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|source| RegistryError::Write {
                    what: what.to_string(),
                    source,
                })?;
            *wrote = true;
            total += n as u64;
            (transfer.progress)(n as u64);
        }
        let actual = Digest::from_sha256(hasher.finalize().into());
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry.to_string(),
                what: what.to_string(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(total)
    }

    /// Pushes `bytes` as a blob (skipped when the registry has it).
    pub fn push_blob_bytes(&self, repo: &str, bytes: &[u8]) -> Result<PushedBlob, RegistryError> {
        let digest = Digest::of(bytes);
        self.push_blob(
            repo,
            &digest,
            bytes.len() as u64,
            std::io::Cursor::new(bytes),
            &Transfer::none(),
        )
    }

    /// Pushes a file as a blob (skipped when the registry has it). `digest` is computed from the
    /// file when not given; the registry checks it either way.
    pub fn push_blob_file(
        &self,
        repo: &str,
        path: &Path,
        digest: Option<&Digest>,
        transfer: &Transfer,
    ) -> Result<PushedBlob, RegistryError> {
        let io = |source: std::io::Error| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let digest = match digest {
            Some(d) => d.clone(),
            None => {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; CHUNK];
                loop {
                    if (transfer.cancelled)() {
                        return Err(self.cancelled(&format!("hashing {}", path.display())));
                    }
                    let n = file.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                Digest::from_sha256(hasher.finalize().into())
            }
        };
        self.push_blob(repo, &digest, size, file, transfer)
    }

    /// Pushes `size` bytes from `reader` (rewound for each attempt) as the blob `digest`,
    /// unless the repository already has it: a `POST` opens an upload, one `PUT ?digest=` sends
    /// the bytes (a monolithic upload; the registry checks the digest and refuses a mismatch).
    pub fn push_blob<R: Read + Seek>(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        mut reader: R,
        transfer: &Transfer,
    ) -> Result<PushedBlob, RegistryError> {
        validate_repository(repo)?;
        if let Some(existing) = self.blob_exists(repo, digest)? {
            return Ok(PushedBlob {
                digest: digest.clone(),
                size: existing,
                uploaded: false,
            });
        }
        let what = format!("upload of blob {digest} to {repo}");
        self.retrying(&what, transfer, || {
            self.push_attempt(repo, digest, size, &mut reader, transfer, &what)
        })?;
        Ok(PushedBlob {
            digest: digest.clone(),
            size,
            uploaded: true,
        })
    }

    fn push_attempt(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        reader: &mut dyn ReadSeek,
        transfer: &Transfer,
        what: &str,
    ) -> Result<(), Failure> {
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| self.write_side(what, e))?;
        let start = self.call(
            Method::POST,
            format!("/v2/{repo}/blobs/uploads/"),
            push_scope(repo),
            what,
        );
        let resp = self.send(&start, Body::Bytes(&[]))?;
        let resp = self.expect(resp, &[StatusCode::ACCEPTED], what)?;
        let location = self.location(resp.headers(), what)?;
        let mut url = location;
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let mut counted = TransferReader {
            inner: reader.take(size),
            transfer,
            cancelled: false,
            error: None,
        };
        let put = Call {
            method: Method::PUT,
            url: url.to_string(),
            headers: vec![("content-type", "application/octet-stream".to_string())],
            scope: push_scope(repo),
            what,
        };
        let sent = self.send(&put, Body::Stream(&mut counted, size));
        if counted.cancelled {
            self.abandon_upload(&url, repo);
            return Err(self.cancelled(what).into());
        }
        if let Some(e) = counted.error.take() {
            self.abandon_upload(&url, repo);
            return Err(Failure {
                error: self.write_side(what, e),
                retry: false,
            });
        }
        let resp = sent?;
        let resp = match self.expect(resp, &[StatusCode::CREATED], what) {
            Err(RegistryError::Refused {
                code: Some(code), ..
            }) if code == "DIGEST_INVALID" => {
                return Err(RegistryError::DigestMismatch {
                    registry: self.registry.to_string(),
                    what: what.to_string(),
                    expected: digest.to_string(),
                    actual: "other bytes (the registry refused the digest)".to_string(),
                }
                .into());
            }
            other => other?,
        };
        if let Some(d) = header_digest(resp.headers())
            && &d != digest
        {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry.to_string(),
                what: what.to_string(),
                expected: digest.to_string(),
                actual: d.to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// Best-effort `DELETE` of an abandoned upload session (the registry purges them anyway).
    fn abandon_upload(&self, url: &Url, repo: &str) {
        let call = Call {
            method: Method::DELETE,
            url: url.to_string(),
            headers: Vec::new(),
            scope: push_scope(repo),
            what: "abandoning an upload",
        };
        if let Err(e) = self.send(&call, Body::None) {
            tracing::debug!("{e}");
        }
    }

    /// `PUT` a manifest under `reference` (a tag, or the digest of `bytes`) with `media_type`.
    /// Returns its digest (the sha256 of `bytes`, checked against the registry's answer).
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        validate_repository(repo)?;
        let digest = Digest::of(bytes);
        if let Some(named) = manifest_reference(reference)?
            && named != digest
        {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry.to_string(),
                what: format!("manifest pushed as {repo}@{named}"),
                expected: named.to_string(),
                actual: digest.to_string(),
            });
        }
        let what = format!("manifest {repo}:{reference}");
        self.retrying(&what, &Transfer::none(), || {
            let call = Call {
                method: Method::PUT,
                url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
                headers: vec![("content-type", media_type.to_string())],
                scope: push_scope(repo),
                what: &what,
            };
            let resp = self.send(&call, Body::Bytes(bytes))?;
            let resp = self.expect(resp, &[StatusCode::CREATED, StatusCode::OK], &what)?;
            if let Some(d) = header_digest(resp.headers())
                && d != digest
            {
                return Err(Failure::from(RegistryError::DigestMismatch {
                    registry: self.registry.to_string(),
                    what: what.clone(),
                    expected: digest.to_string(),
                    actual: d.to_string(),
                }));
            }
            Ok(())
        })?;
        Ok(digest)
    }

    /// `GET` a manifest by tag or digest, accepting `accept` media types (empty: OCI and
    /// docker manifests and indexes). Its digest is the sha256 of the bytes; fetched by digest,
    /// or when the registry names a digest, a mismatch is an error.
    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<Manifest, RegistryError> {
        validate_repository(repo)?;
        let named = manifest_reference(reference)?;
        let what = format!("manifest {repo}:{reference}");
        let accept = accept_header(accept);
        self.retrying(&what, &Transfer::none(), || {
            let call = Call {
                method: Method::GET,
                url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
                headers: vec![("accept", accept.clone())],
                scope: pull_scope(repo),
                what: &what,
            };
            let resp = self.send(&call, Body::None)?;
            let mut resp = self.expect(resp, &[StatusCode::OK], &what)?;
            let claimed = header_digest(resp.headers());
            let header_type = content_type(resp.headers());
            let bytes = self.read_limited(&mut resp, MAX_MANIFEST, &what)?;
            let digest = Digest::of(&bytes);
            for expected in named.iter().chain(claimed.iter()) {
                if expected != &digest {
                    return Err(Failure::from(RegistryError::DigestMismatch {
                        registry: self.registry.to_string(),
                        what: what.clone(),
                        expected: expected.to_string(),
                        actual: digest.to_string(),
                    }));
                }
            }
            let media_type = header_type
                .filter(|t| !t.is_empty() && t != "application/octet-stream")
                .or_else(|| {
                    serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                })
                .unwrap_or_default();
            Ok(Manifest {
                bytes,
                media_type,
                digest,
            })
        })
    }

    /// `HEAD` a manifest: what the registry says of it, or `None` when it has no such tag or
    /// digest.
    pub fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<Option<ManifestInfo>, RegistryError> {
        validate_repository(repo)?;
        manifest_reference(reference)?;
        let what = format!("manifest {repo}:{reference}");
        let accept = accept_header(accept);
        self.retrying(&what, &Transfer::none(), || {
            let call = Call {
                method: Method::HEAD,
                url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
                headers: vec![("accept", accept.clone())],
                scope: pull_scope(repo),
                what: &what,
            };
            let resp = self.send(&call, Body::None)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let resp = self.expect(resp, &[StatusCode::OK], &what)?;
            Ok(Some(ManifestInfo {
                digest: header_digest(resp.headers()),
                media_type: content_type(resp.headers()),
                size: content_length(resp.headers()),
            }))
        })
    }

    /// `DELETE` a manifest by digest (its tags go with it; blobs stay until the registry's
    /// garbage collection).
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<(), RegistryError> {
        validate_repository(repo)?;
        let what = format!("manifest {repo}@{digest}");
        self.retrying(&what, &Transfer::none(), || {
            let call = self.call(
                Method::DELETE,
                format!("/v2/{repo}/manifests/{digest}"),
                delete_scope(repo),
                &what,
            );
            let resp = self.send(&call, Body::None)?;
            self.expect(resp, &[StatusCode::ACCEPTED, StatusCode::OK], &what)?;
            Ok(())
        })
    }

    /// Every tag of `repo`, following `Link` pages of `page_size` (`None`: the registry's
    /// default). A repository the registry does not know is `NotFound`.
    pub fn list_tags(
        &self,
        repo: &str,
        page_size: Option<u32>,
    ) -> Result<Vec<String>, RegistryError> {
        validate_repository(repo)?;
        let mut path = format!("/v2/{repo}/tags/list");
        if let Some(n) = page_size {
            path.push_str(&format!("?n={n}"));
        }
        self.paged(&path, pull_scope(repo), &format!("tags of {repo}"), "tags")
    }

    /// Every repository the registry lists in `/v2/_catalog`, following `Link` pages.
    pub fn catalog(&self, page_size: Option<u32>) -> Result<Vec<String>, RegistryError> {
        let mut path = "/v2/_catalog".to_string();
        if let Some(n) = page_size {
            path.push_str(&format!("?n={n}"));
        }
        self.paged(
            &path,
            Some("registry:catalog:*".to_string()),
            "the repository catalog",
            "repositories",
        )
    }

    fn paged(
        &self,
        first: &str,
        scope: Option<String>,
        what: &str,
        field: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let mut out = Vec::new();
        let mut next = Some(self.url(first));
        let mut seen = std::collections::HashSet::new();
        while let Some(url) = next.take() {
            if !seen.insert(url.clone()) || seen.len() > MAX_PAGES {
                return Err(self.protocol(what, "the Link pages loop"));
            }
            let (items, link) = self.retrying(what, &Transfer::none(), || {
                let call = Call {
                    method: Method::GET,
                    url: url.clone(),
                    headers: vec![("accept", "application/json".to_string())],
                    scope: scope.clone(),
                    what,
                };
                let resp = self.send(&call, Body::None)?;
                let mut resp = self.expect(resp, &[StatusCode::OK], what)?;
                let link = resp
                    .headers()
                    .get_all(http::header::LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(next_link);
                let bytes = self.read_limited(&mut resp, MAX_SMALL_BODY, what)?;
                let value: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| self.protocol(what, &format!("not JSON: {e}")))?;
                let items: Vec<String> = match value.get(field) {
                    None | Some(serde_json::Value::Null) => Vec::new(),
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|e| self.protocol(what, &format!("`{field}`: {e}")))?,
                };
                Ok((items, link))
            })?;
            out.extend(items);
            if let Some(link) = link {
                let joined = Url::parse(&url)
                    .and_then(|u| u.join(&link))
                    .map_err(|e| self.protocol(what, &format!("Link `{link}`: {e}")))?;
                next = Some(joined.to_string());
            }
        }
        Ok(out)
    }

    // ---- plumbing -------------------------------------------------------------------------

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.registry.base_url(), path)
    }

    fn call<'a>(
        &self,
        method: Method,
        path: String,
        scope: Option<String>,
        what: &'a str,
    ) -> Call<'a> {
        Call {
            method,
            url: self.url(&path),
            headers: Vec::new(),
            scope,
            what,
        }
    }

    fn cancelled(&self, what: &str) -> RegistryError {
        RegistryError::Cancelled {
            registry: self.registry.to_string(),
            what: what.to_string(),
        }
    }

    fn protocol(&self, what: &str, detail: &str) -> RegistryError {
        RegistryError::Protocol {
            registry: self.registry.to_string(),
            what: what.to_string(),
            detail: detail.to_string(),
        }
    }

    /// An error reading the caller's data (not the network).
    fn write_side(&self, what: &str, source: std::io::Error) -> RegistryError {
        RegistryError::Write {
            what: format!("{what} (reading the data to send)"),
            source,
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent; sleeps
    /// with exponential backoff between attempts and polls `cancelled`.
    fn retrying<T>(
        &self,
        what: &str,
        transfer: &Transfer,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        let mut tries = 0u32;
        loop {
            if (transfer.cancelled)() {
                return Err(self.cancelled(what));
            }
            match attempt() {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && tries < self.options.retries => {
                    let delay = self
                        .options
                        .retry_delay
                        .saturating_mul(1u32 << tries.min(16))
                        .min(MAX_BACKOFF);
                    tracing::debug!("retrying in {delay:?}: {}", f.error);
                    tries += 1;
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if (transfer.cancelled)() {
                            return Err(f.error);
                        }
                        std::thread::sleep(Duration::from_millis(20).min(delay));
                    }
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// Sends `call` with the current authorization; on a 401, learns the challenge and sends
    /// once more (a streamed body can only go once, so it is sent after auth is settled by
    /// an earlier request).
    fn send(&self, call: &Call, mut body: Body) -> Result<Response<ureq::Body>, RegistryError> {
        let mut challenged = false;
        loop {
            let authorization = self.authorization(call.scope.as_deref(), call.what)?;
            let resp = self.raw(call, authorization.as_deref(), &mut body)?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenges: Vec<auth::Challenge> = resp
                .headers()
                .get_all(http::header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(auth::parse_challenges)
                .collect();
            let detail = challenge_detail(&challenges, resp);
            if challenged || matches!(body, Body::Stream(..)) {
                return Err(self.unauthorized(call.what, &detail));
            }
            challenged = true;
            self.learn(&challenges, call, authorization.is_some(), &detail)?;
        }
    }

    fn unauthorized(&self, what: &str, detail: &str) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.to_string(),
            what: what.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Updates the auth state from a 401's challenges.
    fn learn(
        &self,
        challenges: &[auth::Challenge],
        call: &Call,
        sent_auth: bool,
        detail: &str,
    ) -> Result<(), RegistryError> {
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let basic = challenges.iter().any(|c| c.scheme == "basic");
        let mut state = self.lock_auth();
        if let Some(b) = bearer {
            let Some(realm) = b.param("realm").filter(|r| !r.is_empty()) else {
                return Err(self.protocol(call.what, "a Bearer challenge without a realm"));
            };
            state.scheme = AuthScheme::Bearer {
                realm: realm.to_string(),
                service: b.param("service").map(str::to_string),
            };
            if sent_auth {
                // The token we sent was refused (expired, revoked, too narrow): get a new one.
                state.tokens.remove(call.scope.as_deref().unwrap_or(""));
            }
            return Ok(());
        }
        if basic {
            drop(state);
            if sent_auth || self.credential()?.is_none() {
                return Err(self.unauthorized(
                    call.what,
                    &format!("{detail}; it wants a user name and password"),
                ));
            }
            self.lock_auth().scheme = AuthScheme::Basic;
            return Ok(());
        }
        Err(self.unauthorized(call.what, detail))
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // The state is a cache: a panic elsewhere cannot leave it inconsistent.
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credential from the options or docker's configuration, looked up once.
    fn credential(&self) -> Result<Option<Credential>, RegistryError> {
        if let Some(c) = &self.options.credential {
            return Ok(Some(c.clone()));
        }
        let mut slot = self.credential.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = DockerConfig::load(
            self.options.docker_config_dir.as_deref(),
            self.options.helper_path.clone(),
        )?;
        let c = config.credential(&self.registry.host)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The `Authorization` header for a request needing `scope`, per what the registry asked.
    fn authorization(
        &self,
        scope: Option<&str>,
        what: &str,
    ) -> Result<Option<String>, RegistryError> {
        let (scheme, cached) = {
            let state = self.lock_auth();
            let key = scope.unwrap_or("");
            let cached = state
                .tokens
                .get(key)
                .filter(|t| Instant::now() < t.renew_at)
                .map(|t| t.token.clone());
            (state.scheme.clone(), cached)
        };
        match scheme {
            AuthScheme::Unknown => Ok(None),
            AuthScheme::Basic => match self.credential()? {
                Some(Credential::Basic { username, password }) => {
                    Ok(Some(basic_header(&username, &password)))
                }
                _ => Ok(None),
            },
            AuthScheme::Bearer { realm, service } => {
                if let Some(token) = cached {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let (token, lifetime) =
                    self.fetch_token(&realm, service.as_deref(), scope, what)?;
                let renew_at =
                    Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN).max(lifetime / 2);
                self.lock_auth().tokens.insert(
                    scope.unwrap_or("").to_string(),
                    CachedToken {
                        token: token.clone(),
                        renew_at,
                    },
                );
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Asks the token service at `realm` for a bearer token: `GET` with Basic credentials (or
    /// none), or an OAuth2 `POST` exchanging an identity (refresh) token.
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        what: &str,
    ) -> Result<(String, Duration), RegistryError> {
        let mut url = Url::parse(realm)
            .map_err(|e| self.protocol(what, &format!("token realm `{realm}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.protocol(what, &format!("token realm `{realm}` is not http(s)")));
        }
        let credential = self.credential()?;
        let token_what = format!("a token for {what} from {realm}");
        let resp = match &credential {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh)
                    .append_pair("client_id", "strata");
                if let Some(s) = service {
                    form.append_pair("service", s);
                }
                if let Some(s) = scope {
                    form.append_pair("scope", s);
                }
                let form = form.finish();
                let call = Call {
                    method: Method::POST,
                    url: url.to_string(),
                    headers: vec![(
                        "content-type",
                        "application/x-www-form-urlencoded".to_string(),
                    )],
                    scope: None,
                    what: &token_what,
                };
                self.raw(&call, None, &mut Body::Bytes(form.as_bytes()))?
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    if let Some(s) = scope {
                        q.append_pair("scope", s);
                    }
                    if let Some(Credential::Basic { username, .. }) = other {
                        q.append_pair("account", username);
                    }
                }
                let call = Call {
                    method: Method::GET,
                    url: url.to_string(),
                    headers: Vec::new(),
                    scope: None,
                    what: &token_what,
                };
                let header = match other {
                    Some(Credential::Basic { username, password }) => {
                        Some(basic_header(username, password))
                    }
                    _ => None,
                };
                self.raw(&call, header.as_deref(), &mut Body::None)?
            }
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let who = match &credential {
                None => "anonymous access".to_string(),
                Some(Credential::Basic { username, .. }) => format!("user `{username}`"),
                Some(Credential::IdentityToken(_)) => "the identity token".to_string(),
            };
            return Err(self.unauthorized(
                what,
                &format!(
                    "token service {realm} refused {who} (HTTP {})",
                    status.as_u16()
                ),
            ));
        }
        let mut resp = self.expect(resp, &[StatusCode::OK], &token_what)?;
        let bytes = self.read_limited(&mut resp, MAX_SMALL_BODY, &token_what)?;
        let answer: TokenAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(&token_what, &format!("not a token answer: {e}")))?;
        let Some(token) = answer.bearer() else {
            return Err(self.protocol(&token_what, "no token in the answer"));
        };
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).max(1));
        Ok((token.to_string(), lifetime))
    }

    /// One HTTP exchange, transport errors mapped to typed ones.
    fn raw(
        &self,
        call: &Call,
        authorization: Option<&str>,
        body: &mut Body,
    ) -> Result<Response<ureq::Body>, RegistryError> {
        let mut builder = http::Request::builder()
            .method(call.method.clone())
            .uri(call.url.as_str());
        for (name, value) in &call.headers {
            builder = builder.header(*name, value.as_str());
        }
        if let Some(a) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, a);
        }
        let result = match body {
            Body::None => builder
                .body(())
                .map_err(|e| self.protocol(call.what, &e.to_string()))
                .map(|r| self.agent.run(r)),
            Body::Bytes(b) => builder
                .body(*b)
                .map_err(|e| self.protocol(call.what, &e.to_string()))
                .map(|r| self.agent.run(r)),
            Body::Stream(reader, len) => builder
                .header(http::header::CONTENT_LENGTH, len.to_string())
                .body(ureq::SendBody::from_reader(&mut **reader))
                .map_err(|e| self.protocol(call.what, &e.to_string()))
                .map(|r| self.agent.run(r)),
        }?;
        result.map_err(|e| self.transport_error(e))
    }

    /// Maps a ureq error to a typed one.
    fn transport_error(&self, e: ureq::Error) -> RegistryError {
        let registry = self.registry.to_string();
        match e {
            ureq::Error::Io(io) => self.io_error(io),
            ureq::Error::Timeout(t) => RegistryError::Unreachable {
                registry,
                reason: format!("no answer in time ({t})"),
            },
            ureq::Error::HostNotFound => RegistryError::Unreachable {
                registry,
                reason: "host not found".to_string(),
            },
            ureq::Error::ConnectionFailed => RegistryError::Unreachable {
                registry,
                reason: "connection failed".to_string(),
            },
            ureq::Error::BodyStalled => RegistryError::Unreachable {
                registry,
                reason: "the connection stalled".to_string(),
            },
            ureq::Error::Tls(detail) => RegistryError::Tls {
                registry,
                detail: detail.to_string(),
            },
            ureq::Error::Rustls(e) => RegistryError::Tls {
                registry,
                detail: e.to_string(),
            },
            ureq::Error::Pem(e) => RegistryError::Tls {
                registry,
                detail: e.to_string(),
            },
            other => RegistryError::Protocol {
                registry,
                what: "a request".to_string(),
                detail: other.to_string(),
            },
        }
    }

    /// Maps an I/O error on the connection (or one ureq wrapped in `io::Error`).
    fn io_error(&self, e: std::io::Error) -> RegistryError {
        if e.get_ref().is_some_and(|inner| inner.is::<ureq::Error>()) {
            let kind = e.kind();
            if let Some(Ok(inner)) = e.into_inner().map(|b| b.downcast::<ureq::Error>()) {
                return self.transport_error(*inner);
            }
            return RegistryError::Unreachable {
                registry: self.registry.to_string(),
                reason: kind.to_string(),
            };
        }
        if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            return RegistryError::Tls {
                registry: self.registry.to_string(),
                detail: e.to_string(),
            };
        }
        let reason = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                "no answer in time".to_string()
            }
            _ => e.to_string(),
        };
        RegistryError::Unreachable {
            registry: self.registry.to_string(),
            reason,
        }
    }

    /// Passes a response with an expected status; maps the others to typed errors.
    fn expect(
        &self,
        mut resp: Response<ureq::Body>,
        ok: &[StatusCode],
        what: &str,
    ) -> Result<Response<ureq::Body>, RegistryError> {
        let status = resp.status();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let registry = self.registry.to_string();
        let (code, body) = error_body(&mut resp);
        Err(match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                registry,
                what: what.to_string(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
                registry,
                what: what.to_string(),
                detail: format!("HTTP {}: {body}", status.as_u16()),
            },
            _ => RegistryError::Refused {
                registry,
                what: what.to_string(),
                status: status.as_u16(),
                code,
                body,
            },
        })
    }

    fn read_limited(
        &self,
        resp: &mut Response<ureq::Body>,
        limit: u64,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.io_error(e))?;
        if out.len() as u64 > limit {
            return Err(self.protocol(what, &format!("the answer is larger than {limit} bytes")));
        }
        Ok(out)
    }

    /// The upload URL from a `Location` header (absolute, or relative to the registry).
    fn location(&self, headers: &HeaderMap, what: &str) -> Result<Url, RegistryError> {
        let Some(loc) = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Err(self.protocol(what, "no Location header for the upload"));
        };
        self.base
            .join(loc)
            .map_err(|e| self.protocol(what, &format!("Location `{loc}`: {e}")))
    }
}

/// Both `Read` and `Seek`, as one trait object.
trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A reader that reports progress, polls `cancelled`, and remembers why it stopped (so a
/// failed upload can tell a cancel or a local read error from a network error).
struct TransferReader<'a, R> {
    inner: R,
    transfer: &'a Transfer<'a>,
    cancelled: bool,
    error: Option<std::io::Error>,
}

impl<R: Read> Read for TransferReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.transfer.cancelled)() {
            self.cancelled = true;
            return Err(std::io::Error::other("cancelled"));
        }
        match self.inner.read(buf) {
            Ok(n) => {
                (self.transfer.progress)(n as u64);
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(std::io::Error::new(kind, "reading the data to send failed"))
            }
        }
    }
}

/// A tag or a digest, as a manifest URL names it; the digest when it is one.
fn manifest_reference(reference: &str) -> Result<Option<Digest>, RegistryError> {
    if reference.contains(':') {
        return Ok(Some(Digest::parse(reference)?));
    }
    validate_tag(reference)?;
    Ok(None)
}

fn accept_header(accept: &[&str]) -> String {
    if accept.is_empty() {
        media_types::DEFAULT_ACCEPT.join(", ")
    } else {
        accept.join(", ")
    }
}

fn basic_header(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or(v).trim().to_string())
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    let v = headers.get("docker-content-digest")?.to_str().ok()?;
    Digest::parse(v.trim()).ok()
}

/// The target of a `Link: <URL>; rel="next"` header value, if it names one.
fn next_link(value: &str) -> Option<String> {
    for link in value.split(',') {
        let link = link.trim();
        let (target, params) = link.strip_prefix('<')?.split_once('>')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p.strip_prefix("rel=")
                .map(|r| r.trim_matches('"').split_whitespace().any(|r| r == "next"))
                .unwrap_or(false)
        });
        if is_next {
            return Some(target.to_string());
        }
    }
    None
}

/// The registry's error code and a short message from an error answer.
fn error_body(resp: &mut Response<ureq::Body>) -> (Option<String>, String) {
    let mut bytes = Vec::new();
    let _ = resp
        .body_mut()
        .as_reader()
        .take(64 << 10)
        .read_to_end(&mut bytes);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(&bytes)
        && let Some(first) = parsed.errors.first()
    {
        let text = parsed
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        return (Some(first.code.clone()), one_line(&text, ERROR_EXCERPT));
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = if text.trim().is_empty() {
        "(no body)".to_string()
    } else {
        one_line(&text, ERROR_EXCERPT)
    };
    (None, text)
}

/// What a 401 said: the challenge's `error`, else the body's message.
fn challenge_detail(challenges: &[auth::Challenge], mut resp: Response<ureq::Body>) -> String {
    let (_, body) = error_body(&mut resp);
    match challenges.iter().find_map(|c| c.param("error")) {
        Some(err) => format!("HTTP 401 ({err}): {body}"),
        None => format!("HTTP 401: {body}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_finds_rel_next() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://a/x>; rel="prev", <https://a/y>; rel=next"#).as_deref(),
            Some("https://a/y")
        );
        assert_eq!(next_link(r#"<https://a/x>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn manifest_reference_is_a_tag_or_a_digest() {
        assert_eq!(manifest_reference("latest").unwrap(), None);
        let d = Digest::of(b"x");
        assert_eq!(manifest_reference(d.as_str()).unwrap(), Some(d));
        assert!(manifest_reference("sha256:zz").is_err());
        assert!(manifest_reference("a/b").is_err());
    }

    #[test]
    fn client_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Client>();
    }
}
