//! Resolved build settings: what the user asked for (a [`BuildRequest`], typed, made by the
//! command layer from the command line) merged with the DIB_* environment, checked once before
//! anything runs; and the hook environment contract (what every hook receives, and how each
//! variable enters keys, per [`crate::envvars`]).
//!
//! ```text
//! BuildRequest + process environment ──Settings::resolve──► Settings (with DiskOptions)
//! Settings + BuildPaths ──► base hook environment (rootfs phases: no disk-only variables)
//!                       ──► disk_environment (block-device.d .. cleanup.d: with them)
//! hook environment ──normalise_for_key──► what enters step keys
//! ```
//!
//! No clap type crosses this line: the command layer converts its arguments into a
//! [`BuildRequest`].

use crate::envvars::{self, Keying};
use crate::exit::Failure;
use crate::outputs::OutputType;
use crate::phase::Phase;
use crate::plan::{Granularity, RebuildFrom};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exported bash function `get_image_element_array`, as bash passes functions on.
pub const IMAGE_ELEMENT_FN: &str = "BASH_FUNC_get_image_element_array%%";

/// The largest size strata takes from the user, in MiB (1 PiB): far beyond any disk image,
/// and small enough that the size arithmetic cannot overflow.
pub const MAX_MIB: u64 = 1 << 30;

/// A build as the user asked for it (typed, not yet merged with the environment).
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub elements: Vec<String>,
    pub skip_base: bool,
    pub element_dirs: Vec<PathBuf>,
    pub image_name: String,
    pub image_types: Vec<OutputType>,
    pub arch: Option<String>,
    pub trace: u8,
    pub packages: Vec<String>,
    pub offline: bool,
    pub image_cache: Option<PathBuf>,
    pub install_type: Option<String>,
    pub cache: CacheSettings,
    pub no_tmpfs: bool,
    pub min_tmpfs: u64,
    pub disk: DiskRequest,
    /// The layer compression of `-t oci`.
    pub oci_compression: crate::outputs::oci::Compression,
    /// `--push REF[:TAG]`: send the `-t oci` image to a registry when the build is done.
    pub push: Option<String>,
}

/// The disk options as given on the command line (sizes already parsed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskRequest {
    /// `--image-size`, in KiB.
    pub image_size_kib: Option<u64>,
    /// `--image-extra-size`, in MB.
    pub image_extra_mb: Option<u64>,
    pub root_label: Option<String>,
    pub mkfs_options: Option<String>,
    pub qemu_img_options: Option<String>,
    pub max_online_resize: Option<u64>,
    pub checksum: bool,
    pub uncompressed: bool,
}

/// How the build uses the cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub granularity: Granularity,
    pub ttl: Option<Duration>,
    /// Neither use nor store cached steps.
    pub no_cache: bool,
    pub rebuild_from: Option<RebuildFrom>,
    pub registries: RegistrySettings,
}

/// The registry levels of a build and how they are reached and trusted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistrySettings {
    /// `--cache-from`, in lookup order.
    pub from: Vec<String>,
    /// `--cache-to`.
    pub to: Option<String>,
    pub insecure: Vec<String>,
    pub sign_key: Option<PathBuf>,
    pub trust: Vec<PathBuf>,
}

/// The disk options, resolved from the command line and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskOptions {
    /// DIB_IMAGE_SIZE / --image-size, in KiB (None: computed from the tree).
    pub image_size_kib: Option<u64>,
    /// DIB_IMAGE_EXTRA_SIZE / --image-extra-size, in MB.
    pub image_extra_mb: Option<u64>,
    /// DIB_JOURNAL_SIZE, in MB (default 64).
    pub journal_mb: u64,
    pub fs_type: String,
    pub root_label: Option<String>,
    pub mkfs_options: Option<String>,
    pub qemu_img_options: Option<String>,
    pub max_online_resize: Option<u64>,
    /// `--checksum` or DIB_CHECKSUM.
    pub checksum: bool,
    pub uncompressed: bool,
}

