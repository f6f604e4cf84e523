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

// ---- issue 17: verify must never pass what clients refuse, and must end.

#[test]
fn fewer_diff_ids_than_layers_fails() {
    // docker load ("layers length mismatch") and skopeo refuse this.
    let layer = good_layer();
    let config = br#"{"rootfs": {"type": "layers", "diff_ids": []}}"#;
    let cname = format!("{}.json", sha256_hex(config));
    let manifest = format!(r#"[{{"Config": "{cname}", "Layers": ["l/layer.tar"]}}]"#);
    let a = archive(&[("l/layer.tar", &layer), (&cname, config), ("manifest.json", manifest.as_bytes())]);
    fails(&a, &["1 layers but the config has 0 diff_ids"]);
    let out = verify_bytes(&a, &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("BAD") && report.contains("problem(s)"), "{report}");
    assert!(!report.contains("every digest matches"), "{report}");
}

#[test]
fn a_bad_layer_line_always_fails() {
    // Every layer marked BAD in a report comes with a problem, whatever the
    // reason: layer missing, not a tar, wrong diff_id, no diff_id.
    let layer = good_layer();
    let d = format!("sha256:{}", sha256_hex(&layer));
    let other = format!("sha256:{}", "11".repeat(32));
    for (ids, names) in [
        (vec![d.clone()], vec!["gone.tar"]),
        (vec![other], vec!["l.tar"]),
        (vec!["sha256:zz".to_string()], vec!["l.tar"]),
        (vec![d.clone()], vec!["l.tar", "l.tar"]),
    ] {
        let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": ids}})).unwrap();
        let cname = format!("{}.json", sha256_hex(&config));
        let manifest = serde_json::to_vec(&serde_json::json!([{"Config": cname, "Layers": names}])).unwrap();
        let a = archive(&[("l.tar", &layer), (&cname, &config), ("manifest.json", &manifest)]);
        let out = verify_bytes(&a, &["--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bad = v["images"][0]["layers"].as_array().unwrap().iter().filter(|l| l["ok"] == false).count();
        assert!(bad > 0, "{v}");
        assert_eq!(out.status.code(), Some(1), "{v}");
        assert!(!v["problems"].as_array().unwrap().is_empty());
    }
}

/// A conf of the grouped golden case whose config holds `labels` labels.
fn conf_with_labels(dir: &std::path::Path, labels: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(golden_dir().join("cases/grouped/conf.json")).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let l: serde_json::Map<String, serde_json::Value> = (0..labels)
        .map(|i| (format!("org.example.label.number.{i:07}"), serde_json::json!(format!("value {i} of a big config"))))
        .collect();
    c["config"]["Labels"] = serde_json::Value::Object(l);
    let p = dir.join("conf.json");
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    p
}

#[test]
fn our_own_output_with_a_big_config_verifies() {
    golden_tree();
    let d = tempfile::tempdir().unwrap();
    let conf = conf_with_labels(d.path(), 300_000);
    let out = bin().args(["stream", "-q"]).arg(&conf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = common::run_measured(
        {
            let mut c = bin();
            c.args(["verify", "-"]);
            c
        },
        Some(Box::new(move |w| {
            let _ = w.write_all(&out.stdout);
        })),
    );
    assert_eq!(m.code, Some(0), "{}", m.stderr);
    let report = String::from_utf8_lossy(&m.stdout);
    assert!(report.contains("every digest matches"), "{report}");
    assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "peak RSS {} KiB", m.max_rss_kib);
}

/// Writes a tar of `n` empty regular members named uniquely, then an end.
fn many_members(w: &mut dyn Write, n: usize) {
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("m/{i:09}")).unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        buf.extend_from_slice(h.as_bytes());
        if buf.len() >= 1 << 20 {
            if w.write_all(&buf).is_err() {
                return;
            }
            buf.clear();
        }
    }
    buf.resize(buf.len() + 1024, 0);
    let _ = w.write_all(&buf);
}

#[test]
fn millions_of_members_on_stdin_stay_in_bounded_memory() {
    let m = common::run_measured(
        {
            let mut c = bin();
            c.args(["verify", "-"]);
            c
        },
        Some(Box::new(|w| many_members(w, 2_000_000))),
    );
    assert_eq!(m.code, Some(1), "{}", m.stderr);
    assert_eq!(m.stderr.trim_end().lines().count(), 1, "{}", m.stderr);
    assert!(m.stderr.contains("more than 65536 files") && m.stderr.contains("a limit of verify"), "{}", m.stderr);
    assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "peak RSS {} KiB", m.max_rss_kib);
}

