//! End to end, with the real programs people pipe images into and a real
//! Nix store.  These need docker (with a daemon), skopeo, umoci, podman and
//! nix-build: `scripts/test` installs and starts them and runs these tests;
//! plain `cargo test` lists them as ignored.  A missing program is a
//! failure here, never a skip.

mod common;

use common::run;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const EXPECTED_RUN: &str = "hello from a nixstream image\ndata from another store path\n";

/// Held around each test's podman commands: podman's vfs store does not
/// take one test's `rmi` during another's `load` (a load then fails with
/// "payload does not match any of the supported image formats").
fn podman_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Single-user Nix without sandbox or binary cache (scripts/nix-env.sh).
fn nix_opts() -> [&'static str; 9] {
    ["--option", "sandbox", "false", "--option", "substituters", "", "--option", "build-users-group", ""]
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test closure (tests/fixtures/closure.nix), built once: the app's
/// store path and its closure.
fn closure() -> &'static (PathBuf, Vec<PathBuf>) {
    static C: OnceLock<(PathBuf, Vec<PathBuf>)> = OnceLock::new();
    C.get_or_init(|| {
        let out = run(Command::new("nix-build")
            .env("NIX_REMOTE", "local")
            .arg("--no-out-link")
            .args(nix_opts())
            .arg(repo().join("tests/fixtures/closure.nix")));
        let app = PathBuf::from(stdout(&out).trim());
        let req = run(Command::new("nix-store").env("NIX_REMOTE", "local").args(["--query", "--requisites"]).arg(&app));
        let paths: Vec<PathBuf> = stdout(&req).lines().map(PathBuf::from).collect();
        assert_eq!(paths.len(), 3, "busybox, data, app: {paths:?}");
        (app, paths)
    })
}

/// A configuration for the closure, one layer per path.
fn conf(dir: &Path, tag: &str) -> PathBuf {
    let (app, paths) = closure();
    let cust = common::make_customisation(dir);
    let mut c =
        common::conf_json(Path::new("/nix/store"), &paths.iter().map(|p| vec![p.clone()]).collect::<Vec<_>>(), &cust);
    c["repo_tag"] = serde_json::json!(tag);
    c["config"] = serde_json::json!({ "Cmd": [app.join("bin/app")] });
    let p = dir.join("conf.json");
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    p
}

fn stream_to_file(conf: &Path, file: &Path) {
    let f = std::fs::File::create(file).unwrap();
    run(common::bin().args(["stream", "-q"]).arg(conf).stdout(f));
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn docker_load_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let tag = "nixstream-e2e/docker:latest";
    let archive = tmp.path().join("image.tar");
    stream_to_file(&conf(tmp.path(), tag), &archive);
    // Remove any earlier copy so the layers are really imported.
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let load = run(Command::new("docker").args(["load", "-i"]).arg(&archive));
    assert!(stdout(&load).contains(&format!("Loaded image: {tag}")), "{}", stdout(&load));
    let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
    assert_eq!(stdout(&out), EXPECTED_RUN);
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
}

/// Streams `conf` through a pipe straight into `client` (its stdin), with
/// every settled file spliced into the pipe; returns the client's output and
/// checks nixstream's exit.
fn pipe_into(conf: &Path, client: &mut Command) -> Output {
    let mut ns =
        common::bin().args(["stream", "-q", "--splice-min=1"]).arg(conf).stdout(Stdio::piped()).spawn().unwrap();
    let out = client.stdin(Stdio::from(ns.stdout.take().unwrap())).output().unwrap();
    assert!(ns.wait().unwrap().success(), "nixstream failed");
    assert!(out.status.success(), "{:?}: {}", client, String::from_utf8_lossy(&out.stderr));
    out
}

