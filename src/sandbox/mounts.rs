//! The mounts a chroot phase sees (dib's `mount_proc_dev_sys`, the in_target.d bind and the
//! host's resolv.conf), and undoing them so the tree is exactly as before.
//!
//! ```text
//! ChrootMounts::mount(root, hooks_dir)
//!   root/proc             proc (nosuid,nodev,noexec)
//!   root/dev              rbind of the host's /dev (writes reach the host's /dev, as in dib)
//!   root/dev/pts          a NEW devpts instance (newinstance,ptmxmode=0666,mode=0620,gid=5)
//!   root/sys              sysfs, read-only (as dib: tools behave as in a container)
//!   root/tmp/in_target.d  hooks_dir, bind then remount ro (keeping nosuid/nodev/noexec)
//!   root/etc/resolv.conf  existing entry renamed to etc/.strata-resolv.conf.orig, an empty
//!                         regular file created, a private COPY of the host's resolv.conf (kept
//!                         next to root, removed on unmount) bound on it, so a hook writing to
//!                         it never changes the host's file
//! ChrootMounts::unmount() ─► reverse order; remove what was created; rename resolv.conf back;
//!                           put back the mtime of every directory strata touched (unless a hook
//!                           changed it meanwhile). Only ctimes differ afterwards.
//! ```
//!
//! devpts: dib mounts devpts with the host's options, which on kernels >= 4.7 is a new instance
//! anyway; strata asks for `newinstance` explicitly so ptys opened in the build are not the
//! host's, with `ptmxmode=0666` so `/dev/ptmx` (a host node that the kernel resolves to the
//! sibling `pts`) works for every user in the chroot.
//!
//! No mount target is ever reached through a symlink inside `root`: every component is checked
//! with lstat, and a symlink there is an error (an image with `/proc -> /host/path` cannot make
//! strata mount over the host).
//!
//! Trade-off: because resolv.conf is a bind mount, a package that *replaces* /etc/resolv.conf
//! during the build (rename over it) gets EBUSY, as it does in Docker.

use super::SandboxError;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::sys::time::TimeSpec;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Where the merged hooks tree appears inside the chroot.
pub const IN_TARGET_DIR: &str = "/tmp/in_target.d";
/// The name (in the image's /etc) an existing resolv.conf is kept under while mounted.
pub const RESOLV_ASIDE: &str = ".strata-resolv.conf.orig";
/// The content used when the host has no /etc/resolv.conf (dib's fallback).
pub const HOST_RESOLV_FALLBACK: &str = "nameserver 8.8.8.8\n";

#[derive(Debug)]
struct TouchedDir {
    path: PathBuf,
    before: TimeSpec,
    after: Option<TimeSpec>,
}

#[derive(Debug)]
enum Created {
    Dir(PathBuf),
    /// A file strata created, with its inode so a stranger is never removed.
    File(PathBuf, u64),
}

/// The mounts of one chroot session; `unmount` (or drop, best effort) undoes them.
#[derive(Debug)]
pub struct ChrootMounts {
    root: PathBuf,
    mounted: Vec<PathBuf>,
    created: Vec<Created>,
    touched: Vec<TouchedDir>,
    /// `root/etc/resolv.conf` was renamed to `root/etc/RESOLV_ASIDE`.
    resolv_aside: bool,
    resolv_copy: Option<tempfile::NamedTempFile>,
    done: bool,
}

fn mtime_of(path: &Path) -> Option<TimeSpec> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| TimeSpec::new(m.mtime(), m.mtime_nsec()))
}

