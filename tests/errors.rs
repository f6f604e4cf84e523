//! Bad input gets a one-line message naming the culprit, a non-zero exit,
//! no panic, and never an archive a client could load (no manifest.json).

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{bin, conf_json, golden_dir, golden_tree, make_customisation};
use nixstream::dest::docker_archive::write_archive;
use nixstream::engine::digest::LayerDigest;
use nixstream::engine::{EngineError, EngineOptions, Hashed, Origin};
use nixstream::input::conf::Conf;
use nixstream::input::isotime::DateTime;
use nixstream::output::progress::{Mode, Progress};
use nixstream::plan::ImagePlan;

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
    assert!(!loadable(&out.stdout), "stdout is a loadable archive");
}

/// True when `stdout` is an archive a client could load: `verify` (the
/// same checks docker and skopeo make: manifest, config digest, every
/// layer's diff_id) accepts it.
fn loadable(stdout: &[u8]) -> bool {
    nixstream::read::verify::verify(stdout, "stdout").is_ok_and(|r| r.ok())
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

/// Layers are listed by the hashing workers, while earlier layers stream;
/// a store path that does not exist is still caught before any output.
#[test]
fn store_path_missing_in_a_top_layer_stops_before_any_output() {
    let f = fixture();
    let c = conf_json(&f.store, &[vec![f.pkg.clone()], vec![f.store.join("zzzz-not-built")]], &f.cust);
    let out = bin().args(["stream", "-q"]).arg(f.conf(&c)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("store layer 2") && err.contains("zzzz-not-built"), "{err}");
    assert!(out.stdout.is_empty(), "{} bytes written before the error", out.stdout.len());
}

#[test]
fn store_path_outside_store_dir() {
    let f = fixture();
    let c = conf_json(&f.store, &[vec![f.root.join("elsewhere")]], &f.cust);
    fails_with(&f.conf(&c), &["elsewhere", "not a path inside store_dir"]);
}

/// `nixstream stream -q CONF` without root's right to read anything: as
/// nobody when we are root.
fn stream_as_nobody(conf: &Path) -> std::process::Output {
    std::fs::set_permissions(conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let is_root = rustix::process::geteuid().is_root();
    let mut cmd = if is_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(env!("CARGO_BIN_EXE_nixstream"));
        c
    } else {
        bin()
    };
    cmd.args(["stream", "-q"]).arg(conf).output().unwrap()
}

#[test]
fn unreadable_file_is_named() {
    let f = fixture();
    let secret = f.pkg.join("secret");
    std::fs::write(&secret, b"x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = stream_as_nobody(&f.conf(&f.good()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("secret") && err.contains("Permission denied"), "{err}");
    assert!(!loadable(&out.stdout));
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

/// The fixture's plan with every layer listed: what a test changes next
/// happens after the listing.
/// Streams `plan` into `out` with `jobs` workers, expecting an error.
fn stream_failing(plan: &ImagePlan, jobs: usize, out: &mut Vec<u8>) -> EngineError {
    let opts = EngineOptions { jobs, ..Default::default() };
    write_archive(plan, out, &opts, &Progress::new(Mode::Quiet, 0)).unwrap_err()
}

fn plan_of(f: &Fixture) -> ImagePlan {
    let conf = Conf::from_value(f.good(), None, DateTime::now_utc()).unwrap();
    let plan = ImagePlan::from_conf(&conf).unwrap();
    plan.list_all(2).unwrap();
    plan
}

#[test]
fn content_changed_between_passes_stops_before_manifest() {
    // The hashing pass saw other bytes than the streaming pass reads: here
    // simulated with a known (stale) digest for the layer.
    let f = fixture();
    let plan = plan_of(&f);
    let stale = LayerDigest { size: 10240 * 31, sha256: [0x11; 32] };
    let mut out = Vec::new();
    let opts = EngineOptions {
        jobs: 2,
        known: vec![
            Some(Hashed {
                digest: stale,
                blob: None,
                unchanged_before_ns: i128::MIN,
                files: None,
                origin: Default::default(),
            }),
            None,
        ],
        ..Default::default()
    };
    let e = write_archive(&plan, &mut out, &opts, &Progress::new(Mode::Quiet, 0)).unwrap_err();
    assert!(matches!(e, EngineError::DigestMismatch { layer: 1, .. }), "{e}");
    assert!(e.to_string().contains("aaaa-pkg"), "{e}");
    assert!(!loadable(&out));
}

#[test]
fn file_growing_after_listing_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    std::fs::write(f.pkg.join("readme"), b"hi, and more\n").unwrap();
    let mut out = Vec::new();
    let e = stream_failing(&plan, 2, &mut out);
    let msg = e.to_string();
    assert!(msg.contains("readme") && msg.contains("changed"), "{msg}");
    assert!(!loadable(&out));
}

#[test]
fn file_shrinking_after_listing_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    let tool = std::fs::OpenOptions::new().write(true).open(f.pkg.join("bin/tool")).unwrap();
    tool.set_len(1000).unwrap();
    drop(tool);
    let mut out = Vec::new();
    let e = stream_failing(&plan, 2, &mut out);
    let msg = e.to_string();
    assert!(msg.contains("bin/tool") && msg.contains("size 300000 became 1000"), "{msg}");
    assert!(!loadable(&out));
}

/// The hashing pass alone (`nixstream digest`) has no streaming pass after
/// it to compare entries with the listing, so it does: a file that grew
/// after the listing is an error, not the digest of a torn layer.
#[test]
fn digest_alone_names_a_file_changed_after_listing() {
    let f = fixture();
    let plan = plan_of(&f);
    let mut tool = std::fs::OpenOptions::new().append(true).open(f.pkg.join("bin/tool")).unwrap();
    std::io::Write::write_all(&mut tool, b"more").unwrap();
    drop(tool);
    let e = nixstream::engine::hash_only(
        &plan,
        &EngineOptions { jobs: 2, ..Default::default() },
        &Progress::new(Mode::Quiet, 0),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("bin/tool") && msg.contains("size 300000 became 300004"), "{msg}");
}

#[test]
fn file_vanishing_after_listing_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    std::fs::remove_file(f.pkg.join("bin/tool")).unwrap();
    let mut out = Vec::new();
    let e = stream_failing(&plan, 1, &mut out);
    assert!(e.to_string().contains("bin/tool") && e.to_string().contains("removed"), "{e}");
}

