//! What the user hands in: nixpkgs' streaming configuration (or the wrapper
//! script `streamLayeredImage` builds around it), closure graphs and the
//! timestamps both carry, read into typed values and checked.

pub mod closure;
pub mod conf;
pub mod contents;
pub mod isotime;
pub mod layerdigest;
pub mod limited;
pub mod wrapper;
