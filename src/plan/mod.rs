//! The `ImagePlan`: everything that decides the archive's bytes, gathered
//! and checked before the first byte is written.
//!
//! It is built from a [`Conf`]: the base image indexed and validated, every
//! store path checked to exist, the customisation layer's checksum read and
//! its tar stat'ed, and the image config merged with the base image's `Env`
//! as the reference does.  Each store layer's listing (every entry with every
//! field that decides its bytes) is a [`LayerListing`]: made once, by the
//! first thread that needs it.  The hashing workers list a layer just before
//! hashing it, so the bottom layer is hashed (and the archive's first byte
//! written) without waiting for the walk of every other layer (the digest
//! cache, whose keys are made from the listings, is looked up by those
//! workers too, see [`crate::engine::archive::Lookup`]); callers that want every
//! listing up front call [`ImagePlan::list_all`].  Nothing is hashed here;
//! the next stage
//! ([`crate::engine::archive`]) hashes and streams from this value.

pub mod owners;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::engine::digest::parse_sha256_hex;
use crate::input::conf::{Conf, CustomisationSource};
use crate::read::baseimage::{BaseError, BaseImage};
use crate::render::layer::Owner;
use crate::store::walk::{list_contents, list_layer, Listing, WalkError};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error("store layer {layer}: {source}")]
    Walk { layer: usize, source: Arc<WalkError> },
    #[error("customisation layer {path}: {what}")]
    Customisation { path: PathBuf, what: String },
    #[error("contents directory {path}: {what}")]
    Contents { path: PathBuf, what: String },
}

/// The customisation layer: a directory with `layer.tar` and `checksum`.
#[derive(Debug, Clone)]
pub struct Customisation {
    /// The directory as written in the configuration.
    pub dir_text: String,
    pub tar_path: PathBuf,
    pub digest: [u8; 32],
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub ino: u64,
    pub mtime_ns: i128,
}

#[derive(Debug)]
pub enum PlannedLayer {
    /// Layer `index` of the base image, copied through.
    Base {
        index: usize,
    },
    /// Store paths (or `--contents`), archived by
    /// [`crate::render::layer::write_store_layer`]; `owner` overrides the image's
    /// owner settings (numeric 0:0 for `--contents`).
    Store {
        paths_text: Vec<String>,
        listing: LayerListing,
        owner: Option<Owner>,
    },
    Customisation(Customisation),
}

/// A store layer's listing, walked once, by whichever thread asks first
/// (others asking meanwhile wait for that walk).
#[derive(Debug)]
pub struct LayerListing {
    paths: Vec<PathBuf>,
    cell: OnceLock<Result<Listing, Arc<WalkError>>>,
}

impl LayerListing {
    /// A layer of these store paths, not walked yet.
    pub fn new(paths: Vec<PathBuf>) -> LayerListing {
        LayerListing { paths, cell: OnceLock::new() }
    }

    /// A layer already listed.
    pub fn ready(listing: Listing) -> LayerListing {
        LayerListing { paths: Vec::new(), cell: OnceLock::from(Ok(listing)) }
    }

    /// The listing, walking the paths now (with up to `threads` threads)
    /// if nobody has.
    pub fn get(&self, threads: usize) -> Result<&Listing, Arc<WalkError>> {
        self.cell.get_or_init(|| list_layer(&self.paths, threads).map_err(Arc::new)).as_ref().map_err(Arc::clone)
    }
}

#[derive(Debug)]
pub struct ImagePlan {
    pub owner: Owner,
    /// `datetime.isoformat(created)`.
    pub created: String,
    pub architecture: Value,
    /// The image config, Env already merged with the base image's.
    pub config: Map<String, Value>,
    pub repo_tag: String,
    pub base: Option<BaseImage>,
    pub layers: Vec<PlannedLayer>,
}

impl ImagePlan {
    pub fn from_conf(conf: &Conf) -> Result<ImagePlan, PlanError> {
        let base = conf.from_image.as_deref().map(BaseImage::open).transpose()?;
        let top = match &conf.customisation {
            CustomisationSource::Prebuilt { dir, text } => PlannedLayer::Customisation(customisation(dir, text)?),
            CustomisationSource::Contents(dir) => {
                let listing = match dir {
                    Some(d) => list_contents(d, crate::store::walk::default_threads()).map_err(|e| {
                        let what = match e {
                            WalkError::Missing { path } if path == *d => "does not exist".to_string(),
                            WalkError::Io { path, source }
                                if path == *d && source.kind() == std::io::ErrorKind::NotFound =>
                            {
                                "does not exist".to_string()
                            }
                            e => e.to_string(),
                        };
                        PlanError::Contents { path: d.clone(), what }
                    })?,
                    None => Listing::default(),
                };
                let listing = LayerListing::ready(listing);
                let owner = Owner { uid: 0, gid: 0, uname: Vec::new(), gname: Vec::new(), mtime: conf.mtime };
                let paths_text = dir.iter().map(|d| d.display().to_string()).collect();
                PlannedLayer::Store { paths_text, listing, owner: Some(owner) }
            }
        };
        check_paths(&conf.store_layers)?;

        let mut layers: Vec<PlannedLayer> = Vec::new();
        if let Some(b) = &base {
            layers.extend((0..b.layers.len()).map(|index| PlannedLayer::Base { index }));
        }
        for (paths_text, paths) in conf.store_layers_text.iter().zip(&conf.store_layers) {
            let listing = LayerListing::new(paths.clone());
            layers.push(PlannedLayer::Store { paths_text: paths_text.clone(), listing, owner: None });
        }
        layers.push(top);

        let mut config = conf.config.clone();
        if let Some(b) = &base {
            merge_env(&mut config, &b.config);
        }
        Ok(ImagePlan {
            owner: Owner {
                uid: conf.uid,
                gid: conf.gid,
                uname: conf.uname.as_bytes().to_vec(),
                gname: conf.gname.as_bytes().to_vec(),
                mtime: conf.mtime,
            },
            created: conf.created.isoformat(),
            architecture: conf.architecture.clone(),
            config,
            repo_tag: conf.repo_tag.clone(),
            base,
            layers,
        })
    }

