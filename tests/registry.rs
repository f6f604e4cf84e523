//! `push` against a real registry: Debian's `docker-registry` (the CNCF
//! distribution registry), started here on a free loopback port with a
//! generated config, once plain and once with htpasswd auth behind a TLS
//! certificate made here with `openssl`.  Faults come from killing that
//! registry mid-push and from a fault-injecting TCP proxy in front of it
//! (dropped connections, 503 bursts, a slow link), never from a fake
//! registry.  What was pushed is read back by skopeo, podman and docker.
//!
//! The image pushed is a small in-memory [`Image`] (gzip layers made here
//! with a static busybox, so docker can run it): the source side is a test
//! double until the engine implements `Image` for planned images; every
//! byte the registry sees goes through the real push code.
//!
//! These need docker-registry, htpasswd (apache2-utils), openssl, skopeo,
//! podman and docker: `scripts/test` installs them.  A missing program is a
//! failure here, not a skip.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixstream::dest::registry::auth::{self, Credentials};
use nixstream::dest::registry::client::ClientOptions;
use nixstream::dest::registry::{fetch_cache_hints, push, Outcome, PushOptions, PushSummary, Reference, RegistryError};
use nixstream::engine::digest::LayerDigest;
use nixstream::engine::image::{Compression, Descriptor, EngineError, Image, LayerInfo};
use sha2::{Digest, Sha256};

const USER: &str = "pusher";
const PASSWORD: &str = "correct-horse-battery-staple-7";

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Held around podman commands: podman's vfs store does not take one
/// test's `rmi` during another's `pull`.
fn podman_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_ok(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&common::run(cmd).stdout).into_owned()
}

// ---------------------------------------------------------------- registry

struct Tls {
    /// The CA's certificate (what a client trusts).
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate for 127.0.0.1 signed by it (a
/// self-signed leaf would be refused by webpki as a CA used as an end
/// entity, and rightly).
fn make_tls(dir: &Path, name: &str) -> Tls {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN=nixstream test CA {name}"))
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")),
    );
    std::fs::write(
        p("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("server.crt")),
    );
    Tls { ca: p("ca.crt"), cert: p("server.crt"), key: p("server.key") }
}

struct Registry {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
    tls: Option<Tls>,
}

impl Registry {
    /// A plain registry, or with `secure` htpasswd auth over TLS.
    fn start(secure: bool) -> Registry {
        Registry::start_with(secure, "")
    }

    /// As [`Registry::start`], with `extra` appended to its config.
    fn start_with(secure: bool, extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let tls = secure.then(|| make_tls(dir.path(), "reg"));
        if let Some(t) = &tls {
            yaml += &format!("  tls:\n    certificate: {}\n    key: {}\n", t.cert.display(), t.key.display());
            let htpasswd = dir.path().join("htpasswd");
            let line = run_ok(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
            std::fs::write(&htpasswd, line).unwrap();
            yaml += &format!("auth:\n  htpasswd:\n    realm: nixstream-test\n    path: {}\n", htpasswd.display());
        }
        yaml += extra;
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yaml).unwrap();
        let mut r = Registry { child: None, port, dir, config, tls };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot run docker-registry (run scripts/setup-deps)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen:\n{}", self.log());
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The registry's own log: app lines and the access log.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("storage/docker/registry/v2")
    }

    /// Whether the registry's storage holds blob `digest` (`sha256:...`).
    fn has_blob(&self, digest: &str) -> bool {
        let h = digest.strip_prefix("sha256:").unwrap();
        self.storage().join(format!("blobs/sha256/{}/{h}/data", &h[..2])).is_file()
    }

    /// The manifest digest `repo:tag` names in storage, if any.
    fn tag_digest(&self, repo: &str, tag: &str) -> Option<String> {
        let link = self.storage().join(format!("repositories/{repo}/_manifests/tags/{tag}/current/link"));
        std::fs::read_to_string(link).ok()
    }

    /// Upload requests (`POST`/`PATCH`/`PUT` on blobs/uploads) in the
    /// access log lines after `from` bytes of it, and the bytes the
    /// registry reports for them.
    fn uploads_since(&self, from: usize) -> Vec<String> {
        self.log()[from..]
            .lines()
            .filter(|l| {
                l.contains("/blobs/uploads/")
                    && (l.contains("\"PATCH ") || l.contains("\"PUT ") || l.contains("\"POST "))
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every manifest in the registry's storage names blobs it holds.
fn assert_no_manifest_with_missing_blobs(reg: &Registry) {
    let revisions = reg.storage().join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&revisions) else { return };
    for p in prefixes {
        for b in std::fs::read_dir(p.unwrap().path()).unwrap() {
            let data = b.unwrap().path().join("data");
            let Ok(bytes) = std::fs::read(&data) else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            let Some(layers) = v.get("layers").and_then(|l| l.as_array()) else { continue };
            for d in layers.iter().chain(std::iter::once(&v["config"])) {
                let digest = d["digest"].as_str().unwrap();
                assert!(reg.has_blob(digest), "manifest {} names {digest}, which the registry lacks", data.display());
            }
        }
    }
}

// ------------------------------------------------------------------- proxy

/// A TCP proxy in front of the registry that can answer 503 to new
/// connections, cut a connection once it has carried some bytes
/// upstream, and slow every connection down.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// New connections answered `503` and closed, this many.
    fail_503: AtomicUsize,
    /// Connections cut after `drop_after` bytes upstream, this many.
    drops: AtomicUsize,
    drop_after: AtomicU64,
    /// Added to `fail_503` when a connection is cut: a registry that went
    /// away mid-upload and answers 503 for a while.
    burst_after_drop: AtomicUsize,
    /// Sleep per 64 KiB forwarded upstream, in microseconds.
    throttle_us: AtomicU64,
    /// `HEAD` requests swallowed (never forwarded nor answered; the
    /// connection held until the client gives up), this many.
    hang_heads: AtomicUsize,
    hung: AtomicUsize,
    /// Bytes forwarded upstream, all connections.
    upstream_bytes: AtomicU64,
    served_503: AtomicUsize,
    dropped: AtomicUsize,
    stop: AtomicBool,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(client, upstream, st));
            }
        });
        Proxy { port, state }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1)).is_ok()
}

