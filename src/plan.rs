//! Steps and their keys: what a build runs, in order, each keyed from the step before.
//!
//! ```text
//! phase + live hook folder (run_parts order) + key context ──► Vec<Step> (keys chained)
//! last rootfs key + disk phases' hooks + disk options + config ──► DiskStep (one key)
//! ```
//!
//! A step is one hook (default) or one whole phase (`--granularity phase`). The `-p` package
//! install and strata's end-of-build clean-up are steps too (phase `core`). Hook lists are read
//! from the live hook folder because extra-data.d hooks may add hooks (dib's install-types does),
//! so a build computes each phase's steps when it reaches that phase; `strata plan` does the same
//! against the cached state.

use crate::elements::hooks::{RunPart, run_parts};
use crate::key::{CACHE_FORMAT_VERSION, DiskKeyInputs, HookInput, KeyInputs};
use crate::phase::Phase;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// How finely a build is cut into cached steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One step per hook.
    #[default]
    Hook,
    /// One step per phase.
    Phase,
}

impl Granularity {
    pub const NAMES: [&'static str; 2] = ["hook", "phase"];

    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "hook" => Some(Granularity::Hook),
            "phase" => Some(Granularity::Phase),
            _ => None,
        }
    }
}

/// Where a walk stops for `strata shell --at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopAt {
    pub phase: Phase,
    /// A hook of the phase; None: the whole phase.
    pub hook: Option<String>,
    /// Stop before the step (or phase) instead of after it.
    pub before: bool,
}

/// One of dib's `break=` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakPoint {
    Before(Phase),
    After(Phase),
    AfterError,
}

impl BreakPoint {
    /// Parses dib's `break` value: comma separated `before-<phase>`, `after-<phase>` (dib's
    /// phase names without `.d`: `before-install`, `after-pre-install`, …) and `after-error`.
    pub fn parse_list(value: &str) -> Result<Vec<BreakPoint>, String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let bad = || {
                    format!(
                        "break={value}: '{s}' is not a break point (before-<phase>, after-<phase> \
                         with a phase such as install or pre-install, or after-error)"
                    )
                };
                if s == "after-error" {
                    return Ok(BreakPoint::AfterError);
                }
                let (when, phase) = s
                    .strip_prefix("before-")
                    .map(|p| (true, p))
                    .or_else(|| s.strip_prefix("after-").map(|p| (false, p)))
                    .ok_or_else(bad)?;
                let phase = Phase::parse(phase).ok_or_else(bad)?;
                Ok(if when {
                    BreakPoint::Before(phase)
                } else {
                    BreakPoint::After(phase)
                })
            })
            .collect()
    }
}

/// strata's own steps, besides the hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoreStep {
    /// `install-packages` of the `-p` list, after install.d.
    Packages,
    /// dib's end-of-build clean-up of the tree (tree outputs only).
    FinaliseBase,
}

/// Which step: a hook (or a whole phase), one of strata's own, or the disk step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StepId {
    /// `install.d/50-foo`, or `install.d/*` for a whole phase.
    Hook { phase: Phase, hook: String },
    /// `core/packages`, `core/finalise-base`.
    Core(CoreStep),
    /// `output/disk`: block-device.d to cleanup.d and the disk outputs.
    Disk,
}

impl StepId {
    /// The phase part as recorded in the index and the manifest: `install.d`, `core`, `output`.
    pub fn phase_name(&self) -> &'static str {
        match self {
            StepId::Hook { phase, .. } => phase.dir_name(),
            StepId::Core(_) => "core",
            StepId::Disk => "output",
        }
    }

    /// The hook part: the hook name, `*`, `packages`, `finalise-base`, `disk`.
    pub fn hook_name(&self) -> &str {
        match self {
            StepId::Hook { hook, .. } => hook,
            StepId::Core(CoreStep::Packages) => "packages",
            StepId::Core(CoreStep::FinaliseBase) => "finalise-base",
            StepId::Disk => "disk",
        }
    }

    /// The dib phase this step belongs to (None for the core and disk steps).
    pub fn phase(&self) -> Option<Phase> {
        match self {
            StepId::Hook { phase, .. } => Some(*phase),
            _ => None,
        }
    }

    /// Parses `phase/hook` as recorded (the inverse of `Display`).
    pub fn parse(phase: &str, hook: &str) -> Option<StepId> {
        match (phase, hook) {
            ("core", "packages") => Some(StepId::Core(CoreStep::Packages)),
            ("core", "finalise-base") => Some(StepId::Core(CoreStep::FinaliseBase)),
            ("output", "disk") => Some(StepId::Disk),
            (p, h) => Phase::from_dir_name(p).map(|phase| StepId::Hook {
                phase,
                hook: h.to_string(),
            }),
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.phase_name(), self.hook_name())
    }
}

