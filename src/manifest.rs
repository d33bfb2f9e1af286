//! `NAME.strata.json`: the record of one build, as one typed struct that is both written and
//! read back (by the unchanged-output check of the next build, by `strata diff`, by tests).
//!
//! ```text
//! executor ──► Manifest { versions, image, arch, arguments, SOURCE_DATE_EPOCH, elements
//!                         (name + content digest), steps (phase, hook, key, diff id, cached,
//!                         seconds, the inputs that made the key), rootfs digest, outputs }
//!          ──write()──► NAME.strata.json (atomic)      read() ◄── a later build, `strata diff`
//! ```
//!
//! The schema is versioned by `schema` ([`SCHEMA`]); fields are only added within a version
//! (readers ignore what they do not know, and fields added later have defaults, so an older
//! manifest still reads).

use crate::key::{DiskKeyInputs, KeyInputs};
use crate::outputs::Written;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest schema version.
pub const SCHEMA: u32 = 2;

/// One build's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub schema: u32,
    pub strata_version: String,
    pub cache_format_version: u32,
    pub image_name: String,
    pub arch: String,
    /// dib's DIB_ARGS for this build: output name, types, arch, -n, -p, elements.
    #[serde(default)]
    pub arguments: String,
    #[serde(default)]
    pub source_date_epoch: Option<i64>,
    #[serde(default)]
    pub elements: Vec<ManifestElement>,
    pub steps: Vec<ManifestStep>,
    /// blake3 over the diff ids of every rootfs layer in build order: equal digests mean the
    /// same final root filesystem (as built from the same layers).
    #[serde(default)]
    pub rootfs_digest: Option<String>,
    pub outputs: Vec<Written>,
    pub seconds: f64,
}

/// One element of the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestElement {
    pub name: String,
    /// blake3 of every file of the element (names, modes, contents), READMEs and tests left out.
    #[serde(default)]
    pub digest: String,
}

/// One step's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestStep {
    pub phase: String,
    pub hook: String,
    pub key: String,
    pub diff_id: Option<String>,
    pub cached: bool,
    pub seconds: f64,
    /// What entered the key.
    #[serde(default)]
    pub inputs: Option<StepInputs>,
}

impl ManifestStep {
    pub fn label(&self) -> String {
        format!("{}/{}", self.phase, self.hook)
    }
}

/// The inputs of a step's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StepInputs {
    Step(KeyInputs),
    Disk(DiskKeyInputs),
}

impl Manifest {
    /// Where the manifest of image `image_name` lives: beside its outputs.
    pub fn path_for(image_name: &str) -> PathBuf {
        PathBuf::from(format!("{image_name}.strata.json"))
    }

    /// Reads a manifest; the error names the file.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a strata build manifest", path.display()))
    }

    /// Writes the manifest atomically; returns its text.
    pub fn write(&self, path: &Path) -> Result<String> {
        let text = serde_json::to_string_pretty(self)?;
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        Ok(text)
    }

    /// The key of the last step (what the outputs are made from).
    pub fn last_key(&self) -> Option<&str> {
        self.steps.last().map(|s| s.key.as_str())
    }

    /// The recorded digest of the output of type `t`.
    pub fn output(&self, t: crate::outputs::OutputType) -> Option<&Written> {
        self.outputs.iter().find(|o| o.r#type == t)
    }
}

/// The rootfs digest of a list of steps (see [`Manifest::rootfs_digest`]).
pub fn rootfs_digest<'a>(diff_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"strata rootfs layers v1\0");
    for d in diff_ids {
        h.update(d.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::OutputType;

    #[test]
    fn a_manifest_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            schema: SCHEMA,
            strata_version: "0.1.0".into(),
            cache_format_version: 3,
            image_name: "img".into(),
            arch: "amd64".into(),
            arguments: "-o img -t tar -a amd64 e".into(),
            source_date_epoch: Some(5),
            elements: vec![ManifestElement {
                name: "e".into(),
                digest: "d".repeat(64),
            }],
            steps: vec![ManifestStep {
                phase: "install.d".into(),
                hook: "10-a".into(),
                key: "k".repeat(64),
                diff_id: None,
                cached: true,
                seconds: 0.0,
                inputs: None,
            }],
            rootfs_digest: Some(rootfs_digest(["a", "b"])),
            outputs: vec![Written {
                r#type: OutputType::Tar,
                path: "img.tar".into(),
                blake3: "b".repeat(64),
                cached: false,
            }],
            seconds: 1.5,
        };
        let p = dir.path().join("img.strata.json");
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), m);
        assert_eq!(m.last_key(), Some("k".repeat(64).as_str()));
        assert!(m.output(OutputType::Tar).is_some());
        assert_ne!(rootfs_digest(["a", "b"]), rootfs_digest(["ab"]));
    }

    #[test]
    fn an_older_manifest_without_new_fields_still_reads() {
        let text = r#"{"strata_version":"0.1.0","cache_format_version":2,"image_name":"x",
            "arch":"amd64","elements":[],"steps":[{"phase":"root.d","hook":"a","key":"k",
            "diff_id":null,"cached":false,"seconds":1.0}],"outputs":[{"type":"tar",
            "path":"x.tar","blake3":"b","cached":false}],"seconds":2.0}"#;
        let m: Manifest = serde_json::from_str(text).unwrap();
        assert_eq!(m.schema, 0);
        assert_eq!(m.steps[0].inputs, None);
    }
}