/// The real clients over a pipe whose file data was spliced (the store
/// paths are settled by then): docker loads and runs it, podman loads it.
#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn clients_load_a_spliced_stream_from_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = conf(tmp.path(), "nixstream-e2e/spliced:latest");
    // Store paths built just now (and the customisation layer) are too
    // young to splice: let them settle.
    std::thread::sleep(common::SETTLE);
    let tag = "nixstream-e2e/spliced:latest";
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let load = pipe_into(&conf, Command::new("docker").arg("load"));
    assert!(stdout(&load).contains(&format!("Loaded image: {tag}")), "{}", stdout(&load));
    let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
    assert_eq!(stdout(&out), EXPECTED_RUN);
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();

    let podman_tag = format!("localhost/{tag}");
    let _podman = podman_lock();
    let _ = Command::new("podman").args(["--storage-driver", "vfs", "rmi", "-f", &podman_tag]).output();
    let load = pipe_into(&conf, Command::new("podman").args(["--storage-driver", "vfs", "load"]));
    let text = stdout(&load) + &String::from_utf8_lossy(&load.stderr);
    assert!(text.contains(&format!("Loaded image: {podman_tag}")), "{text}");
    let _ = Command::new("podman").args(["--storage-driver", "vfs", "rmi", "-f", &podman_tag]).output();
}

/// Every entry of every store path appears in `rootfs` as it is in the store.
fn compare_rootfs(rootfs: &Path, paths: &[PathBuf]) -> usize {
    let mut checked = 0;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let inside = rootfs.join(p.strip_prefix("/").unwrap());
        let a = std::fs::symlink_metadata(&p).unwrap();
        let b = std::fs::symlink_metadata(&inside)
            .unwrap_or_else(|e| panic!("{} missing from the image: {e}", p.display()));
        assert_eq!(a.file_type(), b.file_type(), "{}", p.display());
        if a.is_symlink() {
            assert_eq!(std::fs::read_link(&p).unwrap(), std::fs::read_link(&inside).unwrap(), "{}", p.display());
        } else {
            assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "mode of {}", p.display());
        }
        if a.is_file() {
            assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&inside).unwrap(), "content of {}", p.display());
        }
        if a.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        checked += 1;
    }
    checked
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn skopeo_copy_and_umoci_unpack_match_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("image.tar");
    stream_to_file(&conf(tmp.path(), "nixstream-e2e/skopeo:latest"), &archive);
    let oci = tmp.path().join("oci");
    // skopeo verifies every layer digest while copying.
    let out = run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", archive.display()))
        .arg(format!("oci:{}:e2e", oci.display())));
    assert!(stdout(&out).contains("Writing manifest to image destination"), "{}", stdout(&out));
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:e2e", oci.display())).arg(&bundle));
    let (_, paths) = closure();
    let n = compare_rootfs(&bundle.join("rootfs"), paths);
    assert!(n >= 15, "compared {n} entries");
    // The hard link arrives as two regular files with the same content.
    let data = paths.iter().find(|p| p.to_string_lossy().ends_with("-nixstream-data")).unwrap();
    let inside = bundle.join("rootfs").join(data.strip_prefix("/").unwrap());
    assert!(std::fs::symlink_metadata(inside.join("greeting-hardlink")).unwrap().is_file());
    assert_eq!(std::fs::read(inside.join("greeting-hardlink")).unwrap(), b"data from another store path\n");
    assert!(inside.join("héllo-wörld.txt").is_file());
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn skopeo_reads_a_zstd_stream_from_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = conf(tmp.path(), "nixstream-e2e/pipe:latest");
    let oci = tmp.path().join("oci");
    let mut producer =
        common::bin().args(["stream", "-q", "--compress", "zstd"]).arg(&conf).stdout(Stdio::piped()).spawn().unwrap();
    let out = Command::new("skopeo")
        .args(["copy", "docker-archive:/dev/stdin"])
        .arg(format!("oci:{}:piped", oci.display()))
        .stdin(producer.stdout.take().unwrap())
        .output()
        .expect("run skopeo (is it installed? run scripts/setup-deps)");
    assert!(producer.wait().unwrap().success());
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let inspect = run(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:piped", oci.display())));
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(4), "3 store layers and the customisation layer");
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn podman_load_accepts_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("image.tar");
    stream_to_file(&conf(tmp.path(), "nixstream-e2e/podman:latest"), &archive);
    let podman = || {
        let mut c = Command::new("podman");
        c.args(["--storage-driver", "vfs"]);
        c
    };
    let _podman = podman_lock();
    let _ = podman().args(["rmi", "-f", "localhost/nixstream-e2e/podman:latest"]).output();
    let out = run(podman().args(["load", "-i"]).arg(&archive));
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Loaded image: localhost/nixstream-e2e/podman:latest"), "{text}");
    let images = run(podman().args(["images", "--format", "{{.Repository}}:{{.Tag}}"]));
    assert!(stdout(&images).contains("localhost/nixstream-e2e/podman:latest"), "{}", stdout(&images));
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn nix_derivation_builds_the_image_reproducibly() {
    let build = |check: bool| {
        let mut c = Command::new("nix-build");
        c.env("NIX_REMOTE", "local").arg("--no-out-link").args(nix_opts());
        if check {
            c.arg("--check"); // rebuilds and fails if the bytes differ
        }
        c.args(["--argstr", "nixstream", env!("CARGO_BIN_EXE_nixstream")]).arg(repo().join("tests/fixtures/image.nix"));
        run(&mut c)
    };
    let first = PathBuf::from(stdout(&build(false)).trim());
    let bytes = std::fs::read(&first).unwrap();
    common::validate(&bytes);
    let again = PathBuf::from(stdout(&build(true)).trim());
    assert_eq!(first, again, "same output path");
    assert_eq!(std::fs::read(&again).unwrap(), bytes, "same bytes");
    let tag = "nixstream-built:latest";
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let load = run(Command::new("docker").args(["load", "-i"]).arg(&first));
    assert!(stdout(&load).contains(&format!("Loaded image: {tag}")), "{}", stdout(&load));
    let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
    assert_eq!(stdout(&out), EXPECTED_RUN);
}

