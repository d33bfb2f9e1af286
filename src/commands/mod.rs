//! One module per subcommand that is more than a call into the library.

pub mod cache;
pub mod dib;
