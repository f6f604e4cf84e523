//! The image engine: hashes every layer, then hands each layer's bytes,
//! size and digests, with the config, to a destination.

pub mod archive;
pub mod cache;
pub mod config;
pub mod digest;
pub mod image;
