//! Tests of the registry client against Debian's real `docker-registry` (distribution 2.8),
//! started by the harness in `tests/support/registry_server.rs`; each skips with one line when
//! the binary is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;

use super::manifest::{Descriptor, ImageManifest};
use super::server::{RegistryServer, TokenPolicy};
use super::*;

const STEP_CONFIG: &str = "application/vnd.strata.step.v1+json";
const REPO: &str = "strata/cache";

/// Options that read nothing from the host: an empty docker config folder, no certs.d, short
/// retries.
fn options(server: &RegistryServer) -> ClientOptions {
    let empty = server.scratch().join("empty-docker-config");
    std::fs::create_dir_all(&empty).unwrap();
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(20),
        retries: 1,
        retry_delay: Duration::from_millis(50),
        extra_ca_file: server.ca_file(),
        certs_dirs: Vec::new(),
        docker_config_dir: Some(empty),
        helper_path: Some("/nonexistent".into()),
        credential: None,
        proxy_from_env: false,
        ..ClientOptions::default()
    }
}

fn client(server: &RegistryServer, options: ClientOptions) -> Client {
    let r = Reference::parse(&server.reference(REPO), &[]).unwrap();
    Client::new(&r.registry, options).unwrap()
}

use crate::testutil::noise;

fn docker_config(dir: &Path, json: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
    dir.to_path_buf()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn blob_push_pull_and_skip_when_present() {
    let Some(server) = RegistryServer::http("blob_push_pull_and_skip_when_present") else {
        return;
    };
    let c = client(&server, options(&server));
    c.ping().unwrap();
    let data = noise(300_000, 1);
    let digest = Digest::of(&data);
    assert_eq!(c.blob_exists(REPO, &digest).unwrap(), None);
    let pushed = c.push_blob_bytes(REPO, &data).unwrap();
    assert_eq!(
        pushed,
        PushedBlob {
            digest: digest.clone(),
            size: data.len() as u64,
            uploaded: true
        }
    );
    assert_eq!(
        c.blob_exists(REPO, &digest).unwrap(),
        Some(data.len() as u64)
    );
    let again = c.push_blob_bytes(REPO, &data).unwrap();
    assert!(!again.uploaded, "an existing blob is not uploaded again");

    let moved = AtomicU64::new(0);
    let progress = |n: u64| {
        moved.fetch_add(n, Ordering::SeqCst);
    };
    let t = Transfer {
        progress: &progress,
        cancelled: &|| false,
    };
    let mut out = Vec::new();
    assert_eq!(
        c.pull_blob(REPO, &digest, &mut out, &t).unwrap(),
        data.len() as u64
    );
    assert_eq!(out, data);
    assert_eq!(moved.load(Ordering::SeqCst), data.len() as u64);

    // A file push (digest computed from the file), then a pull into a file.
    let dir = server.scratch();
    let src = dir.join("layer.tar.zst");
    let big = noise(3 << 20, 2);
    std::fs::write(&src, &big).unwrap();
    let moved_up = AtomicU64::new(0);
    let up = |n: u64| {
        moved_up.fetch_add(n, Ordering::SeqCst);
    };
    let pushed = c
        .push_blob_file(
            REPO,
            &src,
            None,
            &Transfer {
                progress: &up,
                cancelled: &|| false,
            },
        )
        .unwrap();
    assert!(pushed.uploaded);
    assert_eq!(pushed.digest, Digest::of(&big));
    assert_eq!(moved_up.load(Ordering::SeqCst), big.len() as u64);
    let dst = dir.join("pulled");
    c.pull_blob_to_file(REPO, &pushed.digest, &dst, &Transfer::none())
        .unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), big);

    // Unknown blobs: typed NotFound on pull.
    let missing = Digest::of(b"never pushed");
    let e = c
        .pull_blob(REPO, &missing, &mut Vec::new(), &Transfer::none())
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");

    // One client shared by threads (pushes run on a background thread in strata).
    let shared = Arc::new(c);
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let c = shared.clone();
            std::thread::spawn(move || c.push_blob_bytes(REPO, &noise(50_000, 10 + i)).unwrap())
        })
        .collect();
    for h in handles {
        let p = h.join().unwrap();
        assert_eq!(shared.blob_exists(REPO, &p.digest).unwrap(), Some(50_000));
    }
}

