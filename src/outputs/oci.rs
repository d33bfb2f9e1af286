//! Container image outputs of a finished root tree: an OCI image layout folder (`NAME.oci/`)
//! and a `docker load` archive (`NAME.docker.tar`), each holding ONE layer, the whole tree.
//!
//! ```text
//! root + Scan ─► layer::write_tar_dense (`-t tar`'s tar, holes as zeros), ONE stream ─► Fan
//!   Fan ─┬─► sha256 + blake3 + size of the uncompressed tar     (diff id, strata's identity)
//!        ├─► gzip | zstd | as is ─► sha256 ─► NAME.oci/blobs/sha256/<layer>   (temp folder)
//!        └─► NAME.docker.tar: header placeholder, the tar as the entry's data  (temp file)
//! then   config JSON (arch, os, rootfs.diff_ids, created, history, Env/Cmd) ─► blob
//!        OCI manifest ─► blob; index.json (ref.name = tag), oci-layout
//!        docker archive: header patched (name = its sha256, size), config, OCI manifest,
//!        index.json, manifest.json, oci-layout, repositories, end blocks ─► re-read for blake3
//!        temp file / temp folder ─rename─► NAME.docker.tar / NAME.oci (an old one swapped out)
//! ```
//!
//! Decisions, pinned by the tests:
//! - The layer is the deterministic tar of `-t tar` (`layer::write_tar`: sorted, numeric owners,
//!   PAX xattrs, hardlinks, mtimes clamped) except that files are never GNU sparse entries:
//!   docker, containerd and umoci (Go's `archive/tar`) refuse typeflag `S`. So its diff id
//!   equals the `-t tar` file's only for trees without such holes.
//! - The layer is gzip (`tar+gzip`) by default: every runtime reads it (Debian 12's umoci and
//!   docker refuse zstd layers). [`Compression::Zstd`] (`tar+zstd`, `pack.level`, multithreaded
//!   with `pack.workers`, so the bytes do not depend on the core count) and
//!   [`Compression::None`] (`tar`) are options. gzip is one member made in parallel like pigz
//!   (1 MiB blocks deflated by flate2 at [`ImageOptions::gzip_level`] in `pack.workers` threads,
//!   joined by sync flushes; no file name, mtime 0, OS byte 3): its bytes depend only on the
//!   tar and the level, never on the thread count.
//! - Times: with `source_date_epoch` the config's `created` and its history entry are that
//!   instant (RFC 3339, UTC, clamped to 1970..9999) and the archive's own entries carry it as
//!   mtime; without it `created` is left out (the image-spec makes it optional: "unknown") and
//!   the archive's entries have mtime 0. Either way two writes of one tree are byte-identical.
//!   The layer's file times are `pack.source_date_epoch`'s business (clamped by `write_tar`);
//!   callers set both from the same SOURCE_DATE_EPOCH.
//! - Run config: `Env` is `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`
//!   (the PATH docker gives containers); `Cmd` is `["/bin/sh"]` when `/bin/sh` resolves, inside
//!   the tree (symlinks followed within it, as merged-/usr trees need), to an executable file,
//!   and is left out otherwise (then `docker run IMAGE CMD` must name a command).
//! - Architecture: dpkg names map to OCI's GOARCH + variant ([`platform`]); os is `linux`.
//! - Docker name: `RepoTags` is `REPO:TAG`, REPO from the image name by [`docker_repository`].
//! - The layout's identity ([`OciLayout::blake3`]) is the blake3 of its `index.json`: that file
//!   pins the manifest by sha256, which pins the config and the layer by sha256. The archive's
//!   identity is the blake3 of the archive file.
//! - The docker archive is the format `docker save` writes since docker 25: `manifest.json` +
//!   `repositories` + blobs under `blobs/sha256/`, plus the OCI `index.json`/`oci-layout` (its
//!   manifest names the uncompressed layer), so `docker load`, `skopeo … docker-archive:` and
//!   `… oci-archive:` all read it (docker 20.10, Debian 12's, loads it too). Entries are
//!   root-owned, mode 0644 (dirs 0755).
//! - The layer is never held in memory: it streams from the tree to the files. The archive's
//!   layer entry is written with a placeholder header that is patched once the size and
//!   digest are known, so the archive's blake3 needs one re-read of the finished file.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::layer::{self, Changeset, LayerError, PackOptions, Scan};

/// `mediaType` of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// `mediaType` of an OCI image index (`index.json`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// `mediaType` of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The annotation that names a manifest in `index.json` (the tag).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The `PATH` in the image config's `Env`.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Last second of year 9999: the largest time RFC 3339 can carry.
const MAX_CREATED: u64 = 253_402_300_799;
const BUF: usize = 1 << 20;
/// The archive's directory entries, then the layer entry's header at this offset.
const ARCHIVE_DIRS: [&str; 2] = ["blobs/", "blobs/sha256/"];
const LAYER_HEADER_AT: u64 = 512 * ARCHIVE_DIRS.len() as u64;

/// How the layout's layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`: read by every runtime.
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`: smaller and faster; newer runtimes only.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`: the tar as is.
    None,
}

