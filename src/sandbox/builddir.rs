//! The build directory (dib's `TMP_BUILD_DIR`): created with mkdtemp, optionally on a tmpfs, and
//! removed without ever deleting through a mount; locked while its build lives, so a build
//! killed by SIGKILL leaves a folder the next build can tell from a live build's and remove.
//!
//! ```text
//! BuildDir::create(parent, prefix, tmpfs) ─► parent/prefixXXXXXXXX, flock held on the folder
//!                         (the underlying one, before any tmpfs) ─► + tmpfs (mode 0755), its
//!                         root locked too
//! BuildDir::cleanup()  ─► umount2(MNT_DETACH) every mount at/under it, deepest first, until the
//!                         mount table shows none ─► remove the tree, refusing to enter any
//!                         directory on another device or mount (st_dev + statx mount id)
//! sweep_dead_build_dirs(parent, prefix) ─► every such folder that is no mount point here and
//!                         whose lock nobody holds (its build died) ─► removed the same way
//! ```
//! Who sees what: a build's tmpfs is mounted inside its private mount namespace, so every other
//! process (another build, `strata cache gc`, a build in another container sharing the folder)
//! sees the underlying folder, whose lock the live build holds. A process inside the build's
//! namespace (a strata started by a hook) sees a mount point there and leaves it alone; the
//! tmpfs root is locked as well.
//! `remove_dir_all` is never used: it recurses into live bind mounts and deletes the source's
//! files.

use super::SandboxError;
use super::mountinfo::mounts_at_or_under;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A temporary build directory; removed by `cleanup` (or, best effort, on drop).
#[derive(Debug)]
pub struct BuildDir {
    pub path: PathBuf,
    pub tmpfs: bool,
    cleaned: bool,
    /// The folder as mkdtemp made it, exclusively locked while the build lives.
    _lock: fs::File,
    /// The tmpfs root mounted on it (locked too), when there is one.
    _lock_mounted: Option<fs::File>,
}

/// [`crate::fsutil::try_lock_dir`], its error naming the folder.
fn lock_dir(path: &Path) -> Result<Option<fs::File>, SandboxError> {
    crate::fsutil::try_lock_dir(path).map_err(|e| SandboxError::io("lock", path, e))
}

impl BuildDir {
    /// Creates `parent/<prefix>XXXXXXXX` (mkdtemp, mode 0700), locks it, and mounts a tmpfs on
    /// it when `tmpfs` is set. As in dib the tmpfs gets no size option (the kernel's default,
    /// half of RAM); its root gets mode 0755.
    pub fn create(parent: &Path, prefix: &str, tmpfs: bool) -> Result<BuildDir, SandboxError> {
        let template = parent.join(format!("{prefix}XXXXXXXX"));
        let (path, lock) = loop {
            let path = nix::unistd::mkdtemp(&template)
                .map_err(|e| SandboxError::io("create a build directory in", parent, e.into()))?;
            // A sweep may have taken the fresh folder for a dead build's; then this name is
            // gone and we start again with a new one.
            if let Some(lock) = lock_dir(&path)? {
                break (path, lock);
            }
        };
        let mut dir = BuildDir {
            path,
            tmpfs,
            cleaned: false,
            _lock: lock,
            _lock_mounted: None,
        };
        if tmpfs {
            mount(
                Some("tmpfs"),
                &dir.path,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )
            .map_err(|source| SandboxError::Mount {
                what: "a tmpfs".into(),
                target: dir.path.clone(),
                source,
            })?;
            dir._lock_mounted = lock_dir(&dir.path)?;
        }
        Ok(dir)
    }

    /// Unmounts everything at or under the directory and removes it.
    pub fn cleanup(mut self) -> Result<(), SandboxError> {
        self.cleaned = true;
        unmount_all_under(&self.path)?;
        remove_tree_on_one_mount(&self.path)
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let result =
            unmount_all_under(&self.path).and_then(|()| remove_tree_on_one_mount(&self.path));
        if let Err(err) = result {
            tracing::warn!("could not clean up the build directory: {err}");
        }
    }
}

