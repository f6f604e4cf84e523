//! The digest cache ([`crate::engine::cache`]) as one run uses it: each
//! store layer looked up once it is listed, keyed by its store paths'
//! narHashes where the closure gives one for every path of the layer (else
//! by the files' identities), with the encoded blob's entry beside the
//! layer's; what the run hashed stored at the end; and a run that met a
//! wrong entry, removed since, made again without it
//! ([`run_again_after_wrong_entry`]).
//!
//! Where the cache is (a directory the user named, a push's default one, or
//! none) is the caller's choice; so are the words of a warning when it
//! cannot be written: [`CacheUse::store`] returns the error.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::cache::{blob_key, layer_key, CacheError, CachedLayer, DigestCache};
use crate::engine::image::Compression;
use crate::engine::origin::Origin;
use crate::engine::{Blobs, Engine, EngineError, EngineOptions, Hashed, Lookup, Summary};
use crate::output::progress::Progress;
use crate::plan::{ImagePlan, PlannedLayer};
use crate::store::walk::{Kind, Listing};

/// The digest cache for one run: each store layer looked up once it is
/// listed (by a hashing worker, so the first byte and the other layers do
/// not wait for every walk), the keys and hits remembered, and what was
/// hashed stored at the end.
#[derive(Debug)]
pub struct CacheUse<'p> {
    cache: Option<DigestCache>,
    plan: &'p ImagePlan,
    nar_hashes: &'p HashMap<String, String>,
    blobs: Blobs,
    /// Per plan index: the key made from the listing, and whether it hit.
    keys: Mutex<Vec<(Option<[u8; 32]>, bool)>>,
    /// Taken before any layer is listed: what entries stored by this run
    /// vouch for ([`CachedLayer::unchanged_before_ns`]).
    settled_before_ns: i128,
}

impl<'p> CacheUse<'p> {
    /// The run's use of `cache` (none: nothing is looked up or stored) for
    /// `plan`'s layers made as `blobs`; `nar_hashes` (store path to
    /// narHash, possibly empty) key the layers all of whose paths have one.
    pub fn new(
        cache: Option<DigestCache>,
        plan: &'p ImagePlan,
        nar_hashes: &'p HashMap<String, String>,
        blobs: Blobs,
    ) -> CacheUse<'p> {
        CacheUse {
            cache,
            plan,
            nar_hashes,
            blobs,
            keys: Mutex::new(vec![(None, false); plan.layers.len()]),
            settled_before_ns: crate::output::splice::settled_before_ns(std::time::SystemTime::now()),
        }
    }

    /// What the engine looks layers up in, with a cache.
    pub fn lookup(&self) -> Option<&dyn Lookup> {
        self.cache.as_ref().map(|_| self as &dyn Lookup)
    }

    /// Stores the layers this run hashed (and their encoded blobs' digests).
    /// The first entry that cannot be written ends it: the error says where.
    pub fn store(&self, summary: &Summary) -> Result<(), CacheError> {
        let Some(c) = &self.cache else { return Ok(()) };
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
                let bkey = blob_key(key, self.blobs.compression());
                entries.push((bkey, CachedLayer { digest: blob, files: Vec::new(), unchanged_before_ns: 0 }));
            }
            for (k, entry) in entries {
                c.put(&k, &entry)?;
            }
        }
        Ok(())
    }
}

impl Lookup for CacheUse<'_> {
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed> {
        let c = self.cache.as_ref()?;
        let PlannedLayer::Store { paths_text, owner, .. } = &self.plan.layers[layer] else { return None };
        let owner = owner.as_ref().unwrap_or(&self.plan.owner);
        let nar: Option<Vec<(&str, &str)>> =
            paths_text.iter().map(|p| self.nar_hashes.get(p).map(|h| (p.as_str(), h.as_str()))).collect();
        let key = layer_key(listing, owner, nar.as_deref());
        let files = listing.entries.iter().filter(|e| e.kind == Kind::File).count();
        let hit = c.get(&key, files);
        // An encoded blob needs its own entry too; without it the layer is
        // hashed (and both entries stored) again.
        let blob = match self.blobs.compression() {
            Compression::None => None,
            comp => c.get(&blob_key(&key, comp), 0).map(|b| b.digest),
        };
        let usable = hit.is_some() && (self.blobs.compression() == Compression::None || blob.is_some());
        self.keys.lock().unwrap_or_else(|p| p.into_inner())[layer] = (Some(key), usable);
        let hit = hit.filter(|_| usable)?;
        // A narHash key says nothing of the files' ctimes: every file is
        // read and checked.
        let unchanged_before_ns = if nar.is_some() { i128::MIN } else { hit.unchanged_before_ns };
        let mut entries = vec![c.entry_path(&key)];
        if self.blobs.compression() != Compression::None {
            entries.push(c.entry_path(&blob_key(&key, self.blobs.compression())));
        }
        let origin = Origin::Cache { dir: c.dir().to_path_buf(), entries, nar_hash: nar.is_some() };
        Some(Hashed { digest: hit.digest, blob, unchanged_before_ns, files: Some(hit.files), origin })
    }
}

