//! The CA roots a client trusts: the system store, the registry's `certs.d` folders, and an
//! explicit extra CA file.
//!
//! ```text
//! rustls-native-certs (system store, SSL_CERT_FILE/DIR) ─┐
//! /etc/{docker,containers}/certs.d/HOST[:PORT]/*.crt   ─┼─► Vec<Certificate> ─► ureq RootCerts
//! ClientOptions::extra_ca_file                          ─┘
//! ```

use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, PemItem};

use super::{Registry, RegistryError};

/// Every root certificate the client for `registry` trusts.
pub(crate) fn roots(
    registry: &Registry,
    certs_dirs: &[PathBuf],
    extra_ca_file: Option<&Path>,
) -> Result<Vec<Certificate<'static>>, RegistryError> {
    let mut out: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("system CA store: {e}");
    }
    out.extend(
        native
            .certs
            .iter()
            .map(|der| Certificate::from_der(der.as_ref()).to_owned()),
    );
    for base in certs_dirs {
        let dir = base.join(&registry.host);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(RegistryError::Io { path: dir, source }),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        files.sort();
        for file in files {
            out.extend(pem_certs(registry, &file)?);
        }
    }
    if let Some(file) = extra_ca_file {
        out.extend(pem_certs(registry, file)?);
    }
    Ok(out)
}

/// The certificates in a PEM file; a file with none is an error (it was named to be trusted).
fn pem_certs(registry: &Registry, path: &Path) -> Result<Vec<Certificate<'static>>, RegistryError> {
    let bytes = std::fs::read(path).map_err(|source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |detail: String| RegistryError::Tls {
        registry: registry.to_string(),
        detail: format!("{}: {detail}", path.display()),
    };
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item.map_err(|e| bad(e.to_string()))? {
            PemItem::Certificate(c) => certs.push(c),
            _ => continue,
        }
    }
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".to_string()));
    }
    Ok(certs)
}
