//! Root-only tests of the whole disk sequence on real loop devices, with guards that unmount
//! and detach whatever a failing test leaves behind before its temp dir is removed.

use super::*;
use crate::image::{BlockDeviceConfig, convert, default_config, parse_config};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MBR: &str = include_str!("../../elements/block-device-mbr/block-device-default.yaml");
const GPT: &str = include_str!("../../elements/block-device-gpt/block-device-default.yaml");
const EFI: &str = include_str!("../../elements/block-device-efi/block-device-default.yaml");
const MIB: u64 = 1 << 20;

/// A temp dir that is only removed once nothing is mounted in it and no loop device uses a
/// file in it (a live mount would make removal descend into the image).
struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: Some(
                tempfile::Builder::new()
                    .prefix("strata-image-")
                    .tempdir()
                    .unwrap(),
            ),
        }
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    fn params(&self, fs: &str, size: u64, seed: Option<[u8; 32]>) -> Params {
        Params {
            image_dir: self.path().join("img"),
            image_size: size,
            root_fs_type: fs.into(),
            root_label: None,
            root_fs_opts: None,
            mount_base: self.path().join("mnt"),
            seed,
            epoch: None,
        }
    }

    /// Nothing of ours is mounted or attached any more.
    fn assert_clean(&self) {
        let p = self.path();
        assert_eq!(
            mounts_under(p),
            Vec::<PathBuf>::new(),
            "mounts left under {p:?}"
        );
        assert_eq!(
            loops_backed_by(p),
            Vec::<String>::new(),
            "loop devices left for {p:?}"
        );
        let out = Command::new("losetup").arg("-a").output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            !listing.contains(p.to_str().unwrap()),
            "losetup -a: {listing}"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let p = dir.path().to_path_buf();
        for m in mounts_under(&p).into_iter().rev() {
            let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
        }
        for dev in loops_backed_by(&p) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        if mounts_under(&p).is_empty() {
            drop(dir);
        } else {
            // Never delete through a live mount.
            let _ = dir.keep();
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn mounts_under(p: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(p))
        .collect()
}

fn loops_backed_by(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(p)
        {
            out.push(format!("/dev/{name}"));
        }
    }
    out
}

fn config(yaml: &str, params: &Params) -> BlockDeviceConfig {
    let mut c = parse_config(yaml).unwrap();
    c.merge_rootfs_params(params);
    c
}

/// Runs a tool that must succeed; returns its stdout.
fn tool_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sfdisk_json(raw: &Path) -> serde_json::Value {
    serde_json::from_str(&tool_ok(Command::new("sfdisk").arg("--json").arg(raw))).unwrap()
}

