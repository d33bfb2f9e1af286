//! Mounts a host hook leaves below the image root (the fixture-hostmount element binds a folder
//! of the image cache on the image's /var/cache/hostmount from root.d, as dib's dpkg element
//! does with its apt cache; an install.d hook writes into it): a build resumed from the cache,
//! here or on another builder through a registry, sees the same mount a cold build sees, and
//! nothing of the mount's content is ever packed into a layer or an output.

use crate::harness::{BuildFixture, Manifest, repo};
use crate::registry_server::RegistryServer;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const ELEMENTS: &[&str] = &["fixture-app", "fixture-hostmount"];
const HOOK: &str = "fixture-hostmount/install.d/60-fill-host-cache";

/// The host folder the root.d hook binds.
fn host_folder(f: &BuildFixture) -> std::path::PathBuf {
    f.path().join("image-cache/hostmount/archives")
}

/// Every file below the host folder, with its content.
fn host_files(f: &BuildFixture) -> BTreeMap<String, String> {
    let dir = host_folder(f);
    walkdir::WalkDir::new(&dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(&dir).unwrap();
            (
                rel.display().to_string(),
                fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}

fn expected_files() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("a.deb".to_string(), "package a\n".to_string()),
        ("partial/b.deb".to_string(), "package b\n".to_string()),
    ])
}