/// Pushes a config blob and two zstd layer blobs; returns the manifest bytes.
fn push_step_image(c: &Client, repo: &str, seed: u64) -> Vec<u8> {
    let record = format!(r#"{{"key":"{seed}","signature":"ci:AAAA"}}"#).into_bytes();
    let config = c.push_blob_bytes(repo, &record).unwrap();
    let layers: Vec<Descriptor> = (0..2)
        .map(|i| {
            let blob = noise(10_000 + i, seed * 10 + i as u64);
            let p = c.push_blob_bytes(repo, &blob).unwrap();
            Descriptor {
                media_type: media_types::OCI_LAYER_ZSTD.to_string(),
                digest: p.digest.to_string(),
                size: p.size,
                annotations: Default::default(),
            }
        })
        .collect();
    let manifest = ImageManifest::new(
        Descriptor {
            media_type: STEP_CONFIG.to_string(),
            digest: config.digest.to_string(),
            size: config.size,
            annotations: Default::default(),
        },
        layers,
    );
    manifest.to_bytes()
}

#[test]
fn manifest_put_get_head_delete_with_strata_media_types() {
    let Some(server) = RegistryServer::http("manifest_put_get_head_delete_with_strata_media_types")
    else {
        return;
    };
    let c = client(&server, options(&server));
    let bytes = push_step_image(&c, REPO, 1);
    let digest = c
        .put_manifest(REPO, "step-key-1", media_types::OCI_MANIFEST, &bytes)
        .unwrap();
    assert_eq!(digest, Digest::of(&bytes));

    let by_tag = c.get_manifest(REPO, "step-key-1", &[]).unwrap();
    assert_eq!(by_tag.bytes, bytes, "the registry returns the exact bytes");
    assert_eq!(by_tag.media_type, media_types::OCI_MANIFEST);
    assert_eq!(by_tag.digest, digest);
    let parsed = ImageManifest::from_bytes(&by_tag.bytes).unwrap();
    assert_eq!(parsed.config.media_type, STEP_CONFIG);
    assert_eq!(parsed.layers[0].media_type, media_types::OCI_LAYER_ZSTD);
    let by_digest = c
        .get_manifest(REPO, digest.as_str(), &[media_types::OCI_MANIFEST])
        .unwrap();
    assert_eq!(by_digest, by_tag);
    let head = c.head_manifest(REPO, "step-key-1", &[]).unwrap().unwrap();
    assert_eq!(head.digest.as_ref(), Some(&digest));
    assert_eq!(head.size, Some(bytes.len() as u64));
    assert_eq!(c.head_manifest(REPO, "absent", &[]).unwrap(), None);

    // Putting by digest works too, and a digest that is not the bytes' is refused locally.
    assert_eq!(
        c.put_manifest(REPO, digest.as_str(), media_types::OCI_MANIFEST, &bytes)
            .unwrap(),
        digest
    );
    let e = c
        .put_manifest(
            REPO,
            Digest::of(b"x").as_str(),
            media_types::OCI_MANIFEST,
            &bytes,
        )
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");

    // distribution checks that every referenced blob exists.
    let mut dangling = ImageManifest::from_bytes(&bytes).unwrap();
    dangling.layers[1].digest = Digest::of(b"not pushed").to_string();
    let e = c
        .put_manifest(
            REPO,
            "dangling",
            media_types::OCI_MANIFEST,
            &dangling.to_bytes(),
        )
        .unwrap_err();
    match e {
        RegistryError::Refused { status, code, .. } => {
            assert_eq!(status, 400);
            assert_eq!(code.as_deref(), Some("MANIFEST_BLOB_UNKNOWN"));
        }
        other => panic!("{other}"),
    }

    c.delete_manifest(REPO, &digest).unwrap();
    let e = c.get_manifest(REPO, "step-key-1", &[]).unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    let e = c.delete_manifest(REPO, &digest).unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
}

#[test]
fn tags_and_catalog_follow_link_pages() {
    let Some(server) = RegistryServer::http("tags_and_catalog_follow_link_pages") else {
        return;
    };
    let c = client(&server, options(&server));
    let bytes = push_step_image(&c, REPO, 2);
    let mut want: Vec<String> = (0..5).map(|i| format!("key-{i}")).collect();
    for t in &want {
        c.put_manifest(REPO, t, media_types::OCI_MANIFEST, &bytes)
            .unwrap();
    }
    let mut tags = c.list_tags(REPO, Some(2)).unwrap();
    tags.sort();
    assert_eq!(tags, want);
    let e = c.list_tags("strata/none", None).unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");

    // distribution 2.8 pages its catalog (its tags/list ignores `n`): 5 repositories in pages
    // of 2 are only all seen by following the Link headers.
    want = (0..5).map(|i| format!("repo{i}/x")).collect();
    for r in &want {
        c.push_blob_bytes(r, b"seed").unwrap();
        let b = push_step_image(&c, r, 3);
        c.put_manifest(r, "t", media_types::OCI_MANIFEST, &b)
            .unwrap();
    }
    want.push(REPO.to_string());
    want.sort();
    let mut repos = c.catalog(Some(2)).unwrap();
    repos.sort();
    assert_eq!(repos, want);
}

#[test]
fn altered_blob_in_storage_is_refused_with_digest_mismatch() {
    let Some(server) =
        RegistryServer::http("altered_blob_in_storage_is_refused_with_digest_mismatch")
    else {
        return;
    };
    let c = client(&server, options(&server));
    let data = noise(100_000, 3);
    let digest = c.push_blob_bytes(REPO, &data).unwrap().digest;
    let path = server.blob_data_path(digest.hex());
    let mut stored = std::fs::read(&path).unwrap();
    assert_eq!(stored, data, "the storage layout is as the harness expects");
    stored[50_000] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let mut out = Vec::new();
    let e = c
        .pull_blob(REPO, &digest, &mut out, &Transfer::none())
        .unwrap_err();
    match &e {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, digest.as_str());
            assert_eq!(actual, Digest::of(&stored).as_str());
        }
        other => panic!("{other}"),
    }
    let dir = server.scratch().join("altered");
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join("blob");
    let e = c
        .pull_blob_to_file(REPO, &digest, &dst, &Transfer::none())
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing is left behind: no file, no temp file"
    );
}

