//! Dependency resolution: expands the requested element names through `element-deps` and
//! `element-provides` into the resolved element list, in a deterministic order.
//!
//! ```text
//! Request { names, skip_base, arch }
//!   └─ roots: names (+ `base` unless skip_base) (+ block-device-mbr/efi for `vm`, see below)
//!       └─ pass 1: tolerant walk over element-deps ──► every provided name P
//!       └─ pass 2: walk again, treating names in P as virtual (never expanded)
//!           └─ checks: unknown names, duplicate providers, requested-but-provided names,
//!              someone provides `operating-system`
//!               └─ stable topological order ──► Resolved
//! ```
//!
//! Rules (dib's `_expand_element_dependencies` and `_arg_defaults_hack`, with the differences):
//! - `element-deps` / `element-provides`: one name per line, surrounding whitespace stripped,
//!   blank lines and lines starting with `#` ignored (dib does not strip comments).
//! - The closure is transitive; cycles and self-dependencies terminate. Virtual names (provided
//!   by some resolved element) are removed from the result.
//! - dib walks breadth first and decides "is this name virtual?" at the moment it meets it, so a
//!   virtual name that is also a real element leaks that element's dependencies into the result
//!   when it is met before its provider (the order of the command line matters). strata walks
//!   twice: the first walk learns every provided name, the second treats those as virtual from
//!   the start, so the result does not depend on the order of the request.
//! - `base` is added unless `skip_base`. When `vm` is requested, no requested name matches
//!   `block-device-*` and no element reachable from the request provides `block-device`,
//!   `block-device-mbr` is added (`block-device-efi` when arch is arm64/aarch64). dib looks at
//!   the names only, so an element that provides `block-device` under another name made it fail.
//! - **Order**: dib's order is Python set order (random per run). strata's is a stable
//!   topological order: every element after the elements it depends on (a dependency on a
//!   virtual name counts as one on its provider), ties broken by name. A dependency cycle is
//!   broken by taking, among the remaining elements, the one with the fewest unmet dependencies
//!   (ties by name).

use super::discover::Catalog;
use super::{Element, ElementError, Requirer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use tracing::debug;

/// The virtual name every image needs one provider of.
pub const OPERATING_SYSTEM: &str = "operating-system";

/// What to resolve.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The names asked for, in order.
    pub names: &'a [String],
    /// Do not add `base` (dib's `-n`).
    pub skip_base: bool,
    /// Target architecture in dpkg naming (decides the `vm` block-device default).
    pub arch: &'a str,
}

/// The outcome of a resolution.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The resolved elements, dependencies before dependents, ties by name.
    pub elements: Vec<Element>,
    /// Each virtual name and the element that provides it.
    pub provided: BTreeMap<String, String>,
}

impl Resolved {
    /// The names of the resolved elements, in order.
    pub fn names(&self) -> Vec<&str> {
        self.elements.iter().map(|e| e.name.as_str()).collect()
    }
}

/// Reads an `element-deps` / `element-provides` style file: one name per line, whitespace
/// stripped, blank lines and `#` comments ignored. A missing file is an empty set.
pub fn read_name_list(path: &Path) -> Result<BTreeSet<String>, ElementError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(ElementError::io("read", path, e)),
    };
    let text = String::from_utf8(bytes).map_err(|e| ElementError::BadListFile {
        path: path.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not UTF-8 text".to_string(),
    })?;
    let mut names = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.contains(char::is_whitespace) || name.contains('/') {
            return Err(ElementError::BadListFile {
                path: path.to_path_buf(),
                line: i + 1,
                reason: format!("'{name}' is not an element name (one name per line)"),
            });
        }
        names.insert(name.to_string());
    }
    Ok(names)
}

/// An element's parsed `element-deps` and `element-provides`.
#[derive(Debug, Clone, Default)]
struct Info {
    deps: BTreeSet<String>,
    provides: BTreeSet<String>,
}

