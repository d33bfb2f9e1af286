//! Shared helpers for the integration tests: the real binary (one constructor for every test),
//! run with a controlled environment, and the root check.

use std::path::PathBuf;
use std::process::Command;

/// `tests/fixtures/elements/<sub>`.
pub fn fixture(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/elements")
        .join(sub)
}

/// The real `strata` binary, without the caller's element, cache, log or reproducibility
/// settings (ELEMENTS_PATH, STRATA_*, RUST_LOG, SOURCE_DATE_EPOCH). Every test starts here.
pub fn strata() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    for var in [
        "ELEMENTS_PATH",
        "STRATA_ELEMENTS_DIR",
        "STRATA_CACHE_DIR",
        "RUST_LOG",
        "SOURCE_DATE_EPOCH",
        "DIB_IMAGE_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `strata()` with the built-in elements folder set to the fixture `builtin/`.
pub fn strata_with_fixture_elements() -> Command {
    let mut cmd = strata();
    cmd.env("STRATA_ELEMENTS_DIR", fixture("builtin"));
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

/// True when running as root; otherwise says (in one line) that `test` is skipped.
pub fn is_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping {test}: it needs root (mounts, chroots, device nodes)");
    false
}

/// Returns from the calling test, with one line saying why, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::util::is_root(module_path!()) {
            return;
        }
    };
}
