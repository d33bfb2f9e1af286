//! Tests of the layer module.
