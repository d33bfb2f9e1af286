//! File helpers shared by the executor and the outputs: the clock, modes, and temp files beside
//! their destination that are locked while alive, so a later run can tell a dead writer's
//! leftovers from a live writer's work.
//!
//! ```text
//! locked_temp_in(DIR, PREFIX) ──► DIR/PREFIXxxxx, flock held while open (cache blobs, tags)
//! locked_temp_dir_in(DIR, PREFIX) ──► the same for a folder (an OCI layout being written)
//! temp_beside(dest) ──► DIR/.strata-out.XXXX (0644, flock held) ──persist──► dest (atomic)
//! sweep_dead(DIR, ".strata-out.") ──► every such file or folder nobody holds a lock on is removed
//! dead_files(DIR, PREFIX) ──► the same files, listed only (du)
//! ```
//!
//! A writer killed by SIGKILL leaves its temp file, but the kernel drops its lock; a live
//! writer (in this or another process, container or namespace on the same kernel) keeps it.
//! So "dead" is decided by the lock, never by a pid.

use anyhow::{Context, Result};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The prefix of every temp file strata writes beside an output.
pub const OUTPUT_TEMP_PREFIX: &str = ".strata-out.";

/// Seconds since 1970.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// The folder a file path lives in (`.` for a bare name).
pub fn parent_or_dot(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A temp file beside `path` (so the final rename is atomic), mode 0644, exclusively locked
/// for as long as it is open.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = parent_or_dot(path);
    let tmp = locked_temp_in(dir, OUTPUT_TEMP_PREFIX)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    // Outputs are ordinary files (tempfile creates them 0600).
    set_mode(tmp.path(), 0o644)
        .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
    Ok(tmp)
}

/// A new temp file `DIR/PREFIXxxxxxx` (mode 0600) holding an exclusive `flock` for as long as
/// it is open, so [`sweep_dead`] (in any process on this kernel) leaves it alone. The lock
/// goes with the open file: a writer killed by SIGKILL leaves the file unlocked.
pub fn locked_temp_in(dir: &Path, prefix: &str) -> io::Result<tempfile::NamedTempFile> {
    loop {
        let tmp = tempfile::Builder::new().prefix(prefix).tempfile_in(dir)?;
        match tmp.as_file().try_lock() {
            Ok(()) => {}
            // A sweep holds it: it took the fresh file for a leftover. Start again.
            Err(fs::TryLockError::WouldBlock) => continue,
            Err(fs::TryLockError::Error(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot lock {}: {e}", tmp.path().display()),
                ));
            }
        }
        // A sweep may have taken the file for a leftover between its creation and the lock:
        // then the name no longer leads to our file, and we start again with a new one.
        if !same_file(tmp.as_file(), tmp.path()) {
            continue;
        }
        return Ok(tmp);
    }
}

/// A new temp folder `DIR/PREFIXxxxxxx` and an exclusive `flock` on it, held for as long as the
/// returned `File` is open (keep it beside the `TempDir`), so [`sweep_dead`] leaves it alone.
pub fn locked_temp_dir_in(dir: &Path, prefix: &str) -> io::Result<(tempfile::TempDir, fs::File)> {
    loop {
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir_in(dir)?;
        match try_lock_dir(tmp.path())? {
            Some(lock) => return Ok((tmp, lock)),
            // The sweep removes it (or has), not this drop.
            None => {
                let _ = tmp.keep();
            }
        }
    }
}

/// Opens a folder and takes its exclusive lock without waiting. None when another process
/// holds the lock, the folder is gone, or the name now leads to another folder. A writer that
/// has just created the folder gets None when a sweep got there first (between the creation
/// and the lock it looks like a dead writer's), and starts again with a new name; a sweep gets
/// None for a live writer's folder.
pub fn try_lock_dir(path: &Path) -> io::Result<Option<fs::File>> {
    let lock = match fs::File::open(path) {
        Ok(lock) => lock,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Ok(None),
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    Ok(same_file(&lock, path).then_some(lock))
}

/// True when `path` names the file open as `file`.
pub fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// "cannot write DEST: ERROR", saying so plainly when DEST's folder is full (ENOSPC, EDQUOT),
/// so a full output folder is not reported as some stream failing.
pub fn write_error(dest: &Path, e: &io::Error) -> String {
    let full = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        );
    if full {
        format!(
            "cannot write {}: {} is full ({e})",
            dest.display(),
            parent_or_dot(dest).display()
        )
    } else {
        format!("cannot write {}: {e}", dest.display())
    }
}

/// Writes `bytes` to `path` atomically (temp file beside it, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Puts the finished temp file `tmp` at `dest` atomically. A file already at `dest` is
/// swapped out (`renameat2(RENAME_EXCHANGE)`) and then unlinked, not renamed over: on ext4 a
/// rename over an existing file first allocates every delayed block of the new one
/// (`auto_da_alloc`, 0.2 s for an 825 MB tar), and the old file's blocks are freed by a
/// thread of its own (0.4–1 s for the same file) so neither holds up the build.
pub fn persist_replacing(tmp: tempfile::NamedTempFile, dest: &Path) -> io::Result<()> {
    let old = fs::symlink_metadata(dest)
        .ok()
        .filter(|m| m.is_file())
        .and_then(|_| fs::File::open(dest).ok());
    let Some(old) = old else {
        return tmp.persist(dest).map(drop).map_err(|e| e.error);
    };
    if exchange(tmp.path(), dest)? {
        // The old file is at the temp path now: dropping `tmp` unlinks it there.
        drop(tmp);
    } else {
        tmp.persist(dest).map_err(|e| e.error)?;
    }
    std::thread::spawn(move || drop(old));
    Ok(())
}

