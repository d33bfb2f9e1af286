//! Tests of the store against real files and a real SQLite index in temp dirs.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

fn store(dir: &Path) -> Store {
    Store::open(dir).unwrap()
}

fn put_blob(store: &Store, bytes: &[u8]) -> (String, u64) {
    let mut w = store.blob_writer().unwrap();
    w.write_all(bytes).unwrap();
    w.finish().unwrap()
}

/// A layer whose blob holds `content` (the diff id is made up from the content).
fn layer(store: &Store, content: &[u8]) -> LayerRecord {
    let (digest, blob_size) = put_blob(store, content);
    LayerRecord {
        diff_id: format!("diff-{}", &blake3::hash(content).to_hex()[..16]),
        blob_digest: digest,
        size: content.len() as u64 * 3,
        blob_size,
    }
}

fn step(
    key: &str,
    parent: Option<&str>,
    layer: Option<&LayerRecord>,
    last_used: i64,
) -> StepRecord {
    StepRecord {
        key: key.to_string(),
        parent: parent.map(str::to_string),
        phase: "install.d".to_string(),
        hook: format!("hook-{key}"),
        layer: layer.map(|l| l.diff_id.clone()),
        hooks_layer: None,
        inputs: format!("{{\"key\":\"{key}\"}}"),
        created: 100,
        last_used,
        hits: 0,
        seconds: 1.5,
        mounts: Vec::new(),
    }
}

/// Runs `f` with a tracing subscriber that captures everything logged, and returns the log.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, log)
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn tmp_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("tmp")).unwrap().count()
}

#[test]
fn store_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let s = &s;
            scope.spawn(move || {
                let l = layer(s, &[t; 100]);
                s.record_step(&step(&format!("k{t}"), None, Some(&l), 1), &[l])
                    .unwrap();
            });
        }
    });
    assert_eq!(s.list_steps().unwrap().len(), 4);
}

#[test]
fn open_creates_layout_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    {
        let s = store(&root);
        let l = layer(&s, b"layer one");
        s.record_step(&step("k1", None, Some(&l), 5), std::slice::from_ref(&l))
            .unwrap();
    }
    let tag = std::fs::read_to_string(root.join("CACHEDIR.TAG")).unwrap();
    assert!(tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55"));
    assert!(root.join("lock").is_file());
    assert!(root.join("blobs/blake3").is_dir());
    let conn = rusqlite::Connection::open(root.join("index.sqlite")).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    let s = store(&root);
    assert_eq!(s.list_steps().unwrap().len(), 1);
    assert!(s.lookup_step("k1").unwrap().is_some());
}

#[test]
fn records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l1 = layer(&s, b"rootfs changes");
    let h1 = layer(&s, b"hook tree changes");
    let mut first = step("k1", None, Some(&l1), 10);
    first.hooks_layer = Some(h1.diff_id.clone());
    s.record_step(&first, &[l1.clone(), h1.clone()]).unwrap();
    let second = step("k2", Some("k1"), None, 20);
    s.record_step(&second, &[]).unwrap();

    assert_eq!(s.lookup_step("k1").unwrap(), Some(first.clone()));
    assert_eq!(s.lookup_step("k2").unwrap(), Some(second.clone()));
    assert_eq!(s.lookup_step("nope").unwrap(), None);
    assert_eq!(s.layer_for(&l1.diff_id).unwrap(), Some(l1.clone()));
    assert_eq!(s.layer_for(&h1.diff_id).unwrap(), Some(h1.clone()));
    assert_eq!(s.layer_for("diff-none").unwrap(), None);
    assert_eq!(s.list_steps().unwrap().len(), 2);
    assert_eq!(s.list_layers().unwrap().len(), 2);
    assert_eq!(
        s.chain("k2")
            .unwrap()
            .iter()
            .map(|x| x.key.as_str())
            .collect::<Vec<_>>(),
        ["k1", "k2"]
    );

    s.touch_step("k1", 500).unwrap();
    s.touch_step("k1", 600).unwrap();
    let touched = s.get_step("k1").unwrap().unwrap();
    assert_eq!((touched.last_used, touched.hits), (600, 2));

    // nearest_step: same phase and hook, most recently used, excluding the asked key.
    let mut other = step("k3", None, None, 700);
    other.hook = first.hook.clone();
    s.record_step(&other, &[]).unwrap();
    let mut older = step("k4", None, None, 50);
    older.hook = first.hook.clone();
    s.record_step(&older, &[]).unwrap();
    assert_eq!(
        s.nearest_step("install.d", &first.hook, "k9")
            .unwrap()
            .unwrap()
            .key,
        "k3"
    );
    assert_eq!(
        s.nearest_step("install.d", &first.hook, "k3")
            .unwrap()
            .unwrap()
            .key,
        "k1"
    );
    assert_eq!(s.nearest_step("root.d", &first.hook, "k9").unwrap(), None);

    let build = BuildRecord {
        elements: "vm debian-minimal".into(),
        arguments: "-o image".into(),
        outcome: "ok".into(),
        step_keys: vec!["k1".into(), "k2".into()],
        started: 1234,
        seconds: 9.25,
    };
    let id = s.record_build(&build).unwrap();
    let id2 = s.record_build(&build).unwrap();
    assert!(id2 > id);
    assert_eq!(
        s.list_builds().unwrap(),
        vec![(id, build.clone()), (id2, build)]
    );

    let (digest, size) = put_blob(&s, b"a disk image");
    s.put_output("out1", &digest, size, 42).unwrap();
    let out = s.get_output("out1").unwrap().unwrap();
    assert_eq!(
        out,
        OutputRecord {
            key: "out1".into(),
            blob_digest: digest.clone(),
            size,
            created: 42,
            last_used: 42
        }
    );
    s.touch_output("out1", 99).unwrap();
    assert_eq!(s.get_output("out1").unwrap().unwrap().last_used, 99);
    assert_eq!(s.get_output("out2").unwrap(), None);
    let mut blob = Vec::new();
    s.open_blob(&digest)
        .unwrap()
        .read_to_end(&mut blob)
        .unwrap();
    assert_eq!(blob, b"a disk image");

    assert_eq!(s.resolve_key("k1").unwrap(), "k1");
    assert!(matches!(
        s.resolve_key("k"),
        Err(StoreError::BadKeyPrefix { .. })
    ));
    // An empty or short prefix never matches anything (`cache rm ''` must not remove a step).
    for bad in ["", "abc", "zzzzzzzz"] {
        assert!(matches!(
            s.resolve_key(bad),
            Err(StoreError::BadKeyPrefix { .. })
        ));
    }
    assert!(matches!(
        s.resolve_key("abcdef"),
        Err(StoreError::UnknownKey { .. })
    ));
}

