//! Reproducibility audits: `strata diff` between two builds, and `strata build --check`.

use crate::harness::BuildFixture;
use crate::util::{run, strata};
use std::fs;
use std::os::unix::fs::PermissionsExt;

const SDE: (&str, &str) = ("SOURCE_DATE_EPOCH", "1700000000");

/// Adds an element whose install.d hook writes random bytes (the same hook in every fixture,
/// so the same key, but another layer every time it runs).
fn plant_random_hook(f: &BuildFixture) {
    let dir = f.elements().join("fixture-random/install.d");
    fs::create_dir_all(&dir).unwrap();
    let hook = dir.join("50-random");
    fs::write(
        &hook,
        "#!/bin/sh\nset -eu\nhead -c 16 /dev/urandom | od -An -tx1 > /etc/fixture/random\n",
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
}

fn build(f: &BuildFixture, extra: &[&str]) {
    f.run_ok(f.build_cmd(extra).env(SDE.0, SDE.1));
}

fn diff(a: &BuildFixture, b: &BuildFixture, extra: &[&str], code: i32) -> (String, String) {
    run(
        strata()
            .arg("diff")
            .arg(a.out("img.strata.json"))
            .arg(b.out("img.strata.json"))
            .args(extra),
        code,
    )
}

#[test]
fn two_deterministic_builds_in_two_caches_match_and_check_passes() {
    crate::require_root!();
    let (a, b) = (BuildFixture::new(), BuildFixture::new());
    build(&a, &[]);
    build(&b, &[]);
    let (ca, cb) = (
        a.cache().display().to_string(),
        b.cache().display().to_string(),
    );
    let caches = ["--cache-dir", ca.as_str(), "--cache-dir", cb.as_str()];
    let (out, _) = diff(&a, &b, &caches, 0);
    assert!(out.contains("same:"), "{out}");
    let (json, _) = diff(&a, &b, &[&caches[..], &["--json"]].concat(), 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (v["schema"].as_u64(), v["same"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(v["identical_steps"], v["same_key_steps"]);
    // Every cached step rebuilds to its cached layer.
    let out = a
        .build_cmd(&["--check"])
        .env(SDE.0, SDE.1)
        .output()
        .unwrap();
    a.assert_no_leftovers();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(", 0 did not"), "{stdout}");
}

#[test]
fn a_random_hook_is_named_by_diff_and_by_check_down_to_the_file() {
    crate::require_root!();
    let (a, b) = (BuildFixture::new(), BuildFixture::new());
    for f in [&a, &b] {
        plant_random_hook(f);
        build(f, &["fixture-app", "fixture-random"]);
    }
    let (ca, cb) = (
        a.cache().display().to_string(),
        b.cache().display().to_string(),
    );
    let caches = ["--cache-dir", ca.as_str(), "--cache-dir", cb.as_str()];
    let (out, _) = diff(&a, &b, &caches, 1);
    assert!(
        out.contains("(install.d/50-random): same inputs, different layer"),
        "{out}"
    );
    assert!(out.contains("~ etc/fixture/random: content"), "{out}");
    // With the caches gone the manifests still name the step (no files then).
    fs::remove_dir_all(a.cache()).unwrap();
    fs::remove_dir_all(b.cache()).unwrap();
    let (out, _) = diff(&a, &b, &["--json"], 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let step = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "content-differs")
        .unwrap();
    assert_eq!(step["step"], "install.d/50-random");
    assert!(step["note"].as_str().unwrap().contains("no cache"));
    // --check on a fresh build of A: the random step diverges, named with its file; the cache
    // keeps its entries and --keep-failed keeps both layers.
    build(&a, &["fixture-app", "fixture-random"]);
    let keys_before = a.manifest().keys();
    let out = a
        .build_cmd(&["--check", "--keep-failed", "fixture-app", "fixture-random"])
        .env(SDE.0, SDE.1)
        .output()
        .unwrap();
    a.assert_no_leftovers();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stdout}\n{stderr}");
    assert!(stdout.contains("install.d/50-random"), "{stdout}");
    assert!(stdout.contains("~ etc/fixture/random: content"), "{stdout}");
    assert!(stdout.contains(", 1 did not"), "{stdout}");
    let kept = a.out("img.check");
    let step_dir = fs::read_dir(&kept).unwrap().next().unwrap().unwrap().path();
    assert!(step_dir.join("cached.layer.tar.zst").exists());
    assert!(step_dir.join("rebuilt.layer.tar.zst").exists());
    // The cache kept its entries: a plain rerun runs nothing.
    let again = a.build_ok_with(&["fixture-app", "fixture-random"], &[SDE]);
    assert!(again.ran().is_empty(), "{:?}", again.ran());
    assert_eq!(again.keys(), keys_before);
    // --check-from past the random step passes.
    let out = a
        .build_cmd(&[
            "--check",
            "--check-from",
            "post-install.d",
            "fixture-app",
            "fixture-random",
        ])
        .env(SDE.0, SDE.1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn diff_names_the_first_input_that_differs_and_bad_input_is_status_2() {
    crate::require_root!();
    let (a, b) = (BuildFixture::new(), BuildFixture::new());
    build(&a, &[]);
    b.run_ok(
        b.build_cmd(&[])
            .env(SDE.0, SDE.1)
            .env("DIB_FIXTURE_GREETING", "bonjour"),
    );
    let (out, _) = diff(&a, &b, &[], 1);
    assert!(out.contains("inputs first differ at step"), "{out}");
    assert!(
        out.contains("env DIB_FIXTURE_GREETING: (none) → bonjour"),
        "{out}"
    );
    let (_, err) = run(strata().args(["diff", "nope.json", "other.json"]), 2);
    assert!(err.contains("nope.json"), "{err}");
}
