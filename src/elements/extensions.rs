//! strata's optional extension to the element format: `cache-mounts` (image folders that get a
//! host cache folder bound on them during every step, like BuildKit's cache mounts). The other
//! extension, `cache-inputs`, is read where keys are made (the `key` module).
//!
//! ```text
//! <element>/cache-mounts: one absolute image path per line (# comments, blank lines ignored)
//!     ──► relative paths (no `..`, not `/` itself), sorted by the caller
//! ```

use super::{Element, ElementError};
use std::io;
use std::path::{Component, Path, PathBuf};

/// An element's `cache-mounts` file, as image paths relative to the root. During every step
/// strata binds a host folder under DIB_IMAGE_CACHE there, so what hooks download is kept
/// between builds and never enters the step layers.
pub fn read_cache_mounts(e: &Element) -> Result<Vec<PathBuf>, ElementError> {
    let file = e.path.join("cache-mounts");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(ElementError::io("read", &file, err)),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = Path::new(line);
        let ok = p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && p.components().count() > 1;
        if !ok {
            return Err(ElementError::BadListFile {
                path: file.clone(),
                line: n + 1,
                reason: format!(
                    "element {}: '{line}' is not an absolute path below / without '..'",
                    e.name
                ),
            });
        }
        out.push(p.strip_prefix("/").unwrap_or(p).to_path_buf());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_mounts_are_absolute_image_paths_without_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let e = Element {
            name: "dpkg".into(),
            path: dir.path().to_path_buf(),
        };
        assert!(read_cache_mounts(&e).unwrap().is_empty());
        std::fs::write(
            dir.path().join("cache-mounts"),
            "# apt\n/var/cache/apt/archives\n\n",
        )
        .unwrap();
        assert_eq!(
            read_cache_mounts(&e).unwrap(),
            vec![PathBuf::from("var/cache/apt/archives")]
        );
        for bad in ["var/x", "/", "/a/../b"] {
            std::fs::write(dir.path().join("cache-mounts"), format!("{bad}\n")).unwrap();
            let err = read_cache_mounts(&e).unwrap_err().to_string();
            assert!(
                err.contains("cache-mounts line 1") && err.contains("dpkg"),
                "{err}"
            );
        }
    }
}
