//! `strata cache …`: list, size, collect, verify, remove and explain cached steps.
//!
//! ```text
//! ls, du, explain ──► Store::open_read_only (works on a read-only cache folder)
//! gc, rm          ──► Store::open ──► exclusive lock (queued before later builds)
//!                     (gc also drops the kept trees no build holds, cache/trees/)
//! verify          ──► Store::verify_with(every layer through layer::check) ──► damage: exit 4
//! ```
//! Everything is printed with `writeln!`, so a closed pipe (`strata cache ls | head`) ends the
//! command quietly (main exits 0 on a broken pipe).

use crate::cli::{CacheArgs, CacheCommand};
use crate::exit::{Exit, Failure};
use crate::key::{self, KeyInputs};
use crate::store::{LayerRecord, Store};
use anyhow::Result;
use std::io::{self, Read, Write};

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `verify`'s parse of one stored layer: decompressed and walked by the layer module's reader,
/// nothing written. A refusal (an unsafe entry, a malformed tar, another diff id) is the
/// answer; a cancellation stops verify.
fn check_layer(layer: &LayerRecord, blob: &mut dyn Read) -> io::Result<Option<String>> {
    struct Cancellable<'r>(&'r mut dyn Read);
    impl Read for Cancellable<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            crate::cancel::check_io()?;
            self.0.read(buf)
        }
    }
    match crate::layer::check(Cancellable(blob), Some(&layer.diff_id)) {
        Ok(_) => Ok(None),
        Err(e) => match crate::cancel::requested() {
            Some(c) => Err(io::Error::other(c)),
            None => Ok(Some(e.to_string())),
        },
    }
}

/// gc also removes the build folders dead builds left in TMP_DIR (as `strata build` resolves
/// it; by lock, never a live build's), when running as root (builds make them as root).
fn sweep_build_folders() -> usize {
    if !nix::unistd::geteuid().is_root() {
        return 0;
    }
    let tmp_dir = std::env::var_os("TMP_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    match crate::sandbox::sweep_dead_build_dirs(&tmp_dir, super::build::BUILD_DIR_PREFIX) {
        Ok(gone) => gone.len(),
        Err(e) => {
            tracing::warn!("{e}");
            0
        }
    }
}

fn short(k: &str) -> &str {
    &k[..k.len().min(16)]
}

