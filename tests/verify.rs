//! `nixstream verify`, through the binary: the golden archives pass (from a
//! file and from a pipe, plain and compressed), and every kind of damage is
//! caught with a message naming the member at fault.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::{bin, golden_dir, golden_tree, sha256_hex, tar_of as archive};

fn verify_bytes(bytes: &[u8], args: &[&str]) -> Output {
    let mut child = bin()
        .arg("verify")
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn passes(bytes: &[u8]) -> String {
    let out = verify_bytes(bytes, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every digest matches"), "{stdout}");
    stdout
}

/// Fails with status 1, one stderr line holding every needle, no panic.
fn fails(bytes: &[u8], needles: &[&str]) {
    let out = verify_bytes(bytes, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in {err:?}");
    }
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    archive(files)
}

/// A one-layer image: (archive, layer bytes, config name).
fn image_with(layer: &[u8], diff_id: &str, layer_name: &str) -> Vec<u8> {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": ["t:1"], "Layers": [layer_name]}
    ]))
    .unwrap();
    archive(&[(layer_name, layer), (&config_name, &config), ("manifest.json", &manifest)])
}

fn good_layer() -> Vec<u8> {
    layer_tar(&[("bin/hello", b"#!/bin/sh\necho hi\n"), ("etc/x", &[7u8; 3000])])
}

#[test]
fn golden_archives_pass_from_files_and_pipes() {
    golden_tree();
    for case in ["basic", "from-image", "grouped", "odd-bytes"] {
        let path = golden_dir().join("cases").join(case).join("expected.tar");
        let out = bin().arg("verify").arg(&path).output().unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let report = String::from_utf8_lossy(&out.stdout);
        // The image ID in the report is the one nixpkgs printed.
        let expected = std::fs::read_to_string(path.with_file_name("expected.txt")).unwrap();
        let id = report.split("id sha256:").nth(1).unwrap().split_whitespace().next().unwrap();
        assert!(expected.contains(id), "{case}: {id} not in expected.txt");
        passes(&std::fs::read(&path).unwrap());
    }
}

#[test]
fn compressed_streams_and_compressed_layers_pass() {
    golden_tree();
    let tar = std::fs::read(golden_dir().join("cases/basic/expected.tar")).unwrap();
    passes(&zstd::encode_all(&tar[..], 3).unwrap());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    passes(&gz.finish().unwrap());

    let layer = good_layer();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let blob = zstd::encode_all(&layer[..], 3).unwrap();
    let report = passes(&image_with(&blob, &diff_id, &format!("blobs/sha256/{}", sha256_hex(&blob))));
    assert!(report.contains("(zstd)"), "{report}");
    assert!(report.contains("      2 entries"), "{report}");
}

