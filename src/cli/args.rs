//! The command line's shape: the clap structs of every command and option
//! (their doc comments are the `--help` text and the man page), and the few
//! helpers that turn an option's text into a value (`parse_size`,
//! `json_arg`, `ConfArgs::load`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::engine::image::Compression;
use crate::input::conf::Conf;
use crate::output::compress::Compress;

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
    #[command(after_help = EXAMPLES_STREAM)]
    Stream(StreamArgs),
    /// Print the layers planned for a closure, as a JSON list of lists of store paths (the format nixpkgs' planners print).
    #[command(after_help = EXAMPLES_LAYERS)]
    Layers(LayersArgs),
    /// Show the layers planned for a closure: paths, bytes and largest paths per layer.
    #[command(after_help = EXAMPLES_PLAN)]
    Plan(PlanArgs),
    /// Build an image from a closure in one command: plan its layers and stream the docker-archive to stdout.
    #[command(after_help = EXAMPLES_IMAGE)]
    Image(Box<ImageArgs>),
    /// Print the image ID and every layer's diff_id for CONF without writing the archive (the hashing pass alone).
    #[command(after_help = EXAMPLES_DIGEST)]
    Digest(DigestArgs),
    /// Push the image described by CONF to a registry (docker://HOST[:PORT]/REPO:TAG), uploading only the blobs it lacks, streamed from the store: no archive, no temporary file.
    #[command(after_help = EXAMPLES_PUSH)]
    Push(Box<PushArgs>),
    /// Check a docker-archive or oci-archive (a file, or - for stdin; plain or compressed) or an OCI layout directory: every blob and layer against its digest, size and diff_id, the manifests' shape. Exit 0 only when everything matches.
    #[command(after_help = EXAMPLES_VERIFY)]
    Verify(VerifyArgs),
    /// Compute one store layer's digests (diff_id, size, each file's xxh3) into a small JSON file that `stream --known-digests` takes: the builder of the Nix library's per-layer digest derivations.
    #[command(after_help = EXAMPLES_LAYER_DIGEST)]
    LayerDigest(LayerDigestArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(after_help = EXAMPLES_COMPLETIONS)]
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one page per command into a directory.
    #[command(after_help = EXAMPLES_MAN)]
    Man(ManArgs),
}

const EXAMPLES_STREAM: &str = "Examples:
  nixstream stream $(nix-build -A myImage) | docker load      # a streamLayeredImage result, as is
  nixstream stream -o image.tar ./result                      # into a file
  nixstream stream --compress zstd conf.json | skopeo copy docker-archive:/dev/stdin oci:img:latest";
const EXAMPLES_LAYERS: &str = "Examples:
  nixstream layers /nix/store/...-app > release-1.json
  nixstream layers /nix/store/...-app-2 --previous release-1.json
  nixstream layers graph.json --pipeline '[[\"popularity_contest\"], [\"limit_layers\", 99]]'";
const EXAMPLES_PLAN: &str = "Examples:
  nixstream plan /nix/store/...-app-2 --previous app-1.tar
  nixstream plan /nix/store/...-svc-a /nix/store/...-svc-b --joint --previous plans-1.json
  nixstream plan /nix/store/...-app --from-image base.tar --max-layers 60 --json";
const EXAMPLES_IMAGE: &str = "Examples:
  nixstream image /nix/store/...-app --config '{\"Cmd\": [\"/nix/store/...-app/bin/app\"]}' | docker load
  nixstream image /nix/store/...-app --contents-link /nix/store/...-app -t app:1 -o app.tar
  nixstream image /nix/store/...-app --emit-conf app-conf && nixstream stream app-conf | docker load";
const EXAMPLES_DIGEST: &str = "Examples:
  nixstream digest ./result
  nixstream digest --json --cache ~/.cache/nixstream conf.json";
const EXAMPLES_PUSH: &str = "Examples:
  nixstream push ./result docker://registry.example.com/team/app:1.0
  nixstream push --cache-from docker://registry.example.com/team/app:main ./result docker://registry.example.com/team/app:pr-42
  echo \"$TOKEN\" | nixstream push --creds ci --password-stdin ./result docker://localhost:5000/app:latest
  nixstream image /nix/store/...-app --push docker://registry.example.com/team/app:1.0";
const EXAMPLES_VERIFY: &str = "Examples:
  nixstream verify image.tar
  nixstream stream ./result | nixstream verify -";
const EXAMPLES_LAYER_DIGEST: &str = "Examples:
  nixstream layer-digest /nix/store/...-glibc -o glibc.json
  nixstream layer-digest --uid 1000 --uname app /nix/store/...-app /nix/store/...-data -o app.json
  nixstream stream --known-digests glibc.json --known-digests app.json conf.json | docker load";
