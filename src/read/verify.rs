//! `nixstream verify`: checks a docker-archive, an oci-archive (a tar of an
//! OCI image layout) or an OCI layout directory, ours or anyone's, reading
//! each blob once, so it can read a pipe and never holds a layer in memory.
//!
//! Reading ([`verify`], [`verify_dir`]) records every member or blob as it
//! goes by: its size and sha256, and what it is.  `manifest.json`,
//! `index.json` and `oci-layout` are kept whole (bounded); other JSON blobs
//! are parsed as a stream into the few fields the checks need
//! ([`crate::read::manifest::JsonDoc`]); anything else is read as a
//! possibly compressed layer tar: the sha256 of its decompressed bytes (the
//! diff_id), its entry count, and entries that would land outside the root.
//!
//! Checking then resolves the images — from `manifest.json` (docker) and
//! from `index.json` → manifest → config and layers (OCI) — into one shape,
//! [`ImageRefs`], and runs the same checks on each: config present and
//! named by its digest, as many `rootfs.diff_ids` as layers, each layer
//! present, a readable tar hashing to its diff_id, and for OCI every
//! descriptor's digest, size and media type against the blob.  Every check
//! that finds something wrong files a problem, and a layer's `ok` and the
//! verdict are both derived from the problems filed, so nothing can show
//! `BAD` and still pass.  Entries escaping the root are warnings (the
//! reference passes base layers through as they are; `--strict` fails on
//! them).  Structural damage (not a tar, truncated, no manifest) and
//! verify's own limits are a [`VerifyError`], each limit saying it is one.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use crate::engine::digest::{hex, parse_sha256_hex, HashSink, LayerDigest};
use crate::read::manifest::{
    self, escapes_archive, layer_media_compression, Descriptor, DockerEntry, JsonDoc, INDEX_TYPES, MANIFEST_TYPES,
};
use crate::read::tarread::{is_header_block, Compression, Member, TarError, TarReader};

pub use crate::read::manifest::MAX_MANIFEST;

/// Most files (regular members, or blobs of a layout) recorded: a docker or
/// OCI archive holds a few per layer.
pub const MAX_FILES: usize = 1 << 16;
/// Longest member name recorded.
pub const MAX_NAME: usize = 4096;
/// Largest JSON blob parsed (as a stream; only its bounded fields are kept).
pub const MAX_JSON_DOC: u64 = 1 << 30;
/// How deep OCI indexes may nest.
const MAX_INDEX_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{source_name}: cannot read: {err}")]
    Io { source_name: String, err: io::Error },
    #[error("{source_name}: {err}")]
    Tar { source_name: String, err: TarError },
    #[error("{source_name}: no manifest.json or index.json (is this a docker-archive, as `docker save` writes, or an OCI image?)")]
    NoManifest { source_name: String },
    #[error("{source_name}: {member} is {size} bytes, larger than the {MAX_MANIFEST}-byte limit")]
    ManifestTooLarge { source_name: String, member: String, size: u64 },
    #[error("{source_name}: {member} is not valid: {what}")]
    BadManifest { source_name: String, member: &'static str, what: String },
    /// One of verify's own limits, not a fault of the archive.
    #[error("{source_name}: {what} (a limit of verify)")]
    Limit { source_name: String, what: String },
}

/// What a member or blob turned out to be.
#[derive(Debug, Clone)]
enum Content {
    /// `manifest.json`, `index.json`, `oci-layout`: kept whole.
    Kept(Vec<u8>),
    Json(JsonDoc),
    /// JSON-looking, but does not parse.
    BadJson(String),
    /// JSON-looking and larger than [`MAX_JSON_DOC`]: hashed, not parsed.
    TooLarge,
    Layer(LayerSeen),
    /// A blob of a layout directory that is no regular file.
    NotRegular,
}

/// One member as it went by.
#[derive(Debug, Clone)]
struct Seen {
    size: u64,
    /// sha256 of the member's bytes.
    raw: [u8; 32],
    content: Content,
}

