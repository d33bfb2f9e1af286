//! Disk outputs (`-t raw,qcow2`) of `strata build` on the busybox fixture with real loop
//! devices: partition tables and labels read back from the files, the output step's caching,
//! failures and SIGKILL leaving no loop device or mount; and (ignored, for CI) the boot test of
//! `vm debian-minimal` under qemu.

use crate::harness::{BuildFixture, Manifest, repo, signal_when, steps_then};
use nix::sys::signal::Signal;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Every step of a disk build of the fixture, in run order.
fn fixture_steps() -> Vec<&'static str> {
    steps_then(&["output/disk"])
}

fn shipped_elements() -> String {
    repo().join("elements").display().to_string()
}

/// Build arguments for the disk fixture with `layout` (a shipped block-device-* element); the
/// harness adds `-t tar`.
fn disk_args<'a>(elements: &'a str, layout: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-t", "raw,qcow2", "--element-path", elements];
    v.extend_from_slice(extra);
    v.extend(["fixture-disk", layout]);
    v
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn partitions(raw: &Path) -> serde_json::Value {
    let text = run_ok("sfdisk", &["--json", &raw.display().to_string()]);
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["partitiontable"].clone()
}

/// `blkid -p` of the file system starting at `start` sectors into `raw`: (LABEL, TYPE).
fn probe(raw: &Path, start: u64) -> (String, String) {
    let offset = (start * 512).to_string();
    let value = |tag: &str| {
        run_ok(
            "blkid",
            &[
                "-p",
                "-O",
                &offset,
                "-s",
                tag,
                "-o",
                "value",
                &raw.display().to_string(),
            ],
        )
        .trim()
        .to_string()
    };
    (value("LABEL"), value("TYPE"))
}

/// Copies one partition out of `raw` (for e2fsck / debugfs, which take no offset).
fn extract(raw: &Path, start: u64, size: u64, to: &Path) {
    run_ok(
        "dd",
        &[
            &format!("if={}", raw.display()),
            &format!("of={}", to.display()),
            "bs=512",
            &format!("skip={start}"),
            &format!("count={size}"),
            "conv=sparse",
            "status=none",
        ],
    );
}

