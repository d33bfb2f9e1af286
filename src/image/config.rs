//! dib's block-device config: YAML tree or graph form → graph form → typed, validated nodes in
//! call order.
//!
//! `parse_config` follows `config.py` (`config_tree_to_graph`, `create_graph`) and the plugin
//! constructors (`partitioning`, `partition`, `mkfs`, `mount`, `fstab`, `local_loop`), keeping
//! dib's error wording. The call order is a topological sort that breaks ties by config order,
//! so it is the same on every run (dib's networkx order is not unique).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use yaml_serde::{Mapping, Value};

use super::size::parse_abs_size_spec;
use super::{ImageError, Params};

/// The plugin names dib registers.
const PLUGINS: &[&str] = &[
    "local_loop",
    "partitioning",
    "lvm",
    "mkfs",
    "mount",
    "fstab",
];

/// dib's label length limits (`mkfs.py`).
const MAX_LABEL: &[(&str, usize)] = &[
    ("ext2", 16),
    ("ext3", 16),
    ("ext4", 16),
    ("xfs", 12),
    ("vfat", 11),
    ("swap", 16),
];

/// dib's built-in fallback when no element supplies a config: one loop file, no partition
/// table, the root file system straight on the loop device.
pub fn default_config() -> &'static str {
    "- local_loop:\n    name: image0\n    mkfs:\n      name: mkfs_root\n      mount:\n        \
     mount_point: /\n        fstab:\n          options: \"defaults\"\n          fsck-passno: 1\n"
}

/// One graph-form entry: `{plugin: {name, base, ...}}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub plugin: String,
    pub values: Mapping,
}

/// A parsed, validated block-device config in dib's graph form.
#[derive(Debug, Clone)]
pub struct BlockDeviceConfig {
    entries: Vec<Entry>,
}

/// Parses a block-device config (tree or graph form) and validates it as far as possible
/// before the root parameters are merged (the `mkfs_root` node may still lack its type).
pub fn parse_config(yaml: &str) -> Result<BlockDeviceConfig, ImageError> {
    let value: Value = yaml_serde::from_str(yaml)
        .map_err(|e| ImageError::Config(format!("not valid YAML: {e}")))?;
    let entries = tree_to_graph(&value)?;
    let config = BlockDeviceConfig { entries };
    config.graph(false)?;
    Ok(config)
}

fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"))
}

fn is_plugin(key: &str) -> bool {
    PLUGINS.contains(&key)
}

/// `config_tree_to_graph`: every nested plugin becomes its own entry.
fn tree_to_graph(config: &Value) -> Result<Vec<Entry>, ImageError> {
    let list = match config {
        Value::Sequence(list) => list,
        other => {
            return Err(ImageError::Config(format!(
                "the config must be a list of entries, got {}",
                show(other)
            )));
        }
    };
    let mut out = Vec::new();
    for entry in list {
        let map = match entry {
            Value::Mapping(m) => m,
            other => {
                return Err(ImageError::Config(format!(
                    "Config entry not a dict: {}",
                    show(other)
                )));
            }
        };
        if map.len() != 1 {
            return Err(ImageError::Config(format!(
                "Config entry top-level should be a single dict: {}",
                show(entry)
            )));
        }
        let (key, values) = map.iter().next().expect("len is 1");
        match key.as_str() {
            Some(k) if is_plugin(k) => recurse(k, values, None, &mut out)?,
            _ => {
                return Err(ImageError::Config(format!(
                    "Config entry is not a plugin value: {}",
                    show(entry)
                )));
            }
        }
    }
    Ok(out)
}

