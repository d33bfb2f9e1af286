//! Kept trees (`build --keep-tree`): one unpacked rootfs per image kept in the cache folder, so
//! a rebuild restores its cached steps without unpacking them; the build runs on an overlayfs
//! whose lower dir is the kept tree, so no hook ever changes it.
//!
//! ```text
//! cache/trees/<slot>/        slot = blake3(absolute output name)[..16]: one per image
//!   lock                     flock held by the build (or shell) using the slot, all along
//!   state.json               the steps the tree holds: [(key, rootfs diff id)], oldest first,
//!                            and the boot it was written in
//!   changing                 present while the tree is being changed (a crash leaves it)
//!   tree/                    the unpacked rootfs at the last step of state.json
//!
//! Snapshots::restore (first miss, cached steps c1..cn)
//!   ──► open: try_lock (held by another build ──► plain unpack into mnt, as without)
//!   ──► plan(held, c1..cn):  held == c1..cn          ──► Reuse: nothing is unpacked
//!                            held a prefix of c1..cn ──► Advance: apply c(k+1)..cn to tree/
//!                            otherwise               ──► Fresh: empty tree/, apply c1..cn
//!       (changing written first, state.json last; a slot with `changing`, no state, a state
//!        of another boot or that cannot be read is Fresh)
//!   ──► overlay on mnt: lowerdir=tree/, upperdir/workdir in the build folder (thrown away
//!       with it); index=on keeps hardlinks whole on copy-up, xino=on keeps inode numbers,
//!       redirect_dir=on lets directories be renamed as on a plain tree
//! ```
//!
//! Policy:
//! * The slot holds the last step a rebuild restored, so the next edit of the same hook (the
//!   developer's loop) restores with no unpack at all. A build that restores a later step of
//!   the same chain advances the slot by the layers in between; one that restores an earlier
//!   step or another chain (an edit further up, other elements under the same output name)
//!   unpacks afresh into the slot. A cold build (nothing restored) leaves the slot as it is.
//!   Steps are matched by key *and* rootfs diff id, so a step rebuilt under the same key with
//!   another layer (dropped from the cache, non-deterministic) is not taken for the one held.
//! * Locking: one build at a time per slot (`lock`, taken without waiting and held until the
//!   build's overlay is gone with its process); a second build of the same image finds it
//!   held and unpacks into its own folder as without `--keep-tree`.
//! * Crash safety: `changing` is created (and `state.json` removed) before the tree is
//!   touched, and removed only after the new `state.json` is renamed into place, so a build
//!   killed while changing the slot leaves a slot that the next one empties and fills again.
//!   Page-cache contents are not forced to disk: a state written in another boot (power loss)
//!   is not trusted either.
//! * Copy-up noise: on overlayfs, a file opened for writing, or a directory whose child is
//!   copied up, gets a new ctime (and a directory's link count reads 1 once merged) though
//!   nothing about it changed. [`Overlay::is_copy_up_noise`] tells such a path from a real
//!   change (content and xattrs compared with the kept tree, inode number unchanged), so the
//!   layers equal those of a build without a kept tree (a folder counts as unchanged only when
//!   a child was copied up into it; /etc and /etc/resolv.conf, which the sandbox renames around
//!   every chroot step, never). Differences remain where a hook touches a path without
//!   changing it (a mode, owner or times set to the values it has, a rename undone): a plain
//!   tree records it (its ctime changed), a kept tree may leave it out; outputs are the same.
//! * Scans: everything a step does to the merged tree lands in the upper folder, so after a
//!   step only the paths that changed there are looked at again ([`Overlay::dirty_since`] ─►
//!   `layer::rescan`, which adds the other names of a hardlinked inode), not the whole tree.
//! * `strata cache gc` drops every slot nobody holds ([`drop_slots`]).
//! * Never for `build --check`: an audit rebuilds from the cache's own layers.

use crate::sandbox;
use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::layer::{FileKind, Meta, Scan};

/// The folder under the cache folder that holds the slots.
pub const TREES_DIR: &str = "trees";

/// One step of a chain as the slot sees it: its key and its rootfs layer's diff id.
pub type ChainStep = (String, Option<String>);