// --- Digests from outside that are wrong ----------------------------------

impl Fixture {
    /// `nixstream layer-digest` of the pkg layer (with `extra` owner
    /// settings) into `name`: its path and JSON.
    fn layer_digest(&self, name: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
        let file = self.root.join(name);
        let out = bin()
            .args(["layer-digest", "-q", "--store-dir"])
            .arg(&self.store)
            .args(extra)
            .arg(&self.pkg)
            .arg("-o")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        (file, v)
    }
}

/// `stream --known-digests FILE` that fails: one line, exit 1, nothing
/// loadable, and not blamed on the store; the line.
fn fails_with_known_digests(f: &Fixture, file: &Path) -> String {
    let out = bin().args(["stream", "-q", "--known-digests"]).arg(file).arg(f.conf(&f.good())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("changed while") && !err.contains("panicked"), "{err}");
    assert!(!loadable(&out.stdout), "stdout is a loadable archive");
    err
}

/// A layer digest file made from other content than the store path has
/// here (another build of it, or the file is stale): the error names the
/// file, the layer and the file of the layer whose hash differs, and says
/// to regenerate it; nothing changed in the store.
#[test]
fn a_stale_layer_digest_file_is_named_not_the_store() {
    let f = fixture();
    let (file, _) = f.layer_digest("pkg.json", &[]);
    std::fs::write(f.pkg.join("readme"), b"ho\n").unwrap();
    let err = fails_with_known_digests(&f, &file);
    for needle in [
        format!("layer 1 (['{}'])", f.pkg.display()),
        format!("the digest from the layer digest file {} is wrong for this layer", file.display()),
        format!("{} has xxh3", f.pkg.join("readme").display()),
        "though that file has not changed since it was listed".into(),
        format!("regenerate {} with `nixstream layer-digest`", file.display()),
    ] {
        assert!(err.contains(&needle), "{needle:?} in {err}");
    }
}

