//! Bad input gets a one-line message naming the culprit, a non-zero exit,
//! no panic, and never an archive a client could load (no manifest.json).

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{bin, conf_json, golden_dir, golden_tree, make_customisation};
use nixstream::archive::{write_archive, ArchiveError, ArchiveOptions};
use nixstream::conf::Conf;
use nixstream::hash::LayerDigest;
use nixstream::isotime::DateTime;
use nixstream::plan::ImagePlan;
use nixstream::progress::{Mode, Progress};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    pkg: PathBuf,
    cust: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = root.join("nix/store");
    let pkg = store.join("aaaa-pkg");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::write(pkg.join("bin/tool"), vec![7u8; 300_000]).unwrap();
    std::fs::write(pkg.join("readme"), b"hi\n").unwrap();
    let cust = make_customisation(&root);
    Fixture { _tmp: tmp, root, store, pkg, cust }
}

impl Fixture {
    fn conf(&self, v: &serde_json::Value) -> PathBuf {
        let p = self.root.join("conf.json");
        std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        p
    }

    fn good(&self) -> serde_json::Value {
        conf_json(&self.store, &[vec![self.pkg.clone()]], &self.cust)
    }
}

/// Runs `nixstream stream CONF`; asserts failure with one stderr line
/// containing every needle and no manifest.json on stdout.
fn fails_with(conf: &Path, needles: &[&str]) {
    let out = bin().args(["stream", "-q"]).arg(conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in {err:?}");
    }
    assert!(!no_manifest_violation(&out.stdout), "stdout carries a manifest.json");
}

fn no_manifest_violation(stdout: &[u8]) -> bool {
    stdout.windows(13).any(|w| w == b"manifest.json")
}

#[test]
fn conf_not_json() {
    let f = fixture();
    let p = f.root.join("conf.json");
    std::fs::write(&p, b"{ not json").unwrap();
    fails_with(&p, &["not valid JSON", "conf.json"]);
}

#[test]
fn conf_missing_key() {
    let f = fixture();
    let mut c = f.good();
    c.as_object_mut().unwrap().remove("store_layers");
    fails_with(&f.conf(&c), &["missing key \"store_layers\""]);
}

#[test]
fn conf_wrong_type() {
    let f = fixture();
    let mut c = f.good();
    c["uid"] = serde_json::json!("root");
    fails_with(&f.conf(&c), &["\"uid\"", "integer"]);
}

#[test]
fn store_path_missing() {
    let f = fixture();
    let c = conf_json(&f.store, &[vec![f.store.join("zzzz-not-built")]], &f.cust);
    fails_with(&f.conf(&c), &["zzzz-not-built", "does not exist"]);
}

#[test]
fn store_path_outside_store_dir() {
    let f = fixture();
    let c = conf_json(&f.store, &[vec![f.root.join("elsewhere")]], &f.cust);
    fails_with(&f.conf(&c), &["elsewhere", "not a path inside store_dir"]);
}

#[test]
fn unreadable_file_is_named() {
    let f = fixture();
    let secret = f.pkg.join("secret");
    std::fs::write(&secret, b"x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let conf = f.conf(&f.good());
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    // root reads anything: run as nobody when we are root.
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if is_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(env!("CARGO_BIN_EXE_nixstream"));
        c
    } else {
        bin()
    };
    let out = cmd.args(["stream", "-q"]).arg(&conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("secret") && err.contains("Permission denied"), "{err}");
    assert!(!no_manifest_violation(&out.stdout));
}

#[test]
fn customisation_checksum_mismatch() {
    let f = fixture();
    std::fs::write(f.cust.join("checksum"), "0".repeat(64)).unwrap();
    fails_with(&f.conf(&f.good()), &["customisation", "checksum"]);
}

#[test]
fn base_image_not_a_tar() {
    let f = fixture();
    let base = f.root.join("base.tar");
    std::fs::write(&base, vec![b'x'; 2048]).unwrap();
    let mut c = f.good();
    c["from_image"] = serde_json::json!(base);
    fails_with(&f.conf(&c), &["base.tar", "not a tar"]);
}

#[test]
fn base_image_layer_not_matching_its_diff_id() {
    golden_tree();
    let f = fixture();
    let mut base = std::fs::read(golden_dir().join("cases/basic/expected.tar")).unwrap();
    // Flip one byte of big.bin's content inside the second layer; the outer
    // headers stay valid, the layer's sha256 no longer matches.
    let at = base.windows(7).position(|w| w == b"big.bin").unwrap() + 4096;
    base[at] ^= 0xff;
    let p = f.root.join("base.tar");
    std::fs::write(&p, &base).unwrap();
    let mut c = f.good();
    c["from_image"] = serde_json::json!(p);
    fails_with(
        &f.conf(&c),
        &["base.tar", "diff_id", "eb5d8249f70d2d4e94e722697ce6b87d0a336126525be4b812980f10eb3cd52b"],
    );
}

#[test]
fn closed_stdout_ends_quietly_with_non_zero_status() {
    golden_tree();
    let mut child = bin()
        .args(["stream", "-q"])
        .arg(golden_dir().join("cases/basic/conf.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1000];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "quiet");
}

#[test]
fn full_disk_is_an_error() {
    golden_tree();
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out =
        bin().args(["stream", "-q"]).arg(golden_dir().join("cases/basic/conf.json")).stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
}

fn plan_of(f: &Fixture) -> ImagePlan {
    let conf = Conf::from_value(f.good(), None, DateTime::now_utc()).unwrap();
    ImagePlan::from_conf(&conf, 2).unwrap()
}

#[test]
fn content_changed_between_passes_stops_before_manifest() {
    // The hashing pass saw other bytes than the streaming pass reads: here
    // simulated with a known (stale) digest for the layer.
    let f = fixture();
    let plan = plan_of(&f);
    let stale = LayerDigest { size: 10240 * 31, sha256: [0x11; 32] };
    let mut out = Vec::new();
    let opts = ArchiveOptions { jobs: 2, known: vec![Some(stale), None] };
    let e = write_archive(&plan, &mut out, &opts, &Progress::new(Mode::Quiet, 0)).unwrap_err();
    assert!(matches!(e, ArchiveError::DigestMismatch { layer: 1, .. }), "{e}");
    assert!(e.to_string().contains("aaaa-pkg"), "{e}");
    assert!(!no_manifest_violation(&out));
}

#[test]
fn file_growing_after_listing_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    std::fs::write(f.pkg.join("readme"), b"hi, and more\n").unwrap();
    let mut out = Vec::new();
    let e =
        write_archive(&plan, &mut out, &ArchiveOptions { jobs: 2, known: Vec::new() }, &Progress::new(Mode::Quiet, 0))
            .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("readme") && msg.contains("changed"), "{msg}");
    assert!(!no_manifest_violation(&out));
}

#[test]
fn file_vanishing_after_listing_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    std::fs::remove_file(f.pkg.join("bin/tool")).unwrap();
    let mut out = Vec::new();
    let e =
        write_archive(&plan, &mut out, &ArchiveOptions { jobs: 1, known: Vec::new() }, &Progress::new(Mode::Quiet, 0))
            .unwrap_err();
    assert!(e.to_string().contains("bin/tool") && e.to_string().contains("removed"), "{e}");
}

#[test]
fn usage_error_exit_code() {
    let out = bin().args(["stream"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin().args(["stream", "--compress", "lz4", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
