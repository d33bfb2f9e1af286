//! The shared cache on a real registry (Debian's docker-registry, CNCF distribution 2.8, started
//! by the harness on 127.0.0.1), and the OCI image outputs checked with umoci and skopeo.

use crate::harness::BuildFixture;
use crate::registry_server::RegistryServer;
use crate::util::{run, strata};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// The sha256 (hex) a build's local cache recorded for the blob of the layer `diff_id` (set
/// when the blob was pushed).
fn pushed_sha256(cache: &Path, diff_id: &str) -> String {
    let db = rusqlite::Connection::open(cache.join("index.sqlite")).unwrap();
    let sha: String = db
        .query_row(
            "SELECT s.sha256 FROM layers l JOIN blob_sha256 s ON s.blob = l.blob
             WHERE l.diff_id = ?1",
            [diff_id],
            |r| r.get(0),
        )
        .unwrap();
    sha.trim_start_matches("sha256:").to_string()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_builder_with_an_empty_cache_pulls_every_step_and_writes_the_same_output() {
    crate::require_root!();
    let Some(reg) = RegistryServer::http("a_second_builder_pulls") else {
        return;
    };
    let r = reg.reference("strata/cache");
    let a = BuildFixture::new();
    let first = a.build_ok(&["--cache-to", &r]);
    assert!(first.cached().is_empty());
    // Builder B: another folder, another (empty) cache; it runs no hook.
    let b = BuildFixture::new();
    let plan = b.plan(&["--cache-from", &r]);
    assert!(
        plan.as_array()
            .unwrap()
            .iter()
            .all(|s| s["cached"] == true && s["from"].as_str().unwrap().contains("registry")),
        "{plan}"
    );
    let out = b.build_cmd(&["--cache-from", &r]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let second = b.manifest();
    assert!(second.ran().is_empty(), "{:?}", second.ran());
    assert!(!stderr_of(&out).contains("] + "), "no hook output expected");
    assert_eq!(first.output_digest(), second.output_digest());
    assert_eq!(
        fs::read(a.out("img.tar")).unwrap(),
        fs::read(b.out("img.tar")).unwrap()
    );
    // The hits were copied into B's cache: a rerun needs no registry at all.
    drop(reg);
    let third = b.build_ok(&[]);
    assert!(third.ran().is_empty());
}

#[test]
fn a_layer_altered_in_the_registry_is_refused_and_that_step_runs_here() {
    crate::require_root!();
    let Some(reg) = RegistryServer::http("a_layer_altered_in_the_registry") else {
        return;
    };
    let r = reg.reference("strata/cache");
    let a = BuildFixture::new();
    let first = a.build_ok(&["--cache-to", &r]);
    // Flip a byte of the first step's layer inside the registry's storage.
    let diff_id = first.diff_ids()[0].clone().unwrap();
    let data = reg.blob_data_path(&pushed_sha256(&a.cache(), &diff_id));
    let mut bytes = fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    fs::write(&data, bytes).unwrap();
    let b = BuildFixture::new();
    let out = b.build_cmd(&["--cache-from", &r]).output().unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("root.d/10-busybox-rootfs") && l.contains("running it here"))
        .unwrap_or_else(|| panic!("no warning naming the step:\n{err}"));
    assert!(warning.contains("registry"), "{warning}");
    let second = b.manifest();
    assert_eq!(second.ran()[0], "root.d/10-busybox-rootfs");
    assert_eq!(second.keys(), first.keys());
}

#[test]
fn signed_records_are_used_only_with_a_trusted_key() {
    crate::require_root!();
    let Some(reg) = RegistryServer::http("signed_records") else {
        return;
    };
    let r = reg.reference("strata/signed");
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let out = keys.path().join(format!("{name}.key"));
        run(
            strata().args(["cache", "keygen", name, "--out"]).arg(&out),
            0,
        );
        out
    };
    let (ci, other) = (key("ci"), key("someone-else"));
    let a = BuildFixture::new();
    a.build_ok(&[
        "--cache-to",
        &r,
        "--cache-sign-key",
        &ci.display().to_string(),
    ]);
    // Trusting another key: every record is refused, everything runs.
    let b = BuildFixture::new();
    let other_pub = format!("{}.pub", other.display());
    let out = b
        .build_cmd(&["--cache-from", &r, "--cache-trust", &other_pub])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("refused") && err.contains("--cache-trust"),
        "{err}"
    );
    assert!(b.manifest().cached().is_empty());
    // Trusting the signer: every step comes from the registry.
    let c = BuildFixture::new();
    let ci_pub = format!("{}.pub", ci.display());
    let m = c.build_ok(&["--cache-from", &r, "--cache-trust", &ci_pub]);
    assert!(m.ran().is_empty(), "{:?}", m.ran());
    // An unsigned record (pushed without a key) is refused under --cache-trust too.
    let r2 = reg.reference("strata/unsigned");
    BuildFixture::new().build_ok(&["--cache-to", &r2]);
    let d = BuildFixture::new();
    let m = d.build_ok(&["--cache-from", &r2, "--cache-trust", &ci_pub]);
    assert!(m.cached().is_empty());
}

