//! The subcommands: each turns parsed CLI arguments into library calls and prints the result.

pub mod elements;
