//! What the user hands in: nixpkgs' streaming configuration, closure graphs
//! and the timestamps both carry, read into typed values and checked.

pub mod closure;
pub mod conf;
pub mod isotime;
pub mod limited;
