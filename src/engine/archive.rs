//! The outer `docker save` archive: many hashers, one ordered writer.
//!
//! Worker threads run the hashing pass (each store layer rendered into a
//! [`HashSink`]) while this module's writer, on the calling thread, emits the
//! archive in order as soon as each layer's digest is known: base layers
//! (copied through, verified against their diff_ids), store layers (rendered
//! again through a [`VerifyingWriter`]), the customisation layer (copied,
//! verified against its checksum file), the config and, last, manifest.json.
//! Any failure stops the writer before manifest.json, so what reached the
//! output cannot be loaded as an image.  The member headers are those of
//! `stream_layered_image.py`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::compat::pyjson::repr_str_list;
use crate::compat::tarheader::{self, Header};
use crate::engine::config::{image_meta, ImageMeta};
use crate::engine::digest::{hex, HashSink, LayerDigest, OverrunError, VerifyingWriter};
use crate::output::progress::Progress;
use crate::output::splice::{Changed, FileRef, Policy, Splicer};
use crate::output::writer;
use crate::plan::{Customisation, ImagePlan, PlannedLayer};
use crate::read::baseimage::BaseError;
use crate::render::layer::{FileCheck, Identity, LayerError, LayerOut, Owner};
use crate::render::segment::render_layer;
use crate::store::walk::{Listing, WalkError};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
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
         (sha256:{expected}, {expected_size} bytes, became sha256:{actual}, {actual_size} bytes); \
         the archive was stopped before manifest.json"
    )]
    DigestMismatch {
        layer: usize,
        paths: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("writing the output failed: {0}")]
    Output(#[source] io::Error),
    /// A spliced file that changed (found by the writer thread, which does
    /// not know the layer; the path names the culprit).
    #[error(transparent)]
    Spliced(#[from] Changed),
    #[error("internal error in a hashing worker: {0}")]
    Worker(String),
}

impl ArchiveError {
    /// True when the output (not an input) failed, e.g. a closed pipe.
    pub fn output_error(&self) -> Option<&io::Error> {
        match self {
            ArchiveError::Output(e) | ArchiveError::Layer { source: LayerError::Output(e), .. } => Some(e),
            _ => None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Summary {
    pub meta: ImageMeta,
    pub digests: Vec<LayerDigest>,
    pub bytes: u64,
    /// For each store layer (by plan index), each file's xxh3-128 as the
    /// streaming pass confirmed them (by content; a file spliced unread, by
    /// its metadata being unchanged since the listing that preceded the
    /// hash): what the digest cache keeps.
    pub files: Vec<Option<Vec<u128>>>,
}

/// A store layer's digest, from the hashing pass or known in advance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub digest: LayerDigest,
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
}

/// Hashing-pass results, published by workers, awaited by the writer.
struct Slots {
    results: Mutex<Vec<Option<Result<Hashed, ArchiveError>>>>,
    ready: Condvar,
    abort: AtomicBool,
}

impl Slots {
    fn put(&self, i: usize, r: Result<Hashed, ArchiveError>) {
        if r.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        self.results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
        self.ready.notify_all();
    }

    /// Whether layer `i`'s result (or any error) is in.
    fn ready(&self, i: usize) -> bool {
        let g = self.results.lock().unwrap_or_else(|p| p.into_inner());
        g[i].is_some() || g.iter().any(|r| matches!(r, Some(Err(_))))
    }

    /// Waits for layer `i`; returns early with any other layer's error.
    fn wait(&self, i: usize) -> Result<Hashed, ArchiveError> {
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

    fn first_error(&self) -> Option<ArchiveError> {
        let mut g = self.results.lock().unwrap_or_else(|p| p.into_inner());
        let j = g.iter().position(|r| matches!(r, Some(Err(_))))?;
        g[j].take().and_then(Result::err)
    }
}

/// The outer tar, counting its offset.
struct Outer<'p, W: Write> {
    out: W,
    offset: u64,
    progress: &'p Progress,
    header: Vec<u8>,
}

impl<W: Write> Write for Outer<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.offset += buf.len() as u64;
        self.progress.wrote(buf.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: LayerOut> LayerOut for Outer<'_, W> {
    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        let len = file.len;
        self.out.pass_file(file)?;
        self.offset += len;
        self.progress.wrote(len);
        Ok(())
    }
}

impl<W: Write> Outer<'_, W> {
    fn header(&mut self, h: &Header<'_>) -> Result<(), ArchiveError> {
        let mut buf = std::mem::take(&mut self.header);
        buf.clear();
        tarheader::encode(h, &mut buf);
        let r = self.write_all(&buf).map_err(ArchiveError::Output);
        self.header = buf;
        r
    }

    fn pad(&mut self, size: u64) -> Result<(), ArchiveError> {
        let zeros = [0u8; tarheader::BLOCK];
        self.write_all(&zeros[..tarheader::data_padding(size)]).map_err(ArchiveError::Output)
    }

    fn member(&mut self, name: &str, data: &[u8], mtime: i64) -> Result<(), ArchiveError> {
        self.header(&Header::plain_file(name.as_bytes(), data.len() as u64, mtime))?;
        self.write_all(data).map_err(ArchiveError::Output)?;
        self.pad(data.len() as u64)
    }
}

/// How to run the two passes.
#[derive(Debug, Clone, Default)]
pub struct ArchiveOptions<'a> {
    /// Hashing threads (at least one).
    pub jobs: usize,
    /// Digests already known for some store layers (by plan index), e.g.
    /// from a cache: those layers skip the hashing pass.  The streaming pass
    /// still verifies them, so a stale digest stops the archive before
    /// manifest.json instead of producing a lying one.
    pub known: Vec<Option<Hashed>>,
    /// Digests looked up once each layer is listed (the digest cache, keyed
    /// by the listing): a hit skips that layer's hashing pass, as `known`.
    pub lookup: Option<&'a dyn Lookup>,
    /// Splice big files into this pipe instead of copying them (see
    /// [`crate::output::splice`]): unread where their content is known to be what
    /// was hashed ([`Hashed::unchanged_before_ns`]), else read and checked
    /// first.
    pub splice: Option<SpliceInto>,
}