/// Reads each element's dependency files once, on first use (so a broken file only matters
/// when its element is part of the resolution).
struct InfoCache<'c> {
    catalog: &'c Catalog,
    infos: BTreeMap<String, Info>,
}

impl<'c> InfoCache<'c> {
    fn get(&mut self, name: &str) -> Result<Option<&Info>, ElementError> {
        let Some(element) = self.catalog.get(name) else {
            return Ok(None);
        };
        if !self.infos.contains_key(name) {
            let info = Info {
                deps: read_name_list(&element.path.join("element-deps"))?,
                provides: read_name_list(&element.path.join("element-provides"))?,
            };
            self.infos.insert(name.to_string(), info);
        }
        Ok(self.infos.get(name))
    }
}

/// One breadth-first walk of the dependency graph.
#[derive(Debug, Default)]
struct Walk {
    /// Real elements reached, in walk order.
    reached: Vec<String>,
    /// Who first asked for each name.
    requirer: BTreeMap<String, Requirer>,
    /// Names neither in the catalog nor skipped, in walk order.
    missing: Vec<String>,
    /// Names met but not expanded because they are virtual.
    skipped: BTreeSet<String>,
}

fn walk(
    cache: &mut InfoCache<'_>,
    roots: &[(String, Requirer)],
    virtual_names: &BTreeSet<String>,
) -> Result<Walk, ElementError> {
    let mut w = Walk::default();
    let mut queue: VecDeque<String> = VecDeque::new();
    for (name, req) in roots {
        w.requirer
            .entry(name.clone())
            .or_insert_with(|| req.clone());
        queue.push_back(name.clone());
    }
    let mut seen = BTreeSet::new();
    while let Some(name) = queue.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if virtual_names.contains(&name) {
            w.skipped.insert(name);
            continue;
        }
        let Some(info) = cache.get(&name)? else {
            w.missing.push(name);
            continue;
        };
        for dep in &info.deps {
            w.requirer
                .entry(dep.clone())
                .or_insert_with(|| Requirer::Element(name.clone()));
            queue.push_back(dep.clone());
        }
        w.reached.push(name);
    }
    Ok(w)
}