/// Loop devices whose backing file is (inode, "major:minor").
fn loops_backed_by(ino: u64, dev: &str) -> Vec<String> {
    let text = run_ok(
        "losetup",
        &["--list", "--json", "-O", "NAME,BACK-INO,BACK-MAJ:MIN"],
    );
    if text.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["loopdevices"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|l| {
            l["back-ino"].as_u64() == Some(ino)
                && l["back-maj:min"].as_str().map(str::trim) == Some(dev)
        })
        .map(|l| l["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Every loop device whose backing file lies under `dir` (as the kernel recorded its path).
fn loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

fn outputs(m: &Manifest) -> Vec<(String, String, bool)> {
    m.0["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["type"].as_str().unwrap().to_string(),
                o["blake3"].as_str().unwrap().to_string(),
                o["cached"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn blake3_of(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

#[test]
fn an_edited_hook_rewrites_the_qcow2_reusing_the_previous_images_clusters() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let args = disk_args(&el, "block-device-mbr", &[]);
    let sde = [("SOURCE_DATE_EPOCH", "1700000000")];
    f.build_ok_with(&args, &sde);
    let hook = f.elements().join("fixture-app/install.d/90-last");
    let text = fs::read_to_string(&hook).unwrap();
    fs::write(
        &hook,
        format!(
            "{text}
echo edited > /etc/fixture/edited
"
        ),
    )
    .unwrap();
    let out = f.build_cmd(&args).envs(sde).output().unwrap();
    f.assert_no_leftovers();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("reused from the previous image"))
        .unwrap_or_else(|| panic!("no qcow2 write line:\n{err}"));
    let reused: u64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" reused from the previous image"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let compressed: u64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" compressed"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reused > compressed,
        "the edit should reuse most clusters: {line}"
    );
    // The new qcow2 is sound and holds exactly the new raw disk.
    let (raw, qcow2) = (f.out("img.raw"), f.out("img.qcow2"));
    run_ok("qemu-img", &["check", &qcow2.display().to_string()]);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &raw.display().to_string(),
            &qcow2.display().to_string(),
        ],
    );
}

#[test]
fn mbr_raw_qcow2_and_tar_from_one_build_read_back_as_configured_and_rerun_from_the_cache() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let args = disk_args(&el, "block-device-mbr", &[]);
    let m = f.build_ok(&args);
    assert_eq!(m.ran(), fixture_steps());
    assert!(loops_under(f.path()).is_empty());
    let (raw, qcow2, tar) = (f.out("img.raw"), f.out("img.qcow2"), f.out("img.tar"));
    let types: Vec<String> = outputs(&m).into_iter().map(|o| o.0).collect();
    assert_eq!(types, ["tar", "raw", "qcow2"]);
    for p in [&raw, &qcow2, &tar] {
        assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o644);
    }

    // The qcow2 is sound and holds the same disk as the raw file.
    run_ok("qemu-img", &["check", &qcow2.display().to_string()]);
    let info = run_ok(
        "qemu-img",
        &["info", "--output=json", &qcow2.display().to_string()],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(fs::metadata(&raw).unwrap().len())
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &raw.display().to_string(),
            &qcow2.display().to_string(),
        ],
    );

    // block-device-mbr: one bootable primary Linux partition at 1 MiB filling the disk.
    let table = partitions(&raw);
    assert_eq!(table["label"], "dos");
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{table}");
    assert_eq!(parts[0]["type"], "83");
    assert_eq!(parts[0]["bootable"], true);
    let start = parts[0]["start"].as_u64().unwrap();
    let size = parts[0]["size"].as_u64().unwrap();
    assert_eq!(start, 2048);
    assert_eq!(
        probe(&raw, start),
        ("cloudimg-rootfs".to_string(), "ext4".to_string())
    );

    // The root file system is clean and carries the fstab and the hooks' traces.
    let part = f.path().join("root.ext4");
    extract(&raw, start, size, &part);
    run_ok("e2fsck", &["-fn", &part.display().to_string()]);
    let cat = |file: &str| {
        run_ok(
            "debugfs",
            &["-R", &format!("cat {file}"), &part.display().to_string()],
        )
    };
    assert_eq!(
        cat("/etc/fstab"),
        "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n"
    );
    let env = cat("/etc/fixture/disk-finalise");
    for line in [
        "DIB_ROOT_LABEL=cloudimg-rootfs",
        "DIB_ROOT_FSTYPE=ext4",
        "DIB_BOOT_LABEL=",
        "DIB_MOUNTPOINTS=/",
        "DIB_BLOCK_DEVICE=mbr",
        "disk-node=yes",
        "partition-node=yes",
        "devices-list=yes",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in:\n{env}");
    }
    assert_eq!(
        cat("/etc/fixture/disk-pre-finalise"),
        "root-mounted=yes\nIMAGE_BLOCK_DEVICE_SET=yes\n"
    );
    assert_eq!(cat("/etc/fixture/cleanup"), "cleanup target-root-set\n");
    fs::remove_file(&part).unwrap();

    // The tar is taken from the finished disk: the same files, after dib's clean-up.
    assert_eq!(
        f.tar_member(&tar, "etc/fstab").as_deref(),
        Some("LABEL=cloudimg-rootfs / ext4 defaults 0 1\n")
    );
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/finalise").as_deref(),
        Some("finalise\n")
    );
    assert_eq!(
        f.tar_member(&tar, "var/log/fixture.log").as_deref(),
        Some("")
    );
    let listing = f.tar_list(&tar);
    assert!(
        !listing.iter().any(|l| l.contains("scratch-file")),
        "{listing:?}"
    );

    // A no-op rerun runs nothing and leaves the outputs as they are.
    let digests: Vec<String> = [&tar, &raw, &qcow2].iter().map(|p| blake3_of(p)).collect();
    let again = f.build_ok(&args);
    assert!(again.ran().is_empty(), "{:?}", again.ran());
    assert_eq!(outputs(&again), {
        let mut o = outputs(&m);
        o.iter_mut().for_each(|x| x.2 = true);
        o
    });

    // With the outputs gone, a rerun writes them again from the cache, byte for byte.
    for p in [&raw, &qcow2, &tar] {
        fs::remove_file(p).unwrap();
    }
    let restored = f.build_ok(&args);
    assert!(restored.ran().is_empty(), "{:?}", restored.ran());
    let now: Vec<String> = [&tar, &raw, &qcow2].iter().map(|p| blake3_of(p)).collect();
    assert_eq!(now, digests);
    assert!(outputs(&restored).iter().all(|o| o.2));
    // The restored raw image is sparse again.
    let md = fs::metadata(&raw).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < md.len() / 4,
        "restored raw image is not sparse"
    );

    // Editing a finalise.d hook reruns only the disk step.
    let hook = f.elements().join("fixture-disk/finalise.d/10-fixture-disk");
    let body = fs::read_to_string(&hook).unwrap() + "echo edited > /etc/fixture/edited\n";
    fs::write(&hook, body).unwrap();
    let edited = f.build_ok(&args);
    assert_eq!(edited.ran(), ["output/disk"]);
    assert_eq!(
        f.tar_member(&tar, "etc/fixture/edited").as_deref(),
        Some("edited\n")
    );
    assert!(loops_under(f.path()).is_empty());
}

