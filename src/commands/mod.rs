//! The subcommands: each turns parsed command-line arguments into library calls, prints the
//! result, and picks the exit status. This is the only layer that sees clap types: it turns
//! them into a [`crate::settings::BuildRequest`] for everything below.

pub mod build;
pub mod cache;
pub mod dib;
pub mod diff;
pub mod elements;
pub mod face;
pub mod remote;
pub mod shell;
pub mod watch;

use crate::cli::{BuildOptions, Cli, Command};
use crate::settings::{BuildRequest, CacheSettings, DiskRequest, RegistrySettings};

/// Runs one parsed command line; returns the exit status of a command that ends well
/// (`strata diff` ends well with 1 when the builds differ).
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let done = match cli.command {
        Command::Build(args) => build::build(args, cli.progress),
        Command::Plan(args) => build::plan(args),
        Command::Shell(args) => return shell::run(args, cli.progress),
        Command::Cache(args) => cache::run(args),
        Command::Diff(args) => {
            // As diff(1): any trouble is status 2.
            return diff::run(&args).map_err(|e| {
                if crate::cancel::find(&e).is_some() {
                    e
                } else {
                    crate::exit::Failure::new(crate::exit::Exit::BadInput, crate::exit::render(&e))
                        .into()
                }
            });
        }
        Command::Dib(args) => dib::run(args.command),
        Command::Elements(args) => elements::run(&args),
        Command::Completions { shell } => face::completions(shell),
        Command::Man { dir } => face::man(dir.as_deref()),
    };
    done.map(|()| 0)
}

/// The build as the user asked for it, from the command line.
pub fn request(o: &BuildOptions) -> BuildRequest {
    BuildRequest {
        elements: o.elements.clone(),
        skip_base: o.skip_base,
        element_dirs: o.paths.element_path.clone(),
        image_name: o.image_name.clone(),
        image_types: o
            .image_types
            .iter()
            .flat_map(|t| t.0.iter().copied())
            .collect(),
        arch: o.arch.clone(),
        trace: o.trace,
        packages: o.packages.clone(),
        offline: o.offline,
        image_cache: o.image_cache.clone(),
        install_type: o.install_type.clone(),
        cache: CacheSettings {
            dir: o.cache_dir.clone(),
            granularity: o.granularity,
            ttl: o.cache_ttl,
            no_cache: o.no_cache,
            rebuild_from: o.rebuild_from.clone(),
            registries: RegistrySettings {
                from: o.cache_from.clone(),
                to: o.cache_to.clone(),
                insecure: o.registry.insecure.clone(),
                sign_key: o.registry.sign_key.clone(),
                trust: o.registry.trust.clone(),
            },
        },
        no_tmpfs: o.no_tmpfs,
        min_tmpfs: o.min_tmpfs,
        oci_compression: o.oci_compression,
        push: o.push.clone(),
        disk: DiskRequest {
            image_size_kib: o.image_size,
            image_extra_mb: o.image_extra_size,
            root_label: o.root_label.clone(),
            mkfs_options: o.mkfs_options.clone(),
            qemu_img_options: o.qemu_img_options.clone(),
            max_online_resize: o.max_online_resize,
            checksum: o.checksum,
            uncompressed: o.uncompressed,
        },
    }
}
