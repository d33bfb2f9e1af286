//! Audits: what differs between two builds' outputs, file by file, for reproducibility work.
//!
//! ```text
//! layer A tar ─┐                          (uncompressed tar streams, both in path_cmp order)
//! layer B tar ─┴► layers::diff_layers ──► FileDiff per differing path ──► text lines / JSON
//! layer tar + path ──► layers::extract_file ──► a file ─┐
//! layer tar + path ──► layers::extract_file ──► a file ─┴► layers::diffoscope ──► its report
//! ```
//!
//! Paths and other raw bytes (file names, link targets, xattr names) are shown as [`ByteName`]:
//! UTF-8 text as is, other bytes, control characters and `\` escaped, so every name survives
//! the trip through text or JSON.

pub mod builds;
pub mod layers;

use std::fmt;
use std::path::PathBuf;

pub use layers::{
    Change, DiffSummary, EntryKind, Extracted, Field, FieldName, FileDiff, LayerDiff, diff_layers,
    diff_layers_all, diffoscope, extract_file,
};

/// Errors of the audit module. Each names the layer or file involved and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The tar stream could not be read or is not a tar.
    #[error(
        "cannot read the {layer} layer's tar stream: {source}; pass the uncompressed tar (zstd -d the cache blob first)"
    )]
    Read {
        layer: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The stream is not in strata's entry order, so a merge join cannot compare it.
    #[error(
        "the {layer} layer is not in strata's path order ({path} comes after {previous}); only layers packed by strata, or sorted the same way, can be compared"
    )]
    Unsorted {
        layer: &'static str,
        path: ByteName,
        previous: ByteName,
    },
    /// An entry strata's layers never contain.
    #[error("the {layer} layer has an unexpected entry at {path}: {what}")]
    Format {
        layer: &'static str,
        path: ByteName,
        what: String,
    },
    /// The caller's cancel check said stop.
    #[error("cancelled")]
    Cancelled,
    /// The path asked for is not an entry of the layer.
    #[error(
        "{path} is not an entry of the layer (or only its whiteout is); list the layer's differences to see its paths"
    )]
    NotFound { path: ByteName },
    /// Writing an extracted file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// diffoscope could not be run or failed (exit status 2 or a signal).
    #[error("diffoscope failed on {} and {}: {what}", a.display(), b.display())]
    Diffoscope {
        a: PathBuf,
        b: PathBuf,
        what: String,
    },
}

/// Raw bytes (a path, a link target, an xattr name) shown as text: valid UTF-8 as is except that
/// `\` becomes `\\` and control characters and invalid bytes become `\xNN`. [`ByteName::parse`]
/// reverses it exactly, so the JSON form is lossless.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteName(pub Vec<u8>);

impl ByteName {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        ByteName(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes an escaped text names, or None when the text is not a valid escape.
    pub fn parse(text: &str) -> Option<ByteName> {
        let mut out = Vec::with_capacity(text.len());
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                out.push(b[i]);
                i += 1;
                continue;
            }
            match b.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let hex = text.get(i + 2..i + 4)?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 4;
                }
                _ => return None,
            }
        }
        Some(ByteName(out))
    }
}

impl fmt::Display for ByteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    c if c.is_control() => {
                        let mut utf8 = [0u8; 4];
                        for byte in c.encode_utf8(&mut utf8).bytes() {
                            write!(f, "\\x{byte:02x}")?;
                        }
                    }
                    c => write!(f, "{c}")?,
                }
            }
            for &byte in chunk.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for ByteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ByteName::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("bad escape in name {text:?}")))
    }
}

#[cfg(test)]
mod name_tests {
    use super::ByteName;

    #[test]
    fn escapes_round_trip_and_keep_utf8_readable() {
        for raw in [
            &b"etc/hostname"[..],
            b"caf\xc3\xa9",
            b"bad\xff\xfeend",
            b"back\\slash",
            b"new\nline\t\x7f",
            b"\\x41",
            b"nel\xc2\x85",
            b"",
        ] {
            let n = ByteName::new(raw);
            let text = n.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert_eq!(ByteName::parse(&text), Some(n.clone()), "{text}");
            let json = serde_json::to_string(&n).unwrap();
            let back: ByteName = serde_json::from_str(&json).unwrap();
            assert_eq!(back, n);
        }
        assert_eq!(ByteName::new(&b"caf\xc3\xa9"[..]).to_string(), "café");
        assert_eq!(ByteName::new(&b"a\xffb"[..]).to_string(), "a\\xffb");
        assert_eq!(ByteName::parse("a\\q"), None);
        assert_eq!(ByteName::parse("a\\x4"), None);
    }
}