/// `recurse_config`: children are emitted before their parent, as dib does.
fn recurse(
    plugin: &str,
    values: &Value,
    parent_base: Option<&str>,
    out: &mut Vec<Entry>,
) -> Result<(), ImageError> {
    let values = values.as_mapping().ok_or_else(|| {
        ImageError::Config(format!(
            "Config entry {plugin} must hold a dict of settings, got {}",
            show(values)
        ))
    })?;
    let mut this = Mapping::new();
    let base = match values.get("base") {
        Some(b) => Some(b.clone()),
        None => parent_base.map(|p| Value::String(p.to_string())),
    };
    if let Some(b) = &base {
        this.insert("base".into(), b.clone());
    }
    let name = match values.get("name") {
        Some(n) => n.clone(),
        None => match base.as_ref().and_then(scalar) {
            Some(b) => Value::String(format!("{plugin}_{b}")),
            None => {
                return Err(ImageError::Config(format!(
                    "Config entry {plugin} needs a 'name' or a 'base': {}",
                    show(&Value::Mapping(values.clone()))
                )));
            }
        },
    };
    this.insert("name".into(), name.clone());
    let name = scalar(&name).unwrap_or_default();
    for (k, v) in values {
        let key = k.as_str().unwrap_or_default();
        if key == "partitions" {
            let parts = v.as_sequence().ok_or_else(|| {
                ImageError::Config(format!("partitions of {name} must be a list"))
            })?;
            let mut new_parts = Vec::new();
            for part in parts {
                let pmap = part.as_mapping().ok_or_else(|| {
                    ImageError::Config(format!(
                        "a partition of {name} is not a dict: {}",
                        show(part)
                    ))
                })?;
                let pname = pmap.get("name").and_then(scalar).ok_or_else(|| {
                    ImageError::Config(format!(
                        "a partition of {name} has no 'name': {}",
                        show(part)
                    ))
                })?;
                let mut new_part = Mapping::new();
                for (pk, pv) in pmap {
                    match pk.as_str() {
                        Some(pk) if is_plugin(pk) => recurse(pk, pv, Some(&pname), out)?,
                        _ => {
                            new_part.insert(pk.clone(), pv.clone());
                        }
                    }
                }
                if let Some(b) = &base {
                    new_part.insert("base".into(), b.clone());
                }
                new_parts.push(Value::Mapping(new_part));
            }
            this.insert("partitions".into(), Value::Sequence(new_parts));
        } else if is_plugin(key) {
            recurse(key, v, Some(&name), out)?;
        } else {
            this.insert(k.clone(), v.clone());
        }
    }
    out.push(Entry {
        plugin: plugin.to_string(),
        values: this,
    });
    Ok(())
}

/// A YAML scalar as a string (`1` → "1", `true` → "true").
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn get(m: &Mapping, key: &str) -> Option<String> {
    m.get(key).and_then(scalar)
}

/// A partition table label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableLabel {
    Mbr,
    Gpt,
}

/// One `partitioning` entry.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub base: String,
    pub label: TableLabel,
    pub align: u64,
    pub partitions: Vec<PartSpec>,
}

#[derive(Debug, Clone)]
pub(crate) struct PartSpec {
    pub name: String,
    pub size: String,
    pub boot: bool,
    pub primary: bool,
    /// MBR: the type byte (from hex); GPT: an sgdisk code (`8300`) or a GUID.
    pub mbr_type: u8,
    pub gpt_type: String,
}

#[derive(Debug, Clone)]
pub(crate) struct FsSpec {
    pub fs_type: String,
    pub label: String,
    pub opts: Vec<String>,
    pub uuid: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Loop {
        size: Option<u64>,
        directory: Option<PathBuf>,
        block_size: u64,
    },
    /// A partition of `tables[table]`.
    Partition {
        table: usize,
    },
    Mkfs(FsSpec),
    Mount {
        mount_point: String,
    },
    Fstab {
        options: String,
        dump_freq: String,
        passno: String,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub name: String,
    pub base: Option<String>,
    pub kind: Kind,
}

/// The typed config in call order.
#[derive(Debug, Clone)]
pub(crate) struct Graph {
    pub nodes: Vec<Node>,
    pub tables: Vec<Table>,
}

#[cfg(test)]
impl Graph {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

impl BlockDeviceConfig {
    /// The graph-form entries, in dib's order.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// dib's `_merge_rootfs_params`: fills `type`, `opts` and `label` of the mkfs node literally
    /// named `mkfs_root` from the params, when the config leaves them out.
    pub fn merge_rootfs_params(&mut self, params: &Params) {
        for entry in &mut self.entries {
            if entry.plugin != "mkfs" || get(&entry.values, "name").as_deref() != Some("mkfs_root")
            {
                continue;
            }
            let v = &mut entry.values;
            if !v.contains_key("type") {
                v.insert("type".into(), params.root_fs_type.clone().into());
            }
            if !v.contains_key("opts")
                && let Some(opts) = &params.root_fs_opts
            {
                v.insert("opts".into(), opts.clone().into());
            }
            if !v.contains_key("label") {
                let label = match &params.root_label {
                    Some(l) => l.clone(),
                    None if get(v, "type").as_deref() == Some("xfs") => "img-rootfs".into(),
                    None => "cloudimg-rootfs".into(),
                };
                v.insert("label".into(), label.into());
            }
        }
    }

