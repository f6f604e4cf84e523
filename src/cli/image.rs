//! The `image` command: a closure's planned layers (`planning.rs`), the
//! image config, tag, base image and customisation layer made into a stream
//! configuration, which is then written as a conf directory
//! (`--emit-conf`), pushed (`--push`, `push.rs`) or written out
//! (`emit.rs`).

use std::collections::HashMap;
use std::io::{self, Write};

use anyhow::Context;

use super::args::{json_arg, Format, ImageArgs, LayerCompression};
use super::{emit, planning, push};
use crate::input::conf::{Conf, CustomisationSource};
use crate::output::compress::Compress;

pub(super) fn image(a: &ImageArgs) -> anyhow::Result<()> {
    planning::one_stdin_reader(&a.closure.input, &a.joint_with, &a.previous, a.registry.access.password_stdin)?;
    let (closure, exclude) = planning::load_closure(&a.closure)?;
    let (layers, previous_in_registries) = planning::image_layers(a, &closure, &exclude)?;
    let config = match &a.config {
        Some(c) => json_arg("config", c, crate::input::limited::MAX_CONFIG)?,
        None => serde_json::json!({}),
    };
    let tag = a.tag.clone().unwrap_or_else(|| {
        let first = a.closure.input.first().map(String::as_str).unwrap_or("image");
        // `./result` names the store path it links to.
        let resolved = std::fs::canonicalize(first)
            .ok()
            .filter(|p| p.parent().and_then(std::path::Path::file_name).is_some_and(|d| d == "store"));
        let resolved = resolved.as_deref().and_then(|p| p.to_str()).unwrap_or(first);
        let base = resolved.rsplit('/').next().unwrap_or(resolved);
        let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base).trim_end_matches(".json");
        // A store name may hold what a repository name cannot (uppercase, '+').
        let name: String =
            name.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
        let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        format!("{}:latest", if name.is_empty() { "image" } else { name })
    });
    let v = serde_json::json!({
        "architecture": a.architecture.as_deref().unwrap_or(crate::dest::manifest::host_architecture()),
        "created": a.created,
        "mtime": a.mtime.as_deref().unwrap_or(&a.created),
        "uid": a.owner.uid, "gid": a.owner.gid, "uname": a.owner.uname, "gname": a.owner.gname,
        "store_dir": a.store_dir,
        "from_image": a.base.from_image,
        "repo_tag": tag,
        "customisation_layer": "(contents)",
        "config": config,
        "store_layers": layers,
    });
    let mut conf = Conf::from_value(v.clone(), None, crate::input::isotime::DateTime::now_utc())?;
    let known = crate::input::layerdigest::read_all(&a.output.known_digests)?;
    // nixpkgs' contents: a symlink tree, made in a scratch directory that
    // lives until the layer is written.
    let links = if a.contents_link.is_empty() {
        None
    } else {
        let dir = tempfile::tempdir().context("cannot make a scratch directory for --contents-link")?;
        crate::input::contents::link_tree(dir.path(), &a.contents_link)?;
        Some(dir)
    };
    let contents = links.as_ref().map(|d| d.path().to_path_buf()).or_else(|| a.contents.clone());
    if let Some(dir) = &a.emit_conf {
        let path = crate::output::confdir::write(dir, v, contents.as_deref(), conf.mtime, &known)?;
        if !a.output.run.quiet {
            let _ = writeln!(io::stderr(), "nixstream: wrote {}", path.display());
        }
        return Ok(());
    }
    conf.customisation = CustomisationSource::Contents(contents);
    let nar_hashes: HashMap<String, String> =
        closure.nodes.iter().filter_map(|n| Some((n.path.clone(), n.nar_hash.clone()?))).collect();
    if let Some(dest) = &a.push {
        let o = &a.output;
        anyhow::ensure!(
            o.format == Format::DockerArchive
                && o.oci_layout.is_none()
                && o.output.is_none()
                && o.compress == Compress::None,
            "--push sends the image to a registry: leave out --format, --oci-layout, --output and --compress"
        );
        let compression = o.layer_compression.unwrap_or(LayerCompression::Gzip).into();
        let closure = push::FromClosure { nar_hashes, previous: &previous_in_registries };
        return push::push_image(&conf, dest, compression, &a.registry, &o.run, Some(closure), &known);
    }
    emit::emit(&conf, &a.output, &nar_hashes, &known)
}
