//! Steps and their keys: what a build runs, in order, each keyed from the step before.
//!
//! ```text
//! phase + live hook folder (run_parts order) + key context ──► Vec<Step> (keys chained)
//! ```
//!
//! A step is one hook (default) or one whole phase (`--granularity phase`). The `-p` package
//! install and strata's end-of-build clean-up are steps too (phase `core`). Hook lists are read
//! from the live hook folder because extra-data.d hooks may add hooks (dib's install-types does),
//! so a build computes each phase's steps when it reaches that phase; `strata plan` does the same
//! against the cached state.

use crate::cli::Granularity;
use crate::elements::hooks::{RunPart, run_parts};
use crate::key::{CACHE_FORMAT_VERSION, HookInput, KeyInputs};
use crate::phase::Phase;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a step does when it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run these hooks of one phase, in order.
    Hooks {
        phase: Phase,
        hooks: Vec<PlannedHook>,
    },
    /// `install-packages` of the `-p` list, in the chroot, after install.d.
    Packages(Vec<String>),
    /// dib's end-of-build clean-up of the tree: empty /tmp, truncate /var/log files.
    FinaliseBase,
}

/// A hook as a step runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedHook {
    pub name: String,
    pub element: String,
    /// The hook file in the host's view of the hook folder.
    #[serde(skip)]
    pub path: PathBuf,
}

/// One cached unit of work.
#[derive(Debug, Clone)]
pub struct Step {
    /// `install.d`, … or `core`.
    pub phase: String,
    /// Hook name, `*` for a whole phase, or the core step's name.
    pub name: String,
    pub action: Action,
    pub inputs: KeyInputs,
    pub key: String,
}

impl Step {
    pub fn label(&self) -> String {
        format!("{}/{}", self.phase, self.name)
    }

    /// True when this step is where `--rebuild-from` starts.
    pub fn matches(&self, phase: Phase, hook: Option<&str>) -> bool {
        self.phase == phase.dir_name() && hook.is_none_or(|h| h == self.name || self.name == "*")
    }
}

/// What every step's key shares besides its own hooks and parent.
#[derive(Debug, Clone)]
pub struct KeyContext {
    pub element_files: String,
    pub arch: String,
    pub extra: BTreeMap<String, String>,
    pub granularity: Granularity,
}

impl KeyContext {
    fn inputs(
        &self,
        parent: Option<&str>,
        phase: &str,
        step: &str,
        hooks: Vec<HookInput>,
        env: &BTreeMap<String, String>,
        extra: BTreeMap<String, String>,
    ) -> KeyInputs {
        let mut all_extra = self.extra.clone();
        all_extra.extend(extra);
        KeyInputs {
            version: CACHE_FORMAT_VERSION,
            parent: parent.map(str::to_string),
            phase: phase.to_string(),
            step: step.to_string(),
            hooks,
            element_files: self.element_files.clone(),
            env: env.clone(),
            arch: self.arch.clone(),
            extra: all_extra,
        }
    }
}

fn step(inputs: KeyInputs, action: Action) -> Step {
    Step {
        phase: inputs.phase.clone(),
        name: inputs.step.clone(),
        key: inputs.key(),
        action,
        inputs,
    }
}

/// The steps of one phase, keyed in a chain starting from `parent`. `origin` names the element a
/// hook came from (generated hooks have none).
pub fn phase_steps(
    ctx: &KeyContext,
    phase: Phase,
    hooks_dir: &Path,
    key_env: &BTreeMap<String, String>,
    origin: &dyn Fn(&Path) -> Option<String>,
    parent: Option<&str>,
) -> anyhow::Result<Vec<Step>> {
    let dir = hooks_dir.join(phase.dir_name());
    let parts: Vec<RunPart> = if dir.is_dir() {
        run_parts(&dir).with_context(|| format!("cannot list hooks in {}", dir.display()))?
    } else {
        Vec::new()
    };
    let mut planned = Vec::new();
    let mut inputs = Vec::new();
    for part in parts {
        let rel = Path::new(phase.dir_name()).join(&part.name);
        let element = origin(&rel).unwrap_or_else(|| "(generated)".to_string());
        let input = HookInput::read(&part.name, &element, &part.path)
            .with_context(|| format!("cannot read hook {}", part.path.display()))?;
        planned.push(PlannedHook {
            name: part.name,
            element,
            path: part.path,
        });
        inputs.push(input);
    }
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    let phase_name = phase.dir_name();
    let mut steps = Vec::new();
    match ctx.granularity {
        Granularity::Phase => {
            let i = ctx.inputs(parent, phase_name, "*", inputs, key_env, BTreeMap::new());
            steps.push(step(
                i,
                Action::Hooks {
                    phase,
                    hooks: planned,
                },
            ));
        }
        Granularity::Hook => {
            let mut parent = parent.map(str::to_string);
            for (hook, input) in planned.into_iter().zip(inputs) {
                let i = ctx.inputs(
                    parent.as_deref(),
                    phase_name,
                    &hook.name,
                    vec![input],
                    key_env,
                    BTreeMap::new(),
                );
                let s = step(
                    i,
                    Action::Hooks {
                        phase,
                        hooks: vec![hook],
                    },
                );
                parent = Some(s.key.clone());
                steps.push(s);
            }
        }
    }
    Ok(steps)
}

