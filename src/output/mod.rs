//! Getting bytes out: the ordered writer thread that owns the output, big
//! files spliced into a pipe, whole-stream compression, progress on stderr.

pub mod compress;
pub mod progress;
pub mod splice;
pub mod writer;
