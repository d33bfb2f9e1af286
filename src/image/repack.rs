//! Reproducible ext file systems: the "same raw bytes from two cold builds" half of
//! deterministic images.
//!
//! Seeded identifiers make what sfdisk and mkfs write identical on every run, but once the
//! kernel mounts an ext file system for finalise.d it writes mount, write and commit times,
//! the change and birth times of every inode the hooks touched, and places blocks as it likes.
//! So when the build has a SOURCE_DATE_EPOCH, each mounted ext2/3/4 file system is rebuilt
//! from its own finished tree before the disk is released (`Disk::unmount_reproducible`):
//!
//! ```text
//! while mounted:   rebuild(mount, mkfs, size, work, epoch)
//!   bind <mount> → <work>/tree             not recursive: only this file system's own files
//!   clamp_mtimes(tree, epoch)              mtimes after the epoch become the epoch
//!   remount the bind read-only             (so reading does not touch atimes)
//!   mke2fs <the original mkfs arguments> -d tree <work>/<name>.ext
//!                                          same size, UUID, label and hash seed;
//!                                          E2FSPROGS_FAKE_TIME=epoch; mke2fs reads each
//!                                          directory in sorted order
//!   umount the bind
//!   fix_inodes(image): debugfs sets atime, ctime, crtime := epoch on every used inode, and the
//!                      root directory's mode, owner and mtime (mke2fs -d leaves them default)
//! unmounted, before detach:
//!   superblock_difference(old device, image)   a hook's tune2fs (features, reserved blocks,
//!                                              mount-count limits, …) wins: that file system
//!                                              is kept as it is, with a warning
//! detached:
//!   grub_core_sector(raw) inside the range → kept as it is (grub loads core.img by block list
//!                                            from inside that file system)
//!   write_into(raw, placement, image)      punch the range, copy the image's data extents
//! ```
//!
//! GRUB's BIOS core.img lives in the gap before the first partition (or in a BIOS boot
//! partition) and finds `/boot/grub` by file system UUID, which the rebuild keeps, so the image
//! still boots: the CI boot test builds with SOURCE_DATE_EPOCH. vfat is made again from its
//! files with mkfs.vfat and mtools (staged.rs). Not rebuilt: xfs, and inode flags set with
//! chattr (mke2fs -d does not copy them).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::{ImageError, run_tool};

/// `E2FSPROGS_FAKE_TIME` for `epoch`: e2fsprogs reads 0 as "not set" (and uses the clock), so
/// the epoch 0 is stamped as 1 second.
pub(crate) fn fake_time(epoch: i64) -> String {
    epoch.max(1).to_string()
}

/// The file system types that are rebuilt.
pub(crate) fn is_rebuilt_type(fstype: &str) -> bool {
    matches!(fstype, "ext2" | "ext3" | "ext4")
}

/// How a file system was made: the mkfs program, its arguments without the device, and the
/// environment it ran with.
#[derive(Debug, Clone)]
pub(crate) struct MkfsCommand {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Where a file system's bytes live in its raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub raw: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// Unmounts the bind (lazily as the last resort) when dropped, so no error path leaves it.
struct BindGuard(PathBuf);

impl Drop for BindGuard {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.0, MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }
}

/// Builds `<work>/<name>.ext`: a fresh file system of `len` bytes made by `mkfs` (plus `-d`)
/// from the files of the file system mounted at `mount`, with every timestamp at or before
/// `epoch`.
pub(crate) fn rebuild(
    name: &str,
    mount: &Path,
    mkfs: &MkfsCommand,
    len: u64,
    work: &Path,
    epoch: i64,
) -> Result<PathBuf, ImageError> {
    let tree = work.join(format!("{name}.tree"));
    let image = work.join(format!("{name}.ext"));
    fs::create_dir_all(&tree)
        .map_err(|e| ImageError::io(format!("creating {}", tree.display()), e))?;
    let root_meta = {
        nix::mount::mount(
            Some(mount),
            &tree,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            ImageError::Device(format!(
                "binding {} on {}: {e}",
                mount.display(),
                tree.display()
            ))
        })?;
        let _bind = BindGuard(tree.clone());
        clamp_mtimes(&tree, epoch)?;
        nix::mount::mount(
            None::<&str>,
            &tree,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| ImageError::Device(format!("remounting {} read-only: {e}", tree.display())))?;
        let root_meta = fs::symlink_metadata(&tree)
            .map_err(|e| ImageError::io(format!("reading {}", tree.display()), e))?;
        let _ = fs::remove_file(&image);
        File::create(&image)
            .and_then(|f| f.set_len(len))
            .map_err(|e| ImageError::io(format!("creating {}", image.display()), e))?;
        let mut cmd = Command::new(&mkfs.program);
        cmd.args(&mkfs.args)
            .arg("-d")
            .arg(&tree)
            .arg(&image)
            .envs(mkfs.env.iter().map(|(k, v)| (k, v)))
            .env("E2FSPROGS_FAKE_TIME", fake_time(epoch))
            .env("SOURCE_DATE_EPOCH", epoch.to_string());
        run_tool(&mut cmd)?;
        root_meta
    };
    fs::remove_dir(&tree).map_err(|e| ImageError::io(format!("removing {}", tree.display()), e))?;
    fix_inodes(&image, epoch, &root_meta, work)?;
    Ok(image)
}

