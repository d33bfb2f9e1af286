//! Mounts that hooks leave below the image root (dib's `dpkg` element binds its apt cache on
//! the image's `/var/cache/apt/archives` from root.d): read back from the mount table, and made
//! again on a tree restored from the cache.
//!
//! ```text
//! left_below(root) ─► every mount strictly below root, in mount order, as a LeftMount:
//!   another (earlier) mount of the same device shows a folder holding its root
//!       ─► Bind { from: that mount's point + the rest of the root }   (a host folder, a folder
//!          of the image, or a whole file system another mount shows)
//!   root "/" and no other mount of that device ─► Fresh { fstype, source, data } (a tmpfs, a
//!          device nobody else mounted)
//!   a sub-folder of a file system no mount here shows ─► Unreachable (cannot be made again)
//! mount_again(root, target, kind, options) ─► target reached through real directories only
//!   (missing ones created 0755, an empty file for a file bind, a symlink refused) ─► the bind
//!   source folder created if gone (as the hook's `mkdir -p` would) ─► mount(2) ─► a bind remount
//!   with the recorded flags (ro, nosuid, nodev, noexec, atime) ─► the new mount's id
//! ```
//!
//! A bind mount's source is found the way `findmnt` shows it: the mount table names the device
//! and the folder of its file system that is mounted (`root`), so the host path is the mount
//! point of another mount of that device plus the rest of that folder.

use super::SandboxError;
use super::mountinfo::{MountEntry, canonical, read_mountinfo};
use nix::mount::{MsFlags, mount};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

/// What a mount below the image root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A bind mount of `from` (an absolute host path; it may lie inside the image root).
    Bind { from: PathBuf },
    /// A file system of its own: `mount -t FSTYPE SOURCE -o DATA`.
    Fresh {
        fstype: String,
        source: String,
        data: String,
    },
    /// Something that cannot be made again (says why).
    Unreachable { reason: String },
}

/// One mount a hook left below the image root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftMount {
    /// Its id in the mount table (to tell it from one made later at the same place).
    pub id: u64,
    /// The mount point, relative to the image root.
    pub target: PathBuf,
    pub kind: MountKind,
    /// The file-system type as the kernel shows it (for messages and records).
    pub fstype: String,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
}

/// The folder a mount shows of its file system, without the kernel's `//deleted` mark.
fn shown_root(m: &MountEntry) -> PathBuf {
    let bytes = m.root.as_os_str().as_bytes();
    let bytes = bytes.strip_suffix(b"//deleted").unwrap_or(bytes);
    PathBuf::from(OsStr::from_bytes(bytes))
}

/// Every mount strictly below `root`, in mount order (a mount comes after the one it sits on).
pub fn left_below(root: &Path) -> Result<Vec<LeftMount>, SandboxError> {
    let base = canonical(root);
    let table =
        read_mountinfo().map_err(|e| SandboxError::io("read the mount table for", root, e))?;
    let mut out = Vec::new();
    for (i, m) in table.iter().enumerate() {
        let Ok(rel) = m.mount_point.strip_prefix(&base) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mroot = shown_root(m);
        // The earlier mount of the same device showing the longest folder that holds mroot.
        let shown_by = table[..i]
            .iter()
            .filter(|n| n.dev == m.dev && n.id != m.id)
            .filter_map(|n| {
                let nroot = shown_root(n);
                let rest = mroot.strip_prefix(&nroot).ok()?.to_path_buf();
                Some((nroot.components().count(), n, rest))
            })
            .max_by_key(|(depth, _, _)| *depth);
        let kind = match shown_by {
            Some((_, n, rest)) => MountKind::Bind {
                from: if rest.as_os_str().is_empty() {
                    n.mount_point.clone()
                } else {
                    n.mount_point.join(rest)
                },
            },
            None if mroot == Path::new("/") => MountKind::Fresh {
                fstype: m.fs_type.clone(),
                source: m.source.clone(),
                data: fs_data(&m.super_options),
            },
            None => MountKind::Unreachable {
                reason: format!(
                    "it binds {} of {} ({}), a file system no mount here shows",
                    mroot.display(),
                    m.source,
                    m.fs_type
                ),
            },
        };
        out.push(LeftMount {
            id: m.id,
            target: rel.to_path_buf(),
            kind,
            fstype: m.fs_type.clone(),
            options: m.options.clone(),
        });
    }
    Ok(out)
}

/// The file system's own options as mount(2) data: without `rw`/`ro` (flags, not data).
fn fs_data(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
        .collect::<Vec<_>>()
        .join(",")
}

/// The mount flags a per-mount option list asks for.
pub(crate) fn flags_of(options: &str) -> MsFlags {
    let mut flags = MsFlags::empty();
    for o in options.split(',') {
        flags |= match o {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            _ => MsFlags::empty(),
        };
    }
    flags
}

