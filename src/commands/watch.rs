//! `strata build --watch`: build, then build again whenever a file of the build's elements (or
//! a host file named in a `cache-inputs`) changes. The cache makes each rebuild run only what
//! changed; each rebuild is the same `strata build` command (without `--watch`) in a child
//! process, its output kept in NAME.watch.log, and one line here. Rebuilds keep the image's
//! tree (`--keep-tree`) unless STRATA_KEEP_TREE=0.
//!
//! ```text
//! elements' folders + cache-inputs files ──poll (every 250 ms)──► (path, size, mtime, mode)
//!   changed ──► wait until nothing changed for DEBOUNCE ──► rebuild (child strata build)
//!   ──► "[watch] rebuild N: 3.2 s, ran install.d/50-foo, … (28 cached)" or its error line
//!   a change during a rebuild ──► another rebuild once it ends
//! SIGINT/SIGTERM ──► the running rebuild is stopped, exit 130/143
//! ```

use crate::exec::prepare::Prepared;
use crate::manifest::Manifest;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How long the elements must stay unchanged before a rebuild starts.
const DEBOUNCE: Duration = Duration::from_millis(400);
const POLL: Duration = Duration::from_millis(250);

type Snapshot = BTreeMap<PathBuf, (u64, Option<SystemTime>, u32)>;

/// What the watched files look like now.
fn snapshot(prep: &Prepared) -> Snapshot {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Snapshot::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            out.insert(p, (m.len(), m.modified().ok(), m.permissions().mode()));
        }
    };
    for e in &prep.elements {
        for entry in walkdir::WalkDir::new(&e.path)
            .follow_links(false)
            .into_iter()
            .flatten()
        {
            add(entry.path().to_path_buf());
        }
    }
    for input in prep.key_ctx.extra.keys() {
        // `element:path` entries of cache-inputs.
        if let Some((_, path)) = input.split_once(':') {
            add(PathBuf::from(path));
        }
    }
    out
}

/// The arguments of one rebuild: this command line without `--watch`.
fn rebuild_args() -> Vec<OsString> {
    crate::cli::arguments()
        .into_iter()
        .skip(1)
        .filter(|a| a != "--watch")
        .collect()
}

/// Runs the watch loop until SIGINT/SIGTERM.
pub fn run(prep: &Prepared) -> Result<()> {
    crate::cancel::install_handlers();
    let exe = std::env::current_exe().context("cannot find the strata binary")?;
    let name = &prep.settings.image_name;
    let log = PathBuf::from(format!("{name}.watch.log"));
    let mut round = 0;
    let mut seen = snapshot(prep);
    eprintln!(
        "[watch] watching {} files of {} elements; Ctrl-C stops",
        seen.len(),
        prep.elements.len()
    );
    let mut pending = true;
    loop {
        if pending {
            round += 1;
            let before = snapshot(prep);
            rebuild(&exe, &log, name, round)?;
            seen = before;
        }
        // Wait for a change, then for quiet.
        let mut changed_at: Option<Instant> = None;
        loop {
            crate::cancel::check()?;
            std::thread::sleep(POLL);
            let now = snapshot(prep);
            if now != seen {
                seen = now;
                changed_at = Some(Instant::now());
            } else if changed_at.is_some_and(|t| t.elapsed() >= DEBOUNCE) {
                break;
            }
        }
        pending = true;
    }
}

fn rebuild(exe: &std::path::Path, log: &std::path::Path, name: &str, round: u32) -> Result<()> {
    let started = Instant::now();
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    let err = out.try_clone()?;
    let mut child = std::process::Command::new(exe)
        .args(rebuild_args())
        .args(["--progress", "plain"])
        // Each rebuild restores from the image's kept tree (STRATA_KEEP_TREE=0 turns it off).
        .env(
            "STRATA_KEEP_TREE",
            if crate::exec::kept_tree::on_by_default() {
                "1"
            } else {
                "0"
            },
        )
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("cannot start a rebuild")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Some(c) = crate::cancel::requested() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                if c.signal == libc::SIGTERM {
                    nix::sys::signal::Signal::SIGTERM
                } else {
                    nix::sys::signal::Signal::SIGINT
                },
            );
            let _ = child.wait();
            return Err(c.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = started.elapsed().as_secs_f64();
    if status.success() {
        let m = Manifest::read(&Manifest::path_for(name))?;
        let ran: Vec<String> = m
            .steps
            .iter()
            .filter(|s| !s.cached)
            .map(|s| s.label())
            .collect();
        let cached = m.steps.len() - ran.len();
        let what = if ran.is_empty() {
            "nothing ran".to_string()
        } else {
            format!("ran {}", ran.join(", "))
        };
        eprintln!("[watch] rebuild {round}: {secs:.1} s, {what} ({cached} cached)");
    } else {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with("error: "))
            .unwrap_or("failed");
        eprintln!(
            "[watch] rebuild {round} failed after {secs:.1} s: {line} (full log: {})",
            log.display()
        );
    }
    Ok(())
}
