//! `strata elements` on fixture trees: resolution order, defaults, overrides, hooks, errors;
//! and environment.d capture on a materialized fixture hook tree.

use crate::util::{fixture, lines, run, strata_with_fixture_elements};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use strata::elements::{deps, discover, env, hooks};

/// Runs `strata ARGS` expecting exit 2 and a single `error:` line containing `want`.
fn fails_with(args: &[&str], want: &str) -> String {
    let (stdout, stderr) = run(strata_with_fixture_elements().args(args), 2);
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    let stderr = stderr.trim_end();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(want), "want {want:?} in: {stderr}");
    stderr.to_string()
}

fn errors_dir() -> String {
    fixture("errors").display().to_string()
}

#[test]
fn elements_are_printed_deps_first_ties_by_name_with_base_added() {
    let (out, _) = run(strata_with_fixture_elements().args(["elements", "app"]), 0);
    assert_eq!(
        lines(&out),
        ["base", "core", "lib-a", "lib-z", "os-minimal", "app"]
    );
}

#[test]
fn dash_n_skips_base() {
    let (out, _) = run(
        strata_with_fixture_elements().args(["elements", "-n", "app"]),
        0,
    );
    assert_eq!(lines(&out), ["core", "lib-a", "lib-z", "os-minimal", "app"]);
}

#[test]
fn vm_without_a_block_device_gets_the_default_for_the_host_arch() {
    let (out, _) = run(
        strata_with_fixture_elements().args(["elements", "vm", "os-minimal"]),
        0,
    );
    let default = match strata::arch::host_arch().as_str() {
        "arm64" | "aarch64" => "block-device-efi",
        _ => "block-device-mbr",
    };
    assert_eq!(lines(&out), ["base", default, "os-minimal", "vm"]);
}

#[test]
fn vm_with_a_named_block_device_element_gets_no_default() {
    let (out, _) = run(
        strata_with_fixture_elements().args([
            "elements",
            "-n",
            "vm",
            "os-minimal",
            "block-device-efi",
        ]),
        0,
    );
    assert_eq!(lines(&out), ["block-device-efi", "os-minimal", "vm"]);
}

#[test]
fn provided_virtual_names_are_not_listed_and_their_provider_comes_first() {
    let (out, _) = run(
        strata_with_fixture_elements().args(["elements", "needs-virt", "virt-provider"]),
        0,
    );
    assert_eq!(
        lines(&out),
        ["base", "os-minimal", "virt-provider", "needs-virt"]
    );
}

#[test]
fn output_is_the_same_every_run() {
    let first = run(
        strata_with_fixture_elements().args(["elements", "--hooks", "app", "vm"]),
        0,
    )
    .0;
    for _ in 0..3 {
        assert_eq!(
            run(
                strata_with_fixture_elements().args(["elements", "--hooks", "app", "vm"]),
                0
            )
            .0,
            first
        );
    }
}

#[test]
fn dependency_cycles_terminate() {
    let (out, _) = run(
        strata_with_fixture_elements().args([
            "elements",
            "-n",
            "--element-path",
            &errors_dir(),
            "cycle-a",
        ]),
        0,
    );
    assert_eq!(lines(&out), ["os-minimal", "cycle-a", "cycle-b"]);
}

#[test]
fn unknown_requested_element_is_an_error_naming_the_search_path() {
    let err = fails_with(
        &["elements", "no-such-element"],
        "element 'no-such-element' not found (requested on the command line); searched: ",
    );
    assert!(
        err.contains(&fixture("builtin").display().to_string()),
        "{err}"
    );
}

#[test]
fn unknown_dependency_names_who_required_it() {
    fails_with(
        &[
            "elements",
            "--element-path",
            &errors_dir(),
            "wants-missing",
            "os-minimal",
        ],
        "element 'missing-thing' not found (required by 'wants-missing'); searched: ",
    );
    fails_with(
        &["elements", "needs-virt"],
        "element 'virt-thing' not found (required by 'needs-virt')",
    );
}