/// The partition entries of `sfdisk --json`.
fn partitions(raw: &Path) -> Vec<serde_json::Value> {
    sfdisk_json(raw)["partitiontable"]["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `blkid -p -O <offset>` of the raw file: (TYPE, LABEL, UUID).
fn probe(raw: &Path, offset: u64) -> (String, String, String) {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export", "-O", &offset.to_string()])
        .arg(raw)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    (get("TYPE"), get("LABEL"), get("UUID"))
}

fn qcow2_checks(raw: &Path, dir: &Path) {
    let q = dir.join("image.qcow2");
    convert(raw, "qcow2", &q, true, None).unwrap();
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&q)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    crate::outputs::checksums::write(&q).unwrap();
    assert!(dir.join("image.qcow2.sha256").exists());
}

fn ext_cat(raw: &Path, offset: u64, file: &str) -> String {
    debugfs(raw, offset, &format!("cat {file}"))
}

#[test]
fn mbr_image_round_trip() {
    let s = Scratch::new();
    let params = s.params("ext4", 96 * MIB, Some([1; 32]));
    let c = config(MBR, &params);
    assert_eq!(c.root_label().as_deref(), Some("cloudimg-rootfs"));
    let disk = create(&c, &params).unwrap();
    assert_eq!(disk.root_mount(), params.mount_base);
    let dev = disk.device().to_path_buf();
    assert!(dev.to_string_lossy().starts_with("/dev/loop"), "{dev:?}");
    let devices = disk.devices();
    assert_eq!(devices[0].0, "image0");
    assert_eq!(devices[1].0, "root");
    assert_eq!(devices[1].1, PathBuf::from(format!("{}p1", dev.display())));
    assert!(
        disk.devices_env()
            .contains(&format!("[root]={}p1", dev.display()))
    );
    assert_eq!(disk.fstab(), "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n");
    std::fs::create_dir_all(disk.root_mount().join("etc")).unwrap();
    std::fs::write(disk.root_mount().join("etc/fstab"), disk.fstab()).unwrap();
    let raw = disk.unmount().unwrap();
    s.assert_clean();
    assert_eq!(raw, s.path().join("img/image0.raw"));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 96 * MIB);

    let v = sfdisk_json(&raw);
    let pt = &v["partitiontable"];
    assert_eq!(pt["label"], "dos");
    let parts = pt["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["start"], 2048);
    assert_eq!(parts[0]["size"], 94 * 2048);
    assert_eq!(parts[0]["type"], "83");
    assert_eq!(parts[0]["bootable"], true);
    let (t, label, uuid) = probe(&raw, MIB);
    assert_eq!((t.as_str(), label.as_str()), ("ext4", "cloudimg-rootfs"));
    assert_eq!(
        uuid,
        uuid_string(derive_id(&[1; 32], "fs-uuid", "mkfs_root"))
    );
    assert_eq!(
        ext_cat(&raw, MIB, "/etc/fstab"),
        "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n"
    );
    qcow2_checks(&raw, s.path());
}

#[test]
fn gpt_image_round_trip_with_xfs_root() {
    let s = Scratch::new();
    let params = s.params("xfs", 400 * MIB, None);
    let c = config(GPT, &params);
    assert_eq!(c.root_label().as_deref(), Some("img-rootfs"));
    let disk = create(&c, &params).unwrap();
    let names: Vec<String> = disk.devices().into_iter().map(|d| d.0).collect();
    assert_eq!(names, ["image0", "BSP", "root"]);
    assert_eq!(disk.fstab(), "LABEL=img-rootfs / xfs defaults 0 1\n");
    std::fs::write(disk.root_mount().join("hello"), "hi").unwrap();
    let raw = disk.unmount().unwrap();
    s.assert_clean();

    let v = sfdisk_json(&raw);
    let pt = &v["partitiontable"];
    assert_eq!(pt["label"], "gpt");
    let parts = pt["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["type"], "21686148-6449-6E6F-744E-656564454649");
    assert_eq!(parts[0]["name"], "BSP");
    assert_eq!(parts[0]["size"], 8 * 2048);
    assert_eq!(parts[1]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    assert_eq!(parts[1]["name"], "root");
    assert_eq!(parts[1]["start"], 9 * 2048);
    assert_eq!(parts[1]["size"], (400 - 2 - 8) * 2048);
    assert_eq!(parts[1]["attrs"], "LegacyBIOSBootable");
    let (t, label, _) = probe(&raw, 9 * MIB);
    assert_eq!((t.as_str(), label.as_str()), ("xfs", "img-rootfs"));
    qcow2_checks(&raw, s.path());
}

fn kernel_can_mount(fs: &str) -> bool {
    staged::kernel_can_mount(fs)
}

/// `mtype` of a file in the FAT file system at `offset` bytes into `raw`.
fn mtype(raw: &Path, offset: u64, file: &str) -> String {
    tool_ok(
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@{offset}", raw.display()))
            .arg(file)
            .env("MTOOLS_SKIP_CHECK", "1"),
    )
}

/// Runs create() without its mount and fstab nodes: the partition table and mkfs only.
fn create_unmounted(yaml: &str, params: &Params) -> PathBuf {
    let c = config(yaml, params);
    let graph = c.graph(true).unwrap();
    let nodes: Vec<_> = graph
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.kind,
                Kind::Loop { .. } | Kind::Partition { .. } | Kind::Mkfs(_)
            )
        })
        .cloned()
        .collect();
    let g = Graph {
        nodes,
        tables: graph.tables.clone(),
    };
    let mut disk = Disk::empty(&params.mount_base);
    let seed = params.seed.unwrap_or([0; 32]);
    disk.build(&g, params, &seed).unwrap();
    disk.unmount().unwrap()
}

