//! The command line: options parsed by clap, resolved into one config per
//! command, run, and mapped to an [`ExitCode`].

use std::collections::{HashMap, HashSet};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use crate::dest::tarstream::with_tar_stream;
use crate::dest::{docker_archive, oci_archive, oci_layout};
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineError, EngineOptions, Hashed, Lookup};
use crate::input::closure::ClosureGraph;
use crate::input::conf::{Conf, CustomisationSource};
use crate::output::compress::{Compress, Compressed};
use crate::output::progress::{Mode, Progress};
use crate::output::splice::Policy;
use crate::output::writer::Blocking;
use crate::plan::ImagePlan;
use crate::planner::autolayer::auto_layer;
use crate::planner::previous::Previous;
use crate::planner::{compare, pipeline, stable};
use crate::store::walk::Listing;
use std::os::fd::AsFd;

mod args;
mod cache;
mod docs;
mod inspect;
mod registry;

use args::json_arg;
pub use args::{
    Cli, ClosureArgs, Command, CompletionsArgs, ConfArgs, DigestArgs, Format, ImageArgs, LayerCompression,
    LayerDigestArgs, LayeringChoice, LayersArgs, ManArgs, ManifestFormat, OutputArgs, OwnerArgs, PlanArgs, PushArgs,
    RegistryAccess, RegistryArgs, RunArgs, StreamArgs, VerifyArgs,
};
use cache::CacheUse;

/// Exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    /// Bad input, a changed file, a failed check: a message was printed.
    Failure = 1,
    /// The command line was wrong.
    Usage = 2,
    /// The output was closed early (e.g. `| head`); nothing printed.
    BrokenPipe = 141,
}

/// Parses `args`, runs the command, reports errors on stderr.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::Usage } else { ExitCode::Success };
        }
    };
    match cli.command {
        Command::Stream(a) => report(stream(&a)),
        Command::Layers(a) => report(layers(&a)),
        Command::Plan(a) => report(plan(&a)),
        Command::Image(a) => report(image(&a)),
        Command::Verify(a) => report(inspect::verify(&a)),
        Command::Digest(a) => report(inspect::digest(&a)),
        Command::LayerDigest(a) => report(inspect::layer_digest(&a)),
        Command::Completions(a) => report(docs::completions(&a)),
        Command::Man(a) => report(docs::man(&a)),
        Command::Push(a) => report(push(&a)),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::Success,
        Err(e) if is_broken_pipe(&e) => ExitCode::BrokenPipe,
        Err(e) => {
            let _ = writeln!(io::stderr(), "nixstream: {}", one_line(&e));
            ExitCode::Failure
        }
    }
}

/// The error and its causes on one line.  Our error types already write
/// their source into their message, so a cause is added only when the text
/// so far does not hold it (anyhow's `{:#}` would print it twice).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg.replace('\n', " ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind)
                == Some(io::ErrorKind::BrokenPipe)
    }) || e
        .downcast_ref::<EngineError>()
        .and_then(|a| a.output_error())
        .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn stream(a: &StreamArgs) -> anyhow::Result<()> {
    let conf = a.conf.load()?;
    let mut digests = a.output.known_digests.clone();
    // A conf directory (image --emit-conf) may carry its layers' digests.
    let beside = a.conf.conf.join(crate::output::confdir::DIGESTS);
    if a.conf.conf.is_dir() && beside.is_dir() {
        digests.push(beside);
    }
    let known = crate::input::layerdigest::read_all(&digests)?;
    emit(&conf, &a.output, &HashMap::new(), &known)
}

/// The most layers an image Docker loads may have: moby's layer store
/// refuses a deeper chain ("max depth exceeded"; tested in tests/errors.rs).
pub const MAX_DOCKER_LAYERS: usize = 125;