/// What `state.json` says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub version: u32,
    /// The output name the slot is for (for people reading the folder).
    pub image: String,
    /// The kernel's boot id when the state was written.
    pub boot: String,
    /// The steps the tree holds, oldest first.
    pub steps: Vec<ChainStep>,
}

const STATE_VERSION: u32 = 1;

/// How a slot is brought to the wanted step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPlan {
    /// The tree is already at the wanted step.
    Reuse,
    /// The tree holds the first `from` steps of the chain: apply the rest.
    Advance { from: usize },
    /// Empty the tree and apply the whole chain.
    Fresh,
}

/// The plan for a slot holding `held` (None: nothing usable) when `wanted` is restored.
pub fn plan(held: Option<&[ChainStep]>, wanted: &[ChainStep]) -> SlotPlan {
    match held {
        Some(h) if !h.is_empty() && h.len() <= wanted.len() && wanted[..h.len()] == *h => {
            if h.len() == wanted.len() {
                SlotPlan::Reuse
            } else {
                SlotPlan::Advance { from: h.len() }
            }
        }
        _ => SlotPlan::Fresh,
    }
}

/// Whether a command that keeps trees by default (`build --watch`, `shell`) keeps one: yes
/// unless STRATA_KEEP_TREE says no (`0`, `false`, `no`, `off`).
pub fn on_by_default() -> bool {
    std::env::var("STRATA_KEEP_TREE").map_or(true, |v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        )
    })
}

/// The slot folder of an output name.
pub fn slot_dir(cache_dir: &Path, image_name: &str) -> PathBuf {
    let name = Path::new(image_name);
    let abs = if name.is_absolute() {
        name.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| name.to_path_buf())
    };
    // The output folder as the file system names it (symlinks and `..` resolved).
    let abs = match (abs.parent(), abs.file_name()) {
        (Some(p), Some(f)) => fs::canonicalize(p)
            .map(|p| p.join(f))
            .unwrap_or(abs.clone()),
        _ => abs,
    };
    let hash = blake3::hash(abs.as_os_str().as_bytes()).to_hex();
    cache_dir.join(TREES_DIR).join(&hash.as_str()[..16])
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A slot, locked for this process.
#[derive(Debug)]
pub struct KeptTree {
    dir: PathBuf,
    image: String,
    _lock: fs::File,
}

/// What bringing a slot to a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Brought {
    pub plan: SlotPlan,
    /// Layers applied to the tree.
    pub applied: usize,
}

