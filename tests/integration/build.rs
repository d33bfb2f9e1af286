//! `strata build` on the busybox fixture: every phase for real, the hook contract, caching,
//! reruns, failures, concurrency and kills.

use crate::harness::{BuildFixture, Manifest, signal_when, steps_then, strata};
use nix::sys::signal::Signal;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every step of a tree build of the fixture, in run order.
fn all_steps() -> Vec<&'static str> {
    steps_then(&[
        "pre-finalise.d/10-pre-finalise",
        "finalise.d/10-finalise",
        "cleanup.d/10-cleanup",
        "core/finalise-base",
    ])
}

/// Where a step stands in `all_steps()`.
fn step_index(label: &str) -> usize {
    all_steps()
        .iter()
        .position(|s| *s == label)
        .unwrap_or_else(|| panic!("{label} is not a fixture step"))
}

fn edit_hook(f: &BuildFixture, rel: &str, body: &str) {
    let p = f.elements().join(rel);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn cold_build_runs_every_hook_in_dib_order_and_writes_the_tar() {
    crate::require_root!();
    let f = BuildFixture::new();
    let m = f.build_ok(&[]);
    assert_eq!(m.ran(), all_steps());
    let tar = f.out("img.tar");
    for out in [&tar, &f.out("img.strata.json")] {
        let mode = fs::metadata(out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{} has mode {mode:o}", out.display());
    }
    let env = f
        .tar_member(&tar, "etc/fixture/install-env")
        .expect("install-env in tar");
    for want in [
        "HOME=/root",
        "TMPDIR=unset",
        "FIXTURE_APP=app-hello",
        "IMAGE_ELEMENT=fixture-os fixture-app",
        "LC_ALL=C",
        "TMP_MOUNT_PATH_SET=yes",
        "TARGET_ROOT=unset",
        "proc=yes",
        "sys=ro",
        "hooks=ro",
        "hooks-visible=yes",
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want:?} not in install-env:\n{env}"
        );
    }
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/extra-data").unwrap().trim(),
        "extra-data unset"
    );
    if fs::metadata("/etc/resolv.conf").is_ok() {
        let pf = f.tar_member(&tar, "etc/fixture/pre-finalise").unwrap();
        assert!(pf.contains("host-resolv=yes"), "{pf}");
    }
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/cleanup").unwrap().trim(),
        "cleanup target-root-set"
    );
    assert!(
        f.tar_member(&tar, "etc/fixture/post-root")
            .unwrap()
            .contains("unset")
    );
    // post-install.d removed a file install.d made.
    assert!(f.tar_member(&tar, "etc/fixture/middle").is_none());
    // dib's end-of-build clean-up: /tmp emptied, logs truncated, no in_target.d left behind.
    let list = f.tar_list(&tar);
    assert!(
        !list.iter().any(|p| p.starts_with("tmp/scratch-file")),
        "{list:?}"
    );
    assert!(!list.iter().any(|p| p.contains("in_target.d")), "{list:?}");
    assert_eq!(f.tar_member(&tar, "var/log/fixture.log").unwrap(), "");
}

#[test]
fn cache_mounts_keep_downloads_on_the_host_and_out_of_the_image() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let list = f.tar_list(&f.out("img.tar"));
    assert!(
        list.iter().any(|p| p == "var/cache/fixture-downloads/"),
        "{list:?}"
    );
    assert!(!list.iter().any(|p| p.contains("pkg.deb")), "{list:?}");
    let kept = f
        .path()
        .join("image-cache/strata-cache-mounts/fixture-")
        .to_string_lossy()
        .into_owned();
    let found: Vec<_> = walkdir::WalkDir::new(f.path().join("image-cache"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "pkg.deb")
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with(&kept), "{found:?}");
}

#[test]
fn identical_rerun_runs_nothing_and_writes_the_same_tar() {
    crate::require_root!();
    let f = BuildFixture::new();
    let first = f.build_ok(&[]);
    let second = f.build_ok(&[]);
    assert!(second.ran().is_empty(), "ran: {:?}", second.ran());
    assert_eq!(first.keys(), second.keys());
    assert_eq!(first.output_digest(), second.output_digest());
}

#[test]
fn a_deleted_or_altered_output_is_written_again_on_a_no_op_rerun() {
    crate::require_root!();
    let f = BuildFixture::new();
    let first = f.build_ok(&[]);
    let tar = f.out("img.tar");
    fs::remove_file(&tar).unwrap();
    let second = f.build_ok(&[]);
    assert!(second.ran().is_empty());
    assert_eq!(first.output_digest(), second.output_digest());
    assert_eq!(
        blake3::hash(&fs::read(&tar).unwrap()).to_hex().as_str(),
        first.output_digest()
    );
    // Same size, one byte different: found by the hash, rewritten from the cache.
    let mut bytes = fs::read(&tar).unwrap();
    bytes[1000] ^= 1;
    fs::write(&tar, bytes).unwrap();
    let third = f.build_ok(&[]);
    assert!(third.ran().is_empty());
    assert_eq!(
        blake3::hash(&fs::read(&tar).unwrap()).to_hex().as_str(),
        first.output_digest()
    );
}

#[test]
fn editing_the_last_install_hook_reruns_it_and_later_steps_only() {
    crate::require_root!();
    let f = BuildFixture::new();
    let first = f.build_ok(&[]);
    edit_hook(
        &f,
        "fixture-app/install.d/90-last",
        "#!/bin/bash\necho last-v2 > /etc/fixture/last\n",
    );
    let second = f.build_ok(&[]);
    let idx = step_index("install.d/90-last");
    assert_eq!(second.cached(), &all_steps()[..idx]);
    assert_eq!(second.ran(), &all_steps()[idx..]);
    assert_eq!(first.keys()[..idx], second.keys()[..idx]);
    let tar = f.out("img.tar");
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/last").unwrap().trim(),
        "last-v2"
    );
    // Everything restored from the cache is still there.
    assert!(f.tar_member(&tar, "etc/fixture/install-env").is_some());
    assert!(f.tar_member(&tar, "bin/busybox").is_some());
}

#[test]
fn editing_an_environment_file_reruns_everything() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    fs::write(
        f.elements()
            .join("fixture-app/environment.d/20-fixture-app.bash"),
        "export FIXTURE_APP=changed-${FIXTURE_GREETING}\n",
    )
    .unwrap();
    let second = f.build_ok(&[]);
    assert_eq!(second.ran(), all_steps());
    let env = f
        .tar_member(&f.out("img.tar"), "etc/fixture/install-env")
        .unwrap();
    assert!(env.contains("FIXTURE_APP=changed-hello"), "{env}");
}

