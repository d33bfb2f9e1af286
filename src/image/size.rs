//! Size arithmetic: dib's size specs (`100MiB`, `1.5G`, `50%`) and the image size of a tree.
//!
//! `parse_abs_size_spec` / `parse_rel_size_spec` follow dib's `block_device/utils.py`;
//! `image_size_for_tree` follows `disk-image-create` (du total / 0.6 or + extra MB, + journal,
//! + 525 MiB for EFI, rounded up to 64 KiB).

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::ImageError;

const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
    ("B", 1),
    ("", 1),
];

/// Parses an absolute size (`"1.5GiB"`, `"123456KiB"`, `"4096"`) into bytes, as dib does.
pub fn parse_abs_size_spec(spec: &str) -> Result<u64, ImageError> {
    let invalid = || ImageError::Config(format!("Invalid size unit spec [{spec}]"));
    let num_len = spec
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(spec.len());
    let (num, rest) = spec.split_at(num_len);
    let unit = rest.strip_prefix(' ').unwrap_or(rest);
    if !unit.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid());
    }
    let factor = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, f)| *f)
        .ok_or_else(|| ImageError::Config(format!("unit_str [{unit}] not known")))?;
    if num.is_empty() {
        return Ok(factor);
    }
    // Whole numbers stay exact; fractions go through f64 like dib's float().
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(factor).ok_or_else(invalid);
    }
    let n: f64 = num.parse().map_err(|_| invalid())?;
    Ok((n * factor as f64) as u64)
}

/// Parses a size that may be relative (`"50%"` of `available`) or absolute.
pub(crate) fn parse_rel_size_spec(spec: &str, available: u64) -> Result<u64, ImageError> {
    match spec.strip_suffix('%') {
        Some(p) => {
            let percent: f64 = p
                .trim()
                .parse()
                .map_err(|_| ImageError::Config(format!("Invalid size unit spec [{spec}]")))?;
            Ok((available as f64 * percent / 100.0) as u64)
        }
        None => parse_abs_size_spec(spec),
    }
}

/// The size in bytes of an image that will hold `root`, computed as dib's `disk-image-create`
/// does when `DIB_IMAGE_SIZE` is unset: `du -a -c -x` total in KiB, divided by 0.6 (or plus
/// `extra_mb` MiB when given); for an ext4 root plus the `journal_mb` journal; plus 525 MiB when
/// `efi` (the `block-device-efi` element is in the build); rounded up to 64 KiB.
pub fn image_size_for_tree(
    root: &Path,
    extra_mb: Option<u64>,
    fs_type: &str,
    journal_mb: u64,
    efi: bool,
) -> io::Result<u64> {
    let total_kib = du_kib(root)?;
    let mut kib = match extra_mb {
        Some(mb) => total_kib + mb * 1024,
        None => (total_kib as f64 / 0.6) as u64,
    };
    if fs_type == "ext4" {
        kib += journal_mb * 1024;
    }
    Ok(image_bytes(kib, efi))
}

/// The MiB an EFI system partition adds to a computed or given image size (dib's 525).
pub const ESP_MIB: u64 = 525;

/// dib's last step for every image size: plus the ESP when `efi`, rounded up to 64 KiB, in
/// bytes.
pub fn image_bytes(kib: u64, efi: bool) -> u64 {
    let kib = if efi { kib + ESP_MIB * 1024 } else { kib };
    kib.div_ceil(64) * 64 * 1024
}

