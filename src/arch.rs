//! The host architecture in dpkg naming (amd64, arm64, armhf, ...), the default target arch.
//!
//! `dpkg --print-architecture` when dpkg is installed, else the kernel's machine name
//! (`uname -m`) mapped by [`dpkg_arch_from_machine`].

use std::process::{Command, Stdio};

/// The host architecture in dpkg naming.
pub fn host_arch() -> String {
    let from_dpkg = Command::new("dpkg")
        .arg("--print-architecture")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    from_dpkg.unwrap_or_else(|| dpkg_arch_from_machine(&machine()))
}

/// The kernel's machine name (`uname -m`); the compile-time arch if uname fails.
fn machine() -> String {
    nix_uname().unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn nix_uname() -> Option<String> {
    let mut buf = std::mem::MaybeUninit::<libc::utsname>::zeroed();
    // SAFETY: uname fills the struct it is given; the struct is zeroed, so every field is a
    // NUL-terminated C string even if the kernel left one untouched.
    let rc = unsafe { libc::uname(buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: uname returned 0, so the struct is initialized.
    let uts = unsafe { buf.assume_init() };
    let bytes: Vec<u8> = uts
        .machine
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// The dpkg architecture names strata accepts for `-a`.
pub const DPKG_ARCHES: &[&str] = &[
    "amd64", "arm64", "armhf", "armel", "i386", "ppc64el", "ppc64", "s390x", "riscv64", "mips64el",
    "loong64",
];

/// dib's other spellings, passed to hooks as given (dib's elements map them themselves).
pub const ALIASES: &[&str] = &["x86_64", "aarch64", "i686", "ppc64le"];

/// Checks a `-a` value: a dpkg name or one of dib's aliases. The error names every choice.
pub fn check(arch: &str) -> Result<String, String> {
    if DPKG_ARCHES.contains(&arch) || ALIASES.contains(&arch) {
        Ok(arch.to_string())
    } else {
        Err(format!(
            "{arch}: not an architecture strata knows (dpkg names: {}; dib's aliases: {})",
            DPKG_ARCHES.join(", "),
            ALIASES.join(", ")
        ))
    }
}

/// Maps a `uname -m` machine name to dpkg's name: x86_64→amd64, aarch64→arm64, armv*→armhf,
/// i?86→i386, ppc64le→ppc64el; anything else unchanged.
pub fn dpkg_arch_from_machine(machine: &str) -> String {
    match machine {
        "x86_64" => "amd64".to_string(),
        "aarch64" | "arm64" => "arm64".to_string(),
        "ppc64le" => "ppc64el".to_string(),
        m if m.starts_with("armv") => "armhf".to_string(),
        m if m.len() == 4 && m.starts_with('i') && m.ends_with("86") => "i386".to_string(),
        m => m.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_map_to_dpkg_names() {
        for (m, want) in [
            ("x86_64", "amd64"),
            ("aarch64", "arm64"),
            ("armv7l", "armhf"),
            ("i686", "i386"),
            ("ppc64le", "ppc64el"),
            ("s390x", "s390x"),
        ] {
            assert_eq!(dpkg_arch_from_machine(m), want, "{m}");
        }
    }

    #[test]
    fn known_arches_and_aliases_pass_others_are_refused() {
        assert_eq!(check("amd64").unwrap(), "amd64");
        assert_eq!(check("x86_64").unwrap(), "x86_64");
        let e = check("nosucharch").unwrap_err();
        assert!(e.contains("nosucharch") && e.contains("arm64") && e.contains("aarch64"));
        assert!(check(&host_arch()).is_ok());
    }

    #[test]
    fn host_arch_agrees_with_the_machine() {
        let arch = host_arch();
        assert!(!arch.is_empty());
        assert_eq!(
            arch,
            dpkg_arch_from_machine(&machine()),
            "dpkg and uname disagree"
        );
    }
}
