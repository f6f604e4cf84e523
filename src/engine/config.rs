//! The image config, from a plan and its layer digests: the same bytes for
//! every destination (so the image ID is the same everywhere).
//!
//! Key order, values and formatting follow the reference exactly: config
//! `created, architecture, os ("linux", always, as the reference writes it),
//! config, rootfs {diff_ids, type}, history [{created, comment}]`, the
//! comment being `f"store paths: {paths}"` with Python's list repr,
//! `json.dumps(..., indent=4)` encoded as UTF-8.

use serde_json::{json, Map, Value};

use crate::compat::pyjson::{dumps_indent4, repr_str_list};
use crate::engine::digest::hex;
use crate::plan::ImagePlan;

/// The config JSON bytes for `plan` with each layer's diff_id.
pub fn config_json(plan: &ImagePlan, diff_ids: &[[u8; 32]]) -> Vec<u8> {
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
    dumps_indent4(&Value::Object(config)).into_bytes()
}
