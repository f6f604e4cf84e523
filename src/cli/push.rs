//! Pushing an image to a registry (`push`, and `image --push`): the
//! manifest format and upload options, the narHashes that key each layer,
//! which digest cache and `--cache-from` image to look digests up in, and
//! what is said when a digest-cache entry is found wrong and the push made
//! again.  The protocol, the `--cache-from` lookup and the retry are the
//! library's (`crate::dest::registry`, `crate::engine::cache_use`).

use std::collections::HashMap;
use std::io::{self, Write};

use super::args::{ManifestFormat, PushArgs, RegistryArgs, RunArgs};
use super::cache::RunCache;
use super::default_jobs;
use crate::dest::registry::{self, HintLookup, Reference};
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineOptions};
use crate::input::closure::ClosureGraph;
use crate::input::conf::Conf;
use crate::input::layerdigest::{self, LayerDigestFile};
use crate::output::progress::{Mode, Progress};
use crate::plan::ImagePlan;

pub(super) fn push(a: &PushArgs) -> anyhow::Result<()> {
    // A conf directory (image --emit-conf) may carry its layers' digests.
    let beside = a.conf.conf.join(crate::output::confdir::DIGESTS);
    let digests = if a.conf.conf.is_dir() && beside.is_dir() { vec![beside] } else { Vec::new() };
    let known = layerdigest::read_all(&digests)?;
    push_image(&a.conf.load()?, &a.destination, a.layer_compression.into(), &a.registry, &a.run, None, &known)
}

/// What `image --push` knows beyond the configuration.
pub(super) struct FromClosure<'a> {
    /// Store path to narHash, to key the layers.
    pub(super) nar_hashes: HashMap<String, String>,
    /// The `--previous docker://` images that were there: one on the
    /// destination's registry lends its repository's blobs (mounted, not
    /// uploaded again; reading it showed it can be pulled).
    pub(super) previous: &'a [String],
}

/// Plans the image for `conf` and pushes it (the registry destination).
/// Without `closure` (`push CONF`), the local Nix is asked for narHashes.
pub(super) fn push_image(
    conf: &Conf,
    destination: &str,
    compression: Compression,
    a: &RegistryArgs,
    run: &RunArgs,
    closure: Option<FromClosure>,
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
    // The repositories of --previous images on this registry: a layer kept
    // from the previous release is then mounted, whatever repository it is in.
    let mut mount_from = a.mount_from.clone();
    for p in closure.iter().flat_map(|c| c.previous) {
        let Ok(r) = Reference::parse(p) else { continue };
        if r.registry == dest.registry && r.repository != dest.repository && !mount_from.contains(&r.repository) {
            mount_from.push(r.repository);
        }
    }
    let nar_hashes: HashMap<String, String> = if let Some(c) = closure {
        c.nar_hashes
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
        (Some(_), _) | (None, true) => RunCache::new(&plan, run.cache.as_deref(), &nar_hashes, blobs),
        (None, false) => RunCache::default_for_push(&plan, &nar_hashes, blobs, quiet),
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
    let from = a.cache_from.clone().unwrap_or_default();
    let lookup = HintLookup::new(cache.lookup(), &plan, &nar_hashes, compression, hints, from);

    let progress = Progress::new(if quiet { Mode::Quiet } else { Mode::Plain }, n);
    // A layer the registry has is never streamed, so nothing would confirm
    // its files for the digest cache: with a cache, the hashing pass checks
    // them itself (as `digest` does), and every push fills the cache.
    let check_in_hashing_pass = cache.lookup().is_some();
    let known = if known.is_empty() { Vec::new() } else { layerdigest::known_for(&plan, known, compression) };
    let push_opts = registry::PushOptions {
        client,
        format,
        mount_from,
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
    let (pushed, summary) = crate::engine::cache_use::run_again_after_wrong_entry(
        &plan,
        &opts,
        &progress,
        |engine| session.push(engine, &say),
        |e| {
            let _ = writeln!(io::stderr(), "nixstream: warning: {e}; pushing again without that entry");
        },
    )?;
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
            "config": pushed.config.describe(),
            "manifest_uploaded": pushed.manifest_uploaded,
            "manifest_digest": pushed.manifest_digest,
            "retries": pushed.retries,
        });
        let _ = writeln!(io::stderr(), "nixstream: stats {stats}");
    }
    Ok(())
}
