//! Real Debian builds (debootstrap from the mirror in the host's apt sources): slow and
//! networked, so `#[ignore]`d; CI runs them with `--ignored`.

use crate::harness::{repo, strata};
use std::fs;
use std::path::Path;
use std::process::Command;

fn member(tar: &Path, name: &str) -> Option<String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(tar)
        .arg(name)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn members(tar: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tf").arg(tar).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn manifest(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn ran(m: &serde_json::Value) -> usize {
    m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cached"] == false)
        .count()
}

#[test]
#[ignore = "slow: a real debootstrap build (run with --ignored)"]
fn debian_minimal_builds_a_debian_rootfs_and_reruns_from_the_cache() {
    crate::require_root!();
    let dir = tempfile::Builder::new()
        .prefix("strata-deb.")
        .tempdir()
        .unwrap();
    let run = || {
        let out = strata()
            .current_dir(dir.path())
            .args([
                "build",
                "-t",
                "tar",
                "-o",
                "deb",
                "--cache-dir",
                "cache",
                "debian-minimal",
            ])
            .env("DIB_IMAGE_CACHE", dir.path().join("image-cache"))
            .env("STRATA_ELEMENTS_DIR", repo().join("elements"))
            .env_remove("ELEMENTS_PATH")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        manifest(&dir.path().join("deb.strata.json"))
    };
    let first = run();
    let tar = dir.path().join("deb.tar");
    assert!(member(&tar, "etc/debian_version").is_some());
    // package-installs: lsb-release (pre-install.d) and the kernel (install.d) are installed.
    let status = member(&tar, "var/lib/dpkg/status").unwrap();
    for pkg in [
        "lsb-release",
        "linux-image-amd64",
        "systemd-sysv",
        "ca-certificates",
    ] {
        assert!(
            status.contains(&format!("Package: {pkg}\n")),
            "{pkg} not installed"
        );
    }
    // dpkg: recommends off; daemons no longer blocked; build-time apt settings gone.
    let recommends: String = members(&tar)
        .iter()
        .filter(|m| m.starts_with("etc/apt/apt.conf.d/"))
        .filter_map(|m| member(&tar, m))
        .collect();
    assert!(
        recommends.contains("APT::Install-Recommends \"0\""),
        "{recommends}"
    );
    let list = members(&tar);
    for gone in [
        "usr/sbin/policy-rc.d",
        "etc/apt/apt.conf.d/02strata-no-pkgcache",
    ] {
        assert!(!list.iter().any(|m| m == gone), "{gone} left in the image");
    }
    assert!(
        !list.iter().any(|m| m.ends_with(".deb")),
        "downloaded packages in the image"
    );
    // resolv.conf is the image's own, not the build host's copy used during the build.
    let resolv = member(&tar, "etc/resolv.conf").unwrap_or_default();
    let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(
        host.trim().is_empty() || resolv != host,
        "the host's resolv.conf leaked: {resolv}"
    );
    assert!(
        !list.iter().any(|m| m.contains(".strata-resolv")),
        "resolv.conf aside left"
    );
    // Nothing mounted or left in /tmp of the image.
    assert!(
        !list.iter().any(|m| m.starts_with("tmp/") && m != "tmp/"),
        "/tmp not emptied"
    );
    assert!(ran(&first) > 30);

    let second = run();
    assert_eq!(ran(&second), 0, "a no-op rebuild ran steps");
    assert_eq!(
        first["outputs"][0]["blake3"],
        second["outputs"][0]["blake3"]
    );
}

#[test]
#[ignore = "slow: dib's own elements from PyPI build debian-minimal (run with --ignored)"]
fn dib_own_elements_build_debian_minimal_unchanged() {
    crate::require_root!();
    let status = Command::new("bash")
        .arg(repo().join("tests/dib_build.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "tests/dib_build.sh failed");
}
