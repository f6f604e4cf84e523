//! Reading archives: the tar reader, the base image (`from_image`) and
//! `nixstream verify`.

pub mod baseimage;
pub mod manifest;
pub mod tarread;
pub mod verify;