#[test]
fn efi_image_round_trip() {
    let s = Scratch::new();
    let params = s.params("ext4", 700 * MIB, Some([2; 32]));
    let c = config(EFI, &params);
    assert_eq!(c.mount_points(), ["/boot/efi", "/"]);
    // Without kernel vfat (as on strata's CI) /boot/efi is a staging tmpfs written with mtools.
    let disk = create(&c, &params).unwrap();
    assert_eq!(
        disk.fstab(),
        "LABEL=cloudimg-rootfs / ext4 defaults 0 1\nLABEL=MKFS_ESP /boot/efi vfat defaults 0 2\n"
    );
    let esp = disk.root_mount().join("boot/efi");
    std::fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    std::fs::write(esp.join("EFI/BOOT/test.txt"), "efi").unwrap();
    std::fs::write(esp.join(".hidden"), "dot").unwrap();
    std::fs::write(disk.root_mount().join("root.txt"), "root").unwrap();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mi
        .lines()
        .find(|l| l.contains(&format!(" {} ", esp.display())))
        .unwrap_or_else(|| panic!("/boot/efi not mounted: {mi}"));
    let want = if kernel_can_mount("vfat") {
        " - vfat "
    } else {
        " - tmpfs "
    };
    assert!(line.contains(want), "{line}");
    let raw = disk.unmount().unwrap();
    s.assert_clean();

    let parts = partitions(&raw);
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "21686148-6449-6E6F-744E-656564454649",
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        ]
    );
    assert_eq!(parts[0]["size"], 550 * 2048);
    assert_eq!(parts[1]["size"], 8 * 2048);
    let (t, label, uuid) = probe(&raw, MIB);
    assert_eq!((t.as_str(), label.as_str()), ("vfat", "MKFS_ESP"));
    let id = derive_id(&[2; 32], "vfat-volume-id", "mkfs_ESP");
    assert_eq!(
        uuid,
        format!("{:02X}{:02X}-{:02X}{:02X}", id[0], id[1], id[2], id[3])
    );
    let root_off = parts[2]["start"].as_u64().unwrap() * 512;
    let (t, label, _) = probe(&raw, root_off);
    assert_eq!((t.as_str(), label.as_str()), ("ext4", "cloudimg-rootfs"));
    assert_eq!(ext_cat(&raw, root_off, "/root.txt"), "root");
    // The ESP's files, read back with mtools; none of them landed in the root file system.
    assert_eq!(mtype(&raw, MIB, "::/EFI/BOOT/test.txt"), "efi");
    assert_eq!(mtype(&raw, MIB, "::/.hidden"), "dot");
    assert!(!debugfs(&raw, root_off, "ls /boot/efi").contains("EFI"));
    qcow2_checks(&raw, s.path());
}

#[test]
fn default_config_puts_the_root_on_the_whole_loop_device() {
    let s = Scratch::new();
    let mut params = s.params("ext4", 64 * MIB, None);
    params.root_label = Some("rootfs".into());
    params.root_fs_opts = Some("-i 4096 -J size=4".into());
    let c = config(default_config(), &params);
    let disk = create(&c, &params).unwrap();
    // dib's IMAGE_BLOCK_DEVICES lists block devices only (loops and partitions).
    assert_eq!(
        disk.devices(),
        [("image0".to_string(), disk.device().to_path_buf())]
    );
    assert_eq!(disk.fstab(), "LABEL=rootfs / ext4 defaults 0 1\n");
    let raw = disk.unmount().unwrap();
    s.assert_clean();
    let (t, label, _) = probe(&raw, 0);
    assert_eq!((t.as_str(), label.as_str()), ("ext4", "rootfs"));
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&raw)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Total journal size:       4096k"), "{text}");
    // root-fs-opts reached mke2fs: 64 MiB / 4096 bytes per inode.
    assert!(text.contains("Inode count:              16384"), "{text}");
}

