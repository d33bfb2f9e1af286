//! The element developer's loop: `strata shell` at a step, dib's `break=`, `build --watch`.

use crate::harness::BuildFixture;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `strata shell` with the fixture's options (`build_cmd`'s, with `build` turned into `shell`).
fn shell(f: &BuildFixture, at: &[&str], cmd: &[&str]) -> std::process::Output {
    let build = f.build_cmd(&[]);
    let mut c = crate::util::strata();
    c.arg("shell").args(build.get_args().skip(1)).args(at);
    for (k, v) in build.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.arg("--").args(cmd);
    let out = c.output().unwrap();
    f.assert_no_leftovers();
    out
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_command_at_a_step_sees_its_files_and_the_hook_environment_and_changes_are_thrown_away() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.build_ok(&[]);
    let probe = "ls /etc/fixture; echo FIXTURE_APP=$FIXTURE_APP; ls /tmp/in_target.d/install.d; \
                 touch /etc/fixture/made-in-the-shell";
    let out = shell(&f, &["--at", "install.d/20-middle"], &["sh", "-c", probe]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = stdout(&out);
    assert!(seen.lines().any(|l| l == "middle"), "{seen}");
    assert!(
        !seen.lines().any(|l| l == "last"),
        "a later step's file: {seen}"
    );
    assert!(
        seen.contains("FIXTURE_APP=app-hello"),
        "environment.d: {seen}"
    );
    assert!(
        seen.lines().any(|l| l == "90-last"),
        "the hooks are there: {seen}"
    );
    // Before the step: its file is not there yet; and the shell's change is gone.
    let out = shell(
        &f,
        &["--at", "install.d/20-middle", "--before"],
        &[
            "sh",
            "-c",
            "ls /etc/fixture; ls /etc/fixture/made-in-the-shell",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!stdout(&out).lines().any(|l| l == "middle"));
    // A host step: the shell runs on the host with TARGET_ROOT set.
    let out = shell(
        &f,
        &["--at", "root.d"],
        &["sh", "-c", "test -d \"$TARGET_ROOT/etc\" && echo ok"],
    );
    assert_eq!(
        stdout(&out).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The command's exit status is the shell's; a step that does not exist is bad input.
    let out = shell(
        &f,
        &["--at", "install.d/20-middle"],
        &["sh", "-c", "exit 3"],
    );
    assert_eq!(out.status.code(), Some(3));
    let out = shell(&f, &["--at", "install.d/99-nope"], &["true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("99-nope"));
    // Nothing of the shells entered the cache: a build runs nothing.
    assert!(f.build_ok(&[]).ran().is_empty());
}

#[test]
fn break_after_error_opens_a_shell_in_the_failed_hooks_tree() {
    crate::require_root!();
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping: script (util-linux) makes the pseudo-terminal and is missing");
        return;
    }
    let f = BuildFixture::new();
    let hook = f.elements().join("fixture-app/install.d/20-middle");
    fs::write(
        &hook,
        "#!/bin/bash\necho half-done > /etc/fixture/half-done\nexit 7\n",
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    // The build runs under `script`, which gives it a pseudo-terminal; what we type goes to
    // the break shell.
    let build = f.build_cmd(&[]);
    let mut line = vec![build.get_program().to_string_lossy().into_owned()];
    line.extend(
        build
            .get_args()
            .map(|a| format!("'{}'", a.to_string_lossy())),
    );
    let mut c = Command::new("script");
    c.args(["-qec", &line.join(" "), "/dev/null"]);
    for (k, v) in build.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.env("break", "after-error");
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let mut typed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    for l in reader.lines() {
        let l = l.unwrap();
        seen.push_str(&l);
        seen.push('\n');
        if !typed && l.contains("break=after-error") {
            stdin
                .write_all(b"cat /etc/fixture/half-done; echo SHELL-$FIXTURE_APP; exit\n")
                .unwrap();
            typed = true;
        }
        assert!(Instant::now() < deadline, "{seen}");
    }
    let status = child.wait().unwrap();
    f.assert_no_leftovers();
    assert!(typed, "no break shell opened:\n{seen}");
    assert!(seen.contains("half-done"), "{seen}");
    assert!(seen.contains("SHELL-app-hello"), "{seen}");
    // The build still fails with the hook's error.
    assert!(!status.success());
    assert!(seen.contains("install.d/20-middle"), "{seen}");
}

#[test]
fn watch_rebuilds_what_changed_and_stops_on_sigint() {
    crate::require_root!();
    let f = BuildFixture::new();
    let mut child = f
        .build_cmd(&["--watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next = |what: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let l = lines
                .next()
                .unwrap_or_else(|| panic!("watch ended before {what}"))
                .unwrap();
            if l.starts_with(what) {
                return l;
            }
            assert!(Instant::now() < deadline, "no {what}");
        }
    };
    let first = next("[watch] rebuild 1");
    assert!(first.contains("ran root.d/10-busybox-rootfs"), "{first}");
    let hook = f.elements().join("fixture-app/install.d/90-last");
    let text = fs::read_to_string(&hook).unwrap();
    fs::write(&hook, format!("{text}\necho watched\n")).unwrap();
    let second = next("[watch] rebuild 2");
    assert!(
        second.contains("ran install.d/90-last") && !second.contains("root.d/10-busybox"),
        "{second}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    f.assert_no_leftovers();
}
