//! The dib hook phases: their order, their folder names and where each one runs.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One dib hook phase. The declaration order is the build order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Root,
    ExtraData,
    PreInstall,
    Install,
    PostInstall,
    PostRoot,
    BlockDevice,
    PreFinalise,
    Finalise,
    Cleanup,
}

impl Phase {
    /// Every phase, in build order.
    pub const ALL: [Phase; 10] = [
        Phase::Root,
        Phase::ExtraData,
        Phase::PreInstall,
        Phase::Install,
        Phase::PostInstall,
        Phase::PostRoot,
        Phase::BlockDevice,
        Phase::PreFinalise,
        Phase::Finalise,
        Phase::Cleanup,
    ];

    /// The name without the `.d` suffix, as dib's `run_d` takes it (`root`, `extra-data`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Root => "root",
            Phase::ExtraData => "extra-data",
            Phase::PreInstall => "pre-install",
            Phase::Install => "install",
            Phase::PostInstall => "post-install",
            Phase::PostRoot => "post-root",
            Phase::BlockDevice => "block-device",
            Phase::PreFinalise => "pre-finalise",
            Phase::Finalise => "finalise",
            Phase::Cleanup => "cleanup",
        }
    }

    /// The folder an element keeps this phase's hooks in (`root.d`, `install.d`, ...).
    pub fn dir_name(self) -> &'static str {
        match self {
            Phase::Root => "root.d",
            Phase::ExtraData => "extra-data.d",
            Phase::PreInstall => "pre-install.d",
            Phase::Install => "install.d",
            Phase::PostInstall => "post-install.d",
            Phase::PostRoot => "post-root.d",
            Phase::BlockDevice => "block-device.d",
            Phase::PreFinalise => "pre-finalise.d",
            Phase::Finalise => "finalise.d",
            Phase::Cleanup => "cleanup.d",
        }
    }

    /// Parses either form: `install` or `install.d`.
    pub fn parse(s: &str) -> Option<Phase> {
        let bare = s.strip_suffix(".d").unwrap_or(s);
        Phase::ALL.into_iter().find(|p| p.name() == bare)
    }

    /// The phase of a folder name, if that folder is a phase folder.
    pub fn from_dir_name(dir: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.dir_name() == dir)
    }

    /// True for the phases dib runs chrooted into the new root.
    pub fn in_chroot(self) -> bool {
        matches!(
            self,
            Phase::PreInstall | Phase::Install | Phase::PostInstall | Phase::Finalise
        )
    }

    /// True for the phases that get `TARGET_ROOT` (dib sets it for root.d and cleanup.d only).
    pub fn sets_target_root(self) -> bool {
        matches!(self, Phase::Root | Phase::Cleanup)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_both_forms_and_rejects_others() {
        assert_eq!(Phase::parse("install"), Some(Phase::Install));
        assert_eq!(Phase::parse("install.d"), Some(Phase::Install));
        assert_eq!(Phase::parse("extra-data.d"), Some(Phase::ExtraData));
        assert_eq!(Phase::parse("environment.d"), None);
        assert_eq!(Phase::from_dir_name("bin"), None);
    }

    #[test]
    fn chroot_phases_are_the_install_and_finalise_ones() {
        let chrooted: Vec<_> = Phase::ALL.into_iter().filter(|p| p.in_chroot()).collect();
        assert_eq!(
            chrooted,
            [
                Phase::PreInstall,
                Phase::Install,
                Phase::PostInstall,
                Phase::Finalise
            ]
        );
    }
}