/// Without per-file hashes the layer is hashed again while streaming: a
/// wrong diff_id is named beside the layer's real one.
#[test]
fn a_layer_digest_file_with_a_wrong_diff_id_names_both_digests() {
    let f = fixture();
    let (file, mut v) = f.layer_digest("pkg.json", &[]);
    let real = v["diff_id"].as_str().unwrap().to_string();
    let size = v["size"].as_u64().unwrap();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    v["files"] = serde_json::json!([]);
    v["diff_id"] = serde_json::json!(wrong);
    std::fs::write(&file, v.to_string()).unwrap();
    let err = fails_with_known_digests(&f, &file);
    for needle in [
        format!("the layer digest file {}", file.display()),
        format!("it promises {wrong}, {size} bytes, but the layer tar streamed is {real}, {size} bytes"),
        format!("regenerate {}", file.display()),
    ] {
        assert!(err.contains(&needle), "{needle:?} in {err}");
    }
}

/// A layer digest file made for another owner does not describe this
/// image's layer: it is not used (the layer is hashed here), and the image
/// is right.
#[test]
fn a_layer_digest_file_for_another_owner_is_not_used() {
    let f = fixture();
    let (file, _) = f.layer_digest("pkg-1000.json", &["--uid", "1000", "--uname", "app"]);
    let conf = f.conf(&f.good());
    let out = bin().args(["stream", "-q", "--stats", "--known-digests"]).arg(&file).arg(&conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("\"layers_from_cache\":0"), "{err}");
    assert!(out.stdout == streams_ok(&conf), "the same bytes as without it");
}

/// A store file that really changed after the listing (same size, mtime
/// put back: only its ctime tells) stays a change of the store, with a
/// digest from outside too, whether the layer is checked file by file or
/// whole.
#[test]
fn a_file_changed_under_a_digest_from_outside_is_still_a_change() {
    let f = fixture();
    let plan = plan_of(&f);
    let summary = nixstream::engine::hash_only(
        &plan,
        &EngineOptions { jobs: 2, ..Default::default() },
        &Progress::new(Mode::Quiet, 0),
    )
    .unwrap();
    let readme = f.pkg.join("readme");
    let mtime = std::fs::metadata(&readme).unwrap().modified().unwrap();
    // Past the clock's granularity, so the ctime moves.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut w = std::fs::OpenOptions::new().write(true).open(&readme).unwrap();
    std::io::Write::write_all(&mut w, b"ho\n").unwrap();
    w.set_modified(mtime).unwrap();
    drop(w);
    for files in [None, summary.files[0].clone()] {
        let per_file = files.is_some();
        let known = Hashed {
            digest: summary.digests[0],
            blob: None,
            unchanged_before_ns: i128::MIN,
            files,
            origin: Origin::DigestFile(f.root.join("pkg.json")),
        };
        let opts = EngineOptions { jobs: 2, known: vec![Some(known), None], ..Default::default() };
        let mut out = Vec::new();
        let e = write_archive(&plan, &mut out, &opts, &Progress::new(Mode::Quiet, 0)).unwrap_err().to_string();
        assert!(e.contains(&format!("{} changed while the image was being written", readme.display())), "{e}");
        assert!(e.contains("ctime moved") && !e.contains("pkg.json"), "per file {per_file}: {e}");
        assert!(!loadable(&out));
    }
}

