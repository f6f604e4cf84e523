//! Where a layer's digests came from when this run did not hash the layer
//! itself, and what is reported when they turn out to be wrong.
//!
//! A digest from outside (a `--known-digests` file, a `--cache-from`
//! annotation, a digest-cache entry) spares the hashing pass, and the
//! streaming pass checks the bytes it writes against it.  When they differ
//! and no file of the layer changed since this run listed it (identity,
//! size, mtime and ctime as the listing saw them), it is the digest that is
//! wrong, not the store: the error ([`WrongDigest`]) names where the digest
//! came from, both digests, and what to do about it.  A wrong digest-cache
//! entry is removed on the spot, so the next run hashes the layer again
//! instead of failing the same way.

use std::path::PathBuf;

use crate::engine::digest::LayerDigest;

/// Where a layer's digests came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// This run: its hashing pass, or the plan (a base layer's diff_id, the
    /// customisation layer's checksum file, each checked against its own
    /// source).
    #[default]
    ThisRun,
    /// A layer digest file (`nixstream layer-digest`) given to
    /// `--known-digests` or found beside a conf directory.
    DigestFile(PathBuf),
    /// A layer annotation of the image `--cache-from` names.
    CacheFrom(String),
    /// Entries of the digest cache (`--cache DIR`): the layer's, and for an
    /// encoded blob its blob's; `nar_hash` when keyed by the store paths'
    /// narHashes (else by the files' identities).
    Cache { dir: PathBuf, entries: Vec<PathBuf>, nar_hash: bool },
}

impl Origin {
    /// Whether the digests came from outside this run.
    pub fn is_outside(&self) -> bool {
        *self != Origin::ThisRun
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::ThisRun => write!(f, "this run's hashing pass"),
            Origin::DigestFile(p) => write!(f, "the layer digest file {}", p.display()),
            Origin::CacheFrom(r) => write!(f, "--cache-from {r} (its layer annotation)"),
            Origin::Cache { dir, .. } => write!(f, "the digest cache {}", dir.display()),
        }
    }
}

/// How the streamed bytes differ from what the digest promised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The whole layer tar or blob (`what`) hashed otherwise, or ran past
    /// the promised size (`None`).
    Bytes { what: String, actual: Option<LayerDigest> },
    /// A file's content does not have the per-file hash recorded with the
    /// digest (`None`: there is none for it, the record has fewer files).
    File { path: PathBuf, recorded: Option<u128>, actual: u128 },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const LAYER: &str = "and no file of the layer changed since it was listed";
        const FILE: &str = "though that file has not changed since it was listed";
        match self {
            Found::Bytes { what, actual: Some(a) } => {
                write!(f, "the {what} streamed is sha256:{}, {} bytes, {LAYER}", a.hex(), a.size)
            }
            Found::Bytes { what, actual: None } => write!(f, "the {what} streamed runs past that size, {LAYER}"),
            Found::File { path, recorded: Some(r), actual } => {
                write!(f, "{} has xxh3 {actual:032x} where the record says {r:032x}, {FILE}", path.display())
            }
            Found::File { path, recorded: None, actual } => {
                write!(f, "{} (xxh3 {actual:032x}) is past the files the record has, {FILE}", path.display())
            }
        }
    }
}

/// A digest from outside that the layer's bytes do not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "layer {layer} ({paths}): the digest from {origin} is wrong for this layer: it promises sha256:{}, {} bytes, \
     but {found}; {advice}; the output was stopped before it could become an image",
    promised.hex(),
    promised.size
)]
pub struct WrongDigest {
    /// Counted from 1.
    pub layer: usize,
    /// The layer's store paths, as the progress lines print them.
    pub paths: String,
    pub origin: Origin,
    /// The digest of what is checked: the plain tar's, or the encoded blob's.
    pub promised: LayerDigest,
    pub found: Found,
    /// What to do about it (for the digest cache: what was done).
    pub advice: String,
}

