//! The image descriptions nixstream reads back: a docker-archive's
//! `manifest.json`, an OCI layout's `index.json`, and the JSON blobs they
//! lead to (OCI manifests, nested indexes, image configs).
//!
//! One parser serves the base-image reader and `verify`.  `manifest.json`
//! and `index.json` are small and read whole (at most [`MAX_MANIFEST`]
//! bytes).  Blobs are read as a stream into a [`JsonDoc`] that keeps only
//! the fields a check needs (`rootfs.diff_ids`, descriptors, `mediaType`)
//! and skips everything else without holding it, so a config with a few
//! hundred thousand labels costs no more memory than a small one.

use std::io::Read;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::engine::digest::parse_sha256_hex;

/// Largest `manifest.json` or `index.json` read (real ones are a few KiB).
pub const MAX_MANIFEST: u64 = 16 << 20;
/// Most entries kept of one list in a blob (`diff_ids`, `layers`,
/// `manifests`): an image has at most a few hundred layers.
pub const MAX_LIST: usize = 1 << 16;
/// Longest string kept from a descriptor field.
const MAX_FIELD: usize = 4096;

/// The OCI layer media types (and Docker's), with the compression each
/// names; `None` for a type that is no layer `verify` knows.
pub fn layer_media_compression(media_type: &str) -> Option<&'static str> {
    let base = media_type
        .strip_prefix("application/vnd.oci.image.layer.v1.")
        .or_else(|| media_type.strip_prefix("application/vnd.oci.image.layer.nondistributable.v1."));
    match base {
        Some("tar") => return Some("none"),
        Some("tar+gzip") => return Some("gzip"),
        Some("tar+zstd") => return Some("zstd"),
        _ => {}
    }
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some("gzip"),
        "application/vnd.docker.image.rootfs.diff.tar" => Some("none"),
        _ => None,
    }
}

/// Media types of an image manifest, and of an index.
pub const MANIFEST_TYPES: [&str; 2] =
    ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
pub const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// A member name that leaves the archive's root (absolute, or a `..`).
pub fn escapes_archive(name: &str) -> bool {
    name.starts_with('/') || name.split('/').any(|c| c == "..")
}

/// One image of a docker-archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerEntry {
    pub config: String,
    pub repo_tags: Vec<String>,
    pub layers: Vec<String>,
}

/// Parses `manifest.json`; the error says what is wrong and in which image
/// (1-based).  Names that escape the archive are the caller's to judge.
pub fn parse_docker_manifest(bytes: &[u8]) -> Result<Vec<DockerEntry>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("it is not valid JSON: {e}"))?;
    let entries = v.as_array().ok_or("it is not a list")?;
    let mut out = Vec::with_capacity(entries.len());
    for (k, image) in entries.iter().enumerate() {
        let at = |what: &str| format!("image {}: {what}", k + 1);
        let config = image
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| at("\"Config\" is missing or not a string"))?
            .to_string();
        let layers = image
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| at("\"Layers\" is missing or not a list"))?
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| at("\"Layers\" holds a non-string")))
            .collect::<Result<_, _>>()?;
        let repo_tags = match image.get("RepoTags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(_) => return Err(at("\"RepoTags\" is not a list")),
        };
        out.push(DockerEntry { config, repo_tags, layers });
    }
    Ok(out)
}

/// A content descriptor as found (each field only when it has the right
/// type).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Descriptor {
    pub media_type: Option<String>,
    pub digest: Option<String>,
    pub size: Option<u64>,
    /// `org.opencontainers.image.ref.name`, in an index.
    pub ref_name: Option<String>,
}

impl Descriptor {
    /// The blob this descriptor names in an OCI layout (`blobs/ALG/HEX`),
    /// when its digest is a well-formed sha256 one.
    pub fn blob_name(&self) -> Option<String> {
        let hex = self.digest.as_deref()?.strip_prefix("sha256:")?;
        parse_sha256_hex(hex).map(|_| format!("blobs/sha256/{hex}"))
    }

    fn from_value(v: &Value) -> Descriptor {
        let s = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| s.len() <= MAX_FIELD).map(str::to_string);
        Descriptor {
            media_type: s("mediaType"),
            digest: s("digest"),
            size: v.get("size").and_then(Value::as_u64),
            ref_name: v
                .pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

/// Parses an OCI `index.json`: its manifest descriptors.
pub fn parse_oci_index(bytes: &[u8]) -> Result<Vec<Descriptor>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("it is not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("it is not a JSON object".into());
    }
    let list = v.get("manifests").and_then(Value::as_array).ok_or("\"manifests\" is missing or not a list")?;
    Ok(list.iter().map(Descriptor::from_value).collect())
}

/// A list as kept: its first [`MAX_LIST`] items, and whether there were more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept<T> {
    pub items: Vec<T>,
    pub more: bool,
}

/// What a JSON blob says, as far as the checks go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonDoc {
    /// The top level is an object.
    pub object: bool,
    pub media_type: Option<String>,
    /// `rootfs.diff_ids` (each entry parsed, `None` when not a sha256 digest).
    pub diff_ids: Option<Kept<Option<[u8; 32]>>>,
    /// An image manifest's `config` (any object under `config` reads as one;
    /// a docker config's `config` just has none of the fields).
    pub config: Option<Descriptor>,
    pub layers: Option<Kept<Descriptor>>,
    pub manifests: Option<Kept<Descriptor>>,
}

