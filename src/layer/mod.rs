//! Layers: scanning a tree, diffing two scans into an OCI changeset, packing it as a deterministic
//! zstd tar, and unpacking one safely (a layer from a shared cache is untrusted input).
