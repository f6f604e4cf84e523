//! The OCI outputs on the golden cases: the same image as the
//! docker-archive (config bytes, diff_ids, uncompressed layer contents),
//! bytes that do not depend on `--jobs`, pinned compressed digests, and the
//! failures (a corrupt blob in a layout, an unwritable layout, a layer that
//! changed between the passes).

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use common::{bin, golden_dir, golden_tree, sha256_hex};

/// An OCI image read from an oci-archive's bytes or a layout directory.
struct Oci {
    index: serde_json::Value,
    config: Vec<u8>,
    /// Per layer: media type, blob bytes.
    layers: Vec<(String, Vec<u8>)>,
}

fn parse(blobs: &HashMap<String, Vec<u8>>, index: &[u8]) -> Oci {
    let index: serde_json::Value = serde_json::from_slice(index).expect("index.json");
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let m = &index["manifests"][0];
    let blob = |digest: &str, size: &serde_json::Value| -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let b = blobs.get(hex).unwrap_or_else(|| panic!("blob {digest} missing")).clone();
        assert_eq!(sha256_hex(&b), hex, "blob named by its digest");
        assert_eq!(Some(b.len() as u64), size.as_u64(), "size of {digest}");
        b
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(m["digest"].as_str().unwrap(), &m["size"])).expect("manifest");
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config = blob(manifest["config"]["digest"].as_str().unwrap(), &manifest["config"]["size"]);
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["mediaType"].as_str().unwrap().to_string(), blob(l["digest"].as_str().unwrap(), &l["size"])))
        .collect();
    Oci { index, config, layers }
}

fn read_archive(bytes: &[u8]) -> Oci {
    assert_eq!(bytes.len() % 10240, 0, "padded to 10240-byte records");
    let mut blobs = HashMap::new();
    let mut index = None;
    let mut names = Vec::new();
    for e in tar::Archive::new(bytes).entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            blobs.insert(hex.to_string(), data);
        } else if name == "index.json" {
            index = Some(data);
        } else if name == "oci-layout" {
            assert_eq!(data, br#"{"imageLayoutVersion":"1.0.0"}"#);
        }
        names.push(name);
    }
    assert_eq!(names.last().map(String::as_str), Some("index.json"), "index.json comes last");
    parse(&blobs, &index.expect("index.json"))
}

fn read_layout(dir: &Path) -> Oci {
    let mut blobs = HashMap::new();
    for e in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        blobs.insert(e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap());
    }
    parse(&blobs, &std::fs::read(dir.join("index.json")).unwrap())
}

fn decompress(media_type: &str, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match media_type.rsplit_once('+').map(|(_, c)| c) {
        None => out = blob.to_vec(),
        Some("gzip") => {
            flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out).unwrap();
        }
        Some("zstd") => out = zstd::decode_all(blob).unwrap(),
        Some(other) => panic!("unknown compression {other}"),
    }
    out
}