#[derive(Debug, Clone)]
struct LayerSeen {
    compression: Compression,
    diff: LayerDigest,
    entries: Result<u64, String>,
    /// Entries whose name or link leaves the root, and the first of them.
    escapes: u64,
    first_escape: Option<String>,
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
    /// Entries whose name or link target leaves the root.
    pub escaping_entries: u64,
    /// No problem was filed against this layer.
    pub ok: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageReport {
    /// `docker-archive` (from manifest.json) or `oci` (from index.json).
    pub format: &'static str,
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
    /// What clients accept but may regret (`--strict` fails on these).
    pub warnings: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Passes, counting warnings as problems when `strict`.
    pub fn passes(&self, strict: bool) -> bool {
        self.ok() && (!strict || self.warnings.is_empty())
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
    head.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b == b'{' || b == b'[') && !is_header_block(head)
}

/// The names kept whole.
fn is_kept_name(name: &str) -> bool {
    matches!(name, "manifest.json" | "index.json" | "oci-layout")
}

/// Where an entry's name or link would land outside the root, as a short
/// description; `None` when it stays inside.
fn escape_of(m: &Member) -> Option<String> {
    let name = String::from_utf8_lossy(&m.name);
    let link = String::from_utf8_lossy(&m.linkname);
    // Depth reached walking `parts` from `depth`; None once above the root.
    fn walk<'a>(mut depth: usize, parts: impl Iterator<Item = &'a str>) -> Option<usize> {
        for p in parts {
            match p {
                "" | "." => {}
                ".." => depth = depth.checked_sub(1)?,
                _ => depth += 1,
            }
        }
        Some(depth)
    }
    // Absolute names resolve in the layer's root, as clients extract them
    // (the reference itself writes `/nix/store/...`); only `..` climbs out.
    let Some(depth) = walk(0, name.split('/')) else { return Some(format!("{name:?} climbs out")) };
    match m.typeflag {
        b'1' if walk(0, link.split('/')).is_none() => Some(format!("{name:?} is a hard link to {link:?}")),
        // A symbolic link resolves from its own directory; absolute targets
        // resolve inside the container's root.
        b'2' if !link.starts_with('/') && walk(depth.saturating_sub(1), link.split('/')).is_none() => {
            Some(format!("{name:?} is a symbolic link to {link:?}"))
        }
        _ => None,
    }
}

/// Reads a layer tar (possibly compressed) from `br`.
fn read_layer<B: BufRead>(br: &mut B, compression: Compression) -> io::Result<LayerSeen> {
    // An uncompressed layer's diff_id is its raw digest: hash it once.
    let plain = compression == Compression::None;
    let mut diff = Hashing { inner: compression.decoder(&mut *br)?, sink: HashSink::new(), hash: !plain };
    let mut inner = TarReader::new(&mut diff);
    let (mut escapes, mut first_escape) = (0u64, None);
    let mut entries = loop {
        match inner.next_member() {
            Ok(Some(m)) => {
                if let Some(e) = escape_of(&m) {
                    escapes += 1;
                    first_escape.get_or_insert(e);
                }
            }
            Ok(None) => break Ok(inner.members()),
            Err(e) => break Err(e.to_string()),
        }
    };
    // The rest of the decompressed stream (end-of-archive padding) is part
    // of the diff_id; after a damaged tar, all of it is read unchecked.
    if entries.is_ok() {
        if let Err(e) = inner.drain() {
            entries = Err(format!("cannot be read to its end: {e}"));
        }
    }
    drop(inner);
    if let Err(e) = crate::read::tarread::discard(&mut diff) {
        if entries.is_ok() {
            entries = Err(format!("cannot be decompressed: {e}"));
        }
    }
    Ok(LayerSeen { compression, diff: diff.sink.finish(), entries, escapes, first_escape })
}

