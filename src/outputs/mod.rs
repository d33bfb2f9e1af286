//! Outputs: the output types a build can write (one table of what each is), the files they go
//! to, the host tools they need, and the one record of an output that was written.
//!
//! ```text
//! -t TYPES ──OutputType::parse──► [OutputType]  (table: name, file suffix, tree or disk, tool)
//! final tree ──write_from_tree──► tree::write ──► NAME.tar / NAME.tgz / NAME.squash
//!                               └► oci::write  ──► NAME.oci/ / NAME.docker.tar (one layer)
//! disk step  ──(exec::disk_step)──► NAME.qcow2 / NAME.raw / NAME.vhd    (disk outputs)
//! every output ──► Written { type, path, blake3, cached } ──► the manifest
//! ```
//!
//! This module knows nothing of steps or elements: it is handed a root folder (or a raw disk)
//! and a cache to keep what it writes in.

pub mod checksums;
pub mod folder;
pub mod oci;
pub mod stored;
pub mod tree;

use crate::exit::{Exit, Failure};
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::fmt;
use std::path::PathBuf;

/// One output type of `strata build -t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputType {
    Tar,
    Tgz,
    Squashfs,
    Qcow2,
    Raw,
    Vhd,
    Oci,
    Docker,
}

/// How an output type is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the finished root folder (or the mounted disk's root, in a disk build).
    Tree,
    /// From the raw disk image the disk step makes.
    Disk,
}

/// One row of [`TABLE`].
#[derive(Debug)]
pub struct TypeInfo {
    pub ty: OutputType,
    /// The name `-t` takes.
    pub name: &'static str,
    /// The file name suffix after `NAME.` (dib names squashfs `NAME.squash`).
    pub suffix: &'static str,
    pub source: Source,
    /// The host program it needs, and the Debian package that has it.
    pub tool: Option<(&'static str, &'static str)>,
}

/// Every output type, in `-t` help order.
pub const TABLE: &[TypeInfo] = &[
    TypeInfo {
        ty: OutputType::Qcow2,
        name: "qcow2",
        suffix: "qcow2",
        source: Source::Disk,
        tool: Some(("qemu-img", "qemu-utils")),
    },
    TypeInfo {
        ty: OutputType::Raw,
        name: "raw",
        suffix: "raw",
        source: Source::Disk,
        tool: None,
    },
    TypeInfo {
        ty: OutputType::Vhd,
        name: "vhd",
        suffix: "vhd",
        source: Source::Disk,
        tool: Some(("qemu-img", "qemu-utils")),
    },
    TypeInfo {
        ty: OutputType::Tar,
        name: "tar",
        suffix: "tar",
        source: Source::Tree,
        tool: None,
    },
    TypeInfo {
        ty: OutputType::Tgz,
        name: "tgz",
        suffix: "tgz",
        source: Source::Tree,
        tool: None,
    },
    TypeInfo {
        ty: OutputType::Squashfs,
        name: "squashfs",
        suffix: "squash",
        source: Source::Tree,
        tool: Some(("mksquashfs", "squashfs-tools")),
    },
    TypeInfo {
        ty: OutputType::Oci,
        name: "oci",
        suffix: "oci",
        source: Source::Tree,
        tool: None,
    },
    TypeInfo {
        ty: OutputType::Docker,
        name: "docker",
        suffix: "docker.tar",
        source: Source::Tree,
        tool: None,
    },
];

impl OutputType {
    fn info(self) -> &'static TypeInfo {
        TABLE
            .iter()
            .find(|i| i.ty == self)
            .unwrap_or_else(|| unreachable!("every output type has a row in TABLE"))
    }

    /// Parses a `-t` value; the error lists every type.
    pub fn parse(s: &str) -> Result<OutputType, String> {
        TABLE
            .iter()
            .find(|i| i.name == s)
            .map(|i| i.ty)
            .ok_or_else(|| {
                let shown = if s.is_empty() {
                    "an empty type (two commas?)".to_string()
                } else {
                    format!("'{s}'")
                };
                format!(
                    "{shown} is not an output type (one of {})",
                    TABLE.iter().map(|i| i.name).collect::<Vec<_>>().join(", ")
                )
            })
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// True for the types made from a disk image (they need the disk step).
    pub fn is_disk(self) -> bool {
        self.info().source == Source::Disk
    }

    /// The file this type is written to: `NAME.<suffix>`.
    pub fn path(self, image_name: &str) -> PathBuf {
        PathBuf::from(format!("{image_name}.{}", self.info().suffix))
    }

    /// True when writing this type needs a scan of the root (the tar stream of tar / tgz and
    /// of the container images' layer).
    pub fn needs_scan(self) -> bool {
        matches!(
            self,
            OutputType::Tar | OutputType::Tgz | OutputType::Oci | OutputType::Docker
        )
    }

    /// True for the container image types (oci, docker).
    pub fn is_image(self) -> bool {
        matches!(self, OutputType::Oci | OutputType::Docker)
    }
}

