//! The tar output's cached copy in time proportional to the change: a rebuild after editing a
//! hook copies the compressed frames of the unchanged chunks from the previous output's blob,
//! and the output (and its cached copy) is byte for byte what a build from scratch gives.

use crate::harness::BuildFixture;
use std::fs;

const SDE: (&str, &str) = ("SOURCE_DATE_EPOCH", "1700000000");

/// An element with ~6 MB of files before `/opt` and ~6 MB after it in the tar (deterministic
/// text), and a last install.d hook that writes `/opt/edit/version`.
fn add_element(f: &BuildFixture, version: &str) {
    let hook = |rel: &str, body: &str| f.write_bash_hook("fixture-chunks", rel, body);
    hook(
        "install.d/30-bulk",
        "for d in /bulk-a /srv/bulk-z; do\n\
           mkdir -p $d\n\
           for i in $(seq 10 33); do\n\
             awk -v f=$i -v d=$d 'BEGIN { for (n = 0; n < 22000; n++) print d, f, n, n * f % 9973 }' > $d/f$i\n\
           done\n\
         done\n",
    );
    hook(
        "install.d/95-edit",
        &format!("mkdir -p /opt/edit\necho {version} > /opt/edit/version\n"),
    );
}

/// The numbers in the "cached copy in N chunks, K reused" line of a build's log.
fn chunks_line(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("cached copy in") && l.contains("img.tar"))
        .unwrap_or_else(|| panic!("no chunk line in the log:\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |w: &str| {
        let i = words.iter().position(|x| *x == w).unwrap();
        words[i - 1].trim_end_matches(',').parse::<u64>().unwrap()
    };
    (at("chunks,"), at("reused"))
}

#[test]
fn an_edit_rebuild_reuses_the_unchanged_chunks_and_writes_the_bytes_of_a_build_from_scratch() {
    crate::require_root!();
    let f = BuildFixture::new();
    add_element(&f, "v1");
    let build = |extra: &[&str]| {
        let args: Vec<&str> = extra
            .iter()
            .copied()
            .chain(["fixture-app", "fixture-chunks"])
            .collect();
        let out = f.run_ok(f.build_cmd(&args).env(SDE.0, SDE.1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (chunks, reused) = chunks_line(&build(&[]));
    assert!(chunks >= 6, "{chunks} chunks");
    assert_eq!(reused, 0);

    add_element(&f, "v2");
    let log = build(&[]);
    let (chunks2, reused2) = chunks_line(&log);
    assert!(
        reused2 >= chunks2 - 2 && reused2 < chunks2,
        "{reused2} of {chunks2} chunks reused:\n{log}"
    );
    let tar = f.out("img.tar");
    let incremental = fs::read(&tar).unwrap();
    assert!(String::from_utf8_lossy(&incremental).contains("v2\n"));

    // The cached copy restores to the same bytes (a no-op rebuild without the file).
    fs::remove_file(&tar).unwrap();
    let log = build(&[]);
    assert!(log.contains("cached"), "{log}");
    assert_eq!(
        fs::read(&tar).unwrap(),
        incremental,
        "restored from the chunked copy"
    );

    // A build from scratch writes the same tar.
    fs::remove_file(&tar).unwrap();
    build(&["--no-cache"]);
    assert_eq!(fs::read(&tar).unwrap(), incremental, "--no-cache build");

    // The cache checks out (every blob, the chunked one included, re-hashed and read).
    f.run_ok(
        crate::util::strata()
            .arg("cache")
            .arg("verify")
            .arg("--cache-dir")
            .arg(f.cache()),
    );
}
