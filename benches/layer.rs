//! Layer pack/unpack benchmarks (filled in with the layer module).
fn main() {}
