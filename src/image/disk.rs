//! A created disk: walks the config graph in call order (loop file + table + attach, partition
//! nodes, mkfs, mounts, fstab entries) and tears it down again (fstrim, umount, detach).
//!
//! ```text
//! create(config, params)
//!   Loop      <dir>/<name>.raw (sparse) ─ tables on it ─ LoopDevice::attach (autoclear, partscan)
//!   Partition /dev/loopNpK (kernel scan → partx -a → mknod)
//!   Mkfs      mkfs -t T [opts] -L label -U uuid ... (ids from the seed)
//!   Mount     <mount_base>/<mp>, sorted mount-point order (swap is not mounted; a vfat the
//!             kernel cannot mount gets a staging tmpfs instead, see staged.rs); ext4 with
//!             `nodelalloc` (see "Layout" below)
//!   Fstab     remembered for Disk::fstab()
//!   any error → rollback: umount what was mounted, detach, delete the raw files
//! Disk::unmount → staged vfat written with mtools → per mount in reverse: sync, FITRIM (not
//!           vfat), umount → detach → raw path
//! Disk::unmount_reproducible(epoch) → each mounted ext fs made again from its files (see
//!           repack.rs), staged vfat written with clamped times, kernel-mounted vfat copied out,
//!           then as unmount; the vfat made again (mkfs.vfat + mcopy, staged.rs) and the new
//!           ext file systems written over the old ones in the raw file
//! Drop (no unmount called) → same teardown, best effort, lazy umount as the last resort
//! ```
//!
//! Layout: the qcow2 writer reuses the compressed clusters of the previous image, so the same
//! tree copied into a fresh disk should land on the same blocks. With ext4's default delayed
//! allocation, blocks are chosen at writeback, in whatever order the flusher threads take the
//! inodes: two copies of one tree share about a third of their clusters. Mounted with
//! `nodelalloc`, blocks are allocated in `write()`, in copy order; the copy runs on one CPU
//! ([`super::copy_tree`]) because the allocator keeps a preallocation per CPU for small
//! files. Measured on the debian-minimal tree: 96% of the clusters identical between two copies
//! (the rest: inode tables with the copy's change times, the journal).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};

use super::config::{BlockDeviceConfig, FsSpec, Graph, Kind};
use super::loopdev::LoopDevice;
use super::partition::{self, Layout};
use super::repack::{self, MkfsCommand};
use super::staged;
use super::{ImageError, Params, derive_id, random_seed, run_tool, uuid_string};

/// The timestamp mkfs writes when ids are seeded (2001-09-09T01:46:40Z), unless the build
/// has a SOURCE_DATE_EPOCH (`Params::epoch`).
const DEFAULT_EPOCH: i64 = 1_000_000_000;

/// `FITRIM`: `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xC018_5879;

#[derive(Debug, Clone)]
struct FsState {
    device: PathBuf,
    label: String,
    fstype: String,
    /// How it was made, so a reproducible unmount can make it again from its files.
    mkfs: MkfsCommand,
}

/// What [`Disk::unmount_reproducible`] did with one mounted file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// The mkfs node's name.
    pub filesystem: String,
    pub mount_point: String,
    /// Why it was kept as the kernel left it; `None` when it was rebuilt.
    pub kept_because: Option<String>,
}

#[derive(Debug, Clone)]
struct Mounted {
    node: String,
    mount_point: String,
    /// `None` for swap, which is never mounted.
    path: Option<PathBuf>,
    fs: String,
    mounted: bool,
    /// A tmpfs standing in for a vfat file system the kernel cannot mount (see staged.rs).
    staged: bool,
}

#[derive(Debug, Clone)]
struct FstabEntry {
    options: String,
    dump_freq: String,
    passno: String,
}

/// A created, attached and mounted disk. Dropping it unmounts and detaches (best effort);
/// call [`Disk::unmount`] to do it properly and get the raw image path.
#[derive(Debug)]
pub struct Disk {
    image: Option<PathBuf>,
    raw_files: Vec<PathBuf>,
    loops: Vec<(String, LoopDevice)>,
    /// loop device → its raw file.
    backing: HashMap<PathBuf, PathBuf>,
    devices: Vec<(String, PathBuf)>,
    filesystems: HashMap<String, FsState>,
    mounts: Vec<Mounted>,
    fstab: HashMap<String, FstabEntry>,
    mount_base: PathBuf,
    done: bool,
}

