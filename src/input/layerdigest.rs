//! Layer digests computed elsewhere: what `nixstream layer-digest` writes
//! (in the Nix library, one derivation per layer, so builders hash layers in
//! parallel and binary caches keep the results) and `stream` takes as known
//! digests.
//!
//! A file names the layer it describes by everything that decides the
//! layer's bytes besides the files themselves: its store paths in order and
//! the owner and time settings.  A layer of the image whose paths or
//! settings differ in any way simply does not match and is hashed as usual.
//! A match is never trusted blindly, as a digest-cache hit is not: the file
//! carries each file's xxh3-128, and the streaming pass compares every file
//! it writes with them (a file without them: it hashes the whole layer with
//! sha256 again), stopping before `manifest.json` on any difference, with
//! an error naming the file the digest came from
//! ([`crate::engine::origin::WrongDigest`]).  As
//! with the cache, trust the files as you trust the store they come from: a
//! forged file with matching per-file hashes can name a wrong diff_id.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::digest::LayerDigest;
use crate::engine::hashing::Hashed;
use crate::engine::image::Compression;
use crate::engine::origin::Origin;
use crate::plan::{ImagePlan, PlannedLayer};
use crate::render::layer::Owner;

#[derive(Debug, thiserror::Error)]
pub enum LayerDigestError {
    #[error("cannot read layer digests {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("layer digests {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// One layer's digest, as stored in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDigestFile {
    /// The layer's store paths, in the layer's order.
    pub paths: Vec<String>,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    /// Seconds since the epoch, as the layer's entries carry it.
    pub mtime: i64,
    /// `sha256:` and the uncompressed layer tar's digest.
    pub diff_id: String,
    /// The uncompressed layer tar's length.
    pub size: u64,
    /// Each file's xxh3-128 (32 hex digits), in the layer's order: what the
    /// streaming pass checks file by file, as it checks a digest-cache hit.
    /// Empty: the streaming pass hashes the whole layer with sha256 again.
    #[serde(default)]
    pub files: Vec<String>,
    /// The layer's compressed blobs, for the OCI outputs.
    #[serde(default)]
    pub blobs: Vec<BlobDigest>,
    /// The file this was read from (empty for one made here): what an error
    /// names when the digest turns out wrong for the layer.
    #[serde(skip)]
    pub source: PathBuf,
}

/// A compressed layer blob's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobDigest {
    /// `gzip` or `zstd`.
    pub compression: String,
    /// `sha256:` and the blob's digest.
    pub digest: String,
    pub size: u64,
}

/// How a compression is named in a file.
pub fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

fn parse_digest(text: &str, size: u64) -> Option<LayerDigest> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut sha256 = [0u8; 32];
    for (i, b) in sha256.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(LayerDigest { size, sha256 })
}

impl LayerDigestFile {
    pub fn new(paths: Vec<String>, owner: &Owner, digest: &LayerDigest, files: &[u128]) -> LayerDigestFile {
        LayerDigestFile {
            paths,
            uid: owner.uid,
            gid: owner.gid,
            uname: String::from_utf8_lossy(&owner.uname).into_owned(),
            gname: String::from_utf8_lossy(&owner.gname).into_owned(),
            mtime: owner.mtime,
            diff_id: format!("sha256:{}", digest.hex()),
            size: digest.size,
            files: files.iter().map(|h| format!("{h:032x}")).collect(),
            blobs: Vec::new(),
            source: PathBuf::new(),
        }
    }

    /// Adds the digest of the layer's blob compressed with `c`.
    pub fn add_blob(&mut self, c: Compression, digest: &LayerDigest) {
        self.blobs.push(BlobDigest {
            compression: compression_name(c).to_string(),
            digest: format!("sha256:{}", digest.hex()),
            size: digest.size,
        });
    }

    /// The blob digest for `c`: `Some(None)` for plain layers, `None` when
    /// the file has no blob so compressed.
    fn blob(&self, c: Compression) -> Option<Option<LayerDigest>> {
        if c == Compression::None {
            return Some(None);
        }
        let b = self.blobs.iter().find(|b| b.compression == compression_name(c))?;
        parse_digest(&b.digest, b.size).map(Some)
    }

    fn file_hashes(&self) -> Option<Vec<u128>> {
        self.files.iter().map(|h| if h.len() == 32 { u128::from_str_radix(h, 16).ok() } else { None }).collect()
    }

    fn digest(&self) -> Option<LayerDigest> {
        parse_digest(&self.diff_id, self.size)
    }

    fn describes(&self, paths: &[String], owner: &Owner) -> bool {
        self.paths == paths
            && self.uid == owner.uid
            && self.gid == owner.gid
            && self.uname.as_bytes() == owner.uname
            && self.gname.as_bytes() == owner.gname
            && self.mtime == owner.mtime
    }
}

