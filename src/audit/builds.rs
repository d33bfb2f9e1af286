//! Comparing two builds step by step: where their inputs first differ (and which inputs), which
//! steps had the same inputs but gave different layers (non-determinism) and which files
//! differ in those, and whether their outputs match. What `strata diff` prints.
//!
//! ```text
//! Build A, Build B (from NAME.strata.json, or a build id in a cache's history)
//!   elements: added / removed / content digest changed
//!   steps, in order: same key?  no ─► the first such step: key::diff_inputs of their inputs
//!                               yes, same diff id ─► same
//!                               yes, other diff id ─► LayerSource opens both layers (local
//!                                 caches, registries) ─► layers::diff_layers ─► FileDiffs
//!                                 (a layer in no cache: reported at the step level only)
//!   outputs: blake3 per type
//! ──► BuildDiff (text and JSON, schema version DIFF_SCHEMA) ──► same | different
//! ```

use super::AuditError;
use super::layers::{LayerDiff, diff_layers_all};
use crate::key::{self, DiskKeyInputs, InputChange};
use crate::manifest::{Manifest, ManifestElement, ManifestStep, StepInputs};
use crate::outputs::Written;
use serde::Serialize;
use std::fmt;
use std::io::Read;

/// The schema version of `strata diff --json`.
pub const DIFF_SCHEMA: u32 = 1;

/// One side of a comparison.
#[derive(Debug, Clone)]
pub struct Build {
    /// Where it came from (a manifest path, `build 12 in ./cache`).
    pub label: String,
    pub elements: Vec<ManifestElement>,
    pub steps: Vec<ManifestStep>,
    pub outputs: Vec<Written>,
    pub source_date_epoch: Option<i64>,
}

impl Build {
    pub fn from_manifest(label: String, m: Manifest) -> Build {
        Build {
            label,
            elements: m.elements,
            steps: m.steps,
            outputs: m.outputs,
            source_date_epoch: m.source_date_epoch,
        }
    }
}

/// Where the layers of the builds can be read.
pub trait LayerSource: Sync {
    /// The uncompressed tar of the layer `diff_id` of step `key`, if some cache holds it.
    fn open(&self, key: &str, diff_id: &str) -> Option<Box<dyn Read + Send>>;
}

/// How one step compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Same key, same layer.
    Same,
    /// Another key: its inputs (or an earlier step's) differ.
    InputsDiffer,
    /// Same key, another layer: the step is not deterministic.
    ContentDiffers,
    OnlyInA,
    OnlyInB,
}

/// One step of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct StepDiff {
    pub index: usize,
    pub step: String,
    pub status: StepStatus,
    pub key_a: Option<String>,
    pub key_b: Option<String>,
    pub diff_id_a: Option<String>,
    pub diff_id_b: Option<String>,
    /// The file-level differences of a `content-differs` step, when both layers were found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<LayerDiff>,
    /// Why there are no file-level differences for a `content-differs` step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The first step whose key differs, and why.
#[derive(Debug, Clone, Serialize)]
pub struct KeyDifference {
    pub index: usize,
    pub step: String,
    /// The inputs that differ (empty when the manifests did not record them).
    pub inputs: Vec<InputChange>,
}

/// One element that differs.
#[derive(Debug, Clone, Serialize)]
pub struct ElementDiff {
    pub name: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// One output type that differs (or is only on one side).
#[derive(Debug, Clone, Serialize)]
pub struct OutputDiff {
    pub r#type: String,
    pub a: Option<String>,
    pub b: Option<String>,
    pub same: bool,
}

/// A whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct BuildDiff {
    pub schema: u32,
    pub a: String,
    pub b: String,
    /// True when every step has the same key and layer and every output the same digest.
    pub same: bool,
    pub elements: Vec<ElementDiff>,
    pub first_key_difference: Option<KeyDifference>,
    pub steps: Vec<StepDiff>,
    pub outputs: Vec<OutputDiff>,
    /// Steps with the same key in both, and how many of those gave the same layer.
    pub same_key_steps: usize,
    pub identical_steps: usize,
}

