//! Pushing an image to a registry (`push`, and `image --push`): the
//! manifest format and upload options, the narHashes that key each layer,
//! the digest cache and `--cache-from`'s layer annotations as where digests
//! are looked up first, and one more try after a digest-cache entry is
//! found wrong.  The protocol itself is `crate::dest::registry`.

use std::collections::HashMap;
use std::io::{self, Write};

use super::args::{ManifestFormat, PushArgs, RegistryArgs, RunArgs};
use super::cache::CacheUse;
use super::default_jobs;
use crate::dest::registry::{self, CacheHint, Reference, RegistryError};
use crate::engine::digest::LayerDigest;
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineError, EngineOptions, Hashed, Lookup, Origin};
use crate::input::closure::ClosureGraph;
use crate::input::conf::Conf;
use crate::input::layerdigest::{self, LayerDigestFile};
use crate::output::progress::{Mode, Progress};
use crate::plan::ImagePlan;
use crate::store::walk::Listing;

pub(super) fn push(a: &PushArgs) -> anyhow::Result<()> {
    // A conf directory (image --emit-conf) may carry its layers' digests.
    let beside = a.conf.conf.join(crate::output::confdir::DIGESTS);
    let digests = if a.conf.conf.is_dir() && beside.is_dir() { vec![beside] } else { Vec::new() };
    let known = layerdigest::read_all(&digests)?;
    push_image(&a.conf.load()?, &a.destination, a.layer_compression.into(), &a.registry, &a.run, None, &known)
}

/// Plans the image for `conf` and pushes it (the registry destination).
/// `nar_hashes` (store path to narHash) key the layers; without them the
/// local Nix is asked.
pub(super) fn push_image(
    conf: &Conf,
    destination: &str,
    compression: Compression,
    a: &RegistryArgs,
    run: &RunArgs,
    nar_hashes: Option<HashMap<String, String>>,
    known: &[LayerDigestFile],
) -> anyhow::Result<()> {
    let dest = Reference::parse(destination)?;
    let jobs = run.jobs.unwrap_or_else(default_jobs).max(1);
    let format = match a.manifest_format {
        ManifestFormat::Oci => crate::dest::manifest::Format::Oci,
        ManifestFormat::Docker => crate::dest::manifest::Format::Docker,
    };
    let quiet = run.quiet;
    let say = |line: &str| {
        if !quiet {
            let _ = writeln!(io::stderr(), "nixstream: {line}");
        }
    };
    let client = a.access.client_options(&dest, Some(&dest.registry), &say)?;

    let plan = ImagePlan::from_conf(conf)?;
    let n = plan.layers.len();
    // Layer keys (the engine's, annotated on each layer and matched by
    // --cache-from) need every store path's narHash: the local Nix knows
    // it for paths in its store.  Without it layers go unannotated.
    let paths: Vec<String> = conf.store_layers_text.iter().flatten().cloned().collect();
    let nar_hashes: HashMap<String, String> = if let Some(h) = nar_hashes {
        h
    } else if paths.is_empty() {
        HashMap::new()
    } else {
        match ClosureGraph::from_store(&paths) {
            Ok(g) => g.nodes.into_iter().filter_map(|n| Some((n.path, n.nar_hash?))).collect(),
            Err(_) => {
                say("the local Nix knows no narHash for these paths: layers are pushed without keys, so --cache-from cannot match them");
                HashMap::new()
            }
        }
    };
    let blobs = Blobs::Encoded(compression);
    let cache = match (&run.cache, run.no_cache) {
        (Some(_), _) | (None, true) => CacheUse::new(&plan, run.cache.as_deref(), &nar_hashes, blobs)?,
        (None, false) => CacheUse::default_for_push(&plan, &nar_hashes, blobs, quiet),
    };
    let hints = match &a.cache_from {
        Some(from) => {
            let from = Reference::parse(from)?;
            let opts = a.access.client_options(&from, Some(&dest.registry), &say)?;
            let hints = registry::fetch_cache_hints(&from, &opts)?;
            say(&format!("--cache-from {from}: {} layers with keys", hints.len()));
            hints
        }
        None => Vec::new(),
    };
    let lookup = HintLookup {
        cache: cache.lookup(),
        plan: &plan,
        nar_hashes: &nar_hashes,
        compression,
        hints: hints.into_iter().map(|h| (h.key.clone(), h)).collect(),
        from: a.cache_from.clone().unwrap_or_default(),
    };

    let progress = Progress::new(if quiet { Mode::Quiet } else { Mode::Plain }, n);
    // A layer the registry has is never streamed, so nothing would confirm
    // its files for the digest cache: with a cache, the hashing pass checks
    // them itself (as `digest` does), and every push fills the cache.
    let check_in_hashing_pass = cache.lookup().is_some();
    let known = if known.is_empty() { Vec::new() } else { layerdigest::known_for(&plan, known, compression) };
    let push_opts = registry::PushOptions {
        client,
        format,
        mount_from: a.mount_from.clone(),
        chunk_size: a.chunk_size,
        jobs,
        tries: a.retries.saturating_add(1),
        quiet,
        ..Default::default()
    };
    // Connected (and authenticated) before any layer is read: a wrong
    // password costs no hashing, and the sink can upload while hashing.
    let session = registry::push::Session::connect(&dest, &push_opts, compression)?;
    let sink = session.sink();
    let opts = EngineOptions {
        jobs,
        blobs,
        lookup: Some(&lookup),
        check_in_hashing_pass,
        nar_hashes: Some(&nar_hashes),
        blob_sink: a.compress_once.then_some(&sink as &dyn crate::engine::hashing::BlobSink),
        known,
        ..Default::default()
    };
    let push_once = || {
        crate::engine::run(&plan, &opts, &progress, |engine| session.push(engine, &say).map_err(anyhow::Error::from))
    };
    // A wrong digest-cache entry is removed when it is found, and the
    // registry keeps nothing of its blob: the next try hashes that layer.
    // Each try removes an entry, so there are at most as many as layers.
    let mut tries = 0;
    let (pushed, summary) = loop {
        match push_once() {
            Err(e) if tries < n && wrong_cache_entry_removed(&e) => {
                let _ = writeln!(io::stderr(), "nixstream: warning: {e}; pushing again without that entry");
                tries += 1;
            }
            r => break r?,
        }
    };
    progress.finish();
    cache.store(&summary);
    say(&format!("pushed {dest}: {pushed}"));
    if run.stats {
        let stats = serde_json::json!({
            "layers": n,
            "layers_from_cache": summary.layers_known,
            "layers_written": summary.layers_written,
            "layers_uploaded": pushed.layers_uploaded,
            "layers_present": pushed.layers_present,
            "layers_mounted": pushed.layers_mounted,
            "bytes_uploaded": pushed.bytes_uploaded,
            "manifest_uploaded": pushed.manifest_uploaded,
            "manifest_digest": pushed.manifest_digest,
            "retries": pushed.retries,
        });
        let _ = writeln!(io::stderr(), "nixstream: stats {stats}");
    }
    Ok(())
}