impl ChrootMounts {
    /// Mounts proc, /dev, devpts, read-only sysfs, the read-only hooks tree and the host's
    /// resolv.conf into `root`. On error everything done so far is undone.
    pub fn mount(root: &Path, hooks_dir: &Path) -> Result<ChrootMounts, SandboxError> {
        let meta = fs::symlink_metadata(root).map_err(|e| SandboxError::io("inspect", root, e))?;
        if !meta.is_dir() {
            return Err(SandboxError::UnsafePath {
                path: root.to_path_buf(),
                reason: "the chroot root is not a directory".into(),
            });
        }
        let mut m = ChrootMounts::none(root);
        // On any error below, `m` is dropped and Drop undoes what was done.
        let noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

        let proc_dir = m.ensure_dir("proc", 0o555)?;
        m.mount_one("proc", Some("proc"), &proc_dir, Some("proc"), noexec, None)?;

        let dev_dir = m.ensure_dir("dev", 0o755)?;
        m.mount_one(
            "the host's /dev",
            Some("/dev"),
            &dev_dir,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        let pts = dev_dir.join("pts");
        if !fs::symlink_metadata(&pts).is_ok_and(|m| m.is_dir()) {
            return Err(SandboxError::UnsafePath {
                path: pts,
                reason: "the host's /dev has no pts directory".into(),
            });
        }
        m.mount_one(
            "devpts",
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        )?;

        let sys_dir = m.ensure_dir("sys", 0o555)?;
        m.mount_one(
            "sysfs (read-only)",
            Some("sysfs"),
            &sys_dir,
            Some("sysfs"),
            noexec | MsFlags::MS_RDONLY,
            None,
        )?;

        m.ensure_dir("tmp", 0o1777)?;
        let in_target = m.ensure_dir(IN_TARGET_DIR.trim_start_matches('/'), 0o755)?;
        let hooks_meta =
            fs::metadata(hooks_dir).map_err(|e| SandboxError::io("inspect", hooks_dir, e))?;
        if !hooks_meta.is_dir() {
            return Err(SandboxError::UnsafePath {
                path: hooks_dir.to_path_buf(),
                reason: "the hooks tree is not a directory".into(),
            });
        }
        m.mount_one(
            "the hooks tree",
            Some(hooks_dir),
            &in_target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
        let keep = statvfs(hooks_dir)
            .map(|s| s.flags())
            .unwrap_or(FsFlags::empty());
        let mut ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if keep.contains(fs_flag) {
                ro |= ms_flag;
            }
        }
        mount(None::<&str>, &in_target, None::<&str>, ro, None::<&str>).map_err(|source| {
            SandboxError::Mount {
                what: "the hooks tree read-only".into(),
                target: in_target.clone(),
                source,
            }
        })?;

        m.mount_resolv_conf()?;

        for t in &mut m.touched {
            t.after = mtime_of(&t.path);
        }
        Ok(m)
    }

    /// Undoes everything `mount` did, in reverse order.
    pub fn unmount(mut self) -> Result<(), SandboxError> {
        self.done = true;
        self.undo()
    }

    /// The session of a host step: no proc/dev/sys, but once the image has an `/etc`, the
    /// host's resolv.conf in place, as chroot steps get it (host hooks such as a base install
    /// often chroot themselves and need name resolution; the image's own file stays untouched).
    pub fn host(root: &Path) -> Result<ChrootMounts, SandboxError> {
        let mut m = ChrootMounts::none(root);
        if fs::symlink_metadata(root.join("etc")).is_ok_and(|e| e.is_dir()) {
            m.mount_resolv_conf()?;
            for t in &mut m.touched {
                t.after = mtime_of(&t.path);
            }
        }
        Ok(m)
    }

    /// A session with no mounts yet.
    pub fn none(root: &Path) -> ChrootMounts {
        ChrootMounts {
            root: root.to_path_buf(),
            mounted: Vec::new(),
            created: Vec::new(),
            touched: Vec::new(),
            resolv_aside: false,
            resolv_copy: None,
            done: false,
        }
    }

    /// Binds the host folder `source` on `root/<rel>` (a cache mount: what hooks write there is
    /// kept on the host between builds and never enters the image's layers), but only if
    /// `root/<rel>` already is a real directory reached through real directories; otherwise it
    /// does nothing and returns false. `source` is created if missing.
    pub fn bind_cache(&mut self, rel: &Path, source: &Path) -> Result<bool, SandboxError> {
        let mut cur = self.root.clone();
        for comp in rel.components() {
            let Component::Normal(name) = comp else {
                continue;
            };
            cur.push(name);
            match fs::symlink_metadata(&cur) {
                Ok(meta) if meta.is_dir() => {}
                _ => return Ok(false),
            }
        }
        if cur == self.root {
            return Ok(false);
        }
        fs::create_dir_all(source)
            .map_err(|e| SandboxError::io("create the cache folder", source, e))?;
        self.mount_one(
            "a cache folder",
            Some(source),
            &cur,
            None::<&str>,
            MsFlags::MS_BIND,
            None,
        )?;
        Ok(true)
    }

    /// `root/<rel>` with every existing component checked to be a real directory; missing
    /// ones are created (and remembered).
    fn ensure_dir(&mut self, rel: &str, mode: u32) -> Result<PathBuf, SandboxError> {
        let mut cur = self.root.clone();
        for comp in Path::new(rel).components() {
            let Component::Normal(name) = comp else {
                continue;
            };
            let next = cur.join(name);
            match fs::symlink_metadata(&next) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(SandboxError::UnsafePath {
                        path: next,
                        reason: "expected a directory (not a symlink or file) to mount on; fix the image"
                            .into(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.touch(&cur);
                    fs::DirBuilder::new()
                        .mode(mode)
                        .create(&next)
                        .map_err(|e| SandboxError::io("create the mount point", &next, e))?;
                    // mkdir applies the umask; set the exact mode.
                    fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(mode))
                        .map_err(|e| SandboxError::io("set the mode of", &next, e))?;
                    self.created.push(Created::Dir(next.clone()));
                }
                Err(e) => return Err(SandboxError::io("inspect", &next, e)),
            }
            cur = next;
        }
        Ok(cur)
    }

    /// Remembers a directory's mtime before strata first changes its entries.
    fn touch(&mut self, dir: &Path) {
        if self.touched.iter().any(|t| t.path == dir) {
            return;
        }
        if let Some(before) = mtime_of(dir) {
            self.touched.push(TouchedDir {
                path: dir.to_path_buf(),
                before,
                after: None,
            });
        }
    }

    fn mount_one<S: AsRef<Path> + ?Sized>(
        &mut self,
        what: &str,
        source: Option<&S>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SandboxError> {
        mount(source.map(|s| s.as_ref()), target, fstype, flags, data).map_err(|source| {
            SandboxError::Mount {
                what: what.to_string(),
                target: target.to_path_buf(),
                source,
            }
        })?;
        self.mounted.push(target.to_path_buf());
        Ok(())
    }

    fn mount_resolv_conf(&mut self) -> Result<(), SandboxError> {
        let etc = self.ensure_dir("etc", 0o755)?;
        let target = etc.join("resolv.conf");
        let aside = etc.join(RESOLV_ASIDE);
        if fs::symlink_metadata(&aside).is_ok() {
            return Err(SandboxError::UnsafePath {
                path: aside,
                reason:
                    "left over from an interrupted build; move it back to resolv.conf or delete it"
                        .into(),
            });
        }

        let content = fs::read("/etc/resolv.conf").unwrap_or_else(|_| HOST_RESOLV_FALLBACK.into());
        // The copy lives next to the root (in the build dir, so on its tmpfs when there is
        // one, and gone with it even if strata is killed).
        let copy_dir = self
            .root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let mut copy = tempfile::Builder::new()
            .prefix(".strata-resolv.")
            .tempfile_in(&copy_dir)
            .map_err(|e| SandboxError::io("create a copy of", "/etc/resolv.conf", e))?;
        copy.write_all(&content)
            .and_then(|()| copy.as_file().sync_all())
            .map_err(|e| SandboxError::io("write", copy.path().to_path_buf(), e))?;
        fs::set_permissions(
            copy.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(|e| SandboxError::io("set the mode of", copy.path().to_path_buf(), e))?;

        if fs::symlink_metadata(&target).is_ok() {
            self.touch(&etc);
            fs::rename(&target, &aside).map_err(|e| SandboxError::io("move aside", &target, e))?;
            self.resolv_aside = true;
        }
        self.touch(&etc);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
            .map_err(|e| SandboxError::io("create", &target, e))?;
        let ino = file
            .metadata()
            .map_err(|e| SandboxError::io("inspect", &target, e))?
            .ino();
        drop(file);
        self.created.push(Created::File(target.clone(), ino));
        let copy_path = copy.path().to_path_buf();
        self.resolv_copy = Some(copy);
        self.mount_one(
            "a copy of the host's resolv.conf",
            Some(&copy_path),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )
    }

    fn undo(&mut self) -> Result<(), SandboxError> {
        let mut first: Option<SandboxError> = None;
        let mut note = |e: SandboxError| {
            tracing::warn!("{e}");
            if first.is_none() {
                first = Some(e);
            }
        };
        // Directories nobody but strata changed since mount() get their mtime back.
        let restore: Vec<(PathBuf, TimeSpec)> = self
            .touched
            .iter()
            .filter(|t| t.after.is_some() && mtime_of(&t.path) == t.after)
            .map(|t| (t.path.clone(), t.before))
            .collect();

        for target in self.mounted.drain(..).rev() {
            let res = match umount2(&target, MntFlags::empty()) {
                Err(nix::Error::EBUSY) => umount2(&target, MntFlags::MNT_DETACH),
                other => other,
            };
            if let Err(source) = res {
                note(SandboxError::Unmount { target, source });
            }
        }
        for created in std::mem::take(&mut self.created).into_iter().rev() {
            match created {
                Created::Dir(p) => {
                    if let Err(e) = fs::remove_dir(&p) {
                        note(SandboxError::io("remove the mount point", p, e));
                    }
                }
                Created::File(p, ino) => match fs::symlink_metadata(&p) {
                    Ok(m) if m.ino() == ino && m.is_file() => {
                        if let Err(e) = fs::remove_file(&p) {
                            note(SandboxError::io("remove", p, e));
                        }
                    }
                    Ok(_) => note(SandboxError::UnsafePath {
                        path: p,
                        reason: "was replaced during the build; left in place".into(),
                    }),
                    Err(e) => note(SandboxError::io("inspect", p, e)),
                },
            }
        }
        if self.resolv_aside {
            let etc = self.root.join("etc");
            let (aside, target) = (etc.join(RESOLV_ASIDE), etc.join("resolv.conf"));
            if fs::symlink_metadata(&target).is_ok() {
                note(SandboxError::UnsafePath {
                    path: target,
                    reason: format!("exists, so the original stays at {RESOLV_ASIDE}"),
                });
            } else if let Err(e) = fs::rename(&aside, &target) {
                note(SandboxError::io("move back", aside, e));
            }
            self.resolv_aside = false;
        }
        self.resolv_copy = None;
        for (path, mtime) in restore {
            if fs::symlink_metadata(&path).is_err() {
                // A directory strata created and removed again.
                continue;
            }
            if let Err(e) = utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &TimeSpec::UTIME_OMIT,
                &mtime,
                UtimensatFlags::NoFollowSymlink,
            ) {
                note(SandboxError::io("restore the mtime of", path, e.into()));
            }
        }
        self.touched.clear();
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.undo();
        }
    }
}
