//! Getting bytes out: the ordered writer thread that owns the output, big
//! files spliced into a pipe, whole-stream compression, progress on stderr;
//! or, instead of an image, a stream configuration to stream it later.

pub mod compress;
pub mod confdir;
pub mod progress;
pub mod splice;
pub mod writer;
