//! The disk-image output step: everything dib does after post-root.d (block-device.d, the disk,
//! pre-finalise.d, finalise.d in the image, cleanup.d, the clean-up) as ONE cached output step
//! that writes `qcow2` / `raw` / `vhd` (and `tar` / `tgz` / `squashfs`, taken from the finished
//! disk) outputs.
//!
//! ```text
//! build.rs: steps up to post-root.d (cached rootfs layers) ─► output_key(...)
//!   every requested output cached under its type key? ─► restore_cached (sparse) ─► done
//!   else run(Job):
//!     restored rootfs  mnt ──rename──► built            (dib: mv mnt built)
//!     block-device.d   host hooks (an IMAGE_BLOCK_DEVICE= line is refused, see below)
//!     size             DIB_IMAGE_SIZE GiB, else image::image_size_for_tree(built)
//!     config           select_config: DIB_BLOCK_DEVICE_CONFIG | first element's
//!                      block-device-<arch>.yaml / block-device-default.yaml | built-in
//!                      ─► parse_config ─► merge_rootfs_params ─► image::create (mounted at mnt)
//!     fstab            Disk::fstab() ─► built/etc/fstab; built ──copy_tree──► mnt; rm built
//!     pre-finalise.d   host;  finalise.d chroot (ChrootMounts on mnt);  cleanup.d host
//!                      (TARGET_ROOT=mnt); finalise_base(mnt)  — with DIB_ROOT_LABEL,
//!                      DIB_ROOT_FSTYPE, DIB_BOOT_LABEL, DIB_MOUNTPOINTS, IMAGE_BLOCK_DEVICE(S)
//!     tar tgz squashfs from the mounted tree (if asked for; `crate::output::write`)
//!     Disk::unmount    fstrim, umount, detach ─► image0.raw; with SOURCE_DATE_EPOCH
//!                      Disk::unmount_reproducible: each mounted ext file system is first made
//!                      again from its files, times at the epoch (image::repack), so two cold
//!                      builds of a deterministic element set give the same raw bytes
//!     convert          qcow2 (-c unless -u) / vhd via qemu-img; raw last, copied sparse
//!     each output      hashed and stored as a zstd blob under its type key
//! ```
//!
//! Why one step and not four cached ones: a disk's file systems and loop device only exist while
//! the step runs, and what finalise.d writes lands in them, not in the rootfs folder; snapshotting
//! a mounted disk as layers would cost a tree scan per hook and buy little, since the outputs
//! are cached whole. The key therefore covers everything the step reads: the last rootfs step's
//! key, the hooks and environment of the four phases (chained with [`crate::plan::phase_steps`]
//! by the caller), the block-device config text, the output types and the disk options.
//!
//! dib's legacy block-device.d protocol (a hook printing `IMAGE_BLOCK_DEVICE=...` to replace
//! the YAML layer with a device it made itself) is not supported: strata fails with a message
//! naming the hook. dib exports `DIB_ROOT_LABEL` & co. to every phase; strata sets them only
//! for the phases of this step (no earlier hook of the shipped elements reads them).

use crate::elements::Element;
use crate::error::{Exit, Failure};
use crate::image::{self, Params};
use crate::layer::{self, ScanOptions};
use crate::output;
use crate::phase::Phase;
use crate::plan::PlannedHook;
use crate::runner::{self, Reporter};
use crate::sandbox;
use crate::settings::{self, BuildPaths, Settings};
use crate::store::Store;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The output types made from a disk image.
pub const DISK_TYPES: &[&str] = &["qcow2", "raw", "vhd"];

/// The phases this step runs, in order.
pub const PHASES: [Phase; 4] = [
    Phase::BlockDevice,
    Phase::PreFinalise,
    Phase::Finalise,
    Phase::Cleanup,
];

/// The hooks of each phase of the step, in order.
pub type PhaseHooks = Vec<(Phase, Vec<PlannedHook>)>;

/// True for `qcow2`, `raw` and `vhd`.
pub fn is_disk_type(t: &str) -> bool {
    DISK_TYPES.contains(&t)
}

/// True when any requested output needs a disk image (and so this step).
pub fn wants_disk(types: &[String]) -> bool {
    types.iter().any(|t| is_disk_type(t))
}

