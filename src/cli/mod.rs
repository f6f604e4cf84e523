//! The command line: options parsed by clap (`args.rs`), each command run
//! by the module of its stage, and any error reported on one line of stderr
//! and mapped to an [`ExitCode`].  `anyhow` lives here and nowhere else:
//! the library's modules return their own typed errors.
//!
//! The commands: `stream` (`emit.rs`); `image` (`image.rs`, planning with
//! `planning.rs`, writing with `emit.rs` or pushing with `push.rs`);
//! `push` (`push.rs`, reaching the registry with `registry.rs`); `layers`
//! and `plan` (`layers.rs`); `digest`, `verify` and `layer-digest`
//! (`inspect.rs`); `completions` and `man` (`docs.rs`).  `cache.rs` chooses
//! the digest cache the hashing commands hand the engine, and words its
//! warnings.

use std::io::{self, Write};

use clap::Parser;

use crate::engine::EngineError;

mod args;
mod cache;
mod docs;
mod emit;
mod image;
mod inspect;
mod layers;
mod planning;
mod push;
mod registry;

pub use args::{
    BaseImageArg, Cli, ClosureArgs, Command, CompletionsArgs, ConfArgs, DigestArgs, Format, ImageArgs,
    LayerCompression, LayerDigestArgs, LayeringChoice, LayersArgs, ManArgs, ManifestFormat, OutputArgs, OwnerArgs,
    PlanArgs, PushArgs, RegistryAccess, RegistryArgs, RunArgs, StreamArgs, VerifyArgs,
};
pub use emit::MAX_DOCKER_LAYERS;

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
        Command::Stream(a) => report(emit::stream(&a)),
        Command::Layers(a) => report(layers::layers(&a)),
        Command::Plan(a) => report(layers::plan(&a)),
        Command::Image(a) => report(image::image(&a)),
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

/// The hashing threads when `-j` is not given: one per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