    fn mount_entry(&self, mount_point: &str) -> Option<&Mapping> {
        self.entries
            .iter()
            .find(|e| {
                e.plugin == "mount" && get(&e.values, "mount_point").as_deref() == Some(mount_point)
            })
            .map(|e| &e.values)
    }

    fn mkfs_entry(&self, name: &str) -> Option<&Mapping> {
        self.entries
            .iter()
            .find(|e| e.plugin == "mkfs" && get(&e.values, "name").as_deref() == Some(name))
            .map(|e| &e.values)
    }

    fn fs_under(&self, mount_point: &str) -> Option<&Mapping> {
        let mount = self.mount_entry(mount_point)?;
        self.mkfs_entry(&get(mount, "base")?)
    }

    /// dib's `getval root-label`: the label of the file system mounted at `/`.
    pub fn root_label(&self) -> Option<String> {
        self.fs_under("/").and_then(|fs| get(fs, "label"))
    }

    /// dib's `getval root-fstype`: the type of the file system mounted at `/`.
    pub fn root_fstype(&self) -> Option<String> {
        self.fs_under("/").and_then(|fs| get(fs, "type"))
    }

    /// dib's `getval boot-label`: the label (or node name) of the file system at `/boot`, or "".
    pub fn boot_label(&self) -> String {
        self.fs_under("/boot")
            .and_then(|fs| get(fs, "label").or_else(|| get(fs, "name")))
            .unwrap_or_default()
    }

    /// dib's `getval mount-points` (joined with `|` for `DIB_MOUNTPOINTS`), in config order.
    pub fn mount_points(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.plugin == "mount")
            .filter_map(|e| get(&e.values, "mount_point"))
            .collect()
    }

    /// Validates fully (every mkfs has a type) and returns the nodes in call order.
    pub(crate) fn graph(&self, strict: bool) -> Result<Graph, ImageError> {
        build_graph(&self.entries, strict)
    }
}

fn need(m: &Mapping, key: &str, msg: impl FnOnce() -> String) -> Result<String, ImageError> {
    get(m, key).ok_or_else(|| ImageError::Config(msg()))
}

/// `create_graph` plus the plugin constructors' checks.
fn build_graph(entries: &[Entry], strict: bool) -> Result<Graph, ImageError> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut tables: Vec<Table> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut mounts: Vec<(String, String)> = Vec::new();
    // Extra edges (from → to) that are not `base` (previous partition, previous mount point).
    let mut prev_partition: HashMap<String, String> = HashMap::new();

