//! Resolved build settings: the CLI options merged with the DIB_* environment, plus the hook
//! environment contract (what every hook receives, and which of it is volatile).
//!
//! ```text
//! BuildOptions (clap) + process environment ──► Settings
//! Settings + BuildPaths ──► base hook environment (BTreeMap), volatile names for key normalising
//! ```

use crate::cli::{BuildOptions, Granularity};
use crate::error::Failure;
use crate::phase::Phase;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Proxy settings: passed to hooks, kept out of keys (how packages are fetched, not what).
const PROXIES: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "ftp_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "FTP_PROXY",
];

/// Host variables, besides every `DIB_*` one and [`PROXIES`], that reach hooks unchanged.
const PASSTHROUGH: &[&str] = &["SOURCE_DATE_EPOCH", "FS_TYPE", "IMAGE_TYPE", "TERM"];

/// The exported bash function `get_image_element_array`, as bash passes functions on.
pub const IMAGE_ELEMENT_FN: &str = "BASH_FUNC_get_image_element_array%%";

/// Variables whose value differs between machines or runs without changing what a step produces
/// (besides [`PROXIES`]). They reach hooks with their real value but enter step keys as a
/// placeholder.
pub const VOLATILE: &[&str] = &[
    "TMP_BUILD_DIR",
    "TMP_IMAGE_DIR",
    "TMP_HOOKS_PATH",
    "TMP_MOUNT_PATH",
    "TARGET_ROOT",
    "DIB_IMAGE_CACHE",
    "DIB_LOCKFILES",
    "STRATA_BIN",
    "ELEMENTS_PATH",
    "IMAGE_ELEMENT_YAML",
    IMAGE_ELEMENT_FN,
    "DIB_ENV",
    // What matters in the command line (elements, -a, -p, -o's name) is keyed on its own; the
    // rest (-t, cache options) must not rebuild the tree. Only dib's manifests record it.
    "DIB_ARGS",
    "DIB_DEBUG_TRACE",
    "DIB_PYTHON_EXEC",
    "TERM",
];

/// True for a variable whose value enters keys as a placeholder.
fn is_volatile(name: &str) -> bool {
    VOLATILE.contains(&name) || PROXIES.contains(&name)
}

/// Where `--rebuild-from` starts forcing reruns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildFrom {
    pub phase: Phase,
    pub hook: Option<String>,
}

