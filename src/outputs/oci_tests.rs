use super::*;
use std::cell::Cell;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have(tool: &str) -> bool {
    crate::tools::on_host_path(tool).is_some()
}

const SPARSE_LEN: u64 = 256 * 1024;

/// A small tree with one of everything the tests compare: dirs (one 0700), files (one setuid,
/// one sparse), relative and absolute symlinks, a hardlink, an xattr, a merged-/usr `/bin/sh`,
/// and (as root) files owned by other users.
fn tree(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["etc/app", "usr/bin", "private", "var/empty"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let mode = |p: &str, m: u32| {
        fs::set_permissions(root.join(p), fs::Permissions::from_mode(m)).unwrap();
    };
    fs::write(root.join("etc/hostname"), "strata\n").unwrap();
    fs::write(root.join("etc/app/conf"), "key=value\n".repeat(300)).unwrap();
    mode("etc/app/conf", 0o640);
    fs::write(root.join("usr/bin/sh"), "#!/not/really/a/shell\n").unwrap();
    mode("usr/bin/sh", 0o755);
    fs::write(root.join("usr/bin/su"), "setuid\n").unwrap();
    mode("usr/bin/su", 0o4755);
    fs::write(root.join("private/secret"), "s3cret\n").unwrap();
    mode("private/secret", 0o600);
    mode("private", 0o700);
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("app/conf", root.join("etc/link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("etc/abs")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hard")).unwrap();
    // Sparse: data, a 192 KiB hole, data (a GNU sparse entry in the tar).
    let f = File::create(root.join("var/sparse")).unwrap();
    f.write_all_at(&[7u8; 4096], 0).unwrap();
    f.write_all_at(&[9u8; 4096], SPARSE_LEN - 4096).unwrap();
    xattr::set(root.join("etc/hostname"), "user.strata", b"yes").unwrap();
    if is_root() {
        let own = |p: &str, u: u32, g: u32| {
            std::os::unix::fs::lchown(root.join(p), Some(u), Some(g)).unwrap();
        };
        own("etc/app/conf", 1000, 1001);
        own("private", 1234, 1234);
        own("etc/link", 1000, 1000);
    }
    root
}

fn scan(root: &Path) -> Scan {
    layer::scan(root, &Default::default()).unwrap()
}

fn opts(compression: Compression, sde: Option<i64>) -> ImageOptions {
    ImageOptions {
        compression,
        gzip_level: 6,
        source_date_epoch: sde,
        arch: "amd64".into(),
        tag: "latest".into(),
        created_by: "strata test".into(),
        pack: PackOptions {
            source_date_epoch: sde,
            level: 3,
            workers: 1,
        },
    }
}

const BOTH: Formats = Formats {
    oci: true,
    docker: true,
};

fn never() -> bool {
    false
}

fn write_both(root: &Path, name: &str, o: &ImageOptions) -> Written {
    write(root, &scan(root), name, BOTH, o, &never).unwrap()
}

fn sha256_file(p: &Path) -> String {
    sha256_digest(&Sha256::digest(fs::read(p).unwrap()))
}

fn decompress(p: &Path, c: Compression) -> Vec<u8> {
    let f = File::open(p).unwrap();
    let mut out = Vec::new();
    match c {
        Compression::Gzip => flate2::read::GzDecoder::new(f).read_to_end(&mut out),
        Compression::Zstd => zstd::Decoder::new(f).unwrap().read_to_end(&mut out),
        Compression::None => { f }.read_to_end(&mut out),
    }
    .unwrap();
    out
}

/// Every path under `dir` (relative) with its kind and mode, and its bytes for files.
fn listing(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.unwrap();
        let md = e.path().symlink_metadata().unwrap();
        let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
        let bytes = if md.is_file() {
            fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.push((rel, md.mode(), bytes));
    }
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn skopeo(args: &[&str]) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()
        .unwrap();
    json_of(&out, &format!("skopeo {args:?}"))
}

#[test]
fn dpkg_arches_map_to_oci_platforms_and_unknown_ones_are_refused() {
    for (dpkg, arch, variant) in [
        ("amd64", "amd64", None),
        ("arm64", "arm64", Some("v8")),
        ("armhf", "arm", Some("v7")),
        ("i386", "386", None),
        ("ppc64el", "ppc64le", None),
        ("s390x", "s390x", None),
        ("riscv64", "riscv64", None),
    ] {
        let p = platform(dpkg).unwrap();
        assert_eq!((p.architecture, p.variant), (arch, variant), "{dpkg}");
    }
    let e = platform("x86_64").unwrap_err().to_string();
    assert!(e.contains("x86_64") && e.contains("dpkg name"), "{e}");
}

#[test]
fn docker_repository_names_follow_the_documented_rule() {
    for (name, want) in [
        ("vm", "vm"),
        ("out/Debian-12", "debian-12"),
        ("./out/dir/", "dir"),
        ("My Image", "my-image"),
        ("a.b_c__d---e", "a.b_c__d---e"),
        ("a..b", "a-b"),
        ("a_-b", "a-b"),
        ("-._x_.-", "x"),
        ("Ünïcode", "n-code"),
        ("...", "image"),
        ("", "image"),
    ] {
        assert_eq!(docker_repository(name), want, "{name:?}");
    }
    let long = docker_repository(&format!("{}-x", "a".repeat(127)));
    assert_eq!(
        long,
        "a".repeat(127),
        "cut at 128 and no trailing separator"
    );
    assert!(valid_tag("latest") && valid_tag("v1.2_3-rc") && valid_tag("_x"));
    for bad in ["", ".x", "-x", "a:b", "a/b", &"x".repeat(129)] {
        assert!(!valid_tag(bad), "{bad:?}");
    }
}

#[test]
fn bin_sh_resolves_through_symlinks_inside_the_tree_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let s = scan(&root);
    assert_eq!(resolve(&s, b"bin/sh").unwrap().mode, 0o755);
    // An absolute link is taken from the tree's root, and a loop resolves to nothing.
    std::os::unix::fs::symlink("/usr/bin/../bin/sh", root.join("etc/sh")).unwrap();
    std::os::unix::fs::symlink("loop2", root.join("etc/loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", root.join("etc/loop2")).unwrap();
    let s = scan(&root);
    assert_eq!(resolve(&s, b"etc/sh").unwrap().kind, layer::FileKind::File);
    assert!(resolve(&s, b"etc/loop1").is_none());
    assert!(resolve(&s, b"etc/missing").is_none());
}

#[test]
fn the_layout_and_archive_hold_one_layer_of_the_tree_with_a_pinned_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let name = dir.path().join("img").display().to_string();
    let w = write_both(&root, &name, &opts(Compression::Gzip, Some(1_700_000_000)));
    let oci = w.oci.as_ref().unwrap();
    let docker = w.docker.as_ref().unwrap();
    assert_eq!(oci.path, oci_path(&name));
    assert_eq!(docker.path, docker_path(&name));

    // Layout files: exactly these, every blob named by its sha256.
    assert_eq!(
        names_in(&oci.path),
        ["blobs", "index.json", "oci-layout"],
        "no temp files"
    );
    let blobs = oci.path.join("blobs/sha256");
    let mut want = vec![
        digest_hex(&oci.manifest.digest).unwrap().to_string(),
        digest_hex(&oci.config.digest).unwrap().to_string(),
        digest_hex(&oci.layer.digest).unwrap().to_string(),
    ];
    want.sort();
    assert_eq!(names_in(&blobs), want);
    for b in names_in(&blobs) {
        assert_eq!(sha256_file(&blobs.join(&b)), format!("sha256:{b}"));
    }
    assert_eq!(oci.blake3, layout_blake3(&oci.path).unwrap());
    assert_eq!(
        fs::read(oci.path.join("oci-layout")).unwrap(),
        br#"{"imageLayoutVersion":"1.0.0"}"#
    );

    // The gzip layer is the tar of `-t tar` with the sparse file dense, and its sha256 is
    // the config's diff id.
    let tar = decompress(
        &blobs.join(digest_hex(&oci.layer.digest).unwrap()),
        Compression::Gzip,
    );
    let (mut same, mut sparse) = (Vec::new(), Vec::new());
    let pack = opts(Compression::Gzip, Some(1_700_000_000)).pack;
    let changes = Changeset::full(&scan(&root));
    let info = layer::write_tar_dense(&root, &changes, &mut same, &pack).unwrap();
    layer::write_tar(&root, &changes, &mut sparse, &pack).unwrap();
    assert!(tar == same, "the layer is write_tar_dense's stream");
    assert!(tar.len() > sparse.len(), "the hole is written out");
    let mut kinds = BTreeMap::new();
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        kinds.insert(
            e.path().unwrap().display().to_string(),
            (h.entry_type(), h.size().unwrap()),
        );
    }
    assert!(
        kinds.values().all(|(k, _)| *k != EntryType::GNUSparse),
        "{kinds:?}"
    );
    assert_eq!(kinds["var/sparse"], (EntryType::Regular, SPARSE_LEN));
    assert_eq!(
        kinds["etc/hostname"].0,
        EntryType::Link,
        "etc/hard came first"
    );
    assert_eq!(w.layer.diff_id, sha256_digest(&Sha256::digest(&tar)));
    assert_eq!(w.layer.blake3, info.diff_id);
    assert_eq!(w.layer.tar_size, tar.len() as u64);
    assert_eq!(
        oci.layer.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = fs::read(blobs.join(digest_hex(&oci.layer.digest).unwrap())).unwrap();
    assert_eq!(
        &gz[..10],
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3],
        "no name, mtime 0"
    );

    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(blobs.join(digest_hex(&w.config.digest).unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config,
        serde_json::json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [w.layer.diff_id]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "strata test"}],
        })
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.path.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "latest");
    assert_eq!(
        index["manifests"][0]["digest"],
        oci.manifest.digest.as_str()
    );

    // The archive: its layer entry is the same tar, named by the diff id, and the documents
    // point at it.
    assert_eq!(docker.repo_tag, "img:latest");
    assert_eq!(docker.image_id, w.config.digest);
    let bytes = fs::read(&docker.path).unwrap();
    assert_eq!(docker.blake3, blake3::hash(&bytes).to_hex().to_string());
    assert_eq!(docker.size, bytes.len() as u64);
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut entries = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header();
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
        assert_eq!(h.mtime().unwrap(), 1_700_000_000);
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        entries.insert(name, data);
    }
    let layer_name = format!("blobs/sha256/{}", digest_hex(&w.layer.diff_id).unwrap());
    assert!(
        entries[&layer_name] == tar,
        "the archive's layer is the same tar"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&entries["manifest.json"]).unwrap();
    assert_eq!(
        manifest,
        serde_json::json!([{
            "Config": format!("blobs/sha256/{}", digest_hex(&w.config.digest).unwrap()),
            "RepoTags": ["img:latest"],
            "Layers": [layer_name],
        }])
    );
    let config_in_archive =
        &entries[&format!("blobs/sha256/{}", digest_hex(&w.config.digest).unwrap())];
    assert_eq!(
        sha256_digest(&Sha256::digest(config_in_archive)),
        w.config.digest,
        "one config for both outputs"
    );
    assert!(entries.contains_key("repositories") && entries.contains_key("oci-layout"));
    let left = names_in(dir.path());
    assert_eq!(left, ["img.docker.tar", "img.oci", "root"], "no temp files");
}