impl Compression {
    /// The layer descriptor's `mediaType`.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// `gzip`, `zstd` or `none` (as a command-line value would spell it).
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            "none" => Some(Compression::None),
            _ => None,
        }
    }
}

/// How to write the image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// The layout's layer compression (the docker archive's layer is always plain tar).
    pub compression: Compression,
    /// flate2 level (0..=9) of a gzip layer; default 6, as `gzip` and Go's default.
    pub gzip_level: u32,
    /// SOURCE_DATE_EPOCH: the config's `created` and the archive entries' mtime.
    pub source_date_epoch: Option<i64>,
    /// Target architecture, dpkg name (`amd64`, `arm64`, `armhf`, …); see [`platform`].
    pub arch: String,
    /// The tag: the layout's `ref.name` and the tag in the archive's `RepoTags`.
    pub tag: String,
    /// The history entry's `created_by` (e.g. the strata command line).
    pub created_by: String,
    /// The layer tar's options (mtime clamp; zstd level and workers of a zstd layer).
    pub pack: PackOptions,
}

impl Default for ImageOptions {
    /// gzip at level 6, no epoch, the host's arch, tag `latest`, created by `strata`.
    fn default() -> Self {
        ImageOptions {
            compression: Compression::Gzip,
            gzip_level: 6,
            source_date_epoch: None,
            arch: crate::arch::host_arch(),
            tag: "latest".into(),
            created_by: "strata".into(),
            pack: PackOptions::default(),
        }
    }
}

/// Which outputs to write (one tar stream feeds both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Formats {
    /// `NAME.oci/`, an OCI image layout.
    pub oci: bool,
    /// `NAME.docker.tar`, a docker-archive.
    pub docker: bool,
}

/// An OCI content descriptor (the fields strata writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
    pub size: u64,
}

/// OCI's name of a platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    /// GOARCH: `amd64`, `arm64`, `arm`, `386`, `ppc64le`, `s390x`, `riscv64`, …
    pub architecture: &'static str,
    /// `v8` for arm64, `v7` for armhf, `v5` for armel.
    pub variant: Option<&'static str>,
}

/// The uncompressed layer: what the image's config pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSums {
    /// `sha256:<hex>` of the uncompressed tar: the config's `rootfs.diff_ids[0]`.
    pub diff_id: String,
    /// blake3 (hex) of the uncompressed tar: strata's diff id of the whole tree.
    pub blake3: String,
    /// Length of the uncompressed tar.
    pub tar_size: u64,
    /// Tar entries (as [`layer::LayerInfo::entries`]).
    pub entries: u64,
}

/// A written OCI image layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayout {
    /// `NAME.oci`.
    pub path: PathBuf,
    /// blake3 (hex) of `index.json`: the layout's identity (see the module docs).
    pub blake3: String,
    pub manifest: Descriptor,
    pub config: Descriptor,
    /// The (compressed) layer blob.
    pub layer: Descriptor,
}

/// A written docker archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerArchive {
    /// `NAME.docker.tar`.
    pub path: PathBuf,
    /// blake3 (hex) of the archive file.
    pub blake3: String,
    pub size: u64,
    /// `REPO:TAG`, as in `manifest.json`'s `RepoTags`.
    pub repo_tag: String,
    /// `sha256:<hex>` of the config: the image id `docker load` reports.
    pub image_id: String,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub layer: LayerSums,
    /// The config blob (identical in both outputs).
    pub config: Descriptor,
    pub oci: Option<OciLayout>,
    pub docker: Option<DockerArchive>,
}

/// What a registry push of a written layout needs (see [`read_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushParts {
    /// The manifest's bytes, exactly as stored (its sha256 is `manifest.digest`).
    pub manifest_bytes: Vec<u8>,
    pub manifest: Descriptor,
    /// The config's bytes, exactly as stored.
    pub config_bytes: Vec<u8>,
    pub config: Descriptor,
    /// Each layer blob, in manifest order: its descriptor and the file holding it.
    pub layers: Vec<(Descriptor, PathBuf)>,
}

/// Errors of the container image outputs; each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The cancel check said stop; every temp file is gone and no output was replaced.
    #[error("writing the container image was cancelled; nothing was written")]
    Cancelled,
    #[error(
        "architecture {0:?} has no OCI name: use a dpkg name (amd64, arm64, armhf, armel, i386, ppc64el, s390x, riscv64, mips64el, loong64)"
    )]
    Arch(String),
    #[error(
        "image tag {0:?} is not valid: use 1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -"
    )]
    Tag(String),
    /// Reading the tree failed (or it changed) while packing the layer.
    #[error(transparent)]
    Layer(LayerError),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A layout on disk is not what strata writes (or was damaged).
    #[error("{} is not a usable OCI layout: {what}; write the image again", path.display())]
    Invalid { path: PathBuf, what: String },
}

/// `NAME.oci`.
pub fn oci_path(image_name: &str) -> PathBuf {
    PathBuf::from(format!("{image_name}.oci"))
}