impl RebuildFrom {
    pub fn parse(s: &str) -> Result<RebuildFrom, Failure> {
        let (phase, hook) = match s.split_once('/') {
            Some((p, h)) if !h.is_empty() => (p, Some(h.to_string())),
            Some((p, _)) => (p, None),
            None => (s, None),
        };
        let phase = Phase::parse(phase).ok_or_else(|| {
            Failure::bad_input(format!(
                "--rebuild-from {s}: '{phase}' is not a phase (one of root.d, extra-data.d, \
                 pre-install.d, install.d, post-install.d, post-root.d, block-device.d, \
                 pre-finalise.d, finalise.d, cleanup.d)"
            ))
        })?;
        Ok(RebuildFrom { phase, hook })
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
    pub image_types: Vec<String>,
    pub arch: String,
    pub trace: u8,
    pub packages: Vec<String>,
    pub offline: bool,
    pub image_cache: PathBuf,
    pub cache_dir: PathBuf,
    pub granularity: Granularity,
    pub cache_ttl: Option<Duration>,
    pub no_cache: bool,
    pub rebuild_from: Option<RebuildFrom>,
    pub tmp_dir: PathBuf,
    pub use_tmpfs: bool,
    pub min_tmpfs: u64,
    pub source_date_epoch: Option<i64>,
    /// The user's variables that hooks receive: every `DIB_*` plus [`PASSTHROUGH`].
    pub user_env: BTreeMap<String, String>,
}

/// Output types `strata build -t` accepts today.
pub const OUTPUT_TYPES: &[&str] = &["tar", "tgz", "squashfs", "qcow2", "raw", "vhd"];

impl Settings {
    /// Resolves options against an environment (the process's, or a test's).
    pub fn resolve(
        opts: &BuildOptions,
        env: &BTreeMap<String, String>,
        host_arch: impl FnOnce() -> String,
    ) -> Result<Settings, Failure> {
        for t in &opts.image_types {
            if !OUTPUT_TYPES.contains(&t.as_str()) {
                return Err(Failure::bad_input(format!(
                    "-t {t}: unsupported output type (supported today: {})",
                    OUTPUT_TYPES.join(", ")
                )));
            }
        }
        if opts.image_name.is_empty() {
            return Err(Failure::bad_input("-o: the image name is empty"));
        }
        let mut image_name = opts.image_name.clone();
        if let [only] = opts.image_types.as_slice() {
            // dib drops a trailing ".<type>" when exactly one type is asked for.
            if let Some(stripped) = image_name.strip_suffix(&format!(".{only}")) {
                image_name = stripped.to_string();
            }
        }
        let rebuild_from = opts
            .rebuild_from
            .as_deref()
            .map(RebuildFrom::parse)
            .transpose()?;
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
        let image_cache = opts
            .image_cache
            .clone()
            .unwrap_or_else(|| Path::new(&home).join(".cache/image-create"));
        let mut user_env: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, _)| {
                k.starts_with("DIB_")
                    || PASSTHROUGH.contains(&k.as_str())
                    || PROXIES.contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(t) = &opts.install_type {
            user_env.insert("DIB_DEFAULT_INSTALLTYPE".into(), t.clone());
        }
        if let Some(x) = &opts.image_extra_size {
            user_env.insert("DIB_IMAGE_EXTRA_SIZE".into(), x.clone());
        }
        if let Some(x) = &opts.image_size {
            user_env.insert("DIB_IMAGE_SIZE".into(), x.clone());
        }
        // Set from options, never from the user's leftovers.
        for k in [
            "DIB_IMAGE_CACHE",
            "DIB_OFFLINE",
            "DIB_DEBUG_TRACE",
            "DIB_ARGS",
            "DIB_ENV",
        ] {
            user_env.remove(k);
        }
        Ok(Settings {
            elements: opts.elements.clone(),
            skip_base: opts.skip_base,
            element_dirs: opts.paths.element_path.clone(),
            elements_path_env: env.get("ELEMENTS_PATH").cloned(),
            image_name,
            image_types: opts.image_types.clone(),
            arch: opts.arch.clone().unwrap_or_else(host_arch),
            trace: opts.trace,
            packages: opts
                .packages
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            offline: opts.offline || env.get("DIB_OFFLINE").is_some_and(|v| !v.is_empty()),
            image_cache,
            cache_dir: opts.cache_dir.clone(),
            granularity: opts.granularity,
            cache_ttl: opts.cache_ttl,
            no_cache: opts.no_cache,
            rebuild_from,
            tmp_dir: env
                .get("TMP_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            use_tmpfs: !opts.no_tmpfs && env.get("DIB_NO_TMPFS").is_none_or(|v| v != "1"),
            min_tmpfs: opts.min_tmpfs,
            source_date_epoch,
            user_env,
        })
    }

    /// dib's `DIB_ARGS`, built from the options that shape the image (not from paths or cache
    /// options, so it is the same on every machine).
    pub fn dib_args(&self) -> String {
        let mut args = vec![
            "-o".to_string(),
            image_base_name(&self.image_name),
            "-t".into(),
            self.image_types.join(","),
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

/// What every hook receives before environment.d runs (dib §1.6), for one element set.
/// The process environment as text (variables that are not UTF-8 are left out: hooks, dib's
/// `when` expressions and install types deal in text).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

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
        .map(|(k, v)| format!("declare -x {k}=\"{}\"\n", v.replace('"', "\\\"")))
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

/// The environment as it enters a step key: volatile values replaced by their names, and
/// `IMAGE_NAME` reduced to its file name (`-o` may carry the output folder, which differs
/// between machines; what hooks derive from it is the name, as dib's manifests do).
pub fn normalise_for_key(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .map(|(k, v)| {
            if is_volatile(k) {
                (k.clone(), format!("<{k}>"))
            } else if k == "IMAGE_NAME" {
                (k.clone(), image_base_name(v))
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
    use clap::Parser;

    fn opts(args: &[&str]) -> BuildOptions {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            o: BuildOptions,
        }
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::parse_from(v).o
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn single_type_suffix_is_dropped_like_dib() {
        let s = Settings::resolve(&opts(&["-o", "x.tar", "-t", "tar", "e"]), &env(&[]), || {
            "amd64".into()
        })
        .unwrap();
        assert_eq!(s.image_name, "x");
        assert_eq!(s.arch, "amd64");
    }

    #[test]
    fn unknown_output_type_is_bad_input() {
        let err = Settings::resolve(&opts(&["-t", "vhdx", "e"]), &env(&[]), || "amd64".into())
            .unwrap_err();
        assert!(err.message.contains("vhdx"), "{}", err.message);
    }

    #[test]
    fn user_env_keeps_dib_and_proxies_only() {
        let s = Settings::resolve(
            &opts(&["e"]),
            &env(&[
                ("DIB_RELEASE", "bookworm"),
                ("http_proxy", "p"),
                ("SECRET", "x"),
            ]),
            || "amd64".into(),
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
    fn bad_source_date_epoch_is_bad_input() {
        assert!(
            Settings::resolve(
                &opts(&["e"]),
                &env(&[("SOURCE_DATE_EPOCH", "soon")]),
                || { "amd64".into() }
            )
            .is_err()
        );
        assert!(
            Settings::resolve(&opts(&["e"]), &env(&[("SOURCE_DATE_EPOCH", "-5")]), || {
                "amd64".into()
            })
            .is_err()
        );
    }

    #[test]
    fn rebuild_from_parses_phase_and_hook() {
        let r = RebuildFrom::parse("install.d/50-foo").unwrap();
        assert_eq!(r.phase, Phase::Install);
        assert_eq!(r.hook.as_deref(), Some("50-foo"));
        assert_eq!(RebuildFrom::parse("cleanup").unwrap().hook, None);
        assert!(RebuildFrom::parse("nope.d/x").is_err());
    }

    #[test]
    fn hooks_can_call_get_image_element_array() {
        let s = Settings::resolve(&opts(&["e"]), &env(&[]), || "amd64".into()).unwrap();
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
    fn volatile_values_are_normalised_others_kept() {
        let n = normalise_for_key(&env(&[
            ("TMP_BUILD_DIR", "/tmp/x1"),
            ("ARCH", "amd64"),
            ("IMAGE_NAME", "/home/ci/job7/out/deb"),
        ]));
        assert_eq!(n["TMP_BUILD_DIR"], "<TMP_BUILD_DIR>");
        assert_eq!(n["ARCH"], "amd64");
        assert_eq!(n["IMAGE_NAME"], "deb");
    }
}