#[test]
fn record_step_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l = layer(&s, b"content");
    let original = step("k1", None, Some(&l), 10);
    s.record_step(&original, std::slice::from_ref(&l)).unwrap();
    // A second record of the same key (e.g. a --no-cache rerun) keeps the first one.
    let mut again = original.clone();
    again.created = 999;
    again.seconds = 7.0;
    s.record_step(&again, std::slice::from_ref(&l)).unwrap();
    s.record_step(&again, std::slice::from_ref(&l)).unwrap();
    assert_eq!(s.list_steps().unwrap(), vec![original]);
    assert_eq!(s.list_layers().unwrap(), vec![l]);
}

#[test]
fn record_step_refuses_missing_blobs_and_layers() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let ghost = LayerRecord {
        diff_id: "diff-ghost".into(),
        blob_digest: "ab".repeat(32),
        size: 1,
        blob_size: 1,
    };
    let err = s
        .record_step(
            &step("k1", None, Some(&ghost), 1),
            std::slice::from_ref(&ghost),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingBlob { .. }), "{err}");
    let err = s
        .record_step(&step("k1", None, Some(&ghost), 1), &[])
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingLayer { .. }), "{err}");
    assert!(err.to_string().contains("diff-ghost"));
    assert!(s.list_steps().unwrap().is_empty());
    let real = layer(&s, b"twelve bytes");
    let wrong = LayerRecord {
        blob_size: 5,
        ..real
    };
    let err = s
        .record_step(&step("k1", None, Some(&wrong), 1), &[wrong])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::WrongBlobSize { actual: 12, .. }),
        "{err}"
    );
    let bad = LayerRecord {
        blob_digest: "../../etc/passwd".into(),
        ..ghost
    };
    let err = s
        .record_step(&step("k1", None, Some(&bad), 1), &[bad])
        .unwrap_err();
    assert!(matches!(err, StoreError::BadDigest { .. }));
}

#[test]
fn blob_writer_dedupes_and_cleans_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let (d1, n1) = put_blob(&s, b"same bytes");
    let (d2, n2) = put_blob(&s, b"same bytes");
    assert_eq!((d1.as_str(), n1), (d2.as_str(), n2));
    assert_eq!(d1, blake3::hash(b"same bytes").to_hex().as_str());
    assert_eq!(n1, 10);
    assert_eq!(std::fs::read(s.blob_path(&d1)).unwrap(), b"same bytes");
    assert_eq!(tmp_count(dir.path()), 0);
    assert_eq!(s.du().unwrap().blobs, 1);
    // An abandoned writer removes its temp file.
    let mut w = s.blob_writer().unwrap();
    w.write_all(b"half").unwrap();
    assert_eq!(tmp_count(dir.path()), 1);
    drop(w);
    assert_eq!(tmp_count(dir.path()), 0);
    assert!(s.verify_blob(&d1).unwrap());
    assert!(!s.verify_blob(&"0".repeat(64)).unwrap());
}

#[test]
fn open_blob_missing_and_bad_digest() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let err = s.open_blob(&"a".repeat(64)).unwrap_err();
    assert!(matches!(err, StoreError::MissingBlob { .. }), "{err}");
    let err = s.open_blob("../../../etc/passwd").unwrap_err();
    assert!(matches!(err, StoreError::BadDigest { .. }), "{err}");
    assert!(s.open_blob(&"A".repeat(64)).is_err());
}