/// `NAME.docker.tar`.
pub fn docker_path(image_name: &str) -> PathBuf {
    PathBuf::from(format!("{image_name}.docker.tar"))
}

/// Maps a dpkg architecture name to OCI's (GOARCH + variant): amd64→amd64, arm64→arm64/v8,
/// armhf→arm/v7, armel→arm/v5, i386→386, ppc64el→ppc64le, s390x, riscv64, mips64el→mips64le,
/// loong64. Anything else is an error.
pub fn platform(dpkg_arch: &str) -> Result<Platform, OciError> {
    let (architecture, variant) = match dpkg_arch {
        "amd64" => ("amd64", None),
        "arm64" => ("arm64", Some("v8")),
        "armhf" => ("arm", Some("v7")),
        "armel" => ("arm", Some("v5")),
        "i386" => ("386", None),
        "ppc64el" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        "mips64el" => ("mips64le", None),
        "loong64" => ("loong64", None),
        other => return Err(OciError::Arch(other.to_string())),
    };
    Ok(Platform {
        architecture,
        variant,
    })
}

/// The docker repository name for an image name (the rule, pinned by a test): the last path
/// component of `image_name`, ASCII-lowercased; letters and digits are kept; a run of other
/// characters becomes one separator: itself when it is exactly `.`, `_` or `__`, or a run of
/// `-` only; `-` otherwise; separators at either end are dropped; at most 128 characters (cut
/// at a letter or digit); `image` if nothing is left. The result matches docker's
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn docker_repository(image_name: &str) -> String {
    let base = image_name
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut out = String::new();
    let mut run = String::new();
    for c in base.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if !run.is_empty() {
                if !out.is_empty() {
                    let keep =
                        matches!(run.as_str(), "." | "_" | "__") || run.chars().all(|r| r == '-');
                    out.push_str(if keep { &run } else { "-" });
                }
                run.clear();
            }
            out.push(c);
        } else {
            run.push(c);
        }
    }
    if out.len() > 128 {
        out.truncate(128);
        while out.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
            out.pop();
        }
    }
    if out.is_empty() {
        out.push_str("image");
    }
    out
}

/// True for a docker/OCI tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
    !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(ok)
        && tag.chars().all(|c| ok(c) || c == '.' || c == '-')
}