fn serve(mut client: TcpStream, upstream: u16, st: Arc<ProxyState>) {
    if take(&st.fail_503) {
        let mut buf = [0u8; 4096];
        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = client.read(&mut buf);
        let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}"#;
        let _ = write!(
            client,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        st.served_503.fetch_add(1, Ordering::SeqCst);
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Both);
    });
    let (mut from, mut to) = (client, server);
    let mut buf = vec![0u8; 64 << 10];
    let mut carried = 0u64;
    let mut armed = st.drops.load(Ordering::SeqCst) > 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carried += n as u64;
        if buf[..n].starts_with(b"HEAD ") && take(&st.hang_heads) {
            st.hung.fetch_add(1, Ordering::SeqCst);
            // Held: the client times out and closes (read gives 0 or an error).
            while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
            break;
        }
        if armed && carried > st.drop_after.load(Ordering::SeqCst) {
            armed = false;
            if take(&st.drops) {
                st.dropped.fetch_add(1, Ordering::SeqCst);
                st.fail_503.fetch_add(st.burst_after_drop.swap(0, Ordering::SeqCst), Ordering::SeqCst);
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        st.upstream_bytes.fetch_add(n as u64, Ordering::SeqCst);
        let t = st.throttle_us.load(Ordering::Relaxed);
        if t > 0 {
            std::thread::sleep(Duration::from_micros(t * n as u64 / (64 << 10) + 1));
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
    let _ = down.join();
}

// ------------------------------------------------------------------ image

/// An image held in memory: gzip layers of tars made here.
struct MemImage {
    layers: Vec<MemLayer>,
    config: Vec<u8>,
    repo_tag: String,
    /// Layers whose bytes were asked for, and how many bytes were written.
    renders: Mutex<Vec<usize>>,
    rendered_bytes: AtomicU64,
    /// Writes half of this layer then fails, as the engine does when a
    /// file changed since hashing.
    corrupt: Option<usize>,
}

struct MemLayer {
    tar: LayerDigest,
    blob: Vec<u8>,
    key: String,
}

type Files = Vec<(&'static str, Vec<u8>, u32)>;

fn tar_of(files: &Files) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, data, mode) in files {
        let mut prefix = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            prefix = if prefix.is_empty() { part.to_string() } else { format!("{prefix}/{part}") };
            if dirs.insert(prefix.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(1);
                b.append_data(&mut h, format!("{prefix}/"), &[][..]).unwrap();
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn arch() -> &'static str {
    nixstream::dest::manifest::host_architecture()
}

impl MemImage {
    fn new(name: &str, layers: &[Files]) -> MemImage {
        let layers: Vec<MemLayer> = layers
            .iter()
            .map(|files| {
                let tar = tar_of(files);
                let key = format!("test-key:{}", hex(&sha(&tar)));
                MemLayer { tar: LayerDigest { size: tar.len() as u64, sha256: sha(&tar) }, blob: gzip(&tar), key }
            })
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", l.tar.hex())).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch(),
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "cat", "/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        MemImage {
            layers,
            config,
            repo_tag: format!("{name}:test"),
            renders: Mutex::new(Vec::new()),
            rendered_bytes: AtomicU64::new(0),
            corrupt: None,
        }
    }

    fn rendered(&self) -> Vec<usize> {
        let mut v = self.renders.lock().unwrap().clone();
        v.sort();
        v
    }

    fn blob_digest(&self, i: usize) -> String {
        format!("sha256:{}", hex(&sha(&self.layers[i].blob)))
    }
}

impl Image for MemImage {
    fn layer_count(&self) -> usize {
        self.layers.len()
    }
    fn compression(&self) -> Compression {
        Compression::Gzip
    }
    fn layer(&self, i: usize) -> Result<LayerInfo, EngineError> {
        let l = &self.layers[i];
        Ok(LayerInfo {
            diff_id: l.tar,
            blob: Descriptor {
                media_type: Compression::Gzip.oci_layer_media_type().into(),
                digest: sha(&l.blob),
                size: l.blob.len() as u64,
            },
            key: Some(l.key.clone()),
        })
    }
    fn write_layer(&self, i: usize, out: &mut dyn Write) -> Result<(), EngineError> {
        self.renders.lock().unwrap().push(i);
        let blob = &self.layers[i].blob;
        if self.corrupt == Some(i) {
            let half = blob.len() / 2;
            out.write_all(&blob[..half]).map_err(EngineError::Output)?;
            return Err(EngineError::Worker(format!("layer {}: a file changed since hashing (injected)", i + 1)));
        }
        // In pieces, as the engine writes.
        for piece in blob.chunks(100_000) {
            out.write_all(piece).map_err(EngineError::Output)?;
            self.rendered_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
    fn config(&self) -> Result<Vec<u8>, EngineError> {
        Ok(self.config.clone())
    }
    fn repo_tag(&self) -> &str {
        &self.repo_tag
    }
}

/// Bytes that do not compress (so sizes on the wire are what they say).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// busybox, a greeting, and `big` bytes of noise in a third layer.
fn runnable_image(name: &str, greeting: &str, big: usize) -> MemImage {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static; run scripts/setup-deps)");
    MemImage::new(
        name,
        &[
            vec![("bin/busybox", busybox, 0o755)],
            vec![("hello.txt", greeting.as_bytes().to_vec(), 0o644)],
            vec![("data/noise.bin", noise(7, big), 0o644)],
        ],
    )
}

fn opts() -> PushOptions {
    PushOptions { backoff: Duration::from_millis(50), ..Default::default() }
}

fn push_to(image: &MemImage, dest: &str, o: &PushOptions) -> Result<PushSummary, RegistryError> {
    let lines = Mutex::new(Vec::new());
    let r = push(image, &Reference::parse(dest).unwrap(), o, &|l: &str| lines.lock().unwrap().push(l.to_string()));
    for l in lines.into_inner().unwrap() {
        eprintln!("progress: {l}");
        assert!(!l.contains(PASSWORD), "a progress line holds the password: {l}");
    }
    r
}

fn skopeo_inspect(reference: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").arg("inspect").args(extra).arg(format!("docker://{reference}")));
    serde_json::from_str(&out).unwrap()
}

// ------------------------------------------------------------------- tests

/// First push uploads everything; skopeo, podman and docker read it back
/// (docker runs it); the second push uploads nothing, by the registry's
/// own access log, and leaves the manifest alone.
#[test]
#[ignore = "needs docker-registry, skopeo, podman and docker: run scripts/test"]
fn push_then_read_back_then_repush_uploads_nothing() {
    let reg = Registry::start(false);
    let image = runnable_image("app", "hello from a pushed image\n", 3 << 20);
    let dest = format!("{}/nixstream-test/app:v1", reg.host());

    let first = push_to(&image, &dest, &opts()).unwrap();
    assert_eq!((first.layers, first.layers_uploaded, first.layers_present), (3, 3, 0), "{first}");
    assert!(first.config == Outcome::Uploaded && first.manifest_uploaded, "{first}");
    let blob_bytes: u64 = image.layers.iter().map(|l| l.blob.len() as u64).sum();
    assert_eq!(first.bytes_uploaded, blob_bytes + image.config.len() as u64);
    assert_eq!(reg.tag_digest("nixstream-test/app", "v1").as_deref(), Some(first.manifest_digest.as_str()));
    for i in 0..3 {
        assert!(reg.has_blob(&image.blob_digest(i)));
    }

    // skopeo: the manifest's layers are ours, annotated with their keys.
    let raw =
        run_ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{dest}")));
    assert_eq!(format!("sha256:{}", hex(&sha(raw.as_bytes()))), first.manifest_digest);
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(l["digest"], image.blob_digest(i));
        assert_eq!(l["annotations"]["io.nixstream.layer.key"], image.layers[i].key);
    }
    let info = skopeo_inspect(&dest, &["--tls-verify=false"]);
    assert_eq!(info["Architecture"], arch());

    // podman pulls it.
    let podman = podman_lock();
    run_ok(Command::new("podman").args(["pull", "-q", "--tls-verify=false", &dest]));
    let _ = Command::new("podman").args(["rmi", "-f", &dest]).output();
    drop(podman);

    // docker pulls and runs it (the daemon allows plain HTTP to 127.0.0.0/8).
    run_ok(Command::new("docker").args(["pull", "-q", &dest]));
    let out = run_ok(Command::new("docker").args(["run", "--rm", &dest]));
    let _ = Command::new("docker").args(["rmi", "-f", &dest]).output();
    assert_eq!(out, "hello from a pushed image\n");

    // Again: nothing uploaded, by our count and by the registry's log.
    let mark = reg.log().len();
    let renders_before = image.rendered().len();
    let again = push_to(&image, &dest, &opts()).unwrap();
    assert_eq!((again.layers_uploaded, again.layers_present, again.bytes_uploaded), (0, 3, 0), "{again}");
    assert!(!again.manifest_uploaded && again.config == Outcome::Present, "{again}");
    assert_eq!(image.rendered().len(), renders_before, "a re-push rendered layer bytes");
    let uploads = reg.uploads_since(mark);
    assert!(uploads.is_empty(), "the registry saw uploads on a re-push:\n{}", uploads.join("\n"));
    let manifest_puts: Vec<_> = reg.log()[mark..]
        .lines()
        .filter(|l| l.contains("\"PUT ") && l.contains("/manifests/"))
        .map(str::to_string)
        .collect();
    assert!(manifest_puts.is_empty(), "manifest PUT on a re-push: {manifest_puts:?}");
    // And the access log did record this run's requests (the check can fail).
    assert!(
        reg.log()[mark..].contains("\"HEAD /v2/nixstream-test/app/blobs/"),
        "no HEADs in the log:\n{}",
        &reg.log()[mark..]
    );
}

/// One layer changed: only it is uploaded; a push to another repository
/// with `--mount-from` mounts instead of uploading; a Docker schema 2
/// manifest is accepted for gzip layers; chunked uploads work.
#[test]
#[ignore = "needs docker-registry and skopeo: run scripts/test"]
fn one_changed_layer_mounts_chunks_and_docker_manifests() {
    let reg = Registry::start(false);
    let v1 = runnable_image("app", "one\n", 1 << 20);
    let v2 = runnable_image("app", "two\n", 1 << 20);
    let dest1 = format!("{}/team/app:v1", reg.host());
    push_to(&v1, &dest1, &opts()).unwrap();

    let mark = reg.log().len();
    let s = push_to(&v2, &format!("{}/team/app:v2", reg.host()), &opts()).unwrap();
    assert_eq!((s.layers_uploaded, s.layers_present), (1, 2), "{s}");
    assert_eq!(v2.rendered(), vec![1], "only the changed layer is rendered");
    assert_eq!(s.bytes_uploaded, v2.layers[1].blob.len() as u64 + v2.config.len() as u64);
    let patches = reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count();
    assert_eq!(patches, 2, "one PATCH for the layer, one for the config");

    // Another repository: mounted from team/app, nothing uploaded but the
    // config... which is mounted too, being there.
    let o = PushOptions { mount_from: vec!["team/app".into()], ..opts() };
    let mark = reg.log().len();
    let s = push_to(&v2, &format!("{}/other/app:v2", reg.host()), &o).unwrap();
    assert_eq!((s.layers_uploaded, s.layers_mounted, s.config), (0, 3, Outcome::Mounted), "{s}");
    assert!(s.to_string().contains("config mounted"), "{s}");
    assert_eq!(reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count(), 0);

    // Chunked, 256 KiB chunks, Docker schema 2, into a third repository.
    let o = PushOptions { chunk_size: Some(256 << 10), format: nixstream::dest::manifest::Format::Docker, ..opts() };
    let mark = reg.log().len();
    let dest3 = format!("{}/chunked/app:v2", reg.host());
    let s = push_to(&v2, &dest3, &o).unwrap();
    assert_eq!(s.layers_uploaded, 3, "{s}");
    let patches = reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count();
    let expected: usize = v2.layers.iter().map(|l| l.blob.len().div_ceil(256 << 10)).sum::<usize>() + 1;
    assert_eq!(patches, expected, "one PATCH per chunk");
    let raw = run_ok(
        Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{dest3}")),
    );
    assert!(raw.contains("application/vnd.docker.distribution.manifest.v2+json"), "{raw}");
    // skopeo copies it into a layout (reading every blob, checking digests).
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{dest3}"))
            .arg(format!("oci:{}:x", out.path().display())),
    );
}

/// `--cache-from`: an earlier push's annotations give key → digest for
/// every layer, checked against the config's diff_ids.
#[test]
#[ignore = "needs docker-registry: run scripts/test"]
fn cache_from_reads_keys_back() {
    let reg = Registry::start(false);
    let image = runnable_image("app", "cached\n", 1 << 20);
    let dest = format!("{}/ci/app:main", reg.host());
    push_to(&image, &dest, &opts()).unwrap();
    let hints = fetch_cache_hints(&Reference::parse(&dest).unwrap(), &ClientOptions::default()).unwrap();
    assert_eq!(hints.len(), 3);
    for (h, l) in hints.iter().zip(&image.layers) {
        assert_eq!(h.key, l.key);
        assert_eq!(h.blob.digest, sha(&l.blob));
        assert_eq!(h.blob.size, l.blob.len() as u64);
        assert_eq!(h.diff_id, l.tar.sha256);
        assert_eq!(h.tar_size, l.tar.size);
    }
    let missing = fetch_cache_hints(
        &Reference::parse(&format!("{}/ci/app:nope", reg.host())).unwrap(),
        &ClientOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("MANIFEST_UNKNOWN") && missing.contains(&reg.host()), "{missing}");
}

/// htpasswd auth over TLS with a CA made here: the right password pushes
/// (from --creds or from an auth file); a wrong one, no CA, an unknown
/// host each fail in one line without the password in it.
#[test]
#[ignore = "needs docker-registry, htpasswd, openssl and skopeo: run scripts/test"]
fn tls_and_basic_auth() {
    let reg = Registry::start(true);
    let tls = reg.tls.as_ref().unwrap();
    let image = runnable_image("app", "secure\n", 256 << 10);
    let dest = format!("docker://{}/sec/app:v1", reg.host());
    let creds = |p: &str| Some(Credentials::Password { username: USER.into(), password: auth::Secret::new(p.into()) });
    let with = |c, cert: Option<&Path>| PushOptions {
        client: ClientOptions { credentials: c, cert_dir: cert.map(Path::to_path_buf), ..Default::default() },
        tries: 2,
        ..opts()
    };

    let ok = push_to(&image, &dest, &with(creds(PASSWORD), Some(&tls.ca))).unwrap();
    assert_eq!(ok.layers_uploaded, 3);
    // skopeo reads it with the same CA and credentials.
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&tls.ca, certs.path().join("ca.crt")).unwrap();
    let info = skopeo_inspect(
        &dest["docker://".len()..],
        &["--cert-dir", certs.path().to_str().unwrap(), "--creds", &format!("{USER}:{PASSWORD}")],
    );
    assert_eq!(info["Layers"].as_array().unwrap().len(), 3);

    // Credentials from a podman auth file, and the directory form of --cert-dir.
    let auth_dir = tempfile::tempdir().unwrap();
    let auth_file = auth_dir.path().join("auth.json");
    let b64 = base64_encode(format!("{USER}:{PASSWORD}").as_bytes());
    std::fs::write(&auth_file, format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, reg.host())).unwrap();
    let found = auth::lookup(&reg.host(), "sec/app", &[auth_file]).unwrap().unwrap();
    let s = push_to(&image, &dest, &with(Some(found.credentials), Some(certs.path()))).unwrap();
    assert_eq!((s.layers_present, s.manifest_uploaded), (3, false), "{s}");

    let one_line = |e: RegistryError| {
        let t = e.to_string();
        assert!(!t.contains('\n') && !t.contains(PASSWORD) && !t.contains("wrong-password"), "{t}");
        eprintln!("error: {t}");
        t
    };
    let e = one_line(push_to(&image, &dest, &with(creds("wrong-password"), Some(&tls.ca))).unwrap_err());
    assert!(e.contains(&reg.host()) && e.contains("credentials refused as pusher"), "{e}");
    let e = one_line(push_to(&image, &dest, &with(None, Some(&tls.ca))).unwrap_err());
    assert!(e.contains("no credentials found"), "{e}");
    // No CA: the certificate is not trusted; HTTP is not tried instead of
    // reporting that, since the server speaks TLS.
    let e = one_line(push_to(&image, &dest, &with(creds(PASSWORD), None)).unwrap_err());
    assert!(e.contains(&reg.host()) && e.to_lowercase().contains("certificate"), "{e}");
    // Another CA: a mismatch.
    let other = make_tls(reg.dir.path(), "other");
    let e = one_line(push_to(&image, &dest, &with(creds(PASSWORD), Some(&other.ca))).unwrap_err());
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = one_line(push_to(&image, "docker://no-such-host.invalid/a/b:c", &with(creds(PASSWORD), None)).unwrap_err());
    assert!(e.contains("no-such-host.invalid") && e.contains("host not found"), "{e}");
    // --insecure turns the certificate check off.
    let insecure = PushOptions {
        client: ClientOptions { credentials: creds(PASSWORD), insecure: true, ..Default::default() },
        ..opts()
    };
    assert_eq!(push_to(&image, &dest, &insecure).unwrap().layers_present, 3);
    assert_no_manifest_with_missing_blobs(&reg);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A `HEAD` the registry never answers, mid-push: a passing stall, tried