/// Plans the image for `conf` and writes it where `o` says.  `nar_hashes`
/// (store path to narHash, possibly empty) keys the digest cache where it
/// covers a whole layer.
fn emit(
    conf: &Conf,
    o: &OutputArgs,
    nar_hashes: &HashMap<String, String>,
    known: &[crate::input::layerdigest::LayerDigestFile],
) -> anyhow::Result<()> {
    let jobs = o.run.jobs.unwrap_or_else(default_jobs).max(1);
    let oci = o.format == Format::OciArchive || o.oci_layout.is_some();
    anyhow::ensure!(
        oci || o.layer_compression.is_none(),
        "--layer-compression is for the OCI outputs (--format oci-archive, --oci-layout); a docker-archive holds plain layers, as the reference writes them (--compress compresses the whole stream)"
    );
    anyhow::ensure!(
        !(o.oci_layout.is_some() && o.format == Format::OciArchive),
        "--oci-layout writes a directory instead of stdout: leave out --format oci-archive"
    );
    let blobs = if oci {
        Blobs::Encoded(o.layer_compression.unwrap_or(LayerCompression::Gzip).into())
    } else {
        Blobs::DockerArchive
    };
    // As `docker save` does: an archive on a terminal helps nobody.
    anyhow::ensure!(
        o.oci_layout.is_some() || o.output.is_some() || !io::stdout().is_terminal(),
        "refusing to write an image archive to a terminal; pipe it into `docker load`, redirect it or use -o FILE"
    );
    let plan = ImagePlan::from_conf(conf)?;
    if plan.layers.len() > MAX_DOCKER_LAYERS {
        let _ = writeln!(
            io::stderr(),
            "nixstream: warning: the image has {} layers (base image layers included); Docker refuses to load an image of more than {MAX_DOCKER_LAYERS} (\"max depth exceeded\")",
            plan.layers.len()
        );
    }
    let cache = CacheUse::new(&plan, o.run.cache.as_deref(), nar_hashes, blobs)?;
    let progress = Progress::new(Mode::detect(o.run.quiet), plan.layers.len());
    let mut opts =
        EngineOptions { jobs, blobs, lookup: cache.lookup(), nar_hashes: Some(nar_hashes), ..Default::default() };
    if !known.is_empty() {
        opts.known = crate::input::layerdigest::known_for(&plan, known, blobs.compression());
    }
    let mut stats = Stats { layers: plan.layers.len(), ..Default::default() };

    let summary = if let Some(dir) = &o.oci_layout {
        // The hashing pass writes each blob into the layout as it makes it.
        let layout = oci_layout::Layout::open(dir)?;
        opts.blob_sink = Some(&layout);
        // No streaming pass follows for the blobs written so: the hashing
        // pass checks every entry against the listing itself.
        opts.check_in_hashing_pass = true;
        let (written, summary) = crate::engine::run(&plan, &opts, &progress, |engine| layout.write(engine))?;
        stats.blobs_written = written.blobs_written;
        stats.blobs_present = written.blobs_present;
        summary
    } else {
        let stdout = match &o.output {
            Some(path) => {
                std::fs::File::create(path).with_context(|| format!("cannot create the output {}", path.display()))?
            }
            None => stdout_file()?,
        };
        let pipe = grow_pipe(&stdout);
        // The writer hands over 1 MiB chunks, and smaller ones only when it
        // must wait: plain output goes straight to the fd, unbuffered.
        let buffer = if o.compress == Compress::None { 0 } else { 1 << 20 };
        let mut out = Compressed::new(BufWriter::with_capacity(buffer, Blocking(&stdout)), o.compress, jobs)?;
        // Plain output into a pipe: big files go in by reference.
        let splice = pipe && o.compress == Compress::None && !o.no_splice && blobs.compression() == Compression::None;
        opts.splice = splice.then(|| Policy::new(std::time::SystemTime::now(), o.splice_min));
        let splice_into = splice.then(|| stdout.as_fd());
        let ((_, written), summary) = crate::engine::run(&plan, &opts, &progress, |engine| {
            with_tar_stream(&mut out, splice_into, &progress, |tar| match o.format {
                Format::DockerArchive => docker_archive::write(engine, tar).map(|_| ()),
                Format::OciArchive => oci_archive::write(engine, tar).map(|_| ()),
            })
        })?;
        out.finish()?.flush()?;
        // Closes the output file now (stdout's duplicate: fd 1 stays open).
        drop(stdout);
        stats.bytes_out = written.bytes;
        stats.bytes_spliced = written.spliced;
        summary
    };
    progress.finish();
    cache.store(&summary);
    stats.layers_from_cache = summary.layers_known;
    stats.layers_written = summary.layers_written;
    if o.run.stats {
        let _ = writeln!(io::stderr(), "nixstream: stats {}", serde_json::to_string(&stats)?);
    }
    Ok(())
}

