//! TODO(skeleton): filled in by its owner.
