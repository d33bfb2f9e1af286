//! The sandbox: the build's private mount namespace, chroot mounts, and running a command on the
//! host or chrooted so that nothing it mounts or starts outlives the build.
