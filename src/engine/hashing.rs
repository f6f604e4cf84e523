//! The hashing pass: worker threads that learn every layer's digests
//! before the destination needs them.
//!
//! Each store layer is rendered into a sha256 sink (and, for an encoded
//! blob, through the pinned compressor into a second one); base and
//! customisation layers are hashed here only when their blob is re-encoded
//! (an OCI output), since their diff_ids are known.  Results go into
//! [`Slots`], which the destination's thread waits on layer by layer, so the
//! first layer's bytes go out while later layers are still hashed.  Worker
//! scheduling ([`Queue`]) puts the bottom layer first and the largest of the
//! rest next.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::engine::digest::LayerDigest;
use crate::engine::image::Compression;
use crate::engine::origin::{Origin, WrongDigest};
use crate::engine::source;
use crate::output::progress::Progress;
use crate::output::splice::{Changed, Policy};
use crate::plan::{ImagePlan, PlannedLayer};
use crate::read::baseimage::BaseError;
use crate::render::layer::{Identity, LayerError};
use crate::store::walk::{Listing, WalkError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("layer {layer}: {source}")]
    Layer { layer: usize, source: LayerError },
    #[error("layer {layer}: {source}")]
    Walk { layer: usize, source: Arc<WalkError> },
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error("customisation layer {path}: {what}")]
    Customisation { path: PathBuf, what: String },
    #[error(
        "layer {layer} ({paths}) changed between the hashing and streaming passes \
         (sha256:{expected}, {expected_size} bytes, {became}); the output was stopped before it could \
         become an image"
    )]
    DigestMismatch { layer: usize, paths: String, expected: String, expected_size: u64, became: String },
    /// A digest from outside this run (see [`crate::engine::origin`]) that
    /// the layer's bytes do not have, though none of its files changed.
    #[error(transparent)]
    WrongDigest(Box<WrongDigest>),
    #[error("writing the output failed: {0}")]
    Output(#[source] std::io::Error),
    #[error("layer {layer}: writing its blob failed: {what}")]
    Sink { layer: usize, what: String },
    #[error("layer {layer}: compressing failed: {source}")]
    Compress { layer: usize, source: std::io::Error },
    /// A spliced file that changed (found by the writer thread, which does
    /// not know the layer; the path names the culprit).
    #[error(transparent)]
    Spliced(#[from] Changed),
    #[error("internal error in a hashing worker: {0}")]
    Worker(String),
}

impl EngineError {
    /// True when the output (not an input) failed, e.g. a closed pipe.
    pub fn output_error(&self) -> Option<&std::io::Error> {
        match self {
            EngineError::Output(e) | EngineError::Layer { source: LayerError::Output(e), .. } => Some(e),
            _ => None,
        }
    }
}

/// A layer's digests, from the hashing pass or known in advance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// The uncompressed tar's.
    pub digest: LayerDigest,
    /// The encoded blob's, where the blob is encoded ([`Blobs::Encoded`]
    /// with a compression); `None` otherwise.
    pub blob: Option<LayerDigest>,
    /// Files (as listed) whose ctime is before this have the content that
    /// was hashed, so the streaming pass may splice them unread; it reads
    /// and checks the others.  `i128::MAX` when this run's hashing pass read
    /// them right after the listing; from the digest cache, the entry's
    /// [`crate::engine::cache::CachedLayer::unchanged_before_ns`] (`i128::MIN` for a
    /// narHash key or a digest known otherwise).
    pub unchanged_before_ns: i128,
    /// Each file's xxh3-128, which the streaming pass checks file by file;
    /// `None` for a digest known without them, which the streaming pass then
    /// verifies by hashing the whole layer with sha256 again.
    pub files: Option<Vec<u128>>,
    /// Where these digests came from: a mismatch in the streaming pass is
    /// the store's fault for this run's own, the source's for one from
    /// outside.
    pub origin: Origin,
}

/// Hashing-pass results, published by workers, awaited by the writer.
pub(crate) struct Slots {
    results: Mutex<Vec<Option<Result<Hashed, EngineError>>>>,
    ready: Condvar,
    pub(crate) abort: AtomicBool,
}

impl Slots {
    fn put(&self, i: usize, r: Result<Hashed, EngineError>) {
        if r.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        self.results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
        self.ready.notify_all();
    }

    /// Whether layer `i`'s result (or any error) is in.
    pub(crate) fn ready(&self, i: usize) -> bool {
        let g = self.results.lock().unwrap_or_else(|p| p.into_inner());
        g[i].is_some() || g.iter().any(|r| matches!(r, Some(Err(_))))
    }

    /// Waits for layer `i`; returns early with any other layer's error.
    pub(crate) fn wait(&self, i: usize) -> Result<Hashed, EngineError> {
        let mut g = self.results.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g[i].take() {
                return r;
            }
            if let Some(j) = g.iter().position(|r| matches!(r, Some(Err(_)))) {
                return g[j].take().expect("checked").map(|_| unreachable!());
            }
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn first_error(&self) -> Option<EngineError> {
        let mut g = self.results.lock().unwrap_or_else(|p| p.into_inner());
        let j = g.iter().position(|r| matches!(r, Some(Err(_))))?;
        g[j].take().and_then(Result::err)
    }
}

/// What the layer blobs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blobs {
    /// As `stream_layered_image.py` writes them into a docker-archive:
    /// store layers as plain tars, base layers as their members were,
    /// the customisation layer as its `layer.tar`.
    #[default]
    DockerArchive,
    /// Every layer as a plain tar encoded with this compression (OCI).
    Encoded(Compression),
}

