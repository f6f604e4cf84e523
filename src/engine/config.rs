//! The image config and manifest, from a plan and its layer digests.
//!
//! Key order, values and formatting follow the reference exactly: config
//! `created, architecture, os ("linux", always, as the reference writes it),
//! config, rootfs {diff_ids, type}, history [{created, comment}]`, the
//! comment being `f"store paths: {paths}"` with Python's list repr; the
//! manifest a one-element list of `{Config, RepoTags, Layers}`.  Both are
//! `json.dumps(..., indent=4)` encoded as UTF-8, the config named by its
//! sha256.

use serde_json::{json, Map, Value};

use crate::compat::pyjson::{dumps_indent4, repr_str_list};
use crate::engine::digest::{hex, HashSink};
use crate::plan::ImagePlan;

/// The config and manifest members, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// `<sha256>.json`
    pub config_name: String,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    /// The member names of the layers, in order.
    pub layer_paths: Vec<String>,
}

/// Builds config and manifest from the plan and each layer's sha256.
pub fn image_meta(plan: &ImagePlan, diff_ids: &[[u8; 32]]) -> ImageMeta {
    assert_eq!(diff_ids.len(), plan.layers.len(), "one digest per layer");
    let history: Vec<Value> = plan
        .layers
        .iter()
        .map(|l| {
            json!({
                "created": plan.created,
                "comment": format!("store paths: {}", repr_str_list(&plan.history_paths(l))),
            })
        })
        .collect();
    let mut config = Map::new();
    config.insert("created".into(), Value::String(plan.created.clone()));
    config.insert("architecture".into(), plan.architecture.clone());
    config.insert("os".into(), Value::String("linux".into()));
    config.insert("config".into(), Value::Object(plan.config.clone()));
    let mut rootfs = Map::new();
    rootfs.insert(
        "diff_ids".into(),
        Value::Array(diff_ids.iter().map(|d| Value::String(format!("sha256:{}", hex(d)))).collect()),
    );
    rootfs.insert("type".into(), Value::String("layers".into()));
    config.insert("rootfs".into(), Value::Object(rootfs));
    config.insert("history".into(), Value::Array(history));
    let config_bytes = dumps_indent4(&Value::Object(config)).into_bytes();
    let mut sink = HashSink::new();
    std::io::Write::write_all(&mut sink, &config_bytes).expect("hashing cannot fail");
    let config_name = format!("{}.json", sink.finish().hex());

    let layer_paths: Vec<String> = plan
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| match l {
            crate::plan::PlannedLayer::Base { index } => {
                plan.base.as_ref().expect("base layer without base").layers[*index].member.name_lossy()
            }
            _ => format!("{}/layer.tar", hex(d)),
        })
        .collect();
    let mut entry = Map::new();
    entry.insert("Config".into(), Value::String(config_name.clone()));
    entry.insert("RepoTags".into(), json!([plan.repo_tag]));
    entry.insert("Layers".into(), Value::Array(layer_paths.iter().cloned().map(Value::String).collect()));
    let manifest = dumps_indent4(&Value::Array(vec![Value::Object(entry)])).into_bytes();
    ImageMeta { config_name, config: config_bytes, manifest, layer_paths }
}