#[test]
fn a_hook_added_to_an_install_type_folder_is_linked_and_run_on_the_next_build() {
    crate::require_root!();
    let f = BuildFixture::new();
    crate::harness::copy_tree(
        &crate::harness::repo().join("elements/install-types"),
        &f.elements().join("install-types"),
    );
    let typed = f
        .elements()
        .join("fixture-app/install.d/app-source-install");
    fs::create_dir_all(&typed).unwrap();
    f.build_ok(&["fixture-app", "install-types"]);
    fs::write(
        typed.join("30-new"),
        "#!/bin/sh\necho linked > /etc/fixture/linked-hook\n",
    )
    .unwrap();
    fs::set_permissions(typed.join("30-new"), fs::Permissions::from_mode(0o755)).unwrap();
    let m = f.build_ok(&["fixture-app", "install-types"]);
    assert!(
        m.ran().contains(&"install.d/30-new".to_string()),
        "{:?}",
        m.ran()
    );
    assert_eq!(
        f.tar_member(&f.out("img.tar"), "etc/fixture/linked-hook")
            .as_deref(),
        Some("linked\n")
    );
}

#[test]
fn checksum_covers_tree_outputs_too() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.run_ok(&mut f.build_cmd_typed("img", "tar,tgz", &["--checksum"]));
    for t in ["tar", "tgz"] {
        for (tool, ext) in [("md5sum", "md5"), ("sha256sum", "sha256")] {
            let out = Command::new(tool)
                .arg("-c")
                .arg(f.out(&format!("img.{t}.{ext}")))
                .current_dir(f.path().join("out"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{tool} -c img.{t}.{ext}");
        }
    }
}

#[test]
fn a_dib_variable_is_part_of_the_key() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    f.run_ok(f.build_cmd(&[]).env("DIB_FIXTURE_GREETING", "bonjour"));
    assert_eq!(f.manifest().ran(), all_steps());
    let env = f
        .tar_member(&f.out("img.tar"), "etc/fixture/install-env")
        .unwrap();
    assert!(env.contains("FIXTURE_APP=app-bonjour"), "{env}");
}

#[test]
fn phase_granularity_caches_one_step_per_phase() {
    crate::require_root!();
    let f = BuildFixture::new();
    let m = f.build_ok(&["--granularity", "phase"]);
    assert!(
        m.ran().contains(&"install.d/*".to_string()),
        "{:?}",
        m.ran()
    );
    assert_eq!(m.ran().len(), 10, "{:?}", m.ran());
    edit_hook(
        &f,
        "fixture-app/install.d/90-last",
        "#!/bin/bash\necho v3 > /etc/fixture/last\n",
    );
    let m2 = f.build_ok(&["--granularity", "phase"]);
    assert_eq!(
        m2.cached(),
        ["root.d/*", "extra-data.d/*", "pre-install.d/*"]
    );
}

#[test]
fn a_failing_hook_names_itself_and_a_fixed_rerun_resumes_there() {
    crate::require_root!();
    let f = BuildFixture::new();
    edit_hook(
        &f,
        "fixture-app/install.d/20-middle",
        "#!/bin/bash\necho 'about to fail'\necho 'to stderr' >&2\nexit 7\n",
    );
    let out = f.build(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(line.contains("install.d/20-middle"), "{err}");
    assert!(line.contains("fixture-app"), "{err}");
    assert!(line.contains("exit status 7"), "{err}");
    assert!(
        err.contains("about to fail") && err.contains("to stderr"),
        "{err}"
    );
    assert!(!f.out("img.tar").exists());

    edit_hook(
        &f,
        "fixture-app/install.d/20-middle",
        "#!/bin/bash\necho fixed > /etc/fixture/middle\n",
    );
    let m = f.build_ok(&[]);
    let idx = step_index("install.d/20-middle");
    assert_eq!(m.cached(), &all_steps()[..idx]);
}

#[test]
fn rebuild_from_and_no_cache_force_reruns() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let m = f.build_ok(&["--rebuild-from", "post-install.d"]);
    let idx = step_index("post-install.d/10-post-install");
    assert_eq!(m.ran(), &all_steps()[idx..]);
    let m = f.build_ok(&["--no-cache"]);
    assert_eq!(m.ran(), all_steps());
}

#[test]
fn two_builds_at_once_share_one_cache() {
    crate::require_root!();
    let f = BuildFixture::new();
    // Same image name (it is part of the keys), different output folders.
    fs::create_dir_all(f.out("a")).unwrap();
    fs::create_dir_all(f.out("b")).unwrap();
    let spawn = |name: &str| {
        f.build_cmd_as(name, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a/img"), spawn("b/img"));
    let (ra, rb) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for (name, r) in [("a", &ra), ("b", &rb)] {
        assert!(
            r.status.success(),
            "build {name} failed ({}): {}",
            r.status,
            String::from_utf8_lossy(&r.stderr)
        );
    }
    f.assert_no_leftovers();
    let m = f.build_ok(&[]);
    assert!(
        m.ran().is_empty(),
        "after two concurrent builds, ran: {:?}",
        m.ran()
    );
    f.run_ok(
        strata()
            .arg("cache")
            .arg("verify")
            .arg("--cache-dir")
            .arg(f.cache()),
    );
}

#[test]
fn sigkill_mid_step_leaves_no_mount_or_process_and_a_rerun_resumes() {
    crate::require_root!();
    let f = BuildFixture::new();
    let hold = f.path().join("tmp/hold");
    fs::write(&hold, "").unwrap();
    let mut child = f
        .build_cmd(&[])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Wait until the hold hook runs (its build folder is then mounted), then kill strata.
    let started = Instant::now();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if String::from_utf8_lossy(&buf).contains("holding") {
                        break;
                    }
                }
            }
        }
        buf
    });
    let seen = reader.join().unwrap();
    assert!(
        String::from_utf8_lossy(&seen).contains("holding"),
        "hold hook never ran"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // The hook, its `sleep 300` and the namespace go with strata; a rerun resumes there. The
    // sleep is named after this fixture's hold file: tests beside this one hold builds too.
    let sleep = format!("fixture-hold-sleep {}", hold.display());
    f.assert_killed_build_left_nothing(&sleep, &hold);
    let m = f.build_ok(&[]);
    let idx = step_index("post-root.d/10-post-root");
    assert_eq!(m.cached(), &all_steps()[..idx]);
}

#[test]
fn sigint_while_a_layer_is_packed_stops_the_packing_and_records_nothing_of_it() {
    crate::require_root!();
    let f = BuildFixture::new();
    let bulk = [("DIB_FIXTURE_BULK_MB", "128")];
    // install.d/50-bulk's layer is being packed once a blob temp file in the cache grows past
    // what any other step packs (random bytes: the blob is as large as the tar so far).
    let packing = || {
        fs::read_dir(f.cache().join("tmp")).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("blob-")
                    && e.metadata().is_ok_and(|m| m.len() > 16 << 20)
            })
        })
    };
    let mut cmd = f.build_cmd(&["fixture-bulk"]);
    cmd.envs(bulk);
    let (status, stderr) = signal_when(&mut cmd, packing, Signal::SIGINT);
    assert_eq!(status.code(), Some(130), "{stderr}");
    f.assert_no_leftovers();
    // The packing stopped: the step was not recorded (it would have been had packing gone on
    // to the end before the build looked at the signal).
    let db = rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let recorded: i64 = db
        .query_row(
            "SELECT count(*) FROM steps WHERE phase = 'install.d' AND hook = '50-bulk'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recorded, 0, "{stderr}");
    drop(db);
    let m = f.build_ok_with(&["fixture-bulk"], &bulk);
    assert_eq!(m.ran()[0], "install.d/50-bulk");
}