/// Digests known for some layers once they are listed.
pub trait Lookup: Sync + std::fmt::Debug {
    /// The digest of store layer `layer` (a plan index), listed as `listing`, if known.
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed>;
}

/// The pipe the archive goes into, which `out` writes to unbuffered and
/// uncompressed, and which files to splice into it.
#[derive(Debug, Clone, Copy)]
pub struct SpliceInto {
    pub pipe: std::os::fd::RawFd,
    pub policy: Policy,
}

/// Hashes and streams the image described by `plan` into `out`, which a
/// writer thread of its own owns (see [`crate::output::writer`]).
pub fn write_archive<W: Write + Send>(
    plan: &ImagePlan,
    out: W,
    opts: &ArchiveOptions,
    progress: &Progress,
) -> Result<Summary, ArchiveError> {
    let (chunks, full, empty) = writer::channel();
    let splicer = opts.splice.map(|s| Splicer::new(s.pipe));
    let splice = opts.splice.map(|s| s.policy);
    std::thread::scope(|s| {
        let w = s.spawn(move || writer::run(out, full, empty, splicer));
        let streamed = with_hashers(plan, opts, Identity::Unchecked, progress, |slots| {
            stream(plan, chunks, slots, (readers(opts.jobs), splice), progress)
        });
        let written = w.join().unwrap_or_else(|_| Err(io::Error::other("the output writer panicked")));
        match (streamed, written) {
            // The writer's own error (a closed pipe, a full disk, a spliced
            // file that changed) is the cause; the streaming pass only saw
            // the writer go.
            (_, Err(e)) => Err(match e.downcast::<Changed>() {
                Ok(changed) => ArchiveError::Spliced(changed),
                Err(e) => ArchiveError::Output(e),
            }),
            (streamed, Ok(_)) => streamed,
        }
    })
}

