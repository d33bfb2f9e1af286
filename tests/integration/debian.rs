//! Real Debian builds (debootstrap from the mirror in the host's apt sources): slow and
//! networked, so `#[ignore]`d; CI runs them with `--ignored`.

use crate::harness::{repo, strata};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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

/// Runs one of the scripts that build with dib's own elements (`tests/dib_*.sh`, set up by
/// `tests/dib_env.sh`) with this test binary's strata, and prints its wall time.
fn dib_script(script: &str, args: &[&Path]) {
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(repo().join("tests").join(script))
        .args(args)
        .env("STRATA", env!("CARGO_BIN_EXE_strata"))
        .env_remove("ELEMENTS_PATH")
        .env_remove("STRATA_ELEMENTS_DIR")
        .env_remove("DIB_IMAGE_CACHE")
        .status()
        .unwrap();
    assert!(status.success(), "tests/{script} failed");
    eprintln!(
        "tests/{script} took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "slow: dib's own elements from PyPI build debian-minimal (run with --ignored)"]
fn dib_own_elements_build_debian_minimal_unchanged() {
    crate::require_root!();
    dib_script("dib_build.sh", &[]);
}

/// dib's own `vm debian-minimal` with dib's defaults (DIB_APT_LOCAL_CACHE on: the dpkg
/// element's root.d hook bind-mounts dib's apt cache into the tree, and it must be unmounted
/// before the disk step) builds a qcow2 that boots to a login prompt under qemu (BIOS).
#[test]
#[ignore = "slow: dib's own elements build vm debian-minimal and it boots under qemu (run with --ignored)"]
fn dib_own_elements_build_vm_debian_minimal_that_boots_to_a_login_prompt() {
    crate::require_root!();
    let dir = tempfile::Builder::new()
        .prefix("strata-dib-vm.")
        .tempdir_in("/var/tmp")
        .unwrap();
    dib_script("dib_vm.sh", &[dir.path()]);
    let qcow2 = dir.path().join("vm.qcow2");
    crate::disk::boot_to_login(dir.path(), &qcow2, crate::disk::Firmware::Bios);
}

/// Many of dib's own elements in one `debian-minimal` build, each with the variables it needs,
/// each element's visible effect checked in the tree (`tests/dib_many.sh`).
#[test]
#[ignore = "slow: many of dib's own elements in one debian-minimal build (run with --ignored)"]
fn dib_own_elements_many_together_in_one_build() {
    crate::require_root!();
    dib_script("dib_many.sh", &[]);
}