#[test]
fn usage_error_exit_code() {
    let out = bin().args(["stream"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin().args(["stream", "--compress", "lz4", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `nixstream stream -q CONF`; asserts success and a loadable archive.
fn streams_ok(conf: &Path) -> Vec<u8> {
    let out = bin().args(["stream", "-q"]).arg(conf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(loadable(&out.stdout), "output does not verify");
    out.stdout
}

/// The entries (name, type, size) of store layer `layer` (0-based) of an archive.
fn layer_entries(archive: &[u8], layer: usize) -> Vec<(Vec<u8>, tar::EntryType, u64)> {
    let report = nixstream::read::verify::verify(archive, "a").unwrap();
    let name = &report.images[0].layers[layer].name;
    let mut outer = tar::Archive::new(archive);
    let mut data = Vec::new();
    for e in outer.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == name.as_bytes() {
            e.read_to_end(&mut data).unwrap();
        }
    }
    let mut inner = tar::Archive::new(&data[..]);
    inner
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path_bytes().into_owned(), e.header().entry_type(), e.size())
        })
        .collect()
}

#[test]
fn conf_catalogue() {
    let f = fixture();
    let pkg = f.pkg.to_str().unwrap().to_string();
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        ("created", serde_json::json!("yesterday"), vec!["\"created\"", "yesterday", "ISO 8601"]),
        ("created", serde_json::json!(12), vec!["\"created\"", "found a number"]),
        ("uid", serde_json::json!(-1), vec!["\"uid\"", "-1 is outside"]),
        ("uid", serde_json::json!(18446744073709551616u128), vec!["\"uid\"", "18446744073709551616 is outside"]),
        ("gid", serde_json::json!(1u64 << 40), vec!["\"gid\"", "outside"]),
        ("gid", serde_json::json!(1.5), vec!["\"gid\"", "integer"]),
        ("store_layers", serde_json::json!([[]]), vec!["store_layers[0]", "at least one store path"]),
        ("store_layers", serde_json::json!([[pkg, pkg]]), vec!["store_layers[0][1]", "more than once"]),
        ("store_layers", serde_json::json!([[pkg], [pkg]]), vec!["store_layers[1][0]", "more than once"]),
        (
            "store_layers",
            serde_json::json!([["nix/store/aaaa-pkg"]]),
            vec!["store_layers[0][0]", "not an absolute path"],
        ),
        (
            "store_layers",
            serde_json::json!([[format!("{}/../store/aaaa-pkg", f.store.display())]]),
            vec!["store_layers[0][0]", "'..'"],
        ),
        ("store_layers", serde_json::json!("x"), vec!["\"store_layers\"", "list"]),
        ("customisation_layer", serde_json::json!(f.root.join("nope")), vec!["nope"]),
    ];
    for (key, value, needles) in cases {
        let mut c = f.good();
        c[key] = value;
        fails_with(&f.conf(&c), &needles);
    }
}

#[test]
fn empty_store_layers_is_an_image_of_the_customisation_layer() {
    // nixpkgs writes `store_layers: []` when every path went elsewhere; the
    // reference streams an image with only the customisation layer.
    let f = fixture();
    let mut c = f.good();
    c["store_layers"] = serde_json::json!([]);
    let out = streams_ok(&f.conf(&c));
    let r = nixstream::read::verify::verify(&out[..], "out").unwrap();
    assert_eq!(r.images[0].layers.len(), 1);
}

#[test]
fn unreadable_directory_is_named() {
    let f = fixture();
    let locked = f.pkg.join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::write(locked.join("inside"), b"x").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = stream_as_nobody(&f.conf(&f.good()));
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("locked") && err.contains("Permission denied"), "{err}");
    assert!(!loadable(&out.stdout));
}

#[test]
fn fifos_and_sockets_are_named_errors() {
    let f = fixture();
    let fifo = f.pkg.join("a-fifo");
    use rustix::fs::{FileType, Mode, CWD};
    rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
    fails_with(&f.conf(&f.good()), &["a-fifo", "is a fifo"]);
    std::fs::remove_file(&fifo).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(f.pkg.join("a-socket")).unwrap();
    fails_with(&f.conf(&f.good()), &["a-socket", "is a socket"]);
}