#[test]
fn missing_blob_is_a_lookup_miss_with_warning() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l1 = layer(&s, b"first");
    let l2 = layer(&s, b"second");
    s.record_step(&step("k1", None, Some(&l1), 1), std::slice::from_ref(&l1))
        .unwrap();
    s.record_step(
        &step("k2", Some("k1"), Some(&l2), 1),
        std::slice::from_ref(&l2),
    )
    .unwrap();
    std::fs::remove_file(s.blob_path(&l1.blob_digest)).unwrap();
    let (found, log) = capture_logs(|| s.lookup_step("k1").unwrap());
    assert_eq!(found, None);
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("is missing") && log.contains(&l1.blob_digest),
        "{log}"
    );
    // The step and its descendant are gone, so a rebuild can record fresh ones.
    assert_eq!(s.get_step("k1").unwrap(), None);
    assert_eq!(s.get_step("k2").unwrap(), None);
    let l1b = layer(&s, b"first");
    s.record_step(&step("k1", None, Some(&l1b), 2), std::slice::from_ref(&l1b))
        .unwrap();
    assert!(s.lookup_step("k1").unwrap().is_some());
}

#[test]
fn record_step_replaces_a_broken_row() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l1 = layer(&s, b"first");
    s.record_step(&step("k1", None, Some(&l1), 1), std::slice::from_ref(&l1))
        .unwrap();
    std::fs::remove_file(s.blob_path(&l1.blob_digest)).unwrap();
    // Without a lookup first (e.g. --no-cache): the rerun's layer must win.
    let l1b = layer(&s, b"first, rebuilt");
    let fresh = step("k1", None, Some(&l1b), 2);
    s.record_step(&fresh, std::slice::from_ref(&l1b)).unwrap();
    assert_eq!(s.lookup_step("k1").unwrap(), Some(fresh));
}

#[test]
fn corrupt_blob_fails_at_eof_and_verify_drops_dependents() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let bad = layer(&s, &content);
    let good = layer(&s, b"good layer");
    s.record_step(
        &step("a", None, Some(&good), 1),
        std::slice::from_ref(&good),
    )
    .unwrap();
    s.record_step(
        &step("b", Some("a"), Some(&bad), 1),
        std::slice::from_ref(&bad),
    )
    .unwrap();
    s.record_step(&step("c", Some("b"), None, 1), &[]).unwrap();
    s.record_step(&step("x", None, Some(&bad), 1), &[]).unwrap();
    let (odigest, osize) = (bad.blob_digest.clone(), bad.blob_size);
    s.put_output("img", &odigest, osize, 1).unwrap();

    let path = s.blob_path(&bad.blob_digest);
    flip_byte(&path, 50_000);
    // Same size, so lookup (which only stats) still finds it; reading finds the damage.
    assert!(s.lookup_step("b").unwrap().is_some());
    let mut r = s.open_blob(&bad.blob_digest).unwrap();
    let mut first = vec![0u8; 1000];
    r.read_exact(&mut first).unwrap();
    assert_eq!(first, content[..1000]);
    let mut rest = Vec::new();
    let (err, log) = capture_logs(|| r.read_to_end(&mut rest).unwrap_err());
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&bad.blob_digest), "{err}");
    assert!(log.contains("WARN") && log.contains("damaged"), "{log}");
    // The reader removed the damaged blob; put a damaged copy back for verify to find.
    assert!(!path.exists());
    let mut damaged = content.clone();
    damaged[7] ^= 1;
    std::fs::write(&path, &damaged).unwrap();
    assert!(!s.verify_blob(&bad.blob_digest).unwrap());

    let report = s.verify().unwrap();
    assert_eq!(report.corrupt, vec![bad.blob_digest.clone()]);
    assert!(report.missing.is_empty());
    assert_eq!(report.steps_dropped, vec!["b", "c", "x"]);
    assert_eq!(report.outputs_dropped, vec!["img"]);
    assert_eq!(report.layers_dropped, 1);
    assert_eq!(report.blobs_checked, 2);
    assert_eq!(report.index_check, "ok");
    assert!(!report.is_clean());
    assert!(!path.exists());
    assert!(s.lookup_step("a").unwrap().is_some());
    assert_eq!(s.list_steps().unwrap().len(), 1);
    assert_eq!(s.layer_for(&bad.diff_id).unwrap(), None);
    // A second verify finds nothing wrong.
    assert!(s.verify().unwrap().is_clean());
}

#[test]
fn verified_blob_finish_checks_a_partial_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let (digest, size) = put_blob(&s, &[7u8; 5000]);
    let mut r = s.open_blob(&digest).unwrap();
    assert_eq!(r.len(), size);
    let mut head = [0u8; 10];
    r.read_exact(&mut head).unwrap();
    assert_eq!(r.finish().unwrap(), size);

    flip_byte(&s.blob_path(&digest), 4999);
    let mut r = s.open_blob(&digest).unwrap();
    r.read_exact(&mut head).unwrap();
    let err = r.finish().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn truncated_blob_is_a_miss_and_fails_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l = layer(&s, &[1u8; 4096]);
    s.record_step(&step("k1", None, Some(&l), 1), std::slice::from_ref(&l))
        .unwrap();
    let path = s.blob_path(&l.blob_digest);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(1000).unwrap();
    drop(file);

    let mut all = Vec::new();
    let err = s
        .open_blob(&l.blob_digest)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

    // Truncated again (the reader removed it), then caught by lookup's size check.
    std::fs::write(&path, [1u8; 1000]).unwrap();
    let (found, log) = capture_logs(|| s.lookup_step("k1").unwrap());
    assert_eq!(found, None);
    assert!(log.contains("truncated"), "{log}");
    assert!(!path.exists());
    assert_eq!(s.get_step("k1").unwrap(), None);
}

