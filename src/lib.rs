//! nixstream: Nix store paths to a container image, streamed.
//!
//! The flow, a folder per stage, each stage testable alone:
//! - [`input`]: the configuration, closure graphs, timestamps;
//! - [`planner`]: which store paths go into which layer;
//! - [`plan`]: the [`plan::ImagePlan`], everything that decides the bytes,
//!   checked before the first byte;
//! - [`store`]: listing store paths ([`store::walk`]) through
//!   directory-relative system calls ([`store::fsat`]);
//! - [`render`]: the one layer-tar producer, run by every pass;
//! - [`engine`]: the hashing pass, digests, the digest cache, the config;
//! - [`dest`]: destinations, each consuming an [`engine::image::Image`];
//! - [`output`]: the writer thread, splicing, progress;
//! - [`read`]: reading and checking archives;
//! - [`compat`]: the bytes that must equal CPython's.

pub mod cli;
pub mod compat;
pub mod dest;
pub mod engine;
pub mod input;
pub mod output;
pub mod plan;
pub mod planner;
pub mod read;
pub mod render;
pub mod store;
