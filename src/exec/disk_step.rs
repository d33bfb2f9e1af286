//! The disk step: everything dib does after post-root.d (block-device.d, the disk,
//! pre-finalise.d, finalise.d in the image, cleanup.d, the clean-up) as ONE cached step that
//! writes the disk outputs (`qcow2`, `raw`, `vhd`) and any tree outputs asked for with them
//! (taken from the finished disk).
//!
//! ```text
//! rootfs steps up to post-root.d (cached layers) ─► plan::disk_step (key)
//!   every requested output cached under its type key? ─► restored (sparse) ─► done
//!   else run(Job):
//!     hooks' mounts below the tree unmounted (dib's unmount_image), one line each
//!     restored rootfs  mnt ──rename──► built            (dib: mv mnt built; an overlay of a
//!                                                        kept tree is moved with MS_MOVE)
//!     block-device.d   host hooks (an IMAGE_BLOCK_DEVICE= line is refused, see below)
//!     size             DiskOptions.image_size_kib, else image::image_size_for_tree(built)
//!     config           select_config (checked before any hook ran, see prepare.rs)
//!                      ─► parse_config ─► merge_rootfs_params ─► image::create (mounted at mnt)
//!     fstab            Disk::fstab() ─► built/etc/fstab; built ──copy_tree──► mnt; rm built
//!     pre-finalise.d   host;  finalise.d chroot (ChrootMounts on mnt);  cleanup.d host
//!                      (TARGET_ROOT=mnt); finalise_base(mnt)  — with DIB_ROOT_LABEL,
//!                      DIB_ROOT_FSTYPE, DIB_BOOT_LABEL, DIB_MOUNTPOINTS, IMAGE_BLOCK_DEVICE(S)
//!     hook mounts      what those hooks left mounted in the disk is unmounted (not the
//!                      disk's own file systems), one line each
//!     tree outputs     from the mounted tree (if asked for; outputs::tree::write)
//!     Disk::unmount    fstrim, umount, detach ─► image0.raw; with SOURCE_DATE_EPOCH
//!                      Disk::unmount_reproducible: each mounted ext file system is first made
//!                      again from its files, times at the epoch (image::repack)
//!     convert          qcow2 (-c unless -u) / vhd via qemu-img; raw last, copied sparse
//!     each output      hashed and kept in the cache under its type key
//! ```
//!
//! Why one step and not four cached ones: a disk's file systems and loop device only exist while
//! the step runs, and what finalise.d writes lands in them, not in the rootfs folder; snapshotting
//! a mounted disk as layers would cost a tree scan per hook and buy little, since the outputs
//! are cached whole. The key therefore covers everything the step reads: the last rootfs step's
//! key, the hooks and environment of the four phases, the block-device config text, the output
//! types and the disk options (`plan::disk_step`).
//!
//! dib's legacy block-device.d protocol (a hook printing `IMAGE_BLOCK_DEVICE=...` to replace
//! the YAML layer with a device it made itself) is not supported: strata fails with a message
//! naming the hook. dib exports `DIB_ROOT_LABEL` & co., DIB_IMAGE_SIZE and the other disk
//! variables to every phase; strata gives them only to the phases of this step (no rootfs hook
//! of dib's or strata's elements reads them), so they never rebuild the tree.

use super::hooks::{self, run_phase_hooks};
use crate::cache::StepCache;
use crate::elements::Element;
use crate::exit::{Exit, Failure};
use crate::image::{self, Params};
use crate::layer::{self, ScanOptions};
use crate::outputs::{self, OutputType, Written};
use crate::phase::Phase;
use crate::plan::PlannedHook;
use crate::progress::Reporter;
use crate::sandbox;
use crate::settings::{self, BuildPaths, Settings};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

/// The block-device config text and where it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub text: String,
    pub origin: String,
}