#[test]
fn a_registry_that_stops_mid_build_gives_one_warning_and_a_good_build() {
    crate::require_root!();
    let Some(mut reg) = RegistryServer::http("a_registry_that_stops") else {
        return;
    };
    let r = reg.reference("strata/flaky");
    let f = BuildFixture::new();
    let hold = f.path().join("tmp/hold");
    fs::write(&hold, "").unwrap();
    let mut child = f
        .build_cmd(&["--cache-from", &r, "--cache-to", &r])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Wait for the hold hook (post-root.d), stop the registry, let the build go on.
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("holding") {
        let n = stderr.read(&mut chunk).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    reg.stop();
    fs::remove_file(&hold).unwrap();
    stderr.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    let err = String::from_utf8_lossy(&seen);
    f.assert_no_leftovers();
    assert!(status.success(), "{err}");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("registry"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning about the registry expected:\n{err}"
    );
    assert!(
        warnings[0].contains("not using it for the rest of this build"),
        "{}",
        warnings[0]
    );
    // Everything is in the local cache.
    assert!(f.build_ok(&[]).ran().is_empty());
}

#[test]
fn basic_auth_over_https_from_a_docker_config_file() {
    crate::require_root!();
    let Some(reg) = RegistryServer::https_basic("basic_auth_over_https", "ci", "s3cret") else {
        return;
    };
    let r = reg.reference("strata/private");
    let ca = reg.ca_file().unwrap();
    let docker = tempfile::tempdir().unwrap();
    let auth = base64_encode(b"ci:s3cret");
    fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let env = [
        ("DOCKER_CONFIG", docker.path().to_str().unwrap()),
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
    ];
    let a = BuildFixture::new();
    let first = a.build_ok_with(&["--cache-to", &r], &env);
    // What was pushed is there, under the credentials: pull it into an empty cache.
    let cache = tempfile::tempdir().unwrap();
    let (out, _) = run(
        strata()
            .args(["cache", "pull", &r, "--json", "--cache-dir"])
            .arg(cache.path())
            .envs(env),
        0,
    );
    let pulled: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        pulled["steps"].as_u64().unwrap() as usize,
        first.keys().len()
    );
    // Without credentials the registry refuses: one warning, and the build still succeeds.
    let b = BuildFixture::new();
    let out = b
        .build_cmd(&["--cache-from", &r])
        .env("SSL_CERT_FILE", &ca)
        .env("DOCKER_CONFIG", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("refused access"),
        "{}",
        stderr_of(&out)
    );
    assert!(b.manifest().cached().is_empty());
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn push_pull_and_prune_keep_exactly_what_kept_builds_need() {
    crate::require_root!();
    let Some(reg) = RegistryServer::http("push_pull_and_prune") else {
        return;
    };
    let r = reg.reference("strata/pruned");
    let f = BuildFixture::new();
    let old = f.build_ok(&[]);
    fs::copy(f.out("img.strata.json"), f.path().join("old.strata.json")).unwrap();
    // Push everything the local cache holds.
    let (out, _) = run(
        strata()
            .args(["cache", "push", &r, "--json", "--cache-dir"])
            .arg(f.cache()),
        0,
    );
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["steps"].as_u64().unwrap() as usize, old.keys().len());
    // A second build after an edit of the last install hook: it shares the first steps.
    let hook = f.elements().join("fixture-app/install.d/90-last");
    let text = fs::read_to_string(&hook).unwrap();
    fs::write(&hook, format!("{text}\necho edited\n")).unwrap();
    let new = f.build_ok(&["--cache-to", &r]);
    let new_keys = new.keys();
    let old_keys = old.keys();
    let old_only: Vec<&String> = old_keys.iter().filter(|k| !new_keys.contains(k)).collect();
    assert!(!old_only.is_empty());
    let keep = f.out("img.strata.json");
    let (out, _) = run(
        strata()
            .args(["cache", "prune", &r, "--json", "--keep"])
            .arg(&keep),
        0,
    );
    let pruned: serde_json::Value = serde_json::from_str(&out).unwrap();
    let deleted: Vec<String> = pruned["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().split(' ').nth(1).unwrap().to_string())
        .collect();
    for k in &old_only {
        assert!(deleted.contains(k), "{k} should be gone: {deleted:?}");
    }
    for k in &new_keys {
        assert!(!deleted.contains(k), "kept {k} was deleted");
    }
    // A second prune finds nothing more; the kept build still pulls whole, the old one not.
    let (out, _) = run(
        strata()
            .args(["cache", "prune", &r, "--json", "--dry-run", "--keep"])
            .arg(&keep),
        0,
    );
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["deleted"].as_array().unwrap().len(), 0, "{again}");
    let empty = tempfile::tempdir().unwrap();
    let last = new_keys.last().unwrap().clone();
    run(
        strata()
            .args(["cache", "pull", &r, &last, "--cache-dir"])
            .arg(empty.path()),
        0,
    );
    let (_, err) = run(
        strata()
            .args(["cache", "pull", &r, old_only[0], "--cache-dir"])
            .arg(empty.path()),
        6,
    );
    assert!(err.contains("no usable step"), "{err}");
}

fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        eprintln!("skipping: {name} is not installed (the Debian package {name})");
    }
    found
}

#[test]
fn oci_and_docker_outputs_are_read_by_umoci_and_skopeo_and_push_to_a_registry() {
    crate::require_root!();
    if !tool("skopeo") || !tool("umoci") {
        return;
    }
    let f = BuildFixture::new();
    let build = || {
        f.run_ok(
            f.build_cmd_typed("img", "oci,docker,tar", &[])
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        );
        f.manifest()
    };
    let m = build();
    let layout = f.out("img.oci");
    let archive = f.out("img.docker.tar");
    let inspect = |target: String| {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(&target)
            .output()
            .unwrap();
        assert!(out.status.success(), "{target}: {}", stderr_of(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let oci = inspect(format!("oci:{}:latest", layout.display()));
    assert_eq!(oci["layers"].as_array().unwrap().len(), 1);
    assert!(
        oci["layers"][0]["mediaType"]
            .as_str()
            .unwrap()
            .ends_with("tar+gzip")
    );
    inspect(format!("docker-archive:{}", archive.display()));
    // umoci unpacks the layout to the same tree the tar output holds.
    let bundle = f.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/etc/fixture/last")).unwrap(),
        f.tar_member(&f.out("img.tar"), "etc/fixture/last").unwrap()
    );
    // The manifest records the layout by its index.json's blake3; a no-op rerun keeps it.
    let again = build();
    assert!(again.ran().is_empty());
    for i in 0..3 {
        assert_eq!(
            m.0["outputs"][i]["blake3"], again.0["outputs"][i]["blake3"],
            "{}\n{}",
            m.0["outputs"], again.0["outputs"]
        );
        assert_eq!(again.0["outputs"][i]["cached"], true);
    }
    // Deleted, the layout comes back from the cache, byte for byte.
    let index = fs::read(layout.join("index.json")).unwrap();
    fs::remove_dir_all(&layout).unwrap();
    build();
    assert_eq!(fs::read(layout.join("index.json")).unwrap(), index);
    inspect(format!("oci:{}:latest", layout.display()));
    // --push sends the image to a registry.
    let Some(reg) = RegistryServer::http("oci_push") else {
        return;
    };
    let target = format!("{}:v1", reg.reference("strata/image"));
    f.run_ok(&mut f.build_cmd_typed("img", "oci", &["--push", &target]));
    let pushed = inspect(format!("docker://{}/strata/image:v1", reg.host()));
    assert_eq!(pushed["layers"].as_array().unwrap().len(), 1);
}