impl fmt::Display for OutputType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True when any of `types` needs a disk image (and so the disk step).
pub fn wants_disk(types: &[OutputType]) -> bool {
    types.iter().any(|t| t.is_disk())
}

/// dib's tool checks, made before anything runs: every requested type's host tool must be on
/// `path_env` (exit status 3 otherwise), and a squashfs's SOURCE_DATE_EPOCH must fit its 32-bit
/// times.
pub fn check_tools(
    types: &[OutputType],
    path_env: Option<&OsStr>,
    source_date_epoch: Option<i64>,
) -> Result<(), Failure> {
    for t in types {
        if let Some((tool, package)) = t.info().tool
            && crate::tools::find_program(tool, path_env).is_none()
        {
            return Err(Failure::new(
                Exit::Environment,
                format!(
                    "-t {t} needs {tool}, which is not on PATH: install the Debian package {package}"
                ),
            ));
        }
    }
    if types.contains(&OutputType::Squashfs)
        && let Some(sde) = source_date_epoch
        && u32::try_from(sde).is_err()
    {
        return Err(Failure::bad_input(format!(
            "SOURCE_DATE_EPOCH={sde}: -t squashfs stores times as unsigned 32-bit seconds; \
             use a value from 0 to {}",
            u32::MAX
        )));
    }
    Ok(())
}

/// What took how long (seconds), for the build's timing table.
pub type Timings = Vec<(String, f64)>;

/// How container image outputs are made.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// The target architecture (dpkg name, or one of dib's aliases).
    pub arch: String,
    pub compression: oci::Compression,
    pub source_date_epoch: Option<i64>,
}