/// The store paths each layer of `archive` holds (entries directly under
/// /nix/store), in layer order.
fn layer_store_paths(archive: &[u8]) -> Vec<Vec<String>> {
    common::validate(archive)
        .layers
        .iter()
        .map(|layer| {
            let mut ar = tar::Archive::new(&layer[..]);
            let mut paths = Vec::new();
            for e in ar.entries().unwrap() {
                let e = e.unwrap();
                let name = String::from_utf8_lossy(&e.path_bytes()).trim_end_matches('/').to_string();
                if let Some(rest) = name.strip_prefix("/nix/store/") {
                    if !rest.is_empty() && !rest.contains('/') {
                        paths.push(name);
                    }
                }
            }
            paths
        })
        .collect()
}

/// Without `--tag`, the image is named after the store path, also when
/// the input is a link to it (`./result`), not after the link.
#[test]
#[ignore = "needs nix: run scripts/test"]
fn the_default_name_is_the_store_paths_through_a_result_link() {
    let (app, _) = closure();
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("result");
    std::os::unix::fs::symlink(app, &link).unwrap();
    let name = app.file_name().unwrap().to_str().unwrap().split_once('-').unwrap().1.to_lowercase();
    for input in [app.as_path(), link.as_path()] {
        let out = run(common::bin().env("NIX_REMOTE", "local").args(["image", "-q"]).arg(input));
        let archive = common::validate(&out.stdout);
        assert_eq!(archive.manifest[0]["RepoTags"][0], format!("{name}:latest"), "{}", input.display());
    }
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn nixstream_image_from_a_store_path() {
    let (app, paths) = closure();
    let tag = "nixstream-e2e/image:latest";
    let config = format!("{{\"Cmd\": [\"{}/bin/app\"]}}", app.display());
    for (planner, flags) in
        [("popularity", vec!["--popularity"]), ("auto-layer", vec!["--auto-layer"]), ("stable (the default)", vec![])]
    {
        let out = run(common::bin()
            .env("NIX_REMOTE", "local")
            .args(["image", "-q", "--tag", tag, "--config", &config])
            .args(&flags)
            .arg(app));
        let layers = layer_store_paths(&out.stdout);
        // Every closure path exactly once; the top layer is the (empty) customisation layer.
        let mut all: Vec<&String> = layers.iter().flatten().collect();
        all.sort();
        let mut want: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        want.sort();
        assert_eq!(all.iter().map(|s| s.as_str()).collect::<Vec<_>>(), want, "{planner}: each path once");
        if planner == "popularity" {
            // References sit in the same layer or below their users.
            let layer_of = |p: &str| layers.iter().position(|l| l.iter().any(|x| x == p)).unwrap();
            for p in paths {
                let refs =
                    run(Command::new("nix-store").env("NIX_REMOTE", "local").args(["--query", "--references"]).arg(p));
                for r in stdout(&refs).lines().filter(|r| *r != p.to_str().unwrap()) {
                    assert!(
                        layer_of(r) <= layer_of(p.to_str().unwrap()),
                        "{r} must not be above its user {}",
                        p.display()
                    );
                }
            }
        }
        let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        let mut load =
            Command::new("docker").args(["load"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(load.stdin.as_mut().unwrap(), &out.stdout).unwrap();
        let load = load.wait_with_output().unwrap();
        assert!(stdout(&load).contains(&format!("Loaded image: {tag}")), "{planner}: {}", stdout(&load));
        let run_out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
        assert_eq!(stdout(&run_out), EXPECTED_RUN, "{planner}");
    }
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn what_a_failed_run_leaves_is_refused_by_every_client() {
    use nixstream::dest::docker_archive::write_archive;
    use nixstream::engine::digest::LayerDigest;
    use nixstream::engine::{EngineError, EngineOptions};
    use nixstream::output::progress::{Mode, Progress};
    let tmp = tempfile::tempdir().unwrap();
    let tag = "nixstream-e2e/failed:latest";
    let conf = nixstream::input::conf::Conf::load(&conf(tmp.path(), tag), None).unwrap();
    let plan = nixstream::plan::ImagePlan::from_conf(&conf).unwrap();
    // The third store layer's digest is stale (as if its files changed
    // after the hashing pass): the run must fail, and what it wrote must not
    // load anywhere.
    let stale = LayerDigest { size: 10240, sha256: [0x22; 32] };
    let mut known = vec![None; plan.layers.len()];
    known[2] = Some(nixstream::engine::Hashed {
        digest: stale,
        blob: None,
        unchanged_before_ns: i128::MIN,
        files: None,
        origin: Default::default(),
    });
    let mut out = Vec::new();
    let e = write_archive(
        &plan,
        &mut out,
        &EngineOptions { jobs: 2, known, ..Default::default() },
        &Progress::new(Mode::Quiet, 0),
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::DigestMismatch { layer: 3, .. }), "{e}");
    assert!(out.len() > 100_000, "the failed run wrote its first layers ({} bytes)", out.len());
    let partial = tmp.path().join("partial.tar");
    std::fs::write(&partial, &out).unwrap();

    let refused = |what: &str, cmd: &mut Command| {
        let o = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        assert!(!o.status.success(), "{what} accepted a failed run's output: {}", stdout(&o));
    };
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    refused("docker load", Command::new("docker").args(["load", "-i"]).arg(&partial));
    let images = run(Command::new("docker").args(["images", "-q", tag]));
    assert_eq!(stdout(&images).trim(), "", "docker has no such image");
    refused(
        "skopeo copy",
        Command::new("skopeo")
            .arg("copy")
            .arg(format!("docker-archive:{}", partial.display()))
            .arg(format!("oci:{}:x", tmp.path().join("oci").display())),
    );
    let podman = podman_lock();
    refused("podman load", Command::new("podman").args(["--storage-driver", "vfs", "load", "-i"]).arg(&partial));
    drop(podman);
    refused("nixstream verify", common::bin().arg("verify").arg(&partial));
}

#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn image_with_a_digest_cache_keyed_by_nar_hash() {
    let (app, _) = closure();
    // The local Nix gives every path's narHash: the cache keys by it.
    // (NIX_REMOTE=local comes from scripts/nix-env.sh, as for every e2e test.)
    let g = nixstream::input::closure::ClosureGraph::from_store(&[app.display().to_string()]).unwrap();
    assert!(g.nodes.iter().all(|n| n.nar_hash.as_deref().is_some_and(|h| h.starts_with("sha256"))), "{g:?}");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let image = |cache: Option<&Path>| {
        let mut c = common::bin();
        c.env("NIX_REMOTE", "local").args(["image", "-q", "--tag", "nixstream-e2e/cached:1"]).arg(app);
        if let Some(dir) = cache {
            c.arg("--cache").arg(dir);
        }
        run(&mut c).stdout
    };
    let plain = image(None);
    assert_eq!(image(Some(&cache)), plain, "cold cache");
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert!(entries > 0);
    assert_eq!(image(Some(&cache)), plain, "warm cache");
    let r = nixstream::read::verify::verify(&plain[..], "image").unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

/// The OCI outputs of an image of about 250 MB (the test closure plus a
/// bulk store path), in every layer compression: `skopeo inspect` reads the
/// oci-archive; gzip and plain ones go through `skopeo copy` into a
/// docker-archive that `docker load` takes and runs (Debian's docker and
/// skopeo do not take zstd layers into a docker-archive; podman loads the
/// zstd one); the OCI layout (gzip) is read by `skopeo copy oci:` and
/// unpacked by umoci with every file, mode and link equal to the store; the
/// config (so the image ID and every diff_id) equals the docker-archive's.
#[test]
#[ignore = "needs docker, skopeo, umoci, podman and nix: run scripts/test"]
fn oci_outputs_of_a_big_closure_load_run_and_unpack() {
    let out = run(Command::new("nix-build")
        .env("NIX_REMOTE", "local")
        .arg("--no-out-link")
        .args(nix_opts())
        .arg(repo().join("tests/fixtures/bulk.nix")));
    let bulk = PathBuf::from(stdout(&out).trim());
    let (app, paths) = closure();
    let tmp = tempfile::tempdir().unwrap();
    let cust = common::make_customisation(tmp.path());
    let mut layers: Vec<Vec<PathBuf>> = paths.iter().map(|p| vec![p.clone()]).collect();
    layers.push(vec![bulk.clone()]);
    let mut c = common::conf_json(Path::new("/nix/store"), &layers, &cust);
    let tag = "nixstream-e2e/oci:latest";
    c["repo_tag"] = serde_json::json!(tag);
    c["config"] = serde_json::json!({ "Cmd": [app.join("bin/app")] });
    let conf = tmp.path().join("conf.json");
    std::fs::write(&conf, serde_json::to_vec(&c).unwrap()).unwrap();

    let docker_archive = tmp.path().join("docker.tar");
    stream_to_file(&conf, &docker_archive);
    let id =
        common::validate(&std::fs::read(&docker_archive).unwrap()).config_name.trim_end_matches(".json").to_string();

    for compression in ["gzip", "none", "zstd"] {
        let archive = tmp.path().join(format!("oci-{compression}.tar"));
        let f = std::fs::File::create(&archive).unwrap();
        run(common::bin()
            .args(["stream", "-q", "--format", "oci-archive", "--layer-compression", compression])
            .arg(&conf)
            .stdout(f));
        let inspect = run(Command::new("skopeo").arg("inspect").arg(format!("oci-archive:{}", archive.display())));
        let v: serde_json::Value = serde_json::from_str(&stdout(&inspect)).unwrap();
        assert_eq!(v["Layers"].as_array().unwrap().len(), layers.len() + 1, "{compression}: {v}");
        if compression == "zstd" {
            let _podman = podman_lock();
            let podman_tag = format!("localhost/{tag}");
            let _ = Command::new("podman").args(["--storage-driver", "vfs", "rmi", "-f", &podman_tag]).output();
            let load = run(Command::new("podman").args(["--storage-driver", "vfs", "load", "-i"]).arg(&archive));
            let text = stdout(&load) + &String::from_utf8_lossy(&load.stderr);
            assert!(text.contains(&format!("Loaded image: {podman_tag}")), "{text}");
            let _ = Command::new("podman").args(["--storage-driver", "vfs", "rmi", "-f", &podman_tag]).output();
            continue;
        }
        let copied = tmp.path().join(format!("copied-{compression}.tar"));
        run(Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker-archive:{}:{tag}", copied.display())));
        let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        let load = run(Command::new("docker").args(["load", "-i"]).arg(&copied));
        assert!(stdout(&load).contains(&format!("Loaded image: {tag}")), "{}", stdout(&load));
        let inspect = run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", tag]));
        assert_eq!(stdout(&inspect).trim(), format!("sha256:{id}"), "{compression}: the docker-archive's image ID");
        let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
        assert_eq!(stdout(&out), EXPECTED_RUN);
        let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    }

    let layout = tmp.path().join("layout");
    run(common::bin().args(["stream", "-q", "--oci-layout"]).arg(&layout).arg(&conf));
    let copied = tmp.path().join("from-layout.tar");
    run(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker-archive:{}:{tag}", copied.display())));
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    run(Command::new("docker").args(["load", "-i"]).arg(&copied));
    let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]));
    assert_eq!(stdout(&out), EXPECTED_RUN);
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(&bundle));
    let mut all = paths.clone();
    all.push(bulk);
    let n = compare_rootfs(&bundle.join("rootfs"), &all);
    assert!(n >= 100, "compared {n} entries");
}
