//! `strata dib ...`: the hidden helpers strata's own elements call from their host-side hooks,
//! so that nothing inside the chroot needs Python or a JSON parser.
//!
//! ```text
//! package-installs-squash --elements E --path P [--resolved DIR] OUTFILE
//!     packages::squash ──► OUTFILE (dib's JSON)
//!                      └─► resolve through pkg-maps ──► DIR/<phase>.install, DIR/<phase>.uninstall
//! pkg-map [--element E | --pkg-map F] [--distro D] [--release R] [--missing-ok] [--prefix P] NAMES
//!     dib's pkg-map CLI: one line per mapped name on stdout
//! pkg-map-export --elements E --path P --distro D [--release R] DIR
//!     every element's flattened pkg-map ──► DIR/<element> as `name<TAB>value` lines
//! ```
//!
//! Exit statuses: bad input is 2 (strata's `Exit::BadInput`). `pkg-map` keeps dib's own codes:
//! 1 for "no --element/--pkg-map", "both given", "no distro", an unparsable map and an unmapped
//! name; 2 for a missing map file. So a usage error of `pkg-map` exits 1, not strata's usual 2:
//! dib's callers (`package-installs-v2`) read 2 as "no map, pass the names through" and would
//! silently carry on after a real error if it were 2.
//!
//! Every file is written atomically (a temp file in the same folder, then rename); output
//! folders are created when missing. A stale output this command owns (a phase file for a phase
//! with no entries, an export for an element without a pkg-map) is removed, since the folder may
//! be reused by an incremental build.

use crate::cli::DibCommand;
use crate::elements::packages::{self, PACKAGE_PHASES, PackageError};
use crate::elements::pkgmap::{self, PkgMap};
use crate::exit::{Exit, Failure};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Runs one `strata dib` helper.
pub fn run(cmd: DibCommand) -> anyhow::Result<()> {
    match cmd {
        DibCommand::PackageInstallsSquash {
            elements,
            path,
            resolved,
            out,
        } => squash(&elements, &path, resolved.as_deref(), &out),
        DibCommand::PkgMap {
            element,
            pkg_map,
            distro,
            release,
            missing_ok,
            prefix,
            path,
            names,
        } => map_names(&PkgMapArgs {
            element: element.filter(|s| !s.is_empty()),
            pkg_map: pkg_map.filter(|p| !p.as_os_str().is_empty()),
            distro: distro.unwrap_or_default(),
            release: release.unwrap_or_default(),
            missing_ok,
            prefix,
            search: split_path(&path),
            names,
        }),
        DibCommand::PkgMapExport {
            elements,
            path,
            distro,
            release,
            out,
        } => export(&elements, &path, &distro, &release, &out),
    }
}

/// ELEMENTS_PATH: colon separated; empty entries are skipped (as for `build`).
fn split_path(path: &str) -> Vec<PathBuf> {
    crate::elements::discover::build_search_path(&[], Some(std::ffi::OsStr::new(path)), None)
}

/// IMAGE_ELEMENT: whitespace separated element names, each a plain folder name.
fn split_elements(elements: &str) -> Result<Vec<String>, PackageError> {
    elements
        .split_whitespace()
        .map(|e| {
            if e == "." || e == ".." || e.contains('/') {
                Err(PackageError::Usage(format!(
                    "invalid element name {e:?} in --elements: an element name is a folder name"
                )))
            } else {
                Ok(e.to_string())
            }
        })
        .collect()
}

fn squash(elements: &str, path: &str, resolved: Option<&Path>, out: &Path) -> anyhow::Result<()> {
    let elements = split_elements(elements)?;
    let search = split_path(path);
    let env = crate::settings::process_env();
    let arch = env.get("ARCH").cloned().unwrap_or_default();
    let installs = packages::squash(&elements, &search, &env, &arch)?;

    let mut json = Vec::new();
    // dib writes `json.dump(indent=True)`, i.e. a one-space indent.
    let mut ser = serde_json::Serializer::with_formatter(
        &mut json,
        serde_json::ser::PrettyFormatter::with_indent(b" "),
    );
    serde::Serialize::serialize(&installs.to_dib_json(), &mut ser)
        .map_err(|e| anyhow::anyhow!("cannot encode the package list as JSON: {e}"))?;
    json.push(b'\n');
    write_atomic(out, &json)?;

    let Some(dir) = resolved else {
        return Ok(());
    };
    let has_entries = |phase: &str| {
        installs
            .phases
            .get(phase)
            .is_some_and(|l| !l.install.is_empty() || !l.uninstall.is_empty())
    };
    let lists = if PACKAGE_PHASES.iter().any(|p| has_entries(p)) {
        let distro = env.get("DISTRO_NAME").map(String::as_str).unwrap_or("");
        if distro.is_empty() {
            return Err(PackageError::Usage(
                "DISTRO_NAME is not set; package names cannot be mapped through pkg-map without \
                 a distro (an operating-system element exports it)"
                    .into(),
            )
            .into());
        }
        let release = env.get("DIB_RELEASE").map(String::as_str).unwrap_or("");
        installs.resolve(&search, distro, release)?
    } else {
        BTreeMap::new()
    };
    create_dir(dir)?;
    for phase in PACKAGE_PHASES {
        for (kind, which) in [("install", false), ("uninstall", true)] {
            let file = dir.join(format!("{phase}.{kind}"));
            if has_entries(phase)
                && let Some(l) = lists.get(phase)
            {
                let names = if which { &l.uninstall } else { &l.install };
                write_atomic(&file, lines(names).as_bytes())?;
            } else {
                remove_stale(&file)?;
            }
        }
    }
    Ok(())
}

