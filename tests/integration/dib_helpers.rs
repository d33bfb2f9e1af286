//! `strata dib ...` helpers on the fixture elements in `tests/fixtures/packages/`:
//! package-installs-squash (JSON + resolved lists), pkg-map (dib's CLI and exit codes) and
//! pkg-map-export.

use assert_cmd::Command;
use predicates::str::contains;
use std::fs;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packages")
}

fn search() -> String {
    let f = fixtures();
    format!(
        "{}:{}",
        f.join("path1").display(),
        f.join("path2").display()
    )
}

/// The binary with a clean environment, so nothing from the test runner leaks into `when`,
/// install types or pkg-map defaults.
fn strata() -> Command {
    let mut c = crate::util::strata();
    c.env_clear();
    Command::from_std(c)
}

const ELEMENTS: &str = "pkgs-base pkgs-build overridden no-map";

fn squash(out: &Path, resolved: Option<&Path>) -> Command {
    let mut c = strata();
    c.args([
        "dib",
        "package-installs-squash",
        "--elements",
        ELEMENTS,
        "--path",
    ])
    .arg(search());
    if let Some(r) = resolved {
        c.arg("--resolved").arg(r);
    }
    c.arg(out).envs([
        ("ARCH", "amd64"),
        ("FEATURE", "on"),
        ("DISTRO_NAME", "ubuntu"),
        ("DIB_RELEASE", "noble"),
    ]);
    c
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn squash_writes_dibs_json_with_every_rule_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tmp/package-installs.json");
    squash(&out, None).assert().success();
    let got: serde_json::Value = serde_json::from_str(&read(&out)).unwrap();
    // Cross-checked against dib 3.43.0's package-installs-squash on the same fixtures: identical
    // except grub-pc, which dib drops because it does not strip " amd64" in `arch`.
    let want = serde_json::json!({
        "install.d": {
            "install": [
                ["curl", "pkgs-base"], ["generic-editor", "pkgs-base"], ["dev-tools", "pkgs-base"],
                ["irqbalance", "pkgs-base"], ["feature-pkg", "pkgs-base"], ["src-only", "pkgs-base"],
                ["dev-tools", "pkgs-build"], ["wget", "pkgs-build"],
                ["pkg-a", "overridden"], ["pkg-b", "overridden"]
            ],
            "uninstall": [["wget", "pkgs-build"]]
        },
        "pre-install.d": {"install": [["grub-pc", "pkgs-base"]], "uninstall": []},
        "post-install.d": {
            "install": [["htop", "no-map"]],
            "uninstall": [["cloud-init", "pkgs-base"]]
        }
    });
    assert_eq!(got, want);
}

#[test]
fn squash_resolved_lists_map_names_through_each_elements_pkg_map() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("package-installs.json");
    let dir = tmp.path().join("resolved/lists");
    squash(&out, Some(&dir)).assert().success();
    // curl: release mapping (two packages); generic-editor: distro; dev-tools: family (two);
    // irqbalance: "" (gone); pkgs-build has no pkg-map, so its dev-tools passes through; the
    // shadowed copy of `overridden` in path2 has a pkg-map, which is never used.
    assert_eq!(
        read(&dir.join("install.d.install")),
        "curl\nlibcurl4t64\nvim-tiny\nbuild-essential\npkg-config\nfeature-pkg\nsrc-only\n\
         dev-tools\nwget\npkg-a\npkg-b\n"
    );
    assert_eq!(read(&dir.join("install.d.uninstall")), "wget\n");
    assert_eq!(read(&dir.join("pre-install.d.install")), "grub-pc\n");
    assert_eq!(read(&dir.join("pre-install.d.uninstall")), "");
    assert_eq!(read(&dir.join("post-install.d.install")), "htop\n");
    assert_eq!(read(&dir.join("post-install.d.uninstall")), "cloud-init\n");
    // Nothing else, in particular no temp files.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 6);
}

