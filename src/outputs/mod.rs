//! Output writers that turn a finished root tree into a deliverable (container images for now).

pub mod oci;
