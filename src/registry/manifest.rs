//! The OCI image manifest and descriptor as JSON (serde), enough to write and read the manifests
//! strata pushes: a config blob and a list of layer blobs, each named by digest, size and type.
//!
//! ```text
//! ImageManifest { schemaVersion: 2, mediaType, config: Descriptor, layers: [Descriptor], annotations }
//!   ─► to_bytes() (canonical: serde field order, no spaces) ─► Client::put_manifest
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::media_types;

/// A content descriptor: what a blob is, where to find it, how big it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest (schema version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// A manifest of `config` and `layers`, with the OCI manifest media type set.
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config,
            layers,
            annotations: BTreeMap::new(),
        }
    }

    /// The JSON bytes to push (and whose sha256 is the manifest's digest).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ImageManifest, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_oci_field_names() {
        let d = |t: &str| Descriptor {
            media_type: t.to_string(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 3,
            annotations: BTreeMap::new(),
        };
        let m = ImageManifest::new(
            d("application/x-config"),
            vec![d(media_types::OCI_LAYER_ZSTD)],
        );
        let bytes = m.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/x-config""#), "{text}");
        assert!(!text.contains("annotations"));
        assert_eq!(ImageManifest::from_bytes(&bytes).unwrap(), m);
    }
}
