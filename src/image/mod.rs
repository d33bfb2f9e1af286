//! The disk image: dib's block-device config, partition tables, loop devices (no
//! device-mapper, no udev), filesystems, mounts, fstab, and the qemu-img outputs.
//!
//! The executor drives one image as a fixed sequence:
//!
//! ```text
//! YAML ──parse_config──► BlockDeviceConfig (graph form, validated)
//!        merge_rootfs_params(&Params)          dib's _merge_rootfs_params (node `mkfs_root`)
//!        root_label / root_fstype / boot_label / mount_points      dib's `getval`
//! create(&config, &Params) ──► Disk: sparse <image_dir>/<name>.raw, partition table written with
//!        sfdisk, attached by LOOP_CONFIGURE (autoclear + partscan, so the kernel detaches the
//!        device once the last user goes away, even after a SIGKILL), mkfs, mounts under
//!        mount_base in sorted mount-point order
//! (executor: unpack the tree into root_mount(), write fstab(), run finalise.d in a chroot)
//! Disk::unmount ──► fstrim, umount in reverse, detach ──► raw image path
//! Disk::unmount_reproducible(epoch) ──► the same, after making each mounted ext file system
//!        again from its files (repack.rs), so the raw bytes repeat
//! vfat on a kernel without vfat: a staging tmpfs at its mount point, written into the file
//!        system with mtools before unmounting (staged.rs)
//! convert(raw, "qcow2", out, ..)   qemu-img, stopped on SIGINT/SIGTERM
//! ```
//!
//! With `Params::seed` set, every identifier (MBR disk id, GPT disk and partition GUIDs, file
//! system UUIDs, the ext4 directory hash seed, mkfs timestamps) is derived from the seed, so
//! the bytes mkfs and sfdisk write are the same on every run. What the kernel writes once the
//! file systems are mounted (inode change/birth times, journal commit times, mount times, block
//! placement) is not under our control, so [`Disk::unmount_reproducible`] replaces each mounted
//! ext file system by one made again from its files (see `repack.rs`).

mod config;
mod convert;
mod disk;
mod loopdev;
mod partition;
pub mod qcow2;
mod repack;
mod size;
mod staged;

use std::path::PathBuf;

pub use config::{BlockDeviceConfig, default_config, parse_config};
pub use convert::{convert, copy_tree};
pub use disk::{Disk, Rebuild, create};
pub use size::{ESP_MIB, image_bytes, image_size_for_tree};

/// What the block-device layer needs from the build (dib's `params.yaml`).
#[derive(Debug, Clone)]
pub struct Params {
    /// Where `<name>.raw` is created (dib's `image-dir`, `$TMP_IMAGE_DIR`).
    pub image_dir: PathBuf,
    /// The default size of every `local_loop` without a `size`, in bytes.
    pub image_size: u64,
    /// dib's `root-fs-type` (`$FS_TYPE`), merged into the `mkfs_root` node.
    pub root_fs_type: String,
    /// dib's `root-label` (`$ROOT_LABEL`); `None` picks `cloudimg-rootfs` (`img-rootfs` on xfs).
    pub root_label: Option<String>,
    /// dib's `root-fs-opts` (`$MKFS_OPTS`), split on spaces like dib.
    pub root_fs_opts: Option<String>,
    /// Where the file systems are mounted (`/` is mounted here itself).
    pub mount_base: PathBuf,
    /// When set, every identifier is derived from it, so runs are byte-for-byte repeatable.
    pub seed: Option<[u8; 32]>,
    /// The build's SOURCE_DATE_EPOCH: what seeded mkfs runs stamp (`DEFAULT_EPOCH` without it).
    pub epoch: Option<i64>,
}

/// Everything that can go wrong in the block-device layer. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The block-device config is invalid (dib's wording where dib has one).
    #[error("block-device config: {0}")]
    Config(String),
    /// An external tool failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// A file or device operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The loop device or a partition device could not be set up or released.
    #[error("{0}")]
    Device(String),
    /// SIGINT/SIGTERM arrived while a tool ran.
    #[error("{0}")]
    Cancelled(#[from] crate::cancel::Cancelled),
}

impl ImageError {
    /// True when the user's input (config, params) is at fault rather than the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ImageError::Config(_))
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Runs a tool with `LC_ALL=C` and returns its stdout; a failure is one line naming the
/// command, its status and what it printed.
pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<String, ImageError> {
    let shown = format!("{cmd:?}").replace('"', "");
    cmd.env("LC_ALL", "C");
    let out = crate::tools::output(cmd).map_err(|e| {
        match e
            .get_ref()
            .and_then(|i| i.downcast_ref::<crate::cancel::Cancelled>())
        {
            Some(c) => ImageError::Cancelled(*c),
            None => ImageError::Command {
                command: shown.clone(),
                detail: format!("cannot run it: {e}"),
            },
        }
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                partition::one_line(&out.stderr, &out.stdout)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Derives a 16-byte identifier for `purpose`/`name` from the build's seed (strata's one key
/// derivation, `crate::key::Keyed::ImageId`).
pub(crate) fn derive_id(seed: &[u8; 32], purpose: &str, name: &str) -> [u8; 16] {
    let key = crate::key::Keyed::ImageId {
        seed,
        purpose,
        name,
    }
    .bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&key[..16]);
    out
}

/// Formats 16 bytes as a random-looking (version 4, variant 1) UUID string.
pub(crate) fn uuid_string(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// 32 random bytes from the kernel, for builds without a seed.
pub(crate) fn random_seed() -> Result<[u8; 32], ImageError> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| ImageError::io("reading /dev/urandom for image identifiers", e))?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_depend_on_seed_purpose_and_name() {
        let a = derive_id(&[1; 32], "fs", "root");
        assert_eq!(a, derive_id(&[1; 32], "fs", "root"));
        assert_ne!(a, derive_id(&[2; 32], "fs", "root"));
        assert_ne!(a, derive_id(&[1; 32], "part", "root"));
        assert_ne!(a, derive_id(&[1; 32], "fs", "boot"));
        let u = uuid_string(a);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
