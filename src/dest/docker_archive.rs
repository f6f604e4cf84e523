//! The docker-archive destination: a `docker save` tar, byte for byte as
//! nixpkgs' `stream_layered_image.py` writes it.
//!
//! Members, in order: each layer as `<diff_id>/layer.tar` (a base layer
//! under its own member name, its header copied through as `tarfile`
//! re-encodes it; the customisation layer with the header `gettarinfo`
//! makes from stat'ing its `layer.tar`), then `<config sha256>.json` and,
//! last, `manifest.json`.  A failure stops the stream before
//! `manifest.json`, so what reached the output cannot be loaded as an image.

use serde_json::{json, Map, Value};

use crate::compat::pyjson::dumps_indent4;
use crate::compat::tarheader::{self, Header};
use crate::dest::tarstream::TarStream;
use crate::engine::digest::{hex, HashSink};
use crate::engine::image::Image;
use crate::engine::{Engine, EngineError};
use crate::plan::{ImagePlan, PlannedLayer};

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

/// The docker layout's names and `manifest.json` for `config` (the config
/// bytes) and each layer's diff_id: a one-element list of
/// `{Config, RepoTags, Layers}`, `json.dumps(..., indent=4)`.
pub fn image_meta(plan: &ImagePlan, config: Vec<u8>, diff_ids: &[[u8; 32]]) -> ImageMeta {
    let mut sink = HashSink::new();
    std::io::Write::write_all(&mut sink, &config).expect("hashing cannot fail");
    let config_name = format!("{}.json", sink.finish().hex());
    let layer_paths: Vec<String> = plan
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| match l {
            PlannedLayer::Base { index } => {
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
    ImageMeta { config_name, config, manifest, layer_paths }
}

/// Writes the image as a docker-archive into `tar`.
pub fn write(engine: &Engine, tar: &mut TarStream) -> Result<ImageMeta, EngineError> {
    let plan = engine.plan();
    let progress = engine.progress();
    let mtime = plan.owner.mtime;
    let total = plan.layers.len();
    if plan.base.is_none() {
        progress.line(|| "No 'fromImage' provided".into());
    }
    for (i, layer) in plan.layers.iter().enumerate() {
        if !engine.ready(i) {
            // Let the consumer have everything so far while we wait.
            tar.hand_over()?;
        }
        let d = engine.hashed(i)?.digest;
        let first = tar.offset() == 0;
        match layer {
            PlannedLayer::Base { index } => {
                let bl = &plan.base.as_ref().expect("base layer without base").layers[*index];
                progress.sized(bl.member.size);
                tar.header(&bl.member.header())?;
            }
            PlannedLayer::Store { .. } => {
                let name = format!("{}/layer.tar", d.hex());
                tar.header(&Header::plain_file(name.as_bytes(), d.size, mtime))?;
            }
            PlannedLayer::Customisation(c) => {
                // `add_customisation_layer`: the header comes from stat'ing
                // layer.tar (`gettarinfo`), with the configured mtime.
                let name = format!("{}/layer.tar", hex(&c.digest));
                tar.header(&Header {
                    name: name.as_bytes(),
                    mode: c.mode,
                    uid: c.uid,
                    gid: c.gid,
                    size: c.size,
                    mtime,
                    typeflag: tarheader::typeflag::REGULAR,
                    linkname: b"",
                    uname: &c.uname,
                    gname: &c.gname,
                    devmajor: 0,
                    devminor: 0,
                    pax: &[],
                })?;
            }
        }
        if first {
            // The consumer has the archive's first bytes now, not once the
            // first chunk is full (while the readers share the cores with
            // the next layers' hashing).
            tar.hand_over()?;
        }
        engine.write_layer_out(i, tar)?;
        tar.pad(d.size)?;
        progress.layer_done(i + 1, total);
    }
    progress.line(|| "Adding manifests...".into());
    // Every spliced file read by the consumer and checked again before the
    // archive can become an image.
    tar.barrier()?;
    let meta = image_meta(plan, engine.config()?, &engine.diff_ids()?);
    tar.member(&meta.config_name, &meta.config, mtime)?;
    tar.member("manifest.json", &meta.manifest, mtime)?;
    tar.finish()?;
    progress.line(|| "Done.".into());
    Ok(meta)
}

/// The whole run into `out` as a docker-archive, with nothing spliced:
/// the engine, a tar stream and this destination together.
pub fn write_archive<W: std::io::Write + Send>(
    plan: &ImagePlan,
    out: W,
    opts: &crate::engine::EngineOptions,
    progress: &crate::output::progress::Progress,
) -> Result<(ImageMeta, crate::engine::Summary), EngineError> {
    let ((meta, _), summary) = crate::engine::run(plan, opts, progress, |engine| {
        crate::dest::tarstream::with_tar_stream(out, None, progress, |tar| write(engine, tar))
    })?;
    Ok((meta, summary))
}
