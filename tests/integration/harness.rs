//! Shared helpers: a throwaway build folder with copies of the fixture elements, a private
//! cache, and runs of the real `strata` binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixture's steps through post-root.d, in run order: what tree builds and disk builds of
/// `tests/fixtures/build-elements` share (tree builds go on per phase, disk builds with one
/// `output/disk` step).
pub const SHARED_STEPS: &[&str] = &[
    "root.d/10-busybox-rootfs",
    "extra-data.d/10-extra-data",
    "pre-install.d/10-pre-install",
    "pre-install.d/20-install-bin",
    "install.d/10-record-env",
    "install.d/20-middle",
    "install.d/90-last",
    "post-install.d/10-post-install",
    "post-root.d/10-post-root",
];

/// `SHARED_STEPS` followed by `tail`.
pub fn steps_then(tail: &[&'static str]) -> Vec<&'static str> {
    [SHARED_STEPS, tail].concat()
}

pub use crate::util::strata;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn copy_tree(src: &Path, dst: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        dst.display()
    );
}

/// A build sandbox for one test: elements, cache, TMP_DIR and outputs all under one temp dir.
pub struct BuildFixture {
    pub dir: tempfile::TempDir,
}

impl BuildFixture {
    pub fn new() -> BuildFixture {
        let dir = tempfile::Builder::new()
            .prefix("strata-it.")
            .tempdir()
            .unwrap();
        copy_tree(
            &repo().join("tests/fixtures/build-elements"),
            &dir.path().join("elements"),
        );
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::create_dir_all(dir.path().join("out")).unwrap();
        fs::create_dir_all(dir.path().join("no-builtin-elements")).unwrap();
        BuildFixture { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn elements(&self) -> PathBuf {
        self.path().join("elements")
    }

    /// Writes an executable bash hook `rel` (e.g. `install.d/30-x`) of the fixture element
    /// `element`, under `set -eu -o pipefail`.
    pub fn write_bash_hook(&self, element: &str, rel: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.elements().join(element).join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("#!/bin/bash\nset -eu -o pipefail\n{body}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.path().join("out").join(name)
    }

    /// `strata build` of the fixture elements with extra arguments, in this fixture's dirs.
    pub fn build_cmd(&self, extra: &[&str]) -> Command {
        self.build_cmd_as("img", extra)
    }

    /// Like `build_cmd`, writing `out/NAME.tar` and `out/NAME.strata.json`.
    pub fn build_cmd_as(&self, name: &str, extra: &[&str]) -> Command {
        self.build_cmd_typed(name, "tar", extra)
    }

    /// Like `build_cmd_as` with the output types `types` (`-t`) instead of `tar`.
    pub fn build_cmd_typed(&self, name: &str, types: &str, extra: &[&str]) -> Command {
        let mut c = strata();
        c.arg("build")
            .arg("-n")
            .arg("-t")
            .arg(types)
            .arg("-o")
            .arg(self.out(name))
            .arg("--cache-dir")
            .arg(self.cache())
            .arg("--element-path")
            .arg(self.elements())
            .args(extra)
            .env_remove("ELEMENTS_PATH")
            .env(
                "STRATA_ELEMENTS_DIR",
                self.path().join("no-builtin-elements"),
            )
            .env("TMP_DIR", self.path().join("tmp"))
            .env("DIB_FIXTURE_DIR", repo().join("tests/fixtures"))
            .env("DIB_IMAGE_CACHE", self.path().join("image-cache"))
            .env_remove("SOURCE_DATE_EPOCH");
        if !extra.iter().any(|a| a.starts_with("fixture-")) {
            c.arg("fixture-app");
        }
        c
    }

    /// `strata plan --json` with the options `build_cmd(extra)` would use.
    pub fn plan(&self, extra: &[&str]) -> serde_json::Value {
        self.plan_of(&self.build_cmd(extra))
    }

    /// `strata plan --json` with the arguments and environment of a `build` command.
    pub fn plan_of(&self, build: &Command) -> serde_json::Value {
        let mut c = strata();
        c.arg("plan").arg("--json").args(build.get_args().skip(1));
        for (k, v) in build.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let out = self.run_ok(&mut c);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn build(&self, extra: &[&str]) -> Output {
        let out = self.build_cmd(extra).output().unwrap();
        self.assert_no_leftovers();
        out
    }

    pub fn build_ok(&self, extra: &[&str]) -> Manifest {
        self.build_ok_with(extra, &[])
    }

    /// `build_ok` with extra environment variables.
    pub fn build_ok_with(&self, extra: &[&str], env: &[(&str, &str)]) -> Manifest {
        self.run_ok(self.build_cmd(extra).envs(env.iter().copied()));
        self.manifest()
    }

    /// Runs a build command of this fixture: it must succeed (its stderr is shown if not) and
    /// leave nothing mounted and no build folder behind.
    pub fn run_ok(&self, cmd: &mut Command) -> Output {
        let out = cmd.output().unwrap();
        self.assert_no_leftovers();
        assert!(
            out.status.success(),
            "build failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn manifest(&self) -> Manifest {
        let text = fs::read_to_string(self.out("img.strata.json")).unwrap();
        Manifest(serde_json::from_str(&text).unwrap())
    }

    /// No mount under this fixture, no build folder left in its TMP_DIR, no partial output in
    /// its output folder and no temp file in its cache.
    pub fn assert_no_leftovers(&self) {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let prefix = self.path().to_string_lossy().to_string();
        let left: Vec<_> = mounts.lines().filter(|l| l.contains(&prefix)).collect();
        assert!(left.is_empty(), "mounts left behind: {left:#?}");
        let tmp: Vec<_> = fs::read_dir(self.path().join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "build folders left in TMP_DIR: {tmp:?}");
        let partial = self.partial_outputs();
        assert!(partial.is_empty(), "partial outputs left: {partial:?}");
        let cache_tmp: Vec<_> = fs::read_dir(self.cache().join("tmp"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(
            cache_tmp.is_empty(),
            "temp files left in the cache: {cache_tmp:?}"
        );
    }

    /// Temp files strata writes outputs into (`.strata-out.*`) anywhere under `out/`.
    pub fn partial_outputs(&self) -> Vec<PathBuf> {
        walkdir::WalkDir::new(self.path().join("out"))
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".strata-out."))
            .map(|e| e.path().to_path_buf())
            .collect()
    }

    /// After strata was SIGKILLed mid-build: within 10 s no process whose command line matches
    /// `survivor` (something a hook started) is left and nothing is mounted under this fixture;
    /// `hold` (the file that kept the hook waiting) is removed. What the killed build left in
    /// TMP_DIR stays: the next build removes it (and `run_ok` checks that it did).
    pub fn assert_killed_build_left_nothing(&self, survivor: &str, hold: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = Command::new("pgrep")
                .args(["-f", survivor])
                .output()
                .unwrap();
            if left.stdout.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "processes survived the kill"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&*self.path().to_string_lossy()),
            "mounts left: {mounts}"
        );
        fs::remove_file(hold).unwrap();
        let left: Vec<_> = fs::read_dir(self.path().join("tmp")).unwrap().collect();
        assert!(
            !left.is_empty(),
            "the killed build left no build folder to sweep"
        );
    }

    /// Lists a tar output's members (GNU tar reads it, so the output is a standard tar).
    pub fn tar_member(&self, tar: &Path, member: &str) -> Option<String> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(tar)
            .arg(member)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn tar_list(&self, tar: &Path) -> Vec<String> {
        let out = Command::new("tar").arg("-tf").arg(tar).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Starts `cmd` (stdout discarded, stderr collected), polls `ready` every 5 ms (for up to 3
/// minutes), then sends `signal` to strata and returns how it ended and what it printed.
pub fn signal_when(
    cmd: &mut Command,
    ready: impl Fn() -> bool,
    signal: nix::sys::signal::Signal,
) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let mut sent = false;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let text = reader.join().unwrap();
            panic!("strata ended ({status}) before the moment to signal it came:\n{text}");
        }
        if ready() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
            sent = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if !sent {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(sent, "the moment to signal never came:\n{text}");
    (status, text)
}

/// A parsed NAME.strata.json.
pub struct Manifest(pub serde_json::Value);

impl Manifest {
    pub fn steps(&self) -> Vec<(String, bool)> {
        self.0["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    format!(
                        "{}/{}",
                        s["phase"].as_str().unwrap(),
                        s["hook"].as_str().unwrap()
                    ),
                    s["cached"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    pub fn ran(&self) -> Vec<String> {
        self.steps()
            .into_iter()
            .filter(|(_, c)| !c)
            .map(|(s, _)| s)
            .collect()
    }

    pub fn cached(&self) -> Vec<String> {
        self.steps()
            .into_iter()
            .filter(|(_, c)| *c)
            .map(|(s, _)| s)
            .collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.0["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn diff_ids(&self) -> Vec<Option<String>> {
        self.0["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["diff_id"].as_str().map(str::to_string))
            .collect()
    }

    pub fn output_digest(&self) -> String {
        self.0["outputs"][0]["blake3"].as_str().unwrap().to_string()
    }
}