#[test]
fn gpt_layout_with_root_label_and_checksums() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let args = disk_args(
        &el,
        "block-device-gpt",
        &["--root-label", "strata-root", "--checksum", "-u"],
    );
    f.build_ok(&args);
    let raw = f.out("img.raw");
    let table = partitions(&raw);
    assert_eq!(table["label"], "gpt");
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{table}");
    // BIOS boot partition (EF02), 8 MiB, then the root file system.
    assert_eq!(
        parts[0]["type"].as_str().unwrap().to_uppercase(),
        "21686148-6449-6E6F-744E-656564454649"
    );
    assert_eq!(parts[0]["size"].as_u64(), Some(8 * 2048));
    assert_eq!(parts[0]["name"], "BSP");
    assert_eq!(parts[1]["name"], "root");
    let start = parts[1]["start"].as_u64().unwrap();
    assert_eq!(
        probe(&raw, start),
        ("strata-root".to_string(), "ext4".to_string())
    );
    assert_eq!(
        f.tar_member(&f.out("img.tar"), "etc/fstab").as_deref(),
        Some("LABEL=strata-root / ext4 defaults 0 1\n")
    );
    // -u: the qcow2 has no compressed clusters.
    let qcow2 = f.out("img.qcow2");
    let check = run_ok("qemu-img", &["check", &qcow2.display().to_string()]);
    assert!(
        !check.contains("compressed clusters") || check.contains(" 0.00% compressed"),
        "{check}"
    );
    // --checksum: md5sum / sha256sum files that verify.
    for t in ["raw", "qcow2", "tar"] {
        for (tool, ext) in [("md5sum", "md5"), ("sha256sum", "sha256")] {
            let sums = f.out(&format!("img.{t}.{ext}"));
            let out = Command::new(tool)
                .arg("-c")
                .arg(&sums)
                .current_dir(f.path().join("out"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{tool} -c {}", sums.display());
        }
    }
    assert!(loops_under(f.path()).is_empty());
}

#[test]
fn rebuild_from_a_disk_phase_reruns_the_disk_step_in_plan_and_build() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let args = disk_args(&el, "block-device-mbr", &[]);
    f.build_ok(&args);
    let disk_row = |rows: serde_json::Value| rows.as_array().unwrap().last().unwrap().clone();
    assert_eq!(disk_row(f.plan(&args))["cached"], true);
    let forced = [&args[..], &["--rebuild-from", "finalise.d"]].concat();
    let row = disk_row(f.plan(&forced));
    assert_eq!(
        (row["hook"].as_str(), row["cached"].as_bool()),
        (Some("disk"), Some(false))
    );
    let m = f.build_ok(&forced);
    assert_eq!(m.ran(), ["output/disk"]);
}

/// A disk build runs the same rootfs steps as a tree build (dib's install-type environment
/// file included), so switching `-t` between them reuses every one.
#[test]
fn a_disk_build_reuses_every_rootfs_step_of_a_tree_build() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let elements = ["--element-path", &el, "fixture-app", "block-device-mbr"];
    f.build_ok(&elements);
    let m = f.build_ok(&[&["-t", "raw"][..], &elements].concat());
    assert_eq!(m.cached(), crate::harness::SHARED_STEPS, "{:?}", m.ran());
    let env = f
        .tar_member(&f.out("img.tar"), "etc/fixture/install-env")
        .unwrap();
    assert!(env.contains("DIB_DEFAULT_INSTALLTYPE=source"), "{env}");
}

