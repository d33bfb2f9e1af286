//! Integration tests: run the real `strata` binary on fixture elements.
mod sandbox;
