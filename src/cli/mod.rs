//! The command line: options parsed by clap, resolved into one config per
//! command, run, and mapped to an [`ExitCode`].

use std::collections::HashMap;
use std::io::{self, BufWriter, IsTerminal, Write};

use anyhow::Context;
use clap::Parser;

use crate::dest::tarstream::with_tar_stream;
use crate::dest::{docker_archive, oci_archive, oci_layout};
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineError, EngineOptions};
use crate::input::conf::{Conf, CustomisationSource};
use crate::output::compress::{Compress, Compressed};
use crate::output::progress::{Mode, Progress};
use crate::output::splice::Policy;
use crate::output::writer::Blocking;
use crate::plan::ImagePlan;
use std::os::fd::AsFd;

mod args;
mod cache;
mod docs;
mod inspect;
mod layers;
mod planning;
mod push;
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
        Command::Layers(a) => report(layers::layers(&a)),
        Command::Plan(a) => report(layers::plan(&a)),
        Command::Image(a) => report(image(&a)),
        Command::Verify(a) => report(inspect::verify(&a)),
        Command::Digest(a) => report(inspect::digest(&a)),
        Command::LayerDigest(a) => report(inspect::layer_digest(&a)),
        Command::Completions(a) => report(docs::completions(&a)),
        Command::Man(a) => report(docs::man(&a)),
        Command::Push(a) => report(push::push(&a)),
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

fn image(a: &ImageArgs) -> anyhow::Result<()> {
    let (closure, exclude) = planning::load_closure(&a.closure)?;
    let layers = planning::image_layers(a, &closure, &exclude)?;
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
        return push::push_image(&conf, dest, compression, &a.registry, &o.run, Some(nar_hashes), &known);
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
