//! Pushing an [`Image`] to a registry over the OCI distribution protocol.
//!
//! Blobs first, manifest last.  Each layer: `HEAD` (there: skip); a
//! cross-repository mount from each `--mount-from` repository (201:
//! done); else `POST` an upload session, one streamed `PATCH` of the whole
//! blob with its `Content-Length`, and `PUT ?digest=` to close it
//! (registries that refuse the streamed `PATCH` get the blob again in
//! `--chunk-size` chunks, each `PATCH` with its `Content-Range`).  The
//! blob bytes come from [`Image::write_layer`] on a producer thread,
//! through a bounded channel, into the request body: nothing on disk, a
//! few hundred KiB in flight (a chunk, in chunked mode).  A timeout, a 408,
//! 429 or 5xx, or a dropped connection retries the blob with backoff,
//! rendering its bytes again (they are deterministic).  The manifest goes
//! up only once every blob it names has been confirmed present (`HEAD`,
//! mount, or the registry's 201 on the closing `PUT`), and not at all when
//! the tag already names a manifest with the same digest.
//!
//! With `--compress-once`, a [`Session`]'s [`RegistrySink`] takes each blob
//! from the engine's hashing pass instead and uploads it as it is made;
//! the push then finds those blobs present.
//!
//! Each layer descriptor carries the engine's key for its bytes as the
//! [`LAYER_KEY_ANNOTATION`] annotation, which [`fetch_cache_hints`] reads
//! back from an earlier push (`--cache-from`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::Digest;
use ureq::http::Method;

use super::client::{Body, Client, ClientOptions, Reply};
use super::reference::Reference;
use super::RegistryError;
use crate::dest::manifest::{self, Format};
use crate::engine::digest::hex;
use crate::engine::digest::LayerDigest;
use crate::engine::hashing::{BlobSink, BlobWriter};
use crate::engine::image::{Compression, Descriptor, Image, Sha256};

/// The layer annotation holding the key that decides the blob's bytes.
pub const LAYER_KEY_ANNOTATION: &str = "io.nixstream.layer.key";
/// Beside a key: the uncompressed tar's size (the config's `diff_ids` give
/// its digest), which a `--cache-from` reader needs to check the layer if
/// it ever writes it.
pub const LAYER_TAR_SIZE_ANNOTATION: &str = "io.nixstream.layer.tar-size";

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub client: ClientOptions,
    pub format: Format,
    /// Repositories of the same registry to mount blobs from.
    pub mount_from: Vec<String>,
    /// Upload in chunks of this many bytes from the start, instead of one
    /// streamed `PATCH` (which still falls back to chunks of
    /// [`DEFAULT_CHUNK`] if the registry refuses it).
    pub chunk_size: Option<u64>,
    /// Blobs uploaded at once.
    pub jobs: usize,
    /// Tries per blob and per manifest (the first included).
    pub tries: u32,
    /// The wait before the first retry; doubled each time.
    pub backoff: Duration,
    /// No per-layer lines.
    pub quiet: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            client: ClientOptions::default(),
            format: Format::Oci,
            mount_from: Vec::new(),
            chunk_size: None,
            jobs: 2,
            tries: 5,
            backoff: Duration::from_millis(500),
            quiet: false,
        }
    }
}

/// The fallback chunk size: above the 5 MiB some registries want (S3
/// multipart parts), below the caps others set.
pub const DEFAULT_CHUNK: u64 = 8 << 20;

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushSummary {
    pub layers: usize,
    pub layers_uploaded: usize,
    pub layers_present: usize,
    pub layers_mounted: usize,
    /// Layer and config bytes in uploads that the registry accepted.
    pub bytes_uploaded: u64,
    /// How the config came to be in the repository.
    pub config: Outcome,
    pub manifest_uploaded: bool,
    /// `sha256:...` of the manifest the tag names now.
    pub manifest_digest: String,
    /// Attempts that failed and were tried again.
    pub retries: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for PushSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layers: {} uploaded, {} already there, {} mounted; {} bytes uploaded; config {}; manifest {} ({}); {} retries; {:.1} s",
            self.layers,
            self.layers_uploaded,
            self.layers_present,
            self.layers_mounted,
            self.bytes_uploaded,
            self.config.describe(),
            if self.manifest_uploaded { "pushed" } else { "unchanged" },
            self.manifest_digest,
            self.retries,
            self.elapsed.as_secs_f64()
        )
    }
}

