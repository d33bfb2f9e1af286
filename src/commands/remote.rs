//! The registry side of the cache commands: `strata cache push / pull / prune / keygen`, and
//! the registry levels a build or a plan uses (`--cache-from`, `--cache-to`).
//!
//! ```text
//! REF + RegistryArgs ──► Client (timeouts, credentials, TLS) ──► RegistryLevel
//! push [KEY…]   local chain(KEY) oldest first ──► RegistryLevel::push_step_now (progress bar)
//! pull [KEY…]   registry record, then its parent, … ──► copy_layer into the local store
//! prune --keep M…   tags ─► entries (kind, digest, created) ─► not needed by any kept manifest
//!                   (and older than --older-than) ─► DELETE by digest
//! keygen NAME   ed25519 pair: NAME.key (0600), NAME.key.pub
//! ```

use crate::cache::registry::{EntryKind, LevelOptions, RegistryLevel};
use crate::cache::{Local, StepCache, copy_blob, copy_layer};
use crate::cli::{CacheCommand, RegistryArgs};
use crate::exit::{Exit, Failure};
use crate::manifest::{Manifest, StepInputs};
use crate::registry::sign::{self, PublicKey, SigningKey};
use crate::registry::{Client, ClientOptions, Reference};
use crate::settings::RegistrySettings;
use crate::store::Store;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Client settings for a build's cache levels: short limits, so a registry that is down or
/// slow costs seconds, once, before the level is dropped.
fn build_client_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(30),
        retries: 2,
        ..ClientOptions::default()
    }
}