pub fn run(args: CacheArgs) -> Result<()> {
    if super::remote::is_registry_command(&args.command) {
        return super::remote::run(&args.cache_dir, args.command);
    }
    if !args.cache_dir.join("index.sqlite").exists() {
        return Err(Failure::bad_input(format!(
            "{} is not a strata cache (no index.sqlite); pass --cache-dir or set STRATA_CACHE_DIR",
            args.cache_dir.display()
        ))
        .into());
    }
    let writes = matches!(
        args.command,
        CacheCommand::Gc { .. } | CacheCommand::Verify | CacheCommand::Rm { .. }
    );
    let store = if writes {
        Store::open(&args.cache_dir)?
    } else {
        Store::open_read_only(&args.cache_dir)?
    };
    let mut out = io::stdout().lock();
    match args.command {
        CacheCommand::Push { .. }
        | CacheCommand::Pull { .. }
        | CacheCommand::Prune { .. }
        | CacheCommand::Keygen { .. } => unreachable!("handled above"),
        CacheCommand::Ls { json } => {
            let steps = store.list_steps()?;
            if json {
                let rows: Vec<_> = steps
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "key": s.key, "parent": s.parent, "phase": s.phase, "hook": s.hook,
                            "layer": s.layer, "hooks_layer": s.hooks_layer, "created": s.created,
                            "last_used": s.last_used, "hits": s.hits, "seconds": s.seconds,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for s in &steps {
                    let layer = s.layer.as_deref().map(short).unwrap_or("-");
                    writeln!(
                        out,
                        "{}  {:<40} layer {:<16} hits {:>4}  {:>8.2}s",
                        short(&s.key),
                        format!("{}/{}", s.phase, s.hook),
                        layer,
                        s.hits,
                        s.seconds
                    )?;
                }
                writeln!(out, "{} steps", steps.len())?;
            }
        }
        CacheCommand::Du { json } => {
            let u = store.du()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&u)?)?;
            } else {
                writeln!(out, "blobs      {:>8}  {}", u.blobs, human(u.blob_bytes))?;
                writeln!(
                    out,
                    "  orphaned {:>8}  {}",
                    u.orphan_blobs,
                    human(u.orphan_bytes)
                )?;
                writeln!(
                    out,
                    "layers     {:>8}  {} uncompressed",
                    u.layers,
                    human(u.layer_bytes)
                )?;
                writeln!(out, "steps      {:>8}", u.steps)?;
                writeln!(out, "outputs    {:>8}", u.outputs)?;
                writeln!(out, "builds     {:>8}", u.builds)?;
                writeln!(out, "index               {}", human(u.index_bytes))?;
                writeln!(out, "tmp        {:>8}  {}", u.tmp_files, human(u.tmp_bytes))?;
            }
        }
        CacheCommand::Gc { max_size } => {
            let r = store.gc(max_size)?;
            let folders = sweep_build_folders();
            writeln!(
                out,
                "gc: {} → {} (limit {}); removed {} steps, {} outputs, {} blobs ({} orphaned), {} temp files, {} build folders of dead builds",
                human(r.bytes_before),
                human(r.bytes_after),
                human(r.max_bytes),
                r.steps_removed.len(),
                r.outputs_removed.len(),
                r.blobs_removed,
                r.orphan_blobs,
                r.tmp_files_removed,
                folders
            )?;
            // Kept trees (`build --keep-tree`) are a convenience: gc drops every idle one.
            let (trees, bytes) = crate::exec::kept_tree::drop_slots(&args.cache_dir)?;
            if trees > 0 {
                writeln!(out, "gc: dropped {trees} kept trees ({})", human(bytes))?;
            }
        }
        CacheCommand::Verify => {
            let r = store.verify_with(&check_layer, &|| crate::cancel::check_io())?;
            for d in &r.corrupt {
                writeln!(out, "corrupt blob {d} (deleted)")?;
            }
            for d in &r.missing {
                writeln!(out, "missing blob {d}")?;
            }
            for (d, why) in &r.refused {
                writeln!(out, "refused layer {d}: {why}")?;
            }
            writeln!(
                out,
                "verify: {} blobs ({}) checked, {} layers parsed; {} corrupt, {} missing, {} refused; dropped {} steps and {} outputs; index {}",
                r.blobs_checked,
                human(r.bytes_checked),
                r.layers_checked,
                r.corrupt.len(),
                r.missing.len(),
                r.refused.len(),
                r.steps_dropped.len(),
                r.outputs_dropped.len(),
                r.index_check
            )?;
            if !r.is_clean() {
                return Err(Failure::new(
                    Exit::Cache,
                    format!(
                        "cache {} was damaged: {} corrupt and {} missing blobs, {} refused layers, index {}; what needed them was dropped (the next build runs those steps again)",
                        args.cache_dir.display(),
                        r.corrupt.len(),
                        r.missing.len(),
                        r.refused.len(),
                        r.index_check
                    ),
                )
                .into());
            }
        }
        CacheCommand::Rm { key } => {
            let key = store.resolve_key(&key)?;
            let r = store.rm(&key)?;
            writeln!(
                out,
                "removed {} steps ({} and its descendants), {} outputs, {} blobs, {} freed",
                r.steps.len(),
                short(&key),
                r.outputs.len(),
                r.blobs_removed,
                human(r.bytes_freed)
            )?;
        }
        CacheCommand::Explain { key, json } => {
            let key = store.resolve_key(&key)?;
            let Some(step) = store.get_step(&key)? else {
                return Err(Failure::bad_input(format!("no cached step has key {key}")).into());
            };
            let inputs: KeyInputs = serde_json::from_str(&step.inputs)?;
            let nearest = store.nearest_step(&step.phase, &step.hook, &step.key)?;
            let changes = match &nearest {
                Some(n) => {
                    let before: KeyInputs = serde_json::from_str(&n.inputs)?;
                    key::diff_inputs(&before, &inputs)
                }
                None => Vec::new(),
            };
            if json {
                let v = serde_json::json!({
                    "key": step.key, "phase": step.phase, "hook": step.hook, "inputs": inputs,
                    "nearest": nearest.as_ref().map(|n| &n.key), "changes": changes,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(out, "{}/{} {}", step.phase, step.hook, step.key)?;
                writeln!(out, "{}", serde_json::to_string_pretty(&inputs)?)?;
                match nearest {
                    None => writeln!(out, "no other cached step at this position")?,
                    Some(n) => {
                        writeln!(out, "differs from {} by:", n.key)?;
                        for c in changes {
                            let name = c.name.map(|n| format!(" {n}")).unwrap_or_default();
                            writeln!(
                                out,
                                "  {}{}: {} → {}",
                                c.input,
                                name,
                                c.before.unwrap_or_else(|| "(none)".into()),
                                c.after.unwrap_or_else(|| "(none)".into())
                            )?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