/// Builds the fixture with the host mount element; returns the manifest and stderr.
fn build(f: &BuildFixture, extra: &[&str]) -> (Manifest, String) {
    let args: Vec<&str> = ELEMENTS.iter().chain(extra).copied().collect();
    let out = f.run_ok(&mut f.build_cmd(&args));
    (
        f.manifest(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn edit_hook(f: &BuildFixture, note: &str) {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(f.elements().join(HOOK))
        .unwrap();
    writeln!(file, "# edited: {note}").unwrap();
}

/// The members of a zstd-compressed tar blob (None if it is not one).
fn members_of_blob(path: &Path) -> Option<Vec<String>> {
    let data = zstd::decode_all(fs::File::open(path).ok()?).ok()?;
    let mut tar = Command::new("tar")
        .arg("-tf")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = tar.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = tar.wait_with_output().unwrap();
    writer.join().unwrap();
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

/// Nothing below the mount point is in any blob of the cache (layers and cached outputs) nor
/// in the output tar; the output has the (empty) mount point folder and says the install.d
/// hook ran with the folder mounted.
fn assert_nothing_of_the_mount_packed(f: &BuildFixture) {
    let mut tars = 0;
    for e in walkdir::WalkDir::new(f.cache().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
    {
        if let Some(members) = members_of_blob(e.path()) {
            tars += 1;
            let packed: Vec<_> = members
                .iter()
                .filter(|m| m.contains("hostmount/") && !m.ends_with("var/cache/hostmount/"))
                .collect();
            assert!(
                packed.is_empty(),
                "blob {} packs the mount's content: {packed:?}",
                e.path().display()
            );
        }
    }
    assert!(tars > 3, "expected the cache's layers to be zstd tars");
    let tar = f.out("img.tar");
    let list = f.tar_list(&tar);
    assert!(
        list.iter().any(|p| p == "var/cache/hostmount/"),
        "the mount point folder should be in the output: {list:?}"
    );
    let below: Vec<_> = list
        .iter()
        .filter(|p| p.starts_with("var/cache/hostmount/") && *p != "var/cache/hostmount/")
        .collect();
    assert!(below.is_empty(), "mount content in the output: {below:?}");
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/hostmount-state")
            .unwrap()
            .trim(),
        "mounted"
    );
}

#[test]
fn a_host_folder_bound_by_root_d_gets_the_same_files_cold_and_resumed_and_none_are_packed() {
    crate::require_root!();
    let f = BuildFixture::new();
    let (cold, err) = build(&f, &[]);
    let ran = cold.ran();
    assert!(ran.iter().any(|s| s == "root.d/50-host-cache"), "{ran:?}");
    assert!(err.contains("left /var/cache/hostmount mounted"), "{err}");
    assert!(
        err.contains("unmounted") && err.contains("var/cache/hostmount"),
        "one line per unmounted hook mount expected:\n{err}"
    );
    assert_eq!(host_files(&f), expected_files());
    assert_nothing_of_the_mount_packed(&f);

    // The host folder is gone (a fresh image cache): the resumed build makes it again, as the
    // hook would, and the install.d hook's files land there, not in the image.
    fs::remove_dir_all(f.path().join("image-cache/hostmount")).unwrap();
    edit_hook(&f, "resume");
    let (resumed, err) = build(&f, &[]);
    let cached = resumed.cached();
    for step in ["root.d/10-busybox-rootfs", "root.d/50-host-cache"] {
        assert!(cached.iter().any(|s| s == step), "{step}: {cached:?}");
    }
    assert!(
        resumed
            .ran()
            .iter()
            .any(|s| s == "install.d/60-fill-host-cache"),
        "{:?}",
        resumed.ran()
    );
    assert!(
        err.contains("mounted /var/cache/hostmount again") && err.contains("root.d/50-host-cache"),
        "{err}"
    );
    assert_eq!(host_files(&f), expected_files());
    assert_nothing_of_the_mount_packed(&f);
    // Same keys up to the edited hook: recording mounts does not touch the keys.
    let n = cold
        .steps()
        .iter()
        .position(|(s, _)| s == "install.d/60-fill-host-cache")
        .unwrap();
    assert_eq!(cold.keys()[..n], resumed.keys()[..n]);
    assert_ne!(cold.keys()[n], resumed.keys()[n]);

    // A no-op rerun: nothing runs, the plan shows every step cached.
    let (again, _) = build(&f, &[]);
    assert!(again.ran().is_empty(), "{:?}", again.ran());
    let args: Vec<&str> = ELEMENTS.to_vec();
    let plan = f.plan(&args);
    assert!(
        plan.as_array().unwrap().iter().all(|s| s["cached"] == true),
        "{plan}"
    );
}

#[test]
fn a_step_pulled_from_a_registry_makes_its_mounts_again_on_another_builder() {
    crate::require_root!();
    let Some(reg) = RegistryServer::http("hostmount_registry") else {
        return;
    };
    let r = reg.reference("strata/hostmount");
    let a = BuildFixture::new();
    build(&a, &["--cache-to", &r]);
    assert_eq!(host_files(&a), expected_files());
    fs::remove_dir_all(a.path().join("image-cache/hostmount")).unwrap();

    // Builder B: another folder, another image cache, an empty local cache; its install.d
    // hook differs, so root.d comes from the registry and install.d runs here.
    let b = BuildFixture::new();
    edit_hook(&b, "builder b");
    let (pulled, err) = build(&b, &["--cache-from", &r]);
    let cached = pulled.cached();
    assert!(
        cached.iter().any(|s| s == "root.d/50-host-cache"),
        "{cached:?}\n{err}"
    );
    assert!(
        err.contains("mounted /var/cache/hostmount again"),
        "the pulled step's mount was not made again:\n{err}"
    );
    // B's own image cache got the files (the source is recorded relative to DIB_IMAGE_CACHE);
    // A's folder was not used.
    assert_eq!(host_files(&b), expected_files());
    assert!(!a.path().join("image-cache/hostmount").exists());
    assert_nothing_of_the_mount_packed(&b);

    // The pulled record was copied into B's local cache with its mounts: without the
    // registry, a further edit resumes from it the same way.
    drop(reg);
    fs::remove_dir_all(b.path().join("image-cache/hostmount")).unwrap();
    edit_hook(&b, "again");
    let (local, err) = build(&b, &[]);
    assert!(
        local.cached().iter().any(|s| s == "root.d/50-host-cache"),
        "{err}"
    );
    assert!(err.contains("mounted /var/cache/hostmount again"), "{err}");
    assert_eq!(host_files(&b), expected_files());
}

#[test]
fn a_disk_build_unmounts_what_hooks_left_in_the_tree_and_in_the_disk_and_packs_none_of_it() {
    crate::require_root!();
    let f = BuildFixture::new();
    let shipped = repo().join("elements").display().to_string();
    let args = [
        "--element-path",
        shipped.as_str(),
        "fixture-app",
        "fixture-hostmount",
        "fixture-disk",
        "block-device-mbr",
    ];
    let out = f.run_ok(
        f.build_cmd_typed("img", "tar,raw", &args)
            .env("DIB_FIXTURE_CLEANUP_MOUNT", "1"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // Once before the tree moves into the disk (root.d's), once in the disk (cleanup.d's).
    let unmounted: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("unmounted") && l.contains("var/cache/hostmount"))
        .collect();
    assert_eq!(unmounted.len(), 2, "{err}");
    let mut want = expected_files();
    want.insert("cleanup.deb".into(), "host only\n".into());
    assert_eq!(host_files(&f), want);
    assert_nothing_of_the_mount_packed(&f);
    assert!(f.out("img.raw").exists());
}

#[test]
fn strata_shell_at_a_later_step_sees_the_host_folder_mounted() {
    crate::require_root!();
    let f = BuildFixture::new();
    build(&f, &[]);
    let build = f.build_cmd(ELEMENTS);
    let mut c = crate::util::strata();
    c.arg("shell")
        .args(build.get_args().skip(1))
        .args(["--at", "install.d/60-fill-host-cache", "--"])
        .args([
            "sh",
            "-c",
            "grep -c ' /var/cache/hostmount ' /proc/self/mounts; ls /var/cache/hostmount",
        ]);
    for (k, v) in build.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().unwrap();
    f.assert_no_leftovers();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let seen = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.first(), Some(&"1"), "{seen}\n{err}");
    assert!(lines.contains(&"a.deb"), "{seen}");
    assert!(err.contains("mounted /var/cache/hostmount again"), "{err}");
}
