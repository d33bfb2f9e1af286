//! Test harness: runs Debian's real `docker-registry` (CNCF distribution 2.8) on 127.0.0.1 at a
//! free port, with temp storage, plain HTTP or HTTPS (a CA the harness makes), anonymous,
//! htpasswd (bcrypt) or token auth (a small token service the harness runs), and kills it on drop.
//!
//! ```text
//! RegistryServer::start(Options { tls, auth })
//!   tempdir/ config.yml · storage/ · registry.log · ca.crt server.{crt,key} · htpasswd · token-root.pem
//!   docker-registry serve config.yml ──(poll GET /v2/ until 200/401)──► ready
//!   Auth::Token(policy) ─► TokenService: a TcpListener thread answering GET/POST /token with
//!       ES256 JWTs whose x5c leaf chains to token-root.pem (what distribution 2.8 verifies)
//! stop() / start_again() (same port and storage) · pause() / resume() (SIGSTOP / SIGCONT)
//! ```
//!
//! Self-contained (std, libc, base64, serde_json, tempfile, ureq, url, and the dev-dependencies
//! rcgen, ring and bcrypt) so both the unit tests in `src/registry` (through `#[path]`) and the
//! integration tests can include it. Never binds anything but 127.0.0.1.
//!
//! The registry gets SIGKILL when the thread that started (or restarted) it ends
//! (`PR_SET_PDEATHSIG`), so a killed test run leaves none behind: start and restart a server
//! from the thread that owns it (the test's own thread), not from a short-lived helper thread.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// Where Debian's `docker-registry` package puts the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// The `service` the token-auth registry names (the token's audience).
pub const TOKEN_SERVICE: &str = "strata-test-registry";
/// The token issuer the registry trusts.
pub const TOKEN_ISSUER: &str = "strata-test-issuer";

/// How clients must authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// htpasswd with one bcrypt entry.
    Htpasswd {
        user: String,
        password: String,
    },
    /// Bearer tokens from the harness's token service.
    Token(TokenPolicy),
}

/// Who the token service gives what.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    /// Users and passwords (Basic auth at the token service): granted every requested action.
    pub users: Vec<(String, String)>,
    /// OAuth2 refresh tokens (identity tokens) and the user each stands for.
    pub refresh_tokens: Vec<(String, String)>,
    /// Whether anonymous requests get `pull` (else an empty access list).
    pub anonymous_pull: bool,
    /// `expires_in` of issued tokens, in seconds.
    pub expires_in: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            users: vec![("alice".to_string(), "wonderland".to_string())],
            refresh_tokens: Vec::new(),
            anonymous_pull: true,
            expires_in: 300,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub tls: bool,
    pub auth: Auth,
}

/// A running registry. Dropping it kills the registry and the token service.
pub struct RegistryServer {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Option<Child>,
    token: Option<TokenService>,
}

