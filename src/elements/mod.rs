//! The dib element model: discovery on ELEMENTS_PATH, dependency resolution, the merged hook
//! tree with dib-run-parts ordering, environment.d capture, package-installs and pkg-map.
//!
//! Data flow (one direction; nothing here knows about caches, sandboxes or layers):
//!
//! ```text
//! search path (--element-path, ELEMENTS_PATH, built-in elements/)
//!     └─ discover::scan ──► Catalog (name → Element, earliest path wins)
//! Catalog + requested names
//!     └─ deps::resolve ──► Resolved { elements: Vec<Element> (deps first, ties by name), .. }
//! resolved elements
//!     ├─ hooks::HookTree::build ──► merged tree; materialize() ──► TMP_HOOKS_PATH
//!     ├─ hooks::run_parts(phase dir) ──► hooks in dib-run-parts order
//!     ├─ env::env_files + env::capture ──► BTreeMap of the environment environment.d exports
//!     ├─ packages::squash ──► per-phase install / uninstall lists
//!     └─ pkgmap::PkgMap ──► package name mapping per distro / release
//! ```

pub mod deps;
pub mod discover;
pub mod env;
pub mod extensions;
pub mod hooks;
pub mod packages;
pub mod pkgmap;

use std::fmt;
use std::path::PathBuf;

/// One element: a folder on the search path. Its name is the folder's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    /// The element's folder (absolute, symlinks resolved).
    pub path: PathBuf,
}

/// Why a name is part of a resolution: who asked for it. Used to say "required by 'bar'" in
/// errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirer {
    /// Named on the command line.
    User,
    /// Added implicitly (`base`, or the block-device default for `vm`); the text says why.
    Default(&'static str),
    /// Listed in this element's `element-deps`.
    Element(String),
}

impl fmt::Display for Requirer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirer::User => f.write_str("requested on the command line"),
            Requirer::Default(why) => write!(f, "added by default: {why}"),
            Requirer::Element(name) => write!(f, "required by '{name}'"),
        }
    }
}

/// Everything that can be wrong with elements or their files. Each message is one line naming
/// the element and file involved. All of these are bad input (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ElementError {
    #[error("element path entry '{}' is not a directory; fix ELEMENTS_PATH or --element-path", path.display())]
    NotADirectory { path: PathBuf },

    #[error("cannot {action} '{}': {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },

    #[error("'{}' has a name that is not UTF-8; rename it", path.display())]
    NonUtf8Name { path: PathBuf },

    #[error("'{}' and '{}' in '{}' are both element '{name}' (an element's name is its real folder's name); remove one", first.display(), second.display(), dir.display())]
    AmbiguousName {
        name: String,
        dir: PathBuf,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("{} line {line}: {reason}", path.display())]
    BadListFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("element '{name}' not found ({requirer}); searched: {searched}")]
    NotFound {
        name: String,
        requirer: Requirer,
        searched: String,
    },

    #[error("'{name}' is provided by both '{first}' and '{second}'; use only one of them")]
    DuplicateProvider {
        name: String,
        first: String,
        second: String,
    },

    #[error("element '{name}' ({requirer}) is also provided by '{provider}'; use only one of them")]
    ProvidedByOther {
        name: String,
        requirer: Requirer,
        provider: String,
    },

    #[error(
        "'{name}' ({requirer}) is provided only by '{provider}', which is reached only through '{name}' itself; request '{provider}' explicitly"
    )]
    ProviderUnreachable {
        name: String,
        requirer: Requirer,
        provider: String,
    },

    #[error(
        "no element provides 'operating-system' (resolved: {resolved}); add an operating-system element such as debian-minimal"
    )]
    NoOperatingSystem { resolved: String },

    #[error("'{}' is in two elements: '{first}' ({}) and '{second}' ({}); rename or remove one", rel.display(), first_path.display(), second_path.display())]
    DuplicateHook {
        rel: PathBuf,
        first: String,
        first_path: PathBuf,
        second: String,
        second_path: PathBuf,
    },

    #[error("cannot materialize the hook tree into '{}': it is not empty", path.display())]
    DestinationNotEmpty { path: PathBuf },

    #[error("environment.d file {} failed (exit {code}){detail}", file.display())]
    EnvFileFailed {
        file: PathBuf,
        code: String,
        /// ": <bash's last stderr line>", or empty.
        detail: String,
    },

    #[error("{0}")]
    Other(String),
}

impl ElementError {
    /// An I/O error on `path` while trying to `action` it ("read", "list", "copy", ...).
    pub fn io(action: &'static str, path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        ElementError::Io {
            action,
            path: path.into(),
            err,
        }
    }
}
