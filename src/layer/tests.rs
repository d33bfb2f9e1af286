//! Tests of the layer module: real trees in temp dirs (as root), packed, unpacked and compared.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

pub(crate) fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub(crate) fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = cpath(p);
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev as libc::dev_t) };
    assert_eq!(r, 0, "mknod {}", p.display());
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

pub(crate) fn set_mtime(p: &Path, sec: i64) {
    let c = cpath(p);
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: 0,
    };
    let ts = [t, t];
    // SAFETY: valid path and timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}

/// Sets every mtime under `root` (deepest first, so directories keep theirs).
fn set_all_mtimes(root: &Path, sec: i64) {
    let mut paths: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in paths {
        set_mtime(&p, sec);
    }
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

/// A tree with every file type and the awkward metadata the format must carry.
fn make_rich_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/ssl")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::create_dir_all(root.join("secret")).unwrap();
    write(&root.join("etc/hostname"), b"strata\n");
    write(&root.join("usr/bin/ping"), b"\x7fELF fake ping");
    fs::set_permissions(
        root.join("usr/bin/ping"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    write(&root.join("usr/bin/wall"), b"wall");
    lchown(&root.join("usr/bin/wall"), 0, 5);
    fs::set_permissions(
        root.join("usr/bin/wall"),
        fs::Permissions::from_mode(0o2755),
    )
    .unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    // A setgid directory (files made in it take its group unless told otherwise) holding a
    // root:root file, a root:root symlink and a group-writable file (a mode the umask cuts).
    fs::create_dir_all(root.join("var/mail")).unwrap();
    lchown(&root.join("var/mail"), 0, 8);
    fs::set_permissions(root.join("var/mail"), fs::Permissions::from_mode(0o2775)).unwrap();
    write(&root.join("var/mail/root-owned"), b"r");
    lchown(&root.join("var/mail/root-owned"), 0, 0);
    std::os::unix::fs::symlink("root-owned", root.join("var/mail/link")).unwrap();
    lchown(&root.join("var/mail/link"), 0, 0);
    write(&root.join("var/mail/shared"), b"s");
    lchown(&root.join("var/mail/shared"), 0, 0);
    fs::set_permissions(
        root.join("var/mail/shared"),
        fs::Permissions::from_mode(0o664),
    )
    .unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
    lchown(&root.join("secret"), 1000, 1001);
    // Capability (binary: NULs, and a 0x0a byte that a line-based PAX parser would split at).
    let cap: [u8; 20] = [
        1, 0, 0, 2, 0x0a, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    xattr::set(root.join("usr/bin/ping"), "security.capability", &cap).unwrap();
    xattr::set(root.join("etc/hostname"), "user.comment", b"hello").unwrap();
    xattr::set(root.join("etc/ssl"), "user.dirattr", b"on a dir").unwrap();
    // Hardlinks.
    write(&root.join("usr/bin/gzip"), b"gzip body");
    fs::hard_link(root.join("usr/bin/gzip"), root.join("usr/bin/gunzip")).unwrap();
    fs::hard_link(root.join("usr/bin/gzip"), root.join("etc/zcat")).unwrap();
    // Symlinks, a long target, an absolute one, a dangling one.
    symlink("../usr/bin/gzip", root.join("etc/gz")).unwrap();
    symlink("/etc/passwd", root.join("etc/abs")).unwrap();
    symlink("x".repeat(300), root.join("etc/long-target")).unwrap();
    lchown(&root.join("etc/abs"), 7, 8);
    // Devices and a FIFO.
    mknod(
        &root.join("dev/null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(
        &root.join("dev/sda"),
        libc::S_IFBLK | 0o660,
        libc::makedev(8, 0),
    );
    mknod(
        &root.join("dev/big"),
        libc::S_IFCHR | 0o600,
        libc::makedev(4095, 1 << 19),
    );
    mknod(&root.join("dev/fifo"), libc::S_IFIFO | 0o640, 0);
    // Long path and non-UTF-8 names.
    let long = root.join("d".repeat(120)).join("e".repeat(90));
    fs::create_dir_all(&long).unwrap();
    write(&long.join("f".repeat(80)), b"deep");
    let bad = OsString::from_vec(b"caf\xe9-\xff".to_vec());
    write(&root.join("etc").join(&bad), b"latin1");
    // Sparse file: 100 MiB hole and one byte.
    let f = fs::File::create(root.join("var.img")).unwrap();
    f.set_len(100 << 20).unwrap();
    drop(f);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(root.join("var.img"))
        .unwrap();
    f.write_all(b"!").unwrap();
    // Medium file with a zero run in the middle (content-defined hole).
    let mut mid = vec![7u8; 300_000];
    mid[70_000..200_000].fill(0);
    write(&root.join("usr/mid.bin"), &mid);
    write(&root.join("empty"), b"");
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    rdev: u64,
    link: Option<Vec<u8>>,
    xattrs: Vec<(OsString, Vec<u8>)>,
    content: Option<blake3::Hash>,
    /// Sorted other paths sharing this inode.
    links: Vec<PathBuf>,
}

/// Everything observable about a tree (inode numbers and ctimes excluded).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let s = scan(root, &ScanOptions::default()).unwrap();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, m) in s.iter() {
        if m.kind != FileKind::Dir && m.nlink > 1 {
            by_ino.entry(m.ino).or_default().push(p.to_path_buf());
        }
    }
    s.iter()
        .map(|(p, m)| {
            let full = root.join(p);
            let mut xattrs: Vec<(OsString, Vec<u8>)> = xattr::list(&full)
                .unwrap()
                .map(|n| {
                    let v = xattr::get(&full, &n).unwrap().unwrap_or_default();
                    (n, v)
                })
                .collect();
            xattrs.sort();
            let content = (m.kind == FileKind::File).then(|| {
                let mut h = blake3::Hasher::new();
                h.update_reader(fs::File::open(&full).unwrap()).unwrap();
                h.finalize()
            });
            let mut links = by_ino.get(&m.ino).cloned().unwrap_or_default();
            links.retain(|x| x != p);
            let node = Node {
                kind: m.kind,
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                size: if m.kind == FileKind::Dir { 0 } else { m.size },
                mtime: m.mtime,
                rdev: m.rdev,
                link: m.link_target.clone(),
                xattrs,
                content,
                links,
            };
            (p.to_path_buf(), node)
        })
        .collect()
}

fn assert_same_tree(a: &Path, b: &Path) {
    let sa = snapshot(a);
    let sb = snapshot(b);
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "path sets differ");
    for (p, na) in &sa {
        assert_eq!(Some(na), sb.get(p), "metadata of {} differs", p.display());
    }
}

fn full_pack(root: &Path, opts: &PackOptions) -> (LayerInfo, Vec<u8>) {
    let s = scan(root, &ScanOptions::default()).unwrap();
    let mut out = Vec::new();
    let info = pack(root, &Changeset::full(&s), &mut out, opts).unwrap();
    (info, out)
}

fn opts1() -> PackOptions {
    PackOptions {
        workers: 1,
        ..PackOptions::default()
    }
}

#[test]
fn rich_tree_round_trips_with_every_file_type_and_metadata() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_rich_tree(&src);
    let (info, blob) = full_pack(&src, &opts1());
    // The 100 MiB hole is neither in the tar nor in the blob.
    assert!(info.tar_size < 2 << 20, "tar is {} bytes", info.tar_size);
    assert!(blob.len() < 200 << 10, "blob is {} bytes", blob.len());
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let st = unpack(&blob[..], &dst, &UnpackOptions::default()).unwrap();
    assert_eq!(st.diff_id, info.diff_id);
    assert_eq!(st.tar_size, info.tar_size);
    assert_eq!(st.entries, info.entries);
    assert_same_tree(&src, &dst);
    // check() reads the same stream: same diff id, same entries, nothing refused.
    let checked = check(&blob[..], Some(&info.diff_id)).unwrap();
    assert_eq!(
        (checked.diff_id, checked.entries, checked.tar_size),
        (info.diff_id.clone(), info.entries, info.tar_size)
    );
    // Sparseness restored.
    let md = fs::metadata(dst.join("var.img")).unwrap();
    assert_eq!(md.len(), (100 << 20) + 1);
    assert!(md.blocks() * 512 < 1 << 20, "{} blocks", md.blocks());
    // The hardlinked trio is one inode.
    assert_eq!(fs::metadata(dst.join("etc/zcat")).unwrap().nlink(), 3);
    // Capability survived chown.
    assert!(
        xattr::get(dst.join("usr/bin/ping"), "security.capability")
            .unwrap()
            .is_some()
    );
}