/// Whether the registry binary is here; prints the one skip line when it is not.
pub fn available(test: &str) -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    eprintln!("skipping {test}: {REGISTRY_BIN} is missing (apt-get install docker-registry)");
    false
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl RegistryServer {
    /// Starts a registry, or prints one skip line and returns `None` when the binary is
    /// missing. Panics (failing the test) when it is there but does not come up.
    pub fn start(test: &str, options: Options) -> Option<RegistryServer> {
        if !available(test) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("strata-registry-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let root = dir.path();
        std::fs::create_dir(root.join("storage")).expect("storage dir");
        let mut tls_section = String::new();
        if options.tls {
            write_tls_files(root);
            tls_section = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                root.join("server.crt").display(),
                root.join("server.key").display()
            );
        }
        let mut token = None;
        let auth_section = match &options.auth {
            Auth::None => String::new(),
            Auth::Htpasswd { user, password } => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n"))
                    .expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                    root.join("htpasswd").display()
                )
            }
            Auth::Token(policy) => {
                let service = TokenService::start(root, policy.clone());
                let section = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    service.realm(),
                    root.join("token-root.pem").display()
                );
                token = Some(service);
                section
            }
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: strata-test-secret\n{tls_section}\
             {auth_section}\
             health:\n  storagedriver:\n    enabled: false\n",
            storage = root.join("storage").display(),
        );
        std::fs::write(root.join("config.yml"), config).expect("config.yml");
        let mut server = RegistryServer {
            dir,
            port,
            tls: options.tls,
            child: None,
            token,
        };
        server.start_again();
        Some(server)
    }

    /// Plain HTTP, anonymous.
    pub fn http(test: &str) -> Option<RegistryServer> {
        RegistryServer::start(
            test,
            Options {
                tls: false,
                auth: Auth::None,
            },
        )
    }

    /// HTTPS with the harness CA and htpasswd basic auth.
    pub fn https_basic(test: &str, user: &str, password: &str) -> Option<RegistryServer> {
        RegistryServer::start(
            test,
            Options {
                tls: true,
                auth: Auth::Htpasswd {
                    user: user.to_string(),
                    password: password.to_string(),
                },
            },
        )
    }

    /// Plain HTTP with token auth from the harness token service.
    pub fn token(test: &str, policy: TokenPolicy) -> Option<RegistryServer> {
        RegistryServer::start(
            test,
            Options {
                tls: false,
                auth: Auth::Token(policy),
            },
        )
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// A reference to `repo` as strata's users write it (`http://` for the plain registry).
    pub fn reference(&self, repo: &str) -> String {
        if self.tls {
            format!("{}/{repo}", self.host())
        } else {
            format!("http://{}/{repo}", self.host())
        }
    }

    /// The CA (PEM) that signed the HTTPS certificate.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the filesystem driver keeps the bytes of blob `sha256:HEX`.
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// A scratch folder that lives as long as the server.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    pub fn token_service(&self) -> Option<&TokenService> {
        self.token.as_ref()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the registry (SIGKILL) and waits for it: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry (again) on the same port and storage and waits until it answers.
    pub fn start_again(&mut self) {
        self.stop();
        let root = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("registry.log"))
            .expect("registry.log");
        let log2 = log.try_clone().expect("log handle");
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(root.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // The registry reads REGISTRY_* variables as config overrides: none may leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; it only asks for SIGKILL when the spawning
            // thread dies, so a killed test run leaves no registry behind.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn docker-registry");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Freezes the registry (SIGSTOP): it keeps its port but answers nothing. Returns once
    /// every thread of it is stopped (signal delivery is asynchronous).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let Some(child) = &self.child else { return };
        let tasks = PathBuf::from(format!("/proc/{}/task", child.id()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let all_stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|entries| {
                entries.filter_map(Result::ok).all(|t| {
                    // The state follows the `(comm)` field: `... ) T ...`.
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                    })
                })
            })
        };
        while !all_stopped() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not stop on SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Thaws a paused registry (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
        }
    }

    fn wait_ready(&mut self) {
        let mut roots = Vec::new();
        if let Some(ca) = self.ca_file() {
            let pem = std::fs::read(ca).expect("ca.crt");
            roots.push(ureq::tls::Certificate::from_pem(&pem).expect("ca pem"));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .proxy(None)
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::from(roots))
                    .build(),
            )
            .build()
            .into();
        let url = format!("{}/v2/", self.base_url());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !self.is_running() {
                panic!("docker-registry exited at start:\n{}", self.log());
            }
            if let Ok(resp) = agent.get(&url).call()
                && matches!(resp.status().as_u16(), 200 | 401)
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "docker-registry did not answer {url} in 60s:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        self.resume();
        self.stop();
        if let Some(t) = self.token.take() {
            t.shutdown();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `root`.
fn write_tls_files(root: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "strata test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(
            std::net::Ipv4Addr::LOCALHOST,
        )));
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    std::fs::write(root.join("ca.crt"), ca_cert.pem()).expect("ca.crt");
    std::fs::write(root.join("server.crt"), cert.pem()).expect("server.crt");
    std::fs::write(root.join("server.key"), key.serialize_pem()).expect("server.key");
}

/// One request the token service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The user it was issued to (`None`: anonymous).
    pub user: Option<String>,
    /// The requested scopes, as sent.
    pub scopes: Vec<String>,
    /// Whether it came as an OAuth2 refresh-token POST.
    pub refresh: bool,
    /// Whether it was refused (bad credentials).
    pub refused: bool,
}

struct TokenKeys {
    /// Signs good tokens; its certificate chains to token-root.pem.
    good: ring::signature::EcdsaKeyPair,
    good_x5c: String,
    /// Signs poisoned tokens; its self-signed certificate is trusted by nobody.
    rogue: ring::signature::EcdsaKeyPair,
    rogue_x5c: String,
}

struct TokenShared {
    policy: TokenPolicy,
    keys: TokenKeys,
    requests: Mutex<Vec<TokenRequest>>,
    issued: AtomicUsize,
    poison: AtomicUsize,
    stop: AtomicBool,
}

/// The harness's token service (distribution's token spec, GET and OAuth2 POST).
pub struct TokenService {
    port: u16,
    shared: Arc<TokenShared>,
    thread: Option<JoinHandle<()>>,
}