/// Writes the container image outputs `formats` of the tree `root` (with its `scan`) as
/// `NAME.oci` / `NAME.docker.tar`, from ONE tar stream. Each output is built in a temp file or
/// folder beside it and renamed into place at the end (replacing an existing one); on an error
/// or when `cancelled()` turns true ([`OciError::Cancelled`]) nothing is left behind.
pub fn write(
    root: &Path,
    scan: &Scan,
    image_name: &str,
    formats: Formats,
    opts: &ImageOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<Written, OciError> {
    let platform = platform(&opts.arch)?;
    if !valid_tag(&opts.tag) {
        return Err(OciError::Tag(opts.tag.clone()));
    }
    if cancelled() {
        return Err(OciError::Cancelled);
    }
    // The gzip workers live in this scope; an early return drops their job queues, which
    // ends them before the scope joins them.
    std::thread::scope(|scope| {
        write_in(
            scope, root, scan, image_name, formats, opts, platform, cancelled,
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn write_in<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    root: &Path,
    scan: &Scan,
    image_name: &str,
    formats: Formats,
    opts: &ImageOptions,
    platform: Platform,
    cancelled: &dyn Fn() -> bool,
) -> Result<Written, OciError> {
    let mtime = opts
        .source_date_epoch
        .map_or(0, |e| e.clamp(0, MAX_CREATED as i64) as u64);

    let oci_dest = oci_path(image_name);
    let docker_dest = docker_path(image_name);
    let mut layout = if formats.oci {
        Some(LayoutBuilder::create(&oci_dest, opts, scope)?)
    } else {
        None
    };
    let mut archive = if formats.docker {
        Some(ArchiveBuilder::create(&docker_dest, mtime)?)
    } else {
        None
    };

    let mut fan = Fan {
        cancelled,
        was_cancelled: false,
        failed: None,
        sha: Sha256::new(),
        blake3: blake3::Hasher::new(),
        size: 0,
        layout: layout.as_mut().map(|l| &mut l.sink),
        archive: archive.as_mut().map(|a| &mut a.file),
    };
    let info = layer::write_tar_dense(root, &Changeset::full(scan), &mut fan, &opts.pack);
    let info = match info {
        Ok(i) => i,
        Err(_) if fan.was_cancelled => return Err(OciError::Cancelled),
        Err(LayerError::Write(source)) if fan.failed.is_some() => {
            return Err(OciError::Write {
                path: fan.failed.unwrap_or_default(),
                source,
            });
        }
        Err(e) => return Err(OciError::Layer(e)),
    };
    let layer = LayerSums {
        diff_id: sha256_digest(fan.sha.finalize().as_slice()),
        blake3: fan.blake3.finalize().to_hex().to_string(),
        tar_size: fan.size,
        entries: info.entries,
    };
    if cancelled() {
        return Err(OciError::Cancelled);
    }

    let config_bytes = config_json(scan, platform, &layer, opts);
    let config = Descriptor {
        media_type: CONFIG_MEDIA_TYPE.into(),
        digest: sha256_digest(&Sha256::digest(&config_bytes)),
        size: config_bytes.len() as u64,
    };

    let oci = match layout {
        Some(l) => Some(l.finish(&config_bytes, &config, platform, opts, &oci_dest)?),
        None => None,
    };
    let docker = match archive {
        Some(a) => {
            let repo_tag = format!("{}:{}", docker_repository(image_name), opts.tag);
            Some(a.finish(
                &layer,
                &config_bytes,
                &config,
                platform,
                &opts.tag,
                &repo_tag,
                &docker_dest,
                cancelled,
            )?)
        }
        None => None,
    };
    // Last chance to stop: after this, the outputs replace what was there.
    if cancelled() {
        return Err(OciError::Cancelled);
    }
    let oci = match oci {
        Some((done, tmp)) => {
            replace_dir(tmp, &oci_dest)?;
            Some(done)
        }
        None => None,
    };
    let docker = match docker {
        Some((done, tmp)) => {
            tmp.persist(&docker_dest).map_err(|e| OciError::Write {
                path: docker_dest.clone(),
                source: e.error,
            })?;
            Some(done)
        }
        None => None,
    };
    Ok(Written {
        layer,
        config,
        oci,
        docker,
    })
}

/// The blake3 (hex) of a layout's `index.json`: its identity (see the module docs).
pub fn layout_blake3(dir: &Path) -> Result<String, OciError> {
    let p = dir.join("index.json");
    let bytes = fs::read(&p).map_err(|source| OciError::Read { path: p, source })?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Reads what a registry push of the image tagged `tag` in the layout `dir` needs: the
/// manifest's and config's bytes (checked against their sha256 digests and sizes) and each
/// layer blob's file (its size checked; its digest is the registry's to check on upload).
pub fn read_layout(dir: &Path, tag: &str) -> Result<PushParts, OciError> {
    let invalid = |what: String| OciError::Invalid {
        path: dir.to_path_buf(),
        what,
    };
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|source| OciError::Read {
        path: index_path.clone(),
        source,
    })?;
    let index: IndexIn = serde_json::from_slice(&index_bytes)
        .map_err(|e| invalid(format!("index.json does not parse ({e})")))?;
    let entry = index
        .manifests
        .into_iter()
        .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
        .ok_or_else(|| invalid(format!("index.json has no manifest tagged {tag:?}")))?;
    if entry.descriptor.media_type != MANIFEST_MEDIA_TYPE {
        return Err(invalid(format!(
            "the manifest tagged {tag:?} is a {}, not an image manifest",
            entry.descriptor.media_type
        )));
    }
    let manifest_bytes = read_blob(dir, &entry.descriptor)?;
    let manifest: ManifestIn = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        invalid(format!(
            "manifest {} does not parse ({e})",
            entry.descriptor.digest
        ))
    })?;
    let config_bytes = read_blob(dir, &manifest.config)?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for d in manifest.layers {
        let path = blob_path(dir, &d.digest)?;
        let len = fs::metadata(&path)
            .map_err(|source| OciError::Read {
                path: path.clone(),
                source,
            })?
            .len();
        if len != d.size {
            return Err(invalid(format!(
                "layer blob {} has {len} bytes, its manifest says {}",
                d.digest, d.size
            )));
        }
        layers.push((d, path));
    }
    Ok(PushParts {
        manifest_bytes,
        manifest: entry.descriptor,
        config_bytes,
        config: manifest.config,
        layers,
    })
}

// ---------------------------------------------------------------------------------------------
// JSON documents (struct field order is the key order: the bytes are deterministic)

#[derive(Serialize)]
struct ImageConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    architecture: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    os: &'a str,
    config: RunConfig,
    rootfs: RootFs<'a>,
    history: Vec<History<'a>>,
}

#[derive(Serialize)]
struct RunConfig {
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<Vec<String>>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    r#type: &'a str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
struct History<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    created_by: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: &'a Descriptor,
    layers: Vec<&'a Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<IndexEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry<'a> {
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    annotations: BTreeMap<&'a str, &'a str>,
    platform: PlatformJson<'a>,
}

#[derive(Serialize)]
struct PlatformJson<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest<'a> {
    config: String,
    repo_tags: Vec<&'a str>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct IndexIn {
    manifests: Vec<IndexEntryIn>,
}

#[derive(Deserialize)]
struct IndexEntryIn {
    #[serde(flatten)]
    descriptor: Descriptor,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ManifestIn {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn json(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(value).unwrap_or_default()
}

fn config_json(scan: &Scan, platform: Platform, layer: &LayerSums, opts: &ImageOptions) -> Vec<u8> {
    let created = opts.source_date_epoch.map(|e| {
        let secs = e.clamp(0, MAX_CREATED as i64) as u64;
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    });
    let has_sh = resolve(scan, b"bin/sh")
        .is_some_and(|m| m.kind == layer::FileKind::File && m.mode & 0o111 != 0);
    let doc = ImageConfig {
        created: created.clone(),
        architecture: platform.architecture,
        variant: platform.variant,
        os: "linux",
        config: RunConfig {
            env: vec![DEFAULT_PATH.to_string()],
            cmd: has_sh.then(|| vec!["/bin/sh".to_string()]),
        },
        rootfs: RootFs {
            r#type: "layers",
            diff_ids: vec![&layer.diff_id],
        },
        history: vec![History {
            created,
            created_by: &opts.created_by,
        }],
    };
    json(&doc)
}

fn manifest_json(config: &Descriptor, layer: &Descriptor) -> Vec<u8> {
    json(&Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config,
        layers: vec![layer],
    })
}

fn index_json(manifest: &Descriptor, tag: &str, platform: Platform) -> Vec<u8> {
    json(&Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE,
        manifests: vec![IndexEntry {
            media_type: &manifest.media_type,
            digest: &manifest.digest,
            size: manifest.size,
            annotations: BTreeMap::from([(REF_NAME, tag)]),
            platform: PlatformJson {
                architecture: platform.architecture,
                os: "linux",
                variant: platform.variant,
            },
        }],
    })
}

/// The metadata of `path` (relative, no leading `/`) in the scanned tree, following symlinks
/// inside the tree (an absolute target is taken from the tree's root; `..` stops at the root);
/// None when it does not resolve or loops.
fn resolve<'s>(scan: &'s Scan, path: &[u8]) -> Option<&'s layer::Meta> {
    use std::os::unix::ffi::OsStrExt;
    let get =
        |parts: &[Vec<u8>]| scan.get(Path::new(std::ffi::OsStr::from_bytes(&parts.join(&b'/'))));
    let mut todo: Vec<Vec<u8>> = path
        .split(|&b| b == b'/')
        .rev()
        .map(<[u8]>::to_vec)
        .collect();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.as_slice() {
            b"" | b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        done.push(part);
        let meta = get(&done)?;
        if meta.kind == layer::FileKind::Symlink {
            hops += 1;
            if hops > 40 {
                return None;
            }
            done.pop();
            let target = meta.link_target.as_deref().unwrap_or_default();
            if target.starts_with(b"/") {
                done.clear();
            }
            todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
        }
    }
    get(&done)
}