#[test]
fn tar_format_is_readable_by_gnu_tar_both_ways() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_rich_tree(&src);
    // Ours → GNU tar.
    let s = scan(&src, &ScanOptions::default()).unwrap();
    let tar_path = t.path().join("ours.tar");
    let f = fs::File::create(&tar_path).unwrap();
    write_tar(&src, &Changeset::full(&s), f, &opts1()).unwrap();
    let gnu_dst = t.path().join("gnu-dst");
    fs::create_dir(&gnu_dst).unwrap();
    let st = std::process::Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(&gnu_dst)
        .status()
        .unwrap();
    assert!(st.success());
    assert_same_tree(&src, &gnu_dst);
    // GNU tar → ours.
    let out = std::process::Command::new("tar")
        .args([
            "--sort=name",
            "--xattrs",
            "--numeric-owner",
            "-cf",
            "-",
            "-C",
        ])
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let blob = zstd::encode_all(&out.stdout[..], 3).unwrap();
    let ours = t.path().join("ours-dst");
    fs::create_dir(&ours).unwrap();
    unpack(&blob[..], &ours, &UnpackOptions::default()).unwrap();
    assert_same_tree(&src, &ours);
}

fn simple_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::create_dir_all(root.join("gone/deep/er")).unwrap();
    write(&root.join("a/b/f"), b"one");
    write(&root.join("a/keep"), b"keep");
    write(&root.join("gone/deep/er/x"), b"x");
    write(&root.join("gone/y"), b"y");
    fs::create_dir_all(root.join("dir2file")).unwrap();
    write(&root.join("dir2file/z"), b"z");
    write(&root.join("file2dir"), b"f");
    fs::create_dir_all(root.join("recreated/sub")).unwrap();
    write(&root.join("recreated/old"), b"old");
    write(&root.join("recreated/sub/s"), b"s");
    write(&root.join("chmod"), b"c");
    write(&root.join("chown"), b"c");
}

fn scan0(root: &Path) -> Scan {
    scan(root, &ScanOptions::default()).unwrap()
}

fn paths<'a>(it: impl Iterator<Item = &'a Path>) -> Vec<String> {
    it.map(|p| p.to_string_lossy().into_owned()).collect()
}