/// dib's `block_device_create_config_file`: `DIB_BLOCK_DEVICE_CONFIG` (`file://PATH` or YAML
/// text), else the first element (in resolved order) with `block-device-<arch>.yaml` or
/// `block-device-default.yaml`, else the built-in single-file-system config.
///
/// The merged hook tree keeps only the LAST element's copy of such a file, so the element
/// folders are read instead.
pub fn select_config(
    env: &BTreeMap<String, String>,
    elements: &[Element],
    arch: &str,
) -> Result<ConfigSource, Failure> {
    if let Some(v) = env.get("DIB_BLOCK_DEVICE_CONFIG").filter(|v| !v.is_empty()) {
        if let Some(path) = v.strip_prefix("file://") {
            let text = fs::read_to_string(path).map_err(|e| {
                Failure::bad_input(format!(
                    "DIB_BLOCK_DEVICE_CONFIG=file://{path}: cannot read it: {e}"
                ))
            })?;
            return Ok(ConfigSource {
                text,
                origin: format!("DIB_BLOCK_DEVICE_CONFIG (file://{path})"),
            });
        }
        return Ok(ConfigSource {
            text: v.clone(),
            origin: "DIB_BLOCK_DEVICE_CONFIG".into(),
        });
    }
    let arch_file = match arch {
        "ppc64le" | "ppc64el" => "block-device-ppc64el.yaml".to_string(),
        a => format!("block-device-{a}.yaml"),
    };
    for e in elements {
        for name in [arch_file.as_str(), "block-device-default.yaml"] {
            let p = e.path.join(name);
            if p.is_file() {
                let text = fs::read_to_string(&p).map_err(|err| {
                    Failure::bad_input(format!(
                        "element {}: cannot read {}: {err}",
                        e.name,
                        p.display()
                    ))
                })?;
                return Ok(ConfigSource {
                    text,
                    origin: format!("element {} ({name})", e.name),
                });
            }
        }
    }
    Ok(ConfigSource {
        text: image::default_config().to_string(),
        origin: "the built-in default (no element has a block-device-*.yaml)".into(),
    })
}

/// Parses the config as the disk step will, so a bad one is refused before any hook runs.
pub fn check_config(config: &ConfigSource) -> Result<(), Failure> {
    image::parse_config(&config.text)
        .map(drop)
        .map_err(|e| Failure::bad_input(format!("{e} (from {})", config.origin)))
}

/// What `run` needs from the executor.
pub struct Job<'a> {
    pub settings: &'a Settings,
    pub paths: &'a BuildPaths,
    /// The resolved elements' names, space separated (dib's `IMAGE_ELEMENT`).
    pub image_element: &'a str,
    /// The disk phases' environment before environment.d (`settings::disk_environment`).
    pub base_env: BTreeMap<String, String>,
    /// The hooks of each disk phase, as listed from the live hook folder.
    pub hooks: &'a [(Phase, Vec<PlannedHook>)],
    pub config: &'a ConfigSource,
    pub key: &'a str,
    pub cache: &'a dyn StepCache,
    pub reporter: &'a Reporter,
}

/// What `run` did.
pub struct Produced {
    pub outputs: Vec<Written>,
    pub timings: outputs::Timings,
}