    for entry in entries {
        let v = &entry.values;
        let name = get(v, "name").unwrap_or_default();
        let base = get(v, "base");
        match entry.plugin.as_str() {
            "local_loop" => {
                let size = get(v, "size")
                    .map(|s| parse_abs_size_spec(&s))
                    .transpose()?;
                let block_size = match get(v, "block_size") {
                    Some(b) => parse_abs_size_spec(&b)?,
                    None => 512,
                };
                if block_size != 512 && block_size != 4096 {
                    return Err(ImageError::Config(format!(
                        "local_loop {name}: block_size {block_size} is not supported (use 512 or 4096)"
                    )));
                }
                nodes.push(Node {
                    name,
                    base: None,
                    kind: Kind::Loop {
                        size,
                        directory: get(v, "directory").map(PathBuf::from),
                        block_size,
                    },
                });
            }
            "partitioning" => {
                let base = base
                    .ok_or_else(|| ImageError::Config("Partitioning config needs 'base'".into()))?;
                let parts = v
                    .get("partitions")
                    .and_then(Value::as_sequence)
                    .ok_or_else(|| {
                        ImageError::Config("Partitioning config needs 'partitions'".into())
                    })?;
                let label = match need(v, "label", || "Partitioning config needs 'label'".into())?
                    .as_str()
                {
                    "mbr" => TableLabel::Mbr,
                    "gpt" => TableLabel::Gpt,
                    _ => return Err(ImageError::Config("Label must be 'mbr' or 'gpt'".into())),
                };
                let align = match get(v, "align") {
                    Some(a) => parse_abs_size_spec(&a)?,
                    None => 1 << 20,
                };
                if align == 0 || align % 512 != 0 {
                    return Err(ImageError::Config(format!(
                        "partitioning {name}: align {align} must be a multiple of 512 bytes"
                    )));
                }
                let table = tables.len();
                let mut specs = Vec::new();
                let mut prev: Option<String> = None;
                for p in parts {
                    let p = p.as_mapping().ok_or_else(|| {
                        ImageError::Config(format!("a partition of {name} is not a dict"))
                    })?;
                    let pname = need(p, "name", || format!("a partition of {name} has no 'name'"))?;
                    let spec = partition_spec(&pname, p, label)?;
                    specs.push(spec);
                    if let Some(prev) = prev.replace(pname.clone()) {
                        prev_partition.insert(pname.clone(), prev);
                    }
                    nodes.push(Node {
                        name: pname,
                        base: Some(base.clone()),
                        kind: Kind::Partition { table },
                    });
                }
                tables.push(Table {
                    base,
                    label,
                    align,
                    partitions: specs,
                });
            }
            "lvm" => {
                return Err(ImageError::Config(format!(
                    "lvm ({name}) is not supported: strata builds images without device-mapper; \
                     use partitions instead"
                )));
            }
            "mkfs" => {
                let base = need(v, "base", || "Mkfs config needs [base]".into())?;
                let fs_type = match get(v, "type") {
                    Some(t) => t,
                    None if !strict && name == "mkfs_root" => String::new(),
                    None => return Err(ImageError::Config("Mkfs config needs [type]".into())),
                };
                let mut label = get(v, "label").unwrap_or_else(|| name.clone());
                if fs_type == "vfat" || fs_type == "fat" {
                    label = label.to_uppercase();
                }
                if labels.contains(&label) {
                    return Err(ImageError::Config(format!(
                        "File system label [{label}] used more than once"
                    )));
                }
                labels.push(label.clone());
                if let Some((_, max)) = MAX_LABEL.iter().find(|(t, _)| *t == fs_type)
                    && label.chars().count() > *max
                {
                    return Err(ImageError::Config(format!(
                        "Label [{label}] too long for filesystem [{fs_type}]: {} > {max}",
                        label.chars().count()
                    )));
                }
                let opts = get(v, "opts")
                    .map(|o| o.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default();
                nodes.push(Node {
                    name,
                    base: Some(base),
                    kind: Kind::Mkfs(FsSpec {
                        fs_type,
                        label,
                        opts,
                        uuid: get(v, "uuid"),
                    }),
                });
            }
            "mount" => {
                let base = need(v, "base", || "MountPoint config needs [base]".into())?;
                let mp = need(v, "mount_point", || {
                    "MountPoint config needs [mount_point]".into()
                })?;
                if mounts.iter().any(|(m, _)| *m == mp) {
                    return Err(ImageError::Config(format!(
                        "Mount point [{mp}] specified more than once"
                    )));
                }
                if (!mp.starts_with('/') && mp != "none") || mp.split('/').any(|c| c == "..") {
                    return Err(ImageError::Config(format!(
                        "mount {name}: mount point [{mp}] must be an absolute path without '..' (or none for swap)"
                    )));
                }
                mounts.push((mp.clone(), name.clone()));
                nodes.push(Node {
                    name,
                    base: Some(base),
                    kind: Kind::Mount { mount_point: mp },
                });
            }
            "fstab" => {
                let base = need(v, "base", || "Fstab config needs [base]".into())?;
                nodes.push(Node {
                    name,
                    base: Some(base),
                    kind: Kind::Fstab {
                        options: get(v, "options").unwrap_or_else(|| "defaults".into()),
                        dump_freq: get(v, "dump-freq").unwrap_or_else(|| "0".into()),
                        passno: get(v, "fsck-passno").unwrap_or_else(|| "2".into()),
                    },
                });
            }
            other => {
                return Err(ImageError::Config(format!(
                    "Config element [{other}] is not implemented"
                )));
            }
        }
    }

    // Node names must be unique.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if index.insert(n.name.as_str(), i).is_some() {
            return Err(ImageError::Config(format!(
                "Duplicate node name: {}",
                n.name
            )));
        }
    }

    // Edges, as each dib node's get_edges() reports them.
    mounts.sort();
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let mut from: Vec<String> = Vec::new();
        match &n.kind {
            Kind::Loop { .. } => {}
            Kind::Partition { .. } => {
                from.extend(n.base.clone());
                from.extend(prev_partition.get(&n.name).cloned());
            }
            Kind::Mount { mount_point } => {
                let pos = mounts.iter().position(|(m, _)| m == mount_point);
                if let Some(pos) = pos.filter(|p| *p > 0) {
                    from.push(mounts[pos - 1].1.clone());
                }
                from.extend(n.base.clone());
            }
            Kind::Mkfs(_) | Kind::Fstab { .. } => from.extend(n.base.clone()),
        }
        for f in from {
            let j = *index
                .get(f.as_str())
                .ok_or_else(|| ImageError::Config(format!("Edge not defined: {f}->{}", n.name)))?;
            preds[i].push(j);
        }
    }

    // What each node may stand on.
    for n in &nodes {
        let base_kind = n
            .base
            .as_deref()
            .and_then(|b| index.get(b))
            .map(|&j| &nodes[j].kind);
        let ok = matches!(
            (&n.kind, base_kind),
            (
                Kind::Mkfs(_),
                Some(Kind::Loop { .. } | Kind::Partition { .. })
            ) | (Kind::Mount { .. }, Some(Kind::Mkfs(_)))
                | (Kind::Fstab { .. }, Some(Kind::Mount { .. }))
                | (Kind::Partition { .. }, Some(Kind::Loop { .. }))
                | (Kind::Loop { .. }, _)
        );
        if !ok {
            return Err(ImageError::Config(format!(
                "node {} cannot be based on {} (mkfs needs a loop or partition, mount a mkfs, \
                 fstab a mount)",
                n.name,
                n.base.as_deref().unwrap_or("nothing")
            )));
        }
    }

    let order = topo_order(&nodes, &preds)?;
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    let nodes = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok(Graph { nodes, tables })
}