fn disk_changes(a: &DiskKeyInputs, b: &DiskKeyInputs) -> Vec<InputChange> {
    let mut out = Vec::new();
    let mut push = |input: &str, name: Option<&str>, x: Option<String>, y: Option<String>| {
        out.push(InputChange {
            input: input.into(),
            name: name.map(str::to_string),
            before: x,
            after: y,
        })
    };
    if a.parent != b.parent {
        push(
            "parent",
            None,
            Some(a.parent.clone()),
            Some(b.parent.clone()),
        );
    }
    if a.types != b.types {
        push(
            "types",
            None,
            Some(a.types.join(",")),
            Some(b.types.join(",")),
        );
    }
    for (k, v) in &a.options {
        if b.options.get(k) != Some(v) {
            push(
                "disk-option",
                Some(k),
                Some(v.clone()),
                b.options.get(k).cloned(),
            );
        }
    }
    for (k, v) in &b.options {
        if !a.options.contains_key(k) {
            push("disk-option", Some(k), None, Some(v.clone()));
        }
    }
    if a.block_device_config != b.block_device_config {
        push(
            "block-device-config",
            None,
            Some(a.block_device_config.clone()),
            Some(b.block_device_config.clone()),
        );
    }
    out
}

fn input_changes(a: &ManifestStep, b: &ManifestStep) -> Vec<InputChange> {
    match (&a.inputs, &b.inputs) {
        (Some(StepInputs::Step(x)), Some(StepInputs::Step(y))) => key::diff_inputs(x, y),
        (Some(StepInputs::Disk(x)), Some(StepInputs::Disk(y))) => disk_changes(x, y),
        _ => Vec::new(),
    }
}

