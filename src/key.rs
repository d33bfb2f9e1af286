//! Keys: the explicit list of a step's inputs, their canonical encoding, and the ONE key
//! derivation strata uses for every kind of key (steps, the disk step, cached outputs, the
//! seeded identifiers of a reproducible disk image).
//!
//! ```text
//! KeyInputs / DiskKeyInputs / (output base key, type) / (seed, purpose, name)
//!     ──► Keyed::{Step, Disk, Output, ImageId}  (one enum: the variant tags the kind)
//!     ──► bincode 2 (standard config, serde)     canonical bytes
//!     ──► blake3 derive_key(KEY_CONTEXT)         the key: 64 hex digits
//! ```
//!
//! Canonical encoding: every field has a fixed order, maps are `BTreeMap`s, there are no floats,
//! and enum variants are encoded by index, so the same inputs give the same bytes on every
//! machine. bincode 2.0.1 is pinned (`=2.0.1`; 3.0 is an empty crate, and RUSTSEC-2025-0141
//! marks the project unmaintained, not unsound). It stays because its wire format is specified
//! (varint integers, length-prefixed strings and sequences, variant index then fields) and
//! [`tests::golden_keys_do_not_drift`] pins known keys: any change of the encoding, from an
//! upgrade or a replacement, fails that test before it can silently orphan every cache.
//!
//! The inputs are also kept as JSON in the index, so a miss can be explained by diffing them
//! with the nearest earlier step ([`diff_inputs`]). Content digests (a file, the element files)
//! are plain blake3 of the bytes, not keys.
//!
//! Bump [`CACHE_FORMAT_VERSION`] whenever the encoding, the list of inputs, or the meaning of a
//! key (or of the layers and outputs it names) changes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Version of the key recipe and of what a key refers to. 3: one derivation for every key,
/// disk-only variables out of the rootfs steps' environment, DIB_NO_TMPFS normalised.
pub const CACHE_FORMAT_VERSION: u32 = 3;

/// blake3 key-derivation context of every key strata derives.
const KEY_CONTEXT: &str = "strata 2026-12 key v3";

/// Everything strata derives a key from, one variant per kind of key.
#[derive(Debug, Serialize)]
pub enum Keyed<'a> {
    /// A rootfs step (one hook, one phase, or a core step).
    Step(&'a KeyInputs),
    /// The disk step (block-device.d to cleanup.d and the disk outputs).
    Disk(&'a DiskKeyInputs),
    /// One cached output of type `output` made from what `base` (a step key) names.
    Output { base: &'a str, output: &'a str },
    /// The seed of a reproducible disk's identifiers: from what names the image (its name,
    /// elements, arch, block-device config, disk options, SOURCE_DATE_EPOCH), not from the
    /// hooks, so an edited hook keeps the disk's ids and so its layout.
    DiskSeed { identity: &'a str },
    /// One identifier of a reproducible disk (a UUID, a disk id), from its seed.
    ImageId {
        seed: &'a [u8; 32],
        purpose: &'a str,
        name: &'a str,
    },
}

impl Keyed<'_> {
    /// The 32 bytes of the key.
    pub fn bytes(&self) -> [u8; 32] {
        let bytes = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .unwrap_or_else(|e| unreachable!("key inputs always encode: {e}"));
        let mut h = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        h.update(&bytes);
        *h.finalize().as_bytes()
    }

    /// The key as 64 hex digits.
    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.bytes()).to_hex().to_string()
    }
}

/// The inputs of the disk step: what it reads besides the rootfs (named by `parent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskKeyInputs {
    pub version: u32,
    /// The key chained over the disk phases' hooks and environment from the last rootfs step.
    pub parent: String,
    /// The output types, in the order asked for.
    pub types: Vec<String>,
    /// The disk options that change the outputs' bytes, by name (`--checksum` is not one).
    pub options: BTreeMap<String, String>,
    /// The block-device config text.
    pub block_device_config: String,
}

impl DiskKeyInputs {
    pub fn key(&self) -> String {
        Keyed::Disk(self).hex()
    }
}

/// The key of an output of type `output` made from what the step key `base` names.
pub fn output_key(base: &str, output: &str) -> String {
    Keyed::Output { base, output }.hex()
}

/// One hook a step runs, identified by content and mode (only executable files run, so the mode
/// matters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookInput {
    pub name: String,
    pub element: String,
    pub mode: u32,
    pub digest: String,
}