/// Reads one member's (or blob's) data of `size` bytes from `r`.
fn read_blob(r: &mut dyn Read, name: &str, size: u64) -> io::Result<Seen> {
    let mut raw = Hashing { inner: r, sink: HashSink::new(), hash: true };
    let mut br = BufReader::with_capacity(1 << 18, &mut raw);
    let head = br.fill_buf()?;
    let content = if is_kept_name(name) {
        let mut data = Vec::with_capacity(size.min(MAX_MANIFEST) as usize);
        br.read_to_end(&mut data)?;
        Content::Kept(data)
    } else if looks_like_json(head) {
        if size > MAX_JSON_DOC {
            Content::TooLarge
        } else {
            // A read error of the archive itself shows again below.
            manifest::read_json_doc(&mut br).map_or_else(|e| Content::BadJson(e.to_string()), Content::Json)
        }
    } else {
        let compression = Compression::sniff(head);
        match read_layer(&mut br, compression) {
            Ok(l) => Content::Layer(l),
            Err(e) => Content::Layer(LayerSeen {
                compression,
                diff: HashSink::new().finish(),
                entries: Err(e.to_string()),
                escapes: 0,
                first_escape: None,
            }),
        }
    };
    // Whatever the readers above left still counts.
    crate::read::tarread::discard(&mut br)?;
    drop(br);
    let raw = raw.sink.finish();
    if raw.size != size {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "member ended early"));
    }
    let content = match content {
        Content::Layer(mut l) if l.compression == Compression::None => {
            l.diff.sha256 = raw.sha256;
            Content::Layer(l)
        }
        c => c,
    };
    Ok(Seen { size, raw: raw.sha256, content })
}

/// Everything read, before the checks.
struct Collected {
    source_name: String,
    seen: HashMap<String, Seen>,
    problems: Vec<String>,
    compression: Compression,
    members: u64,
    bytes: u64,
}

impl Collected {
    fn new(source_name: &str, compression: Compression) -> Collected {
        Collected {
            source_name: source_name.to_string(),
            seen: HashMap::new(),
            problems: Vec::new(),
            compression,
            members: 0,
            bytes: 0,
        }
    }

    fn limit(&self, what: String) -> VerifyError {
        VerifyError::Limit { source_name: self.source_name.clone(), what }
    }

    /// Checks a name about to be recorded against the limits.
    fn admit(&self, name: &str, size: u64) -> Result<(), VerifyError> {
        if name.len() > MAX_NAME {
            return Err(self.limit(format!("a member name is {} bytes, more than {MAX_NAME}", name.len())));
        }
        if self.seen.len() >= MAX_FILES && !self.seen.contains_key(name) {
            return Err(self.limit(format!("it holds more than {MAX_FILES} files")));
        }
        if is_kept_name(name) && size > MAX_MANIFEST {
            return Err(VerifyError::ManifestTooLarge {
                source_name: self.source_name.clone(),
                member: name.to_string(),
                size,
            });
        }
        Ok(())
    }

    fn record(&mut self, name: String, s: Seen) {
        // The reference writes a layer twice when two layers are identical;
        // only copies that differ are ambiguous.
        let raw = s.raw;
        if self.seen.insert(name.clone(), s).is_some_and(|old| old.raw != raw) {
            self.problems.push(format!(
                "member {name:?} appears twice with different contents (clients disagree on which counts)"
            ));
        }
    }
}

/// A member name as recorded: without a leading `./`.
fn normal(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    n
}

/// Verifies the docker-archive or oci-archive read from `input`;
/// `source_name` names it in messages.
pub fn verify<R: Read>(input: R, source_name: &str) -> Result<Report, VerifyError> {
    let io_err = |err: io::Error| VerifyError::Io { source_name: source_name.to_string(), err };
    let tar_err = |err: TarError| match err {
        TarError::Io(err) => VerifyError::Io { source_name: source_name.to_string(), err },
        err => VerifyError::Tar { source_name: source_name.to_string(), err },
    };
    let mut outer = BufReader::with_capacity(1 << 20, input);
    let compression = Compression::sniff(outer.fill_buf().map_err(io_err)?);
    let mut t = TarReader::new(compression.decoder(outer).map_err(io_err)?);
    let mut c = Collected::new(source_name, compression);
    while let Some(m) = t.next_member().map_err(tar_err)? {
        if !m.is_file() {
            continue;
        }
        let name = normal(&m.name_lossy()).to_string();
        c.admit(&name, m.size)?;
        let s = read_blob(&mut t, &name, m.size).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                tar_err(TarError::Truncated(name.clone()))
            } else {
                io_err(e)
            }
        })?;
        c.record(name, s);
    }
    t.drain().map_err(tar_err)?;
    c.members = t.members();
    c.bytes = t.offset();
    check(c)
}

