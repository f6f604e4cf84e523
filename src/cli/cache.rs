//! The digest cache as the hashing commands (`stream`, `image`, `digest`,
//! `push`) choose it: `--cache DIR`, none with `--no-cache`, or a push's
//! default directory (none where there is no home for it, as in a Nix
//! build); and what is said when it cannot be used or written.  A cache
//! that cannot be used or written costs speed, never the image: a warning
//! (a note for a push's default one).  How a run looks layers up in it and
//! stores them is the engine's ([`crate::engine::cache_use`]).

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use crate::engine::cache::DigestCache;
use crate::engine::cache_use::CacheUse;
use crate::engine::{Blobs, Lookup, Summary};
use crate::plan::ImagePlan;

/// The digest cache for one run, and whose it is.
#[derive(Debug)]
pub(super) struct RunCache<'p> {
    used: CacheUse<'p>,
    /// The default directory of a push, not one the user named: a failure
    /// to write it is a note (none with `-q`), not a warning.
    default: Option<Quiet>,
}

/// Whether `-q` was given.
#[derive(Debug, Clone, Copy)]
struct Quiet(bool);

impl<'p> RunCache<'p> {
    /// Opens the cache.  One that cannot be used (not a directory, not
    /// creatable) costs speed, not the image: a warning.
    pub(super) fn new(
        plan: &'p ImagePlan,
        dir: Option<&Path>,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
    ) -> RunCache<'p> {
        let cache = dir.and_then(|d| match DigestCache::open(d) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = writeln!(io::stderr(), "nixstream: warning: {e} (this run goes on without the cache)");
                None
            }
        });
        RunCache { used: CacheUse::new(cache, plan, nar_hashes, blobs), default: None }
    }

    /// A push's default cache ([`crate::engine::cache::default_dir`]): none
    /// where there is no home for it (a Nix build), and a push never fails
    /// for it; one that cannot be made is one note, none with `-q`.
    pub(super) fn default_for_push(
        plan: &'p ImagePlan,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
        quiet: bool,
    ) -> RunCache<'p> {
        let cache = crate::engine::cache::default_dir().and_then(|d| match DigestCache::open_default(&d) {
            Ok(c) => Some(c),
            Err(e) => {
                if !quiet {
                    let _ = writeln!(io::stderr(), "nixstream: note: no digest cache: {e} (--no-cache or --cache DIR)");
                }
                None
            }
        });
        RunCache { used: CacheUse::new(cache, plan, nar_hashes, blobs), default: Some(Quiet(quiet)) }
    }

    /// What the engine looks layers up in, with a cache.
    pub(super) fn lookup(&self) -> Option<&dyn Lookup> {
        self.used.lookup()
    }

    /// Stores the layers this run hashed.  A cache that cannot be written
    /// costs speed, not the image: a warning.
    pub(super) fn store(&self, summary: &Summary) {
        if let Err(e) = self.used.store(summary) {
            let line = match self.default {
                None => format!("warning: {e} (the image is complete; the next run hashes again)"),
                Some(Quiet(true)) => return,
                Some(Quiet(false)) => format!("note: {e} (the push is complete; --no-cache or --cache DIR)"),
            };
            let _ = writeln!(io::stderr(), "nixstream: {line}");
        }
    }
}
