//! Manifests and indexes in the OCI (and Docker schema 2) formats, shared by
//! every destination that is not a docker-archive.
//!
//! Serialised with `serde_json` in a fixed key order (the OCI structs'
//! order), compact: the bytes are hashed into a digest, so they must be a
//! function of the image alone.  `mediaType` is always set, as registries
//! and the OCI spec ask of a manifest served by content type.

use serde_json::{json, Map, Value};

use crate::engine::image::{Compression, Descriptor};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The annotation an index uses for a tag (what skopeo and podman read).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Which manifest format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Oci,
    /// Docker schema 2 (gzip or uncompressed layers only).
    Docker,
}

/// A descriptor as JSON, with optional annotations.
pub fn descriptor_json(d: &Descriptor, annotations: &[(String, String)]) -> Value {
    let mut m = Map::new();
    m.insert("mediaType".into(), Value::String(d.media_type.clone()));
    m.insert("digest".into(), Value::String(d.digest_ref()));
    m.insert("size".into(), json!(d.size));
    if !annotations.is_empty() {
        let a: Map<String, Value> = annotations.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        m.insert("annotations".into(), Value::Object(a));
    }
    Value::Object(m)
}

/// An image manifest naming `config` and `layers` (with their annotations).
pub fn image_manifest(format: Format, config: &Descriptor, layers: &[(Descriptor, Vec<(String, String)>)]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("schemaVersion".into(), json!(2));
    m.insert(
        "mediaType".into(),
        Value::String(
            match format {
                Format::Oci => OCI_MANIFEST,
                Format::Docker => DOCKER_MANIFEST,
            }
            .into(),
        ),
    );
    m.insert("config".into(), descriptor_json(config, &[]));
    m.insert("layers".into(), Value::Array(layers.iter().map(|(d, a)| descriptor_json(d, a)).collect()));
    serde_json::to_vec(&Value::Object(m)).expect("JSON values serialise")
}

/// The config's descriptor in `format`.
pub fn config_descriptor(format: Format, bytes: &[u8]) -> Descriptor {
    use sha2::Digest;
    let media_type = match format {
        Format::Oci => OCI_CONFIG,
        Format::Docker => DOCKER_CONFIG,
    };
    Descriptor { media_type: media_type.into(), digest: sha2::Sha256::digest(bytes).into(), size: bytes.len() as u64 }
}

/// A layer blob's media type in `format`; `None` where the format has none
/// (zstd in Docker schema 2).
pub fn layer_media_type(format: Format, c: Compression) -> Option<&'static str> {
    match format {
        Format::Oci => Some(c.oci_layer_media_type()),
        Format::Docker => c.docker_layer_media_type(),
    }
}

/// An OCI index (`index.json` of a layout) listing `manifests`, each with
/// its annotations (the tag as [`REF_NAME`]).
pub fn index(manifests: &[(Descriptor, Vec<(String, String)>)]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("schemaVersion".into(), json!(2));
    m.insert("mediaType".into(), Value::String(OCI_INDEX.into()));
    m.insert("manifests".into(), Value::Array(manifests.iter().map(|(d, a)| descriptor_json(d, a)).collect()));
    serde_json::to_vec(&Value::Object(m)).expect("JSON values serialise")
}

/// This machine's architecture as image configs and platforms name it
/// (Go's GOARCH names).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(mt: &str, b: u8, size: u64) -> Descriptor {
        Descriptor { media_type: mt.into(), digest: [b; 32], size }
    }

    #[test]
    fn manifest_has_media_type_and_fixed_key_order() {
        let cfg = config_descriptor(Format::Oci, b"{}");
        let layer = d(Compression::Gzip.oci_layer_media_type(), 1, 7);
        let m = image_manifest(Format::Oci, &cfg, &[(layer, vec![("k".into(), "v".into())])]);
        let s = String::from_utf8(m).unwrap();
        assert!(s.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}"#), "{s}");
        assert!(s.ends_with(r#""size":7,"annotations":{"k":"v"}}]}"#), "{s}");
    }

    #[test]
    fn docker_schema2_has_no_zstd() {
        assert_eq!(layer_media_type(Format::Docker, Compression::Zstd), None);
        assert_eq!(
            layer_media_type(Format::Docker, Compression::Gzip),
            Some("application/vnd.docker.image.rootfs.diff.tar.gzip")
        );
    }
}
