//! environment.d: which files dib-run-parts sources, in which order, and the environment they
//! export, captured as data so later code can hash it and hand it to hooks.
//!
//! ```text
//! <hooks>/environment.d ──► env_files(dir) ──► Vec<PathBuf> (byte order of the names)
//! files + base environment ──► capture() ──► bash (cleared env = base, set -eu -o pipefail,
//!                                             source each file, `env -0`) ──► BTreeMap
//! ```
//!
//! dib sorts the *full paths* with `LANG=C sort -n`; no path starts with a number, so the order
//! is plain byte order of the names (`05.x.bash, 10-one, 9-two`; `100-a` before `20-b`). The
//! executable bit is not needed. dib sources each file in a subshell of the phase runner;
//! `capture` runs one bash, so what a file exports is seen by the files after it, and returns
//! what a child process of that shell would get (exported functions appear as
//! `BASH_FUNC_<name>%%`, as bash passes them). bash's own variables (`SHLVL`, `_`, `PWD`,
//! `OLDPWD`) are dropped unless `base` sets them, in which case `base`'s value is kept.

use super::ElementError;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tracing::debug;

/// Variables bash sets by itself; not part of what environment.d exports.
pub const BASH_NOISE: [&str; 4] = ["SHLVL", "_", "PWD", "OLDPWD"];

/// True for names dib sources from environment.d: `^[0-9A-Za-z_.-]+$`.
pub fn is_env_file_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The files dib-run-parts sources from `dir` (an `environment.d`), in its order: regular files
/// or symlinks to them, names matching `^[0-9A-Za-z_.-]+$`, sorted by name bytes. A missing
/// folder has no files.
pub fn env_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let listing = match fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<(Vec<u8>, PathBuf)> = Vec::new();
    for entry in listing {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            debug!(path = %path.display(), "environment file skipped: name is not UTF-8");
            continue;
        };
        if !is_env_file_name(name) {
            debug!(path = %path.display(), "environment file skipped: name does not match ^[0-9A-Za-z_.-]+$");
            continue;
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => files.push((name.as_bytes().to_vec(), path)),
            _ => debug!(path = %path.display(), "environment file skipped: not a regular file"),
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Finds a program on the PATH of this process (not of the environment being built).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The script bash runs: source each file (its arguments) with stdout sent to stderr, then print
/// the exported environment NUL separated on the saved stdout (fd 3). On failure the EXIT trap
/// writes the (1-based) index of the file being sourced on fd 3, also when a file calls `exit 0`.
const CAPTURE_SCRIPT: &str = r#"
exec 3>&1 1>&2
__strata_env_prog=$1
shift
__strata_env_i=0
trap 'if [ "$__strata_env_i" -ne 0 ]; then printf "STRATA-FAILED %s\n" "$__strata_env_i" >&3; fi' EXIT
set -eu -o pipefail
for __strata_env_f in "$@"; do
    __strata_env_i=$((__strata_env_i + 1))
    source "$__strata_env_f"
done
__strata_env_i=0
exec "$__strata_env_prog" -0 >&3
"#;

/// Sources `files` in order in a bash whose environment is exactly `base`, with
/// `set -eu -o pipefail`, and returns the environment it exports. A failing file is an error
/// naming it and the last line bash printed on stderr.
pub fn capture(
    files: &[PathBuf],
    base: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ElementError> {
    let bash = find_program("bash")
        .ok_or_else(|| ElementError::Other("cannot find bash on PATH".to_string()))?;
    let env_prog = find_program("env")
        .ok_or_else(|| ElementError::Other("cannot find env on PATH".to_string()))?;
    let output = Command::new(&bash)
        .arg("-c")
        .arg(CAPTURE_SCRIPT)
        .arg("strata-environment.d")
        .arg(&env_prog)
        .args(files)
        .env_clear()
        .envs(base)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ElementError::io("run", &bash, e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failed = output
        .stdout
        .strip_prefix(b"STRATA-FAILED ")
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .and_then(|rest| rest.trim().parse::<usize>().ok());
    if !output.status.success() || failed.is_some() {
        let code = output
            .status
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "killed by a signal".to_string());
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {}", l.trim()))
            .unwrap_or_default();
        return Err(
            match failed
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| files.get(i))
            {
                Some(file) => ElementError::EnvFileFailed {
                    file: file.clone(),
                    code,
                    detail: last,
                },
                None => ElementError::Other(format!(
                    "capturing the environment.d environment failed (exit {code}){last}"
                )),
            },
        );
    }
    if !stderr.trim().is_empty() {
        debug!(stderr = %stderr.trim_end(), "environment.d output");
    }
    let mut env = BTreeMap::new();
    for item in output.stdout.split(|&b| b == 0).filter(|i| !i.is_empty()) {
        let text = std::str::from_utf8(item).map_err(|_| {
            let name = item.split(|&b| b == b'=').next().unwrap_or_default();
            ElementError::Other(format!(
                "environment.d exported a variable that is not UTF-8: {}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let Some((name, value)) = text.split_once('=') else {
            continue;
        };
        env.insert(name.to_string(), value.to_string());
    }
    for noise in BASH_NOISE {
        match base.get(noise) {
            Some(v) => {
                env.insert(noise.to_string(), v.clone());
            }
            None => {
                env.remove(noise);
            }
        }
    }
    Ok(env)
}

/// Shorthand: the files of `dir` (an `environment.d`) captured on top of `base`.
pub fn capture_dir(
    dir: &Path,
    base: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ElementError> {
    let files = env_files(dir).map_err(|e| ElementError::io("list", dir, e))?;
    capture(&files, base)
}
