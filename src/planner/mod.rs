//! Layer planners: which store paths go into which layer.  Each takes a
//! closure graph and returns a list of layers (lists of store paths).

pub mod autolayer;
pub mod compare;
pub mod pipeline;
pub mod previous;
pub mod stable;
