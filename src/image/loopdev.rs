//! Loop devices without udev or device-mapper: attach a file with `LOOP_CONFIGURE` (autoclear
//! and partition scan set atomically), find or make the partition nodes, detach.
//!
//! ```text
//! LoopDevice::attach(file, sector) ── /dev/loop-control GET_FREE ── open /dev/loopN ──
//!     LOOP_CONFIGURE {fd, block_size, AUTOCLEAR|PARTSCAN}      (retry if another process won)
//! partition(k) ── /sys/block/loopN/loopNpK? else `partx -a` ── /dev/loopNpK? else mknod
//! drop / detach ── close our fd: the kernel clears the device once the last opener (a mount)
//!     is gone, so a SIGKILLed build leaves nothing behind; detach() waits and falls back to
//!     LOOP_CLR_FD if someone else still holds it.
//! ```
//!
//! `losetup --find --show --partscan` followed by `LOOP_SET_STATUS64` would leave a window in
//! which a killed process leaks the device; `LOOP_CONFIGURE` (Linux 5.8) does not.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::ImageError;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const BLKRRPART: libc::c_ulong = 0x125F;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_PARTSCAN: u32 = 8;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. Holding it keeps the device alive; dropping it lets the kernel
/// clear the device as soon as nothing else (a mount, a partition opener) uses it.
#[derive(Debug)]
pub(crate) struct LoopDevice {
    dev: Option<File>,
    number: u32,
    path: PathBuf,
    /// Partition nodes we had to mknod ourselves (removed on detach).
    made_nodes: Vec<PathBuf>,
}