fn ecdsa_key_and_cert(
    issuer: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    name: &str,
) -> (ring::signature::EcdsaKeyPair, rcgen::Certificate) {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ecdsa key");
    let ring_key =
        ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ecdsa key");
    let rc_key = KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = match issuer {
        Some(issuer) => params.signed_by(&rc_key, issuer).expect("token cert"),
        None => params.self_signed(&rc_key).expect("token cert"),
    };
    (ring_key, cert)
}

impl TokenService {
    fn start(root: &Path, policy: TokenPolicy) -> TokenService {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        // A root CA for the registry's rootcertbundle, and a signing leaf issued by it: the
        // token carries the leaf in its x5c header and distribution verifies the chain.
        let root_key = KeyPair::generate().expect("token root key");
        let mut root_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(DnType::CommonName, "strata test token root");
        root_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root_cert = root_params.self_signed(&root_key).expect("token root cert");
        std::fs::write(root.join("token-root.pem"), root_cert.pem()).expect("token-root.pem");
        let issuer = Issuer::new(root_params, root_key);
        let (good, good_cert) = ecdsa_key_and_cert(Some(&issuer), "strata test token signer");
        let (rogue, rogue_cert) = ecdsa_key_and_cert(None, "rogue token signer");
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = TokenKeys {
            good,
            good_x5c: b64.encode(good_cert.der()),
            rogue,
            rogue_x5c: b64.encode(rogue_cert.der()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("token service bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(TokenShared {
            policy,
            keys,
            requests: Mutex::new(Vec::new()),
            issued: AtomicUsize::new(0),
            poison: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A broken client connection only ends that connection.
                    let _ = serve_token(&s, stream);
                }
            }
        });
        TokenService {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// How many tokens were issued.
    pub fn issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// The next `n` tokens are signed by a key the registry does not trust (so it refuses
    /// them with `invalid_token`), as a revoked or rotated token would be.
    pub fn poison_next(&self, n: usize) {
        self.shared.poison.store(n, Ordering::SeqCst);
    }

    fn shutdown(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn serve_token(s: &TokenShared, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let url = url::Url::parse(&format!("http://127.0.0.1{target}"))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if method == "POST" && len > 0 {
        let mut body = vec![0u8; len.min(1 << 20)];
        reader.read_exact(&mut body)?;
        params.extend(url::form_urlencoded::parse(&body).into_owned());
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect();
    let refresh = method == "POST";
    // Who is asking: a refresh token, Basic credentials, or nobody.
    let user: Result<Option<String>, ()> = if refresh {
        let token = param("refresh_token").unwrap_or_default();
        let grant_ok = param("grant_type").as_deref() == Some("refresh_token");
        match s.policy.refresh_tokens.iter().find(|(t, _)| *t == token) {
            Some((_, u)) if grant_ok => Ok(Some(u.clone())),
            _ => Err(()),
        }
    } else if let Some(auth) = headers.get("authorization") {
        let decoded = auth
            .strip_prefix("Basic ")
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        match decoded.as_deref().and_then(|d| d.split_once(':')) {
            Some((u, p)) if s.policy.users.iter().any(|(uu, pp)| uu == u && pp == p) => {
                Ok(Some(u.to_string()))
            }
            _ => Err(()),
        }
    } else {
        Ok(None)
    };
    let mut out = stream;
    let Ok(user) = user else {
        s.requests.lock().expect("requests").push(TokenRequest {
            user: None,
            scopes,
            refresh,
            refused: true,
        });
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        write!(
            out,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return out.flush();
    };
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let actions: Vec<&str> = actions
                .split(',')
                .filter(|a| user.is_some() || (s.policy.anonymous_pull && *a == "pull"))
                .collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let n = s.issued.fetch_add(1, Ordering::SeqCst);
    let poisoned = s
        .poison
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| p.checked_sub(1))
        .is_ok();
    let (key, x5c) = if poisoned {
        (&s.keys.rogue, &s.keys.rogue_x5c)
    } else {
        (&s.keys.good, &s.keys.good_x5c)
    };
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": TOKEN_SERVICE,
        "exp": now + s.policy.expires_in,
        "nbf": now.saturating_sub(5),
        "iat": now,
        "jti": format!("strata-test-{n}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = key
        .sign(&rng, signing_input.as_bytes())
        .map_err(|_| std::io::Error::other("ecdsa sign"))?;
    let jwt = format!("{signing_input}.{}", b64url(sig.as_ref()));
    s.requests.lock().expect("requests").push(TokenRequest {
        user: user.clone(),
        scopes,
        refresh,
        refused: false,
    });
    let body = if refresh {
        serde_json::json!({"access_token": jwt, "expires_in": s.policy.expires_in, "scope": ""})
    } else {
        serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": s.policy.expires_in})
    }
    .to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}
