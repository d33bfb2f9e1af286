//! Reading the calling thread's mount table (`/proc/thread-self/mountinfo`).
//!
//! `mounts_at_or_under(path)` lists the mounts at or below a path (deepest last, as mounted);
//! `mount_points_under(path)` lists the mount points strictly below it, for layer scans to skip.
//! The thread's own table is read, not the process's: a mount namespace belongs to a thread.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo, reduced to what strata needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// The device (`major:minor`) the mounted file system lives on.
    pub dev: String,
    /// The folder of that file system mounted here (`/` unless a bind mount of a sub-folder;
    /// `…//deleted` when that folder was removed).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
    /// The mount source as the kernel shows it (a device, `tmpfs`, `none`).
    pub source: String,
    /// The file system's own options (`rw,size=1024k,mode=755`).
    pub super_options: String,
}

/// The mount table of the calling thread's namespace.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read("/proc/thread-self/mountinfo")
        .or_else(|_| std::fs::read("/proc/self/mountinfo"))?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo text; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let sep = fields.iter().position(|f| *f == b"-")?;
            if sep < 6 || fields.len() < sep + 2 {
                return None;
            }
            Some(MountEntry {
                id: std::str::from_utf8(fields[0]).ok()?.parse().ok()?,
                parent: std::str::from_utf8(fields[1]).ok()?.parse().ok()?,
                dev: String::from_utf8_lossy(fields[2]).into_owned(),
                root: PathBuf::from(OsString::from_vec(unescape(fields[3]))),
                mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
                options: String::from_utf8_lossy(fields[5]).into_owned(),
                fs_type: String::from_utf8_lossy(fields[sep + 1]).into_owned(),
                source: fields
                    .get(sep + 2)
                    .map(|f| String::from_utf8_lossy(&unescape(f)).into_owned())
                    .unwrap_or_default(),
                super_options: fields
                    .get(sep + 3)
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Decodes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
pub(crate) fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The path as the mount table spells it: absolute and free of symlinks where it exists.
pub(crate) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Every mount whose mount point is `path` or lies below it, in mount-table order (a mount
/// always comes after the one it sits on).
pub fn mounts_at_or_under(path: &Path) -> io::Result<Vec<MountEntry>> {
    let base = canonical(path);
    Ok(read_mountinfo()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&base))
        .collect())
}

/// The mount points strictly below `path` (not `path` itself), deduplicated, in mount-table
/// order; a layer scan of `path` skips these.
pub fn mount_points_under(path: &Path) -> io::Result<Vec<PathBuf>> {
    let base = canonical(path);
    let mut out: Vec<PathBuf> = Vec::new();
    for m in mounts_at_or_under(&base)? {
        if m.mount_point != base && !out.contains(&m.mount_point) {
            out.push(m.mount_point);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_decodes_octal_and_keeps_the_rest() {
        assert_eq!(unescape(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(br"/x\011y\012z\134w"), b"/x\ty\nz\\w");
        assert_eq!(unescape(br"/trailing\04"), br"/trailing\04");
        assert_eq!(unescape(br"/not\999octal"), br"/not\999octal");
        assert_eq!(unescape(b"/plain"), b"/plain");
    }

    #[test]
    fn parse_reads_mount_point_type_and_options_with_optional_fields() {
        let text = b"22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                     90 22 0:50 / /tmp/dir\\040with\\040space ro,relatime shared:3 master:1 - tmpfs tmpfs rw\n\
                     garbage line\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].mount_point, PathBuf::from("/proc"));
        assert_eq!(entries[0].fs_type, "proc");
        assert_eq!(entries[1].id, 90);
        assert_eq!(entries[1].parent, 22);
        assert_eq!(entries[1].mount_point, PathBuf::from("/tmp/dir with space"));
        assert_eq!(entries[1].options, "ro,relatime");
        assert_eq!(entries[1].fs_type, "tmpfs");
        assert_eq!(entries[1].dev, "0:50");
        assert_eq!(entries[1].root, PathBuf::from("/"));
        assert_eq!(entries[1].source, "tmpfs");
        assert_eq!(entries[1].super_options, "rw");
        assert_eq!(entries[0].source, "proc");
    }

    #[test]
    fn the_real_table_has_root_and_proc() {
        let all = read_mountinfo().unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
        let under_proc = mounts_at_or_under(Path::new("/proc")).unwrap();
        assert!(under_proc.iter().any(|m| m.fs_type == "proc"));
        // `/` is never strictly under itself.
        assert!(
            !mount_points_under(Path::new("/"))
                .unwrap()
                .contains(&PathBuf::from("/"))
        );
    }
}
