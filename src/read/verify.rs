//! `nixstream verify`: checks a docker-archive (ours or anyone's) in one
//! streaming pass, so it can read a pipe and never holds a layer in memory.
//!
//! Every member is hashed as it goes by.  Members that look like JSON and
//! are small (configs, `manifest.json`) are kept; every other member is read
//! as a possibly compressed layer tar: its raw sha256 (the blob digest), the
//! sha256 of its decompressed bytes (the diff_id) and its entry count are
//! recorded.  At the end `manifest.json` is matched against what was seen:
//! each image's config must be present and named by its own digest, its
//! `rootfs.diff_ids` must be as many as the manifest's layers, and each layer
//! must exist, be a readable tar and hash to its diff_id.  Structural damage
//! (not a tar, truncated, no or oversized manifest.json) is a [`VerifyError`];
//! content problems are collected in the [`Report`], which passes only when
//! there are none.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use serde_json::Value;

use crate::engine::digest::{hex, parse_sha256_hex, HashSink, LayerDigest};
use crate::read::tarread::{Compression, TarError, TarReader};

/// Largest manifest.json read (real ones are a few KiB; a bound keeps a
/// hostile archive from exhausting memory).
pub const MAX_MANIFEST: u64 = 16 << 20;
/// Largest JSON-looking member kept for matching against the manifest.
pub const MAX_KEPT: u64 = 4 << 20;
/// Total bytes of kept members.
pub const MAX_KEPT_TOTAL: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{source_name}: cannot read: {err}")]
    Io { source_name: String, err: io::Error },
    #[error("{source_name}: {err}")]
    Tar { source_name: String, err: TarError },
    #[error("{source_name}: no manifest.json (is this a docker-archive, as `docker save` writes?)")]
    NoManifest { source_name: String },
    #[error("{source_name}: manifest.json is {size} bytes, larger than the {MAX_MANIFEST}-byte limit")]
    ManifestTooLarge { source_name: String, size: u64 },
    #[error("{source_name}: manifest.json is not valid: {what}")]
    BadManifest { source_name: String, what: String },
}

/// One member as it went by.
#[derive(Debug, Clone)]
struct Seen {
    size: u64,
    /// sha256 of the member's bytes.
    raw: [u8; 32],
    /// The member's bytes, when small and JSON-looking.
    kept: Option<Vec<u8>>,
    /// For other members: how the layer tar is compressed, the sha256 of the
    /// decompressed tar, and its entry count (or why it could not be read).
    layer: Option<LayerSeen>,
}

#[derive(Debug, Clone)]
struct LayerSeen {
    compression: Compression,
    diff: LayerDigest,
    entries: Result<u64, String>,
}

/// One layer of an image, as checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    /// Bytes of the member (compressed, if it is).
    pub size: u64,
    pub compression: &'static str,
    /// Entries in the layer tar.
    pub entries: Option<u64>,
    pub diff_id: String,
    pub ok: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageReport {
    pub repo_tags: Vec<String>,
    pub config: String,
    /// `sha256:` of the config: the image ID.
    pub id: Option<String>,
    pub layers: Vec<LayerReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Compression of the whole stream.
    pub compression: &'static str,
    pub members: u64,
    /// Bytes of the (decompressed) archive.
    pub bytes: u64,
    pub images: Vec<ImageReport>,
    /// What does not match; empty when the archive is sound.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A reader that hashes what passes through it (or only counts, when the
/// same bytes are hashed elsewhere).
struct Hashing<R> {
    inner: R,
    sink: HashSink,
    hash: bool,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.hash {
            io::Write::write_all(&mut self.sink, &buf[..n])?;
        } else {
            self.sink.skip(n as u64);
        }
        Ok(n)
    }
}

fn looks_like_json(head: &[u8]) -> bool {
    head.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b == b'{' || b == b'[')
}

