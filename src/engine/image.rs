//! The image as every destination sees it: per layer, its digests and a way
//! to write its blob bytes; then the config.
//!
//! This is the seam between the engine and the destinations (docker-archive
//! and oci-archive streams, an OCI layout directory, a registry), modelled on
//! go-containerregistry's `v1.Image`/`v1.Layer`: a destination asks for a
//! layer's [`LayerInfo`] (which waits for the hashing pass if need be), then
//! for its bytes ([`Image::write_layer`], which renders them again and checks
//! them against those digests, so a retry after a failed upload regenerates
//! exactly the same bytes), and last for the config, which names every
//! layer's diff_id.  A destination never reaches into the engine otherwise,
//! so adding one touches no engine code.

use std::io::Write;

use crate::engine::digest::{hex, LayerDigest};

/// A sha256 digest.
pub type Sha256 = [u8; 32];

/// How layer blobs are encoded.  `None` is the plain tar (the only encoding
/// of a docker-archive); the OCI outputs and registries take any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    None,
    #[default]
    Gzip,
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer blob so encoded.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The Docker schema 2 media type, where Docker has one.
    pub fn docker_layer_media_type(self) -> Option<&'static str> {
        match self {
            Compression::None => Some("application/vnd.docker.image.rootfs.diff.tar"),
            Compression::Gzip => Some("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Compression::Zstd => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// A blob as manifests describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Sha256,
    pub size: u64,
}

impl Descriptor {
    /// `sha256:<hex>`, as manifests and registries spell a digest.
    pub fn digest_ref(&self) -> String {
        format!("sha256:{}", hex(&self.digest))
    }
}

/// One layer, once its digests are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The uncompressed tar's size and sha256 (the config's diff_id).
    pub diff_id: LayerDigest,
    /// The blob a destination stores: the tar as encoded for it.
    pub blob: Descriptor,
    /// What decides the blob's bytes (store paths and their narHashes, every
    /// option that changes bytes, the compressor's identity), when the
    /// engine can say it without reading a file: a registry annotates the
    /// layer with it so a later push elsewhere can reuse the digest.
    pub key: Option<String>,
}

/// An error from the engine, as a destination sees it: it names the layer
/// or file at fault; a destination only adds where it was writing.
pub use crate::engine::hashing::EngineError;

/// What a destination consumes.
pub trait Image: Sync {
    /// How many layers, base layers included.
    fn layer_count(&self) -> usize;
    /// The encoding of layer blobs.
    fn compression(&self) -> Compression;
    /// Layer `i`'s digests, waiting for the hashing pass if need be.
    fn layer(&self, i: usize) -> Result<LayerInfo, EngineError>;
    /// Writes layer `i`'s blob into `out`, checked against
    /// [`Image::layer`]'s digests as it goes: bytes that differ stop it with
    /// an error before the last byte.  Callable again (a retry).
    fn write_layer(&self, i: usize, out: &mut dyn Write) -> Result<(), EngineError>;
    /// The config JSON bytes; waits for every layer's diff_id.
    fn config(&self) -> Result<Vec<u8>, EngineError>;
    /// The `repo_tag` of the configuration (`name:tag`).
    fn repo_tag(&self) -> &str;
}