/// Issue 5's "deterministic images": with SOURCE_DATE_EPOCH, two cold builds (the cache wiped in
/// between, a second apart) give the same raw and qcow2 bytes, although finalise.d writes into
/// the mounted ext4 root and the ESP.
#[test]
fn two_cold_builds_with_source_date_epoch_give_the_same_raw_image() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let args = disk_args(&el, "block-device-efi", &[]);
    let sde = [("SOURCE_DATE_EPOCH", "1700000000")];
    let build = |name: &str| {
        let out = f.run_ok(f.build_cmd(&args).envs(sde));
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains("mkfs_root (/) rebuilt from its files"),
            "{log}"
        );
        let m = f.manifest();
        assert_eq!(m.ran(), fixture_steps(), "not a cold build");
        let raw = f.path().join(format!("{name}.raw"));
        fs::rename(f.out("img.raw"), &raw).unwrap();
        fs::remove_dir_all(f.cache()).unwrap();
        (raw, outputs(&m))
    };
    let (a, first) = build("first");
    std::thread::sleep(Duration::from_millis(1100));
    let (b, second) = build("second");
    assert_eq!(blake3_of(&a), blake3_of(&b), "the raw images differ");
    assert_eq!(first, second, "output digests differ");

    // And the image is what finalise.d made: its file is there, the file system is clean.
    let part = partitions(&a)["partitions"][2].clone();
    let (start, size) = (
        part["start"].as_u64().unwrap(),
        part["size"].as_u64().unwrap(),
    );
    let root = f.path().join("root.ext4");
    extract(&a, start, size, &root);
    run_ok("e2fsck", &["-fn", &root.display().to_string()]);
    let seen = run_ok(
        "debugfs",
        &[
            "-R",
            "cat /etc/fixture/finalise",
            &root.display().to_string(),
        ],
    );
    assert_eq!(seen, "finalise\n");
    assert!(loops_under(f.path()).is_empty());
}

/// block-device-efi: an ESP (vfat, /boot/efi) that finalise.d writes into. On a kernel without
/// vfat (as on strata's CI) /boot/efi is staged and written into the ESP with mtools.
#[test]
fn efi_layout_builds_with_what_finalise_wrote_in_the_esp() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    f.build_ok(&disk_args(&el, "block-device-efi", &[]));
    assert!(loops_under(f.path()).is_empty());
    let raw = f.out("img.raw");
    let table = partitions(&raw);
    assert_eq!(table["label"], "gpt");
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{table}");
    assert_eq!(parts[0]["name"], "ESP");
    let start = parts[0]["start"].as_u64().unwrap();
    assert_eq!(
        probe(&raw, start),
        ("MKFS_ESP".to_string(), "vfat".to_string())
    );
    let hello = Command::new("mtype")
        .arg("-i")
        .arg(format!("{}@@{}", raw.display(), start * 512))
        .arg("::/EFI/fixture/hello.txt")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hello.stdout),
        "written by finalise.d\n",
        "{}",
        String::from_utf8_lossy(&hello.stderr)
    );
    // The tar output is taken from the mounted tree: it has the ESP's files too.
    assert_eq!(
        f.tar_member(&f.out("img.tar"), "boot/efi/EFI/fixture/hello.txt")
            .as_deref(),
        Some("written by finalise.d\n")
    );
}

#[test]
fn a_failing_hook_in_the_disk_step_gives_the_hook_error_and_leaves_no_loop_device() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    fs::write(f.path().join("fail-disk"), "").unwrap();
    let out = f.build(&disk_args(&el, "block-device-mbr", &[]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        error,
        [
            "error: hook pre-finalise.d/10-fixture-disk of element fixture-disk failed with exit \
          status 3; its last 1 lines:"
        ],
        "{stderr}"
    );
    assert!(
        stderr.contains("    fixture-disk: failing as asked"),
        "{stderr}"
    );
    assert!(loops_under(f.path()).is_empty());
    assert!(!f.out("img.raw").exists() && !f.out("img.qcow2").exists());
    // The rootfs steps stay cached: a rerun without the failure runs only the disk step.
    fs::remove_file(f.path().join("fail-disk")).unwrap();
    let m = f.build_ok(&disk_args(&el, "block-device-mbr", &[]));
    assert_eq!(m.ran(), ["output/disk"]);
}