/// How a blob came to be in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// The repository had it.
    #[default]
    Present,
    /// Mounted from another repository of the registry.
    Mounted,
    Uploaded,
}

impl Outcome {
    /// As the summary says it.
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Present => "already there",
            Outcome::Mounted => "mounted",
            Outcome::Uploaded => "uploaded",
        }
    }
}

/// A layer in the repository.
struct Pushed {
    blob: Descriptor,
    key: Option<String>,
    tar_size: u64,
    outcome: Outcome,
}

/// Where a blob's bytes come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Layer(usize),
    Bytes(&'a [u8]),
}

struct Pusher<'a> {
    image: &'a dyn Image,
    client: &'a Client,
    opts: &'a PushOptions,
    progress: &'a (dyn Fn(&str) + Sync),
    retries: AtomicU64,
    bytes_uploaded: AtomicU64,
    sunk: &'a SinkShared,
}

/// Pushes `image` to `dest` (which must name a tag).  `progress` gets one
/// line per event (a layer done, a retry); none carries a credential.
pub fn push(
    image: &dyn Image,
    dest: &Reference,
    opts: &PushOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PushSummary, RegistryError> {
    Session::connect(dest, opts, image.compression())?.push(image, progress)
}

/// A push, connected (and authenticated) before the image is made, so that
/// its [`RegistrySink`] can take blobs from the engine's hashing pass.
pub struct Session {
    client: Arc<Client>,
    opts: PushOptions,
    dest: Reference,
    tag: String,
    compression: Compression,
    sunk: Arc<SinkShared>,
}

impl Session {
    /// Checks what can be checked before any work (a tag, a manifest format
    /// for the compression), connects and authenticates.
    pub fn connect(dest: &Reference, opts: &PushOptions, compression: Compression) -> Result<Session, RegistryError> {
        let Some(tag) = dest.tag.clone() else {
            return Err(RegistryError::Usage(format!("push destination {dest}: name a tag, not a digest")));
        };
        if manifest::layer_media_type(opts.format, compression).is_none() {
            return Err(RegistryError::Usage(format!(
                "Docker schema 2 manifests have no media type for {} layers: use --manifest-format oci or another --layer-compression",
                compression.name()
            )));
        }
        let mut client_opts = opts.client.clone();
        client_opts.pull_repositories.extend(opts.mount_from.iter().cloned());
        let client = Arc::new(Client::connect(dest, &client_opts, opts.tries, opts.backoff)?);
        Ok(Session {
            client,
            opts: opts.clone(),
            dest: dest.clone(),
            tag,
            compression,
            sunk: Arc::new(SinkShared::default()),
        })
    }

    /// Where the hashing pass can upload each blob as it makes it
    /// (compress once): see [`RegistrySink`].
    pub fn sink(&self) -> RegistrySink {
        RegistrySink { client: Arc::clone(&self.client), shared: Arc::clone(&self.sunk) }
    }

    /// Pushes `image`: its blobs, then its manifest.
    pub fn push(&self, image: &dyn Image, progress: &(dyn Fn(&str) + Sync)) -> Result<PushSummary, RegistryError> {
        let start = Instant::now();
        let (dest, opts, tag, compression) = (&self.dest, &self.opts, self.tag.clone(), self.compression);
        if image.compression() != compression {
            return Err(RegistryError::Usage("the image's layer compression is not the session's".into()));
        }
        let p = Pusher {
            image,
            client: &self.client,
            opts,
            progress,
            retries: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            sunk: &self.sunk,
        };
        push_with(p, dest, tag, compression, start)
    }
}

fn push_with(
    p: Pusher<'_>,
    dest: &Reference,
    tag: String,
    compression: Compression,
    start: Instant,
) -> Result<PushSummary, RegistryError> {
    let (image, opts) = (p.image, p.opts);
    let n = image.layer_count();
    let mut summary = PushSummary { layers: n, ..Default::default() };

    // Layers, `jobs` at a time; the first error stops the others taking
    // new layers.
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<std::sync::Mutex<Option<Result<Pushed, RegistryError>>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = p.layer(i, n);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    let mut layers = Vec::with_capacity(n);
    for r in results {
        match r.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(Pushed { blob, key, tar_size, outcome })) => {
                match outcome {
                    Outcome::Present => summary.layers_present += 1,
                    Outcome::Mounted => summary.layers_mounted += 1,
                    Outcome::Uploaded => summary.layers_uploaded += 1,
                }
                layers.push((blob, key, tar_size));
            }
            Some(Err(e)) => return Err(e),
            // Not started because another layer failed: that error was
            // returned above, in layer order, unless it came later.
            None => continue,
        }
    }
    if layers.len() != n {
        return Err(RegistryError::Protocol {
            registry: dest.registry.clone(),
            what: "a layer was not pushed (an earlier failure stopped the push)".into(),
        });
    }

    let config = image.config().map_err(RegistryError::Config)?;
    let config_desc = manifest::config_descriptor(opts.format, &config);
    let outcome = p.ensure_blob(&config_desc, Source::Bytes(&config), "config")?;
    summary.config = outcome;

    let media_type = manifest::layer_media_type(opts.format, compression).expect("checked above");
    let described: Vec<(Descriptor, Vec<(String, String)>)> = layers
        .into_iter()
        .map(|(mut d, key, tar_size)| {
            d.media_type = media_type.to_string();
            let notes = key
                .map(|k| {
                    vec![
                        (LAYER_KEY_ANNOTATION.to_string(), k),
                        (LAYER_TAR_SIZE_ANNOTATION.to_string(), tar_size.to_string()),
                    ]
                })
                .unwrap_or_default();
            (d, notes)
        })
        .collect();
    let body = manifest::image_manifest(opts.format, &config_desc, &described);
    let digest = format!("sha256:{}", hex(&sha2::Sha256::digest(&body)));
    summary.manifest_uploaded = p.put_manifest(&tag, &body, &digest)?;
    summary.manifest_digest = digest;
    summary.retries = p.retries.load(Ordering::Relaxed);
    summary.bytes_uploaded = p.bytes_uploaded.load(Ordering::Relaxed) + p.sunk.bytes.load(Ordering::Relaxed);
    summary.elapsed = start.elapsed();
    Ok(summary)
}