impl DiskOptions {
    /// The options that change a disk's bytes, by name, for the disk step's key (`--checksum`
    /// is not one: the checksum files are written beside the outputs).
    pub fn key_fields(&self) -> BTreeMap<String, String> {
        let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "\u{0}unset".into());
        let n = |v: Option<u64>| v.map_or_else(|| "\u{0}unset".into(), |n| n.to_string());
        [
            ("image-size-kib", n(self.image_size_kib)),
            ("image-extra-mb", n(self.image_extra_mb)),
            ("journal-mb", self.journal_mb.to_string()),
            ("fs-type", self.fs_type.clone()),
            ("root-label", s(&self.root_label)),
            ("mkfs-options", s(&self.mkfs_options)),
            ("qemu-img-options", s(&self.qemu_img_options)),
            ("max-online-resize", n(self.max_online_resize)),
            ("uncompressed", self.uncompressed.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Everything a build or a plan needs to know, resolved once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub elements: Vec<String>,
    pub skip_base: bool,
    pub element_dirs: Vec<PathBuf>,
    pub elements_path_env: Option<String>,
    pub image_name: String,
    pub image_types: Vec<OutputType>,
    pub arch: String,
    pub trace: u8,
    pub packages: Vec<String>,
    pub offline: bool,
    pub image_cache: PathBuf,
    pub cache: CacheSettings,
    pub tmp_dir: PathBuf,
    pub use_tmpfs: bool,
    pub min_tmpfs: u64,
    pub source_date_epoch: Option<i64>,
    pub disk: DiskOptions,
    pub oci_compression: crate::outputs::oci::Compression,
    pub push: Option<String>,
    /// dib's `break=` points (from the environment variable `break`).
    pub break_points: Vec<crate::plan::BreakPoint>,
    /// The user's variables that every hook receives: `DIB_*` and the pass-through ones,
    /// without the disk-only ones.
    pub user_env: BTreeMap<String, String>,
    /// The disk-only variables (for block-device.d .. cleanup.d).
    pub disk_env: BTreeMap<String, String>,
}

/// Parses a size in GiB (`--image-size`, DIB_IMAGE_SIZE): a positive finite number, at most
/// 1 PiB. Returns KiB.
pub fn parse_gib(s: &str) -> Result<u64, String> {
    let g: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of GiB"))?;
    if !g.is_finite() || g <= 0.0 || g > (MAX_MIB / 1024) as f64 {
        return Err(format!(
            "'{s}' is not a positive number of GiB up to {}",
            MAX_MIB / 1024
        ));
    }
    Ok(((g * 1024.0 * 1024.0) as u64).max(1))
}

/// Parses a whole number of MB (`--image-extra-size`, DIB_IMAGE_EXTRA_SIZE,
/// DIB_JOURNAL_SIZE), at most 1 PiB.
pub fn parse_mb(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_MIB)
        .ok_or_else(|| format!("'{s}' is not a whole number of MB up to {MAX_MIB}"))
}

/// Parses a whole number (`--max-online-resize`).
pub fn parse_count(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("'{s}' is not a whole number"))
}