/// The disk options of `strata build` (sizes come through the environment, as in dib:
/// `DIB_IMAGE_SIZE`, `DIB_IMAGE_EXTRA_SIZE`, `DIB_JOURNAL_SIZE`, `FS_TYPE`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskOptions {
    pub root_label: Option<String>,
    pub mkfs_options: Option<String>,
    pub qemu_img_options: Option<String>,
    pub max_online_resize: Option<String>,
    pub checksum: bool,
    pub uncompressed: bool,
}

impl DiskOptions {
    /// Takes the disk options from the command line.
    pub fn from_cli(o: &crate::cli::BuildOptions) -> DiskOptions {
        DiskOptions {
            root_label: o.root_label.clone(),
            mkfs_options: o.mkfs_options.clone(),
            qemu_img_options: o.qemu_img_options.clone(),
            max_online_resize: o.max_online_resize.clone(),
            checksum: o.checksum,
            uncompressed: o.uncompressed,
        }
    }

    /// The fields that change the outputs' bytes, in a fixed order (for the output key).
    fn key_fields(&self) -> [(&'static str, String); 5] {
        let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "\u{0}unset".into());
        [
            ("root-label", s(&self.root_label)),
            ("mkfs-options", s(&self.mkfs_options)),
            ("qemu-img-options", s(&self.qemu_img_options)),
            ("max-online-resize", s(&self.max_online_resize)),
            ("uncompressed", self.uncompressed.to_string()),
        ]
    }
}

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

/// The key of the whole output step. `parent` is the key chained over the hooks and
/// environment of the step's four phases (or the last rootfs step's key when they have none).
pub fn output_key(
    parent: &str,
    types: &[String],
    options: &DiskOptions,
    config: &ConfigSource,
) -> String {
    let mut h = blake3::Hasher::new_derive_key("strata 2026-11 disk output key v2");
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("parent", parent.as_bytes());
    field("types", types.join(",").as_bytes());
    for (name, value) in options.key_fields() {
        field(name, value.as_bytes());
    }
    field("block-device-config", config.text.as_bytes());
    h.finalize().to_hex().to_string()
}

/// One output the step wrote or restored.
#[derive(Debug, Clone)]
pub struct Output {
    pub r#type: String,
    pub path: PathBuf,
    pub blake3: String,
    pub cached: bool,
}

/// What `run` needs from the executor.
pub struct Job<'a> {
    pub settings: &'a Settings,
    pub options: &'a DiskOptions,
    pub paths: &'a BuildPaths,
    /// The resolved elements' names, space separated (dib's `IMAGE_ELEMENT`).
    pub image_element: &'a str,
    /// The hook environment before environment.d (`settings::base_environment`).
    pub base_env: BTreeMap<String, String>,
    /// The hooks of each of [`PHASES`], as listed from the live hook folder.
    pub hooks: PhaseHooks,
    pub config: &'a ConfigSource,
    pub key: &'a str,
    pub store: Option<&'a Store>,
    pub reporter: &'a Reporter,
}

/// What `run` did.
pub struct Produced {
    pub outputs: Vec<Output>,
    pub timings: Vec<(String, f64)>,
}

