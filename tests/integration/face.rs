//! The command line's face for shells and CI: completions, the man page, `--progress json`.

use crate::harness::BuildFixture;
use crate::util::{run, strata};

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let (bash, _) = run(strata().args(["completions", "bash"]), 0);
    assert!(bash.contains("_strata()"), "{bash}");
    for sub in [
        "build",
        "plan",
        "cache",
        "elements",
        "--rebuild-from",
        "--progress",
    ] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    let (zsh, _) = run(strata().args(["completions", "zsh"]), 0);
    assert!(zsh.starts_with("#compdef strata"), "{zsh}");
    let (man, _) = run(strata().arg("man"), 0);
    assert!(man.contains(".TH strata 1"), "{man}");
    let dir = tempfile::tempdir().unwrap();
    run(strata().arg("man").arg("--dir").arg(dir.path()), 0);
    for page in ["strata.1", "strata-build.1", "strata-cache.1"] {
        assert!(dir.path().join(page).exists(), "no {page}");
    }
    let (_, err) = run(strata().args(["completions", "tcsh"]), 2);
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn progress_json_is_one_versioned_event_per_line() {
    crate::require_root!();
    let f = BuildFixture::new();
    let mut cmd = f.build_cmd(&["--progress", "json"]);
    let out = f.run_ok(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events.iter().all(|e| e["v"] == 1), "{stderr}");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"build-start"));
    assert_eq!(kinds.last(), Some(&"build-end"));
    let ends: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "step-end").collect();
    let manifest = f.manifest();
    assert_eq!(ends.len(), manifest.steps().len());
    assert!(ends.iter().all(|e| e["state"] == "run"));
    assert!(ends.iter().any(|e| e["bytes_packed"].as_u64().unwrap() > 0));
    assert!(kinds.contains(&"hook-output"), "{kinds:?}");
    assert!(kinds.contains(&"output"), "{kinds:?}");
    let end = events.last().unwrap();
    assert_eq!(
        (end["outcome"].as_str(), end["exit"].as_u64()),
        (Some("ok"), Some(0))
    );
    // A no-op rerun: every step cached, and the end says so.
    let out = f.run_ok(&mut f.build_cmd(&["--progress", "json"]));
    let last = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    assert_eq!(last["cached"], last["steps"]);
    // A failure is an event too, with the exit status.
    let bad = f
        .build_cmd(&["--progress", "json", "fixture-nope"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let line = String::from_utf8_lossy(&bad.stderr);
    let err: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(
        (err["event"].as_str(), err["level"].as_str()),
        (Some("log"), Some("error"))
    );
}
