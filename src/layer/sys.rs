//! Thin safe wrappers over the `*at` system calls the unpacker needs: every call names a file by
//! (directory descriptor, single component) and never follows a symlink unless stated.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a directory component without following a symlink (ELOOP/ENOTDIR if it is not a
/// real directory).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and NUL-terminated name; the result is a fresh descriptor we own.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory by path (for the unpack target itself, which the caller chose).
pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

use std::os::unix::fs::OpenOptionsExt;

/// Creates a new regular file (fails if anything exists at the name, symlinks included).
pub fn create_file_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    // SAFETY: as above.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let t = cstr(target)?;
    let c = cstr(name)?;
    // SAFETY: valid descriptor and names.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// Hardlinks `odir/oname` (not following a symlink there) as `ndir/nname`.
pub fn link_at(
    odir: BorrowedFd<'_>,
    oname: &[u8],
    ndir: BorrowedFd<'_>,
    nname: &[u8],
) -> io::Result<()> {
    let o = cstr(oname)?;
    let n = cstr(nname)?;
    // SAFETY: valid descriptors and names; flags 0 = do not follow.
    check(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            o.as_ptr(),
            ndir.as_raw_fd(),
            n.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and name.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

/// `lstat` of one component.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, name and buffer.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and buffer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// The mount id of an open file (statx), or None if the kernel cannot tell.
pub fn mount_id(fd: RawFd) -> Option<u64> {
    // SAFETY: zeroed statx is a valid out-buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, valid buffer.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0 {
        return Some(stx.stx_mnt_id);
    }
    // Kernels before 5.8 have no STATX_MNT_ID; /proc/self/fdinfo has had `mnt_id:` since 3.15.
    // Without either, a bind mount of the same file system would look like a plain folder.
    mnt_id_of_fdinfo(&std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?)
}

/// The `mnt_id:` field of a `/proc/<pid>/fdinfo/<fd>` text.
fn mnt_id_of_fdinfo(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

pub fn lchown_at(dir: BorrowedFd<'_>, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and name.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of a node the unpacker itself just created (not a symlink: fchmodat follows).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

fn times(sec: i64) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: 0,
    };
    [t, t]
}

pub fn futimes(fd: RawFd, sec: i64) -> io::Result<()> {
    let ts = times(sec);
    // SAFETY: valid descriptor and two timespecs.
    check(unsafe { libc::futimens(fd, ts.as_ptr()) }).map(drop)
}

pub fn lutimes_at(dir: BorrowedFd<'_>, name: &[u8], sec: i64) -> io::Result<()> {
    let c = cstr(name)?;
    let ts = times(sec);
    // SAFETY: valid descriptor, name and two timespecs.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fsetxattr(fd: RawFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor, name and value buffer.
    check(unsafe { libc::fsetxattr(fd, c.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
        .map(drop)
}

/// Sets an xattr on `dir/name` without following a symlink at `name`; the directory is reached
/// through its descriptor (`/proc/self/fd/N`), never by a path walk.
pub fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    xname: &[u8],
    value: &[u8],
) -> io::Result<()> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    let path = cstr(&p)?;
    let c = cstr(xname)?;
    // SAFETY: valid path, name and value buffer.
    check(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// The names in a directory (without `.` and `..`).
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: dup of a valid descriptor; fdopendir takes ownership of the duplicate.
    let dupfd = check(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dupfd` is a valid directory descriptor.
    let d = unsafe { libc::fdopendir(dupfd) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own dupfd.
        unsafe { libc::close(dupfd) };
        return Err(e);
    }
    // SAFETY: rewind so a reused descriptor lists from the start.
    unsafe { libc::rewinddir(d) };
    let mut out = Vec::new();
    loop {
        // SAFETY: errno reset then readdir on a valid DIR*.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: closes the DIR* (and dupfd) exactly once.
            unsafe { libc::closedir(d) };
            if err.raw_os_error().unwrap_or(0) != 0 {
                return Err(err);
            }
            return Ok(out);
        }
        // SAFETY: d_name is a NUL-terminated array inside a valid dirent.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn fdinfo_gives_the_same_mount_id_as_statx() {
        assert_eq!(
            mnt_id_of_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t27\nino:\t5\n"),
            Some(27)
        );
        assert_eq!(mnt_id_of_fdinfo("pos:\t0\n"), None);
        let dir = std::fs::File::open("/").unwrap();
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", dir.as_raw_fd()));
        if let Ok(text) = text {
            assert_eq!(mnt_id_of_fdinfo(&text), mount_id(dir.as_raw_fd()));
        }
    }
}
