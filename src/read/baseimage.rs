//! The base image (`from_image`): a docker-archive, plain or compressed with
//! gzip, bzip2, xz or zstd (the reference's `tarfile.open` reads the first
//! three; zstd is ours).
//!
//! The archive is scanned for the members that can matter (`manifest.json`
//! and the names a docker-archive's configs and layers have; a second scan
//! for exactly the names the manifest gives when the first kept too few),
//! so memory does not grow with the number of members; `manifest.json`
//! (parsed by [`crate::read::manifest`], as `verify` parses it) and the
//! config it names are read with a size bound, and each layer named by the manifest is later copied through
//! member header and all, re-encoded as `tarfile` re-encodes a member it read
//! (`tar.addfile(layer_tarinfo, ...)`), while its content is hashed and
//! compared with its diff_id.  Malformed archives get an error naming the
//! archive and the member at fault.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::digest::{hex, parse_sha256_hex, HashSink};
use crate::read::manifest::{escapes_archive, parse_docker_manifest, DockerEntry};
use crate::read::tarread::{read_full, TarError, TarReader};
pub use crate::read::tarread::{Compression, Member};

/// Largest base config read (real ones are a few KiB; it is kept whole, as
/// its `config` object goes into the image).  `manifest.json` has
/// [`crate::read::manifest::MAX_MANIFEST`], as for `verify`.
pub const MAX_JSON: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("base image {path} is not a tar archive ({why})")]
    NotTar { path: PathBuf, why: String },
    #[error("base image {path} is truncated (in member {member:?})")]
    Truncated { path: PathBuf, member: String },
    #[error("base image {path} has no member {member:?}")]
    MissingMember { path: PathBuf, member: String },
    #[error("base image {path}: {member} is larger than the {limit}-byte limit")]
    TooLarge { path: PathBuf, member: String, limit: u64 },
    #[error("base image {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("base image {path}: layer {member} has sha256:{actual}, but its diff_id is sha256:{expected}")]
    DiffIdMismatch { path: PathBuf, member: String, expected: String, actual: String },
}

/// One base layer: its member and its diff_id.
#[derive(Debug, Clone)]
pub struct BaseLayer {
    pub member: Member,
    /// `Layers[i]` from manifest.json, as written there.
    pub path: String,
    pub diff_id: [u8; 32],
}

/// A base image, indexed.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub path: PathBuf,
    pub compression: Compression,
    pub layers: Vec<BaseLayer>,
    /// The base config's `config` object.
    pub config: serde_json::Map<String, Value>,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> BaseError + '_ {
    move |source| BaseError::Io { path: path.to_path_buf(), source }
}

fn detect(path: &Path) -> Result<Compression, BaseError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 6];
    let n = read_full(&mut f, &mut magic).map_err(io_err(path))?;
    Ok(Compression::sniff(&magic[..n]))
}

/// Opens the decompressed stream of the archive, positioned at `offset`.
fn open_at(path: &Path, compression: Compression, offset: u64) -> Result<Box<dyn Read>, BaseError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    if compression == Compression::None {
        f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
        return Ok(Box::new(BufReader::with_capacity(1 << 20, f)));
    }
    let mut r = compression.decoder(BufReader::with_capacity(1 << 20, f)).map_err(io_err(path))?;
    let skipped = io::copy(&mut (&mut r).take(offset), &mut io::sink()).map_err(io_err(path))?;
    if skipped != offset {
        return Err(BaseError::Truncated { path: path.to_path_buf(), member: String::new() });
    }
    Ok(r)
}

/// Most members kept from the first look at the archive, besides
/// `manifest.json`; an archive with more (or with names we did not expect)
/// is read a second time for exactly the members its manifest names.
const MAX_CANDIDATES: usize = 4096;
/// Most bytes of kept member headers (names, pax records).
pub const MAX_KEPT_HEADERS: u64 = 64 << 20;

fn header_bytes(m: &Member) -> u64 {
    (m.name.len() + m.linkname.len() + m.pax.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()) as u64
}

/// A name a docker-archive's config or layer usually has.
fn usual_name(name: &[u8]) -> bool {
    name.ends_with(b".json") || name.ends_with(b"/layer.tar") || name.starts_with(b"blobs/")
}

/// The members of one scan: the last member of each kept name, and whether
/// some were left out (the caps).
struct Scan {
    members: std::collections::HashMap<Vec<u8>, Member>,
    complete: bool,
}

