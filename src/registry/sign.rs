//! Ed25519 signatures for step records: key files in Nix's text format (`NAME:BASE64`),
//! signatures as `NAME:BASE64SIG`, verification against a list of trusted public keys.
//!
//! ```text
//! generate("ci-1") ─► SigningKey ─save─► ci-1.sec  "ci-1:<base64 of seed ‖ public key>" (0600)
//!                       └─public_key()─save─► ci-1.pub "ci-1:<base64 of public key>"
//! SigningKey::sign(record bytes) ─► "ci-1:<base64 signature>"
//! verify(&[PublicKey], record bytes, signature) ─► the key that signed, or why not
//! ```
//!
//! The secret file holds the 32-byte seed followed by the 32-byte public key, as `nix-store
//! --generate-binary-cache-key` writes it, so either tool's keys load in the other.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a key or a signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: already exists (remove it first to make a new key)")]
    Exists { path: PathBuf },
    #[error(
        "key name `{name}`: must be 1 to 128 characters, none of them `:`, white space or control characters"
    )]
    BadName { name: String },
    #[error("{what}: {detail} (expected NAME:BASE64)")]
    Malformed { what: String, detail: String },
    #[error(
        "signature by key `{name}`: no trusted public key has that name (add its .pub file to the trusted keys)"
    )]
    UnknownKey { name: String },
    #[error(
        "signature by key `{name}` does not verify: the data or the signature was altered, or it was signed by another key of the same name"
    )]
    BadSignature { name: String },
}

/// A named ed25519 secret key.
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

/// A named ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

fn check_name(name: &str) -> Result<(), SignError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(SignError::BadName {
            name: name.to_string(),
        })
    }
}

/// Splits `NAME:BASE64` into the name and decoded bytes.
fn split_text(text: &str, what: &str) -> Result<(String, Vec<u8>), SignError> {
    let malformed = |detail: &str| SignError::Malformed {
        what: what.to_string(),
        detail: detail.to_string(),
    };
    let text = text.trim();
    let (name, b64) = text.split_once(':').ok_or_else(|| malformed("no `:`"))?;
    check_name(name).map_err(|_| malformed("bad key name"))?;
    let bytes = B64.decode(b64).map_err(|_| malformed("not base64"))?;
    Ok((name.to_string(), bytes))
}

/// A new random key named `name`.
pub fn generate(name: &str) -> Result<SigningKey, SignError> {
    check_name(name)?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| SignError::Io {
        path: PathBuf::from("(the system random source)"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(SigningKey {
        name: name.to_string(),
        key: ed25519_dalek::SigningKey::from_bytes(&seed),
    })
}

impl SigningKey {
    /// Reads a secret key file.
    pub fn load(path: &Path) -> Result<SigningKey, SignError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        SigningKey::parse_named(&text, &path.display().to_string())
    }

    /// Parses `NAME:BASE64(seed ‖ public key)`.
    pub fn parse(text: &str) -> Result<SigningKey, SignError> {
        SigningKey::parse_named(text, "secret key")
    }

    fn parse_named(text: &str, what: &str) -> Result<SigningKey, SignError> {
        let (name, bytes) = split_text(text, what)?;
        let malformed = |detail: &str| SignError::Malformed {
            what: what.to_string(),
            detail: detail.to_string(),
        };
        let pair: [u8; 64] = bytes
            .try_into()
            .map_err(|_| malformed("a secret key is 64 bytes"))?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| malformed("its public half does not match its secret half"))?;
        Ok(SigningKey { name, key })
    }

    /// Writes the key to `path` (mode 0600, never over an existing file).
    pub fn save(&self, path: &Path) -> Result<(), SignError> {
        let text = format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()));
        write_new(path, text.as_bytes(), 0o600)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `msg`: `NAME:BASE64SIG`.
    pub fn sign(&self, msg: &[u8]) -> String {
        let sig: Signature = self.key.sign(msg);
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}:<secret>)", self.name)
    }
}

impl PublicKey {
    /// Reads a public key file.
    pub fn load(path: &Path) -> Result<PublicKey, SignError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        PublicKey::parse_named(&text, &path.display().to_string())
    }

    /// Parses `NAME:BASE64(public key)`.
    pub fn parse(text: &str) -> Result<PublicKey, SignError> {
        PublicKey::parse_named(text, "public key")
    }

    fn parse_named(text: &str, what: &str) -> Result<PublicKey, SignError> {
        let (name, bytes) = split_text(text, what)?;
        let malformed = |detail: &str| SignError::Malformed {
            what: what.to_string(),
            detail: detail.to_string(),
        };
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| malformed("a public key is 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| malformed("not an ed25519 point"))?;
        Ok(PublicKey { name, key })
    }

    /// Writes the key to `path` (mode 0644, never over an existing file).
    pub fn save(&self, path: &Path) -> Result<(), SignError> {
        write_new(path, self.to_string().as_bytes(), 0o644)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Checks `sig` (`NAME:BASE64SIG`) over `msg` against the trusted keys named NAME; returns the
/// key that verified it.
pub fn verify<'k>(
    trusted: &'k [PublicKey],
    msg: &[u8],
    sig: &str,
) -> Result<&'k PublicKey, SignError> {
    let (name, bytes) = split_text(sig, "signature")?;
    let raw: [u8; 64] = bytes.try_into().map_err(|_| SignError::Malformed {
        what: "signature".to_string(),
        detail: "a signature is 64 bytes".to_string(),
    })?;
    let signature = Signature::from_bytes(&raw);
    let mut named = trusted.iter().filter(|k| k.name == name).peekable();
    if named.peek().is_none() {
        return Err(SignError::UnknownKey { name });
    }
    named
        .find(|k| k.key.verify_strict(msg, &signature).is_ok())
        .ok_or(SignError::BadSignature { name })
}