fn push(a: &PushArgs) -> anyhow::Result<()> {
    // A conf directory (image --emit-conf) may carry its layers' digests.
    let beside = a.conf.conf.join(crate::output::confdir::DIGESTS);
    let digests = if a.conf.conf.is_dir() && beside.is_dir() { vec![beside] } else { Vec::new() };
    let known = crate::input::layerdigest::read_all(&digests)?;
    push_image(&a.conf.load()?, &a.destination, a.layer_compression.into(), &a.registry, &a.run, None, &known)
}

/// Plans the image for `conf` and pushes it (the registry destination).
/// `nar_hashes` (store path to narHash) key the layers; without them the
/// local Nix is asked.
fn push_image(
    conf: &Conf,
    destination: &str,
    compression: Compression,
    a: &RegistryArgs,
    run: &RunArgs,
    nar_hashes: Option<HashMap<String, String>>,
    known: &[crate::input::layerdigest::LayerDigestFile],
) -> anyhow::Result<()> {
    use crate::dest::registry::{self, Reference};
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
    let known =
        if known.is_empty() { Vec::new() } else { crate::input::layerdigest::known_for(&plan, known, compression) };
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
        Some(crate::dest::registry::RegistryError::Engine { source, .. }) => Some(source),
        _ => None,
    });
    let Some(EngineError::WrongDigest(w)) = engine else { return false };
    matches!(&w.origin, crate::engine::Origin::Cache { entries, .. } if entries.iter().all(|p| !p.exists()))
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
    hints: HashMap<String, crate::dest::registry::CacheHint>,
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
        let digest = crate::engine::digest::LayerDigest { size: hint.tar_size, sha256: hint.diff_id };
        let blob = crate::engine::digest::LayerDigest { size: hint.blob.size, sha256: hint.blob.digest };
        Some(Hashed {
            digest,
            blob: (self.compression != Compression::None).then_some(blob),
            unchanged_before_ns: i128::MIN,
            files: None,
            origin: crate::engine::Origin::CacheFrom(self.from.clone()),
        })
    }
}

/// What a run did, for `--stats`: what tests assert to see that the cache
/// and the splice path really worked.
#[derive(Debug, Default, serde::Serialize)]
struct Stats {
    layers: usize,
    /// Layers whose digests came from the digest cache.
    layers_from_cache: usize,
    /// Layers whose bytes were written.
    layers_written: usize,
    /// Bytes written to the output stream (before `--compress`).
    bytes_out: u64,
    /// Of those, bytes spliced from files by reference.
    bytes_spliced: u64,
    /// OCI layout: blobs written, and blobs already there (checked).
    blobs_written: usize,
    blobs_present: usize,
}

fn load_closure(c: &ClosureArgs) -> anyhow::Result<(ClosureGraph, HashSet<String>)> {
    use crate::input::limited::{read_capped_text, MAX_EXCLUDE};
    let exclude: HashSet<String> = match &c.exclude_paths {
        None => HashSet::new(),
        Some(f) => {
            let text = read_capped_text(f, "--exclude-paths file", MAX_EXCLUDE)?;
            match serde_json::from_str::<Vec<String>>(&text) {
                Ok(list) => list.into_iter().collect(),
                Err(_) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
            }
        }
    };
    // One regular file is a graph, unless it is itself a store path (a
    // file right in a store directory); anything else names store paths.
    if let [one] = c.input.as_slice() {
        let p = Path::new(one);
        let in_store = p.parent().and_then(Path::file_name).is_some_and(|d| d == "store");
        if p.is_file() && !in_store {
            return Ok((ClosureGraph::load(p)?, exclude));
        }
    }
    Ok((ClosureGraph::from_store(&c.input)?, exclude))
}

/// A plan, with what the previous release (if given) let it keep.
struct Chosen {
    planned: crate::planner::stable::Planned,
    previous: Option<Previous>,
}

/// Reads `--previous`, checked against the closure's store directory; says
/// on stderr when nothing in it can be reused.
fn load_previous(
    file: Option<&Path>,
    closure: &ClosureGraph,
    registry: &PreviousRegistry,
) -> anyhow::Result<Option<Previous>> {
    let Some(file) = file else { return Ok(None) };
    let prev = match file.to_str().filter(|f| f.starts_with("docker://")) {
        Some(reference) => previous_from_registry(reference, registry)?,
        None => crate::planner::previous::load(file)?,
    };
    if let Some(store) = crate::planner::previous::store_dir_of(closure.nodes.iter().map(|n| n.path.as_str())) {
        prev.check_store(&store)?;
    }
    if let Some(note) = prev.note() {
        let _ = writeln!(io::stderr(), "nixstream: {note}");
    }
    Ok(Some(prev))
}

