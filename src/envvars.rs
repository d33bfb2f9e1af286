//! Every environment variable strata reads or sets, in one table, with how each enters step
//! keys. `cache/README.md` carries the same table (a test keeps the two equal).
//!
//! ```text
//! process env ──(Settings)──► hooks' environment ──normalise_for_key──► KeyInputs.env
//!                 Keying::Keyed      value enters the key as it is
//!                 Keying::Normalised value reaches hooks, enters the key as "<NAME>"
//!                 Keying::DiskOnly   only the disk step's hooks see it; keyed by the disk step
//!                 Keying::Never      strata's own setting: never reaches hooks or keys
//! ```

/// How a variable enters step keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keying {
    /// Its value is part of every step key (hooks may act on it).
    Keyed,
    /// Hooks get its real value; keys get a placeholder (it differs between machines or runs
    /// without changing what a step makes: paths, proxies, tracing).
    Normalised,
    /// Only the disk step's phases (block-device.d .. cleanup.d) get it; it enters the disk
    /// step's key, never a rootfs step's (so it does not rebuild the tree).
    DiskOnly,
    /// strata reads it for itself; hooks do not get it and keys do not see it.
    Never,
}

impl Keying {
    fn word(self) -> &'static str {
        match self {
            Keying::Keyed => "keyed",
            Keying::Normalised => "normalised",
            Keying::DiskOnly => "disk step only",
            Keying::Never => "never",
        }
    }
}

/// One variable (or a family: a name ending in `*`).
#[derive(Debug)]
pub struct EnvVar {
    pub name: &'static str,
    /// Who sets it: `user` (read from strata's environment), `strata` (set for hooks), or both.
    pub set_by: &'static str,
    pub keying: Keying,
    pub meaning: &'static str,
}

const fn var(
    name: &'static str,
    set_by: &'static str,
    keying: Keying,
    meaning: &'static str,
) -> EnvVar {
    EnvVar {
        name,
        set_by,
        keying,
        meaning,
    }
}

use Keying::{DiskOnly, Keyed, Never, Normalised};

/// The table. Specific names come before the family (`DIB_*`) that would also match them.
pub const TABLE: &[EnvVar] = &[
    var(
        "DIB_IMAGE_SIZE",
        "user, --image-size",
        DiskOnly,
        "disk size in GiB",
    ),
    var(
        "DIB_IMAGE_EXTRA_SIZE",
        "user, --image-extra-size",
        DiskOnly,
        "extra MB on top of the computed disk size",
    ),
    var(
        "DIB_JOURNAL_SIZE",
        "user",
        DiskOnly,
        "ext4 journal size in MB",
    ),
    var(
        "DIB_CHECKSUM",
        "user, --checksum",
        DiskOnly,
        "write .md5/.sha256 beside every output (not in any key: it does not change the outputs)",
    ),
    var(
        "DIB_BLOCK_DEVICE_CONFIG",
        "user",
        DiskOnly,
        "block-device YAML (or file://PATH); its text enters the disk step's key",
    ),
    var(
        "DIB_ROOT_LABEL",
        "user, --root-label; strata in disk phases",
        DiskOnly,
        "root file system label",
    ),
    var(
        "DIB_ROOT_FSTYPE",
        "strata",
        DiskOnly,
        "root file system type, in disk phases",
    ),
    var(
        "DIB_BOOT_LABEL",
        "strata",
        DiskOnly,
        "boot file system label, in disk phases",
    ),
    var(
        "DIB_MOUNTPOINTS",
        "strata",
        DiskOnly,
        "the disk's mount points, in disk phases",
    ),
    var(
        "IMAGE_BLOCK_DEVICE",
        "strata",
        DiskOnly,
        "the disk's loop device, in disk phases",
    ),
    var(
        "IMAGE_BLOCK_DEVICES",
        "strata",
        DiskOnly,
        "every partition device by name, in disk phases",
    ),
    var(
        "DIB_IMAGE_CACHE",
        "user, --image-cache",
        Normalised,
        "download cache folder",
    ),
    var("DIB_OFFLINE", "user, --offline", Keyed, "avoid the network"),
    var("DIB_DEBUG_TRACE", "strata (-x)", Normalised, "trace hooks"),
    var(
        "DIB_ARGS",
        "strata",
        Normalised,
        "the command line (elements, -a, -p, -o are keyed on their own)",
    ),
    var(
        "DIB_ENV",
        "strata",
        Normalised,
        "every DIB_* variable as `declare -x` lines",
    ),
    var(
        "DIB_PYTHON_EXEC",
        "user; strata",
        Normalised,
        "python for dib's host-side Python hooks",
    ),
    var(
        "DIB_NO_TMPFS",
        "user, --no-tmpfs; strata",
        Normalised,
        "build outside a tmpfs (where the tree lives, not what hooks see)",
    ),
    var(
        "DIB_DEFAULT_INSTALLTYPE",
        "user, --install-type",
        Keyed,
        "default install type",
    ),
    var(
        "DIB_*",
        "user",
        Keyed,
        "every other DIB_ variable reaches hooks and keys unchanged",
    ),
    var(
        "SOURCE_DATE_EPOCH",
        "user",
        Keyed,
        "clamp times (layers, outputs, disks) for reproducible builds",
    ),
    var(
        "FS_TYPE",
        "user",
        Keyed,
        "root file system type (default ext4)",
    ),
    var(
        "IMAGE_TYPE",
        "user",
        Keyed,
        "dib's image type variable (qcow2; -t never changes it)",
    ),
    var("ARCH", "strata (-a)", Keyed, "target architecture"),
    var(
        "IMAGE_NAME",
        "strata (-o)",
        Keyed,
        "image name (keyed by its file name, not its folder)",
    ),
    var(
        "IMAGE_ELEMENT",
        "strata",
        Keyed,
        "the resolved elements, space separated",
    ),
    var(
        "IMAGE_ELEMENT_YAML",
        "strata",
        Normalised,
        "element name: path lines",
    ),
    var(
        "BASH_FUNC_get_image_element_array%%",
        "strata",
        Normalised,
        "dib's exported function listing elements and paths",
    ),
    var(
        "ELEMENTS_PATH",
        "user; strata",
        Normalised,
        "element search path (strata's is the full search path)",
    ),
    var("PATH", "strata", Keyed, "a fixed PATH for hooks"),
    var("LC_ALL", "strata", Keyed, "C"),
    var("HOME", "strata", Keyed, "/root"),
    var("TMP_BUILD_DIR", "strata", Normalised, "the build folder"),
    var(
        "TMP_IMAGE_DIR",
        "strata",
        Normalised,
        "where the raw disk is made",
    ),
    var(
        "TMP_HOOKS_PATH",
        "strata",
        Normalised,
        "the merged hook tree",
    ),
    var("TMP_MOUNT_PATH", "strata", Normalised, "the image root"),
    var(
        "TARGET_ROOT",
        "strata",
        Normalised,
        "the image root (root.d, cleanup.d)",
    ),
    var(
        "STRATA_BIN",
        "strata",
        Normalised,
        "the strata binary, for element helpers",
    ),
    var("TERM", "user", Normalised, "terminal type"),
    var(
        "http_proxy",
        "user",
        Normalised,
        "proxy (all proxy variables, any case)",
    ),
    var("https_proxy", "user", Normalised, "proxy"),
    var("no_proxy", "user", Normalised, "proxy"),
    var("ftp_proxy", "user", Normalised, "proxy"),
    var("HTTP_PROXY", "user", Normalised, "proxy"),
    var("HTTPS_PROXY", "user", Normalised, "proxy"),
    var("NO_PROXY", "user", Normalised, "proxy"),
    var("FTP_PROXY", "user", Normalised, "proxy"),
    var(
        "TMP_DIR",
        "user",
        Never,
        "where build folders are made (default: the system temp folder)",
    ),
    var(
        "STRATA_CACHE_DIR",
        "user",
        Never,
        "the layer cache folder (--cache-dir)",
    ),
    var(
        "STRATA_ELEMENTS_DIR",
        "user",
        Never,
        "strata's own elements folder (default: beside the binary or the source tree)",
    ),
    var("RUST_LOG", "user", Never, "log filter (overrides -v)"),
];