#[test]
fn two_providers_of_one_name_is_an_error() {
    fails_with(
        &[
            "elements",
            "--element-path",
            &errors_dir(),
            "provider-one",
            "provider-two",
            "os-minimal",
        ],
        "'dup-virtual' is provided by both 'provider-one' and 'provider-two'",
    );
}

#[test]
fn requesting_a_name_another_element_provides_is_an_error() {
    fails_with(
        &["elements", "needs-virt", "virt-provider", "virt-thing"],
        "element 'virt-thing' (requested on the command line) is also provided by 'virt-provider'",
    );
}

#[test]
fn no_operating_system_provider_is_an_error() {
    fails_with(
        &["elements", "-n", "core"],
        "no element provides 'operating-system' (resolved: core)",
    );
}

#[test]
fn a_search_path_entry_that_is_not_a_directory_is_an_error() {
    let missing = fixture("no-such-folder");
    fails_with(
        &[
            "elements",
            "--element-path",
            &missing.display().to_string(),
            "os-minimal",
        ],
        &format!(
            "element path entry '{}' is not a directory",
            missing.display()
        ),
    );
    let file = fixture("builtin/base/README.rst");
    let (_, stderr) = run(
        strata_with_fixture_elements()
            .env("ELEMENTS_PATH", &file)
            .args(["elements", "os-minimal"]),
        2,
    );
    assert!(
        stderr.contains(&format!("'{}' is not a directory", file.display())),
        "{stderr}"
    );
    let (_, stderr) = run(
        strata_with_fixture_elements()
            .env("STRATA_ELEMENTS_DIR", &missing)
            .args(["elements", "os-minimal"]),
        2,
    );
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}

#[test]
fn bad_element_files_are_one_line_errors() {
    let dir = fixture("errors");
    fails_with(
        &[
            "elements",
            "--element-path",
            &errors_dir(),
            "unreadable-deps",
            "os-minimal",
        ],
        &format!(
            "cannot read '{}'",
            dir.join("unreadable-deps/element-deps").display()
        ),
    );
    fails_with(
        &[
            "elements",
            "--element-path",
            &errors_dir(),
            "bad-deps-utf8",
            "os-minimal",
        ],
        &format!(
            "{} line 2: not UTF-8 text",
            dir.join("bad-deps-utf8/element-deps").display()
        ),
    );
    fails_with(
        &[
            "elements",
            "--element-path",
            &errors_dir(),
            "bad-deps-line",
            "os-minimal",
        ],
        "line 1: 'two names' is not an element name",
    );
}

#[test]
fn a_non_utf8_element_name_is_an_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join(OsStr::from_bytes(b"caf\xe9"))).unwrap();
    fails_with(
        &[
            "elements",
            "--element-path",
            &t.path().display().to_string(),
            "os-minimal",
        ],
        "has a name that is not UTF-8",
    );
}