/// `--previous docker://...`: the image's config, read from the registry
/// with the registry options (TLS, and `--creds` when the previous image is
/// on the registry `--creds` is for: the `--push` one, or the only one
/// named), else the credentials docker and podman keep.  A tag that is not
/// there yet (a first release) is said, and is an empty previous plan:
/// everything is new.  Anything else missing is an error.
fn previous_from_registry(reference: &str, registry: &PreviousRegistry) -> anyhow::Result<Previous> {
    use crate::dest::registry::{pull, Reference, RegistryError};
    let from = Reference::parse(reference)?;
    let opts = registry.args.client_options(&from, registry.push.as_deref(), &|_| {})?;
    let arch = registry.architecture.unwrap_or(crate::dest::manifest::host_architecture());
    match pull::fetch_image(&from, &opts, "--previous", arch) {
        Ok(image) => Ok(crate::planner::previous::from_config(reference, &image.config)?),
        Err(RegistryError::NoSuchImage { .. }) => {
            let _ = writeln!(
                io::stderr(),
                "nixstream: previous image docker://{from} does not exist (yet): planning afresh"
            );
            Ok(Previous { source: PathBuf::from(reference), ..Previous::default() })
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("--previous {reference}"))),
    }
}

/// What `image` knows about registries, for `--previous docker://...`.
struct PreviousRegistry<'a> {
    args: &'a RegistryAccess,
    /// The `--push` destination's registry.
    push: Option<String>,
    /// The image's `--architecture`, to pick from an index.
    architecture: Option<&'a str>,
}

fn note(planned: &crate::planner::stable::Planned) {
    for n in &planned.notes {
        let _ = writeln!(io::stderr(), "nixstream: {n}");
    }
}

/// Store layers left by `max_layers` once the customisation layer has one.
fn store_budget(max_layers: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(
        max_layers >= 2,
        "--max-layers {max_layers} leaves no layer for the store paths: the customisation layer takes one"
    );
    Ok(max_layers - 1)
}

fn plan_with(closure: &ClosureGraph, exclude: &HashSet<String>, l: &LayeringChoice) -> anyhow::Result<Chosen> {
    let registry = PreviousRegistry { args: &l.access, push: None, architecture: None };
    let previous = load_previous(l.previous.as_deref(), closure, &registry)?;
    let plain = |layers: Vec<Vec<String>>| crate::planner::stable::Planned { layers, ..Default::default() };
    let planned = if let Some(n) = l.auto_layer {
        anyhow::ensure!(n > 0, "--auto-layer needs at least 1 layer");
        plain(auto_layer(closure, exclude, n))
    } else if let Some(text) = &l.pipeline {
        let steps = pipeline::parse(&json_arg("pipeline", text, crate::input::limited::MAX_PIPELINE)?)?;
        plain(pipeline::plan_layers(closure, &steps, exclude)?)
    } else if l.popularity {
        let steps = pipeline::parse(&serde_json::json!([
            ["popularity_contest"],
            ["limit_layers", store_budget(l.max_layers)?]
        ]))?;
        plain(pipeline::plan_layers(closure, &steps, exclude)?)
    } else if l.stable || previous.is_some() {
        let prev = previous.as_ref().map(|p| p.layers.as_slice());
        stable::plan(closure, exclude, store_budget(l.max_layers)?, prev)?
    } else {
        plain(auto_layer(closure, exclude, store_budget(l.max_layers)?))
    };
    note(&planned);
    Ok(Chosen { planned, previous })
}

/// `--joint`: one closure per input, planned together.
fn joint_plans(c: &ClosureArgs, l: &LayeringChoice) -> anyhow::Result<Vec<(ClosureGraph, Vec<Vec<String>>)>> {
    let mut graphs = Vec::new();
    let mut exclude = HashSet::new();
    for input in &c.input {
        let one = ClosureArgs { input: vec![input.clone()], exclude_paths: c.exclude_paths.clone() };
        let (g, ex) = load_closure(&one)?;
        graphs.push(g);
        exclude = ex;
    }
    let plans = stable::plan_joint(&graphs, &exclude, store_budget(l.max_layers)?)?;
    Ok(graphs.into_iter().zip(plans).map(|(g, p)| (g, p.layers)).collect())
}

