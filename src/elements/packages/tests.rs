//! Unit tests for package-installs: every key, every precedence rule, on real files.

use super::*;
use std::fs;

/// A temp folder of elements. `add` writes `<root>/<dir>/<element>/<file>`.
struct Tree {
    root: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        Tree {
            root: tempfile::tempdir().unwrap(),
        }
    }
    fn add(&self, dir: &str, element: &str, file: &str, text: &str) -> PathBuf {
        let d = self.root.path().join(dir).join(element);
        fs::create_dir_all(&d).unwrap();
        let p = d.join(file);
        fs::write(&p, text).unwrap();
        p
    }
    fn yaml(&self, element: &str, text: &str) -> PathBuf {
        self.add("p1", element, "package-installs.yaml", text)
    }
    fn search(&self) -> Vec<PathBuf> {
        vec![self.root.path().join("p1"), self.root.path().join("p2")]
    }
    fn squash(&self, elements: &[&str], env: &[(&str, &str)], arch: &str) -> PackageInstalls {
        self.try_squash(elements, env, arch).unwrap()
    }
    fn try_squash(
        &self,
        elements: &[&str],
        env: &[(&str, &str)],
        arch: &str,
    ) -> Result<PackageInstalls, PackageError> {
        let elements: Vec<String> = elements.iter().map(|s| s.to_string()).collect();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        squash(&elements, &self.search(), &env, arch)
    }
}

fn names(list: &[(String, String)]) -> Vec<&str> {
    list.iter().map(|(p, _)| p.as_str()).collect()
}

fn install<'a>(p: &'a PackageInstalls, phase: &str) -> Vec<&'a str> {
    p.phases.get(phase).map_or(vec![], |l| names(&l.install))
}

fn uninstall<'a>(p: &'a PackageInstalls, phase: &str) -> Vec<&'a str> {
    p.phases.get(phase).map_or(vec![], |l| names(&l.uninstall))
}

#[test]
fn null_and_empty_values_mean_defaults_and_file_order_is_kept() {
    let t = Tree::new();
    t.yaml("e", "zeta:\nalpha: {}\nmid: ''\nlast: []\n");
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["zeta", "alpha", "mid", "last"]);
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
    assert_eq!(p.phases["install.d"].install[0].1, "e");
}

#[test]
fn phase_key_and_validation() {
    let t = Tree::new();
    t.yaml(
        "e",
        "a:\n  phase: pre-install.d\nb:\n  phase: post-install.d\nc:\n  phase: install.d\n",
    );
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "pre-install.d"), ["a"]);
    assert_eq!(install(&p, "post-install.d"), ["b"]);
    assert_eq!(install(&p, "install.d"), ["c"]);

    let f = t.yaml("bad", "x:\n  phase: finalise.d\n");
    let e = t
        .try_squash(&["bad"], &[], "amd64")
        .unwrap_err()
        .to_string();
    assert!(e.contains(&f.display().to_string()), "{e}");
    assert!(e.contains("package 'x'"), "{e}");
    assert!(e.contains("finalise.d"), "{e}");
}

#[test]
fn uninstall_key_presence_counts() {
    let t = Tree::new();
    t.yaml(
        "e",
        "a:\n  uninstall: true\nb:\n  uninstall: false\nc:\n  uninstall:\n",
    );
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(uninstall(&p, "install.d"), ["a", "b", "c"]);
    assert_eq!(install(&p, "install.d"), Vec::<&str>::new());
}

#[test]
fn build_only_goes_on_both_lists() {
    let t = Tree::new();
    t.yaml("e", "gcc:\n  build-only: True\n");
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["gcc"]);
    assert_eq!(uninstall(&p, "install.d"), ["gcc"]);
}

