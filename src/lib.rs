//! strata: a diskimage-builder compatible, cached incremental layer builder.
//!
//! ```text
//! CLI args + DIB_* env ──(commands, settings)──► Settings
//! ELEMENTS_PATH + names ──(elements)──► resolved elements, hook tree, env, packages
//! elements + Settings ──(plan, key)──► steps, each keyed from the one before
//! steps ──(exec: cache, sandbox, layer)──► cached? restore lazily : run, snapshot a layer
//! final tree ──(outputs, image)──► tar / disk image ──(manifest)──► NAME.strata.json
//! ```
//!
//! Nothing downstream reaches back upstream: the element model knows nothing of caches; the
//! layer format knows nothing of elements; only `cli` and `commands` know clap; only `sandbox`
//! mounts and chroots; the executor sees the cache only through `cache::StepCache`.

pub mod arch;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod elements;
pub mod envvars;
pub mod error;
pub mod exec;
pub mod fsutil;
pub mod image;
pub mod key;
pub mod layer;
pub mod logging;
pub mod manifest;
pub mod outputs;
pub mod phase;
pub mod plan;
pub mod progress;
pub mod runner;
pub mod sandbox;
pub mod settings;
pub mod store;
pub mod tools;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => commands::build::build(args, cli.progress),
        Command::Plan(args) => commands::build::plan(args),
        Command::Cache(args) => commands::cache::run(args),
        Command::Dib(args) => commands::dib::run(args.command),
        Command::Elements(args) => commands::elements::run(&args),
        Command::Completions { shell } => commands::face::completions(shell),
        Command::Man { dir } => commands::face::man(dir.as_deref()),
    }
}
