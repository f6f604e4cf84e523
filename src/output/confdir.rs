//! A stream configuration instead of an image: what `nixstream image
//! --emit-conf DIR` writes, and what the Nix library's `streamImage` keeps
//! in the store in place of an archive.
//!
//! `DIR/conf.json` is a configuration in the format of nixpkgs'
//! `streamLayeredImage` with the layers already planned (so it names every
//! store path of the image, and Nix keeps them alive with it), and
//! `DIR/customisation/` holds the customisation layer as nixpkgs keeps it:
//! `layer.tar` and its sha256 in `checksum`.  Only that layer (symlinks and
//! small files, as a rule) is stored; `nixstream stream DIR` makes the rest
//! from the store.  Layer digests known in advance (the Nix library's
//! per-layer digest derivations) are kept in `DIR/digests/`, where `stream`
//! takes them as known digests (still checked).

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::render::layer::{write_store_layer, FileCheck, Owner, Scratch};
use crate::render::sink::LayerOut;
use crate::store::walk::{list_contents, Listing};

#[derive(Debug, thiserror::Error)]
pub enum ConfDirError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot list the contents {path}: {source}")]
    Contents { path: PathBuf, source: crate::store::walk::WalkError },
    #[error("cannot archive the customisation layer: {0}")]
    Layer(#[from] crate::render::layer::LayerError),
}

/// The name of the configuration inside the directory.
pub const CONF: &str = "conf.json";
/// Where known layer digests ([`crate::input::layerdigest`]) go inside it.
pub const DIGESTS: &str = "digests";

/// Writes `conf` (a configuration whose `customisation_layer` is replaced
/// here) and the customisation layer made from `contents` (none: an empty
/// layer) into the new or empty directory `dir`.
pub fn write(
    dir: &Path,
    mut conf: serde_json::Value,
    contents: Option<&Path>,
    mtime: i64,
    known: &[crate::input::layerdigest::LayerDigestFile],
) -> Result<PathBuf, ConfDirError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfDirError::Write { path, source }
    };
    let dir = std::path::absolute(dir).map_err(werr(dir))?;
    let cust = dir.join("customisation");
    std::fs::create_dir_all(&cust).map_err(werr(&cust))?;

    let listing = match contents {
        Some(c) => list_contents(c, crate::store::walk::default_threads())
            .map_err(|source| ConfDirError::Contents { path: c.to_path_buf(), source })?,
        None => Listing::default(),
    };
    // The same owner and time the archive stage gives a contents layer.
    let owner = Owner { uid: 0, gid: 0, uname: Vec::new(), gname: Vec::new(), mtime };
    let tar = cust.join("layer.tar");
    let file = std::fs::File::create(&tar).map_err(werr(&tar))?;
    let mut out = Tee { file: std::io::BufWriter::new(file), sha: Sha256::new() };
    write_store_layer(&listing, &owner, &mut out, &mut Scratch::default(), FileCheck::Off, None)?;
    out.file.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).map_err(werr(&tar))?;
    let sum: String = out.sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let checksum = cust.join("checksum");
    std::fs::write(&checksum, sum).map_err(werr(&checksum))?;

    if !known.is_empty() {
        let digests = dir.join(DIGESTS);
        std::fs::create_dir_all(&digests).map_err(werr(&digests))?;
        for (i, k) in known.iter().enumerate() {
            let p = digests.join(format!("{i:04}.json"));
            let text = serde_json::to_vec(k).expect("a layer digest serialises");
            std::fs::write(&p, text).map_err(werr(&p))?;
        }
    }

    conf["customisation_layer"] = serde_json::Value::String(cust.display().to_string());
    let path = dir.join(CONF);
    let mut text = serde_json::to_vec_pretty(&conf).expect("a JSON value serialises");
    text.push(b'\n');
    std::fs::write(&path, text).map_err(werr(&path))?;
    Ok(path)
}

/// The layer tar into a file and into sha256 at once.
struct Tee {
    file: std::io::BufWriter<std::fs::File>,
    sha: Sha256,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl LayerOut for Tee {}