#[test]
fn without_bin_sh_there_is_no_cmd_and_without_an_epoch_no_created() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/os-release"), "ID=test\n").unwrap();
    let mut o = opts(Compression::None, None);
    o.arch = "armhf".into();
    o.tag = "v1".into();
    let name = dir.path().join("Tiny Image").display().to_string();
    let w = write_both(&root, &name, &o);
    let oci = w.oci.unwrap();
    let blobs = oci.path.join("blobs/sha256");
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(blobs.join(digest_hex(&w.config.digest).unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config,
        serde_json::json!({
            "architecture": "arm",
            "variant": "v7",
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH]},
            "rootfs": {"type": "layers", "diff_ids": [w.layer.diff_id]},
            "history": [{"created_by": "strata test"}],
        })
    );
    // Uncompressed: the layer blob is the tar, its digest the diff id.
    assert_eq!(oci.layer.digest, w.layer.diff_id);
    assert_eq!(
        oci.layer.media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(w.docker.unwrap().repo_tag, "tiny-image:v1");
    let parts = read_layout(&oci.path, "v1").unwrap();
    assert!(matches!(
        read_layout(&oci.path, "latest"),
        Err(OciError::Invalid { .. })
    ));
    assert_eq!(parts.manifest, oci.manifest);
}

#[test]
fn read_layout_gives_the_push_pieces_and_refuses_a_damaged_blob() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let name = dir.path().join("img").display().to_string();
    let o = opts(Compression::Zstd, Some(0));
    let w = write(
        &root,
        &scan(&root),
        &name,
        Formats {
            oci: true,
            docker: false,
        },
        &o,
        &never,
    )
    .unwrap();
    assert!(w.docker.is_none() && !docker_path(&name).exists());
    let oci = w.oci.unwrap();
    let parts = read_layout(&oci.path, "latest").unwrap();
    assert_eq!(parts.manifest, oci.manifest);
    assert_eq!(parts.config, oci.config);
    assert_eq!(
        sha256_digest(&Sha256::digest(&parts.manifest_bytes)),
        oci.manifest.digest
    );
    assert_eq!(
        sha256_digest(&Sha256::digest(&parts.config_bytes)),
        oci.config.digest
    );
    assert_eq!(parts.layers.len(), 1);
    let (d, path) = &parts.layers[0];
    assert_eq!(d, &oci.layer);
    assert_eq!(d.media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert_eq!(sha256_file(path), d.digest);
    assert_eq!(fs::metadata(path).unwrap().len(), d.size);
    // The zstd layer decompresses to the tar whose sha256 is the diff id.
    let tar = decompress(path, Compression::Zstd);
    assert_eq!(sha256_digest(&Sha256::digest(&tar)), w.layer.diff_id);
    let manifest: serde_json::Value = serde_json::from_slice(&parts.manifest_bytes).unwrap();
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);

    // A flipped byte in the config blob is caught.
    let cfg = oci
        .path
        .join("blobs/sha256")
        .join(digest_hex(&oci.config.digest).unwrap());
    let mut bytes = fs::read(&cfg).unwrap();
    bytes[0] ^= 1;
    fs::write(&cfg, bytes).unwrap();
    let e = read_layout(&oci.path, "latest").unwrap_err().to_string();
    assert!(
        e.contains("does not match") && e.contains("write the image again"),
        "{e}"
    );
}

