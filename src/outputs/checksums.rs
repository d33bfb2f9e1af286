//! `--checksum` / `DIB_CHECKSUM`: `NAME.<type>.md5` and `.sha256` beside an output, in the
//! `md5sum` / `sha256sum` format, computed in one cancellable pass over the file.
//!
//! ```text
//! output ──read once──► md5 + sha256 ──► <output>.md5, <output>.sha256 (temp file + rename)
//! ```

use md5::Digest as _;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Writes the checksum files of `path`, unless both are already newer than it (an output a
/// no-op rebuild left in place keeps its checksums; one written again gets new ones).
pub fn refresh(path: &Path) -> io::Result<()> {
    let written = fs::metadata(path)?.modified()?;
    let current = |ext: &str| {
        fs::metadata(sibling(path, ext))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= written)
    };
    if current(".md5") && current(".sha256") {
        return Ok(());
    }
    write(path)
}

fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(ext);
    PathBuf::from(p)
}

/// Writes `<path>.md5` and `<path>.sha256`, naming the file without its folder (so the three
/// can be moved together). Stops with a `Cancelled` io error on SIGINT/SIGTERM.
pub fn write(path: &Path) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let mut file = fs::File::open(path)?;
    let mut md5 = md5::Md5::new();
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        crate::cancel::check_io()?;
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
    }
    for (ext, digest) in [
        (".md5", hex(&md5.finalize())),
        (".sha256", hex(&sha.finalize())),
    ] {
        let dest = sibling(path, ext);
        let mut tmp = crate::fsutil::temp_beside(&dest).map_err(io::Error::other)?;
        writeln!(tmp, "{digest}  {name}")?;
        tmp.persist(&dest).map_err(|e| e.error)?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_the_tools_format() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("image.qcow2");
        fs::write(&f, b"hello\n").unwrap();
        write(&f).unwrap();
        let md5 = fs::read_to_string(dir.path().join("image.qcow2.md5")).unwrap();
        assert_eq!(md5, "b1946ac92492d2347c6235b4d2611184  image.qcow2\n");
        let sha = fs::read_to_string(dir.path().join("image.qcow2.sha256")).unwrap();
        assert_eq!(
            sha,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03  image.qcow2\n"
        );
        assert!(write(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn checksums_are_refreshed_only_for_an_output_newer_than_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("image.raw");
        let md5 = dir.path().join("image.raw.md5");
        fs::write(&f, b"one\n").unwrap();
        refresh(&f).unwrap();
        let first = fs::read_to_string(&md5).unwrap();
        // Left alone while current (a planted value proves it was not rewritten).
        fs::write(&md5, "kept\n").unwrap();
        refresh(&f).unwrap();
        assert_eq!(fs::read_to_string(&md5).unwrap(), "kept\n");
        // The output written again: new checksums.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"two\n").unwrap();
        refresh(&f).unwrap();
        let again = fs::read_to_string(&md5).unwrap();
        assert!(
            again != first && again.ends_with("  image.raw\n"),
            "{again}"
        );
    }
}