#[test]
fn squash_resolved_removes_stale_phase_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.json");
    let dir = tmp.path().join("lists");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("pre-install.d.install"), "stale\n").unwrap();
    fs::write(dir.join("install.d.install"), "stale\n").unwrap();
    strata()
        .args([
            "dib",
            "package-installs-squash",
            "--elements",
            "no-map",
            "--path",
        ])
        .arg(search())
        .arg("--resolved")
        .arg(&dir)
        .arg(&out)
        .env("DISTRO_NAME", "debian")
        .assert()
        .success();
    assert!(!dir.join("pre-install.d.install").exists());
    assert!(!dir.join("install.d.install").exists());
    assert_eq!(read(&dir.join("post-install.d.install")), "htop\n");
}

#[test]
fn squash_resolved_needs_distro_name() {
    let tmp = tempfile::tempdir().unwrap();
    strata()
        .args([
            "dib",
            "package-installs-squash",
            "--elements",
            "no-map",
            "--path",
        ])
        .arg(search())
        .arg("--resolved")
        .arg(tmp.path().join("lists"))
        .arg(tmp.path().join("out.json"))
        .assert()
        .code(2)
        .stderr(contains("DISTRO_NAME is not set"));
}

#[test]
fn squash_unset_when_variable_is_bad_input_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.json");
    strata()
        .args([
            "dib",
            "package-installs-squash",
            "--elements",
            "needs-var",
            "--path",
        ])
        .arg(fixtures().join("bad"))
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("STRATA_TEST_UNSET_VAR"))
        .stderr(contains("needs-var/package-installs.yaml"))
        .stderr(contains("package 'x'"));
    assert!(!out.exists());
}

#[test]
fn squash_malformed_yaml_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    strata()
        .args([
            "dib",
            "package-installs-squash",
            "--elements",
            "broken-yaml",
            "--path",
        ])
        .arg(fixtures().join("bad"))
        .arg(tmp.path().join("out.json"))
        .assert()
        .code(2)
        .stderr(contains(
            "broken-yaml/package-installs.yaml: not valid YAML",
        ))
        .stderr(contains("line 4"));
}

#[test]
fn squash_rejects_an_unknown_phase() {
    let tmp = tempfile::tempdir().unwrap();
    strata()
        .args([
            "dib",
            "package-installs-squash",
            "--elements",
            "bad-phase",
            "--path",
        ])
        .arg(fixtures().join("bad"))
        .arg(tmp.path().join("out.json"))
        .assert()
        .code(2)
        .stderr(contains(
            "bad-phase/package-installs.yaml: package 'x': phase must be",
        ));
}

fn pkg_map() -> Command {
    let mut c = strata();
    c.args(["dib", "pkg-map"]).env("ELEMENTS_PATH", search());
    c
}

#[test]
fn pkg_map_prints_mapped_names_with_prefix_and_skips_empty() {
    pkg_map()
        .args([
            "--element",
            "pkgs-base",
            "--distro",
            "ubuntu",
            "--release",
            "noble",
        ])
        .args([
            "--prefix",
            "-",
            "curl",
            "generic-editor",
            "irqbalance",
            "dev-tools",
        ])
        .assert()
        .success()
        .stdout("-curl libcurl4t64\n-vim-tiny\n-build-essential pkg-config\n");
}

#[test]
fn pkg_map_takes_distro_and_release_from_the_environment() {
    pkg_map()
        .args(["--element", "pkgs-base", "curl", "generic-editor"])
        .env("DISTRO_NAME", "ubuntu")
        .env("DIB_RELEASE", "noble")
        .assert()
        .success()
        .stdout("curl libcurl4t64\nvim-tiny\n");
    // Another family: only the default applies.
    pkg_map()
        .args(["--element", "pkgs-base", "generic-editor"])
        .env("DISTRO_NAME", "fedora")
        .assert()
        .success()
        .stdout("vim\n");
}

