//! The bytes that must equal CPython's: `tarfile` headers and
//! `json.dumps(indent=4)`/`repr` text, which decide the reference's digests.

pub mod pyjson;
pub mod tarheader;