/// Swaps the paths `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`). False when the file
/// system cannot (the caller then renames another way).
pub fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Removes the files and folders in `dir` whose name starts with `prefix` and that no live
/// process holds a lock on (leftovers of killed writers). Returns how many were removed. An
/// entry that cannot be opened is skipped; a folder is removed whole (it never holds mounts:
/// these are output folders such as an OCI layout being written).
pub fn sweep_dead(dir: &Path, prefix: &str) -> io::Result<usize> {
    let mut removed = sweep_dead_files(dir, prefix)?.len();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_bytes())
            || !entry.file_type()?.is_dir()
        {
            continue;
        }
        let path = entry.path();
        let Ok(Some(_lock)) = try_lock_dir(&path) else {
            continue;
        };
        if fs::remove_dir_all(&path).is_ok() {
            tracing::debug!("removed {}, left by a writer that died", path.display());
            removed += 1;
        }
    }
    Ok(removed)
}

/// [`sweep_dead`], returning each removed file with its size.
pub fn sweep_dead_files(dir: &Path, prefix: &str) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut removed = Vec::new();
    for (path, len) in dead_files(dir, prefix)? {
        // Taken again and removed while we hold the lock, so a writer cannot be starting on it
        // (a new temp file always gets a new name, and checks its name after locking).
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        if file.try_lock().is_ok() && same_file(&file, &path) && fs::remove_file(&path).is_ok() {
            tracing::debug!("removed {}, left by a writer that died", path.display());
            removed.push((path, len));
        }
    }
    Ok(removed)
}

/// The files in `dir` whose name starts with `prefix` that nobody holds a lock on, with their
/// sizes. Changes nothing (the lock is only tried, then dropped).
pub fn dead_files(dir: &Path, prefix: &str) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut dead = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(dead),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !name.as_encoded_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        if !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        if file.try_lock_shared().is_ok() {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            dead.push((path, len));
        }
    }
    Ok(dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_replacing_swaps_the_old_file_out_and_leaves_no_temp_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.tar");
        let mut tmp = temp_beside(&dest).unwrap();
        tmp.write_all(b"first").unwrap();
        persist_replacing(tmp, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        let old = fs::File::open(&dest).unwrap();
        let mut tmp = temp_beside(&dest).unwrap();
        tmp.write_all(b"second").unwrap();
        persist_replacing(tmp, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"second");
        // The old file is unlinked (only open descriptors keep it), nothing else is left.
        assert_eq!(old.metadata().unwrap().nlink(), 0);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.tar")]);
        assert_eq!(
            fs::metadata(&dest).unwrap().mode() & 0o777,
            0o644,
            "an output keeps the temp file's mode"
        );
    }

    #[test]
    fn a_live_temp_file_survives_a_sweep_and_a_dead_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let live = temp_beside(&dir.path().join("img.tar")).unwrap();
        // A leftover: a temp file whose writer is gone (no lock held).
        let dead = dir.path().join(format!("{OUTPUT_TEMP_PREFIX}dead"));
        fs::write(&dead, "partial").unwrap();
        fs::write(dir.path().join("img.tar"), "kept").unwrap();
        assert_eq!(sweep_dead(dir.path(), OUTPUT_TEMP_PREFIX).unwrap(), 1);
        assert!(live.path().exists());
        assert!(!dead.exists());
        assert!(dir.path().join("img.tar").exists());
        // Persisting keeps the content and the mode.
        let target = dir.path().join("out.tar");
        let mut live = live;
        live.write_all(b"x").unwrap();
        live.persist(&target).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(sweep_dead(&dir.path().join("missing"), "x").unwrap(), 0);
    }

    #[test]
    fn a_live_temp_folder_survives_a_sweep_and_a_dead_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (live, lock) = locked_temp_dir_in(dir.path(), OUTPUT_TEMP_PREFIX).unwrap();
        fs::write(live.path().join("index.json"), "{}").unwrap();
        let dead = dir.path().join(format!("{OUTPUT_TEMP_PREFIX}deadfolder"));
        fs::create_dir_all(dead.join("blobs/sha256")).unwrap();
        fs::write(dead.join("blobs/sha256/x"), "partial").unwrap();
        assert_eq!(sweep_dead(dir.path(), OUTPUT_TEMP_PREFIX).unwrap(), 1);
        assert!(!dead.exists());
        assert!(live.path().join("index.json").exists());
        drop(lock);
        let path = live.keep();
        assert_eq!(sweep_dead(dir.path(), OUTPUT_TEMP_PREFIX).unwrap(), 1);
        assert!(!path.exists());
    }

    #[test]
    fn a_fresh_folder_a_sweep_got_to_first_is_given_up_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh");
        // Removed by a sweep before it could be opened.
        assert!(try_lock_dir(&path).unwrap().is_none());
        // Held by a sweep (another open file, as another process would have).
        fs::create_dir(&path).unwrap();
        let sweep = fs::File::open(&path).unwrap();
        sweep.lock().unwrap();
        assert!(try_lock_dir(&path).unwrap().is_none());
        drop(sweep);
        // Free: locked, and a second taker is refused while it is held.
        let lock = try_lock_dir(&path)
            .unwrap()
            .expect("a free folder is locked");
        assert!(try_lock_dir(&path).unwrap().is_none());
        drop(lock);
        // Another error (not a folder we may open) is an error.
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(try_lock_dir(&file.join("below")).is_err());
    }
}