impl HookInput {
    /// Reads a hook file (following a symlink, as dib-run-parts does).
    pub fn read(name: &str, element: &str, path: &Path) -> io::Result<HookInput> {
        let meta = fs::metadata(path)?;
        let bytes = fs::read(path)?;
        Ok(HookInput {
            name: name.to_string(),
            element: element.to_string(),
            mode: meta.permissions().mode() & 0o7777,
            digest: blake3::hash(&bytes).to_hex().to_string(),
        })
    }
}

/// Everything that decides what a step produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub version: u32,
    /// Key of the step before (None for the first step).
    pub parent: Option<String>,
    /// Phase folder name (`install.d`) or `core` for strata's own steps.
    pub phase: String,
    /// Hook name, `*` for a whole phase, or the core step's name.
    pub step: String,
    /// The hooks this step runs, in run order.
    pub hooks: Vec<HookInput>,
    /// Digest of the resolved elements' files outside phase folders.
    pub element_files: String,
    /// The environment the hook receives, volatile values normalised.
    pub env: BTreeMap<String, String>,
    pub arch: String,
    /// Declared extra inputs: `cache-inputs` host files (path → digest), `-p` packages, ….
    pub extra: BTreeMap<String, String>,
}

impl KeyInputs {
    /// The step key, as 64 hex digits.
    pub fn key(&self) -> String {
        Keyed::Step(self).hex()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| unreachable!("KeyInputs is JSON: {e}"))
    }
}

/// One difference between two steps' inputs, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputChange {
    /// `parent`, `hook`, `element-files`, `env`, `arch`, `extra`, ….
    pub input: String,
    /// Variable, hook or path name, when there is one.
    pub name: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
}

fn change(
    input: &str,
    name: Option<&str>,
    before: Option<&str>,
    after: Option<&str>,
) -> InputChange {
    InputChange {
        input: input.into(),
        name: name.map(Into::into),
        before: before.map(Into::into),
        after: after.map(Into::into),
    }
}

fn diff_maps(
    input: &str,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
    out: &mut Vec<InputChange>,
) {
    for (k, va) in a {
        match b.get(k) {
            Some(vb) if vb == va => {}
            other => out.push(change(input, Some(k), Some(va), other.map(String::as_str))),
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            out.push(change(input, Some(k), None, Some(vb)));
        }
    }
}

/// What differs between an earlier step's inputs `a` and a new step's inputs `b`.
pub fn diff_inputs(a: &KeyInputs, b: &KeyInputs) -> Vec<InputChange> {
    let mut out = Vec::new();
    if a.version != b.version {
        let (va, vb) = (a.version.to_string(), b.version.to_string());
        out.push(change("version", None, Some(&va), Some(&vb)));
    }
    if a.parent != b.parent {
        out.push(change(
            "parent",
            None,
            a.parent.as_deref(),
            b.parent.as_deref(),
        ));
    }
    if a.phase != b.phase || a.step != b.step {
        let (sa, sb) = (
            format!("{}/{}", a.phase, a.step),
            format!("{}/{}", b.phase, b.step),
        );
        out.push(change("step", None, Some(&sa), Some(&sb)));
    }
    let hook_map = |k: &KeyInputs| -> BTreeMap<String, String> {
        k.hooks
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    format!(
                        "{} mode {:o} blake3 {}",
                        h.element,
                        h.mode,
                        &h.digest[..16.min(h.digest.len())]
                    ),
                )
            })
            .collect()
    };
    diff_maps("hook", &hook_map(a), &hook_map(b), &mut out);
    if a.element_files != b.element_files {
        out.push(change(
            "element-files",
            None,
            Some(&a.element_files),
            Some(&b.element_files),
        ));
    }
    diff_maps("env", &a.env, &b.env, &mut out);
    if a.arch != b.arch {
        out.push(change("arch", None, Some(&a.arch), Some(&b.arch)));
    }
    diff_maps("extra", &a.extra, &b.extra, &mut out);
    out
}