/// again after the answer timeout, and the push completes.
#[test]
#[ignore = "needs docker-registry: run scripts/test"]
fn a_stalled_head_is_tried_again() {
    let reg = Registry::start(false);
    let proxy = Proxy::start(reg.port);
    let image = runnable_image("app", "stall\n", 1 << 20);
    let dest = format!("{}/stall/app:v1", proxy.host());
    proxy.state.hang_heads.store(1, Ordering::SeqCst);
    let client = ClientOptions { answer_timeout: Some(Duration::from_millis(500)), ..Default::default() };
    let s = push_to(&image, &dest, &PushOptions { jobs: 1, client, ..opts() }).unwrap();
    assert_eq!(proxy.state.hung.load(Ordering::SeqCst), 1);
    assert!(s.retries >= 1, "{s}");
    assert_eq!(s.layers_uploaded, 3, "{s}");
    assert_no_manifest_with_missing_blobs(&reg);
}

/// 503 bursts and dropped connections through the proxy are retried with
/// the blob rendered again; the push completes with the right digests.
#[test]
#[ignore = "needs docker-registry and skopeo: run scripts/test"]
fn retries_through_503_bursts_and_dropped_connections() {
    let reg = Registry::start(false);
    let proxy = Proxy::start(reg.port);
    let image = runnable_image("app", "flaky\n", 4 << 20);
    let dest = format!("{}/flaky/app:v1", proxy.host());
    proxy.state.burst_after_drop.store(3, Ordering::SeqCst);
    proxy.state.drops.store(1, Ordering::SeqCst);
    proxy.state.drop_after.store(1 << 20, Ordering::SeqCst);
    let o = PushOptions { jobs: 1, tries: 6, ..opts() };
    let s = push_to(&image, &dest, &o).unwrap();
    assert_eq!(proxy.state.served_503.load(Ordering::SeqCst), 3);
    assert_eq!(proxy.state.dropped.load(Ordering::SeqCst), 1, "no connection carried 1 MiB");
    // Each failed request was retried: the cut upload and three 503s.
    assert!(s.retries >= 4, "{s}");
    assert_eq!(s.layers_uploaded, 3, "{s}");
    // The dropped upload was rendered again.
    let renders = image.rendered();
    assert!(renders.len() > 3, "no layer was rendered twice: {renders:?}");
    let info = skopeo_inspect(&dest, &["--tls-verify=false"]);
    let layers: Vec<String> =
        info["Layers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(layers, (0..3).map(|i| image.blob_digest(i)).collect::<Vec<_>>());
    assert_no_manifest_with_missing_blobs(&reg);

    // A burst longer than the tries: a one-line error naming the layer and
    // the registry's code, and no manifest.
    let image2 = runnable_image("app", "flaky 2\n", 64 << 10);
    proxy.state.fail_503.store(1000, Ordering::SeqCst);
    let e = push_to(&image2, &format!("{}/flaky/app:v2", proxy.host()), &PushOptions { tries: 3, ..o.clone() })
        .unwrap_err()
        .to_string();
    proxy.state.fail_503.store(0, Ordering::SeqCst);
    eprintln!("error: {e}");
    assert!(e.contains("HTTP 503 UNAVAILABLE: injected by the test proxy"), "{e}");
    assert!(reg.tag_digest("flaky/app", "v2").is_none());
}

/// A layer whose bytes fail mid-way (a file changed since hashing) stops
/// that upload: no such blob, no manifest, the engine's error reported.
#[test]
#[ignore = "needs docker-registry: run scripts/test"]
fn an_engine_error_mid_blob_commits_nothing() {
    let reg = Registry::start(false);
    let mut image = runnable_image("app", "changing\n", 2 << 20);
    image.corrupt = Some(2);
    let dest = format!("{}/chg/app:v1", reg.host());
    let e = push_to(&image, &dest, &PushOptions { jobs: 1, ..opts() }).unwrap_err().to_string();
    eprintln!("error: {e}");
    assert!(e.contains("layer 3: a file changed since hashing"), "{e}");
    assert!(!reg.has_blob(&image.blob_digest(2)));
    assert!(reg.tag_digest("chg/app", "v1").is_none());
    // Not retried: rendering again would fail the same way.
    assert_eq!(image.rendered().iter().filter(|&&i| i == 2).count(), 1);
}

/// The registry killed mid-upload: the push fails in one line naming the
/// layer, no manifest is there; with the registry back, a rerun uploads
/// only what is missing.
#[test]
#[ignore = "needs docker-registry: run scripts/test"]
fn registry_killed_mid_push_then_rerun_finishes() {
    let mut reg = Registry::start(false);
    let proxy = Proxy::start(reg.port);
    // 16 MiB through a link of about 8 MiB/s: the last layer takes seconds.
    let image = runnable_image("app", "killed\n", 16 << 20);
    let dest = format!("{}/kill/app:v1", proxy.host());
    proxy.state.throttle_us.store(8_000, Ordering::SeqCst);
    let o = PushOptions { jobs: 1, tries: 3, ..opts() };
    let result = std::thread::scope(|s| {
        let pushing = s.spawn(|| push_to(&image, &dest, &o));
        let small = image.layers[0].blob.len() as u64 + image.layers[1].blob.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while proxy.state.upstream_bytes.load(Ordering::SeqCst) < small + (4 << 20) {
            assert!(Instant::now() < deadline, "the push did not get going");
            std::thread::sleep(Duration::from_millis(20));
        }
        reg.kill();
        pushing.join().unwrap()
    });
    let e = result.unwrap_err().to_string();
    eprintln!("error: {e}");
    assert!(
        e.starts_with(&format!("layer 3 ({}): registry {}", image.blob_digest(2), proxy.host())) && !e.contains('\n'),
        "{e}"
    );
    assert!(reg.tag_digest("kill/app", "v1").is_none(), "a manifest after a failed push");
    assert!(!reg.has_blob(&image.blob_digest(2)));
    assert_no_manifest_with_missing_blobs(&reg);

    reg.spawn();
    proxy.state.throttle_us.store(0, Ordering::SeqCst);
    let mark = reg.log().len();
    let s = push_to(&image, &dest, &o).unwrap();
    assert_eq!((s.layers_present, s.layers_uploaded), (2, 1), "{s}");
    assert_eq!(s.bytes_uploaded, image.layers[2].blob.len() as u64 + image.config.len() as u64);
    assert_eq!(reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count(), 2);
    assert_eq!(reg.tag_digest("kill/app", "v1").as_deref(), Some(s.manifest_digest.as_str()));
    assert_no_manifest_with_missing_blobs(&reg);
}

// ------------------------------------------------------- the command line

/// The binary, with no home and no XDG cache directory: a push then has no
/// default digest cache (as in a Nix build), so these tests never write into
/// the real `~/.cache`, and a push without `--cache` hashes every layer as a
/// fresh machine would.  Tests of the default cache set `XDG_CACHE_HOME`.
fn nixstream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nixstream"));
    c.env_remove("HOME").env_remove("XDG_CACHE_HOME");
    c
}

