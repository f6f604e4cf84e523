//! The digest cache (`--cache DIR`): a store layer's size, sha256 and
//! per-file xxh3-128s, kept between runs so a second run skips the hashing
//! pass.
//!
//! An entry is keyed by everything that decides the layer's bytes: this
//! program's version, the owner and time settings, and every entry's name,
//! link target, type, mode and size; plus, for content, the store paths'
//! `narHash`es when the closure gives one for every path of the layer (such
//! keys hold across machines), else each file's device, inode, mtime and
//! ctime (ctime changes with any write and cannot be set back, so a file
//! rewritten in place gets a new key).  An entry ends with the sha256 of its
//! own bytes: a torn or corrupt entry is a miss, never a digest.  And a hit
//! is still checked: the streaming pass compares every file's xxh3 with the
//! entry's, so content that differs from what was hashed stops the archive
//! before manifest.json; except, with an identity key, for big files
//! settled before the run that stored the entry
//! ([`CachedLayer::unchanged_before_ns`]), which are spliced into an
//! output pipe unread (their unchanged ctime is the proof, as for the files
//! a run hashes itself; see [`crate::output::splice`]).  A hit whose digest
//! the streamed bytes do not have, though no file of the layer changed, is a
//! wrong entry: the run stops with an error saying so
//! ([`crate::engine::origin::WrongDigest`]) and removes the entry, so the
//! next run hashes the layer again.  Entries are written to a temporary file and renamed
//! into place, so runs sharing the directory never see half an entry.
//!
//! It also owns where `push` keeps the cache when given no directory
//! ([`default_dir`]): the XDG cache directory, and none where there is no
//! home of this user's to keep it in (a Nix build).

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::engine::digest::{hex, LayerDigest};
use crate::render::layer::Owner;
use crate::store::walk::{Kind, Listing};