impl Settings {
    /// Resolves a request against an environment (the process's, or a test's). Everything
    /// that can be checked without the elements is checked here.
    pub fn resolve(
        req: &BuildRequest,
        env: &BTreeMap<String, String>,
        host_arch: impl FnOnce() -> String,
    ) -> Result<Settings, Failure> {
        if req.image_name.is_empty() {
            return Err(Failure::bad_input("-o: the image name is empty"));
        }
        if req.image_types.is_empty() {
            return Err(Failure::bad_input("-t: no output type given"));
        }
        // `-t tar,tar` (or `-t tar -t tar`) makes one tar.
        let mut image_types: Vec<OutputType> = Vec::new();
        for t in &req.image_types {
            if !image_types.contains(t) {
                image_types.push(*t);
            }
        }
        let mut image_name = req.image_name.clone();
        if let [only] = image_types.as_slice() {
            // dib drops a trailing ".<type>" when exactly one type is asked for.
            if let Some(stripped) = image_name.strip_suffix(&format!(".{only}")) {
                image_name = stripped.to_string();
            }
        }
        for r in req
            .cache
            .registries
            .from
            .iter()
            .chain(&req.cache.registries.to)
        {
            crate::registry::Reference::parse(r, &req.cache.registries.insecure)
                .map_err(|e| Failure::bad_input(format!("--cache-from/--cache-to {r}: {e}")))?;
        }
        if req.cache.no_cache
            && (!req.cache.registries.from.is_empty() || req.cache.registries.to.is_some())
        {
            return Err(Failure::bad_input(
                "--no-cache uses no cache at all; drop --cache-from/--cache-to, or --no-cache",
            ));
        }
        if let Some(p) = &req.push {
            if !req.image_types.contains(&OutputType::Oci) {
                return Err(Failure::bad_input(format!(
                    "--push {p}: pushes the -t oci image; add oci to -t"
                )));
            }
            crate::registry::Reference::parse(p, &req.cache.registries.insecure)
                .map_err(|e| Failure::bad_input(format!("--push {p}: {e}")))?;
        }
        let arch = match &req.arch {
            Some(a) => crate::arch::check(a).map_err(|e| Failure::bad_input(format!("-a {e}")))?,
            None => host_arch(),
        };
        let source_date_epoch = match env.get("SOURCE_DATE_EPOCH") {
            Some(v) if !v.is_empty() => {
                Some(v.parse::<i64>().ok().filter(|t| *t >= 0).ok_or_else(|| {
                    Failure::bad_input(format!(
                        "SOURCE_DATE_EPOCH={v}: not a whole number of seconds since 1970"
                    ))
                })?)
            }
            _ => None,
        };
        let home = env.get("HOME").cloned().unwrap_or_else(|| "/root".into());
        let image_cache = req
            .image_cache
            .clone()
            .unwrap_or_else(|| Path::new(&home).join(".cache/image-create"));

        // The user's variables, split into what every hook gets and what only the disk step's
        // hooks get. Options win over the environment.
        let mut passed: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, _)| envvars::passed_to_hooks(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(t) = &req.install_type {
            passed.insert("DIB_DEFAULT_INSTALLTYPE".into(), t.clone());
        }
        // Set from options, never from the user's leftovers.
        for k in [
            "DIB_IMAGE_CACHE",
            "DIB_OFFLINE",
            "DIB_DEBUG_TRACE",
            "DIB_ARGS",
            "DIB_ENV",
            "DIB_NO_TMPFS",
        ] {
            passed.remove(k);
        }
        let disk = resolve_disk(&req.disk, &passed)?;
        if let Some(kib) = disk.image_size_kib {
            passed.insert("DIB_IMAGE_SIZE".into(), format_gib(kib));
        }
        if let Some(mb) = disk.image_extra_mb {
            passed.insert("DIB_IMAGE_EXTRA_SIZE".into(), mb.to_string());
        }
        if req.disk.checksum {
            passed.insert("DIB_CHECKSUM".into(), "1".into());
        }
        let (disk_env, user_env) = passed
            .into_iter()
            .partition(|(k, _)| envvars::keying(k) == Keying::DiskOnly);

        Ok(Settings {
            elements: req.elements.clone(),
            skip_base: req.skip_base,
            element_dirs: req.element_dirs.clone(),
            elements_path_env: env.get("ELEMENTS_PATH").cloned(),
            image_name,
            image_types,
            arch,
            trace: req.trace,
            packages: req
                .packages
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            offline: req.offline || env.get("DIB_OFFLINE").is_some_and(|v| !v.is_empty()),
            image_cache,
            cache: req.cache.clone(),
            tmp_dir: env
                .get("TMP_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            use_tmpfs: !req.no_tmpfs && env.get("DIB_NO_TMPFS").is_none_or(|v| v != "1"),
            min_tmpfs: req.min_tmpfs,
            source_date_epoch,
            disk,
            oci_compression: req.oci_compression,
            push: req.push.clone(),
            break_points: match env.get("break") {
                Some(v) => crate::plan::BreakPoint::parse_list(v).map_err(Failure::bad_input)?,
                None => Vec::new(),
            },
            user_env,
            disk_env,
        })
    }

    /// dib's `DIB_ARGS`, built from the options that shape the image (not from paths or cache
    /// options, so it is the same on every machine).
    pub fn dib_args(&self) -> String {
        let types: Vec<&str> = self.image_types.iter().map(|t| t.name()).collect();
        let mut args = vec![
            "-o".to_string(),
            image_base_name(&self.image_name),
            "-t".into(),
            types.join(","),
            "-a".into(),
            self.arch.clone(),
        ];
        if self.skip_base {
            args.push("-n".into());
        }
        if !self.packages.is_empty() {
            args.push("-p".into());
            args.push(self.packages.join(","));
        }
        args.extend(self.elements.iter().cloned());
        args.join(" ")
    }

    /// True when the build writes a disk image (and so has a disk step).
    pub fn wants_disk(&self) -> bool {
        crate::outputs::wants_disk(&self.image_types)
    }
}

fn format_gib(kib: u64) -> String {
    if kib.is_multiple_of(1024 * 1024) {
        (kib / (1024 * 1024)).to_string()
    } else {
        format!("{}", kib as f64 / (1024.0 * 1024.0))
    }
}

/// The disk options: the command line first, then DIB_IMAGE_SIZE & co. from the environment.
fn resolve_disk(req: &DiskRequest, env: &BTreeMap<String, String>) -> Result<DiskOptions, Failure> {
    let from_env = |name: &str, parse: fn(&str) -> Result<u64, String>| match env
        .get(name)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .map_err(|e| Failure::bad_input(format!("{name}={v}: {e}"))),
    };
    let image_size_kib = match req.image_size_kib {
        Some(k) => Some(k),
        None => from_env("DIB_IMAGE_SIZE", parse_gib)?,
    };
    let image_extra_mb = match req.image_extra_mb {
        Some(m) => Some(m),
        None => from_env("DIB_IMAGE_EXTRA_SIZE", parse_mb)?,
    };
    let journal_mb = from_env("DIB_JOURNAL_SIZE", parse_mb)?.unwrap_or(64);
    let checksum = req.checksum
        || env
            .get("DIB_CHECKSUM")
            .is_some_and(|v| !v.is_empty() && v != "0");
    Ok(DiskOptions {
        image_size_kib,
        image_extra_mb,
        journal_mb,
        fs_type: env
            .get("FS_TYPE")
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| "ext4".into()),
        root_label: req
            .root_label
            .clone()
            .or_else(|| env.get("DIB_ROOT_LABEL").filter(|v| !v.is_empty()).cloned()),
        mkfs_options: req.mkfs_options.clone(),
        qemu_img_options: req.qemu_img_options.clone(),
        max_online_resize: req.max_online_resize,
        checksum,
        uncompressed: req.uncompressed,
    })
}