#[test]
fn symlink_loops_are_archived_not_followed() {
    let f = fixture();
    std::os::unix::fs::symlink("loop-b", f.pkg.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", f.pkg.join("loop-b")).unwrap();
    std::os::unix::fs::symlink(".", f.pkg.join("self")).unwrap();
    let out = streams_ok(&f.conf(&f.good()));
    let entries = layer_entries(&out, 0);
    let links: Vec<_> = entries.iter().filter(|e| e.1 == tar::EntryType::Symlink).collect();
    assert_eq!(links.len(), 3, "{entries:?}");
}

#[test]
fn long_names_and_paths_beyond_path_max() {
    let f = fixture();
    // A 255-byte name (NAME_MAX) and a path of more than 4096 bytes
    // (PATH_MAX), both written with pax headers.
    let name255 = "n".repeat(255);
    std::fs::write(f.pkg.join(&name255), b"255").unwrap();
    let seg = "d".repeat(250);
    let mut deep = f.pkg.clone();
    let fd_root = std::fs::File::open(&f.pkg).unwrap();
    // Build the deep tree with *at calls: the path is too long for mkdir.
    let mut dir = std::os::fd::OwnedFd::from(fd_root);
    use rustix::fs::{Mode, OFlags};
    for _ in 0..18 {
        rustix::fs::mkdirat(&dir, seg.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(&dir, seg.as_str(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        deep = deep.join(&seg);
    }
    {
        let fd = rustix::fs::openat(&dir, "deep-file", OFlags::WRONLY | OFlags::CREATE, Mode::from_raw_mode(0o644));
        let mut file = std::fs::File::from(fd.unwrap());
        std::io::Write::write_all(&mut file, b"deep content").unwrap();
    }
    let deep_file = deep.join("deep-file");
    assert!(deep_file.as_os_str().len() > 4096);
    let out = streams_ok(&f.conf(&f.good()));
    let entries = layer_entries(&out, 0);
    let find = |p: &Path| entries.iter().find(|e| e.0 == p.as_os_str().as_encoded_bytes()).cloned();
    assert_eq!(find(&f.pkg.join(&name255)).map(|e| e.2), Some(3));
    assert_eq!(find(&deep_file).map(|e| e.2), Some(12), "the deep file is in the layer with its full path");
}

#[test]
fn a_hundred_thousand_files_in_one_directory() {
    let f = fixture();
    let big = f.pkg.join("many");
    std::fs::create_dir(&big).unwrap();
    for i in 0..100_000 {
        std::fs::write(big.join(format!("f{i:06}")), b"").unwrap();
    }
    let out = streams_ok(&f.conf(&f.good()));
    let r = nixstream::read::verify::verify(&out[..], "out").unwrap();
    // /nix, /nix/store, the package, bin, bin/tool, many, 100,000 files, readme.
    assert_eq!(r.images[0].layers[0].entries, Some(100_007));
}

#[test]
fn a_writer_appending_in_the_background_never_yields_a_lying_archive() {
    let f = fixture();
    let log = f.pkg.join("growing.log");
    std::fs::write(&log, vec![b'x'; 100_000]).unwrap();
    let conf = f.conf(&f.good());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut fh = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::io::Write::write_all(&mut fh, b"another line\n").unwrap();
                n += 1;
            }
            n
        })
    };
    let (mut failed, mut succeeded) = (0, 0);
    for _ in 0..20 {
        let out = bin().args(["stream", "-q"]).arg(&conf).output().unwrap();
        if out.status.success() {
            // Whatever it caught, it must be self-consistent.
            assert!(loadable(&out.stdout), "exit 0 with an archive that does not verify");
            succeeded += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("growing.log") && err.contains("changed"), "{err}");
            assert!(!loadable(&out.stdout), "a failed run left a loadable archive");
            failed += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lines = writer.join().unwrap();
    assert!(lines > 0);
    assert!(failed > 0, "the appends were never noticed ({succeeded} runs succeeded)");
}

#[test]
fn replaced_file_between_passes_is_named() {
    let f = fixture();
    let plan = plan_of(&f);
    // Same name, same size, another inode (what a rebuild or an atomic
    // rename does).
    let tool = f.pkg.join("bin/tool");
    let tmp = f.pkg.join("bin/tool.new");
    std::fs::write(&tmp, vec![8u8; 300_000]).unwrap();
    std::fs::rename(&tmp, &tool).unwrap();
    let mut out = Vec::new();
    let e = stream_failing(&plan, 1, &mut out);
    assert!(e.to_string().contains("bin/tool") && e.to_string().contains("replaced"), "{e}");
    assert!(!loadable(&out));
}

#[test]
#[ignore = "streams 8 GiB (sparse) three times; run by scripts/test"]
fn a_file_over_8_gib_gets_a_pax_size() {
    let f = fixture();
    let big = f.pkg.join("huge.img");
    let fh = std::fs::File::create(&big).unwrap();
    let size = (8u64 << 30) + 1;
    fh.set_len(size).unwrap();
    drop(fh);
    let mut child = bin().args(["stream", "-q"]).arg(f.conf(&f.good())).stdout(Stdio::piped()).spawn().unwrap();
    // Keep the first 2 MiB to find the header; verify the whole stream.
    struct Tee<R> {
        inner: R,
        head: Vec<u8>,
    }
    impl<R: Read> Read for Tee<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            let room = (2usize << 20).saturating_sub(self.head.len()).min(n);
            self.head.extend_from_slice(&buf[..room]);
            Ok(n)
        }
    }
    let mut tee = Tee { inner: child.stdout.take().unwrap(), head: Vec::new() };
    let report = nixstream::read::verify::verify(&mut tee, "stdout").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(report.ok(), "{:?}", report.problems);
    let record = format!("size={size}\n");
    assert!(tee.head.windows(record.len()).any(|w| w == record.as_bytes()), "no pax size record");
    assert!(report.bytes > size);
}