fn layers(a: &LayersArgs) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if a.layering.joint {
        let plans: Vec<Vec<Vec<String>>> = joint_plans(&a.closure, &a.layering)?.into_iter().map(|(_, l)| l).collect();
        serde_json::to_writer_pretty(&mut out, &plans)?;
        writeln!(out)?;
        return Ok(());
    }
    let l = &a.layering;
    anyhow::ensure!(
        l.previous.is_none() || (l.auto_layer.is_none() && l.pipeline.is_none() && !l.popularity),
        "`layers --previous` plans with the stable planner, which builds on it: drop --auto-layer, --pipeline or --popularity (or compare with `nixstream plan`)"
    );
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    serde_json::to_writer_pretty(&mut out, &chosen.planned.layers)?;
    writeln!(out)?;
    Ok(())
}

fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    if a.layering.joint {
        let plans = joint_plans(&a.closure, &a.layering)?;
        let mut out = io::stdout().lock();
        let shared = plans
            .iter()
            .map(|(_, l)| l)
            .skip(1)
            .map(|l| l.iter().zip(&plans[0].1).take_while(|(x, y)| x == y).count())
            .min()
            .unwrap_or(0);
        if a.json {
            let v: Vec<serde_json::Value> =
                plans.iter().map(|(g, l)| serde_json::json!({"layers": plan_json(g, l), "shared": shared})).collect();
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
            return Ok(());
        }
        for ((g, l), input) in plans.iter().zip(&a.closure.input) {
            writeln!(out, "{input}: the bottom {shared} layers are shared by all {} images", plans.len())?;
            plan_table(&mut out, g, l)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    let layers = &chosen.planned.layers;
    let mut out = io::stdout().lock();
    if let Some(prev) = &chosen.previous {
        let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
        let c = compare::compare(layers, &prev.layers, &size);
        if a.json {
            let v = serde_json::json!({
                "layers": plan_json(&closure, layers).into_iter().zip(&c.layers)
                    .map(|(mut v, lc)| { v["reused"] = lc.reused.into(); v["pulled"] = lc.pulled.into(); v })
                    .collect::<Vec<_>>(),
                "pushed": c.pushed, "pulled": c.pulled, "changed": c.changed, "total": c.total,
                "ratio": c.ratio(), "kept": chosen.planned.kept, "previous_layers": prev.layers.len(),
            });
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        } else {
            compare_table(&mut out, &closure, layers, &c)?;
        }
        return Ok(());
    }
    if a.json {
        serde_json::to_writer_pretty(&mut out, &plan_json(&closure, layers))?;
        writeln!(out)?;
        return Ok(());
    }
    plan_table(&mut out, &closure, layers)
}

fn plan_json(closure: &ClosureGraph, layers: &[Vec<String>]) -> Vec<serde_json::Value> {
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    layers.iter().enumerate().map(|(i, l)| serde_json::json!({"layer": i + 1, "paths": l, "bytes": bytes(l)})).collect()
}

/// A store path's name, without the store directory and hash.
fn short_name(p: &str) -> String {
    p.rsplit('/').next().and_then(|b| b.split_once('-')).map(|(_, n)| n.to_string()).unwrap_or_else(|| p.into())
}

/// The three largest paths of a layer, by name.
fn largest(size: &HashMap<&str, u64>, l: &[String]) -> String {
    let mut by_size: Vec<&String> = l.iter().collect();
    by_size.sort_by_key(|p| std::cmp::Reverse(size.get(p.as_str()).copied().unwrap_or(0)));
    let names: Vec<String> = by_size.iter().take(3).map(|p| short_name(p)).collect();
    let more = if l.len() > 3 { format!(" (+{} more)", l.len() - 3) } else { String::new() };
    format!("{}{more}", names.join(", "))
}

fn plan_table(out: &mut impl Write, closure: &ClosureGraph, layers: &[Vec<String>]) -> anyhow::Result<()> {
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    writeln!(out, "{:>5} {:>6} {:>10}  largest paths", "layer", "paths", "bytes")?;
    for (i, l) in layers.iter().enumerate() {
        writeln!(
            out,
            "{:>5} {:>6} {:>10}  {}",
            i + 1,
            l.len(),
            crate::output::progress::human(bytes(l)),
            largest(&size, l)
        )?;
    }
    let total: u64 = layers.iter().map(|l| bytes(l)).sum();
    let paths: usize = layers.iter().map(Vec::len).sum();
    writeln!(
        out,
        "{:>5} {:>6} {:>10}  {} layers",
        "total",
        paths,
        crate::output::progress::human(total),
        layers.len()
    )?;
    Ok(())
}

/// The new plan against the previous one: a row and a bar per layer (top
/// first, as a stack), then the totals.
fn compare_table(
    out: &mut impl Write,
    closure: &ClosureGraph,
    layers: &[Vec<String>],
    c: &compare::Comparison,
) -> anyhow::Result<()> {
    const WIDTH: u64 = 30;
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let most = c.layers.iter().map(|l| l.bytes).max().unwrap_or(0).max(1);
    writeln!(
        out,
        "{:>5} {:>6} {:>10}  {:<6} {:<4} {:<w$}  largest paths",
        "layer",
        "paths",
        "bytes",
        "",
        "pull",
        "",
        w = WIDTH as usize
    )?;
    for (i, (l, lc)) in layers.iter().zip(&c.layers).enumerate().rev() {
        let n = (lc.bytes * WIDTH).div_ceil(most).max(1) as usize;
        let bar = if lc.reused { "░".repeat(n) } else { "█".repeat(n) };
        writeln!(
            out,
            "{:>5} {:>6} {:>10}  {:<6} {:<4} {bar}{:pad$}  {}",
            i + 1,
            l.len(),
            crate::output::progress::human(lc.bytes),
            if lc.reused { "reused" } else { "new" },
            if lc.pulled { "↓" } else { "" },
            "",
            largest(&size, l),
            pad = WIDTH as usize - n,
        )?;
    }
    let reused = c.layers.iter().filter(|l| l.reused).count();
    writeln!(
        out,
        "{reused} of {} layers reused (░ reused, █ new; ↓ pulled by a host holding the previous image)",
        c.layers.len()
    )?;
    let new = c.layers.len() - reused;
    writeln!(
        out,
        "pushed            {:>10}  ({new} new layer{})",
        crate::output::progress::human(c.pushed),
        if new == 1 { "" } else { "s" }
    )?;
    writeln!(out, "pulled by a host  {:>10}", crate::output::progress::human(c.pulled))?;
    let ratio = c.ratio().map(|r| format!("pushed ÷ changed {r:.2}")).unwrap_or_else(|| "nothing changed".into());
    writeln!(out, "really changed    {:>10}  ({ratio})", crate::output::progress::human(c.changed))?;
    writeln!(out, "image             {:>10}", crate::output::progress::human(c.total))?;
    Ok(())
}

fn image(a: &ImageArgs) -> anyhow::Result<()> {
    let (closure, exclude) = load_closure(&a.closure)?;
    // nixpkgs' budget: maxLayers, less the customisation layer and the base image's layers.
    let base_layers = match &a.from_image {
        Some(f) => crate::read::baseimage::BaseImage::open(f)?.layers.len(),
        None => 0,
    };
    let used = 1 + base_layers;
    anyhow::ensure!(
        used < a.max_layers,
        "--max-layers {} leaves no layer for the store paths: the base image has {base_layers} layers and the customisation layer takes one",
        a.max_layers
    );
    let budget = a.max_layers - used;
    let layers = if let Some(p) = &a.pipeline {
        let steps = pipeline::parse(&json_arg("pipeline", p, crate::input::limited::MAX_PIPELINE)?)?;
        pipeline::plan_layers(&closure, &steps, &exclude)?
    } else if a.popularity {
        let steps = pipeline::parse(&serde_json::json!([["popularity_contest"], ["limit_layers", budget]]))?;
        pipeline::plan_layers(&closure, &steps, &exclude)?
    } else if !a.joint_with.is_empty() {
        let mut graphs = vec![closure.clone()];
        for other in &a.joint_with {
            let one = ClosureArgs { input: vec![other.clone()], exclude_paths: a.closure.exclude_paths.clone() };
            graphs.push(load_closure(&one)?.0);
        }
        stable::plan_joint(&graphs, &exclude, budget)?.swap_remove(0).layers
    } else if a.stable || a.previous.is_some() {
        let push = match &a.push {
            Some(p) => Some(crate::dest::registry::Reference::parse(p)?.registry),
            None => None,
        };
        let registry = PreviousRegistry { args: &a.registry.access, push, architecture: a.architecture.as_deref() };
        let previous = load_previous(a.previous.as_deref(), &closure, &registry)?;
        let planned = stable::plan(&closure, &exclude, budget, previous.as_ref().map(|p| p.layers.as_slice()))?;
        note(&planned);
        planned.layers
    } else {
        auto_layer(&closure, &exclude, budget)
    };
    let layers: Vec<Vec<String>> = layers.into_iter().filter(|l| !l.is_empty()).collect();
    let config = match &a.config {
        Some(c) => json_arg("config", c, crate::input::limited::MAX_CONFIG)?,
        None => serde_json::json!({}),
    };
    let tag = a.tag.clone().unwrap_or_else(|| {
        let first = a.closure.input.first().map(String::as_str).unwrap_or("image");
        let base = first.rsplit('/').next().unwrap_or(first);
        let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base).trim_end_matches(".json");
        // A store name may hold what a repository name cannot (uppercase, '+').
        let name: String =
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
        let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        format!("{}:latest", if name.is_empty() { "image" } else { name })
    });
    let v = serde_json::json!({
        "architecture": a.architecture.as_deref().unwrap_or(crate::dest::manifest::host_architecture()),
        "created": a.created,
        "mtime": a.mtime.as_deref().unwrap_or(&a.created),
        "uid": a.owner.uid, "gid": a.owner.gid, "uname": a.owner.uname, "gname": a.owner.gname,
        "store_dir": a.store_dir,
        "from_image": a.from_image,
        "repo_tag": tag,
        "customisation_layer": "(contents)",
        "config": config,
        "store_layers": layers,
    });
    let mut conf = Conf::from_value(v.clone(), None, crate::input::isotime::DateTime::now_utc())?;
    let known = crate::input::layerdigest::read_all(&a.output.known_digests)?;
    // nixpkgs' contents: a symlink tree, made in a scratch directory that
    // lives until the layer is written.
    let links = if a.contents_link.is_empty() {
        None
    } else {
        let dir = tempfile::tempdir().context("cannot make a scratch directory for --contents-link")?;
        crate::input::contents::link_tree(dir.path(), &a.contents_link)?;
        Some(dir)
    };
    let contents = links.as_ref().map(|d| d.path().to_path_buf()).or_else(|| a.contents.clone());
    if let Some(dir) = &a.emit_conf {
        let path = crate::output::confdir::write(dir, v, contents.as_deref(), conf.mtime, &known)?;
        if !a.output.run.quiet {
            let _ = writeln!(io::stderr(), "nixstream: wrote {}", path.display());
        }
        return Ok(());
    }
    conf.customisation = CustomisationSource::Contents(contents);
    let nar_hashes: HashMap<String, String> =
        closure.nodes.iter().filter_map(|n| Some((n.path.clone(), n.nar_hash.clone()?))).collect();
    if let Some(dest) = &a.push {
        let o = &a.output;
        anyhow::ensure!(
            o.format == Format::DockerArchive
                && o.oci_layout.is_none()
                && o.output.is_none()
                && o.compress == Compress::None,
            "--push sends the image to a registry: leave out --format, --oci-layout, --output and --compress"
        );
        let compression = o.layer_compression.unwrap_or(LayerCompression::Gzip).into();
        return push_image(&conf, dest, compression, &a.registry, &o.run, Some(nar_hashes), &known);
    }
    emit(&conf, &a.output, &nar_hashes, &known)
}

/// When `out` is a pipe, asks for a 1 MiB pipe buffer (the default 64 KiB
/// means a context switch per 64 KiB between us and the reader) and returns
/// true.  A refusal (an unprivileged user over /proc/sys/fs/pipe-max-size)
/// changes nothing.
fn grow_pipe(out: &std::fs::File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let pipe = out.metadata().is_ok_and(|m| m.file_type().is_fifo());
    if pipe {
        let _ = rustix::pipe::fcntl_setpipe_size(out, 1 << 20);
    }
    pipe
}

/// Standard output as a `File`, unbuffered (Rust's stdout is line-buffered,
/// which would cut large writes at newlines): a duplicate of fd 1, the same
/// open file (offset, flags, pipe); dropping it leaves fd 1 open.
fn stdout_file() -> io::Result<std::fs::File> {
    Ok(io::stdout().as_fd().try_clone_to_owned()?.into())
}
