//! `build --keep-tree`: rebuilds restored from the image's kept tree (an overlay on it) give
//! the layers and outputs of rebuilds that unpack, never change the kept tree, and never use a
//! half-written or held slot.

use crate::harness::{BuildFixture, Manifest};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const SDE: (&str, &str) = ("SOURCE_DATE_EPOCH", "1700000000");

/// An element whose later steps make hardlinks, delete files and folders (whiteouts), rename a
/// folder, change a mode and open a file for writing without changing it.
fn add_kept_element(f: &BuildFixture) {
    let hook = |rel: &str, body: &str| f.write_bash_hook("fixture-kept", rel, body);
    hook(
        "install.d/30-links",
        "mkdir -p /opt/k/gone/deep /opt/k/moved\n\
         echo a > /opt/k/a; ln /opt/k/a /opt/k/b\n\
         echo c > /opt/k/c; ln /opt/k/c /opt/k/d\n\
         echo x > /opt/k/gone/deep/x\n\
         echo r > /opt/k/rm-me\n\
         echo s > /opt/k/same\n\
         echo m > /opt/k/moved/m\n\
         echo t > /opt/k/touched\n",
    );
    edit_last(f, "v1");
    hook(
        "post-install.d/50-after",
        "rm /opt/k/c\n\
         echo after > /opt/k/after\n",
    );
}