// ---- issue 17: bounded input, cache entries, clearer errors.

/// Asserts a measured run failed with one stderr line holding every needle.
fn failed_with(m: &common::Measured, needles: &[&str]) {
    assert_eq!(m.code, Some(1), "{}", m.stderr);
    assert_eq!(m.stderr.trim_end().lines().count(), 1, "one line: {}", m.stderr);
    assert!(!m.stderr.contains("panicked"), "{}", m.stderr);
    for n in needles {
        assert!(m.stderr.contains(n), "expected {n:?} in {:?}", m.stderr);
    }
}

fn cmd(args: &[&str]) -> Command {
    let mut c = bin();
    c.args(args);
    c
}

/// A closure graph file holding the fixture's one store path.
fn graph_of(f: &Fixture) -> PathBuf {
    let p = f.root.join("graph.json");
    let g = serde_json::json!({"graph": [{"path": f.pkg, "references": [], "narSize": 300_003}]});
    std::fs::write(&p, serde_json::to_vec(&g).unwrap()).unwrap();
    p
}

#[test]
fn input_that_never_ends_is_cut_at_a_named_limit() {
    let f = fixture();
    let g = graph_of(&f);
    let g = g.to_str().unwrap();
    for (args, needles) in [
        (vec!["stream", "-q", "/dev/zero"], vec!["configuration /dev/zero", "67108864-byte limit"]),
        (vec!["layers", g, "--pipeline", "@/dev/zero"], vec!["pipeline /dev/zero", "16777216-byte limit"]),
        (vec!["image", "-q", g, "--config", "@/dev/zero"], vec!["config /dev/zero", "67108864-byte limit"]),
        (
            vec!["layers", g, "--auto-layer", "2", "--exclude-paths", "/dev/zero"],
            vec!["--exclude-paths file /dev/zero", "67108864-byte limit"],
        ),
    ] {
        let m = common::run_measured(cmd(&args), None);
        failed_with(&m, &needles);
        assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "{args:?}: peak RSS {} KiB", m.max_rss_kib);
    }
}