fn load_keys(
    sign_key: Option<&Path>,
    trust: &[PathBuf],
) -> Result<(Option<SigningKey>, Vec<PublicKey>)> {
    let signer = sign_key
        .map(|p| {
            SigningKey::load(p)
                .map_err(|e| Failure::bad_input(format!("--cache-sign-key {}: {e}", p.display())))
        })
        .transpose()?;
    let trusted = trust
        .iter()
        .map(|p| {
            PublicKey::load(p)
                .map_err(|e| Failure::bad_input(format!("--cache-trust {}: {e}", p.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((signer, trusted))
}

/// One registry level.
pub fn level(
    reference: &str,
    insecure: &[String],
    options: LevelOptions,
    local: Option<Arc<Local>>,
    client: ClientOptions,
) -> Result<RegistryLevel> {
    let r = Reference::parse(reference, insecure)
        .map_err(|e| Failure::bad_input(format!("{reference}: {e}")))?;
    let client = Client::new(&r.registry, client)?;
    Ok(RegistryLevel::new(&r, client, local, options))
}

/// The registry levels of a build (`--cache-from` in order, then `--cache-to` if it is not one
/// of them), pushing from `local`.
pub fn build_levels(
    settings: &RegistrySettings,
    local: Option<Arc<Local>>,
) -> Result<Vec<Arc<dyn StepCache>>> {
    let (mut signer, trusted) = load_keys(settings.sign_key.as_deref(), &settings.trust)?;
    let mut refs: Vec<&String> = settings.from.iter().collect();
    if let Some(to) = &settings.to
        && !refs.contains(&to)
    {
        refs.push(to);
    }
    let mut levels: Vec<Arc<dyn StepCache>> = Vec::new();
    for r in refs {
        let write = settings.to.as_ref() == Some(r);
        let options = LevelOptions {
            read: settings.from.contains(r),
            write,
            // Only the level pushed to signs (there is one).
            sign_key: if write { signer.take() } else { None },
            trusted: trusted.clone(),
        };
        let l = level(
            r,
            &settings.insecure,
            options,
            local.clone(),
            build_client_options(),
        )?;
        levels.push(Arc::new(l));
    }
    Ok(levels)
}

/// Runs a registry cache command (push, pull, prune, keygen).
pub fn run(cache_dir: &Path, command: CacheCommand) -> Result<()> {
    match command {
        CacheCommand::Push {
            reference,
            keys,
            registry,
            json,
        } => push(cache_dir, &reference, &keys, &registry, json),
        CacheCommand::Pull {
            reference,
            keys,
            registry,
            json,
        } => pull(cache_dir, &reference, &keys, &registry, json),
        CacheCommand::Prune {
            reference,
            keep,
            older_than,
            dry_run,
            registry,
            json,
        } => prune(&reference, &keep, older_than, dry_run, &registry, json),
        CacheCommand::Keygen { name, out } => keygen(&name, out.as_deref()),
        _ => unreachable!("only registry commands come here"),
    }
}

/// True for the commands this module runs.
pub fn is_registry_command(c: &CacheCommand) -> bool {
    matches!(
        c,
        CacheCommand::Push { .. }
            | CacheCommand::Pull { .. }
            | CacheCommand::Prune { .. }
            | CacheCommand::Keygen { .. }
    )
}

fn command_level(
    reference: &str,
    args: &RegistryArgs,
    local: Option<Arc<Local>>,
    write: bool,
) -> Result<RegistryLevel> {
    let (signer, trusted) = load_keys(args.sign_key.as_deref(), &args.trust)?;
    let options = LevelOptions {
        read: true,
        write,
        sign_key: signer,
        trusted,
    };
    let l = level(
        reference,
        &args.insecure,
        options,
        local,
        ClientOptions::default(),
    )?;
    Ok(l)
}

/// A byte counter on a terminal (bytes and rate), nothing otherwise.
fn bytes_bar(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {msg} {binary_bytes} ({binary_bytes_per_sec}) [{elapsed}]",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// What a push or pull moved.
#[derive(Debug, Default, Serialize)]
struct Moved {
    registry: String,
    steps: usize,
    outputs: usize,
    already_there: usize,
    bytes: u64,
    seconds: f64,
}

fn print_moved(verb: &str, m: &Moved, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(m)?)?;
    } else {
        writeln!(
            out,
            "{verb} {} steps and {} outputs ({} already there), {:.1} MiB in {:.1}s, {}",
            m.steps,
            m.outputs,
            m.already_there,
            m.bytes as f64 / (1 << 20) as f64,
            m.seconds,
            m.registry
        )?;
    }
    Ok(())
}

fn open_local(cache_dir: &Path) -> Result<Arc<Local>> {
    Ok(Arc::new(Local::new(Store::open(cache_dir)?)))
}

fn push(
    cache_dir: &Path,
    reference: &str,
    keys: &[String],
    args: &RegistryArgs,
    json: bool,
) -> Result<()> {
    if !cache_dir.join("index.sqlite").exists() {
        return Err(Failure::bad_input(format!(
            "{} is not a strata cache (no index.sqlite); pass --cache-dir",
            cache_dir.display()
        ))
        .into());
    }
    let started = Instant::now();
    let local = open_local(cache_dir)?;
    let remote = command_level(reference, args, Some(local.clone()), true)?;
    let store = local.store();
    // The steps to push, parents before children; then outputs.
    let mut steps = Vec::new();
    let mut outputs = Vec::new();
    if keys.is_empty() {
        steps = store.list_steps()?;
        steps.sort_by_key(|s| s.created);
        outputs = store.list_outputs()?;
    } else {
        for k in keys {
            if let Some(o) = store.get_output(k)? {
                outputs.push(o);
                continue;
            }
            let key = store.resolve_key(k)?;
            for s in store.chain(&key)? {
                if !steps
                    .iter()
                    .any(|x: &crate::store::StepRecord| x.key == s.key)
                {
                    steps.push(s);
                }
            }
        }
    }
    let bar = bytes_bar(&format!("pushing to {}", remote.name()));
    let progress = |n: u64| bar.inc(n);
    let mut moved = Moved {
        registry: remote.name(),
        ..Moved::default()
    };
    for s in &steps {
        crate::cancel::check()?;
        let layers: Vec<_> = s
            .layers()
            .filter_map(|d| store.layer_for(d).ok().flatten())
            .collect();
        let sent = remote.push_step_now(s, &layers, &progress)?;
        moved.steps += 1;
        moved.bytes += sent;
        if sent == 0 && !layers.is_empty() {
            moved.already_there += 1;
        }
    }
    for o in &outputs {
        crate::cancel::check()?;
        let sent = remote.push_output_now(&o.key, &o.blob_digest, o.size, o.created, &progress)?;
        moved.outputs += 1;
        moved.bytes += sent;
    }
    bar.finish_and_clear();
    moved.seconds = started.elapsed().as_secs_f64();
    print_moved("pushed", &moved, json)
}

fn pull(
    cache_dir: &Path,
    reference: &str,
    keys: &[String],
    args: &RegistryArgs,
    json: bool,
) -> Result<()> {
    let started = Instant::now();
    let local = open_local(cache_dir)?;
    let remote = command_level(reference, args, None, false)?;
    let wanted: Vec<String> = if keys.is_empty() {
        remote.tags()?
    } else {
        keys.to_vec()
    };
    let bar = bytes_bar(&format!("pulling from {}", remote.name()));
    let mut moved = Moved {
        registry: remote.name(),
        ..Moved::default()
    };
    let mut done = BTreeSet::new();
    for key in wanted {
        crate::cancel::check()?;
        // An output?
        if let Some(o) = remote.get_output(&key)? {
            if local.get_output(&key)?.is_some() {
                moved.already_there += 1;
            } else {
                copy_blob(&remote, local.as_ref(), &o.blob_digest, o.size)?;
                local.put_output(&key, &o.blob_digest, o.size, crate::fsutil::now())?;
                moved.outputs += 1;
                moved.bytes += o.size;
                bar.inc(o.size);
            }
            continue;
        }
        // A step: it and its ancestors, oldest first.
        let mut chain = Vec::new();
        let mut next = Some(key.clone());
        while let Some(k) = next {
            if done.contains(&k) || local.lookup(&k)?.is_hit() {
                break;
            }
            let Some(hit) = remote.step(&k)? else {
                if chain.is_empty() {
                    return Err(Failure::new(
                        Exit::Remote,
                        format!("{}: no usable step or output has key {k}", remote.name()),
                    )
                    .into());
                }
                break;
            };
            next = hit.step.parent.clone();
            chain.push(hit);
        }
        for hit in chain.into_iter().rev() {
            for layer in &hit.layers {
                if !local.has_layer(&layer.diff_id)? {
                    copy_layer(&remote, local.as_ref(), &hit.step.key, layer)?;
                    moved.bytes += layer.blob_size;
                    bar.inc(layer.blob_size);
                }
            }
            let mut step = hit.step.clone();
            step.created = crate::fsutil::now();
            step.last_used = step.created;
            local.record_step(&step, &hit.layers)?;
            done.insert(step.key.clone());
            moved.steps += 1;
        }
    }
    bar.finish_and_clear();
    moved.seconds = started.elapsed().as_secs_f64();
    print_moved("pulled", &moved, json)
}

/// The keys a build manifest needs kept: its steps, and its outputs' keys.
fn kept_keys(manifest: &Manifest) -> BTreeSet<String> {
    let mut keep: BTreeSet<String> = manifest.steps.iter().map(|s| s.key.clone()).collect();
    if let Some(last) = manifest.last_key() {
        for o in &manifest.outputs {
            keep.insert(crate::key::output_key(last, o.r#type.name()));
        }
    }
    // A disk step's outputs are keyed by the disk step's key (the last step).
    if let Some(disk) = manifest
        .steps
        .iter()
        .find(|s| matches!(s.inputs, Some(StepInputs::Disk(_))))
    {
        for o in &manifest.outputs {
            keep.insert(crate::key::output_key(&disk.key, o.r#type.name()));
        }
    }
    keep
}

#[derive(Debug, Serialize)]
struct Pruned {
    registry: String,
    kept: usize,
    deleted: Vec<String>,
    dry_run: bool,
}

fn prune(
    reference: &str,
    keep: &[PathBuf],
    older_than: Option<Duration>,
    dry_run: bool,
    args: &RegistryArgs,
    json: bool,
) -> Result<()> {
    let mut needed = BTreeSet::new();
    for m in keep {
        let manifest =
            Manifest::read(m).map_err(|e| Failure::bad_input(format!("--keep: {e:#}")))?;
        needed.extend(kept_keys(&manifest));
    }
    let remote = command_level(reference, args, None, false)?;
    let cutoff = older_than.map(|d| crate::fsutil::now() - d.as_secs() as i64);
    let mut report = Pruned {
        registry: remote.name(),
        kept: 0,
        deleted: Vec::new(),
        dry_run,
    };
    for tag in remote.tags()? {
        crate::cancel::check()?;
        let Some(entry) = remote.entry(&tag)? else {
            continue;
        };
        let young = match (cutoff, entry.created) {
            (Some(c), Some(t)) => t >= c,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if needed.contains(&tag) || young {
            report.kept += 1;
            continue;
        }
        if !dry_run {
            remote.delete(&entry.digest)?;
        }
        let kind = match entry.kind {
            EntryKind::Step => "step",
            EntryKind::Output => "output",
        };
        report.deleted.push(format!("{kind} {tag}"));
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for d in &report.deleted {
            writeln!(
                out,
                "{} {d}",
                if dry_run { "would delete" } else { "deleted" }
            )?;
        }
        writeln!(
            out,
            "{}: kept {}, {} {}; the registry's garbage collection frees the blobs",
            report.registry,
            report.kept,
            if dry_run { "would delete" } else { "deleted" },
            report.deleted.len()
        )?;
    }
    Ok(())
}

/// `--push REF[:TAG]`: sends the image of the OCI layout `dir` (tag `latest`) to a registry.
pub fn push_image(reference: &str, dir: &Path, insecure: &[String]) -> Result<String> {
    let r = Reference::parse(reference, insecure)
        .map_err(|e| Failure::bad_input(format!("--push {reference}: {e}")))?;
    let tag = r.tag.clone().unwrap_or_else(|| "latest".to_string());
    let parts = crate::outputs::oci::read_layout(dir, "latest")?;
    let client = Client::new(&r.registry, ClientOptions::default())?;
    let bar = bytes_bar(&format!("pushing the image to {r}"));
    let progress = |n: u64| bar.inc(n);
    let cancelled = || crate::cancel::requested().is_some();
    let transfer = crate::registry::Transfer {
        progress: &progress,
        cancelled: &cancelled,
    };
    for (desc, path) in &parts.layers {
        let digest = crate::registry::Digest::parse(&desc.digest)?;
        client.push_blob_file(&r.repository, path, Some(&digest), &transfer)?;
    }
    client.push_blob_bytes(&r.repository, &parts.config_bytes)?;
    let digest = client.put_manifest(
        &r.repository,
        &tag,
        crate::registry::media_types::OCI_MANIFEST,
        &parts.manifest_bytes,
    )?;
    bar.finish_and_clear();
    Ok(format!("{}/{}:{tag}@{digest}", r.registry, r.repository))
}

fn keygen(name: &str, out: Option<&Path>) -> Result<()> {
    let secret = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}.key")));
    let mut public = secret.as_os_str().to_os_string();
    public.push(".pub");
    let public = PathBuf::from(public);
    let key = sign::generate(name).map_err(|e| Failure::bad_input(e.to_string()))?;
    key.save(&secret)
        .with_context(|| format!("cannot write {}", secret.display()))?;
    key.public_key()
        .save(&public)
        .with_context(|| format!("cannot write {}", public.display()))?;
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "wrote {} (secret: pass it to --cache-sign-key where pushes happen) and {} (give it to \
         readers: --cache-trust)",
        secret.display(),
        public.display()
    )?;
    Ok(())
}