#[test]
fn json_report() {
    let layer = good_layer();
    let out = verify_bytes(&image_with(&layer, &format!("sha256:{}", sha256_hex(&layer)), "l/layer.tar"), &["--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["images"][0]["layers"][0]["entries"], 2);
    assert_eq!(v["images"][0]["repo_tags"][0], "t:1");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn a_layer_not_matching_its_diff_id_is_named() {
    golden_tree();
    let mut tar = std::fs::read(golden_dir().join("cases/basic/expected.tar")).unwrap();
    let at = tar.windows(7).position(|w| w == b"big.bin").unwrap() + 4096;
    tar[at] ^= 0xff;
    fails(&tar, &["eb5d8249f70d2d4e94e722697ce6b87d0a336126525be4b812980f10eb3cd52b/layer.tar", "diff_id"]);
}

#[test]
fn a_config_not_named_by_its_digest_is_caught() {
    let layer = good_layer();
    let config = br#"{"rootfs": {"diff_ids": []}}"#;
    let name = format!("{}.json", "ab".repeat(32));
    let manifest = format!(r#"[{{"Config": "{name}", "Layers": []}}]"#);
    fails(
        &archive(&[("l.tar", &layer), (&name, config), ("manifest.json", manifest.as_bytes())]),
        &["its name does not carry"],
    );
}

#[test]
fn missing_layer_missing_manifest_and_count_mismatch() {
    let layer = good_layer();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let mut a = image_with(&layer, &diff_id, "a/layer.tar");
    // Rename the layer member: the manifest now names a missing member.
    let at = a.windows(11).position(|w| w == b"a/layer.tar").unwrap();
    a[at] = b'b';
    let mut h = tar::Header::from_byte_slice(&a[..512]).clone();
    h.set_cksum();
    a[..512].copy_from_slice(h.as_bytes());
    fails(&a, &["a/layer.tar", "not in the archive"]);

    fails(&archive(&[("x/layer.tar", &layer)]), &["no manifest.json"]);

    let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": [diff_id, diff_id]}})).unwrap();
    let cname = format!("{}.json", sha256_hex(&config));
    let manifest = format!(r#"[{{"Config": "{cname}", "Layers": ["l.tar"]}}]"#);
    fails(
        &archive(&[("l.tar", &layer), (&cname, &config), ("manifest.json", manifest.as_bytes())]),
        &["1 layers but the config has 2 diff_ids"],
    );
}

#[test]
fn escaping_names_in_the_manifest_are_refused() {
    let layer = good_layer();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    for bad in ["../etc/layer.tar", "/abs/layer.tar"] {
        let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": [diff_id]}})).unwrap();
        let cname = format!("{}.json", sha256_hex(&config));
        let manifest = format!(r#"[{{"Config": "{cname}", "Layers": ["{bad}"]}}]"#);
        fails(&archive(&[(&cname, &config), ("manifest.json", manifest.as_bytes())]), &[bad, "escapes the archive"]);
    }
}

#[test]
fn every_image_of_a_multi_image_manifest_is_checked() {
    let layer = good_layer();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": [diff_id]}})).unwrap();
    let cname = format!("{}.json", sha256_hex(&config));
    let manifest = format!(
        r#"[{{"Config": "{cname}", "RepoTags": ["a:1"], "Layers": ["l.tar"]}},
            {{"Config": "{cname}", "RepoTags": ["b:1"], "Layers": ["gone.tar"]}}]"#
    );
    fails(
        &archive(&[("l.tar", &layer), (&cname, &config), ("manifest.json", manifest.as_bytes())]),
        &["image 2", "gone.tar"],
    );
}

#[test]
fn structural_damage_is_one_line() {
    golden_tree();
    let tar = std::fs::read(golden_dir().join("cases/basic/expected.tar")).unwrap();
    fails(&tar[..600_000], &["truncated"]);
    fails(&tar[..tar.len() - 10240], &["truncated"]);
    fails(b"this is not a tar archive, not even close; it is a sentence.", &["truncated"]);
    fails(&[b'x'; 4096], &["not a tar archive"]);
    fails(b"", &["not a tar archive", "empty"]);
    // A layer that is not a tar inside a sound archive.
    let junk = vec![b'j'; 2000];
    fails(&image_with(&junk, &format!("sha256:{}", sha256_hex(&junk)), "j.tar"), &["j.tar", "not a readable tar"]);
}

#[test]
fn a_huge_manifest_is_refused_without_reading_it() {
    // A header announcing a 1 GiB manifest.json, and then nothing: the
    // verifier must refuse on the header, not try to read or allocate it.
    let mut h = tar::Header::new_ustar();
    h.set_path("manifest.json").unwrap();
    h.set_size(1 << 30);
    h.set_cksum();
    fails(h.as_bytes(), &["manifest.json", "larger than"]);
}

#[test]
fn our_own_output_verifies() {
    golden_tree();
    let out = bin().args(["stream", "-q"]).arg(golden_dir().join("cases/grouped/conf.json")).output().unwrap();
    assert!(out.status.success());
    passes(&out.stdout);
}