/// Writes the outputs made from a finished tree (`wanted`: type and cache key): tar, tgz and
/// squashfs by [`tree::write`], oci and docker by [`oci::write`] (both kept in the cache: the
/// archive as a file blob, the layout folder as a tar blob). `scan` is needed when any type
/// [`OutputType::needs_scan`].
pub fn write_from_tree(
    cache: &dyn crate::cache::StepCache,
    root: &std::path::Path,
    scan: Option<&crate::layer::Scan>,
    wanted: &[(OutputType, String)],
    image_name: &str,
    pack: &crate::layer::PackOptions,
    image: &ImageSettings,
) -> anyhow::Result<(Vec<Written>, Timings)> {
    use anyhow::Context;
    let (images, files): (Vec<_>, Vec<_>) = wanted.iter().cloned().partition(|(t, _)| t.is_image());
    let (mut written, mut timings) = if files.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        tree::write(cache, root, scan, &files, image_name, pack)?
    };
    if !images.is_empty() {
        let started = std::time::Instant::now();
        let scan = scan.context("an image output needs a scan of the root folder")?;
        let key_of = |ty| {
            images
                .iter()
                .find(|(t, _)| *t == ty)
                .map(|(_, k)| k.clone())
        };
        let opts = oci::ImageOptions {
            compression: image.compression,
            source_date_epoch: image.source_date_epoch,
            arch: crate::arch::dpkg_arch_from_machine(&image.arch),
            pack: pack.clone(),
            ..oci::ImageOptions::default()
        };
        let formats = oci::Formats {
            oci: key_of(OutputType::Oci).is_some(),
            docker: key_of(OutputType::Docker).is_some(),
        };
        let cancelled = || crate::cancel::requested().is_some();
        let made = oci::write(root, scan, image_name, formats, &opts, &cancelled).map_err(|e| {
            match (e, crate::cancel::requested()) {
                (oci::OciError::Cancelled, Some(c)) => anyhow::Error::new(c),
                (e, _) => anyhow::Error::new(e),
            }
        })?;
        if let (Some(layout), Some(key)) = (made.oci, key_of(OutputType::Oci)) {
            folder::keep(cache, &key, &layout.path)?;
            written.push(Written {
                r#type: OutputType::Oci,
                path: layout.path,
                blake3: layout.blake3,
                cached: false,
            });
        }
        if let (Some(archive), Some(key)) = (made.docker, key_of(OutputType::Docker)) {
            let mut f = std::fs::File::open(&archive.path)
                .with_context(|| format!("cannot read {}", archive.path.display()))?;
            tree::keep(cache, &key, &mut f, None)?;
            written.push(Written {
                r#type: OutputType::Docker,
                path: archive.path,
                blake3: archive.blake3,
                cached: false,
            });
        }
        let label: Vec<&str> = images.iter().map(|(t, _)| t.name()).collect();
        timings.push((
            format!("output {}", label.join("+")),
            started.elapsed().as_secs_f64(),
        ));
    }
    written.sort_by_key(|w| wanted.iter().position(|(t, _)| *t == w.r#type));
    Ok((written, timings))
}

/// The digest an output of type `t` at `path` is identified by: blake3 of the file, or for an
/// OCI layout folder the blake3 of its `index.json` (which pins the rest by sha256).
pub fn identity(t: OutputType, path: &std::path::Path) -> Option<String> {
    if t == OutputType::Oci {
        return oci::layout_blake3(path).ok();
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    Some(hasher.finalize().to_hex().to_string())
}

/// One output a build wrote (or found unchanged, or restored from the cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub r#type: OutputType,
    pub path: PathBuf,
    /// blake3 of the file's bytes.
    pub blake3: String,
    /// True when it was not made again (unchanged on disk, or restored from the cache).
    pub cached: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn every_type_parses_by_name_and_names_its_file() {
        for info in TABLE {
            assert_eq!(OutputType::parse(info.name), Ok(info.ty));
            assert_eq!(info.ty.to_string(), info.name);
        }
        assert_eq!(
            OutputType::Squashfs.path("out/img"),
            Path::new("out/img.squash")
        );
        assert_eq!(OutputType::Tgz.path("img"), Path::new("img.tgz"));
        let e = OutputType::parse("vhdx").unwrap_err();
        assert!(e.contains("'vhdx'") && e.contains("qcow2"), "{e}");
        let e = OutputType::parse("").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        assert!(OutputType::Vhd.is_disk() && !OutputType::Tgz.is_disk());
        assert!(wants_disk(&[OutputType::Tar, OutputType::Qcow2]));
        assert!(!wants_disk(&[OutputType::Tar]));
        assert!(OutputType::Tgz.needs_scan() && !OutputType::Squashfs.needs_scan());
    }

    #[test]
    fn a_missing_tool_is_an_environment_failure_naming_tool_and_package() {
        let dir = tempfile::tempdir().unwrap();
        let types = [OutputType::Tar, OutputType::Squashfs];
        let e = check_tools(&types, Some(dir.path().as_os_str()), None).unwrap_err();
        assert_eq!(e.exit, Exit::Environment);
        assert!(e.message.contains("mksquashfs"), "{}", e.message);
        assert!(e.message.contains("squashfs-tools"), "{}", e.message);
        assert!(!e.message.contains('\n'));
        // A non-executable file of that name does not count; an executable one does.
        let tool = dir.path().join("mksquashfs");
        fs::write(&tool, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_tools(&types, Some(dir.path().as_os_str()), None).is_err());
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
        check_tools(&types, Some(dir.path().as_os_str()), None).unwrap();
        // No tool needed for tar / tgz, even with no PATH at all.
        check_tools(&[OutputType::Tar, OutputType::Tgz], None, None).unwrap();
        let q = check_tools(&[OutputType::Qcow2], Some(dir.path().as_os_str()), None).unwrap_err();
        assert!(q.message.contains("qemu-img") && q.message.contains("qemu-utils"));
        // squashfs times are 32-bit.
        let late = check_tools(&types, Some(dir.path().as_os_str()), Some(1 << 33)).unwrap_err();
        assert_eq!(late.exit, Exit::BadInput);
        assert!(
            late.message.contains("SOURCE_DATE_EPOCH"),
            "{}",
            late.message
        );
        check_tools(&[OutputType::Tar], None, Some(-5)).unwrap();
    }
}