#[test]
fn sigint_and_sigterm_while_the_tar_is_written_stop_the_build_with_130_and_143() {
    crate::require_root!();
    let f = BuildFixture::new();
    // 160 MiB of random bytes in the tree: writing the tar (and its cache copy) takes a while.
    let bulk = [("DIB_FIXTURE_BULK_MB", "160")];
    for (signal, code, name) in [
        (Signal::SIGINT, 130, "SIGINT"),
        (Signal::SIGTERM, 143, "SIGTERM"),
    ] {
        let mut cmd = f.build_cmd(&["fixture-bulk"]);
        cmd.envs(bulk);
        // The tar is being written once its temp file beside out/img.tar exists.
        let (status, stderr) = signal_when(&mut cmd, || !f.partial_outputs().is_empty(), signal);
        assert_eq!(status.code(), Some(code), "{name}:\n{stderr}");
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "{stderr}");
        assert!(
            error[0].contains(&format!("cancelled by {name}")),
            "{stderr}"
        );
        assert!(!f.out("img.tar").exists(), "{name}: a tar was left");
        assert!(!f.out("img.strata.json").exists());
        f.assert_no_leftovers();
    }
    // Every step was kept before the outputs: the next build only writes the tar.
    let m = f.build_ok_with(&["fixture-bulk"], &bulk);
    assert!(m.ran().is_empty(), "{:?}", m.ran());
    assert!(f.out("img.tar").exists());
}

#[test]
fn a_build_removes_what_dead_builds_left_and_never_a_live_builds_files() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    // What builds killed mid-way leave: a build folder with a tree in it, a partial output,
    // a cache temp file. Nobody holds their locks.
    let dead_dir = f.path().join("tmp/strata_build.deadbeef");
    fs::create_dir_all(dead_dir.join("mnt/etc")).unwrap();
    fs::write(dead_dir.join("mnt/etc/hostname"), "left").unwrap();
    let dead_out = f.out(".strata-out.dead01");
    fs::write(&dead_out, vec![0u8; 4096]).unwrap();
    let dead_blob = f.cache().join("tmp/blob-dead01");
    fs::write(&dead_blob, "partial").unwrap();
    // The same, held by live writers (this test's own locks stand for a build in another
    // container sharing the folders; flock does not care about pids or namespaces).
    let live_dir = f.path().join("tmp/strata_build.livebeef");
    fs::create_dir(&live_dir).unwrap();
    let live_out = f.out(".strata-out.live01");
    let live_blob = f.cache().join("tmp/blob-live01");
    fs::write(&live_out, "writing").unwrap();
    fs::write(&live_blob, "writing").unwrap();
    let locks: Vec<fs::File> = [&live_dir, &live_out, &live_blob]
        .iter()
        .map(|p| {
            let l = fs::File::open(p).unwrap();
            l.lock().unwrap();
            l
        })
        .collect();
    // And a real build, holding in post-root.d (its folder is a tmpfs in its own namespace).
    let hold = f.path().join("tmp/hold");
    fs::write(&hold, "").unwrap();
    let mut running = f
        .build_cmd_as("a", &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = running.stderr.take().unwrap();
    let seen = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("holding") {
                break;
            }
        }
        (buf, stderr)
    });
    let (buf, stderr) = seen.join().unwrap();
    assert!(String::from_utf8_lossy(&buf).contains("holding"));
    let running_dirs: Vec<_> = fs::read_dir(f.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| *p != dead_dir && *p != live_dir && *p != hold)
        .collect();
    assert_eq!(running_dirs.len(), 1, "{running_dirs:?}");

    // Another build starts (same TMP_DIR, output folder and cache) and cleans up.
    let out = f.build_cmd_as("b", &["fixture-os"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gone in [&dead_dir, &dead_out, &dead_blob] {
        assert!(!gone.exists(), "{} was not removed", gone.display());
    }
    for kept in [&live_dir, &live_out, &live_blob, &running_dirs[0]] {
        assert!(kept.exists(), "{} (live) was removed", kept.display());
    }
    // The running build is unharmed: it finishes.
    fs::remove_file(&hold).unwrap();
    let rest = std::thread::spawn(move || {
        use std::io::Read;
        let mut stderr = stderr;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = running.wait().unwrap();
    let text = rest.join().unwrap();
    assert!(status.success(), "{text}");
    assert!(f.out("a.tar").exists());
    drop(locks);
    for p in [&live_out, &live_blob] {
        fs::remove_file(p).unwrap();
    }
    fs::remove_dir(&live_dir).unwrap();
    f.assert_no_leftovers();
}

#[test]
fn cache_gc_removes_what_dead_builds_left_and_never_a_live_builds_files() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let dead_dir = f.path().join("tmp/strata_build.dead0001");
    fs::create_dir_all(dead_dir.join("mnt")).unwrap();
    let dead_blob = f.cache().join("tmp/blob-dead0001");
    fs::write(&dead_blob, "partial").unwrap();
    let live_dir = f.path().join("tmp/strata_build.live0001");
    fs::create_dir(&live_dir).unwrap();
    let live_blob = f.cache().join("tmp/blob-live0001");
    fs::write(&live_blob, "writing").unwrap();
    let locks: Vec<fs::File> = [&live_dir, &live_blob]
        .iter()
        .map(|p| {
            let l = fs::File::open(p).unwrap();
            l.lock().unwrap();
            l
        })
        .collect();
    let out = strata()
        .args(["cache", "gc", "--max-size", "10G", "--cache-dir"])
        .arg(f.cache())
        .env("TMP_DIR", f.path().join("tmp"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 temp files, 1 build folders of dead builds"),
        "{text}"
    );
    assert!(!dead_dir.exists() && !dead_blob.exists());
    assert!(live_dir.exists() && live_blob.exists());
    drop(locks);
    fs::remove_dir(&live_dir).unwrap();
    fs::remove_file(&live_blob).unwrap();
    f.assert_no_leftovers();
}

// ---- hostile layers stored under their correct hashes -------------------------------------

/// One tar entry of a hand-made (hostile) layer; names are written raw into the header.
enum Ent<'a> {
    File(&'a [u8], &'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
    /// A GNU sparse file whose map lists (offset, length) segments out of order.
    BadSparse(&'a [u8]),
}

fn hostile_tar(entries: &[Ent<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        let (name, link, data): (&[u8], Option<&[u8]>, Vec<u8>) = match e {
            Ent::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (n, None, d.to_vec())
            }
            Ent::Symlink(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                (n, Some(t), Vec::new())
            }
            Ent::Hardlink(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                (n, Some(t), Vec::new())
            }
            Ent::BadSparse(n) => {
                h.set_entry_type(tar::EntryType::GNUSparse);
                h.set_size(20);
                let g = h.as_gnu_mut().unwrap();
                g.set_real_size(8192);
                g.sparse[0].set_offset(4096);
                g.sparse[0].set_length(10);
                g.sparse[1].set_offset(0);
                g.sparse[1].set_length(10);
                (n, None, vec![b'x'; 20])
            }
        };
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Replaces the rootfs layer of the cached step `phase/hook` by `tar`, stored the way strata
/// stores layers: the blob (zstd) under the blake3 of its bytes, the layer row under the blake3
/// of the tar (its diff id), the step naming that diff id. Every hash matches: only parsing the
/// layer shows what it is.
fn plant_layer(f: &BuildFixture, phase: &str, hook: &str, tar: &[u8]) {
    let blob = zstd::encode_all(tar, 3).unwrap();
    let digest = blake3::hash(&blob).to_hex().to_string();
    let diff_id = blake3::hash(tar).to_hex().to_string();
    let dir = f.cache().join("blobs/blake3").join(&digest[..2]);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&digest), &blob).unwrap();
    let db = rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let old: String = db
        .query_row(
            "SELECT layer FROM steps WHERE phase = ?1 AND hook = ?2",
            [phase, hook],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "INSERT OR REPLACE INTO layers (diff_id, blob, size, blob_size) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![diff_id, digest, tar.len() as i64, blob.len() as i64],
    )
    .unwrap();
    db.execute(
        "UPDATE steps SET layer = ?1 WHERE layer = ?2",
        rusqlite::params![diff_id, old],
    )
    .unwrap();
}

#[test]
fn a_hostile_layer_in_the_cache_is_dropped_rebuilt_and_found_by_verify() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let outside = f.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("sentinel"), "intact").unwrap();
    let abs = outside.join("pwned-abs");
    let abs_name = abs.as_os_str().as_encoded_bytes().to_vec();
    let out_name = outside.as_os_str().as_encoded_bytes().to_vec();
    let kinds: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute path",
            hostile_tar(&[Ent::File(&abs_name, b"pwned")]),
        ),
        (
            "`..`",
            hostile_tar(&[Ent::File(
                b"etc/../../../../../../../../tmp/strata-pwned",
                b"x",
            )]),
        ),
        (
            "write through a symlink",
            hostile_tar(&[
                Ent::Symlink(b"etc/fixture/out", &out_name),
                Ent::File(b"etc/fixture/out/sentinel", b"pwned"),
            ]),
        ),
        (
            "hardlink out of the tree",
            hostile_tar(&[Ent::Hardlink(
                b"etc/fixture/h",
                b"../../../../../../etc/passwd",
            )]),
        ),
        (
            "whiteout of `..`",
            hostile_tar(&[Ent::File(b"etc/.wh..", b"")]),
        ),
        (
            "malformed sparse entry",
            hostile_tar(&[Ent::BadSparse(b"etc/fixture/sparse")]),
        ),
    ];
    let ran_again = |m: &Manifest| m.ran().contains(&"install.d/20-middle".to_string());
    for (round, (kind, tar)) in kinds.iter().enumerate() {
        // The next build: a later hook changed, so the cached tree is restored and the
        // planted layer of install.d/20-middle applied: refused, dropped, built again.
        plant_layer(&f, "install.d", "20-middle", tar);
        edit_hook(
            &f,
            "fixture-app/install.d/90-last",
            &format!("#!/bin/bash\necho last-round{round} > /etc/fixture/last\n"),
        );
        let out = f.build_cmd(&[]).output().unwrap();
        f.assert_no_leftovers();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kind}: {stderr}");
        assert!(
            stderr.contains("install.d/20-middle") && stderr.contains("was refused"),
            "{kind}: no warning:\n{stderr}"
        );
        let m = f.manifest();
        assert!(ran_again(&m), "{kind}: {:?}", m.ran());
        assert_eq!(
            fs::read_to_string(outside.join("sentinel")).unwrap(),
            "intact"
        );
        assert!(!abs.exists() && !Path::new("/tmp/strata-pwned").exists());
        // A rerun finds the rebuilt step.
        assert!(f.build_ok(&[]).ran().is_empty(), "{kind}");

        // `cache verify` parses every layer: it finds the same layer planted again, drops it
        // with its step and the steps after it, and fails.
        plant_layer(&f, "install.d", "20-middle", tar);
        let out = strata()
            .args(["cache", "verify", "--cache-dir"])
            .arg(f.cache())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{kind}: {stdout}{stderr}");
        assert!(stdout.contains("refused layer"), "{kind}: {stdout}");
        assert!(stdout.contains("1 refused"), "{kind}: {stdout}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        // Clean now; the next build runs the dropped steps again.
        let again = strata()
            .args(["cache", "verify", "--cache-dir"])
            .arg(f.cache())
            .output()
            .unwrap();
        assert!(
            again.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&again.stdout)
        );
        let m = f.build_ok(&[]);
        assert!(ran_again(&m), "{kind}: {:?}", m.ran());
    }
}

