//! Layer pack/unpack benchmarks: a generated tree (5,000 files of mixed sizes in 100 dirs) and,
//! when `STRATA_BENCH_ROOTFS=/path` is set, a real rootfs.
//!
//! `cargo bench --bench layer`; unpack targets go under `STRATA_BENCH_TMP` (default: the system
//! temp dir; `/dev/shm` measures tmpfs, which is where strata restores when memory allows). The end-to-end comparison with GNU tar + zstd is
//! `benches/pack_vs_tar.sh`.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use strata::layer::{self, Changeset, PackOptions, ScanOptions, UnpackOptions};

/// 5,000 files in 100 directories: mostly small, some 64 KiB, a few 1-4 MiB (pseudo-random,
/// so compression has work to do), plus symlinks.
fn generate(root: &Path) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for d in 0..100 {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).expect("create bench dir");
        for f in 0..50 {
            let size = match next() % 100 {
                0 => (1 << 20) + (next() % (3 << 20)) as usize,
                1..=10 => 64 << 10,
                _ => (next() % 8192) as usize,
            };
            let mut data = Vec::with_capacity(size);
            while data.len() < size {
                // Half-compressible: text-like runs and random words.
                let w = next();
                if w % 2 == 0 {
                    data.extend_from_slice(b"lorem ipsum dolor sit amet ");
                } else {
                    data.extend_from_slice(&w.to_le_bytes());
                }
            }
            data.truncate(size);
            std::fs::write(dir.join(format!("f{f:03}")), &data).expect("write bench file");
        }
        std::os::unix::fs::symlink("f000", dir.join("link")).expect("symlink");
    }
}

fn pack_to_vec(root: &Path) -> Vec<u8> {
    let s = layer::scan(root, &ScanOptions::default()).expect("scan");
    let mut out = Vec::new();
    layer::pack(
        root,
        &Changeset::full(&s),
        &mut out,
        &PackOptions::default(),
    )
    .expect("pack");
    out
}

fn bench_tree(c: &mut Criterion, label: &str, root: &Path, scratch: &Path) {
    let mut g = c.benchmark_group(label);
    g.sample_size(10);
    g.bench_function("scan", |b| {
        b.iter(|| black_box(layer::scan(root, &ScanOptions::default()).expect("scan")))
    });
    g.bench_function("pack", |b| b.iter(|| black_box(pack_to_vec(root))));
    let blob = pack_to_vec(root);
    let mut n = 0u64;
    g.bench_function("unpack", |b| {
        b.iter_batched(
            || {
                n += 1;
                let dir = scratch.join(format!("{label}-unpack-{n}"));
                std::fs::create_dir_all(&dir).expect("create target");
                Target(dir)
            },
            |t| {
                layer::unpack(&blob[..], &t.0, &UnpackOptions::default()).expect("unpack");
                t
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// An unpack target removed when dropped (outside the timed section).
struct Target(PathBuf);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn benches(c: &mut Criterion) {
    let tmp = match std::env::var_os("STRATA_BENCH_TMP") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let tree = tmp.path().join("tree");
    generate(&tree);
    bench_tree(c, "generated-5k", &tree, tmp.path());
    if let Some(rootfs) = std::env::var_os("STRATA_BENCH_ROOTFS") {
        bench_tree(c, "rootfs", Path::new(&rootfs), tmp.path());
    }
}

criterion_group!(layer_benches, benches);
criterion_main!(layer_benches);
