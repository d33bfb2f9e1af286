//! Integration tests: run the real `strata` binary on fixture elements.

mod audit;
mod build;
mod debian;
mod dib_helpers;
mod disk;
mod elements;
mod face;
mod faults;
mod harness;
mod hostmount;
mod kept_tree;
mod registry;
#[path = "../support/registry_server.rs"]
mod registry_server;
mod sandbox;
mod shell;
mod tar_chunks;
mod util;