/// Reads a member's data: kept if small JSON, else read as a layer tar.
fn read_member<R: Read>(t: &mut TarReader<R>, size: u64, kept_total: &mut u64) -> io::Result<Seen> {
    let mut raw = Hashing { inner: t, sink: HashSink::new(), hash: true };
    let mut br = BufReader::with_capacity(1 << 18, &mut raw);
    let head = br.fill_buf()?;
    if size <= MAX_KEPT && *kept_total + size <= MAX_KEPT_TOTAL && looks_like_json(head) {
        let mut data = Vec::with_capacity(size as usize);
        br.read_to_end(&mut data)?;
        drop(br);
        *kept_total += size;
        return Ok(Seen { size, raw: raw.sink.finish().sha256, kept: Some(data), layer: None });
    }
    let compression = Compression::sniff(head);
    // Any failure in here is this layer's; a failure of the archive itself
    // (truncation, an unreadable input) shows again when the member is
    // drained below, and is returned from there.
    let layer = {
        // An uncompressed layer's diff_id is its raw digest: hash it once.
        let plain = compression == Compression::None;
        let mut diff = Hashing { inner: compression.decoder(&mut br)?, sink: HashSink::new(), hash: !plain };
        let mut inner = TarReader::new(&mut diff);
        let mut entries = loop {
            match inner.next_member() {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(inner.members()),
                Err(e) => break Err(e.to_string()),
            }
        };
        // The rest of the decompressed stream (end-of-archive padding) is
        // part of the diff_id.
        if let Err(e) = inner.drain() {
            entries = entries.and(Err(format!("cannot be decompressed: {e}")));
        }
        drop(inner);
        (compression, diff.sink.finish(), entries)
    };
    // Whatever the layer reader left (after a damaged inner tar) still counts.
    crate::read::tarread::discard(&mut br)?;
    drop(br);
    let raw = raw.sink.finish();
    if raw.size != size {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "member ended early"));
    }
    let (compression, mut diff, entries) = layer;
    if compression == Compression::None {
        diff.sha256 = raw.sha256;
    }
    Ok(Seen { size, raw: raw.sha256, kept: None, layer: Some(LayerSeen { compression, diff, entries }) })
}

/// The digest a member name carries: `HEX.json`, `HEX/layer.tar`,
/// `blobs/sha256/HEX`.
fn digest_in_name(name: &str) -> Option<[u8; 32]> {
    let stem = name.strip_suffix(".json").or_else(|| name.strip_suffix("/layer.tar")).unwrap_or(name);
    let last = stem.rsplit('/').next()?;
    parse_sha256_hex(last)
}

fn unsafe_name(name: &str) -> bool {
    name.starts_with('/') || name.split('/').any(|c| c == "..")
}