#[test]
fn an_invalid_graph_file_is_reported_as_such() {
    let f = fixture();
    let g = f.root.join("graph.json");
    std::fs::write(&g, b"{\"graph\": [").unwrap();
    let out = bin().args(["layers", "--auto-layer", "2"]).arg(&g).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("closure graph") && err.contains("graph.json") && err.contains("not valid JSON"), "{err}");
    assert!(!err.contains("nix path-info") && !err.contains("flake"), "{err}");
}

#[test]
fn a_missing_contents_directory_is_named_as_such() {
    let f = fixture();
    let g = graph_of(&f);
    let out = bin()
        .args(["image", "-q", "--contents", "/nonexistent-contents", "--store-dir"])
        .arg(&f.store)
        .arg(&g)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("contents directory /nonexistent-contents: does not exist"), "{err}");
    assert!(!err.contains("store layer"), "{err}");
    assert!(!loadable(&out.stdout));
}

#[test]
fn repo_tags_that_are_not_references_are_refused_up_front() {
    let f = fixture();
    for (tag, needle) in [("Upper/Case:1", "must be lowercase"), ("a:b\nc", "'\\n'"), ("name:", "tag \"\"")] {
        let mut c = f.good();
        c["repo_tag"] = serde_json::json!(tag);
        fails_with(&f.conf(&c), &["repo_tag", "not a valid image reference", needle]);
    }
    // --repo-tag is checked the same way.
    let out = bin().args(["stream", "-q", "--repo-tag", "x y:1"]).arg(f.conf(&f.good())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a valid image reference") && err.contains("' '"), "{err}");
}

/// `n` store layers of one one-byte file each under `store`.
fn tiny_layers(store: &Path, n: usize) -> Vec<Vec<PathBuf>> {
    (0..n)
        .map(|i| {
            let p = store.join(format!("{i:04}-tiny"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("f"), [i as u8]).unwrap();
            vec![p]
        })
        .collect()
}

#[test]
fn too_many_layers_for_docker_is_a_warning() {
    let f = fixture();
    let layers = tiny_layers(&f.store, 125);
    let c = conf_json(&f.store, &layers, &f.cust);
    let out = bin().args(["stream", "-q"]).arg(f.conf(&c)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("warning") && err.contains("126 layers") && err.contains("more than 125"), "{err}");
    assert!(err.contains("max depth exceeded"), "{err}");
    assert!(loadable(&out.stdout));
    // One layer fewer: no warning.
    let c = conf_json(&f.store, &layers[1..], &f.cust);
    let out = bin().args(["stream", "-q"]).arg(f.conf(&c)).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // `image` warns the same way.
    let nodes: Vec<serde_json::Value> =
        layers.iter().map(|l| serde_json::json!({"path": l[0], "references": [], "narSize": 1000})).collect();
    let g = f.root.join("many.json");
    std::fs::write(&g, serde_json::to_vec(&serde_json::json!({"graph": nodes})).unwrap()).unwrap();
    let out = bin()
        .args(["image", "-q", "--max-layers", "300", "--pipeline", r#"[["split_every", 1]]"#, "--store-dir"])
        .arg(&f.store)
        .arg(&g)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("126 layers"), "{err}");
}

/// Every entry file of a cache directory.
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            out.extend(std::fs::read_dir(&sub).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn cache_entries_that_are_fifos_links_or_huge_are_misses() {
    let f = fixture();
    let conf = f.conf(&f.good());
    let cache = f.root.join("cache");
    let run = || {
        let mut c = bin();
        c.args(["stream", "-q", "--cache"]).arg(&cache).arg(&conf);
        common::run_measured(c, None)
    };
    let first = run();
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let entries = cache_entries(&cache);
    assert!(!entries.is_empty(), "the first run stored entries");
    let plant = |how: &str| {
        for e in &entries {
            let _ = std::fs::remove_file(e);
            match how {
                "fifo" => {
                    use rustix::fs::{FileType, Mode, CWD};
                    rustix::fs::mknodat(CWD, e, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
                }
                "zero" => std::os::unix::fs::symlink("/dev/zero", e).unwrap(),
                _ => std::fs::File::create(e).unwrap().set_len(4 << 30).unwrap(),
            }
        }
    };
    for how in ["fifo", "zero", "huge"] {
        plant(how);
        let start = std::time::Instant::now();
        let m = run();
        assert_eq!(m.code, Some(0), "{how}: {}", m.stderr);
        assert_eq!(m.stdout, first.stdout, "{how}: the same image");
        assert!(start.elapsed().as_secs() < 60, "{how}: no hang");
        assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "{how}: peak RSS {} KiB", m.max_rss_kib);
    }
}

#[test]
fn a_cache_path_that_is_a_file_is_a_warning() {
    let f = fixture();
    let file = f.root.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = bin().args(["stream", "-q", "--cache"]).arg(&file).arg(f.conf(&f.good())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("warning") && err.contains("not-a-dir"), "{err}");
    assert!(loadable(&out.stdout));
}

#[test]
fn popularity_memory_stays_linear_in_the_closure() {
    // 60,000 paths (a binary tree of references): the square of that in
    // ancestor bits would be 450 MB.
    let d = tempfile::tempdir().unwrap();
    let n = 60_000usize;
    let name = |i: usize| format!("/nix/store/{i:032}-p{i}");
    let nodes: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let refs: Vec<String> = [2 * i + 1, 2 * i + 2].iter().filter(|&&j| j < n).map(|&j| name(j)).collect();
            serde_json::json!({"path": name(i), "references": refs, "narSize": 1000 + i % 7})
        })
        .collect();
    let g = d.path().join("big.json");
    std::fs::write(&g, serde_json::to_vec(&serde_json::json!({"graph": nodes})).unwrap()).unwrap();
    let mut c = bin();
    c.args(["layers", "--pipeline", r#"[["popularity_contest"], ["limit_layers", 50]]"#]).arg(&g);
    let m = common::run_measured(c, None);
    assert_eq!(m.code, Some(0), "{}", m.stderr);
    let layers: Vec<Vec<String>> = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(layers.len(), 50);
    assert!(layers[..49].iter().all(|l| l.len() == 1), "one path per layer but the last");
    assert_eq!(layers.iter().map(Vec::len).sum::<usize>(), n, "every path planned once");
    assert!(m.max_rss_kib <= common::MAX_RSS_KIB, "peak RSS {} KiB", m.max_rss_kib);
}

#[test]
#[ignore = "needs docker: run scripts/test"]
fn docker_refuses_the_layer_count_the_warning_names() {
    let f = fixture();
    let layers = tiny_layers(&f.store, 125);
    // 125 layers (124 store layers and the customisation layer) load; 126 do not.
    for (store_layers, loads) in [(124, true), (125, false)] {
        let tag = format!("nixstream-test/layer-limit:{}", store_layers + 1);
        let mut c = conf_json(&f.store, &layers[..store_layers], &f.cust);
        c["repo_tag"] = serde_json::json!(tag);
        let out = bin().args(["stream", "-q"]).arg(f.conf(&c)).output().unwrap();
        let warned = String::from_utf8_lossy(&out.stderr).contains("max depth exceeded");
        assert!(out.status.success());
        assert_eq!(warned, !loads, "{}", String::from_utf8_lossy(&out.stderr));
        let mut load = Command::new("docker")
            .arg("load")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = load.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &out.stdout).unwrap();
        drop(stdin);
        let res = load.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.success(), loads, "{tag}: {said}");
        if loads {
            let _ = Command::new("docker").args(["rmi", &tag]).output();
        } else {
            assert!(said.contains("max depth exceeded"), "{said}");
        }
    }
}
