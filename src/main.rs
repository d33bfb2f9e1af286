//! The `strata` binary: parse arguments, set up logging, run, and map errors to exit statuses.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = strata::cli::Cli::parse();
    strata::logging::init(cli.verbose);
    match strata::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(strata::error::exit_code(&err))
        }
    }
}