fn nix_build(args: &[&str]) -> PathBuf {
    let out = run_ok(
        Command::new("nix-build")
            .env("NIX_REMOTE", "local")
            .args(["--no-out-link", "--option", "sandbox", "false", "--option", "substituters", ""])
            .args(["--option", "build-users-group", ""])
            .args(args),
    );
    PathBuf::from(out.trim())
}

/// A conf of one layer per store path, running `cmd`.
fn nix_conf(dir: &Path, name: &str, paths: &[PathBuf], cmd: &Path) -> PathBuf {
    let cust = dir.join(format!("{name}-cust"));
    std::fs::create_dir_all(&cust).unwrap();
    let layer = tar_of(&vec![("etc/hostname", b"test\n".to_vec(), 0o444)]);
    std::fs::write(cust.join("layer.tar"), &layer).unwrap();
    std::fs::write(cust.join("checksum"), hex(&sha(&layer))).unwrap();
    let c = serde_json::json!({
        "architecture": arch(), "created": "1970-01-01T00:00:01Z", "mtime": "1970-01-01T00:00:01Z",
        "uid": 0, "gid": 0, "uname": "root", "gname": "root",
        "store_dir": "/nix/store", "from_image": null, "repo_tag": format!("nixstream-test/{name}:1"),
        "customisation_layer": cust, "config": {"Cmd": [cmd]},
        "store_layers": paths.iter().map(|p| vec![p]).collect::<Vec<_>>(),
    });
    let p = dir.join(format!("{name}.json"));
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    p
}

/// tests/fixtures/closure.nix built: busybox, data, the app on both, and a
/// conf (in `dir`) of one layer each that runs the app.
struct FixtureClosure {
    fixture: PathBuf,
    busybox: PathBuf,
    data: PathBuf,
    app: PathBuf,
    conf: PathBuf,
}

fn fixture_closure(dir: &Path) -> FixtureClosure {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let app = nix_build(&[fixture.to_str().unwrap()]);
    let busybox = nix_build(&[fixture.to_str().unwrap(), "-A", "busybox"]);
    let data = nix_build(&[fixture.to_str().unwrap(), "-A", "data"]);
    let conf = nix_conf(dir, "app", &[busybox.clone(), data.clone(), app.clone()], &app.join("bin/app"));
    FixtureClosure { fixture, busybox, data, app, conf }
}

/// Runs `nixstream push ... --stats`; returns the stats line's JSON.
fn cli_push(args: &[&str]) -> serde_json::Value {
    cli_push_in(&[], args).0
}

/// As [`cli_push`], with `env` set (a `None` value removes the variable);
/// returns the stats and the rest of stderr.
fn cli_push_in(env: &[(&str, Option<&Path>)], args: &[&str]) -> (serde_json::Value, String) {
    cli_run_in(env, &[&["push"], args].concat())
}

/// Runs `nixstream ARGS --stats` with `env`: the stats and the rest of stderr.
fn cli_run_in(env: &[(&str, Option<&Path>)], args: &[&str]) -> (serde_json::Value, String) {
    let mut c = nixstream();
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.env("NIX_REMOTE", "local").args(args).arg("--stats").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "nixstream {args:?} failed:\n{err}");
    eprintln!("{err}");
    let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("a stats line");
    let rest = err.lines().filter(|l| !l.starts_with("nixstream: stats ")).collect::<Vec<_>>().join("\n");
    (serde_json::from_str(line).unwrap(), rest)
}

/// Every file under `dir`, with its size and mtime: what a run changed there.
fn tree_state(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// `push` run by a real `nix-build` (no sandbox, so it reaches the loopback
/// registry; `$HOME` is Nix's `/homeless-shelter`, no XDG variable): the
/// push succeeds without a cache and says nothing about one, twice (the
/// second run hashes again: there was no cache to fill).
#[test]
#[ignore = "needs docker-registry and nix: run scripts/test"]
fn cli_push_inside_a_nix_build() {
    common::golden_tree();
    let reg = Registry::start(false);
    let conf = common::golden_dir().join("cases/grouped/conf.json");
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    for run in 0..2 {
        let expr = format!(
            r#"derivation {{ name = "nixstream-push-in-a-build"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{nonce}-{run}"; args = [ "-c" "echo HOME=$HOME XDG_CACHE_HOME=$XDG_CACHE_HOME >$out; {} push --stats {} docker://{}/nix-build/app:1 2>>$out" ]; }}"#,
            env!("CARGO_BIN_EXE_nixstream"),
            conf.display(),
            reg.host()
        );
        let out = nix_build(&["-E", &expr]);
        let err = std::fs::read_to_string(&out).unwrap();
        eprintln!("{err}");
        let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("a stats line");
        let s: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(s["layers_from_cache"].as_u64(), Some(0), "{s}");
        assert_eq!(s["layers_uploaded"].as_u64(), Some(if run == 0 { 3 } else { 0 }), "{s}");
        assert!(err.starts_with("HOME=/homeless-shelter XDG_CACHE_HOME=\n"), "{err}");
        assert!(!err.contains("note:") && !err.contains("warning:"), "{err}");
    }
    assert!(!Path::new("/homeless-shelter").exists());
}

/// Without `--cache`, `push` and `image --push` keep digests in
/// `$XDG_CACHE_HOME/nixstream`, else `$HOME/.cache/nixstream`: an unchanged
/// second push takes every store layer's digests from there (nothing hashed,
/// compressed or uploaded).  `--no-cache` leaves the directory alone.  With
/// no home (unset, or Nix's `/homeless-shelter`) the push goes on without a
/// cache and says nothing; a default directory that cannot be made costs
/// one note (none with `-q`), never the push; an explicit `--cache` that
/// cannot be used stays a warning.  Two pushes at once share it safely.
#[test]
#[ignore = "needs docker-registry: run scripts/test"]
fn cli_push_default_cache() {
    common::golden_tree();
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let conf = common::golden_dir().join("cases/grouped/conf.json");
    let conf = conf.to_str().unwrap();
    let dest = format!("docker://{}/golden/default-cache:1", reg.host());
    let xdg = tmp.path().join("xdg");
    let with_xdg: &[(&str, Option<&Path>)] = &[("XDG_CACHE_HOME", Some(&xdg))];
    let counts = |s: &serde_json::Value| {
        ["layers_from_cache", "layers_uploaded", "layers_present", "layers_written"].map(|k| s[k].as_u64().unwrap())
    };

    // First push: everything hashed and uploaded, the cache made (private).
    let (s, _) = cli_push_in(with_xdg, &["-q", conf, &dest]);
    assert_eq!(counts(&s), [0, 3, 0, 3], "{s}");
    let dir = xdg.join("nixstream");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions()) & 0o777, 0o700);
    let filled = tree_state(&dir);
    assert!(
        filled.iter().filter(|(_, len, _)| *len > 0).count() >= 4,
        "two store layers, two entries each: {filled:?}"
    );

    // Unchanged: both store layers' digests from the cache; nothing
    // uploaded, nothing rendered, by the registry's log too.
    let mark = reg.log().len();
    let (s, _) = cli_push_in(with_xdg, &["-q", conf, &dest]);
    assert_eq!(counts(&s), [2, 0, 3, 0], "{s}");
    assert_eq!(s["manifest_uploaded"], false, "{s}");
    assert!(reg.uploads_since(mark).is_empty(), "{:?}", reg.uploads_since(mark));
    assert_eq!(tree_state(&dir), filled, "an unchanged push rewrote entries");

    // --no-cache: the warm directory is neither read nor written, and a
    // missing one is not made.
    let (s, _) = cli_push_in(with_xdg, &["-q", "--no-cache", conf, &dest]);
    assert_eq!(counts(&s)[..2], [0, 0], "{s}");
    assert_eq!(tree_state(&dir), filled, "--no-cache touched the cache");
    let unused = tmp.path().join("unused");
    let (s, _) = cli_push_in(&[("XDG_CACHE_HOME", Some(&unused))], &["-q", "--no-cache", conf, &dest]);
    assert_eq!(counts(&s)[0], 0, "{s}");
    assert!(!unused.exists());
    // Both is a usage error.
    let out = nixstream().args(["push", "--no-cache", "--cache"]).arg(&dir).args([conf, &dest]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    // $HOME/.cache/nixstream when XDG_CACHE_HOME is unset.
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let with_home: &[(&str, Option<&Path>)] = &[("HOME", Some(&home))];
    assert_eq!(counts(&cli_push_in(with_home, &["-q", conf, &dest]).0)[0], 0);
    assert_eq!(counts(&cli_push_in(with_home, &["-q", conf, &dest]).0)[0], 2);
    assert!(home.join(".cache/nixstream").is_dir());

    // No home, no XDG_CACHE_HOME (the helper's default): no cache, no word
    // about it, twice.
    for _ in 0..2 {
        let (s, err) = cli_push_in(&[], &[conf, &dest]);
        assert_eq!(counts(&s)[..2], [0, 0], "{s}");
        assert!(!err.contains("note:") && !err.contains("warning:"), "{err}");
    }
    // A Nix build's home: not made, nothing said.
    let shelter = Path::new("/homeless-shelter");
    assert!(!shelter.exists(), "/homeless-shelter exists on this machine: Nix builds would fail here");
    let (s, err) = cli_push_in(&[("HOME", Some(shelter))], &[conf, &dest]);
    assert_eq!(counts(&s)[0], 0, "{s}");
    assert!(!err.contains("note:") && !err.contains("warning:") && !shelter.exists(), "{err}");

    // A default that cannot be made: one note, none with -q; the push done.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let (s, err) = cli_push_in(&[("XDG_CACHE_HOME", Some(&file))], &[conf, &dest]);
    assert_eq!(s["manifest_uploaded"], false, "{s}");
    let notes: Vec<&str> = err.lines().filter(|l| l.contains("note:") || l.contains("warning:")).collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(notes[0].starts_with("nixstream: note: no digest cache") && notes[0].contains("a-file"), "{err}");
    let (_, err) = cli_push_in(&[("XDG_CACHE_HOME", Some(&file))], &["-q", conf, &dest]);
    assert!(err.is_empty(), "{err}");
    // A default whose entries cannot be written (every entry directory's
    // name taken by a file): the same, at store time.
    let blocked = tmp.path().join("blocked");
    std::fs::create_dir_all(blocked.join("nixstream")).unwrap();
    for i in 0..256 {
        std::fs::write(blocked.join(format!("nixstream/{i:02x}")), b"").unwrap();
    }
    let (_, err) = cli_push_in(&[("XDG_CACHE_HOME", Some(&blocked))], &[conf, &dest]);
    let notes: Vec<&str> = err.lines().filter(|l| l.contains("note:") || l.contains("warning:")).collect();
    assert!(notes.len() == 1 && notes[0].starts_with("nixstream: note: digest cache"), "{err}");
    let (_, err) = cli_push_in(&[("XDG_CACHE_HOME", Some(&blocked))], &["-q", conf, &dest]);
    assert!(err.is_empty(), "{err}");
    // An explicit --cache that cannot be used: a warning, as for `stream`.
    let (_, err) = cli_push_in(&[], &["-q", "--cache", file.to_str().unwrap(), conf, &dest]);
    assert!(err.starts_with("nixstream: warning: digest cache") && err.lines().count() == 1, "{err}");

    // Two pushes at once into one fresh default cache: both complete, and
    // a third finds whole entries (no torn or temporary file left).
    let shared = tmp.path().join("shared");
    let with_shared: &[(&str, Option<&Path>)] = &[("XDG_CACHE_HOME", Some(&shared))];
    std::thread::scope(|s| {
        let a = s.spawn(|| cli_push_in(with_shared, &["-q", conf, &format!("{dest}-a")]));
        let b = s.spawn(|| cli_push_in(with_shared, &["-q", conf, &format!("{dest}-b")]));
        a.join().unwrap();
        b.join().unwrap();
    });
    let (s, _) = cli_push_in(with_shared, &["-q", conf, &dest]);
    assert_eq!(counts(&s)[0], 2, "{s}");
    for (p, _, _) in tree_state(&shared.join("nixstream")) {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "not an entry: {}", p.display());
    }

    // `image --push` uses it too: a closure of the golden tree's data-1.0.
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(conf).unwrap()).unwrap();
    let (store, data) = (c["store_dir"].as_str().unwrap(), &c["store_layers"][1][0]);
    let graph = tmp.path().join("graph.json");
    std::fs::write(&graph, serde_json::json!({"graph": [{"path": data, "references": [], "narSize": 1}]}).to_string())
        .unwrap();
    let image_xdg = tmp.path().join("image-xdg");
    let push = format!("docker://{}/golden/image-default-cache:1", reg.host());
    let image = || {
        let args = ["image", "-q", "--store-dir", store, graph.to_str().unwrap(), "--push", &push];
        cli_run_in(&[("XDG_CACHE_HOME", Some(&image_xdg))], &args).0
    };
    let s = image();
    assert_eq!(counts(&s)[..2], [0, 2], "{s}");
    // Both layers (the store path's, and the top one, made from an empty
    // --contents listing) from the cache.
    let s = image();
    assert_eq!(counts(&s), [2, 0, 2, 0], "{s}");
}