/// Runs the whole output step on the restored rootfs in `paths.mount_dir`. The rootfs folder
/// is consumed (moved aside and deleted once copied into the disk).
pub fn run(job: &Job) -> Result<Produced> {
    let paths = job.paths;
    let settings = job.settings;
    let mut timings = Vec::new();
    let mut phase_timer = Instant::now();
    let lap = |label: &str, t: &mut Instant, timings: &mut Vec<(String, f64)>| {
        timings.push((label.to_string(), t.elapsed().as_secs_f64()));
        *t = Instant::now();
    };

    // dib: the tree moves aside to `built`; the disk is mounted where it was.
    let built = paths.build_dir.join("built");
    refuse_mounts_under(&paths.mount_dir)?;
    fs::rename(&paths.mount_dir, &built).with_context(|| {
        format!(
            "cannot move {} to {}",
            paths.mount_dir.display(),
            built.display()
        )
    })?;
    fs::create_dir(&paths.mount_dir)
        .with_context(|| format!("cannot create {}", paths.mount_dir.display()))?;

    let hooks_of = |phase: Phase| -> &[PlannedHook] {
        job.hooks
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, h)| h.as_slice())
            .unwrap_or(&[])
    };

    // block-device.d (host). dib evals IMAGE_BLOCK_DEVICE= lines of its output.
    let base = settings::phase_environment(&job.base_env, Phase::BlockDevice, paths);
    for (hook, outcome) in run_phase(job, Phase::BlockDevice, hooks_of(Phase::BlockDevice), &base)?
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
    let env = &settings.user_env;
    let fs_type = env
        .get("FS_TYPE")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| "ext4".into());
    let journal_mb: u64 = parse_env_number(env, "DIB_JOURNAL_SIZE")?.unwrap_or(64);
    let efi = job
        .image_element
        .split_whitespace()
        .any(|e| e == "block-device-efi");
    let image_size = match env.get("DIB_IMAGE_SIZE").filter(|v| !v.is_empty()) {
        Some(gib) => {
            let g: f64 = gib
                .trim()
                .parse()
                .ok()
                .filter(|g: &f64| *g > 0.0 && *g <= MAX_MIB as f64 / 1024.0)
                .ok_or_else(|| {
                    Failure::bad_input(format!(
                        "DIB_IMAGE_SIZE / --image-size {gib}: not a positive number of GiB \
                         (up to {} GiB)",
                        MAX_MIB / 1024
                    ))
                })?;
            image::image_bytes((g * 1024.0 * 1024.0) as u64, efi)
        }
        None => {
            let extra = parse_env_number(env, "DIB_IMAGE_EXTRA_SIZE")?;
            tracing::info!("calculating the image size from the tree");
            let size = image::image_size_for_tree(&built, extra, &fs_type, journal_mb, efi)
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
    let mut mkfs_opts = job.options.mkfs_options.clone().unwrap_or_default();
    if fs_type == "ext4" {
        mkfs_opts = format!("-i 4096 -J size={journal_mb} {mkfs_opts}");
    }
    if let Some(n) = &job.options.max_online_resize {
        mkfs_opts = format!("-E resize={n} {mkfs_opts}");
    }
    let mkfs_opts = mkfs_opts.split_whitespace().collect::<Vec<_>>().join(" ");
    let params = Params {
        image_dir: paths.image_dir.clone(),
        image_size,
        root_fs_type: fs_type.clone(),
        root_label: job
            .options
            .root_label
            .clone()
            .or_else(|| env.get("DIB_ROOT_LABEL").filter(|v| !v.is_empty()).cloned()),
        root_fs_opts: (!mkfs_opts.is_empty()).then_some(mkfs_opts),
        mount_base: paths.mount_dir.clone(),
        // Deterministic ids when the build asks for reproducibility.
        seed: settings
            .source_date_epoch
            .map(|_| *blake3::hash(format!("disk seed {}", job.key).as_bytes()).as_bytes()),
        epoch: settings.source_date_epoch,
    };
    let mut config = image::parse_config(&job.config.text).map_err(|e| config_error(job, e))?;
    config.merge_rootfs_params(&params);
    job.reporter.println(&format!(
        "[output/disk] creating a {} MiB disk from the block-device config of {}",
        image_size >> 20,
        job.config.origin
    ));
    let disk = image::create(&config, &params).map_err(|e| config_error(job, e))?;

    // fstab into the tree, then the tree into the disk (dib: writefstab, cp -ra built/* mnt).
    let etc = built.join("etc");
    fs::create_dir_all(&etc).with_context(|| format!("cannot create {}", etc.display()))?;
    fs::write(etc.join("fstab"), disk.fstab())
        .with_context(|| format!("cannot write {}", etc.join("fstab").display()))?;
    image::copy_tree(&built, disk.root_mount())?;
    refuse_mounts_under(&built)?;
    fs::remove_dir_all(&built).with_context(|| format!("cannot remove {}", built.display()))?;
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
    crate::build::finalise_base(disk.root_mount())?;

    let mut outputs = Vec::new();
    let tree: Vec<(String, String)> = settings
        .image_types
        .iter()
        .filter(|t| crate::output::is_tree_type(t))
        .map(|t| (t.clone(), output::type_key(job.key, t)))
        .collect();
    if !tree.is_empty() {
        let root = disk.root_mount();
        let types: Vec<&str> = tree.iter().map(|t| t.0.as_str()).collect();
        let scan = if crate::output::needs_scan(&types) {
            Some(
                layer::scan(root, &ScanOptions::default())
                    .with_context(|| format!("cannot scan {}", root.display()))?,
            )
        } else {
            None
        };
        let (written, laps) = crate::output::write(
            job.store,
            root,
            scan.as_ref(),
            &tree,
            &settings.image_name,
            &crate::build::pack_options(settings),
        )?;
        outputs.extend(written.into_iter().map(|w| Output {
            r#type: w.r#type,
            path: w.path,
            blake3: w.blake3,
            cached: false,
        }));
        timings.extend(laps);
        phase_timer = Instant::now();
    }

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
    let mut order: Vec<&String> = settings
        .image_types
        .iter()
        .filter(|t| is_disk_type(t) && *t != "raw")
        .collect();
    order.extend(settings.image_types.iter().filter(|t| *t == "raw"));
    for t in order {
        let path = crate::output::path(&settings.image_name, t);
        let tkey = output::type_key(job.key, t);
        let digest = if t == "raw" {
            let mut src = fs::File::open(&raw)
                .with_context(|| format!("cannot open the raw image {}", raw.display()))?;
            output::keep(job.store, &tkey, &mut src, Some(&path))?
        } else {
            image::convert(
                &raw,
                t,
                &path,
                !job.options.uncompressed,
                job.options.qemu_img_options.as_deref(),
            )?;
            crate::build::set_mode(&path, 0o644)?;
            let mut src =
                fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            output::keep(job.store, &tkey, &mut src, None)?
        };
        outputs.push(Output {
            r#type: t.clone(),
            path,
            blake3: digest,
            cached: false,
        });
        lap(&format!("output {t}"), &mut phase_timer, &mut timings);
    }
    let _ = fs::remove_file(&raw);
    // Outputs in the order the user asked for them.
    outputs.sort_by_key(|o| {
        settings
            .image_types
            .iter()
            .position(|t| *t == o.r#type)
            .unwrap_or(usize::MAX)
    });
    Ok(Produced { outputs, timings })
}

/// Writes every requested output from the cache if ALL of them are cached under `key`.
/// Returns None on a miss (or when a cached blob turns out damaged: the step then runs).
pub fn restore_cached(
    store: &Store,
    key: &str,
    settings: &Settings,
    now: i64,
) -> Result<Option<Vec<Output>>> {
    // All or nothing: the disk step runs again unless every type is cached.
    for t in &settings.image_types {
        if store.get_output(&output::type_key(key, t))?.is_none() {
            return Ok(None);
        }
    }
    let mut outputs = Vec::new();
    for t in &settings.image_types {
        let path = crate::output::path(&settings.image_name, t);
        let tkey = output::type_key(key, t);
        let Some(digest) =
            output::restore_cached(store, &tkey, t, &path, now, "building the disk again")?
        else {
            return Ok(None);
        };
        outputs.push(Output {
            r#type: t.clone(),
            path,
            blake3: digest,
            cached: true,
        });
    }
    Ok(Some(outputs))
}

/// The largest size strata takes from the user, in MiB (1 PiB): far beyond any disk image,
/// and small enough that the size arithmetic cannot overflow.
const MAX_MIB: u64 = 1 << 30;

fn parse_env_number(env: &BTreeMap<String, String>, name: &str) -> Result<Option<u64>, Failure> {
    match env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| *n <= MAX_MIB)
            .map(Some)
            .ok_or_else(|| {
                Failure::bad_input(format!(
                    "{name}={v}: not a whole number of MiB (MB) up to {MAX_MIB}"
                ))
            }),
    }
}

