//! Tests of the cache levels against real stores (temp folders, real SQLite) and real layers
//! packed by the layer module.

use super::*;
use crate::store::{Broken, Store};
use std::path::Path;
use std::sync::Arc;

/// Packs a one-file tree into `cache` and records it as step `key` (with `parent`).
fn step_with_layer(cache: &dyn StepCache, key: &str, parent: Option<&str>, body: &str) -> Hit {
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join(format!("{key}.txt")), body).unwrap();
    let scan = crate::layer::scan(tree.path(), &Default::default()).unwrap();
    let changes = crate::layer::Changeset::full(&scan);
    let mut sink = cache.blob_sink().unwrap().unwrap();
    let info = crate::layer::pack(tree.path(), &changes, &mut sink, &Default::default()).unwrap();
    let (digest, blob_size) = sink.finish().unwrap();
    let layer = LayerRecord {
        diff_id: info.diff_id,
        blob_digest: digest,
        size: info.tar_size,
        blob_size,
    };
    let step = StepRecord {
        key: key.to_string(),
        parent: parent.map(str::to_string),
        phase: "install.d".into(),
        hook: format!("10-{key}"),
        layer: Some(layer.diff_id.clone()),
        hooks_layer: None,
        inputs: "{}".into(),
        created: 100,
        last_used: 100,
        hits: 0,
        seconds: 1.0,
        mounts: Vec::new(),
    };
    cache
        .record_step(&step, std::slice::from_ref(&layer))
        .unwrap();
    Hit {
        step,
        layers: vec![layer],
        level: cache.name(),
    }
}

fn local(dir: &Path) -> Local {
    Local::new(Store::open(dir).unwrap())
}

fn local_lookup(dir: &Path, key: &str) -> Result<Lookup, CacheError> {
    local(dir).lookup(key)
}

/// A later level for the composition tests: lookups answer as told, blobs come from a real
/// store (or nowhere); it keeps nothing, and a write to it is a test failure.
struct Fake {
    name: &'static str,
    blobs: Option<Local>,
    lookup: LookupFn,
}

type LookupFn = Box<dyn Fn(&str) -> Result<Lookup, CacheError> + Send + Sync>;

impl StepCache for Fake {
    fn name(&self) -> String {
        self.name.into()
    }
    fn writable(&self) -> bool {
        true
    }
    fn lookup(&self, key: &str) -> Result<Lookup, CacheError> {
        (self.lookup)(key)
    }
    fn drop_step(&self, _: &str, _: Broken) -> Result<(), CacheError> {
        Ok(())
    }
    fn touch_step(&self, _: &str, _: i64) -> Result<(), CacheError> {
        Ok(())
    }
    fn nearest_step(&self, _: &str, _: &str, _: &str) -> Result<Option<StepRecord>, CacheError> {
        Ok(None)
    }
    fn open_blob(&self, digest: &str) -> Result<Box<dyn BlobRead>, CacheError> {
        match &self.blobs {
            Some(l) => l.open_blob(digest),
            None => Err(CacheError::NoBlob {
                cache: self.name(),
                digest: digest.into(),
            }),
        }
    }
    fn blob_sink(&self) -> Result<Option<Box<dyn BlobSink>>, CacheError> {
        Ok(None)
    }
    fn record_step(&self, _: &StepRecord, _: &[LayerRecord]) -> Result<(), CacheError> {
        panic!("{} must not be written to", self.name)
    }
    fn get_output(&self, _: &str) -> Result<Option<OutputRecord>, CacheError> {
        Ok(None)
    }
    fn put_output(&self, _: &str, _: &str, _: u64, _: i64) -> Result<(), CacheError> {
        Ok(())
    }
    fn touch_output(&self, _: &str, _: i64) -> Result<(), CacheError> {
        Ok(())
    }
}

fn hit(l: Lookup) -> Hit {
    match l {
        Lookup::Hit(h) => h,
        other => panic!("expected a hit, got {other:?}"),
    }
}

#[test]
fn local_lookup_hits_misses_and_reports_a_corrupt_blob_without_dropping_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = local(dir.path());
    let made = step_with_layer(&cache, "a", None, "hello");
    assert_eq!(hit(cache.lookup("a").unwrap()).layers, made.layers);
    assert_eq!(cache.lookup("nope").unwrap(), Lookup::Miss);
    assert!(cache.has_layer(&made.layers[0].diff_id).unwrap());
    // Flip a byte of the blob (same size): the lookup says why and changes nothing.
    let blob = cache.store().blob_path(&made.layers[0].blob_digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    match cache.lookup("a").unwrap() {
        Lookup::Unusable { broken, .. } => assert!(matches!(broken, Broken::Corrupt(_))),
        other => panic!("{other:?}"),
    }
    assert!(cache.store().get_step("a").unwrap().is_some());
    assert!(blob.exists());
}