/// Verifies the OCI image layout in directory `dir`.
pub fn verify_dir(dir: &Path) -> Result<Report, VerifyError> {
    let source_name = dir.display().to_string();
    let io_err = |what: &Path, err: io::Error| VerifyError::Io {
        source_name: format!("{source_name}: {}", what.strip_prefix(dir).unwrap_or(what).display()),
        err,
    };
    let mut c = Collected::new(&source_name, Compression::None);
    if std::fs::symlink_metadata(dir.join("index.json")).is_err() {
        return Err(VerifyError::NoManifest { source_name });
    }
    let mut names: Vec<String> = Vec::new();
    let blobs = dir.join("blobs");
    let mut algs: Vec<_> = std::fs::read_dir(&blobs)
        .map_err(|e| io_err(&blobs, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| io_err(&blobs, e))?;
    algs.sort();
    for alg in algs {
        let alg = alg.to_string_lossy().into_owned();
        let d = blobs.join(&alg);
        if !std::fs::symlink_metadata(&d).map_err(|e| io_err(&d, e))?.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d).map_err(|e| io_err(&d, e))? {
            let e = e.map_err(|e| io_err(&d, e))?;
            let name = format!("blobs/{alg}/{}", e.file_name().to_string_lossy());
            if names.len() >= MAX_FILES {
                return Err(c.limit(format!("it holds more than {MAX_FILES} blobs")));
            }
            names.push(name);
        }
    }
    names.sort();
    let top = ["oci-layout", "index.json"].into_iter().filter(|n| std::fs::symlink_metadata(dir.join(n)).is_ok());
    for name in top.map(str::to_string).chain(names) {
        let path = dir.join(&name);
        c.admit(&name, 0)?;
        let (mut f, size) = match crate::input::limited::open_regular(&path) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error() == Some(libc::ELOOP) => {
                c.record(name, Seen { size: 0, raw: [0; 32], content: Content::NotRegular });
                continue;
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        c.admit(&name, size)?;
        let s = read_blob(&mut f, &name, size).map_err(|e| io_err(&path, e))?;
        c.members += 1;
        c.bytes += size;
        c.record(name, s);
    }
    check(c)
}

/// One blob an image names, and the descriptor naming it (OCI).
#[derive(Debug, Clone)]
struct Ref {
    name: String,
    desc: Option<Descriptor>,
}

/// An image, as either format describes it: what the shared checks take.
#[derive(Debug, Clone)]
struct ImageRefs {
    format: &'static str,
    tags: Vec<String>,
    config: Ref,
    layers: Vec<Ref>,
}

/// Where a problem belongs: the archive, an image, or one of its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Archive,
    Image(usize),
    Layer(usize, usize),
}

/// The problems and warnings filed while checking.  The report's verdict
/// and every layer's `ok` are computed from these alone.
#[derive(Default)]
struct Findings {
    problems: Vec<(At, String)>,
    warnings: Vec<String>,
}

impl Findings {
    fn bad(&mut self, at: At, what: String) {
        let text = match at {
            At::Archive => what,
            At::Image(k) | At::Layer(k, _) => format!("image {}: {what}", k + 1),
        };
        self.problems.push((at, text));
    }
}

fn kept<'a>(c: &'a Collected, name: &str) -> Option<&'a [u8]> {
    match c.seen.get(name) {
        Some(Seen { content: Content::Kept(d), .. }) => Some(d),
        _ => None,
    }
}