#[test]
fn install_then_build_only_is_a_second_plain_install() {
    // P already installed and not uninstalled: build-only is appended to install only.
    let t = Tree::new();
    t.yaml("a", "gcc:\n");
    t.yaml("b", "gcc:\n  build-only: true\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["gcc", "gcc"]);
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
    assert_eq!(p.phases["install.d"].install[1].1, "b");
}

#[test]
fn build_only_then_install_drops_the_uninstall() {
    let t = Tree::new();
    t.yaml("a", "gcc:\n  build-only: true\n");
    t.yaml("b", "gcc:\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["gcc", "gcc"]);
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
}

#[test]
fn install_then_uninstall_is_ignored() {
    let t = Tree::new();
    t.yaml("a", "curl:\n");
    t.yaml("b", "curl:\n  uninstall: true\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["curl"]);
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
}

#[test]
fn uninstall_then_install_removes_from_uninstall() {
    let t = Tree::new();
    t.yaml("a", "curl:\n  uninstall: true\n");
    t.yaml("b", "curl:\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["curl"]);
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
}

#[test]
fn build_only_then_build_only_keeps_both_on_both() {
    // After the first build-only, P is on the uninstall list, so the second is not ignored.
    let t = Tree::new();
    t.yaml("a", "make:\n  build-only: true\n");
    t.yaml("b", "make:\n  build-only: true\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["make", "make"]);
    assert_eq!(uninstall(&p, "install.d"), ["make", "make"]);
}

#[test]
fn filtered_install_still_cancels_an_uninstall() {
    let t = Tree::new();
    t.yaml("a", "curl:\n  uninstall: true\n");
    t.yaml("b", "curl:\n  arch: ppc64le\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), Vec::<&str>::new());
    assert_eq!(uninstall(&p, "install.d"), Vec::<&str>::new());
    // The phase exists although nothing was added (dib's defaultdict does the same).
    assert!(p.phases.contains_key("install.d"));
}

#[test]
fn interaction_is_per_phase() {
    let t = Tree::new();
    t.yaml("a", "curl:\n  uninstall: true\n");
    t.yaml("b", "curl:\n  phase: pre-install.d\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    assert_eq!(uninstall(&p, "install.d"), ["curl"]);
    assert_eq!(install(&p, "pre-install.d"), ["curl"]);
}

#[test]
fn arch_and_not_arch_with_spaces() {
    let t = Tree::new();
    t.yaml(
        "e",
        "only-ppc:\n  arch: ppc64, ppc64le\n\
         only-x86:\n  arch: amd64,x86_64\n\
         not-ppc:\n  not-arch: ppc64, ppc64le\n\
         not-x86:\n  not-arch: ' amd64 '\n",
    );
    let p = t.squash(&["e"], &[], "ppc64le");
    assert_eq!(install(&p, "install.d"), ["only-ppc", "not-x86"]);
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["only-x86", "not-ppc"]);
}

#[test]
fn arch_and_not_arch_together_is_an_error() {
    let t = Tree::new();
    let f = t.yaml("e", "x:\n  arch: amd64\n  not-arch: arm64\n");
    let e = t.try_squash(&["e"], &[], "amd64").unwrap_err().to_string();
    assert!(e.contains("both arch and not-arch"), "{e}");
    assert!(e.contains("package 'x'"), "{e}");
    assert!(e.contains(&f.display().to_string()), "{e}");
}

#[test]
fn arch_filter_without_arch_is_an_error() {
    let t = Tree::new();
    t.yaml("e", "x:\n  arch: amd64\n");
    let e = t.try_squash(&["e"], &[], "").unwrap_err().to_string();
    assert!(e.contains("ARCH"), "{e}");
    // Without arch filters ARCH is not needed.
    t.yaml("f", "y:\n");
    assert_eq!(install(&t.squash(&["f"], &[], ""), "install.d"), ["y"]);
}

#[test]
fn when_equal_and_not_equal() {
    let t = Tree::new();
    t.yaml(
        "e",
        "a:\n  when: FLAG=1\nb:\n  when: FLAG != 1\nc:\n  when: FLAG = 0\nd:\n  when: FLAG!=0\n",
    );
    let p = t.squash(&["e"], &[("FLAG", "1")], "amd64");
    assert_eq!(install(&p, "install.d"), ["a", "d"]);
    let p = t.squash(&["e"], &[("FLAG", "0")], "amd64");
    assert_eq!(install(&p, "install.d"), ["b", "c"]);
}

#[test]
fn when_list_is_and_and_values_keep_inner_spaces() {
    let t = Tree::new();
    t.yaml(
        "e",
        "k:\n  when:\n    - DIB_RELEASE != xenial\n    - KERNEL = linux image\n",
    );
    let env = [("DIB_RELEASE", "noble"), ("KERNEL", "linux image")];
    assert_eq!(
        install(&t.squash(&["e"], &env, "amd64"), "install.d"),
        ["k"]
    );
    let env = [("DIB_RELEASE", "xenial"), ("KERNEL", "linux image")];
    assert!(install(&t.squash(&["e"], &env, "amd64"), "install.d").is_empty());
    let env = [("DIB_RELEASE", "noble"), ("KERNEL", "linux")];
    assert!(install(&t.squash(&["e"], &env, "amd64"), "install.d").is_empty());
}

#[test]
fn when_unset_variable_is_an_error_even_after_a_false_statement() {
    let t = Tree::new();
    let f = t.yaml("e", "k:\n  when: [FLAG=1, MISSING=2]\n");
    let e = t.try_squash(&["e"], &[("FLAG", "0")], "amd64").unwrap_err();
    assert!(matches!(&e, PackageError::WhenUnset { var, .. } if var == "MISSING"));
    let e = e.to_string();
    assert!(e.contains("MISSING") && e.contains("package 'k'"), "{e}");
    assert!(e.contains(&f.display().to_string()), "{e}");
}

#[test]
fn when_is_not_evaluated_for_filtered_entries() {
    // dib's order: installtype, arch, then when; a filtered entry never looks at its variables.
    let t = Tree::new();
    t.yaml("e", "k:\n  arch: s390x\n  when: MISSING=1\n");
    let p = t.squash(&["e"], &[], "amd64");
    assert!(install(&p, "install.d").is_empty());
}

#[test]
fn malformed_when_is_an_error() {
    let t = Tree::new();
    for bad in ["'FLAG'", "'=1'", "' FLAG=1'", "'FLAG<1'", "{a: b}"] {
        t.yaml("e", &format!("k:\n  when: {bad}\n"));
        let e = t
            .try_squash(&["e"], &[("FLAG", "1")], "amd64")
            .expect_err(bad)
            .to_string();
        assert!(e.contains("malformed when"), "{bad}: {e}");
    }
    // "FLAG == 1" is "FLAG" "=" "= 1" for dib's regex: well formed, and false here.
    t.yaml("e", "k:\n  when: FLAG == 1\n");
    assert!(install(&t.squash(&["e"], &[("FLAG", "1")], "amd64"), "install.d").is_empty());
    assert_eq!(
        install(&t.squash(&["e"], &[("FLAG", "= 1")], "amd64"), "install.d"),
        ["k"]
    );
}

#[test]
fn parse_when_follows_dibs_regex() {
    assert_eq!(parse_when("A=b"), Some(("A", true, "b")));
    assert_eq!(parse_when("A_1 != b c "), Some(("A_1", false, "b c ")));
    assert_eq!(parse_when("A="), Some(("A", true, "")));
    assert_eq!(parse_when("A=x\ny"), Some(("A", true, "x")));
    assert_eq!(parse_when("A!x"), None);
    assert_eq!(parse_when(""), None);
}

#[test]
fn installtype_uses_the_element_variable_then_the_default() {
    let t = Tree::new();
    t.yaml(
        "my-elem",
        "src:\n  installtype: source\npkg:\n  installtype: package\nall:\n",
    );
    let p = t.squash(&["my-elem"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["src", "all"]);
    let p = t.squash(
        &["my-elem"],
        &[("DIB_DEFAULT_INSTALLTYPE", "package")],
        "amd64",
    );
    assert_eq!(install(&p, "install.d"), ["pkg", "all"]);
    let env = [
        ("DIB_DEFAULT_INSTALLTYPE", "package"),
        ("DIB_INSTALLTYPE_my_elem", "source"),
    ];
    let p = t.squash(&["my-elem"], &env, "amd64");
    assert_eq!(install(&p, "install.d"), ["src", "all"]);
    // The variable uses `_` for `-`; the dashed spelling is not consulted.
    let p = t.squash(
        &["my-elem"],
        &[("DIB_INSTALLTYPE_my-elem", "package")],
        "amd64",
    );
    assert_eq!(install(&p, "install.d"), ["src", "all"]);
}

#[test]
fn dib_python_version_compares_as_a_string() {
    let t = Tree::new();
    t.yaml(
        "e",
        "py2:\n  dib_python_version: 2\npy3:\n  dib_python_version: '3'\nany:\n  dib_python_version: ''\n",
    );
    let p = t.squash(&["e"], &[("DIB_PYTHON_VERSION", "3")], "amd64");
    assert_eq!(install(&p, "install.d"), ["py3", "any"]);
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["any"]);
}

#[test]
fn list_of_mappings_is_evaluated_item_by_item() {
    let t = Tree::new();
    t.yaml(
        "e",
        "linux-image-generic:\n\
         \x20 - not-arch: arm64\n\
         \x20   when: KERNEL = linux-image-generic\n\
         \x20 - arch: arm64\n\
         \x20   when:\n\
         \x20     - DIB_RELEASE != xenial\n\
         \x20     - KERNEL = linux-image-generic\n\
         linux-generic-hwe-16.04:\n\
         \x20 arch: arm64\n\
         \x20 when:\n\
         \x20   - DIB_RELEASE = xenial\n\
         \x20   - KERNEL = linux-image-generic\n\
         both:\n\
         \x20 - {}\n\
         \x20 - phase: pre-install.d\n",
    );
    let env = |rel: &'static str| [("KERNEL", "linux-image-generic"), ("DIB_RELEASE", rel)];
    let p = t.squash(&["e"], &env("focal"), "x86_64");
    assert_eq!(install(&p, "install.d"), ["linux-image-generic", "both"]);
    assert_eq!(install(&p, "pre-install.d"), ["both"]);
    let p = t.squash(&["e"], &env("xenial"), "arm64");
    assert_eq!(
        install(&p, "install.d"),
        ["linux-generic-hwe-16.04", "both"]
    );
    let p = t.squash(&["e"], &env("focal"), "arm64");
    assert_eq!(install(&p, "install.d"), ["linux-image-generic", "both"]);
}

#[test]
fn json_is_read_before_yaml_and_both_count() {
    let t = Tree::new();
    t.add(
        "p1",
        "e",
        "package-installs.json",
        r#"{"curl": {"uninstall": true}, "j": null}"#,
    );
    t.add("p1", "e", "package-installs.yaml", "curl:\ny:\n");
    let p = t.squash(&["e"], &[], "amd64");
    // json first: curl is uninstalled, then yaml's plain install cancels that.
    assert_eq!(install(&p, "install.d"), ["j", "curl", "y"]);
    assert!(uninstall(&p, "install.d").is_empty());

    // The other way round shows the order: yaml's uninstall comes after json's install.
    let t = Tree::new();
    t.add("p1", "e", "package-installs.json", r#"{"curl": null}"#);
    t.add(
        "p1",
        "e",
        "package-installs.yaml",
        "curl:\n  uninstall: true\n",
    );
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["curl"]);
    assert!(uninstall(&p, "install.d").is_empty());
}

#[test]
fn json_file_may_hold_yaml() {
    let t = Tree::new();
    t.add(
        "p1",
        "e",
        "package-installs.json",
        "curl:\n  phase: pre-install.d\n",
    );
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "pre-install.d"), ["curl"]);
}

#[test]
fn overridden_element_is_merged_from_every_path_dir() {
    let t = Tree::new();
    t.add("p1", "e", "package-installs.yaml", "pkgA:\n");
    t.add("p2", "e", "package-installs.yaml", "pkgB:\n");
    t.add("p2", "only2", "package-installs.yaml", "pkgC:\n");
    let p = t.squash(&["e", "only2", "absent"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["pkgA", "pkgB", "pkgC"]);
}

#[test]
fn elements_are_processed_in_the_order_given() {
    let t = Tree::new();
    t.yaml("a", "curl:\n");
    t.yaml("b", "curl:\n  uninstall: true\n");
    let p = t.squash(&["b", "a"], &[], "amd64");
    assert!(uninstall(&p, "install.d").is_empty());
    assert_eq!(install(&p, "install.d"), ["curl"]);
    assert_eq!(p.phases["install.d"].install[0].1, "a");
}

#[test]
fn duplicate_keys_keep_the_last_value_at_the_first_position() {
    let t = Tree::new();
    t.add(
        "p1",
        "e",
        "package-installs.json",
        r#"{"a": {"phase": "pre-install.d"}, "b": null, "a": null}"#,
    );
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(install(&p, "install.d"), ["a", "b"]);
    assert!(!p.phases.contains_key("pre-install.d"));
}

#[test]
fn syntax_errors_name_file_and_line() {
    let t = Tree::new();
    let f = t.yaml("e", "a:\n  phase: install.d\n b: [\n");
    let e = t.try_squash(&["e"], &[], "amd64").unwrap_err().to_string();
    assert!(e.contains(&f.display().to_string()), "{e}");
    assert!(e.contains("line 3"), "{e}");
    assert!(!e.contains('\n'), "{e}");

    let t = Tree::new();
    let f = t.add(
        "p1",
        "e",
        "package-installs.json",
        "{\n\"a\": null,\n\"b\": [}\n",
    );
    let e = t.try_squash(&["e"], &[], "amd64").unwrap_err().to_string();
    assert!(e.contains(&f.display().to_string()), "{e}");
    assert!(e.contains("not valid JSON") && e.contains("line 3"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let t = Tree::new();
    for (doc, want) in [
        ("- a\n- b\n", "top level"),
        ("a: just-a-string\n", "package 'a'"),
        ("a: [~]\n", "each item"),
        ("a: {arch: [amd64]}\n", "arch must be"),
        ("a: {phase: 3}\n", "phase must be"),
        ("a: {dib_python_version: [3]}\n", "dib_python_version"),
        ("? [x]\n: y\n", "package names"),
    ] {
        t.yaml("e", doc);
        let e = t
            .try_squash(&["e"], &[], "amd64")
            .expect_err(doc)
            .to_string();
        assert!(e.contains(want), "{doc}: {e}");
    }
}

#[test]
fn empty_file_is_an_empty_list() {
    let t = Tree::new();
    t.yaml("e", "");
    t.add("p1", "e", "package-installs.json", "  \n");
    assert_eq!(t.squash(&["e"], &[], "amd64"), PackageInstalls::default());
}

#[test]
fn dib_json_format() {
    let t = Tree::new();
    t.yaml("e", "a:\nb:\n  build-only: true\n  phase: pre-install.d\n");
    let p = t.squash(&["e"], &[], "amd64");
    assert_eq!(
        p.to_dib_json(),
        serde_json::json!({
            "install.d": {"install": [["a", "e"]], "uninstall": []},
            "pre-install.d": {"install": [["b", "e"]], "uninstall": [["b", "e"]]},
        })
    );
}

#[test]
fn resolve_maps_through_each_elements_pkg_map() {
    let t = Tree::new();
    t.yaml("a", "gen:\nskipped:\nmulti:\n  build-only: true\nplain:\n");
    t.add(
        "p1",
        "a",
        "pkg-map",
        r#"{"default": {"gen": "generic"}, "family": {"debian": {"skipped": "", "multi": "x y"}},
            "distro": {"ubuntu": {"gen": "gen-ubuntu"}}}"#,
    );
    // b has no pkg-map: names pass through; duplicates after mapping are dropped.
    t.yaml("b", "x:\ngen:\n");
    let p = t.squash(&["a", "b"], &[], "amd64");
    let r = p.resolve(&t.search(), "ubuntu", "noble").unwrap();
    assert_eq!(
        r["install.d"].install,
        ["gen-ubuntu", "x", "y", "plain", "gen"]
    );
    assert_eq!(r["install.d"].uninstall, ["x", "y"]);
    let r = p.resolve(&t.search(), "fedora", "").unwrap();
    assert_eq!(
        r["install.d"].install,
        ["generic", "skipped", "multi", "plain", "x", "gen"]
    );
}

#[test]
fn resolve_reports_a_broken_pkg_map() {
    let t = Tree::new();
    t.yaml("a", "gen:\n");
    let f = t.add("p1", "a", "pkg-map", "{not json");
    let p = t.squash(&["a"], &[], "amd64");
    let e = p
        .resolve(&t.search(), "ubuntu", "")
        .unwrap_err()
        .to_string();
    assert!(e.contains(&f.display().to_string()), "{e}");
}