/// Reads layer digest files: each path a file, or a directory whose
/// `*.json` files are read.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<LayerDigestFile>, LayerDigestError> {
    let mut out = Vec::new();
    for p in paths {
        let read_err = |source| LayerDigestError::Read { path: p.clone(), source };
        if std::fs::metadata(p).map_err(read_err)?.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(read_err)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            files.retain(|f| f.extension().is_some_and(|e| e == "json"));
            files.sort();
            for f in files {
                out.push(read_one(&f)?);
            }
        } else {
            out.push(read_one(p)?);
        }
    }
    Ok(out)
}

fn read_one(path: &Path) -> Result<LayerDigestFile, LayerDigestError> {
    let text = std::fs::read(path).map_err(|source| LayerDigestError::Read { path: path.to_path_buf(), source })?;
    let mut f: LayerDigestFile = serde_json::from_slice(&text)
        .map_err(|e| LayerDigestError::Invalid { path: path.to_path_buf(), what: e.to_string() })?;
    f.source = path.to_path_buf();
    if f.file_hashes().is_none() {
        return Err(LayerDigestError::Invalid {
            path: path.to_path_buf(),
            what: "files must be xxh3-128 hashes of 32 hex digits".into(),
        });
    }
    if let Some(b) = f
        .blobs
        .iter()
        .find(|b| !["gzip", "zstd"].contains(&b.compression.as_str()) || parse_digest(&b.digest, b.size).is_none())
    {
        return Err(LayerDigestError::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "blob {:?} {:?}: expected gzip or zstd and sha256: with 64 hex digits",
                b.compression, b.digest
            ),
        });
    }
    if f.digest().is_none() {
        return Err(LayerDigestError::Invalid {
            path: path.to_path_buf(),
            what: format!("diff_id {:?} is not sha256: and 64 hex digits", f.diff_id),
        });
    }
    Ok(f)
}

/// The known digest of each store layer of `plan` that one of `files`
/// describes exactly (by plan index), for [`crate::engine::hashing::EngineOptions::known`];
/// for blobs compressed with `compression`, only layers whose file has that
/// blob's digest too.
pub fn known_for(plan: &ImagePlan, files: &[LayerDigestFile], compression: Compression) -> Vec<Option<Hashed>> {
    plan.layers
        .iter()
        .map(|l| match l {
            PlannedLayer::Store { paths_text, owner: None, .. } => {
                files.iter().find(|f| f.describes(paths_text, &plan.owner)).and_then(|f| {
                    // Without per-file hashes the streaming pass hashes the
                    // whole layer again and compares; with them it compares
                    // every file's (and reads every file: nothing vouches
                    // for their ctimes).
                    let files = f.file_hashes().filter(|h| !h.is_empty());
                    let blob = f.blob(compression)?;
                    Some(Hashed {
                        digest: f.digest()?,
                        blob,
                        unchanged_before_ns: i128::MIN,
                        files,
                        origin: Origin::DigestFile(f.source.clone()),
                    })
                })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_match() {
        let d = LayerDigest { size: 10240, sha256: [0xab; 32] };
        let f = LayerDigestFile::new(vec!["/nix/store/a".into()], &Owner::test_root(), &d, &[7, u128::MAX]);
        assert_eq!(f.digest(), Some(d));
        assert_eq!(f.file_hashes(), Some(vec![7, u128::MAX]));
        let mut f = f;
        assert_eq!(f.blob(Compression::None), Some(None));
        assert_eq!(f.blob(Compression::Gzip), None, "no gzip blob known");
        let gz = LayerDigest { size: 99, sha256: [1; 32] };
        f.add_blob(Compression::Gzip, &gz);
        assert_eq!(f.blob(Compression::Gzip), Some(Some(gz)));
        assert_eq!(f.blob(Compression::Zstd), None);
        assert!(f.describes(&["/nix/store/a".into()], &Owner::test_root()));
        assert!(!f.describes(&["/nix/store/a".into(), "/nix/store/b".into()], &Owner::test_root()));
        assert!(!f.describes(&["/nix/store/a".into()], &Owner { mtime: 2, ..Owner::test_root() }));
        assert!(!f.describes(&["/nix/store/a".into()], &Owner { uname: b"x".to_vec(), ..Owner::test_root() }));
    }

    #[test]
    fn malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.json");
        std::fs::write(
            &p,
            r#"{"paths":[],"uid":0,"gid":0,"uname":"","gname":"","mtime":1,"diff_id":"sha256:zz","size":1}"#,
        )
        .unwrap();
        let e = read_all(std::slice::from_ref(&p)).unwrap_err().to_string();
        assert!(e.contains("l.json") && e.contains("64 hex digits"), "{e}");
        std::fs::write(&p, r#"{"paths":[]}"#).unwrap();
        let e = read_all(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(e.contains("l.json") && e.contains("missing field"), "{e}");
    }
}
