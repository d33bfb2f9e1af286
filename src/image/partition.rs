//! Partition tables: dib's layout rules (MBR alignment, primary/extended/logical numbering; GPT
//! sizes in whole MiB from the space left) computed here, written by `sfdisk` from util-linux.
//!
//! ```text
//! Table + disk size ──layout()──► [Planned {number, start, sectors, type, boot, name, uuid}]
//!                   ──script()──► sfdisk script ──write_table(target)──► bytes on the file/device
//! ```
//!
//! MBR follows dib's `mbr.py`: partitions start on `align` boundaries (1 MiB), the first
//! non-primary partition opens an extended partition (type 0x0f) over the rest of the disk in
//! the next slot, logical partitions are numbered from 5 and each leaves one alignment unit for
//! its EBR (sfdisk writes the EBRs). More than four primary slots is an error (dib silently
//! overwrote the boot signature). GPT follows dib's sgdisk call: `disk - 2 MiB` of free space,
//! sizes rounded down to whole MiB, partitions packed on 1 MiB boundaries, named after their
//! nodes; a `boot` flag sets the LegacyBIOSBootable attribute (dib ignores it on GPT).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::config::{PartSpec, Table, TableLabel};
use super::size::parse_rel_size_spec;
use super::{ImageError, derive_id, uuid_string};

const MIB: u64 = 1 << 20;

/// One partition as it will be written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Planned {
    /// The kernel's partition number (`loopNp<number>`).
    pub number: u32,
    /// The node name, or `None` for the extended container.
    pub name: Option<String>,
    pub start: u64,
    pub sectors: u64,
    /// sfdisk's type field: `83` / `f` for MBR, a GUID for GPT.
    pub ptype: String,
    pub boot: bool,
    pub uuid: Option<String>,
}

/// A table laid out on a disk: what sfdisk gets.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub label: TableLabel,
    pub disk_id: String,
    pub parts: Vec<Planned>,
}

impl Layout {
    /// The partition number of the node `name`.
    pub fn number_of(&self, name: &str) -> Option<u32> {
        self.parts
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.number)
    }
}

/// Lays `table` out on a disk of `disk_bytes` with `sector`-byte sectors.
pub(crate) fn layout(
    table: &Table,
    disk_bytes: u64,
    sector: u64,
    seed: &[u8; 32],
) -> Result<Layout, ImageError> {
    match table.label {
        TableLabel::Mbr => layout_mbr(table, disk_bytes, sector, seed),
        TableLabel::Gpt => layout_gpt(table, disk_bytes, sector, seed),
    }
}

fn layout_mbr(
    table: &Table,
    disk_bytes: u64,
    sector: u64,
    seed: &[u8; 32],
) -> Result<Layout, ImageError> {
    let disk_blocks = disk_bytes / sector;
    let align_blocks = (table.align / sector).max(1);
    let align = |b: u64| b.div_ceil(align_blocks) * align_blocks;
    let mut next_free = align(1);
    let mut slot: u32 = 0; // MBR slots used (0..4)
    let mut logical: Option<u32> = None; // last logical number once the extended one exists
    let mut parts = Vec::new();
    let id = derive_id(seed, "mbr-disk-id", &table.base);
    let disk_id = format!("0x{:02x}{:02x}{:02x}{:02x}", id[0], id[1], id[2], id[3]);
    for p in &table.partitions {
        let free = disk_bytes.saturating_sub((next_free + align(1)) * sector);
        let bytes = parse_rel_size_spec(&p.size, free)?;
        let sectors = bytes / sector;
        if sectors == 0 {
            return Err(ImageError::Config(format!(
                "partition {}: size [{}] is less than one sector",
                p.name, p.size
            )));
        }
        let start = if p.primary {
            if logical.is_some() {
                return Err(ImageError::Config(
                    "All primary partitions must be given first".into(),
                ));
            }
            if slot >= 4 {
                return Err(too_many(&p.name));
            }
            slot += 1;
            let start = align(next_free);
            parts.push(planned_mbr(p, slot, start, sectors));
            start
        } else {
            let number = match logical {
                Some(n) => n + 1,
                None => {
                    if slot >= 4 {
                        return Err(too_many(&p.name));
                    }
                    slot += 1;
                    parts.push(Planned {
                        number: slot,
                        name: None,
                        start: next_free,
                        sectors: disk_blocks.saturating_sub(next_free),
                        ptype: "f".into(),
                        boot: false,
                        uuid: None,
                    });
                    5
                }
            };
            logical = Some(number);
            // One alignment unit for the EBR, then the data.
            let start = align(next_free + 1);
            parts.push(planned_mbr(p, number, start, sectors));
            start
        };
        if start + sectors > disk_blocks {
            return Err(ImageError::Config(format!(
                "partition {} ({} bytes) does not fit on the {disk_bytes}-byte disk; make the \
                 image bigger or the partition smaller",
                p.name,
                sectors * sector
            )));
        }
        next_free = align(start + sectors);
    }
    Ok(Layout {
        label: TableLabel::Mbr,
        disk_id,
        parts,
    })
}