/// Removes the folders `parent/<prefix>*` that builds killed mid-way left behind: those that are
/// not a mount point here and whose lock nobody holds (a live build holds the lock on its
/// folder, whatever its process, container or namespace on this kernel). Each is removed
/// without crossing a mount. A folder that cannot be removed is warned about and skipped.
/// Returns the folders removed.
pub fn sweep_dead_build_dirs(parent: &Path, prefix: &str) -> Result<Vec<PathBuf>, SandboxError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(SandboxError::io("list", parent, e)),
    };
    let parent_meta = fs::metadata(parent).map_err(|e| SandboxError::io("inspect", parent, e))?;
    let parent_mount = mount_id(parent);
    for entry in entries {
        let entry = entry.map_err(|e| SandboxError::io("list", parent, e))?;
        if !entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        // A mount point here is a live build's tmpfs seen from inside its own namespace.
        if !meta.is_dir()
            || meta.dev() != parent_meta.dev()
            || (parent_mount.is_some() && mount_id(&path) != parent_mount)
        {
            continue;
        }
        let lock = match lock_dir(&path) {
            Ok(Some(lock)) => lock,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!("{e}");
                continue;
            }
        };
        match remove_tree_on_one_mount(&path) {
            Ok(()) => {
                tracing::debug!("removed {}, left by a build that died", path.display());
                removed.push(path);
            }
            Err(e) => tracing::warn!(
                "cannot remove {}, left by a build that died: {e}",
                path.display()
            ),
        }
        drop(lock);
    }
    Ok(removed)
}

/// dib's `tmpfs_check`: true when MemTotal is at least twice `min_gib` GiB.
pub fn tmpfs_allowed(min_gib: u64) -> bool {
    match fs::read_to_string("/proc/meminfo") {
        Ok(text) => mem_total_kib(&text)
            .is_some_and(|kib| kib >= min_gib.saturating_mul(2).saturating_mul(1024 * 1024)),
        Err(_) => false,
    }
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Detaches every mount at or under `path`, deepest first, until the mount table shows none.
pub(crate) fn unmount_all_under(path: &Path) -> Result<(), SandboxError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    for _ in 0..16 {
        let mounts = mounts_at_or_under(path)
            .map_err(|e| SandboxError::io("read the mount table for", path, e))?;
        if mounts.is_empty() {
            return Ok(());
        }
        let mut points: Vec<PathBuf> = mounts.into_iter().map(|m| m.mount_point).collect();
        // Deepest first; among equal depths the later (upper) mount first.
        points.reverse();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for point in points {
            match umount2(&point, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(source) => {
                    return Err(SandboxError::Unmount {
                        target: point,
                        source,
                    });
                }
            }
        }
    }
    let left = mounts_at_or_under(path)
        .map_err(|e| SandboxError::io("read the mount table for", path, e))?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::StillMounted {
            path: path.to_path_buf(),
            mounts: left
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Unmounts whatever hooks left mounted strictly below `root` (dib's `unmount_image` before
/// the tree leaves the chroot phases), deepest first, logging one line per mount. Returns the
/// mount points it unmounted; fails (naming them) if any is still there afterwards.
pub fn unmount_below(root: &Path) -> Result<Vec<PathBuf>, SandboxError> {
    unmount_below_except(root, &[])
}

/// Like [`unmount_below`], leaving alone the mounts whose mount point is one of `keep` (a
/// disk's own file systems mounted below its root). Only mount points below `root`, as the
/// mount table spells them, are ever touched: nothing outside the build is unmounted.
pub fn unmount_below_except(root: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let root = &super::mountinfo::canonical(root);
    let keep: Vec<PathBuf> = keep
        .iter()
        .map(|p| super::mountinfo::canonical(p))
        .collect();
    let below = |root: &Path| -> Result<Vec<PathBuf>, SandboxError> {
        Ok(mounts_at_or_under(root)
            .map_err(|e| SandboxError::io("read the mount table for", root, e))?
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p != root && !keep.contains(p))
            .collect())
    };
    let mut done = Vec::new();
    let mut points = below(root)?;
    // Deepest first; among equal depths the later (upper) mount first.
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::info!("unmounted {} (left mounted by a hook)", point.display());
                done.push(point);
            }
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => {
                return Err(SandboxError::Unmount {
                    target: point,
                    source,
                });
            }
        }
    }
    let left = below(root)?;
    if !left.is_empty() {
        return Err(SandboxError::StillMounted {
            path: root.to_path_buf(),
            mounts: left
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(done)
}

/// The id of the mount `path` (not followed if a symlink) lives on, if the kernel reports it.
fn mount_id(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statx only writes into `buf`, which is a properly sized, zeroed statx struct.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut buf,
        )
    };
    (rc == 0 && buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id)
}