/// A destination's error that may be the engine's own (a layer's bytes
/// or digests), as opposed to the destination's.
pub trait EngineCause {
    fn engine_error(&self) -> Option<&EngineError>;
}

impl EngineCause for EngineError {
    fn engine_error(&self) -> Option<&EngineError> {
        Some(self)
    }
}

/// Whether `e` is a digest-cache entry found wrong by the streaming pass,
/// and removed since.
pub fn wrong_cache_entry_removed(e: &EngineError) -> bool {
    let EngineError::WrongDigest(w) = e else { return false };
    matches!(&w.origin, Origin::Cache { entries, .. } if entries.iter().all(|p| !p.exists()))
}

/// Runs the engine as [`crate::engine::run`] does, for a destination that
/// commits nothing of an image before its last step (a registry's
/// manifest, a layout's `index.json`), so that a run stopped part way can
/// be made again.  A wrong digest-cache entry is removed when it is found
/// ([`crate::engine::origin::WrongDigest`]), and nothing of its blob is
/// kept: the next try hashes that layer.  `again` is told of each such
/// error before the next try.  Each try removes an entry, so there are at
/// most as many as layers; any other error ends the run.
pub fn run_again_after_wrong_entry<T, E: EngineCause>(
    plan: &ImagePlan,
    opts: &EngineOptions,
    progress: &Progress,
    dest: impl Fn(&Engine) -> Result<T, E>,
    mut again: impl FnMut(&E),
) -> Result<(T, Summary), E> {
    let mut tries = 0;
    loop {
        match crate::engine::run(plan, opts, progress, &dest) {
            Err(e) if tries < plan.layers.len() && e.engine_error().is_some_and(wrong_cache_entry_removed) => {
                again(&e);
                tries += 1;
            }
            r => return r,
        }
    }
}