#[test]
fn an_absurd_image_size_is_one_line_of_bad_input() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    for size in ["inf", "20000000000000"] {
        let out = f
            .build_cmd(&disk_args(&el, "block-device-mbr", &[]))
            .env("DIB_IMAGE_SIZE", size)
            .output()
            .unwrap();
        f.assert_no_leftovers();
        assert_eq!(out.status.code(), Some(2), "DIB_IMAGE_SIZE={size}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains("not a positive number of GiB"), "{err}");
    }
    assert!(loops_under(f.path()).is_empty());
}

#[test]
fn an_invalid_block_device_config_is_bad_input_naming_its_origin() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let mut cmd = f.build_cmd(&disk_args(&el, "block-device-mbr", &[]));
    cmd.env(
        "DIB_BLOCK_DEVICE_CONFIG",
        "- local_loop:\n    name: image0\n- partitioning:\n    base: image0\n    label: amiga\n    partitions: []\n",
    );
    let out = cmd.output().unwrap();
    f.assert_no_leftovers();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("");
    assert!(
        error.contains("Label must be 'mbr' or 'gpt'") && error.contains("DIB_BLOCK_DEVICE_CONFIG"),
        "{stderr}"
    );
    assert!(loops_under(f.path()).is_empty());
}

#[test]
fn sigkill_during_the_disk_step_leaves_no_loop_device_and_no_mount() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let hold = f.path().join("hold-disk");
    fs::write(&hold, "").unwrap();
    let mut child = f
        .build_cmd(&disk_args(&el, "block-device-mbr", &[]))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stderr = child.stderr.take().unwrap();
    // Wait for the hook holding inside the disk step: the disk is created and mounted then.
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(line) = text.lines().find(|l| l.contains("holding-disk /dev/"))
                        && text.contains(&format!("{line}\n"))
                    {
                        return Some(line.to_string());
                    }
                }
            }
        }
    });
    let line = reader.join().unwrap().expect("the disk step never held");
    // "[pre-finalise.d/10-fixture-disk] holding-disk /dev/loopN INODE MAJ:MIN"
    let fields: Vec<&str> = line.split_whitespace().collect();
    let n = fields.len();
    let (device, ino, majmin) = (
        fields[n - 3].to_string(),
        fields[n - 2].parse::<u64>().unwrap(),
        fields[n - 1].to_string(),
    );
    assert_eq!(
        loops_backed_by(ino, &majmin),
        std::slice::from_ref(&device),
        "the held disk is not attached where the hook says"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(15);
    while !loops_backed_by(ino, &majmin).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{device} still attached 15 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{device} detached {:?} after SIGKILL", killed.elapsed());
    // The hook and what it started die with strata; a rerun resumes at the disk step.
    f.assert_killed_build_left_nothing("sleep 299", &hold);
    let m = f.build_ok(&disk_args(&el, "block-device-mbr", &[]));
    assert_eq!(m.ran(), ["output/disk"]);
}

#[test]
fn sigterm_and_sigint_while_disk_outputs_are_written_stop_the_build_with_143_and_130() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    let bulk = [("DIB_FIXTURE_BULK_MB", "96")];
    let args = [
        "--element-path",
        el.as_str(),
        "fixture-bulk",
        "fixture-disk",
        "block-device-mbr",
    ];
    // SIGTERM while qemu-img compresses the qcow2 (its temp file beside out/img.qcow2 exists).
    let mut cmd = f.build_cmd_typed("img", "qcow2,raw", &args);
    cmd.envs(bulk);
    let (status, stderr) = signal_when(
        &mut cmd,
        || !f.partial_outputs().is_empty(),
        Signal::SIGTERM,
    );
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("cancelled by SIGTERM"), "{stderr}");
    for name in ["img.qcow2", "img.raw", "img.strata.json"] {
        assert!(!f.out(name).exists(), "{name} left after SIGTERM");
    }
    assert!(loops_under(f.path()).is_empty());
    f.assert_no_leftovers();
    // SIGINT while the raw image is copied out, after the tar (taken from the disk) was
    // renamed into place: the cancelled build leaves neither.
    let mut cmd = f.build_cmd_typed("img", "tar,raw", &args);
    cmd.envs(bulk);
    let ready = || f.out("img.tar").exists() && !f.partial_outputs().is_empty();
    let (status, stderr) = signal_when(&mut cmd, ready, Signal::SIGINT);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled by SIGINT"), "{stderr}");
    for name in ["img.tar", "img.raw", "img.strata.json"] {
        assert!(!f.out(name).exists(), "{name} left after SIGINT");
    }
    assert!(loops_under(f.path()).is_empty());
    f.assert_no_leftovers();
    // The rootfs steps were kept; the disk step runs again and finishes.
    f.run_ok(f.build_cmd_typed("img", "tar,raw", &args).envs(bulk));
    let m = f.manifest();
    assert_eq!(m.ran(), ["output/disk"]);
    assert!(f.out("img.raw").exists() && f.out("img.tar").exists());
}