#[test]
fn verify_dev_zero_ends() {
    let start = std::time::Instant::now();
    let m = common::run_measured(
        {
            let mut c = bin();
            c.args(["verify", "/dev/zero"]);
            c
        },
        None,
    );
    assert_eq!(m.code, Some(1), "{}", m.stderr);
    assert_eq!(m.stderr.trim_end().lines().count(), 1, "{}", m.stderr);
    assert!(m.stderr.contains("/dev/zero") && m.stderr.contains("end-of-archive"), "{}", m.stderr);
    assert!(start.elapsed().as_secs() < 30);
    assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "peak RSS {} KiB", m.max_rss_kib);
}

/// A layer tar holding one entry `name` (a hard link to `link` if given).
fn layer_with_entry(name: &str, link: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    h.set_mode(0o644);
    h.set_size(0);
    if let Some(l) = link {
        h.set_entry_type(tar::EntryType::Link);
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn entries_escaping_the_root_are_a_warning_and_fail_strict() {
    for (name, link) in [("../../etc/evil", None), ("x", Some("../../../etc/shadow"))] {
        let layer = layer_with_entry(name, link);
        let a = image_with(&layer, &format!("sha256:{}", sha256_hex(&layer)), "l/layer.tar");
        let out = verify_bytes(&a, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("warning") && err.contains("outside the root"), "{err}");
        let out = verify_bytes(&a, &["--strict"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("outside the root") && err.contains("--strict"), "{err}");
    }
    // The reference's own absolute names are rooted: no warning.
    golden_tree();
    let out = verify_bytes(&std::fs::read(golden_dir().join("cases/basic/expected.tar")).unwrap(), &["--strict"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---- OCI archives and layout directories.

/// An OCI image layout as (name, bytes) members: layers given as (blob,
/// media type, diff_id).  `edit` may change the manifest JSON.
fn oci_members(
    layers: &[(Vec<u8>, &str, String)],
    edit: impl FnOnce(&mut serde_json::Value),
) -> Vec<(String, Vec<u8>)> {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.2.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let desc = |mt: &str, b: &[u8]| serde_json::json!({"mediaType": mt, "digest": format!("sha256:{}", sha256_hex(b)), "size": b.len()});
    let mut manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|(b, mt, _)| desc(mt, b)).collect::<Vec<_>>(),
    });
    edit(&mut manifest);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut md = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
    md["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "t:1"});
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [md]})).unwrap();
    let mut out = vec![
        ("oci-layout".to_string(), br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec()),
        ("index.json".to_string(), index),
    ];
    for b in std::iter::once(&config).chain(std::iter::once(&manifest)).chain(layers.iter().map(|l| &l.0)) {
        out.push((format!("blobs/sha256/{}", sha256_hex(b)), b.clone()));
    }
    out
}

fn oci_archive(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let m: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    archive(&m)
}

fn three_layers() -> Vec<(Vec<u8>, &'static str, String)> {
    let plain = good_layer();
    let d = format!("sha256:{}", sha256_hex(&plain));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    vec![
        (plain.clone(), "application/vnd.oci.image.layer.v1.tar", d.clone()),
        (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip", d.clone()),
        (zstd::encode_all(&plain[..], 3).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd", d),
    ]
}

#[test]
fn oci_archives_and_layout_directories_pass() {
    let members = oci_members(&three_layers(), |_| {});
    let report = passes(&oci_archive(&members));
    assert!(report.contains("(OCI): t:1") && report.contains("(gzip)") && report.contains("(zstd)"), "{report}");
    assert_eq!(report.matches("  ok").count(), 3, "{report}");
    // The same as a directory.
    let d = tempfile::tempdir().unwrap();
    for (n, b) in &members {
        let p = d.path().join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
    }
    let out = bin().arg("verify").arg(d.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every digest matches"));
    // A corrupt blob in the directory.
    let (n, b) = members.last().unwrap();
    let mut bad = b.clone();
    let k = bad.len() / 2;
    bad[k] ^= 1;
    std::fs::write(d.path().join(n), &bad).unwrap();
    let out = bin().arg("verify").arg(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(n.as_str()) && err.contains("its name does not carry"), "{err}");
    // A blob that is a fifo is named, not waited on.
    std::fs::remove_file(d.path().join(n)).unwrap();
    use rustix::fs::{FileType, Mode, CWD};
    rustix::fs::mknodat(CWD, d.path().join(n), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
    let out = bin().arg("verify").arg(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn oci_damage_is_named() {
    let layers = three_layers();
    // A layer whose content is not its diff_id.
    let mut wrong = layers.clone();
    wrong[0].2 = format!("sha256:{}", "22".repeat(32));
    fails(&oci_archive(&oci_members(&wrong, |_| {})), &["layer 1", "but its diff_id is"]);
    // A descriptor's size that is not the blob's.
    fails(
        &oci_archive(&oci_members(&layers, |m| m["layers"][1]["size"] = serde_json::json!(5))),
        &["layer 2", "its descriptor says 5"],
    );
    // A media type that says gzip for a zstd blob.
    fails(
        &oci_archive(&oci_members(&layers, |m| {
            m["layers"][2]["mediaType"] = serde_json::json!("application/vnd.oci.image.layer.v1.tar+gzip")
        })),
        &["layer 3", "zstd-compressed", "says gzip"],
    );
    // A blob not named by its digest.
    let mut members = oci_members(&layers, |_| {});
    let last = members.len() - 1;
    members[last].1.push(0);
    fails(&oci_archive(&members), &["its name does not carry"]);
    // A manifest naming a layer that is not there.
    let mut members = oci_members(&layers, |_| {});
    members.pop();
    fails(&oci_archive(&members), &["layer 3", "not in the archive"]);
    // Fewer diff_ids than layers.
    let members = oci_members(&layers, |m| {
        let l = m["layers"][0].clone();
        m["layers"].as_array_mut().unwrap().push(l);
    });
    fails(&oci_archive(&members), &["4 layers but the config has 3 diff_ids"]);
}

#[test]
#[ignore = "needs skopeo: run scripts/test"]
fn skopeo_oci_archives_and_layouts_of_the_golden_cases_pass() {
    golden_tree();
    let d = tempfile::tempdir().unwrap();
    for case in ["basic", "from-image", "grouped", "odd-bytes"] {
        let src = format!("docker-archive:{}", golden_dir().join("cases").join(case).join("expected.tar").display());
        let oci = d.path().join(format!("{case}.oci"));
        let dir = d.path().join(format!("{case}-dir"));
        for dest in [format!("oci-archive:{}:{case}:1", oci.display()), format!("oci:{}:{case}:1", dir.display())] {
            let st = std::process::Command::new("skopeo").args(["copy", "-q", &src, &dest]).output().unwrap();
            assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        }
        for target in [&oci, &dir] {
            let out = bin().arg("verify").arg(target).output().unwrap();
            assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(report.contains("(OCI)") && report.contains("every digest matches"), "{report}");
        }
        passes(&std::fs::read(&oci).unwrap());
    }
}

#[test]
fn our_own_oci_outputs_verify() {
    golden_tree();
    let conf = golden_dir().join("cases/grouped/conf.json");
    let d = tempfile::tempdir().unwrap();
    for lc in ["none", "gzip", "zstd"] {
        let out = bin()
            .args(["stream", "-q", "--format", "oci-archive", "--layer-compression", lc])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report = passes(&out.stdout);
        assert!(report.contains("(OCI)"), "{report}");
        let dir = d.path().join(lc);
        let st = bin().args(["stream", "-q", "--layer-compression", lc, "--oci-layout"]).arg(&dir).arg(&conf).output();
        assert!(st.unwrap().status.success());
        let out = bin().args(["verify", "--strict"]).arg(&dir).output().unwrap();
        assert!(out.status.success(), "{lc}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("every digest matches"));
    }
}
