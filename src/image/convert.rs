//! Disk conversions: `qemu-img convert` of the raw image, and copying a tree into the mounted
//! file systems.
//!
//! ```text
//! raw ──convert(fmt)──► .strata-out.XXXX beside <out> (locked) ──rename──► <out>
//!                                                          (dib's compress_and_save_image)
//! tree ──copy_tree──► mounted root          (cp -a --sparse=always, on one CPU: a stable
//!                                             block layout, see disk.rs)
//! ```

use std::path::Path;
use std::process::Command;

use super::ImageError;
use super::partition::one_line;

/// Converts the raw image to `format` at `out` (atomically, through a locked temp file beside
/// it that a later build sweeps if strata is killed meanwhile).
///
/// `qcow2` is compressed (`-c`) when `compress`; `vhd` becomes qemu's `vpc` with a fixed
/// subformat (dib used vhd-util); `raw` is a sparse copy; other qemu-img formats pass through.
/// `qemu_img_options` is dib's `QEMU_IMG_OPTIONS` (`-o`).
pub fn convert(
    raw: &Path,
    format: &str,
    out: &Path,
    compress: bool,
    qemu_img_options: Option<&str>,
) -> Result<(), ImageError> {
    let (qemu_format, extra) = match format {
        "vhd" => ("vpc", Some("subformat=fixed,force_size")),
        other => (other, None),
    };
    if qemu_format.is_empty() || !qemu_format.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ImageError::Config(format!(
            "image type [{format}] is not a qemu-img format"
        )));
    }
    if out.file_name().is_none() {
        return Err(ImageError::Config(format!(
            "output path {} has no file name",
            out.display()
        )));
    }
    // qemu-img truncates and writes the file in place, so our lock on it holds throughout.
    let tmp_file = crate::fsutil::temp_beside(out).map_err(|e| {
        ImageError::io(
            format!("creating a temp file beside {}", out.display()),
            std::io::Error::other(format!("{e:#}")),
        )
    })?;
    let tmp = tmp_file.path().to_path_buf();
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if compress && qemu_format == "qcow2" {
        cmd.arg("-c");
    }
    cmd.args(["-f", "raw", "-O", qemu_format]);
    let options: Vec<&str> = extra.into_iter().chain(qemu_img_options).collect();
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg(raw).arg(&tmp);
    let shown = format!("qemu-img convert {} -> {}", raw.display(), out.display());
    cmd.env("LC_ALL", "C");
    let result = match crate::tools::output(&mut cmd) {
        Ok(r) => r,
        Err(e) => {
            if let Some(c) = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<crate::cancel::Cancelled>())
            {
                return Err(ImageError::Cancelled(*c));
            }
            return Err(ImageError::Command {
                command: shown,
                detail: format!("cannot run qemu-img ({e}); install qemu-utils"),
            });
        }
    };
    if !result.status.success() {
        // qemu-img names the temp file; the user knows the output's name.
        let detail = one_line(&result.stderr, &result.stdout)
            .replace(&tmp.display().to_string(), &out.display().to_string());
        let full = detail.contains("No space left on device");
        return Err(ImageError::Command {
            command: shown,
            detail: if full {
                format!(
                    "{detail} ({} is full)",
                    crate::fsutil::parent_or_dot(out).display()
                )
            } else {
                detail
            },
        });
    }
    crate::fsutil::persist_replacing(tmp_file, out).map_err(|e| {
        ImageError::io(
            format!("renaming {} to {}", tmp.display(), out.display()),
            e,
        )
    })
}

/// Copies the contents of `src` (dot files included) into `dst`, preserving owners, modes,
/// times, links, xattrs and holes: `cp -a --sparse=always src/. dst/`, run on one CPU (the
/// first this process may use) so that an ext4 mounted with `nodelalloc` gets the same block
/// layout for the same tree (see disk.rs).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new("cp");
    cmd.args(["-a", "--sparse=always", "--no-target-directory"])
        .arg(src.join("."))
        .arg(dst);
    if let Some(cpu) = first_cpu() {
        use std::os::unix::process::CommandExt;
        // SAFETY: sched_setaffinity is a plain syscall, safe between fork and exec; the set is
        // built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let set = one_cpu_set(cpu);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    super::run_tool(&mut cmd).map(drop)
}

/// The lowest-numbered CPU this process may run on.
fn first_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set))
    }
}

fn one_cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn convert_round_trips_through_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(4 << 20).unwrap();
        std::fs::write(dir.path().join("x"), b"x").unwrap();
        let q = dir.path().join("a.qcow2");
        convert(&raw, "qcow2", &q, true, Some("compat=1.1")).unwrap();
        // No temp file left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.to_string_lossy().starts_with(".strata-out.")),
            "{names:?}"
        );
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&q)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual-size"].as_u64(), Some(4 << 20));
        let vhd = dir.path().join("a.vhd");
        convert(&raw, "vhd", &vhd, false, None).unwrap();
        let e = convert(&raw, "no such", &q, false, None).unwrap_err();
        assert!(e.is_bad_input());
        let e = convert(&dir.path().join("missing.raw"), "qcow2", &q, false, None).unwrap_err();
        assert!(e.to_string().contains("qemu-img convert"), "{e}");
    }

    #[test]
    fn copy_tree_keeps_dotfiles_links_modes_and_holes() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join(".hidden"), b"h").unwrap();
        std::fs::create_dir(src.path().join("d")).unwrap();
        std::os::unix::fs::symlink("../.hidden", src.path().join("d/link")).unwrap();
        let sparse = std::fs::File::create(src.path().join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::fs::set_permissions(
            src.path().join("d"),
            std::os::unix::fs::PermissionsExt::from_mode(0o750),
        )
        .unwrap();
        copy_tree(src.path(), dst.path()).unwrap();
        assert_eq!(std::fs::read(dst.path().join(".hidden")).unwrap(), b"h");
        assert_eq!(
            std::fs::read_link(dst.path().join("d/link")).unwrap(),
            Path::new("../.hidden")
        );
        let md = std::fs::metadata(dst.path().join("d")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o750);
        let sp = std::fs::metadata(dst.path().join("sparse")).unwrap();
        assert_eq!(sp.len(), 64 << 20);
        assert!(
            sp.blocks() < 64,
            "sparse file was filled: {} blocks",
            sp.blocks()
        );
    }
}
