//! Container image output timings: one write of a root tree per layer compression, as an OCI
//! layout and a docker archive at once (one tar stream), and each alone.
//!
//! `STRATA_BENCH_ROOTFS=/path/to/rootfs cargo bench --bench oci` (the outputs go to a temp
//! folder in `STRATA_BENCH_TMP`, default the system temp dir; they are deleted after each run).
//! Without STRATA_BENCH_ROOTFS it times a generated 64 MiB tree. One run per line, wall time:
//! a plain timer, not a statistics harness (CPU seconds too, which a busy machine disturbs
//! less than wall time).

use std::path::Path;
use std::time::Instant;

use strata::layer::{self, PackOptions, ScanOptions};
use strata::outputs::oci::{self, Compression, Formats, ImageOptions};

fn generate(root: &Path) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for d in 0..16 {
        let dir = root.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).expect("create bench dir");
        for f in 0..16 {
            let mut data = Vec::with_capacity(256 << 10);
            while data.len() < 256 << 10 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed.is_multiple_of(2) {
                    data.extend_from_slice(b"lorem ipsum dolor sit amet ");
                } else {
                    data.extend_from_slice(&seed.to_le_bytes());
                }
            }
            std::fs::write(dir.join(format!("f{f:02}")), &data).expect("write bench file");
        }
    }
}

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the zeroed struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage returned 0, so the struct is initialized.
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn main() {
    let generated;
    let root = match std::env::var_os("STRATA_BENCH_ROOTFS") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            generated = tempfile::tempdir().expect("temp dir");
            generate(generated.path());
            generated.path().to_path_buf()
        }
    };
    let tmp_base =
        std::env::var_os("STRATA_BENCH_TMP").unwrap_or_else(|| std::env::temp_dir().into());
    let started = Instant::now();
    let scan = layer::scan(&root, &ScanOptions::default()).expect("scan");
    println!(
        "scan {}: {} paths, {:.2}s",
        root.display(),
        scan.len(),
        started.elapsed().as_secs_f64()
    );
    let both = Formats {
        oci: true,
        docker: true,
    };
    let runs = [
        ("oci gzip + docker", Compression::Gzip, both),
        (
            "oci gzip",
            Compression::Gzip,
            Formats {
                oci: true,
                docker: false,
            },
        ),
        (
            "oci zstd",
            Compression::Zstd,
            Formats {
                oci: true,
                docker: false,
            },
        ),
        (
            "oci none",
            Compression::None,
            Formats {
                oci: true,
                docker: false,
            },
        ),
        (
            "docker",
            Compression::None,
            Formats {
                oci: false,
                docker: true,
            },
        ),
    ];
    for (label, compression, formats) in runs {
        let out = tempfile::tempdir_in(&tmp_base).expect("output dir");
        let name = out.path().join("bench").display().to_string();
        let opts = ImageOptions {
            compression,
            source_date_epoch: Some(0),
            arch: "amd64".into(),
            pack: PackOptions {
                source_date_epoch: Some(0),
                ..PackOptions::default()
            },
            ..ImageOptions::default()
        };
        let started = Instant::now();
        let cpu = cpu_seconds();
        let w = oci::write(&root, &scan, &name, formats, &opts, &|| false).expect("write");
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        let mib = w.layer.tar_size as f64 / (1 << 20) as f64;
        let blob = w.oci.as_ref().map_or(0, |o| o.layer.size);
        println!(
            "{label:<18} tar {mib:.0} MiB, layer blob {:.0} MiB: {secs:.2}s wall ({:.0} MiB/s), {cpu:.2}s CPU",
            blob as f64 / (1 << 20) as f64,
            mib / secs
        );
    }
}
