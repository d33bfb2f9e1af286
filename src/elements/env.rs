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
    let bash = crate::tools::on_host_path("bash")
        .ok_or_else(|| ElementError::Other("cannot find bash on PATH".to_string()))?;
    let env_prog = crate::tools::on_host_path("env")
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

/// [`capture_dir`] of a copy (the merged hook tree in a build folder), with a failing file
/// named as the user knows it: `origin` maps a copied file to the element's own file (None:
/// keep the copy's path), in the error and in bash's message.
pub fn capture_dir_named(
    dir: &Path,
    base: &BTreeMap<String, String>,
    origin: &dyn Fn(&Path) -> Option<PathBuf>,
) -> Result<BTreeMap<String, String>, ElementError> {
    capture_dir(dir, base).map_err(|e| match e {
        ElementError::EnvFileFailed { file, code, detail } => match origin(&file) {
            Some(own) => ElementError::EnvFileFailed {
                detail: detail.replace(&file.display().to_string(), &own.display().to_string()),
                file: own,
                code,
            },
            None => ElementError::EnvFileFailed { file, code, detail },
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("KEEP".to_string(), "kept".to_string()),
        ])
    }

    fn names(files: &[PathBuf]) -> Vec<String> {
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn env_files_are_in_byte_order_and_filtered() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("environment.d");
        fs::create_dir(&d).unwrap();
        for n in [
            "9-two",
            "10-one",
            "05.x.bash",
            "100-a",
            "20-b",
            "bad~",
            "has space",
        ] {
            fs::write(d.join(n), "").unwrap();
        }
        fs::create_dir(d.join("30-dir")).unwrap();
        std::os::unix::fs::symlink(d.join("10-one"), d.join("40-link")).unwrap();
        std::os::unix::fs::symlink(d.join("missing"), d.join("41-dangling")).unwrap();
        assert_eq!(
            names(&env_files(&d).unwrap()),
            ["05.x.bash", "10-one", "100-a", "20-b", "40-link", "9-two"]
        );
        assert!(env_files(&t.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn capture_sources_in_order_and_returns_exports_only() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("10-a");
        let b = t.path().join("20-b");
        fs::write(
            &a,
            "export FOO=one\nLOCAL=x\necho noise\nf() { :; }\nexport -f f\n",
        )
        .unwrap();
        fs::write(
            &b,
            "export BAR=\"${FOO}-two $LOCAL\"\nexport MULTI=$'l1\\nl2'\n",
        )
        .unwrap();
        let env = capture(&[a, b], &base()).unwrap();
        assert_eq!(env["FOO"], "one");
        assert_eq!(env["BAR"], "one-two x");
        assert_eq!(env["MULTI"], "l1\nl2");
        assert_eq!(env["KEEP"], "kept");
        assert!(env.contains_key("BASH_FUNC_f%%"));
        assert!(!env.contains_key("LOCAL"));
        for noise in BASH_NOISE {
            assert!(!env.contains_key(noise), "{noise}");
        }
        // Nothing from strata's own process leaks in.
        assert_eq!(
            env.keys().filter(|k| !k.starts_with("BASH_FUNC")).count(),
            5,
            "{env:?}"
        );
    }

    #[test]
    fn a_failing_file_is_named_with_bashs_message() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("10-ok");
        let bad = t.path().join("20-bad");
        let never = t.path().join("30-never");
        fs::write(&ok, "export A=1\n").unwrap();
        fs::write(&bad, "export X=$UNSET_VAR\n").unwrap();
        fs::write(&never, "export B=2\n").unwrap();
        let err = capture(&[ok.clone(), bad.clone(), never.clone()], &base())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "environment.d file {} failed (exit 1): ",
                bad.display()
            )) && err.ends_with("UNSET_VAR: unbound variable"),
            "{err}"
        );
        fs::write(&bad, "echo about to fail >&2\nexit 3\n").unwrap();
        let err = capture(std::slice::from_ref(&bad), &base())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "environment.d file {} failed (exit 3): about to fail",
                bad.display()
            )
        );
        fs::write(&bad, "false | true\nfalse\n").unwrap();
        let err = capture(std::slice::from_ref(&bad), &base())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("environment.d file {} failed (exit 1)", bad.display())
        );
        fs::write(&bad, "exit 0\n").unwrap();
        let err = capture(std::slice::from_ref(&bad), &base())
            .unwrap_err()
            .to_string();
        assert!(err.contains("20-bad failed (exit 0)"), "{err}");
    }

    #[test]
    fn capture_of_nothing_is_the_base() {
        let env = capture(&[], &base()).unwrap();
        assert_eq!(env, base());
        let with_pwd = BTreeMap::from([("PWD".to_string(), "/somewhere".to_string())]);
        assert_eq!(capture(&[], &with_pwd).unwrap(), with_pwd);
    }
}