/// How to run the two passes.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions<'a> {
    /// Hashing threads (at least one).
    pub jobs: usize,
    pub blobs: Blobs,
    /// Digests already known for some store layers (by plan index), e.g.
    /// from layer digest files: those layers skip the hashing pass.  The
    /// streaming pass still verifies them, so a stale digest stops the output
    /// before it becomes an image instead of producing a lying one; their
    /// [`Hashed::origin`] is what the error then names.
    pub known: Vec<Option<Hashed>>,
    /// Digests looked up once each layer is listed (the digest cache, keyed
    /// by the listing; `--cache-from`'s annotations): a hit skips that
    /// layer's hashing pass, as `known`, and names its [`Hashed::origin`].
    pub lookup: Option<&'a dyn Lookup>,
    /// Splice big files of plain (uncompressed) blobs into the output pipe
    /// instead of copying them (see [`crate::output::splice`]): unread where
    /// their content is known to be what was hashed
    /// ([`Hashed::unchanged_before_ns`]), else read and checked first.  The
    /// output handed to the destination must then end in a
    /// [`crate::output::splice::Splicer`].
    pub splice: Option<Policy>,
    /// Whether the hashing pass compares every entry with the listing
    /// itself: needed when no streaming pass follows (`digest`).
    pub check_in_hashing_pass: bool,
    /// Where the hashing pass also writes each blob it makes, for a
    /// destination that can name a blob once it is written (an OCI layout):
    /// then the streaming pass need not render that layer again.
    pub blob_sink: Option<&'a dyn BlobSink>,
    /// Store path to narHash, where the closure gives them: a store layer
    /// all of whose paths have one gets a content key
    /// ([`crate::engine::image::LayerInfo::key`]).
    pub nar_hashes: Option<&'a std::collections::HashMap<String, String>>,
}

/// A destination's store for blobs written by the hashing pass.
pub trait BlobSink: Sync + std::fmt::Debug {
    /// Where layer `layer`'s blob bytes go as the hashing pass makes them.
    fn open(&self, layer: usize) -> std::io::Result<Box<dyn BlobWriter>>;
}

/// A blob being written by the hashing pass.
pub trait BlobWriter: std::io::Write + Send {
    /// All of the blob is written and its digest is `digest`: keep it.  A
    /// writer dropped without this (the pass failed) keeps nothing.
    fn commit(self: Box<Self>, digest: &LayerDigest) -> std::io::Result<()>;
}

/// Digests known for some layers once they are listed.
pub trait Lookup: Sync + std::fmt::Debug {
    /// The digest of store layer `layer` (a plan index), listed as `listing`, if known.
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed>;
}

impl Blobs {
    pub fn compression(self) -> Compression {
        match self {
            Blobs::DockerArchive => Compression::None,
            Blobs::Encoded(c) => c,
        }
    }

    /// Whether the hashing pass must read layer `layer` (its digests are
    /// not all known without reading it).
    fn must_hash(self, layer: &PlannedLayer) -> bool {
        match (self, layer) {
            (_, PlannedLayer::Store { .. }) => true,
            (Blobs::DockerArchive, _) => false,
            // A base layer's member may be compressed: its plain tar's size
            // is learnt by reading it.
            (Blobs::Encoded(_), PlannedLayer::Base { .. }) => true,
            (Blobs::Encoded(c), PlannedLayer::Customisation(_)) => c != Compression::None,
        }
    }
}

/// Runs the hashing workers over the layers whose digests are not known
/// while `f` (on this thread) consumes their results from the slots.
pub(crate) fn with_hashers<T, E>(
    plan: &ImagePlan,
    opts: &EngineOptions,
    progress: &Progress,
    f: impl FnOnce(&Slots) -> Result<T, E>,
) -> Result<T, E> {
    let known = |i: usize| opts.known.get(i).cloned().flatten();
    let store: Vec<usize> = plan
        .layers
        .iter()
        .enumerate()
        .filter(|(i, l)| opts.blobs.must_hash(l) && known(*i).is_none())
        .map(|(i, _)| i)
        .collect();
    let slots = Slots {
        results: Mutex::new((0..plan.layers.len()).map(|i| known(i).map(Ok)).collect()),
        ready: Condvar::new(),
        abort: AtomicBool::new(false),
    };
    let queue = Queue::new(plan, &store);
    let workers = opts.jobs.clamp(1, store.len().max(1));
    // No streaming pass follows to compare the entries: this pass does.
    let identity = if opts.check_in_hashing_pass { Identity::Checked } else { Identity::Unchecked };

    std::thread::scope(|s| {
        for w in 0..workers {
            let queue = &queue;
            let slots = &slots;
            s.spawn(move || hash_worker(plan, queue, w, (opts, identity), slots, progress));
        }
        let r = f(&slots);
        if r.is_err() {
            slots.abort.store(true, Ordering::Relaxed);
        }
        r
    })
}

