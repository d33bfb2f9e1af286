//! The sandbox and the hook runner on real namespaces, mounts, chroots and processes.
//!
//! Tests that mount first move their own thread into a private mount namespace, so nothing they
//! mount is ever visible on the host, even if they fail. Tests about process death use a helper
//! process: this test binary re-executed with `STRATA_SANDBOX_HELPER=<role>` running only the
//! ignored `helper_process` test.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata::phase::Phase;
use strata::progress::{Mode, Reporter};
use strata::runner::{HookOutcome, HookRun, run_hook};
use strata::sandbox::{
    BuildDir, ChrootMounts, HOST_RESOLV_FALLBACK, RESOLV_ASIDE, enter_private_namespace,
    mount_points_under, sweep_dead_build_dirs,
};

const HELPER_ENV: &str = "STRATA_SANDBOX_HELPER";
const HELPER_DIR_ENV: &str = "STRATA_SANDBOX_HELPER_DIR";
const TOKEN_ENV: &str = "STRATA_SANDBOX_TOKEN";

// ---------------------------------------------------------------- helpers

fn private_ns() {
    enter_private_namespace().expect("enter a private mount namespace (tests run as root)");
}

fn mkrootfs(dest: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mkrootfs.sh");
    let out = Command::new(&script).arg(dest).output().unwrap();
    assert!(
        out.status.success(),
        "mkrootfs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "mkrootfs.sh must be silent"
    );
}

fn write_exec(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Everything about a tree a layer could see, except atime/ctime and directory sizes.
fn listing(root: &Path) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let ft = e.file_type();
            let detail = if ft.is_symlink() {
                format!("-> {}", std::fs::read_link(e.path()).unwrap().display())
            } else if ft.is_file() {
                let bytes = std::fs::read(e.path()).unwrap();
                format!("{} {}", m.size(), blake3::hash(&bytes).to_hex())
            } else {
                String::new()
            };
            format!(
                "{rel} {:o} {}:{} {}.{} {detail}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
        .collect()
}

fn host_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    env.insert("TMPDIR".to_string(), "/tmp".to_string());
    env.insert("LC_ALL".to_string(), "C".to_string());
    env
}

fn host_run<'a>(script: &Path, env_files: Vec<PathBuf>) -> HookRun<'a> {
    HookRun {
        phase: Phase::Root,
        hook: "50-test",
        element: "fixture",
        script: script.to_path_buf(),
        env_files,
        env: host_env(),
        chroot: None,
    }
}

fn quiet_reporter() -> Reporter {
    Reporter::new(None, true, Mode::Plain).unwrap()
}