/// Every kept step has its layer rows and blobs, and its parent if it had one.
fn assert_consistent(s: &Store) {
    let steps = s.list_steps().unwrap();
    let keys: std::collections::BTreeSet<_> = steps.iter().map(|x| x.key.clone()).collect();
    for st in &steps {
        for d in st.layers() {
            let l = s
                .layer_for(d)
                .unwrap()
                .unwrap_or_else(|| panic!("{} lost layer {d}", st.key));
            assert!(
                s.verify_blob(&l.blob_digest).unwrap(),
                "{} lost blob",
                st.key
            );
        }
        if let Some(p) = &st.parent {
            assert!(keys.contains(p), "{} kept without its parent {p}", st.key);
        }
    }
    for o in s.list_outputs().unwrap() {
        assert!(s.verify_blob(&o.blob_digest).unwrap());
    }
}

#[test]
fn gc_keeps_recent_steps_and_shared_layers() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let kb = |n: u8| vec![n; 1024];
    let base = layer(&s, &kb(1));
    let shared = layer(&s, &kb(2));
    let old_only = layer(&s, &kb(3));
    let new_only = layer(&s, &kb(4));
    // base ─┬─ old (shared) ── old2 (old_only)         used at 10, 11, 12
    //       └─ new (shared) ── new2 (new_only)         used at 50, 51
    s.record_step(
        &step("base", None, Some(&base), 10),
        std::slice::from_ref(&base),
    )
    .unwrap();
    s.record_step(
        &step("old", Some("base"), Some(&shared), 11),
        std::slice::from_ref(&shared),
    )
    .unwrap();
    s.record_step(
        &step("old2", Some("old"), Some(&old_only), 12),
        std::slice::from_ref(&old_only),
    )
    .unwrap();
    s.record_step(&step("new", Some("base"), Some(&shared), 50), &[])
        .unwrap();
    s.record_step(
        &step("new2", Some("new"), Some(&new_only), 51),
        std::slice::from_ref(&new_only),
    )
    .unwrap();
    let (odigest, osize) = put_blob(&s, &kb(5));
    s.put_output("img", &odigest, osize, 5).unwrap();
    let orphan = put_blob(&s, &kb(6)).0;

    assert_eq!(s.du().unwrap().blob_bytes, 6 * 1024);
    // Room for three 1 KiB blobs: the orphan, then the output (least recently used), then
    // old2 go. base is the oldest step but the parent of kept ones, so it stays.
    let report = s.gc(3 * 1024).unwrap();
    assert_eq!(report.bytes_before, 6 * 1024);
    assert_eq!(report.bytes_after, 3 * 1024);
    assert_eq!(report.orphan_blobs, 1);
    assert_eq!(report.outputs_removed, vec!["img"]);
    assert_eq!(report.steps_removed, vec!["old2"]);
    assert!(!s.blob_path(&orphan).exists());
    assert!(!s.blob_path(&odigest).exists());
    assert!(!s.blob_path(&old_only.blob_digest).exists());
    let kept: Vec<_> = s.list_steps().unwrap().into_iter().map(|x| x.key).collect();
    assert_eq!(kept, ["base", "new", "new2", "old"]);
    assert_consistent(&s);

    // 2 KiB: evicting "old" frees nothing (its layer is shared with "new"), so new2 goes too.
    let report = s.gc(2 * 1024).unwrap();
    assert_eq!(report.steps_removed, vec!["old", "new2"]);
    assert_eq!(report.bytes_after, 2 * 1024);
    assert!(s.blob_path(&shared.blob_digest).exists());
    assert_consistent(&s);
    for k in ["base", "new"] {
        assert!(s.lookup_step(k).unwrap().is_some());
    }

    // Under 1 KiB: everything goes, leaves before parents.
    let report = s.gc(1000).unwrap();
    assert_eq!(report.steps_removed, vec!["new", "base"]);
    assert_eq!(report.bytes_after, 0);
    assert!(s.list_layers().unwrap().is_empty());
    assert_eq!(s.du().unwrap().blobs, 0);
}

#[test]
fn gc_counts_a_parent_as_used_when_a_child_is() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let p = layer(&s, &[1; 1000]);
    let c = layer(&s, &[2; 1000]);
    let g = layer(&s, &[3; 1000]);
    // parent used long ago, its child recently; an unrelated step in between.
    s.record_step(&step("parent", None, Some(&p), 5), std::slice::from_ref(&p))
        .unwrap();
    s.record_step(
        &step("child", Some("parent"), Some(&c), 100),
        std::slice::from_ref(&c),
    )
    .unwrap();
    s.record_step(&step("other", None, Some(&g), 50), std::slice::from_ref(&g))
        .unwrap();
    let report = s.gc(2000).unwrap();
    assert_eq!(report.steps_removed, vec!["other"]);
    let report = s.gc(1000).unwrap();
    assert_eq!(report.steps_removed, vec!["child"]);
    assert_consistent(&s);
}