/// Resolves a request against a catalog. See the module docs for the rules.
pub fn resolve(catalog: &Catalog, request: &Request<'_>) -> Result<Resolved, ElementError> {
    let mut cache = InfoCache {
        catalog,
        infos: BTreeMap::new(),
    };

    let mut roots: Vec<(String, Requirer)> = Vec::new();
    let push_root = |roots: &mut Vec<(String, Requirer)>, name: &str, req: Requirer| {
        if !roots.iter().any(|(n, _)| n == name) {
            roots.push((name.to_string(), req));
        }
    };
    if !request.skip_base {
        push_root(
            &mut roots,
            "base",
            Requirer::Default("every image gets 'base' unless -n"),
        );
    }
    for name in request.names {
        push_root(&mut roots, name, Requirer::User);
    }

    // dib's _arg_defaults_hack: `vm` needs a block-device provider.
    let wants_vm = request.names.iter().any(|n| n == "vm");
    let names_block_device = request.names.iter().any(|n| n.starts_with("block-device-"));
    if wants_vm && !names_block_device {
        let first = walk(&mut cache, &roots, &BTreeSet::new())?;
        let mut has_provider = false;
        for name in &first.reached {
            if let Some(info) = cache.get(name)? {
                has_provider |= info.provides.contains("block-device");
            }
        }
        if !has_provider {
            let default = match request.arch {
                "arm64" | "aarch64" => "block-device-efi",
                _ => "block-device-mbr",
            };
            debug!(
                default,
                arch = request.arch,
                "vm without a block-device provider"
            );
            push_root(
                &mut roots,
                default,
                Requirer::Default("'vm' needs a block-device element"),
            );
        }
    }

    // Pass 1: learn every name some reachable element provides.
    let first = walk(&mut cache, &roots, &BTreeSet::new())?;
    let mut virtual_names = BTreeSet::new();
    for name in &first.reached {
        if let Some(info) = cache.get(name)? {
            virtual_names.extend(info.provides.iter().cloned());
        }
    }

    // Pass 2: the real walk, virtual names never expanded.
    let second = walk(&mut cache, &roots, &virtual_names)?;
    if let Some(name) = second.missing.first() {
        return Err(ElementError::NotFound {
            name: name.clone(),
            requirer: second.requirer.get(name).cloned().unwrap_or(Requirer::User),
            searched: catalog.searched(),
        });
    }

    // Who provides what, among the elements actually resolved.
    let mut provided: BTreeMap<String, String> = BTreeMap::new();
    let mut sorted_reached = second.reached.clone();
    sorted_reached.sort();
    for name in &sorted_reached {
        let Some(info) = cache.get(name)? else {
            continue;
        };
        for p in &info.provides {
            if let Some(other) = provided.get(p) {
                return Err(ElementError::DuplicateProvider {
                    name: p.clone(),
                    first: other.clone(),
                    second: name.clone(),
                });
            }
            provided.insert(p.clone(), name.clone());
        }
    }

    for (name, req) in &roots {
        if let Some(provider) = provided.get(name) {
            return Err(ElementError::ProvidedByOther {
                name: name.clone(),
                requirer: req.clone(),
                provider: provider.clone(),
            });
        }
    }

    for name in &second.skipped {
        if !provided.contains_key(name) {
            let provider = first
                .reached
                .iter()
                .find(|e| {
                    cache
                        .infos
                        .get(e.as_str())
                        .is_some_and(|i| i.provides.contains(name))
                })
                .cloned()
                .unwrap_or_default();
            return Err(ElementError::ProviderUnreachable {
                name: name.clone(),
                requirer: second.requirer.get(name).cloned().unwrap_or(Requirer::User),
                provider,
            });
        }
    }

    if !provided.contains_key(OPERATING_SYSTEM) {
        return Err(ElementError::NoOperatingSystem {
            resolved: sorted_reached.join(", "),
        });
    }

    let mut deps = BTreeMap::new();
    for name in &second.reached {
        if let Some(info) = cache.get(name)? {
            deps.insert(name.clone(), info.deps.clone());
        }
    }
    let order = topo_order(&deps, &provided);
    let elements = order
        .iter()
        .filter_map(|n| catalog.get(n).cloned())
        .collect();
    Ok(Resolved { elements, provided })
}