#[test]
fn an_earlier_path_entry_overrides_a_later_one_and_says_so() {
    let over = fixture("override");
    let (out, stderr) = run(
        strata_with_fixture_elements().args([
            "elements",
            "--hooks",
            "-n",
            "--element-path",
            &over.display().to_string(),
            "os-minimal",
        ]),
        0,
    );
    // One summary line at info level; each override is named at debug level (-v).
    assert!(
        stderr.contains("1 elements earlier on the element search path override"),
        "{stderr}"
    );
    assert!(!stderr.contains("overrides"), "{stderr}");
    let (_, verbose) = run(
        strata_with_fixture_elements().args([
            "-v",
            "elements",
            "-n",
            "--element-path",
            &over.display().to_string(),
            "os-minimal",
        ]),
        0,
    );
    assert!(
        verbose.contains(&format!(
            "element 'os-minimal' at {} overrides {}",
            over.join("os-minimal").display(),
            fixture("builtin/os-minimal").display()
        )),
        "{verbose}"
    );
    assert!(out.contains("10-override-root"), "{out}");
    assert!(!out.contains("10-os-root"), "{out}");

    // --element-path is searched before ELEMENTS_PATH, which is searched before the built-in.
    let empty = tempfile::tempdir().unwrap();
    let (out, _) = run(
        strata_with_fixture_elements()
            .env("STRATA_ELEMENTS_DIR", empty.path())
            .env("ELEMENTS_PATH", fixture("builtin"))
            .args(["elements", "--json", "-n", "--element-path"])
            .arg(&over)
            .arg("os-minimal"),
        0,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["elements"][0]["path"].as_str().unwrap(),
        over.join("os-minimal").display().to_string()
    );
    let (out, _) = run(
        strata_with_fixture_elements()
            .env("ELEMENTS_PATH", &over)
            .args(["elements", "--json", "-n", "os-minimal"]),
        0,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["elements"][0]["path"].as_str().unwrap(),
        over.join("os-minimal").display().to_string()
    );
}

#[test]
fn hooks_are_listed_per_phase_in_dib_run_parts_order() {
    let (out, _) = run(
        strata_with_fixture_elements().args([
            "elements",
            "--hooks",
            "-n",
            "--element-path",
            &fixture("runorder").display().to_string(),
            "order",
            "os-minimal",
        ]),
        0,
    );
    let want = "\
order
os-minimal

root.d:
  10-os-root  os-minimal

install.d:
  00-a     order
  Zed      order
  foo      order
  9-z      order
  10-a     order
  10-b     order
  60-link  order
  100-x    order
";
    assert_eq!(out, want);
}

#[test]
fn the_same_hook_in_two_elements_is_an_error_naming_both() {
    let dir = fixture("errors");
    let err = fails_with(
        &[
            "elements",
            "--hooks",
            "--element-path",
            &errors_dir(),
            "dup-hook-a",
            "dup-hook-b",
            "os-minimal",
        ],
        "'install.d/50-dup' is in two elements: 'dup-hook-a' (",
    );
    assert!(
        err.contains(&format!(
            "and 'dup-hook-b' ({})",
            dir.join("dup-hook-b/install.d/50-dup").display()
        )),
        "{err}"
    );
}

#[test]
fn json_lists_elements_with_paths_and_hooks_by_phase_in_build_order() {
    let (out, _) = run(
        strata_with_fixture_elements().args(["elements", "--json", "--hooks", "app", "vm"]),
        0,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let elements = v["elements"].as_array().unwrap();
    assert_eq!(elements[0]["name"], "base");
    assert_eq!(
        elements[0]["path"].as_str().unwrap(),
        fixture("builtin/base").display().to_string()
    );
    let hooks = v["hooks"].as_object().unwrap();
    let mut phases: Vec<&str> = hooks.keys().map(String::as_str).collect();
    phases.sort();
    assert_eq!(
        phases,
        ["finalise.d", "install.d", "pre-install.d", "root.d"]
    );
    // Phases appear in build order in the text.
    let pos = |p: &str| out.find(&format!("\"{p}\"")).unwrap();
    assert!(pos("root.d") < pos("pre-install.d"));
    assert!(pos("pre-install.d") < pos("install.d"));
    assert!(pos("install.d") < pos("finalise.d"));
    let install: Vec<(String, String)> = hooks["install.d"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["element"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("00-base-hook", "base"),
        ("20-lib-a", "lib-a"),
        ("20-lib-z", "lib-z"),
        ("50-app", "app"),
    ];
    assert_eq!(install, want.map(|(a, b)| (a.to_string(), b.to_string())));
    // Without --hooks there is no "hooks" key.
    let (out, _) = run(
        strata_with_fixture_elements().args(["elements", "--json", "os-minimal"]),
        0,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("hooks").is_none());
    assert_eq!(v["elements"].as_array().unwrap().len(), 2);
}

/// Resolves `names` with the fixture folders as the search path and materializes the hook tree
/// into `dest`.
fn materialize(names: &[&str], dest: &Path) {
    let search = vec![fixture("envorder"), fixture("builtin")];
    let catalog = discover::scan(&search).unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let resolved = deps::resolve(
        &catalog,
        &deps::Request {
            names: &names,
            skip_base: false,
            arch: "amd64",
        },
    )
    .unwrap();
    hooks::HookTree::build(&resolved.elements)
        .unwrap()
        .materialize(dest)
        .unwrap();
}

fn path_env() -> BTreeMap<String, String> {
    BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())])
}

