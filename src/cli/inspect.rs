//! The commands that compute or check digests without writing an image:
//! `digest` (the hashing pass alone: image ID and diff_ids), `verify` (an
//! archive or layout against its own digests) and `layer-digest` (one store
//! layer's digests, for `--known-digests`).

use std::collections::HashMap;
use std::io::{self, Write};

use anyhow::Context;

use super::args::{DigestArgs, LayerDigestArgs, VerifyArgs};
use super::cache::RunCache;
use super::default_jobs;
use crate::dest::docker_archive;
use crate::engine::image::Compression;
use crate::engine::{Blobs, EngineOptions};
use crate::input::conf::{Conf, CustomisationSource};
use crate::output::progress::{Mode, Progress};
use crate::plan::ImagePlan;

pub(super) fn digest(a: &DigestArgs) -> anyhow::Result<()> {
    let conf = a.conf.load()?;
    let jobs = a.run.jobs.unwrap_or_else(default_jobs).max(1);
    let plan = ImagePlan::from_conf(&conf)?;
    let no_nar_hashes = HashMap::new();
    let cache = RunCache::new(&plan, a.run.cache.as_deref(), &no_nar_hashes, Blobs::DockerArchive);
    let progress = Progress::new(Mode::detect(a.run.quiet), plan.layers.len());
    // No streaming pass follows to compare the entries: the hashing pass does.
    let opts = EngineOptions { jobs, lookup: cache.lookup(), ..Default::default() };
    let summary = crate::engine::hash_only(&plan, &opts, &progress)?;
    let config = summary.config.clone().expect("hash_only makes the config");
    let meta = docker_archive::image_meta(&plan, config, &summary.digests.iter().map(|d| d.sha256).collect::<Vec<_>>());
    progress.finish();
    cache.store(&summary);
    let id = meta.config_name.trim_end_matches(".json");
    let mut out = io::stdout().lock();
    if a.json {
        let layers: Vec<serde_json::Value> = meta
            .layer_paths
            .iter()
            .zip(&summary.digests)
            .map(|(p, d)| serde_json::json!({"path": p, "diff_id": format!("sha256:{}", d.hex()), "size": d.size}))
            .collect();
        let v = serde_json::json!({"id": format!("sha256:{id}"), "config": meta.config_name, "layers": layers});
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        // The lines of nixpkgs' golden expected.txt, less the archive's own digest.
        writeln!(out, "config {}", meta.config_name)?;
        for (p, d) in meta.layer_paths.iter().zip(&summary.digests) {
            writeln!(out, "layer {p} sha256:{}", d.hex())?;
        }
    }
    Ok(())
}

pub(super) fn verify(a: &VerifyArgs) -> anyhow::Result<()> {
    use crate::read::verify;
    let report = if a.archive.as_os_str() == "-" {
        verify::verify(io::stdin().lock(), "standard input")?
    } else if a.archive.is_dir() {
        verify::verify_dir(&a.archive)?
    } else {
        let f = std::fs::File::open(&a.archive).with_context(|| format!("cannot open {}", a.archive.display()))?;
        verify::verify(f, &a.archive.display().to_string())?
    };
    let mut out = io::stdout().lock();
    if a.quiet {
        // The exit status and the problem line below say it all.
    } else if a.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(verify::render(&report).as_bytes())?;
    }
    out.flush()?;
    let name = a.archive.display();
    let failing: &[String] = if !report.problems.is_empty() {
        &report.problems
    } else if a.strict {
        &report.warnings
    } else {
        for w in &report.warnings {
            let _ = writeln!(io::stderr(), "nixstream: warning: {name}: {w}");
        }
        &[]
    };
    let strict = if report.problems.is_empty() { " (--strict)" } else { "" };
    match failing {
        [] => Ok(()),
        [one] => anyhow::bail!("{name}: {one}{strict}"),
        [first, rest @ ..] => anyhow::bail!("{name}: {first} (and {} more){strict}", rest.len()),
    }
}

pub(super) fn layer_digest(a: &LayerDigestArgs) -> anyhow::Result<()> {
    let v = serde_json::json!({
        "architecture": crate::dest::manifest::host_architecture(),
        "created": a.mtime, "mtime": a.mtime,
        "uid": a.owner.uid, "gid": a.owner.gid, "uname": a.owner.uname, "gname": a.owner.gname,
        "store_dir": a.store_dir,
        "from_image": null,
        "repo_tag": "layer-digest:latest",
        "customisation_layer": "(none)",
        "config": {},
        "store_layers": [a.paths],
    });
    let mut conf = Conf::from_value(v, None, crate::input::isotime::DateTime::now_utc())?;
    conf.customisation = CustomisationSource::Contents(None);
    let plan = ImagePlan::from_conf(&conf)?;
    let jobs = a.jobs.unwrap_or_else(default_jobs).max(1);
    let progress = Progress::new(Mode::detect(a.quiet), plan.layers.len());
    let summary = crate::engine::hash_only(&plan, &EngineOptions { jobs, ..Default::default() }, &progress)?;
    // The hashing pass alone checks every entry itself: its per-file hashes stand.
    let files = summary.files[0].as_deref().unwrap_or_default();
    let mut file =
        crate::input::layerdigest::LayerDigestFile::new(a.paths.clone(), &plan.owner, &summary.digests[0], files);
    for c in &a.layer_compression {
        let c = Compression::from(*c);
        if c == Compression::None {
            continue;
        }
        let opts = EngineOptions { jobs, blobs: Blobs::Encoded(c), ..Default::default() };
        let s = crate::engine::hash_only(&plan, &opts, &progress)?;
        anyhow::ensure!(s.digests[0] == summary.digests[0], "{} changed while it was being hashed", a.paths.join(" "));
        let blob = s.blobs[0].context("the hashing pass gave no blob digest")?;
        file.add_blob(c, &blob);
    }
    progress.finish();
    // Compact: a file per store file in `files`.
    let mut text = serde_json::to_vec(&file)?;
    text.push(b'\n');
    match &a.output {
        Some(p) => std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?,
        None => io::stdout().lock().write_all(&text)?,
    }
    Ok(())
}