#[test]
fn mbr_logical_partitions_and_swap() {
    let s = Scratch::new();
    let params = s.params("ext4", 128 * MIB, None);
    let yaml = "
- local_loop:
    name: image0
- partitioning:
    base: image0
    label: mbr
    partitions:
      - name: root
        flags: [boot, primary]
        size: 40MiB
        mkfs:
          mount: {mount_point: /, fstab: {fsck-passno: 1}}
      - name: var
        size: 40MiB
        mkfs:
          type: ext2
          mount: {mount_point: /var, fstab: {}}
      - name: swap
        type: '82'
        size: 100%
        mkfs:
          type: swap
          mount: {mount_point: none, fstab: {}}
";
    let c = config(yaml, &params);
    let disk = create(&c, &params).unwrap();
    let devs = disk.devices();
    let dev = disk.device().display().to_string();
    assert_eq!(
        devs[1],
        ("root".to_string(), PathBuf::from(format!("{dev}p1")))
    );
    assert_eq!(
        devs[2],
        ("var".to_string(), PathBuf::from(format!("{dev}p5")))
    );
    assert_eq!(
        devs[3],
        ("swap".to_string(), PathBuf::from(format!("{dev}p6")))
    );
    assert_eq!(
        disk.fstab(),
        // dib's order: mount points sorted as strings ("/var" < "none").
        "LABEL=cloudimg-rootfs / ext4 defaults 0 1\nLABEL=mkfs_var /var ext2 defaults 0 2\n\
         LABEL=mkfs_swap none swap sw 0 0\n"
    );
    assert!(
        !s.path().join("mnt/none").exists(),
        "swap must not be mounted"
    );
    let raw = disk.unmount().unwrap();
    s.assert_clean();
    let parts = partitions(&raw);
    let got: Vec<(String, String)> = parts
        .iter()
        .map(|p| {
            (
                p["node"]
                    .as_str()
                    .unwrap()
                    .rsplit("raw")
                    .next()
                    .unwrap()
                    .to_string(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [("1", "83"), ("2", "f"), ("5", "83"), ("6", "82")];
    assert_eq!(
        got,
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    let (t, label, _) = probe(&raw, parts[3]["start"].as_u64().unwrap() * 512);
    assert_eq!((t.as_str(), label.as_str()), ("swap", "mkfs_swap"));
}

#[test]
fn a_failed_create_rolls_everything_back() {
    let s = Scratch::new();
    let params = s.params("ext4", 64 * MIB, None);
    // The second file system is too small for xfs, so mkfs fails after the first is mounted.
    let yaml = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: gpt
    partitions:
      - {name: root, size: 40MiB, mkfs: {mount: {mount_point: /}}}
      - {name: data, size: 100%, mkfs: {type: xfs, mount: {mount_point: /data}}}
";
    let c = config(yaml, &params);
    let e = create(&c, &params).unwrap_err();
    assert!(e.to_string().contains("mkfs"), "{e}");
    s.assert_clean();
    assert!(
        !s.path().join("img/image0.raw").exists(),
        "the raw file is rolled back"
    );
}

#[test]
fn dropping_a_disk_unmounts_and_detaches() {
    let s = Scratch::new();
    let params = s.params("ext4", 64 * MIB, None);
    let c = config(MBR, &params);
    let disk = create(&c, &params).unwrap();
    assert_eq!(mounts_under(s.path()).len(), 1);
    assert_eq!(loops_backed_by(s.path()).len(), 1);
    drop(disk);
    s.assert_clean();
}

/// blake3 of a file.
fn digest(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

/// The 4 KiB blocks that differ between two equally sized files.
fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

fn build_once(yaml: &str, seed: [u8; 32], mount: bool, name: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new();
    let mut params = s.params("ext4", 64 * MIB, Some(seed));
    params.image_dir = s.path().join(name);
    let raw = if mount {
        let disk = create(&config(yaml, &params), &params).unwrap();
        std::fs::write(disk.root_mount().join("data.txt"), "same content").unwrap();
        disk.unmount().unwrap()
    } else {
        create_unmounted(yaml, &params)
    };
    s.assert_clean();
    (s, raw)
}

const EXT4_AND_VFAT: &str = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: gpt
    partitions:
      - {name: ESP, type: EF00, size: 16MiB, mkfs: {type: vfat}}
      - {name: root, size: 100%, mkfs: {mount: {mount_point: /}}}
";

#[test]
fn same_seed_gives_identical_tables_and_file_systems() {
    // Partition table + mkfs output, before the kernel writes anything: byte-identical.
    let (_s1, a) = build_once(EXT4_AND_VFAT, [9; 32], false, "a");
    let (_s2, b) = build_once(EXT4_AND_VFAT, [9; 32], false, "b");
    assert_eq!(
        digest(&a),
        digest(&b),
        "blocks differ: {:?}",
        differing_blocks(&a, &b)
    );
    let (_s3, c) = build_once(EXT4_AND_VFAT, [10; 32], false, "c");
    assert_ne!(digest(&a), digest(&c));
}

#[test]
fn same_seed_after_mounting_differs_only_where_the_kernel_writes() {
    let (_s1, a) = build_once(EXT4_AND_VFAT, [9; 32], true, "a");
    let (_s2, b) = build_once(EXT4_AND_VFAT, [9; 32], true, "b");
    let blocks = differing_blocks(&a, &b);
    eprintln!("differing 4 KiB blocks after mount+write+unmount: {blocks:?}");
    let root = format!("{}?offset={}", a.display(), 17 * MIB);
    let info = Command::new("dumpe2fs").arg(&root).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    let itable = info
        .lines()
        .find(|l| l.contains("Inode table at"))
        .unwrap_or("");
    let journal = Command::new("debugfs")
        .args(["-R", "blocks <8>", &root])
        .output()
        .unwrap();
    let journal = String::from_utf8_lossy(&journal.stdout);
    eprintln!(
        "root fs starts at block 4352; group 0 {}; journal blocks {}..",
        itable.trim(),
        journal.split_whitespace().next().unwrap_or("?")
    );
    // The partition table and the GPT backup never differ.
    let total = std::fs::metadata(&a).unwrap().len() / 4096;
    assert!(
        blocks.iter().all(|&b| b >= 256 && b < total - 8),
        "{blocks:?}"
    );
    // Identifiers are equal (the vfat ESP is not mounted: this kernel may lack vfat).
    assert_eq!(probe(&a, MIB), probe(&b, MIB));
    assert_eq!(probe(&a, 17 * MIB), probe(&b, 17 * MIB));
}

/// A tree of many small files and a few larger ones, in nested folders (as a rootfs has).
fn layout_tree(root: &Path) {
    for d in 0..12 {
        let dir = root.join(format!("d{d}/sub{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..90 {
            let len = 300 + (d * 90 + f) * 97 % 9000;
            std::fs::write(dir.join(format!("f{f}")), vec![(d * 7 + f) as u8 | 1; len]).unwrap();
        }
        std::fs::write(dir.join("big"), vec![d as u8 + 1; 300_000]).unwrap();
    }
}

/// `debugfs -R "blocks PATH"` of every regular file in `tree`, read from `raw`.
fn file_blocks(raw: &Path, tree: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = format!("/{}", p.strip_prefix(tree).unwrap().display());
            let blocks = debugfs(raw, 0, &format!("blocks {rel}"));
            assert!(!blocks.trim().is_empty(), "no blocks for {rel}");
            out.push((rel, blocks.trim().to_string()));
        }
    }
    out
}

#[test]
fn the_same_tree_copied_into_two_fresh_disks_lands_on_the_same_blocks() {
    // What lets the qcow2 writer reuse the previous image's clusters after an edit.
    let src = tempfile::tempdir().unwrap();
    layout_tree(src.path());
    let copy = |name: &str| {
        let s = Scratch::new();
        let mut params = s.params("ext4", 64 * MIB, Some([5; 32]));
        params.image_dir = s.path().join(name);
        let disk = create(&config(default_config(), &params), &params).unwrap();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mi
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(disk.root_mount().to_str().unwrap()))
            .expect("the root is mounted")
            .to_string();
        assert!(line.contains("nodelalloc"), "{line}");
        convert::copy_tree(src.path(), disk.root_mount()).unwrap();
        let raw = disk.unmount().unwrap();
        s.assert_clean();
        (s, raw)
    };
    let (_a, a) = copy("a");
    let (_b, b) = copy("b");
    let (fa, fb) = (file_blocks(&a, src.path()), file_blocks(&b, src.path()));
    assert_eq!(fa.len(), 12 * 91);
    let moved: Vec<_> = fa.iter().zip(&fb).filter(|(x, y)| x != y).collect();
    assert!(moved.is_empty(), "files on other blocks: {moved:?}");
}

const PROBE_ENV: &str = "STRATA_IMAGE_PROBE_DIR";

/// The child of `sigkill_with_a_mounted_disk_leaves_nothing_behind`: creates and mounts a disk
/// in the private mount namespace its parent gave it, reports the loop device, and sleeps.
#[test]
#[ignore = "only runs as the child of sigkill_with_a_mounted_disk_leaves_nothing_behind"]
fn sigkill_probe_child() {
    let dir = PathBuf::from(std::env::var_os(PROBE_ENV).expect("run by the sigkill test"));
    let params = Params {
        image_dir: dir.join("img"),
        image_size: 64 * MIB,
        root_fs_type: "ext4".into(),
        root_label: None,
        root_fs_opts: None,
        mount_base: dir.join("mnt"),
        seed: None,
        epoch: None,
    };
    let disk = create(&config(MBR, &params), &params).unwrap();
    std::fs::write(disk.root_mount().join("busy"), "x").unwrap();
    std::fs::write(
        dir.join("device.tmp"),
        disk.device().to_string_lossy().as_bytes(),
    )
    .unwrap();
    std::fs::rename(dir.join("device.tmp"), dir.join("device")).unwrap();
    std::thread::sleep(Duration::from_secs(120));
    drop(disk);
}

#[test]
fn sigkill_with_a_mounted_disk_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    let s = Scratch::new();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "image::disk::tests::sigkill_probe_child",
        "--test-threads=1",
    ])
    .env(PROBE_ENV, s.path())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec the child only makes two system calls.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let report = s.path().join("device");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !report.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the probe exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the probe never reported its device"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dev = std::fs::read_to_string(&report).unwrap();
    let name = dev.trim().trim_start_matches("/dev/").to_string();
    let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    let file = std::fs::read_to_string(&backing).unwrap();
    assert!(Path::new(file.trim()).starts_with(s.path()), "{file}");
    let autoclear = std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear")).unwrap();
    assert_eq!(autoclear.trim(), "1");
    // The mount lives only in the child's namespace.
    assert!(mounts_under(s.path()).is_empty());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    while backing.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!backing.exists(), "{dev} was not cleared after SIGKILL");
    eprintln!("{dev} cleared {:?} after the probe died", killed.elapsed());
    s.assert_clean();
}