/// A small deterministic PRNG (xorshift) for the randomized gc test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn gc_never_leaves_a_step_without_layers_randomized() {
    let (mut evicted, mut survived) = (0, 0);
    for seed in 1..=12u64 {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let pool: Vec<LayerRecord> = (0..8u8)
            .map(|i| layer(&s, &vec![i; 200 + 100 * i as usize]))
            .collect();
        let mut keys: Vec<String> = Vec::new();
        for i in 0..30 {
            let key = format!("s{i:02}");
            let parent = if keys.is_empty() || rng.below(5) == 0 {
                None
            } else {
                Some(keys[rng.below(keys.len() as u64) as usize].clone())
            };
            let l = if rng.below(4) == 0 {
                None
            } else {
                Some(&pool[rng.below(pool.len() as u64) as usize])
            };
            let st = step(&key, parent.as_deref(), l, rng.below(1000) as i64);
            s.record_step(&st, &l.into_iter().cloned().collect::<Vec<_>>())
                .unwrap();
            keys.push(key);
        }
        let max = rng.below(4000);
        let before = s.list_steps().unwrap();
        let report = s.gc(max).unwrap();
        assert_consistent(&s);
        let after = s.list_steps().unwrap();
        assert_eq!(before.len() - after.len(), report.steps_removed.len());
        evicted += report.steps_removed.len();
        survived += after.len();
        assert!(report.bytes_after <= max || after.is_empty(), "seed {seed}");
        // LRU: no evicted step is newer than a kept leaf, a step's time being the latest
        // last_used in its subtree (as it was before gc).
        let time = |key: &str| {
            let mut t = i64::MIN;
            for st in &before {
                let mut at = Some(st.key.clone());
                while let Some(k) = at {
                    if k == key {
                        t = t.max(st.last_used);
                    }
                    at = before
                        .iter()
                        .find(|x| x.key == k)
                        .and_then(|x| x.parent.clone());
                }
            }
            t
        };
        let kept: std::collections::BTreeSet<_> = after.iter().map(|x| x.key.clone()).collect();
        let kept_leaves: Vec<&StepRecord> = after
            .iter()
            .filter(|x| !after.iter().any(|c| c.parent.as_ref() == Some(&x.key)))
            .collect();
        for gone in before.iter().filter(|x| !kept.contains(&x.key)) {
            for leaf in &kept_leaves {
                assert!(
                    time(&gone.key) <= time(&leaf.key),
                    "seed {seed}: evicted {} but kept leaf {}",
                    gone.key,
                    leaf.key
                );
            }
        }
    }
    // The seeds exercise both eviction and survival.
    assert!(
        evicted > 30 && survived > 30,
        "{evicted} evicted, {survived} kept"
    );
}

#[test]
fn rm_removes_step_descendants_and_unshared_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let a = layer(&s, b"a");
    let b = layer(&s, b"b");
    let shared = layer(&s, b"shared");
    s.record_step(&step("a", None, Some(&a), 1), std::slice::from_ref(&a))
        .unwrap();
    s.record_step(&step("b", Some("a"), Some(&b), 1), std::slice::from_ref(&b))
        .unwrap();
    s.record_step(
        &step("c", Some("b"), Some(&shared), 1),
        std::slice::from_ref(&shared),
    )
    .unwrap();
    s.record_step(&step("d", Some("a"), Some(&shared), 1), &[])
        .unwrap();

    let report = s.rm("b").unwrap();
    assert_eq!(report.steps, vec!["b", "c"]);
    assert_eq!(report.layers_removed, 1);
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.bytes_freed, b.blob_size);
    assert!(!s.blob_path(&b.blob_digest).exists());
    assert!(s.blob_path(&shared.blob_digest).exists());
    assert!(s.lookup_step("d").unwrap().is_some());
    assert_consistent(&s);

    let (od, os) = put_blob(&s, b"image");
    s.put_output("img", &od, os, 1).unwrap();
    let report = s.rm("img").unwrap();
    assert_eq!(report.outputs, vec!["img"]);
    assert!(!s.blob_path(&od).exists());

    let err = s.rm("nothing").unwrap_err();
    assert!(matches!(err, StoreError::UnknownKey { .. }));
    assert!(err.to_string().contains("nothing"));
}

#[test]
fn a_dead_writers_temp_file_is_swept_and_a_live_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    // A live writer (it holds the lock on its temp file, as it would in another process).
    let mut live = s.blob_writer().unwrap();
    live.write_all(&[7u8; 5000]).unwrap();
    live.flush().unwrap();
    // A writer that died: its temp file is left, and nobody holds a lock on it.
    let dead = dir.path().join("tmp/blob-dead1");
    std::fs::write(&dead, [9u8; 10_000]).unwrap();
    assert_eq!(tmp_count(dir.path()), 2);
    let usage = s.du().unwrap();
    assert_eq!((usage.tmp_files, usage.tmp_bytes), (1, 10_000));
    // What the next build does at its start (other builds may be running: only the dead go).
    let swept = s.sweep_dead_temp_files().unwrap();
    assert_eq!(swept, vec![(dead.clone(), 10_000)]);
    assert_eq!(tmp_count(dir.path()), 1);
    // gc too.
    std::fs::write(dir.path().join("tmp/blob-dead2"), b"x").unwrap();
    let report = s.gc(u64::MAX).unwrap();
    assert_eq!(report.tmp_files_removed, 1);
    assert_eq!(tmp_count(dir.path()), 1);
    let (digest, size) = live.finish().unwrap();
    assert_eq!(size, 5000);
    assert!(s.verify_blob(&digest).unwrap());
    assert_eq!(tmp_count(dir.path()), 0);
}