/// The images `manifest.json` describes.
fn docker_images(c: &Collected, f: &mut Findings) -> Result<Vec<ImageRefs>, VerifyError> {
    let Some(bytes) = kept(c, "manifest.json") else { return Ok(Vec::new()) };
    let bad =
        |what: String| VerifyError::BadManifest { source_name: c.source_name.clone(), member: "manifest.json", what };
    let entries = manifest::parse_docker_manifest(bytes).map_err(bad)?;
    if entries.is_empty() {
        return Err(bad("it lists no image".into()));
    }
    Ok(entries
        .into_iter()
        .map(|DockerEntry { config, repo_tags, layers }| {
            for n in std::iter::once(&config).chain(&layers) {
                if escapes_archive(n) {
                    f.bad(At::Archive, format!("manifest.json names {n:?}, which escapes the archive"));
                }
            }
            ImageRefs {
                format: "docker-archive",
                tags: repo_tags,
                config: Ref { name: normal(&config).to_string(), desc: None },
                layers: layers.iter().map(|l| Ref { name: normal(l).to_string(), desc: None }).collect(),
            }
        })
        .collect())
}

/// The images `index.json` leads to (through nested indexes).
fn oci_images(c: &Collected, f: &mut Findings) -> Result<Vec<ImageRefs>, VerifyError> {
    let Some(bytes) = kept(c, "index.json") else { return Ok(Vec::new()) };
    let bad =
        |what: String| VerifyError::BadManifest { source_name: c.source_name.clone(), member: "index.json", what };
    let list = manifest::parse_oci_index(bytes).map_err(bad)?;
    match kept(c, "oci-layout").map(serde_json::from_slice::<serde_json::Value>) {
        None => f.bad(At::Archive, "index.json without an oci-layout file".into()),
        Some(Ok(v)) if v.get("imageLayoutVersion").and_then(|v| v.as_str()).is_some() => {}
        Some(_) => f.bad(At::Archive, "oci-layout is not {\"imageLayoutVersion\": ...}".into()),
    }
    if list.is_empty() {
        return Err(bad("it lists no manifest".into()));
    }
    let mut images = Vec::new();
    let mut stack: Vec<(String, Descriptor, usize)> =
        list.into_iter().enumerate().rev().map(|(i, d)| (format!("index.json manifest {}", i + 1), d, 0)).collect();
    while let Some((what, d, depth)) = stack.pop() {
        let Some(doc) = resolve(c, f, &what, &d) else { continue };
        let media = d.media_type.as_deref().or(doc.media_type.as_deref());
        let is_index = media.map_or(doc.manifests.is_some(), |m| INDEX_TYPES.contains(&m));
        if is_index {
            if depth == MAX_INDEX_DEPTH {
                return Err(c.limit(format!("indexes nest more than {MAX_INDEX_DEPTH} deep")));
            }
            let Some(ms) = &doc.manifests else {
                f.bad(At::Archive, format!("{what} is an index without a \"manifests\" list"));
                continue;
            };
            for (i, m) in ms.items.iter().enumerate().rev() {
                stack.push((format!("{what} manifest {}", i + 1), m.clone(), depth + 1));
            }
            continue;
        }
        if let Some(m) = media.filter(|m| !MANIFEST_TYPES.contains(m)) {
            f.bad(At::Archive, format!("{what} has media type {m:?}, not an image manifest's"));
            continue;
        }
        let Some(config) = doc.config.clone().filter(|c| c.digest.is_some()) else {
            f.bad(At::Archive, format!("{what} has no config descriptor"));
            continue;
        };
        let Some(layers) = &doc.layers else {
            f.bad(At::Archive, format!("{what} has no \"layers\" list"));
            continue;
        };
        if layers.more {
            return Err(c.limit(format!("{what} lists more than {} layers", manifest::MAX_LIST)));
        }
        let blob = |d: &Descriptor| d.blob_name().unwrap_or_else(|| d.digest.clone().unwrap_or_default());
        images.push(ImageRefs {
            format: "oci",
            tags: d.ref_name.iter().cloned().collect(),
            config: Ref { name: blob(&config), desc: Some(config) },
            layers: layers.items.iter().map(|l| Ref { name: blob(l), desc: Some(l.clone()) }).collect(),
        });
    }
    Ok(images)
}