/// The build's folders, as hooks see them on the host.
#[derive(Debug, Clone)]
pub struct BuildPaths {
    pub build_dir: PathBuf,
    pub image_dir: PathBuf,
    pub hooks_dir: PathBuf,
    pub mount_dir: PathBuf,
}

impl BuildPaths {
    pub fn under(build_dir: &Path) -> BuildPaths {
        BuildPaths {
            build_dir: build_dir.to_path_buf(),
            image_dir: build_dir.join("image"),
            hooks_dir: build_dir.join("hooks"),
            mount_dir: build_dir.join("mnt"),
        }
    }

    /// Fixed stand-ins used while computing keys and capturing environment.d for a plan, so
    /// that nothing derived from a temp dir makes keys differ between runs.
    pub fn placeholder() -> BuildPaths {
        BuildPaths::under(Path::new("/strata-build"))
    }
}

/// The process environment as text (variables that are not UTF-8 are left out: hooks, dib's
/// `when` expressions and install types deal in text).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// One `declare -x NAME="VALUE"` line that bash reads back to exactly VALUE (inside double
/// quotes, `\`, `"`, `$` and backquotes are escaped).
fn declare_line(name: &str, value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    format!("declare -x {name}=\"{quoted}\"\n")
}

/// What every rootfs hook receives before environment.d runs (as dib exports it), for one element set.
pub fn base_environment(
    settings: &Settings,
    paths: &BuildPaths,
    image_element: &str,
    image_element_yaml: &str,
    elements_path: &str,
    strata_bin: &Path,
) -> BTreeMap<String, String> {
    let mut env = settings.user_env.clone();
    let dib_env: String = settings
        .user_env
        .iter()
        .filter(|(k, _)| k.starts_with("DIB_"))
        .map(|(k, v)| declare_line(k, v))
        .collect();
    let pairs: [(&str, String); 22] = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("LC_ALL", "C".into()),
        ("HOME", "/root".into()),
        ("ARCH", settings.arch.clone()),
        ("IMAGE_NAME", settings.image_name.clone()),
        (
            // dib's img-defaults sets IMAGE_TYPE=qcow2 and -t never changes it.
            "IMAGE_TYPE",
            settings
                .user_env
                .get("IMAGE_TYPE")
                .cloned()
                .unwrap_or_else(|| "qcow2".into()),
        ),
        ("ELEMENTS_PATH", elements_path.into()),
        ("IMAGE_ELEMENT", image_element.into()),
        ("IMAGE_ELEMENT_YAML", image_element_yaml.into()),
        (
            "DIB_IMAGE_CACHE",
            settings.image_cache.display().to_string(),
        ),
        (
            "DIB_OFFLINE",
            if settings.offline {
                "1".into()
            } else {
                String::new()
            },
        ),
        ("DIB_DEBUG_TRACE", settings.trace.to_string()),
        ("DIB_ARGS", settings.dib_args()),
        ("DIB_ENV", dib_env),
        (
            "DIB_PYTHON_EXEC",
            settings
                .user_env
                .get("DIB_PYTHON_EXEC")
                .cloned()
                .unwrap_or_else(default_python),
        ),
        (
            "DIB_NO_TMPFS",
            if settings.use_tmpfs {
                "0".into()
            } else {
                "1".into()
            },
        ),
        ("TMP_BUILD_DIR", paths.build_dir.display().to_string()),
        ("TMP_IMAGE_DIR", paths.image_dir.display().to_string()),
        ("TMP_HOOKS_PATH", paths.hooks_dir.display().to_string()),
        ("TMP_MOUNT_PATH", paths.mount_dir.display().to_string()),
        ("STRATA_BIN", strata_bin.display().to_string()),
        (
            "FS_TYPE",
            settings
                .user_env
                .get("FS_TYPE")
                .cloned()
                .unwrap_or_else(|| "ext4".into()),
        ),
    ];
    for (k, v) in pairs {
        env.insert(k.to_string(), v);
    }
    // dib exports a bash function listing `[name]=path` pairs for `eval declare -A`; bash imports
    // exported functions from BASH_FUNC_<name>%% variables.
    let pairs: String = image_element_yaml
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, p)| format!("[{n}]={p}"))
        .collect::<Vec<_>>()
        .join(" ");
    env.insert(
        IMAGE_ELEMENT_FN.to_string(),
        format!("() {{  echo \"{pairs}\"\n}}"),
    );
    if let Some(sde) = settings.source_date_epoch {
        env.insert("SOURCE_DATE_EPOCH".into(), sde.to_string());
    }
    env
}