#[test]
fn a_damaged_index_fails_verify_and_builds_refuse_it_in_one_line() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let before = blake3_file(&f.out("img.tar"));
    // Random bytes over a b-tree page of the index (its 8-byte page header kept), as a
    // misbehaving disk or program would leave it.
    let index = f.cache().join("index.sqlite");
    let mut bytes = fs::read(&index).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in &mut bytes[4096 + 8..8192] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    fs::write(&index, bytes).unwrap();
    let one_error = |stderr: &str| {
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(
            errors[0].contains(&format!("{} is damaged", index.display()))
                && errors[0].contains("move it aside"),
            "{stderr}"
        );
    };
    let out = strata()
        .args(["cache", "verify", "--cache-dir"])
        .arg(f.cache())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    one_error(&String::from_utf8_lossy(&out.stderr));
    // A build refuses it before any hook runs, and writes nothing.
    edit_hook(
        &f,
        "fixture-app/install.d/90-last",
        "#!/bin/bash\necho changed > /etc/fixture/last\n",
    );
    let damaged = blake3_file(&index);
    let out = f.build(&[]);
    assert_eq!(out.status.code(), Some(4));
    one_error(&String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("[root.d/"));
    assert_eq!(blake3_file(&index), damaged, "the build wrote into it");
    assert_eq!(blake3_file(&f.out("img.tar")), before);
    // The documented way out: move it aside; the next build starts a fresh index.
    fs::rename(&index, f.cache().join("index.sqlite.bad")).unwrap();
    let m = f.build_ok(&[]);
    assert_eq!(m.ran().len(), all_steps().len());
}

/// What a build could change in the cache: every step's and output's use, the build history
/// and the blob files.
fn cache_state(f: &BuildFixture) -> String {
    let db = rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let mut stmt = db.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let mut state = rows("SELECT key || ' ' || last_used || ' ' || hits FROM steps ORDER BY key");
    state.extend(rows(
        "SELECT key || ' ' || last_used FROM outputs ORDER BY key",
    ));
    state.extend(rows("SELECT count(*) || ' builds' FROM builds"));
    let mut blobs: Vec<String> = walkdir::WalkDir::new(f.cache().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.path().display().to_string())
        .collect();
    blobs.sort();
    state.extend(blobs);
    state.join("\n")
}