fn lines(names: &[String]) -> String {
    names.iter().map(|n| format!("{n}\n")).collect()
}

struct PkgMapArgs {
    element: Option<String>,
    pkg_map: Option<PathBuf>,
    distro: String,
    release: String,
    missing_ok: bool,
    prefix: String,
    search: Vec<PathBuf>,
    names: Vec<String>,
}

/// dib's `pkg-map`, with its exit codes (see the module doc).
fn map_names(a: &PkgMapArgs) -> anyhow::Result<()> {
    let fail =
        |message: String| -> anyhow::Error { Failure::new(Exit::BuildFailed, message).into() };
    let (label, file) = match (&a.element, &a.pkg_map) {
        (None, None) => {
            return Err(fail(
                "pkg-map: please specify --element or --pkg-map".into(),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(fail(
                "pkg-map: specify either --element or --pkg-map, not both".into(),
            ));
        }
        (Some(e), None) => (e.clone(), pkgmap::find(e, &a.search)),
        (None, Some(f)) => (
            format!("<{}>", f.display()),
            Some(f.clone()).filter(|f| f.exists()),
        ),
    };
    if a.distro.is_empty() {
        return Err(fail(
            "pkg-map: please specify --distro or set DISTRO_NAME".into(),
        ));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut emit = |s: &str| -> anyhow::Result<()> {
        writeln!(out, "{}{s}", a.prefix)
            .and_then(|()| out.flush())
            .map_err(|e| anyhow::anyhow!("pkg-map: cannot write to stdout: {e}"))
    };
    let Some(file) = file else {
        if a.missing_ok {
            for name in &a.names {
                emit(name)?;
            }
            return Ok(());
        }
        let where_ = match &a.element {
            Some(e) if a.search.is_empty() => {
                format!("for {e} element (no --path / ELEMENTS_PATH to search)")
            }
            Some(e) => format!("for {e} element on the element path"),
            None => label.clone(),
        };
        return Err(Failure::new(
            Exit::BadInput,
            format!("pkg-map: required pkg-map {where_} does not exist"),
        )
        .into());
    };
    let map = PkgMap::load(&file).map_err(|e| fail(format!("pkg-map: {e}")))?;
    for name in &a.names {
        match map.lookup(name, &a.distro, &a.release) {
            Some("") => {}
            Some(mapped) => emit(mapped)?,
            None if a.missing_ok => emit(name)?,
            None => {
                return Err(fail(format!(
                    "pkg-map: {label} has no valid mapping for package {name} (distro {}); add \
                     it to {} or pass --missing-ok",
                    a.distro,
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

fn export(
    elements: &str,
    path: &str,
    distro: &str,
    release: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut elements = split_elements(elements)?;
    let mut seen = std::collections::HashSet::new();
    elements.retain(|e| seen.insert(e.clone()));
    if distro.is_empty() {
        return Err(
            PackageError::Usage("pkg-map-export: --distro must not be empty".into()).into(),
        );
    }
    let search = split_path(path);
    create_dir(dir)?;
    for element in &elements {
        let target = dir.join(element);
        let Some(file) = pkgmap::find(element, &search) else {
            remove_stale(&target)?;
            continue;
        };
        let map = PkgMap::load(&file)?;
        let mut text = String::new();
        for (name, value) in map.flatten(distro, release) {
            if name.is_empty() || name.contains(['\t', '\n']) || value.contains('\n') {
                return Err(PackageError::Format {
                    path: file.clone(),
                    message: format!(
                        "package name {name:?} or its value {value:?} holds a tab or newline (or \
                         the name is empty); it cannot be exported as a name<TAB>value line"
                    ),
                }
                .into());
            }
            text.push_str(&format!("{name}\t{value}\n"));
        }
        write_atomic(&target, text.as_bytes())?;
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PackageError> {
    std::fs::create_dir_all(dir).map_err(|err| PackageError::Write {
        path: dir.to_path_buf(),
        err,
    })
}

fn remove_stale(file: &Path) -> Result<(), PackageError> {
    match std::fs::remove_file(file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(PackageError::Write {
            path: file.to_path_buf(),
            err,
        }),
    }
}

/// Writes `data` to `path` through a temp file in the same folder and a rename (mode 0644).
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PackageError> {
    let werr = |err| PackageError::Write {
        path: path.to_path_buf(),
        err,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".strata-tmp-")
        .tempfile_in(dir)
        .map_err(werr)?;
    tmp.write_all(data).map_err(werr)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(werr)?;
    tmp.persist(path).map_err(|e| werr(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_skips_empty_entries() {
        assert_eq!(
            split_path(":/a::/b:"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }

    #[test]
    fn element_names_must_be_folder_names() {
        assert_eq!(split_elements(" a  b\tc\n").unwrap(), ["a", "b", "c"]);
        for bad in ["a ../x", "..", "a/b"] {
            assert!(split_elements(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/out");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let n = std::fs::read_dir(dir.path().join("sub")).unwrap().count();
        assert_eq!(n, 1);
    }
}
