//! The registry destination: an image pushed over the OCI distribution
//! protocol, uploading only the blobs the registry lacks.
//!
//! [`reference`](mod@reference) parses `docker://HOST[:PORT]/REPO:TAG`; [`auth`] finds
//! credentials and reads challenges; [`client`] speaks HTTP(S) with them
//! (TLS verified unless the user says otherwise); [`push`](mod@push) is the protocol:
//! blobs first (`HEAD`, mount, or upload streamed from
//! [`crate::engine::image::Image::write_layer`]), the manifest last; [`pull`]
//! reads an image's manifest and config back (`--cache-from`, `--previous`);
//! [`cache_from`] looks layers up in `--cache-from`'s annotations.

pub mod auth;
pub mod cache_from;
pub mod client;
pub mod pull;
pub mod push;
pub mod reference;

pub use cache_from::HintLookup;
pub use push::{
    fetch_cache_hints, push, CacheHint, Outcome, PushOptions, PushSummary, LAYER_KEY_ANNOTATION,
    LAYER_TAR_SIZE_ANNOTATION,
};
pub use reference::Reference;

/// What went wrong talking to a registry.  Every variant names the
/// registry; the ones about a blob name the layer.  No variant carries a
/// credential: they are kept in [`auth::Secret`] and never formatted.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("registry {registry}: {what}: {why}")]
    Transport { registry: String, what: String, why: String, retryable: bool },
    /// A small request (`GET`, `HEAD`) got no answer in time: the registry
    /// is down or hung.  Tried again inside a push (a passing stall), not
    /// when first reaching the registry (where it would only wait again).
    #[error("registry {registry}: {what}: no answer within {secs} s (is the registry up?)")]
    NoAnswer { registry: String, what: String, secs: f64 },
    #[error("registry {registry}: {what}: HTTP {status}{}", registry_says(code, message))]
    Status { registry: String, what: String, status: u16, code: Option<String>, message: Option<String> },
    #[error("registry {registry}: {what}")]
    Unauthorized { registry: String, what: String },
    /// The tag names no image (404 to its manifest); other things missing
    /// are [`RegistryError::Status`].
    #[error("registry {registry}: {what}: no such image (HTTP 404{})", registry_says(code, message))]
    NoSuchImage { registry: String, what: String, code: Option<String>, message: Option<String> },
    #[error("registry {registry}: {what}")]
    Protocol { registry: String, what: String },
    #[error("registry {registry}: TLS setup: {why}")]
    TlsSetup { registry: String, why: String },
    /// `layer` counts from 1, as progress lines and the engine's errors do.
    #[error("layer {layer} ({digest}): {source}")]
    Layer {
        layer: usize,
        digest: String,
        #[source]
        source: Box<RegistryError>,
    },
    /// The engine's error names its layer (or file) itself.
    #[error("{source}")]
    Engine {
        /// Counted from 0, as [`crate::engine::image::Image`] counts.
        layer: usize,
        #[source]
        source: crate::engine::image::EngineError,
    },
    #[error("image config: {0}")]
    Config(#[source] crate::engine::image::EngineError),
    #[error("{0}")]
    Usage(String),
}

fn registry_says(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(c), Some(m)) => format!(" {c}: {m}"),
        (Some(c), None) => format!(" {c}"),
        (None, Some(m)) => format!(": {m}"),
        (None, None) => String::new(),
    }
}

/// The engine's error, where the push stopped on a layer's bytes or
/// digests ([`RegistryError::Engine`]).
impl crate::engine::cache_use::EngineCause for RegistryError {
    fn engine_error(&self) -> Option<&crate::engine::EngineError> {
        match self {
            RegistryError::Engine { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl RegistryError {
    /// Worth another try: a timeout, throttling, a server error, a dropped
    /// connection.  (A 401 after a token refresh is retried by the client.)
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { retryable, .. } => *retryable,
            RegistryError::NoAnswer { .. } => true,
            RegistryError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            RegistryError::Layer { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}