/// A plan of two store layers made under `store` (`aaaa-lib`, one file;
/// `bbbb-app`, two) and an empty `--contents` layer (a store layer of no
/// paths) on top.
#[cfg(test)]
pub(crate) fn test_plan(store: &std::path::Path) -> ImagePlan {
    use crate::input::conf::{Conf, CustomisationSource};
    let (lib, app) = (store.join("aaaa-lib"), store.join("bbbb-app"));
    std::fs::create_dir_all(lib.join("lib")).unwrap();
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(lib.join("lib/libx.so"), vec![3u8; 50_000]).unwrap();
    std::fs::write(app.join("bin/app"), vec![7u8; 20_000]).unwrap();
    std::fs::write(app.join("readme"), b"hi\n").unwrap();
    let v = serde_json::json!({
        "architecture": "amd64", "created": "1970-01-01T00:00:01Z", "mtime": "1970-01-01T00:00:01Z",
        "uid": 0, "gid": 0, "uname": "root", "gname": "root",
        "store_dir": store, "from_image": null, "repo_tag": "test/image:latest",
        "customisation_layer": "(contents)", "config": {},
        "store_layers": [[lib], [app]],
    });
    let mut conf = Conf::from_value(v, None, crate::input::isotime::DateTime::now_utc()).unwrap();
    conf.customisation = CustomisationSource::Contents(None);
    ImagePlan::from_conf(&conf).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::digest::LayerDigest;
    use crate::engine::origin::{Found, WrongDigest};
    use crate::output::progress::Mode;
    use std::path::{Path, PathBuf};

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        plan: ImagePlan,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let plan = test_plan(&root.join("nix/store"));
        Fixture { _tmp: tmp, root, plan }
    }

    fn listing(plan: &ImagePlan, i: usize) -> &Listing {
        let PlannedLayer::Store { listing, .. } = &plan.layers[i] else { panic!("layer {i} is no store layer") };
        listing.get(1).unwrap()
    }

    fn hash(plan: &ImagePlan, blobs: Blobs, lookup: Option<&dyn Lookup>) -> Summary {
        let opts = EngineOptions { jobs: 1, blobs, lookup, check_in_hashing_pass: true, ..Default::default() };
        crate::engine::hash_only(plan, &opts, &Progress::new(Mode::Quiet, 0)).unwrap()
    }

    fn entry_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count()).sum())
    }

    #[test]
    fn a_stored_layer_is_a_hit_next_run_and_names_its_entry() {
        let f = fixture();
        let dir = f.root.join("cache");
        let none = HashMap::new();
        let first = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &none, Blobs::DockerArchive);
        assert!(first.lookup().unwrap().lookup(0, listing(&f.plan, 0)).is_none(), "an empty cache");
        let summary = hash(&f.plan, Blobs::DockerArchive, first.lookup());
        assert_eq!(summary.layers_known, 0);
        first.store(&summary).unwrap();
        assert_eq!(entry_files(&dir), 3, "one entry per store layer, the empty contents layer's too");

        let second = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &none, Blobs::DockerArchive);
        let hit = second.lookup().unwrap().lookup(1, listing(&f.plan, 1)).expect("a hit");
        assert_eq!(hit.digest, summary.digests[1]);
        assert_eq!(hit.files.as_ref().map(Vec::len), Some(2));
        assert_eq!(hit.blob, None);
        // Identity-keyed: the entry vouches for files settled before the
        // run that stored it.
        assert_eq!(hit.unchanged_before_ns, first.settled_before_ns);
        let Origin::Cache { dir: d, entries, nar_hash } = &hit.origin else { panic!("{:?}", hit.origin) };
        assert_eq!((d, entries.len(), *nar_hash), (&dir, 1, false));
        assert!(entries[0].is_file());
        assert!(CacheUse::new(None, &f.plan, &none, Blobs::DockerArchive).lookup().is_none());
    }

    #[test]
    fn a_nar_hash_key_vouches_for_no_ctime_and_an_encoded_blob_needs_its_own_entry() {
        let f = fixture();
        let dir = f.root.join("cache");
        let PlannedLayer::Store { paths_text, .. } = &f.plan.layers[1] else { panic!() };
        let nar: HashMap<String, String> = paths_text.iter().map(|p| (p.clone(), "sha256-AAAA".into())).collect();
        let blobs = Blobs::Encoded(Compression::Gzip);
        let first = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &nar, blobs);
        let summary = hash(&f.plan, blobs, first.lookup());
        first.store(&summary).unwrap();
        assert_eq!(entry_files(&dir), 6, "a layer entry and a blob entry per store layer");

        let again = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &nar, blobs);
        let hit = again.lookup().unwrap().lookup(1, listing(&f.plan, 1)).expect("a hit");
        assert_eq!((hit.digest, hit.blob), (summary.digests[1], summary.blobs[1]));
        assert_eq!(hit.unchanged_before_ns, i128::MIN, "every file is read and checked");
        let Origin::Cache { entries, nar_hash, .. } = &hit.origin else { panic!("{:?}", hit.origin) };
        assert!(nar_hash);
        assert_eq!(entries.len(), 2, "the layer's entry and its blob's");
        // Without the blob entry the layer entry alone is no hit.
        std::fs::remove_file(&entries[1]).unwrap();
        let third = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &nar, blobs);
        assert!(third.lookup().unwrap().lookup(1, listing(&f.plan, 1)).is_none());
        // The layer without narHashes is keyed otherwise: other entries.
        let none = HashMap::new();
        let other = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &none, blobs);
        assert!(other.lookup().unwrap().lookup(1, listing(&f.plan, 1)).is_none());
        assert!(other.lookup().unwrap().lookup(0, listing(&f.plan, 0)).is_some(), "layer 1 had no narHash anyway");
    }

    #[test]
    fn an_entry_that_cannot_be_written_is_an_error_naming_where() {
        let f = fixture();
        let dir = f.root.join("cache");
        let none = HashMap::new();
        let c = CacheUse::new(Some(DigestCache::open(&dir).unwrap()), &f.plan, &none, Blobs::DockerArchive);
        let summary = hash(&f.plan, Blobs::DockerArchive, c.lookup());
        // Every entry directory name taken by a file: every put fails.
        for i in 0..256 {
            std::fs::write(dir.join(format!("{i:02x}")), b"").unwrap();
        }
        let CacheError::Io { path, .. } = c.store(&summary).unwrap_err();
        assert!(path.starts_with(&dir), "{}", path.display());
        // No cache: nothing to write, no error.
        CacheUse::new(None, &f.plan, &none, Blobs::DockerArchive).store(&summary).unwrap();
    }

    /// The error the streaming pass makes of a wrong entry at `entries`
    /// (removing them, as it does).
    fn wrong(entries: Vec<PathBuf>, origin_dir: &Path) -> EngineError {
        let origin = Origin::Cache { dir: origin_dir.to_path_buf(), entries, nar_hash: false };
        let d = LayerDigest { size: 10240, sha256: [1; 32] };
        let found = Found::Bytes { what: "layer tar".into(), actual: Some(LayerDigest { sha256: [2; 32], ..d }) };
        EngineError::WrongDigest(Box::new(WrongDigest::new(1, "/nix/store/x".into(), origin, d, found)))
    }

    #[test]
    fn only_a_removed_wrong_cache_entry_is_worth_another_run() {
        let f = fixture();
        let entry = f.root.join("entry");
        std::fs::write(&entry, b"x").unwrap();
        assert!(wrong_cache_entry_removed(&wrong(vec![entry.clone()], &f.root)));
        assert!(!entry.exists(), "removed");
        // One that could not be removed (here: a directory) would fail again.
        std::fs::create_dir(&entry).unwrap();
        assert!(!wrong_cache_entry_removed(&wrong(vec![entry.clone()], &f.root)));
        let d = LayerDigest { size: 1, sha256: [1; 32] };
        let found = Found::Bytes { what: "layer tar".into(), actual: None };
        let from_file = WrongDigest::new(1, "p".into(), Origin::DigestFile("d.json".into()), d, found);
        assert!(!wrong_cache_entry_removed(&EngineError::WrongDigest(Box::new(from_file))));
        assert!(!wrong_cache_entry_removed(&EngineError::Worker("x".into())));
    }

    #[test]
    fn a_run_goes_again_after_each_wrong_entry_and_no_more_than_once_per_layer() {
        let f = fixture();
        let opts = EngineOptions { jobs: 1, ..Default::default() };
        let progress = Progress::new(Mode::Quiet, 0);
        let gone = || wrong(vec![f.root.join("gone")], &f.root);
        // A destination that answers its nth try with `answer(n)`; what the
        // run was told before each new try goes into `told`.
        let tries = std::cell::Cell::new(0);
        let run = |answer: &dyn Fn(usize) -> Result<usize, EngineError>, told: &mut Vec<String>| {
            tries.set(0);
            let dest = |_: &Engine| {
                tries.set(tries.get() + 1);
                answer(tries.get())
            };
            run_again_after_wrong_entry(&f.plan, &opts, &progress, dest, |e| told.push(e.to_string())).map(|(t, _)| t)
        };
        // Fails with a removed wrong entry twice, then succeeds.
        let mut told = Vec::new();
        let t = run(&|n| if n <= 2 { Err(gone()) } else { Ok(n) }, &mut told).unwrap();
        assert_eq!((t, told.len()), (3, 2));
        assert!(told.iter().all(|m| m.contains("the entry was removed from the cache")), "{told:?}");
        // Always wrong: one try, then one more per layer, then the error.
        let r = run(&|_| Err(gone()), &mut Vec::new());
        assert!(matches!(r, Err(EngineError::WrongDigest(_))));
        assert_eq!(tries.get(), f.plan.layers.len() + 1);
        // Any other error: no second try.
        let mut told = Vec::new();
        let r = run(&|_| Err(EngineError::Worker("no".into())), &mut told);
        assert!(r.is_err());
        assert_eq!((tries.get(), told.len()), (1, 0), "not again");
    }
}