#[test]
fn a_waiting_gc_goes_before_stores_opened_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let quick = StoreOptions {
        lock_timeout: Some(Duration::from_millis(400)),
    };
    // A running build.
    let running = store(dir.path());
    let root = dir.path().to_path_buf();
    let gc = std::thread::spawn(move || Store::open(&root).unwrap().gc(0).unwrap());
    // Wait until the gc queues (it holds gc.lock while it waits for the builds).
    let gate = std::fs::File::open(dir.path().join("gc.lock")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gate.try_lock_shared().is_ok() {
        gate.unlock().unwrap();
        assert!(std::time::Instant::now() < deadline, "gc never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(gate);
    // A build starting now waits behind the gc, although the running one holds only a shared
    // lock (without the queue it would get one too, and a stream of builds would starve gc).
    let (err, log) = capture_logs(|| Store::open_with(dir.path(), quick.clone()).unwrap_err());
    assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
    assert!(log.contains("gc/verify/rm"), "{log}");
    assert!(!gc.is_finished());
    // Once the running build ends, the gc runs, and then new builds open.
    drop(running);
    gc.join().unwrap();
    let s = Store::open_with(dir.path(), quick).unwrap();
    assert!(s.list_steps().unwrap().is_empty());
}

#[test]
fn a_read_only_store_reads_and_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        let l = layer(&s, b"content");
        s.record_step(&step("k1", None, Some(&l), 1), &[l]).unwrap();
    }
    let ro = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.list_steps().unwrap().len(), 1);
    assert_eq!(ro.du().unwrap().steps, 1);
    assert!(ro.blob_writer().is_err());
    assert!(ro.gc(0).is_err());
    assert!(ro.touch_step("k1", 5).is_err());
    // A writer can open beside it (both hold shared locks).
    let rw = store(dir.path());
    assert_eq!(rw.get_step("k1").unwrap().unwrap().last_used, 1);
}

#[test]
fn verify_drops_a_layer_the_check_refuses_with_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let good = layer(&s, b"a good layer");
    let bad = layer(&s, b"a hostile layer");
    s.record_step(
        &step("k1", None, Some(&good), 1),
        std::slice::from_ref(&good),
    )
    .unwrap();
    s.record_step(
        &step("k2", Some("k1"), Some(&bad), 1),
        std::slice::from_ref(&bad),
    )
    .unwrap();
    s.record_step(&step("k3", Some("k2"), None, 1), &[])
        .unwrap();
    let seen = Mutex::new(0);
    let check = |l: &LayerRecord, r: &mut dyn Read| -> std::io::Result<Option<String>> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        *seen.lock().unwrap() += 1;
        Ok((l.diff_id == bad.diff_id).then(|| "an absolute path".to_string()))
    };
    let report = s.verify_with(&check, &|| Ok(())).unwrap();
    assert_eq!(*seen.lock().unwrap(), 2);
    assert_eq!(report.layers_checked, 2);
    assert_eq!(
        report.refused,
        vec![(bad.diff_id.clone(), "an absolute path".to_string())]
    );
    assert!(!report.is_clean());
    assert_eq!(
        report.steps_dropped,
        vec!["k2".to_string(), "k3".to_string()]
    );
    assert!(s.get_step("k1").unwrap().is_some());
    assert!(s.layer_for(&bad.diff_id).unwrap().is_none());
    assert!(!s.blob_path(&bad.blob_digest).exists());
    assert!(s.blob_path(&good.blob_digest).exists());
    assert_consistent(&s);
    // Clean afterwards; a stop asked for between blobs ends verify with an error.
    assert!(s.verify_with(&check, &|| Ok(())).unwrap().is_clean());
    let stop = || Err(std::io::Error::other("cancelled"));
    assert!(s.verify_with(&check, &stop).is_err());
    assert!(s.get_step("k1").unwrap().is_some());
}

#[test]
fn gc_spares_the_temp_file_of_a_live_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut w = s.blob_writer().unwrap();
    w.write_all(b"in progress").unwrap();
    std::fs::write(dir.path().join("tmp/blob-stale"), b"x").unwrap();
    let report = s.gc(0).unwrap();
    assert_eq!(report.tmp_files_removed, 1);
    let (digest, _) = w.finish().unwrap();
    assert!(s.verify_blob(&digest).unwrap());
}