impl KeptTree {
    /// Opens and locks the slot of `image_name` (created if missing). None when another
    /// process holds it: the build then restores as without a kept tree.
    pub fn open(cache_dir: &Path, image_name: &str) -> Result<Option<KeptTree>> {
        let dir = slot_dir(cache_dir, image_name);
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the kept-tree folder {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                tracing::info!(
                    "the kept tree of {image_name} is in use by another build; restoring by \
                     unpacking instead"
                );
                return Ok(None);
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        Ok(Some(KeptTree {
            dir,
            image: image_name.to_string(),
            _lock: lock,
        }))
    }

    /// The kept tree itself.
    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("changing")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The steps the tree holds, if it can be trusted.
    pub fn held(&self) -> Option<State> {
        if self.marker().exists() || !self.tree().is_dir() {
            return None;
        }
        let text = fs::read(self.state_path()).ok()?;
        let state: State = serde_json::from_slice(&text).ok()?;
        (state.version == STATE_VERSION && state.boot == boot_id()).then_some(state)
    }

    /// Brings the tree to the end of `wanted`, calling `apply(i, tree)` for each step `i`
    /// whose layer must be applied (those with a rootfs layer).
    pub fn bring_to(
        &mut self,
        wanted: &[ChainStep],
        mut apply: impl FnMut(usize, &Path) -> Result<()>,
    ) -> Result<Brought> {
        let held = self.held();
        let plan = plan(held.as_ref().map(|s| s.steps.as_slice()), wanted);
        let from = match plan {
            SlotPlan::Reuse => return Ok(Brought { plan, applied: 0 }),
            SlotPlan::Advance { from } => from,
            SlotPlan::Fresh => 0,
        };
        // Marked before anything changes; unmarked only once the state says what it holds.
        fs::write(self.marker(), b"")
            .with_context(|| format!("cannot write {}", self.marker().display()))?;
        sync_dir(&self.dir);
        match fs::remove_file(self.state_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove {}", self.state_path().display()));
            }
        }
        let tree = self.tree();
        if plan == SlotPlan::Fresh {
            sandbox::remove_tree_on_one_mount(&tree)
                .with_context(|| format!("cannot empty the kept tree {}", tree.display()))?;
        }
        fs::create_dir_all(&tree).with_context(|| format!("cannot create {}", tree.display()))?;
        let mut applied = 0;
        for (i, (_, layer)) in wanted.iter().enumerate().skip(from) {
            if layer.is_some() {
                apply(i, &tree)?;
                applied += 1;
            }
        }
        let state = State {
            version: STATE_VERSION,
            image: self.image.clone(),
            boot: boot_id(),
            steps: wanted.to_vec(),
        };
        let tmp = self.dir.join("state.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, self.state_path())
            .with_context(|| format!("cannot write {}", self.state_path().display()))?;
        fs::remove_file(self.marker())
            .with_context(|| format!("cannot remove {}", self.marker().display()))?;
        sync_dir(&self.dir);
        Ok(Brought { plan, applied })
    }

    /// Mounts an overlay of the kept tree on `merged`, its upper and work folders made in
    /// `scratch` (which must be on one file system and is thrown away with the build).
    pub fn mount(&self, merged: &Path, scratch: &Path) -> Result<Overlay> {
        let lower = self.tree();
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        for d in [&upper, &work] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        // The merged root shows the upper root's metadata: make it the kept tree's root's.
        copy_dir_meta(&lower, &upper)?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},index=on,xino=on,redirect_dir=on,metacopy=off",
            escape_opt(&lower),
            escape_opt(&upper),
            escape_opt(&work)
        );
        mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .with_context(|| {
            format!(
                "cannot mount an overlay of the kept tree {} on {}",
                lower.display(),
                merged.display()
            )
        })?;
        Ok(Overlay {
            lower,
            upper,
            merged: merged.to_path_buf(),
        })
    }
}