/// Sets the mtime of every path under `root` (itself included, symlinks not followed) that is
/// later than `epoch` to `epoch`. Stays on `root`'s file system.
pub(crate) fn clamp_mtimes(root: &Path, epoch: i64) -> Result<(), ImageError> {
    let dev = fs::symlink_metadata(root)
        .map_err(|e| ImageError::io(format!("reading {}", root.display()), e))?
        .dev();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        if md.dev() != dev {
            continue;
        }
        if (md.mtime(), md.mtime_nsec()) > (epoch, 0) {
            utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &TimeSpec::UTIME_OMIT,
                &TimeSpec::new(epoch, 0),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| {
                ImageError::io(format!("setting the mtime of {}", path.display()), e.into())
            })?;
        }
        if md.is_dir() {
            let entries = fs::read_dir(&path)
                .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// `dumpe2fs -h` of a device or image as key → value.
fn superblock(target: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let text = run_tool(Command::new("dumpe2fs").arg("-h").arg(target))?;
    Ok(parse_header(&text))
}

fn parse_header(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The superblock fields a rebuild must reproduce. Everything else (times, counters, free
/// counts, state, last mount point) is what the kernel or the contents change.
const STABLE_FIELDS: &[&str] = &[
    "Filesystem volume name",
    "Filesystem UUID",
    "Filesystem revision #",
    "Filesystem features",
    "Filesystem flags",
    "Default mount options",
    "Mount options",
    "Errors behavior",
    "Filesystem OS type",
    "Inode count",
    "Block count",
    "Reserved block count",
    "Overhead clusters",
    "First block",
    "Block size",
    "Fragment size",
    "Group descriptor size",
    "Reserved GDT blocks",
    "Blocks per group",
    "Inodes per group",
    "Flex block group size",
    "Maximum mount count",
    "Check interval",
    "Reserved blocks uid",
    "Reserved blocks gid",
    "First inode",
    "Inode size",
    "Required extra isize",
    "Desired extra isize",
    "Journal inode",
    "Default directory hash",
    "Directory Hash Seed",
    "Journal backup",
    "Checksum type",
    "Journal size",
];

/// Feature flags the kernel sets while a file system is mounted or after a crash.
const TRANSIENT_FEATURES: &[&str] = &["needs_recovery", "orphan_present"];

/// The first stable superblock field that differs between the file system on `old` and the
/// rebuilt `new`, as "field: old → new"; `None` when they agree.
pub(crate) fn superblock_difference(old: &Path, new: &Path) -> Result<Option<String>, ImageError> {
    Ok(first_difference(&superblock(old)?, &superblock(new)?))
}

fn first_difference(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Option<String> {
    let norm = |field: &str, v: Option<&String>| -> String {
        let v = v.map(String::as_str).unwrap_or("");
        if field == "Filesystem features" {
            v.split_whitespace()
                .filter(|f| !TRANSIENT_FEATURES.contains(f))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            v.to_string()
        }
    };
    STABLE_FIELDS.iter().find_map(|f| {
        let (a, b) = (norm(f, old.get(*f)), norm(f, new.get(*f)));
        (a != b).then(|| format!("{f}: {a:?} → {b:?}"))
    })
}

/// The used inode numbers of an ext image that the rebuild must give fixed times: the root
/// directory and everything from the first non-reserved inode on that no group lists as free.
fn used_inodes(dumpe2fs: &str) -> Result<Vec<u32>, String> {
    let header = parse_header(dumpe2fs);
    let number = |key: &str| -> Result<u32, String> {
        header
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("dumpe2fs printed no {key:?}"))
    };
    let count = number("Inode count")?;
    let first = number("First inode")?;
    let mut free = vec![false; count as usize + 1];
    for line in dumpe2fs.lines() {
        let Some(list) = line.trim_start().strip_prefix("Free inodes:") else {
            continue;
        };
        if !line.starts_with(' ') {
            continue; // the header's total, not a group's list
        }
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u32, u32) = match (a.trim().parse(), b.trim().parse()) {
                (Ok(a), Ok(b)) if a <= b && b <= count => (a, b),
                _ => return Err(format!("unexpected free inode range {part:?}")),
            };
            for i in a..=b {
                free[i as usize] = true;
            }
        }
    }
    Ok(std::iter::once(2)
        .chain((first..=count).filter(|&i| !free[i as usize]))
        .collect())
}

/// The debugfs script that gives `inodes` fixed times and the root directory `root`'s mode,
/// owner and (clamped) mtime.
fn inode_script(inodes: &[u32], large: bool, epoch: i64, root: &fs::Metadata) -> String {
    let mut s = String::new();
    let mut fields = vec!["atime", "ctime"];
    if large {
        fields.push("crtime");
    }
    for i in inodes {
        for f in &fields {
            s.push_str(&format!("sif <{i}> {f} @{epoch}\n"));
        }
        if large {
            for f in ["atime_extra", "ctime_extra", "crtime_extra"] {
                s.push_str(&format!("sif <{i}> {f} 0\n"));
            }
        }
    }
    let mtime = root.mtime().min(epoch);
    s.push_str(&format!("sif <2> mode 0{:o}\n", root.mode()));
    s.push_str(&format!("sif <2> uid {}\n", root.uid()));
    s.push_str(&format!("sif <2> gid {}\n", root.gid()));
    s.push_str(&format!("sif <2> mtime @{mtime}\n"));
    if large {
        s.push_str("sif <2> mtime_extra 0\n");
    }
    s
}

/// Gives every used inode of `image` fixed times and the root directory the source's mode,
/// owner and mtime, with one debugfs run.
fn fix_inodes(
    image: &Path,
    epoch: i64,
    root: &fs::Metadata,
    work: &Path,
) -> Result<(), ImageError> {
    let text = run_tool(Command::new("dumpe2fs").arg(image))?;
    let inodes = used_inodes(&text).map_err(|e| ImageError::Command {
        command: format!("dumpe2fs {}", image.display()),
        detail: e,
    })?;
    let large = parse_header(&text)
        .get("Inode size")
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|s| s > 128);
    let script_path = work.join(format!(
        "{}.debugfs",
        image
            .file_name()
            .map(OsStr::to_string_lossy)
            .unwrap_or_default()
    ));
    fs::write(&script_path, inode_script(&inodes, large, epoch, root))
        .map_err(|e| ImageError::io(format!("writing {}", script_path.display()), e))?;
    let shown = format!(
        "debugfs -w -f {} {}",
        script_path.display(),
        image.display()
    );
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .env("LC_ALL", "C")
        // debugfs stamps the superblock's write time when it writes it back.
        .env("E2FSPROGS_FAKE_TIME", fake_time(epoch))
        .output()
        .map_err(|e| ImageError::Command {
            command: shown.clone(),
            detail: format!("cannot run it: {e}"),
        })?;
    let _ = fs::remove_file(&script_path);
    // debugfs goes on after a failed command and exits 0; anything on stderr but its banner is
    // a failure.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaint = stderr
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("debugfs "));
    if !out.status.success() || complaint.is_some() {
        return Err(ImageError::Command {
            command: shown,
            detail: complaint.unwrap_or("failed").to_string(),
        });
    }
    Ok(())
}

