//! The element set of one build and everything derived from it once, before any hook runs:
//! the resolved elements, the merged hook tree, what every key shares, the cache mounts, and
//! (for disk builds) the block-device config, parsed. Bad input found here stops the build
//! before anything runs.
//!
//! ```text
//! Settings ──► search path ──► Catalog ──► deps::resolve ──► elements
//!          ──► HookTree, element-files digest, cache-inputs digests ──► KeyContext
//!          ──► cache-mounts;  --rebuild-from checked against the hook tree
//!          ──► (disk builds) block-device config selected and parsed
//! ```

use super::disk_step::{self, ConfigSource};
use crate::elements::{self, Element};
use crate::exit::Failure;
use crate::key;
use crate::phase::Phase;
use crate::plan::KeyContext;
use crate::settings::{self, BuildPaths, Settings};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The resolved element set and everything derived from it once per build.
pub struct Prepared {
    pub settings: Settings,
    pub elements: Vec<Element>,
    pub tree: elements::hooks::HookTree,
    pub key_ctx: KeyContext,
    /// The resolved elements' names, space separated (dib's IMAGE_ELEMENT).
    pub image_element: String,
    pub image_element_yaml: String,
    pub elements_path: String,
    /// Image paths (relative) that get a host cache folder bound on them during every step.
    /// Sorted: parents are bound before what is below them, and every build takes the
    /// folders' locks in the same order.
    pub cache_mounts: BTreeSet<PathBuf>,
    /// The block-device config (disk builds only).
    pub disk_config: Option<ConfigSource>,
}

impl Prepared {
    /// Resolves the elements of `settings` and checks what can be checked before any hook runs.
    pub fn new(settings: Settings) -> Result<Prepared> {
        let search = elements::discover::build_search_path(
            &settings.element_dirs,
            settings
                .elements_path_env
                .as_deref()
                .map(std::ffi::OsStr::new),
            elements::discover::builtin_elements_dir().as_deref(),
        );
        let catalog = elements::discover::Catalog::scan(&search)?;
        let resolved = elements::deps::resolve(
            &catalog,
            &elements::deps::Request {
                names: &settings.elements,
                skip_base: settings.skip_base,
                arch: &settings.arch,
            },
        )?
        .elements;
        let tree = elements::hooks::HookTree::build(&resolved)?;
        if let Some(rf) = &settings.cache.rebuild_from
            && let Some(hook) = &rf.hook
        {
            check_hook_exists(&tree, rf.phase, hook).context("--rebuild-from")?;
        }
        let element_files =
            key::element_files_digest(resolved.iter().map(|e| (e.name.as_str(), e.path.as_path())))
                .context("cannot read element files")?;
        let mut extra = BTreeMap::new();
        let mut cache_mounts = BTreeSet::new();
        for e in &resolved {
            extra.extend(key::cache_inputs(&e.name, &e.path)?);
            cache_mounts.extend(elements::extensions::read_cache_mounts(e)?);
        }
        let disk_config = if settings.wants_disk() {
            let env: BTreeMap<String, String> = settings
                .user_env
                .iter()
                .chain(settings.disk_env.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let config = disk_step::select_config(&env, &resolved, &settings.arch)?;
            disk_step::check_config(&config)?;
            Some(config)
        } else {
            None
        };
        let image_element = resolved
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let image_element_yaml = resolved
            .iter()
            .map(|e| format!("{}: {}\n", e.name, e.path.display()))
            .collect();
        let elements_path = catalog
            .search_path()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let key_ctx = KeyContext {
            element_files,
            arch: settings.arch.clone(),
            extra,
            granularity: settings.cache.granularity,
        };
        Ok(Prepared {
            settings,
            elements: resolved,
            tree,
            key_ctx,
            image_element,
            image_element_yaml,
            elements_path,
            cache_mounts,
            disk_config,
        })
    }

    /// What every rootfs hook receives before environment.d runs.
    pub fn base_env(&self, paths: &BuildPaths) -> BTreeMap<String, String> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("strata"));
        settings::base_environment(
            &self.settings,
            paths,
            &self.image_element,
            &self.image_element_yaml,
            &self.elements_path,
            &exe,
        )
    }

    /// What the disk step's hooks receive before environment.d runs.
    pub fn disk_env(&self, paths: &BuildPaths) -> BTreeMap<String, String> {
        settings::disk_environment(&self.settings, &self.base_env(paths))
    }

    /// The environment a phase's hooks get, as it enters keys: environment.d captured against
    /// placeholder paths, then normalised.
    pub fn key_env(&self, phase: Phase, hooks_dir: &Path) -> Result<BTreeMap<String, String>> {
        let placeholder = BuildPaths::placeholder();
        let base = if crate::plan::DISK_PHASES.contains(&phase) {
            self.disk_env(&placeholder)
        } else {
            self.base_env(&placeholder)
        };
        let mut base = settings::phase_environment(&base, phase, &placeholder);
        // environment.d files see the real hook folder (some read files beside themselves).
        base.insert("TMP_HOOKS_PATH".into(), hooks_dir.display().to_string());
        // A failing file is named as the element has it, not as the build folder's copy.
        let origin = |copy: &Path| {
            let rel = copy.strip_prefix(hooks_dir).ok()?;
            self.tree.get(rel).map(|e| e.source.clone())
        };
        let captured =
            elements::env::capture_dir_named(&hooks_dir.join("environment.d"), &base, &origin)?;
        Ok(settings::normalise_for_key(&captured))
    }
}

/// `--rebuild-from PHASE/HOOK` must name a hook some element has (at the top of the phase
/// folder, or in one of its install-type sub-folders, which extra-data.d links in).
pub fn check_hook_exists(tree: &elements::hooks::HookTree, phase: Phase, hook: &str) -> Result<()> {
    let dir = Path::new(phase.dir_name());
    let mut known = BTreeSet::new();
    for (rel, _) in tree.entries() {
        let Ok(inside) = rel.strip_prefix(dir) else {
            continue;
        };
        let Some(name) = inside.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if inside.components().count() <= 2 && elements::hooks::is_run_parts_name(name) {
            known.insert(name.to_string());
        }
    }
    if known.contains(hook) {
        return Ok(());
    }
    let choices = if known.is_empty() {
        format!("no element has {phase} hooks")
    } else {
        format!(
            "{phase} hooks: {}",
            known.into_iter().collect::<Vec<_>>().join(", ")
        )
    };
    Err(Failure::bad_input(format!(
        "{phase}/{hook}: no element has that hook ({choices})"
    ))
    .into())
}