/// The hashing pass alone (`nixstream digest`): every layer's digest and the
/// image's config and manifest, with nothing written.  Base layers count at
/// their declared diff_id and the customisation layer at its checksum file;
/// the streaming pass is what verifies those.
pub fn hash_only(plan: &ImagePlan, opts: &ArchiveOptions, progress: &Progress) -> Result<Summary, ArchiveError> {
    // No streaming pass follows to compare the entries: this pass does.
    with_hashers(plan, opts, Identity::Checked, progress, |slots| {
        let mut digests = Vec::with_capacity(plan.layers.len());
        let mut files = vec![None; plan.layers.len()];
        for (i, layer) in plan.layers.iter().enumerate() {
            digests.push(match layer {
                PlannedLayer::Base { index } => {
                    let bl = &plan.base.as_ref().expect("base layer without base").layers[*index];
                    LayerDigest { size: bl.member.size, sha256: bl.diff_id }
                }
                PlannedLayer::Store { .. } => {
                    let h = slots.wait(i)?;
                    files[i] = h.files;
                    h.digest
                }
                PlannedLayer::Customisation(c) => LayerDigest { size: c.size, sha256: c.digest },
            });
            progress.layer_done(i + 1, plan.layers.len());
        }
        let diff_ids: Vec<[u8; 32]> = digests.iter().map(|d| d.sha256).collect();
        Ok(Summary { meta: image_meta(plan, &diff_ids), digests, bytes: 0, files })
    })
}

