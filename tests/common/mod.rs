//! Shared test helpers: a reusable archive validator (in the spirit of
//! go-containerregistry's `validate`), the golden tree, and small builders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A docker-archive, parsed and checked.
pub struct Archive {
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
    pub config_name: String,
    /// Layer tars in manifest order.
    pub layers: Vec<Vec<u8>>,
    pub member_names: Vec<String>,
}

/// Checks everything a client relies on: the outer tar reads, is padded to
/// 10240-byte records, ends with manifest.json describing one image whose
/// config is named by its sha256, whose layers exist, match their diff_ids
/// and are themselves readable tars.  Panics with the reason otherwise.
pub fn validate(bytes: &[u8]) -> Archive {
    assert_eq!(bytes.len() % 10240, 0, "archive is not padded to 10240-byte records");
    let mut members: HashMap<String, Vec<u8>> = HashMap::new();
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().expect("outer tar") {
        let mut e = e.expect("outer member");
        let name = String::from_utf8(e.path_bytes().to_vec()).expect("utf-8 member name");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("member data");
        names.push(name.clone());
        members.insert(name, data);
    }
    assert_eq!(names.last().map(String::as_str), Some("manifest.json"), "manifest.json must be the last member");
    let manifest: serde_json::Value = serde_json::from_slice(&members["manifest.json"]).expect("manifest JSON");
    let images = manifest.as_array().expect("manifest is a list");
    assert_eq!(images.len(), 1);
    let config_name = images[0]["Config"].as_str().expect("Config").to_string();
    let config_bytes = &members[&config_name];
    assert_eq!(format!("{}.json", sha256_hex(config_bytes)), config_name, "config name is its digest");
    let config: serde_json::Value = serde_json::from_slice(config_bytes).expect("config JSON");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let layer_names = images[0]["Layers"].as_array().expect("Layers");
    assert_eq!(diff_ids.len(), layer_names.len());
    assert_eq!(config["history"].as_array().map(Vec::len), Some(layer_names.len()));
    let mut layers = Vec::new();
    for (name, diff_id) in layer_names.iter().zip(diff_ids) {
        let data = members.get(name.as_str().unwrap()).unwrap_or_else(|| panic!("layer {name} missing")).clone();
        assert_eq!(format!("sha256:{}", sha256_hex(&data)), diff_id.as_str().unwrap(), "layer {name} digest");
        assert_eq!(data.len() % 512, 0, "layer {name} is not whole tar blocks");
        let mut inner = tar::Archive::new(&data[..]);
        for e in inner.entries().expect("layer tar") {
            e.expect("layer member");
        }
        layers.push(data);
    }
    Archive { manifest, config, config_name, layers, member_names: names }
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden")
}

/// Builds the golden input tree once per test binary (and the base image
/// the from-image case reads).
pub fn golden_tree() {
    golden_tree_made();
}

/// When the golden tree was made (by this test binary).
fn golden_tree_made() -> std::time::Instant {
    static TREE: OnceLock<std::time::Instant> = OnceLock::new();
    *TREE.get_or_init(|| {
        let g = golden_dir();
        assert!(
            g.join("make_tree.py").exists(),
            "golden cases not found at {} (is ../shared beside the repo?)",
            g.display()
        );
        let st = Command::new("python3").arg(g.join("make_tree.py")).output().expect("run python3 make_tree.py");
        assert!(st.status.success(), "make_tree.py failed: {}", String::from_utf8_lossy(&st.stderr));
        std::fs::copy(g.join("cases/basic/expected.tar"), "/tmp/nixstream-golden/base.tar").expect("copy base.tar");
        std::time::Instant::now()
    })
}

/// Time for files written just now to be old enough to splice
/// (`nixstream::output::splice::SETTLE_NS`, with a margin).
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(2_200);

/// The golden tree, once its files are settled enough to be spliced.
pub fn golden_tree_settled() {
    let made = golden_tree_made();
    std::thread::sleep(SETTLE.saturating_sub(made.elapsed()));
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nixstream"))
}

/// A customisation layer directory (layer.tar + checksum) under `dir`.
pub fn make_customisation(dir: &Path) -> PathBuf {
    let cust = dir.join("cust");
    std::fs::create_dir_all(&cust).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("etc/hostname").unwrap();
    h.set_size(5);
    h.set_mode(0o444);
    h.set_mtime(1);
    h.set_cksum();
    b.append(&h, &b"test\n"[..]).unwrap();
    let data = b.into_inner().unwrap();
    std::fs::write(cust.join("layer.tar"), &data).unwrap();
    std::fs::write(cust.join("checksum"), sha256_hex(&data)).unwrap();
    cust
}

/// A configuration for `layers` under `store_dir`.
pub fn conf_json(store_dir: &Path, layers: &[Vec<PathBuf>], cust: &Path) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64", "created": "1970-01-01T00:00:01Z", "mtime": "1970-01-01T00:00:01Z",
        "uid": 0, "gid": 0, "uname": "root", "gname": "root",
        "store_dir": store_dir, "from_image": null, "repo_tag": "test/image:latest",
        "customisation_layer": cust, "config": {"Cmd": ["/bin/sh"]},
        "store_layers": layers,
    })
}

/// A tar of `(name, data)` regular-file members, written with the `tar` crate.
pub fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A child's exit status, output and peak RSS.
pub struct Measured {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// Peak resident set size of the child, in KiB (`wait4`'s rusage: this
    /// child alone, not the other tests' children).
    pub max_rss_kib: u64,
}

/// Writes a child's stdin.
pub type Producer = Box<dyn FnOnce(&mut dyn std::io::Write) + Send>;

/// Runs `cmd`, feeding it `input` (a producer writing the child's stdin, so
/// big inputs never sit on disk or in memory), and measures it.
// The child is reaped by wait4 (for its own rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
pub fn run_measured(mut cmd: Command, input: Option<Producer>) -> Measured {
    use std::process::Stdio;
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let writer = input.map(|f| {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || f(&mut stdin))
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut stderr = String::new();
    let _ = err.read_to_string(&mut stderr);
    let stdout = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 reaps our own child once.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    if let Some(w) = writer {
        let _ = w.join();
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Measured { code, stdout, stderr, max_rss_kib: ru.ru_maxrss as u64 }
}

/// The bound the memory tests hold the child to.
pub const MAX_RSS_KIB: u64 = 256 * 1024;

/// Runs a command, failing loudly when it cannot be started or fails.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? run scripts/setup-deps)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