#[test]
fn two_writes_with_an_epoch_are_byte_identical_and_a_rewrite_replaces_the_old_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let mut runs = Vec::new();
    for round in 0..2 {
        let out = dir.path().join(format!("out{round}"));
        fs::create_dir(&out).unwrap();
        let name = out.join("img").display().to_string();
        let w = write_both(&root, &name, &opts(Compression::Gzip, Some(1_000_000)));
        runs.push((
            w,
            listing(&oci_path(&name)),
            fs::read(docker_path(&name)).unwrap(),
        ));
    }
    assert_eq!(runs[0].0, {
        let mut w = runs[1].0.clone();
        // The only difference: where they were written.
        w.oci.as_mut().unwrap().path = runs[0].0.oci.as_ref().unwrap().path.clone();
        w.docker.as_mut().unwrap().path = runs[0].0.docker.as_ref().unwrap().path.clone();
        w
    });
    assert!(runs[0].1 == runs[1].1, "identical layouts");
    assert!(runs[0].2 == runs[1].2, "identical archives");

    // Writing again over the first (now zstd): only the new blobs remain, nothing else left.
    let name = dir.path().join("out0/img").display().to_string();
    let w = write_both(&root, &name, &opts(Compression::Zstd, Some(1_000_000)));
    let oci = w.oci.unwrap();
    assert_ne!(
        oci.layer.digest,
        runs[0].0.oci.as_ref().unwrap().layer.digest
    );
    assert_eq!(names_in(&oci.path.join("blobs/sha256")).len(), 3);
    assert_eq!(
        names_in(&dir.path().join("out0")),
        ["img.docker.tar", "img.oci"]
    );
    // The docker archive does not depend on the layout's compression.
    assert!(fs::read(docker_path(&name)).unwrap() == runs[0].2);
}