/// Kills qemu when the test ends, however it ends.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `strata build -o vm -t qcow2 vm debian-minimal` (network to the host's Debian mirror), then
/// boots the qcow2 under qemu (TCG) and waits for `login:` on the serial console. Set
/// STRATA_BOOT_TEST_CACHE to reuse a layer cache between runs; TMP_DIR as for any build.
#[test]
#[ignore = "builds vm debian-minimal from the network and boots it under qemu (minutes); CI runs it with --ignored"]
fn vm_debian_minimal_boots_to_a_login_prompt() {
    crate::require_root!();
    let (dir, qcow2, _) = build_vm(&["vm", "debian-minimal"], None);
    boot_to_login(dir.path(), &qcow2, Firmware::Bios);
}

/// `vm block-device-efi debian-minimal` with SOURCE_DATE_EPOCH: an ESP that finalise.d wrote
/// (staged and written with mtools where the kernel has no vfat), a root file system made again
/// from its files after finalise.d; the image boots under UEFI (OVMF) and, through its BIOS
/// boot partition, under SeaBIOS.
#[test]
#[ignore = "builds vm debian-minimal from the network and boots it under qemu (minutes); CI runs it with --ignored"]
fn vm_efi_debian_minimal_with_source_date_epoch_boots_under_uefi_and_bios() {
    crate::require_root!();
    let (dir, qcow2, log) = build_vm(
        &["vm", "block-device-efi", "debian-minimal"],
        Some("1700000000"),
    );
    for fs in ["mkfs_root (/)", "mkfs_ESP (/boot/efi)"] {
        assert!(
            log.contains(&format!("{fs} rebuilt from its files")),
            "{fs} was not rebuilt:\n{log}"
        );
    }
    let console = boot_to_login(dir.path(), &qcow2, Firmware::Uefi);
    assert!(
        console.contains("EFI v") && console.contains("EDK II"),
        "the kernel did not report a UEFI boot"
    );
    let console = boot_to_login(dir.path(), &qcow2, Firmware::Bios);
    assert!(!console.contains("EDK II"));
}

/// `vm debian-minimal reproducible` with SOURCE_DATE_EPOCH, built twice cold in two folders
/// with two caches: every step gives the same layer (`strata diff` exits 0 and counts them),
/// the raw and qcow2 images are byte-identical, and the image boots.
#[test]
#[ignore = "builds vm debian-minimal twice from the network and boots it under qemu (minutes); CI runs it with --ignored"]
fn vm_debian_minimal_reproducible_built_twice_is_identical_and_boots() {
    crate::require_root!();
    let elements = ["vm", "debian-minimal", "reproducible"];
    let sde = Some("1700000000");
    let (a, a_qcow2, _) = build_vm_in(&elements, sde, "raw,qcow2", false);
    let (b, b_qcow2, _) = build_vm_in(&elements, sde, "raw,qcow2", false);
    let out = crate::harness::strata()
        .arg("diff")
        .arg(a.path().join("vm.strata.json"))
        .arg(b.path().join("vm.strata.json"))
        .arg("--cache-dir")
        .arg(a.path().join("cache"))
        .arg("--cache-dir")
        .arg(b.path().join("cache"))
        .arg("--json")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let steps = report["steps"].as_array().unwrap().len() as u64;
    assert_eq!(
        report["identical_steps"].as_u64(),
        Some(steps),
        "{report:#}"
    );
    eprintln!("reproducible: {steps} of {steps} steps identical");
    assert_eq!(fs::read(&a_qcow2).unwrap(), fs::read(&b_qcow2).unwrap());
    assert_eq!(
        blake3::hash(&fs::read(a.path().join("vm.raw")).unwrap()),
        blake3::hash(&fs::read(b.path().join("vm.raw")).unwrap())
    );
    boot_to_login(a.path(), &a_qcow2, Firmware::Bios);
}

