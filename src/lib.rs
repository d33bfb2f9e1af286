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
pub mod audit;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod elements;
pub mod envvars;
pub mod error;
pub mod exec;
pub mod exit;
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
pub mod registry;
pub mod runner;
pub mod sandbox;
pub mod settings;
pub mod store;
pub mod tools;

#[cfg(test)]
pub(crate) mod testutil;

pub use commands::run;

#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};

    /// The top-level modules each module's non-test code names (`crate::x`).
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in walkdir::WalkDir::new(&src) {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if !rel.ends_with(".rs") || rel.contains("tests") {
                continue;
            }
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.entry(top.clone()).or_default().insert(name);
                }
            }
        }
        deps
    }

    /// The flow goes one way: no two modules name each other.
    #[test]
    fn no_two_modules_import_each_other() {
        let deps = imports();
        let mut cycles = Vec::new();
        for (a, targets) in &deps {
            for b in targets {
                if a < b && deps.get(b).is_some_and(|t| t.contains(a)) {
                    cycles.push(format!("{a} <-> {b}"));
                }
            }
        }
        assert!(
            cycles.is_empty(),
            "modules that import each other: {cycles:?}"
        );
    }

    /// Only the command line and the commands know clap.
    #[test]
    fn only_cli_and_commands_know_clap() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for entry in walkdir::WalkDir::new(&src) {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if !rel.ends_with(".rs")
                || rel == "cli.rs"
                || rel == "main.rs"
                || rel.starts_with("commands/")
            {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            assert!(
                !code.contains("clap::") && !code.contains("crate::cli"),
                "{rel} uses clap or the cli module"
            );
        }
    }
}
