pub mod dib;
