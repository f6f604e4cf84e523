//! Layer planners: which store paths go into which layer.  Each takes a
//! closure graph and returns a list of layers (lists of store paths).
//! `autolayer` and `pipeline` reproduce nixpkgs; `stable` is ours, built on
//! the `previous` release's layers, with `compare` measuring what a plan
//! costs against them.

pub mod autolayer;
pub mod compare;
pub mod pipeline;
pub mod previous;
pub mod stable;
