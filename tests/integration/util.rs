//! Shared helpers for the integration tests: the real binary, with a controlled environment.

use assert_cmd::Command;
use std::path::PathBuf;

/// `tests/fixtures/elements/<sub>`.
pub fn fixture(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/elements")
        .join(sub)
}

/// The `strata` binary with the built-in elements folder set to the fixture `builtin/`, and no
/// ELEMENTS_PATH or RUST_LOG from the caller.
pub fn strata() -> Command {
    let mut cmd = Command::cargo_bin("strata").expect("the strata binary is built");
    cmd.env("STRATA_ELEMENTS_DIR", fixture("builtin"))
        .env_remove("ELEMENTS_PATH")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the command, asserting exit status `code`, and returns (stdout, stderr).
pub fn run(cmd: &mut Command, code: i32) -> (String, String) {
    let out = cmd.output().expect("strata runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// The lines of `s`.
pub fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}