#[test]
fn diff_records_each_kind_of_change_and_applies_onto_the_base() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    simple_tree(&src);
    let before = scan0(&src);
    assert!(diff(&before, &scan0(&src)).is_empty());

    // A base restored elsewhere from a full layer.
    let (_, base_blob) = full_pack(&src, &opts1());
    let restored = t.path().join("restored");
    fs::create_dir(&restored).unwrap();
    unpack(&base_blob[..], &restored, &UnpackOptions::default()).unwrap();

    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&src.join("a/b/f"), b"two"); // modify
    write(&src.join("a/new"), b"new"); // add
    fs::set_permissions(src.join("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    lchown(&src.join("chown"), 42, 43);
    fs::remove_dir_all(src.join("gone")).unwrap(); // delete a dir: one whiteout
    fs::remove_dir_all(src.join("dir2file")).unwrap();
    write(&src.join("dir2file"), b"now a file");
    fs::remove_file(src.join("file2dir")).unwrap();
    fs::create_dir(src.join("file2dir")).unwrap();
    write(&src.join("file2dir/inner"), b"inner");
    // Opaque: a new directory (a new inode: the old one is still alive when it is made).
    fs::rename(src.join("recreated"), src.join("recreated.old")).unwrap();
    fs::create_dir(src.join("recreated")).unwrap();
    fs::remove_dir_all(src.join("recreated.old")).unwrap();
    write(&src.join("recreated/fresh"), b"fresh");
    let after = scan0(&src);
    let cs = diff(&before, &after);

    assert_eq!(paths(cs.deleted()), vec!["gone"]);
    assert_eq!(paths(cs.opaque()), vec!["recreated"]);
    let written = paths(cs.written());
    for p in [
        "",
        "a",
        "a/b",
        "a/b/f",
        "a/new",
        "chmod",
        "chown",
        "dir2file",
        "file2dir",
        "file2dir/inner",
        "recreated",
        "recreated/fresh",
    ] {
        assert!(
            written.contains(&p.to_string()),
            "{p} not written: {written:?}"
        );
    }
    assert!(!written.contains(&"a/keep".to_string()));
    assert!(!written.iter().any(|p| p.starts_with("gone/")));

    let mut blob = Vec::new();
    pack(&src, &cs, &mut blob, &opts1()).unwrap();
    let st = unpack(&blob[..], &restored, &UnpackOptions::default()).unwrap();
    assert!(st.whiteouts >= 2);
    assert_same_tree(&src, &restored);
}

#[test]
fn deterministic_across_directories_workers_and_epoch_clamp() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("one");
    let b = t.path().join("elsewhere/two");
    for r in [&a, &b] {
        make_rich_tree(r);
        set_all_mtimes(r, 1_700_000_000);
    }
    let (ia, ba) = full_pack(&a, &opts1());
    let (ib, bb) = full_pack(
        &b,
        &PackOptions {
            workers: 2,
            ..PackOptions::default()
        },
    );
    assert_eq!(ia.diff_id, ib.diff_id);
    assert_eq!(ba, bb, "compressed bytes differ");
    // Clamping: newer mtimes collapse to the epoch.
    set_all_mtimes(&b, 1_800_000_000);
    let clamp = PackOptions {
        source_date_epoch: Some(1_600_000_000),
        ..opts1()
    };
    let (ca, _) = full_pack(&a, &clamp);
    let (cb, _) = full_pack(&b, &clamp);
    assert_eq!(ca.diff_id, cb.diff_id);
    assert_ne!(ca.diff_id, ia.diff_id);
    // A dense copy of the sparse file packs to the same bytes (holes are content-defined).
    let mut dense = vec![0u8; (100 << 20) + 1];
    dense[100 << 20] = b'!';
    fs::remove_file(b.join("var.img")).unwrap();
    write(&b.join("var.img"), &dense);
    set_all_mtimes(&b, 1_700_000_000);
    let (id, _) = full_pack(&b, &opts1());
    assert_eq!(id.diff_id, ia.diff_id);
}

#[test]
fn pax_records_are_split_by_length_not_by_newline() {
    let recs = read::parse_pax(b"29 SCHILY.xattr.user.a=x\ny=z\n11 path=ab\n").unwrap();
    assert_eq!(
        recs,
        vec![
            (b"SCHILY.xattr.user.a".to_vec(), b"x\ny=z".to_vec()),
            (b"path".to_vec(), b"ab".to_vec())
        ]
    );
    assert!(read::parse_pax(b"99 path=ab\n").is_err());
    assert!(read::parse_pax(b"x path=ab\n").is_err());
}

#[test]
fn excludes_skip_the_path_and_its_subtree() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("proc/1")).unwrap();
    fs::create_dir_all(r.join("tmp/in_target.d/x")).unwrap();
    write(&r.join("tmp/keep"), b"k");
    write(&r.join("procfile"), b"p");
    let s = scan(
        r,
        &ScanOptions {
            exclude: vec!["proc".into(), "/tmp/in_target.d".into()],
        },
    )
    .unwrap();
    let got: Vec<String> = s.iter().map(|(p, _)| p.to_string_lossy().into()).collect();
    assert_eq!(got, vec!["", "procfile", "tmp", "tmp/keep"]);
}

fn entries_of(s: &Scan) -> Vec<(PathBuf, Meta)> {
    s.iter()
        .map(|(p, m)| (p.to_path_buf(), m.clone()))
        .collect()
}