/// Removes `path` and everything below it, refusing to enter a directory that lies on another
/// device or another mount than `path` itself (a live mount must never be deleted through).
pub(crate) fn remove_tree_on_one_mount(path: &Path) -> Result<(), SandboxError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SandboxError::io("inspect", path, e)),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(|e| SandboxError::io("remove", path, e));
    }
    let live = mounts_at_or_under(path)
        .map_err(|e| SandboxError::io("read the mount table for", path, e))?;
    if !live.is_empty() {
        return Err(SandboxError::StillMounted {
            path: path.to_path_buf(),
            mounts: live
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    remove_below(path, meta.dev(), mount_id(path))?;
    fs::remove_dir(path).map_err(|e| SandboxError::io("remove", path, e))
}

fn remove_below(dir: &Path, dev: u64, mnt: Option<u64>) -> Result<(), SandboxError> {
    let entries = fs::read_dir(dir).map_err(|e| SandboxError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SandboxError::io("list", dir, e))?;
        let p = entry.path();
        let meta = fs::symlink_metadata(&p).map_err(|e| SandboxError::io("inspect", &p, e))?;
        if meta.is_dir() {
            if meta.dev() != dev || (mnt.is_some() && mount_id(&p) != mnt) {
                return Err(SandboxError::UnsafePath {
                    path: p,
                    reason:
                        "it is a live mount point; unmount it first (nothing below it was deleted)"
                            .into(),
                });
            }
            remove_below(&p, dev, mnt)?;
            fs::remove_dir(&p).map_err(|e| SandboxError::io("remove", &p, e))?;
        } else {
            fs::remove_file(&p).map_err(|e| SandboxError::io("remove", &p, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let text = "MemFree:  10 kB\nMemTotal:       24523164 kB\n";
        assert_eq!(mem_total_kib(text), Some(24_523_164));
        assert_eq!(mem_total_kib("nothing"), None);
    }

    #[test]
    fn removal_refuses_to_descend_into_a_live_bind_mount_on_the_same_filesystem() {
        super::super::enter_private_namespace().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("sentinel"), "keep").unwrap();
        let tree = tempfile::tempdir().unwrap();
        let victim = tree.path().join("victim");
        let bound = victim.join("a/bound");
        std::fs::create_dir_all(&bound).unwrap();
        std::fs::write(victim.join("a/file"), "x").unwrap();
        mount(
            Some(host.path()),
            &bound,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        // Same filesystem, so st_dev alone would not notice; the mount id does.
        assert_eq!(
            fs::metadata(&bound).unwrap().dev(),
            fs::metadata(&victim).unwrap().dev()
        );

        let err = remove_tree_on_one_mount(&victim).unwrap_err();
        assert!(matches!(err, SandboxError::StillMounted { .. }), "{err}");
        let meta = fs::symlink_metadata(&victim).unwrap();
        let err = remove_below(&victim, meta.dev(), mount_id(&victim)).unwrap_err();
        assert!(matches!(err, SandboxError::UnsafePath { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(host.path().join("sentinel")).unwrap(),
            "keep"
        );

        unmount_all_under(&victim).unwrap();
        remove_tree_on_one_mount(&victim).unwrap();
        assert!(!victim.exists());
        assert!(host.path().join("sentinel").exists());
    }

    #[test]
    fn unmount_below_takes_hook_mounts_deepest_first_and_nothing_else() {
        super::super::enter_private_namespace().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        // A sibling whose name starts like the root's: outside it.
        let sibling = dir.path().join("mnt2");
        for d in [&root, &sibling] {
            fs::create_dir(d).unwrap();
        }
        let tmpfs = |at: &Path| {
            mount(
                Some("tmpfs"),
                at,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap()
        };
        // The root itself is a mount point (a disk's root file system): it stays.
        tmpfs(&root);
        tmpfs(&sibling);
        for d in ["a", "keep", "host"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::write(sibling.join("sentinel"), "keep").unwrap();
        mount(
            Some(&sibling),
            &root.join("host"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        tmpfs(&root.join("a"));
        fs::create_dir(root.join("a/b")).unwrap();
        tmpfs(&root.join("a/b"));
        tmpfs(&root.join("keep"));

        let done = unmount_below_except(&root, &[root.join("keep")]).unwrap();
        assert_eq!(
            done,
            [root.join("a/b"), root.join("a"), root.join("host")],
            "deepest first"
        );
        let left: Vec<PathBuf> = mounts_at_or_under(dir.path())
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(left, [root.clone(), sibling.clone(), root.join("keep")]);
        assert_eq!(
            fs::read_to_string(sibling.join("sentinel")).unwrap(),
            "keep"
        );
        // Nothing left below but the kept one; then nothing at all below the root.
        assert!(
            unmount_below_except(&root, &[root.join("keep")])
                .unwrap()
                .is_empty()
        );
        assert_eq!(unmount_below(&root).unwrap(), [root.join("keep")]);
        unmount_all_under(dir.path()).unwrap();
    }

    #[test]
    fn tmpfs_needs_twice_the_minimum() {
        let total = mem_total_kib(&fs::read_to_string("/proc/meminfo").unwrap()).unwrap();
        let gib = total / (1024 * 1024);
        assert!(tmpfs_allowed(0));
        assert!(tmpfs_allowed(gib / 2));
        assert!(!tmpfs_allowed(gib / 2 + 1));
        assert!(!tmpfs_allowed(u64::MAX));
    }
}