/// Which store layer a hashing worker lists and hashes next.  Worker 0
/// takes them in archive order, listing each just before hashing it, so the
/// writer can start as soon as the bottom layer is listed and hashed; the
/// others wait for that first layer (whose readers then have every core),
/// then list every layer (in archive order, ahead of worker 0), then hash
/// the largest layer left first, so a huge layer near the top is not started
/// last (its sha256 cannot be split, and the writer must wait for it).
struct Queue {
    /// Plan indices of the layers to hash, in archive order.
    in_order: Vec<usize>,
    /// The same layers, largest first: sorted once they are all listed.
    by_size: OnceLock<Vec<usize>>,
    taken: Vec<AtomicBool>,
    next_in_order: AtomicUsize,
    next_to_list: AtomicUsize,
    next_by_size: AtomicUsize,
    /// Set once worker 0 is done with its first layer (or has none).
    first_done: Mutex<bool>,
    first_cv: Condvar,
}

/// Marks worker 0's first layer done when dropped, whatever happened to it.
struct FirstDone<'q>(&'q Queue);

impl Drop for FirstDone<'_> {
    fn drop(&mut self) {
        *self.0.first_done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0.first_cv.notify_all();
    }
}

impl Queue {
    fn new(plan: &ImagePlan, store: &[usize]) -> Queue {
        Queue {
            in_order: store.to_vec(),
            by_size: OnceLock::new(),
            taken: (0..plan.layers.len()).map(|_| AtomicBool::new(false)).collect(),
            next_in_order: AtomicUsize::new(0),
            next_to_list: AtomicUsize::new(0),
            next_by_size: AtomicUsize::new(0),
            first_done: Mutex::new(false),
            first_cv: Condvar::new(),
        }
    }

    fn wait_first(&self) {
        let mut g = self.first_done.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            g = self.first_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A layer for a helper worker to list, while any is left.
    fn to_list(&self) -> Option<usize> {
        self.in_order.get(self.next_to_list.fetch_add(1, Ordering::Relaxed)).copied()
    }

    fn take(&self, plan: &ImagePlan, worker: usize) -> Option<usize> {
        let (list, cursor) = if worker == 0 {
            (&self.in_order, &self.next_in_order)
        } else {
            // Every layer is listed or being listed once a helper gets here
            // (`get` waits for a walk another thread is making).
            let by_size = self.by_size.get_or_init(|| {
                let size = |i: usize| match &plan.layers[i] {
                    PlannedLayer::Store { listing, .. } => listing.get(1).map_or(0, |l| l.file_bytes),
                    PlannedLayer::Base { index } => plan.base.as_ref().map_or(0, |b| b.layers[*index].member.size),
                    PlannedLayer::Customisation(c) => c.size,
                };
                let mut v = self.in_order.clone();
                v.sort_by_key(|&i| std::cmp::Reverse(size(i)));
                v
            });
            (by_size, &self.next_by_size)
        };
        loop {
            let k = cursor.fetch_add(1, Ordering::Relaxed);
            let &i = list.get(k)?;
            if !self.taken[i].swap(true, Ordering::Relaxed) {
                return Some(i);
            }
        }
    }
}

/// Worker `worker`'s loop; `identity`: whether it compares entries with the
/// listing (not when a streaming pass, which does, follows); the options'
/// `lookup`: where a layer's digest may be known once it is listed (the cache).
fn hash_worker(
    plan: &ImagePlan,
    queue: &Queue,
    worker: usize,
    (opts, identity): (&EngineOptions, Identity),
    slots: &Slots,
    progress: &Progress,
) {
    let readers = readers(opts.jobs);
    let mut first = (worker == 0).then(|| FirstDone(queue));
    if worker > 0 {
        queue.wait_first();
        while let Some(i) = queue.to_list() {
            if slots.abort.load(Ordering::Relaxed) {
                return;
            }
            if let PlannedLayer::Store { listing, .. } = &plan.layers[i] {
                if let Err(source) = listing.get(readers) {
                    slots.put(i, Err(EngineError::Walk { layer: i + 1, source }));
                    return;
                }
            }
        }
    }
    loop {
        if slots.abort.load(Ordering::Relaxed) {
            return;
        }
        let Some(i) = queue.take(plan, worker) else { return };
        let r =
            std::panic::catch_unwind(AssertUnwindSafe(|| source::hash(plan, i, opts, readers, identity, &slots.abort)))
                .unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into());
                    Err(EngineError::Worker(format!("layer {}: {msg}", i + 1)))
                });
        if let Ok(h) = &r {
            progress.sized(h.digest.size);
        }
        let failed = r.is_err();
        slots.put(i, r);
        first.take();
        if failed {
            return;
        }
    }
}

/// Reader threads per layer ([`crate::render::segment`]): one per core.
pub(crate) fn readers(jobs: usize) -> usize {
    jobs.clamp(1, 8)
}