/// The JSON blob a manifest or index descriptor names, its digest and size
/// checked; `None` (a problem filed) when it cannot be followed.
fn resolve<'c>(c: &'c Collected, f: &mut Findings, what: &str, d: &Descriptor) -> Option<&'c JsonDoc> {
    let Some(name) = d.blob_name() else {
        f.bad(At::Archive, format!("{what} has digest {:?}, not a sha256 digest", d.digest.as_deref().unwrap_or("")));
        return None;
    };
    let Some(s) = c.seen.get(&name) else {
        f.bad(At::Archive, format!("{what} ({name}) is not in the archive"));
        return None;
    };
    if d.size != Some(s.size) {
        f.bad(At::Archive, format!("{what} ({name}) is {} bytes, but its descriptor says {}", s.size, size_text(d)));
    }
    match &s.content {
        Content::Json(doc) if doc.object => Some(doc),
        _ => {
            f.bad(At::Archive, format!("{what} ({name}) is not a JSON object"));
            None
        }
    }
}

fn size_text(d: &Descriptor) -> String {
    d.size.map_or("nothing".into(), |n| n.to_string())
}

/// The digest a member name carries: `HEX.json`, `HEX/layer.tar`,
/// `blobs/sha256/HEX`.
fn digest_in_name(name: &str) -> Option<[u8; 32]> {
    let stem = name.strip_suffix(".json").or_else(|| name.strip_suffix("/layer.tar")).unwrap_or(name);
    let last = stem.rsplit('/').next()?;
    parse_sha256_hex(last)
}

/// Checks a descriptor against the blob it names (digest, size).
fn check_desc(f: &mut Findings, at: At, what: &str, d: &Descriptor, s: &Seen) {
    if d.digest.as_deref() != Some(&format!("sha256:{}", hex(&s.raw))) {
        f.bad(at, format!("{what} has sha256:{}, not the {:?} its descriptor names", hex(&s.raw), d.digest));
    }
    if d.size != Some(s.size) {
        f.bad(at, format!("{what} is {} bytes, but its descriptor says {}", s.size, size_text(d)));
    }
}