#[test]
fn a_rescan_of_the_changed_paths_equals_a_full_scan() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    simple_tree(r);
    write(&r.join("h1"), b"linked");
    fs::hard_link(r.join("h1"), r.join("a/h2")).unwrap();
    symlink("a/keep", r.join("link")).unwrap();
    fs::create_dir_all(r.join("proc/1")).unwrap();
    let opts = ScanOptions {
        exclude: vec!["proc".into()],
    };
    let before = scan(r, &opts).unwrap();

    write(&r.join("a/b/f"), b"one and more");
    fs::remove_dir_all(r.join("gone")).unwrap();
    fs::remove_dir_all(r.join("dir2file")).unwrap();
    write(&r.join("dir2file"), b"now a file");
    fs::remove_file(r.join("file2dir")).unwrap();
    fs::create_dir_all(r.join("file2dir/in/deep")).unwrap();
    write(&r.join("file2dir/in/deep/x"), b"x");
    fs::remove_dir_all(r.join("recreated")).unwrap();
    fs::create_dir(r.join("recreated")).unwrap();
    write(&r.join("recreated/new"), b"new");
    fs::set_permissions(r.join("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(r.join("link")).unwrap();
    symlink("a/b/f", r.join("link")).unwrap();
    // Changed through one name only: the other name of the inode follows.
    fs::OpenOptions::new()
        .append(true)
        .open(r.join("h1"))
        .unwrap()
        .write_all(b" more")
        .unwrap();
    fs::create_dir_all(r.join("fresh/sub")).unwrap();
    write(&r.join("fresh/sub/f"), b"f");
    write(&r.join("proc/1/status"), b"unseen");

    // What changed, as an overlay's upper folder tells it: each changed path, except names a
    // changed folder lost or gained (the root and `a` list theirs again).
    let dirty: Vec<Vec<u8>> = [
        "",
        "a/b/f",
        "dir2file",
        "file2dir",
        "recreated",
        "chmod",
        "link",
        "h1",
        "proc/1",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    let full = scan(r, &opts).unwrap();
    let re = rescan(r, &before, dirty.clone(), &opts).unwrap();
    assert_eq!(entries_of(&re), entries_of(&full));
    assert_eq!(diff(&before, &re), diff(&before, &full));
    assert!(re.get(Path::new("a/h2")).unwrap().size > 6);

    // Leaving out a path that changed gives a stale answer: the set is what decides.
    let stale = rescan(r, &before, vec![b"".to_vec()], &opts).unwrap();
    assert_ne!(entries_of(&stale), entries_of(&full));

    // Other excludes (a mount came or went): a full walk.
    let none = ScanOptions::default();
    let re = rescan(r, &before, Vec::new(), &none).unwrap();
    assert_eq!(entries_of(&re), entries_of(&scan(r, &none).unwrap()));
}

/// The scan's threads see the caller's mounts: a build mounts its tree in a private mount
/// namespace, and threads made before it (a pool) would see the folder under the mount.
#[test]
fn a_scan_sees_the_mounts_of_the_calling_threads_namespace() {
    // Threads that exist before the namespace is entered, as a pool's would.
    rayon::join(|| (), || ());
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    fs::create_dir(&m).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &m,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    for d in 0..20 {
        fs::create_dir_all(m.join(format!("d{d}/sub"))).unwrap();
        write(&m.join(format!("d{d}/sub/f")), b"f");
    }
    let s = scan0(&m);
    nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(s.len(), 1 + 20 * 3);
}

// ---- hostile layers -------------------------------------------------------------------------

enum Ent<'a> {
    File(&'a [u8], &'a [u8]),
    Dir(&'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
}

/// A hand-made tar (names written raw, bypassing the tar crate's own path checks), zstd'd.
fn hostile(entries: &[Ent<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        let (name, link, data): (&[u8], Option<&[u8]>, &[u8]) = match e {
            Ent::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (n, None, d)
            }
            Ent::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, None, b"")
            }
            Ent::Symlink(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                (n, Some(t), b"")
            }
            Ent::Hardlink(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                (n, Some(t), b"")
            }
        };
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

/// A sandbox: `outside/` holds a sentinel, `target/` receives layers.
struct Arena {
    _t: tempfile::TempDir,
    base: PathBuf,
}

impl Arena {
    fn new() -> Arena {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().to_path_buf();
        fs::create_dir_all(base.join("outside/sub")).unwrap();
        fs::create_dir_all(base.join("target")).unwrap();
        write(&base.join("outside/sentinel"), b"intact");
        write(&base.join("outside/sub/inner"), b"intact too");
        Arena { _t: t, base }
    }
    fn target(&self) -> PathBuf {
        self.base.join("target")
    }
    fn outside(&self) -> PathBuf {
        self.base.join("outside")
    }
    fn outside_listing(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = walkdir::WalkDir::new(self.outside())
            .into_iter()
            .map(|e| e.unwrap())
            .map(|e| {
                let data = if e.file_type().is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (e.path().to_path_buf(), data)
            })
            .collect();
        v.sort();
        v
    }
    fn assert_outside_intact(&self) {
        let want = vec![
            (self.outside(), vec![]),
            (self.outside().join("sentinel"), b"intact".to_vec()),
            (self.outside().join("sub"), vec![]),
            (self.outside().join("sub/inner"), b"intact too".to_vec()),
        ];
        assert_eq!(self.outside_listing(), want);
        assert!(!self.base.join("x").exists());
        assert!(!Path::new("/x").exists());
    }
    fn unpack(&self, blob: &[u8]) -> Result<UnpackStats, LayerError> {
        unpack(blob, &self.target(), &UnpackOptions::default())
    }
}

fn assert_unsafe(r: Result<UnpackStats, LayerError>) {
    match r {
        Err(LayerError::Unsafe { .. }) => {}
        other => panic!("expected an Unsafe error, got {other:?}"),
    }
}

#[test]
fn hostile_absolute_and_dotdot_paths_are_refused() {
    for name in [
        b"/tmp/strata-hostile-abs".as_slice(),
        b"../x",
        b"a/../../x",
        b"./../x",
    ] {
        let a = Arena::new();
        let abs = a.base.join("outside/abs-x");
        let abs_name = abs.as_os_str().as_bytes().to_vec();
        let name: &[u8] = if name.starts_with(b"/") {
            &abs_name
        } else {
            name
        };
        assert_unsafe(a.unpack(&hostile(&[Ent::File(name, b"pwned")])));
        assert!(!abs.exists());
        a.assert_outside_intact();
    }
}

#[test]
fn hostile_symlink_in_same_layer_is_not_followed() {
    let a = Arena::new();
    let out = a.outside();
    let out_b = out.as_os_str().as_bytes();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Symlink(b"a", out_b),
        Ent::File(b"a/sentinel", b"pwned"),
    ])));
    a.assert_outside_intact();
    // `a -> /` then `a/etc/x`.
    let a = Arena::new();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Symlink(b"a", b"/"),
        Ent::File(b"a/etc/strata-pwned", b"pwned"),
    ])));
    assert!(!Path::new("/etc/strata-pwned").exists());
    a.assert_outside_intact();
    // A relative symlink climbing out.
    let a = Arena::new();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Symlink(b"up", b"../outside"),
        Ent::Dir(b"up/sub/"),
        Ent::File(b"up/sub/inner", b"pwned"),
    ])));
    a.assert_outside_intact();
}