#[test]
fn bad_options_are_refused_before_anything_runs_naming_the_valid_choices() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let before = cache_state(&f);
    let el = crate::harness::repo()
        .join("elements")
        .display()
        .to_string();
    let disk = [
        "-t",
        "raw",
        "--element-path",
        el.as_str(),
        "fixture-disk",
        "block-device-mbr",
    ];
    let bad_config = "- local_loop:\n    name: image0\n- partitioning:\n    base: image0\n    label: amiga\n    partitions: []\n";
    // (arguments, environment, what the one error line must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec!["-a", "nosucharch"],
            vec![],
            vec!["nosucharch", "amd64", "arm64", "x86_64", "aarch64"],
        ),
        (
            vec!["--rebuild-from", "install.d/99-nope"],
            vec![],
            vec!["install.d/99-nope", "10-record-env", "20-middle", "90-last"],
        ),
        (
            vec!["-t", "tar,,raw"],
            vec![],
            vec!["tar,,raw", "qcow2", "raw", "tgz"],
        ),
        (
            vec!["-t", "tar,zip"],
            vec![],
            vec!["tar,zip", "'zip'", "squashfs"],
        ),
        (
            disk.to_vec(),
            vec![("DIB_IMAGE_SIZE", "-1")],
            vec!["DIB_IMAGE_SIZE=-1"],
        ),
        (
            disk.to_vec(),
            vec![("DIB_IMAGE_SIZE", "inf")],
            vec!["DIB_IMAGE_SIZE=inf"],
        ),
        (
            disk.to_vec(),
            vec![("DIB_IMAGE_SIZE", "nan")],
            vec!["DIB_IMAGE_SIZE=nan"],
        ),
        (
            disk.to_vec(),
            vec![("DIB_IMAGE_SIZE", "1e30")],
            vec!["DIB_IMAGE_SIZE=1e30"],
        ),
        (
            disk.to_vec(),
            vec![("DIB_BLOCK_DEVICE_CONFIG", bad_config)],
            vec!["DIB_BLOCK_DEVICE_CONFIG", "'mbr' or 'gpt'"],
        ),
    ];
    for (args, env, names) in &cases {
        let mut cmd = f.build_cmd(args);
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?} {env:?}: {stderr}");
        for name in names {
            assert!(
                errors[0].contains(name),
                "{args:?} {env:?}: {name} not in {}",
                errors[0]
            );
        }
        // Nothing ran: no hook printed, no build folder was made, the cache is as it was.
        assert!(
            !stderr.contains("[root.d/"),
            "{args:?}: a hook ran:\n{stderr}"
        );
        f.assert_no_leftovers();
        assert_eq!(
            cache_state(&f),
            before,
            "{args:?} {env:?} changed the cache"
        );
    }
    // `cache rm` with an empty or too short prefix removes nothing.
    for prefix in ["", "a", "abcde", "zzzzzzzz"] {
        let out = strata()
            .args(["cache", "rm", prefix, "--cache-dir"])
            .arg(f.cache())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rm {prefix:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "rm {prefix:?}: {stderr}");
        assert!(
            stderr.contains("strata cache ls"),
            "rm {prefix:?}: {stderr}"
        );
        assert_eq!(cache_state(&f), before, "rm {prefix:?} changed the cache");
    }
}

/// `cmd` run with a 1 MiB tmpfs mounted on `dir` (in a mount namespace of its own, gone when
/// it ends).
fn with_tiny_folder(dir: &Path, cmd: &Command) -> std::process::Output {
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o size=1m tmpfs \"$1\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(dir)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.output().unwrap()
}