const EXAMPLES_COMPLETIONS: &str = "Examples:
  nixstream completions bash > /etc/bash_completion.d/nixstream
  nixstream completions zsh > \"${fpath[1]}/_nixstream\"
  nixstream completions fish > ~/.config/fish/completions/nixstream.fish";
const EXAMPLES_MAN: &str = "Examples:
  nixstream man | man -l -
  nixstream man --dir /usr/local/share/man/man1";

/// Owner of every store-layer entry, as nixpkgs' uid/gid/uname/gname.
#[derive(clap::Args, Debug)]
pub struct OwnerArgs {
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    #[arg(long, default_value = "root")]
    pub uname: String,
    #[arg(long, default_value = "root")]
    pub gname: String,
}

#[derive(clap::Args, Debug)]
pub struct LayerDigestArgs {
    /// The layer's store paths, in the layer's order.
    #[arg(required = true, value_name = "STORE_PATH")]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub owner: OwnerArgs,
    /// File modification time in the layer (ISO 8601), as the image's mtime.
    #[arg(long, default_value = "1970-01-01T00:00:01Z")]
    pub mtime: String,
    /// The Nix store directory.
    #[arg(long, default_value = "/nix/store")]
    pub store_dir: PathBuf,
    /// Write the JSON to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also the digest of the layer compressed so, for the OCI outputs (repeatable).
    #[arg(long, value_enum, value_name = "gzip|zstd")]
    pub layer_compression: Vec<LayerCompression>,
    /// Hashing threads (default: all cores).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    /// No progress output on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write nixstream.1 and a nixstream-COMMAND.1 per command into DIR instead of printing nixstream.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct DigestArgs {
    #[command(flatten)]
    pub conf: ConfArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Print JSON: {"id", "config", "layers": [{"path", "diff_id", "size"}]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The archive (docker-archive or oci-archive), an OCI layout directory, or - for standard input.
    #[arg(value_name = "ARCHIVE|DIR|-")]
    pub archive: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print no report: the exit status (and one line on stderr for a problem) says it all.
    #[arg(short, long)]
    pub quiet: bool,
    /// Fail on warnings too (layer entries that would land outside the root).
    #[arg(long)]
    pub strict: bool,
}

/// Where the closure comes from.
#[derive(clap::Args, Debug)]
pub struct ClosureArgs {
    /// A closure graph file (exportReferencesGraph's {"graph": ...} or {"closure": ...}, or `nix path-info --json --recursive` output; - reads it from stdin), or store paths whose closure is asked of the local Nix.
    #[arg(required = true, value_name = "GRAPH|STORE_PATH")]
    pub input: Vec<String>,
    /// Leave these store paths out: a file with one path per line, or a JSON list.
    #[arg(long, value_name = "FILE")]
    pub exclude_paths: Option<PathBuf>,
}

/// The base image of `image`, and of `layers` and `plan`, whose budget
/// its layers lower as they lower the image's.
#[derive(clap::Args, Debug, Default)]
pub struct BaseImageArg {
    /// A base image (docker-archive, plain or compressed): its layers come first and count in --max-layers.
    #[arg(long, value_name = "FILE")]
    pub from_image: Option<PathBuf>,
}

/// The planner of `layers` and `plan`.  Without one they plan as `image`
/// does: the stable planner within --max-layers (less --from-image's
/// layers), on --previous when given.
#[derive(clap::Args, Debug)]
pub struct LayeringChoice {
    /// A layering pipeline, as nixpkgs' layeringPipeline takes it: JSON text, or @FILE. Matches nixpkgs' flatten-references-graph.
    #[arg(long, value_name = "JSON|@FILE", group = "layering")]
    pub pipeline: Option<String>,
    /// nixpkgs' size-based auto-layer (auto-layer.py) with at most N layers.
    #[arg(long, value_name = "N", group = "layering")]
    pub auto_layer: Option<usize>,
    /// The popularity contest ([["popularity_contest"], ["limit_layers", N]]) within --max-layers.
    #[arg(long, group = "layering")]
    pub popularity: bool,
    /// The stable planner, the default: layers that survive releases, built on --previous when given.
    #[arg(long, group = "layering")]
    pub stable: bool,
    /// The layer budget when no --auto-layer N is given, as `image --max-layers`: at most N layers in all, one of them the customisation layer, and the --from-image base's layers count too. The stable planner may use fewer (half of them are kept for the application's part of the closure).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_layers: usize,
    #[command(flatten)]
    pub base: BaseImageArg,
    /// The previous release's layers: a JSON list of lists (as `layers` prints) or an image (docker-archive or oci-archive file, OCI layout directory, PATH:NAME for one of several images in it, or docker://REGISTRY/REPO:TAG: see the registry options); - reads either from stdin. The stable planner keeps what it can of them; `plan` compares with them. With --joint, once per image in any order (each goes to the image it shares most paths with), or the list of plans `layers --joint` prints.
    #[arg(long, value_name = "PLAN|IMAGE", action = clap::ArgAction::Append)]
    pub previous: Vec<PathBuf>,
    /// Plan every input as its own image, at once, so the paths all of them hold are the same bottom layers of each (stable planner).
    #[arg(long, conflicts_with_all = ["pipeline", "auto_layer", "popularity"])]
    pub joint: bool,
    #[command(flatten, next_help_heading = "Registry options (with --previous docker://...)")]
    pub access: RegistryAccess,
}

#[derive(clap::Args, Debug)]
pub struct LayersArgs {
    #[command(flatten)]
    pub closure: ClosureArgs,
    #[command(flatten)]
    pub layering: LayeringChoice,
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub closure: ClosureArgs,
    /// Print the plan as JSON: [{"layer", "paths", "bytes"}], or with --from-image {"layers": [...], "base_layers"}; with --previous, {"layers": [{..., "reused", "pulled"}], "pushed", "pulled", "changed", "total", "ratio", "kept", "previous_layers", "base_layers"}; with --joint, [{"layers", "shared", "base_layers"}] (and with --previous each image's comparison), one per input in order. "layer" counts store layers from 1, above the base's "base_layers".
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub layering: LayeringChoice,
}

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    #[command(flatten)]
    pub closure: ClosureArgs,
    /// At most this many layers in all, as nixpkgs' maxLayers: one goes to the customisation layer, and the base image's layers count too. The stable planner may use fewer (half of them are kept for the application's part of the closure).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_layers: usize,
    /// Plan with nixpkgs' size-based auto-layer (what current nixpkgs' streamLayeredImage does without a layeringPipeline).
    #[arg(long, group = "image_layering")]
    pub auto_layer: bool,
    /// Plan with the popularity contest ([["popularity_contest"], ["limit_layers", N]]), nixpkgs' default before auto-layer.
    #[arg(long, group = "image_layering")]
    pub popularity: bool,
    /// Plan with this layering pipeline (JSON text or @FILE), as nixpkgs' layeringPipeline.
    #[arg(long, value_name = "JSON|@FILE", group = "image_layering")]
    pub pipeline: Option<String>,
    /// Plan with the stable planner, the default: layers that survive releases, built on --previous when given.
    #[arg(long, group = "image_layering")]
    pub stable: bool,
    /// The previous release's layers (a JSON plan as `layers` prints, an image archive or OCI layout directory, PATH:NAME for one of several images in it, or docker://REGISTRY/REPO:TAG; - reads either from stdin): the stable planner keeps every one still whole, at the bottom. With --joint-with, once per image in any order (each goes to the image it shares most paths with), or the list of plans `layers --joint` prints.
    #[arg(long, value_name = "PLAN|IMAGE", action = clap::ArgAction::Append, conflicts_with_all = ["auto_layer", "popularity", "pipeline"])]
    pub previous: Vec<PathBuf>,
    /// Plan this image together with another image's closure (a closure graph or store path; repeatable), as `layers --joint` does: the store paths all of them hold become the same bottom layers of each, byte for byte, when each image is built with the same --max-layers and ownership options.
    #[arg(long = "joint-with", value_name = "GRAPH|STORE_PATH", conflicts_with_all = ["auto_layer", "popularity", "pipeline"])]
    pub joint_with: Vec<String>,
    /// The image config (Cmd, Env, ...) as a JSON object, or @FILE.
    #[arg(long, value_name = "JSON|@FILE")]
    pub config: Option<String>,
    /// The image's NAME:TAG (default: the first store path's name, tag "latest").
    #[arg(short = 't', long = "tag", value_name = "NAME:TAG")]
    pub tag: Option<String>,
    #[command(flatten)]
    pub base: BaseImageArg,
    /// Files to place at / (the customisation layer): sorted, with --mtime and numeric owners 0:0.
    #[arg(long, value_name = "DIR", conflicts_with = "contents_link")]
    pub contents: Option<PathBuf>,
    /// As nixpkgs' `contents`: merge this store path's tree at / in the customisation layer as symlinks into the store (repeatable; the first path listed wins a name).
    #[arg(long, value_name = "STORE_PATH")]
    pub contents_link: Vec<PathBuf>,
    /// Write a stream configuration into DIR instead of the archive: DIR/conf.json with the planned layers and DIR/customisation/{layer.tar,checksum}; `nixstream stream DIR` streams it later.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["output", "oci_layout", "format", "compress"])]
    pub emit_conf: Option<PathBuf>,
    /// Creation time (ISO 8601 or "now").
    #[arg(long, default_value = "1970-01-01T00:00:01Z")]
    pub created: String,
    /// File modification time in the layers (ISO 8601 or "now"; default: --created).
    #[arg(long)]
    pub mtime: Option<String>,
    #[command(flatten)]
    pub owner: OwnerArgs,
    /// Image architecture (default: this machine's, in Go's naming).
    #[arg(long)]
    pub architecture: Option<String>,
    /// The Nix store directory.
    #[arg(long, default_value = "/nix/store")]
    pub store_dir: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Push the image to this registry (docker://HOST[:PORT]/REPO:TAG) instead of writing it to stdout, as `nixstream push` does; layers compressed with --layer-compression (default gzip).
    #[arg(long, value_name = "docker://HOST[:PORT]/REPO:TAG")]
    pub push: Option<String>,
    #[command(flatten, next_help_heading = "Registry options (with --push or --previous docker://...)")]
    pub registry: RegistryArgs,
}

/// The output format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A `docker save` archive, byte for byte as nixpkgs' stream_layered_image.py writes it.
    DockerArchive,
    /// An OCI image layout as a tar (what `skopeo copy oci-archive:` and `podman load` read).
    OciArchive,
}

