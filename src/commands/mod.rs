//! The subcommands: each turns parsed CLI arguments into library calls and prints the result.

pub mod cache;
pub mod dib;
pub mod elements;