// ---------------------------------------------------------------------------------------------
// Writing

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(bytes))
}

/// `sha256:<hex>` → its hex, after checking it is 64 lowercase hex digits (a digest from a
/// layout on disk becomes a file name).
fn digest_hex(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(h)
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let h = digest_hex(digest).ok_or_else(|| OciError::Invalid {
        path: dir.to_path_buf(),
        what: format!("{digest:?} is not a sha256 digest"),
    })?;
    Ok(dir.join("blobs/sha256").join(h))
}

fn read_blob(dir: &Path, d: &Descriptor) -> Result<Vec<u8>, OciError> {
    let path = blob_path(dir, &d.digest)?;
    let bytes = fs::read(&path).map_err(|source| OciError::Read {
        path: path.clone(),
        source,
    })?;
    if bytes.len() as u64 != d.size || sha256_digest(&Sha256::digest(&bytes)) != d.digest {
        return Err(OciError::Invalid {
            path: dir.to_path_buf(),
            what: format!("blob {} does not match its digest or size", d.digest),
        });
    }
    Ok(bytes)
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder a destination's temp file or folder goes in.
fn parent_of(dest: &Path) -> &Path {
    dest.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A file opened for writing, hashed (sha256) and counted as it is written.
struct Counted {
    w: BufWriter<File>,
    sha: Sha256,
    n: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.w.write(buf)?;
        self.sha.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The layout's layer blob being written.
enum BlobSink {
    Plain(Counted),
    Gzip(ParGz),
    Zstd(zstd::Encoder<'static, Counted>),
}

impl BlobSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            BlobSink::Plain(w) => w.write_all(buf),
            BlobSink::Gzip(w) => w.write_all(buf),
            BlobSink::Zstd(w) => w.write_all(buf),
        }
    }

    fn finish(self) -> io::Result<Counted> {
        let mut c = match self {
            BlobSink::Plain(w) => w,
            BlobSink::Gzip(w) => w.finish()?,
            BlobSink::Zstd(w) => w.finish()?,
        };
        c.w.flush()?;
        Ok(c)
    }
}

/// Input bytes per gzip block. Fixed: the output depends on it, never on the thread count.
const GZ_BLOCK: usize = 1 << 20;
/// Blocks queued per worker before the writer waits for the oldest.
const GZ_QUEUE: usize = 2;

type GzWorker = (SyncSender<Vec<u8>>, Receiver<io::Result<Vec<u8>>>);

/// Parallel gzip, one member (as pigz, without the dictionary carry-over): the stream is cut
/// into [`GZ_BLOCK`] pieces, each raw-deflated on its own (in `workers` threads, round robin)
/// and ended with a sync flush, so the pieces concatenate into one deflate stream; an empty
/// final block, the CRC-32 and the length close it. The header has no name, mtime 0, OS 3.
/// The bytes depend only on the input and the level.
struct ParGz {
    out: Counted,
    /// Per worker: its job queue (input blocks) and its results, in the order sent.
    workers: Vec<GzWorker>,
    buf: Vec<u8>,
    sent: usize,
    written: usize,
    crc: crc32fast::Hasher,
    len: u64,
}

impl ParGz {
    fn new<'scope>(
        mut out: Counted,
        level: u32,
        workers: usize,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> io::Result<ParGz> {
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        let level = flate2::Compression::new(level.min(9));
        let workers = (0..workers.max(1))
            .map(|_| {
                let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(GZ_QUEUE);
                let (done_tx, done_rx) = std::sync::mpsc::sync_channel(GZ_QUEUE + 1);
                scope.spawn(move || {
                    let mut c = flate2::Compress::new(level, false);
                    for block in job_rx {
                        let r = deflate_block(&mut c, &block);
                        c.reset();
                        if done_tx.send(r).is_err() {
                            break;
                        }
                    }
                });
                (job_tx, done_rx)
            })
            .collect();
        Ok(ParGz {
            out,
            workers,
            buf: Vec::with_capacity(GZ_BLOCK),
            sent: 0,
            written: 0,
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.crc.update(data);
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (GZ_BLOCK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == GZ_BLOCK {
                self.send()?;
            }
        }
        Ok(())
    }

    fn gone() -> io::Error {
        io::Error::other("a gzip worker thread ended early")
    }

    fn send(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(GZ_BLOCK));
        if self.sent - self.written >= self.workers.len() * GZ_QUEUE {
            self.write_next()?;
        }
        let n = self.workers.len();
        self.workers[self.sent % n]
            .0
            .send(block)
            .map_err(|_| Self::gone())?;
        self.sent += 1;
        Ok(())
    }

    /// Writes the oldest block still being compressed, waiting for it.
    fn write_next(&mut self) -> io::Result<()> {
        let n = self.workers.len();
        let block = self.workers[self.written % n]
            .1
            .recv()
            .map_err(|_| Self::gone())??;
        self.out.write_all(&block)?;
        self.written += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<Counted> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        while self.written < self.sent {
            self.write_next()?;
        }
        // An empty final block (fixed Huffman, end-of-block only), then the gzip trailer.
        self.out.write_all(&[3, 0])?;
        self.out
            .write_all(&self.crc.clone().finalize().to_le_bytes())?;
        self.out.write_all(&(self.len as u32).to_le_bytes())?;
        Ok(self.out)
    }
}

/// Raw deflate of one block, ended with a sync flush (byte-aligned, not final).
fn deflate_block(c: &mut flate2::Compress, input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 8 + 64);
    let start = c.total_in();
    loop {
        let done = (c.total_in() - start) as usize;
        c.compress_vec(&input[done..], &mut out, flate2::FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // A flush is complete once all input is in and the output did not fill up.
        if (c.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(4096));
    }
}

/// The tar stream's destinations: hashes of the stream itself, the layout's blob, the
/// archive's layer entry. Checks `cancelled` on every write (write_tar writes in ~1 MiB runs).
struct Fan<'a> {
    cancelled: &'a dyn Fn() -> bool,
    was_cancelled: bool,
    /// The file whose write failed.
    failed: Option<PathBuf>,
    sha: Sha256,
    blake3: blake3::Hasher,
    size: u64,
    layout: Option<&'a mut (BlobSink, PathBuf)>,
    archive: Option<&'a mut (BufWriter<tempfile::NamedTempFile>, PathBuf)>,
}

impl Write for Fan<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if (self.cancelled)() {
            self.was_cancelled = true;
            return Err(io::Error::other("cancelled"));
        }
        self.sha.update(buf);
        self.blake3.update(buf);
        self.size += buf.len() as u64;
        if let Some((sink, path)) = self.layout.as_deref_mut() {
            sink.write_all(buf)
                .inspect_err(|_| self.failed = Some(path.clone()))?;
        }
        if let Some((w, path)) = self.archive.as_deref_mut() {
            w.write_all(buf)
                .inspect_err(|_| self.failed = Some(path.clone()))?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        // Not the compressors: a flush there is a sync point, extra bytes in the stream.
        Ok(())
    }
}