impl WrongDigest {
    /// The error for layer `layer`; a digest-cache origin's entries are
    /// removed first, so that the next run does not use them again.
    pub fn new(layer: usize, paths: String, origin: Origin, promised: LayerDigest, found: Found) -> WrongDigest {
        let advice = match &origin {
            Origin::ThisRun => "rebuild or retry when the store is quiet".to_string(),
            Origin::DigestFile(p) => format!(
                "regenerate {} with `nixstream layer-digest` from the store paths of this build and this image's \
                 owner and mtime settings, or leave it out",
                p.display()
            ),
            // Keys made of narHashes match when the paths are what Nix
            // registered: a right digest can also meet a store path that
            // was modified since, which only Nix can tell.
            Origin::CacheFrom(r) => format!(
                "{r} does not describe these store paths (or they no longer have the content their narHash says: \
                 `nix-store --verify-path` checks): push without --cache-from {r}, or name an image nixstream \
                 pushed of this build"
            ),
            Origin::Cache { entries, nar_hash, .. } => {
                let verify = if *nar_hash {
                    " (it was keyed by narHash: if it was right, the store path no longer has the content Nix \
                     registered, which `nix-store --verify-path` checks)"
                } else {
                    ""
                };
                match forget(entries) {
                    Ok(()) => {
                        format!("the entry was removed from the cache, so running again hashes this layer{verify}")
                    }
                    Err((p, e)) => format!(
                        "remove {} by hand (it could not be removed: {e}), or run without --cache{verify}",
                        p.display()
                    ),
                }
            }
        };
        WrongDigest { layer, paths, origin, promised, found, advice }
    }
}

/// Removes digest-cache entries; one already gone is fine.
fn forget(entries: &[PathBuf]) -> Result<(), (PathBuf, std::io::Error)> {
    for e in entries {
        match std::fs::remove_file(e) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err((e.clone(), err)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_cache_entry_is_removed_and_the_message_says_so() {
        let d = tempfile::tempdir().unwrap();
        let entry = d.path().join("ab").join("abcd");
        std::fs::create_dir(d.path().join("ab")).unwrap();
        std::fs::write(&entry, b"entry").unwrap();
        let gone = d.path().join("ab").join("never-there");
        let origin = Origin::Cache { dir: d.path().to_path_buf(), entries: vec![entry.clone(), gone], nar_hash: false };
        let promised = LayerDigest { size: 10240, sha256: [0xaa; 32] };
        let actual = LayerDigest { size: 20480, sha256: [0xbb; 32] };
        let e = WrongDigest::new(
            2,
            "['/nix/store/x-a']".into(),
            origin,
            promised,
            Found::Bytes { what: "layer tar".into(), actual: Some(actual) },
        );
        assert!(!entry.exists(), "the entry is removed");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        for needle in [
            "layer 2 (['/nix/store/x-a'])",
            &format!("the digest cache {}", d.path().display()),
            &format!("sha256:{}, 10240 bytes", "aa".repeat(32)),
            &format!("sha256:{}, 20480 bytes", "bb".repeat(32)),
            "the entry was removed",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert!(!msg.contains("changed while"), "{msg}");
    }

    #[test]
    fn each_origin_says_what_to_do() {
        let promised = LayerDigest { size: 1, sha256: [0; 32] };
        let found = Found::File { path: "/nix/store/x-a/f".into(), recorded: Some(1), actual: 2 };
        let file = WrongDigest::new(1, "[]".into(), Origin::DigestFile("/d/1.json".into()), promised, found.clone());
        let m = file.to_string();
        assert!(
            m.contains("the digest from the layer digest file /d/1.json is wrong")
                && m.contains("regenerate /d/1.json"),
            "{m}"
        );
        assert!(m.contains(&format!("/nix/store/x-a/f has xxh3 {:032x} where the record says {:032x}", 2, 1)), "{m}");
        let from = WrongDigest::new(1, "[]".into(), Origin::CacheFrom("r.example/app:1".into()), promised, found);
        let m = from.to_string();
        assert!(m.contains("--cache-from r.example/app:1") && m.contains("push without --cache-from"), "{m}");
    }
}
