//! The digest cache as one run uses it (`stream`, `image`, `digest`,
//! `push`): opening `--cache DIR` or a push's default directory, looking
//! each store layer up as the engine lists it, and storing what the run
//! hashed.  A cache that cannot be used or written costs speed, never the
//! image: a warning (a note for a push's default one).

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use crate::engine::cache::{CachedLayer, DigestCache};
use crate::engine::image::Compression;
use crate::engine::{Blobs, Hashed, Lookup, Summary};
use crate::plan::{ImagePlan, PlannedLayer};
use crate::store::walk::{Kind, Listing};

/// The digest cache for one run: each store layer looked up once it is
/// listed (by a hashing worker, so the first byte and the other layers do
/// not wait for every walk), the keys and hits remembered, and what was
/// hashed stored at the end.
#[derive(Debug)]
pub(super) struct CacheUse<'p> {
    cache: Option<DigestCache>,
    plan: &'p ImagePlan,
    nar_hashes: &'p HashMap<String, String>,
    blobs: Blobs,
    /// Per plan index: the key made from the listing, and whether it hit.
    keys: std::sync::Mutex<Vec<(Option<[u8; 32]>, bool)>>,
    /// Taken before any layer is listed: what entries stored by this run
    /// vouch for ([`CachedLayer::unchanged_before_ns`]).
    settled_before_ns: i128,
    /// The default directory of a push, not one the user named: a failure
    /// to write it is a note (none with `-q`), not a warning.
    default: Option<Quiet>,
}

/// Whether `-q` was given.
#[derive(Debug, Clone, Copy)]
struct Quiet(bool);

impl<'p> CacheUse<'p> {
    /// Opens the cache.  One that cannot be used (not a directory, not
    /// creatable) costs speed, not the image: a warning.
    pub(super) fn new(
        plan: &'p ImagePlan,
        dir: Option<&Path>,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
    ) -> anyhow::Result<CacheUse<'p>> {
        let cache = dir.and_then(|d| match DigestCache::open(d) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = writeln!(io::stderr(), "nixstream: warning: {e} (this run goes on without the cache)");
                None
            }
        });
        Ok(CacheUse::with(cache, plan, nar_hashes, blobs, None))
    }

    /// A push's default cache ([`crate::engine::cache::default_dir`]): none
    /// where there is no home for it (a Nix build), and a push never fails
    /// for it; one that cannot be made is one note, none with `-q`.
    pub(super) fn default_for_push(
        plan: &'p ImagePlan,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
        quiet: bool,
    ) -> CacheUse<'p> {
        let cache = crate::engine::cache::default_dir().and_then(|d| match DigestCache::open_default(&d) {
            Ok(c) => Some(c),
            Err(e) => {
                if !quiet {
                    let _ = writeln!(io::stderr(), "nixstream: note: no digest cache: {e} (--no-cache or --cache DIR)");
                }
                None
            }
        });
        CacheUse::with(cache, plan, nar_hashes, blobs, Some(Quiet(quiet)))
    }

    fn with(
        cache: Option<DigestCache>,
        plan: &'p ImagePlan,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
        default: Option<Quiet>,
    ) -> CacheUse<'p> {
        CacheUse {
            cache,
            plan,
            nar_hashes,
            blobs,
            keys: std::sync::Mutex::new(vec![(None, false); plan.layers.len()]),
            settled_before_ns: crate::output::splice::settled_before_ns(std::time::SystemTime::now()),
            default,
        }
    }

    /// What the engine looks layers up in, with a cache.
    pub(super) fn lookup(&self) -> Option<&dyn Lookup> {
        self.cache.as_ref().map(|_| self as &dyn Lookup)
    }

    /// Stores the layers this run hashed (and their encoded blobs' digests).
    /// A cache that cannot be written costs speed, not the image: a warning.
    pub(super) fn store(&self, summary: &Summary) {
        let Some(c) = &self.cache else { return };
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (key, hit)) in keys.iter().enumerate() {
            let Some(key) = key else { continue };
            let mut entries = Vec::new();
            if let (false, Some(files)) = (hit, &summary.files[i]) {
                let entry = CachedLayer {
                    digest: summary.digests[i],
                    files: files.clone(),
                    unchanged_before_ns: self.settled_before_ns,
                };
                entries.push((*key, entry));
            }
            // A hit had its blob entry already (else it was no hit).
            if let (false, Some(blob), true) = (hit, summary.blobs[i], summary.files[i].is_some()) {
                let bkey = crate::engine::cache::blob_key(key, self.blobs.compression());
                entries.push((bkey, CachedLayer { digest: blob, files: Vec::new(), unchanged_before_ns: 0 }));
            }
            for (k, entry) in entries {
                if let Err(e) = c.put(&k, &entry) {
                    let line = match self.default {
                        None => format!("warning: {e} (the image is complete; the next run hashes again)"),
                        Some(Quiet(true)) => return,
                        Some(Quiet(false)) => format!("note: {e} (the push is complete; --no-cache or --cache DIR)"),
                    };
                    let _ = writeln!(io::stderr(), "nixstream: {line}");
                    return;
                }
            }
        }
    }
}

impl Lookup for CacheUse<'_> {
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed> {
        let c = self.cache.as_ref()?;
        let PlannedLayer::Store { paths_text, owner, .. } = &self.plan.layers[layer] else { return None };
        let owner = owner.as_ref().unwrap_or(&self.plan.owner);
        let nar: Option<Vec<(&str, &str)>> =
            paths_text.iter().map(|p| self.nar_hashes.get(p).map(|h| (p.as_str(), h.as_str()))).collect();
        let key = crate::engine::cache::layer_key(listing, owner, nar.as_deref());
        let files = listing.entries.iter().filter(|e| e.kind == Kind::File).count();
        let hit = c.get(&key, files);
        // An encoded blob needs its own entry too; without it the layer is
        // hashed (and both entries stored) again.
        let blob = match self.blobs.compression() {
            Compression::None => None,
            comp => c.get(&crate::engine::cache::blob_key(&key, comp), 0).map(|b| b.digest),
        };
        let usable = hit.is_some() && (self.blobs.compression() == Compression::None || blob.is_some());
        self.keys.lock().unwrap_or_else(|p| p.into_inner())[layer] = (Some(key), usable);
        let hit = hit.filter(|_| usable)?;
        // A narHash key says nothing of the files' ctimes: every file is
        // read and checked.
        let unchanged_before_ns = if nar.is_some() { i128::MIN } else { hit.unchanged_before_ns };
        let mut entries = vec![c.entry_path(&key)];
        if self.blobs.compression() != Compression::None {
            entries.push(c.entry_path(&crate::engine::cache::blob_key(&key, self.blobs.compression())));
        }
        let origin = crate::engine::Origin::Cache { dir: c.dir().to_path_buf(), entries, nar_hash: nar.is_some() };
        Some(Hashed { digest: hit.digest, blob, unchanged_before_ns, files: Some(hit.files), origin })
    }
}