#[test]
fn environment_d_is_sourced_in_byte_order_of_the_merged_tree() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("hooks");
    materialize(&["env-order", "vm", "os-minimal"], &dest);
    let files = env::env_files(&dest.join("environment.d")).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "05.x.bash",
            "10-base",
            "10-one",
            "10-os.bash",
            "100-a",
            "15-block-device.bash",
            "20-b",
            "9-two"
        ]
    );
    let got = env::capture(&files, &path_env()).unwrap();
    assert_eq!(got["ORDER"], "05.x.bash 10-one 100-a 20-b 9-two");
    assert_eq!(got["DISTRO_NAME"], "fixture-os");
    assert_eq!(got["BASE_VAR"], "base");
    assert!(got.contains_key("DIB_BLOCK_DEVICE"));
}

#[test]
fn a_failing_environment_file_is_named_with_bashs_message() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("hooks");
    materialize(&["env-fail", "os-minimal"], &dest);
    let err = env::capture_dir(&dest.join("environment.d"), &path_env())
        .unwrap_err()
        .to_string();
    let file = dest.join("environment.d/10-bar");
    assert!(
        err.starts_with(&format!(
            "environment.d file {} failed (exit 1): ",
            file.display()
        )),
        "{err}"
    );
    assert!(err.ends_with("BAR: unbound variable"), "{err}");
}

#[test]
fn a_build_names_the_elements_own_environment_file_when_it_fails() {
    crate::require_root!();
    let f = crate::harness::BuildFixture::new();
    let file = f
        .elements()
        .join("fixture-app/environment.d/20-fixture-app.bash");
    let mut text = fs::read_to_string(&file).unwrap();
    text.push_str("if [ ; then\n");
    fs::write(&file, text).unwrap();
    let out = f.build(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    // Both strata's words and bash's name the element's file, never the build folder's copy.
    let shown = file.display().to_string();
    assert_eq!(
        errors[0].matches(shown.as_str()).count(),
        2,
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("syntax error"), "{}", errors[0]);
    assert!(!errors[0].contains("strata_build."), "{}", errors[0]);
}

/// Runs `tests/dib_compat.sh` (downloads diskimage-builder from PyPI; needs the network, pip,
/// python3). Run with `cargo test --test integration dib_compat -- --ignored`.
#[test]
#[ignore = "downloads diskimage-builder from PyPI"]
fn dib_compat_script_agrees_with_dib() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dib_compat.sh");
    let bin = assert_cmd::cargo::cargo_bin("strata");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("STRATA", &bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dib_compat.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn elements_takes_the_target_architecture_like_build() {
    let list = |extra: &[&str]| {
        let out = strata_with_fixture_elements()
            .args(["elements", "-n"])
            .args(extra)
            .args(["vm", "debian-minimal"])
            .env(
                "STRATA_ELEMENTS_DIR",
                crate::harness::repo().join("elements"),
            )
            .env_remove("ELEMENTS_PATH")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        list(&["-a", "arm64"])
            .lines()
            .any(|l| l == "block-device-efi")
    );
    assert!(
        list(&["-a", "amd64"])
            .lines()
            .any(|l| l == "block-device-mbr")
    );
}