fn ioctl_err(what: &str, path: &Path) -> ImageError {
    ImageError::Device(format!(
        "{what} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    ))
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device with `block_size`-byte sectors.
    pub fn attach(backing: &Path, block_size: u32) -> Result<LoopDevice, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)
            .map_err(|e| ImageError::io(format!("opening {}", backing.display()), e))?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(|e| {
                ImageError::io(
                    "opening /dev/loop-control (is the loop module loaded and are you root?)",
                    e,
                )
            })?;
        let mut name = [0u8; 64];
        let shown = backing.as_os_str().as_encoded_bytes();
        let n = shown.len().min(63);
        name[..n].copy_from_slice(&shown[..n]);
        for _attempt in 0..20 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let number = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if number < 0 {
                return Err(ioctl_err(
                    "LOOP_CTL_GET_FREE",
                    Path::new("/dev/loop-control"),
                ));
            }
            let number = number as u32;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            ensure_node(&path, &format!("/sys/block/loop{number}/dev"))?;
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
            let config = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN,
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: `config` is a properly laid out `struct loop_config` that outlives the call.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
            if rc == 0 {
                return Ok(LoopDevice {
                    dev: Some(dev),
                    number,
                    path,
                    made_nodes: Vec::new(),
                });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
                return Err(ImageError::Device(format!(
                    "LOOP_CONFIGURE of {} onto {}: {err} (strata needs Linux 5.8 or later)",
                    backing.display(),
                    path.display()
                )));
            }
            // Another process took this device between GET_FREE and CONFIGURE; try again.
        }
        Err(ImageError::Device(format!(
            "no free loop device for {} after 20 attempts",
            backing.display()
        )))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the kernel to re-read the partition table (after writing it through the device).
    pub fn reread_partitions(&self) -> Result<(), ImageError> {
        let dev = self.dev.as_ref().ok_or_else(|| {
            ImageError::Device(format!("{} is already released", self.path.display()))
        })?;
        // SAFETY: BLKRRPART takes no argument.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BLKRRPART as _) };
        if rc != 0 {
            return Err(ioctl_err("BLKRRPART", &self.path));
        }
        Ok(())
    }

    /// The device node of partition `k`, made available without udev.
    pub fn partition(&mut self, k: u32) -> Result<PathBuf, ImageError> {
        let n = self.number;
        let sys = PathBuf::from(format!("/sys/block/loop{n}/loop{n}p{k}"));
        let node = PathBuf::from(format!("/dev/loop{n}p{k}"));
        if !sys.exists() {
            // The kernel's scan did not register it (e.g. an exotic table): ask partx.
            let out = Command::new("partx")
                .args(["-a", "--nr", &k.to_string()])
                .arg(&self.path)
                .output();
            if !wait_for(&sys, Duration::from_secs(2)) {
                let detail = match out {
                    Ok(o) => super::partition::one_line(&o.stderr, &o.stdout),
                    Err(e) => e.to_string(),
                };
                return Err(ImageError::Device(format!(
                    "partition {k} of {} did not appear in {} (partx -a: {detail})",
                    self.path.display(),
                    sys.display()
                )));
            }
        }
        // devtmpfs creates the node; without it, make it from sysfs.
        if !wait_for(&node, Duration::from_millis(500)) {
            ensure_node(&node, &sys.join("dev").to_string_lossy())?;
            self.made_nodes.push(node.clone());
        }
        Ok(node)
    }

    /// Releases the device: closes our handle (autoclear detaches once no mount is left),
    /// waits up to `wait` for the kernel, then clears it explicitly if it is still bound.
    pub fn detach(mut self, wait: Duration) -> Result<(), ImageError> {
        self.release(wait)
    }

    fn release(&mut self, wait: Duration) -> Result<(), ImageError> {
        let Some(dev) = self.dev.take() else {
            return Ok(());
        };
        drop(dev);
        let bound = PathBuf::from(format!("/sys/block/loop{}/loop/backing_file", self.number));
        let deadline = Instant::now() + wait;
        while bound.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut result = Ok(());
        if bound.exists() {
            match OpenOptions::new().read(true).open(&self.path) {
                Ok(f) => {
                    // SAFETY: LOOP_CLR_FD takes no argument.
                    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _) };
                    if rc != 0 {
                        result = Err(ImageError::Device(format!(
                            "{} is still in use and could not be detached: {} (it detaches \
                             itself when its last user closes it)",
                            self.path.display(),
                            std::io::Error::last_os_error()
                        )));
                    }
                }
                Err(_) if !bound.exists() => {}
                Err(e) => {
                    result = Err(ImageError::io(
                        format!("opening {}", self.path.display()),
                        e,
                    ))
                }
            }
        }
        for node in self.made_nodes.drain(..) {
            let _ = std::fs::remove_file(node);
        }
        result
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.release(Duration::from_secs(2));
    }
}

fn wait_for(path: &Path, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes the block device node `node` from the `major:minor` in `sys_dev` unless it exists.
fn ensure_node(node: &Path, sys_dev: &str) -> Result<(), ImageError> {
    if let Ok(md) = std::fs::metadata(node)
        && md.file_type().is_block_device()
    {
        return Ok(());
    }
    let text = std::fs::read_to_string(sys_dev)
        .map_err(|e| ImageError::io(format!("reading {sys_dev}"), e))?;
    let (major, minor) = text
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| ImageError::Device(format!("{sys_dev} holds no major:minor")))?;
    nix::sys::stat::mknod(
        node,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| ImageError::Device(format!("mknod {}: {e}", node.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn attach_sets_autoclear_and_dropping_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.raw");
        File::create(&file).unwrap().set_len(8 << 20).unwrap();
        let dev = LoopDevice::attach(&file, 512).unwrap();
        let n = dev.number;
        let flags = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/autoclear")).unwrap();
        assert_eq!(flags.trim(), "1");
        let part = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/partscan")).unwrap();
        assert_eq!(part.trim(), "1");
        let backing =
            std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file")).unwrap();
        assert_eq!(backing.trim(), file.to_str().unwrap());
        dev.detach(Duration::from_secs(5)).unwrap();
        assert!(!Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists());
    }
}