/// Reads every member header, keeping the last member of each name `keep`
/// takes (`manifest.json` always): memory grows with what is kept, never
/// with the number of members.
fn scan(path: &Path, compression: Compression, keep: &dyn Fn(&[u8]) -> bool, cap: usize) -> Result<Scan, BaseError> {
    let mut t = TarReader::new(open_at(path, compression, 0)?);
    let err = |e: TarError| match e {
        TarError::Io(source) => BaseError::Io { path: path.to_path_buf(), source },
        TarError::NotTar(why) => BaseError::NotTar { path: path.to_path_buf(), why },
        TarError::Truncated(member) => BaseError::Truncated { path: path.to_path_buf(), member },
    };
    let mut scan = Scan { members: std::collections::HashMap::new(), complete: true };
    let mut bytes = 0u64;
    while let Some(m) = t.next_member().map_err(err)? {
        let always = m.name == b"manifest.json";
        if !always && !keep(&m.name) {
            continue;
        }
        let size = header_bytes(&m);
        let fits = scan.members.len() < cap && bytes + size <= MAX_KEPT_HEADERS;
        if !always && !fits && !scan.members.contains_key(&m.name) {
            scan.complete = false;
            continue;
        }
        bytes += size;
        if let Some(old) = scan.members.insert(m.name.clone(), m) {
            bytes -= header_bytes(&old);
        }
        if bytes > MAX_KEPT_HEADERS {
            return Err(BaseError::Invalid {
                path: path.to_path_buf(),
                what: format!("the members it names have more than {MAX_KEPT_HEADERS} bytes of headers (a limit)"),
            });
        }
    }
    if t.members() == 0 {
        return Err(BaseError::NotTar { path: path.to_path_buf(), why: "it has no members".into() });
    }
    Ok(scan)
}

impl Scan {
    /// `tarfile.getmember`: the last member with exactly this name.
    fn find(&self, name: &str) -> Option<&Member> {
        self.members.get(name.trim_end_matches('/').as_bytes())
    }
}

/// A member's data, at most `limit` bytes.
fn read_bytes(path: &Path, compression: Compression, member: &Member, limit: u64) -> Result<Vec<u8>, BaseError> {
    if member.size > limit {
        return Err(BaseError::TooLarge { path: path.to_path_buf(), member: member.name_lossy(), limit });
    }
    let mut r = open_at(path, compression, member.data_offset)?;
    let mut data = vec![0u8; member.size as usize];
    if read_full(&mut r, &mut data).map_err(io_err(path))? < data.len() {
        return Err(BaseError::Truncated { path: path.to_path_buf(), member: member.name_lossy() });
    }
    Ok(data)
}

fn read_json(path: &Path, compression: Compression, member: &Member) -> Result<Value, BaseError> {
    let data = read_bytes(path, compression, member, MAX_JSON)?;
    serde_json::from_slice(&data).map_err(|e| BaseError::Invalid {
        path: path.to_path_buf(),
        what: format!("{} is not valid JSON: {e}", member.name_lossy()),
    })
}