/// Whether `e` is a digest-cache entry found wrong by the streaming pass,
/// and removed since.
fn wrong_cache_entry_removed(e: &anyhow::Error) -> bool {
    let engine = e.downcast_ref::<EngineError>().or_else(|| match e.downcast_ref() {
        Some(RegistryError::Engine { source, .. }) => Some(source),
        _ => None,
    });
    let Some(EngineError::WrongDigest(w)) = engine else { return false };
    matches!(&w.origin, Origin::Cache { entries, .. } if entries.iter().all(|p| !p.exists()))
}

/// The digest cache, then `--cache-from`'s hints: a store layer whose
/// content key (as the engine makes it for [`crate::engine::image::LayerInfo::key`])
/// is annotated on a layer of that image takes its digests from there.  The
/// streaming pass checks them if the layer is ever written; a layer the
/// registry already has is not read at all (see docs/push.md on trust).
#[derive(Debug)]
struct HintLookup<'a> {
    cache: Option<&'a dyn Lookup>,
    plan: &'a ImagePlan,
    nar_hashes: &'a HashMap<String, String>,
    compression: Compression,
    hints: HashMap<String, CacheHint>,
    /// `--cache-from`'s reference, for an error if a hint is wrong.
    from: String,
}

impl Lookup for HintLookup<'_> {
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed> {
        if let Some(hit) = self.cache.and_then(|c| c.lookup(layer, listing)) {
            return Some(hit);
        }
        if self.hints.is_empty() {
            return None;
        }
        let key = crate::engine::content_key(self.plan, layer, listing, self.nar_hashes, self.compression)?;
        let hint = self.hints.get(&key)?;
        // The key covers the compressor: another compression's media type
        // means the annotation was not written by this code.
        let ours = [Some(self.compression.oci_layer_media_type()), self.compression.docker_layer_media_type()];
        if !ours.contains(&Some(hint.blob.media_type.as_str())) {
            return None;
        }
        let digest = LayerDigest { size: hint.tar_size, sha256: hint.diff_id };
        let blob = LayerDigest { size: hint.blob.size, sha256: hint.blob.digest };
        Some(Hashed {
            digest,
            blob: (self.compression != Compression::None).then_some(blob),
            unchanged_before_ns: i128::MIN,
            files: None,
            origin: Origin::CacheFrom(self.from.clone()),
        })
    }
}