/// Where `--rebuild-from` starts forcing reruns: a phase, or one hook of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildFrom {
    pub phase: Phase,
    pub hook: Option<String>,
}

impl RebuildFrom {
    /// Parses `PHASE` or `PHASE/HOOK` (`install`, `install.d`, `install.d/50-foo`).
    pub fn parse(s: &str) -> Result<RebuildFrom, String> {
        let (phase, hook) = match s.split_once('/') {
            Some((p, h)) if !h.is_empty() => (p, Some(h.to_string())),
            Some((p, _)) => (p, None),
            None => (s, None),
        };
        let phase = Phase::parse(phase).ok_or_else(|| {
            format!(
                "'{phase}' is not a phase (one of {})",
                Phase::ALL.map(|p| p.dir_name()).join(", ")
            )
        })?;
        Ok(RebuildFrom { phase, hook })
    }
}

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
    pub id: StepId,
    pub action: Action,
    pub inputs: KeyInputs,
    pub key: String,
}

impl Step {
    pub fn label(&self) -> String {
        self.id.to_string()
    }

    /// True when this step is where `--rebuild-from` starts.
    pub fn matches(&self, from: &RebuildFrom) -> bool {
        match &self.id {
            StepId::Hook { phase, hook } => {
                *phase == from.phase
                    && from
                        .hook
                        .as_deref()
                        .is_none_or(|h| h == hook || hook == "*")
            }
            _ => false,
        }
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

fn step(id: StepId, inputs: KeyInputs, action: Action) -> Step {
    Step {
        id,
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
            let id = StepId::Hook {
                phase,
                hook: "*".into(),
            };
            steps.push(step(
                id,
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
                let id = StepId::Hook {
                    phase,
                    hook: hook.name.clone(),
                };
                let s = step(
                    id,
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
    let id = StepId::Core(CoreStep::Packages);
    let i = ctx.inputs(
        parent,
        id.phase_name(),
        id.hook_name(),
        Vec::new(),
        key_env,
        extra,
    );
    Some(step(id, i, Action::Packages(packages.to_vec())))
}

/// strata's end-of-build clean-up step.
pub fn finalise_base_step(ctx: &KeyContext, parent: Option<&str>) -> Step {
    let id = StepId::Core(CoreStep::FinaliseBase);
    let i = ctx.inputs(
        parent,
        id.phase_name(),
        id.hook_name(),
        Vec::new(),
        &BTreeMap::new(),
        BTreeMap::new(),
    );
    step(id, i, Action::FinaliseBase)
}

/// A step as `strata plan --json` and the build manifest show it.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub phase: String,
    pub hook: String,
    pub key: String,
    pub cached: bool,
    /// Which cache level holds it (when cached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<String>,
}

impl StepView {
    /// `from`: the cache level that holds the step, or None for a step that would run.
    pub fn of(step: &Step, from: Option<&str>) -> StepView {
        let elements = match &step.action {
            Action::Hooks { hooks, .. } => hooks.iter().map(|h| h.element.clone()).collect(),
            _ => Vec::new(),
        };
        StepView {
            phase: step.id.phase_name().to_string(),
            hook: step.id.hook_name().to_string(),
            key: step.key.clone(),
            cached: from.is_some(),
            from: from.map(str::to_string),
            elements,
        }
    }
}

/// The disk step as keyed: its key and inputs, and the hooks of its phases.
#[derive(Debug, Clone)]
pub struct DiskStep {
    pub key: String,
    pub inputs: DiskKeyInputs,
    /// The hooks of each phase of the step (block-device.d .. cleanup.d), in order.
    pub hooks: Vec<(Phase, Vec<PlannedHook>)>,
}

/// The phases the disk step runs, in order.
pub const DISK_PHASES: [Phase; 4] = [
    Phase::BlockDevice,
    Phase::PreFinalise,
    Phase::Finalise,
    Phase::Cleanup,
];

/// Keys the disk step: one link per disk phase (its hooks and environment, as
/// [`phase_steps`] keys them at phase granularity) chained from `parent` (the last rootfs
/// step), then the output types, the disk options and the block-device config.
/// `key_env(phase)` gives each phase's environment as it enters keys.
#[allow(clippy::too_many_arguments)]
pub fn disk_step(
    ctx: &KeyContext,
    hooks_dir: &Path,
    key_env: &dyn Fn(Phase) -> anyhow::Result<BTreeMap<String, String>>,
    origin: &dyn Fn(&Path) -> Option<String>,
    parent: Option<&str>,
    types: Vec<String>,
    options: BTreeMap<String, String>,
    block_device_config: &str,
) -> anyhow::Result<DiskStep> {
    let ctx = KeyContext {
        granularity: Granularity::Phase,
        ..ctx.clone()
    };
    let mut chained = parent.unwrap_or_default().to_string();
    let mut hooks = Vec::new();
    for phase in DISK_PHASES {
        let env = key_env(phase)?;
        for step in phase_steps(&ctx, phase, hooks_dir, &env, origin, Some(&chained))? {
            chained = step.key.clone();
            if let Action::Hooks { hooks: h, .. } = step.action {
                hooks.push((phase, h));
            }
        }
    }
    let inputs = DiskKeyInputs {
        version: CACHE_FORMAT_VERSION,
        parent: chained,
        types,
        options,
        block_device_config: block_device_config.to_string(),
    };
    Ok(DiskStep {
        key: inputs.key(),
        inputs,
        hooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dib_break_points_parse_and_bad_ones_name_the_choices() {
        assert_eq!(
            BreakPoint::parse_list("before-install, after-pre-install,after-error").unwrap(),
            [
                BreakPoint::Before(Phase::Install),
                BreakPoint::After(Phase::PreInstall),
                BreakPoint::AfterError
            ]
        );
        assert!(BreakPoint::parse_list("").unwrap().is_empty());
        let e = BreakPoint::parse_list("during-install").unwrap_err();
        assert!(
            e.contains("during-install") && e.contains("after-error"),
            "{e}"
        );
        assert!(BreakPoint::parse_list("before-nope").is_err());
    }

    #[test]
    fn step_ids_print_and_parse_as_recorded() {
        for (phase, hook) in [
            ("install.d", "50-foo"),
            ("install.d", "*"),
            ("core", "packages"),
            ("core", "finalise-base"),
            ("output", "disk"),
        ] {
            let id = StepId::parse(phase, hook).unwrap();
            assert_eq!(id.to_string(), format!("{phase}/{hook}"));
        }
        assert_eq!(StepId::parse("nope.d", "x"), None);
    }

    #[test]
    fn rebuild_from_parses_phase_and_hook_and_matches_steps() {
        let r = RebuildFrom::parse("install.d/50-foo").unwrap();
        assert_eq!(r.phase, Phase::Install);
        assert_eq!(r.hook.as_deref(), Some("50-foo"));
        assert_eq!(RebuildFrom::parse("cleanup").unwrap().hook, None);
        let e = RebuildFrom::parse("nope.d/x").unwrap_err();
        assert!(e.contains("'nope.d'") && e.contains("install.d"), "{e}");
        let t = tree();
        let steps = phase_steps(
            &ctx(Granularity::Hook),
            Phase::Install,
            t.path(),
            &BTreeMap::new(),
            &|_| None,
            None,
        )
        .unwrap();
        let r = RebuildFrom::parse("install.d/20-b").unwrap();
        let hits: Vec<_> = steps.iter().filter(|s| s.matches(&r)).collect();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].label(), "install.d/20-b");
        let all = RebuildFrom::parse("install").unwrap();
        assert!(steps.iter().all(|s| s.matches(&all)));
    }

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
        assert_eq!(steps[0].id.hook_name(), "*");
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