#[test]
fn hostile_symlink_from_an_earlier_layer_is_not_followed() {
    let a = Arena::new();
    let out = a.outside();
    a.unpack(&hostile(&[Ent::Symlink(b"a", out.as_os_str().as_bytes())]))
        .unwrap();
    assert_unsafe(a.unpack(&hostile(&[Ent::File(b"a/sentinel", b"pwned")])));
    assert_unsafe(a.unpack(&hostile(&[Ent::File(b"a/.wh.sentinel", b"")])));
    assert_unsafe(a.unpack(&hostile(&[Ent::File(b"a/.wh..wh..opq", b"")])));
    a.assert_outside_intact();
    // A regular file replacing the symlink itself is fine: the link is unlinked, not followed.
    a.unpack(&hostile(&[Ent::File(b"a", b"plain")])).unwrap();
    assert_eq!(fs::read(a.target().join("a")).unwrap(), b"plain");
    a.assert_outside_intact();
}

#[test]
fn hostile_hardlinks_are_refused() {
    for target in [
        b"/etc/passwd".as_slice(),
        b"../../x",
        b"../outside/sentinel",
    ] {
        let a = Arena::new();
        assert_unsafe(a.unpack(&hostile(&[Ent::Hardlink(b"h", target)])));
        assert!(!a.target().join("h").exists());
        a.assert_outside_intact();
    }
    // Through a symlink planted first.
    let a = Arena::new();
    let out = a.outside();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Symlink(b"s", out.as_os_str().as_bytes()),
        Ent::Hardlink(b"h", b"s/sentinel"),
    ])));
    assert!(!a.target().join("h").exists());
    assert_eq!(fs::metadata(out.join("sentinel")).unwrap().nlink(), 1);
    a.assert_outside_intact();
}

#[test]
fn hostile_whiteouts_are_refused() {
    for name in [b".wh..".as_slice(), b"a/.wh..", b".wh.", b".wh.."] {
        let a = Arena::new();
        fs::create_dir(a.target().join("a")).unwrap();
        assert!(a.unpack(&hostile(&[Ent::File(name, b"")])).is_err());
        assert!(a.target().join("a").exists());
        a.assert_outside_intact();
    }
    // Symlink dir then an opaque marker below it, in one layer.
    let a = Arena::new();
    let out = a.outside();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Symlink(b"d", out.as_os_str().as_bytes()),
        Ent::File(b"d/.wh..wh..opq", b""),
    ])));
    a.assert_outside_intact();
}

#[test]
fn whiteout_delete_does_not_follow_symlinks_inside_the_deleted_tree() {
    let a = Arena::new();
    let t = a.target();
    fs::create_dir_all(t.join("victim/inner")).unwrap();
    symlink(a.outside(), t.join("victim/inner/link")).unwrap();
    symlink(a.outside().join("sentinel"), t.join("victim/flink")).unwrap();
    let st = a
        .unpack(&hostile(&[Ent::File(b".wh.victim", b"")]))
        .unwrap();
    assert_eq!(st.whiteouts, 1);
    assert!(!t.join("victim").exists());
    a.assert_outside_intact();
}

#[test]
fn whiteout_delete_refuses_to_cross_a_mount() {
    let a = Arena::new();
    let t = a.target();
    fs::create_dir_all(t.join("victim/mnt")).unwrap();
    let m = cpath(&t.join("victim/mnt"));
    let src = cpath(&a.outside());
    // SAFETY: plain bind mount between two paths we own.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            m.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        eprintln!("skipping: bind mount unavailable");
        return;
    }
    let res = a.unpack(&hostile(&[Ent::File(b".wh.victim", b"")]));
    // SAFETY: unmount what we mounted above.
    let u = unsafe { libc::umount2(m.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(u, 0);
    assert!(matches!(res, Err(LayerError::Unsafe { .. })), "{res:?}");
    a.assert_outside_intact();
}

#[test]
fn opaque_marker_keeps_entries_of_the_same_layer() {
    let a = Arena::new();
    let t = a.target();
    fs::create_dir_all(t.join("d/old")).unwrap();
    write(&t.join("d/lower"), b"lower");
    // A foreign ordering: a child before the opaque marker.
    a.unpack(&hostile(&[
        Ent::Dir(b"d/"),
        Ent::File(b"d/+early", b"early"),
        Ent::File(b"d/.wh..wh..opq", b""),
        Ent::File(b"d/late", b"late"),
    ]))
    .unwrap();
    let mut names: Vec<_> = fs::read_dir(t.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![OsStr::new("+early"), OsStr::new("late")]);
}

#[test]
fn corrupt_blob_and_wrong_diff_id_are_errors() {
    let a = Arena::new();
    assert!(matches!(
        a.unpack(b"definitely not zstd"),
        Err(LayerError::Corrupt(_))
    ));
    let blob = hostile(&[Ent::File(b"f", b"data")]);
    let r = unpack(
        &blob[..],
        &a.target(),
        &UnpackOptions {
            expected_diff_id: Some("00".into()),
            ..UnpackOptions::default()
        },
    );
    assert!(matches!(r, Err(LayerError::DiffIdMismatch { .. })));
}

/// A zstd tar of one GNU sparse entry `f` whose map is `segs` (offset, length) with real size
/// `real`, carrying `data` bytes.
fn sparse_layer(segs: &[(u64, u64)], real: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..1].copy_from_slice(b"f");
        g.set_real_size(real);
        for (s, slot) in segs.iter().zip(g.sparse.iter_mut()) {
            slot.set_offset(s.0);
            slot.set_length(s.1);
        }
    }
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).unwrap();
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

