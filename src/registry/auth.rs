//! Registry credentials as container tools keep them (docker's `config.json`, credential
//! helpers) and the parsing half of HTTP auth: `WWW-Authenticate` challenges and token answers.
//!
//! ```text
//! $DOCKER_CONFIG/config.json | ~/.docker/config.json
//!   credHelpers[host] ─► docker-credential-NAME get  (stdin: host; stdout: JSON)
//!   credsStore        ─► the same, for every host (not found ─► fall through)
//!   auths[host]       ─► auth (base64 user:pass) | username+password | identitytoken
//! ─► Credential::Basic | Credential::IdentityToken ─► the client's Basic or Bearer flow
//! ```

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// How long a credential helper may take (it may ask a keyring or an agent).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// The key docker uses for Docker Hub in `auths` and for credential helpers.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (or personal access token): sent as HTTP Basic auth, or to the
    /// token service as Basic auth to get a bearer token.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken` in config.json, or a helper's `<token>` user):
    /// exchanged at the token service for bearer tokens.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                write!(f, "Basic {{ username: {username:?}, password: <hidden> }}")
            }
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<hidden>)"),
        }
    }
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source} (fix or remove the file, or point DOCKER_CONFIG elsewhere)")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid docker config JSON: {detail}")]
    ConfigParse { path: PathBuf, detail: String },
    #[error("{path}: auths[\"{key}\"].auth is not base64 of `user:password`")]
    BadAuthField { path: PathBuf, key: String },
    #[error(
        "credential helper docker-credential-{helper} is not on PATH (install it, or remove it from credHelpers/credsStore in {path})"
    )]
    HelperMissing { helper: String, path: PathBuf },
    #[error("credential helper docker-credential-{helper} failed for {server}: {detail}")]
    HelperFailed {
        helper: String,
        server: String,
        detail: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// A loaded docker `config.json` (only the credential parts).
#[derive(Debug, Default)]
pub struct DockerConfig {
    path: PathBuf,
    file: ConfigFile,
    /// PATH used to find `docker-credential-*` helpers (`None`: the process's PATH).
    helper_path: Option<OsString>,
}

/// Where docker looks for `config.json`: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub fn docker_config_dir(
    docker_config: Option<OsString>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    match docker_config {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => home.map(|h| h.join(".docker")),
    }
}

impl DockerConfig {
    /// Loads `DIR/config.json`, where DIR is `dir`, else `$DOCKER_CONFIG`, else
    /// `~/.docker`. A missing file is an empty configuration (anonymous access).
    pub fn load(
        dir: Option<&Path>,
        helper_path: Option<OsString>,
    ) -> Result<DockerConfig, AuthError> {
        let dir = match dir {
            Some(d) => Some(d.to_path_buf()),
            None => docker_config_dir(
                std::env::var_os("DOCKER_CONFIG"),
                std::env::var_os("HOME").map(PathBuf::from),
            ),
        };
        let Some(dir) = dir else {
            return Ok(DockerConfig {
                helper_path,
                ..DockerConfig::default()
            });
        };
        let path = dir.join("config.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig {
                    path,
                    file: ConfigFile::default(),
                    helper_path,
                });
            }
            Err(source) => return Err(AuthError::ConfigRead { path, source }),
        };
        let file: ConfigFile =
            serde_json::from_slice(&text).map_err(|e| AuthError::ConfigParse {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        Ok(DockerConfig {
            path,
            file,
            helper_path,
        })
    }

    /// The credential for `host` (`host[:port]`): its credHelpers entry, else the credsStore
    /// helper, else its `auths` entry; `None` means anonymous.
    pub fn credential(&self, host: &str) -> Result<Option<Credential>, AuthError> {
        let server = server_key(host);
        if let Some(helper) = self.file.cred_helpers.get(host).or_else(|| {
            self.file
                .cred_helpers
                .iter()
                .find(|(k, _)| normalize_key(k) == normalize_key(&server))
                .map(|(_, v)| v)
        }) {
            return self.run_helper(helper, &server);
        }
        if let Some(store) = &self.file.creds_store
            && let Some(c) = self.run_helper(store, &server)?
        {
            return Ok(Some(c));
        }
        let entry = self
            .file
            .auths
            .get(&server)
            .map(|e| (server.as_str(), e))
            .or_else(|| {
                self.file
                    .auths
                    .iter()
                    .find(|(k, _)| normalize_key(k) == normalize_key(&server))
                    .map(|(k, e)| (k.as_str(), e))
            });
        let Some((key, entry)) = entry else {
            return Ok(None);
        };
        self.entry_credential(key, entry)
    }

    fn entry_credential(
        &self,
        key: &str,
        entry: &AuthEntry,
    ) -> Result<Option<Credential>, AuthError> {
        if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential::IdentityToken(token.to_string())));
        }
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = || AuthError::BadAuthField {
                path: self.path.clone(),
                key: key.to_string(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (username, password) = text.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credential::Basic {
                username: username.to_string(),
                password: password.to_string(),
            }));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }

    /// Runs `docker-credential-HELPER get` with `server` on stdin.
    fn run_helper(&self, helper: &str, server: &str) -> Result<Option<Credential>, AuthError> {
        helper_get(helper, server, self.helper_path.as_ref(), &self.path)
    }
}

