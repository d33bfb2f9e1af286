//! The command line: clap types only (doc comments here are the `--help` text). Values are
//! parsed into the library's own types here (output types, sizes, `--rebuild-from`), so a bad
//! one is refused by clap with the valid choices before anything runs; the command layer turns
//! the rest into a `settings::BuildRequest`.

use crate::outputs::OutputType;
use crate::plan::{Granularity, RebuildFrom};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// The process's arguments, with `disk-image-create ARGS` (as argv[0], or as the first
/// argument) read as `strata build ARGS`, so existing dib build scripts keep working.
pub fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    let invoked_as_dib = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "disk-image-create");
    if invoked_as_dib {
        args.insert(1, "build".into());
    } else if args.get(1).is_some_and(|a| a == "disk-image-create") {
        args[1] = "build".into();
    }
    args
}

/// One `-t` value: comma-separated output types. Parsed whole (not split by clap), so an error
/// shows the value as given (`-t tar,,raw`), not just the empty piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTypes(pub Vec<OutputType>);

fn output_types(s: &str) -> Result<OutputTypes, String> {
    s.split(',')
        .map(OutputType::parse)
        .collect::<Result<Vec<_>, _>>()
        .map(OutputTypes)
}

fn granularity(s: &str) -> Result<Granularity, String> {
    Granularity::parse(s).ok_or_else(|| {
        format!(
            "'{s}' is not a granularity (one of {})",
            Granularity::NAMES.join(", ")
        )
    })
}

fn oci_compression(s: &str) -> Result<crate::outputs::oci::Compression, String> {
    crate::outputs::oci::Compression::parse(s)
        .ok_or_else(|| format!("'{s}' is not a layer compression (one of gzip, zstd, none)"))
}

fn progress_mode(s: &str) -> Result<crate::progress::Mode, String> {
    crate::progress::Mode::parse(s).ok_or_else(|| {
        format!(
            "'{s}' is not a progress mode (one of {})",
            crate::progress::Mode::NAMES.join(", ")
        )
    })
}

