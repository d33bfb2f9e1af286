//! The cache store: a content-addressed blob folder and a SQLite index of steps, layers and builds.