/// Verifies the docker-archive read from `input`; `source_name` names it in
/// messages.
pub fn verify<R: Read>(input: R, source_name: &str) -> Result<Report, VerifyError> {
    let io_err = |err: io::Error| VerifyError::Io { source_name: source_name.to_string(), err };
    let tar_err = |err: TarError| match err {
        TarError::Io(err) => VerifyError::Io { source_name: source_name.to_string(), err },
        err => VerifyError::Tar { source_name: source_name.to_string(), err },
    };
    let mut outer = BufReader::with_capacity(1 << 20, input);
    let compression = Compression::sniff(outer.fill_buf().map_err(io_err)?);
    let mut t = TarReader::new(compression.decoder(outer).map_err(io_err)?);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut problems = Vec::new();
    let mut kept_total = 0;
    while let Some(m) = t.next_member().map_err(tar_err)? {
        if !m.is_file() {
            continue;
        }
        let name = m.name_lossy();
        if name == "manifest.json" && m.size > MAX_MANIFEST {
            return Err(VerifyError::ManifestTooLarge { source_name: source_name.to_string(), size: m.size });
        }
        let s = read_member(&mut t, m.size, &mut kept_total).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                tar_err(TarError::Truncated(name.clone()))
            } else {
                io_err(e)
            }
        })?;
        // The reference writes a layer twice when two layers are identical;
        // only copies that differ are ambiguous.
        let raw = s.raw;
        if seen.insert(name.clone(), s).is_some_and(|old| old.raw != raw) {
            problems.push(format!(
                "member {name:?} appears twice with different contents (clients disagree on which counts)"
            ));
        }
    }
    t.drain().map_err(tar_err)?;
    let members = t.members();
    let bytes = t.offset();

    let bad = |what: String| VerifyError::BadManifest { source_name: source_name.to_string(), what };
    let manifest =
        seen.get("manifest.json").ok_or_else(|| VerifyError::NoManifest { source_name: source_name.to_string() })?;
    let manifest: Value = match &manifest.kept {
        Some(d) => serde_json::from_slice(d).map_err(|e| bad(e.to_string()))?,
        None => return Err(bad("it is not a JSON list".into())),
    };
    let entries = manifest.as_array().ok_or_else(|| bad("it is not a list".into()))?;
    if entries.is_empty() {
        return Err(bad("it lists no image".into()));
    }
    let mut images = Vec::new();
    for (k, image) in entries.iter().enumerate() {
        let at = |what: &str| format!("image {}: {what}", k + 1);
        let config_name = image
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(at("\"Config\" is missing or not a string")))?
            .to_string();
        let layer_names: Vec<String> = image
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(at("\"Layers\" is missing or not a list")))?
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(at("\"Layers\" holds a non-string"))))
            .collect::<Result<_, _>>()?;
        let repo_tags: Vec<String> = match image.get("RepoTags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(_) => return Err(bad(at("\"RepoTags\" is not a list"))),
        };
        for n in std::iter::once(&config_name).chain(&layer_names) {
            if unsafe_name(n) {
                problems.push(at(&format!("manifest.json names {n:?}, which escapes the archive")));
            }
        }
        let mut report = ImageReport { repo_tags, config: config_name.clone(), id: None, layers: Vec::new() };
        let mut diff_ids: Vec<Option<[u8; 32]>> = Vec::new();
        match seen.get(&config_name) {
            None => problems.push(at(&format!("config {config_name} is not in the archive"))),
            Some(Seen { kept: None, .. }) => problems.push(at(&format!("config {config_name} is not a JSON object"))),
            Some(Seen { kept: Some(data), raw, .. }) => {
                report.id = Some(format!("sha256:{}", hex(raw)));
                if digest_in_name(&config_name) != Some(*raw) {
                    problems.push(at(&format!(
                        "config {config_name} has sha256:{}, which its name does not carry",
                        hex(raw)
                    )));
                }
                match serde_json::from_slice::<Value>(data) {
                    Err(e) => problems.push(at(&format!("config {config_name} is not valid JSON: {e}"))),
                    Ok(c) => match c.pointer("/rootfs/diff_ids").and_then(Value::as_array) {
                        None => problems.push(at(&format!("config {config_name} has no rootfs.diff_ids list"))),
                        Some(ids) => {
                            diff_ids = ids
                                .iter()
                                .map(|v| v.as_str().and_then(|s| s.strip_prefix("sha256:")).and_then(parse_sha256_hex))
                                .collect();
                            if let Some(i) = diff_ids.iter().position(Option::is_none) {
                                problems.push(at(&format!("diff_id {} is not a sha256 digest", i + 1)));
                            }
                        }
                    },
                }
                if !diff_ids.is_empty() && diff_ids.len() != layer_names.len() {
                    problems.push(at(&format!(
                        "manifest.json lists {} layers but the config has {} diff_ids",
                        layer_names.len(),
                        diff_ids.len()
                    )));
                }
            }
        }
        for (i, name) in layer_names.iter().enumerate() {
            let want = diff_ids.get(i).copied().flatten();
            let mut lr = LayerReport {
                name: name.clone(),
                size: 0,
                compression: "none",
                entries: None,
                diff_id: String::new(),
                ok: false,
            };
            let layer_at = |what: String| at(&format!("layer {} ({name}) {what}", i + 1));
            match seen.get(name) {
                None => problems.push(layer_at("is not in the archive".into())),
                Some(Seen { layer: None, size, .. }) => {
                    lr.size = *size;
                    problems.push(layer_at("is JSON, not a layer tar".into()));
                }
                Some(Seen { layer: Some(l), size, raw, .. }) => {
                    lr.size = *size;
                    lr.compression = l.compression.name();
                    lr.diff_id = format!("sha256:{}", l.diff.hex());
                    lr.entries = l.entries.as_ref().ok().copied();
                    let mut ok = true;
                    if let Err(e) = &l.entries {
                        ok = false;
                        problems.push(layer_at(format!("is not a readable tar: {e}")));
                    }
                    if let Some(w) = want {
                        if w != l.diff.sha256 {
                            ok = false;
                            problems.push(layer_at(format!(
                                "has sha256:{}, but its diff_id is sha256:{}",
                                l.diff.hex(),
                                hex(&w)
                            )));
                        }
                    } else {
                        ok = false;
                    }
                    // An OCI-style blob name carries the blob's own digest.
                    if name.starts_with("blobs/") && digest_in_name(name) != Some(*raw) {
                        ok = false;
                        problems.push(layer_at(format!("has sha256:{}, which its name does not carry", hex(raw))));
                    }
                    lr.ok = ok;
                }
            }
            report.layers.push(lr);
        }
        images.push(report);
    }
    Ok(Report { compression: compression.name(), members, bytes, images, problems })
}

/// The report as text, a line per layer.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (k, img) in r.images.iter().enumerate() {
        let tags = if img.repo_tags.is_empty() { "(untagged)".to_string() } else { img.repo_tags.join(", ") };
        let _ = writeln!(s, "image {}: {tags}, id {}", k + 1, img.id.as_deref().unwrap_or("?"));
        for (i, l) in img.layers.iter().enumerate() {
            let entries = l.entries.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
            let comp = if l.compression == "none" { String::new() } else { format!(" ({})", l.compression) };
            let _ = writeln!(
                s,
                "  layer {:>3}  {:>12} bytes{comp}  {:>7} entries  {}  {}",
                i + 1,
                l.size,
                entries,
                if l.diff_id.is_empty() { "-" } else { &l.diff_id },
                if l.ok { "ok" } else { "BAD" }
            );
        }
    }
    let _ = writeln!(
        s,
        "{} members, {} bytes{}: {}",
        r.members,
        r.bytes,
        if r.compression == "none" { String::new() } else { format!(" ({}-compressed)", r.compression) },
        if r.ok() { "every digest matches".to_string() } else { format!("{} problem(s)", r.problems.len()) }
    );
    s
}