/// strata: build OS disk images from diskimage-builder elements, caching every step.
///
/// Elements are dib elements (folders of hook scripts in phase folders). Every step's inputs are
/// hashed; the root filesystem after each step is kept as a zstd tar layer, so a rerun restores
/// the last unchanged snapshot and runs only what changed.
#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// How progress is shown: auto (a spinner on a terminal), plain (lines), json (one JSON
    /// event per line on stderr, schema version 1; for CI systems and wrappers).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "auto",
        value_parser = progress_mode,
        global = true
    )]
    pub progress: crate::progress::Mode,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve elements and print them in build order (optionally with their hooks).
    Elements(ElementsArgs),
    /// Build an image: run every phase, reusing cached steps.
    Build(BuildArgs),
    /// Show the steps a build would run, with their keys and whether each is cached.
    Plan(PlanArgs),
    /// Open a shell in the image as it is after (or, with --before, before) a step, with the
    /// mounts and environment its hooks get; or run one command there (`-- CMD...`). Steps
    /// that are not cached are built first; changes are thrown away when the shell exits.
    Shell(ShellArgs),
    /// Inspect and maintain the layer cache.
    Cache(CacheArgs),
    /// Compare two builds step by step: where their inputs differ, which steps gave other
    /// layers from the same inputs (and which files differ), their outputs. Exit 0 when they
    /// match, 1 when they differ, 2 for trouble.
    Diff(DiffArgs),
    /// Helpers that strata's own elements call from their hooks (not a stable interface).
    #[command(hide = true)]
    Dib(DibArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Where elements come from.
#[derive(Debug, Clone, Args)]
pub struct ElementPathArgs {
    /// An extra folder of elements, searched before ELEMENTS_PATH (repeatable). strata's own
    /// elements folder is always searched last.
    #[arg(long = "element-path", value_name = "DIR")]
    pub element_path: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ElementsArgs {
    #[command(flatten)]
    pub paths: ElementPathArgs,

    /// Also list each phase's hooks in run order, with the element each comes from.
    #[arg(long)]
    pub hooks: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Do not add the implicit `base` element.
    #[arg(short = 'n')]
    pub skip_base: bool,

    /// Target architecture, as for `build` (it picks `vm`'s default block device).
    #[arg(short = 'a', value_name = "ARCH")]
    pub arch: Option<String>,

    /// The elements to resolve.
    #[arg(required = true, value_name = "ELEMENT")]
    pub elements: Vec<String>,
}

/// How registries (OCI distribution) are reached and trusted.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// Reach this registry host over plain HTTP (HOST, or HOST:PORT for one port; repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,

    /// Sign every step record pushed to a registry with this ed25519 key (`strata cache keygen`).
    #[arg(long = "cache-sign-key", value_name = "FILE")]
    pub sign_key: Option<PathBuf>,

    /// Use only registry records signed by this public key (repeatable: any of them).
    #[arg(long = "cache-trust", value_name = "PUBKEY_FILE")]
    pub trust: Vec<PathBuf>,
}

/// Options shared by `build` and `plan`: everything that decides what runs.
#[derive(Debug, Clone, Args)]
pub struct BuildOptions {
    #[command(flatten)]
    pub paths: ElementPathArgs,

    /// Image name; outputs are NAME.<type>.
    #[arg(short = 'o', value_name = "NAME", default_value = "image")]
    pub image_name: String,

    /// Output types, comma separated: qcow2 (default, as dib), raw, vhd, tar, tgz, squashfs,
    /// oci (an OCI image layout folder NAME.oci), docker (NAME.docker.tar, for `docker load`).
    #[arg(
        short = 't',
        value_name = "TYPES",
        default_value = "qcow2",
        value_parser = output_types
    )]
    pub image_types: Vec<OutputTypes>,

    /// Target architecture (default: the host's, in dpkg naming).
    #[arg(short = 'a', value_name = "ARCH")]
    pub arch: Option<String>,

    /// Trace hooks (sets DIB_DEBUG_TRACE; repeat to raise it).
    #[arg(short = 'x', action = clap::ArgAction::Count)]
    pub trace: u8,

    /// Do not add the implicit `base` element.
    #[arg(short = 'n')]
    pub skip_base: bool,

    /// Extra packages to install after install.d (comma separated, repeatable).
    #[arg(short = 'p', value_name = "PKGS", value_delimiter = ',')]
    pub packages: Vec<String>,

    /// Ask elements to avoid network access (sets DIB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,

    /// Folder elements may use to cache downloads (DIB_IMAGE_CACHE).
    #[arg(long = "image-cache", value_name = "DIR", env = "DIB_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,

    /// The layer cache folder.
    #[arg(
        long = "cache-dir",
        value_name = "DIR",
        env = "STRATA_CACHE_DIR",
        default_value = "cache"
    )]
    pub cache_dir: PathBuf,

    /// One cached step per hook (default) or per phase.
    #[arg(long, value_name = "hook|phase", default_value = "hook", value_parser = granularity)]
    pub granularity: Granularity,

    /// Treat cached steps older than this as misses (e.g. 12h, 7d).
    #[arg(long = "cache-ttl", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub cache_ttl: Option<std::time::Duration>,

    /// Neither use nor store cached steps: a plain build, as dib does (compare `--rebuild-from`,
    /// which reruns steps and stores them).
    #[arg(long = "no-cache")]
    pub no_cache: bool,

    /// Also look steps up in this registry, after the local cache (repeatable, in order):
    /// HOST[:PORT]/REPO, or http://HOST[:PORT]/REPO for a registry without TLS. Hits are copied
    /// into the local cache, checked.
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,

    /// Push every step this build makes, and its outputs, to this registry (in the background,
    /// while the build goes on). A failing registry gives one warning, never a failed build.
    #[arg(long = "cache-to", value_name = "REF")]
    pub cache_to: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// The layer compression of `-t oci`: gzip (default: every runtime reads it), zstd, none.
    #[arg(long = "oci-compression", value_name = "gzip|zstd|none", default_value = "gzip",
          value_parser = oci_compression)]
    pub oci_compression: crate::outputs::oci::Compression,

    /// When the build is done, push the `-t oci` image to this registry (HOST[:PORT]/REPO[:TAG],
    /// tag `latest` by default).
    #[arg(long = "push", value_name = "REF[:TAG]")]
    pub push: Option<String>,

    /// Run again from this step on: PHASE or PHASE/HOOK (e.g. install.d/50-foo).
    #[arg(long = "rebuild-from", value_name = "PHASE[/HOOK]", value_parser = RebuildFrom::parse)]
    pub rebuild_from: Option<RebuildFrom>,

    /// Image size in GiB (DIB_IMAGE_SIZE); computed from the tree when absent.
    #[arg(long = "image-size", value_name = "GIB", value_parser = crate::settings::parse_gib)]
    pub image_size: Option<u64>,

    /// Do not build in a tmpfs.
    #[arg(long = "no-tmpfs")]
    pub no_tmpfs: bool,

    /// Use a tmpfs only if RAM is at least twice this many GiB (default 2).
    #[arg(long = "min-tmpfs", value_name = "GIB", default_value_t = 2)]
    pub min_tmpfs: u64,

    /// Default install type for elements with `*-<type>-install` folders (DIB_DEFAULT_INSTALLTYPE).
    #[arg(long = "install-type", value_name = "TYPE")]
    pub install_type: Option<String>,

    /// Extra image space in MB on top of the computed size (DIB_IMAGE_EXTRA_SIZE).
    #[arg(long = "image-extra-size", value_name = "MB", value_parser = crate::settings::parse_mb)]
    pub image_extra_size: Option<u64>,

    /// Label of the root filesystem (default cloudimg-rootfs; img-rootfs for xfs).
    #[arg(long = "root-label", value_name = "LABEL")]
    pub root_label: Option<String>,

    /// Extra options for the root filesystem's mkfs.
    #[arg(long = "mkfs-options", value_name = "OPTS")]
    pub mkfs_options: Option<String>,

    /// Options for qemu-img convert (-o), e.g. compat=1.1.
    #[arg(long = "qemu-img-options", value_name = "OPTS")]
    pub qemu_img_options: Option<String>,

    /// mkfs -E resize=N for the root filesystem (ext4).
    #[arg(long = "max-online-resize", value_name = "N", value_parser = crate::settings::parse_count)]
    pub max_online_resize: Option<u64>,

    /// Also write .md5 and .sha256 files beside each image.
    #[arg(long)]
    pub checksum: bool,

    /// Do not compress qcow2 images.
    #[arg(short = 'u')]
    pub uncompressed: bool,

    /// dib's "clear the environment" flag; accepted for compatibility (strata always hands hooks
    /// a defined environment).
    #[arg(short = 'c', hide = true)]
    pub clear_env: bool,

    /// The elements to build.
    #[arg(required = true, value_name = "ELEMENT")]
    pub elements: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub options: BuildOptions,

    /// Also write the build log to this file.
    #[arg(long, value_name = "FILE")]
    pub logfile: Option<PathBuf>,

    /// For each step that misses the cache, print which inputs differ from the nearest cached one.
    #[arg(long)]
    pub explain: bool,

    /// Print the build manifest as JSON on stdout when done.
    #[arg(long)]
    pub json: bool,

    /// Audit the cache: run every cached step again, each from its cached parent tree, and
    /// compare its layer with the cached one (the cache keeps its entries; no outputs are
    /// written). Exit 5 when a step rebuilds to another layer, naming it and its files.
    #[arg(long)]
    pub check: bool,

    /// With --check: check the steps from this one on (PHASE or PHASE/HOOK).
    #[arg(long = "check-from", value_name = "PHASE[/HOOK]", value_parser = RebuildFrom::parse,
          requires = "check")]
    pub check_from: Option<RebuildFrom>,

    /// With --check: keep both layers of a divergent step in NAME.check/ for inspection.
    #[arg(long = "keep-failed", requires = "check")]
    pub keep_failed: bool,

    /// Build, then build again whenever a file of the build's elements (or a cache-inputs
    /// file) changes: one line per rebuild, with its time and the steps that ran.
    #[arg(long, conflicts_with = "check")]
    pub watch: bool,

    /// Restore cached steps from the image's kept tree in the cache folder instead of
    /// unpacking them (the build runs on an overlay of it); on for --watch, never for --check.
    #[arg(long = "keep-tree", env = "STRATA_KEEP_TREE",
          value_parser = clap::builder::FalseyValueParser::new())]
    pub keep_tree: bool,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub options: BuildOptions,

    /// The step: PHASE/HOOK (e.g. install.d/50-foo), or PHASE (after its last step; with
    /// --before, before its first). With --granularity phase, a PHASE.
    #[arg(long = "at", value_name = "PHASE[/HOOK]", value_parser = RebuildFrom::parse)]
    pub at: RebuildFrom,

    /// The image as it is before the step, not after it.
    #[arg(long)]
    pub before: bool,

    /// A command to run instead of an interactive shell (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub options: BuildOptions,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// For the first step that would run, print which inputs differ from the nearest cached
    /// step at its place (as `build --explain`; every later step misses because of it).
    #[arg(long)]
    pub explain: bool,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// A build manifest (NAME.strata.json), or a build id from a cache's history.
    #[arg(value_name = "A")]
    pub a: String,
    /// The other build.
    #[arg(value_name = "B")]
    pub b: String,
    /// A cache to read layers (and build ids) from (repeatable: two builds made in two caches).
    /// Default: STRATA_CACHE_DIR or ./cache, when it exists.
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Vec<PathBuf>,
    /// A registry to read layers from too (repeatable).
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print JSON (schema version 1) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also run diffoscope (when installed) on each changed file's two versions.
    #[arg(long)]
    pub diffoscope: bool,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The layer cache folder.
    #[arg(
        long = "cache-dir",
        value_name = "DIR",
        env = "STRATA_CACHE_DIR",
        default_value = "cache",
        global = true
    )]
    pub cache_dir: PathBuf,

    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached steps.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show how much space the cache uses.
    Du {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove least recently used steps until the cache fits in SIZE (e.g. 10G, 500M).
    Gc {
        #[arg(long = "max-size", value_name = "SIZE", value_parser = crate::store::parse_size)]
        max_size: u64,
    },
    /// Re-hash every blob; drop corrupt ones and the steps that need them.
    Verify,
    /// Remove one step (and what only it needs).
    Rm {
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Push cached steps (each with its ancestors) and outputs to a registry (all, without KEYs).
    Push {
        /// HOST[:PORT]/REPO or http://HOST[:PORT]/REPO.
        #[arg(value_name = "REF")]
        reference: String,
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pull steps (each with its ancestors) and outputs from a registry into the local cache
    /// (every strata record in the repository, without KEYs).
    Pull {
        #[arg(value_name = "REF")]
        reference: String,
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete every registry entry no kept build needs (a kept step keeps its ancestors).
    Prune {
        #[arg(value_name = "REF")]
        reference: String,
        /// A build manifest (NAME.strata.json) whose steps and outputs are kept (repeatable).
        #[arg(long = "keep", value_name = "MANIFEST", required = true)]
        keep: Vec<PathBuf>,
        /// Only delete entries pushed longer ago than this (e.g. 30d).
        #[arg(long = "older-than", value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// List what would be deleted, delete nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make an ed25519 key pair for signing step records: FILE (secret, 0600) and FILE.pub.
    Keygen {
        /// The key's name (it travels with every signature, e.g. `ci-2026`).
        #[arg(value_name = "NAME")]
        name: String,
        /// Where to write the secret key (default NAME.key).
        #[arg(long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Explain a step: its inputs, and how they differ from the nearest step at its position.
    Explain {
        #[arg(value_name = "KEY")]
        key: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Host-side helpers for strata's shipped elements.
#[derive(Debug, Args)]
pub struct DibArgs {
    #[command(subcommand)]
    pub command: DibCommand,
}

#[derive(Debug, Subcommand)]
pub enum DibCommand {
    /// Merge every element's package-installs into per-phase lists (dib's package-installs-squash).
    PackageInstallsSquash {
        /// Space separated element names (IMAGE_ELEMENT).
        #[arg(long)]
        elements: String,
        /// Colon separated element folders (ELEMENTS_PATH).
        #[arg(long)]
        path: String,
        /// Also resolve names through each element's pkg-map and write plain per-phase lists
        /// (`<phase>.install`, `<phase>.uninstall`) into this folder.
        #[arg(long, value_name = "DIR")]
        resolved: Option<PathBuf>,
        /// Where to write the JSON (dib's format).
        #[arg(value_name = "OUTFILE")]
        out: PathBuf,
    },
    /// Map package names through an element's pkg-map (dib's pkg-map).
    PkgMap {
        #[arg(long)]
        element: Option<String>,
        #[arg(long = "pkg-map", value_name = "FILE")]
        pkg_map: Option<PathBuf>,
        #[arg(long, env = "DISTRO_NAME")]
        distro: Option<String>,
        #[arg(long, env = "DIB_RELEASE")]
        release: Option<String>,
        #[arg(long = "missing-ok")]
        missing_ok: bool,
        #[arg(long, default_value = "")]
        prefix: String,
        /// Colon separated element folders, to find --element (ELEMENTS_PATH).
        #[arg(long, env = "ELEMENTS_PATH", default_value = "")]
        path: String,
        names: Vec<String>,
    },
    /// Write every element's pkg-map, flattened for one distro and release, as `name<TAB>value`
    /// lines into DIR/<element> (read by the in-image pkg-map script).
    PkgMapExport {
        #[arg(long)]
        elements: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        distro: String,
        #[arg(long, default_value = "")]
        release: String,
        #[arg(value_name = "DIR")]
        out: PathBuf,
    },
}