/// The key docker uses for a registry host in `auths` and for helpers.
fn server_key(host: &str) -> String {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_KEY.to_string(),
        _ => host.to_string(),
    }
}

/// `https://host/v1/` and `host` name the same entry (docker writes both forms).
fn normalize_key(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

/// Asks `docker-credential-HELPER get` for `server`'s credential, as docker does. "Not found"
/// (the helper's usual exit status 1 with `credentials not found` on stdout) is `Ok(None)`.
pub fn helper_get(
    helper: &str,
    server: &str,
    helper_path: Option<&OsString>,
    config_path: &Path,
) -> Result<Option<Credential>, AuthError> {
    let program = format!("docker-credential-{helper}");
    let failed = |detail: String| AuthError::HelperFailed {
        helper: helper.to_string(),
        server: server.to_string(),
        detail,
    };
    let mut cmd = Command::new(&program);
    cmd.arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = helper_path {
        cmd.env("PATH", path);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AuthError::HelperMissing {
                helper: helper.to_string(),
                path: config_path.to_path_buf(),
            });
        }
        Err(e) => return Err(failed(format!("cannot start {program}: {e}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit status below.
        let _ = stdin.write_all(server.as_bytes());
    }
    // Read both pipes on threads so a chatty helper cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(1 << 20).read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(1 << 16).read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "no answer within {}s",
                    HELPER_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(failed(format!("waiting for it: {e}"))),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let out_text = String::from_utf8_lossy(&stdout);
    if !status.success() {
        if out_text.to_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        let err_text = String::from_utf8_lossy(&stderr);
        let msg = if err_text.trim().is_empty() {
            out_text.trim()
        } else {
            err_text.trim()
        };
        return Err(failed(format!("{status}: {}", one_line(msg, 200))));
    }
    let answer: HelperAnswer = serde_json::from_slice(&stdout)
        .map_err(|e| failed(format!("answer is not the JSON docker expects: {e}")))?;
    if answer.username == "<token>" {
        return Ok(Some(Credential::IdentityToken(answer.secret)));
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential::Basic {
        username: answer.username,
        password: answer.secret,
    }))
}

/// The first `max` characters of `s` on one line.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat.to_string()
    }
}

