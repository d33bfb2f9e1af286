//! vfat file systems on a kernel that cannot mount vfat (no CONFIG_VFAT_FS, as on the machines
//! strata's CI runs on): the file system is still made by mkfs.vfat on its partition, but its
//! mount point gets a tmpfs instead, where pre-finalise.d, finalise.d and cleanup.d write as
//! usual; at unmount the files are written into the file system with mtools, which needs no
//! kernel support.
//!
//! ```text
//! Disk::build, Mount node of a vfat fs whose mount fails and the kernel still lists no vfat
//! (mounting would have loaded a vfat module):
//!   stage(mount point)                tmpfs (mode 0755); mcopy must be installed
//! Disk::unmount / unmount_reproducible, before anything is unmounted:
//!   commit(device, mount point, epoch) (with an epoch: mtimes clamped first, see repack)
//!       mcopy -s -p -m -Q -i <device> <each top-level entry, sorted> ::/
//!       (-m keeps mtimes: with SOURCE_DATE_EPOCH and mkfs.vfat --invariant the ESP repeats)
//! then the tmpfs is unmounted like any mount; a rolled-back disk just drops it.
//! Disk::unmount_reproducible, a vfat the kernel did mount: its files are copied out before
//! unmounting, then remake(device, mkfs, files, epoch): mkfs.vfat again (same arguments,
//! --invariant), and commit as above, so a kernel-mounted ESP repeats as well.
//! ```
//!
//! Hooks see a directory, not a FAT mount: `grub-install --target=x86_64-efi` probes the file
//! system under `--efi-directory` and refuses a tmpfs, so strata's bootloader element makes the
//! removable-path loader with grub-mkimage instead (what grub-install --removable writes).

use std::path::Path;
use std::process::Command;

use nix::mount::MsFlags;

use super::repack::MkfsCommand;
use super::{ImageError, run_tool};

/// True when the running kernel lists `fstype` in /proc/filesystems.
pub(crate) fn kernel_can_mount(fstype: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

/// Mounts the staging tmpfs on `path` for the vfat file system on `device`.
pub(crate) fn stage(device: &Path, path: &Path) -> Result<(), ImageError> {
    if crate::tools::on_host_path("mcopy").is_none() {
        return Err(ImageError::Device(format!(
            "this kernel cannot mount vfat (not in /proc/filesystems), so strata writes {} \
             into {} with mtools, but mcopy is not installed: install mtools",
            path.display(),
            device.display()
        )));
    }
    nix::mount::mount(
        Some("strata-vfat"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| {
        ImageError::Device(format!(
            "mounting a staging tmpfs on {} for the vfat file system {}: {e}",
            path.display(),
            device.display()
        ))
    })?;
    tracing::info!(
        "this kernel cannot mount vfat: {} is a staging folder, written into {} with mtools \
         when the disk is unmounted",
        path.display(),
        device.display()
    );
    Ok(())
}

/// Makes the vfat file system on `device` again with the arguments it was made with and writes
/// the files under `dir` into it, times clamped to `epoch`: how a reproducible unmount rebuilds
/// a vfat file system the kernel had mounted (its files copied out first).
pub(crate) fn remake(
    device: &Path,
    mkfs: &MkfsCommand,
    dir: &Path,
    epoch: i64,
) -> Result<(), ImageError> {
    run_tool(
        Command::new(&mkfs.program)
            .args(&mkfs.args)
            .arg(device)
            .envs(mkfs.env.iter().map(|(k, v)| (k, v)))
            .env("SOURCE_DATE_EPOCH", epoch.to_string()),
    )?;
    commit(device, dir, Some(epoch))
}

/// Writes everything under the staging folder `dir` into the vfat file system on `device`.
/// With `epoch`, mtimes later than it are clamped first, so the FAT's times repeat.
pub(crate) fn commit(device: &Path, dir: &Path, epoch: Option<i64>) -> Result<(), ImageError> {
    if let Some(epoch) = epoch {
        super::repack::clamp_mtimes(dir, epoch)?;
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
    if entries.is_empty() {
        return Ok(());
    }
    entries.sort();
    let mut cmd = Command::new("mcopy");
    cmd.args(["-s", "-p", "-m", "-Q", "-i"])
        .arg(device)
        .args(&entries)
        .arg("::/")
        .env("MTOOLS_SKIP_CHECK", "1");
    run_tool(&mut cmd).map_err(|e| match e {
        ImageError::Command { command, detail } => ImageError::Command {
            command,
            detail: format!(
                "{detail} (is the vfat file system big enough for {}?)",
                dir.display()
            ),
        },
        other => other,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vfat_mkfs() -> MkfsCommand {
        MkfsCommand {
            program: "mkfs".into(),
            args: ["-t", "vfat", "--invariant", "-n", "ESP", "-i", "1234ABCD"]
                .map(String::from)
                .to_vec(),
            env: Vec::new(),
        }
    }

    fn mdir(image: &Path) -> String {
        run_tool(
            Command::new("mdir")
                .args(["-/", "-b", "-i"])
                .arg(image)
                .arg("::/")
                .env("MTOOLS_SKIP_CHECK", "1"),
        )
        .unwrap()
    }

    #[test]
    fn remake_gives_the_same_bytes_from_the_same_files_and_drops_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(files.join("EFI/BOOT")).unwrap();
        std::fs::write(files.join("EFI/BOOT/BOOTX64.EFI"), "loader").unwrap();
        let mut images = Vec::new();
        for name in ["a.img", "b.img"] {
            let image = dir.path().join(name);
            std::fs::File::create(&image)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            // What the kernel-mounted file system held before: gone after the remake.
            let mkfs = vfat_mkfs();
            run_tool(Command::new(&mkfs.program).args(&mkfs.args).arg(&image)).unwrap();
            let junk = dir.path().join("junk");
            std::fs::create_dir_all(&junk).unwrap();
            std::fs::write(junk.join("OLD.TXT"), "old").unwrap();
            commit(&image, &junk, None).unwrap();
            assert!(mdir(&image).contains("OLD.TXT"));
            remake(&image, &mkfs, &files, 1_700_000_000).unwrap();
            images.push(image);
            // The files' mtimes are "now": the second image is made a clock tick later.
            std::thread::sleep(std::time::Duration::from_millis(2100));
            let now = std::time::SystemTime::now();
            std::fs::File::options()
                .write(true)
                .open(files.join("EFI/BOOT/BOOTX64.EFI"))
                .unwrap()
                .set_modified(now)
                .unwrap();
        }
        let listing = mdir(&images[0]);
        assert!(
            listing.contains("BOOTX64.EFI") && !listing.contains("OLD.TXT"),
            "{listing}"
        );
        assert_eq!(
            std::fs::read(&images[0]).unwrap(),
            std::fs::read(&images[1]).unwrap(),
            "the two remade file systems differ"
        );
    }
}