/// The row that describes `name` (an exact row first, then a family such as `DIB_*`).
pub fn lookup(name: &str) -> Option<&'static EnvVar> {
    TABLE.iter().find(|v| v.name == name).or_else(|| {
        TABLE.iter().find(|v| {
            v.name
                .strip_suffix('*')
                .is_some_and(|prefix| name.starts_with(prefix))
        })
    })
}

/// How `name` enters keys; a variable not in the table is keyed (hooks may read it).
pub fn keying(name: &str) -> Keying {
    lookup(name).map_or(Keying::Keyed, |v| v.keying)
}

/// The user variables hooks receive from strata's own environment: every `DIB_*` and the
/// named pass-through ones (SOURCE_DATE_EPOCH, FS_TYPE, IMAGE_TYPE, TERM, proxies).
pub fn passed_to_hooks(name: &str) -> bool {
    name.starts_with("DIB_")
        || matches!(
            name,
            "SOURCE_DATE_EPOCH" | "FS_TYPE" | "IMAGE_TYPE" | "TERM"
        )
        || name.to_ascii_lowercase().ends_with("_proxy")
            && lookup(name).is_some_and(|v| v.keying == Keying::Normalised)
}

/// The table in Markdown, as `cache/README.md` shows it.
pub fn markdown() -> String {
    let mut out =
        String::from("| variable | set by | in step keys | meaning |\n|---|---|---|---|\n");
    for v in TABLE {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            v.name,
            v.set_by,
            v.keying.word(),
            v.meaning
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_rows_win_over_the_dib_family() {
        assert_eq!(keying("DIB_IMAGE_SIZE"), Keying::DiskOnly);
        assert_eq!(keying("DIB_RELEASE"), Keying::Keyed);
        assert_eq!(keying("DIB_NO_TMPFS"), Keying::Normalised);
        assert_eq!(keying("TMP_BUILD_DIR"), Keying::Normalised);
        assert_eq!(keying("SOMETHING_ELSE"), Keying::Keyed);
        assert!(passed_to_hooks("DIB_X") && passed_to_hooks("https_proxy"));
        assert!(passed_to_hooks("SOURCE_DATE_EPOCH") && !passed_to_hooks("SECRET"));
        assert!(!passed_to_hooks("RUST_LOG"));
    }

    #[test]
    fn every_name_is_listed_once() {
        let mut names: Vec<_> = TABLE.iter().map(|v| v.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a variable is listed twice");
    }

    #[test]
    fn cache_readme_carries_this_table() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cache/README.md"),
        )
        .unwrap();
        assert!(
            readme.contains(&markdown()),
            "cache/README.md's variable table differs from src/envvars.rs; paste this:\n{}",
            markdown()
        );
    }
}