/// `NAME.oci` being built in a temp folder beside it.
struct LayoutBuilder {
    dir: tempfile::TempDir,
    /// Held while the folder is written, so a later build's sweep tells it from a leftover.
    _lock: fs::File,
    /// The blob sink and the temp file it writes (for error messages).
    sink: (BlobSink, PathBuf),
}

impl LayoutBuilder {
    fn create<'scope>(
        dest: &Path,
        opts: &ImageOptions,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> Result<LayoutBuilder, OciError> {
        let parent = parent_of(dest);
        let (dir, lock) =
            crate::fsutil::locked_temp_dir_in(parent, crate::fsutil::OUTPUT_TEMP_PREFIX)
                .map_err(write_err(parent))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(write_err(dir.path()))?;
        let blobs = dir.path().join("blobs/sha256");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&blobs)
            .map_err(write_err(&blobs))?;
        let tmp = blobs.join(".layer");
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        let counted = Counted {
            w: BufWriter::with_capacity(BUF, file),
            sha: Sha256::new(),
            n: 0,
        };
        let sink = match opts.compression {
            Compression::None => BlobSink::Plain(counted),
            Compression::Gzip => BlobSink::Gzip(
                ParGz::new(
                    counted,
                    opts.gzip_level,
                    opts.pack.workers.max(1) as usize,
                    scope,
                )
                .map_err(write_err(&tmp))?,
            ),
            Compression::Zstd => {
                let mut enc =
                    zstd::Encoder::new(counted, opts.pack.level).map_err(write_err(&tmp))?;
                enc.multithread(opts.pack.workers.max(1))
                    .map_err(write_err(&tmp))?;
                enc.include_checksum(true).map_err(write_err(&tmp))?;
                BlobSink::Zstd(enc)
            }
        };
        Ok(LayoutBuilder {
            dir,
            _lock: lock,
            sink: (sink, tmp),
        })
    }

    /// Finishes the layer blob, writes config, manifest, index.json and oci-layout; returns
    /// the result and the temp folder (to be renamed into place).
    fn finish(
        self,
        config_bytes: &[u8],
        config: &Descriptor,
        platform: Platform,
        opts: &ImageOptions,
        dest: &Path,
    ) -> Result<(OciLayout, tempfile::TempDir), OciError> {
        let (sink, tmp) = self.sink;
        let counted = sink.finish().map_err(write_err(&tmp))?;
        let layer = Descriptor {
            media_type: opts.compression.media_type().into(),
            digest: sha256_digest(counted.sha.finalize().as_slice()),
            size: counted.n,
        };
        let root = self.dir.path();
        let layer_path = blob_path(root, &layer.digest)?;
        fs::rename(&tmp, &layer_path).map_err(write_err(&layer_path))?;
        let put = |name: &Path, bytes: &[u8]| -> Result<(), OciError> {
            let p = root.join(name);
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&p)
                .and_then(|mut f| f.write_all(bytes))
                .map_err(write_err(&p))
        };
        put(&blob_path(Path::new(""), &config.digest)?, config_bytes)?;
        let manifest_bytes = manifest_json(config, &layer);
        let manifest = Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            digest: sha256_digest(&Sha256::digest(&manifest_bytes)),
            size: manifest_bytes.len() as u64,
        };
        put(
            &blob_path(Path::new(""), &manifest.digest)?,
            &manifest_bytes,
        )?;
        let index = index_json(&manifest, &opts.tag, platform);
        put(Path::new("index.json"), &index)?;
        put(Path::new("oci-layout"), OCI_LAYOUT)?;
        Ok((
            OciLayout {
                path: dest.to_path_buf(),
                blake3: blake3::hash(&index).to_hex().to_string(),
                manifest,
                config: config.clone(),
                layer,
            },
            self.dir,
        ))
    }
}