/// The checks every image gets, whichever format described it.
fn check_image(c: &Collected, f: &mut Findings, k: usize, img: &ImageRefs) -> ImageReport {
    let mut report = ImageReport {
        format: img.format,
        repo_tags: img.tags.clone(),
        config: img.config.name.clone(),
        id: None,
        layers: Vec::new(),
    };
    let cname = &img.config.name;
    let mut diff_ids: Option<&[Option<[u8; 32]>]> = None;
    match c.seen.get(cname) {
        None => f.bad(At::Image(k), format!("config {cname} is not in the archive")),
        Some(s) => {
            report.id = Some(format!("sha256:{}", hex(&s.raw)));
            match &img.config.desc {
                Some(d) => check_desc(f, At::Image(k), &format!("config {cname}"), d, s),
                None if digest_in_name(cname) != Some(s.raw) => f.bad(
                    At::Image(k),
                    format!("config {cname} has sha256:{}, which its name does not carry", hex(&s.raw)),
                ),
                None => {}
            }
            match &s.content {
                Content::Json(doc) if doc.object => match &doc.diff_ids {
                    None => f.bad(At::Image(k), format!("config {cname} has no rootfs.diff_ids list")),
                    Some(ids) if ids.more => f.bad(
                        At::Image(k),
                        format!("config {cname} lists more than {} diff_ids (a limit of verify)", manifest::MAX_LIST),
                    ),
                    Some(ids) => {
                        if ids.items.len() != img.layers.len() {
                            f.bad(
                                At::Image(k),
                                format!(
                                    "the manifest lists {} layers but the config has {} diff_ids",
                                    img.layers.len(),
                                    ids.items.len()
                                ),
                            );
                        }
                        diff_ids = Some(&ids.items);
                    }
                },
                Content::Json(_) | Content::Kept(_) => {
                    f.bad(At::Image(k), format!("config {cname} is not a JSON object"))
                }
                Content::BadJson(e) => f.bad(At::Image(k), format!("config {cname} is not valid JSON: {e}")),
                Content::TooLarge => f.bad(
                    At::Image(k),
                    format!(
                        "config {cname} is {} bytes, more than the {MAX_JSON_DOC} bytes verify reads as JSON (a limit of verify)",
                        s.size
                    ),
                ),
                Content::Layer(_) => f.bad(At::Image(k), format!("config {cname} is not JSON")),
                Content::NotRegular => f.bad(At::Image(k), format!("config {cname} is not a regular file")),
            }
        }
    }
    for (i, r) in img.layers.iter().enumerate() {
        let at = At::Layer(k, i);
        let name = &r.name;
        let what = format!("layer {} ({name})", i + 1);
        let mut lr = LayerReport {
            name: name.clone(),
            size: 0,
            compression: "none",
            entries: None,
            diff_id: String::new(),
            escaping_entries: 0,
            ok: false,
        };
        let s = match c.seen.get(name) {
            None => {
                f.bad(at, format!("{what} is not in the archive"));
                report.layers.push(lr);
                continue;
            }
            Some(s) => s,
        };
        lr.size = s.size;
        if let Some(d) = &r.desc {
            check_desc(f, at, &what, d, s);
        } else if name.starts_with("blobs/") && digest_in_name(name) != Some(s.raw) {
            // An OCI-style blob name carries the blob's own digest.
            f.bad(at, format!("{what} has sha256:{}, which its name does not carry", hex(&s.raw)));
        }
        let l = match &s.content {
            Content::Layer(l) => l,
            Content::NotRegular => {
                f.bad(at, format!("{what} is not a regular file"));
                report.layers.push(lr);
                continue;
            }
            _ => {
                f.bad(at, format!("{what} is JSON, not a layer tar"));
                report.layers.push(lr);
                continue;
            }
        };
        lr.compression = l.compression.name();
        lr.diff_id = format!("sha256:{}", l.diff.hex());
        lr.entries = l.entries.as_ref().ok().copied();
        lr.escaping_entries = l.escapes;
        if let Err(e) = &l.entries {
            f.bad(at, format!("{what} is not a readable tar: {e}"));
        }
        match diff_ids.map(|ids| ids.get(i)) {
            // The config is missing or unreadable: filed above, for the image.
            None => f.bad(at, format!("{what} has no diff_id to check against")),
            Some(None) => f.bad(at, format!("{what} has no diff_id in the config")),
            Some(Some(None)) => f.bad(at, format!("{what}: its diff_id in the config is not a sha256 digest")),
            Some(Some(Some(w))) if *w != l.diff.sha256 => {
                f.bad(at, format!("{what} has sha256:{}, but its diff_id is sha256:{}", l.diff.hex(), hex(w)))
            }
            Some(Some(Some(_))) => {}
        }
        if let Some(mt) = r.desc.as_ref().map(|d| d.media_type.as_deref().unwrap_or("")) {
            match layer_media_compression(mt) {
                None => f.bad(at, format!("{what} has media type {mt:?}, not a layer type verify knows")),
                Some(want) if want != l.compression.name() => f.bad(
                    at,
                    format!("{what} is {}-compressed, but its media type {mt:?} says {want}", l.compression.name()),
                ),
                Some(_) => {}
            }
        }
        if let Some(e) = &l.first_escape {
            f.warnings.push(format!(
                "image {}: {what}: {} entries would land outside the root (e.g. {e}); the reference passes them through, clients may refuse or mishandle them",
                k + 1,
                l.escapes
            ));
        }
        report.layers.push(lr);
    }
    report
}