/// Compares `a` with `b`. Layers of non-deterministic steps are compared file by file when
/// `layers` finds both (two at a time, on two threads).
pub fn compare(
    a: &Build,
    b: &Build,
    layers: &dyn LayerSource,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<BuildDiff, AuditError> {
    // Elements.
    let mut elements = Vec::new();
    for e in &a.elements {
        let other = b.elements.iter().find(|x| x.name == e.name);
        if other.map(|x| &x.digest) != Some(&e.digest) {
            elements.push(ElementDiff {
                name: e.name.clone(),
                a: Some(e.digest.clone()),
                b: other.map(|x| x.digest.clone()),
            });
        }
    }
    for e in &b.elements {
        if !a.elements.iter().any(|x| x.name == e.name) {
            elements.push(ElementDiff {
                name: e.name.clone(),
                a: None,
                b: Some(e.digest.clone()),
            });
        }
    }

    // Steps, in order.
    let mut steps = Vec::new();
    let mut first = None;
    let (mut same_key, mut identical) = (0, 0);
    for i in 0..a.steps.len().max(b.steps.len()) {
        let (x, y) = (a.steps.get(i), b.steps.get(i));
        let label = x.or(y).map(ManifestStep::label).unwrap_or_default();
        let status = match (x, y) {
            (Some(_), None) => StepStatus::OnlyInA,
            (None, Some(_)) => StepStatus::OnlyInB,
            (Some(x), Some(y)) if x.key != y.key => StepStatus::InputsDiffer,
            (Some(x), Some(y)) if x.diff_id != y.diff_id => StepStatus::ContentDiffers,
            _ => StepStatus::Same,
        };
        if let (Some(x), Some(y)) = (x, y)
            && x.key == y.key
        {
            same_key += 1;
            identical += usize::from(x.diff_id == y.diff_id);
        }
        if first.is_none()
            && let (Some(x), Some(y)) = (x, y)
            && x.key != y.key
        {
            first = Some(KeyDifference {
                index: i,
                step: if x.label() == y.label() {
                    label.clone()
                } else {
                    format!("{} / {}", x.label(), y.label())
                },
                inputs: input_changes(x, y),
            });
        }
        steps.push(StepDiff {
            index: i,
            step: label,
            status,
            key_a: x.map(|s| s.key.clone()),
            key_b: y.map(|s| s.key.clone()),
            diff_id_a: x.and_then(|s| s.diff_id.clone()),
            diff_id_b: y.and_then(|s| s.diff_id.clone()),
            files: None,
            note: None,
        });
    }

    // File-level differences of the non-deterministic steps, two at a time.
    let todo: Vec<usize> = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.status == StepStatus::ContentDiffers)
        .map(|(i, _)| i)
        .collect();
    let results: Vec<(usize, Result<Option<LayerDiff>, AuditError>)> =
        std::thread::scope(|scope| {
            let chunks: Vec<Vec<usize>> = (0..2)
                .map(|w| todo.iter().copied().skip(w).step_by(2).collect())
                .collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let steps = &steps;
                    scope.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|i| (i, layer_files(&steps[i], layers, cancelled)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
    for (i, r) in results {
        match r? {
            Some(files) => steps[i].files = Some(files),
            None => {
                steps[i].note = Some("the layers are in no cache given: step level only".into());
            }
        }
    }

    // Outputs.
    let mut outputs = Vec::new();
    for o in &a.outputs {
        let other = b.outputs.iter().find(|x| x.r#type == o.r#type);
        outputs.push(OutputDiff {
            r#type: o.r#type.to_string(),
            a: Some(o.blake3.clone()),
            b: other.map(|x| x.blake3.clone()),
            same: other.is_some_and(|x| x.blake3 == o.blake3),
        });
    }
    for o in &b.outputs {
        if !a.outputs.iter().any(|x| x.r#type == o.r#type) {
            outputs.push(OutputDiff {
                r#type: o.r#type.to_string(),
                a: None,
                b: Some(o.blake3.clone()),
                same: false,
            });
        }
    }

    let same = elements.is_empty()
        && steps.iter().all(|s| s.status == StepStatus::Same)
        && outputs.iter().all(|o| o.same);
    Ok(BuildDiff {
        schema: DIFF_SCHEMA,
        a: a.label.clone(),
        b: b.label.clone(),
        same,
        elements,
        first_key_difference: first,
        steps,
        outputs,
        same_key_steps: same_key,
        identical_steps: identical,
    })
}

fn layer_files(
    step: &StepDiff,
    layers: &dyn LayerSource,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Option<LayerDiff>, AuditError> {
    let key = step.key_a.as_deref().unwrap_or_default();
    let open = |d: &Option<String>| -> Option<Box<dyn Read + Send>> {
        match d {
            Some(d) => layers.open(key, d),
            // No layer: the step changed nothing; compare against an empty tar.
            None => Some(Box::new(std::io::Cursor::new(vec![0u8; 1024]))),
        }
    };
    let (Some(x), Some(y)) = (open(&step.diff_id_a), open(&step.diff_id_b)) else {
        return Ok(None);
    };
    diff_layers_all(x, y, cancelled).map(Some)
}

/// The text form: what a user reads first (the first input difference), then the
/// non-deterministic steps with their files, then the outputs.
impl fmt::Display for BuildDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "A: {}\nB: {}", self.a, self.b)?;
        for e in &self.elements {
            let show = |d: &Option<String>| {
                d.as_deref()
                    .map(|d| d[..d.len().min(16)].to_string())
                    .unwrap_or_else(|| "(absent)".into())
            };
            writeln!(f, "element {}: {} → {}", e.name, show(&e.a), show(&e.b))?;
        }
        match &self.first_key_difference {
            None => {}
            Some(k) => {
                writeln!(
                    f,
                    "inputs first differ at step {} ({}):",
                    k.index + 1,
                    k.step
                )?;
                if k.inputs.is_empty() {
                    writeln!(f, "    (the manifests did not record the inputs)")?;
                }
                for c in &k.inputs {
                    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
                    let name = c
                        .name
                        .as_deref()
                        .map(|n| format!(" {n}"))
                        .unwrap_or_default();
                    if c.input == "parent" {
                        writeln!(f, "    parent key (an earlier step differs)")?;
                    } else {
                        writeln!(
                            f,
                            "    {}{name}: {} → {}",
                            c.input,
                            show(&c.before),
                            show(&c.after)
                        )?;
                    }
                }
            }
        }
        for s in self
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::ContentDiffers)
        {
            writeln!(
                f,
                "step {} ({}): same inputs, different layer (not deterministic)",
                s.index + 1,
                s.step
            )?;
            match (&s.files, &s.note) {
                (Some(files), _) => {
                    for d in &files.files {
                        for line in d.to_string().lines() {
                            writeln!(f, "    {line}")?;
                        }
                    }
                }
                (None, Some(note)) => writeln!(f, "    ({note})")?,
                _ => {}
            }
        }
        for s in &self.steps {
            match s.status {
                StepStatus::OnlyInA => writeln!(f, "step {} ({}) only in A", s.index + 1, s.step)?,
                StepStatus::OnlyInB => writeln!(f, "step {} ({}) only in B", s.index + 1, s.step)?,
                _ => {}
            }
        }
        for o in &self.outputs {
            if !o.same {
                let show = |d: &Option<String>| {
                    d.as_deref()
                        .map(|d| d[..d.len().min(16)].to_string())
                        .unwrap_or_else(|| "(absent)".into())
                };
                writeln!(f, "output {}: {} → {}", o.r#type, show(&o.a), show(&o.b))?;
            }
        }
        write!(
            f,
            "{}: {} of {} steps with the same inputs gave the same layer",
            if self.same { "same" } else { "different" },
            self.identical_steps,
            self.same_key_steps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::OutputType;

    fn step(label: &str, key: &str, diff: Option<&str>) -> ManifestStep {
        let (phase, hook) = label.split_once('/').unwrap();
        ManifestStep {
            phase: phase.into(),
            hook: hook.into(),
            key: key.into(),
            diff_id: diff.map(str::to_string),
            cached: false,
            seconds: 0.0,
            inputs: None,
        }
    }

    fn build(steps: Vec<ManifestStep>, out: &str) -> Build {
        Build {
            label: "x".into(),
            elements: vec![ManifestElement {
                name: "e".into(),
                digest: "d".into(),
            }],
            steps,
            outputs: vec![Written {
                r#type: OutputType::Tar,
                path: "x.tar".into(),
                blake3: out.into(),
                cached: false,
            }],
            source_date_epoch: None,
        }
    }

    struct NoLayers;
    impl LayerSource for NoLayers {
        fn open(&self, _: &str, _: &str) -> Option<Box<dyn Read + Send>> {
            None
        }
    }

    #[test]
    fn same_builds_are_same_and_a_changed_layer_is_named_step_level_without_caches() {
        let a = build(
            vec![
                step("root.d/a", "k1", Some("d1")),
                step("install.d/b", "k2", Some("d2")),
            ],
            "o",
        );
        let d = compare(&a, &a.clone(), &NoLayers, &|| false).unwrap();
        assert!(d.same);
        assert_eq!((d.identical_steps, d.same_key_steps), (2, 2));
        let b = build(
            vec![
                step("root.d/a", "k1", Some("d1")),
                step("install.d/b", "k2", Some("dX")),
            ],
            "o2",
        );
        let d = compare(&a, &b, &NoLayers, &|| false).unwrap();
        assert!(!d.same);
        assert_eq!(d.steps[1].status, StepStatus::ContentDiffers);
        assert!(d.steps[1].note.as_deref().unwrap().contains("no cache"));
        assert!(d.first_key_difference.is_none());
        assert!(!d.outputs[0].same);
        let text = d.to_string();
        assert!(
            text.contains("step 2 (install.d/b): same inputs, different layer"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["steps"][1]["status"], "content-differs");
    }

    #[test]
    fn the_first_key_difference_is_reported_once() {
        let a = build(
            vec![
                step("root.d/a", "k1", Some("d1")),
                step("install.d/b", "k2", Some("d2")),
            ],
            "o",
        );
        let b = build(
            vec![
                step("root.d/a", "j1", Some("d1")),
                step("install.d/b", "j2", Some("d2")),
            ],
            "o",
        );
        let d = compare(&a, &b, &NoLayers, &|| false).unwrap();
        assert_eq!(d.first_key_difference.as_ref().unwrap().index, 0);
        assert!(d.steps.iter().all(|s| s.status == StepStatus::InputsDiffer));
        assert_eq!(d.same_key_steps, 0);
    }
}
