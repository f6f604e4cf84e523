//! nixstream: Nix store paths to a docker-archive image, streamed.
//!
//! The stages, each a module and each testable alone:
//! [`conf`] (the configuration) → [`plan`] (an [`plan::ImagePlan`]: base
//! image indexed, store layers to be listed by [`walk`] on first use) → [`archive`] (layers
//! hashed in parallel by [`layer`] into [`hash`] sinks, then streamed in
//! order through verifying writers, big files spliced into an output pipe
//! by [`splice`], with [`image`] building config and manifest).  [`tarheader`] and [`pyjson`] own the bytes that must equal
//! the reference's.

pub mod archive;
pub mod autolayer;
pub mod baseimage;
pub mod cache;
pub mod cli;
pub mod closure;
pub mod compress;
pub mod conf;
pub mod fsat;
pub mod hash;
pub mod image;
pub mod isotime;
pub mod layer;
pub mod owners;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod pyjson;
pub mod segment;
pub mod splice;
pub mod tarheader;
pub mod tarread;
pub mod verify;
pub mod walk;
pub mod writer;