/// Writes a new file with `mode` through a temp file renamed into place (never replacing one).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SignError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source: std::io::Error| SignError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // tempfile creates the file 0600, so a secret is never readable by others.
    let mut tmp = tempfile::Builder::new()
        .prefix(".strata-key-")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.write_all(b"\n").map_err(io)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            SignError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io(e.error)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sign_and_verify_round_trip() {
        let key = generate("ci-1").unwrap();
        let sig = key.sign(b"record");
        assert!(sig.starts_with("ci-1:"));
        let trusted = [generate("other").unwrap().public_key(), key.public_key()];
        let by = verify(&trusted, b"record", &sig).unwrap();
        assert_eq!(by.name(), "ci-1");
        assert_eq!(by, &key.public_key());
    }

    #[test]
    fn tampered_message_or_signature_is_bad_signature() {
        let key = generate("k").unwrap();
        let trusted = [key.public_key()];
        let sig = key.sign(b"record");
        let e = verify(&trusted, b"recorD", &sig).unwrap_err();
        assert!(
            matches!(e, SignError::BadSignature { ref name } if name == "k"),
            "{e}"
        );
        let (name, b64) = sig.split_once(':').unwrap();
        let mut raw = B64.decode(b64).unwrap();
        raw[10] ^= 1;
        let altered = format!("{name}:{}", B64.encode(raw));
        assert!(matches!(
            verify(&trusted, b"record", &altered),
            Err(SignError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_same_named_impostor_key_is_bad_signature_and_unknown_name_is_unknown_key() {
        let real = generate("ci").unwrap();
        let impostor = generate("ci").unwrap();
        let e = verify(&[real.public_key()], b"m", &impostor.sign(b"m")).unwrap_err();
        assert!(matches!(e, SignError::BadSignature { .. }), "{e}");
        let e = verify(
            &[real.public_key()],
            b"m",
            &generate("nobody").unwrap().sign(b"m"),
        )
        .unwrap_err();
        assert!(
            matches!(e, SignError::UnknownKey { ref name } if name == "nobody"),
            "{e}"
        );
        // Two trusted keys of one name (a rotation): either verifies.
        let trusted = [real.public_key(), impostor.public_key()];
        assert_eq!(
            verify(&trusted, b"m", &impostor.sign(b"m")).unwrap(),
            &impostor.public_key()
        );
    }

    #[test]
    fn malformed_signatures() {
        let trusted = [generate("k").unwrap().public_key()];
        for bad in [
            "",
            "nocolon",
            "k:not base64!",
            "k:AAAA",
            ":AAAA",
            "a b:AAAA",
        ] {
            let e = verify(&trusted, b"m", bad).unwrap_err();
            assert!(matches!(e, SignError::Malformed { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn key_files_round_trip_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate("ci-1").unwrap();
        let sec = dir.path().join("ci-1.sec");
        let public = dir.path().join("ci-1.pub");
        key.save(&sec).unwrap();
        key.public_key().save(&public).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sec), 0o600);
        assert_eq!(mode(&public), 0o644);
        let text = std::fs::read_to_string(&public).unwrap();
        assert!(text.starts_with("ci-1:") && text.ends_with('\n'));
        let loaded = SigningKey::load(&sec).unwrap();
        let loaded_pub = PublicKey::load(&public).unwrap();
        assert_eq!(loaded_pub, key.public_key());
        assert_eq!(loaded.public_key(), key.public_key());
        let sig = loaded.sign(b"x");
        assert_eq!(sig, key.sign(b"x"), "ed25519 signatures are deterministic");
        verify(&[loaded_pub], b"x", &sig).unwrap();
        let e = key.save(&sec).unwrap_err();
        assert!(matches!(e, SignError::Exists { .. }), "{e}");
        assert!(!format!("{key:?}").contains(&B64.encode(key.key.to_bytes())));
    }

    #[test]
    fn malformed_key_files_and_names() {
        assert!(matches!(generate("a:b"), Err(SignError::BadName { .. })));
        assert!(matches!(generate(""), Err(SignError::BadName { .. })));
        let key = generate("k").unwrap();
        let public = key.public_key().to_string();
        assert!(matches!(
            SigningKey::parse(&public),
            Err(SignError::Malformed { .. })
        ));
        // A secret whose public half belongs to another key.
        let mut pair = key.key.to_keypair_bytes();
        pair[32..].copy_from_slice(generate("x").unwrap().public_key().key.as_bytes());
        let bad = format!("k:{}", B64.encode(pair));
        assert!(matches!(
            SigningKey::parse(&bad),
            Err(SignError::Malformed { .. })
        ));
        assert!(matches!(
            PublicKey::parse("k:AAAA"),
            Err(SignError::Malformed { .. })
        ));
        assert_eq!(
            PublicKey::parse(&format!("{public}\n")).unwrap(),
            key.public_key()
        );
        let e = PublicKey::load(Path::new("/nonexistent/k.pub")).unwrap_err();
        assert!(matches!(e, SignError::Io { .. }), "{e}");
    }
}