fn stream(conf: &Path, args: &[&str]) -> Vec<u8> {
    let out = bin().args(["stream", "-q"]).args(args).arg(conf).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn cases() -> Vec<std::path::PathBuf> {
    golden_tree();
    let mut v: Vec<_> =
        std::fs::read_dir(golden_dir().join("cases")).unwrap().map(|e| e.unwrap().path().join("conf.json")).collect();
    v.sort();
    v
}

#[test]
fn oci_archives_hold_the_docker_archives_image_and_do_not_depend_on_jobs() {
    for conf in cases() {
        let docker = common::validate(&stream(&conf, &[]));
        for c in ["gzip", "zstd", "none"] {
            let one = stream(&conf, &["--format", "oci-archive", "--layer-compression", c, "-j1"]);
            let two = stream(&conf, &["--format", "oci-archive", "--layer-compression", c, "-j2"]);
            assert!(one == two, "{} {c}: --jobs 1 and 2 differ", conf.display());
            let oci = read_archive(&one);
            // The same config bytes: the same image ID and diff_ids.
            assert_eq!(
                format!("{}.json", sha256_hex(&oci.config)),
                docker.config_name,
                "{} {c}: config",
                conf.display()
            );
            assert_eq!(oci.layers.len(), docker.layers.len());
            let diff_ids = docker.config["rootfs"]["diff_ids"].as_array().unwrap();
            for (i, ((mt, blob), diff_id)) in oci.layers.iter().zip(diff_ids).enumerate() {
                let want = if c == "none" {
                    "application/vnd.oci.image.layer.v1.tar".to_string()
                } else {
                    format!("application/vnd.oci.image.layer.v1.tar+{c}")
                };
                assert_eq!(mt, &want);
                let plain = decompress(mt, blob);
                assert_eq!(format!("sha256:{}", sha256_hex(&plain)), diff_id.as_str().unwrap(), "layer {i}");
                // A base layer the docker-archive carries compressed is the
                // same tar once decompressed.
                let docker_plain = decompress(
                    if docker.layers[i].starts_with(&[0x1f, 0x8b]) { "x+gzip" } else { "x" },
                    &docker.layers[i],
                );
                assert!(plain == docker_plain, "{} {c}: layer {i} content", conf.display());
            }
            let tag = oci.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"].clone();
            assert_eq!(tag, docker.manifest[0]["RepoTags"][0]);
        }
    }
}

/// The manifest digest of the `grouped` golden case under each layer
/// compression, as this version writes it: a dependency update that changes
/// compressed bytes (and so every digest users have pushed) fails here.
#[test]
fn compressed_digests_are_pinned() {
    golden_tree();
    let conf = golden_dir().join("cases/grouped/conf.json");
    let pinned = [
        ("none", "f9e6aad01dfcc1ce651cbc2e1b4e6ea4e196cfac81c3ab0414dd436d4e7f4a90"),
        ("gzip", "b5bb39f5808216d9bb9f60aecf7a405692d449ab212b0ac7a24efede0729aeae"),
        ("zstd", "d5b33e08aa03349537784b5e5fcd3763f947096529ef3276fb95d5dcc7b9480f"),
    ];
    for (c, want) in pinned {
        let oci = stream(&conf, &["--format", "oci-archive", "--layer-compression", c]);
        let got = read_archive(&oci).index["manifests"][0]["digest"].as_str().unwrap().to_string();
        assert_eq!(got, format!("sha256:{want}"), "{c}");
    }
}

#[test]
fn a_layout_takes_several_images_and_rewrites_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let confs = cases();
    let run = |conf: &Path| {
        let out = bin().args(["stream", "-q", "--stats", "--oci-layout"]).arg(&dir).arg(conf).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8(out.stderr).unwrap();
        let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("stats line");
        serde_json::from_str::<serde_json::Value>(line).unwrap()
    };
    for conf in &confs {
        // The hashing pass writes every blob into the layout: nothing is
        // rendered a second time.
        let stats = run(conf);
        assert_eq!(stats["layers_written"], 0, "one pass: {stats}");
        assert!(stats["blobs_written"].as_u64().unwrap() >= 1, "{stats}");
        let layout = read_layout(&dir);
        let archive = read_archive(&stream(conf, &["--format", "oci-archive"]));
        // The layout's entry for this tag is the archive's manifest.
        let tag = &archive.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"];
        let entry = layout.index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| &m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .expect("tag in index.json")
            .clone();
        assert_eq!(entry, archive.index["manifests"][0]);
    }
    let index = read_layout(&dir).index;
    assert_eq!(index["manifests"].as_array().unwrap().len(), confs.len(), "one entry per tag");
    // Again: every blob is there already and checked; nothing is written.
    let stats = run(&confs[0]);
    assert_eq!(stats["blobs_written"], 0, "{stats}");
    assert!(stats["blobs_present"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(stats["layers_written"], 0, "{stats}");
    assert_eq!(read_layout(&dir).index, index, "the same tag replaces its entry");
}

fn fails(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_corrupt_blob_in_a_layout_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let conf = golden_dir().join("cases/grouped/conf.json");
    golden_tree();
    let ok = bin().args(["stream", "-q", "--oci-layout"]).arg(&dir).arg(&conf).output().unwrap();
    assert!(ok.status.success());
    let index_before = std::fs::read(dir.join("index.json")).unwrap();
    let layout = read_layout(&dir);
    let victim = layout.layers.iter().map(|(_, b)| sha256_hex(b)).next().unwrap();
    let path = dir.join("blobs/sha256").join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(dir.join("index.json")).unwrap();
    let err = fails(bin().args(["stream", "-q", "--oci-layout"]).arg(&dir).arg(&conf));
    assert!(err.contains(&victim) && err.contains("does not hold what its name says"), "{err}");
    assert!(!dir.join("index.json").exists(), "no index.json names an image with a corrupt blob");
    drop(index_before);
}

#[test]
fn an_unwritable_layout_is_an_error_naming_it() {
    // A path under a regular file: unwritable even for root.
    golden_tree();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let dir = file.join("layout");
    let err =
        fails(bin().args(["stream", "-q", "--oci-layout"]).arg(&dir).arg(golden_dir().join("cases/basic/conf.json")));
    assert!(err.contains(&format!("OCI layout {}", dir.display())), "{err}");
}

/// A layer whose bytes differ from what the hashing pass learnt (here: a
/// stale digest handed in as known) stops the oci-archive before
/// `index.json`, so no client takes what was written for an image.
#[test]
fn a_layer_that_changed_between_the_passes_stops_before_the_index() {
    use nixstream::dest::{oci_archive, tarstream::with_tar_stream};
    use nixstream::engine::digest::LayerDigest;
    use nixstream::engine::image::Compression;
    use nixstream::engine::{Blobs, EngineError, EngineOptions, Hashed};
    use nixstream::output::progress::{Mode, Progress};
    golden_tree();
    let conf = nixstream::input::conf::Conf::load(&golden_dir().join("cases/grouped/conf.json"), None).unwrap();
    let plan = nixstream::plan::ImagePlan::from_conf(&conf).unwrap();
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let stale = LayerDigest { size: 4096, sha256: [0x33; 32] };
        let mut known = vec![None; plan.layers.len()];
        known[1] = Some(Hashed {
            digest: stale,
            blob: Some(stale),
            unchanged_before_ns: i128::MIN,
            files: None,
            origin: Default::default(),
        });
        let opts = EngineOptions { jobs: 2, blobs: Blobs::Encoded(c), known, ..Default::default() };
        let progress = Progress::new(Mode::Quiet, 0);
        let mut out = Vec::new();
        let r = nixstream::engine::run(&plan, &opts, &progress, |engine| {
            with_tar_stream(&mut out, None, &progress, |tar| oci_archive::write(engine, tar))
        });
        let Err(e) = r else { panic!("{c:?}: a stale digest must fail") };
        assert!(matches!(e, EngineError::DigestMismatch { layer: 2, .. }), "{c:?}: {e}");
        assert!(e.to_string().contains("changed between the hashing and streaming passes"), "{e}");
        let names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .map(|es| {
                es.filter_map(|e| e.ok()).map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned()).collect()
            })
            .unwrap_or_default();
        assert!(!names.iter().any(|n| n == "index.json"), "{c:?}: {names:?}");
    }
}