/// Layer compression of the OCI outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl From<LayerCompression> for Compression {
    fn from(c: LayerCompression) -> Compression {
        match c {
            LayerCompression::None => Compression::None,
            LayerCompression::Gzip => Compression::Gzip,
            LayerCompression::Zstd => Compression::Zstd,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct OutputArgs {
    /// The format written to stdout.
    #[arg(long, value_enum, default_value = "docker-archive")]
    pub format: Format,
    /// Write the image into this OCI image layout directory (created if missing; other images in it are kept, a tag already there is replaced) instead of stdout.
    #[arg(long, value_name = "DIR")]
    pub oci_layout: Option<PathBuf>,
    /// Layer compression of the OCI outputs (gzip: every client reads it; zstd: faster and smaller, read by newer clients). Deterministic whatever --jobs.
    #[arg(long, value_enum, value_name = "none|gzip|zstd")]
    pub layer_compression: Option<LayerCompression>,
    /// Layer digests computed elsewhere (`nixstream layer-digest` files, or directories of them): a store layer one describes exactly skips the hashing pass and is hashed again as it is written, the run stopping before manifest.json if it differs (docker-archive output).
    #[arg(long, value_name = "FILE|DIR")]
    pub known_digests: Vec<PathBuf>,
    /// Write the image to FILE instead of standard output (docker-archive and oci-archive).
    #[arg(short = 'o', long = "output", value_name = "FILE", conflicts_with = "oci_layout")]
    pub output: Option<PathBuf>,
    /// Compress the whole output stream. `zstd` lets `skopeo copy docker-archive:/dev/stdin` read from a pipe; `docker load` reads `gzip`.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: Compress,
    /// Read and check every byte of every file, instead of splicing big, settled files (64 KiB and more, unchanged for 2 s) into an output pipe by reference, checking their metadata (ctime included) when opened and once the consumer has read them.
    #[arg(long)]
    pub no_splice: bool,
    /// Smallest file to splice (for tests).
    #[arg(long, hide = true, value_name = "BYTES", default_value_t = crate::output::splice::MIN_SIZE)]
    pub splice_min: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How a hashing pass runs: `stream`, `image` and `digest` take these.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Hashing threads (default: all cores).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    /// No progress output on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print what the run did (layers from the cache, bytes spliced, blobs written) as one JSON line on stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Keep layer digests in DIR, so a later run skips the hashing pass for layers whose files are unchanged (keyed by narHash when the closure gives one, else by every file's identity; every file is still checked while streaming). Safe to share between runs. A push uses $XDG_CACHE_HOME/nixstream (~/.cache/nixstream) without it; see docs/cache.md.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// No digest cache, not even a push's default one.
    #[arg(long, conflicts_with = "cache")]
    pub no_cache: bool,
}

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub conf: ConfArgs,
    /// Where to push: docker://HOST[:PORT]/REPO:TAG (plain HTTP only for a loopback host or with --insecure).
    #[arg(value_name = "docker://HOST[:PORT]/REPO:TAG")]
    pub destination: String,
    /// Layer compression (gzip: every client reads it; zstd: faster and smaller, read by newer clients).
    #[arg(long, value_enum, value_name = "none|gzip|zstd", default_value = "gzip")]
    pub layer_compression: LayerCompression,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How to reach a registry: credentials and TLS (for a push, and for
/// `--previous docker://...`).
#[derive(clap::Args, Debug, Default)]
pub struct RegistryAccess {
    /// Credentials, USER:PASSWORD (or USER with --password-stdin). Default: podman's auth.json ($REGISTRY_AUTH_FILE), docker's config.json ($DOCKER_CONFIG), their credential helpers.
    #[arg(long, value_name = "USER[:PASSWORD]")]
    pub creds: Option<String>,
    /// Read the password of --creds USER from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Trust the CAs in this directory (*.crt; a *.cert/*.key pair is the client certificate) or this PEM file, besides the system's.
    #[arg(long, value_name = "DIR|FILE")]
    pub cert_dir: Option<PathBuf>,
    /// Allow plain HTTP and do not check the registry's certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Check the registry's certificate (false: as --insecure).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_verify: bool,
}

/// How to talk to a registry: `push` and `image --push` take these.
#[derive(clap::Args, Debug)]
pub struct RegistryArgs {
    /// The manifest format: OCI, or Docker schema 2 (gzip or uncompressed layers only).
    #[arg(long, value_enum, value_name = "oci|docker", default_value = "oci")]
    pub manifest_format: ManifestFormat,
    /// Mount blobs the registry already holds in this repository (of the same registry) instead of uploading them. Repeatable.
    #[arg(long = "mount-from", value_name = "REPO")]
    pub mount_from: Vec<String>,
    /// An image pushed earlier by nixstream (any repository, any registry you trust as much as this one): store layers whose content key (listing, narHashes, owner, compressor) matches one of its layer annotations take their digests from it and are not read at all when the registry has them. See docs/push.md.
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Option<String>,
    #[command(flatten)]
    pub access: RegistryAccess,
    /// Upload each blob in PATCH requests of this size (e.g. 8MiB) instead of one streamed PATCH; used anyway, at 8 MiB, when a registry refuses the streamed one.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Compress each layer whose digests are not known (no --cache or --cache-from hit) once, uploading it while the hashing pass makes it, instead of hashing first and uploading only what the registry lacks (twice the compression for new layers, but nothing sent that is already there). Faster for a first push to an empty registry; sends every such layer even if the registry has it. See docs/push.md.
    #[arg(long)]
    pub compress_once: bool,
    /// Retries of a blob or the manifest after a timeout, 408, 429, 5xx or a dropped connection (with doubling waits from 0.5 s).
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
}

/// The manifest format of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ManifestFormat {
    Oci,
    Docker,
}

/// `123`, `64KiB`, `8M`, `1g` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 8MiB)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}`: unknown unit (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(1 << shift).filter(|&v| v > 0).ok_or_else(|| format!("`{s}`: out of range"))
}

/// The configuration, as `stream` and `digest` take it.
#[derive(clap::Args, Debug)]
pub struct ConfArgs {
    /// The configuration JSON nixpkgs' streamLayeredImage writes, or the script `nix-build` of a streamLayeredImage gives (./result), or a directory holding conf.json (what `nixstream image --emit-conf` and the Nix library's streamImage write).
    #[arg(value_name = "CONF|RESULT")]
    pub conf: PathBuf,
    /// Override the configuration's repo_tag (NAME:TAG).
    #[arg(short = 't', long = "repo-tag", visible_alias = "repo_tag", value_name = "NAME:TAG")]
    pub repo_tag: Option<String>,
}

impl ConfArgs {
    pub(super) fn load(&self) -> anyhow::Result<Conf> {
        // `nix-build` of a streamLayeredImage gives its wrapper script.
        let found = crate::input::wrapper::resolve(&self.conf)?;
        let repo_tag = self.repo_tag.as_deref().or(found.repo_tag.as_deref());
        Ok(Conf::load(&found.conf, repo_tag)?)
    }
}

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub conf: ConfArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// JSON text, or the contents of @FILE (at most `limit` bytes).
pub(super) fn json_arg(what: &'static str, text: &str, limit: u64) -> anyhow::Result<serde_json::Value> {
    use crate::input::limited::read_capped_text;
    let (source, body) = match text.strip_prefix('@') {
        Some(file) => (file.to_string(), read_capped_text(Path::new(file), what, limit)?),
        None => (format!("--{what}"), text.to_string()),
    };
    serde_json::from_str(&body).with_context(|| format!("{what} ({source}) is not valid JSON"))
}
