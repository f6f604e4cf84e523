//! The command line: options parsed by clap, resolved into one config per
//! command, run, and mapped to an [`ExitCode`].

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::archive::{write_archive, ArchiveOptions};
use crate::compress::{Compress, Compressed};
use crate::conf::Conf;
use crate::plan::ImagePlan;
use crate::progress::{Mode, Progress};

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

#[derive(Parser, Debug)]
#[command(
    name = "nixstream",
    version,
    about = "Stream Nix store paths as a docker-archive image (a byte-identical, faster drop-in for nixpkgs' stream_layered_image.py)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write the image described by CONF (nixpkgs' streamLayeredImage configuration) to stdout as a docker-archive.
    Stream(StreamArgs),
}

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    /// The configuration JSON nixpkgs' streamLayeredImage writes.
    pub conf: PathBuf,
    /// Override the configuration's repo_tag (NAME:TAG).
    #[arg(short = 't', long = "repo-tag", visible_alias = "repo_tag", value_name = "NAME:TAG")]
    pub repo_tag: Option<String>,
    /// Compress the whole output stream. `zstd` lets `skopeo copy docker-archive:/dev/stdin` read from a pipe; `docker load` reads `gzip`.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: Compress,
    /// Hashing threads (default: all cores).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    /// No progress output on stderr.
    #[arg(short, long)]
    pub quiet: bool,
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
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::Success,
        Err(e) if is_broken_pipe(&e) => ExitCode::BrokenPipe,
        Err(e) => {
            let _ = writeln!(io::stderr(), "nixstream: {e:#}");
            ExitCode::Failure
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe))
        || e.downcast_ref::<crate::archive::ArchiveError>()
            .and_then(|a| a.output_error())
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn stream(a: &StreamArgs) -> anyhow::Result<()> {
    let jobs = a.jobs.unwrap_or_else(default_jobs).max(1);
    let conf = Conf::load(&a.conf, a.repo_tag.as_deref())?;
    let plan = ImagePlan::from_conf(&conf, jobs)?;
    let progress = Progress::new(Mode::detect(a.quiet), plan.layers.len());
    let stdout = stdout_file();
    let out = Compressed::new(BufWriter::with_capacity(1 << 20, &*stdout), a.compress, jobs)?;
    let mut out = out;
    write_archive(&plan, &mut out, &ArchiveOptions { jobs, known: Vec::new() }, &progress)?;
    out.finish()?.flush()?;
    progress.finish();
    Ok(())
}

/// Standard output as a `File`, unbuffered (Rust's stdout is line-buffered,
/// which would cut large writes at newlines).
fn stdout_file() -> std::mem::ManuallyDrop<std::fs::File> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop
    // keeps it from being closed when this value is dropped.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) })
}
