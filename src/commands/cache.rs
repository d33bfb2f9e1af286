//! `strata cache …`: list, size, collect, verify, remove and explain cached steps.

use crate::cli::{CacheArgs, CacheCommand};
use crate::exit::Failure;
use crate::key::{self, KeyInputs};
use crate::store::Store;
use anyhow::Result;

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
    let store = Store::open(&args.cache_dir)?;
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
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for s in &steps {
                    let layer = s.layer.as_deref().map(short).unwrap_or("-");
                    println!(
                        "{}  {:<40} layer {:<16} hits {:>4}  {:>8.2}s",
                        short(&s.key),
                        format!("{}/{}", s.phase, s.hook),
                        layer,
                        s.hits,
                        s.seconds
                    );
                }
                println!("{} steps", steps.len());
            }
        }
        CacheCommand::Du { json } => {
            let u = store.du()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&u)?);
            } else {
                println!("blobs      {:>8}  {}", u.blobs, human(u.blob_bytes));
                println!(
                    "  orphaned {:>8}  {}",
                    u.orphan_blobs,
                    human(u.orphan_bytes)
                );
                println!(
                    "layers     {:>8}  {} uncompressed",
                    u.layers,
                    human(u.layer_bytes)
                );
                println!("steps      {:>8}", u.steps);
                println!("outputs    {:>8}", u.outputs);
                println!("builds     {:>8}", u.builds);
                println!("index               {}", human(u.index_bytes));
                println!("tmp        {:>8}  {}", u.tmp_files, human(u.tmp_bytes));
            }
        }
        CacheCommand::Gc { max_size } => {
            let r = store.gc(max_size)?;
            println!(
                "gc: {} → {} (limit {}); removed {} steps, {} outputs, {} blobs ({} orphaned), {} temp files",
                human(r.bytes_before),
                human(r.bytes_after),
                human(r.max_bytes),
                r.steps_removed.len(),
                r.outputs_removed.len(),
                r.blobs_removed,
                r.orphan_blobs,
                r.tmp_files_removed
            );
        }
        CacheCommand::Verify => {
            let r = store.verify()?;
            for d in &r.corrupt {
                println!("corrupt blob {d} (deleted)");
            }
            for d in &r.missing {
                println!("missing blob {d}");
            }
            println!(
                "verify: {} blobs ({}) checked; {} corrupt, {} missing; dropped {} steps and {} outputs; index {}",
                r.blobs_checked,
                human(r.bytes_checked),
                r.corrupt.len(),
                r.missing.len(),
                r.steps_dropped.len(),
                r.outputs_dropped.len(),
                r.index_check
            );
        }
        CacheCommand::Rm { key } => {
            let key = store.resolve_key(&key)?;
            let r = store.rm(&key)?;
            println!(
                "removed {} steps ({} and its descendants), {} outputs, {} blobs, {} freed",
                r.steps.len(),
                short(&key),
                r.outputs.len(),
                r.blobs_removed,
                human(r.bytes_freed)
            );
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
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}/{} {}", step.phase, step.hook, step.key);
                println!("{}", serde_json::to_string_pretty(&inputs)?);
                match nearest {
                    None => println!("no other cached step at this position"),
                    Some(n) => {
                        println!("differs from {} by:", n.key);
                        for c in changes {
                            let name = c.name.map(|n| format!(" {n}")).unwrap_or_default();
                            println!(
                                "  {}{}: {} → {}",
                                c.input,
                                name,
                                c.before.unwrap_or_else(|| "(none)".into()),
                                c.after.unwrap_or_else(|| "(none)".into())
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