const EPOCH: i64 = 1_700_000_000;

const ROOT_AND_BOOT: &str = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - name: boot
        flags: [primary]
        size: 24MiB
        mkfs: {type: ext4, label: boot, mount: {mount_point: /boot}}
      - {name: root, flags: [primary], size: 100%, mkfs: {mount: {mount_point: /}}}
";

/// Fills a mounted disk the way finalise.d would: files, a folder, a symlink, a hard link, an
/// xattr, all written now (after EPOCH), and a root directory with its own mode.
fn write_like_finalise(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("etc/grub.d")).unwrap();
    std::fs::write(root.join("etc/hostname"), "strata\n").unwrap();
    std::fs::write(root.join("etc/grub.d/00_header"), "set timeout=1\n").unwrap();
    std::os::unix::fs::symlink("hostname", root.join("etc/name")).unwrap();
    std::fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.bak")).unwrap();
    xattr::set(root.join("etc/hostname"), "user.strata", b"kept").unwrap();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o750)).unwrap();
    // Enough inodes for debugfs to write the superblock back (it stamps its write time).
    std::fs::create_dir_all(root.join("usr/share/doc")).unwrap();
    for i in 0..200 {
        std::fs::write(root.join(format!("usr/share/doc/f{i}")), format!("{i}\n")).unwrap();
    }
    if root.join("boot").is_dir() {
        std::fs::write(root.join("boot/vmlinuz"), "kernel").unwrap();
    }
    if root.join("boot/efi").is_dir() {
        std::fs::create_dir_all(root.join("boot/efi/EFI/BOOT")).unwrap();
        std::fs::write(root.join("boot/efi/EFI/BOOT/BOOTX64.EFI"), "loader").unwrap();
    }
}

