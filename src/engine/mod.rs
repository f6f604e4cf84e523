//! The image engine: one value, [`Engine`], that any destination consumes
//! through [`image::Image`].
//!
//! [`run`] starts the hashing pass ([`hashing`]: worker threads that learn
//! every layer's digests, plain and encoded) and hands the destination an
//! [`Engine`] on the calling thread.  The destination asks for each layer's
//! digests (waiting only for that layer), then for its bytes, which the
//! streaming pass renders again from the store through the same producer
//! ([`source`]) and checks against those digests, and last for the config.
//! What the destination writes and in which layout is its own business
//! ([`crate::dest`]); nothing here knows about member names or manifests.

pub mod cache;
pub mod cache_use;
pub mod compress;
pub mod config;
pub mod digest;
pub mod hashing;
pub mod image;
pub mod origin;
pub mod source;

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use crate::engine::digest::LayerDigest;
use crate::engine::hashing::{with_hashers, Slots};
use crate::engine::image::{Compression, Descriptor, Image, LayerInfo};
use crate::output::progress::Progress;
use crate::plan::{ImagePlan, PlannedLayer};
use crate::render::sink::LayerOut;

pub use crate::engine::hashing::{BlobSink, BlobWriter, Blobs, EngineError, EngineOptions, Hashed, Lookup};
pub use crate::engine::origin::Origin;

/// What a run learnt, for the digest cache and for reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Each layer's plain tar digest (for a base layer in a docker-archive,
    /// its member's size with its diff_id).
    pub digests: Vec<LayerDigest>,
    /// Each layer's encoded blob digest, where blobs are compressed and the
    /// layer's digests were learnt.
    pub blobs: Vec<Option<LayerDigest>>,
    /// Per store layer, each file's xxh3-128 as confirmed: by the streaming
    /// pass (by content; a file spliced unread, by its metadata being
    /// unchanged since the listing that preceded the hash), or by a hashing
    /// pass that checked entries itself.  What the digest cache keeps.
    pub files: Vec<Option<Vec<u128>>>,
    /// Layers whose digests came from the lookup (the cache) or `known`.
    pub layers_known: usize,
    /// Layers whose bytes a destination had written.
    pub layers_written: usize,
    /// The config bytes, when the destination asked for them.
    pub config: Option<Vec<u8>>,
}

/// The image as the engine makes it; see the module documentation.
pub struct Engine<'a> {
    plan: &'a ImagePlan,
    opts: &'a EngineOptions<'a>,
    slots: &'a Slots,
    progress: &'a Progress,
    hashed: Vec<OnceLock<Hashed>>,
    confirmed: Mutex<Vec<Option<Vec<u128>>>>,
    written: Mutex<Vec<bool>>,
    config: OnceLock<Vec<u8>>,
    /// Each layer's content key, made once (it hashes the whole listing).
    keys: Vec<OnceLock<Option<String>>>,
}

/// Runs the hashing pass while `dest` consumes the image on this thread.
/// Any error stops both; the hashing workers are joined before it returns.
pub fn run<T, E>(
    plan: &ImagePlan,
    opts: &EngineOptions,
    progress: &Progress,
    dest: impl FnOnce(&Engine) -> Result<T, E>,
) -> Result<(T, Summary), E> {
    with_hashers(plan, opts, progress, |slots| {
        let n = plan.layers.len();
        let engine = Engine {
            plan,
            opts,
            slots,
            progress,
            hashed: (0..n).map(|_| OnceLock::new()).collect(),
            confirmed: Mutex::new(vec![None; n]),
            written: Mutex::new(vec![false; n]),
            config: OnceLock::new(),
            keys: (0..n).map(|_| OnceLock::new()).collect(),
        };
        let t = dest(&engine)?;
        Ok((t, engine.summary()))
    })
}