#[test]
fn a_cancelled_write_at_any_point_leaves_nothing_and_keeps_the_old_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let name = out.join("img").display().to_string();
    let s = scan(&root);
    let o = opts(Compression::Gzip, None);
    let calls = Cell::new(0u32);
    let count = || {
        calls.set(calls.get() + 1);
        false
    };
    write(&root, &s, &name, BOTH, &o, &count).unwrap();
    let total = calls.get();
    assert!(
        total >= 4,
        "the check runs before, during and after the stream ({total})"
    );
    let before = (
        listing(&oci_path(&name)),
        fs::read(docker_path(&name)).unwrap(),
    );
    // Change the tree so a completed write would differ.
    fs::write(root.join("etc/hostname"), "changed\n").unwrap();
    let s = scan(&root);
    for stop_at in 0..total {
        calls.set(0);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > stop_at
        };
        let e = write(&root, &s, &name, BOTH, &o, &stop).unwrap_err();
        assert!(matches!(e, OciError::Cancelled), "at call {stop_at}: {e}");
        assert_eq!(
            names_in(&out),
            ["img.docker.tar", "img.oci"],
            "at call {stop_at}"
        );
        assert!(listing(&oci_path(&name)) == before.0, "old layout kept");
        assert!(
            fs::read(docker_path(&name)).unwrap() == before.1,
            "old archive kept"
        );
    }
    // Nothing at all when there was nothing before.
    let fresh = out.join("new").display().to_string();
    let e = write(&root, &s, &fresh, BOTH, &o, &|| true).unwrap_err();
    assert!(matches!(e, OciError::Cancelled));
    assert_eq!(names_in(&out), ["img.docker.tar", "img.oci"]);
}