fn too_many(name: &str) -> ImageError {
    ImageError::Config(format!(
        "partition {name}: an MBR holds only four primary partitions (counting the extended one); \
         drop the 'primary' flag from later partitions to make them logical"
    ))
}

fn planned_mbr(p: &PartSpec, number: u32, start: u64, sectors: u64) -> Planned {
    Planned {
        number,
        name: Some(p.name.clone()),
        start,
        sectors,
        ptype: format!("{:x}", p.mbr_type),
        boot: p.boot,
        uuid: None,
    }
}

fn layout_gpt(
    table: &Table,
    disk_bytes: u64,
    sector: u64,
    seed: &[u8; 32],
) -> Result<Layout, ImageError> {
    let disk_blocks = disk_bytes / sector;
    // The backup table: 32 sectors of entries (16 KiB) plus the header.
    let last_usable = disk_blocks.saturating_sub((16384 / sector) + 2);
    let align_blocks = (MIB / sector).max(1);
    let mut next_free = align_blocks;
    let mut disk_free = disk_bytes.saturating_sub(2 * MIB);
    let mut parts = Vec::new();
    for (i, p) in table.partitions.iter().enumerate() {
        let size = parse_rel_size_spec(&p.size, disk_free)?;
        if size > disk_free {
            return Err(ImageError::Config(format!(
                "The requested size of the image is smaller than the block device configuration \
                 (partition {} wants {size} bytes, {disk_free} are left)",
                p.name
            )));
        }
        let mib = size / MIB;
        if mib == 0 {
            return Err(ImageError::Config(format!(
                "partition {}: size [{}] is less than 1 MiB (GPT sizes are whole MiB)",
                p.name, p.size
            )));
        }
        let start = next_free.div_ceil(align_blocks) * align_blocks;
        let sectors = mib * MIB / sector;
        if start + sectors - 1 > last_usable {
            return Err(ImageError::Config(format!(
                "partition {} does not fit on the {disk_bytes}-byte disk; make the image bigger",
                p.name
            )));
        }
        parts.push(Planned {
            number: i as u32 + 1,
            name: Some(p.name.clone()),
            start,
            sectors,
            ptype: gpt_type_guid(&p.gpt_type).ok_or_else(|| {
                ImageError::Config(format!(
                    "partition {}: unknown GPT type [{}]; use an sgdisk code such as 8300, \
                     EF00, EF02, 8200 or a type GUID",
                    p.name, p.gpt_type
                ))
            })?,
            boot: p.boot,
            uuid: Some(uuid_string(derive_id(seed, "gpt-partition", &p.name))),
        });
        next_free = start + sectors;
        disk_free -= size;
    }
    Ok(Layout {
        label: TableLabel::Gpt,
        disk_id: uuid_string(derive_id(seed, "gpt-disk", &table.base)),
        parts,
    })
}