/// Overlay's mount options separate with `,` and `:`: a path holding either is escaped.
fn escape_opt(p: &Path) -> String {
    let s = p.display().to_string();
    s.replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Gives `to` the mode, owner, times and xattrs of the folder `from`.
fn copy_dir_meta(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md =
        fs::symlink_metadata(from).with_context(|| format!("cannot stat {}", from.display()))?;
    nix::unistd::chown(
        to,
        Some(nix::unistd::Uid::from_raw(md.uid())),
        Some(nix::unistd::Gid::from_raw(md.gid())),
    )
    .with_context(|| format!("cannot chown {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))
        .with_context(|| format!("cannot chmod {}", to.display()))?;
    for (name, value) in xattrs(from) {
        xattr::set(to, &name, &value)
            .with_context(|| format!("cannot set an xattr on {}", to.display()))?;
    }
    let ts = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &ts(md.atime(), md.atime_nsec()),
        &ts(md.mtime(), md.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set the times of {}", to.display()))?;
    Ok(())
}

/// A path's xattrs (not followed), sorted; overlayfs' own are left out.
fn xattrs(path: &Path) -> Xattrs {
    let mut out: Xattrs = xattr::list(path)
        .map(|names| {
            names
                .filter(|n| !n.as_bytes().starts_with(b"trusted.overlay."))
                .filter_map(|n| {
                    let v = xattr::get(path, &n).ok().flatten()?;
                    Some((n, v))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A build's overlay on its kept tree.
#[derive(Debug, Clone)]
pub struct Overlay {
    lower: PathBuf,
    upper: PathBuf,
    merged: PathBuf,
}

/// What the upper folder held when a step started: its paths with their `lstat` there, and
/// each folder's xattrs as the merged tree shows them.
#[derive(Debug)]
pub struct UpperState {
    paths: Scan,
    xattrs: HashMap<Vec<u8>, Xattrs>,
}

/// A path's xattrs, sorted by name.
type Xattrs = Vec<(OsString, Vec<u8>)>;

impl Overlay {
    /// The state of the upper folder now (before a step runs).
    pub fn upper_state(&self) -> Result<UpperState> {
        let paths = self.upper_scan()?;
        let xattrs = paths
            .iter()
            .filter(|(_, m)| m.kind == FileKind::Dir)
            .map(|(rel, _)| {
                let rel = rel.as_os_str().as_bytes().to_vec();
                let x = xattrs(
                    &self
                        .merged
                        .join(Path::new(std::ffi::OsStr::from_bytes(&rel))),
                );
                (rel, x)
            })
            .collect();
        Ok(UpperState { paths, xattrs })
    }

    fn upper_scan(&self) -> Result<Scan> {
        crate::layer::scan(&self.upper, &Default::default())
            .with_context(|| format!("cannot list {}", self.upper.display()))
    }

    /// The paths of the merged tree a step may have changed since `start`: every path of the
    /// upper folder that appeared, went, or whose `lstat` there changed. Everything a step
    /// does to the merged tree lands in the upper folder (the kept tree below is never
    /// written), so this is what [`crate::layer::rescan`] needs: a file changed in place or
    /// copied up, a new path or whiteout, and a folder whose names changed (its own entry in
    /// the upper folder changes with them; an opaque or redirected folder is a new entry).
    /// The other names of a hardlink copied up (overlayfs' index shows them changed without
    /// an upper entry) are added by `rescan` from the inode numbers.
    pub fn dirty_since(&self, start: &UpperState) -> Result<Vec<Vec<u8>>> {
        let now = self.upper_scan()?;
        let mut dirty = Vec::new();
        for (rel, m) in now.iter() {
            let was = start.paths.get(rel);
            if was.is_none_or(|w| w.changed(m)) {
                dirty.push(rel.as_os_str().as_bytes().to_vec());
            }
        }
        for (rel, _) in start.paths.iter() {
            if now.get(rel).is_none() {
                dirty.push(rel.as_os_str().as_bytes().to_vec());
            }
        }
        Ok(dirty)
    }

    /// True when `rel` (before `b`, after `a`, both as the merged tree showed them) changed
    /// only by overlayfs copying it up: same type, inode, mode, owner, size, times but ctime
    /// (and a folder's link count), and the same content and xattrs as before.
    pub fn is_copy_up_noise(&self, start: &UpperState, rel: &[u8], b: &Meta, a: &Meta) -> bool {
        let same_but_ctime = b.kind == a.kind
            && b.ino == a.ino
            && b.mode == a.mode
            && b.uid == a.uid
            && b.gid == a.gid
            && b.size == a.size
            && b.mtime == a.mtime
            && b.mtime_nsec == a.mtime_nsec
            && b.rdev == a.rdev
            && b.link_target == a.link_target
            && (b.nlink == a.nlink || a.kind == FileKind::Dir);
        // The sandbox swaps /etc/resolv.conf in and out around every chroot step (renames, so
        // ctimes change on a plain tree too): those changes are real on both.
        if !same_but_ctime || rel == b"etc" || rel == b"etc/resolv.conf" {
            return false;
        }
        let relp = Path::new(std::ffi::OsStr::from_bytes(rel));
        let merged = self.merged.join(relp);
        // A folder's ctime means nothing only when a child was copied up into it (anything
        // else that changes its entries changes it on a plain tree too).
        if a.kind == FileKind::Dir && !self.child_copied_up(start, rel) {
            return false;
        }
        match start.paths.get_bytes(rel) {
            // Already up when the step began: nothing is copied up again, so only a folder
            // (whose child was copied up into it) may show a ctime that means nothing.
            Some(_) => {
                a.kind == FileKind::Dir
                    && start.xattrs.get(rel).is_some_and(|x| *x == xattrs(&merged))
            }
            // In the kept tree only when the step began: the kept tree still has it as it was.
            None => {
                let lower = self.lower.join(relp);
                let Ok(lm) = fs::symlink_metadata(&lower) else {
                    return false;
                };
                if Meta::from_std(&lm, None).kind != a.kind || xattrs(&lower) != xattrs(&merged) {
                    return false;
                }
                a.kind != FileKind::File || same_content(&lower, &merged).unwrap_or(false)
            }
        }
    }
}

impl Overlay {
    /// True when a child of the folder `rel` came up into the upper folder during the step
    /// (in it now, not at the start; whiteouts left out).
    fn child_copied_up(&self, start: &UpperState, rel: &[u8]) -> bool {
        use std::os::unix::fs::FileTypeExt;
        let dir = self.upper.join(Path::new(std::ffi::OsStr::from_bytes(rel)));
        let Ok(entries) = fs::read_dir(&dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(e.file_name().as_bytes());
            let whiteout = e.file_type().is_ok_and(|t| t.is_char_device());
            !whiteout && start.paths.get_bytes(&child).is_none()
        })
    }
}

fn same_content(x: &Path, y: &Path) -> std::io::Result<bool> {
    let mut fx = fs::File::open(x)?;
    let mut fy = fs::File::open(y)?;
    if fx.metadata()?.len() != fy.metadata()?.len() {
        return Ok(false);
    }
    let mut bx = vec![0u8; 1 << 16];
    let mut by = vec![0u8; 1 << 16];
    loop {
        let n = read_full(&mut fx, &mut bx)?;
        let m = read_full(&mut fy, &mut by)?;
        if n != m || bx[..n] != by[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Drops every slot under `cache_dir` that no build holds (`strata cache gc`). Returns the
/// number dropped and the bytes freed; slots in use are left alone.
pub fn drop_slots(cache_dir: &Path) -> Result<(usize, u64)> {
    let trees = cache_dir.join(TREES_DIR);
    let entries = match fs::read_dir(&trees) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", trees.display())),
    };
    let (mut n, mut bytes) = (0, 0);
    for entry in entries {
        let dir = entry
            .with_context(|| format!("cannot list {}", trees.display()))?
            .path();
        let lock = match fs::File::open(dir.join("lock")) {
            Ok(l) => l,
            Err(_) => {
                // No lock file: a slot that never got as far; nothing can hold it.
                bytes += tree_bytes(&dir);
                sandbox::remove_tree_on_one_mount(&dir)?;
                n += 1;
                continue;
            }
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                tracing::info!("{} is in use by a build; kept", dir.display());
                continue;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", dir.display()));
            }
        }
        bytes += tree_bytes(&dir);
        // The state goes first: a slot half removed is never taken for a whole one.
        let _ = fs::remove_file(dir.join("state.json"));
        sandbox::remove_tree_on_one_mount(&dir)
            .with_context(|| format!("cannot remove the kept tree {}", dir.display()))?;
        n += 1;
    }
    Ok((n, bytes))
}

fn tree_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Moves the mount at `from` to `to` (an existing empty folder): the disk step moves the
/// tree aside this way when it is an overlay (a mount point cannot be renamed).
pub fn move_mount(from: &Path, to: &Path) -> Result<()> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).with_context(|| {
        format!(
            "cannot move the mount {} to {}",
            from.display(),
            to.display()
        )
    })
}

/// True when `path` is itself a mount point.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    let mounts = sandbox::mounts_at_or_under(path)
        .with_context(|| format!("cannot read the mount table for {}", path.display()))?;
    Ok(mounts.iter().any(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    fn chain(n: usize) -> Vec<ChainStep> {
        (0..n)
            .map(|i| (format!("k{i}"), (i % 3 != 1).then(|| format!("d{i}"))))
            .collect()
    }

    #[test]
    fn the_slot_at_the_wanted_step_is_reused() {
        let c = chain(5);
        assert_eq!(plan(Some(&c), &c), SlotPlan::Reuse);
    }

    #[test]
    fn a_slot_at_an_earlier_step_of_the_chain_advances() {
        let c = chain(5);
        assert_eq!(plan(Some(&c[..3]), &c), SlotPlan::Advance { from: 3 });
    }

    #[test]
    fn a_slot_past_the_wanted_step_or_on_another_chain_is_unpacked_afresh() {
        let c = chain(5);
        // An edit before the slot's step: the wanted step is an ancestor of the held one.
        assert_eq!(plan(Some(&c), &c[..3]), SlotPlan::Fresh);
        let mut other = c.clone();
        other[2].0 = "edited".into();
        assert_eq!(plan(Some(&c[..4]), &other), SlotPlan::Fresh);
        assert_eq!(plan(None, &c), SlotPlan::Fresh);
        assert_eq!(plan(Some(&[]), &c), SlotPlan::Fresh);
    }

    #[test]
    fn a_step_rebuilt_under_its_key_with_another_layer_is_not_the_one_held() {
        let c = chain(5);
        let mut rebuilt = c.clone();
        rebuilt[0].1 = Some("other".into());
        assert_eq!(plan(Some(&c[..3]), &rebuilt), SlotPlan::Fresh);
    }

    #[test]
    fn a_slot_marked_changing_or_of_another_boot_is_not_trusted() {
        let cache = tempfile::tempdir().unwrap();
        let mut kt = KeptTree::open(cache.path(), "img").unwrap().unwrap();
        let c = chain(3);
        let mut applied = Vec::new();
        let b = kt
            .bring_to(&c, |i, _| {
                applied.push(i);
                Ok(())
            })
            .unwrap();
        assert_eq!(b.plan, SlotPlan::Fresh);
        assert_eq!(applied, vec![0, 2]);
        assert_eq!(kt.held().unwrap().steps, c);
        // Killed while changing: the marker stays.
        fs::write(kt.marker(), b"").unwrap();
        assert!(kt.held().is_none());
        fs::remove_file(kt.marker()).unwrap();
        let mut st = kt.held().unwrap();
        st.boot = "another boot".into();
        fs::write(kt.state_path(), serde_json::to_vec(&st).unwrap()).unwrap();
        assert!(kt.held().is_none());
    }

    #[test]
    fn a_failed_change_leaves_the_slot_marked() {
        let cache = tempfile::tempdir().unwrap();
        let mut kt = KeptTree::open(cache.path(), "img").unwrap().unwrap();
        let c = chain(3);
        kt.bring_to(&c[..1], |_, _| Ok(())).unwrap();
        let r = kt.bring_to(&c, |i, _| if i == 2 { bail!("refused") } else { Ok(()) });
        assert!(r.is_err());
        assert!(kt.held().is_none());
        // The next one starts afresh.
        let b = kt.bring_to(&c, |_, _| Ok(())).unwrap();
        assert_eq!(b.plan, SlotPlan::Fresh);
        assert!(kt.held().is_some());
    }

    #[test]
    fn a_held_slot_is_not_opened_twice_nor_dropped_by_gc() {
        let cache = tempfile::tempdir().unwrap();
        let kt = KeptTree::open(cache.path(), "img").unwrap().unwrap();
        assert!(KeptTree::open(cache.path(), "img").unwrap().is_none());
        assert!(KeptTree::open(cache.path(), "other").unwrap().is_some());
        // "other" was released when dropped: gc removes it, keeps the held one.
        let (n, _) = drop_slots(cache.path()).unwrap();
        assert_eq!(n, 1);
        assert!(kt.dir.exists());
        drop(kt);
        assert_eq!(drop_slots(cache.path()).unwrap().0, 1);
        assert!(
            fs::read_dir(cache.path().join(TREES_DIR))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn slots_are_per_output_name() {
        let c = Path::new("/c");
        let out = tempfile::tempdir().unwrap();
        fs::create_dir(out.path().join("a")).unwrap();
        let p = |rel: &str| out.path().join(rel).display().to_string();
        assert_eq!(slot_dir(c, &p("a/img")), slot_dir(c, &p("a/../a/img")));
        assert_ne!(slot_dir(c, &p("a/img")), slot_dir(c, &p("a/img2")));
    }

    /// Each step's rescan (the paths that changed in the upper folder) equals a full scan of
    /// the merged tree, whatever the step did to paths of the kept tree or of the upper one.
    #[test]
    fn on_an_overlay_a_rescan_of_the_upper_changes_equals_a_full_scan() {
        use crate::layer::{ScanOptions, rescan, scan};
        use std::os::unix::fs::{PermissionsExt, symlink};
        crate::sandbox::enter_private_namespace().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let kt = KeptTree::open(cache.path(), "img").unwrap().unwrap();
        let lower = kt.tree();
        let w = |rel: &str, data: &str| {
            let p = lower.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        };
        for rel in [
            "etc/a",
            "etc/b",
            "usr/bin/tool",
            "usr/lib/x/y/z",
            "var/gone/deep/f",
        ] {
            w(rel, rel);
        }
        for rel in [
            "opt/opaque/old",
            "opt/moved/m",
            "opt/moved/sub/n",
            "srv/same",
        ] {
            w(rel, rel);
        }
        fs::hard_link(lower.join("usr/bin/tool"), lower.join("usr/bin/alias")).unwrap();
        fs::hard_link(lower.join("etc/b"), lower.join("srv/b-alias")).unwrap();
        symlink("../etc/a", lower.join("usr/link")).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let merged = tempfile::tempdir().unwrap();
        let m = merged.path();
        let overlay = kt.mount(m, scratch.path()).unwrap();
        let opts = ScanOptions::default();
        let steps: [fn(&Path); 5] = [
            |m| {
                fs::write(m.join("etc/a"), "changed").unwrap();
                fs::set_permissions(m.join("etc/b"), fs::Permissions::from_mode(0o600)).unwrap();
                xattr::set(m.join("srv/same"), "trusted.strata-test", b"v").unwrap();
                fs::OpenOptions::new()
                    .append(true)
                    .open(m.join("usr/bin/tool"))
                    .unwrap();
                fs::write(m.join("usr/bin/tool"), "new tool").unwrap();
                fs::remove_dir_all(m.join("var/gone")).unwrap();
                fs::remove_dir_all(m.join("opt/opaque")).unwrap();
                fs::create_dir(m.join("opt/opaque")).unwrap();
                fs::write(m.join("opt/opaque/fresh"), "fresh").unwrap();
                fs::rename(m.join("opt/moved"), m.join("opt/moved2")).unwrap();
                fs::create_dir_all(m.join("new/a/b")).unwrap();
                fs::write(m.join("new/a/b/c"), "c").unwrap();
                fs::remove_file(m.join("usr/link")).unwrap();
                symlink("../etc/b", m.join("usr/link")).unwrap();
            },
            |m| {
                fs::write(m.join("etc/a"), "changed again, longer").unwrap();
                fs::rename(m.join("new/a/b/c"), m.join("new/c")).unwrap();
                fs::remove_dir_all(m.join("new/a")).unwrap();
                fs::hard_link(m.join("new/c"), m.join("usr/c-link")).unwrap();
                fs::remove_file(m.join("srv/b-alias")).unwrap();
                fs::rename(m.join("opt/moved2"), m.join("opt/moved")).unwrap();
                fs::write(m.join("usr/lib/x/y/z"), "z2").unwrap();
            },
            |m| {
                fs::write(m.join("tmp-only"), "t").unwrap();
                fs::remove_file(m.join("tmp-only")).unwrap();
                fs::remove_dir_all(m.join("usr/lib")).unwrap();
                fs::create_dir_all(m.join("usr/lib/x")).unwrap();
                fs::create_dir_all(m.join("usr/lib/tmp")).unwrap();
            },
            // A folder replaced by a symlink out of the tree: what was below it (in the upper
            // folder, so looked at again) must not be looked up through the link.
            |m| {
                fs::remove_dir_all(m.join("usr/lib")).unwrap();
                symlink("/", m.join("usr/lib")).unwrap();
            },
            |_| {},
        ];
        let mut before = scan(m, &opts).unwrap();
        for (i, step) in steps.iter().enumerate() {
            let start = overlay.upper_state().unwrap();
            step(m);
            let dirty = overlay.dirty_since(&start).unwrap();
            let re = rescan(m, &before, dirty, &opts).unwrap();
            let full = scan(m, &opts).unwrap();
            let listed = |s: &crate::layer::Scan| -> Vec<(PathBuf, Meta)> {
                s.iter()
                    .map(|(p, m)| (p.to_path_buf(), m.clone()))
                    .collect()
            };
            assert_eq!(listed(&re), listed(&full), "step {i}");
            before = full;
        }
        nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
}