#[test]
fn https_basic_auth_from_docker_config() {
    let Some(server) =
        RegistryServer::https_basic("https_basic_auth_from_docker_config", "bob", "b0b-pw")
    else {
        return;
    };
    let host = server.host();
    let r = Reference::parse(&server.reference(REPO), &[]).unwrap();
    assert_eq!(r.registry.scheme, Scheme::Https);

    // Anonymous: refused with a typed error.
    let anon = client(&server, options(&server));
    let e = anon.push_blob_bytes(REPO, b"x").unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");

    // Credentials from a docker config.json (the folder DOCKER_CONFIG would name).
    let cfg = docker_config(
        &server.scratch().join("docker"),
        &format!(
            r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
            b64("bob:b0b-pw")
        ),
    );
    let c = client(
        &server,
        ClientOptions {
            docker_config_dir: Some(cfg),
            ..options(&server)
        },
    );
    c.ping().unwrap();
    let p = c.push_blob_bytes(REPO, b"over https").unwrap();
    let mut out = Vec::new();
    c.pull_blob(REPO, &p.digest, &mut out, &Transfer::none())
        .unwrap();
    assert_eq!(out, b"over https");

    // A wrong password is refused.
    let wrong = docker_config(
        &server.scratch().join("docker-wrong"),
        &format!(r#"{{"auths": {{"https://{host}": {{"username": "bob", "password": "nope"}}}}}}"#),
    );
    let c = client(
        &server,
        ClientOptions {
            docker_config_dir: Some(wrong),
            ..options(&server)
        },
    );
    let e = c.ping().unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");

    // Without the CA the certificate is refused; with it in a certs.d folder it is trusted.
    let untrusting = client(
        &server,
        ClientOptions {
            extra_ca_file: None,
            ..options(&server)
        },
    );
    let e = untrusting.ping().unwrap_err();
    assert!(matches!(e, RegistryError::Tls { .. }), "{e}");
    let certs_d = server.scratch().join("certs.d");
    std::fs::create_dir_all(certs_d.join(&host)).unwrap();
    std::fs::copy(
        server.ca_file().unwrap(),
        certs_d.join(&host).join("ca.crt"),
    )
    .unwrap();
    let via_certs_d = client(
        &server,
        ClientOptions {
            extra_ca_file: None,
            certs_dirs: vec![certs_d],
            credential: Some(Credential::Basic {
                username: "bob".into(),
                password: "b0b-pw".into(),
            }),
            ..options(&server)
        },
    );
    via_certs_d.ping().unwrap();
}

#[test]
fn credential_helper_on_path() {
    let Some(server) = RegistryServer::https_basic("credential_helper_on_path", "carol", "c-pw")
    else {
        return;
    };
    let host = server.host();
    let bin = server.scratch().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = server.scratch().join("helper-calls");
    let script = bin.join("docker-credential-strata-test");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread server\necho \"$server\" >> {calls}\n\
             if [ \"$server\" = \"{host}\" ]; then\n\
               printf '{{\"ServerURL\":\"%s\",\"Username\":\"carol\",\"Secret\":\"c-pw\"}}' \"$server\"\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cfg = docker_config(
        &server.scratch().join("docker"),
        &format!(r#"{{"credHelpers": {{"{host}": "strata-test"}}}}"#),
    );
    let path =
        std::env::join_paths([bin.as_path(), Path::new("/usr/bin"), Path::new("/bin")]).unwrap();
    let c = client(
        &server,
        ClientOptions {
            docker_config_dir: Some(cfg),
            helper_path: Some(path),
            ..options(&server)
        },
    );
    let p = c.push_blob_bytes(REPO, b"helper").unwrap();
    assert_eq!(c.blob_exists(REPO, &p.digest).unwrap(), Some(6));
    let called = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        called,
        format!("{host}\n"),
        "asked once, with the host on stdin"
    );
}