/// A digest from outside whose blob is right but whose diff_id is not (an
/// annotation or config that lies about it): the plain tar is hashed too
/// while its blob is streamed, and the error names where the digest came
/// from and both diff_ids, before `index.json`.
#[test]
fn a_digest_from_outside_with_the_right_blob_and_a_wrong_diff_id_is_caught() {
    use nixstream::dest::{oci_archive, tarstream::with_tar_stream};
    use nixstream::engine::digest::LayerDigest;
    use nixstream::engine::image::Compression;
    use nixstream::engine::{Blobs, EngineError, EngineOptions, Hashed, Origin};
    use nixstream::output::progress::{Mode, Progress};
    golden_tree();
    let conf = nixstream::input::conf::Conf::load(&golden_dir().join("cases/grouped/conf.json"), None).unwrap();
    let plan = nixstream::plan::ImagePlan::from_conf(&conf).unwrap();
    let progress = Progress::new(Mode::Quiet, 0);
    let blobs = Blobs::Encoded(Compression::Gzip);
    let right = nixstream::engine::hash_only(&plan, &EngineOptions { jobs: 2, blobs, ..Default::default() }, &progress)
        .unwrap();
    let lie = LayerDigest { size: right.digests[1].size, sha256: [0x44; 32] };
    let mut known = vec![None; plan.layers.len()];
    known[1] = Some(Hashed {
        digest: lie,
        blob: right.blobs[1],
        unchanged_before_ns: i128::MIN,
        files: None,
        origin: Origin::CacheFrom("registry.example/app:1".into()),
    });
    let opts = EngineOptions { jobs: 2, blobs, known, ..Default::default() };
    let mut out = Vec::new();
    let r = nixstream::engine::run(&plan, &opts, &progress, |engine| {
        with_tar_stream(&mut out, None, &progress, |tar| oci_archive::write(engine, tar))
    });
    let Err(e) = r else { panic!("a wrong diff_id must fail") };
    assert!(matches!(e, EngineError::WrongDigest(_)), "{e}");
    let msg = e.to_string();
    for needle in [
        "layer 2 (".to_string(),
        "--cache-from registry.example/app:1".to_string(),
        format!("it promises sha256:{}", "44".repeat(32)),
        format!("the layer tar streamed is sha256:{}, {} bytes", right.digests[1].hex(), right.digests[1].size),
    ] {
        assert!(msg.contains(&needle), "{needle:?} in {msg}");
    }
    let names: Vec<String> = tar::Archive::new(&out[..])
        .entries()
        .map(|es| es.filter_map(|e| e.ok()).map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned()).collect())
        .unwrap_or_default();
    assert!(!names.iter().any(|n| n == "index.json"), "{names:?}");
}

/// With the digests known from the cache there is no hashing pass: the
/// layout's missing blobs are then written by the streaming pass, checked
/// against the cached digests.
#[test]
fn a_layout_from_a_warm_cache_writes_the_blobs_in_a_second_pass() {
    golden_tree();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let conf = golden_dir().join("cases/grouped/conf.json");
    let run = |dir: &Path| {
        let out = bin()
            .args(["stream", "-q", "--stats", "--cache"])
            .arg(&cache)
            .arg("--oci-layout")
            .arg(dir)
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{err}");
        let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("stats line");
        serde_json::from_str::<serde_json::Value>(line).unwrap()
    };
    let first = run(&tmp.path().join("a"));
    assert_eq!(first["layers_from_cache"], 0, "{first}");
    let second = run(&tmp.path().join("b"));
    assert_eq!(second["layers_from_cache"], 2, "{second}");
    assert_eq!(second["layers_written"], 2, "{second}");
    let (a, b) = (read_layout(&tmp.path().join("a")), read_layout(&tmp.path().join("b")));
    assert_eq!(a.index, b.index);
    assert!(a.layers == b.layers && a.config == b.config);
}