/// Runs the whole disk step on the restored rootfs in `paths.mount_dir`. The rootfs folder
/// is consumed (moved aside and deleted once copied into the disk).
pub fn run(job: &Job) -> Result<Produced> {
    let paths = job.paths;
    let settings = job.settings;
    let opts = &settings.disk;
    let mut timings = Vec::new();
    let mut phase_timer = Instant::now();
    let lap = |label: &str, t: &mut Instant, timings: &mut Vec<(String, f64)>| {
        timings.push((label.to_string(), t.elapsed().as_secs_f64()));
        *t = Instant::now();
    };

    // dib: whatever hooks left mounted below the tree is unmounted; then the tree moves aside
    // to `built` and the disk is mounted where it was.
    sandbox::unmount_below(&paths.mount_dir)?;
    let built = paths.build_dir.join("built");
    if super::kept_tree::is_mount_point(&paths.mount_dir)? {
        // An overlay of a kept tree: a mount point cannot be renamed, so the mount moves.
        fs::create_dir(&built).with_context(|| format!("cannot create {}", built.display()))?;
        super::kept_tree::move_mount(&paths.mount_dir, &built)?;
    } else {
        fs::rename(&paths.mount_dir, &built).with_context(|| {
            format!(
                "cannot move {} to {}",
                paths.mount_dir.display(),
                built.display()
            )
        })?;
        fs::create_dir(&paths.mount_dir)
            .with_context(|| format!("cannot create {}", paths.mount_dir.display()))?;
    }

    let hooks_of = |phase: Phase| -> &[PlannedHook] {
        job.hooks
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, h)| h.as_slice())
            .unwrap_or(&[])
    };

    // block-device.d (host). dib evals IMAGE_BLOCK_DEVICE= lines of its output.
    let env = settings::phase_environment(&job.base_env, Phase::BlockDevice, paths);
    let bd_hooks = hooks_of(Phase::BlockDevice);
    for (hook, outcome) in bd_hooks
        .iter()
        .zip(run_phase(job, Phase::BlockDevice, bd_hooks, &env)?)
    {
        if outcome
            .tail
            .iter()
            .any(|l| l.trim_start().starts_with("IMAGE_BLOCK_DEVICE="))
        {
            return Err(Failure::new(
                Exit::BadInput,
                format!(
                    "hook block-device.d/{} of element {} printed IMAGE_BLOCK_DEVICE=: dib's \
                     legacy block-device.d protocol is not supported by strata; describe the \
                     disk in a block-device-default.yaml or DIB_BLOCK_DEVICE_CONFIG instead",
                    hook.name, hook.element
                ),
            )
            .into());
        }
    }
    lap("block-device.d", &mut phase_timer, &mut timings);

    // Size and root file system parameters (dib's disk-image-create, step 18).
    let fs_type = opts.fs_type.clone();
    let journal_mb = opts.journal_mb;
    let efi = job
        .image_element
        .split_whitespace()
        .any(|e| e == "block-device-efi");
    let image_size = match opts.image_size_kib {
        Some(kib) => image::image_bytes(kib, efi),
        None => {
            tracing::info!("calculating the image size from the tree");
            let size =
                image::image_size_for_tree(&built, opts.image_extra_mb, &fs_type, journal_mb, efi)
                    .with_context(|| format!("cannot measure {}", built.display()))?;
            // mke2fs refuses a journal larger than half the file system, which dib's formula
            // gives for trees under ~40 MB; strata grows such tiny images instead of failing.
            if fs_type == "ext4" {
                let esp = if efi { image::ESP_MIB << 20 } else { 0 };
                size.max(((journal_mb * 3) << 20) + esp)
            } else {
                size
            }
        }
    };
    let mut mkfs_opts = opts.mkfs_options.clone().unwrap_or_default();
    if fs_type == "ext4" {
        mkfs_opts = format!("-i 4096 -J size={journal_mb} {mkfs_opts}");
    }
    if let Some(n) = opts.max_online_resize {
        mkfs_opts = format!("-E resize={n} {mkfs_opts}");
    }
    let mkfs_opts = mkfs_opts.split_whitespace().collect::<Vec<_>>().join(" ");
    let params = Params {
        image_dir: paths.image_dir.clone(),
        image_size,
        root_fs_type: fs_type.clone(),
        root_label: opts.root_label.clone(),
        root_fs_opts: (!mkfs_opts.is_empty()).then_some(mkfs_opts),
        mount_base: paths.mount_dir.clone(),
        // Deterministic ids when the build asks for reproducibility (see `disk_identity`).
        seed: settings.source_date_epoch.map(|_| {
            crate::key::Keyed::DiskSeed {
                identity: &disk_identity(settings, job),
            }
            .bytes()
        }),
        epoch: settings.source_date_epoch,
    };
    let mut config = image::parse_config(&job.config.text).map_err(|e| config_error(job, e))?;
    config.merge_rootfs_params(&params);
    job.reporter.println(&format!(
        "[output/disk] creating a {} MiB disk from the block-device config of {}",
        image_size >> 20,
        job.config.origin
    ));
    crate::cancel::check()?;
    let disk = image::create(&config, &params).map_err(|e| config_error(job, e))?;

    // fstab into the tree, then the tree into the disk (dib: writefstab, cp -ra built/* mnt).
    let etc = built.join("etc");
    fs::create_dir_all(&etc).with_context(|| format!("cannot create {}", etc.display()))?;
    fs::write(etc.join("fstab"), disk.fstab())
        .with_context(|| format!("cannot write {}", etc.join("fstab").display()))?;
    image::copy_tree(&built, disk.root_mount())?;
    sandbox::unmount_below(&built)?;
    if super::kept_tree::is_mount_point(&built)? {
        // The overlay goes (its upper folder with the build folder); never deleted through.
        nix::mount::umount2(&built, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("cannot unmount {}", built.display()))?;
    }
    sandbox::remove_tree_on_one_mount(&built)?;
    lap("(create disk, copy tree)", &mut phase_timer, &mut timings);

    let mut base = job.base_env.clone();
    base.insert(
        "DIB_ROOT_LABEL".into(),
        config.root_label().unwrap_or_default(),
    );
    base.insert(
        "DIB_ROOT_FSTYPE".into(),
        config.root_fstype().unwrap_or_default(),
    );
    base.insert("DIB_BOOT_LABEL".into(), config.boot_label());
    base.insert("DIB_MOUNTPOINTS".into(), config.mount_points().join("|"));
    base.insert(
        "IMAGE_BLOCK_DEVICE".into(),
        disk.device().display().to_string(),
    );
    base.insert("IMAGE_BLOCK_DEVICES".into(), disk.devices_env());

    for phase in [Phase::PreFinalise, Phase::Finalise, Phase::Cleanup] {
        let env = settings::phase_environment(&base, phase, paths);
        run_phase(job, phase, hooks_of(phase), &env)?;
        lap(phase.dir_name(), &mut phase_timer, &mut timings);
    }
    // What the disk phases' hooks left mounted in the disk (not the disk's own file systems)
    // stays out of the tree outputs and would keep the disk busy (dib's unmount_image).
    sandbox::unmount_below_except(disk.root_mount(), &disk.mount_points())?;
    hooks::finalise_base(disk.root_mount())?;

    let mut written = Vec::new();
    let tree: Vec<(OutputType, String)> = settings
        .image_types
        .iter()
        .filter(|t| !t.is_disk())
        .map(|t| (*t, crate::key::output_key(job.key, t.name())))
        .collect();
    if !tree.is_empty() {
        let root = disk.root_mount();
        let scan = if tree.iter().any(|(t, _)| t.needs_scan()) {
            Some(
                layer::scan(root, &ScanOptions::default())
                    .with_context(|| format!("cannot scan {}", root.display()))?,
            )
        } else {
            None
        };
        let (w, laps) = outputs::write_from_tree(
            job.cache,
            root,
            scan.as_ref(),
            &tree,
            &settings.image_name,
            &super::pack_options(settings),
            &super::image_settings(settings),
        )?;
        written.extend(w);
        timings.extend(laps);
        phase_timer = Instant::now();
    }

    crate::cancel::check()?;
    let raw = match settings.source_date_epoch {
        // Reproducible: every mounted ext file system is made again from its files.
        Some(epoch) => {
            let (raw, rebuilt) = disk.unmount_reproducible(epoch)?;
            for r in rebuilt {
                match r.kept_because {
                    None => job.reporter.println(&format!(
                        "[output/disk] {} ({}) rebuilt from its files with times at \
                         SOURCE_DATE_EPOCH={epoch}",
                        r.filesystem, r.mount_point
                    )),
                    Some(why) => tracing::warn!(
                        "{} ({}) kept as the kernel left it, so the raw image will not be \
                         byte-reproducible: {why}",
                        r.filesystem,
                        r.mount_point
                    ),
                }
            }
            lap(
                "(rebuild file systems, unmount)",
                &mut phase_timer,
                &mut timings,
            );
            raw
        }
        None => {
            let raw = disk.unmount()?;
            lap("(unmount disk)", &mut phase_timer, &mut timings);
            raw
        }
    };

    // raw last: dib moves it; strata copies it (sparse) so the cache can keep it too.
    let mut order: Vec<OutputType> = settings
        .image_types
        .iter()
        .copied()
        .filter(|t| t.is_disk() && *t != OutputType::Raw)
        .collect();
    order.extend(
        settings
            .image_types
            .iter()
            .filter(|t| **t == OutputType::Raw),
    );
    for t in order {
        crate::cancel::check()?;
        let path = t.path(&settings.image_name);
        let tkey = crate::key::output_key(job.key, t.name());
        let digest = if t == OutputType::Raw {
            let mut src = fs::File::open(&raw)
                .with_context(|| format!("cannot open the raw image {}", raw.display()))?;
            outputs::tree::keep(job.cache, &tkey, &mut src, Some(&path))?
        } else if t == OutputType::Qcow2 {
            let how = write_qcow2(job, &raw, &path, &tkey)?;
            job.reporter
                .println(&format!("[output/disk] {}: {how}", path.display()));
            let mut src =
                fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            // Compressed clusters do not compress again: stored as they are.
            let packing = if opts.uncompressed {
                outputs::tree::Packing::Zstd
            } else {
                outputs::tree::Packing::Stored
            };
            outputs::tree::keep_as(job.cache, &tkey, &mut src, None, packing)?
        } else {
            image::convert(
                &raw,
                t.name(),
                &path,
                !opts.uncompressed,
                opts.qemu_img_options.as_deref(),
            )?;
            crate::fsutil::set_mode(&path, 0o644)?;
            let mut src =
                fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            outputs::tree::keep(job.cache, &tkey, &mut src, None)?
        };
        written.push(Written {
            r#type: t,
            path,
            blake3: digest,
            cached: false,
        });
        lap(&format!("output {t}"), &mut phase_timer, &mut timings);
    }
    let _ = fs::remove_file(&raw);
    Ok(Produced {
        outputs: written,
        timings,
    })
}