/// `NAME.docker.tar` being built in a temp file beside it.
struct ArchiveBuilder {
    file: (BufWriter<tempfile::NamedTempFile>, PathBuf),
    mtime: u64,
}

/// A GNU tar header for one of the archive's own entries: root-owned, fixed mode and mtime.
fn entry_header(name: &str, kind: EntryType, size: u64, mtime: u64) -> Header {
    let mut h = Header::new_gnu();
    if let Some(g) = h.as_gnu_mut() {
        let n = name.len().min(g.name.len());
        g.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
    h.set_entry_type(kind);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(size);
    h.set_cksum();
    h
}

fn pad(w: &mut impl Write, n: u64) -> io::Result<()> {
    let p = ((512 - n % 512) % 512) as usize;
    w.write_all(&[0u8; 512][..p])
}

impl ArchiveBuilder {
    fn create(dest: &Path, mtime: u64) -> Result<ArchiveBuilder, OciError> {
        let parent = parent_of(dest);
        // Locked while written, so a later build's sweep tells it from a leftover.
        let tmp = crate::fsutil::locked_temp_in(parent, crate::fsutil::OUTPUT_TEMP_PREFIX)
            .map_err(write_err(parent))?;
        let shown = tmp.path().to_path_buf();
        fs::set_permissions(&shown, fs::Permissions::from_mode(0o644))
            .map_err(write_err(&shown))?;
        let mut w = BufWriter::with_capacity(BUF, tmp);
        (|| -> io::Result<()> {
            for d in ARCHIVE_DIRS {
                w.write_all(entry_header(d, EntryType::Directory, 0, mtime).as_bytes())?;
            }
            // The layer entry's header, patched in `finish`.
            w.write_all(&[0u8; 512])
        })()
        .map_err(write_err(&shown))?;
        Ok(ArchiveBuilder {
            file: (w, shown),
            mtime,
        })
    }

    /// Ends the layer entry, appends the archive's documents, patches the layer header, and
    /// hashes the file; returns the result and the temp file (to be renamed into place).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        layer: &LayerSums,
        config_bytes: &[u8],
        config: &Descriptor,
        platform: Platform,
        tag: &str,
        repo_tag: &str,
        dest: &Path,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(DockerArchive, tempfile::NamedTempFile), OciError> {
        let (mut w, shown) = self.file;
        let mtime = self.mtime;
        let layer_hex = digest_hex(&layer.diff_id).unwrap_or_default().to_string();
        let config_hex = digest_hex(&config.digest).unwrap_or_default().to_string();
        let layer_name = format!("blobs/sha256/{layer_hex}");
        let config_name = format!("blobs/sha256/{config_hex}");
        // In the archive the layer is the plain tar: its digest is the diff id.
        let layer_desc = Descriptor {
            media_type: Compression::None.media_type().into(),
            digest: layer.diff_id.clone(),
            size: layer.tar_size,
        };
        let manifest_bytes = manifest_json(config, &layer_desc);
        let manifest = Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            digest: sha256_digest(&Sha256::digest(&manifest_bytes)),
            size: manifest_bytes.len() as u64,
        };
        let docker_manifest = json(&[DockerManifest {
            config: config_name.clone(),
            repo_tags: vec![repo_tag],
            layers: vec![layer_name.clone()],
        }]);
        let (repo, _) = repo_tag.rsplit_once(':').unwrap_or((repo_tag, tag));
        let repositories = json(&BTreeMap::from([(
            repo,
            BTreeMap::from([(tag, layer_hex.as_str())]),
        )]));
        let docs: [(String, &[u8]); 6] = [
            (config_name, config_bytes),
            (
                format!(
                    "blobs/sha256/{}",
                    digest_hex(&manifest.digest).unwrap_or_default()
                ),
                &manifest_bytes,
            ),
            ("index.json".into(), &index_json(&manifest, tag, platform)),
            ("manifest.json".into(), &docker_manifest),
            ("oci-layout".into(), OCI_LAYOUT),
            ("repositories".into(), &repositories),
        ];
        (|| -> io::Result<()> {
            pad(&mut w, layer.tar_size)?;
            for (name, bytes) in &docs {
                w.write_all(
                    entry_header(name, EntryType::Regular, bytes.len() as u64, mtime).as_bytes(),
                )?;
                w.write_all(bytes)?;
                pad(&mut w, bytes.len() as u64)?;
            }
            w.write_all(&[0u8; 1024])?;
            w.flush()
        })()
        .map_err(write_err(&shown))?;
        let tmp = w.into_inner().map_err(|e| OciError::Write {
            path: shown.clone(),
            source: e.into_error(),
        })?;
        let header = entry_header(&layer_name, EntryType::Regular, layer.tar_size, mtime);
        tmp.as_file()
            .write_all_at(header.as_bytes(), LAYER_HEADER_AT)
            .map_err(write_err(&shown))?;
        let (blake3, size) = hash_file(tmp.path(), cancelled)?;
        Ok((
            DockerArchive {
                path: dest.to_path_buf(),
                blake3,
                size,
                repo_tag: repo_tag.to_string(),
                image_id: config.digest.clone(),
            },
            tmp,
        ))
    }
}