/// The hashing pass alone (`nixstream digest`): every layer's digests and
/// the config, nothing written.  Entries are compared with the listing in
/// this pass, since no streaming pass follows.
pub fn hash_only(plan: &ImagePlan, opts: &EngineOptions, progress: &Progress) -> Result<Summary, EngineError> {
    let opts = EngineOptions { check_in_hashing_pass: true, ..opts.clone() };
    let ((), summary) = run(plan, &opts, progress, |engine| {
        for i in 0..plan.layers.len() {
            engine.hashed(i)?;
            progress.layer_done(i + 1, plan.layers.len());
        }
        engine.config().map(|_| ())
    })?;
    Ok(summary)
}

impl Engine<'_> {
    pub fn plan(&self) -> &ImagePlan {
        self.plan
    }

    pub fn progress(&self) -> &Progress {
        self.progress
    }

    pub fn blobs(&self) -> Blobs {
        self.opts.blobs
    }

    /// Whether layer `i`'s digests are in (or the run has failed), so that
    /// asking for them will not wait.
    pub fn ready(&self, i: usize) -> bool {
        self.known_digests(i).is_some() || self.hashed[i].get().is_some() || self.slots.ready(i)
    }

    /// Digests known from the plan alone, without a hashing pass.
    fn known_digests(&self, i: usize) -> Option<Hashed> {
        let known = |digest: LayerDigest| Hashed {
            digest,
            blob: None,
            unchanged_before_ns: i128::MIN,
            files: None,
            origin: origin::Origin::ThisRun,
        };
        match (self.opts.blobs, &self.plan.layers[i]) {
            (Blobs::DockerArchive, PlannedLayer::Base { index }) => {
                let bl = &self.plan.base.as_ref().expect("base layer without base").layers[*index];
                Some(known(LayerDigest { size: bl.member.size, sha256: bl.diff_id }))
            }
            (Blobs::DockerArchive | Blobs::Encoded(Compression::None), PlannedLayer::Customisation(c)) => {
                Some(known(LayerDigest { size: c.size, sha256: c.digest }))
            }
            _ => None,
        }
    }

    /// Layer `i`'s digests, waiting for the hashing pass.
    pub fn hashed(&self, i: usize) -> Result<&Hashed, EngineError> {
        if let Some(h) = self.hashed[i].get() {
            return Ok(h);
        }
        let h = match self.known_digests(i) {
            Some(h) => h,
            None => self.slots.wait(i)?,
        };
        Ok(self.hashed[i].get_or_init(|| h))
    }

    /// Every layer's diff_id, in order (waits for them all).
    pub fn diff_ids(&self) -> Result<Vec<[u8; 32]>, EngineError> {
        (0..self.plan.layers.len()).map(|i| Ok(self.hashed(i)?.digest.sha256)).collect()
    }

    /// Layer `i`'s blob into `out`, an output that may take files by
    /// reference ([`LayerOut`]): what the tar destinations use to splice.
    pub fn write_layer_out(&self, i: usize, out: &mut dyn LayerOut) -> Result<(), EngineError> {
        let h = self.hashed(i)?;
        self.progress.line(|| source::describe(self.plan, i));
        let stream = source::Stream {
            blobs: self.opts.blobs,
            readers: hashing::readers(self.opts.jobs),
            splice: self.opts.splice,
            slots: self.slots,
        };
        let files = source::write_blob(self.plan, i, h, out, &stream)?;
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())[i] = files;
        self.written.lock().unwrap_or_else(|p| p.into_inner())[i] = true;
        if let Some(e) = self.slots.first_error() {
            return Err(e);
        }
        Ok(())
    }

    /// Layer `i`'s content key ([`content_key`]), where it has one.
    pub fn content_key(&self, i: usize) -> Option<String> {
        self.keys[i]
            .get_or_init(|| {
                let listing = match &self.plan.layers[i] {
                    PlannedLayer::Store { listing, .. } => listing.get(hashing::readers(self.opts.jobs)).ok()?,
                    _ => return None,
                };
                content_key(self.plan, i, listing, self.opts.nar_hashes?, self.compression())
            })
            .clone()
    }

    fn summary(self) -> Summary {
        let n = self.plan.layers.len();
        let mut files = self.confirmed.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut digests = Vec::with_capacity(n);
        let mut blobs = Vec::with_capacity(n);
        let mut layers_known = 0;
        for (i, h) in self.hashed.into_iter().enumerate() {
            let h = h.into_inner();
            if let Some(h) = &h {
                if h.unchanged_before_ns != i128::MAX && matches!(self.plan.layers[i], PlannedLayer::Store { .. }) {
                    layers_known += 1;
                }
                if self.opts.check_in_hashing_pass && files[i].is_none() {
                    files[i] = h.files.clone();
                }
            }
            digests.push(h.as_ref().map_or(LayerDigest { size: 0, sha256: [0; 32] }, |h| h.digest));
            blobs.push(h.and_then(|h| h.blob));
        }
        let layers_written =
            self.written.into_inner().unwrap_or_else(|p| p.into_inner()).iter().filter(|w| **w).count();
        Summary { digests, blobs, files, layers_known, layers_written, config: self.config.into_inner() }
    }
}

