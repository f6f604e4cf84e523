//! Writing an image where the output options say (`stream`, and `image`
//! without `--push`): a docker-archive or oci-archive on stdout or `-o
//! FILE` (plain, or the whole stream compressed), or blobs into an OCI
//! layout directory (made again after a wrong digest-cache entry, as a
//! push is); the digest cache and `--known-digests` for the hashing pass,
//! big files spliced into an output pipe by reference, `--stats`.

use std::collections::HashMap;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;

use anyhow::Context;

use super::args::{Format, LayerCompression, OutputArgs, StreamArgs};
use super::cache::RunCache;
use super::default_jobs;
use crate::dest::tarstream::with_tar_stream;
use crate::dest::{docker_archive, oci_archive, oci_layout};
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineOptions};
use crate::input::conf::Conf;
use crate::input::layerdigest::{self, LayerDigestFile};
use crate::output::compress::{Compress, Compressed};
use crate::output::progress::{Mode, Progress};
use crate::output::splice::Policy;
use crate::output::writer::Blocking;
use crate::plan::ImagePlan;

pub(super) fn stream(a: &StreamArgs) -> anyhow::Result<()> {
    let conf = a.conf.load()?;
    let mut digests = a.output.known_digests.clone();
    // A conf directory (image --emit-conf) may carry its layers' digests.
    let beside = a.conf.conf.join(crate::output::confdir::DIGESTS);
    if a.conf.conf.is_dir() && beside.is_dir() {
        digests.push(beside);
    }
    let known = layerdigest::read_all(&digests)?;
    emit(&conf, &a.output, &HashMap::new(), &known)
}

/// The most layers an image Docker loads may have: moby's layer store
/// refuses a deeper chain ("max depth exceeded"; tested in tests/errors.rs).
pub const MAX_DOCKER_LAYERS: usize = 125;

/// Plans the image for `conf` and writes it where `o` says.  `nar_hashes`
/// (store path to narHash, possibly empty) keys the digest cache where it
/// covers a whole layer.
pub(super) fn emit(
    conf: &Conf,
    o: &OutputArgs,
    nar_hashes: &HashMap<String, String>,
    known: &[LayerDigestFile],
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
    let cache = RunCache::new(&plan, o.run.cache.as_deref(), nar_hashes, blobs);
    let progress = Progress::new(Mode::detect(o.run.quiet), plan.layers.len());
    let mut opts =
        EngineOptions { jobs, blobs, lookup: cache.lookup(), nar_hashes: Some(nar_hashes), ..Default::default() };
    if !known.is_empty() {
        opts.known = layerdigest::known_for(&plan, known, blobs.compression());
    }
    let mut stats = Stats { layers: plan.layers.len(), ..Default::default() };

    let summary = if let Some(dir) = &o.oci_layout {
        // The hashing pass writes each blob into the layout as it makes it.
        let layout = oci_layout::Layout::open(dir)?;
        opts.blob_sink = Some(&layout);
        // No streaming pass follows for the blobs written so: the hashing
        // pass checks every entry against the listing itself.
        opts.check_in_hashing_pass = true;
        // index.json is written last: a run stopped by a wrong digest-cache
        // entry (removed since) can be made again, as a push is.
        let (written, summary) = crate::engine::cache_use::run_again_after_wrong_entry(
            &plan,
            &opts,
            &progress,
            |engine| layout.write(engine),
            |e| {
                let _ = writeln!(io::stderr(), "nixstream: warning: {e}; writing the layout again without that entry");
            },
        )?;
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