/// Creates every block device, file system and mount the config describes.
pub fn create(config: &BlockDeviceConfig, params: &Params) -> Result<Disk, ImageError> {
    let graph = config.graph(true)?;
    let seed = match params.seed {
        Some(s) => s,
        None => random_seed()?,
    };
    let mut disk = Disk::empty(&params.mount_base);
    match disk.build(&graph, params, &seed) {
        Ok(()) => Ok(disk),
        Err(e) => {
            disk.done = true;
            let _ = disk.teardown(false);
            for f in &disk.raw_files {
                let _ = std::fs::remove_file(f);
            }
            Err(e)
        }
    }
}

/// The mkfs command line for one file system (dib's `mkfs.py`, plus seeded ids), without the
/// device.
fn mkfs_command(
    name: &str,
    spec: &FsSpec,
    seed: &[u8; 32],
    seeded: bool,
    epoch: i64,
) -> MkfsCommand {
    let t = spec.fs_type.as_str();
    let ext = matches!(t, "ext2" | "ext3" | "ext4");
    let uuid = spec
        .uuid
        .clone()
        .unwrap_or_else(|| uuid_string(derive_id(seed, "fs-uuid", name)));
    let mut args: Vec<String> = Vec::new();
    let mut env = Vec::new();
    let program = if t == "swap" {
        "mkswap".to_string()
    } else {
        args.extend(["-t".into(), t.into()]);
        let mut opts = spec.opts.clone();
        if ext && seeded {
            let hash_seed = format!(
                "hash_seed={}",
                uuid_string(derive_id(seed, "ext-hash-seed", name))
            );
            add_extended_option(&mut opts, &hash_seed);
        }
        args.extend(opts);
        "mkfs".to_string()
    };
    if t == "vfat" || t == "fat" {
        if seeded {
            args.push("--invariant".into());
        }
        args.extend(["-n".into(), spec.label.clone()]);
        let id = derive_id(seed, "vfat-volume-id", name);
        args.extend([
            "-i".into(),
            format!("{:02X}{:02X}{:02X}{:02X}", id[0], id[1], id[2], id[3]),
        ]);
    } else {
        args.extend(["-L".into(), spec.label.clone()]);
    }
    if ext || t == "swap" {
        args.extend(["-U".into(), uuid]);
    } else if t == "xfs" {
        args.extend(["-m".into(), format!("uuid={uuid}")]);
    }
    if ext || t == "xfs" {
        args.push("-q".into());
    }
    if seeded && (ext || t == "swap") {
        env.push(("E2FSPROGS_FAKE_TIME".to_string(), repack::fake_time(epoch)));
    }
    if seeded {
        env.push(("SOURCE_DATE_EPOCH".into(), epoch.to_string()));
    }
    MkfsCommand { program, args, env }
}

/// Appends `opt` to the `-E` option in `opts`, or adds `-E opt` (mke2fs keeps only one `-E`).
fn add_extended_option(opts: &mut Vec<String>, opt: &str) {
    let mut i = 0;
    while i < opts.len() {
        if opts[i] == "-E" && i + 1 < opts.len() {
            opts[i + 1] = format!("{},{opt}", opts[i + 1]);
            return;
        }
        if let Some(rest) = opts[i].strip_prefix("-E")
            && !rest.is_empty()
        {
            opts[i] = format!("-E{rest},{opt}");
            return;
        }
        i += 1;
    }
    opts.extend(["-E".into(), opt.into()]);
}

impl Disk {
    /// A disk with nothing created yet; `build` fills it in.
    fn empty(mount_base: &Path) -> Disk {
        Disk {
            image: None,
            raw_files: Vec::new(),
            loops: Vec::new(),
            backing: HashMap::new(),
            devices: Vec::new(),
            filesystems: HashMap::new(),
            mounts: Vec::new(),
            fstab: HashMap::new(),
            mount_base: mount_base.to_path_buf(),
            done: false,
        }
    }

