//! The dib element model: discovery on ELEMENTS_PATH, dependency resolution, the merged hook
//! tree with dib-run-parts ordering, environment.d capture, package-installs and pkg-map.
//!
//! Data flow (one direction; nothing here knows about caches, sandboxes or layers):
//!
//! ```text
//! search path (--element-path, ELEMENTS_PATH, built-in elements/)
//!     └─ discover::scan ──► Catalog (name → Element, earliest path wins)
//! Catalog + requested names
//!     └─ deps::resolve ──► Vec<Element> (resolved, deterministic order)
//! resolved elements
//!     ├─ hooks::HookTree::build ──► merged tree (phase → hooks in dib-run-parts order)
//!     ├─ env::capture ──► BTreeMap of the environment environment.d exports
//!     ├─ packages::squash ──► per-phase install / uninstall lists
//!     └─ pkgmap::PkgMap ──► package name mapping per distro / release
//! ```

pub mod deps;
pub mod discover;
pub mod env;
pub mod hooks;
pub mod packages;
pub mod pkgmap;

use std::path::PathBuf;

/// One element: a folder on the search path. Its name is the folder's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    /// The element's folder (absolute, symlinks resolved).
    pub path: PathBuf,
}

/// Everything that can be wrong with elements or their files. Each message is one line naming
/// the element and file involved. All of these are bad input (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ElementError {
    #[error("{0}")]
    Other(String),
}