#[test]
fn bad_arch_or_tag_and_an_unreadable_tree_fail_before_or_without_leaving_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let s = scan(&root);
    let name = dir.path().join("img").display().to_string();
    let mut o = opts(Compression::Gzip, None);
    o.tag = "no:colons".into();
    let e = write(&root, &s, &name, BOTH, &o, &never)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no:colons") && !e.contains('\n'), "{e}");
    o.tag = "latest".into();
    o.arch = "sparc".into();
    assert!(matches!(
        write(&root, &s, &name, BOTH, &o, &never),
        Err(OciError::Arch(_))
    ));
    // The tree changes after the scan: the layer error names the file; nothing is left.
    o.arch = "amd64".into();
    fs::remove_file(root.join("etc/app/conf")).unwrap();
    let e = write(&root, &s, &name, BOTH, &o, &never).unwrap_err();
    assert!(matches!(e, OciError::Layer(_)), "{e}");
    assert!(e.to_string().contains("etc/app/conf"), "{e}");
    assert_eq!(names_in(dir.path()), ["root"]);
}

#[test]
fn umoci_unpacks_the_layout_to_the_same_tree() {
    if !is_root() {
        eprintln!("skipped: umoci unpack keeps owners only as root");
        return;
    }
    if !have("umoci") {
        eprintln!("skipped: umoci is not installed (apt-get install umoci)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let name = dir.path().join("img").display().to_string();
    let w = write(
        &root,
        &scan(&root),
        &name,
        Formats {
            oci: true,
            docker: false,
        },
        &opts(Compression::Gzip, None),
        &never,
    )
    .unwrap();
    let bundle = dir.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", w.oci.unwrap().path.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = bundle.join("rootfs");
    let (a, b) = (scan(&root), scan(&got));
    // What the tar carries of each path; ino, dev, ctime and directory sizes are the file
    // system's own, and sub-second times are not in the tar.
    let strip = |s: &Scan| -> Vec<(Vec<u8>, layer::Meta)> {
        s.entries()
            .iter()
            .map(|(p, m)| {
                let mut m = m.clone();
                (m.ino, m.dev, m.ctime, m.ctime_nsec, m.mtime_nsec) = (0, 0, 0, 0, 0);
                if m.kind == layer::FileKind::Dir {
                    m.size = 0;
                }
                (p.clone(), m)
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b));
    for f in [
        "etc/hostname",
        "etc/app/conf",
        "private/secret",
        "usr/bin/su",
        "var/sparse",
    ] {
        assert!(
            fs::read(root.join(f)).unwrap() == fs::read(got.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        fs::metadata(got.join("var/sparse")).unwrap().len(),
        SPARSE_LEN
    );
    assert_eq!(
        fs::metadata(got.join("etc/hard")).unwrap().ino(),
        fs::metadata(got.join("etc/hostname")).unwrap().ino(),
        "the hardlink stays one inode"
    );
    assert_eq!(
        xattr::get(got.join("etc/hostname"), "user.strata")
            .unwrap()
            .as_deref(),
        Some(&b"yes"[..])
    );
    assert_eq!(
        fs::read_link(got.join("etc/abs")).unwrap(),
        Path::new("/etc/hostname")
    );
}

#[test]
fn skopeo_reads_the_layout_and_the_archive_and_their_digests_match() {
    if !have("skopeo") {
        eprintln!("skipped: skopeo is not installed (apt-get install skopeo)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let name = dir.path().join("Strata_Img").display().to_string();
    let mut o = opts(Compression::Gzip, Some(1_700_000_000));
    o.arch = "arm64".into();
    let w = write_both(&root, &name, &o);
    let oci = w.oci.unwrap();
    let docker = w.docker.unwrap();

    let layout = format!("oci:{}:latest", oci.path.display());
    let info = skopeo(&["inspect", &layout]);
    assert_eq!(info["Digest"], oci.manifest.digest.as_str());
    assert_eq!(info["Architecture"], "arm64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(info["Layers"], serde_json::json!([oci.layer.digest]));
    assert_eq!(info["Created"], "2023-11-14T22:13:20Z");
    let raw_config = skopeo(&["inspect", "--config", "--raw", &layout]);
    assert_eq!(
        raw_config["rootfs"]["diff_ids"][0],
        w.layer.diff_id.as_str()
    );
    assert_eq!(raw_config["variant"], "v8");

    let archive = format!("docker-archive:{}", docker.path.display());
    let info = skopeo(&["inspect", &archive]);
    assert_eq!(info["Architecture"], "arm64");
    assert_eq!(info["Layers"], serde_json::json!([w.layer.diff_id]));
    // The archive is found by its RepoTags entry (docker's normal form of the name).
    assert_eq!(docker.repo_tag, "strata_img:latest");
    let named = format!("{archive}:strata_img:latest");
    assert_eq!(skopeo(&["inspect", &named])["Digest"], info["Digest"]);
    let other = Command::new("skopeo")
        .args(["inspect", &format!("{archive}:other:latest")])
        .output()
        .unwrap();
    assert!(!other.status.success(), "no image named other:latest");
    let config = skopeo(&["inspect", "--config", "--raw", &archive]);
    assert_eq!(config["rootfs"]["diff_ids"][0], w.layer.diff_id.as_str());
    // The archive also reads as an OCI archive (docker 25's `docker save` layout).
    let as_oci = skopeo(&[
        "inspect",
        &format!("oci-archive:{}:latest", docker.path.display()),
    ]);
    assert_eq!(as_oci["Layers"], serde_json::json!([w.layer.diff_id]));

    // Copies check every blob against its digest on the way.
    for (src, dest) in [
        (layout.clone(), "copy-of-layout"),
        (archive, "copy-of-archive"),
    ] {
        let to = format!("dir:{}", dir.path().join(dest).display());
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet", &src, &to])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy {src}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        sha256_file(
            &dir.path()
                .join("copy-of-layout")
                .join(digest_hex(&oci.layer.digest).unwrap())
        ),
        oci.layer.digest
    );
}

#[test]
fn parallel_gzip_is_one_valid_member_whatever_the_thread_count() {
    // 3.5 MiB: three full blocks and a partial one, half compressible.
    let mut data = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    while data.len() < 3 * GZ_BLOCK + GZ_BLOCK / 2 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if seed.is_multiple_of(3) {
            data.extend_from_slice(&seed.to_le_bytes());
        } else {
            data.extend_from_slice(b"usr/share/doc/strata/copyright ");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (workers, input) in [(1, &data[..]), (3, &data[..]), (2, &[][..])] {
        let path = dir.path().join(format!("gz{workers}"));
        let file = File::create(&path).unwrap();
        let counted = Counted {
            w: BufWriter::new(file),
            sha: Sha256::new(),
            n: 0,
        };
        let c = std::thread::scope(|scope| {
            let mut gz = ParGz::new(counted, 6, workers, scope).unwrap();
            // Uneven writes: block boundaries come from the stream, not the calls.
            for piece in input.chunks(777_777) {
                gz.write_all(piece).unwrap();
            }
            gz.finish().unwrap()
        });
        let mut c = c;
        c.w.flush().unwrap();
        assert_eq!(c.n, fs::metadata(&path).unwrap().len());
        assert_eq!(
            sha256_digest(c.sha.finalize().as_slice()),
            sha256_file(&path)
        );
        // The real gzip reads it back (one member: `gzip -l` would list one).
        if have("gzip") {
            let out = Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.stdout == input, "gzip -dc gives the input back");
        }
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(File::open(&path).unwrap())
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == input);
        outputs.push(fs::read(&path).unwrap());
    }
    assert!(
        outputs[0] == outputs[1],
        "1 and 3 threads give the same bytes"
    );
    assert!(outputs[0].len() < data.len() / 2, "it compresses");
    assert_eq!(
        outputs[2].len(),
        10 + 2 + 8,
        "empty input: header, final block, trailer"
    );
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().unwrap()
}

#[test]
fn docker_load_accepts_the_archive_with_its_tag_id_and_files() {
    if !have("docker") || !docker(&["info"]).status.success() {
        eprintln!("skipped: no docker daemon reachable (docker info fails; DOCKER_HOST picks one)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let repo = format!("strata-oci-test-{}", std::process::id());
    let name = dir.path().join(&repo).display().to_string();
    let w = write(
        &root,
        &scan(&root),
        &name,
        Formats {
            oci: false,
            docker: true,
        },
        &opts(Compression::Gzip, Some(1_700_000_000)),
        &never,
    )
    .unwrap();
    let archive = w.docker.unwrap();
    let tag = format!("{repo}:latest");
    let load = docker(&["load", "-i", &archive.path.display().to_string()]);
    let text = String::from_utf8_lossy(&load.stdout).into_owned();
    let cleanup = || {
        docker(&["rm", "-f", &repo]);
        docker(&["rmi", "-f", &tag]);
    };
    if !load.status.success() {
        cleanup();
        panic!("docker load: {}", String::from_utf8_lossy(&load.stderr));
    }
    let inspect = docker(&["image", "inspect", &tag]);
    let created = docker(&["create", "--name", &repo, &tag]);
    let export = docker(&["export", &repo]);
    cleanup();
    assert!(text.contains(&format!("Loaded image: {tag}")), "{text}");
    let info = &json_of(&inspect, "docker image inspect")[0];
    assert_eq!(info["Id"], archive.image_id.as_str());
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(
        info["RootFS"]["Layers"],
        serde_json::json!([w.layer.diff_id])
    );
    assert_eq!(info["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    // The container's file system holds the tree's files, owners and modes.
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let mut seen = BTreeMap::new();
    for e in tar::Archive::new(&export.stdout[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let p = e.path().unwrap().display().to_string();
        seen.insert(p, (h.mode().unwrap() & 0o7777, h.uid().unwrap(), data));
    }
    let conf = &seen["etc/app/conf"];
    assert_eq!((conf.0, conf.1), (0o640, 1000 * u64::from(is_root())));
    assert!(conf.2 == fs::read(root.join("etc/app/conf")).unwrap());
    assert_eq!(seen["usr/bin/su"].0, 0o4755);
    assert_eq!(seen["var/sparse"].2.len() as u64, SPARSE_LEN);
}

#[test]
fn the_layer_blob_does_not_depend_on_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(dir.path());
    let s = scan(&root);
    for compression in [Compression::Zstd, Compression::Gzip] {
        let mut digests = Vec::new();
        for workers in [1, 3] {
            let mut o = opts(compression, Some(5));
            o.pack.workers = workers;
            let name = dir.path().join(format!("w{workers}")).display().to_string();
            let only_oci = Formats {
                oci: true,
                docker: false,
            };
            let w = write(&root, &s, &name, only_oci, &o, &never).unwrap();
            digests.push(w.oci.unwrap().blake3);
        }
        assert_eq!(digests[0], digests[1], "{compression:?}");
    }
}