#[test]
fn concurrent_writers_keep_the_cache_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                let s = Store::open(&root).unwrap();
                let mut parent: Option<String> = None;
                for i in 0..15 {
                    // Steps 0..5 are the same in every thread (same keys, same bytes): racing
                    // writers dedupe; later ones are each thread's own.
                    let (key, content) = if i < 5 {
                        (
                            format!("common{i}"),
                            format!("common layer {i}").repeat(500),
                        )
                    } else {
                        (
                            format!("t{t}-{i}"),
                            format!("thread {t} layer {i}").repeat(300),
                        )
                    };
                    let l = layer(&s, content.as_bytes());
                    let st = step(&key, parent.as_deref(), Some(&l), i);
                    s.record_step(&st, std::slice::from_ref(&l)).unwrap();
                    s.touch_step(&key, 1000 + i).unwrap();
                    assert!(s.lookup_step(&key).unwrap().is_some());
                    parent = Some(key);
                }
                s.record_build(&BuildRecord {
                    elements: format!("thread {t}"),
                    arguments: String::new(),
                    outcome: "ok".into(),
                    step_keys: vec![],
                    started: 0,
                    seconds: 0.0,
                })
                .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = store(&root);
    let steps = s.list_steps().unwrap();
    assert_eq!(steps.len(), 5 + 6 * 10);
    assert_eq!(s.get_step("common0").unwrap().unwrap().hits, 6);
    assert_eq!(s.list_builds().unwrap().len(), 6);
    assert_eq!(tmp_count(&root), 0);
    let usage = s.du().unwrap();
    assert_eq!((usage.blobs, usage.orphan_blobs, usage.layers), (65, 0, 65));
    let report = s.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.blobs_checked, 65);
    assert_consistent(&s);
}

#[test]
fn garbage_index_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.sqlite"), vec![b'x'; 8192]).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::DamagedIndex { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("index.sqlite").display().to_string()),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn damaged_index_pages_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        let l = layer(&s, b"x");
        s.record_step(&step("k1", None, Some(&l), 1), &[l]).unwrap();
    }
    // Keep SQLite's 100-byte header, scribble over the rest of the schema page.
    let path = dir.path().join("index.sqlite");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[100..4096] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::DamagedIndex { .. }), "{err}");
    assert!(err.to_string().contains("index.sqlite"));
}

#[test]
fn an_index_damaged_inside_its_pages_is_refused_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        let mut parent: Option<String> = None;
        for i in 0..200 {
            let key = format!("k{i:03}");
            s.record_step(&step(&key, parent.as_deref(), None, i), &[])
                .unwrap();
            parent = Some(key);
        }
    }
    // The header and the schema page stay sound (opening works); a b-tree page further on
    // gets random-looking bytes in its cell area, as `dd` of random bytes into the file does.
    let path = dir.path().join("index.sqlite");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() >= 4 * 4096, "{} bytes", bytes.len());
    let page = 2 * 4096;
    let mut x: u32 = 0x9e37_79b9;
    for b in &mut bytes[page + 8..page + 4096] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::DamagedIndex { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("index.sqlite") && msg.contains("move it aside"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    let err = Store::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::DamagedIndex { .. }), "{err}");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(store(dir.path()));
    let conn = rusqlite::Connection::open(dir.path().join("index.sqlite")).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
}

#[test]
fn maintenance_waits_for_users_and_users_wait_for_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let quick = StoreOptions {
        lock_timeout: Some(Duration::from_millis(300)),
    };
    let user = store(dir.path());
    let maint = Store::open_with(dir.path(), quick.clone()).unwrap();
    // Another Store (a running build) holds a shared lock: gc must not run.
    let (err, log) = capture_logs(|| maint.gc(0).unwrap_err());
    assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
    assert!(log.contains("waiting for the cache lock"), "{log}");
    drop(user);
    maint.gc(0).unwrap();
    // The maintainer keeps working after the failed attempt, holding its shared lock again.
    assert!(maint.list_steps().unwrap().is_empty());

    // A held exclusive lock keeps Store::open waiting.
    drop(maint);
    let f = std::fs::File::open(dir.path().join("lock")).unwrap();
    f.lock().unwrap();
    let err = Store::open_with(dir.path(), quick).unwrap_err();
    assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
    f.unlock().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert!(s.du().is_ok());
}

#[test]
fn parse_size_units() {
    assert_eq!(parse_size("123").unwrap(), 123);
    assert_eq!(parse_size("0").unwrap(), 0);
    assert_eq!(parse_size("10B").unwrap(), 10);
    assert_eq!(parse_size("1K").unwrap(), 1024);
    assert_eq!(parse_size("500M").unwrap(), 500 << 20);
    assert_eq!(parse_size("500mb").unwrap(), 500 << 20);
    assert_eq!(parse_size("10G").unwrap(), 10 << 30);
    assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
    assert_eq!(parse_size(" 2 T ").unwrap(), 2 << 40);
    assert_eq!(parse_size(".5K").unwrap(), 512);
    assert_eq!(parse_size("0.1K").unwrap(), 102);
    for bad in [
        "",
        "G",
        "1.2.3G",
        "10X",
        "-5",
        "1e9",
        "99999999999999999999",
        "20000000000G",
        ".",
    ] {
        let err = parse_size(bad).unwrap_err();
        assert!(matches!(err, StoreError::BadSize { .. }), "{bad}: {err}");
    }
}

