//! strata: a diskimage-builder compatible, cached incremental layer builder.
//!
//! ```text
//! CLI args + DIB_* env ──► Settings
//! ELEMENTS_PATH + names ──► elements (resolved, ordered, hook tree, env, packages)
//! elements + Settings ──► Plan: ordered steps, each keyed from the one before
//! Plan ──► Executor: cached step? restore lazily : run in the sandbox, snapshot a layer, index it
//! final tree ──► output (tar, disk image) ──► manifest (keys, diff ids, digests)
//! ```
//!
//! Nothing downstream reaches back upstream: the element model knows nothing of caches; the
//! layer format knows nothing of elements; only `cli` knows clap; only `sandbox` mounts and
//! chroots.

pub mod arch;
pub mod audit;
pub mod build;
pub mod cli;
pub mod commands;
pub mod disk;
pub mod elements;
pub mod error;
pub mod image;
pub mod key;
pub mod layer;
pub mod logging;
pub mod output;
pub mod phase;
pub mod plan;
pub mod runner;
pub mod sandbox;
pub mod settings;
pub mod store;
pub mod tools;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => build::build(args),
        Command::Plan(args) => build::plan(args),
        Command::Cache(args) => commands::cache::run(args),
        Command::Dib(args) => commands::dib::run(args.command),
        Command::Elements(args) => commands::elements::run(&args),
    }
}