/// Whether repository `repo` of `reg` links blob `digest` (`sha256:...`):
/// what `HEAD` there answers from, whatever other repositories hold.
fn repo_has_blob(reg: &Registry, repo: &str, digest: &str) -> bool {
    let h = digest.strip_prefix("sha256:").unwrap();
    reg.storage().join(format!("repositories/{repo}/_layers/sha256/{h}/link")).is_file()
}

/// `nixstream push` that fails: its one-line error.
fn cli_push_fails(args: &[&str]) -> String {
    let out = nixstream().env("NIX_REMOTE", "local").arg("push").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "nixstream push {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("nixstream: --cache-from ")).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

/// `--cache-from` naming an image whose annotations lie (each of this
/// closure's layer keys on a layer of other bytes, as a push of another
/// image that claims them would leave): the push stops naming
/// `--cache-from` and the layer with both digests, not the store; the
/// destination gets no manifest and none of the promised blobs; without
/// `--cache-from` the same push is right.
#[test]
#[ignore = "needs docker-registry, nix and skopeo: run scripts/test"]
fn cli_push_with_a_lying_cache_from_commits_nothing() {
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let FixtureClosure { conf, .. } = fixture_closure(tmp.path());
    let honest = format!("{}/honest/app:1", reg.host());
    cli_push(&["-q", conf.to_str().unwrap(), &format!("docker://{honest}")]);
    let hints = fetch_cache_hints(&Reference::parse(&honest).unwrap(), &ClientOptions::default()).unwrap();
    assert_eq!(hints.len(), 3, "the store layers are keyed");

    let mut liar = runnable_image("liar", "lies\n", 1 << 16);
    for (l, h) in liar.layers.iter_mut().zip(&hints) {
        l.key = h.key.clone();
    }
    let liar_ref = format!("{}/liar/app:1", reg.host());
    push_to(&liar, &liar_ref, &opts()).unwrap();

    let err = cli_push_fails(&[
        "-q",
        conf.to_str().unwrap(),
        &format!("docker://{}/fresh/app:1", reg.host()),
        "--cache-from",
        &format!("docker://{liar_ref}"),
    ]);
    eprintln!("error: {err}");
    for needle in [
        "nixstream: layer ",
        &format!("the digest from --cache-from docker://{liar_ref} (its layer annotation) is wrong for this layer"),
        "it promises sha256:",
        &format!("push without --cache-from docker://{liar_ref}"),
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    assert!(!err.contains("changed while") && !err.contains("changed between"), "{err}");
    assert!(reg.tag_digest("fresh/app", "1").is_none(), "a manifest after a failed push");
    for i in 0..liar.layers.len() {
        assert!(!repo_has_blob(&reg, "fresh/app", &liar.blob_digest(i)), "the lying blob {i} was linked");
    }
    assert_no_manifest_with_missing_blobs(&reg);

    let fresh = format!("{}/fresh/app:1", reg.host());
    cli_push(&["-q", conf.to_str().unwrap(), &format!("docker://{fresh}")]);
    assert_pushed_as_streamed(&fresh, &conf, "gzip");
}

/// A conf of two store layers (30 files, 3 files), and the digest cache a
/// first run (`first`, given the conf and the cache) filled for it, each
/// store layer's entry then forged: its first file hash
/// flipped (after magic, key, size, sha256, settled time and count), its
/// checksum made good.  Returns the conf, the cache and the forged entries.
fn forged_cache_entries(tmp: &Path, first: impl FnOnce(&Path, &Path)) -> (PathBuf, PathBuf, Vec<(PathBuf, Vec<u8>)>) {
    let store = tmp.join("nix/store");
    let mut layers = Vec::new();
    for (name, n) in [("aaaa-lib", 30), ("bbbb-app", 3)] {
        let p = store.join(name);
        std::fs::create_dir_all(p.join("share")).unwrap();
        for i in 0..n {
            std::fs::write(p.join("share").join(format!("f{i}")), noise(i as u64, 1000 + 997 * i)).unwrap();
        }
        layers.push(vec![p]);
    }
    let cust = common::make_customisation(tmp);
    let conf = tmp.join("conf.json");
    std::fs::write(&conf, common::conf_json(&store, &layers, &cust).to_string()).unwrap();
    let cache = tmp.join("cache");
    first(&conf, &cache);

    // The layer entries hold files (blob entries none).
    let mut forged = Vec::new();
    for d in std::fs::read_dir(&cache).unwrap() {
        for e in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = e.unwrap().path();
            let mut d = std::fs::read(&p).unwrap();
            if u64::from_le_bytes(d[96..104].try_into().unwrap()) == 0 {
                continue;
            }
            d[104] ^= 1;
            let body = d.len() - 32;
            let sum = Sha256::digest(&d[..body]);
            d[body..].copy_from_slice(&sum);
            std::fs::write(&p, &d).unwrap();
            forged.push((p, d));
        }
    }
    assert_eq!(forged.len(), 2, "an entry per store layer");
    (conf, cache, forged)
}

/// The run's stderr holds one warning per forged entry, layer by layer,
/// blaming the cache and ending in `then`; the cache holds a right entry
/// again where a forged one was.
fn assert_made_again(err: &str, cache: &Path, forged: &[(PathBuf, Vec<u8>)], then: &str) {
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("nixstream: warning: ")).collect();
    assert_eq!(warnings.len(), 2, "a fallback per forged entry: {err}");
    for (w, layer) in warnings.iter().zip(["layer 1 (", "layer 2 ("]) {
        assert!(
            w.contains(layer)
                && w.contains(&format!("the digest from the digest cache {} is wrong for this layer", cache.display()))
                && w.contains("the entry was removed from the cache")
                && w.ends_with(then),
            "{w}"
        );
    }
    // What the cache holds for the forged layers now is right again.
    let rewritten = forged.iter().filter(|(p, d)| std::fs::read(p).is_ok_and(|now| now != *d)).count();
    assert!(rewritten >= 1, "the layer made again was stored afresh");
}

