//! The base image (`from_image`): a docker-archive, plain or compressed with
//! gzip, bzip2, xz or zstd (the reference's `tarfile.open` reads the first
//! three; zstd is ours).
//!
//! The archive is indexed once (member headers and data offsets, never whole
//! members in memory), `manifest.json` and the config it names are read with
//! a size bound, and each layer named by the manifest is later copied through
//! member header and all, re-encoded as `tarfile` re-encodes a member it read
//! (`tar.addfile(layer_tarinfo, ...)`), while its content is hashed and
//! compared with its diff_id.  Malformed archives get an error naming the
//! archive and the member at fault.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::digest::{hex, parse_sha256_hex, HashSink};
use crate::read::tarread::{read_full, TarError, TarReader};
pub use crate::read::tarread::{Compression, Member};

/// Largest manifest.json or config we read (real ones are a few KiB).
pub const MAX_JSON: u64 = 16 << 20;

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
    #[error("base image {path}: {member} is larger than {MAX_JSON} bytes")]
    TooLarge { path: PathBuf, member: String },
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

/// Reads every member header of the archive.
fn index(path: &Path, compression: Compression) -> Result<Vec<Member>, BaseError> {
    let mut t = TarReader::new(open_at(path, compression, 0)?);
    let mut members = Vec::new();
    let err = |e: TarError| match e {
        TarError::Io(source) => BaseError::Io { path: path.to_path_buf(), source },
        TarError::NotTar(why) => BaseError::NotTar { path: path.to_path_buf(), why },
        TarError::Truncated(member) => BaseError::Truncated { path: path.to_path_buf(), member },
    };
    while let Some(m) = t.next_member().map_err(err)? {
        members.push(m);
    }
    if members.is_empty() {
        return Err(BaseError::NotTar { path: path.to_path_buf(), why: "it has no members".into() });
    }
    Ok(members)
}

/// `tarfile.getmember`: the last member with exactly this name.
fn find<'a>(members: &'a [Member], name: &str) -> Option<&'a Member> {
    let name = name.trim_end_matches('/');
    members.iter().rev().find(|m| m.name == name.as_bytes())
}

fn read_json(path: &Path, compression: Compression, member: &Member) -> Result<Value, BaseError> {
    if member.size > MAX_JSON {
        return Err(BaseError::TooLarge { path: path.to_path_buf(), member: member.name_lossy() });
    }
    let mut r = open_at(path, compression, member.data_offset)?;
    let mut data = vec![0u8; member.size as usize];
    if read_full(&mut r, &mut data).map_err(io_err(path))? < data.len() {
        return Err(BaseError::Truncated { path: path.to_path_buf(), member: member.name_lossy() });
    }
    serde_json::from_slice(&data).map_err(|e| BaseError::Invalid {
        path: path.to_path_buf(),
        what: format!("{} is not valid JSON: {e}", member.name_lossy()),
    })
}

impl BaseImage {
    /// Indexes and validates the base image.
    pub fn open(path: &Path) -> Result<BaseImage, BaseError> {
        let compression = detect(path)?;
        let members = index(path, compression)?;
        let invalid = |what: String| BaseError::Invalid { path: path.to_path_buf(), what };
        let missing = |member: &str| BaseError::MissingMember { path: path.to_path_buf(), member: member.to_string() };

        let manifest_m = find(&members, "manifest.json").ok_or_else(|| missing("manifest.json"))?;
        let manifest = read_json(path, compression, manifest_m)?;
        let images = manifest.as_array().ok_or_else(|| invalid("manifest.json is not a list".into()))?;
        if images.len() != 1 {
            return Err(invalid(format!(
                "manifest.json describes {} images; a base image must hold exactly one (save just the one you need)",
                images.len()
            )));
        }
        let image = &images[0];
        let config_name = image
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("manifest.json: \"Config\" is missing or not a string".into()))?;
        let layer_names: Vec<&str> = image
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("manifest.json: \"Layers\" is missing or not a list".into()))?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| invalid("manifest.json: \"Layers\" holds a non-string".into())))
            .collect::<Result<_, _>>()?;
        for name in std::iter::once(config_name).chain(layer_names.iter().copied()) {
            if name.starts_with('/') || name.split('/').any(|c| c == "..") {
                return Err(invalid(format!("manifest.json names {name:?}, which escapes the archive")));
            }
        }
        let config_m = find(&members, config_name).ok_or_else(|| missing(config_name))?;
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
            let member = find(&members, name).ok_or_else(|| missing(name))?.clone();
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
