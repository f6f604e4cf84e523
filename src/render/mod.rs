//! Layer tars rendered from listings: the one producer every pass runs,
//! and the segmented renderer that spreads one layer over several readers.

pub mod layer;
pub mod segment;
pub mod sink;