/// A digest-cache entry found wrong while its layer is uploaded (forged
/// here: one file's hash, its checksum made good) is removed, nothing of
/// that blob is committed, and the push goes again without it, once: the
/// image in the registry is the right one.
#[test]
#[ignore = "needs docker-registry and skopeo: run scripts/test"]
fn cli_push_with_a_wrong_cache_entry_falls_back_to_hashing() {
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let first = format!("docker://{}/first/app:1", reg.host());
    let (conf, cache, forged) = forged_cache_entries(tmp.path(), |conf, cache| {
        cli_push(&["-q", "--cache", cache.to_str().unwrap(), conf.to_str().unwrap(), &first]);
    });

    let second = format!("{}/second/app:1", reg.host());
    // One layer at a time: each forged entry is found in turn.
    let out = nixstream()
        .args(["push", "-q", "-j1", "--stats", "--cache", cache.to_str().unwrap(), conf.to_str().unwrap()])
        .arg(format!("docker://{second}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "{err}");
    assert_made_again(&err, &cache, &forged, "pushing again without that entry");
    assert_pushed_as_streamed(&second, &conf, "gzip");
    assert_no_manifest_with_missing_blobs(&reg);
}

/// The same for an OCI layout (no registry needed): the layout's
/// `index.json` is written last, so a wrong digest-cache entry found while
/// its blob is written is removed and the layout written again, once per
/// such entry; the layout then holds the image `stream --format
/// oci-archive` makes, and every blob in it checks.
#[test]
fn cli_oci_layout_with_a_wrong_cache_entry_falls_back_to_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let (conf, cache, forged) = forged_cache_entries(tmp.path(), |conf, cache| {
        common::run(nixstream().args(["stream", "-q", "--cache"]).arg(cache).arg("--oci-layout").arg(&first).arg(conf));
    });

    let layout = tmp.path().join("layout");
    let out = nixstream()
        .args(["stream", "-q", "-j1", "--stats", "--cache", cache.to_str().unwrap(), "--oci-layout"])
        .arg(&layout)
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "{err}");
    assert_made_again(&err, &cache, &forged, "writing the layout again without that entry");
    let stats: serde_json::Value =
        serde_json::from_str(err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("stats")).unwrap();
    assert_eq!(stats["layers_from_cache"], 0, "the last try hashed both layers: {stats}");

    let archive = nixstream().args(["stream", "-q", "--format", "oci-archive"]).arg(&conf).output().unwrap();
    assert!(archive.status.success());
    let index_of = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap()["manifests"][0].clone();
    let mut archive_index = None;
    for e in tar::Archive::new(&archive.stdout[..]).entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("index.json") {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            archive_index = Some(index_of(&b));
        }
    }
    assert_eq!(Some(index_of(&std::fs::read(layout.join("index.json")).unwrap())), archive_index);
    common::run(nixstream().args(["verify", "-q"]).arg(&layout));
}

/// The layer digests of an oci-archive (its one manifest's).
/// The layers the registry holds at `dest` are those of `nixstream stream
/// --format oci-archive` of `conf` with the same compression.
fn assert_pushed_as_streamed(dest: &str, conf: &Path, compression: &str) {
    let archive = nixstream()
        .args(["stream", "-q", "--format", "oci-archive", "--layer-compression", compression])
        .arg(conf)
        .output()
        .unwrap();
    assert!(archive.status.success());
    let info = skopeo_inspect(dest, &["--tls-verify=false"]);
    let pushed: Vec<String> =
        info["Layers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(pushed, oci_archive_layers(&archive.stdout), "{dest} {compression}");
}

fn oci_archive_layers(archive: &[u8]) -> Vec<String> {
    let mut blobs = std::collections::HashMap::new();
    let mut index = Vec::new();
    for e in tar::Archive::new(archive).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if name == "index.json" {
            index = data;
        } else if let Some(h) = name.strip_prefix("blobs/sha256/") {
            blobs.insert(format!("sha256:{h}"), data);
        }
    }
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&blobs[index["manifests"][0]["digest"].as_str().unwrap()]).unwrap();
    m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

