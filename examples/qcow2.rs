//! A small driver for strata's qcow2 writer, used by `benches/qcow2.sh`.
//!
//! ```text
//! qcow2 write RAW OUT [-o OPTIONS] [-u] [--threads N] [--previous PREV]
//!       writes OUT and its cluster map OUT.map; --previous reuses PREV and PREV.map
//! qcow2 same OLD.raw NEW.raw [CLUSTER_SIZE]
//!       how many non-zero clusters of NEW are in OLD: at the same index, at any index
//! ```
//! The write's counts and wall time go to stderr.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use strata::image::qcow2::{self, ClusterMap, ParsedOptions, Previous};

fn map_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_os_string();
    p.push(".map");
    PathBuf::from(p)
}

fn write(args: &[String]) -> anyhow::Result<()> {
    let [raw, out, rest @ ..] = args else {
        bail!("usage: qcow2 write RAW OUT [-o OPTIONS] [-u] [--threads N] [--previous PREV]");
    };
    let (mut options, mut compress, mut threads, mut previous) = (None, true, 0, None);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options = Some(it.next().context("-o needs a value")?.clone()),
            "-u" => compress = false,
            "--threads" => threads = it.next().context("--threads needs a value")?.parse()?,
            "--previous" => previous = Some(PathBuf::from(it.next().context("--previous")?)),
            other => bail!("unknown argument {other}"),
        }
    }
    let mut opts = match qcow2::parse_qemu_img_options(options.as_deref(), compress) {
        ParsedOptions::Native(o) => o,
        ParsedOptions::FallBack { reason } => bail!("not native: {reason}"),
    };
    opts.threads = threads;
    let previous = match &previous {
        Some(p) => {
            let bytes = std::fs::read(map_path(p))
                .with_context(|| format!("reading {}", map_path(p).display()))?;
            Some(Previous {
                image: p,
                map: ClusterMap::from_bytes(&bytes)?,
            })
        }
        None => None,
    };
    let start = Instant::now();
    let w = qcow2::write(Path::new(raw), Path::new(out), &opts, previous, &|| false)?;
    let secs = start.elapsed().as_secs_f64();
    std::fs::write(map_path(Path::new(out)), w.map.to_bytes())?;
    eprintln!(
        "seconds {secs:.3} clusters {} zero {} reused {} compressed {} stored_raw {} \
         rejected {} size {}{}",
        w.clusters,
        w.zero,
        w.reused,
        w.compressed,
        w.stored_raw,
        w.reuse_rejected,
        w.file_size,
        w.previous_ignored
            .map(|r| format!(" previous ignored: {r}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Calls `f` with every cluster of `path` (the last one zero-padded).
fn each_cluster(path: &str, cs: usize, mut f: impl FnMut(u64, &[u8])) -> anyhow::Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {path}"))?;
    let mut buf = vec![0u8; cs];
    let mut index = 0;
    loop {
        let mut got = 0;
        while got < cs {
            let n = file.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(());
        }
        buf[got..].fill(0);
        f(index, &buf);
        index += 1;
        if got < cs {
            return Ok(());
        }
    }
}

fn same(args: &[String]) -> anyhow::Result<()> {
    let (old, new, cs) = match args {
        [old, new] => (old, new, 65536),
        [old, new, cs] => (old, new, cs.parse()?),
        _ => bail!("usage: qcow2 same OLD.raw NEW.raw [CLUSTER_SIZE]"),
    };
    let mut old_at = Vec::new();
    let mut old_any = HashSet::new();
    each_cluster(old, cs, |_, c| {
        let h = *blake3::hash(c).as_bytes();
        old_at.push(h);
        old_any.insert(h);
    })?;
    let (mut data, mut same_index, mut anywhere) = (0u64, 0u64, 0u64);
    each_cluster(new, cs, |i, c| {
        if c.iter().all(|&b| b == 0) {
            return;
        }
        data += 1;
        let h = *blake3::hash(c).as_bytes();
        if old_at.get(i as usize) == Some(&h) {
            same_index += 1;
        }
        if old_any.contains(&h) {
            anywhere += 1;
        }
    })?;
    let pct = |n: u64| 100.0 * n as f64 / data.max(1) as f64;
    println!(
        "non-zero clusters {data}: same index {same_index} ({:.1}%), anywhere {anywhere} ({:.1}%)",
        pct(same_index),
        pct(anywhere)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("write") => write(&args[1..]),
        Some("same") => same(&args[1..]),
        _ => Err(anyhow::anyhow!("usage: qcow2 write|same ...")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcow2: {e:#}");
            ExitCode::FAILURE
        }
    }
}
