//! The `strata` binary: parse arguments, set up logging, run, and map errors to exit statuses.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = strata::cli::Cli::parse_from(strata::cli::arguments());
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
