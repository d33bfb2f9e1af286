//! A small driver for the layer format, used by `benches/pack_vs_tar.sh`.
//!
//! ```text
//! layer_tool pack DIR > FILE.tar.zst     full layer of DIR (zstd, all cores)
//! layer_tool tar DIR > FILE.tar          full plain tar of DIR
//! layer_tool unpack FILE.tar.zst DIR     unpack onto DIR (created if missing)
//! ```
//! The layer info (diff id, sizes) goes to stderr.

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;

use strata::layer::{self, PackOptions, ScanOptions, UnpackOptions};

fn run(args: &[String]) -> anyhow::Result<()> {
    match args {
        [cmd, dir] if cmd == "pack" || cmd == "tar" => {
            let root = Path::new(dir);
            let s = layer::scan(root, &ScanOptions::default())?;
            let changes = layer::Changeset::full(&s);
            // Raw stdout (not Rust's line-buffered handle), with a big buffer.
            let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
            let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::from(fd));
            let opts = PackOptions::default();
            let info = if cmd == "pack" {
                layer::pack(root, &changes, &mut out, &opts)?
            } else {
                layer::write_tar(root, &changes, &mut out, &opts)?
            };
            out.flush()?;
            eprintln!(
                "diff_id {} tar_size {} entries {}",
                info.diff_id, info.tar_size, info.entries
            );
            Ok(())
        }
        [cmd, file, dir] if cmd == "unpack" => {
            std::fs::create_dir_all(dir)?;
            // Unbuffered, like a cached blob: the zstd decoder buffers its input itself.
            let f = std::fs::File::open(file)?;
            let st = layer::unpack(f, Path::new(dir), &UnpackOptions::default())?;
            eprintln!(
                "diff_id {} tar_size {} entries {}",
                st.diff_id, st.tar_size, st.entries
            );
            Ok(())
        }
        _ => anyhow::bail!("usage: layer_tool pack DIR | tar DIR | unpack FILE DIR"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("layer_tool: {e:#}");
            ExitCode::FAILURE
        }
    }
}
