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

use crate::hash::{hex, parse_sha256_hex, HashSink};
use crate::tarheader::{self, typeflag, Header};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

/// A member of the base archive as `tarfile` would read it back.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub linkname: Vec<u8>,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub devmajor: u64,
    pub devminor: u64,
    /// The member's pax records, in their order; `tarfile` writes them again.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the member's data in the (decompressed) archive.
    pub data_offset: u64,
}

impl Member {
    pub fn header(&self) -> Header<'_> {
        Header {
            name: &self.name,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime: self.mtime,
            typeflag: self.typeflag,
            linkname: &self.linkname,
            uname: &self.uname,
            gname: &self.gname,
            devmajor: self.devmajor,
            devminor: self.devminor,
            pax: &self.pax,
        }
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
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
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..]).map_err(io_err(path))? {
            0 => break,
            k => n += k,
        }
    }
    let m = &magic[..n];
    Ok(if m.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if m.starts_with(b"BZh") {
        Compression::Bzip2
    } else if m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Opens the decompressed stream of the archive, positioned at `offset`.
fn open_at(path: &Path, compression: Compression, offset: u64) -> Result<Box<dyn Read + Send>, BaseError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut r: Box<dyn Read + Send> = match compression {
        Compression::None => {
            let mut f = f;
            f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
            return Ok(Box::new(BufReader::with_capacity(1 << 20, f)));
        }
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(BufReader::new(f))),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(BufReader::new(f))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(io_err(path))?),
    };
    let skipped = io::copy(&mut (&mut r).take(offset), &mut io::sink()).map_err(io_err(path))?;
    if skipped != offset {
        return Err(BaseError::Truncated { path: path.to_path_buf(), member: String::new() });
    }
    Ok(r)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn field_str(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

/// `nti`: octal (NUL/space terminated) or GNU base-256.
fn field_num(b: &[u8]) -> Option<i64> {
    if b[0] & 0x80 != 0 {
        let mut n: i64 = 0;
        for &c in &b[1..] {
            n = n.checked_mul(256)?.checked_add(i64::from(c))?;
        }
        return Some(if b[0] == 0xff { -n } else { n });
    }
    let s = field_str(b);
    let s = std::str::from_utf8(&s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(s, 8).ok()
}

fn parse_pax(data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&c| c == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return None;
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&c| c == b'=')?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Some(out)
}

/// Reads every member header of the archive.
fn index(path: &Path, compression: Compression) -> Result<Vec<Member>, BaseError> {
    let mut r = open_at(path, compression, 0)?;
    let mut members = Vec::new();
    let mut offset: u64 = 0;
    let mut block = [0u8; 512];
    let mut pending_pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut global_pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let not_tar = |why: &str| BaseError::NotTar { path: path.to_path_buf(), why: why.to_string() };
    loop {
        let n = read_full(&mut r, &mut block).map_err(io_err(path))?;
        if n == 0 && members.is_empty() && offset == 0 {
            return Err(not_tar("it is empty"));
        }
        if n < 512 {
            return Err(BaseError::Truncated {
                path: path.to_path_buf(),
                member: members.last().map(Member::name_lossy).unwrap_or_default(),
            });
        }
        offset += 512;
        if block.iter().all(|&b| b == 0) {
            if members.is_empty() {
                return Err(not_tar("it has no members"));
            }
            break;
        }
        let stored = field_num(&block[148..156]).ok_or_else(|| not_tar("bad header checksum field"))?;
        let sum: i64 = block[..148].iter().chain(&[b' '; 8]).chain(&block[156..]).map(|&b| i64::from(b)).sum();
        if stored != sum {
            return Err(not_tar(&format!("header checksum mismatch at offset {}", offset - 512)));
        }
        let size = field_num(&block[124..136]).ok_or_else(|| not_tar("bad size field"))?;
        if size < 0 {
            return Err(not_tar("negative member size"));
        }
        let size = size as u64;
        let flag = block[156];
        let data_offset = offset;
        let padded = size + tarheader::data_padding(size) as u64;
        let read_data = |r: &mut Box<dyn Read + Send>| -> Result<Vec<u8>, BaseError> {
            if size > MAX_JSON {
                return Err(not_tar("an extended header is too large"));
            }
            let mut d = vec![0u8; padded as usize];
            if read_full(r, &mut d).map_err(io_err(path))? < d.len() {
                return Err(BaseError::Truncated { path: path.to_path_buf(), member: "extended header".into() });
            }
            d.truncate(size as usize);
            Ok(d)
        };
        match flag {
            b'x' | b'X' => {
                let d = read_data(&mut r)?;
                pending_pax = parse_pax(&d).ok_or_else(|| not_tar("malformed pax header"))?;
                offset += padded;
                continue;
            }
            b'g' => {
                let d = read_data(&mut r)?;
                global_pax = parse_pax(&d).ok_or_else(|| not_tar("malformed pax global header"))?;
                offset += padded;
                continue;
            }
            b'L' => {
                long_name = Some(field_str(&read_data(&mut r)?));
                offset += padded;
                continue;
            }
            b'K' => {
                long_link = Some(field_str(&read_data(&mut r)?));
                offset += padded;
                continue;
            }
            _ => {}
        }
        let is_ustar = &block[257..263] == b"ustar\0";
        let mut name = field_str(&block[0..100]);
        let prefix = if is_ustar { field_str(&block[345..500]) } else { Vec::new() };
        let mut member = Member {
            name: Vec::new(),
            mode: field_num(&block[100..108]).unwrap_or(0) as u32,
            uid: field_num(&block[108..116]).unwrap_or(0) as u64,
            gid: field_num(&block[116..124]).unwrap_or(0) as u64,
            size,
            mtime: field_num(&block[136..148]).unwrap_or(0),
            typeflag: flag,
            linkname: field_str(&block[157..257]),
            uname: field_str(&block[265..297]),
            gname: field_str(&block[297..329]),
            devmajor: field_num(&block[329..337]).unwrap_or(0) as u64,
            devminor: field_num(&block[337..345]).unwrap_or(0) as u64,
            pax: Vec::new(),
            data_offset,
        };
        // tarfile.frombuf: old-style directories, trailing slashes, prefix.
        if member.typeflag == 0 && name.ends_with(b"/") {
            member.typeflag = typeflag::DIRECTORY;
        }
        if member.typeflag == typeflag::DIRECTORY {
            while name.ends_with(b"/") {
                name.pop();
            }
        }
        if !prefix.is_empty() {
            let mut full = prefix;
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
        if let Some(n) = long_name.take() {
            name = n;
        }
        if let Some(l) = long_link.take() {
            member.linkname = l;
        }
        let mut pax = global_pax.clone();
        for (k, v) in std::mem::take(&mut pending_pax) {
            if let Some(slot) = pax.iter_mut().find(|(key, _)| *key == k) {
                slot.1 = v;
            } else {
                pax.push((k, v));
            }
        }
        for (k, v) in &pax {
            let text = || std::str::from_utf8(v).ok().map(str::trim);
            match k.as_slice() {
                b"path" => name = v.clone(),
                b"linkpath" => member.linkname = v.clone(),
                b"uname" => member.uname = v.clone(),
                b"gname" => member.gname = v.clone(),
                b"uid" => member.uid = text().and_then(|t| t.parse().ok()).unwrap_or(member.uid),
                b"gid" => member.gid = text().and_then(|t| t.parse().ok()).unwrap_or(member.gid),
                b"size" => member.size = text().and_then(|t| t.parse().ok()).unwrap_or(member.size),
                // A float in pax; tarfile puts round() (half to even) in the ustar field.
                b"mtime" => {
                    if let Some(f) = text().and_then(|t| t.parse::<f64>().ok()) {
                        member.mtime = f.round_ties_even() as i64;
                    }
                }
                _ => {}
            }
        }
        member.name = name;
        member.pax = pax;
        let padded = member.size + tarheader::data_padding(member.size) as u64;
        let skipped = io::copy(&mut (&mut r).take(padded), &mut io::sink()).map_err(io_err(path))?;
        if skipped < member.size {
            return Err(BaseError::Truncated { path: path.to_path_buf(), member: member.name_lossy() });
        }
        offset += padded;
        members.push(member);
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
            if member.typeflag != typeflag::REGULAR && member.typeflag != 0 {
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