#[test]
fn a_read_only_view_reads_and_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let made = step_with_layer(&local(dir.path()), "a", None, "x");
    let view = ReadOnly(local(dir.path()));
    assert!(!view.writable());
    assert!(view.blob_sink().unwrap().is_none());
    assert_eq!(hit(view.lookup("a").unwrap()).step.key, "a");
    let refused = [
        view.drop_step("a", Broken::NoLayerRow("x".into())),
        view.touch_step("a", 5),
        view.record_step(&made.step, &made.layers),
        view.put_output("o", &made.layers[0].blob_digest, 1, 5),
        view.touch_output("o", 5),
    ];
    for r in refused {
        assert!(matches!(r, Err(CacheError::ReadOnly { .. })), "{r:?}");
    }
    // Nothing changed: the step is still there and unused.
    let rec = local(dir.path()).store().get_step("a").unwrap().unwrap();
    assert_eq!((rec.last_used, rec.hits), (100, 0));
}

#[test]
fn no_cache_misses_and_keeps_nothing() {
    let c = NoCache;
    assert_eq!(c.lookup("a").unwrap(), Lookup::Miss);
    assert!(c.blob_sink().unwrap().is_none());
    assert!(!c.writable());
    assert!(c.open_blob(&"0".repeat(64)).is_err());
}

#[test]
fn a_hit_in_a_later_level_is_copied_into_the_first_and_verified() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let remote = local(d1.path());
    let parent = step_with_layer(&remote, "p", None, "parent");
    let child = step_with_layer(&remote, "c", Some("p"), "child");
    let first: Arc<dyn StepCache> = Arc::new(local(d0.path()));
    let multi = MultiLevel::new(vec![first.clone(), Arc::new(local(d1.path()))]);
    assert_eq!(first.lookup("p").unwrap(), Lookup::Miss);
    let h = hit(multi.lookup("p").unwrap());
    assert_eq!(h.level, remote.name(), "named after the level it came from");
    // Now in the first level, with the same layer; the child comes along when asked.
    assert_eq!(hit(first.lookup("p").unwrap()).layers, parent.layers);
    hit(multi.lookup("c").unwrap());
    assert_eq!(hit(first.lookup("c").unwrap()).layers, child.layers);
    // A copy into the first level is a step of its own there (created now, unused).
    assert!(hit(first.lookup("c").unwrap()).step.created > 100);
}

#[test]
fn a_poisoned_entry_in_a_later_level_is_refused_and_misses() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let remote = local(d1.path());
    let good = step_with_layer(&remote, "p", None, "the real content");
    // A second step claims the same diff id for different content (the record lies; the blob
    // itself hashes fine).
    let liar = step_with_layer(&remote, "q", None, "something else");
    let poisoned = StepRecord {
        key: "r".into(),
        layer: Some(good.layers[0].diff_id.clone()),
        ..liar.step.clone()
    };
    let bad_layer = LayerRecord {
        diff_id: good.layers[0].diff_id.clone(),
        ..liar.layers[0].clone()
    };
    let forged = Hit {
        step: poisoned,
        layers: vec![bad_layer.clone()],
        level: remote.name(),
    };
    let first = local(d0.path());
    let err = copy_layer(&remote, &first, "r", &bad_layer).unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::Mismatch {
                what: "diff id",
                ..
            }
        ),
        "{err}"
    );
    assert!(!first.has_layer(&good.layers[0].diff_id).unwrap());
    // Through the composition: a refused copy is a miss, the level stays in use.
    let first: Arc<dyn StepCache> = Arc::new(local(d0.path()));
    let d1_path = d1.path().to_path_buf();
    let multi = MultiLevel::new(vec![
        first.clone(),
        Arc::new(Fake {
            name: "forging level",
            blobs: Some(local(d1.path())),
            lookup: Box::new(move |key| {
                Ok(if key == "r" {
                    Lookup::Hit(forged.clone())
                } else {
                    local_lookup(&d1_path, key)?
                })
            }),
        }),
    ]);
    assert_eq!(multi.lookup("r").unwrap(), Lookup::Miss);
    assert_eq!(first.lookup("r").unwrap(), Lookup::Miss);
    // The level is still used for honest entries.
    hit(multi.lookup("p").unwrap());
}

#[test]
fn a_failing_later_level_is_dropped_with_one_warning_and_the_build_goes_on() {
    let d0 = tempfile::tempdir().unwrap();
    let first: Arc<dyn StepCache> = Arc::new(local(d0.path()));
    let down = Fake {
        name: "registry down.example/cache",
        blobs: None,
        lookup: Box::new(|_| {
            Err(CacheError::Other {
                cache: "registry down.example/cache".into(),
                message: "connection refused".into(),
            })
        }),
    };
    let multi = MultiLevel::new(vec![first.clone(), Arc::new(down)]);
    assert_eq!(multi.lookup("a").unwrap(), Lookup::Miss);
    // Dropped: recording a step goes to the first level only (the fake would panic).
    let made = step_with_layer(&multi, "a", None, "x");
    assert_eq!(hit(first.lookup("a").unwrap()).step, made.step);
}

#[test]
fn a_read_only_composition_reports_a_later_hit_without_copying_it() {
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    step_with_layer(&local(d1.path()), "p", None, "x");
    let first: Arc<dyn StepCache> = Arc::new(ReadOnly(local(d0.path())));
    let multi = ReadOnly(MultiLevel::new(vec![
        first,
        Arc::new(ReadOnly(local(d1.path()))),
    ]));
    let h = hit(multi.lookup("p").unwrap());
    assert!(
        h.level.contains(&d1.path().display().to_string()),
        "{}",
        h.level
    );
    assert_eq!(local(d0.path()).lookup("p").unwrap(), Lookup::Miss);
}