/// Reads one JSON value from `r` (and nothing but whitespace after it),
/// keeping what [`JsonDoc`] holds.
pub fn read_json_doc<R: Read>(r: R) -> Result<JsonDoc, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_reader(r);
    let doc = de.deserialize_any(DocVisitor)?;
    de.end()?;
    Ok(doc)
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = JsonDoc;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<JsonDoc, A::Error> {
        let mut doc = JsonDoc { object: true, ..JsonDoc::default() };
        while let Some(key) = m.next_key::<Key>()? {
            match key.0.as_deref() {
                Some("mediaType") => doc.media_type = m.next_value::<Small>()?.0,
                Some("config") => doc.config = m.next_value::<Desc>()?.0,
                Some("layers") => doc.layers = m.next_value::<List<Descriptor>>()?.0,
                Some("manifests") => doc.manifests = m.next_value::<List<Descriptor>>()?.0,
                Some("rootfs") => doc.diff_ids = m.next_value::<Rootfs>()?.0,
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(doc)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<JsonDoc, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(JsonDoc::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<JsonDoc, E> {
        Ok(JsonDoc::default())
    }
}

/// An object key, kept only when short (the keys we look for are).
struct Key(Option<String>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(Key((s.len() <= 64).then(|| s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any value; kept as a `Value` only when it is a string of at most
/// [`MAX_FIELD`] bytes or a number, else skipped.
struct Small(Option<String>);

impl<'de> Deserialize<'de> for Small {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Small, D::Error> {
        let v = d.deserialize_any(SkipOr)?;
        Ok(Small(v.and_then(|v| v.as_str().map(str::to_string))))
    }
}

/// Keeps short strings and numbers as a `Value`; skips anything else
/// without holding it.
struct SkipOr;

impl<'de> Visitor<'de> for SkipOr {
    type Value = Option<Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<Value>, E> {
        Ok((s.len() <= MAX_FIELD).then(|| Value::String(s.to_string())))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<Value>, E> {
        Ok(Some(Value::from(n)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Option<Value>, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Option<Value>, A::Error> {
        // serde_json's arbitrary-precision numbers arrive as a one-entry map.
        let mut number = None;
        while let Some(k) = m.next_key::<Key>()? {
            if k.0.as_deref() == Some("$serde_json::private::Number") {
                let text: Small = m.next_value()?;
                number = text.0.and_then(|t| t.parse::<u64>().ok()).map(Value::from);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(number)
    }
}

/// A descriptor-shaped object (`None` for anything that is not an object).
struct Desc(Option<Descriptor>);

impl<'de> Deserialize<'de> for Desc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Desc, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Desc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a descriptor")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Desc, A::Error> {
                let mut d = Descriptor::default();
                let mut number = false;
                while let Some(k) = m.next_key::<Key>()? {
                    match k.0.as_deref() {
                        Some("$serde_json::private::Number") => {
                            number = true;
                            m.next_value::<IgnoredAny>()?;
                        }
                        Some("mediaType") => {
                            if let SizeOrStr::Str(s) = m.next_value()? {
                                d.media_type = Some(s);
                            }
                        }
                        Some("digest") => {
                            if let SizeOrStr::Str(s) = m.next_value()? {
                                d.digest = Some(s);
                            }
                        }
                        Some("size") => {
                            if let SizeOrStr::Size(n) = m.next_value()? {
                                d.size = Some(n);
                            }
                        }
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Desc((!number).then_some(d)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Desc, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Desc(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Desc, E> {
                Ok(Desc(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Desc, E> {
                Ok(Desc(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Desc, E> {
                Ok(Desc(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Desc, E> {
                Ok(Desc(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Desc, E> {
                Ok(Desc(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Desc, E> {
                Ok(Desc(None))
            }
        }
        d.deserialize_any(V)
    }
}

enum SizeOrStr {
    Size(u64),
    Str(String),
    Other,
}

impl<'de> Deserialize<'de> for SizeOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SizeOrStr, D::Error> {
        Ok(match d.deserialize_any(SkipOr)? {
            Some(Value::String(s)) => SizeOrStr::Str(s),
            Some(v) => v.as_u64().map_or(SizeOrStr::Other, SizeOrStr::Size),
            None => SizeOrStr::Other,
        })
    }
}

/// A list of `T`, kept up to [`MAX_LIST`] items (`None`: not a list).
struct List<T>(Option<Kept<T>>);

impl<'de, T: FromItem + Deserialize<'de>> Deserialize<'de> for List<T>
where
    T: Sized,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<List<T>, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromItem + Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<List<T>, A::Error> {
                let mut kept = Kept { items: Vec::new(), more: false };
                loop {
                    if kept.items.len() == MAX_LIST {
                        if s.next_element::<IgnoredAny>()?.is_none() {
                            break;
                        }
                        kept.more = true;
                        continue;
                    }
                    match s.next_element::<T>()? {
                        Some(t) => kept.items.push(t),
                        None => break,
                    }
                }
                Ok(List(Some(kept)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<List<T>, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(List(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<List<T>, E> {
                Ok(List(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<List<T>, E> {
                Ok(List(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<List<T>, E> {
                Ok(List(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<List<T>, E> {
                Ok(List(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<List<T>, E> {
                Ok(List(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<List<T>, E> {
                Ok(List(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Marker for what a [`List`] may hold.
trait FromItem {}

/// A descriptor in a list (a non-object item keeps an empty descriptor, so
/// positions stay right).
impl FromItem for Descriptor {}

impl<'de> Deserialize<'de> for Descriptor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Descriptor, D::Error> {
        Ok(Desc::deserialize(d)?.0.unwrap_or_default())
    }
}

/// A diff_id in a list: the digest, or `None` when it is not `sha256:HEX`.
struct DiffId(Option<[u8; 32]>);

impl FromItem for DiffId {}

impl<'de> Deserialize<'de> for DiffId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DiffId, D::Error> {
        let s = Small::deserialize(d)?.0;
        Ok(DiffId(s.as_deref().and_then(|s| s.strip_prefix("sha256:")).and_then(parse_sha256_hex)))
    }
}

/// `rootfs`: its `diff_ids` list.
struct Rootfs(Option<Kept<Option<[u8; 32]>>>);

impl<'de> Deserialize<'de> for Rootfs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rootfs, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Rootfs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("rootfs")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Rootfs, A::Error> {
                let mut ids = None;
                while let Some(k) = m.next_key::<Key>()? {
                    if k.0.as_deref() == Some("diff_ids") {
                        ids = m
                            .next_value::<List<DiffId>>()?
                            .0
                            .map(|k| Kept { items: k.items.into_iter().map(|d| d.0).collect(), more: k.more });
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Rootfs(ids))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Rootfs, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Rootfs(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Rootfs, E> {
                Ok(Rootfs(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_keep_what_the_checks_need_and_skip_the_rest() {
        let d = read_json_doc(
            &br#"{"config": {"Labels": {"a": "b"}, "Env": ["X=1"]}, "history": [1, 2.5, null],
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:00000000000000000000000000000000000000000000000000000000000000aa", "md5:x", 3]}}"#[..],
        )
        .unwrap();
        assert!(d.object);
        let ids = d.diff_ids.unwrap();
        assert_eq!(ids.items.len(), 3);
        assert!(ids.items[0].is_some() && ids.items[1].is_none() && ids.items[2].is_none());
        assert_eq!(d.config, Some(Descriptor::default()), "a docker config's config is no descriptor");

        let m = read_json_doc(
            &br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "c", "digest": "sha256:ab", "size": 12},
                  "layers": [{"mediaType": "l", "digest": "sha256:cd", "size": 34}, 7]}"#[..],
        )
        .unwrap();
        assert_eq!(m.media_type.as_deref(), Some("application/vnd.oci.image.manifest.v1+json"));
        assert_eq!(m.config.as_ref().unwrap().size, Some(12));
        let layers = m.layers.unwrap().items;
        assert_eq!(layers[0].digest.as_deref(), Some("sha256:cd"));
        assert_eq!(layers[0].size, Some(34));
        assert_eq!(layers[1], Descriptor::default());

        assert!(!read_json_doc(&b"[1, 2]"[..]).unwrap().object);
        assert!(read_json_doc(&b"{\"a\": 1} x"[..]).is_err(), "trailing bytes");
        assert!(read_json_doc(&b"{\"a\": "[..]).is_err());
    }

    #[test]
    fn long_lists_are_cut_and_say_so() {
        let ids: Vec<String> = (0..MAX_LIST + 3).map(|_| "\"x\"".to_string()).collect();
        let text = format!(r#"{{"rootfs": {{"diff_ids": [{}]}}}}"#, ids.join(","));
        let d = read_json_doc(text.as_bytes()).unwrap().diff_ids.unwrap();
        assert_eq!((d.items.len(), d.more), (MAX_LIST, true));
    }

    #[test]
    fn docker_manifests_and_indexes() {
        let m = parse_docker_manifest(br#"[{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"]}]"#)
            .unwrap();
        assert_eq!(m[0].layers, ["l/layer.tar"]);
        assert_eq!(parse_docker_manifest(b"{}").unwrap_err(), "it is not a list");
        assert!(parse_docker_manifest(br#"[{"Layers": []}]"#).unwrap_err().contains("image 1: \"Config\""));
        let i = parse_oci_index(
            br#"{"manifests": [{"digest": "sha256:ab", "size": 3, "annotations": {"org.opencontainers.image.ref.name": "t:1"}}]}"#,
        )
        .unwrap();
        assert_eq!(i[0].ref_name.as_deref(), Some("t:1"));
        assert_eq!(layer_media_compression("application/vnd.oci.image.layer.v1.tar+zstd"), Some("zstd"));
        assert_eq!(layer_media_compression("text/plain"), None);
        assert!(escapes_archive("../x") && escapes_archive("/x") && !escapes_archive("a..b/c"));
    }
}