/// The sector GRUB's BIOS boot.img in the MBR loads core.img from, when the MBR holds one.
pub(crate) fn grub_core_sector(raw: &Path) -> Result<Option<u64>, ImageError> {
    let f = File::open(raw).map_err(|e| ImageError::io(format!("opening {}", raw.display()), e))?;
    let mut mbr = [0u8; 512];
    match f.read_exact_at(&mut mbr, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ImageError::io(format!("reading {}", raw.display()), e)),
    }
    Ok(core_sector_of(&mbr))
}

fn core_sector_of(mbr: &[u8; 512]) -> Option<u64> {
    let signed = mbr[510..512] == [0x55, 0xaa];
    let grub = mbr[..440].windows(5).any(|w| w == b"GRUB ");
    if !(signed && grub) {
        return None;
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&mbr[0x5c..0x64]);
    Some(u64::from_le_bytes(sector))
}

/// Replaces the bytes of `at` in its raw file by `image`: the range is punched (written with
/// zeros where the file system cannot punch holes), then `image`'s data extents are copied.
pub(crate) fn write_into(at: &Placement, image: &Path) -> Result<(), ImageError> {
    let src =
        File::open(image).map_err(|e| ImageError::io(format!("opening {}", image.display()), e))?;
    let size = src
        .metadata()
        .map_err(|e| ImageError::io(format!("reading {}", image.display()), e))?
        .len();
    if size != at.len {
        return Err(ImageError::Device(format!(
            "{} is {size} bytes, the space it replaces in {} is {}",
            image.display(),
            at.raw.display(),
            at.len
        )));
    }
    let dst = OpenOptions::new()
        .write(true)
        .open(&at.raw)
        .map_err(|e| ImageError::io(format!("opening {}", at.raw.display()), e))?;
    let werr = |e| ImageError::io(format!("writing {}", at.raw.display()), e);
    zero_range(&dst, at.offset, at.len).map_err(werr)?;
    for (off, len) in data_extents(&src, size)
        .map_err(|e| ImageError::io(format!("reading {}", image.display()), e))?
    {
        copy_range(&src, off, &dst, at.offset + off, len).map_err(werr)?;
    }
    dst.sync_all().map_err(werr)
}

