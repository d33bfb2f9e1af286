//! `strata cache …`: list, size, collect, verify, remove and explain cached steps.

use crate::cli::{CacheArgs, CacheCommand};
use crate::error::Failure;
use crate::key::{self, KeyInputs};
use crate::store::{self, Store};
use anyhow::Result;

fn short(k: &str) -> &str {
    &k[..k.len().min(16)]
}

pub fn run(args: CacheArgs) -> Result<()> {
    if !args.cache_dir.join("index.sqlite").exists() {
        return Err(Failure::bad_input(format!(
            "{} is not a strata cache (no index.sqlite); pass --cache-dir or set STRATA_CACHE_DIR",
            args.cache_dir.display()
        ))
        .into());
    }
    let store = Store::open(&args.cache_dir)?;
    match args.command {
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
                println!("{u}");
            }
        }
        CacheCommand::Gc { max_size } => {
            let max = store::parse_size(&max_size)
                .map_err(|e| Failure::bad_input(format!("--max-size {max_size}: {e}")))?;
            let r = store.gc(max)?;
            println!("{r}");
        }
        CacheCommand::Verify => {
            let r = store.verify()?;
            println!("{r}");
        }
        CacheCommand::Rm { key } => {
            let r = store.rm(&key)?;
            println!("{r}");
        }
        CacheCommand::Explain { key, json } => {
            let Some(step) = store.lookup_step(&key)? else {
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