/// `nixstream push` of a Nix-built closure: docker pulls and runs it, podman
/// and skopeo read it, its layers are the oci-archive's; a re-push uploads
/// nothing (the registry's log says so); and after a change of the top
/// store path, a push with `--cache-from` and no local cache uploads only
/// that layer and opens none of the unchanged layers' files (strace says so).
#[test]
#[ignore = "needs docker-registry, nix, docker, podman, skopeo and strace: run scripts/test"]
fn cli_push_of_a_nix_closure() {
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let FixtureClosure { fixture, busybox, data, app, conf } = fixture_closure(tmp.path());
    let dest = format!("{}/e2e/app:1", reg.host());

    let s = cli_push(&[conf.to_str().unwrap(), &format!("docker://{dest}")]);
    assert_eq!((s["layers"].as_u64(), s["layers_uploaded"].as_u64()), (Some(4), Some(4)), "{s}");

    // The layers are those of the oci-archive with the same compression.
    assert_pushed_as_streamed(&dest, &conf, "gzip");
    // The three store layers carry keys (the local Nix gave narHashes).
    let raw =
        run_ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{dest}")));
    assert_eq!(raw.matches("io.nixstream.layer.key").count(), 3, "{raw}");

    run_ok(Command::new("docker").args(["pull", "-q", &dest]));
    let out = run_ok(Command::new("docker").args(["run", "--rm", "--network=none", &dest]));
    let _ = Command::new("docker").args(["rmi", "-f", &dest]).output();
    assert_eq!(out, "hello from a nixstream image\ndata from another store path\n");
    let podman = podman_lock();
    run_ok(Command::new("podman").args(["pull", "-q", "--tls-verify=false", &dest]));
    let _ = Command::new("podman").args(["rmi", "-f", &dest]).output();
    drop(podman);

    // `image APP --push`: planned from the closure, pushed the same way.
    let image_dest = format!("{}/e2e/image:1", reg.host());
    let out = nixstream()
        .env("NIX_REMOTE", "local")
        .args(["image", "-q", "--stats", "--push", &format!("docker://{image_dest}")])
        .arg(&app)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && out.stdout.is_empty(), "{err}");
    let s: serde_json::Value =
        serde_json::from_str(err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).unwrap()).unwrap();
    let info = skopeo_inspect(&image_dest, &["--tls-verify=false"]);
    assert_eq!(info["Layers"].as_array().unwrap().len() as u64, s["layers"].as_u64().unwrap(), "{s}");
    let raw = run_ok(
        Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{image_dest}")),
    );
    // Every layer is keyed: store layers, and the top layer made from
    // --contents (none here), whose listing decides it as well.
    assert_eq!(raw.matches("io.nixstream.layer.key").count() as u64, s["layers"].as_u64().unwrap(), "{raw}");

    // Unchanged: nothing uploaded, by the registry's log too.
    let mark = reg.log().len();
    let s = cli_push(&["-q", conf.to_str().unwrap(), &format!("docker://{dest}")]);
    assert_eq!((s["layers_uploaded"].as_u64(), s["layers_written"].as_u64()), (Some(0), Some(0)), "{s}");
    assert_eq!(s["manifest_uploaded"], false);
    assert!(reg.uploads_since(mark).is_empty(), "{:?}", reg.uploads_since(mark));

    // A new top store path; a fresh machine (--no-cache), --cache-from the
    // first push.
    let expr = format!(
        r#"let c = import {}; in derivation {{ name = "nixstream-app-2"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/mkdir -p $out/bin; printf '#!${{c.busybox}}/bin/sh\necho v2\n' > $out/bin/app; /bin/chmod 555 $out/bin/app" ]; }}"#,
        fixture.display()
    );
    let app2 = nix_build(&["-E", &expr]);
    let conf2 = nix_conf(tmp.path(), "app2", &[busybox.clone(), data.clone(), app2.clone()], &app2.join("bin/app"));
    let trace = tmp.path().join("trace");
    let mark = reg.log().len();
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_nixstream"))
        .env("NIX_REMOTE", "local")
        .env_remove("HOME")
        .env_remove("XDG_CACHE_HOME")
        .args(["push", "--stats", "--no-cache"])
        .arg(&conf2)
        .arg(format!("docker://{}/e2e/app:2", reg.host()))
        .args(["--cache-from", &format!("docker://{dest}")])
        .output()
        .expect("strace (run scripts/setup-deps)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    eprintln!("{err}");
    let s: serde_json::Value =
        serde_json::from_str(err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).unwrap()).unwrap();
    assert_eq!(s["layers_from_cache"].as_u64(), Some(2), "{s}");
    assert_eq!((s["layers_uploaded"].as_u64(), s["layers_present"].as_u64()), (Some(1), Some(3)), "{s}");
    let patches = reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count();
    assert_eq!(patches, 2, "the app layer and the config");
    // Files opened for reading (not directories, listed by the walk):
    // the unchanged layers' (busybox, greeting...) never; the new app's, yes.
    let opened: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("O_DIRECTORY") && !l.contains("ENOENT"))
        .map(str::to_string)
        .collect();
    let opens = |name: &str| {
        opened.iter().filter(|l| l.contains(&format!("\"{name}\"")) || l.contains(&format!("/{name}\""))).count()
    };
    assert!(opens("app") > 0, "the changed layer's file was not opened: strace saw nothing?");
    for unchanged in ["busybox", "greeting", "uses-busybox", "héllo-wörld.txt"] {
        assert_eq!(
            opens(unchanged),
            0,
            "{unchanged} was opened:\n{}",
            opened.iter().filter(|l| l.contains(unchanged)).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// The golden `grouped` case, pushed with each compression and both
/// manifest formats: its layers are the oci-archive's, and skopeo copies it
/// back out (reading every blob against its digest).  (The case is an
/// arm64 image: docker and podman would pull it only for that platform.)
#[test]
#[ignore = "needs docker-registry and skopeo: run scripts/test"]
fn cli_push_of_the_golden_grouped_case() {
    common::golden_tree();
    let reg = Registry::start(false);
    let conf = common::golden_dir().join("cases/grouped/conf.json");
    for (compression, format) in [("gzip", "oci"), ("zstd", "oci"), ("none", "oci"), ("gzip", "docker")] {
        let dest = format!("{}/golden/grouped-{compression}-{format}:2024", reg.host());
        let s = cli_push(&[
            "-q",
            conf.to_str().unwrap(),
            &format!("docker://{dest}"),
            "--layer-compression",
            compression,
            "--manifest-format",
            format,
        ]);
        assert_eq!(s["layers_uploaded"].as_u64(), Some(3), "{s}");
        assert_pushed_as_streamed(&dest, &conf, compression);
        let out = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("skopeo")
                .args(["copy", "-q", "--src-tls-verify=false"])
                .arg(format!("docker://{dest}"))
                .arg(format!("oci:{}:x", out.path().display())),
        );
    }
    // With a digest cache, a push that uploads nothing still fills it: the
    // next one hashes nothing.
    let cache = tempfile::tempdir().unwrap();
    let dest = format!("docker://{}/golden/grouped-gzip-oci:2024", reg.host());
    let args = ["-q", conf.to_str().unwrap(), &dest, "--cache", cache.path().to_str().unwrap()];
    let s = cli_push(&args);
    assert_eq!((s["layers_present"].as_u64(), s["layers_from_cache"].as_u64()), (Some(3), Some(0)), "{s}");
    let s = cli_push(&args);
    assert_eq!((s["layers_present"].as_u64(), s["layers_from_cache"].as_u64()), (Some(3), Some(2)), "{s}");

    // zstd has no Docker schema 2 media type: refused before any upload.
    let out = nixstream()
        .args(["push", "-q", "--layer-compression", "zstd", "--manifest-format", "docker"])
        .arg(&conf)
        .arg(format!("docker://{}/golden/nope:1", reg.host()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("Docker schema 2") && err.contains("zstd"), "{err}");
}

// ----------------------------------------------------------- token service

/// A token service for the registry's `auth: token` mode: checks Basic
/// credentials, and signs JWTs (RS256, with `openssl`) whose `x5c` is a
/// certificate the registry trusts.  The first token it gives a client
/// grants pull only, the next ones pull and push: a push must then renew
/// its token on the 401 that its first upload gets.
struct TokenService {
    port: u16,
    issued: Arc<AtomicUsize>,
}

impl TokenService {
    fn start(dir: &Path, service: &str) -> (TokenService, PathBuf) {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=nixstream test token signer",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let der = run_ok_bytes(Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = Arc::new(AtomicUsize::new(0));
        let (count, service) = (issued.clone(), service.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let expected = format!("Basic {}", base64_encode(format!("{USER}:{PASSWORD}").as_bytes()));
                let authorised = head
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("authorization:") && l[14..].trim() == expected);
                if !authorised {
                    let _ =
                        conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                let scopes: Vec<String> = query
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .map(|v| {
                        v.replace("%3A", ":")
                            .replace("%2F", "/")
                            .replace("%2C", ",")
                            .replace("%3a", ":")
                            .replace("%2f", "/")
                            .replace("%2c", ",")
                    })
                    .collect();
                let n = count.fetch_add(1, Ordering::SeqCst);
                let access: Vec<serde_json::Value> = scopes
                    .iter()
                    .filter_map(|sc| {
                        let mut parts = sc.splitn(3, ':');
                        let (kind, name) = (parts.next()?, parts.next()?);
                        let actions: Vec<&str> = parts.next()?.split(',').filter(|a| n > 0 || *a == "pull").collect();
                        Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
                    })
                    .collect();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [base64_encode(&der)]});
                let claims = serde_json::json!({
                    "iss": "nixstream-test-issuer", "sub": USER, "aud": service,
                    "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("t{n}"), "access": access,
                });
                let b64 = |v: &serde_json::Value| base64_url(&serde_json::to_vec(v).unwrap());
                let signing_input = format!("{}.{}", b64(&header), b64(&claims));
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                sign.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
                let sig = sign.wait_with_output().unwrap().stdout;
                let body =
                    serde_json::json!({"token": format!("{signing_input}.{}", base64_url(&sig)), "expires_in": 600})
                        .to_string();
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        (TokenService { port, issued }, cert)
    }
}

fn run_ok_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The Bearer flow against the registry in token mode: a token asked for
/// with the push scope and Basic credentials, renewed when a request comes
/// back 401 mid-push; a wrong password fails in one line.
#[test]
#[ignore = "needs docker-registry and openssl: run scripts/test"]
fn bearer_tokens_renewed_mid_push() {
    let dir = tempfile::tempdir().unwrap();
    let service = "nixstream-test-registry";
    let (tokens, cert) = TokenService::start(dir.path(), service);
    let extra = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {service}\n    issuer: nixstream-test-issuer\n    rootcertbundle: {}\n",
        tokens.port,
        cert.display()
    );
    let reg = Registry::start_with(false, &extra);
    let image = runnable_image("app", "bearer\n", 256 << 10);
    let dest = format!("{}/tok/app:v1", reg.host());
    let with = |password: &str| PushOptions {
        client: ClientOptions {
            credentials: Some(Credentials::Password {
                username: USER.into(),
                password: auth::Secret::new(password.into()),
            }),
            ..Default::default()
        },
        jobs: 1,
        ..opts()
    };
    let s = push_to(&image, &dest, &with(PASSWORD)).unwrap();
    assert_eq!(s.layers_uploaded, 3, "{s}");
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2, "one pull-only token, then one renewed on the 401");
    assert_eq!(s.retries, 0, "the renewal is not a retry: {s}");
    assert_eq!(reg.tag_digest("tok/app", "v1").as_deref(), Some(s.manifest_digest.as_str()));
    let e = push_to(&image, &dest, &with("wrong-password")).unwrap_err().to_string();
    eprintln!("error: {e}");
    assert!(e.contains("token service refused the credentials") && !e.contains("wrong-password"), "{e}");
}

/// `--compress-once`: each layer uploaded by the hashing pass as it is
/// compressed (one PATCH each, no streaming pass); an upload cut through
/// the proxy falls back to the usual upload, and the image is whole.
#[test]
#[ignore = "needs docker-registry and skopeo: run scripts/test"]
fn cli_push_compress_once() {
    common::golden_tree();
    let reg = Registry::start(false);
    let conf = common::golden_dir().join("cases/grouped/conf.json");
    let mark = reg.log().len();
    let dest = format!("{}/golden/once:1", reg.host());
    let s = cli_push(&["-q", "--compress-once", conf.to_str().unwrap(), &format!("docker://{dest}")]);
    assert_eq!((s["layers_uploaded"].as_u64(), s["layers_written"].as_u64()), (Some(3), Some(0)), "{s}");
    assert_eq!(reg.uploads_since(mark).iter().filter(|l| l.contains("\"PATCH ")).count(), 4, "3 layers, 1 config");
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{dest}"))
            .arg(format!("oci:{}:x", out.path().display())),
    );

    // Through the proxy, the connection carrying the 1 MiB layer cut.
    let proxy = Proxy::start(reg.port);
    proxy.state.drops.store(1, Ordering::SeqCst);
    proxy.state.drop_after.store(300 << 10, Ordering::SeqCst);
    let dest = format!("{}/golden/once-cut:1", proxy.host());
    let s = cli_push(&["-q", "--compress-once", conf.to_str().unwrap(), &format!("docker://{dest}")]);
    assert_eq!(proxy.state.dropped.load(Ordering::SeqCst), 1);
    assert_eq!((s["layers_uploaded"].as_u64(), s["layers_written"].as_u64()), (Some(3), Some(1)), "{s}");
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{dest}"))
            .arg(format!("oci:{}:x", out.path().display())),
    );
    assert_no_manifest_with_missing_blobs(&reg);
}

