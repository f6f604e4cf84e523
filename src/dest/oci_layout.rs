//! The OCI image layout directory destination (`--oci-layout DIR`), written
//! as safely as an output file can be.
//!
//! The image is added to the layout: blobs already there are checked (size
//! and sha256; one with other content is an error naming it, never trusted)
//! and not rewritten; a new blob is written under a temporary name in
//! `blobs/sha256/`, synced, and renamed to its digest; `index.json` is
//! replaced atomically last, keeping its other entries and replacing any
//! entry with the same tag.  An interrupted run leaves the layout as it was,
//! plus at most some unreferenced blobs or temporary files.
//!
//! A layout can name a blob once it is written, so [`Layout`] is also the
//! engine's [`BlobSink`]: the hashing pass writes each blob it makes into a
//! temporary file here and renames it to its digest, and the streaming pass
//! then finds it present and renders nothing again (one pass, one
//! compression); only layers whose digests came from the cache are written
//! by a second pass.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::dest::manifest::{self, Format, REF_NAME};
use crate::dest::oci_archive::{manifest_for, OCI_LAYOUT};
use crate::engine::digest::{hex, LayerDigest};
use crate::engine::image::{Descriptor, Image};
use crate::engine::{BlobSink, BlobWriter, EngineError};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("OCI layout {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("OCI layout {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("OCI layout blob {path} does not hold what its name says ({what}); remove it and run again")]
    CorruptBlob { path: PathBuf, what: String },
}

impl crate::engine::cache_use::EngineCause for LayoutError {
    fn engine_error(&self) -> Option<&EngineError> {
        match self {
            LayoutError::Engine(e) => Some(e),
            _ => None,
        }
    }
}

/// What a layout write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutSummary {
    pub blobs_written: usize,
    pub blobs_present: usize,
    pub manifest_digest: String,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io { path: path.to_path_buf(), source }
}