#[test]
fn pkg_map_unmapped_name_exits_1_unless_missing_ok() {
    // curl is mapped only for ubuntu noble; earlier names are still printed, as dib does.
    pkg_map()
        .args([
            "--element",
            "pkgs-base",
            "--distro",
            "debian",
            "generic-editor",
            "curl",
        ])
        .assert()
        .code(1)
        .stdout("vim\n")
        .stderr(contains("pkgs-base has no valid mapping for package curl"));
    pkg_map()
        .args([
            "--element",
            "pkgs-base",
            "--distro",
            "debian",
            "--missing-ok",
        ])
        .args(["generic-editor", "curl"])
        .assert()
        .success()
        .stdout("vim\ncurl\n");
}

#[test]
fn pkg_map_missing_map_exits_2_unless_missing_ok() {
    // no-map has no pkg-map; `overridden`'s only pkg-map is in the shadowed copy.
    for element in ["no-map", "overridden", "not-an-element"] {
        pkg_map()
            .args(["--element", element, "--distro", "ubuntu", "a"])
            .assert()
            .code(2)
            .stderr(contains("does not exist"));
        pkg_map()
            .args(["--element", element, "--distro", "ubuntu", "--missing-ok"])
            .args(["--prefix", "+", "a", "b"])
            .assert()
            .success()
            .stdout("+a\n+b\n");
    }
}

#[test]
fn pkg_map_usage_errors_exit_1_like_dib() {
    let file = fixtures().join("path1/pkgs-base/pkg-map");
    pkg_map()
        .args(["--distro", "ubuntu", "a"])
        .assert()
        .code(1)
        .stderr(contains("--element or --pkg-map"));
    pkg_map()
        .args(["--element", "pkgs-base", "--distro", "ubuntu", "--pkg-map"])
        .arg(&file)
        .arg("a")
        .assert()
        .code(1)
        .stderr(contains("not both"));
    pkg_map()
        .args(["--element", "pkgs-base", "a"])
        .assert()
        .code(1)
        .stderr(contains("--distro"));
}

#[test]
fn pkg_map_reads_an_explicit_file_and_reports_a_broken_one() {
    let file = fixtures().join("path1/pkgs-base/pkg-map");
    pkg_map()
        .arg("--pkg-map")
        .arg(&file)
        .args(["--distro", "debian", "dev-tools"])
        .assert()
        .success()
        .stdout("build-essential pkg-config\n");
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("pkg-map");
    fs::write(&broken, "{\n\"default\": {\n}}}\n").unwrap();
    pkg_map()
        .arg("--pkg-map")
        .arg(&broken)
        .args(["--distro", "debian", "x"])
        .assert()
        .code(1)
        .stderr(contains(broken.display().to_string()))
        .stderr(contains("line 3"));
}

#[test]
fn pkg_map_export_writes_one_sorted_table_per_element_with_a_map() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("usr/share/pkg-map");
    // A stale export for an element that no longer has a pkg-map goes away.
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("no-map"), "stale\tx\n").unwrap();
    strata()
        .args(["dib", "pkg-map-export", "--elements", ELEMENTS, "--path"])
        .arg(search())
        .args(["--distro", "ubuntu", "--release", "noble"])
        .arg(&dir)
        .assert()
        .success();
    assert_eq!(
        read(&dir.join("pkgs-base")),
        "curl\tcurl libcurl4t64\ndev-tools\tbuild-essential pkg-config\ngeneric-editor\tvim-tiny\n\
         irqbalance\t\n"
    );
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["pkgs-base"]);

    // Another distro flattens differently.
    strata()
        .args(["dib", "pkg-map-export", "--elements", "pkgs-base", "--path"])
        .arg(search())
        .args(["--distro", "centos"])
        .arg(&dir)
        .assert()
        .success();
    assert_eq!(read(&dir.join("pkgs-base")), "generic-editor\tvim\n");
}

#[test]
fn pkg_map_export_rejects_path_like_element_names() {
    let tmp = tempfile::tempdir().unwrap();
    strata()
        .args(["dib", "pkg-map-export", "--elements", "../x", "--path"])
        .arg(search())
        .args(["--distro", "ubuntu"])
        .arg(tmp.path().join("out"))
        .assert()
        .code(2)
        .stderr(contains("invalid element name"));
}