impl Pusher<'_> {
    fn say(&self, line: &str) {
        if !self.opts.quiet {
            (self.progress)(line);
        }
    }

    fn layer(&self, i: usize, n: usize) -> Result<Pushed, RegistryError> {
        let info = self.image.layer(i).map_err(|source| RegistryError::Engine { layer: i, source })?;
        let label = format!("layer {}/{n}", i + 1);
        let t = Instant::now();
        let mut outcome = self.ensure_blob(&info.blob, Source::Layer(i), &label).map_err(|e| match e {
            e @ RegistryError::Engine { .. } => e,
            e => RegistryError::Layer { layer: i + 1, digest: info.blob.digest_ref(), source: Box::new(e) },
        })?;
        // There because the hashing pass uploaded it (and `HEAD` agrees).
        let sunk = outcome == Outcome::Present && self.sunk.uploaded(i) == Some(info.blob.digest);
        if sunk {
            outcome = Outcome::Uploaded;
        }
        let short = &info.blob.digest_ref()[..19];
        let line = match outcome {
            Outcome::Present => {
                format!("{label} {short} {}: already there", crate::output::progress::human(info.blob.size))
            }
            Outcome::Mounted => format!("{label} {short} {}: mounted", crate::output::progress::human(info.blob.size)),
            Outcome::Uploaded if sunk => {
                format!("{label} {short} {}: uploaded while hashing", crate::output::progress::human(info.blob.size))
            }
            Outcome::Uploaded => {
                format!(
                    "{label} {short} {}: uploaded in {:.1} s",
                    crate::output::progress::human(info.blob.size),
                    t.elapsed().as_secs_f64()
                )
            }
        };
        self.say(&line);
        Ok(Pushed { blob: info.blob, key: info.key, tar_size: info.diff_id.size, outcome })
    }

    /// Makes sure the repository holds `blob`: `HEAD`, mount, or upload,
    /// retried with backoff.
    fn ensure_blob(&self, blob: &Descriptor, source: Source<'_>, label: &str) -> Result<Outcome, RegistryError> {
        let digest = blob.digest_ref();
        let mut attempt = 0u32;
        // After a refused streamed PATCH, chunks for the rest of this blob.
        let mut chunked = self.opts.chunk_size;
        loop {
            let r = self.try_blob(blob, &digest, source, &mut chunked);
            match r {
                Ok(o) => return Ok(o),
                Err(e) if e.is_retryable() && attempt + 1 < self.opts.tries => {
                    let wait = self.opts.backoff * 2u32.pow(attempt);
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    self.say(&format!("{label}: {e}; retrying in {:.1} s", wait.as_secs_f64()));
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_blob(
        &self,
        blob: &Descriptor,
        digest: &str,
        source: Source<'_>,
        chunked: &mut Option<u64>,
    ) -> Result<Outcome, RegistryError> {
        let c = &self.client;
        let head = c.send(Method::HEAD, &c.repo_path(&format!("blobs/{digest}")), &[], Body::Empty, "HEAD blob")?;
        match head.status {
            200..=399 => return Ok(Outcome::Present),
            404 => {}
            _ => return Err(c.status_error("HEAD blob", &head)),
        }
        for from in &self.opts.mount_from {
            let path = c.repo_path(&format!("blobs/uploads/?mount={digest}&from={from}"));
            let r = c.send(Method::POST, &path, &[], Body::Empty, "POST blob mount")?;
            match r.status {
                201 => return Ok(Outcome::Mounted),
                202 => {
                    // Not mountable: the registry opened an upload session
                    // instead, which is given back.
                    if let Some(loc) = r.header("location") {
                        let _ = c.send(Method::DELETE, &c.resolve(loc), &[], Body::Empty, "DELETE upload");
                    }
                }
                _ => return Err(c.status_error("POST blob mount", &r)),
            }
        }
        let (location, min_chunk) = self.start_upload()?;
        let location = match *chunked {
            None => match self.streamed(blob, source, &location)? {
                Ok(loc) => loc,
                Err(refused) => {
                    self.say(&format!(
                        "{}: streamed upload refused ({}); uploading in chunks",
                        blob.digest_ref(),
                        refused
                    ));
                    *chunked = Some(DEFAULT_CHUNK.max(min_chunk));
                    let _ = c.send(Method::DELETE, &location, &[], Body::Empty, "DELETE upload");
                    let (location, min_chunk) = self.start_upload()?;
                    self.chunks(blob, source, location, DEFAULT_CHUNK.max(min_chunk))?
                }
            },
            Some(size) => self.chunks(blob, source, location, size.max(min_chunk).max(1))?,
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = c.send(
            Method::PUT,
            &format!("{location}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            Body::Empty,
            "PUT blob (closing the upload)",
        )?;
        if put.status != 201 {
            return Err(c.status_error("PUT blob (closing the upload)", &put));
        }
        if let Some(d) = put.header("docker-content-digest") {
            if d != digest {
                return Err(RegistryError::Protocol {
                    registry: c.registry().into(),
                    what: format!("the registry stored the blob as {d}"),
                });
            }
        }
        self.bytes_uploaded.fetch_add(blob.size, Ordering::Relaxed);
        Ok(Outcome::Uploaded)
    }

    /// `POST` a new upload session: its location, and the smallest chunk
    /// the registry takes (`OCI-Chunk-Min-Length`, 0 if it says nothing).
    fn start_upload(&self) -> Result<(String, u64), RegistryError> {
        let c = &self.client;
        let r = c.send(Method::POST, &c.repo_path("blobs/uploads/"), &[], Body::Empty, "POST blob upload")?;
        if r.status != 202 {
            return Err(c.status_error("POST blob upload", &r));
        }
        let min = r.header("oci-chunk-min-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((self.location(&r, "POST blob upload")?, min))
    }

    fn location(&self, r: &Reply, what: &str) -> Result<String, RegistryError> {
        r.header("location").map(|l| self.client.resolve(l)).ok_or_else(|| RegistryError::Protocol {
            registry: self.client.registry().into(),
            what: format!("{what}: no Location in the reply"),
        })
    }

    /// The whole blob in one `PATCH`.  `Ok(Err(status))` when the registry
    /// refuses this way of uploading (and chunks may work).
    fn streamed(
        &self,
        blob: &Descriptor,
        source: Source<'_>,
        location: &str,
    ) -> Result<Result<String, u16>, RegistryError> {
        let c = &self.client;
        let what = "PATCH blob (streamed)";
        let r = self.with_body(source, |reader| {
            c.send(
                Method::PATCH,
                location,
                &[("Content-Type", "application/octet-stream")],
                Body::Reader(reader, blob.size),
                what,
            )
        })?;
        match r.status {
            202 | 204 => Ok(Ok(self.location(&r, what).unwrap_or_else(|_| location.to_string()))),
            400 | 411 | 413 | 416 => Ok(Err(r.status)),
            _ => Err(c.status_error(what, &r)),
        }
    }

    /// The blob in `PATCH`es of `size` bytes, each buffered (the only
    /// buffer of a blob's bytes, and why chunks are bounded).
    fn chunks(
        &self,
        blob: &Descriptor,
        source: Source<'_>,
        location: String,
        size: u64,
    ) -> Result<String, RegistryError> {
        let c = &self.client;
        let what = "PATCH blob (chunk)";
        self.with_body(source, |reader| {
            let mut location = location;
            let mut offset = 0u64;
            let mut buf = Vec::with_capacity(size.min(blob.size.max(1)) as usize);
            loop {
                buf.clear();
                reader.take(size).read_to_end(&mut buf).map_err(|e| RegistryError::Transport {
                    registry: c.registry().into(),
                    what: what.into(),
                    why: e.to_string(),
                    retryable: true,
                })?;
                if buf.is_empty() {
                    break;
                }
                let end = offset + buf.len() as u64 - 1;
                let range = format!("{offset}-{end}");
                let r = c.send(
                    Method::PATCH,
                    &location,
                    &[("Content-Type", "application/octet-stream"), ("Content-Range", &range)],
                    Body::Bytes(&buf),
                    what,
                )?;
                if r.status != 202 {
                    return Err(c.status_error(what, &r));
                }
                location = self.location(&r, what)?;
                offset = end + 1;
            }
            Ok(location)
        })
    }

    /// Runs `send` with a reader over the blob's bytes: the config's, or a
    /// layer's rendered by `write_layer` on a producer thread.  An engine
    /// error (a file changed since hashing) wins over the upload error it
    /// caused, and is not retried.
    fn with_body<T>(
        &self,
        source: Source<'_>,
        send: impl FnOnce(&mut dyn Read) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let i = match source {
            Source::Bytes(b) => return send(&mut &b[..]),
            Source::Layer(i) => i,
        };
        let (tx, rx) = bounded::<Vec<u8>>(PIPE_CHUNKS);
        let (done_tx, done_rx) = bounded::<()>(1);
        std::thread::scope(|s| {
            let producer = s.spawn(move || {
                let mut w = ChannelWriter { tx, buf: Vec::with_capacity(PIPE_CHUNK), gone: false };
                let r = self.image.write_layer(i, &mut w);
                // A failed last flush is the consumer gone, seen as `gone`.
                let complete = r.is_ok() && w.flush_buf().is_ok();
                // "Done" before the pipe closes: the reader, on seeing it
                // closed, must find it.
                if complete {
                    let _ = done_tx.send(());
                }
                let gone = w.gone;
                drop(w);
                (r, gone)
            });
            let mut reader = ChannelReader { rx, done: done_rx, cur: Vec::new(), pos: 0, finished: false };
            let sent = send(&mut reader);
            drop(reader);
            let (produced, consumer_gone) = producer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            match (sent, produced) {
                (Ok(v), Ok(())) => Ok(v),
                (_, Err(e)) if !consumer_gone => Err(RegistryError::Engine { layer: i, source: e }),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(RegistryError::Engine { layer: i, source: e }),
            }
        })
    }

    /// Puts the manifest under `tag` unless the tag already names it.
    /// Returns whether it was sent.
    fn put_manifest(&self, tag: &str, body: &[u8], digest: &str) -> Result<bool, RegistryError> {
        let c = &self.client;
        let media_type = match self.opts.format {
            Format::Oci => manifest::OCI_MANIFEST,
            Format::Docker => manifest::DOCKER_MANIFEST,
        };
        let path = c.repo_path(&format!("manifests/{tag}"));
        let mut attempt = 0u32;
        loop {
            let r = (|| {
                let head = c.send(Method::HEAD, &path, &[("Accept", media_type)], Body::Empty, "HEAD manifest")?;
                if head.ok() && head.header("docker-content-digest") == Some(digest) {
                    return Ok(false);
                }
                if head.status >= 500 || head.status == 429 || head.status == 408 {
                    return Err(c.status_error("HEAD manifest", &head));
                }
                let put =
                    c.send(Method::PUT, &path, &[("Content-Type", media_type)], Body::Bytes(body), "PUT manifest")?;
                if put.status != 201 && put.status != 200 {
                    return Err(c.status_error("PUT manifest", &put));
                }
                Ok(true)
            })();
            match r {
                Err(e) if e.is_retryable() && attempt + 1 < self.opts.tries => {
                    let wait = self.opts.backoff * 2u32.pow(attempt);
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    self.say(&format!("manifest: {e}; retrying in {:.1} s", wait.as_secs_f64()));
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// What the sink uploaded: layer to blob digest, and the bytes.
#[derive(Debug, Default)]
struct SinkShared {
    uploaded: Mutex<HashMap<usize, Sha256>>,
    bytes: AtomicU64,
}

impl SinkShared {
    fn uploaded(&self, layer: usize) -> Option<Sha256> {
        self.uploaded.lock().unwrap_or_else(|p| p.into_inner()).get(&layer).copied()
    }
}

/// Compress once: the engine's hashing pass writes each blob it makes into
/// an upload (`POST`, one `PATCH` in chunked transfer encoding, its length
/// not known yet), closed with `PUT ?digest=` once the pass knows the
/// digest.  No `HEAD` can come first, so a blob the registry has is sent
/// anyway; a layer whose digests come from a cache is not hashed and goes
/// the usual way.  An upload that fails costs nothing but the bytes: the
/// hashing pass goes on, and the push then finds the blob missing and
/// uploads it as it would have without the sink.
#[derive(Debug)]
pub struct RegistrySink {
    client: Arc<Client>,
    shared: Arc<SinkShared>,
}

impl BlobSink for RegistrySink {
    fn open(&self, layer: usize) -> io::Result<Box<dyn BlobWriter>> {
        let c = &self.client;
        let started = c
            .send(Method::POST, &c.repo_path("blobs/uploads/"), &[], Body::Empty, "POST blob upload")
            .ok()
            .filter(|r| r.status == 202)
            .and_then(|r| r.header("location").map(|l| c.resolve(l)));
        let Some(location) = started else { return Ok(Box::new(SinkWriter { layer, upload: None })) };
        let (tx, rx) = bounded::<Vec<u8>>(PIPE_CHUNKS);
        let (done_tx, done_rx) = bounded::<()>(1);
        let client = Arc::clone(&self.client);
        let patch = std::thread::spawn(move || {
            let mut reader = ChannelReader { rx, done: done_rx, cur: Vec::new(), pos: 0, finished: false };
            let what = "PATCH blob (while hashing)";
            let r = client.send(
                Method::PATCH,
                &location,
                &[("Content-Type", "application/octet-stream")],
                Body::Unsized(&mut reader),
                what,
            );
            match r {
                Ok(r) if r.status == 202 || r.status == 204 => {
                    Some(r.header("location").map_or(location, |l| client.resolve(l)))
                }
                _ => None,
            }
        });
        let w = ChannelWriter { tx, buf: Vec::with_capacity(PIPE_CHUNK), gone: false };
        Ok(Box::new(SinkWriter {
            layer,
            upload: Some(SinkUpload {
                w,
                done: done_tx,
                patch,
                client: Arc::clone(&self.client),
                shared: Arc::clone(&self.shared),
            }),
        }))
    }
}

struct SinkWriter {
    layer: usize,
    /// `None` once the upload failed: the rest of the blob is dropped.
    upload: Option<SinkUpload>,
}

struct SinkUpload {
    w: ChannelWriter,
    done: Sender<()>,
    patch: std::thread::JoinHandle<Option<String>>,
    client: Arc<Client>,
    shared: Arc<SinkShared>,
}

impl Write for SinkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(u) = &mut self.upload {
            if u.w.write_all(data).is_err() {
                // The upload went away; the hashing pass must not.
                self.upload = None;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for SinkWriter {
    fn commit(self: Box<Self>, digest: &LayerDigest) -> io::Result<()> {
        let SinkWriter { layer, upload } = *self;
        let Some(mut u) = upload else { return Ok(()) };
        if u.w.flush_buf().is_err() {
            return Ok(());
        }
        // Done before the pipe closes (see `with_body`).
        let _ = u.done.send(());
        drop(u.w);
        let Ok(Some(location)) = u.patch.join() else { return Ok(()) };
        let sep = if location.contains('?') { '&' } else { '?' };
        let d = format!("sha256:{}", hex(&digest.sha256));
        let put = u.client.send(
            Method::PUT,
            &format!("{location}{sep}digest={d}"),
            &[("Content-Type", "application/octet-stream")],
            Body::Empty,
            "PUT blob (closing the upload)",
        );
        if put.is_ok_and(|r| r.status == 201) {
            u.shared.uploaded.lock().unwrap_or_else(|p| p.into_inner()).insert(layer, digest.sha256);
            u.shared.bytes.fetch_add(digest.size, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The producer hands the body over in pieces of this size, at most
/// [`PIPE_CHUNKS`] waiting: about 1 MiB of a blob in memory.
const PIPE_CHUNK: usize = 256 << 10;
const PIPE_CHUNKS: usize = 4;

struct ChannelWriter {
    tx: Sender<Vec<u8>>,
    buf: Vec<u8>,
    /// The consumer went away (the upload failed): later writes fail.
    gone: bool,
}

impl ChannelWriter {
    fn flush_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(PIPE_CHUNK));
        if self.tx.send(full).is_err() {
            self.gone = true;
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"));
        }
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.gone {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"));
        }
        let n = data.len().min(PIPE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIPE_CHUNK {
            self.flush_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Pieces go when full; the last one when the layer is done.
        Ok(())
    }
}

struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    /// Signalled once the producer wrote the whole blob without error.
    done: Receiver<()>,
    cur: Vec<u8>,
    pos: usize,
    finished: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.finished {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(_) => {
                    // The sender is gone: the end, if the producer says so;
                    // else it failed, and the body must not look complete.
                    if self.done.try_recv().is_ok() {
                        self.finished = true;
                        return Ok(0);
                    }
                    return Err(io::Error::other("the layer's bytes stopped (see the engine's error)"));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What an earlier push says about one layer: its key, blob and diff_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHint {
    pub key: String,
    pub blob: Descriptor,
    /// The uncompressed tar's sha256, from the image config's `diff_ids`.
    pub diff_id: Sha256,
    /// Its size ([`LAYER_TAR_SIZE_ANNOTATION`]).
    pub tar_size: u64,
}

/// Reads the manifest and config of `from` (an image pushed by nixstream,
/// any repository) and returns, for each layer annotated with
/// [`LAYER_KEY_ANNOTATION`], its key, blob and diff_id.  The config's
/// digest is checked; the annotations are trusted (see docs/push.md).
pub fn fetch_cache_hints(from: &Reference, opts: &ClientOptions) -> Result<Vec<CacheHint>, RegistryError> {
    let bad =
        |why: &str| RegistryError::Protocol { registry: from.registry.clone(), what: format!("--cache-from: {why}") };
    let arch = crate::dest::manifest::host_architecture();
    let image = super::pull::fetch_image(from, opts, "--cache-from", arch)?;
    #[derive(serde::Deserialize)]
    struct Rootfs {
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: Rootfs,
    }
    let cfg: Config = serde_json::from_slice(&image.config).map_err(|_| bad("the config has no rootfs.diff_ids"))?;
    if cfg.rootfs.diff_ids.len() != image.layers.len() {
        return Err(bad("the config's diff_ids and the manifest's layers differ in number"));
    }
    let mut hints = Vec::new();
    for (d, diff) in image.layers.iter().zip(&cfg.rootfs.diff_ids) {
        let Some(key) = d.annotations.get(LAYER_KEY_ANNOTATION) else { continue };
        let Some(tar_size) = d.annotations.get(LAYER_TAR_SIZE_ANNOTATION).and_then(|s| s.parse().ok()) else {
            continue;
        };
        let (Some(blob), Some(diff_id)) = (parse_digest(&d.digest), parse_digest(diff)) else {
            return Err(bad("a digest is not sha256:<64 hex digits>"));
        };
        hints.push(CacheHint {
            key: key.clone(),
            blob: Descriptor { media_type: d.media_type.clone(), digest: blob, size: d.size },
            diff_id,
            tar_size,
        });
    }
    Ok(hints)
}

fn parse_digest(s: &str) -> Option<Sha256> {
    let h = s.strip_prefix("sha256:")?;
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip() {
        let d = [0xab; 32];
        assert_eq!(parse_digest(&format!("sha256:{}", hex(&d))), Some(d));
        assert_eq!(parse_digest("sha256:abc"), None);
        assert_eq!(parse_digest(&format!("sha512:{}", hex(&d))), None);
    }

    #[test]
    fn the_pipe_delivers_everything_or_an_error() {
        let (tx, rx) = bounded::<Vec<u8>>(PIPE_CHUNKS);
        let (done_tx, done_rx) = bounded::<()>(1);
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7) as u8).collect();
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let mut w = ChannelWriter { tx, buf: Vec::new(), gone: false };
            w.write_all(&d2).unwrap();
            w.flush_buf().unwrap();
            drop(w);
            done_tx.send(()).unwrap();
        });
        let mut r = ChannelReader { rx, done: done_rx, cur: Vec::new(), pos: 0, finished: false };
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, data);

        // A producer that stops without saying it is done: an error, not EOF.
        let (tx, rx) = bounded::<Vec<u8>>(PIPE_CHUNKS);
        let (_done_tx, done_rx) = bounded::<()>(1);
        tx.send(vec![1, 2, 3]).unwrap();
        drop(tx);
        let mut r = ChannelReader { rx, done: done_rx, cur: Vec::new(), pos: 0, finished: false };
        let mut got = Vec::new();
        assert!(r.read_to_end(&mut got).is_err());
    }
}