/// Mount points containing `needle` in the mount table of any thread of any process.
fn mounts_anywhere(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().to_string();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("mountinfo")) {
                for line in text.lines().filter(|l| l.contains(&needle)) {
                    found.push(format!("{}: {line}", t.path().display()));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Host pids of processes whose environment contains `TOKEN_ENV=token`.
fn pids_with_token(token: &str) -> Vec<u32> {
    let needle = format!("{TOKEN_ENV}={token}");
    let mut pids = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(p.path().join("environ"))
            && env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

fn wait_for_file(path: &Path, helper: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = helper.try_wait().unwrap() {
            panic!("helper exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "helper never wrote {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_helper(role: &str, dir: &Path, token: &str, own_group: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "sandbox::helper_process",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env(HELPER_ENV, role)
    .env(HELPER_DIR_ENV, dir)
    .env(TOKEN_ENV, token)
    .stdin(Stdio::piped())
    .stdout(Stdio::null());
    if own_group {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    cmd.spawn().unwrap()
}

fn unique_token() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

// ---------------------------------------------------------------- helper process

#[test]
#[ignore = "helper process for the other sandbox tests; does nothing on its own"]
fn helper_process() {
    crate::require_root!();
    let Ok(role) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(HELPER_DIR_ENV).unwrap());
    let token = std::env::var(TOKEN_ENV).unwrap();
    match role.as_str() {
        // Enter the namespace, mount, say so, and wait for stdin to close.
        "ns" => {
            private_ns();
            let mnt = dir.join("mnt");
            nix::mount::mount(
                Some("tmpfs"),
                &mnt,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            std::fs::write(mnt.join("inside"), "x").unwrap();
            std::fs::write(dir.join("ready"), "").unwrap();
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        }
        // A build: namespace, tmpfs build dir, a hook that sleeps with a sleeping grandchild.
        "sigkill" => {
            private_ns();
            let build = BuildDir::create(&dir, "build.", true).unwrap();
            std::fs::write(dir.join("builddir"), build.path.to_str().unwrap()).unwrap();
            let hook = build.path.join("hooks/root.d/10-sleep");
            write_exec(
                &hook,
                "#!/bin/bash\nsleep 1000 &\necho started\ntouch \"$READY\"\nsleep 1001\n",
            );
            let mut run = host_run(&hook, vec![]);
            run.env.insert(TOKEN_ENV.into(), token);
            run.env
                .insert("READY".into(), dir.join("ready").display().to_string());
            let _ = run_hook(&run, &quiet_reporter());
            panic!("the hook was supposed to be killed with this process");
        }
        // A hook is running when the signal arrives; report what run_hook returned.
        "interrupt" | "interrupt-ignored" => {
            let reporter = quiet_reporter();
            let hook = dir.join("hook");
            let body = if role == "interrupt" {
                "#!/bin/bash\ntouch \"$READY\"\nsleep 1000\n"
            } else {
                "#!/bin/bash\ntrap '' INT TERM\ntouch \"$READY\"\nwhile :; do sleep 0.1; done\n"
            };
            write_exec(&hook, body);
            let mut run = host_run(&hook, vec![]);
            run.env
                .insert("READY".into(), dir.join("ready").display().to_string());
            let started = Instant::now();
            let result = run_hook(&run, &reporter);
            let text = match result {
                Err(e) => format!("err {} {:.1}", e, started.elapsed().as_secs_f64()),
                Ok(o) => format!("ok {o:?}"),
            };
            std::fs::write(dir.join("result"), text).unwrap();
        }
        other => panic!("unknown helper role {other}"),
    }
}

// ---------------------------------------------------------------- namespace and kill semantics

#[test]
fn a_mount_made_in_the_private_namespace_never_reaches_the_host() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    let mnt = dir.path().join("mnt");
    let mut helper = start_helper("ns", dir.path(), &unique_token(), false);
    wait_for_file(&dir.path().join("ready"), &mut helper);

    // The helper sees its mount (its thread's table lists it), the host does not.
    assert!(
        !mounts_anywhere(&mnt).is_empty(),
        "the helper's mount is not there"
    );
    let host = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    assert!(!host.contains(mnt.to_str().unwrap()));
    let init = std::fs::read_to_string("/proc/1/mountinfo").unwrap_or_default();
    assert!(!init.contains(mnt.to_str().unwrap()));
    assert!(!mnt.join("inside").exists());

    drop(helper.stdin.take());
    assert!(helper.wait().unwrap().success());
    assert_eq!(mounts_anywhere(&mnt), Vec::<String>::new());
}

#[test]
fn sigkill_of_strata_kills_every_hook_process_and_frees_every_mount() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let token = unique_token();
    let mut helper = start_helper("sigkill", dir.path(), &token, false);
    wait_for_file(&dir.path().join("ready"), &mut helper);
    let build = PathBuf::from(std::fs::read_to_string(dir.path().join("builddir")).unwrap());

    // helper, intermediate, pid-ns init, the hook's bash and its two sleeps.
    let before = pids_with_token(&token);
    assert!(
        before.len() >= 5,
        "expected the whole process tree, found {before:?}"
    );
    assert!(
        !mounts_anywhere(&build).is_empty(),
        "the build tmpfs is not mounted"
    );

    helper.kill().unwrap();
    helper.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = pids_with_token(&token);
        let mounts = mounts_anywhere(&build);
        if left.is_empty() && mounts.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after SIGKILL: processes {left:?}, mounts {mounts:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The tmpfs died with the namespace: the build dir is an empty directory again.
    assert_eq!(std::fs::read_dir(&build).unwrap().count(), 0);
}

#[test]
fn ctrl_c_stops_the_hook_and_run_hook_reports_interrupted() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut helper = start_helper("interrupt", dir.path(), &unique_token(), true);
    wait_for_file(&dir.path().join("ready"), &mut helper);
    // As the terminal does: SIGINT to the whole foreground process group.
    let pgid = nix::unistd::Pid::from_raw(-(helper.id() as i32));
    nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGINT).unwrap();
    let started = Instant::now();
    let status = helper.wait().unwrap();
    assert!(status.success(), "helper failed: {status}");
    let result = std::fs::read_to_string(dir.path().join("result")).unwrap();
    assert!(
        result.starts_with("err interrupted while running hook root.d/50-test"),
        "{result}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_hook_ignoring_the_interrupt_is_killed_after_the_grace_period() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut helper = start_helper("interrupt-ignored", dir.path(), &unique_token(), true);
    wait_for_file(&dir.path().join("ready"), &mut helper);
    // Only strata gets the signal (like `kill <strata pid>`).
    let pid = nix::unistd::Pid::from_raw(helper.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = helper.wait().unwrap();
    assert!(status.success(), "helper failed: {status}");
    let result = std::fs::read_to_string(dir.path().join("result")).unwrap();
    assert!(
        result.starts_with("err interrupted while running hook"),
        "{result}"
    );
}

// ---------------------------------------------------------------- build dir

fn sentinel_survives_cleanup(tmpfs: bool) {
    private_ns();
    let host = tempfile::tempdir().unwrap();
    let keep = host.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("sentinel"), "precious").unwrap();

    let parent = tempfile::tempdir().unwrap();
    let build = BuildDir::create(parent.path(), "strata_build.", tmpfs).unwrap();
    let name = build
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(name.starts_with("strata_build.") && name.len() == "strata_build.".len() + 8);
    let cache = build.path.join("mnt/var/cache/apt/archives");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(build.path.join("mnt/file"), "x").unwrap();
    nix::mount::mount(
        Some(&keep),
        &cache,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let proc_dir = build.path.join("mnt/proc");
    std::fs::create_dir(&proc_dir).unwrap();
    nix::mount::mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let path = build.path.clone();
    assert_eq!(
        mount_points_under(&path).unwrap(),
        vec![cache.clone(), proc_dir.clone()]
    );

    build.cleanup().unwrap();
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_to_string(keep.join("sentinel")).unwrap(),
        "precious"
    );
    assert!(mount_points_under(parent.path()).unwrap().is_empty());
}

#[test]
fn build_dir_cleanup_never_deletes_through_a_bind_mount() {
    crate::require_root!();
    sentinel_survives_cleanup(false);
}

#[test]
fn tmpfs_build_dir_cleanup_never_deletes_through_a_bind_mount() {
    crate::require_root!();
    sentinel_survives_cleanup(true);
}

#[test]
fn dropping_a_build_dir_cleans_it_up() {
    crate::require_root!();
    private_ns();
    let parent = tempfile::tempdir().unwrap();
    let path = {
        let build = BuildDir::create(parent.path(), "b.", true).unwrap();
        std::fs::write(build.path.join("f"), "x").unwrap();
        build.path.clone()
    };
    assert!(!path.exists());
    assert!(mount_points_under(parent.path()).unwrap().is_empty());
}

#[test]
fn only_dead_build_folders_are_swept_even_from_inside_a_live_builds_namespace() {
    crate::require_root!();
    private_ns();
    let parent = tempfile::tempdir().unwrap();
    // Live builds: one on a tmpfs (seen from here, its own namespace, as a mount point, as a
    // strata started by one of its hooks would see it) and one without.
    let on_tmpfs = BuildDir::create(parent.path(), "strata_build.", true).unwrap();
    std::fs::write(on_tmpfs.path.join("f"), "live").unwrap();
    let plain = BuildDir::create(parent.path(), "strata_build.", false).unwrap();
    std::fs::create_dir_all(plain.path.join("a/b")).unwrap();
    std::fs::write(plain.path.join("a/b/f"), "live").unwrap();
    // A dead build's folder (nobody holds its lock) with a tree in it, and one held by another
    // process's lock: flock(1), so that no descriptor of this test process holds it (a fork
    // by a test running beside this one would inherit it and keep the lock past its drop).
    let dead = parent.path().join("strata_build.dead");
    std::fs::create_dir_all(dead.join("x/y")).unwrap();
    std::fs::write(dead.join("x/y/z"), "left").unwrap();
    let held = parent.path().join("strata_build.held");
    std::fs::create_dir(&held).unwrap();
    let mut holder = std::process::Command::new("flock")
        .arg(&held)
        .args(["sh", "-c", "echo locked; exec cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "locked\n");
    }
    let other = parent.path().join("not-a-build");
    std::fs::create_dir(&other).unwrap();

    let removed = sweep_dead_build_dirs(parent.path(), "strata_build.").unwrap();
    assert_eq!(removed, vec![dead.clone()]);
    assert!(!dead.exists());
    assert_eq!(
        std::fs::read_to_string(on_tmpfs.path.join("f")).unwrap(),
        "live"
    );
    assert_eq!(
        std::fs::read_to_string(plain.path.join("a/b/f")).unwrap(),
        "live"
    );
    assert!(held.exists() && other.exists());
    // Once the holder is gone, its folder is a dead build's.
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        sweep_dead_build_dirs(parent.path(), "strata_build.").unwrap(),
        vec![held.clone()]
    );
    on_tmpfs.cleanup().unwrap();
    plain.cleanup().unwrap();
    assert!(
        sweep_dead_build_dirs(parent.path(), "strata_build.")
            .unwrap()
            .is_empty()
    );
    assert!(mount_points_under(parent.path()).unwrap().is_empty());
}

// ---------------------------------------------------------------- chroot mounts

enum Resolv {
    Missing,
    File,
    DanglingLink,
    HostLink,
}

fn chroot_mounts_round_trip(resolv: Resolv) {
    private_ns();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    mkrootfs(&root);
    match resolv {
        Resolv::Missing => {}
        Resolv::File => {
            std::fs::write(root.join("etc/resolv.conf"), "nameserver 192.0.2.1\n").unwrap()
        }
        Resolv::DanglingLink => std::os::unix::fs::symlink(
            "../run/resolvconf/resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .unwrap(),
        // Mounting through this link would cover the HOST's file.
        Resolv::HostLink => {
            std::os::unix::fs::symlink("/etc/hostname", root.join("etc/resolv.conf")).unwrap()
        }
    }
    let hooks = dir.path().join("hooks");
    write_exec(
        &hooks.join("install.d/50-check"),
        r##"#!/bin/bash
set -eu
test -r /proc/self/status && echo "proc ok"
f=$(find /sys/kernel -maxdepth 1 -type f -perm -200 | head -n 1 || true)
test -n "$f"
if : >> "$f" 2>/dev/null; then echo "sys WRITABLE $f"; else echo "sys ro"; fi
if touch /tmp/in_target.d/x 2>/dev/null; then echo "hooks WRITABLE"; else echo "hooks ro"; fi
echo "hooks: $(ls /tmp/in_target.d/install.d)"
test -c /dev/null && test -d /dev/pts && echo "dev ok"
echo "resolv: $(cat /etc/resolv.conf)"
echo "home=$HOME tmpdir=${TMPDIR-unset} path=$PATH"
echo "# written by a hook" >> /etc/resolv.conf
"##,
    );
    let hooks_before = listing(&hooks);
    let before = listing(&root);
    let host_hostname = std::fs::read("/etc/hostname").ok();
    let host_resolv = std::fs::read("/etc/resolv.conf").ok();

    let mounts = ChrootMounts::mount(&root, &hooks).unwrap();
    assert!(mount_points_under(&root).unwrap().len() >= 6);
    let run = HookRun {
        phase: Phase::Install,
        hook: "50-check",
        element: "fixture",
        script: PathBuf::from("/tmp/in_target.d/install.d/50-check"),
        env_files: vec![],
        env: host_env(),
        chroot: Some(root.clone()),
    };
    let outcome = run_hook(&run, &quiet_reporter()).unwrap();
    mounts.unmount().unwrap();

    let expected_resolv = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_else(|_| HOST_RESOLV_FALLBACK.to_string());
    let out = outcome.tail.join("\n");
    assert!(outcome.success, "{out}");
    assert!(out.contains("proc ok"), "{out}");
    assert!(out.contains("sys ro"), "{out}");
    assert!(out.contains("hooks ro"), "{out}");
    assert!(out.contains("hooks: 50-check"), "{out}");
    assert!(out.contains("dev ok"), "{out}");
    assert!(
        out.contains(&format!("resolv: {}", expected_resolv.trim_end())),
        "{out}"
    );
    assert!(
        out.contains(
            "home=/root tmpdir=unset path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ),
        "{out}"
    );

    assert!(mount_points_under(&root).unwrap().is_empty());
    assert_eq!(listing(&root), before, "the tree changed");
    assert_eq!(listing(&hooks), hooks_before);
    assert!(!root.join("etc").join(RESOLV_ASIDE).exists());
    assert_eq!(std::fs::read("/etc/hostname").ok(), host_hostname);
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_resolv);
    // The private copy next to the root is gone too.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[test]
fn chroot_mounts_work_and_leave_the_tree_identical_without_resolv_conf() {
    crate::require_root!();
    chroot_mounts_round_trip(Resolv::Missing);
}

#[test]
fn chroot_mounts_work_and_leave_the_tree_identical_with_a_resolv_conf_file() {
    crate::require_root!();
    chroot_mounts_round_trip(Resolv::File);
}

#[test]
fn chroot_mounts_work_and_leave_the_tree_identical_with_a_dangling_resolv_conf_link() {
    crate::require_root!();
    chroot_mounts_round_trip(Resolv::DanglingLink);
}

#[test]
fn chroot_mounts_never_mount_through_a_resolv_conf_link_to_the_host() {
    crate::require_root!();
    chroot_mounts_round_trip(Resolv::HostLink);
}

#[test]
fn chroot_mounts_create_missing_mount_points_and_remove_them_again() {
    crate::require_root!();
    private_ns();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(root.join("bin")).unwrap();
    let hooks = dir.path().join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    let before = listing(&root);
    let mounts = ChrootMounts::mount(&root, &hooks).unwrap();
    for p in [
        "proc/self",
        "dev/null",
        "sys/kernel",
        "tmp/in_target.d",
        "etc/resolv.conf",
    ] {
        assert!(root.join(p).exists(), "{p} missing while mounted");
    }
    mounts.unmount().unwrap();
    assert_eq!(listing(&root), before);
}

#[test]
fn chroot_mounts_refuse_a_symlinked_mount_point_and_undo_the_rest() {
    crate::require_root!();
    private_ns();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    mkrootfs(&root);
    let host_dir = dir.path().join("host-sys");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::remove_dir(root.join("sys")).unwrap();
    std::os::unix::fs::symlink(&host_dir, root.join("sys")).unwrap();
    let hooks = dir.path().join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    let before = listing(&root);
    let err = ChrootMounts::mount(&root, &hooks).unwrap_err().to_string();
    assert!(err.contains("sys") && err.contains("symlink"), "{err}");
    assert!(mount_points_under(dir.path()).unwrap().is_empty());
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0);
    assert_eq!(listing(&root), before);
}

// ---------------------------------------------------------------- run_hook

fn run_script(body: &str, env_files: &[(&str, &str)]) -> (HookOutcome, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("root.d/50-test");
    write_exec(&hook, body);
    let mut files = Vec::new();
    for (name, text) in env_files {
        let p = dir.path().join("environment.d").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    let outcome = run_hook(&host_run(&hook, files), &quiet_reporter()).unwrap();
    (outcome, dir)
}

#[test]
fn a_succeeding_hook_reports_success_and_its_output() {
    crate::require_root!();
    let (o, _d) = run_script(
        "#!/bin/bash\necho one\necho two >&2\nprintf 'no newline'\n",
        &[],
    );
    assert!(o.success);
    assert_eq!(o.code, Some(0));
    assert_eq!(o.signal, None);
    assert_eq!(o.tail, vec!["one", "two", "no newline"]);
    assert!(o.seconds > 0.0 && o.seconds < 30.0);
}

#[test]
fn a_binary_hook_that_cannot_run_reports_why_without_a_stray_success_line() {
    crate::require_root!();
    // An ELF header the kernel refuses (ENOEXEC), with NUL bytes: bash calls it a binary.
    let (o, _d) = run_script(
        "\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0",
        &[],
    );
    assert!(!o.success);
    assert_eq!(o.tail.len(), 1, "{:?}", o.tail);
    assert!(
        o.tail[0].ends_with("cannot execute binary file: Exec format error"),
        "{:?}",
        o.tail
    );
    assert!(
        o.tail.iter().all(|l| !l.ends_with(": Success")),
        "{:?}",
        o.tail
    );
}

#[test]
fn a_failing_hook_reports_its_status_and_the_last_20_lines() {
    crate::require_root!();
    let (o, _d) = run_script(
        "#!/bin/bash\nfor i in $(seq 1 30); do echo line$i; done\nexit 7\n",
        &[],
    );
    assert!(!o.success);
    assert_eq!(o.code, Some(7));
    assert_eq!(o.tail.len(), 20);
    assert_eq!(o.tail.first().map(String::as_str), Some("line11"));
    assert_eq!(o.tail.last().map(String::as_str), Some("line30"));
}

#[test]
fn output_lines_keep_empty_lines_and_a_line_without_end_is_cut_into_pieces() {
    crate::require_root!();
    // 200,000 bytes with no newline (a progress meter redrawn with \r), then ordinary lines.
    let (o, _d) = run_script(
        "#!/bin/bash\nhead -c 200000 /dev/zero | tr '\\0' x\nprintf '\\nafter\\n\\nlast'\n",
        &[],
    );
    assert!(o.success, "{:?}", o.tail);
    let n = o.tail.len();
    assert_eq!(
        &o.tail[n - 3..],
        ["after", "", "last"],
        "{:?}",
        &o.tail[n - 3..]
    );
    let pieces = &o.tail[..n - 3];
    assert!(pieces.len() >= 3, "{} pieces", pieces.len());
    assert!(
        pieces
            .iter()
            .all(|p| p.len() <= 64 * 1024 + 8192 && p.bytes().all(|b| b == b'x'))
    );
    assert_eq!(pieces.iter().map(String::len).sum::<usize>(), 200_000);
}

#[test]
fn a_hook_killed_by_a_signal_reports_the_signal() {
    crate::require_root!();
    let (o, _d) = run_script("#!/bin/bash\necho bye\nkill -TERM $$\n", &[]);
    assert!(!o.success);
    assert_eq!(o.signal, Some(libc::SIGTERM));
    assert_eq!(o.code, None);
}

#[test]
fn env_files_are_sourced_in_the_given_order_before_the_hook() {
    crate::require_root!();
    let (o, _d) = run_script(
        "#!/bin/bash\necho \"order=$ORDER\"\n",
        &[
            ("10-first", "export ORDER=\"${ORDER:-}a\"\n"),
            ("05-second", "export ORDER=\"${ORDER:-}b\"\n"),
        ],
    );
    assert!(o.success, "{:?}", o.tail);
    assert_eq!(o.tail, vec!["order=ab"]);
}

#[test]
fn a_failing_env_file_stops_before_the_hook() {
    crate::require_root!();
    let (o, d) = run_script(
        "#!/bin/bash\ntouch \"$0.ran\"\n",
        &[("10-fail", "echo about to fail\nexit 3\n")],
    );
    assert!(!o.success);
    assert_eq!(o.code, Some(3));
    assert_eq!(o.tail, vec!["about to fail"]);
    assert!(!d.path().join("root.d/50-test.ran").exists());
}

#[test]
fn an_env_file_using_an_unset_variable_fails_under_set_u() {
    crate::require_root!();
    let (o, _d) = run_script(
        "#!/bin/bash\necho hook ran\n",
        &[("10-unset", "export X=$STRATA_SURELY_UNSET_VARIABLE\n")],
    );
    assert!(!o.success);
    let out = o.tail.join("\n");
    assert!(
        out.contains("STRATA_SURELY_UNSET_VARIABLE: unbound variable"),
        "{out}"
    );
    assert!(!out.contains("hook ran"));
}

#[test]
fn a_host_hook_gets_exactly_the_given_environment() {
    crate::require_root!();
    let (o, _d) = run_script("#!/bin/bash\necho \"tmpdir=$TMPDIR\"\nenv | sort\n", &[]);
    assert!(o.success, "{:?}", o.tail);
    assert_eq!(o.tail[0], "tmpdir=/tmp");
    let names: Vec<&str> = o.tail[1..]
        .iter()
        .filter_map(|l| l.split('=').next())
        .filter(|n| !["PWD", "SHLVL", "_", "OLDPWD"].contains(n))
        .collect();
    assert_eq!(names, vec!["LC_ALL", "PATH", "TMPDIR"]);
}

#[test]
fn debug_trace_shows_the_sourced_env_files() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("root.d/50-test");
    write_exec(&hook, "#!/bin/bash\necho hook\n");
    let env_file = dir.path().join("environment.d/10-x");
    std::fs::create_dir_all(env_file.parent().unwrap()).unwrap();
    std::fs::write(&env_file, "export TRACED=1\n").unwrap();
    let mut run = host_run(&hook, vec![env_file]);
    run.env.insert("DIB_DEBUG_TRACE".into(), "1".into());
    let o = run_hook(&run, &quiet_reporter()).unwrap();
    assert!(o.success);
    assert!(
        o.tail.iter().any(|l| l.contains("export TRACED=1")),
        "{:?}",
        o.tail
    );
    assert!(!o.tail.iter().any(|l| l.contains("set +x")), "{:?}", o.tail);
}

#[test]
fn output_lines_are_prefixed_and_appended_to_the_log() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("build.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let hook = dir.path().join("root.d/50-test");
    write_exec(&hook, "#!/bin/bash\necho hello\necho world >&2\n");
    let reporter = Reporter::new(Some(&log), true, Mode::Plain).unwrap();
    reporter.println("status message");
    let o = run_hook(&host_run(&hook, vec![]), &reporter).unwrap();
    assert!(o.success);
    drop(reporter);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "earlier line");
    assert!(lines[1].ends_with(" status message"));
    assert!(lines[2].ends_with(" [root.d/50-test] hello"), "{text}");
    assert!(lines[3].ends_with(" [root.d/50-test] world"), "{text}");
    assert_eq!(lines.len(), 4);
}

#[test]
fn a_missing_hook_is_a_failed_outcome_not_a_crash() {
    crate::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let o = run_hook(
        &host_run(&dir.path().join("nope"), vec![]),
        &quiet_reporter(),
    )
    .unwrap();
    assert!(!o.success);
    assert_eq!(o.code, Some(127));
}

#[test]
fn a_chroot_without_bash_runs_the_hook_through_sh() {
    crate::require_root!();
    private_ns();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    mkrootfs(&root);
    std::fs::remove_file(root.join("bin/bash")).unwrap();
    let hooks = dir.path().join("hooks");
    write_exec(
        &hooks.join("install.d/10-sh"),
        "#!/bin/sh\necho \"in chroot: $(cat /etc/passwd | head -n1) home=$HOME\"\n",
    );
    let env_file = hooks.join("environment.d/10-env");
    std::fs::create_dir_all(env_file.parent().unwrap()).unwrap();
    std::fs::write(&env_file, "export FROM_ENV=yes\n").unwrap();
    let mounts = ChrootMounts::mount(&root, &hooks).unwrap();
    let run = HookRun {
        phase: Phase::Install,
        hook: "10-sh",
        element: "fixture",
        script: PathBuf::from("/tmp/in_target.d/install.d/10-sh"),
        env_files: vec![PathBuf::from("/tmp/in_target.d/environment.d/10-env")],
        env: host_env(),
        chroot: Some(root.clone()),
    };
    let o = run_hook(&run, &quiet_reporter()).unwrap();
    mounts.unmount().unwrap();
    assert!(o.success, "{:?}", o.tail);
    assert_eq!(
        o.tail,
        vec!["in chroot: root:x:0:0:root:/root:/bin/sh home=/root"]
    );
}