/// Makes `[off, off + len)` of `f` read as zeros: a hole, or written zeros.
fn zero_range(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an owned, open descriptor.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The (offset, length) data extents of `f`, found with SEEK_DATA / SEEK_HOLE.
fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: lseek on an owned, open descriptor.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole > data {
            out.push((data, hole - data));
        }
        off = hole.max(data + 1);
    }
    Ok(out)
}

fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Where the partition or loop device `device` keeps its bytes: `/dev/loopN` is all of its
/// backing file, `/dev/loopNpK` the range the kernel's partition scan recorded in sysfs.
pub(crate) fn placement_of(
    device: &Path,
    loop_dev: &Path,
    raw: &Path,
) -> Result<Placement, ImageError> {
    let raw_len = fs::metadata(raw)
        .map_err(|e| ImageError::io(format!("reading {}", raw.display()), e))?
        .len();
    if device == loop_dev {
        return Ok(Placement {
            raw: raw.to_path_buf(),
            offset: 0,
            len: raw_len,
        });
    }
    let name = device.file_name().unwrap_or(OsStr::new(""));
    let sys = Path::new("/sys/class/block").join(name);
    let sectors = |field: &str| -> Result<u64, ImageError> {
        let p = sys.join(field);
        let text =
            fs::read(&p).map_err(|e| ImageError::io(format!("reading {}", p.display()), e))?;
        std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ImageError::Device(format!(
                    "{}: not a sector count: {:?}",
                    p.display(),
                    OsStr::from_bytes(&text)
                ))
            })
    };
    let (start, len) = (sectors("start")? * 512, sectors("size")? * 512);
    if start + len > raw_len {
        return Err(ImageError::Device(format!(
            "{} ends past the end of {}",
            device.display(),
            raw.display()
        )));
    }
    Ok(Placement {
        raw: raw.to_path_buf(),
        offset: start,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn used_inodes_are_the_root_and_what_no_group_lists_as_free() {
        let text = "Inode count:              40\nFirst inode:              11\n\
                    Free inodes:              25\n\
                    Group 0: (Blocks 1-8192)\n  Free inodes: 14-16, 19, 21-20\n";
        assert!(used_inodes(text).is_err(), "a backwards range is refused");
        let text = "Inode count:              40\nFirst inode:              11\n\
                    Free inodes:              25\n\
                    Group 0: (Blocks 1-8192)\n  Free inodes: 14-16, 19\n\
                    Group 1: (Blocks 8193-16384)\n  Free inodes: 21-40\n";
        assert_eq!(used_inodes(text).unwrap(), vec![2, 11, 12, 13, 17, 18, 20]);
        // A group without free inodes prints an empty list.
        let full = "Inode count: 12\nFirst inode: 11\nGroup 0:\n  Free inodes: \n";
        assert_eq!(used_inodes(full).unwrap(), vec![2, 11, 12]);
        assert!(used_inodes("Inode count: 12\n").is_err());
    }

    #[test]
    fn superblocks_differ_only_in_stable_fields() {
        let old = parse_header(
            "Filesystem features:      has_journal ext_attr needs_recovery extent\n\
             Reserved block count:     100\nLast mount time:          yesterday\n\
             Mount count:              1\n",
        );
        let mut new = parse_header(
            "Filesystem features:      has_journal ext_attr extent\n\
             Reserved block count:     100\nLast mount time:          n/a\n\
             Mount count:              0\n",
        );
        assert_eq!(first_difference(&old, &new), None);
        new.insert("Reserved block count".into(), "0".into());
        let d = first_difference(&old, &new).unwrap();
        assert!(d.starts_with("Reserved block count"), "{d}");
        new.insert("Reserved block count".into(), "100".into());
        new.insert("Filesystem features".into(), "has_journal extent".into());
        assert!(first_difference(&old, &new).unwrap().contains("ext_attr"));
    }

    #[test]
    fn the_script_fixes_times_of_every_inode_and_the_root_directory() {
        let dir = tempfile::tempdir().unwrap();
        let md = fs::symlink_metadata(dir.path()).unwrap();
        let s = inode_script(&[2, 11, 12], true, 1_700_000_000, &md);
        for i in [2, 11, 12] {
            for f in ["atime", "ctime", "crtime"] {
                assert!(s.contains(&format!("sif <{i}> {f} @1700000000\n")), "{s}");
                assert!(s.contains(&format!("sif <{i}> {f}_extra 0\n")), "{s}");
            }
        }
        assert!(s.contains(&format!("sif <2> mode 0{:o}\n", md.mode())));
        // The source's mtime is in the past of "now", so later than an old epoch: clamped.
        assert!(inode_script(&[2], false, 1000, &md).contains("sif <2> mtime @1000\n"));
        let small = inode_script(&[2], false, 1000, &md);
        assert!(
            !small.contains("crtime") && !small.contains("_extra"),
            "{small}"
        );
    }

    #[test]
    fn grub_core_sector_needs_the_signature_and_grub() {
        let mut mbr = [0u8; 512];
        mbr[0x5c..0x64].copy_from_slice(&2048u64.to_le_bytes());
        assert_eq!(core_sector_of(&mbr), None);
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(core_sector_of(&mbr), None, "no GRUB string");
        mbr[0x180..0x185].copy_from_slice(b"GRUB ");
        assert_eq!(core_sector_of(&mbr), Some(2048));
    }

    #[test]
    fn write_into_replaces_exactly_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let image = dir.path().join("fs.ext");
        fs::write(&raw, vec![0xAAu8; 3 << 20]).unwrap();
        let f = File::create(&image).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"new", 4096).unwrap();
        drop(f);
        let at = Placement {
            raw: raw.clone(),
            offset: 1 << 20,
            len: 1 << 20,
        };
        write_into(&at, &image).unwrap();
        let got = fs::read(&raw).unwrap();
        assert!(got[..1 << 20].iter().all(|&b| b == 0xAA));
        assert!(got[2 << 20..].iter().all(|&b| b == 0xAA));
        let mid = &got[1 << 20..2 << 20];
        assert_eq!(&mid[4096..4099], b"new");
        assert_eq!(
            mid.iter().filter(|&&b| b != 0).count(),
            3,
            "the rest reads as zeros"
        );
        let wrong = Placement { len: 2 << 20, ..at };
        assert!(write_into(&wrong, &image).is_err());
    }

    #[test]
    fn data_extents_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1; 4096], 4 << 20).unwrap();
        f.flush().unwrap();
        let ext = data_extents(&f, 8 << 20).unwrap();
        let total: u64 = ext.iter().map(|e| e.1).sum();
        assert!((4096..1 << 20).contains(&total), "{ext:?}");
        assert!(
            ext.iter()
                .any(|&(o, l)| o <= 4 << 20 && o + l >= (4 << 20) + 4096)
        );
    }
}