/// Not a test on its own: the body of the writer processes that
/// `killed_writer_processes_leave_no_partial_entry` starts (and kills) from this test binary.
#[test]
#[ignore = "run as a child process by killed_writer_processes_leave_no_partial_entry"]
fn child_writer_process() {
    let (Ok(root), Ok(id)) = (
        std::env::var("STRATA_STORE_TEST_DIR"),
        std::env::var("STRATA_STORE_TEST_ID"),
    ) else {
        return;
    };
    let s = Store::open(Path::new(&root)).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..100_000 {
        let content = format!("process {id} step {i} ").repeat(4000);
        let l = layer(&s, content.as_bytes());
        let key = format!("p{id}-{i}");
        s.record_step(
            &step(&key, parent.as_deref(), Some(&l), i),
            std::slice::from_ref(&l),
        )
        .unwrap();
        parent = Some(key);
    }
}

#[test]
fn killed_writer_processes_leave_no_partial_entry() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<std::process::Child> = (0..3)
        .map(|id| {
            std::process::Command::new(&exe)
                .args([
                    "store::tests::child_writer_process",
                    "--exact",
                    "--ignored",
                    "-q",
                ])
                .env("STRATA_STORE_TEST_DIR", dir.path())
                .env("STRATA_STORE_TEST_ID", id.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Let them write for a while, then SIGKILL each at a different moment.
    for (i, child) in children.iter_mut().enumerate() {
        std::thread::sleep(Duration::from_millis(400 + 137 * i as u64));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let s = store(dir.path());
    let steps = s.list_steps().unwrap();
    assert!(
        steps.len() >= 3,
        "the writers recorded only {} steps",
        steps.len()
    );
    assert_consistent(&s);
    for st in &steps {
        assert!(s.lookup_step(&st.key).unwrap().is_some());
    }
    let report = s.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    // Whatever the kills left in tmp/ is not a blob, and gc clears it.
    s.gc(u64::MAX).unwrap();
    assert_eq!(tmp_count(dir.path()), 0);
    assert_eq!(s.du().unwrap().orphan_blobs, 0);
    assert!(s.verify().unwrap().is_clean());
}

#[test]
fn writing_a_blob_again_repairs_a_stored_copy_damaged_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let (d, _) = put_blob(&s, b"good bytes");
    let path = s.blob_path(&d);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, b"good bytez").unwrap(); // same size, one byte off
    assert!(!s.verify_blob(&d).unwrap());
    put_blob(&s, b"good bytes");
    assert!(s.verify_blob(&d).unwrap());
    assert_eq!(tmp_count(dir.path()), 0);
}

#[test]
fn a_step_repaired_before_the_drop_is_kept() {
    // lookup_step saw a truncated blob; another build wrote it again before the drop ran.
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let l = layer(&s, &[1u8; 4096]);
    s.record_step(&step("k1", None, Some(&l), 1), std::slice::from_ref(&l))
        .unwrap();
    let rec = s.get_step("k1").unwrap().unwrap();
    let stale = super::index::Broken::WrongSize(s.layer_for(&l.diff_id).unwrap().unwrap(), 1000);
    s.drop_broken_step(&rec, stale).unwrap();
    assert!(s.lookup_step("k1").unwrap().is_some());
    assert!(s.blob_path(&l.blob_digest).exists());
}

#[test]
fn a_schema_2_index_opens_keeps_its_steps_and_gains_the_mounts_column() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    // A cache as strata with schema 2 left it: a blob, its layer and a step row.
    let l = {
        let s = store(&root);
        layer(&s, b"an old layer")
    };
    let db = root.join("index.sqlite");
    std::fs::remove_file(&db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(root.join(format!("index.sqlite{suffix}")));
    }
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(&index::MIGRATIONS[..2].join("\n"))
            .unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO layers (diff_id, blob, size, blob_size) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![l.diff_id, l.blob_digest, l.size as i64, l.blob_size as i64],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO steps (key, parent, phase, hook, layer, hooks_layer, inputs, created,
             last_used, hits, seconds) VALUES ('old', NULL, 'root.d', '50-x', ?1, NULL, '{}',
             1, 1, 0, 0.5)",
            [&l.diff_id],
        )
        .unwrap();
    }
    // A read-only open of the old index reads it as it is (no mounts column yet).
    let ro = Store::open_read_only(&root).unwrap();
    assert!(ro.lookup_step("old").unwrap().unwrap().mounts.is_empty());
    drop(ro);
    let s = store(&root);
    let old = s
        .lookup_step("old")
        .unwrap()
        .expect("the old step is still a hit");
    assert_eq!(old.layer.as_deref(), Some(l.diff_id.as_str()));
    assert!(old.mounts.is_empty());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let has_column: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('steps') WHERE name = 'mounts'")
        .unwrap()
        .exists([])
        .unwrap();
    assert!(has_column);
    drop(conn);
    // A step with mounts round-trips through the new column.
    let mounts = vec![StepMount {
        step: "root.d/50-shared-apt-cache".into(),
        target: "var/cache/apt/archives".into(),
        kind: "bind".into(),
        source: "apt/debian".into(),
        base: "image-cache".into(),
        options: "rw,relatime".into(),
        fs_options: String::new(),
    }];
    let new = StepRecord {
        mounts: mounts.clone(),
        ..step("new", Some("old"), None, 2)
    };
    s.record_step(&new, &[]).unwrap();
    assert_eq!(s.lookup_step("new").unwrap().unwrap().mounts, mounts);
    assert_eq!(s.get_step("old").unwrap().unwrap().mounts, vec![]);
}