/// Credentials as users keep them, through the command line, against the
/// htpasswd + TLS registry: a docker credential helper (a script here, run
/// by the real protocol), `$REGISTRY_AUTH_FILE` winning over
/// `$DOCKER_CONFIG`, and `--password-stdin`.  The password is never printed.
#[test]
#[ignore = "needs docker-registry, htpasswd and openssl: run scripts/test"]
fn cli_credentials_from_helpers_files_and_stdin() {
    common::golden_tree();
    let reg = Registry::start(true);
    let ca = reg.tls.as_ref().unwrap().ca.clone();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-nstest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n"
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&helper));
    let docker = tmp.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(docker.join("config.json"), format!(r#"{{"credHelpers":{{"{}":"nstest"}}}}"#, reg.host())).unwrap();
    let conf = common::golden_dir().join("cases/grouped/conf.json");
    let dest = format!("docker://{}/creds/app:1", reg.host());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let cmd = || {
        let mut c = nixstream();
        c.env("PATH", &path)
            .env("HOME", tmp.path())
            .env("DOCKER_CONFIG", &docker)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .args(["push", "--cert-dir"])
            .arg(&ca)
            .arg(&conf)
            .arg(&dest);
        c
    };
    let out = cmd().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("credentials for {} from docker-credential-nstest", reg.host())), "{err}");
    assert!(!err.contains(PASSWORD));

    // $REGISTRY_AUTH_FILE comes first: its wrong password is refused.
    let auth_file = tmp.path().join("auth.json");
    let b64 = base64_encode(format!("{USER}:not-{PASSWORD}").as_bytes());
    std::fs::write(&auth_file, format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, reg.host())).unwrap();
    let out = cmd().env("REGISTRY_AUTH_FILE", &auth_file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&format!("credentials from {}", auth_file.display())), "the error names the file: {err}");
    assert!(last.contains("refused as pusher"), "{err}");
    assert!(
        !err.contains(PASSWORD) && err.lines().last().is_some_and(|l| l.starts_with("nixstream: registry")),
        "{err}"
    );

    // --creds USER --password-stdin wins over both.
    let mut child = cmd()
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .args(["--creds", USER, "--password-stdin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains(PASSWORD));
}

/// A closure of 300 MB (three files of random bytes: nothing to gain from
/// compression), pushed, pulled by docker and run; its layers are those of
/// the oci-archive; a second push sends nothing.
#[test]
#[ignore = "needs docker-registry, nix, docker and skopeo: run scripts/test"]
fn cli_push_of_a_300_mb_closure() {
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let busybox = nix_build(&[fixture.to_str().unwrap(), "-A", "busybox"]);
    let big_expr = r#"derivation { name = "nixstream-big"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/mkdir -p $out; for i in 1 2 3; do /bin/busybox dd if=/dev/urandom of=$out/blob$i bs=1048576 count=100 2>/dev/null; done" ]; }"#;
    let big = nix_build(&["-E", big_expr]);
    let app_expr = format!(
        r#"let c = import {}; big = {big_expr}; in derivation {{ name = "nixstream-big-app"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/mkdir -p $out/bin; printf '#!${{c.busybox}}/bin/sh\n${{c.busybox}}/bin/busybox wc -c ${{big}}/blob3\n' > $out/bin/app; /bin/chmod 555 $out/bin/app" ]; }}"#,
        fixture.display()
    );
    let app = nix_build(&["-E", &app_expr]);
    let conf = nix_conf(tmp.path(), "big", &[busybox, big.clone(), app.clone()], &app.join("bin/app"));
    let dest = format!("{}/e2e/big:1", reg.host());
    let t = Instant::now();
    let s = cli_push(&["-q", conf.to_str().unwrap(), &format!("docker://{dest}")]);
    eprintln!("first push: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(s["layers_uploaded"].as_u64(), Some(4), "{s}");
    assert!(s["bytes_uploaded"].as_u64().unwrap() > 300 << 20, "{s}");

    // The oci-archive's layer digests, read from the stream as it comes.
    let mut child = nixstream()
        .args(["stream", "-q", "--format", "oci-archive", "--layer-compression", "gzip"])
        .arg(&conf)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut small = std::collections::HashMap::new();
    let mut index = Vec::new();
    for e in tar::Archive::new(child.stdout.take().unwrap()).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if e.size() < 1 << 20 {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if name == "index.json" {
                index = data;
            } else if let Some(h) = name.strip_prefix("blobs/sha256/") {
                small.insert(format!("sha256:{h}"), data);
            }
        }
    }
    assert!(child.wait().unwrap().success());
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&small[index["manifests"][0]["digest"].as_str().unwrap()]).unwrap();
    let archive_layers: Vec<String> =
        m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();
    let info = skopeo_inspect(&dest, &["--tls-verify=false"]);
    let pushed: Vec<String> =
        info["Layers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(pushed, archive_layers);

    run_ok(Command::new("docker").args(["pull", "-q", &dest]));
    let out = run_ok(Command::new("docker").args(["run", "--rm", "--network=none", &dest]));
    let _ = Command::new("docker").args(["rmi", "-f", &dest]).output();
    assert_eq!(out, format!("104857600 {}/blob3\n", big.display()));

    let mark = reg.log().len();
    let s = cli_push(&["-q", conf.to_str().unwrap(), &format!("docker://{dest}")]);
    assert_eq!((s["layers_uploaded"].as_u64(), s["bytes_uploaded"].as_u64()), (Some(0), Some(0)), "{s}");
    assert!(reg.uploads_since(mark).is_empty());
}

/// `--previous docker://...`: release 1 of tests/fixtures/releases.nix is
/// pushed by `image --stable --push`; release 2 (the application changed)
/// planned on it straight from the registry keeps every layer but the top,
/// as it does from a local archive of release 1; pushing release 2 uploads
/// only the changed layers.  A tag that is not there yet plans afresh and
/// says so.
#[test]
#[ignore = "needs docker-registry and nix: run scripts/test"]
fn previous_read_from_the_registry() {
    let reg = Registry::start(false);
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/releases.nix");
    let fixture = fixture.to_str().unwrap();
    let r1 = nix_build(&[fixture, "-A", "app"]);
    let r2 = nix_build(&[fixture, "-A", "app", "--arg", "app", "2"]);
    let v1 = format!("docker://{}/rel/app:1", reg.host());
    let v2 = format!("docker://{}/rel/app:2", reg.host());
    let run = |args: &[&str]| -> (String, String) {
        let out = nixstream().env("NIX_REMOTE", "local").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "nixstream {args:?} failed:\n{err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    };
    let r1s = r1.to_str().unwrap();
    let r2s = r2.to_str().unwrap();

    // The first release: no image at the tag yet.
    let (_, err) = run(&["image", "-q", "--max-layers", "16", r1s, "--previous", &v1, "--push", &v1]);
    assert!(err.contains("does not exist (yet): planning afresh"), "{err}");
    let archive = tmp.path().join("r1.tar");
    run(&["image", "-q", "--max-layers", "16", "--stable", r1s, "-o", archive.to_str().unwrap()]);

    let layers = |out: &str| -> Vec<Vec<String>> { serde_json::from_str(out).unwrap() };
    let (from_registry, _) = run(&["layers", "--max-layers", "16", r2s, "--previous", &v1]);
    let (from_archive, _) = run(&["layers", "--max-layers", "16", r2s, "--previous", archive.to_str().unwrap()]);
    let (first, _) = run(&["layers", "--max-layers", "16", "--stable", r1s]);
    let (new, old) = (layers(&from_registry), layers(&first));
    assert_eq!(new, layers(&from_archive), "the registry's history is the archive's");
    assert_eq!(new.len(), old.len());
    let same = new.iter().zip(&old).take_while(|(a, b)| a == b).count();
    assert_eq!(same, old.len() - 1, "all but the top layer kept: {new:?}");
    assert!(new.last().unwrap().iter().any(|p| p.ends_with("-app")));

    let log = reg.log().len();
    let (_, err) = run(&["image", "-q", "--stats", "--max-layers", "16", r2s, "--previous", &v1, "--push", &v2]);
    let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("a stats line");
    let s: serde_json::Value = serde_json::from_str(line).unwrap();
    // Only the top store layer: the registry has every other one, the
    // customisation layer included (its bytes did not change).
    assert_eq!(s["layers_uploaded"].as_u64(), Some(1), "{s}");
    assert_eq!(s["layers"].as_u64(), Some(old.len() as u64 + 1), "{s}");
    // Two blobs went up (POST, PATCH, PUT each): that layer and the config.
    let puts = reg.uploads_since(log).iter().filter(|l| l.contains("\"PUT ")).count();
    assert_eq!(puts, 2, "{:?}", reg.uploads_since(log));

    // Into another repository of the same registry: the blobs of the
    // previous image's repository (this release's too, pushed there just
    // now) are mounted from it, not uploaded again.
    let other = format!("docker://{}/other/app:2", reg.host());
    let (_, err) = run(&["image", "-q", "--stats", "--max-layers", "16", r2s, "--previous", &v1, "--push", &other]);
    let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("a stats line");
    let s: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!((s["layers_uploaded"].as_u64(), s["bytes_uploaded"].as_u64()), (Some(0), Some(0)), "{s}");
    assert_eq!(s["layers_mounted"].as_u64(), Some(old.len() as u64 + 1), "{s}");
    assert_eq!(s["config"], "mounted", "{s}");
}

/// `--creds` goes with `--previous docker://...` only where it belongs:
/// to the `--push` registry, or, without `--push`, to the one registry
/// named; `--password-stdin` works for it too.  Elsewhere the previous
/// image is read with the stored logins (none here), and a registry that
/// wants credentials says so, without the password in the message.
#[test]
#[ignore = "needs docker-registry, htpasswd, openssl and nix: run scripts/test"]
fn previous_creds_go_only_to_their_registry() {
    let secure = Registry::start(true);
    let plain = Registry::start(false);
    let tls = secure.tls.as_ref().unwrap();
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&tls.ca, certs.path().join("ca.crt")).unwrap();
    let cert_dir = certs.path().to_str().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/releases.nix");
    let r1 = nix_build(&[fixture.to_str().unwrap(), "-A", "app"]);
    let r1 = r1.to_str().unwrap();
    let creds = format!("{USER}:{PASSWORD}");
    let previous = format!("docker://{}/rel/app:1", secure.host());
    let image = |extra: &[&str], stdin: Option<&str>| {
        let mut c = nixstream();
        c.args(["image", "-q", "--max-layers", "16", r1, "--cert-dir", cert_dir]).args(extra);
        c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(line) = stdin {
            child.stdin.take().unwrap().write_all(line.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = image(&["--stable", "--push", &previous, "--creds", &creds], None);
    assert!(ok, "{err}");
    // No --push: --creds is for the one registry named.
    let (ok, err) = image(&["--previous", &previous, "--creds", &creds], None);
    assert!(ok, "{err}");
    let (ok, err) =
        image(&["--previous", &previous, "--creds", USER, "--password-stdin"], Some(&format!("{PASSWORD}\n")));
    assert!(ok, "{err}");
    // --creds for the --push registry is not sent to the previous image's.
    let dest = format!("docker://{}/rel/app:2", plain.host());
    let (ok, err) = image(&["--previous", &previous, "--push", &dest, "--creds", &creds], None);
    assert!(!ok, "the previous image's registry got --creds meant for {dest}");
    assert!(err.contains("--previous") && err.contains(&secure.host()), "{err}");
    assert!(err.contains(&format!("--creds is for the push's registry {}", plain.host())), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
}