/// An OCI layout directory, opened for writing.
#[derive(Debug)]
pub struct Layout {
    dir: PathBuf,
    blobs: PathBuf,
    /// Blobs this run wrote and hashed as it wrote them (no need to read
    /// them back to check them).
    written: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl Layout {
    /// Opens the layout at `dir`, creating it (and its `oci-layout` file)
    /// if missing.
    pub fn open(dir: &Path) -> Result<Layout, LayoutError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let layout_file = dir.join("oci-layout");
        match fs::read(&layout_file) {
            Ok(bytes) => {
                let v: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| LayoutError::Invalid { path: layout_file.clone(), what: format!("not JSON: {e}") })?;
                if v.get("imageLayoutVersion").and_then(Value::as_str) != Some("1.0.0") {
                    return Err(LayoutError::Invalid {
                        path: layout_file,
                        what: "imageLayoutVersion is not \"1.0.0\"".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => replace_file(&layout_file, OCI_LAYOUT)?,
            Err(e) => return Err(io_err(&layout_file)(e)),
        }
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        Ok(Layout { dir: dir.to_path_buf(), blobs, written: Default::default() })
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the blob `d` is in the layout (checked, unless this run wrote it).
    fn has(&self, d: &Descriptor) -> Result<bool, LayoutError> {
        if self.written().contains(&d.digest) {
            return Ok(true);
        }
        present(&self.blobs.join(hex(&d.digest)), d)
    }

    /// Writes `image` into the layout, tagged with its repo_tag.
    pub fn write(&self, image: &dyn Image) -> Result<LayoutSummary, LayoutError> {
        let mut summary = LayoutSummary::default();
        for i in 0..image.layer_count() {
            let d = image.layer(i)?.blob;
            if self.has(&d)? {
                summary.blobs_present += 1;
                continue;
            }
            let path = self.blobs.join(hex(&d.digest));
            write_blob(&self.blobs, &path, |w| image.write_layer(i, w).map_err(LayoutError::from))?;
            summary.blobs_written += 1;
        }
        let (manifest, config) = manifest_for(image)?;
        let cd = manifest::config_descriptor(Format::Oci, &config);
        let md = Descriptor {
            media_type: manifest::OCI_MANIFEST.into(),
            ..manifest::config_descriptor(Format::Oci, &manifest)
        };
        for (d, bytes) in [(&cd, &config), (&md, &manifest)] {
            if self.has(d)? {
                summary.blobs_present += 1;
            } else {
                let path = self.blobs.join(hex(&d.digest));
                write_blob(&self.blobs, &path, |w| w.write_all(bytes).map_err(io_err(&path)))?;
                summary.blobs_written += 1;
            }
        }
        // Blobs the hashing pass wrote count as written, not as present.
        let by_hashing = self.written().len();
        summary.blobs_present -= by_hashing.min(summary.blobs_present);
        summary.blobs_written += by_hashing;
        update_index(&self.dir, &md, image.repo_tag())?;
        sync_dir(&self.blobs)?;
        sync_dir(&self.dir)?;
        summary.manifest_digest = md.digest_ref();
        Ok(summary)
    }
}

/// A blob the hashing pass writes into the layout.
struct TempBlob {
    file: BufWriter<tempfile::NamedTempFile>,
    blobs: PathBuf,
    written: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl Write for TempBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter for TempBlob {
    fn commit(self: Box<Self>, digest: &LayerDigest) -> io::Result<()> {
        let TempBlob { file, blobs, written } = *self;
        let path = blobs.join(hex(&digest.sha256));
        let d = Descriptor { media_type: String::new(), digest: digest.sha256, size: digest.size };
        // Already there: checked, and the new copy dropped.
        if present(&path, &d).map_err(|e| io::Error::other(e.to_string()))? {
            return Ok(());
        }
        let tmp = file.into_inner().map_err(|e| e.into_error())?;
        keep(tmp, &path)?;
        written.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.sha256);
        Ok(())
    }
}

impl BlobSink for Layout {
    fn open(&self, _layer: usize) -> io::Result<Box<dyn BlobWriter>> {
        let tmp = tempfile::Builder::new().prefix(".nixstream-").tempfile_in(&self.blobs)?;
        Ok(Box::new(TempBlob {
            file: BufWriter::with_capacity(1 << 20, tmp),
            blobs: self.blobs.clone(),
            written: Arc::clone(&self.written),
        }))
    }
}

/// Whether a blob is at `path` with `d`'s size and digest; one with other
/// content is an error.
fn present(path: &Path, d: &Descriptor) -> Result<bool, LayoutError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    let md = f.metadata().map_err(io_err(path))?;
    if !md.is_file() {
        return Err(LayoutError::CorruptBlob { path: path.to_path_buf(), what: "not a regular file".into() });
    }
    if md.len() != d.size {
        return Err(LayoutError::CorruptBlob {
            path: path.to_path_buf(),
            what: format!("{} bytes, expected {}", md.len(), d.size),
        });
    }
    let mut h = Sha256::new();
    let mut r = io::BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let actual: [u8; 32] = h.finalize().into();
    if actual != d.digest {
        return Err(LayoutError::CorruptBlob {
            path: path.to_path_buf(),
            what: format!("its sha256 is {}", hex(&actual)),
        });
    }
    Ok(true)
}

/// Writes a blob under a temporary name in `dir`, syncs it and renames it
/// to `path`; the temporary file is removed on failure.
fn write_blob(
    dir: &Path,
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), LayoutError>,
) -> Result<(), LayoutError> {
    let tmp = tempfile::Builder::new().prefix(".nixstream-").tempfile_in(dir).map_err(io_err(dir))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut w)?;
    let tmp = w.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    keep(tmp, path).map_err(io_err(path))
}

/// Makes a written temporary file `path`: readable by all (as any file the
/// user writes; a temporary file is 0600), synced, renamed.
fn keep(tmp: tempfile::NamedTempFile, path: &Path) -> io::Result<()> {
    tmp.as_file().set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Replaces `path` with `bytes` atomically.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    write_blob(dir, path, |w| w.write_all(bytes).map_err(io_err(path)))
}

fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// `index.json` with `manifest` tagged `tag` added (an entry with the same
/// tag replaced), replaced atomically.
fn update_index(dir: &Path, md: &Descriptor, tag: &str) -> Result<(), LayoutError> {
    let path = dir.join("index.json");
    let mut entries: Vec<Value> = match fs::read(&path) {
        Ok(bytes) => {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| LayoutError::Invalid { path: path.clone(), what: format!("not JSON: {e}") })?;
            v.get("manifests")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| LayoutError::Invalid { path: path.clone(), what: "no \"manifests\" list".into() })?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&path)(e)),
    };
    // The tag's entry is replaced where it stands (any other entry with
    // that tag dropped); a new tag goes last.
    let ours = manifest::descriptor_json(md, &[(REF_NAME.to_string(), tag.to_string())]);
    let tagged =
        |m: &Value| m.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str) == Some(tag);
    match entries.iter().position(tagged) {
        Some(at) => {
            entries[at] = ours;
            let mut seen = false;
            entries.retain(|m| !tagged(m) || !std::mem::replace(&mut seen, true));
        }
        None => entries.push(ours),
    }
    let mut index = serde_json::Map::new();
    index.insert("schemaVersion".into(), serde_json::json!(2));
    index.insert("mediaType".into(), Value::String(manifest::OCI_INDEX.into()));
    index.insert("manifests".into(), Value::Array(entries));
    let bytes = serde_json::to_vec(&Value::Object(index)).expect("JSON values serialise");
    replace_file(&path, &bytes)
}