/// Builds `elements` as qcow2 (with `sde` as SOURCE_DATE_EPOCH when given) in a temp dir under
/// /var/tmp; returns the dir, the qcow2 and the build's output.
fn build_vm(elements: &[&str], sde: Option<&str>) -> (tempfile::TempDir, PathBuf, String) {
    build_vm_in(elements, sde, "qcow2", true)
}

/// `build_vm` with the output types `types`; `shared_cache`: use STRATA_BOOT_TEST_CACHE when
/// it is set (else, and always when false, a cache in the temp dir).
fn build_vm_in(
    elements: &[&str],
    sde: Option<&str>,
    types: &str,
    shared_cache: bool,
) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::Builder::new()
        .prefix("strata-boot.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cache = std::env::var_os("STRATA_BOOT_TEST_CACHE")
        .filter(|_| shared_cache)
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("cache"));
    let image = dir.path().join("vm");
    let started = Instant::now();
    let mut cmd = crate::harness::strata();
    cmd.arg("build")
        .arg("-o")
        .arg(&image)
        .args(["-t", types, "--cache-dir"])
        .arg(&cache)
        .args(elements)
        .env("STRATA_ELEMENTS_DIR", repo().join("elements"))
        .env_remove("ELEMENTS_PATH")
        .env_remove("SOURCE_DATE_EPOCH")
        .current_dir(dir.path());
    if let Some(sde) = sde {
        cmd.env("SOURCE_DATE_EPOCH", sde);
    }
    let out = cmd.output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build failed: {log}");
    eprintln!(
        "build of {elements:?} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let qcow2 = dir.path().join("vm.qcow2");
    run_ok("qemu-img", &["check", &qcow2.display().to_string()]);
    assert!(loops_under(dir.path()).is_empty());
    (dir, qcow2, log)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Firmware {
    /// qemu's default SeaBIOS.
    Bios,
    /// OVMF (Debian's `ovmf` package), with a private copy of its variable store.
    Uefi,
}

/// Boots `qcow2` (snapshot mode) and waits up to 5 minutes for `login:` on the serial console;
/// returns the console text.
pub(crate) fn boot_to_login(dir: &Path, qcow2: &Path, firmware: Firmware) -> String {
    let serial = dir.join(format!("serial-{firmware:?}.log"));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-m", "1024", "-smp", "1", "-display", "none", "-monitor", "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .arg("-drive")
    .arg(format!("file={},format=qcow2,if=virtio", qcow2.display()))
    .args(["-snapshot", "-nic", "none", "-no-reboot"]);
    if firmware == Firmware::Uefi {
        let vars = dir.join("OVMF_VARS.fd");
        fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("ovmf is installed");
        qemu.arg("-drive")
            .arg("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    let booted = Instant::now();
    let child = qemu
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    let mut qemu = Qemu(child);
    let deadline = booted + Duration::from_secs(300);
    loop {
        let console = fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&console).contains("login:") {
            break;
        }
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!(
                "qemu ({firmware:?}) exited ({status}) before a login prompt; console:\n{}",
                String::from_utf8_lossy(&console)
            );
        }
        if Instant::now() > deadline {
            panic!(
                "no login prompt within 5 minutes ({firmware:?}); console tail:\n{}",
                String::from_utf8_lossy(&console[console.len().saturating_sub(4000)..])
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "{firmware:?}: login prompt after {:.1} s of boot",
        booted.elapsed().as_secs_f64()
    );
    drop(qemu);
    let console = String::from_utf8_lossy(&fs::read(&serial).unwrap()).into_owned();
    assert!(
        console.contains("console=ttyS0,115200"),
        "kernel command line lacks the serial console"
    );
    console
}

#[test]
fn disk_image_create_defaults_to_a_qcow2_image_like_dib() {
    crate::require_root!();
    let f = BuildFixture::new();
    f.run_ok(
        crate::harness::strata()
            .args(["disk-image-create", "-n", "-o"])
            .arg(f.out("img"))
            .arg("--cache-dir")
            .arg(f.cache())
            .arg("--element-path")
            .arg(f.elements())
            .arg("--element-path")
            .arg(shipped_elements())
            .args(["fixture-disk", "block-device-mbr"])
            .env_remove("ELEMENTS_PATH")
            .env("STRATA_ELEMENTS_DIR", f.path().join("no-builtin-elements"))
            .env("TMP_DIR", f.path().join("tmp"))
            .env("DIB_FIXTURE_DIR", repo().join("tests/fixtures"))
            .env("DIB_IMAGE_CACHE", f.path().join("image-cache")),
    );
    let m = f.manifest();
    let types: Vec<String> = outputs(&m).into_iter().map(|o| o.0).collect();
    assert_eq!(types, ["qcow2"]);
    run_ok(
        "qemu-img",
        &["check", &f.out("img.qcow2").display().to_string()],
    );
    assert!(!f.out("img.tar").exists());
    assert!(loops_under(f.path()).is_empty());
}

#[test]
fn tgz_and_squashfs_come_from_the_finished_disk_beside_the_qcow2() {
    crate::require_root!();
    let f = BuildFixture::new();
    let el = shipped_elements();
    // The harness adds tar.
    let args = [
        "-t",
        "qcow2,tgz,squashfs",
        "--element-path",
        &el,
        "fixture-disk",
        "block-device-mbr",
    ];
    let m = f.build_ok(&args);
    assert_eq!(m.ran(), fixture_steps());
    assert!(loops_under(f.path()).is_empty());
    let types: Vec<String> = outputs(&m).into_iter().map(|o| o.0).collect();
    assert_eq!(types, ["tar", "qcow2", "tgz", "squashfs"]);
    let (tar, qcow2, tgz, squash) = (
        f.out("img.tar"),
        f.out("img.qcow2"),
        f.out("img.tgz"),
        f.out("img.squash"),
    );
    let paths = [&tar, &qcow2, &tgz, &squash];
    for (o, p) in outputs(&m).iter().zip(paths) {
        assert_eq!(blake3_of(p), o.1, "{}", o.0);
    }
    run_ok("qemu-img", &["check", &qcow2.display().to_string()]);

    // The tgz is the tar gzipped; both were taken from the disk (its fstab is in them).
    let gz = Command::new("gzip").arg("-dc").arg(&tgz).output().unwrap();
    assert!(gz.status.success());
    assert!(
        gz.stdout == fs::read(&tar).unwrap(),
        "gzip -dc img.tgz != img.tar"
    );
    let fstab = "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n";
    assert_eq!(f.tar_member(&tar, "etc/fstab").as_deref(), Some(fstab));
    let squash_s = squash.display().to_string();
    assert_eq!(
        run_ok("unsquashfs", &["-cat", &squash_s, "etc/fstab"]),
        fstab
    );
    assert_eq!(
        run_ok("unsquashfs", &["-cat", &squash_s, "etc/fixture/finalise"]),
        "finalise\n"
    );
    let listing = run_ok("unsquashfs", &["-l", &squash_s]);
    assert!(
        listing
            .lines()
            .any(|l| l == "squashfs-root/etc/fixture/install-env"),
        "{listing}"
    );
    assert!(!listing.contains("scratch-file"), "{listing}");

    // A no-op rerun runs nothing; deleted tree outputs come back identical from the store.
    let digests: Vec<String> = paths.iter().map(|p| blake3_of(p)).collect();
    let again = f.build_ok(&args);
    assert!(again.ran().is_empty(), "{:?}", again.ran());
    assert!(outputs(&again).iter().all(|o| o.2));
    fs::remove_file(&tgz).unwrap();
    fs::remove_file(&squash).unwrap();
    let restored = f.build_ok(&args);
    assert!(restored.ran().is_empty(), "{:?}", restored.ran());
    let now: Vec<String> = paths.iter().map(|p| blake3_of(p)).collect();
    assert_eq!(now, digests);
    assert!(loops_under(f.path()).is_empty());
}