#[test]
fn a_full_output_folder_is_reported_as_such() {
    crate::require_root!();
    let f = BuildFixture::new();
    let full = f.out("full");
    fs::create_dir(&full).unwrap();
    let el = crate::harness::repo()
        .join("elements")
        .display()
        .to_string();
    for (types, extra, file) in [
        ("tar", vec![], "img.tar"),
        ("tgz", vec![], "img.tgz"),
        (
            "raw",
            vec![
                "--element-path",
                el.as_str(),
                "fixture-disk",
                "block-device-mbr",
            ],
            "img.raw",
        ),
        (
            "qcow2",
            vec![
                "--element-path",
                el.as_str(),
                "fixture-disk",
                "block-device-mbr",
            ],
            "img.qcow2",
        ),
    ] {
        let cmd = f.build_cmd_typed("full/img", types, &extra);
        let out = with_tiny_folder(&full, &cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{types}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{types}: {stderr}");
        assert!(
            errors[0].contains(&full.join(file).display().to_string())
                && errors[0].contains(&format!("{} is full", full.display())),
            "{types}: {}",
            errors[0]
        );
        assert!(!errors[0].contains("layer stream"), "{}", errors[0]);
        f.assert_no_leftovers();
    }
}

#[test]
fn cache_ls_du_and_explain_work_on_a_read_only_cache_folder() {
    crate::require_root!();
    let f = BuildFixture::new();
    let m = f.build_ok(&[]);
    let key = &m.keys()[0];
    let cache = f.cache().display().to_string();
    // Root ignores file modes: a read-only bind mount makes the folder really read-only.
    let read_only = |args: &str| {
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && \
                 touch {cache}/probe 2>/dev/null && exit 99; exec \"$0\" cache {args} --cache-dir {cache}"
            ))
            .arg(env!("CARGO_BIN_EXE_strata"))
            .output()
            .unwrap()
    };
    for args in [
        "ls".to_string(),
        "ls --json".to_string(),
        "du".to_string(),
        "du --json".to_string(),
        format!("explain {}", &key[..12]),
    ] {
        let out = read_only(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "cache {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "cache {args}");
    }
    let out = read_only("ls");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&key[..16]));
    // Maintenance needs to write: it fails in one line, naming the folder.
    let out = read_only("gc --max-size 1G");
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn printing_commands_end_quietly_on_a_closed_pipe() {
    crate::require_root!();
    let f = BuildFixture::new();
    let m = f.build_ok(&[]);
    let key = m.keys()[0].clone();
    let cache = f.cache();
    let cache_args = |args: &[&str]| {
        let mut c = strata();
        c.arg("cache").args(args).arg("--cache-dir").arg(&cache);
        c
    };
    let mut plan = f.build_cmd(&[]);
    let plan_args: Vec<_> = plan.get_args().skip(1).map(|a| a.to_owned()).collect();
    plan = strata();
    plan.arg("plan")
        .args(&plan_args)
        .env("TMP_DIR", f.path().join("tmp"));
    let mut elements = strata();
    elements
        .args(["elements", "--hooks", "-n", "--element-path"])
        .arg(f.elements())
        .arg("fixture-app")
        .env("STRATA_ELEMENTS_DIR", f.path().join("no-builtin-elements"));
    let mut commands = vec![
        cache_args(&["ls"]),
        cache_args(&["ls", "--json"]),
        cache_args(&["du"]),
        cache_args(&["du", "--json"]),
        cache_args(&["explain", &key[..12]]),
        cache_args(&["verify"]),
        plan,
        elements,
    ];
    for cmd in &mut commands {
        // A reader that has gone away before anything is written (as `| head` after its lines).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = cmd
            .stdout(std::process::Stdio::from(writer))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{cmd:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{cmd:?}: {stderr}");
    }
}

/// Reads `child`'s stderr on a thread until a line contains `want`; the rest is read (and
/// returned) when the child ends.
fn watch_stderr(
    child: &mut std::process::Child,
    want: &'static str,
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<String>,
) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(want) {
                let _ = tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    (rx, handle)
}

#[test]
fn a_waiting_gc_goes_before_builds_started_after_it() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&["fixture-os"]);
    // A running build, held in post-root.d.
    let hold = f.path().join("tmp/hold");
    fs::write(&hold, "").unwrap();
    let mut running = f
        .build_cmd_as("a", &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (holding, running_err) = watch_stderr(&mut running, "holding");
    holding.recv().unwrap();
    // gc waits for it, and says so.
    let mut gc = strata()
        .args(["cache", "gc", "--max-size", "10G", "--cache-dir"])
        .arg(f.cache())
        .env("TMP_DIR", f.path().join("tmp"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (gc_waits, gc_err) = watch_stderr(&mut gc, "waiting for the cache lock");
    gc_waits.recv().unwrap();
    // A build started now waits behind the gc, although the running build holds only a
    // shared lock it could share (builds arriving one after another used to starve gc).
    let mut later = f
        .build_cmd_as("b", &["fixture-os"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (later_waits, later_err) = watch_stderr(&mut later, "gc/verify/rm");
    later_waits.recv().unwrap();
    assert!(later.try_wait().unwrap().is_none());
    assert!(gc.try_wait().unwrap().is_none());
    // The running build ends; gc runs; then the later build.
    fs::remove_file(&hold).unwrap();
    assert!(
        running.wait().unwrap().success(),
        "{}",
        running_err.join().unwrap()
    );
    assert!(gc.wait().unwrap().success(), "{}", gc_err.join().unwrap());
    let status = later.wait().unwrap();
    assert!(status.success(), "{}", later_err.join().unwrap());
    f.assert_no_leftovers();
}

/// Flips the middle byte of every file in the fixture's blob folder (sizes stay); returns them.
fn flip_a_byte_in_every_blob(f: &BuildFixture) -> Vec<std::path::PathBuf> {
    let blobs: Vec<_> = walkdir::WalkDir::new(f.cache().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect();
    for victim in &blobs {
        let mut bytes = fs::read(victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::set_permissions(victim, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(victim, bytes).unwrap();
    }
    blobs
}

#[test]
fn a_flipped_byte_in_a_blob_is_detected_dropped_and_rebuilt() {
    crate::require_root!();
    // SOURCE_DATE_EPOCH makes the fixture reproducible, so a rebuild must give the same bytes.
    let sde = [("SOURCE_DATE_EPOCH", "1700000000")];
    let f = BuildFixture::new();
    let first = f.build_ok_with(&[], &sde);
    // Flip one byte in every blob: the layers and the cached tar output.
    let blobs = flip_a_byte_in_every_blob(&f);
    assert!(blobs.len() > 3, "{blobs:?}");
    let out = f.build_cmd(&[]).envs(sde).output().unwrap();
    f.assert_no_leftovers();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("corrupt"),
        "no warning about the corrupt blobs:\n{err}"
    );
    let second = f.manifest();
    assert_eq!(second.ran()[0], "root.d/10-busybox-rootfs");
    assert_eq!(first.keys(), second.keys());
    // Rebuilt layers have the same diff ids and the output the same bytes; the cache is whole.
    assert_eq!(first.diff_ids(), second.diff_ids());
    assert_eq!(first.output_digest(), second.output_digest());
    let third = f.build_ok_with(&[], &sde);
    assert!(third.ran().is_empty(), "{:?}", third.ran());
    assert_eq!(first.output_digest(), third.output_digest());
}

#[test]
fn a_damaged_cached_output_is_written_again_from_the_layers() {
    crate::require_root!();
    let f = BuildFixture::new();
    let first = f.build_ok(&[]);
    let outputs = strata()
        .args(["cache", "ls", "--json", "--cache-dir"])
        .arg(f.cache())
        .output()
        .unwrap();
    assert!(outputs.status.success());
    // The output blob is the one no step names: find it as the blob not among the layers.
    let layers: Vec<String> = walkdir::WalkDir::new(f.cache().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    let db = rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let blob: String = db
        .query_row("SELECT blob FROM outputs", [], |r| r.get(0))
        .unwrap();
    drop(db);
    let victim = layers.iter().find(|p| p.ends_with(&blob)).unwrap();
    let mut bytes = fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::set_permissions(victim, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(victim, bytes).unwrap();
    let second = f.build_ok(&[]);
    assert!(second.ran().is_empty(), "{:?}", second.ran());
    assert_eq!(first.output_digest(), second.output_digest());
    let again = f.build_ok(&[]);
    assert_eq!(first.output_digest(), again.output_digest());
}

#[test]
fn plan_lists_steps_with_keys_and_cache_state() {
    crate::require_root!();
    let f = BuildFixture::new();
    let before = f.plan(&[]);
    let rows = before.as_array().unwrap();
    assert_eq!(rows.len(), all_steps().len());
    assert!(
        rows.iter()
            .all(|r| r["cached"] == false && r["key"].as_str().unwrap().len() == 64)
    );
    let m = f.build_ok(&[]);
    let after = f.plan(&[]);
    let keys: Vec<_> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, m.keys());
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["cached"] == true)
    );
}

#[test]
fn plan_reports_a_corrupt_layer_as_a_miss_and_changes_nothing() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let blobs = flip_a_byte_in_every_blob(&f);
    let ls = || {
        let out = strata()
            .args(["cache", "ls", "--json", "--cache-dir"])
            .arg(f.cache())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = ls();
    let rows = f.plan(&[]);
    assert_eq!(rows[0]["cached"], false, "{rows}");
    // Nothing was dropped: the index and the (damaged) blobs are as they were.
    assert_eq!(ls(), listed);
    assert!(blobs.iter().all(|b| b.exists()));
    // A build repairs it.
    let out = f.build(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}

#[test]
fn plan_with_a_deleted_layer_blob_changes_nothing() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let db = || rusqlite::Connection::open(f.cache().join("index.sqlite")).unwrap();
    let count = |table: &str| -> i64 {
        db().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    let (steps, layers) = (count("steps"), count("layers"));
    // Delete the blob of the first step's layer.
    let blob: String = db()
        .query_row(
            "SELECT l.blob FROM steps s JOIN layers l ON l.diff_id = s.layer
             WHERE s.parent IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let path = f.cache().join("blobs/blake3").join(&blob[..2]).join(&blob);
    fs::remove_file(&path).unwrap();
    let rows = f.plan(&[]);
    assert_eq!(rows[0]["cached"], false, "{rows}");
    assert_eq!((count("steps"), count("layers")), (steps, layers));
}

#[test]
fn disk_only_options_do_not_change_the_rootfs_steps_keys() {
    crate::require_root!();
    let f = BuildFixture::new();
    let keys = |extra: &[&str], env: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut build = f.build_cmd_typed("img", "raw", extra);
        build.envs(env.iter().copied());
        f.plan_of(&build)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    format!(
                        "{}/{}",
                        r["phase"].as_str().unwrap(),
                        r["hook"].as_str().unwrap()
                    ),
                    r["key"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let plain = keys(&[], &[]);
    let disk_options = keys(
        &[
            "--image-size",
            "3",
            "--image-extra-size",
            "20",
            "--checksum",
            "--no-tmpfs",
        ],
        &[("DIB_CHECKSUM", "1")],
    );
    let (last, rootfs) = plain.split_last().unwrap();
    let (last2, rootfs2) = disk_options.split_last().unwrap();
    assert_eq!(
        rootfs, rootfs2,
        "a disk-only option changed a rootfs step's key"
    );
    assert_eq!(last.0, "output/disk");
    assert_ne!(
        last.1, last2.1,
        "the disk step's key must cover the disk size"
    );
    // --no-tmpfs changes where the tree lives, not what hooks see: no key at all. --checksum
    // (DIB_CHECKSUM, which disk hooks can read) changes the disk step's key only.
    assert_eq!(keys(&["--no-tmpfs"], &[]), plain);
    let sums = keys(&["--checksum"], &[]);
    assert_eq!(sums[..sums.len() - 1], plain[..plain.len() - 1]);
}

#[test]
fn a_failing_packages_step_reports_its_own_error_even_when_unmounting_fails() {
    crate::require_root!();
    let f = BuildFixture::new();
    let out = f.build(&["-p", "unmount-proc-and-fail"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        line.contains("packages (-p)") && line.contains("exit status 5"),
        "the hook's failure must win over the unmount error: {err}"
    );
}

#[test]
fn explain_names_the_changed_variable() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let out = f
        .build_cmd(&["--explain"])
        .env("DIB_FIXTURE_GREETING", "hi")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("explain root.d/10-busybox-rootfs")
                && l.contains("DIB_FIXTURE_GREETING")),
        "{err}"
    );
}

/// `strata plan --explain` (what a CI user runs to see why a build would miss): another `-o`
/// name changes IMAGE_NAME, which every hook sees, so the first step misses and is explained;
/// nothing is built.
#[test]
fn plan_explain_names_image_name_when_the_output_name_changes() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let renamed = f.build_cmd_as("other", &[]);
    let mut plan = strata();
    plan.arg("plan")
        .arg("--explain")
        .args(renamed.get_args().skip(1));
    for (k, v) in renamed.get_envs() {
        match v {
            Some(v) => plan.env(k, v),
            None => plan.env_remove(k),
        };
    }
    let out = f.run_ok(&mut plan);
    let err = String::from_utf8_lossy(&out.stderr);
    let explained: Vec<&str> = err.lines().filter(|l| l.starts_with("explain ")).collect();
    assert!(
        explained
            .iter()
            .all(|l| l.starts_with("explain root.d/10-busybox-rootfs")),
        "only the first miss is explained: {err}"
    );
    assert!(explained.iter().any(|l| l.contains("IMAGE_NAME")), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 cached"), "{text}");
    assert!(!f.out("other.tar").exists(), "plan built something");
}

#[test]
fn missing_element_is_one_line_and_status_2() {
    crate::require_root!();
    let f = BuildFixture::new();
    let out = f.build(&["fixture-nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("fixture-nope"), "{err}");
    assert!(
        !f.cache().join("blobs").exists()
            || fs::read_dir(f.cache().join("blobs")).unwrap().count() == 0
    );
}

#[test]
fn cache_ttl_treats_older_steps_as_misses() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let fresh = f.build_ok(&["--cache-ttl", "1h"]);
    assert!(fresh.ran().is_empty(), "{:?}", fresh.ran());
    std::thread::sleep(Duration::from_millis(2100));
    let stale = f.build_ok(&["--cache-ttl", "1s"]);
    assert_eq!(stale.ran(), all_steps());
}

#[test]
fn a_cache_inputs_host_file_is_part_of_the_key() {
    crate::require_root!();
    let f = BuildFixture::new();
    let host_file = f.path().join("host-input.conf");
    fs::write(&host_file, "v1").unwrap();
    fs::write(
        f.elements().join("fixture-app/cache-inputs"),
        format!("# read by extra-data.d\n{}\n", host_file.display()),
    )
    .unwrap();
    f.build_ok(&[]);
    assert!(f.build_ok(&[]).ran().is_empty());
    fs::write(&host_file, "v2").unwrap();
    assert_eq!(f.build_ok(&[]).ran(), all_steps());
}

#[test]
fn cache_commands_list_size_explain_remove_and_collect() {
    crate::require_root!();
    let f = BuildFixture::new();
    let first = f.build_ok(&[]);
    let cache = |args: &[&str]| {
        let out = strata()
            .arg("cache")
            .args(args)
            .arg("--cache-dir")
            .arg(f.cache())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cache {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ls: serde_json::Value = serde_json::from_str(&cache(&["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), all_steps().len());
    let du: serde_json::Value = serde_json::from_str(&cache(&["du", "--json"])).unwrap();
    assert!(du["blob_bytes"].as_u64().unwrap() > 0);

    // Explain the install.d/90-last step after an edit: it names the hook that changed.
    edit_hook(
        &f,
        "fixture-app/install.d/90-last",
        "#!/bin/bash\necho v9 > /etc/fixture/last\n",
    );
    let second = f.build_ok(&[]);
    let idx = step_index("install.d/90-last");
    let key = &second.keys()[idx];
    let explain: serde_json::Value =
        serde_json::from_str(&cache(&["explain", &key[..12], "--json"])).unwrap();
    assert_eq!(explain["key"], key.as_str());
    let changes = explain["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["input"] == "hook" && c["name"] == "90-last"),
        "{explain}"
    );

    // rm takes a step and its descendants; the next build reruns from there.
    cache(&["rm", &first.keys()[idx]]);
    cache(&["rm", key]);
    let third = f.build_ok(&[]);
    assert_eq!(third.ran(), &all_steps()[idx..]);

    // gc to a tiny size keeps the cache consistent (verify is clean) and a rebuild works.
    cache(&["gc", "--max-size", "1K"]);
    let verify = cache(&["verify"]);
    assert!(verify.contains("0 corrupt, 0 missing"), "{verify}");
    f.build_ok(&[]);
}

#[test]
fn bad_cache_arguments_are_one_line_errors() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    for args in [
        &["gc", "--max-size", "lots"][..],
        &["rm", "zz"],
        &["explain", "0000"],
    ] {
        let out = strata()
            .arg("cache")
            .args(args)
            .arg("--cache-dir")
            .arg(f.cache())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "cache {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // clap adds a "For more information, try '--help'." paragraph to its own errors.
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "cache {args:?}: {err}"
        );
    }
    let out = strata()
        .args(["cache", "ls", "--cache-dir"])
        .arg(f.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn blake3_file(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

/// (type, file name, blake3, cached) of each output in the manifest.
fn outputs_of(m: &Manifest) -> Vec<(String, String, String, bool)> {
    m.0["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let path = Path::new(o["path"].as_str().unwrap());
            (
                o["type"].as_str().unwrap().to_string(),
                path.file_name().unwrap().to_string_lossy().into_owned(),
                o["blake3"].as_str().unwrap().to_string(),
                o["cached"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `gzip -dc FILE` (the host's gzip reads strata's tgz).
fn gunzip(p: &Path) -> Vec<u8> {
    let out = Command::new("gzip").arg("-dc").arg(p).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `unsquashfs -l FILE`: the paths in the squashfs, relative to its root.
fn unsquash_list(p: &Path) -> Vec<String> {
    let out = Command::new("unsquashfs")
        .arg("-l")
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("squashfs-root/"))
        .map(str::to_string)
        .collect()
}

/// `unsquashfs -cat FILE MEMBER`.
fn unsquash_cat(p: &Path, member: &str) -> String {
    let out = Command::new("unsquashfs")
        .arg("-cat")
        .arg(p)
        .arg(member)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tar_tgz_and_squashfs_agree_and_are_kept_or_restored_on_a_no_op_rerun() {
    crate::require_root!();
    let f = BuildFixture::new();
    // The harness asks for tar; these add to it.
    let args = ["-t", "tgz,squashfs"];
    let m = f.build_ok(&args);
    assert_eq!(m.ran(), all_steps());
    let (tar, tgz, squash) = (f.out("img.tar"), f.out("img.tgz"), f.out("img.squash"));
    let outs = outputs_of(&m);
    let names: Vec<(&str, &str)> = outs.iter().map(|o| (o.0.as_str(), o.1.as_str())).collect();
    assert_eq!(
        names,
        [
            ("tar", "img.tar"),
            ("tgz", "img.tgz"),
            ("squashfs", "img.squash")
        ]
    );
    for (o, p) in outs.iter().zip([&tar, &tgz, &squash]) {
        assert_eq!(blake3_file(p), o.2, "{}", o.0);
        assert!(!o.3);
        assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o644);
    }
    // The tgz is the tar, byte for byte, gzipped.
    assert!(
        gunzip(&tgz) == fs::read(&tar).unwrap(),
        "gzip -dc img.tgz differs from img.tar"
    );
    // The squashfs holds the same tree.
    let list = unsquash_list(&squash);
    for p in [
        "etc/fixture/install-env",
        "bin/busybox",
        "etc/fixture/cleanup",
    ] {
        assert!(list.iter().any(|l| l == p), "{p} not in {list:?}");
    }
    assert!(!list.iter().any(|l| l.contains("in_target.d")), "{list:?}");
    assert_eq!(
        unsquash_cat(&squash, "etc/fixture/install-env"),
        f.tar_member(&tar, "etc/fixture/install-env").unwrap()
    );

    // A no-op rerun runs no step and leaves all three as they are.
    let again = f.build_ok(&args);
    assert!(again.ran().is_empty(), "{:?}", again.ran());
    let mut want = outs.clone();
    want.iter_mut().for_each(|o| o.3 = true);
    assert_eq!(outputs_of(&again), want);
    for (o, p) in outs.iter().zip([&tar, &tgz, &squash]) {
        assert_eq!(blake3_file(p), o.2, "{}", o.0);
    }

    // Deleted, the squashfs and the tgz come back identical from the store.
    fs::remove_file(&squash).unwrap();
    fs::remove_file(&tgz).unwrap();
    let restored = f.build_ok(&args);
    assert!(restored.ran().is_empty(), "{:?}", restored.ran());
    assert_eq!(outputs_of(&restored), want);
    for (o, p) in outs.iter().zip([&tar, &tgz, &squash]) {
        assert_eq!(blake3_file(p), o.2, "{}", o.0);
    }
}

#[test]
fn with_source_date_epoch_two_cold_builds_write_identical_tgz_and_squashfs() {
    crate::require_root!();
    let f = BuildFixture::new();
    let (tgz, squash) = (f.out("img.tgz"), f.out("img.squash"));
    let mut digests = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // Cold again: no cache, no outputs, no manifest; and a later clock.
            std::thread::sleep(Duration::from_millis(1100));
            fs::remove_dir_all(f.cache()).unwrap();
            for p in [&tgz, &squash, &f.out("img.strata.json")] {
                fs::remove_file(p).unwrap();
            }
        }
        f.run_ok(
            f.build_cmd_typed("img", "tgz,squashfs", &[])
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        );
        let m = f.manifest();
        assert_eq!(m.ran(), all_steps());
        // Without tar among the types, only the tgz is written.
        assert!(!f.out("img.tar").exists());
        let list = unsquash_list(&squash);
        assert!(
            list.iter().any(|l| l == "etc/fixture/install-env"),
            "{list:?}"
        );
        digests.push((blake3_file(&tgz), blake3_file(&squash)));
    }
    assert_eq!(
        digests[0].0, digests[1].0,
        "tgz differs between cold builds"
    );
    assert_eq!(
        digests[0].1, digests[1].1,
        "squashfs differs between cold builds"
    );
}

#[test]
fn squashfs_without_mksquashfs_fails_in_one_line_before_any_hook_runs() {
    crate::require_root!();
    let f = BuildFixture::new();
    let empty = f.path().join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let out = f
        .build_cmd_typed("img", "tar,squashfs", &[])
        .env("PATH", &empty)
        .output()
        .unwrap();
    f.assert_no_leftovers();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("mksquashfs") && lines[0].contains("squashfs-tools"),
        "{err}"
    );
    // Nothing ran: no cache, no manifest, no output.
    assert!(!f.cache().join("index.sqlite").exists());
    assert!(!f.out("img.strata.json").exists());
    assert!(!f.out("img.tar").exists());
}

#[test]
fn packages_offline_and_trace_options_reach_the_hooks() {
    crate::require_root!();
    let f = BuildFixture::new();
    let m = f.build_ok(&["-p", "vim,curl", "-p", "jq", "--offline"]);
    // The -p step runs right after install.d, in the chroot, through install-packages.
    let ran = m.ran();
    let at = ran
        .iter()
        .position(|s| s == "core/packages")
        .expect("a core/packages step");
    assert_eq!(ran[at - 1], "install.d/90-last");
    assert_eq!(ran[at + 1], "post-install.d/10-post-install");
    let tar = f.out("img.tar");
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/packages").unwrap().trim(),
        "installed: vim curl jq"
    );
    let env = f.tar_member(&tar, "etc/fixture/install-env").unwrap();
    assert!(env.lines().any(|l| l == "DIB_OFFLINE=1"), "{env}");
    // Another package list is another key for that step (and the ones after), not before.
    let m2 = f.build_ok(&["-p", "vim", "--offline"]);
    assert_eq!(m2.ran()[0], "core/packages");
    // The output type is not part of any step key: another -t reuses every step.
    let other_type = f.build_ok(&["-p", "vim", "--offline", "-t", "tgz"]);
    assert!(other_type.ran().is_empty(), "{:?}", other_type.ran());
    // -x traces hooks (DIB_DEBUG_TRACE), and tracing does not change any key.
    let out = f.build_cmd(&["-x", "--no-cache"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("[install.d/90-last] + ")),
        "no trace lines:\n{err}"
    );
    let traced = f.manifest();
    assert_eq!(traced.keys(), f.build_ok(&[]).keys());
}