/// Dependencies before dependents, ties by name; cycles broken by fewest unmet dependencies.
fn topo_order(
    deps: &BTreeMap<String, BTreeSet<String>>,
    provided: &BTreeMap<String, String>,
) -> Vec<String> {
    // Edges point from an element to the real elements it needs.
    let mut needs: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, ds) in deps {
        let set = needs.entry(name.as_str()).or_default();
        for d in ds {
            let target = if deps.contains_key(d) {
                Some(d.as_str())
            } else {
                provided.get(d).map(String::as_str)
            };
            if let Some(t) = target.filter(|t| *t != name) {
                set.insert(t);
            }
        }
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(needs.len());
    while order.len() < needs.len() {
        let remaining = needs.iter().filter(|(n, _)| !done.contains(*n));
        let unmet = |ds: &BTreeSet<&str>| ds.iter().filter(|d| !done.contains(*d)).count();
        // BTreeMap iteration is by name, so min_by_key keeps the first (smallest) name on ties.
        let next = remaining
            .min_by_key(|(_, ds)| unmet(ds))
            .map(|(n, ds)| (*n, unmet(ds)));
        let Some((next, unmet_count)) = next else {
            break;
        };
        if unmet_count > 0 {
            debug!(element = next, "dependency cycle; breaking it here");
        }
        done.insert(next);
        order.push(next.to_string());
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    /// Builds a catalog from `(name, deps, provides)` specs in a temp dir.
    fn catalog(t: &Path, specs: &[(&str, &[&str], &[&str])]) -> Catalog {
        for (name, deps, provides) in specs {
            let dir = t.join(name);
            fs::create_dir_all(&dir).unwrap();
            if !deps.is_empty() {
                fs::write(dir.join("element-deps"), deps.join("\n") + "\n").unwrap();
            }
            if !provides.is_empty() {
                fs::write(dir.join("element-provides"), provides.join("\n")).unwrap();
            }
        }
        Catalog::scan(&[t.to_path_buf()]).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn req<'a>(names: &'a [String], skip_base: bool) -> Request<'a> {
        Request {
            names,
            skip_base,
            arch: "amd64",
        }
    }

    const OS: (&str, &[&str], &[&str]) = ("os", &[], &["operating-system"]);

    #[test]
    fn name_lists_strip_whitespace_blanks_and_comments() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("element-deps");
        fs::write(&f, "  foo  \n\n# a comment\n\tbar\n   # indented comment\n").unwrap();
        let got: Vec<_> = read_name_list(&f).unwrap().into_iter().collect();
        assert_eq!(got, ["bar", "foo"]);
        assert!(read_name_list(&t.path().join("absent")).unwrap().is_empty());
        fs::write(&f, "foo bar\n").unwrap();
        let err = read_name_list(&f).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("foo bar"), "{err}");
        fs::write(&f, b"ok\n\xff\n").unwrap();
        let err = read_name_list(&f).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn closure_is_transitive_and_ordered_deps_first_ties_by_name() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("app", &["zlib", "alib", "os"], &[]),
                ("zlib", &["core"], &[]),
                ("alib", &["core"], &[]),
                ("core", &[], &[]),
                ("unused", &[], &[]),
                OS,
            ],
        );
        let n = names(&["app"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["core", "alib", "os", "zlib", "app"]);
    }

    #[test]
    fn cycles_and_self_dependencies_terminate() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("a", &["b", "a"], &[]),
                ("b", &["c"], &[]),
                ("c", &["a", "os"], &[]),
                OS,
            ],
        );
        let n = names(&["a"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        let mut got = r.names();
        assert_eq!(
            got[0], "os",
            "the only element without unmet deps comes first"
        );
        got.sort();
        assert_eq!(got, ["a", "b", "c", "os"]);
        // Deterministic: the same answer every time.
        for _ in 0..5 {
            assert_eq!(resolve(&cat, &req(&n, true)).unwrap().names(), r.names());
        }
    }

    #[test]
    fn virtual_names_are_removed_and_order_follows_their_provider() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("app", &["virt"], &[]),
                ("zprovider", &["os"], &["virt"]),
                OS,
            ],
        );
        let n = names(&["app", "zprovider"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["os", "zprovider", "app"]);
        assert_eq!(r.provided["virt"], "zprovider");
    }

    #[test]
    fn a_virtual_name_that_is_also_an_element_does_not_leak_its_deps() {
        // dib: A deps `virt B`, B deps C, C provides virt, virt deps extra → includes `extra`
        // when `virt` is dequeued before C. strata never expands a provided name.
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("a", &["virt", "b"], &[]),
                ("b", &["c"], &[]),
                ("c", &["os"], &["virt"]),
                ("virt", &["extra"], &[]),
                ("extra", &[], &[]),
                OS,
            ],
        );
        let n = names(&["a"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["os", "c", "b", "a"]);
    }

    #[test]
    fn unknown_element_names_who_asked_for_it() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(t.path(), &[("bar", &["foo"], &[]), OS]);
        let n = names(&["bar", "os"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert!(
            err.starts_with("element 'foo' not found (required by 'bar'); searched: "),
            "{err}"
        );
        let n = names(&["nope", "os"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert!(
            err.contains("'nope' not found (requested on the command line)"),
            "{err}"
        );
        // base is added unless skip_base, and it is missing here.
        let n = names(&["os"]);
        let err = resolve(&cat, &req(&n, false)).unwrap_err().to_string();
        assert!(err.contains("'base' not found (added by default"), "{err}");
    }

    #[test]
    fn two_providers_of_one_name_is_an_error_naming_both() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("mbr", &[], &["block-device"]),
                ("gpt", &[], &["block-device"]),
                OS,
            ],
        );
        let n = names(&["os", "mbr", "gpt"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert_eq!(
            err,
            "'block-device' is provided by both 'gpt' and 'mbr'; use only one of them"
        );
    }

    #[test]
    fn requesting_a_provided_name_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("mbr", &[], &["block-device"]),
                ("block-device", &[], &[]),
                OS,
            ],
        );
        let n = names(&["os", "mbr", "block-device"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "element 'block-device' (requested on the command line) is also provided by 'mbr'"
            ),
            "{err}"
        );
    }

    #[test]
    fn no_operating_system_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(t.path(), &[("a", &[], &[])]);
        let n = names(&["a"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert!(
            err.starts_with("no element provides 'operating-system' (resolved: a)"),
            "{err}"
        );
    }

    #[test]
    fn base_is_added_unless_skipped() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(t.path(), &[("base", &[], &[]), OS]);
        let n = names(&["os"]);
        assert_eq!(
            resolve(&cat, &req(&n, false)).unwrap().names(),
            ["base", "os"]
        );
        assert_eq!(resolve(&cat, &req(&n, true)).unwrap().names(), ["os"]);
    }

    fn vm_catalog(t: &Path) -> Catalog {
        catalog(
            t,
            &[
                ("vm", &["block-device"], &[]),
                ("block-device-mbr", &[], &["block-device"]),
                ("block-device-efi", &[], &["block-device"]),
                ("block-device-gpt", &[], &["block-device"]),
                ("my-disk", &[], &["block-device"]),
                ("wants-disk", &["my-disk"], &[]),
                OS,
            ],
        )
    }

    #[test]
    fn vm_gets_block_device_mbr_or_efi_by_arch() {
        let t = tempfile::tempdir().unwrap();
        let cat = vm_catalog(t.path());
        let n = names(&["vm", "os"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["block-device-mbr", "os", "vm"]);
        for arch in ["arm64", "aarch64"] {
            let r = resolve(
                &cat,
                &Request {
                    names: &n,
                    skip_base: true,
                    arch,
                },
            )
            .unwrap();
            assert_eq!(r.names(), ["block-device-efi", "os", "vm"]);
        }
    }

    #[test]
    fn vm_default_is_not_added_when_a_block_device_is_named_or_provided() {
        let t = tempfile::tempdir().unwrap();
        let cat = vm_catalog(t.path());
        let n = names(&["vm", "os", "block-device-gpt"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["block-device-gpt", "os", "vm"]);
        // Provided by an element not named block-device-* reached through another one.
        let n = names(&["vm", "os", "wants-disk"]);
        let r = resolve(&cat, &req(&n, true)).unwrap();
        assert_eq!(r.names(), ["my-disk", "os", "vm", "wants-disk"]);
        // Without vm nothing is added, and the unprovided block-device is just unknown.
        let n = names(&["os"]);
        assert_eq!(resolve(&cat, &req(&n, true)).unwrap().names(), ["os"]);
    }

    #[test]
    fn a_provider_reachable_only_through_its_virtual_name_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(
            t.path(),
            &[
                ("a", &["virt", "os"], &[]),
                ("virt", &["c"], &[]),
                ("c", &[], &["virt"]),
                OS,
            ],
        );
        let n = names(&["a"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        assert!(
            err.contains("'virt' (required by 'a') is provided only by 'c'"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_deps_file_is_one_line_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let cat = catalog(t.path(), &[("a", &[], &[]), OS]);
        // A directory where the file should be: reading it fails for root too.
        fs::create_dir(t.path().join("a/element-deps")).unwrap();
        let n = names(&["a", "os"]);
        let err = resolve(&cat, &req(&n, true)).unwrap_err().to_string();
        let want: PathBuf = t.path().join("a/element-deps");
        assert!(
            err.starts_with(&format!("cannot read '{}'", want.display())),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