    fn build(&mut self, graph: &Graph, params: &Params, seed: &[u8; 32]) -> Result<(), ImageError> {
        let seeded = params.seed.is_some();
        let mut layouts: Vec<Option<(String, Layout)>> = vec![None; graph.tables.len()];
        for node in &graph.nodes {
            match &node.kind {
                Kind::Loop {
                    size,
                    directory,
                    block_size,
                } => {
                    let dir = directory
                        .clone()
                        .unwrap_or_else(|| params.image_dir.clone());
                    let path = dir.join(format!("{}.raw", node.name));
                    let bytes =
                        size.unwrap_or(params.image_size).div_ceil(*block_size) * block_size;
                    if bytes == 0 {
                        return Err(ImageError::Config(format!(
                            "local_loop {}: the image size is 0",
                            node.name
                        )));
                    }
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| ImageError::io(format!("creating {}", dir.display()), e))?;
                    let file = File::create(&path)
                        .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
                    self.raw_files.push(path.clone());
                    file.set_len(bytes).map_err(|e| {
                        ImageError::io(format!("sizing {} to {bytes} bytes", path.display()), e)
                    })?;
                    drop(file);
                    let mut mine = Vec::new();
                    for (i, t) in graph.tables.iter().enumerate() {
                        if t.base == node.name {
                            let l = partition::layout(t, bytes, *block_size, seed)?;
                            mine.push(i);
                            layouts[i] = Some((node.name.clone(), l));
                        }
                    }
                    let on_device = *block_size != 512;
                    if !on_device {
                        for &i in &mine {
                            if let Some((_, l)) = &layouts[i] {
                                partition::write_table(&path, l)?;
                            }
                        }
                    }
                    let dev = LoopDevice::attach(&path, *block_size as u32)?;
                    if on_device && !mine.is_empty() {
                        for &i in &mine {
                            if let Some((_, l)) = &layouts[i] {
                                partition::write_table(dev.path(), l)?;
                            }
                        }
                        dev.reread_partitions()?;
                    }
                    self.devices
                        .push((node.name.clone(), dev.path().to_path_buf()));
                    self.backing.insert(dev.path().to_path_buf(), path.clone());
                    if self.image.is_none() || node.name == "image0" {
                        self.image = Some(path);
                    }
                    self.loops.push((node.name.clone(), dev));
                }
                Kind::Partition { table, .. } => {
                    let (loop_name, layout) = layouts[*table].as_ref().ok_or_else(|| {
                        ImageError::Device(format!(
                            "partition {}: its table was not laid out",
                            node.name
                        ))
                    })?;
                    let number = layout.number_of(&node.name).ok_or_else(|| {
                        ImageError::Device(format!("partition {} is not in the layout", node.name))
                    })?;
                    let dev = self
                        .loops
                        .iter_mut()
                        .find(|(n, _)| n == loop_name)
                        .map(|(_, d)| d)
                        .ok_or_else(|| {
                            ImageError::Device(format!(
                                "partition {}: loop device {loop_name} is not attached",
                                node.name
                            ))
                        })?;
                    let path = dev.partition(number)?;
                    self.devices.push((node.name.clone(), path));
                }
                Kind::Mkfs(spec) => {
                    let base = node.base.as_deref().unwrap_or_default();
                    let device = self.device_of(base)?;
                    let epoch = params.epoch.unwrap_or(DEFAULT_EPOCH);
                    let mkfs = mkfs_command(&node.name, spec, seed, seeded, epoch);
                    run_tool(
                        Command::new(&mkfs.program)
                            .args(&mkfs.args)
                            .arg(&device)
                            .envs(mkfs.env.iter().map(|(k, v)| (k, v))),
                    )?;
                    self.filesystems.insert(
                        node.name.clone(),
                        FsState {
                            device,
                            label: spec.label.clone(),
                            fstype: spec.fs_type.clone(),
                            mkfs,
                        },
                    );
                }
                Kind::Mount { mount_point } => {
                    let base = node.base.clone().unwrap_or_default();
                    let fs = self.filesystems.get(&base).cloned().ok_or_else(|| {
                        ImageError::Device(format!("mount {}: {base} was not created", node.name))
                    })?;
                    if fs.fstype == "swap" {
                        self.mounts.push(Mounted {
                            node: node.name.clone(),
                            mount_point: "none".into(),
                            path: None,
                            fs: base,
                            mounted: false,
                            staged: false,
                        });
                        continue;
                    }
                    let path = self.mount_base.join(mount_point.trim_start_matches('/'));
                    std::fs::create_dir_all(&path)
                        .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
                    let fstype = if fs.fstype == "fat" {
                        "vfat"
                    } else {
                        fs.fstype.as_str()
                    };
                    // vfat is often a module: mounting loads it. Only a kernel that still has
                    // no vfat after trying gets the staging folder.
                    let staged = match self.mount_device(&fs.device, &path, fstype) {
                        Ok(()) => false,
                        Err(_) if fstype == "vfat" && !staged::kernel_can_mount("vfat") => {
                            staged::stage(&fs.device, &path)?;
                            true
                        }
                        Err(e) => return Err(e),
                    };
                    self.mounts.push(Mounted {
                        node: node.name.clone(),
                        mount_point: mount_point.clone(),
                        path: Some(path),
                        fs: base,
                        mounted: true,
                        staged,
                    });
                }
                Kind::Fstab {
                    options,
                    dump_freq,
                    passno,
                } => {
                    let base = node.base.clone().unwrap_or_default();
                    let swap = self
                        .mounts
                        .iter()
                        .any(|m| m.node == base && m.path.is_none());
                    let entry = if swap {
                        FstabEntry {
                            options: "sw".into(),
                            dump_freq: "0".into(),
                            passno: "0".into(),
                        }
                    } else {
                        FstabEntry {
                            options: options.clone(),
                            dump_freq: dump_freq.clone(),
                            passno: passno.clone(),
                        }
                    };
                    self.fstab.insert(base, entry);
                }
            }
        }
        Ok(())
    }

    fn mount_device(&self, device: &Path, path: &Path, fstype: &str) -> Result<(), ImageError> {
        // Blocks allocated in copy order: a stable layout (module doc).
        let data = (fstype == "ext4").then_some("nodelalloc");
        nix::mount::mount(Some(device), path, Some(fstype), MsFlags::empty(), data).map_err(|e| {
            let hint = if e == nix::errno::Errno::ENODEV {
                format!(" (this kernel cannot mount {fstype}: it is not in /proc/filesystems)")
            } else {
                String::new()
            };
            ImageError::Device(format!(
                "mounting {} ({fstype}) on {}: {e}{hint}",
                device.display(),
                path.display()
            ))
        })
    }

    fn device_of(&self, name: &str) -> Result<PathBuf, ImageError> {
        self.devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| ImageError::Device(format!("block device {name} was not created")))
    }

    /// Where `/` is mounted (dib's `$TMP_BUILD_DIR/mnt`).
    pub fn root_mount(&self) -> &Path {
        &self.mount_base
    }

    /// Where this disk's own file systems are mounted now (hooks' mounts are not in it).
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.mounts
            .iter()
            .filter(|m| m.mounted)
            .filter_map(|m| m.path.clone())
            .collect()
    }

    /// `IMAGE_BLOCK_DEVICE`: the loop device of `image0` (or of the first loop).
    pub fn device(&self) -> &Path {
        self.loops
            .iter()
            .find(|(n, _)| n == "image0")
            .or_else(|| self.loops.first())
            .map(|(_, d)| d.path())
            .unwrap_or(Path::new(""))
    }

    /// `IMAGE_BLOCK_DEVICES`: every block device by node name, in creation order.
    pub fn devices(&self) -> Vec<(String, PathBuf)> {
        self.devices.clone()
    }

    /// `IMAGE_BLOCK_DEVICES` in dib's `eval declare -A` form: ` [name]=dev ` per device.
    pub fn devices_env(&self) -> String {
        self.devices
            .iter()
            .map(|(n, p)| format!(" [{n}]={} ", p.display()))
            .collect()
    }

    /// The raw image of `image0` (dib's `getval image-path`).
    pub fn image_path(&self) -> &Path {
        self.image.as_deref().unwrap_or(Path::new(""))
    }

    /// dib's `writefstab`: `LABEL=<label> <mp> <type> <options> <dump> <passno>` per mount
    /// (in mount order) that has an fstab entry.
    pub fn fstab(&self) -> String {
        let mut out = String::new();
        for m in &self.mounts {
            let (Some(fs), Some(entry)) = (self.filesystems.get(&m.fs), self.fstab.get(&m.node))
            else {
                continue;
            };
            out.push_str(&format!(
                "LABEL={} {} {} {} {} {}\n",
                fs.label, m.mount_point, fs.fstype, entry.options, entry.dump_freq, entry.passno
            ));
        }
        out
    }

    /// Trims, unmounts (reverse order) and detaches; returns the raw image path.
    pub fn unmount(mut self) -> Result<PathBuf, ImageError> {
        self.commit_staged(None)?;
        self.done = true;
        self.teardown(true)?;
        Ok(self.image_path().to_path_buf())
    }

    /// Like [`Disk::unmount`], but first rebuilds every mounted ext file system from its own
    /// files with every timestamp at `epoch` (see [`super::repack`]), so two builds of the
    /// same tree give the same raw bytes. A file system that cannot be rebuilt faithfully is
    /// kept as the kernel left it, and the returned list says why.
    pub fn unmount_reproducible(
        mut self,
        epoch: i64,
    ) -> Result<(PathBuf, Vec<Rebuild>), ImageError> {
        let raw = self.image_path().to_path_buf();
        let work = WorkDir::new(raw.with_extension("rebuild"))?;
        let mut report = Vec::new();
        let mut rebuilt = Vec::new();
        let mut vfat = Vec::new();
        for m in &self.mounts {
            let (Some(path), Some(fs)) = (m.path.as_ref(), self.filesystems.get(&m.fs)) else {
                continue;
            };
            if !m.mounted {
                continue;
            }
            if m.staged {
                // Written from its files by commit_staged below: reproducible by construction.
                report.push(Rebuild {
                    filesystem: m.fs.clone(),
                    mount_point: m.mount_point.clone(),
                    kept_because: None,
                });
                continue;
            }
            if matches!(fs.fstype.as_str(), "vfat" | "fat") {
                // Kernel-mounted: copy its files out now, make it again once it is unmounted.
                let tree = work.0.join(format!("{}.files", m.fs));
                let entry = Rebuild {
                    filesystem: m.fs.clone(),
                    mount_point: m.mount_point.clone(),
                    kept_because: None,
                };
                match super::copy_tree(path, &tree) {
                    Ok(()) => vfat.push((entry, fs.device.clone(), fs.mkfs.clone(), tree)),
                    Err(e) => report.push(Rebuild {
                        kept_because: Some(format!("copying its files out failed: {e}")),
                        ..entry
                    }),
                }
                continue;
            }
            if !repack::is_rebuilt_type(&fs.fstype) {
                report.push(Rebuild {
                    filesystem: m.fs.clone(),
                    mount_point: m.mount_point.clone(),
                    kept_because: Some(format!("{} is not rebuilt (only ext2/3/4)", fs.fstype)),
                });
                continue;
            }
            let mut entry = Rebuild {
                filesystem: m.fs.clone(),
                mount_point: m.mount_point.clone(),
                kept_because: None,
            };
            // A failed rebuild (say, a file system too full for mke2fs -d to pack the same
            // files) costs reproducibility, not the image: keep the kernel's and say why.
            let made = self.placement(&fs.device).and_then(|placement| {
                let image = repack::rebuild(&m.fs, path, &fs.mkfs, placement.len, &work.0, epoch)?;
                Ok((image, placement))
            });
            match made {
                Ok((image, placement)) => {
                    rebuilt.push((entry, fs.device.clone(), image, placement))
                }
                Err(e) => {
                    entry.kept_because = Some(format!("rebuilding it failed: {e}"));
                    report.push(entry);
                }
            }
        }
        self.commit_staged(Some(epoch))?;
        self.umount_all(true)?;
        for (entry, device, mkfs, tree) in vfat {
            staged::remake(&device, &mkfs, &tree, epoch)?;
            report.push(entry);
        }
        let mut writes = Vec::new();
        for (mut entry, device, image, placement) in rebuilt {
            match repack::superblock_difference(&device, &image)? {
                Some(d) => {
                    entry.kept_because = Some(format!(
                        "a hook changed its superblock after mkfs ({d}); a rebuild would lose it"
                    ))
                }
                None => writes.push((report.len(), image, placement)),
            }
            report.push(entry);
        }
        self.done = true;
        self.detach_all()?;
        for (i, image, placement) in writes {
            let core = repack::grub_core_sector(&placement.raw)?.map(|s| s * 512);
            if let Some(core) =
                core.filter(|c| (placement.offset..placement.offset + placement.len).contains(c))
            {
                report[i].kept_because = Some(format!(
                    "GRUB's boot sector loads core.img from byte {core} inside it (a block list)"
                ));
                continue;
            }
            repack::write_into(&placement, &image)?;
        }
        Ok((raw, report))
    }

    /// Where a partition or loop device keeps its bytes (valid while attached).
    fn placement(&self, device: &Path) -> Result<repack::Placement, ImageError> {
        let name = device.file_name().unwrap_or_default().to_string_lossy();
        for (dev, raw) in &self.backing {
            let loop_name = dev.file_name().unwrap_or_default().to_string_lossy();
            let is_part = name
                .strip_prefix(loop_name.as_ref())
                .and_then(|rest| rest.strip_prefix('p'))
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
            if dev == device || is_part {
                return repack::placement_of(device, dev, raw);
            }
        }
        Err(ImageError::Device(format!(
            "{} is on none of this image's loop devices",
            device.display()
        )))
    }

    /// Writes each staged vfat file system's files into it (see staged.rs).
    fn commit_staged(&self, epoch: Option<i64>) -> Result<(), ImageError> {
        for m in self.mounts.iter().filter(|m| m.staged && m.mounted) {
            let (Some(path), Some(fs)) = (m.path.as_ref(), self.filesystems.get(&m.fs)) else {
                continue;
            };
            staged::commit(&fs.device, path, epoch)?;
        }
        Ok(())
    }

    fn teardown(&mut self, trim: bool) -> Result<(), ImageError> {
        let unmounted = self.umount_all(trim);
        let detached = self.detach_all();
        unmounted.and(detached)
    }

    /// Trims (unless `trim` is false or the file system is vfat) and unmounts every mount in
    /// reverse order; a mount that stays busy is detached lazily and reported.
    fn umount_all(&mut self, trim: bool) -> Result<(), ImageError> {
        let mut first_err: Option<ImageError> = None;
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        for m in self.mounts.iter_mut().rev() {
            let Some(path) = m.path.clone().filter(|_| m.mounted) else {
                continue;
            };
            let fstype = self.filesystems.get(&m.fs).map(|f| f.fstype.as_str());
            if trim && !matches!(fstype, Some("vfat" | "fat")) {
                fitrim(&path);
            }
            match umount_retry(&path) {
                Ok(()) => m.mounted = false,
                Err(e) => {
                    // Detach it lazily so the loop device can still go once it is idle.
                    if nix::mount::umount2(&path, MntFlags::MNT_DETACH).is_ok() {
                        m.mounted = false;
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn detach_all(&mut self) -> Result<(), ImageError> {
        let mut first_err: Option<ImageError> = None;
        for (_, dev) in self.loops.drain(..).rev() {
            if let Err(e) = dev.detach(Duration::from_secs(10)) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A scratch directory, removed with its contents when dropped, unless something is still
/// mounted in it (a bind that failed to unmount is left alone, never emptied).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(path: PathBuf) -> Result<WorkDir, ImageError> {
        std::fs::create_dir_all(&path)
            .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        match crate::sandbox::mounts_at_or_under(&self.0) {
            Ok(m) if m.is_empty() => {
                let _ = std::fs::remove_dir_all(&self.0);
            }
            _ => tracing::warn!(
                "{} still has something mounted in it (or the mount table is unreadable); \
                 left in place",
                self.0.display()
            ),
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Err(e) = self.teardown(false) {
                tracing::warn!("cleaning up the disk image: {e}");
            }
        }
    }
}

/// Discards unused blocks so the sparse file shrinks (dib's `fstrim`); failures only warn.
fn fitrim(path: &Path) {
    #[repr(C)]
    struct FstrimRange {
        start: u64,
        len: u64,
        minlen: u64,
    }
    let Ok(dir) = File::open(path) else {
        return;
    };
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes one `struct fstrim_range` that outlives the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITRIM as _, &mut range) };
    if rc != 0 {
        tracing::warn!(
            "fstrim {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

fn umount_retry(path: &Path) -> Result<(), ImageError> {
    let mut last = None;
    for _ in 0..10 {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) => return Ok(()), // not mounted any more
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(ImageError::Device(format!(
        "unmounting {}: {} (a process may still use it; see `fuser -m {}`)",
        path.display(),
        last.map(|e| e.to_string()).unwrap_or_default(),
        path.display()
    )))
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