#[test]
fn bearer_token_flow_with_the_harness_token_service() {
    let Some(server) = RegistryServer::token(
        "bearer_token_flow_with_the_harness_token_service",
        TokenPolicy::default(),
    ) else {
        return;
    };
    let tokens = server.token_service().unwrap();
    let host = server.host();
    let cfg = docker_config(
        &server.scratch().join("docker"),
        &format!(
            r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
            b64("alice:wonderland")
        ),
    );
    let c = client(
        &server,
        ClientOptions {
            docker_config_dir: Some(cfg),
            ..options(&server)
        },
    );
    c.ping().unwrap();
    let bytes = push_step_image(&c, REPO, 4);
    c.put_manifest(REPO, "k", media_types::OCI_MANIFEST, &bytes)
        .unwrap();
    let m = c.get_manifest(REPO, "k", &[]).unwrap();
    assert_eq!(m.bytes, bytes);
    for _ in 0..3 {
        c.blob_exists(REPO, &Digest::of(b"nothing")).unwrap();
    }
    let requests = tokens.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.user.as_deref() == Some("alice") && !r.refused),
        "{requests:?}"
    );
    let scopes: Vec<&str> = requests
        .iter()
        .flat_map(|r| r.scopes.iter().map(String::as_str))
        .collect();
    assert!(
        scopes.contains(&"repository:strata/cache:pull,push"),
        "{scopes:?}"
    );
    assert!(
        scopes.contains(&"repository:strata/cache:pull"),
        "{scopes:?}"
    );
    // One token per scope (ping's scopeless one, pull, push), reused for every later request.
    assert_eq!(tokens.issued(), 3, "{requests:?}");

    // Anonymous users may pull (the policy grants it) but not push.
    let anon = client(&server, options(&server));
    let mut out = Vec::new();
    let layer = ImageManifest::from_bytes(&bytes).unwrap().layers[0]
        .digest
        .clone();
    anon.pull_blob(
        REPO,
        &Digest::parse(&layer).unwrap(),
        &mut out,
        &Transfer::none(),
    )
    .unwrap();
    let e = anon.push_blob_bytes(REPO, b"anonymous").unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("insufficient_scope"), "{e}");

    // A wrong password is refused by the token service.
    let wrong = client(
        &server,
        ClientOptions {
            credential: Some(Credential::Basic {
                username: "alice".into(),
                password: "nope".into(),
            }),
            ..options(&server)
        },
    );
    let e = wrong.blob_exists(REPO, &Digest::of(b"x")).unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("refused user `alice`"), "{e}");
}

#[test]
fn bearer_token_refused_by_the_registry_is_renewed_once() {
    let Some(server) = RegistryServer::token(
        "bearer_token_refused_by_the_registry_is_renewed_once",
        TokenPolicy::default(),
    ) else {
        return;
    };
    let tokens = server.token_service().unwrap();
    let c = client(
        &server,
        ClientOptions {
            credential: Some(Credential::Basic {
                username: "alice".into(),
                password: "wonderland".into(),
            }),
            ..options(&server)
        },
    );
    let p = c.push_blob_bytes(REPO, b"renew").unwrap();
    let before = tokens.issued();
    // The cached pull token is good; poison the next one and force a new scope to get it.
    tokens.poison_next(1);
    assert_eq!(c.blob_exists("strata/other", &p.digest).unwrap(), None);
    assert_eq!(
        tokens.issued(),
        before + 2,
        "the refused token was replaced once"
    );
    // Poisoning every token: the second refusal is final, typed, and names the reason.
    tokens.poison_next(10);
    let e = c.blob_exists("strata/third", &p.digest).unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("invalid_token"), "{e}");
}

