//! The oci-archive destination: an OCI image layout as a tar stream
//! (`oci-layout`, `blobs/sha256/<digest>` for every layer, the config and
//! the manifest, then `index.json` naming the manifest with the tag as its
//! `org.opencontainers.image.ref.name` annotation, as skopeo and podman read
//! it).
//!
//! Every blob's member name is its digest and its header carries its size,
//! so each layer's encoded digest must be known before its first byte: the
//! engine's hashing pass learns it, the streaming pass writes and checks
//! it.  `index.json` goes last: a stream stopped by an error holds no index,
//! so no client takes it for an image.

use std::collections::HashSet;

use crate::compat::tarheader::{typeflag, Header};
use crate::dest::manifest::{self, Format, REF_NAME};
use crate::dest::tarstream::TarStream;
use crate::engine::image::Image;
use crate::engine::{Engine, EngineError};

/// The `oci-layout` file's content.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// What the OCI outputs wrote: the manifest and its digest.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config_digest: String,
}

/// The manifest bytes for `image`, with its layers' descriptors (waits for
/// every layer's digests) and the config's.
pub fn manifest_for(image: &dyn Image) -> Result<(Vec<u8>, Vec<u8>), EngineError> {
    let layers = (0..image.layer_count())
        .map(|i| Ok((image.layer(i)?.blob, Vec::new())))
        .collect::<Result<Vec<_>, EngineError>>()?;
    let config = image.config()?;
    let cd = manifest::config_descriptor(Format::Oci, &config);
    Ok((manifest::image_manifest(Format::Oci, &cd, &layers), config))
}

/// Writes the image as an oci-archive into `tar`.
pub fn write(engine: &Engine, tar: &mut TarStream) -> Result<Written, EngineError> {
    let mtime = engine.plan().owner.mtime;
    let progress = engine.progress();
    let total = engine.layer_count();
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = Header::plain_file(dir.as_bytes(), 0, mtime);
        h.typeflag = typeflag::DIRECTORY;
        h.mode = 0o755;
        tar.header(&h)?;
    }
    tar.member("oci-layout", OCI_LAYOUT, mtime)?;
    let mut written = HashSet::new();
    for i in 0..total {
        if !engine.ready(i) {
            tar.hand_over()?;
        }
        let blob = engine.layer(i)?.blob;
        // The same blob twice (two identical layers) is stored once.
        if written.insert(blob.digest) {
            let name = format!("blobs/sha256/{}", crate::engine::digest::hex(&blob.digest));
            tar.header(&Header::plain_file(name.as_bytes(), blob.size, mtime))?;
            engine.write_layer_out(i, tar)?;
            tar.pad(blob.size)?;
        }
        progress.layer_done(i + 1, total);
    }
    progress.line(|| "Adding manifests...".into());
    tar.barrier()?;
    let (manifest, config) = manifest_for(engine)?;
    let cd = manifest::config_descriptor(Format::Oci, &config);
    let md = manifest::config_descriptor(Format::Oci, &manifest);
    let md = crate::engine::image::Descriptor { media_type: manifest::OCI_MANIFEST.into(), ..md };
    for (d, bytes) in [(&cd, &config), (&md, &manifest)] {
        if written.insert(d.digest) {
            tar.member(&format!("blobs/sha256/{}", crate::engine::digest::hex(&d.digest)), bytes, mtime)?;
        }
    }
    let index = manifest::index(&[(md.clone(), vec![(REF_NAME.to_string(), engine.repo_tag().to_string())])]);
    tar.member("index.json", &index, mtime)?;
    tar.finish()?;
    progress.line(|| "Done.".into());
    Ok(Written { manifest, manifest_digest: md.digest_ref(), config_digest: cd.digest_ref() })
}