/// Digest of every file of the given elements outside phase folders (bin/, environment.d,
/// package-installs, pkg-map, element-deps, static files, …), in a fixed order: element name,
/// then relative path. README files and `tests`/`test-elements`/`__pycache__` folders are left
/// out: they do not change what a build does.
///
/// Hooks at the top of a phase folder are keyed by the steps that run them. Sub-folders of
/// phase folders (dib's `install.d/<name>-<type>-install/`, which extra-data.d links into the
/// phase) are keyed here: every entry by path, type and mode, so adding or removing a hook
/// there reruns the build from the start; non-executable files also by content (data a hook
/// reads). A linked hook's content is keyed by the step that runs it.
pub fn element_files_digest<'a>(
    elements: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> io::Result<String> {
    let mut sorted: Vec<_> = elements.into_iter().collect();
    sorted.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"strata element files v2\0");
    for (name, dir) in sorted {
        h.update(name.as_bytes());
        h.update(b"\0");
        hash_element(&mut h, dir, true)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Digest of every file of one element (names, types, modes, contents, link targets), hooks
/// included; README files and `tests`/`test-elements`/`__pycache__` folders left out. What the
/// manifest records per element.
pub fn element_digest(dir: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(b"strata element v1\0");
    hash_element(&mut h, dir, false)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Feeds one element folder into `h`, in name order: each entry's relative path, mode, type
/// and content (files) or target (symlinks). `skip_hooks`: the hooks at the top of phase
/// folders (keyed by the steps that run them) enter by path and mode only, and their
/// sub-folders' executable files by type only (see [`element_files_digest`]).
fn hash_element(h: &mut blake3::Hasher, dir: &Path, skip_hooks: bool) -> io::Result<()> {
    use crate::elements::hooks::SKIPPED_DIRS;
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| {
            let n = e.file_name().to_string_lossy();
            let is_dir = e.file_type().is_dir();
            match e.depth() {
                1 => !(n.starts_with("README") || is_dir && SKIPPED_DIRS.contains(&n.as_ref())),
                // In a phase folder: only its sub-folders (its own hooks are keyed per step).
                2 if skip_hooks => !in_phase_dir(e.path(), dir) || is_dir,
                _ => true,
            }
        });
    for entry in walker {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        let meta = entry.path().symlink_metadata()?;
        let mode = meta.permissions().mode() & 0o7777;
        h.update(&mode.to_le_bytes());
        let ft = meta.file_type();
        let keyed_by_step = skip_hooks && in_phase_dir(entry.path(), dir) && mode & 0o111 != 0;
        if ft.is_symlink() {
            h.update(b"l");
            h.update(fs::read_link(entry.path())?.as_os_str().as_encoded_bytes());
        } else if ft.is_file() && !keyed_by_step {
            h.update(b"f");
            let mut f = fs::File::open(entry.path())?;
            let n = io::copy(&mut f, h)?;
            h.update(&n.to_le_bytes());
        } else if ft.is_file() {
            h.update(b"x");
        } else if ft.is_dir() {
            h.update(b"d");
        }
        h.update(b"\0");
    }
    Ok(())
}

/// True for `path` inside (or being) a phase folder of the element at `dir`.
fn in_phase_dir(path: &Path, dir: &Path) -> bool {
    path.strip_prefix(dir)
        .ok()
        .and_then(|rel| rel.components().next())
        .is_some_and(|c| {
            crate::phase::Phase::from_dir_name(&c.as_os_str().to_string_lossy()).is_some()
        })
}

/// Digest of the host files an element declares in its `cache-inputs` file (one glob per line;
/// blank lines and `#` comments ignored). Returns path → blake3 (or `missing`).
pub fn cache_inputs(
    element: &str,
    dir: &Path,
) -> Result<BTreeMap<String, String>, crate::exit::Failure> {
    let file = dir.join("cache-inputs");
    let mut out = BTreeMap::new();
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(crate::exit::Failure::bad_input(format!(
                "element {element}: cannot read {}: {e}",
                file.display()
            )));
        }
    };
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let paths = glob::glob(line).map_err(|e| {
            crate::exit::Failure::bad_input(format!(
                "element {element}: {}: bad glob '{line}': {e}",
                file.display()
            ))
        })?;
        let mut any = false;
        for p in paths.flatten() {
            any = true;
            let digest = match fs::read(&p) {
                Ok(bytes) => blake3::hash(&bytes).to_hex().to_string(),
                Err(e) => format!("unreadable: {}", e.kind()),
            };
            out.insert(format!("{element}:{}", p.display()), digest);
        }
        if !any {
            out.insert(format!("{element}:{line}"), "missing".into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KeyInputs {
        KeyInputs {
            version: CACHE_FORMAT_VERSION,
            parent: Some("p".repeat(64)),
            phase: "install.d".into(),
            step: "50-foo".into(),
            hooks: vec![HookInput {
                name: "50-foo".into(),
                element: "foo".into(),
                mode: 0o755,
                digest: "d".repeat(64),
            }],
            element_files: "e".repeat(64),
            env: [
                ("ARCH".to_string(), "amd64".to_string()),
                ("DIB_RELEASE".into(), "bookworm".into()),
            ]
            .into_iter()
            .collect(),
            arch: "amd64".into(),
            extra: BTreeMap::new(),
        }
    }

    fn changed(f: impl FnOnce(&mut KeyInputs)) -> (String, String) {
        let a = base();
        let mut b = base();
        f(&mut b);
        (a.key(), b.key())
    }

    /// Pins the encoding: if this fails, keys changed (a bincode upgrade or replacement, a
    /// field added, …): bump CACHE_FORMAT_VERSION and update the values.
    #[test]
    fn golden_keys_do_not_drift() {
        let disk = DiskKeyInputs {
            version: CACHE_FORMAT_VERSION,
            parent: "p".repeat(64),
            types: vec!["qcow2".into()],
            options: [("root-label".to_string(), "x".to_string())]
                .into_iter()
                .collect(),
            block_device_config: "- local_loop: {}\n".into(),
        };
        let got = [
            base().key(),
            disk.key(),
            output_key(&"k".repeat(64), "tar"),
            Keyed::DiskSeed { identity: "d" }.hex(),
            Keyed::ImageId {
                seed: &[7; 32],
                purpose: "fs",
                name: "root",
            }
            .hex(),
        ];
        let want = [
            GOLDEN_STEP,
            GOLDEN_DISK,
            GOLDEN_OUTPUT,
            GOLDEN_SEED,
            GOLDEN_ID,
        ];
        assert_eq!(got, want, "keys drifted: {got:#?}");
        // Every kind of key differs from every other for the same text.
        assert_ne!(
            output_key("d", "x"),
            Keyed::DiskSeed { identity: "d" }.hex()
        );
    }

    const GOLDEN_STEP: &str = "71890986cae19141d49331b2b85d86511251978f27544d2b2f73e947b8b8d1b8";
    const GOLDEN_DISK: &str = "a7fe4f0b47462b1529b6398dc55ccfd8987970789f4caff0d79c49260cca7f97";
    const GOLDEN_OUTPUT: &str = "eb206f093ae82e107acf905ee1b0d9537dac35c24f59900ce8a340ef1327fe55";
    const GOLDEN_SEED: &str = "724f9ede6344eab886352ff6820823cd19582b3992cf48b065a24c4462501e01";
    const GOLDEN_ID: &str = "4ced90078b875399e7804432dabbef76d5ef7003ac456354af6ae37fd845ff54";

    #[test]
    fn key_is_stable_and_hex() {
        let k = base().key();
        assert_eq!(k, base().key());
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn each_input_changes_the_key() {
        type Edit = Box<dyn Fn(&mut KeyInputs)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("version", Box::new(|k| k.version += 1)),
            ("parent", Box::new(|k| k.parent = Some("q".repeat(64)))),
            ("no parent", Box::new(|k| k.parent = None)),
            ("phase", Box::new(|k| k.phase = "post-install.d".into())),
            ("step", Box::new(|k| k.step = "51-foo".into())),
            (
                "hook bytes",
                Box::new(|k| k.hooks[0].digest = "c".repeat(64)),
            ),
            ("hook mode", Box::new(|k| k.hooks[0].mode = 0o644)),
            (
                "hook element",
                Box::new(|k| k.hooks[0].element = "bar".into()),
            ),
            (
                "element files",
                Box::new(|k| k.element_files = "f".repeat(64)),
            ),
            (
                "env value",
                Box::new(|k| {
                    k.env.insert("DIB_RELEASE".into(), "trixie".into());
                }),
            ),
            (
                "env added",
                Box::new(|k| {
                    k.env.insert("DIB_X".into(), String::new());
                }),
            ),
            ("arch", Box::new(|k| k.arch = "arm64".into())),
            (
                "extra",
                Box::new(|k| {
                    k.extra.insert("foo:/etc/x".into(), "1".into());
                }),
            ),
        ];
        for (what, edit) in edits {
            let (a, b) = changed(|k| edit(k));
            assert_ne!(a, b, "changing {what} must change the key");
        }
    }

    #[test]
    fn volatile_env_does_not_change_the_key() {
        use crate::settings::normalise_for_key;
        let mut e1 = base().env;
        let mut e2 = base().env;
        e1.insert("TMP_BUILD_DIR".into(), "/tmp/strata_build.aaaa".into());
        e2.insert("TMP_BUILD_DIR".into(), "/var/tmp/strata_build.zzzz".into());
        e1.insert("DIB_IMAGE_CACHE".into(), "/root/.cache/a".into());
        e2.insert("DIB_IMAGE_CACHE".into(), "/srv/cache".into());
        let (mut a, mut b) = (base(), base());
        a.env = normalise_for_key(&e1);
        b.env = normalise_for_key(&e2);
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn diff_names_the_changed_variable() {
        let a = base();
        let mut b = base();
        b.env.insert("DIB_RELEASE".into(), "trixie".into());
        let d = diff_inputs(&a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].input, "env");
        assert_eq!(d[0].name.as_deref(), Some("DIB_RELEASE"));
        assert_eq!(d[0].after.as_deref(), Some("trixie"));
    }

    #[test]
    fn json_round_trip_keeps_the_key() {
        let a = base();
        let back: KeyInputs = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(a.key(), back.key());
    }

    #[test]
    fn element_files_digest_ignores_phase_dirs_and_readme_but_not_bin() {
        let t = tempfile::tempdir().unwrap();
        let e = t.path().join("foo");
        fs::create_dir_all(e.join("install.d")).unwrap();
        fs::create_dir_all(e.join("bin")).unwrap();
        fs::write(e.join("bin/tool"), "a").unwrap();
        fs::write(e.join("install.d/10-x"), "a").unwrap();
        let d0 = element_files_digest([("foo", e.as_path())]).unwrap();
        fs::write(e.join("install.d/10-x"), "b").unwrap();
        fs::write(e.join("README.md"), "docs").unwrap();
        assert_eq!(d0, element_files_digest([("foo", e.as_path())]).unwrap());
        fs::write(e.join("bin/tool"), "b").unwrap();
        assert_ne!(d0, element_files_digest([("foo", e.as_path())]).unwrap());
        // The same content in another folder gives the same digest.
        let other = tempfile::tempdir().unwrap();
        let e2 = other.path().join("foo");
        fs::create_dir_all(e2.join("bin")).unwrap();
        fs::write(e2.join("bin/tool"), "b").unwrap();
        fs::set_permissions(
            e2.join("bin/tool"),
            fs::metadata(e.join("bin/tool")).unwrap().permissions(),
        )
        .unwrap();
        fs::set_permissions(&e2, fs::metadata(&e).unwrap().permissions()).unwrap();
        fs::create_dir_all(e2.join("install.d")).unwrap();
        assert_eq!(
            element_files_digest([("foo", e.as_path())]).unwrap(),
            element_files_digest([("foo", e2.as_path())]).unwrap()
        );
    }

    #[test]
    fn element_files_digest_keys_what_install_types_link_but_not_linked_hook_content() {
        let t = tempfile::tempdir().unwrap();
        let e = t.path().join("foo");
        let sub = e.join("install.d/foo-source-install");
        fs::create_dir_all(&sub).unwrap();
        let exec = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(sub.join("10-a"), "a").unwrap();
        exec(&sub.join("10-a"));
        fs::write(sub.join("data.conf"), "1").unwrap();
        let digest = || element_files_digest([("foo", e.as_path())]).unwrap();
        let d0 = digest();
        // A linked hook's content is keyed by its step, not here.
        fs::write(sub.join("10-a"), "changed").unwrap();
        assert_eq!(d0, digest());
        // A new hook in the sub-folder, its mode, or a data file there: all change the digest.
        fs::write(sub.join("20-b"), "b").unwrap();
        exec(&sub.join("20-b"));
        let d1 = digest();
        assert_ne!(d0, d1);
        fs::set_permissions(sub.join("20-b"), fs::Permissions::from_mode(0o644)).unwrap();
        let d2 = digest();
        assert_ne!(d1, d2);
        fs::write(sub.join("data.conf"), "2").unwrap();
        assert_ne!(d2, digest());
    }

    #[test]
    fn element_digest_covers_hooks_too_but_not_readmes() {
        let t = tempfile::tempdir().unwrap();
        let e = t.path().join("foo");
        fs::create_dir_all(e.join("install.d")).unwrap();
        fs::write(e.join("install.d/10-x"), "a").unwrap();
        let d0 = element_digest(&e).unwrap();
        fs::write(e.join("README.rst"), "docs").unwrap();
        assert_eq!(d0, element_digest(&e).unwrap());
        fs::write(e.join("install.d/10-x"), "b").unwrap();
        assert_ne!(d0, element_digest(&e).unwrap());
    }

    #[test]
    fn cache_inputs_hash_host_files_and_flag_missing() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("host.conf");
        fs::write(&f, "x").unwrap();
        fs::write(
            t.path().join("cache-inputs"),
            format!(
                "# comment\n{}\n{}/nothing-*\n",
                f.display(),
                t.path().display()
            ),
        )
        .unwrap();
        let a = cache_inputs("el", t.path()).unwrap();
        assert_eq!(a.len(), 2);
        assert!(a.values().any(|v| v == "missing"));
        fs::write(&f, "y").unwrap();
        assert_ne!(a, cache_inputs("el", t.path()).unwrap());
    }
}