#[test]
fn check_refuses_what_unpack_refuses_without_writing_anything() {
    let a = Arena::new();
    let out = a.outside();
    let out_b = out.as_os_str().as_bytes();
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute path",
            hostile(&[Ent::File(b"/etc/strata-x", b"x")]),
        ),
        ("`..`", hostile(&[Ent::File(b"a/../../x", b"x")])),
        (
            "write through a symlink",
            hostile(&[Ent::Symlink(b"a", out_b), Ent::File(b"a/sentinel", b"x")]),
        ),
        (
            "write below a file",
            hostile(&[Ent::File(b"f", b"x"), Ent::File(b"f/g", b"x")]),
        ),
        (
            "opaque marker below a symlink",
            hostile(&[Ent::Symlink(b"d", out_b), Ent::File(b"d/.wh..wh..opq", b"")]),
        ),
        (
            "hardlink out of the tree",
            hostile(&[Ent::Hardlink(b"h", b"../x")]),
        ),
        (
            "absolute hardlink",
            hostile(&[Ent::Hardlink(b"h", b"/etc/passwd")]),
        ),
        (
            "hardlink through a symlink",
            hostile(&[
                Ent::Symlink(b"s", out_b),
                Ent::Hardlink(b"h", b"s/sentinel"),
            ]),
        ),
        ("whiteout of `..`", hostile(&[Ent::File(b"a/.wh..", b"")])),
        ("empty whiteout", hostile(&[Ent::File(b".wh.", b"")])),
        ("empty symlink", hostile(&[Ent::Symlink(b"l", b"")])),
    ];
    for (what, blob) in &refused {
        let r = check(&blob[..], None);
        assert!(matches!(r, Err(LayerError::Unsafe { .. })), "{what}: {r:?}");
        // And unpack agrees.
        let b = Arena::new();
        assert!(b.unpack(blob).is_err(), "{what}: unpack accepted it");
        b.assert_outside_intact();
    }
    // Malformed GNU sparse maps: out of order, past the real size, not matching the data.
    for (segs, real, data) in [
        (vec![(4096u64, 10u64), (0, 10)], 8192u64, vec![1u8; 20]),
        (vec![(0, 10)], 5, vec![1u8; 10]),
        (vec![(0, 10)], 100, vec![1u8; 20]),
    ] {
        let blob = sparse_layer(&segs, real, &data);
        let r = check(&blob[..], None);
        assert!(
            matches!(&r, Err(LayerError::Corrupt(m)) if m.contains("sparse map")),
            "{segs:?}: {r:?}"
        );
        let b = Arena::new();
        assert!(b.unpack(&blob).is_err(), "{segs:?}: unpack accepted it");
    }
    // A sound sparse entry passes both.
    let good = sparse_layer(&[(0, 10), (4096, 10)], 8192, &[7u8; 20]);
    let st = check(&good[..], None).unwrap();
    assert_eq!(Arena::new().unpack(&good).unwrap().diff_id, st.diff_id);
    // Not zstd, truncated, or another diff id.
    assert!(matches!(
        check(&b"not zstd"[..], None),
        Err(LayerError::Corrupt(_))
    ));
    let blob = hostile(&[Ent::File(b"f", b"data")]);
    assert!(matches!(
        check(&blob[..blob.len() / 2], None),
        Err(LayerError::Corrupt(_))
    ));
    assert!(matches!(
        check(&blob[..], Some("00")),
        Err(LayerError::DiffIdMismatch { .. })
    ));
    // Replacing a symlink by a folder, or whiting it out, makes writing below it fine again.
    for ok in [
        hostile(&[
            Ent::Symlink(b"a", out_b),
            Ent::Dir(b"a/"),
            Ent::File(b"a/x", b"x"),
        ]),
        hostile(&[
            Ent::Symlink(b"a", out_b),
            Ent::File(b".wh.a", b""),
            Ent::Dir(b"a/"),
            Ent::File(b"a/x", b"x"),
        ]),
    ] {
        check(&ok[..], None).unwrap();
        let b = Arena::new();
        b.unpack(&ok).unwrap();
        b.assert_outside_intact();
    }
    a.assert_outside_intact();
}

// ---- property tests -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>, u32),
    Symlink(Vec<u8>),
    Fifo,
    Char(u32, u32),
    Hardlink(usize),
}

#[derive(Debug, Clone)]
struct Spec {
    parent: usize,
    name: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattr: Option<Vec<u8>>,
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z][a-z0-9._-]{0,8}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(1u8..=255, 1..12).prop_filter_map("valid name", |v| {
            let ok = !v.contains(&b'/') && v != b"." && v != b".." && !v.starts_with(b".wh.");
            ok.then_some(v)
        }),
        "[a-z]{110,130}".prop_map(|s| s.into_bytes()),
    ]
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Dir),
        4 => (proptest::collection::vec(any::<u8>(), 0..3000), 0u32..300).prop_map(|(d, zeros_kib)| Kind::File(d, zeros_kib)),
        2 => proptest::collection::vec(1u8..=255, 1..200).prop_map(Kind::Symlink),
        1 => Just(Kind::Fifo),
        1 => (0u32..300, 0u32..70000).prop_map(|(a, b)| Kind::Char(a, b)),
        1 => any::<usize>().prop_map(Kind::Hardlink),
    ]
}