fn config_error(job: &Job, e: image::ImageError) -> anyhow::Error {
    if e.is_bad_input() {
        Failure::bad_input(format!("{} (from {})", e, job.config.origin)).into()
    } else {
        Failure::new(Exit::BuildFailed, format!("creating the disk image: {e}")).into()
    }
}

fn refuse_mounts_under(dir: &Path) -> Result<()> {
    let mounts = sandbox::mount_points_under(dir)
        .with_context(|| format!("cannot read the mounts under {}", dir.display()))?;
    if !mounts.is_empty() {
        anyhow::bail!(
            "{} still has mounts below it ({}); refusing to move or delete it",
            dir.display(),
            mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Runs one phase's hooks (chrooted into the mounted disk for finalise.d) with the executor's
/// hook loop; the first failure ends the build with the same one-line error as any other hook.
fn run_phase<'h>(
    job: &Job,
    phase: Phase,
    hooks: &'h [PlannedHook],
    env: &BTreeMap<String, String>,
) -> Result<Vec<(&'h PlannedHook, runner::HookOutcome)>> {
    let outcomes =
        crate::build::run_phase_hooks(phase, hooks, job.paths, env, job.reporter, &|_| {
            Ok(Vec::new())
        })?;
    Ok(hooks.iter().zip(outcomes).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
    fn output_key_changes_with_each_input_and_only_them() {
        let cfg = ConfigSource {
            text: "- local_loop: {}\n".into(),
            origin: "x".into(),
        };
        let types = vec!["qcow2".to_string()];
        let opts = DiskOptions::default();
        let k = output_key("p", &types, &opts, &cfg);
        assert_eq!(k, output_key("p", &types, &opts, &cfg));
        // The origin is for messages only.
        let moved = ConfigSource {
            origin: "y".into(),
            ..cfg.clone()
        };
        assert_eq!(k, output_key("p", &types, &opts, &moved));
        // --checksum does not change the image bytes.
        let with_sums = DiskOptions {
            checksum: true,
            ..opts.clone()
        };
        assert_eq!(k, output_key("p", &types, &with_sums, &cfg));
        assert_ne!(k, output_key("q", &types, &opts, &cfg));
        assert_ne!(k, output_key("p", &["raw".to_string()], &opts, &cfg));
        let other = ConfigSource {
            text: "- local_loop: {name: x}\n".into(),
            ..cfg.clone()
        };
        assert_ne!(k, output_key("p", &types, &opts, &other));
        for o in [
            DiskOptions {
                root_label: Some("r".into()),
                ..opts.clone()
            },
            DiskOptions {
                mkfs_options: Some("-m 0".into()),
                ..opts.clone()
            },
            DiskOptions {
                qemu_img_options: Some("compat=1.1".into()),
                ..opts.clone()
            },
            DiskOptions {
                max_online_resize: Some("1000".into()),
                ..opts.clone()
            },
            DiskOptions {
                uncompressed: true,
                ..opts.clone()
            },
        ] {
            assert_ne!(k, output_key("p", &types, &o, &cfg), "{o:?}");
        }
        // An empty option is not the same as an absent one.
        let empty = DiskOptions {
            root_label: Some(String::new()),
            ..opts.clone()
        };
        assert_ne!(k, output_key("p", &types, &empty, &cfg));
        assert_ne!(output::type_key(&k, "raw"), output::type_key(&k, "qcow2"));
    }

    #[test]
    fn sparse_copy_keeps_content_and_leaves_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[5000] = 1; // in the 2nd block
        data[(6 << 20) + 10] = 7;
        let last = data.len() - 1;
        data[last] = 9;
        let dest = dir.path().join("out.raw");
        let digest = output::keep(None, "k", &mut &data[..], Some(&dest)).unwrap();
        assert_eq!(digest, blake3::hash(&data).to_hex().to_string());
        assert_eq!(fs::read(&dest).unwrap(), data);
        let md = fs::metadata(&dest).unwrap();
        assert_eq!(md.len(), data.len() as u64);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            md.blocks()
        );
        // A file ending in a hole still has its full length.
        let zeros = vec![0u8; 3 << 20];
        let dest2 = dir.path().join("zeros.raw");
        output::keep(None, "k", &mut &zeros[..], Some(&dest2)).unwrap();
        assert_eq!(fs::metadata(&dest2).unwrap().len(), 3 << 20);
    }

    #[test]
    fn stored_output_restores_byte_identical_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let mut data = vec![0u8; 4 << 20];
        data[123] = 42;
        data[3 << 20] = 1;
        let digest = output::keep(Some(&store), "out-key", &mut &data[..], None).unwrap();
        let rec = store.get_output("out-key").unwrap().unwrap();
        let dest = dir.path().join("back.raw");
        assert_eq!(
            output::restore(&store, &rec.blob_digest, &dest).unwrap(),
            digest
        );
        assert_eq!(fs::read(&dest).unwrap(), data);
        assert!(fs::metadata(&dest).unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn sizes_from_the_environment_are_bounded() {
        let env = |v: &str| BTreeMap::from([("DIB_JOURNAL_SIZE".to_string(), v.to_string())]);
        let parse = |v: &str| parse_env_number(&env(v), "DIB_JOURNAL_SIZE");
        assert_eq!(parse("512").unwrap(), Some(512));
        assert_eq!(parse(" ").unwrap(), None);
        for bad in ["-1", "1.5", "99999999999999", "lots"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(image::image_bytes(1, false), 64 * 1024);
        assert_eq!(image::image_bytes(64, true), (64 + 525 * 1024) * 1024);
    }

    #[test]
    fn disk_types_are_recognised() {
        assert!(wants_disk(&["tar".into(), "qcow2".into()]));
        assert!(!wants_disk(&["tar".into()]));
        assert!(is_disk_type("vhd") && is_disk_type("raw") && !is_disk_type("tgz"));
    }
}
