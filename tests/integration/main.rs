//! Integration tests: run the real `strata` binary on fixture elements.

mod build;
mod debian;
mod dib_helpers;
mod disk;
mod elements;
mod face;
mod faults;
mod harness;
mod sandbox;
mod util;
