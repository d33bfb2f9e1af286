//! The sandbox: the build's private mount namespace, chroot mounts, and running a command on the
//! host or chrooted so that nothing it mounts or starts outlives the build.
//!
//! ```text
//! strata build ─► enter_private_namespace()        unshare(CLONE_NEWNS), "/" MS_REC|MS_PRIVATE
//!             ─► sweep_dead_build_dirs(TMP_DIR)     folders of dead builds (unlocked) removed
//!             ─► BuildDir::create(TMP_DIR, tmpfs)   mkdtemp, flock (+ tmpfs) = TMP_BUILD_DIR
//!   chroot phase ─► ChrootMounts::mount(root, hooks) proc, /dev, devpts, ro sysfs,
//!                                                    ro hooks at /tmp/in_target.d, resolv.conf
//!   each hook  ─► spawn(Exec)                        own pid namespace, dies with strata
//!                ChrootMounts::unmount()            tree byte-identical to before (except ctimes)
//!   hook mounts ─► left_below(root) after a step (recorded with it); mount_again(...) on a
//!                  tree restored from the cache; unmount_below(root) before outputs
//!             ─► BuildDir::cleanup()                unmount all below, remove without crossing mounts
//! ```
//!
//! This module is the only place in strata that mounts, unshares or chroots. Everything it
//! mounts lives in the private namespace, so a strata that dies (even by SIGKILL) leaves no
//! mount behind on the host: the namespace dies with the last process in it, and `spawn` makes
//! sure that every process a hook starts dies with strata.

mod builddir;
mod exec;
mod hookmounts;
mod mountinfo;
mod mounts;

use std::io;
use std::path::PathBuf;

pub(crate) use builddir::remove_tree_on_one_mount;
pub use builddir::{
    BuildDir, sweep_dead_build_dirs, tmpfs_allowed, unmount_below, unmount_below_except,
};
pub use exec::{Exec, SandboxChild, spawn, spawn_attached};
pub use hookmounts::{LeftMount, MountKind, left_below, mount_again};
pub use mountinfo::{MountEntry, mount_points_under, mounts_at_or_under};
pub use mounts::{ChrootMounts, HOST_RESOLV_FALLBACK, IN_TARGET_DIR, RESOLV_ASIDE};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// What went wrong in the sandbox. Every message is one line naming the path or hook involved.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot mount {what} on {}: {source} (strata must run as root with mount namespaces available)",
        target.display()
    )]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot unmount {}: {source}; check `findmnt -R {}`", target.display(), target.display())]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "cannot create a private mount namespace: {0} (strata build needs root and CLONE_NEWNS)"
    )]
    Namespace(#[source] nix::Error),
    #[error("refusing to use {}: {reason}", path.display())]
    UnsafePath { path: PathBuf, reason: String },
    #[error(
        "{} still has mounts below it after unmounting ({}); refusing to delete it",
        path.display(), mounts
    )]
    StillMounted { path: PathBuf, mounts: String },
    #[error("cannot start hook {hook}: {source}")]
    Spawn {
        hook: String,
        #[source]
        source: io::Error,
    },
    #[error("interrupted while running hook {hook}")]
    Interrupted { hook: String },
}

impl SandboxError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SandboxError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Moves the calling thread (and every process it starts afterwards) into a new mount
/// namespace in which "/" is recursively private, so that no mount strata or a hook makes
/// propagates to the host and all of them die with the namespace.
///
/// Call it while the process is single-threaded (first thing in `strata build`): a mount
/// namespace belongs to a thread, so threads started earlier stay in the host's namespace.
pub fn enter_private_namespace() -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(SandboxError::Namespace)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(SandboxError::Namespace)
}