/// dib's `du -a -c -x` total in KiB, measured from what the tree holds rather than from how
/// the host file system happens to store it: every file's size rounded up to 4 KiB, 4 KiB per
/// directory and per symlink whose target does not fit in its inode (60 bytes), hard links
/// counted once. `du` itself gives other totals for the same files on tmpfs and ext4, or for a
/// tree restored from layers and one built by hooks — and a size that moves moves every block
/// of the file system, so cached rebuilds could not reproduce a cold build's disk (nor reuse
/// its qcow2 clusters).
fn du_kib(root: &Path) -> io::Result<u64> {
    const BLOCK: u64 = 4096;
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    for entry in walkdir::WalkDir::new(root).same_file_system(true) {
        let entry = entry.map_err(io::Error::other)?;
        let md = entry.metadata().map_err(io::Error::other)?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        let ft = md.file_type();
        bytes += if ft.is_dir() {
            BLOCK
        } else if ft.is_file() {
            md.len().div_ceil(BLOCK) * BLOCK
        } else if ft.is_symlink() && md.len() > 60 {
            BLOCK
        } else {
            0
        };
    }
    Ok(bytes.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_size_depends_on_what_it_holds_not_on_how_it_is_stored() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for (root, sparse) in [(a.path(), true), (b.path(), false)] {
            std::fs::create_dir_all(root.join("etc/sub")).unwrap();
            std::fs::write(root.join("etc/one"), vec![1u8; 5000]).unwrap();
            // The same 1 MiB file, stored sparse in one tree and written out in the other.
            let f = std::fs::File::create(root.join("etc/big")).unwrap();
            if sparse {
                f.set_len(1 << 20).unwrap();
            } else {
                std::io::Write::write_all(&mut &f, &vec![0u8; 1 << 20]).unwrap();
            }
            std::os::unix::fs::symlink("one", root.join("etc/link")).unwrap();
            std::fs::hard_link(root.join("etc/one"), root.join("etc/sub/again")).unwrap();
        }
        let (x, y) = (du_kib(a.path()).unwrap(), du_kib(b.path()).unwrap());
        assert_eq!(x, y);
        // 3 dirs + 8 KiB + 1 MiB, the hard link once, the short symlink in its inode.
        assert_eq!(x, 3 * 4 + 8 + 1024);
    }

    #[test]
    fn abs_specs_match_dib() {
        assert_eq!(parse_abs_size_spec("20TiB").unwrap(), 20 << 40);
        assert_eq!(parse_abs_size_spec("1024KiB").unwrap(), 1 << 20);
        assert_eq!(parse_abs_size_spec("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_abs_size_spec("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_abs_size_spec("100M").unwrap(), 100_000_000);
        assert_eq!(parse_abs_size_spec("4096").unwrap(), 4096);
        assert_eq!(parse_abs_size_spec("MiB").unwrap(), 1 << 20);
        let e = parse_abs_size_spec("10 Qb").unwrap_err().to_string();
        assert!(e.contains("unit_str [Qb] not known"), "{e}");
        let e = parse_abs_size_spec("10-MiB").unwrap_err().to_string();
        assert!(e.contains("Invalid size unit spec [10-MiB]"), "{e}");
        assert!(parse_abs_size_spec("1.2.3MiB").is_err());
    }

    #[test]
    fn rel_specs_take_a_share_of_what_is_left() {
        assert_eq!(parse_rel_size_spec("50%", 1000).unwrap(), 500);
        assert_eq!(parse_rel_size_spec("100%", 1000).unwrap(), 1000);
        assert_eq!(parse_rel_size_spec("1KiB", 10).unwrap(), 1024);
        assert!(parse_rel_size_spec("x%", 10).is_err());
    }

    #[test]
    fn tree_size_follows_dib_formula() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 600 * 1024]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let du = du_kib(dir.path()).unwrap();
        // 600 KiB of data counted once, plus the directory itself.
        assert!((600..640).contains(&du), "du {du}");
        let plain = image_size_for_tree(dir.path(), None, "xfs", 64, false).unwrap();
        assert_eq!(plain, ((du as f64 / 0.6) as u64).div_ceil(64) * 64 * 1024);
        let ext4 = image_size_for_tree(dir.path(), None, "ext4", 64, false).unwrap();
        assert_eq!(
            ext4,
            ((du as f64 / 0.6) as u64 + 65536).div_ceil(64) * 64 * 1024
        );
        let extra = image_size_for_tree(dir.path(), Some(10), "ext4", 8, true).unwrap();
        assert_eq!(
            extra,
            (du + 10 * 1024 + 8 * 1024 + 525 * 1024).div_ceil(64) * 64 * 1024
        );
        assert_eq!(extra % (64 * 1024), 0);
    }
}
