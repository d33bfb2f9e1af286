//! The `strata` binary: parse arguments, set up logging, run, and map errors to exit statuses.

use clap::Parser;
use std::process::ExitCode;

/// The arguments, with `disk-image-create ARGS` (as argv[0], or as the first argument) read as
/// `strata build ARGS`, so existing dib build scripts keep working.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = std::env::args_os().collect();
    let invoked_as_dib = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "disk-image-create");
    if invoked_as_dib {
        args.insert(1, "build".into());
    } else if args.get(1).is_some_and(|a| a == "disk-image-create") {
        args[1] = "build".into();
    }
    args
}

fn main() -> ExitCode {
    let cli = strata::cli::Cli::parse_from(arguments());
    strata::logging::init(cli.verbose);
    match strata::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", strata::error::render(&err));
            ExitCode::from(strata::error::exit_code(&err))
        }
    }
}