fn debugfs(raw: &Path, offset: u64, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(format!("{}?offset={offset}", raw.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn e2fsck_clean(raw: &Path, offset: u64) {
    tool_ok(
        Command::new("e2fsck")
            .arg("-fn")
            .arg(format!("{}?offset={offset}", raw.display())),
    );
}

#[test]
fn a_kernel_mounted_vfat_is_copied_out_and_made_again() {
    // Where the kernel has no vfat the ESP is staged; marking it unstaged takes the path of a
    // kernel-mounted ESP (files copied out, umount, mkfs.vfat again, mcopy) on any kernel.
    let unstage = |disk: &mut Disk| {
        for m in &mut disk.mounts {
            m.staged = false;
        }
    };
    let mut raws = Vec::new();
    let mut scratches = Vec::new();
    for name in ["a", "b"] {
        let s = Scratch::new();
        let mut params = s.params("ext4", 700 * MIB, Some([7; 32]));
        params.image_dir = s.path().join(name);
        let mut disk = create(&config(EFI, &params), &params).unwrap();
        write_like_finalise(disk.root_mount());
        unstage(&mut disk);
        let (raw, report) = disk.unmount_reproducible(EPOCH).unwrap();
        s.assert_clean();
        assert!(
            report.iter().all(|r| r.kept_because.is_none()),
            "{report:?}"
        );
        assert_eq!(mtype(&raw, MIB, "::/EFI/BOOT/BOOTX64.EFI"), "loader");
        raws.push(raw);
        scratches.push(s);
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(
        digest(&raws[0]),
        digest(&raws[1]),
        "blocks differ: {:?}",
        differing_blocks(&raws[0], &raws[1])
    );
}

fn build_reproducible(
    yaml: &str,
    size: u64,
    name: &str,
    tamper: impl FnOnce(&Disk),
) -> (Scratch, PathBuf, Vec<Rebuild>) {
    let s = Scratch::new();
    let mut params = s.params("ext4", size, Some([7; 32]));
    params.image_dir = s.path().join(name);
    let disk = create(&config(yaml, &params), &params).unwrap();
    write_like_finalise(disk.root_mount());
    tamper(&disk);
    let (raw, report) = disk.unmount_reproducible(EPOCH).unwrap();
    s.assert_clean();
    let left: Vec<_> = std::fs::read_dir(&params.image_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("image0.raw")]);
    (s, raw, report)
}

/// Two reproducible builds of `yaml` a second apart (so ctimes and the kernel's own times
/// differ) must give the same bytes; returns the first.
fn build_reproducible_twice(yaml: &str, size: u64) -> (Scratch, PathBuf, Vec<Rebuild>) {
    let first = build_reproducible(yaml, size, "a", |_| {});
    std::thread::sleep(Duration::from_millis(1100));
    let (_s, b, _) = build_reproducible(yaml, size, "b", |_| {});
    assert_eq!(
        digest(&first.1),
        digest(&b),
        "blocks differ: {:?}",
        differing_blocks(&first.1, &b)
    );
    first
}

#[test]
fn reproducible_unmount_gives_the_same_bytes_from_two_runs_and_sound_file_systems() {
    let (_s, a, report) = build_reproducible_twice(ROOT_AND_BOOT, 96 * MIB);
    let names: Vec<_> = report
        .iter()
        .map(|r| {
            (
                r.filesystem.as_str(),
                r.mount_point.as_str(),
                r.kept_because.clone(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![("mkfs_root", "/", None), ("mkfs_boot", "/boot", None)]
    );

    let starts: Vec<u64> = partitions(&a)
        .iter()
        .map(|p| p["start"].as_u64().unwrap() * 512)
        .collect();
    let (boot, root) = (starts[0], starts[1]);
    e2fsck_clean(&a, boot);
    e2fsck_clean(&a, root);
    // Identifiers are the seeded ones mkfs was given.
    let (t, label, uuid) = probe(&a, root);
    assert_eq!((t.as_str(), label.as_str()), ("ext4", "cloudimg-rootfs"));
    assert_eq!(
        uuid,
        uuid_string(derive_id(&[7; 32], "fs-uuid", "mkfs_root"))
    );
    assert_eq!(probe(&a, boot).1, "boot");
    // Content, links, xattrs; /boot's files live only in the boot file system.
    assert_eq!(ext_cat(&a, root, "/etc/hostname"), "strata\n");
    assert_eq!(ext_cat(&a, boot, "/vmlinuz"), "kernel");
    let listing = debugfs(&a, root, "ls /boot");
    assert!(!listing.contains("vmlinuz"), "{listing}");
    assert!(debugfs(&a, root, "stat /etc/name").contains("Fast link dest: \"hostname\""));
    assert!(debugfs(&a, root, "stat /etc/hostname.bak").contains("Links: 2"));
    assert!(debugfs(&a, root, "ea_list /etc/hostname").contains("user.strata (4) = \"kept\""));
    // Every time is the epoch; the root directory keeps its mode.
    let hex = format!("0x{EPOCH:x}:00000000");
    for (offset, path) in [(root, "/etc/hostname"), (root, "/"), (boot, "/vmlinuz")] {
        let stat = debugfs(&a, offset, &format!("stat {path}"));
        for field in ["ctime", "atime", "mtime", "crtime"] {
            let line = stat
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{field}:")))
                .unwrap_or_else(|| panic!("no {field} in {stat}"));
            assert!(line.contains(&hex), "{path} {field}: {line}");
        }
    }
    assert!(debugfs(&a, root, "stat /").contains("Mode:  0750"));
    // The superblock: written at the epoch, never mounted.
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(format!("{}?offset={root}", a.display()))
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout);
    for want in [
        "Last mount time:          n/a",
        "Last write time:          Tue Nov 14 22:13:20 2023",
        "Mount count:              0",
        "Filesystem created:       Tue Nov 14 22:13:20 2023",
    ] {
        assert!(header.contains(want), "{want:?} not in\n{header}");
    }
}

#[test]
fn a_reproducible_efi_disk_repeats_with_its_staged_vfat_and_rebuilt_root() {
    let (_s, a, report) = build_reproducible_twice(EFI, 700 * MIB);
    let kept: Vec<_> = report.iter().filter(|r| r.kept_because.is_some()).collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(report.len(), 2, "{report:?}");
    assert_eq!(mtype(&a, MIB, "::/EFI/BOOT/BOOTX64.EFI"), "loader");
    e2fsck_clean(&a, (550 + 8 + 1) * MIB);
}

#[test]
fn a_superblock_a_hook_changed_or_a_grub_block_list_keeps_the_file_system_as_it_was() {
    // A hook ran tune2fs: rebuilding would lose its change.
    let (_s, raw, report) = build_reproducible(MBR, 96 * MIB, "tuned", |disk| {
        let root = &disk.devices()[1].1;
        let out = Command::new("tune2fs")
            .args(["-r", "0"])
            .arg(root)
            .output()
            .unwrap();
        assert!(out.status.success());
    });
    let why = report[0].kept_because.clone().unwrap_or_default();
    assert!(why.contains("Reserved block count"), "{why}");
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(format!("{}?offset={MIB}", raw.display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&header.stdout).contains("Reserved block count:     0\n"));
    e2fsck_clean(&raw, MIB);

    // GRUB's boot sector names a sector inside the root file system (core.img by block list).
    let (_s, raw, report) = build_reproducible(MBR, 96 * MIB, "blocklist", |disk| {
        use std::os::unix::fs::FileExt;
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(disk.device())
            .unwrap();
        dev.write_all_at(b"GRUB ", 0x180).unwrap();
        dev.write_all_at(&(2048u64 + 64).to_le_bytes(), 0x5c)
            .unwrap();
    });
    let why = report[0].kept_because.clone().unwrap_or_default();
    assert!(why.contains("core.img"), "{why}");
    // Not rebuilt: the kernel's change time of a file finalise wrote is still there.
    let stat = debugfs(&raw, MIB, "stat /etc/hostname");
    assert!(!stat.contains(&format!("ctime: 0x{EPOCH:x}")), "{stat}");
    e2fsck_clean(&raw, MIB);
}

#[test]
fn a_rebuild_that_fails_keeps_the_file_system_and_leaves_no_bind_or_scratch_file() {
    // mke2fs refuses an option: the bind of the tree and the scratch image must still go.
    let (_s, raw, report) = build_reproducible(MBR, 96 * MIB, "failing", |_| {});
    assert_eq!(report[0].kept_because, None);
    let s = Scratch::new();
    let mut params = s.params("ext4", 96 * MIB, Some([7; 32]));
    params.image_dir = s.path().join("failing");
    let mut disk = create(&config(MBR, &params), &params).unwrap();
    write_like_finalise(disk.root_mount());
    for fs in disk.filesystems.values_mut() {
        fs.mkfs.args.insert(0, "--no-such-option".into());
    }
    let (broken, report) = disk.unmount_reproducible(EPOCH).unwrap();
    s.assert_clean();
    let why = report[0].kept_because.clone().unwrap_or_default();
    assert!(why.starts_with("rebuilding it failed: `"), "{why}");
    assert!(why.contains("mkfs --no-such-option"), "{why}");
    let left: Vec<_> = std::fs::read_dir(&params.image_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("image0.raw")]);
    // The kernel's file system, sound, with what finalise wrote.
    e2fsck_clean(&broken, MIB);
    assert_eq!(ext_cat(&broken, MIB, "/etc/hostname"), "strata\n");
    assert_ne!(digest(&raw), digest(&broken));
}

#[test]
fn reproducible_unmount_keeps_xfs_and_says_why() {
    if !kernel_can_mount("xfs") {
        eprintln!("skipped: this kernel cannot mount xfs");
        return;
    }
    let s = Scratch::new();
    let params = s.params("xfs", 400 * MIB, Some([3; 32]));
    let disk = create(&config(MBR, &params), &params).unwrap();
    std::fs::write(disk.root_mount().join("f"), "x").unwrap();
    let (raw, report) = disk.unmount_reproducible(EPOCH).unwrap();
    s.assert_clean();
    assert_eq!(report.len(), 1);
    assert!(
        report[0]
            .kept_because
            .as_deref()
            .is_some_and(|w| w.contains("xfs is not rebuilt")),
        "{report:?}"
    );
    assert_eq!(probe(&raw, MIB).0, "xfs");
}
