//! `strata elements`: resolves elements and prints them in build order, optionally with each
//! phase's hooks (in dib-run-parts order) and the element each hook comes from.
//!
//! ```text
//! ElementsArgs ──► search_path ──► Catalog::scan ──► deps::resolve ──► names
//!                                  (--hooks) HookTree::build ──► materialize(tempdir)
//!                                            ──► run_parts(phase dir) per phase ──► hooks
//! ──► text (one name per line; then "phase.d:" blocks) or JSON
//! ```
//!
//! JSON shape: `{"elements":[{"name":..,"path":..}], "hooks":{"install.d":[{"name":..,
//! "element":..}]}}`; `hooks` is present only with `--hooks`, its phases in build order and only
//! phases that have hooks.

use crate::cli::ElementsArgs;
use crate::elements::deps::{self, Request};
use crate::elements::discover::{self, Catalog};
use crate::elements::hooks::{self, HookTree};
use crate::elements::{Element, ElementError};
use crate::phase::Phase;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// One hook of a phase, and where it comes from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HookInfo {
    pub name: String,
    /// The element the hook comes from (`?` if the tree does not know it).
    pub element: String,
}

/// Each phase that has hooks, in build order, with its hooks in run order.
pub fn phase_hooks(tree: &HookTree) -> Result<Vec<(Phase, Vec<HookInfo>)>, ElementError> {
    let tmp = tempfile::Builder::new()
        .prefix("strata-hooks-")
        .tempdir()
        .map_err(|e| ElementError::io("create a temp folder in", std::env::temp_dir(), e))?;
    let root = tmp.path().join("hooks");
    tree.materialize(&root)?;
    let mut out = Vec::new();
    for phase in Phase::ALL {
        let dir = root.join(phase.dir_name());
        if !dir.is_dir() {
            continue;
        }
        let parts = hooks::run_parts(&dir).map_err(|e| ElementError::io("list", &dir, e))?;
        if parts.is_empty() {
            continue;
        }
        let list = parts
            .into_iter()
            .map(|p| HookInfo {
                element: tree
                    .origin(Path::new(phase.dir_name()).join(&p.name))
                    .unwrap_or("?")
                    .to_string(),
                name: p.name,
            })
            .collect();
        out.push((phase, list));
    }
    Ok(out)
}

#[derive(Serialize)]
struct JsonElement<'a> {
    name: &'a str,
    path: String,
}

struct JsonHooks<'a>(&'a [(Phase, Vec<HookInfo>)]);

impl Serialize for JsonHooks<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(p, h)| (p.dir_name(), h)))
    }
}

#[derive(Serialize)]
struct JsonOut<'a> {
    elements: Vec<JsonElement<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hooks: Option<JsonHooks<'a>>,
}

/// Renders the listing as text: names one per line, then a block per phase.
pub fn render_text(elements: &[Element], hooks: Option<&[(Phase, Vec<HookInfo>)]>) -> String {
    let mut s = String::new();
    for e in elements {
        s.push_str(&e.name);
        s.push('\n');
    }
    for (phase, list) in hooks.unwrap_or_default() {
        s.push('\n');
        s.push_str(phase.dir_name());
        s.push_str(":\n");
        let width = list.iter().map(|h| h.name.len()).max().unwrap_or(0);
        for h in list {
            s.push_str(&format!("  {:width$}  {}\n", h.name, h.element));
        }
    }
    s
}

/// Runs `strata elements`.
pub fn run(args: &ElementsArgs) -> anyhow::Result<()> {
    let search = discover::search_path(&args.paths.element_path);
    let catalog = Catalog::scan(&search)?;
    let arch = args.arch.clone().unwrap_or_else(crate::arch::host_arch);
    let resolved = deps::resolve(
        &catalog,
        &Request {
            names: &args.elements,
            skip_base: args.skip_base,
            arch: &arch,
        },
    )?;
    let hooks = if args.hooks {
        let tree = HookTree::build(&resolved.elements)?;
        Some(phase_hooks(&tree)?)
    } else {
        None
    };
    let text = if args.json {
        let out = JsonOut {
            elements: resolved
                .elements
                .iter()
                .map(|e| JsonElement {
                    name: &e.name,
                    path: e.path.display().to_string(),
                })
                .collect(),
            hooks: hooks.as_deref().map(JsonHooks),
        };
        serde_json::to_string_pretty(&out)? + "\n"
    } else {
        render_text(&resolved.elements, hooks.as_deref())
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