fn partition_spec(name: &str, p: &Mapping, label: TableLabel) -> Result<PartSpec, ImageError> {
    let flags: Vec<String> = match p.get("flags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(s)) => s.iter().filter_map(scalar).collect(),
        Some(other) => vec![scalar(other).unwrap_or_default()],
    };
    if label == TableLabel::Gpt && flags.iter().any(|f| f == "primary") {
        return Err(ImageError::Config(
            "Primary flag not supported for GPT partitions".into(),
        ));
    }
    let (mut boot, mut primary) = (false, false);
    for f in &flags {
        match f.as_str() {
            "boot" => boot = true,
            "primary" => primary = true,
            _ => return Err(ImageError::Config(format!("Unknown flag: {f}"))),
        }
    }
    let size =
        get(p, "size").ok_or_else(|| ImageError::Config(format!("No size in partition {name}")))?;
    let ptype = get(p, "type");
    let mbr_type = match (label, &ptype) {
        (TableLabel::Mbr, Some(t)) => {
            let hex = t.trim_start_matches("0x").trim_start_matches("0X");
            u8::from_str_radix(hex, 16).map_err(|_| {
                ImageError::Config(format!(
                    "partition {name}: MBR type [{t}] is not a hex byte (e.g. '83')"
                ))
            })?
        }
        _ => 0x83,
    };
    Ok(PartSpec {
        name: name.to_string(),
        size,
        boot,
        primary,
        mbr_type,
        gpt_type: ptype.unwrap_or_else(|| "8300".into()),
    })
}

