//! The standing fault-injection test: disk builds of the busybox fixture killed with SIGKILL at
//! seeded random moments in each stage (a hook, packing a layer, the disk step, writing the
//! outputs), and one stopped with SIGINT; after each, nothing may be left and the next build
//! must resume with every step that finished before the kill reused.
//!
//! ```text
//! reference build (--progress json) ──► how long packing, the disk step and the outputs take
//! round r (its own DIB_FIXTURE_ROUND, so every round starts cold):
//!   build ──► trigger of stage r % 4 (an event, or a .strata-out file) ──► random delay ──► kill
//!   ──► no process, mount or loop device of the fixture left ──► `cache verify` clean
//!   ──► the steps and outputs recorded in the index noted ──► next build ok, no leftovers,
//!       exactly the recorded steps cached (and the disk step when all its outputs were)
//!   ──► `cache gc` keeps the cache small
//! ```
//! The seed is printed; `STRATA_FAULT_SEED=N` replays a run.

use crate::harness::{BuildFixture, repo, strata};
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// SIGKILL rounds (each stage gets a quarter) and then one SIGINT round.
const KILLS: usize = 12;
/// The fixture's knobs: MiB of random bytes in the tree, seconds the slow hook sleeps.
const BULK_MB: &str = "16";
const SLOW_SECS: f64 = 0.6;

/// xorshift64*: small, seeded, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, max).
    fn below(&mut self, max: Duration) -> Duration {
        let frac = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        max.mul_f64(frac)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// While install.d/40-slow runs.
    Hook,
    /// After install.d/50-bulk printed its last line: the 16 MiB layer is scanned and packed.
    Packing,
    /// From the disk step's start until its first output file appears.
    Disk,
    /// While the outputs (tar, then raw) are written.
    Output,
}

const STAGES: [Stage; 4] = [Stage::Hook, Stage::Packing, Stage::Disk, Stage::Output];

/// What the watcher of a running build sees.
enum Seen {
    Event(serde_json::Value),
    Ended,
}

/// A build of round `round` with its stderr (JSON events) read on a thread.
struct Running {
    child: Child,
    events: mpsc::Receiver<(Instant, Seen)>,
    started: Instant,
}

fn elements() -> String {
    repo().join("elements").display().to_string()
}

fn build_cmd(f: &BuildFixture, round: &str) -> Command {
    let el = elements();
    let mut cmd = f.build_cmd_typed(
        "img",
        "tar,raw",
        &[
            "--progress",
            "json",
            "--element-path",
            &el,
            "fixture-bulk",
            "fixture-disk",
            "block-device-mbr",
        ],
    );
    cmd.env("DIB_FIXTURE_ROUND", round)
        .env("DIB_FIXTURE_BULK_MB", BULK_MB)
        .env("DIB_FIXTURE_SLOW", SLOW_SECS.to_string());
    cmd
}

fn start(f: &BuildFixture, round: &str) -> Running {
    let mut child = build_cmd(f, round)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send((Instant::now(), Seen::Event(v)));
            }
        }
        let _ = tx.send((Instant::now(), Seen::Ended));
    });
    Running {
        child,
        events: rx,
        started: Instant::now(),
    }
}

fn is(v: &serde_json::Value, event: &str, step: &str) -> bool {
    v["event"] == event && v["step"] == step
}

/// Whether the event (or the state of the output folder) starts `stage`.
fn triggers(stage: Stage, v: Option<&serde_json::Value>, f: &BuildFixture) -> bool {
    match (stage, v) {
        (Stage::Hook, Some(v)) => is(v, "step-start", "install.d/40-slow"),
        (Stage::Packing, Some(v)) => {
            is(v, "hook-output", "install.d/50-bulk") && v["line"] == "bulk written"
        }
        (Stage::Disk, Some(v)) => is(v, "step-start", "output/disk"),
        (Stage::Output, None) => !f.partial_outputs().is_empty(),
        _ => false,
    }
}

/// How long each stage lasts in a reference build (`stage -> duration`).
struct Windows {
    packing: Duration,
    disk: Duration,
    output: Duration,
}