impl BaseImage {
    /// Indexes and validates the base image.
    pub fn open(path: &Path) -> Result<BaseImage, BaseError> {
        if path.is_dir() {
            let what = "a directory: a base image is a docker-archive file, plain or compressed (from an OCI layout, `skopeo copy oci:DIR docker-archive:FILE` makes one)";
            return Err(BaseError::Invalid { path: path.to_path_buf(), what: what.into() });
        }
        let compression = detect(path)?;
        let first = scan(path, compression, &|n| usual_name(n), MAX_CANDIDATES)?;
        let invalid = |what: String| BaseError::Invalid { path: path.to_path_buf(), what };
        let missing = |member: &str| BaseError::MissingMember { path: path.to_path_buf(), member: member.to_string() };

        let manifest_m = match first.find("manifest.json") {
            Some(m) => m,
            None if first.find("index.json").is_some() => {
                let p = path.display();
                return Err(invalid(format!("an oci-archive: a base image is a docker-archive (`skopeo copy oci-archive:{p} docker-archive:BASE.tar` makes one)")));
            }
            None => return Err(missing("manifest.json")),
        };
        let manifest = read_bytes(path, compression, manifest_m, crate::read::manifest::MAX_MANIFEST)?;
        let images = parse_docker_manifest(&manifest).map_err(|e| invalid(format!("manifest.json: {e}")))?;
        if images.len() != 1 {
            return Err(invalid(format!(
                "manifest.json describes {} images; a base image must hold exactly one (save just the one you need)",
                images.len()
            )));
        }
        let DockerEntry { config: config_name, layers: layer_names, .. } = &images[0];
        let config_name = config_name.as_str();
        for name in std::iter::once(config_name).chain(layer_names.iter().map(String::as_str)) {
            if escapes_archive(name) {
                return Err(invalid(format!("manifest.json names {name:?}, which escapes the archive")));
            }
        }
        // The members the manifest names, from the first scan when it kept
        // them all, else from a second scan for exactly these names.
        let wanted: std::collections::HashSet<Vec<u8>> = std::iter::once(config_name)
            .chain(layer_names.iter().map(String::as_str))
            .map(|n| n.trim_end_matches('/').as_bytes().to_vec())
            .collect();
        let found_all = first.complete && wanted.iter().all(|n| usual_name(n));
        let members = if found_all {
            first
        } else {
            // (`manifest.json` is kept too, whatever the cap.)
            scan(path, compression, &|n| wanted.contains(n), wanted.len() + 1)?
        };
        let config_m = members.find(config_name).ok_or_else(|| missing(config_name))?;
        let config_json = read_json(path, compression, config_m)?;
        let diff_ids: Vec<&str> = config_json
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(format!("{config_name}: rootfs.diff_ids is missing or not a list")))?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| invalid(format!("{config_name}: a diff_id is not a string"))))
            .collect::<Result<_, _>>()?;
        if diff_ids.len() != layer_names.len() {
            return Err(invalid(format!(
                "manifest.json lists {} layers but {config_name} has {} diff_ids",
                layer_names.len(),
                diff_ids.len()
            )));
        }
        let config = match config_json.get("config") {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::Null) | None => serde_json::Map::new(),
            Some(_) => return Err(invalid(format!("{config_name}: \"config\" is not an object"))),
        };
        if let Some(env) = config.get("Env") {
            if !env.is_null() && !env.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                return Err(invalid(format!("{config_name}: config.Env is not a list of strings")));
            }
        }
        let mut layers = Vec::with_capacity(layer_names.len());
        for (name, diff_id) in layer_names.iter().zip(&diff_ids) {
            let member = members.find(name).ok_or_else(|| missing(name))?.clone();
            if !member.is_file() {
                return Err(invalid(format!("layer {name} is not a regular file in the archive")));
            }
            let hexpart = diff_id.strip_prefix("sha256:").unwrap_or(diff_id);
            let digest = parse_sha256_hex(hexpart)
                .ok_or_else(|| invalid(format!("{config_name}: diff_id {diff_id:?} is not a sha256 digest")))?;
            layers.push(BaseLayer { member, path: (*name).to_string(), diff_id: digest });
        }
        Ok(BaseImage { path: path.to_path_buf(), compression, layers, config })
    }

    /// Copies layer `i` (its data only; the caller writes the header) to
    /// `out`, verifying its diff_id: the sha256 of the layer tar, or of its
    /// decompressed content for a gzip- or zstd-compressed layer blob.
    pub fn copy_layer<W: Write>(&self, i: usize, out: &mut W) -> Result<Result<(), BaseError>, io::Error> {
        let layer = &self.layers[i];
        let m = &layer.member;
        let mut r = match open_at(&self.path, self.compression, m.data_offset) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut left = m.size;
        let mut verifier: Option<Box<dyn Write>> = None;
        let sink = std::rc::Rc::new(std::cell::RefCell::new(HashSink::new()));
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = match read_full(&mut r, &mut buf[..want]) {
                Ok(n) => n,
                Err(e) => return Ok(Err(BaseError::Io { path: self.path.clone(), source: e })),
            };
            if n == 0 {
                return Ok(Err(BaseError::Truncated { path: self.path.clone(), member: layer.path.clone() }));
            }
            let chunk = &buf[..n];
            let v = verifier.get_or_insert_with(|| {
                let shared = SharedSink(sink.clone());
                if chunk.starts_with(&[0x1f, 0x8b]) {
                    Box::new(flate2::write::MultiGzDecoder::new(shared))
                } else if chunk.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    match zstd::stream::write::Decoder::new(shared) {
                        Ok(d) => Box::new(d.auto_flush()),
                        Err(_) => Box::new(SharedSink(sink.clone())),
                    }
                } else {
                    Box::new(shared)
                }
            });
            if let Err(e) = v.write_all(chunk) {
                return Ok(Err(BaseError::Invalid {
                    path: self.path.clone(),
                    what: format!("layer {} cannot be decompressed: {e}", layer.path),
                }));
            }
            out.write_all(chunk)?;
            left -= n as u64;
        }
        if let Some(mut v) = verifier {
            if let Err(e) = v.flush() {
                return Ok(Err(BaseError::Invalid {
                    path: self.path.clone(),
                    what: format!("layer {} cannot be decompressed: {e}", layer.path),
                }));
            }
        }
        let actual = sink.borrow().clone().finish();
        if actual.sha256 != layer.diff_id {
            return Ok(Err(BaseError::DiffIdMismatch {
                path: self.path.clone(),
                member: layer.path.clone(),
                expected: hex(&layer.diff_id),
                actual: actual.hex(),
            }));
        }
        Ok(Ok(()))
    }
}

struct SharedSink(std::rc::Rc<std::cell::RefCell<HashSink>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
