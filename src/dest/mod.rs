//! Destinations: what consumes an [`crate::engine::image::Image`].  Each
//! writes the same image in its own layout: a docker-archive stream, an
//! oci-archive stream, an OCI image layout directory, a registry.

pub mod docker_archive;
pub mod manifest;
pub mod oci_archive;
pub mod oci_layout;
pub mod registry;
pub mod tarstream;