fn spec_strategy() -> impl Strategy<Value = Vec<Spec>> {
    proptest::collection::vec(
        (
            any::<usize>(),
            name_strategy(),
            kind_strategy(),
            0u32..0o10000,
            0u32..70000,
            0u32..70000,
            0i64..4_000_000_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        )
            .prop_map(|(parent, name, kind, mode, uid, gid, mtime, xattr)| Spec {
                parent,
                name,
                kind,
                mode,
                uid,
                gid,
                mtime,
                xattr,
            }),
        1..25,
    )
}

/// Builds a tree from a spec; returns false if nothing useful was built.
fn build(root: &Path, specs: &[Spec]) {
    fs::create_dir_all(root).unwrap();
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut made: Vec<(PathBuf, &Spec)> = Vec::new();
    for s in specs {
        let parent = dirs[s.parent % dirs.len()].clone();
        let p = parent.join(OsStr::from_bytes(&s.name));
        if fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        match &s.kind {
            Kind::Dir => {
                fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
            Kind::File(d, zeros_kib) => {
                let mut data = d.clone();
                data.extend(std::iter::repeat_n(0u8, *zeros_kib as usize * 1024));
                data.extend_from_slice(d);
                write(&p, &data);
                files.push(p.clone());
            }
            Kind::Symlink(t) => symlink(OsStr::from_bytes(t), &p).unwrap(),
            Kind::Fifo => mknod(&p, libc::S_IFIFO | 0o644, 0),
            Kind::Char(ma, mi) => mknod(&p, libc::S_IFCHR | 0o644, libc::makedev(*ma, *mi)),
            Kind::Hardlink(i) => {
                if files.is_empty() {
                    continue;
                }
                fs::hard_link(&files[i % files.len()], &p).unwrap();
                // Metadata is the shared inode's: leave it alone.
                continue;
            }
        }
        made.push((p, s));
    }
    // Metadata: owners, then modes, xattrs; mtimes deepest first at the end.
    for (p, s) in &made {
        lchown(p, s.uid, s.gid);
        let is_link = fs::symlink_metadata(p).unwrap().file_type().is_symlink();
        if !is_link {
            let mode = if matches!(s.kind, Kind::Dir) {
                s.mode | 0o700
            } else {
                s.mode
            };
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
            if let (Some(v), Kind::Dir | Kind::File(..)) = (&s.xattr, &s.kind) {
                xattr::set(p, "user.prop", v).unwrap();
            }
        }
    }
    let mut by_depth: Vec<&(PathBuf, &Spec)> = made.iter().collect();
    by_depth.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (p, s) in by_depth {
        set_mtime(p, s.mtime);
    }
    set_mtime(root, 1_000_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn generated_trees_round_trip(specs in spec_strategy()) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        build(&src, &specs);
        let (info, blob) = full_pack(&src, &opts1());
        let dst = t.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let st = unpack(&blob[..], &dst, &UnpackOptions::default()).unwrap();
        prop_assert_eq!(&st.diff_id, &info.diff_id);
        // What strata packs, check() accepts.
        prop_assert_eq!(check(&blob[..], Some(&info.diff_id)).unwrap().entries, info.entries);
        assert_same_tree(&src, &dst);
        // Repacking the unpacked tree gives the same layer.
        let (again, _) = full_pack(&dst, &opts1());
        prop_assert_eq!(again.diff_id, info.diff_id);
    }

    #[test]
    fn generated_diffs_apply_onto_the_base(first in spec_strategy(), second in spec_strategy(), delete in proptest::collection::vec(any::<bool>(), 0..30)) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        build(&src, &first);
        let (_, base) = full_pack(&src, &opts1());
        let dst = t.path().join("dst");
        fs::create_dir(&dst).unwrap();
        unpack(&base[..], &dst, &UnpackOptions::default()).unwrap();
        let before = scan0(&src);
        // Delete some top-level entries, then add a second generated tree on top.
        let top: Vec<PathBuf> = fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
        for (p, d) in top.iter().zip(delete.iter()) {
            if *d {
                if fs::symlink_metadata(p).unwrap().is_dir() {
                    fs::remove_dir_all(p).unwrap();
                } else {
                    fs::remove_file(p).unwrap();
                }
            }
        }
        build(&src.join("zz-second-layer"), &second);
        let after = scan0(&src);
        let cs = diff(&before, &after);
        let mut blob = Vec::new();
        pack(&src, &cs, &mut blob, &opts1()).unwrap();
        check(&blob[..], None).unwrap();
        unpack(&blob[..], &dst, &UnpackOptions::default()).unwrap();
        assert_same_tree(&src, &dst);
    }
}

#[test]
fn a_path_hidden_by_an_exclude_is_not_whited_out() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    fs::create_dir_all(root.join("var/cache/apt/archives")).unwrap();
    fs::write(root.join("var/cache/apt/archives/lock"), "").unwrap();
    fs::write(root.join("etc"), "x").unwrap();
    let before = scan(root, &ScanOptions { exclude: vec![] }).unwrap();
    // A hook bind-mounts something on archives: the scan skips it, the diff must not delete it.
    let after = scan(
        root,
        &ScanOptions {
            exclude: vec![PathBuf::from("var/cache/apt/archives")],
        },
    )
    .unwrap();
    let changes = diff(&before, &after);
    assert!(
        changes.is_empty(),
        "{:?}",
        changes.iter().collect::<Vec<_>>()
    );
    // A real deletion next to it is still a whiteout.
    fs::remove_file(root.join("etc")).unwrap();
    let after = scan(
        root,
        &ScanOptions {
            exclude: vec![PathBuf::from("var/cache/apt/archives")],
        },
    )
    .unwrap();
    let changes = diff(&before, &after);
    assert_eq!(changes.deleted().count(), 1);
}