impl Windows {
    fn of(&self, stage: Stage) -> Duration {
        match stage {
            Stage::Hook => Duration::from_secs_f64(SLOW_SECS),
            Stage::Packing => self.packing,
            Stage::Disk => self.disk,
            Stage::Output => self.output,
        }
    }
}

/// Runs a whole build, timing its stages.
fn reference(f: &BuildFixture) -> Windows {
    let mut run = start(f, "reference");
    let (mut bulk, mut packed, mut disk, mut first_out, mut disk_end) =
        (None, None, None, None, None);
    loop {
        match run.events.recv_timeout(Duration::from_millis(5)) {
            Ok((at, Seen::Event(v))) => {
                if triggers(Stage::Packing, Some(&v), f) {
                    bulk = Some(at);
                }
                if is(&v, "step-end", "install.d/50-bulk") {
                    packed = Some(at);
                }
                if triggers(Stage::Disk, Some(&v), f) {
                    disk = Some(at);
                }
                if is(&v, "step-end", "output/disk") {
                    disk_end = Some(at);
                }
            }
            Ok((_, Seen::Ended)) => break,
            Err(_) => {}
        }
        if first_out.is_none() && triggers(Stage::Output, None, f) {
            first_out = Some(Instant::now());
        }
    }
    let status = run.child.wait().unwrap();
    assert!(status.success(), "the reference build failed");
    let span = |a: Option<Instant>, b: Option<Instant>| {
        b.unwrap()
            .saturating_duration_since(a.unwrap())
            .max(Duration::from_millis(20))
    };
    let w = Windows {
        packing: span(bulk, packed),
        disk: span(disk, first_out),
        output: span(first_out, disk_end),
    };
    eprintln!(
        "reference build {:.2}s; windows: hook {SLOW_SECS}s, packing {:.2}s, disk {:.2}s, outputs {:.2}s",
        run.started.elapsed().as_secs_f64(),
        w.packing.as_secs_f64(),
        w.disk.as_secs_f64(),
        w.output.as_secs_f64()
    );
    w
}

/// Sends `signal` `delay` after `stage` begins. Returns when it was sent (after the build
/// started), or None when the build ended first.
fn signal_in(
    f: &BuildFixture,
    run: &mut Running,
    stage: Stage,
    delay: Duration,
    signal: Signal,
) -> Option<Duration> {
    let mut due: Option<Instant> = None;
    loop {
        match run.events.recv_timeout(Duration::from_millis(2)) {
            Ok((at, Seen::Event(v))) => {
                if due.is_none() && triggers(stage, Some(&v), f) {
                    due = Some(at + delay);
                }
            }
            Ok((_, Seen::Ended)) => return None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
        if due.is_none() && triggers(stage, None, f) {
            due = Some(Instant::now() + delay);
        }
        if due.is_some_and(|d| Instant::now() >= d) {
            if run.child.try_wait().unwrap().is_some() {
                return None;
            }
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.child.id() as i32), signal)
                .unwrap();
            return Some(run.started.elapsed());
        }
    }
}

