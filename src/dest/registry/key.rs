//! The key a registry layer is annotated with ([`super::LAYER_KEY_ANNOTATION`]):
//! what decides a store layer's blob bytes, known from the plan and the
//! narHashes alone, before a file is read.
//!
//! A store layer's tar is a function of its store paths (names, in order),
//! their contents (each path's narHash), the owner written into every
//! header (uid, gid, names, mtime), and the renderer (this nixstream
//! version); its blob adds the compressor's identity (implementation,
//! version and parameters, [`crate::engine::compress::identity`]).  The key
//! hashes exactly those.  Layers without a narHash for every path, base
//! layers and the customisation layer have no key: their bytes depend on
//! more than the plan says.  (The engine leaves [`LayerInfo::key`] empty
//! today; when it fills it, that key wins.)

use std::collections::HashMap;
use std::io::Write;

use sha2::{Digest, Sha256};

use crate::engine::digest::hex;
use crate::engine::image::{Compression, EngineError, Image, LayerInfo};
use crate::plan::{ImagePlan, PlannedLayer};

/// The key's version: bumped when what it covers changes.
const KEY_FORMAT: &str = "nixstream registry layer key 1";

/// Each plan layer's key, where the plan and `nar_hashes` (store path to
/// narHash) decide its bytes.
pub fn layer_keys(plan: &ImagePlan, nar_hashes: &HashMap<String, String>, c: Compression) -> Vec<Option<String>> {
    plan.layers
        .iter()
        .map(|layer| {
            let PlannedLayer::Store { paths_text, owner, .. } = layer else { return None };
            let owner = owner.as_ref().unwrap_or(&plan.owner);
            let mut h = Field(Sha256::new());
            h.put(KEY_FORMAT.as_bytes());
            h.put(env!("CARGO_PKG_VERSION").as_bytes());
            h.put(crate::engine::compress::identity(c).as_bytes());
            h.put(owner.uid.to_string().as_bytes());
            h.put(owner.gid.to_string().as_bytes());
            h.put(&owner.uname);
            h.put(&owner.gname);
            h.put(owner.mtime.to_string().as_bytes());
            for p in paths_text {
                h.put(p.as_bytes());
                h.put(nar_hashes.get(p)?.as_bytes());
            }
            Some(format!("sha256:{}", hex(&h.0.finalize())))
        })
        .collect()
}

/// Length-prefixed fields, so no two field lists hash alike.
struct Field(Sha256);

impl Field {
    fn put(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
}

/// An image with keys added to the layers the engine left without one.
pub struct Keyed<'a> {
    pub inner: &'a dyn Image,
    pub keys: Vec<Option<String>>,
}

impl Image for Keyed<'_> {
    fn layer_count(&self) -> usize {
        self.inner.layer_count()
    }
    fn compression(&self) -> Compression {
        self.inner.compression()
    }
    fn layer(&self, i: usize) -> Result<LayerInfo, EngineError> {
        let mut info = self.inner.layer(i)?;
        if info.key.is_none() {
            info.key = self.keys.get(i).cloned().flatten();
        }
        Ok(info)
    }
    fn write_layer(&self, i: usize, out: &mut dyn Write) -> Result<(), EngineError> {
        self.inner.write_layer(i, out)
    }
    fn config(&self) -> Result<Vec<u8>, EngineError> {
        self.inner.config()
    }
    fn repo_tag(&self) -> &str {
        self.inner.repo_tag()
    }
}