    /// Lists every store layer not listed yet, `jobs` layers at a time; the
    /// first error (by layer) is returned.
    pub fn list_all(&self, jobs: usize) -> Result<(), PlanError> {
        // Numbered as in `store_layers`, like `check_paths`.
        let store: Vec<(usize, &LayerListing)> = self
            .layers
            .iter()
            .filter_map(|l| match l {
                PlannedLayer::Store { listing, owner: None, .. } => Some(listing),
                _ => None,
            })
            .enumerate()
            .collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..jobs.clamp(1, store.len().max(1)) {
                s.spawn(|| {
                    while let Some((_, l)) = store.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let _ = l.get(jobs);
                    }
                });
            }
        });
        for (i, l) in store {
            l.get(jobs).map_err(|source| PlanError::Walk { layer: i + 1, source })?;
        }
        Ok(())
    }

    /// The paths a layer's history comment names (`LayerInfo.paths`).
    pub fn history_paths(&self, layer: &PlannedLayer) -> Vec<String> {
        match layer {
            PlannedLayer::Base { index } => {
                vec![self.base.as_ref().expect("base layer without base").layers[*index].path.clone()]
            }
            PlannedLayer::Store { paths_text, .. } => paths_text.clone(),
            PlannedLayer::Customisation(c) => vec![c.dir_text.clone()],
        }
    }
}

/// Every store path must exist before a byte is written: the one check of
/// the walk that is cheap enough to make for every layer up front (the
/// walks themselves run in the hashing workers).
fn check_paths(layers: &[Vec<PathBuf>]) -> Result<(), PlanError> {
    for (i, paths) in layers.iter().enumerate() {
        for p in paths {
            if let Err(e) = std::fs::symlink_metadata(p) {
                let source = if e.kind() == std::io::ErrorKind::NotFound {
                    WalkError::Missing { path: p.clone() }
                } else {
                    WalkError::Io { path: p.clone(), source: e }
                };
                return Err(PlanError::Walk { layer: i + 1, source: Arc::new(source) });
            }
        }
    }
    Ok(())
}

fn customisation(dir: &std::path::Path, text: &str) -> Result<Customisation, PlanError> {
    let err = |what: String| PlanError::Customisation { path: dir.to_path_buf(), what };
    let checksum_path = dir.join("checksum");
    let checksum = std::fs::read_to_string(&checksum_path).map_err(|e| err(format!("cannot read checksum: {e}")))?;
    // `f.read().strip()`, then a 64-character sha256.
    let digest = parse_sha256_hex(checksum.trim())
        .ok_or_else(|| err(format!("checksum holds {:?}, not a sha256 hex digest", checksum.trim())))?;
    let tar_path = dir.join("layer.tar");
    let md = std::fs::symlink_metadata(&tar_path).map_err(|e| err(format!("cannot stat layer.tar: {e}")))?;
    if !md.is_file() {
        return Err(err("layer.tar is not a regular file".into()));
    }
    Ok(Customisation {
        dir_text: text.to_string(),
        tar_path,
        digest,
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: u64::from(md.uid()),
        gid: u64::from(md.gid()),
        // gettarinfo fills owner names from the user and group databases.
        uname: crate::plan::owners::user_name(md.uid()).unwrap_or_default(),
        gname: crate::plan::owners::group_name(md.gid()).unwrap_or_default(),
        ino: md.ino(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    })
}

/// `overlay_base_config`: base Env then ours, de-duplicated by variable name
/// (last value wins, first position kept); written only when non-empty.
pub fn merge_env(config: &mut Map<String, Value>, base_config: &Map<String, Value>) {
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let all: Vec<String> = strings(base_config.get("Env")).into_iter().chain(strings(config.get("Env"))).collect();
    if all.is_empty() {
        return;
    }
    let mut resolved: Vec<(String, String)> = Vec::new();
    for entry in all {
        let key = entry.split('=').next().unwrap_or("").to_string();
        match resolved.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = entry,
            None => resolved.push((key, entry)),
        }
    }
    config.insert("Env".into(), Value::Array(resolved.into_iter().map(|(_, e)| Value::String(e)).collect()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn env_merge_keeps_first_position_last_value() {
        let mut c = json!({"Cmd": ["x"], "Env": ["PATH=/usr/bin", "EXTRA=1"]}).as_object().unwrap().clone();
        let b = json!({"Env": ["PATH=/bin", "HOME=/root"]}).as_object().unwrap().clone();
        merge_env(&mut c, &b);
        assert_eq!(c["Env"], json!(["PATH=/usr/bin", "HOME=/root", "EXTRA=1"]));
        assert_eq!(c.keys().collect::<Vec<_>>(), ["Cmd", "Env"]);

        let mut c = json!({"Cmd": ["x"]}).as_object().unwrap().clone();
        merge_env(&mut c, &b);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["Cmd", "Env"], "appended when absent");

        let mut c = json!({"Cmd": ["x"]}).as_object().unwrap().clone();
        merge_env(&mut c, &Map::new());
        assert!(!c.contains_key("Env"), "no Env key when both are empty");
    }
}