/// Processes whose root, working folder or command line lies under `dir` (a hook, a tool).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = e.path();
        let cmdline = fs::read(p.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let under = |link: &str| fs::read_link(p.join(link)).is_ok_and(|t| t.starts_with(dir));
        if cmdline.contains(&needle) || under("root") || under("cwd") {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// Waits (up to 20 s) for what a dead strata started to be gone: processes (PDEATHSIG, the
/// pid namespaces), mounts (its mount namespace) and loop devices (autoclear).
fn assert_nothing_left_running(f: &BuildFixture, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (procs, mounts, loops) = (
            processes_under(f.path()),
            mounts_under(f.path()),
            loops_under(f.path()),
        );
        if procs.is_empty() && mounts.is_empty() && loops.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: left 20 s later: processes {procs:#?}, mounts {mounts:#?}, loop devices {loops:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn keys(db: &rusqlite::Connection, sql: &str) -> BTreeSet<String> {
    let mut stmt = db.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn cache_cmd(f: &BuildFixture, args: &[&str]) -> std::process::Output {
    strata()
        .arg("cache")
        .args(args)
        .arg("--cache-dir")
        .arg(f.cache())
        .env("TMP_DIR", f.path().join("tmp"))
        .output()
        .unwrap()
}

/// After the interrupted build of `round`: nothing left running, the cache sound, and the next
/// build resumes with exactly what was recorded.
fn check_after(f: &BuildFixture, round: &str, what: &str) {
    assert_nothing_left_running(f, what);
    let verify = cache_cmd(f, &["verify"]);
    assert!(
        verify.status.success(),
        "{what}: cache verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let db = rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let steps = keys(&db, "SELECT key FROM steps");
    let outputs = keys(&db, "SELECT key FROM outputs");
    drop(db);
    let out = build_cmd(f, round).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: the next build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left_running(f, what);
    f.assert_no_leftovers();
    let m = f.manifest();
    for s in m.0["steps"].as_array().unwrap() {
        let label = format!(
            "{}/{}",
            s["phase"].as_str().unwrap(),
            s["hook"].as_str().unwrap()
        );
        let key = s["key"].as_str().unwrap();
        let cached = s["cached"].as_bool().unwrap();
        let recorded = if label == "output/disk" {
            ["tar", "raw"]
                .iter()
                .all(|t| outputs.contains(&strata::key::output_key(key, t)))
        } else {
            steps.contains(key)
        };
        assert_eq!(
            cached, recorded,
            "{what}: {label} cached {cached}, but recorded before the next build: {recorded}"
        );
    }
    let gc = cache_cmd(f, &["gc", "--max-size", "64M"]);
    assert!(gc.status.success(), "{what}: gc failed");
}

#[test]
fn builds_killed_at_random_moments_leave_nothing_and_resume() {
    crate::require_root!();
    let seed = std::env::var("STRATA_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fault injection seed {seed} (replay with STRATA_FAULT_SEED={seed})");
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let f = BuildFixture::new();
    let windows = reference(&f);
    let mut kills = 0;
    let mut round = 0;
    while kills < KILLS {
        round += 1;
        assert!(
            round < 3 * KILLS,
            "seed {seed}: builds kept ending before the kill"
        );
        let stage = STAGES[kills % STAGES.len()];
        let delay = rng.below(windows.of(stage));
        let name = format!("kill{round}");
        let mut run = start(&f, &name);
        let Some(at) = signal_in(&f, &mut run, stage, delay, Signal::SIGKILL) else {
            run.child.wait().unwrap();
            eprintln!("round {round}: the build ended before the kill; again");
            continue;
        };
        run.child.wait().unwrap();
        kills += 1;
        let what = format!(
            "seed {seed}, round {round}: SIGKILL {:.3}s into {stage:?} ({:.2}s into the build)",
            delay.as_secs_f64(),
            at.as_secs_f64()
        );
        eprintln!("{what}");
        check_after(&f, &name, &what);
    }
    // One SIGINT at a random moment of a random stage: exit 130, and the same checks.
    loop {
        round += 1;
        assert!(
            round < 4 * KILLS,
            "seed {seed}: builds kept ending before SIGINT"
        );
        let stage = STAGES[(rng.next() % STAGES.len() as u64) as usize];
        let delay = rng.below(windows.of(stage));
        let name = format!("int{round}");
        let mut run = start(&f, &name);
        let Some(at) = signal_in(&f, &mut run, stage, delay, Signal::SIGINT) else {
            run.child.wait().unwrap();
            continue;
        };
        let status = run.child.wait().unwrap();
        let what = format!(
            "seed {seed}, round {round}: SIGINT {:.3}s into {stage:?} ({:.2}s into the build)",
            delay.as_secs_f64(),
            at.as_secs_f64()
        );
        eprintln!("{what}");
        assert_eq!(status.code(), Some(130), "{what}");
        check_after(&f, &name, &what);
        break;
    }
    eprintln!(
        "fault injection: {kills} kills and 1 SIGINT in {:.1}s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}