/// (Re)writes install.d/95-edit, the hook the developer edits, with `version`.
fn edit_last(f: &BuildFixture, version: &str) {
    let p = f.elements().join("fixture-kept/install.d/95-edit");
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(
        &p,
        format!(
            "#!/bin/bash\nset -eu -o pipefail\n\
             echo more >> /opt/k/a\n\
             ln /opt/k/a /opt/k/a3\n\
             rm /opt/k/d\n\
             rm -r /opt/k/gone\n\
             rm /opt/k/rm-me\n\
             : >> /opt/k/same\n\
             mv /opt/k/moved /opt/k/moved2\n\
             chmod 600 /opt/k/touched\n\
             echo {version} > /opt/k/version\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

const ELEMENTS: [&str; 2] = ["fixture-app", "fixture-kept"];

/// Builds with `extra` (and SOURCE_DATE_EPOCH): the manifest and stderr.
fn build(f: &BuildFixture, extra: &[&str]) -> (Manifest, String) {
    let args: Vec<&str> = extra.iter().chain(ELEMENTS.iter()).copied().collect();
    let out = f.run_ok(
        f.build_cmd(&args)
            .env(SDE.0, SDE.1)
            .env_remove("STRATA_KEEP_TREE"),
    );
    (
        f.manifest(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The one slot of the fixture's cache.
fn slot(f: &BuildFixture) -> PathBuf {
    let slots: Vec<PathBuf> = fs::read_dir(f.cache().join("trees"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(slots.len(), 1, "{slots:?}");
    slots.into_iter().next().unwrap()
}

/// Every path of a tree with its type, mode, owner, size, mtime, inode and content digest.
fn tree_hash(root: &Path) -> BTreeMap<PathBuf, String> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let content = if m.is_file() {
                blake3::hash(&fs::read(e.path()).unwrap())
                    .to_hex()
                    .to_string()
            } else if m.file_type().is_symlink() {
                fs::read_link(e.path()).unwrap().display().to_string()
            } else {
                String::new()
            };
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            let line = format!(
                "{:o} {}:{} {} {}.{} ino={} nlink={} {content}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino(),
                m.nlink()
            );
            (rel, line)
        })
        .collect()
}

/// Rebuilds from `from` without and with a kept tree; both give the same layers and output.
/// Returns the kept-tree build's stderr.
fn same_with_and_without(f: &BuildFixture, from: &str) -> String {
    let (plain, _) = build(f, &["--rebuild-from", from]);
    let plain_tar = fs::read(f.out("img.tar")).unwrap();
    let (kept, err) = build(f, &["--rebuild-from", from, "--keep-tree"]);
    assert_eq!(plain.keys(), kept.keys());
    assert_eq!(
        plain.diff_ids(),
        kept.diff_ids(),
        "layers differ with a kept tree (rebuild from {from}):\n{err}"
    );
    assert_eq!(plain.output_digest(), kept.output_digest());
    assert!(
        plain_tar == fs::read(f.out("img.tar")).unwrap(),
        "the tar differs with a kept tree"
    );
    assert!(err.contains("(restore cached steps)"), "{err}");
    err
}

fn step_count_before(m: &Manifest, step: &str) -> usize {
    m.steps().iter().position(|(s, _)| s == step).unwrap()
}

#[test]
fn a_kept_tree_gives_the_layers_and_outputs_of_unpacking_and_is_never_changed() {
    crate::require_root!();
    let f = BuildFixture::new();
    add_kept_element(&f);
    let (cold, _) = build(&f, &[]);
    assert!(cold.cached().is_empty());

    // The developer's loop: edit the last install.d hook, rebuild.
    edit_last(&f, "v2");
    let err = same_with_and_without(&f, "install.d/95-edit");
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(slot(&f).join("state.json")).unwrap()).unwrap();
    let m = f.manifest();
    assert_eq!(
        state["steps"].as_array().unwrap().len(),
        step_count_before(&m, "install.d/95-edit"),
        "the slot holds the step the rebuild restored"
    );

    // The next edit of the same hook unpacks nothing, and the kept tree stays as it was
    // although the hooks that ran changed, linked and deleted files it holds.
    edit_last(&f, "v3");
    let before = tree_hash(&slot(&f).join("tree"));
    let err = same_with_and_without(&f, "install.d/95-edit");
    assert!(
        err.contains("kept tree: at the wanted step already"),
        "{err}"
    );
    assert_eq!(
        before,
        tree_hash(&slot(&f).join("tree")),
        "the kept tree changed"
    );

    // A later step: the slot advances by the layers in between.
    let err = same_with_and_without(&f, "post-install.d/50-after");
    assert!(err.contains("kept tree: advanced by"), "{err}");

    // An edit before the slot's step: unpacked afresh.
    let err = same_with_and_without(&f, "install.d/30-links");
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");

    // Hardlinks and deletions came out right (the tar equals the unpacked build's, too).
    let tar = f.out("img.tar");
    let list = f.tar_list(&tar);
    for gone in [
        "opt/k/d",
        "opt/k/c",
        "opt/k/gone/",
        "opt/k/rm-me",
        "opt/k/moved/",
    ] {
        assert!(!list.iter().any(|p| p == gone), "{gone} in {list:?}");
    }
    assert_eq!(f.tar_member(&tar, "opt/k/a").unwrap(), "a\nmore\n");
    assert_eq!(f.tar_member(&tar, "opt/k/moved2/m").unwrap(), "m\n");
    assert_eq!(f.tar_member(&tar, "opt/k/version").unwrap(), "v3\n");
    let verbose = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&tar)
        .output()
        .unwrap();
    let verbose = String::from_utf8_lossy(&verbose.stdout);
    for link in ["opt/k/b link to opt/k/a", "opt/k/a3 link to opt/k/a"] {
        assert!(
            verbose.lines().any(|l| l.ends_with(link)),
            "{link}: the hardlinks are not kept:\n{verbose}"
        );
    }
}

#[test]
fn a_half_written_or_held_slot_is_not_used_and_gc_drops_slots() {
    crate::require_root!();
    let f = BuildFixture::new();
    add_kept_element(&f);
    build(&f, &[]);
    edit_last(&f, "v2");
    let (plain, _) = build(&f, &[]);
    let (kept, err) = build(&f, &["--rebuild-from", "install.d/95-edit", "--keep-tree"]);
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");
    assert_eq!(plain.diff_ids(), kept.diff_ids());

    // A build killed while changing the slot leaves it marked, maybe half written.
    let slot = slot(&f);
    fs::write(slot.join("changing"), b"").unwrap();
    fs::write(slot.join("tree/junk"), b"half written").unwrap();
    let (again, err) = build(&f, &["--rebuild-from", "install.d/95-edit", "--keep-tree"]);
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");
    assert_eq!(plain.diff_ids(), again.diff_ids());
    assert_eq!(plain.output_digest(), again.output_digest());
    assert!(!slot.join("changing").exists());
    assert!(!slot.join("tree/junk").exists());

    // Another build holds the slot: this one unpacks, and the slot is left alone.
    let lock = fs::File::open(slot.join("lock")).unwrap();
    lock.lock().unwrap();
    let before = tree_hash(&slot.join("tree"));
    let state = fs::read(slot.join("state.json")).unwrap();
    let (held, err) = build(&f, &["--rebuild-from", "install.d/30-links", "--keep-tree"]);
    assert!(err.contains("in use by another build"), "{err}");
    assert!(!err.contains("kept tree:"), "{err}");
    assert_eq!(plain.output_digest(), held.output_digest());
    assert_eq!(before, tree_hash(&slot.join("tree")));
    assert_eq!(state, fs::read(slot.join("state.json")).unwrap());

    // gc keeps a slot in use and drops idle ones.
    let gc = |f: &BuildFixture| {
        let out = f.run_ok(
            crate::util::strata()
                .args(["cache", "gc", "--max-size", "10G", "--cache-dir"])
                .arg(f.cache()),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = gc(&f);
    assert!(!text.contains("kept trees"), "{text}");
    assert!(slot.join("tree").exists());
    // Unlocked (not only closed): a fork by a test beside this one may share the descriptor.
    lock.unlock().unwrap();
    drop(lock);
    let text = gc(&f);
    assert!(text.contains("dropped 1 kept trees"), "{text}");
    assert!(!slot.exists());
}

#[test]
fn strata_build_with_strata_keep_tree_set_keeps_the_tree() {
    crate::require_root!();
    let f = BuildFixture::new();
    add_kept_element(&f);
    build(&f, &[]);
    edit_last(&f, "v2");
    let args: Vec<&str> = ELEMENTS.to_vec();
    let out = f.run_ok(
        f.build_cmd(&args)
            .env(SDE.0, SDE.1)
            .env("STRATA_KEEP_TREE", "1"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");
    // --check never uses it.
    let out = f.run_ok(
        f.build_cmd(&["--check", "fixture-app", "fixture-kept"])
            .env(SDE.0, SDE.1)
            .env("STRATA_KEEP_TREE", "1"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("kept tree:"), "{err}");
}

/// The disk step moves the tree aside before it copies it into the disk: on a kept tree's
/// overlay (a mount point) the mount moves, and the image is the one an unpacked tree gives.
#[test]
fn a_disk_build_on_a_kept_tree_gives_the_same_image() {
    crate::require_root!();
    let f = BuildFixture::new();
    add_kept_element(&f);
    let el = crate::harness::repo()
        .join("elements")
        .display()
        .to_string();
    let base = [
        "-t",
        "raw",
        "--element-path",
        el.as_str(),
        "fixture-app",
        "fixture-kept",
        "fixture-disk",
        "block-device-mbr",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let out = f.run_ok(
            f.build_cmd(&args)
                .env(SDE.0, SDE.1)
                .env_remove("STRATA_KEEP_TREE"),
        );
        (
            f.manifest(),
            blake3::hash(&fs::read(f.out("img.raw")).unwrap()),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    run(&[]);
    edit_last(&f, "v2");
    let (plain, plain_raw, _) = run(&["--rebuild-from", "install.d/95-edit"]);
    let (kept, kept_raw, err) = run(&["--rebuild-from", "install.d/95-edit", "--keep-tree"]);
    assert!(err.contains("kept tree: unpacked afresh"), "{err}");
    assert_eq!(plain.diff_ids(), kept.diff_ids(), "{err}");
    assert_eq!(
        plain_raw, kept_raw,
        "the raw image differs with a kept tree"
    );
    let before = tree_hash(&slot(&f).join("tree"));
    let (_, again, err) = run(&["--rebuild-from", "install.d/95-edit", "--keep-tree"]);
    assert!(
        err.contains("kept tree: at the wanted step already"),
        "{err}"
    );
    assert_eq!(plain_raw, again);
    assert_eq!(
        before,
        tree_hash(&slot(&f).join("tree")),
        "the kept tree changed"
    );
}