/// blake3 (hex) and length of a file, checking `cancelled` between 1 MiB reads.
fn hash_file(path: &Path, cancelled: &dyn Fn() -> bool) -> Result<(String, u64), OciError> {
    let read_err = |source| OciError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        if cancelled() {
            return Err(OciError::Cancelled);
        }
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), n))
}

/// Puts the finished temp folder at `dest`: renamed, or atomically exchanged with what is
/// there (which is then removed).
fn replace_dir(tmp: tempfile::TempDir, dest: &Path) -> Result<(), OciError> {
    if dest.symlink_metadata().is_err() {
        fs::rename(tmp.path(), dest).map_err(write_err(dest))?;
        let _ = tmp.keep();
        return Ok(());
    }
    if !crate::fsutil::exchange(tmp.path(), dest).map_err(write_err(dest))? {
        // No exchange on this file system: move the old one aside, then rename.
        let parent = parent_of(dest);
        let aside = tempfile::Builder::new()
            .prefix(".strata-old.")
            .tempdir_in(parent)
            .map_err(write_err(parent))?;
        let old = aside.path().join("old");
        fs::rename(dest, &old).map_err(write_err(dest))?;
        fs::rename(tmp.path(), dest).map_err(write_err(dest))?;
        let _ = tmp.keep();
        remove_old(&old);
        return Ok(());
    }
    // The old output is now at the temp path.
    let old = tmp.keep();
    remove_old(&old);
    Ok(())
}

fn remove_old(old: &Path) {
    let removed = match old.symlink_metadata() {
        Ok(md) if md.is_dir() => fs::remove_dir_all(old),
        Ok(_) => fs::remove_file(old),
        Err(_) => Ok(()),
    };
    if let Err(e) = removed {
        tracing::warn!(
            "cannot remove the replaced output at {} ({e}); delete it by hand",
            old.display()
        );
    }
}

#[cfg(test)]
#[path = "oci_tests.rs"]
mod tests;