const MAGIC: &[u8; 8] = b"NXSCACH2";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("digest cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A layer's digest and the xxh3-128 of each of its files, in entry order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    pub digest: LayerDigest,
    pub files: Vec<u128>,
    /// [`crate::output::splice::SETTLE_NS`] before the start of the run that hashed
    /// the layer: a file whose ctime (part of an identity key) is older than
    /// this had, when it was hashed, the content it has while its key still
    /// matches (a change after that run's listing would have moved its ctime
    /// past this), so a later run may splice it unread.
    pub unchanged_before_ns: i128,
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct DigestCache {
    dir: PathBuf,
}

/// Feeds length-prefixed fields into a sha256, so no two field lists
/// serialise alike.
struct KeyHasher(Sha256);

impl KeyHasher {
    fn bytes(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    fn num(&mut self, n: i128) {
        self.0.update(n.to_le_bytes());
    }
}

/// The cache key of a store layer.  `nar_hashes` holds the `narHash` of
/// each store path of the layer, in order, when every one is known.
pub fn layer_key(listing: &Listing, owner: &Owner, nar_hashes: Option<&[(&str, &str)]>) -> [u8; 32] {
    let mut k = KeyHasher(Sha256::new());
    k.bytes(b"nixstream digest cache, layer format 2");
    k.bytes(env!("CARGO_PKG_VERSION").as_bytes());
    k.num(i128::from(owner.uid));
    k.num(i128::from(owner.gid));
    k.bytes(&owner.uname);
    k.bytes(&owner.gname);
    k.num(i128::from(owner.mtime));
    k.num(i128::from(listing.nix_dirs));
    k.num(listing.name_offset as i128);
    if let Some(nar) = nar_hashes {
        k.bytes(b"narHash");
        for (path, hash) in nar {
            k.bytes(path.as_bytes());
            k.bytes(hash.as_bytes());
        }
    }
    for e in &listing.entries {
        k.bytes(listing.name(e));
        k.bytes(listing.link(e));
        k.num(match e.kind {
            Kind::Directory => 1,
            Kind::Symlink => 2,
            Kind::File => 3,
        });
        k.num(i128::from(e.mode));
        k.num(i128::from(e.size));
        if nar_hashes.is_none() && e.kind == Kind::File {
            k.num(i128::from(e.dev));
            k.num(i128::from(e.ino));
            k.num(e.mtime_ns);
            k.num(e.ctime_ns);
        }
    }
    k.0.finalize().into()
}

/// The cache key of a layer's encoded blob: its layer key with the
/// compressor's identity ([`crate::engine::compress::identity`]).  Its entry
/// is a [`CachedLayer`] with no files whose digest is the blob's.
pub fn blob_key(layer_key: &[u8; 32], c: crate::engine::image::Compression) -> [u8; 32] {
    let mut k = KeyHasher(Sha256::new());
    k.bytes(b"nixstream digest cache, encoded blob");
    k.bytes(layer_key);
    k.bytes(crate::engine::compress::identity(c).as_bytes());
    k.0.finalize().into()
}

/// The `$HOME` Nix gives a build: it must not exist, and nothing may
/// create it (a build that does fails Nix's purity check afterwards).
const NIX_BUILD_HOME: &str = "/homeless-shelter";

/// The digest cache a push uses without `--cache`: `$XDG_CACHE_HOME/nixstream`,
/// else `$HOME/.cache/nixstream`.  None when neither names a usable place:
/// no `$HOME`, or Nix's `/homeless-shelter`, or a home that is not an
/// existing directory owned by this user (`sudo` keeping another user's
/// `$HOME`: entries owned by root there would be unwritable to its owner).
/// Relative values are ignored, as the XDG base directory spec asks; the
/// password database is not consulted for a missing `$HOME`, unlike the
/// `dirs` crate, since a Nix build's passwd entry names its build directory.
pub fn default_dir() -> Option<PathBuf> {
    default_dir_in(|k| std::env::var_os(k), rustix::process::geteuid().as_raw())
}

fn default_dir_in(env: impl Fn(&str) -> Option<OsString>, euid: u32) -> Option<PathBuf> {
    let absolute = |k: &str| env(k).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = absolute("XDG_CACHE_HOME") {
        return Some(xdg.join("nixstream"));
    }
    let home = absolute("HOME")?;
    if home == Path::new(NIX_BUILD_HOME) {
        return None;
    }
    let m = std::fs::metadata(&home).ok()?;
    (m.is_dir() && m.uid() == euid).then(|| home.join(".cache").join("nixstream"))
}

impl DigestCache {
    /// Opens (creating it if need be) the cache directory.
    pub fn open(dir: &Path) -> Result<DigestCache, CacheError> {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io { path: dir.to_path_buf(), source })?;
        Ok(DigestCache { dir: dir.to_path_buf() })
    }

    /// Opens the default directory ([`default_dir`]), creating what is
    /// missing of it private to this user (mode 0700, as the XDG spec asks
    /// of the directories it names).
    pub fn open_default(dir: &Path) -> Result<DigestCache, CacheError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CacheError::Io { path: dir.to_path_buf(), source })?;
        Ok(DigestCache { dir: dir.to_path_buf() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding the entry for `key` (present or not).
    pub fn entry_path(&self, key: &[u8; 32]) -> PathBuf {
        let h = hex(key);
        self.dir.join(&h[..2]).join(&h)
    }

    /// The entry for `key`, if there is a sound one for a layer of `files`
    /// files.  Anything else (absent, unreadable, torn, corrupt, another
    /// file count) is a miss.
    pub fn get(&self, key: &[u8; 32], files: usize) -> Option<CachedLayer> {
        let data = read_entry(&self.entry_path(key), max_entry_len(files))?;
        decode(&data, key).filter(|c| c.files.len() == files)
    }

    /// Stores an entry.
    pub fn put(&self, key: &[u8; 32], layer: &CachedLayer) -> Result<(), CacheError> {
        let path = self.entry_path(key);
        let parent = path.parent().expect("entry paths have a parent");
        let err = |source| CacheError::Io { path: parent.to_path_buf(), source };
        std::fs::create_dir_all(parent).map_err(err)?;
        let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(err)?;
        tmp.write_all(&encode(key, layer)).map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

/// The most bytes an entry for a layer of `files` files may have: its
/// fixed fields and one hash per file, with room for fields to come.
fn max_entry_len(files: usize) -> u64 {
    4096 + 64 * files as u64
}

/// The bytes of the entry file at `path`, if it is a regular file of at most
/// `max` bytes.  Opened without following a link and without blocking (a
/// fifo or a link to `/dev/zero` planted in the cache is a miss, not a hang
/// or a read without end), and read no further than `max`.
pub fn read_entry(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.len() > max {
        return None;
    }
    let mut data = Vec::with_capacity(m.len() as usize);
    // The file may grow after the fstat: the read stops past `max` anyway.
    f.take(max + 1).read_to_end(&mut data).ok()?;
    (data.len() as u64 <= max).then_some(data)
}

/// Decodes an entry's bytes (for the fuzzer: any bytes, no panic).
pub fn decode_entry(data: &[u8], key: &[u8; 32]) -> Option<CachedLayer> {
    decode(data, key)
}

fn encode(key: &[u8; 32], c: &CachedLayer) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 32 + 8 + 32 + 16 + 8 + 16 * c.files.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(key);
    out.extend_from_slice(&c.digest.size.to_le_bytes());
    out.extend_from_slice(&c.digest.sha256);
    out.extend_from_slice(&c.unchanged_before_ns.to_le_bytes());
    out.extend_from_slice(&(c.files.len() as u64).to_le_bytes());
    for f in &c.files {
        out.extend_from_slice(&f.to_le_bytes());
    }
    let check: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&check);
    out
}

fn decode(data: &[u8], key: &[u8; 32]) -> Option<CachedLayer> {
    let body_len = data.len().checked_sub(32)?;
    let (body, check) = data.split_at(body_len);
    if Sha256::digest(body).as_slice() != check {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let (stored_key, rest) = rest.split_at_checked(32)?;
    if stored_key != key {
        return None;
    }
    let (size, rest) = rest.split_at_checked(8)?;
    let (sha256, rest) = rest.split_at_checked(32)?;
    let (unchanged_before, rest) = rest.split_at_checked(16)?;
    let (count, rest) = rest.split_at_checked(8)?;
    let count = usize::try_from(u64::from_le_bytes(count.try_into().ok()?)).ok()?;
    if rest.len() != count.checked_mul(16)? {
        return None;
    }
    let files = rest.chunks_exact(16).map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes"))).collect();
    Some(CachedLayer {
        digest: LayerDigest { size: u64::from_le_bytes(size.try_into().ok()?), sha256: sha256.try_into().ok()? },
        files,
        unchanged_before_ns: i128::from_le_bytes(unchanged_before.try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::walk::list_layer;

    #[test]
    fn entries_round_trip_and_damage_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let c = DigestCache::open(&d.path().join("cache")).unwrap();
        let key = [7u8; 32];
        let layer = CachedLayer {
            digest: LayerDigest { size: 10240, sha256: [9; 32] },
            files: vec![1, 2, 3],
            unchanged_before_ns: -5_000_000_000_123,
        };
        assert_eq!(c.get(&key, 3), None);
        c.put(&key, &layer).unwrap();
        assert_eq!(c.get(&key, 3), Some(layer.clone()));
        assert_eq!(c.get(&key, 4), None, "another file count is a miss");
        // Every single flipped byte and every truncation is a miss.
        let p = c.entry_path(&key);
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            assert_eq!(c.get(&key, 3), None, "flipped byte {i}");
            std::fs::write(&p, &good[..i]).unwrap();
            assert_eq!(c.get(&key, 3), None, "truncated at {i}");
        }
        // An entry stored under another key's name is a miss.
        std::fs::write(&p, encode(&[8u8; 32], &layer)).unwrap();
        assert_eq!(c.get(&key, 3), None);
    }

    #[test]
    fn entries_that_are_not_plausible_regular_files_are_misses() {
        let d = tempfile::tempdir().unwrap();
        let c = DigestCache::open(&d.path().join("cache")).unwrap();
        let key = [3u8; 32];
        let layer = CachedLayer {
            digest: LayerDigest { size: 10240, sha256: [9; 32] },
            files: vec![1],
            unchanged_before_ns: 0,
        };
        c.put(&key, &layer).unwrap();
        let p = c.entry_path(&key);
        let good = std::fs::read(&p).unwrap();
        assert_eq!(c.get(&key, 1), Some(layer.clone()));
        // A link to the entry itself is not followed.
        let real = p.with_extension("real");
        std::fs::rename(&p, &real).unwrap();
        std::os::unix::fs::symlink(&real, &p).unwrap();
        assert_eq!(c.get(&key, 1), None, "link");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        assert_eq!(c.get(&key, 1), None, "link to /dev/zero");
        std::fs::remove_file(&p).unwrap();
        use rustix::fs::{FileType, Mode, CWD};
        rustix::fs::mknodat(CWD, &p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        assert_eq!(c.get(&key, 1), None, "fifo");
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert_eq!(c.get(&key, 1), None, "directory");
        std::fs::remove_dir(&p).unwrap();
        // Too large for the file count: not even read.
        let mut big = good.clone();
        big.resize(max_entry_len(1) as usize + 1, 0);
        std::fs::write(&p, &big).unwrap();
        assert_eq!(c.get(&key, 1), None, "implausible size");
        std::fs::write(&p, &good).unwrap();
        assert_eq!(c.get(&key, 1), Some(layer));
    }

    proptest::proptest! {
        /// What the `cache_entry` fuzz target checks, on random bytes and
        /// on damaged sound entries: no panic, and what decodes re-encodes
        /// to the same bytes.
        #[test]
        fn any_entry_bytes_decode_or_miss(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            files in proptest::collection::vec(proptest::num::u128::ANY, 0..5),
            flip in proptest::num::usize::ANY,
        ) {
            let key = [0x5a; 32];
            if let Some(e) = decode_entry(&data, &key) {
                proptest::prop_assert_eq!(encode(&key, &e), data);
            }
            let layer = CachedLayer { digest: LayerDigest { size: 7, sha256: [1; 32] }, files, unchanged_before_ns: -3 };
            let mut good = encode(&key, &layer);
            proptest::prop_assert_eq!(decode_entry(&good, &key), Some(layer));
            let i = flip % good.len();
            good[i] ^= 1;
            proptest::prop_assert_eq!(decode_entry(&good, &key), None);
        }
    }

    #[test]
    fn the_default_dir_follows_xdg_and_needs_a_home_of_ours() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let uid = std::fs::metadata(&home).unwrap().uid();
        let with = |vars: &[(&str, &Path)], euid: u32| {
            let vars: Vec<(String, OsString)> =
                vars.iter().map(|(k, v)| (k.to_string(), v.as_os_str().to_owned())).collect();
            default_dir_in(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()), euid)
        };
        let xdg = d.path().join("xdg");
        assert_eq!(with(&[("XDG_CACHE_HOME", &xdg), ("HOME", &home)], uid), Some(xdg.join("nixstream")));
        assert_eq!(with(&[("XDG_CACHE_HOME", &xdg)], uid), Some(xdg.join("nixstream")), "no HOME needed");
        assert_eq!(with(&[("HOME", &home)], uid), Some(home.join(".cache/nixstream")));
        // A relative XDG_CACHE_HOME is ignored; so is an empty one.
        assert_eq!(
            with(&[("XDG_CACHE_HOME", Path::new("rel")), ("HOME", &home)], uid),
            Some(home.join(".cache/nixstream"))
        );
        assert_eq!(
            with(&[("XDG_CACHE_HOME", Path::new("")), ("HOME", &home)], uid),
            Some(home.join(".cache/nixstream"))
        );
        // No usable home: no default cache.
        assert_eq!(with(&[], uid), None, "no HOME");
        assert_eq!(with(&[("HOME", Path::new(""))], uid), None, "empty HOME");
        assert_eq!(with(&[("HOME", Path::new("home"))], uid), None, "relative HOME");
        assert_eq!(with(&[("HOME", Path::new(NIX_BUILD_HOME))], uid), None, "a Nix build");
        assert_eq!(with(&[("HOME", &d.path().join("missing"))], uid), None, "HOME missing");
        assert_eq!(with(&[("HOME", &home)], uid.wrapping_add(1)), None, "another user's HOME");
        let file = d.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(with(&[("HOME", &file)], uid), None, "HOME a file");
    }

    #[test]
    fn the_default_dir_is_made_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("xdg/nixstream");
        DigestCache::open_default(&dir).unwrap();
        for p in [d.path().join("xdg"), dir.clone()] {
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o700, "{}", p.display());
        }
        // Existing: opened as it is.
        DigestCache::open_default(&dir).unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(DigestCache::open_default(&file.join("nixstream")).is_err());
    }

    #[test]
    fn keys_change_with_everything_that_changes_the_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pkg");
        std::fs::create_dir(&p).unwrap();
        let f = p.join("data");
        std::fs::write(&f, b"one").unwrap();
        let key = |o: &Owner| layer_key(&list_layer(std::slice::from_ref(&p), 2).unwrap(), o, None);
        let k0 = key(&Owner::test_root());
        assert_eq!(k0, key(&Owner::test_root()), "stable");
        assert_ne!(k0, key(&Owner { uid: 1, ..Owner::test_root() }));
        assert_ne!(k0, key(&Owner { mtime: 2, ..Owner::test_root() }));
        assert_ne!(k0, key(&Owner { gname: b"wheel".to_vec(), ..Owner::test_root() }));
        // Same size, same mtime put back: the ctime still moves.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, b"two").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        let k1 = key(&Owner::test_root());
        assert_ne!(k0, k1, "content rewritten in place");
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_ne!(k1, key(&Owner::test_root()), "mode");
        // With narHashes the key ignores file identity but not the hashes.
        let l = list_layer(std::slice::from_ref(&p), 2).unwrap();
        let a = layer_key(&l, &Owner::test_root(), Some(&[("/nix/store/x", "sha256-A")]));
        assert_ne!(a, layer_key(&l, &Owner::test_root(), Some(&[("/nix/store/x", "sha256-B")])));
        assert_ne!(a, layer_key(&l, &Owner::test_root(), None));
    }
}
