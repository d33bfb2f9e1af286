//! `strata diff A B`: two builds compared step by step (`audit::builds`), with file-level
//! differences from every cache that holds their layers, and diffoscope on request. Exits as
//! diff(1): 0 when the builds match, 1 when they differ, 2 for trouble.
//!
//! ```text
//! A, B: NAME.strata.json, or a build id in the history of a --cache-dir
//! --cache-dir DIR (repeatable) + --cache-from REF (repeatable) ──► LayerSource
//! audit::builds::compare ──► text | --json (schema 1) ──► [--diffoscope: changed files]
//! ```

use crate::audit::builds::{self, Build, LayerSource, StepStatus};
use crate::audit::{self, FieldName};
use crate::cache::StepCache;
use crate::cache::registry::{LevelOptions, RegistryLevel};
use crate::cli::DiffArgs;
use crate::exit::Failure;
use crate::manifest::{Manifest, ManifestStep, StepInputs};
use crate::store::Store;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Every cache the comparison may read layers from.
struct Caches {
    locals: Vec<Store>,
    remotes: Vec<RegistryLevel>,
}

fn decode(blob: Box<dyn crate::cache::BlobRead>) -> Option<Box<dyn Read + Send>> {
    let mut dec = zstd::Decoder::new(blob).ok()?;
    dec.window_log_max(31).ok()?;
    Some(Box::new(dec))
}

impl LayerSource for Caches {
    fn open(&self, key: &str, diff_id: &str) -> Option<Box<dyn Read + Send>> {
        for store in &self.locals {
            if let Ok(Some(l)) = store.usable_layer(diff_id)
                && let Ok(blob) = store.open_blob(&l.blob_digest)
            {
                return decode(Box::new(blob));
            }
        }
        for remote in &self.remotes {
            if let Ok(Some(hit)) = remote.step(key)
                && let Some(l) = hit.layer(diff_id)
                && let Ok(blob) = remote.open_blob(&l.blob_digest)
            {
                return decode(blob);
            }
        }
        None
    }
}

/// A build: a manifest file, or a build id in one of the local caches' history.
fn load(arg: &str, caches: &Caches) -> Result<Build> {
    let path = Path::new(arg);
    if path.is_file() {
        let m = Manifest::read(path).map_err(|e| Failure::bad_input(format!("{e:#}")))?;
        return Ok(Build::from_manifest(path.display().to_string(), m));
    }
    let Ok(id) = arg.trim_start_matches('#').parse::<i64>() else {
        return Err(Failure::bad_input(format!(
            "{arg}: neither a build manifest (NAME.strata.json) nor a build id"
        ))
        .into());
    };
    for store in &caches.locals {
        let Some((_, b)) = store.list_builds()?.into_iter().find(|(i, _)| *i == id) else {
            continue;
        };
        let mut steps = Vec::new();
        for key in &b.step_keys {
            let rec = store.get_step(key)?;
            let (phase, hook, diff_id, inputs) = match rec {
                Some(r) => (
                    r.phase,
                    r.hook,
                    r.layer,
                    serde_json::from_str(&r.inputs).ok().map(StepInputs::Step),
                ),
                None => ("?".into(), "(no longer cached)".into(), None, None),
            };
            steps.push(ManifestStep {
                phase,
                hook,
                key: key.clone(),
                diff_id,
                cached: true,
                seconds: 0.0,
                inputs,
            });
        }
        return Ok(Build {
            label: format!("build {id} in {} ({})", store.root().display(), b.arguments),
            elements: Vec::new(),
            steps,
            outputs: Vec::new(),
            source_date_epoch: None,
        });
    }
    Err(Failure::bad_input(format!(
        "build {id} is in the history of none of the caches given (--cache-dir)"
    ))
    .into())
}

/// Runs `strata diff`; returns the exit status (0 same, 1 different).
pub fn run(args: &DiffArgs) -> Result<u8> {
    let mut locals = Vec::new();
    let dirs = if args.cache_dir.is_empty() {
        let default = std::env::var_os("STRATA_CACHE_DIR")
            .map(Into::into)
            .unwrap_or_else(|| std::path::PathBuf::from("cache"));
        // The default cache is used only when it exists.
        if default.join("index.sqlite").exists() {
            vec![default]
        } else {
            Vec::new()
        }
    } else {
        args.cache_dir.clone()
    };
    for dir in &dirs {
        if !dir.join("index.sqlite").exists() {
            return Err(Failure::bad_input(format!(
                "--cache-dir {}: not a strata cache (no index.sqlite)",
                dir.display()
            ))
            .into());
        }
        locals.push(Store::open(dir)?);
    }
    let mut remotes = Vec::new();
    for r in &args.cache_from {
        let trusted = args
            .registry
            .trust
            .iter()
            .map(|p| {
                crate::registry::sign::PublicKey::load(p)
                    .map_err(|e| Failure::bad_input(format!("--cache-trust {}: {e}", p.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        remotes.push(super::remote::level(
            r,
            &args.registry.insecure,
            LevelOptions {
                read: true,
                write: false,
                sign_key: None,
                trusted,
            },
            None,
            crate::registry::ClientOptions::default(),
        )?);
    }
    let caches = Caches { locals, remotes };
    let a = load(&args.a, &caches)?;
    let b = load(&args.b, &caches)?;
    let cancelled = || crate::cancel::requested().is_some();
    let diff = builds::compare(&a, &b, &caches, &cancelled)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&diff)?)?;
    } else {
        writeln!(out, "{diff}")?;
    }
    if args.diffoscope {
        run_diffoscope(&diff, &caches, &mut out)?;
    }
    crate::cancel::check()?;
    Ok(if diff.same { 0 } else { 1 })
}

/// diffoscope on the content of each changed file (up to 10 a step), when it is installed.
fn run_diffoscope(diff: &builds::BuildDiff, caches: &Caches, out: &mut dyn Write) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let cancelled = || crate::cancel::requested().is_some();
    for s in diff
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::ContentDiffers)
    {
        let Some(files) = &s.files else { continue };
        let key = s.key_a.as_deref().unwrap_or_default();
        let changed = files
            .files
            .iter()
            .filter(|f| f.field_names().contains(&FieldName::Content))
            .take(10);
        for (n, f) in changed.enumerate() {
            let mut sides = Vec::new();
            for (side, d) in [("a", &s.diff_id_a), ("b", &s.diff_id_b)] {
                let Some(d) = d else { continue };
                let Some(layer) = caches.open(key, d) else {
                    continue;
                };
                let dest = scratch.path().join(format!("{}-{n}-{side}", s.index));
                audit::extract_file(layer, f.path.as_bytes(), &dest, &cancelled)
                    .with_context(|| format!("cannot extract {} from step {}", f.path, s.step))?;
                sides.push(dest);
            }
            if let [x, y] = sides.as_slice() {
                match audit::diffoscope(x, y, &cancelled)? {
                    Some(report) => {
                        writeln!(out, "diffoscope {} ({}):\n{report}", f.path, s.step)?;
                    }
                    None => {
                        writeln!(
                            out,
                            "diffoscope is not installed (Debian package diffoscope-minimal); \
                             the file-level listing above stands on its own"
                        )?;
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}