/// The `-p` packages step (None when there are no packages).
pub fn packages_step(
    ctx: &KeyContext,
    packages: &[String],
    key_env: &BTreeMap<String, String>,
    parent: Option<&str>,
) -> Option<Step> {
    if packages.is_empty() {
        return None;
    }
    let extra = [("packages".to_string(), packages.join(" "))]
        .into_iter()
        .collect();
    let i = ctx.inputs(parent, "core", "packages", Vec::new(), key_env, extra);
    Some(step(i, Action::Packages(packages.to_vec())))
}

/// strata's end-of-build clean-up step.
pub fn finalise_base_step(ctx: &KeyContext, parent: Option<&str>) -> Step {
    let i = ctx.inputs(
        parent,
        "core",
        "finalise-base",
        Vec::new(),
        &BTreeMap::new(),
        BTreeMap::new(),
    );
    step(i, Action::FinaliseBase)
}

/// A step as `strata plan --json` and the build manifest show it.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub phase: String,
    pub hook: String,
    pub key: String,
    pub cached: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<String>,
}

impl StepView {
    pub fn of(step: &Step, cached: bool) -> StepView {
        let elements = match &step.action {
            Action::Hooks { hooks, .. } => hooks.iter().map(|h| h.element.clone()).collect(),
            _ => Vec::new(),
        };
        StepView {
            phase: step.phase.clone(),
            hook: step.name.clone(),
            key: step.key.clone(),
            cached,
            elements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn ctx(g: Granularity) -> KeyContext {
        KeyContext {
            element_files: "e".repeat(64),
            arch: "amd64".into(),
            extra: BTreeMap::new(),
            granularity: g,
        }
    }

    fn hook(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("install.d");
        fs::create_dir_all(&d).unwrap();
        hook(&d, "10-a", "#!/bin/sh\necho a\n");
        hook(&d, "20-b", "#!/bin/sh\necho b\n");
        hook(&d, "30-c", "#!/bin/sh\necho c\n");
        t
    }

    fn keys(t: &Path, g: Granularity, env: &BTreeMap<String, String>) -> Vec<String> {
        phase_steps(
            &ctx(g),
            Phase::Install,
            t,
            env,
            &|_| Some("el".into()),
            None,
        )
        .unwrap()
        .into_iter()
        .map(|s| s.key)
        .collect()
    }

    #[test]
    fn editing_a_hook_changes_its_key_and_later_ones_only() {
        let t = tree();
        let env = BTreeMap::new();
        let before = keys(t.path(), Granularity::Hook, &env);
        assert_eq!(before.len(), 3);
        hook(&t.path().join("install.d"), "20-b", "#!/bin/sh\necho B\n");
        let after = keys(t.path(), Granularity::Hook, &env);
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1]);
        assert_ne!(before[2], after[2]);
    }

    #[test]
    fn phase_granularity_is_one_step_for_all_hooks() {
        let t = tree();
        let steps = phase_steps(
            &ctx(Granularity::Phase),
            Phase::Install,
            t.path(),
            &BTreeMap::new(),
            &|_| None,
            None,
        )
        .unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].name, "*");
        match &steps[0].action {
            Action::Hooks { hooks, .. } => assert_eq!(hooks.len(), 3),
            other => panic!("unexpected action {other:?}"),
        }
    }

    #[test]
    fn env_change_changes_every_key() {
        let t = tree();
        let a = keys(t.path(), Granularity::Hook, &BTreeMap::new());
        let env = [("DIB_X".to_string(), "1".to_string())]
            .into_iter()
            .collect();
        let b = keys(t.path(), Granularity::Hook, &env);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn same_hooks_in_another_folder_give_the_same_keys() {
        let (t1, t2) = (tree(), tree());
        assert_eq!(
            keys(t1.path(), Granularity::Hook, &BTreeMap::new()),
            keys(t2.path(), Granularity::Hook, &BTreeMap::new())
        );
    }

    #[test]
    fn missing_phase_folder_has_no_steps() {
        let t = tempfile::tempdir().unwrap();
        assert!(keys(t.path(), Granularity::Hook, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn packages_step_depends_on_the_package_list() {
        let c = ctx(Granularity::Hook);
        let env = BTreeMap::new();
        assert!(packages_step(&c, &[], &env, None).is_none());
        let a = packages_step(&c, &["vim".into()], &env, Some("p")).unwrap();
        let b = packages_step(&c, &["nano".into()], &env, Some("p")).unwrap();
        assert_ne!(a.key, b.key);
    }
}