/// Runs the hashing workers over the store layers not in `opts.known`
/// while `f` (on this thread) consumes their results from the slots.
fn with_hashers<T>(
    plan: &ImagePlan,
    opts: &ArchiveOptions,
    identity: Identity,
    progress: &Progress,
    f: impl FnOnce(&Slots) -> Result<T, ArchiveError>,
) -> Result<T, ArchiveError> {
    let known = |i: usize| opts.known.get(i).cloned().flatten();
    let store: Vec<usize> = plan
        .layers
        .iter()
        .enumerate()
        .filter(|(i, l)| matches!(l, PlannedLayer::Store { .. }) && known(*i).is_none())
        .map(|(i, _)| i)
        .collect();
    let slots = Slots {
        results: Mutex::new((0..plan.layers.len()).map(|i| known(i).map(Ok)).collect()),
        ready: Condvar::new(),
        abort: AtomicBool::new(false),
    };
    let queue = Queue::new(plan, &store);
    let workers = opts.jobs.clamp(1, store.len().max(1));

    std::thread::scope(|s| {
        for w in 0..workers {
            let queue = &queue;
            let slots = &slots;
            s.spawn(move || hash_worker(plan, queue, w, (readers(opts.jobs), identity, opts.lookup), slots, progress));
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
                    _ => 0,
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
/// listing (not when a streaming pass, which does, follows); `lookup`:
/// where a layer's digest may be known once it is listed (the cache).
fn hash_worker(
    plan: &ImagePlan,
    queue: &Queue,
    worker: usize,
    (readers, identity, lookup): (usize, Identity, Option<&dyn Lookup>),
    slots: &Slots,
    progress: &Progress,
) {
    let listing = |i: usize| match &plan.layers[i] {
        PlannedLayer::Store { listing, .. } => {
            listing.get(readers).map_err(|source| ArchiveError::Walk { layer: i + 1, source })
        }
        _ => unreachable!("store index"),
    };
    let mut first = (worker == 0).then(|| FirstDone(queue));
    if worker > 0 {
        queue.wait_first();
        while let Some(i) = queue.to_list() {
            if slots.abort.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = listing(i) {
                slots.put(i, Err(e));
                return;
            }
        }
    }
    loop {
        if slots.abort.load(Ordering::Relaxed) {
            return;
        }
        let Some(i) = queue.take(plan, worker) else { return };
        let PlannedLayer::Store { owner, .. } = &plan.layers[i] else { unreachable!("store index") };
        let owner = owner.as_ref().unwrap_or(&plan.owner);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let listed = listing(i)?;
            if let Some(hit) = lookup.and_then(|l| l.lookup(i, listed)) {
                return Ok(hit);
            }
            hash_layer(listed, owner, readers, identity, &slots.abort)
                .map_err(|source| ArchiveError::Layer { layer: i + 1, source })
        }))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(ArchiveError::Worker(format!("layer {}: {msg}", i + 1)))
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

/// Hashes one store layer: `readers` threads open, read and check its files
/// ([`render_layer`]) while this thread runs sha256 over their output in
/// order, so a layer takes the longer of the two rather than their sum
/// (what bounds an image dominated by one big store path).
fn hash_layer(
    listing: &Listing,
    owner: &Owner,
    readers: usize,
    identity: Identity,
    abort: &AtomicBool,
) -> Result<Hashed, LayerError> {
    let mut files = Vec::new();
    let mut sink = HashSink::new();
    render_layer(listing, owner, &mut sink, FileCheck::Record(&mut files, identity), Some(abort), readers)?;
    Ok(Hashed { digest: sink.finish(), unchanged_before_ns: i128::MAX, files: Some(files) })
}

/// Reader threads per layer ([`crate::render::segment`]): one per core.
fn readers(jobs: usize) -> usize {
    jobs.clamp(1, 8)
}

/// The streaming pass into the writer's chunks; `splice`: which files go in
/// by reference.
fn stream(
    plan: &ImagePlan,
    out: writer::Chunks,
    slots: &Slots,
    (readers, splice): (usize, Option<Policy>),
    progress: &Progress,
) -> Result<Summary, ArchiveError> {
    let mtime = plan.owner.mtime;
    let mut outer = Outer { out, offset: 0, progress, header: Vec::with_capacity(2048) };
    let mut digests = Vec::with_capacity(plan.layers.len());
    let mut confirmed = vec![None; plan.layers.len()];
    let total = plan.layers.len();
    if plan.base.is_none() {
        progress.line(|| "No 'fromImage' provided".into());
    }
    for (i, layer) in plan.layers.iter().enumerate() {
        let num = i + 1;
        let digest = match layer {
            PlannedLayer::Base { index } => {
                let base = plan.base.as_ref().expect("base layer without base");
                let bl = &base.layers[*index];
                progress.line(|| format!("Adding base layer {} from {}", index + 1, bl.member.name_lossy()));
                progress.sized(bl.member.size);
                outer.header(&bl.member.header())?;
                base.copy_layer(*index, &mut outer).map_err(ArchiveError::Output)??;
                outer.pad(bl.member.size)?;
                LayerDigest { size: bl.member.size, sha256: bl.diff_id }
            }
            PlannedLayer::Store { paths_text, listing, owner } => {
                let owner = owner.as_ref().unwrap_or(&plan.owner);
                progress.line(|| format!("Creating layer {num} from paths: {}", repr_str_list(paths_text)));
                if !slots.ready(i) {
                    // Let the consumer have everything so far while we wait.
                    outer.flush().map_err(ArchiveError::Output)?;
                }
                let Hashed { digest: d, files, unchanged_before_ns } = slots.wait(i)?;
                // Listed by the worker that hashed it, or (a known digest) here.
                let listing = listing.get(readers).map_err(|source| ArchiveError::Walk { layer: num, source })?;
                let name = format!("{}/layer.tar", d.hex());
                let first = outer.offset == 0;
                outer.header(&Header::plain_file(name.as_bytes(), d.size, mtime))?;
                if first {
                    // The consumer has the archive's first bytes now, not
                    // once the first chunk is full (while the readers share
                    // the cores with the next layers' hashing).
                    outer.flush().map_err(ArchiveError::Output)?;
                }
                // Per-file xxh3 when per-file hashes are known, else sha256.
                // Files are spliced unread where their content is known to
                // be what was hashed; the others are read and checked first.
                let policy = splice.map(|p| p.unread_before(unchanged_before_ns));
                let (mut v, check) = match &files {
                    Some(f) => (VerifyingWriter::size_only(&mut outer, d), FileCheck::Verify(f, policy)),
                    None => (VerifyingWriter::new(&mut outer, d), FileCheck::Off),
                };
                match render_layer(listing, owner, &mut v, check, Some(&slots.abort), readers) {
                    Ok(_) => {}
                    Err(LayerError::Aborted) => {
                        return Err(slots.first_error().unwrap_or(ArchiveError::Worker("aborted".into())))
                    }
                    Err(LayerError::Output(e)) if e.get_ref().is_some_and(|r| r.is::<OverrunError>()) => {
                        return Err(mismatch(num, paths_text, d, None));
                    }
                    Err(source) => return Err(ArchiveError::Layer { layer: num, source }),
                }
                if let Err(m) = v.finish() {
                    return Err(mismatch(num, paths_text, d, Some(m.actual)));
                }
                outer.pad(d.size)?;
                confirmed[i] = files;
                d
            }
            PlannedLayer::Customisation(c) => {
                progress.line(|| format!("Creating layer {num} with customisation..."));
                copy_customisation(c, mtime, &mut outer)?
            }
        };
        digests.push(digest);
        progress.layer_done(num, total);
        if let Some(e) = slots.first_error() {
            return Err(e);
        }
    }
    progress.line(|| "Adding manifests...".into());
    if splice.is_some() {
        // Every spliced file read by the consumer and checked again before
        // the archive can become an image.
        outer.out.barrier().map_err(ArchiveError::Output)?;
    }
    let diff_ids: Vec<[u8; 32]> = digests.iter().map(|d| d.sha256).collect();
    let meta = image_meta(plan, &diff_ids);
    outer.member(&meta.config_name, &meta.config, mtime)?;
    outer.member("manifest.json", &meta.manifest, mtime)?;
    let end = tarheader::end_of_archive_len(outer.offset);
    outer.write_all(&vec![0u8; end]).map_err(ArchiveError::Output)?;
    outer.flush().map_err(ArchiveError::Output)?;
    progress.line(|| "Done.".into());
    Ok(Summary { meta, digests, bytes: outer.offset, files: confirmed })
}

fn mismatch(layer: usize, paths: &[String], expected: LayerDigest, actual: Option<LayerDigest>) -> ArchiveError {
    ArchiveError::DigestMismatch {
        layer,
        paths: repr_str_list(paths),
        expected: expected.hex(),
        expected_size: expected.size,
        actual: actual.map(|a| a.hex()).unwrap_or_else(|| "?".into()),
        actual_size: actual.map(|a| a.size).unwrap_or(expected.size + 1),
    }
}

/// `add_customisation_layer`: the member header comes from stat'ing
/// layer.tar (`gettarinfo`), with the configured mtime.
fn copy_customisation<W: Write>(
    c: &Customisation,
    mtime: i64,
    outer: &mut Outer<'_, W>,
) -> Result<LayerDigest, ArchiveError> {
    let err = |what: String| ArchiveError::Customisation { path: c.tar_path.clone(), what };
    let expected = LayerDigest { size: c.size, sha256: c.digest };
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&c.tar_path)
        .map_err(|e| err(format!("cannot open: {e}")))?;
    let md = f.metadata().map_err(|e| err(format!("cannot stat: {e}")))?;
    let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    if md.size() != c.size || md.ino() != c.ino || mtime_ns != c.mtime_ns {
        return Err(err("changed while the image was being written".into()));
    }
    let name = format!("{}/layer.tar", hex(&c.digest));
    outer.header(&Header {
        name: name.as_bytes(),
        mode: c.mode,
        uid: c.uid,
        gid: c.gid,
        size: c.size,
        mtime,
        typeflag: tarheader::typeflag::REGULAR,
        linkname: b"",
        uname: &c.uname,
        gname: &c.gname,
        devmajor: 0,
        devminor: 0,
        pax: &[],
    })?;
    let mut v = VerifyingWriter::new(&mut *outer, expected);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = c.size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => return Err(err("it ended early".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        v.write_all(&buf[..n]).map_err(ArchiveError::Output)?;
        left -= n as u64;
    }
    if let Err(m) = v.finish() {
        return Err(err(format!(
            "its sha256 is {}, but its checksum file says {}; the customisation layer is corrupt",
            m.actual.hex(),
            m.expected.hex()
        )));
    }
    outer.pad(c.size)?;
    Ok(expected)
}