/// Resolves the images and runs the checks.
fn check(c: Collected) -> Result<Report, VerifyError> {
    if kept(&c, "manifest.json").is_none() && kept(&c, "index.json").is_none() {
        return Err(VerifyError::NoManifest { source_name: c.source_name.clone() });
    }
    let mut f = Findings::default();
    for p in &c.problems {
        f.bad(At::Archive, p.clone());
    }
    // Every blob of a layout is named by its digest.
    let mut blobs: Vec<(&String, &Seen)> = c.seen.iter().filter(|(n, _)| n.starts_with("blobs/")).collect();
    blobs.sort_by(|a, b| a.0.cmp(b.0));
    for (name, s) in blobs {
        match (name.strip_prefix("blobs/sha256/"), &s.content) {
            (_, Content::NotRegular) => f.bad(At::Archive, format!("blob {name} is not a regular file")),
            (Some(_), _) if digest_in_name(name) != Some(s.raw) => {
                f.bad(At::Archive, format!("blob {name} has sha256:{}, which its name does not carry", hex(&s.raw)))
            }
            (Some(_), _) => {}
            (None, _) => f.warnings.push(format!("blob {name} is not a sha256 blob; its digest is not checked")),
        }
    }
    let mut refs = docker_images(&c, &mut f)?;
    refs.extend(oci_images(&c, &mut f)?);
    let mut images: Vec<ImageReport> = refs.iter().enumerate().map(|(k, r)| check_image(&c, &mut f, k, r)).collect();
    // A layer is ok exactly when no problem names it.
    for (k, img) in images.iter_mut().enumerate() {
        for (i, l) in img.layers.iter_mut().enumerate() {
            l.ok = !f.problems.iter().any(|(at, _)| *at == At::Layer(k, i));
        }
    }
    Ok(Report {
        compression: c.compression.name(),
        members: c.members,
        bytes: c.bytes,
        images,
        problems: f.problems.into_iter().map(|(_, p)| p).collect(),
        warnings: f.warnings,
    })
}

/// The report as text, a line per layer.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (k, img) in r.images.iter().enumerate() {
        let tags = if img.repo_tags.is_empty() { "(untagged)".to_string() } else { img.repo_tags.join(", ") };
        let format = if img.format == "oci" { " (OCI)" } else { "" };
        let _ = writeln!(s, "image {}{format}: {tags}, id {}", k + 1, img.id.as_deref().unwrap_or("?"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::tarheader::{self, Header};

    fn entry(name: &[u8], flag: u8, link: &[u8]) -> Member {
        let mut out = Vec::new();
        let h = Header { typeflag: flag, linkname: link, ..Header::plain_file(name, 0, 1) };
        tarheader::encode(&h, &mut out);
        out.resize(out.len() + 1024, 0);
        TarReader::new(&out[..]).next_member().unwrap().unwrap()
    }

    #[test]
    fn escapes_are_names_and_links_that_leave_the_root() {
        assert!(escape_of(&entry(b"a/../../etc/passwd", b'0', b"")).is_some());
        assert!(escape_of(&entry(b"a/b/../c", b'0', b"")).is_none());
        assert!(escape_of(&entry(b"x", b'1', b"../outside")).is_some());
        assert!(escape_of(&entry(b"x", b'1', b"nix/store/a")).is_none());
        assert!(escape_of(&entry(b"/nix/store/x", b'1', b"/nix/store/a")).is_none(), "absolute names are rooted");
        assert!(escape_of(&entry(b"/../x", b'0', b"")).is_some());
        assert!(escape_of(&entry(b"a/l", b'2', b"../../up")).is_some());
        assert!(escape_of(&entry(b"a/l", b'2', b"../ok")).is_none());
        assert!(
            escape_of(&entry(b"bin/sh", b'2', b"/nix/store/x-bash/bin/bash")).is_none(),
            "absolute targets resolve in the root"
        );
    }
}