/// Kahn's algorithm; among the ready nodes the one earliest in the config goes first.
fn topo_order(nodes: &[Node], preds: &[Vec<usize>]) -> Result<Vec<usize>, ImageError> {
    let mut indeg: Vec<usize> = preds.iter().map(Vec::len).collect();
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, ps) in preds.iter().enumerate() {
        for &p in ps {
            succs[p].push(i);
        }
    }
    let mut ready: BTreeMap<usize, ()> = indeg
        .iter()
        .enumerate()
        .filter(|(_, d)| **d == 0)
        .map(|(i, _)| (i, ()))
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some((i, ())) = ready.pop_first() {
        order.push(i);
        for &s in &succs[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.insert(s, ());
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck: Vec<&str> = (0..nodes.len())
            .filter(|i| !order.contains(i))
            .map(|i| nodes[i].name.as_str())
            .collect();
        return Err(ImageError::Config(format!(
            "the config has a dependency cycle through: {}",
            stuck.join(", ")
        )));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MBR: &str =
        include_str!("../../elements/block-device-mbr/block-device-default.yaml");
    pub(crate) const GPT: &str =
        include_str!("../../elements/block-device-gpt/block-device-default.yaml");
    pub(crate) const EFI: &str =
        include_str!("../../elements/block-device-efi/block-device-default.yaml");

    fn err(yaml: &str) -> String {
        match parse_config(yaml) {
            Ok(_) => panic!("config was accepted:\n{yaml}"),
            Err(e) => {
                assert!(e.is_bad_input());
                e.to_string()
            }
        }
    }

    fn sorted(c: &BlockDeviceConfig) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = c
            .entries()
            .iter()
            .map(|e| {
                // serde_json's map is sorted, so key order does not matter.
                let v = serde_json::to_value(&e.values).unwrap();
                (e.plugin.clone(), v.to_string())
            })
            .collect();
        v.sort();
        v
    }

    fn params(fs: &str, label: Option<&str>) -> Params {
        Params {
            image_dir: "/nonexistent".into(),
            image_size: 1 << 30,
            root_fs_type: fs.into(),
            root_label: label.map(str::to_string),
            root_fs_opts: None,
            mount_base: "/nonexistent".into(),
            seed: None,
            epoch: None,
        }
    }

    const DEEP_TREE: &str = "
- local_loop:
    name: image0
- partitioning:
    name: mbr
    base: image0
    label: mbr
    partitions:
      - name: root
        flags: [ boot, primary ]
        size: 100%
        mkfs:
          type: ext4
          mount:
            mount_point: /
            fstab:
              options: \"defaults\"
              fsck-passno: 1
";

    const DEEP_GRAPH: &str = "
- local_loop:
    name: image0
- partitioning:
    base: image0
    name: mbr
    label: mbr
    partitions:
      - flags: [boot, primary]
        name: root
        base: image0
        size: 100%
- mount:
    base: mkfs_root
    name: mount_mkfs_root
    mount_point: /
- fstab:
    base: mount_mkfs_root
    name: fstab_mount_mkfs_root
    fsck-passno: 1
    options: defaults
- mkfs:
    base: root
    name: mkfs_root
    type: ext4
";

    #[test]
    fn tree_and_graph_forms_give_the_same_graph() {
        let tree = parse_config(DEEP_TREE).unwrap();
        let graph = parse_config(DEEP_GRAPH).unwrap();
        assert_eq!(sorted(&tree), sorted(&graph));
        // Graph form comes back unchanged (as a multiset).
        let reparsed = parse_config(DEEP_GRAPH).unwrap();
        assert_eq!(reparsed.entries().len(), 5);
        // Call order is the same for both forms.
        let a: Vec<String> = tree
            .graph(true)
            .unwrap()
            .nodes
            .into_iter()
            .map(|n| n.name)
            .collect();
        let b: Vec<String> = graph
            .graph(true)
            .unwrap()
            .nodes
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(a, b);
        assert_eq!(
            a,
            [
                "image0",
                "root",
                "mkfs_root",
                "mount_mkfs_root",
                "fstab_mount_mkfs_root"
            ]
        );
    }

    #[test]
    fn default_names_follow_dib() {
        let c = parse_config(MBR).unwrap();
        let names: Vec<String> = c
            .entries()
            .iter()
            .filter_map(|e| get(&e.values, "name"))
            .collect();
        for n in [
            "image0",
            "partitioning_image0",
            "mkfs_root",
            "mount_mkfs_root",
            "fstab_mount_mkfs_root",
        ] {
            assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
        }
        let d = parse_config(default_config()).unwrap();
        let names: Vec<String> = d
            .entries()
            .iter()
            .filter_map(|e| get(&e.values, "name"))
            .collect();
        assert_eq!(
            names,
            [
                "fstab_mount_mkfs_root",
                "mount_mkfs_root",
                "mkfs_root",
                "image0"
            ]
        );
        let g = d.graph(false).unwrap();
        match &g.node("mkfs_root").unwrap().base {
            Some(b) => assert_eq!(b, "image0"),
            None => panic!("mkfs_root has no base"),
        }
    }

    #[test]
    fn shipped_configs_parse_and_report_getvals() {
        let mut mbr = parse_config(MBR).unwrap();
        assert!(
            mbr.graph(true).is_err(),
            "mkfs_root has no type before the merge"
        );
        mbr.merge_rootfs_params(&params("ext4", None));
        let g = mbr.graph(true).unwrap();
        assert_eq!(g.tables[0].label, TableLabel::Mbr);
        let p = &g.tables[0].partitions[0];
        assert!(p.boot && p.primary && p.size == "100%" && p.mbr_type == 0x83);
        assert_eq!(mbr.root_label().as_deref(), Some("cloudimg-rootfs"));
        assert_eq!(mbr.root_fstype().as_deref(), Some("ext4"));
        assert_eq!(mbr.boot_label(), "");
        assert_eq!(mbr.mount_points(), ["/"]);

        let mut gpt = parse_config(GPT).unwrap();
        gpt.merge_rootfs_params(&params("xfs", None));
        let g = gpt.graph(true).unwrap();
        assert_eq!(g.tables[0].label, TableLabel::Gpt);
        assert_eq!(g.tables[0].partitions[0].gpt_type, "EF02");
        assert_eq!(gpt.root_label().as_deref(), Some("img-rootfs"));

        let mut efi = parse_config(EFI).unwrap();
        efi.merge_rootfs_params(&params("ext4", Some("myroot")));
        let g = efi.graph(true).unwrap();
        let order: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        let pos = |n: &str| order.iter().position(|x| *x == n).unwrap();
        assert!(pos("mount_mkfs_root") < pos("mount_mkfs_ESP"), "{order:?}");
        assert!(pos("ESP") < pos("BSP") && pos("BSP") < pos("root"));
        assert_eq!(efi.root_label().as_deref(), Some("myroot"));
        assert_eq!(efi.mount_points(), ["/boot/efi", "/"]);
        match &g.node("mkfs_ESP").unwrap().kind {
            Kind::Mkfs(fs) => assert_eq!(
                (fs.fs_type.as_str(), fs.label.as_str()),
                ("vfat", "MKFS_ESP")
            ),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn merge_only_touches_mkfs_root_and_keeps_explicit_values() {
        let yaml = "
- local_loop: {name: image0}
- mkfs: {name: mkfs_root, base: image0, type: xfs, label: mine, opts: '-K'}
";
        let mut c = parse_config(yaml).unwrap();
        let mut p = params("ext4", Some("other"));
        p.root_fs_opts = Some("-i 4096".into());
        c.merge_rootfs_params(&p);
        assert_eq!(c.root_fstype(), None, "no mount at /");
        assert_eq!(c.root_label(), None, "no mount at /");
        let fs = c.mkfs_entry("mkfs_root").unwrap();
        assert_eq!(get(fs, "type").as_deref(), Some("xfs"));
        assert_eq!(get(fs, "label").as_deref(), Some("mine"));
        assert_eq!(get(fs, "opts").as_deref(), Some("-K"));

        let mut d = parse_config(default_config()).unwrap();
        d.merge_rootfs_params(&p);
        let fs = d.mkfs_entry("mkfs_root").unwrap();
        assert_eq!(get(fs, "opts").as_deref(), Some("-i 4096"));
        assert_eq!(d.root_label().as_deref(), Some("other"));
    }

    #[test]
    fn boot_label_falls_back_to_the_mkfs_name() {
        let yaml = "
- local_loop:
    name: image0
- partitioning:
    base: image0
    label: gpt
    partitions:
      - name: boot
        size: 100MiB
        mkfs: {type: ext4, mount: {mount_point: /boot}}
      - name: root
        size: 100%
        mkfs: {type: ext4, label: r, mount: {mount_point: /}}
";
        let c = parse_config(yaml).unwrap();
        assert_eq!(c.boot_label(), "mkfs_boot");
        assert_eq!(c.mount_points(), ["/boot", "/"]);
    }

    #[test]
    fn dib_validation_errors() {
        let cases: &[(&str, &str)] = &[
            ("- 42\n", "Config entry not a dict: 42"),
            (
                "- mkfs: {name: a, base: b, type: ext4}\n  mount: {name: m, base: a, mount_point: /}\n",
                "Config entry top-level should be a single dict",
            ),
            (
                "- this_is_not_a_plugin_name: {foo: bar}\n",
                "Config entry is not a plugin value",
            ),
            (
                "- local_loop: {name: dup}\n- local_loop: {name: dup}\n",
                "Duplicate node name: dup",
            ),
            (
                "- local_loop: {name: image0}\n- mkfs: {name: mkfs_root, base: nothere, type: ext4}\n",
                "Edge not defined: nothere->mkfs_root",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: bsd, partitions: [{name: r, size: 100%}]}\n",
                "Label must be 'mbr' or 'gpt'",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: mbr, partitions: [{name: r, size: 100%, flags: [bootable]}]}\n",
                "Unknown flag: bootable",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: gpt, partitions: [{name: r, size: 100%, flags: [primary]}]}\n",
                "Primary flag not supported for GPT partitions",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: gpt, partitions: [{name: a, size: 1MiB, mkfs: {type: ext4, mount: {mount_point: /}}}, {name: b, size: 1MiB, mkfs: {type: ext4, mount: {mount_point: /}}}]}\n",
                "Mount point [/] specified more than once",
            ),
            (
                "- local_loop: {name: image0}\n- mkfs: {name: f, base: image0, type: ext4, label: abcdefghijklmnopq}\n",
                "Label [abcdefghijklmnopq] too long for filesystem [ext4]: 17 > 16",
            ),
            (
                "- local_loop: {name: image0}\n- mkfs: {name: f, base: image0, type: xfs, label: cloudimg-rootfs}\n",
                "Label [cloudimg-rootfs] too long for filesystem [xfs]: 15 > 12",
            ),
            (
                "- local_loop: {name: image0}\n- mkfs: {name: f, base: image0, type: vfat, label: efi-partition}\n",
                "Label [EFI-PARTITION] too long for filesystem [vfat]: 13 > 11",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: gpt, partitions: [{name: a, size: 1MiB, mkfs: {type: ext4, label: same}}, {name: b, size: 1MiB, mkfs: {type: xfs, label: same}}]}\n",
                "File system label [same] used more than once",
            ),
            (
                "- local_loop: {name: image0}\n- lvm: {name: lvm, base: [image0]}\n",
                "without device-mapper",
            ),
            (
                "- local_loop: {name: image0}\n- partitioning: {base: image0, label: mbr}\n",
                "Partitioning config needs 'partitions'",
            ),
            (
                "- local_loop: {name: image0}\n- mkfs: {name: f, base: image0}\n",
                "Mkfs config needs [type]",
            ),
            (
                "- local_loop: {name: image0}\n- mount: {name: m, base: image0, mount_point: /}\n",
                "cannot be based on image0",
            ),
            ("- local_loop: {size: 1GiB}\n", "needs a 'name' or a 'base'"),
        ];
        for (yaml, want) in cases {
            let e = err(yaml);
            assert!(e.contains(want), "for\n{yaml}\nwanted {want:?}, got {e:?}");
            assert!(!e.contains('\n'), "multi-line error: {e:?}");
        }
    }

    #[test]
    fn a_too_long_root_label_is_caught_after_the_merge() {
        let mut c = parse_config(MBR).unwrap();
        c.merge_rootfs_params(&params("vfat", None));
        let e = c.graph(true).unwrap_err().to_string();
        assert!(
            e.contains("Label [CLOUDIMG-ROOTFS] too long for filesystem [vfat]: 15 > 11"),
            "{e}"
        );
    }

    #[test]
    fn mount_order_is_sorted_by_mount_point() {
        let yaml = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - {name: varlog, size: 10MiB, flags: [primary], mkfs: {type: ext4, mount: {mount_point: /var/log}}}
      - {name: var, size: 10MiB, flags: [primary], mkfs: {type: ext4, mount: {mount_point: /var}}}
      - {name: root, size: 100%, flags: [primary], mkfs: {type: ext4, mount: {mount_point: /}}}
";
        let g = parse_config(yaml).unwrap().graph(true).unwrap();
        let mounts: Vec<&str> = g
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                Kind::Mount { mount_point } => Some(mount_point.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(mounts, ["/", "/var", "/var/log"]);
    }
}