#[test]
fn identity_token_is_exchanged_with_an_oauth2_post() {
    let policy = TokenPolicy {
        refresh_tokens: vec![("rt-1".to_string(), "alice".to_string())],
        anonymous_pull: false,
        ..TokenPolicy::default()
    };
    let Some(server) =
        RegistryServer::token("identity_token_is_exchanged_with_an_oauth2_post", policy)
    else {
        return;
    };
    let host = server.host();
    let cfg = docker_config(
        &server.scratch().join("docker"),
        &format!(r#"{{"auths": {{"{host}": {{"identitytoken": "rt-1"}}}}}}"#),
    );
    let c = client(
        &server,
        ClientOptions {
            docker_config_dir: Some(cfg),
            ..options(&server)
        },
    );
    let p = c.push_blob_bytes(REPO, b"oauth").unwrap();
    assert_eq!(c.blob_exists(REPO, &p.digest).unwrap(), Some(5));
    let requests = server.token_service().unwrap().requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.refresh && r.user.as_deref() == Some("alice")),
        "{requests:?}"
    );
}

#[test]
fn stopped_registry_is_unreachable_then_restarts_with_its_data() {
    let Some(mut server) =
        RegistryServer::http("stopped_registry_is_unreachable_then_restarts_with_its_data")
    else {
        return;
    };
    let c = client(&server, options(&server));
    let p = c.push_blob_bytes(REPO, b"persisted").unwrap();
    server.stop();
    let e = c.ping().unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
    let e = c.blob_exists(REPO, &p.digest).unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
    assert!(e.is_transient());
    let e = c
        .pull_blob(REPO, &p.digest, &mut Vec::new(), &Transfer::none())
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
    server.start_again();
    c.ping().unwrap();
    assert_eq!(c.blob_exists(REPO, &p.digest).unwrap(), Some(9));
}

#[test]
fn retries_ride_out_a_registry_restart() {
    let Some(mut server) = RegistryServer::http("retries_ride_out_a_registry_restart") else {
        return;
    };
    let c = Arc::new(client(
        &server,
        ClientOptions {
            retries: 8,
            retry_delay: Duration::from_millis(200),
            ..options(&server)
        },
    ));
    let p = c.push_blob_bytes(REPO, b"survives").unwrap();
    server.stop();
    let waiting = {
        let c = c.clone();
        let digest = p.digest.clone();
        std::thread::spawn(move || c.blob_exists(REPO, &digest))
    };
    // The registry comes back (started from this thread, which outlives it) while the
    // request above is between retries.
    std::thread::sleep(Duration::from_millis(300));
    server.start_again();
    assert_eq!(waiting.join().unwrap().unwrap(), Some(8));
}

#[test]
fn stalled_registry_times_out_instead_of_hanging() {
    let Some(server) = RegistryServer::http("stalled_registry_times_out_instead_of_hanging") else {
        return;
    };
    let c = client(
        &server,
        ClientOptions {
            read_timeout: Duration::from_secs(1),
            retries: 0,
            ..options(&server)
        },
    );
    c.ping().unwrap();
    server.pause();
    let e = c.ping().unwrap_err();
    server.resume();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("in time"), "{e}");
    c.ping().unwrap();
}

#[test]
fn cancelled_pull_and_push_stop_and_leave_nothing() {
    let Some(server) = RegistryServer::http("cancelled_pull_and_push_stop_and_leave_nothing")
    else {
        return;
    };
    let c = client(&server, options(&server));
    let data = noise(8 << 20, 5);
    let digest = c.push_blob_bytes(REPO, &data).unwrap().digest;

    let moved = AtomicU64::new(0);
    let progress = |n: u64| {
        moved.fetch_add(n, Ordering::SeqCst);
    };
    let cancelled = || moved.load(Ordering::SeqCst) >= 1 << 20;
    let t = Transfer {
        progress: &progress,
        cancelled: &cancelled,
    };
    let dir = server.scratch().join("cancel");
    std::fs::create_dir_all(&dir).unwrap();
    let e = c
        .pull_blob_to_file(REPO, &digest, &dir.join("blob"), &t)
        .unwrap_err();
    assert!(matches!(e, RegistryError::Cancelled { .. }), "{e}");
    assert!(
        moved.load(Ordering::SeqCst) < data.len() as u64,
        "stopped before the end"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no file, no temp file"
    );

    // A push cancelled part way leaves no blob behind.
    let src = dir.join("big");
    let other = noise(8 << 20, 6);
    std::fs::write(&src, &other).unwrap();
    moved.store(0, Ordering::SeqCst);
    let e = c.push_blob_file(REPO, &src, None, &t).unwrap_err();
    assert!(matches!(e, RegistryError::Cancelled { .. }), "{e}");
    assert_eq!(c.blob_exists(REPO, &Digest::of(&other)).unwrap(), None);
}
