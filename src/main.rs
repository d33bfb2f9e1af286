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
    let json = cli.progress == strata::progress::Mode::Json;
    strata::logging::init(cli.verbose, json);
    match strata::run(cli) {
        Ok(status) => ExitCode::from(status),
        // A reader that went away (`strata cache ls | head`) is not a failure.
        Err(err) if strata::error::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let message = strata::error::render(&err);
            if json {
                let event = strata::progress::Event::Log {
                    level: "error",
                    message: &message,
                };
                eprintln!("{}", strata::progress::event_line(&event));
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::from(strata::error::exit_code(&err))
        }
    }
}