/// sgdisk's hex type codes for the types images use, or a GUID as given.
pub(crate) fn gpt_type_guid(code: &str) -> Option<String> {
    let known: &[(&str, &str)] = &[
        ("8300", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        ("EF00", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        ("EF02", "21686148-6449-6E6F-744E-656564454649"),
        ("8200", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
        ("8E00", "E6D6D379-F507-44C2-A23C-238F2A3DF928"),
        ("FD00", "A19D880F-05FC-4D3B-A006-743F0F84911E"),
        ("0700", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
        ("4100", "9E1A2D38-C612-4316-AA26-8B49521E5A8B"),
        ("EA00", "BC13C2FF-59E6-4262-A352-B275FD6F7172"),
        ("8302", "933AC7E1-2EB4-4F13-B844-0E14E2AEF915"),
        ("8303", "44479540-F297-41B2-9AF7-D131D5F0458A"),
        ("8304", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        ("8305", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        ("8306", "3B8F8425-20E0-4F3B-907F-1A25A76F98E8"),
        ("8307", "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3"),
        ("8310", "4D21B016-B534-45C2-A9FB-5C16E091FD2D"),
        ("8311", "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1"),
    ];
    let upper = code.trim().to_ascii_uppercase();
    if let Some((_, guid)) = known.iter().find(|(c, _)| *c == upper) {
        return Some((*guid).to_string());
    }
    let is_guid = upper.len() == 36
        && upper.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    is_guid.then_some(upper)
}

/// The sfdisk script for `layout`.
pub(crate) fn script(layout: &Layout) -> String {
    let mut s = String::new();
    s.push_str(match layout.label {
        TableLabel::Mbr => "label: dos\n",
        TableLabel::Gpt => "label: gpt\n",
    });
    s.push_str(&format!("label-id: {}\nunit: sectors\n\n", layout.disk_id));
    for p in &layout.parts {
        let mut line = format!("start={}, size={}, type={}", p.start, p.sectors, p.ptype);
        match layout.label {
            TableLabel::Mbr => {
                if p.boot {
                    line.push_str(", bootable");
                }
            }
            TableLabel::Gpt => {
                if let Some(u) = &p.uuid {
                    line.push_str(&format!(", uuid={u}"));
                }
                if let Some(n) = &p.name {
                    line.push_str(&format!(", name=\"{n}\""));
                }
                if p.boot {
                    line.push_str(", attrs=\"LegacyBIOSBootable\"");
                }
            }
        }
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// Writes `layout` onto `target` (the image file, or the loop device for 4 KiB sectors).
pub(crate) fn write_table(target: &Path, layout: &Layout) -> Result<(), ImageError> {
    let text = script(layout);
    let command = format!("sfdisk {}", target.display());
    let mut child = Command::new("sfdisk")
        .args([
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            "--wipe",
            "always",
        ])
        .arg(target)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            command: command.clone(),
            detail: format!("cannot run sfdisk ({e}); install util-linux's fdisk package"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| ImageError::io(format!("feeding the script to {command}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ImageError::io(format!("waiting for {command}"), e))?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command,
            detail: one_line(&out.stderr, &out.stdout),
        });
    }
    Ok(())
}

/// A tool's complaint squeezed onto one line.
pub(crate) fn one_line(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        stderr
    } else {
        stdout
    };
    let s = String::from_utf8_lossy(text);
    let joined: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if joined.is_empty() {
        "no output".into()
    } else {
        joined.join(" / ")
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::parse_config;
    use super::*;

    fn table(yaml: &str) -> Table {
        parse_config(yaml)
            .unwrap()
            .graph(false)
            .unwrap()
            .tables
            .remove(0)
    }

    #[test]
    fn mbr_single_partition_matches_dib() {
        let t = table(include_str!(
            "../../elements/block-device-mbr/block-device-default.yaml"
        ));
        let l = layout(&t, 100 * MIB, 512, &[0; 32]).unwrap();
        assert_eq!(l.parts.len(), 1);
        let p = &l.parts[0];
        // dib: start 2048, length = disk - (next_free + align) sectors = 98 MiB.
        assert_eq!((p.number, p.start, p.sectors), (1, 2048, 98 * 2048));
        assert!(p.boot);
        assert_eq!(p.ptype, "83");
        assert!(l.disk_id.starts_with("0x") && l.disk_id.len() == 10);
    }

    #[test]
    fn mbr_logical_partitions_follow_dib() {
        let t = table(
            "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - {name: a, flags: [boot, primary], size: 10MiB}
      - {name: b, size: 10MiB, type: '82'}
      - {name: c, size: 100%}
",
        );
        let l = layout(&t, 100 * MIB, 512, &[0; 32]).unwrap();
        let got: Vec<(u32, u64, u64, &str)> = l
            .parts
            .iter()
            .map(|p| (p.number, p.start, p.sectors, p.ptype.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 2048, 20480, "83"),
                (2, 22528, 204800 - 22528, "f"),
                (5, 24576, 20480, "82"),
                (6, 47104, (100 * MIB - (45056 + 2048) * 512) / 512, "83"),
            ]
        );
        assert_eq!(l.number_of("c"), Some(6));
    }

    #[test]
    fn mbr_errors() {
        let five = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - {name: a, flags: [primary], size: 1MiB}
      - {name: b, flags: [primary], size: 1MiB}
      - {name: c, flags: [primary], size: 1MiB}
      - {name: d, flags: [primary], size: 1MiB}
      - {name: e, flags: [primary], size: 1MiB}
";
        let e = layout(&table(five), 100 * MIB, 512, &[0; 32])
            .unwrap_err()
            .to_string();
        assert!(e.contains("only four primary"), "{e}");
        let order = "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - {name: a, size: 1MiB}
      - {name: b, flags: [primary], size: 1MiB}
";
        let e = layout(&table(order), 100 * MIB, 512, &[0; 32])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("All primary partitions must be given first"),
            "{e}"
        );
        let big = "
- local_loop: {name: image0}
- partitioning: {base: image0, label: mbr, partitions: [{name: a, flags: [primary], size: 1GiB}]}
";
        let e = layout(&table(big), 100 * MIB, 512, &[0; 32])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn gpt_efi_matches_dib_sizes() {
        let t = table(include_str!(
            "../../elements/block-device-efi/block-device-default.yaml"
        ));
        let l = layout(&t, 1024 * MIB, 512, &[7; 32]).unwrap();
        let got: Vec<(u32, u64, u64)> = l
            .parts
            .iter()
            .map(|p| (p.number, p.start, p.sectors))
            .collect();
        let free_mib = 1024 - 2 - 550 - 8;
        assert_eq!(
            got,
            [
                (1, 2048, 550 * 2048),
                (2, 2048 + 550 * 2048, 8 * 2048),
                (3, 2048 + 558 * 2048, free_mib * 2048),
            ]
        );
        assert_eq!(l.parts[0].ptype, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(l.parts[1].ptype, "21686148-6449-6E6F-744E-656564454649");
        let s = script(&l);
        assert!(s.starts_with("label: gpt\nlabel-id: "), "{s}");
        assert!(s.contains("name=\"ESP\""), "{s}");
        // Same seed, same ids; another seed, other ids.
        let again = layout(&t, 1024 * MIB, 512, &[7; 32]).unwrap();
        assert_eq!(script(&again), s);
        assert_ne!(script(&layout(&t, 1024 * MIB, 512, &[8; 32]).unwrap()), s);
    }

    #[test]
    fn gpt_errors_and_types() {
        assert_eq!(
            gpt_type_guid("ef02").as_deref(),
            Some("21686148-6449-6E6F-744E-656564454649")
        );
        assert!(gpt_type_guid("0fc63daf-8483-4772-8e79-3d69d8477de4").is_some());
        assert!(gpt_type_guid("ZZ00").is_none());
        let big = "
- local_loop: {name: image0}
- partitioning: {base: image0, label: gpt, partitions: [{name: a, size: 1GiB}]}
";
        let e = layout(&table(big), 100 * MIB, 512, &[0; 32])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("The requested size of the image is smaller"),
            "{e}"
        );
        let bad = "
- local_loop: {name: image0}
- partitioning: {base: image0, label: gpt, partitions: [{name: a, size: 1MiB, type: 'ZZ00'}]}
";
        let e = layout(&table(bad), 100 * MIB, 512, &[0; 32])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown GPT type [ZZ00]"), "{e}");
    }

    #[test]
    fn sfdisk_writes_what_we_planned() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(100 * MIB)
            .unwrap();
        let t = table(
            "
- local_loop: {name: image0}
- partitioning:
    base: image0
    label: mbr
    partitions:
      - {name: a, flags: [boot, primary], size: 10MiB}
      - {name: b, size: 10MiB, type: '82'}
      - {name: c, size: 100%}
",
        );
        let l = layout(&t, 100 * MIB, 512, &[3; 32]).unwrap();
        write_table(&file, &l).unwrap();
        let out = Command::new("sfdisk")
            .arg("--json")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let pt = &v["partitiontable"];
        assert_eq!(pt["label"], "dos");
        assert_eq!(pt["id"].as_str(), Some(l.disk_id.as_str()));
        let parts = pt["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 4);
        for (got, want) in parts.iter().zip(&l.parts) {
            assert_eq!(got["start"].as_u64(), Some(want.start));
            assert_eq!(got["size"].as_u64(), Some(want.sectors));
            assert_eq!(got["type"].as_str(), Some(want.ptype.as_str()));
            assert_eq!(got["bootable"].as_bool().unwrap_or(false), want.boot);
            assert!(
                got["node"]
                    .as_str()
                    .unwrap()
                    .ends_with(&want.number.to_string())
            );
        }
    }
}