/// What names a disk, for the seed of its ids: not the hooks (an edit keeps the ids, and so
/// the disk's layout, which lets the qcow2 writer reuse what did not change), but everything
/// that says which image it is.
fn disk_identity(settings: &Settings, job: &Job) -> String {
    let name = std::path::Path::new(&settings.image_name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    serde_json::json!({
        "image": name,
        "elements": job.image_element,
        "arch": settings.arch,
        "config": job.config.text,
        "options": settings.disk.key_fields(),
        "epoch": settings.source_date_epoch,
    })
    .to_string()
}

/// Writes `NAME.qcow2` from the raw disk with strata's qcow2 writer when the options allow
/// (else qemu-img), reusing the compressed clusters of the image's previous qcow2 (found
/// through the previous manifest; its cluster map is kept in the cache beside it). Keeps the
/// new map. Returns a line for the log.
fn write_qcow2(
    job: &Job,
    raw: &std::path::Path,
    dest: &std::path::Path,
    tkey: &str,
) -> Result<String> {
    use crate::image::qcow2::{self, ParsedOptions};
    let settings = job.settings;
    let opts = &settings.disk;
    let native =
        match qcow2::parse_qemu_img_options(opts.qemu_img_options.as_deref(), !opts.uncompressed) {
            ParsedOptions::Native(o) => o,
            ParsedOptions::FallBack { reason } => {
                image::convert(
                    raw,
                    "qcow2",
                    dest,
                    !opts.uncompressed,
                    opts.qemu_img_options.as_deref(),
                )?;
                return Ok(format!("qemu-img convert ({reason})"));
            }
        };
    // The previous output of this image: the qcow2 the last manifest recorded, still on disk
    // and unchanged, with its map from the cache.
    let previous_map =
        crate::manifest::Manifest::read(&crate::manifest::Manifest::path_for(&settings.image_name))
            .ok()
            .and_then(|m| {
                let recorded = m.output(OutputType::Qcow2)?.blake3.clone();
                let disk = m
                    .steps
                    .iter()
                    .rev()
                    .find(|s| s.phase == "output")?
                    .key
                    .clone();
                (outputs::identity(OutputType::Qcow2, dest)? == recorded).then_some(disk)
            })
            .and_then(|prev_key| {
                let prev_output = crate::key::output_key(&prev_key, OutputType::Qcow2.name());
                let rec = job
                    .cache
                    .get_output(&crate::key::output_key(&prev_output, QCOW2_MAP))
                    .ok()??;
                let mut bytes = Vec::new();
                let mut blob = job.cache.open_blob(&rec.blob_digest).ok()?;
                let mut dec = zstd::Decoder::new(&mut blob).ok()?;
                std::io::Read::read_to_end(&mut dec, &mut bytes).ok()?;
                drop(dec);
                blob.finish().ok()?;
                qcow2::ClusterMap::from_bytes(&bytes).ok()
            });
    let previous = previous_map.map(|map| qcow2::Previous { image: dest, map });
    let cancelled = || crate::cancel::requested().is_some();
    let written = qcow2::write(raw, dest, &native, previous, &cancelled).map_err(|e| {
        match (&e, crate::cancel::requested()) {
            (qcow2::Qcow2Error::Cancelled, Some(c)) => anyhow::Error::new(c),
            (qcow2::Qcow2Error::Io { source, .. }, _) => {
                anyhow::anyhow!(crate::fsutil::write_error(dest, source))
            }
            _ => anyhow::Error::new(e),
        }
    })?;
    let map = written.map.to_bytes();
    outputs::tree::keep(
        job.cache,
        &crate::key::output_key(tkey, QCOW2_MAP),
        &mut &map[..],
        None,
    )?;
    let mut line = format!(
        "{} clusters: {} zero, {} reused from the previous image, {} compressed, {} stored",
        written.clusters, written.zero, written.reused, written.compressed, written.stored_raw
    );
    if let Some(why) = written.previous_ignored {
        line.push_str(&format!(" (the previous image was not used: {why})"));
    }
    Ok(line)
}

/// The cache entry that keeps a qcow2 output's cluster map (keyed beside the output).
const QCOW2_MAP: &str = "qcow2-cluster-map";

/// Writes every requested output from the cache if ALL of them are cached under `key`.
/// Returns None on a miss (or when a cached blob turns out damaged: the step then runs).
pub fn restore_cached(
    cache: &dyn StepCache,
    key: &str,
    settings: &Settings,
) -> Result<Option<Vec<Written>>> {
    // All or nothing: the disk step runs again unless every type is cached.
    for t in &settings.image_types {
        if cache
            .get_output(&crate::key::output_key(key, t.name()))?
            .is_none()
        {
            return Ok(None);
        }
    }
    let mut written = Vec::new();
    for t in &settings.image_types {
        let path = t.path(&settings.image_name);
        let tkey = crate::key::output_key(key, t.name());
        let Some(digest) =
            outputs::tree::restore_cached(cache, &tkey, *t, &path, "building the disk again")?
        else {
            return Ok(None);
        };
        written.push(Written {
            r#type: *t,
            path,
            blake3: digest,
            cached: true,
        });
    }
    Ok(Some(written))
}

fn config_error(job: &Job, e: image::ImageError) -> anyhow::Error {
    if e.is_bad_input() {
        Failure::bad_input(format!("{} (from {})", e, job.config.origin)).into()
    } else {
        Failure::new(Exit::BuildFailed, format!("creating the disk image: {e}")).into()
    }
}

/// Runs one phase's hooks (chrooted into the mounted disk for finalise.d) with the executor's
/// hook loop; the first failure ends the build with the same one-line error as any other hook.
fn run_phase(
    job: &Job,
    phase: Phase,
    hooks: &[PlannedHook],
    env: &BTreeMap<String, String>,
) -> Result<Vec<crate::runner::HookOutcome>> {
    run_phase_hooks(phase, hooks, job.paths, env, job.reporter, &|_| {
        Ok(Vec::new())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn element(dir: &Path, name: &str, files: &[&str]) -> Element {
        let p = dir.join(name);
        fs::create_dir_all(&p).unwrap();
        for f in files {
            fs::write(p.join(f), format!("# {name}/{f}\n")).unwrap();
        }
        Element {
            name: name.into(),
            path: p,
        }
    }

    #[test]
    fn config_comes_from_env_then_first_element_then_builtin() {
        let dir = tempfile::tempdir().unwrap();
        let a = element(dir.path(), "a", &[]);
        let b = element(dir.path(), "b", &["block-device-default.yaml"]);
        let c = element(
            dir.path(),
            "c",
            &["block-device-default.yaml", "block-device-amd64.yaml"],
        );
        let none = BTreeMap::new();
        // The first element with either file wins; within it the arch file is preferred.
        let s = select_config(&none, &[a.clone(), b.clone(), c.clone()], "amd64").unwrap();
        assert_eq!(s.text, "# b/block-device-default.yaml\n");
        assert!(s.origin.contains("element b"), "{}", s.origin);
        let s = select_config(&none, &[a.clone(), c.clone(), b.clone()], "amd64").unwrap();
        assert_eq!(s.text, "# c/block-device-amd64.yaml\n");
        let s = select_config(&none, std::slice::from_ref(&c), "arm64").unwrap();
        assert_eq!(s.text, "# c/block-device-default.yaml\n");
        let s = select_config(&none, std::slice::from_ref(&a), "amd64").unwrap();
        assert_eq!(s.text, image::default_config());

        let mut env = BTreeMap::new();
        env.insert(
            "DIB_BLOCK_DEVICE_CONFIG".to_string(),
            "- local_loop: {}\n".into(),
        );
        let s = select_config(&env, std::slice::from_ref(&b), "amd64").unwrap();
        assert_eq!(s.text, "- local_loop: {}\n");
        let file = dir.path().join("cfg.yaml");
        fs::write(&file, "from file\n").unwrap();
        env.insert(
            "DIB_BLOCK_DEVICE_CONFIG".to_string(),
            format!("file://{}", file.display()),
        );
        assert_eq!(
            select_config(&env, std::slice::from_ref(&b), "amd64")
                .unwrap()
                .text,
            "from file\n"
        );
        env.insert(
            "DIB_BLOCK_DEVICE_CONFIG".to_string(),
            format!("file://{}/missing.yaml", dir.path().display()),
        );
        let e = select_config(&env, &[b], "amd64").unwrap_err();
        assert!(e.message.contains("missing.yaml"), "{}", e.message);
    }

    #[test]
    fn a_bad_config_is_refused_naming_where_it_came_from() {
        let bad = ConfigSource {
            text: "- local_loop: [not, a, map\n".into(),
            origin: "DIB_BLOCK_DEVICE_CONFIG".into(),
        };
        let e = check_config(&bad).unwrap_err();
        assert_eq!(e.exit, Exit::BadInput);
        assert!(
            e.message.contains("DIB_BLOCK_DEVICE_CONFIG"),
            "{}",
            e.message
        );
        check_config(&ConfigSource {
            text: image::default_config().into(),
            origin: "x".into(),
        })
        .unwrap();
    }
}