/// One parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme: `basic`, `bearer`, …
    pub scheme: String,
    /// Parameters with lower-cased names (`realm`, `service`, `scope`, `error`).
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` header value into its challenges (RFC 7235: a scheme, then
/// comma-separated `name=value` or `name="quoted"` parameters; a bare token starts the next
/// challenge).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        header[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let name = token(&mut i);
        // `name=` is a parameter of the current challenge; anything else starts a new one.
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Copy one UTF-8 character.
                    let ch_len = header[i..].chars().next().map_or(1, char::len_utf8);
                    v.push_str(&header[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1;
                v
            } else {
                let start = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                header[start..i].trim().to_string()
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(name.to_ascii_lowercase(), value);
            }
        } else if !name.is_empty() {
            out.push(Challenge {
                scheme: name.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

/// A token service's answer (distribution's token spec and OAuth2's both accepted).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenAnswer {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenAnswer {
    pub fn bearer(&self) -> Option<&str> {
        self.token
            .as_deref()
            .filter(|t| !t.is_empty())
            .or(self.access_token.as_deref().filter(|t| !t.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path, json: &str) -> DockerConfig {
        std::fs::write(dir.join("config.json"), json).unwrap();
        DockerConfig::load(Some(dir), Some(OsString::from("/nonexistent"))).unwrap()
    }

    #[test]
    fn auths_base64_username_password_and_identity_token() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        let c = config(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                "a.example": {{"auth": "{auth}"}},
                "https://b.example/v1/": {{"username": "bob", "password": "pw"}},
                "c.example:5000": {{"identitytoken": "refresh-me"}},
                "https://index.docker.io/v1/": {{"auth": "{auth}"}}
            }}}}"#
            ),
        );
        let alice = Credential::Basic {
            username: "alice".into(),
            password: "s3:cret".into(),
        };
        assert_eq!(c.credential("a.example").unwrap(), Some(alice.clone()));
        assert_eq!(
            c.credential("b.example").unwrap(),
            Some(Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            c.credential("c.example:5000").unwrap(),
            Some(Credential::IdentityToken("refresh-me".into()))
        );
        assert_eq!(c.credential("docker.io").unwrap(), Some(alice));
        assert_eq!(
            c.credential("c.example").unwrap(),
            None,
            "the port is part of the key"
        );
        assert_eq!(c.credential("z.example").unwrap(), None);
    }

    #[test]
    fn missing_config_is_anonymous_and_bad_json_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = DockerConfig::load(Some(dir.path()), None).unwrap();
        assert_eq!(c.credential("a.example").unwrap(), None);
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        let e = DockerConfig::load(Some(dir.path()), None).unwrap_err();
        assert!(matches!(e, AuthError::ConfigParse { .. }), "{e}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths": {"a.example": {"auth": "bm9jb2xvbg=="}}}"#,
        )
        .unwrap();
        let c = DockerConfig::load(Some(dir.path()), None).unwrap();
        let e = c.credential("a.example").unwrap_err();
        assert!(matches!(e, AuthError::BadAuthField { .. }), "{e}");
    }

    #[test]
    fn docker_config_dir_prefers_env() {
        assert_eq!(
            docker_config_dir(Some("/cfg".into()), Some("/home/u".into())),
            Some(PathBuf::from("/cfg"))
        );
        assert_eq!(
            docker_config_dir(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker"))
        );
        assert_eq!(docker_config_dir(None, None), None);
    }

    fn write_helper(dir: &Path, name: &str, body: &str) {
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn helpers_cred_helpers_then_store_then_auths() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Answers for one.example only; "not found" (as real helpers say it) for anything else.
        write_helper(
            &bin,
            "store",
            r#"read s; if [ "$s" = one.example ]; then echo '{"ServerURL":"one.example","Username":"u1","Secret":"p1"}'; else echo "credentials not found in native keychain"; exit 1; fi"#,
        );
        write_helper(
            &bin,
            "tok",
            r#"read s; echo "{\"ServerURL\":\"$s\",\"Username\":\"<token>\",\"Secret\":\"rt-$s\"}""#,
        );
        write_helper(&bin, "broken", "echo boom >&2; exit 3");
        let path = std::env::join_paths([bin.as_path(), Path::new("/usr/bin"), Path::new("/bin")])
            .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"credsStore": "store",
                "credHelpers": {"two.example": "tok", "bad.example": "broken", "gone.example": "absent"},
                "auths": {"three.example": {"username": "u3", "password": "p3"}}}"#,
        )
        .unwrap();
        let c = DockerConfig::load(Some(dir.path()), Some(path)).unwrap();
        assert_eq!(
            c.credential("one.example").unwrap(),
            Some(Credential::Basic {
                username: "u1".into(),
                password: "p1".into()
            })
        );
        assert_eq!(
            c.credential("two.example").unwrap(),
            Some(Credential::IdentityToken("rt-two.example".into()))
        );
        assert_eq!(
            c.credential("three.example").unwrap(),
            Some(Credential::Basic {
                username: "u3".into(),
                password: "p3".into()
            }),
            "the store's not-found falls through to auths"
        );
        assert_eq!(c.credential("four.example").unwrap(), None);
        let e = c.credential("bad.example").unwrap_err();
        assert!(
            matches!(e, AuthError::HelperFailed { .. }) && e.to_string().contains("boom"),
            "{e}"
        );
        let e = c.credential("gone.example").unwrap_err();
        assert!(matches!(e, AuthError::HelperMissing { .. }), "{e}");
    }

    #[test]
    fn challenges_parse() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push",error="invalid_token""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example/token"));
        assert_eq!(c[0].param("service"), Some("reg.example"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(c[0].param("error"), Some("invalid_token"));
        let c = parse_challenges(r#"Basic realm="x \"y\"", Bearer realm=r , service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some(r#"x "y""#));
        assert_eq!(c[1].param("realm"), Some("r"));
        assert_eq!(c[1].param("service"), Some("s"));
        assert!(parse_challenges("").is_empty());
    }

    #[test]
    fn credential_debug_hides_secrets() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!format!("{:?}", Credential::IdentityToken("secret".into())).contains("secret"));
    }
}
