//! Host programs strata runs itself (mkfs, mcopy, bash, …): finding them on a PATH.

use std::ffi::OsStr;
use std::path::PathBuf;

/// The first executable file named `name` in the `:`-separated folders of `path_env`.
pub fn find_program(name: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path_env?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// [`find_program`] on this process's PATH (`/usr/bin:/bin` when it has none).
pub fn on_host_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    find_program(name, Some(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_files_are_found_in_path_order() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(a.join("tool")).unwrap(); // a folder, not a program
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_program("tool", Some(&path)), None, "not executable");
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_program("tool", Some(&path)), Some(b.join("tool")));
        assert_eq!(find_program("tool", None), None);
        assert!(on_host_path("sh").is_some());
    }
}