/// Store layer `i`'s content key, when every one of its paths has a narHash
/// in `nar_hashes`: the digest cache's key of its blob (the listing's names,
/// modes, sizes and links, the owner settings, the narHashes, this version
/// and the compressor's identity), as `sha256:<hex>`.  It decides the blob's
/// bytes without any file being read, so a registry annotation carrying it
/// names the blob a later push of the same layer would make.
pub fn content_key(
    plan: &ImagePlan,
    i: usize,
    listing: &crate::store::walk::Listing,
    nar_hashes: &std::collections::HashMap<String, String>,
    compression: Compression,
) -> Option<String> {
    let PlannedLayer::Store { paths_text, owner, .. } = &plan.layers[i] else { return None };
    let hashes: Vec<(&str, &str)> =
        paths_text.iter().map(|p| nar_hashes.get(p).map(|h| (p.as_str(), h.as_str()))).collect::<Option<_>>()?;
    let key = cache::layer_key(listing, owner.as_ref().unwrap_or(&plan.owner), Some(&hashes));
    Some(format!("sha256:{}", digest::hex(&cache::blob_key(&key, compression))))
}

/// A plain `Write` as a [`LayerOut`] that takes no files by reference.
struct PlainOut<'w>(&'w mut dyn Write);

impl Write for PlainOut<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl LayerOut for PlainOut<'_> {}

impl Image for Engine<'_> {
    fn layer_count(&self) -> usize {
        self.plan.layers.len()
    }

    fn compression(&self) -> Compression {
        self.opts.blobs.compression()
    }

    fn layer(&self, i: usize) -> Result<LayerInfo, EngineError> {
        let h = self.hashed(i)?;
        let c = self.compression();
        let blob = match c {
            Compression::None => h.digest,
            _ => h.blob.expect("an encoded layer's blob digest"),
        };
        Ok(LayerInfo {
            diff_id: h.digest,
            blob: Descriptor { media_type: c.oci_layer_media_type().into(), digest: blob.sha256, size: blob.size },
            key: self.content_key(i),
        })
    }

    fn write_layer(&self, i: usize, out: &mut dyn Write) -> Result<(), EngineError> {
        self.write_layer_out(i, &mut PlainOut(out))
    }

    fn config(&self) -> Result<Vec<u8>, EngineError> {
        if let Some(c) = self.config.get() {
            return Ok(c.clone());
        }
        let diff_ids = self.diff_ids()?;
        Ok(self.config.get_or_init(|| config::config_json(self.plan, &diff_ids)).clone())
    }

    fn repo_tag(&self) -> &str {
        &self.plan.repo_tag
    }
}