use crate::testutil::noise;

#[test]
fn a_layer_of_many_decoded_pieces_round_trips_with_its_diff_id() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d/e")).unwrap();
    // Files crossing the 1 MiB boundaries of the decoded pieces, and enough for several.
    write(&src.join("big"), &noise((3 << 20) + 777, 1));
    write(&src.join("d/mid"), &noise((1 << 19) + 3, 2));
    for i in 0..40 {
        write(
            &src.join(format!("d/e/f{i}")),
            &noise(50_000 + i, 3 + i as u64),
        );
    }
    let (info, blob) = full_pack(&src, &opts1());
    assert!(info.tar_size > 5 << 20, "{}", info.tar_size);
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let st = unpack(&blob[..], &dst, &UnpackOptions::default()).unwrap();
    assert_eq!(st.diff_id, info.diff_id);
    assert_eq!(st.tar_size, info.tar_size);
    assert_same_tree(&src, &dst);
    // A stream cut short is an error, not a partial success.
    let dst = t.path().join("cut");
    fs::create_dir(&dst).unwrap();
    let tar = zstd::decode_all(&blob[..]).unwrap();
    let cut = zstd::encode_all(&tar[..(2 << 20) + 100], 3).unwrap();
    assert!(unpack(&cut[..], &dst, &UnpackOptions::default()).is_err());
}

/// The unpacker keeps the directories of the previous entry's parent open: an entry that
/// replaces or removes one of them must not leave later entries writing into a stale
/// descriptor (a deleted directory, or one a symlink now stands for).
#[test]
fn a_cached_parent_replaced_by_a_symlink_is_not_written_through() {
    let a = Arena::new();
    let out = a.outside();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Dir(b"a/"),
        Ent::Dir(b"a/b/"),
        Ent::File(b"a/b/x", b"first"),
        Ent::Symlink(b"a", out.as_os_str().as_bytes()),
        Ent::File(b"a/b/y", b"pwned"),
    ])));
    a.assert_outside_intact();
    // Same one level down, with the child written right after the directory entry (which
    // pushes the new directory on the cached path).
    let a = Arena::new();
    assert_unsafe(a.unpack(&hostile(&[
        Ent::Dir(b"a/"),
        Ent::File(b"a/x", b"first"),
        Ent::Symlink(b"a", out.as_os_str().as_bytes()),
        Ent::File(b"a/sentinel", b"pwned"),
    ])));
    a.assert_outside_intact();
}

#[test]
fn a_cached_parent_replaced_by_a_file_refuses_its_children() {
    let a = Arena::new();
    let r = a.unpack(&hostile(&[
        Ent::Dir(b"a/"),
        Ent::File(b"a/x", b"first"),
        Ent::File(b"a", b"now a file"),
        Ent::File(b"a/y", b"orphan"),
    ]));
    assert_unsafe(r);
    assert_eq!(fs::read(a.target().join("a")).unwrap(), b"now a file");
    a.assert_outside_intact();
}

#[test]
fn a_cached_parent_whited_out_is_made_again_for_later_entries() {
    // A whiteout of the cached top folder, then of the cached folder itself by its parent's
    // entry.
    for whiteout in [&b".wh.a"[..], &b"a/.wh.b"[..]] {
        let a = Arena::new();
        let t = a.target();
        a.unpack(&hostile(&[
            Ent::Dir(b"a/"),
            Ent::Dir(b"a/b/"),
            Ent::File(b"a/b/x", b"gone"),
            Ent::File(whiteout, b""),
            Ent::File(b"a/b/y", b"kept"),
        ]))
        .unwrap();
        assert!(!t.join("a/b/x").exists());
        assert_eq!(fs::read(t.join("a/b/y")).unwrap(), b"kept");
    }
}

#[test]
fn a_cached_parent_emptied_by_an_opaque_marker_is_made_again() {
    let a = Arena::new();
    let t = a.target();
    fs::create_dir_all(t.join("a/b")).unwrap();
    write(&t.join("a/b/lower"), b"lower");
    a.unpack(&hostile(&[
        // `a/b` has no entry of its own in this layer: the marker below deletes it.
        Ent::File(b"a/b/x", b"early"),
        Ent::File(b"a/.wh..wh..opq", b""),
        Ent::File(b"a/b/y", b"late"),
    ]))
    .unwrap();
    assert!(!t.join("a/b/lower").exists());
    assert!(!t.join("a/b/x").exists());
    assert_eq!(fs::read(t.join("a/b/y")).unwrap(), b"late");
}

#[test]
fn a_cached_symlink_parent_replaced_by_a_directory_is_written_into() {
    let a = Arena::new();
    let t = a.target();
    let out = a.outside();
    a.unpack(&hostile(&[
        Ent::Symlink(b"a", out.as_os_str().as_bytes()),
        Ent::Dir(b"a/"),
        Ent::File(b"a/sentinel", b"inside"),
    ]))
    .unwrap();
    assert!(fs::symlink_metadata(t.join("a")).unwrap().is_dir());
    assert_eq!(fs::read(t.join("a/sentinel")).unwrap(), b"inside");
    a.assert_outside_intact();
}