/// Makes a mount a hook left at `root/<target>` again (see the module docs); returns its id.
pub fn mount_again(
    root: &Path,
    target: &Path,
    kind: &MountKind,
    options: &str,
) -> Result<u64, SandboxError> {
    let flags = flags_of(options);
    let file_target = match kind {
        MountKind::Bind { from } => {
            match fs::metadata(from) {
                Ok(m) => !m.is_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Gone (a fresh image cache, another builder): made as the hook made it.
                    fs::create_dir_all(from)
                        .map_err(|e| SandboxError::io("create the bind source", from, e))?;
                    false
                }
                Err(e) => return Err(SandboxError::io("inspect the bind source", from, e)),
            }
        }
        MountKind::Fresh { .. } => false,
        MountKind::Unreachable { reason } => {
            return Err(SandboxError::UnsafePath {
                path: root.join(target),
                reason: format!("the mount there cannot be made again: {reason}"),
            });
        }
    };
    let point = mount_point_in(root, target, file_target)?;
    let fail = |what: String| {
        let point = point.clone();
        move |source| SandboxError::Mount {
            what,
            target: point,
            source,
        }
    };
    match kind {
        MountKind::Bind { from } => {
            mount(
                Some(from.as_path()),
                &point,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(fail(format!("a bind of {}", from.display())))?;
            mount(
                None::<&str>,
                &point,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                None::<&str>,
            )
            .map_err(fail(format!(
                "a bind of {} with options {options}",
                from.display()
            )))?;
        }
        MountKind::Fresh {
            fstype,
            source,
            data,
        } => {
            mount(
                Some(source.as_str()),
                &point,
                Some(fstype.as_str()),
                flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(fail(format!("{fstype} ({source}, options {data})")))?;
        }
        MountKind::Unreachable { .. } => unreachable!("refused above"),
    }
    let table =
        read_mountinfo().map_err(|e| SandboxError::io("read the mount table for", &point, e))?;
    let real = canonical(&point);
    table
        .iter()
        .rev()
        .find(|m| m.mount_point == real)
        .map(|m| m.id)
        .ok_or_else(|| SandboxError::UnsafePath {
            path: point.clone(),
            reason: "mounted, but the mount table does not show it".into(),
        })
}

/// `root/<target>`, reached through real directories only: missing ones are created (0755, as
/// `mkdir -p`); the last one is an empty file when `file` is set. A symlink on the way is
/// refused (a restored image must not make strata mount outside it).
fn mount_point_in(root: &Path, target: &Path, file: bool) -> Result<PathBuf, SandboxError> {
    let names: Vec<&OsStr> = target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, _>>()
        .map_err(|()| SandboxError::UnsafePath {
            path: target.to_path_buf(),
            reason: "a recorded mount point must be a plain path below the image root".into(),
        })?;
    if names.is_empty() {
        return Err(SandboxError::UnsafePath {
            path: root.to_path_buf(),
            reason: "a recorded mount point is the image root itself".into(),
        });
    }
    let mut cur = root.to_path_buf();
    for (i, name) in names.iter().enumerate() {
        cur.push(name);
        let last = i + 1 == names.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(SandboxError::UnsafePath {
                    path: cur,
                    reason: "a symlink on the way to a mount point; fix the image".into(),
                });
            }
            Ok(m) if last && file && m.is_file() => {}
            Ok(m) if m.is_dir() && !(last && file) => {}
            Ok(_) => {
                return Err(SandboxError::UnsafePath {
                    path: cur,
                    reason: format!(
                        "expected a {} to mount on",
                        if last && file { "file" } else { "directory" }
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if last && file {
                    fs::File::create(&cur)
                        .map_err(|e| SandboxError::io("create the mount point", &cur, e))?;
                } else {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&cur)
                        .map_err(|e| SandboxError::io("create the mount point", &cur, e))?;
                }
            }
            Err(e) => return Err(SandboxError::io("inspect", &cur, e)),
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_data_drops_rw() {
        assert_eq!(
            flags_of("ro,nosuid,nodev,relatime"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RELATIME
        );
        assert_eq!(flags_of("rw"), MsFlags::empty());
        assert_eq!(fs_data("rw,size=1024k,mode=755"), "size=1024k,mode=755");
        assert_eq!(fs_data("ro"), "");
    }

    #[test]
    fn a_recorded_target_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc", ""] {
            assert!(
                mount_point_in(dir.path(), Path::new(bad), false).is_err(),
                "{bad}"
            );
        }
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        let e = mount_point_in(dir.path(), Path::new("link/x"), false).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        let p = mount_point_in(dir.path(), Path::new("a/b"), false).unwrap();
        assert!(p.is_dir());
        let f = mount_point_in(dir.path(), Path::new("a/f"), true).unwrap();
        assert!(f.is_file());
    }

    #[test]
    fn a_bind_of_a_host_folder_is_read_back_with_its_source_and_made_again() {
        super::super::enter_private_namespace().unwrap();
        let host = tempfile::tempdir().unwrap();
        let src = host.path().join("apt");
        fs::create_dir(&src).unwrap();
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::create_dir_all(root.join("var/cache/x")).unwrap();
        mount(
            Some(&src),
            &root.join("var/cache/x"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let left = left_below(root).unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].target, Path::new("var/cache/x"));
        assert_eq!(
            left[0].kind,
            MountKind::Bind {
                from: canonical(&src)
            }
        );
        crate::sandbox::unmount_below(root).unwrap();
        fs::remove_dir(&src).unwrap();
        fs::remove_dir_all(root.join("var")).unwrap();
        // Gone source and mount point: both made again.
        let id = mount_again(root, &left[0].target, &left[0].kind, &left[0].options).unwrap();
        fs::write(root.join("var/cache/x/f"), "y").unwrap();
        assert_eq!(fs::read_to_string(src.join("f")).unwrap(), "y");
        assert_eq!(left_below(root).unwrap()[0].id, id);
        crate::sandbox::unmount_below(root).unwrap();
        assert!(!root.join("var/cache/x/f").exists());
    }
}