/// The environment of the disk step's phases: the rootfs hooks' base environment plus the
/// disk-only variables (and DIB_ENV listing them too, as dib's does).
pub fn disk_environment(
    settings: &Settings,
    base: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = base.clone();
    env.extend(settings.disk_env.clone());
    let user: BTreeMap<&String, &String> = settings
        .user_env
        .iter()
        .chain(settings.disk_env.iter())
        .filter(|(k, _)| k.starts_with("DIB_"))
        .collect();
    let dib_env: String = user.iter().map(|(k, v)| declare_line(k, v)).collect();
    env.insert("DIB_ENV".into(), dib_env);
    env
}

/// dib sets DIB_PYTHON_EXEC to the Python running dib; strata uses the host's python3.
fn default_python() -> String {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("python3")
        .to_string()
}

/// The environment of one hook in one phase: `base` plus `TARGET_ROOT` where dib sets it.
pub fn phase_environment(
    base: &BTreeMap<String, String>,
    phase: Phase,
    paths: &BuildPaths,
) -> BTreeMap<String, String> {
    let mut env = base.clone();
    if phase.sets_target_root() {
        env.insert("TARGET_ROOT".into(), paths.mount_dir.display().to_string());
    }
    env
}

/// The environment as it enters a step key: normalised values replaced by their names, and
/// `IMAGE_NAME` reduced to its file name (`-o` may carry the output folder, which differs
/// between machines; what hooks derive from it is the name, as dib's manifests do). Values
/// environment.d derived from that folder (dib's manifests element sets
/// `DIB_MANIFEST_SAVE_DIR=${IMAGE_NAME}.d/`) have the folder replaced by `<IMAGE_DIR>`, so
/// builds into different output folders share their steps.
pub fn normalise_for_key(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let image_dir = env
        .get("IMAGE_NAME")
        .and_then(|n| Path::new(n).parent())
        .map(|d| d.display().to_string())
        .filter(|d| !d.is_empty() && d != "/");
    env.iter()
        .map(|(k, v)| {
            if envvars::keying(k) == Keying::Normalised {
                (k.clone(), format!("<{k}>"))
            } else if k == "IMAGE_NAME" {
                (k.clone(), image_base_name(v))
            } else if let Some(dir) = &image_dir
                && v.contains(&format!("{dir}/"))
            {
                (k.clone(), v.replace(&format!("{dir}/"), "<IMAGE_DIR>/"))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

fn image_base_name(name: &str) -> String {
    Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> BuildRequest {
        let mut r = BuildRequest {
            image_name: "image".into(),
            image_types: vec![OutputType::Qcow2],
            min_tmpfs: 2,
            ..BuildRequest::default()
        };
        r.elements = args.iter().map(|s| s.to_string()).collect();
        r
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve(r: &BuildRequest, e: &[(&str, &str)]) -> Result<Settings, Failure> {
        Settings::resolve(r, &env(e), || "amd64".into())
    }

    #[test]
    fn single_type_suffix_is_dropped_like_dib() {
        let mut r = req(&["e"]);
        r.image_name = "x.tar".into();
        r.image_types = vec![OutputType::Tar];
        let s = resolve(&r, &[]).unwrap();
        assert_eq!(s.image_name, "x");
        assert_eq!(s.arch, "amd64");
    }

    #[test]
    fn a_type_asked_for_twice_is_made_once() {
        let mut r = req(&["e"]);
        r.image_types = vec![OutputType::Tar, OutputType::Oci, OutputType::Tar];
        assert_eq!(
            resolve(&r, &[]).unwrap().image_types,
            [OutputType::Tar, OutputType::Oci]
        );
    }

    #[test]
    fn an_unknown_arch_is_refused_naming_the_choices() {
        let mut r = req(&["e"]);
        r.arch = Some("nosucharch".into());
        let e = resolve(&r, &[]).unwrap_err();
        assert!(
            e.message.contains("nosucharch") && e.message.contains("x86_64"),
            "{}",
            e.message
        );
        r.arch = Some("aarch64".into());
        assert_eq!(resolve(&r, &[]).unwrap().arch, "aarch64");
    }

    #[test]
    fn user_env_keeps_dib_and_proxies_only() {
        let s = resolve(
            &req(&["e"]),
            &[
                ("DIB_RELEASE", "bookworm"),
                ("http_proxy", "p"),
                ("SECRET", "x"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.user_env.get("DIB_RELEASE").map(String::as_str),
            Some("bookworm")
        );
        assert!(s.user_env.contains_key("http_proxy"));
        assert!(!s.user_env.contains_key("SECRET"));
    }

    #[test]
    fn disk_only_variables_reach_only_the_disk_phases() {
        let mut r = req(&["e"]);
        r.disk.image_size_kib = Some(3 << 20);
        r.disk.checksum = true;
        let s = resolve(
            &r,
            &[
                ("DIB_IMAGE_EXTRA_SIZE", "100"),
                ("DIB_RELEASE", "bookworm"),
                ("DIB_BLOCK_DEVICE_CONFIG", "- local_loop: {}"),
            ],
        )
        .unwrap();
        for k in [
            "DIB_IMAGE_SIZE",
            "DIB_IMAGE_EXTRA_SIZE",
            "DIB_CHECKSUM",
            "DIB_BLOCK_DEVICE_CONFIG",
        ] {
            assert!(
                !s.user_env.contains_key(k),
                "{k} must not reach rootfs hooks"
            );
            assert!(s.disk_env.contains_key(k), "{k} must reach disk hooks");
        }
        assert_eq!(s.disk_env["DIB_IMAGE_SIZE"], "3");
        assert_eq!(s.disk.image_size_kib, Some(3 << 20));
        assert_eq!(s.disk.image_extra_mb, Some(100));
        assert!(s.disk.checksum);
        let base = base_environment(
            &s,
            &BuildPaths::placeholder(),
            "e",
            "e: /x/e\n",
            "/x",
            Path::new("/bin/strata"),
        );
        assert!(!base.contains_key("DIB_IMAGE_SIZE"));
        assert!(!base["DIB_ENV"].contains("DIB_IMAGE_SIZE"));
        let disk = disk_environment(&s, &base);
        assert_eq!(disk["DIB_IMAGE_SIZE"], "3");
        assert!(disk["DIB_ENV"].contains("DIB_IMAGE_SIZE"));
        assert!(disk["DIB_ENV"].contains("DIB_RELEASE"));
    }

    #[test]
    fn no_tmpfs_does_not_change_what_enters_keys() {
        let a = resolve(&req(&["e"]), &[]).unwrap();
        let mut r = req(&["e"]);
        r.no_tmpfs = true;
        let b = resolve(&r, &[]).unwrap();
        assert!(a.use_tmpfs && !b.use_tmpfs);
        let env = |s: &Settings| {
            normalise_for_key(&base_environment(
                s,
                &BuildPaths::placeholder(),
                "e",
                "",
                "",
                Path::new("/s"),
            ))
        };
        assert_eq!(env(&a), env(&b));
    }

    #[test]
    fn bad_sizes_and_epochs_are_refused_before_anything_runs() {
        for (k, v) in [
            ("DIB_IMAGE_SIZE", "-1"),
            ("DIB_IMAGE_SIZE", "inf"),
            ("DIB_IMAGE_SIZE", "nan"),
            ("DIB_IMAGE_SIZE", "1e30"),
            ("DIB_IMAGE_EXTRA_SIZE", "1.5"),
            ("DIB_JOURNAL_SIZE", "lots"),
            ("SOURCE_DATE_EPOCH", "soon"),
            ("SOURCE_DATE_EPOCH", "-5"),
        ] {
            let e = resolve(&req(&["e"]), &[(k, v)]).unwrap_err();
            assert!(
                e.message.contains(k) && e.message.contains(v),
                "{k}={v}: {}",
                e.message
            );
        }
        assert_eq!(parse_gib("1.5").unwrap(), 1536 * 1024);
        assert!(parse_gib("0").is_err());
        assert_eq!(parse_mb(" 512 ").unwrap(), 512);
    }

    #[test]
    fn hooks_can_call_get_image_element_array() {
        let s = resolve(&req(&["e"]), &[]).unwrap();
        let base = base_environment(
            &s,
            &BuildPaths::placeholder(),
            "a b",
            "a: /x/a\nb: /y/b\n",
            "/x:/y",
            Path::new("/bin/strata"),
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg("eval declare -A e=($(get_image_element_array)); echo ${e[b]}")
            .env_clear()
            .envs(&base)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/y/b");
    }

    #[test]
    fn dib_env_reads_back_every_value_exactly() {
        let tricky = r#"a "quoted" $HOME `date` back\slash \" end\"#;
        let s = resolve(&req(&["e"]), &[("DIB_TRICKY", tricky)]).unwrap();
        let base = base_environment(&s, &BuildPaths::placeholder(), "e", "", "", Path::new("/s"));
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg("unset DIB_TRICKY; eval \"$DIB_ENV\"; printf %s \"$DIB_TRICKY\"")
            .env_clear()
            .env("DIB_ENV", &base["DIB_ENV"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }

    #[test]
    fn volatile_values_are_normalised_others_kept() {
        let n = normalise_for_key(&env(&[
            ("TMP_BUILD_DIR", "/tmp/x1"),
            ("ARCH", "amd64"),
            ("IMAGE_NAME", "/home/ci/job7/out/deb"),
        ]));
        assert_eq!(n["TMP_BUILD_DIR"], "<TMP_BUILD_DIR>");
        assert_eq!(n["ARCH"], "amd64");
        assert_eq!(n["IMAGE_NAME"], "deb");
        // What environment.d derives from the output folder does not key it either.
        let derived = |dir: &str| {
            normalise_for_key(&env(&[
                ("IMAGE_NAME", &format!("{dir}/vm")),
                ("DIB_MANIFEST_SAVE_DIR", &format!("{dir}/vm.d/")),
            ]))
        };
        assert_eq!(derived("/srv/a"), derived("/home/ci/b"));
        assert_eq!(
            derived("/srv/a")["DIB_MANIFEST_SAVE_DIR"],
            "<IMAGE_DIR>/vm.d/"
        );
    }
}
