//! The Nix store as the engine reads it: directory-relative system calls
//! and the listing of store paths into layer entries.

pub mod fsat;
pub mod walk;
