//! The user's ways in: the wrapper script `nix-build` gives for a
//! `streamLayeredImage` (golden cases, so switching is shown to give the
//! reference's bytes), and the Nix library in `nix/` built with nix-build,
//! loaded into docker and run, and rebuilt with `nix-build --check`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, golden_dir, golden_tree, run, validate};

/// The two shapes makeWrapper has written for `makeWrapper <streamer> $out
/// --add-flags <conf>`: nixpkgs 21.x (`${original@Q}`, extraFlagsArray) and
/// makeShellWrapper (double quotes, `exec -a "$0"`).
fn wrappers(conf: &Path) -> [String; 2] {
    let conf = conf.display();
    [
        format!(
            "#! /nix/store/00000000000000000000000000000000-bash-5.1-p16/bin/bash -eu\n\
             declare -a extraFlagsArray=()\nset +u\n\
             exec '/nix/store/11111111111111111111111111111111-stream' {conf} \"${{extraFlagsArray[@]}}\" \"$@\"\n"
        ),
        format!(
            "#! /nix/store/00000000000000000000000000000000-bash-5.2-p15/bin/bash -e\n\
             exec -a \"$0\" \"/nix/store/11111111111111111111111111111111-stream\"  {conf} \"$@\" \n"
        ),
    ]
}

#[test]
fn stream_takes_the_streamlayeredimage_wrapper_and_gives_the_reference_bytes() {
    golden_tree();
    let tmp = tempfile::tempdir().unwrap();
    for case in ["basic", "grouped"] {
        let dir = golden_dir().join("cases").join(case);
        let expected = std::fs::read(dir.join("expected.tar")).unwrap();
        for (i, script) in wrappers(&dir.join("conf.json")).iter().enumerate() {
            let result = tmp.path().join(format!("result-{case}-{i}"));
            std::fs::write(&result, script).unwrap();
            let out = bin().args(["stream", "-q"]).arg(&result).output().unwrap();
            assert!(out.status.success(), "{case} wrapper {i}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout == expected, "{case} wrapper {i}: not the reference's bytes");
        }
    }
}

#[test]
fn scripts_that_are_not_wrappers_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("conf.json");
    std::fs::write(&conf, "{}").unwrap();
    for (script, why) in [
        ("#!/bin/sh\necho not an image\n".to_string(), "has no `exec` line"),
        (format!("#!/bin/sh\nexec /s/stream {} --verbose \"$@\"\n", conf.display()), "\"--verbose\""),
        ("#!/bin/sh\nexec /s/stream /nowhere/conf.json \"$@\"\n".to_string(), "/nowhere/conf.json"),
    ] {
        let result = tmp.path().join("result");
        std::fs::write(&result, &script).unwrap();
        let out = bin().args(["stream", "-q", "-o"]).arg(tmp.path().join("out.tar")).arg(&result).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{script}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("not a streamLayeredImage wrapper") && err.contains(why), "{script}: {err}");
    }
}

/// Completions and the manual page come from the same clap definitions as
/// the parser: every command is in them; every command's help ends with
/// examples.
#[test]
fn completions_man_page_and_examples_cover_every_command() {
    let commands = ["stream", "image", "layers", "plan", "digest", "verify", "layer-digest", "completions", "man"];
    for shell in ["bash", "zsh", "fish"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for c in commands {
            assert!(text.contains(c), "{shell} completion lacks {c}");
        }
        assert!(text.contains("contents-link"), "{shell}: options of subcommands too");
    }
    let bad = bin().args(["completions", "cmd.exe"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let man = bin().arg("man").output().unwrap();
    let page = String::from_utf8(man.stdout).unwrap();
    assert!(page.starts_with(".ie") && page.contains(".TH nixstream 1"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    assert!(bin().args(["man", "--dir"]).arg(dir.path()).status().unwrap().success());
    for c in commands {
        let page = std::fs::read_to_string(dir.path().join(format!("nixstream-{c}.1"))).unwrap();
        assert!(page.contains("Examples:"), "nixstream-{c}.1");
        let help = bin().args([c, "--help"]).output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        let tail = &help[help.rfind("Examples:").unwrap_or_else(|| panic!("{c} --help has no examples"))..];
        let examples = tail.lines().filter(|l| l.trim_start().starts_with("nixstream ")).count();
        assert!((2..=3).contains(&examples), "{c}: {examples} examples:\n{tail}");
    }
}

/// `layer-digest` files taken by `stream --known-digests`: the hashing pass
/// skipped for every layer they describe, for the docker-archive and, with
/// the blob digest of the same compression, the OCI archive; the same bytes
/// as hashing here.
#[test]
fn known_layer_digests_skip_the_hashing_pass_and_give_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nix/store");
    let mut layers = Vec::new();
    for (name, n) in [("aaaa-lib", 40), ("bbbb-app", 3)] {
        let p = store.join(name);
        std::fs::create_dir_all(p.join("share")).unwrap();
        for i in 0..n {
            std::fs::write(p.join("share").join(format!("f{i}")), vec![i as u8; 1000 + 997 * i]).unwrap();
        }
        layers.push(vec![p]);
    }
    let cust = common::make_customisation(tmp.path());
    let conf = tmp.path().join("conf.json");
    std::fs::write(&conf, common::conf_json(&store, &layers, &cust).to_string()).unwrap();
    let digests = tmp.path().join("digests");
    std::fs::create_dir(&digests).unwrap();
    for (i, l) in layers.iter().enumerate() {
        let out = bin()
            .args(["layer-digest", "-q", "--layer-compression", "gzip", "--store-dir"])
            .arg(&store)
            .args(l)
            .arg("-o")
            .arg(digests.join(format!("{i}.json")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let stream = |args: &[&str], known: bool| {
        let mut c = bin();
        c.args(["stream", "-q", "--stats"]).args(args).arg(&conf);
        if known {
            c.arg("--known-digests").arg(&digests);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let stats = String::from_utf8_lossy(&out.stderr);
        let from_cache = stats.split("\"layers_from_cache\":").nth(1).unwrap().split(',').next().unwrap().to_string();
        (out.stdout, from_cache)
    };
    for (args, known_layers) in [
        (&[][..], "2"),
        (&["--format", "oci-archive", "--layer-compression", "gzip"][..], "2"),
        // No zstd blob digests in the files: hashed here.
        (&["--format", "oci-archive", "--layer-compression", "zstd"][..], "0"),
    ] {
        let (plain, none) = stream(args, false);
        let (with, from_cache) = stream(args, true);
        assert_eq!(none, "0");
        assert_eq!(from_cache, known_layers, "{args:?}");
        assert!(with == plain, "{args:?}: the same bytes");
    }
}

// --- The Nix library ------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `nix-build -A attr tests/fixtures/library.nix` (single-user, as
/// scripts/nix-env.sh sets it up), the test binary as the builder.
fn nix_build(attr: &str, check: bool) -> PathBuf {
    nix("nix-build", attr, check, &[]).into_iter().next().unwrap()
}

/// `tool` (nix-build or nix-instantiate) on tests/fixtures/library.nix;
/// the paths it prints.
fn nix(tool: &str, attr: &str, check: bool, extra: &[&str]) -> Vec<PathBuf> {
    let mut c = Command::new(tool);
    c.env("NIX_REMOTE", "local").args(if tool == "nix-build" { &["--no-out-link"][..] } else { &[] }).args([
        "--option",
        "sandbox",
        "false",
        "--option",
        "substituters",
        "",
        "--option",
        "build-users-group",
        "",
    ]);
    if check {
        c.arg("--check");
    }
    // A Nix path, not a string: the binary is copied into the store, so a
    // rebuilt nixstream is a new builder and the outputs are built again.
    c.args(["--arg", "nixstream", env!("CARGO_BIN_EXE_nixstream"), "-A", attr])
        .args(extra)
        .arg(repo().join("tests/fixtures/library.nix"));
    String::from_utf8(run(&mut c).stdout).unwrap().lines().map(PathBuf::from).collect()
}

fn docker_load_run(archive: &[u8], tag: &str, cmd: &[&str]) -> String {
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let mut load = Command::new("docker")
        .arg("load")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("docker");
    std::io::Write::write_all(load.stdin.as_mut().unwrap(), archive).unwrap();
    let load = load.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&load.stdout).contains(&format!("Loaded image: {tag}")), "{load:?}");
    let out = run(Command::new("docker").args(["run", "--rm", "--network=none", tag]).args(cmd));
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    String::from_utf8(out.stdout).unwrap()
}

const EXPECTED_RUN: &str = "hello from a nixstream image\ndata from another store path\n";

/// buildImage: the archive in the store, reproducible bit for bit, loaded
/// and run; `contents` symlinks at /, the config's store paths in the image
/// though only the config names them.
#[test]
#[ignore = "needs docker and nix: run scripts/test"]
fn library_build_image_loads_runs_and_rebuilds_bit_for_bit() {
    let first = nix_build("image", false);
    let bytes = std::fs::read(&first).unwrap();
    let again = nix_build("image", true); // fails if the rebuild differs
    assert_eq!(first, again);
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    let a = validate(&bytes);
    // The customisation layer (top) holds busybox's tree as symlinks.
    let top = a.layers.last().unwrap();
    let mut links = Vec::new();
    for e in tar::Archive::new(&top[..]).entries().unwrap() {
        let e = e.unwrap();
        if let Some(target) = e.link_name().unwrap() {
            links.push((e.path().unwrap().display().to_string(), target.display().to_string()));
        }
    }
    assert!(
        links.iter().any(|(p, t)| p == "bin/sh" && t.ends_with("-busybox-static/bin/sh")),
        "contents as symlinks: {links:?}"
    );
    assert_eq!(docker_load_run(&bytes, "nixstream-lib/image:test", &[]), EXPECTED_RUN);
    assert_eq!(docker_load_run(&bytes, "nixstream-lib/image:test", &["/bin/echo", "via contents"]), "via contents\n");
}

/// streamImage: a small output with no archive that references the whole
/// closure; `nixstream stream ./result` gives buildImage's bytes.
#[test]
#[ignore = "needs docker and nix: run scripts/test"]
fn library_stream_image_is_small_keeps_the_closure_and_streams_the_same_bytes() {
    let conf = nix_build("stream", false);
    let image = nix_build("image", false);
    let size: u64 = walk_size(&conf);
    assert!(size < 64 * 1024, "{} holds {size} bytes: no archive in it", conf.display());
    let refs = run(Command::new("nix-store").env("NIX_REMOTE", "local").args(["--query", "--requisites"]).arg(&conf));
    let refs = String::from_utf8(refs.stdout).unwrap();
    for name in ["-busybox-static", "-nixstream-data", "-nixstream-app"] {
        assert!(refs.lines().any(|l| l.ends_with(name)), "{name} kept alive by {}: {refs}", conf.display());
    }
    let out = run(bin().args(["stream", "-q"]).arg(&conf));
    assert!(out.stdout == std::fs::read(&image).unwrap(), "stream ./result == buildImage's archive");
    let again = nix_build("stream", true);
    assert_eq!(conf, again);
    // planner = "stable": every path once, and an image that checks.
    let stable = nix_build("streamStable", false);
    let layers: serde_json::Value = serde_json::from_slice(&std::fs::read(stable.join("conf.json")).unwrap()).unwrap();
    let mut paths: Vec<&str> = layers["store_layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l.as_array().unwrap())
        .map(|p| p.as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = refs.lines().filter(|l| !l.ends_with("-conf") && *l != conf.to_str().unwrap()).collect();
    paths.sort_unstable();
    want.sort_unstable();
    assert_eq!(paths, want, "each closure path in exactly one layer");
    let archive = run(bin().args(["stream", "-q"]).arg(&stable)).stdout;
    validate(&archive);
}

fn walk_size(p: &Path) -> u64 {
    let m = std::fs::symlink_metadata(p).unwrap();
    if m.is_dir() {
        std::fs::read_dir(p).unwrap().map(|e| walk_size(&e.unwrap().path())).sum()
    } else {
        m.len()
    }
}

/// Per-layer digest derivations: one per store layer, kept beside the
/// configuration and taken by `stream` as known digests (its hashing pass
/// skipped, the same bytes); a wrong one stops the archive; a changed store
/// path changes its own layer's derivation only.
#[test]
#[ignore = "needs docker and nix: run scripts/test"]
fn library_layer_digest_derivations_are_used_checked_and_rebuilt_alone() {
    let conf = nix_build("streamWithDigests", false);
    // conf.json alone (no digests beside it): every layer hashed here.
    let image = run(bin().args(["stream", "-q", "--stats"]).arg(conf.join("conf.json")));
    assert!(String::from_utf8_lossy(&image.stderr).contains("\"layers_from_cache\":0"));
    let digests: Vec<_> = std::fs::read_dir(conf.join("digests")).unwrap().collect();
    assert_eq!(digests.len(), 3, "a digest per store layer");
    let out = run(bin().args(["stream", "-q", "--stats"]).arg(&conf));
    assert!(out.stdout == image.stdout, "the same bytes with the digests known");
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(stats.contains("\"layers_from_cache\":3"), "the hashing pass was skipped: {stats}");

    // Digests of other content are caught while streaming, before
    // manifest.json: each file is compared with the file's hash.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("conf");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(conf.join("conf.json"), copy.join("conf.json")).unwrap();
    std::fs::create_dir(copy.join("digests")).unwrap();
    for e in std::fs::read_dir(conf.join("digests")).unwrap() {
        let e = e.unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        if v["paths"][0].as_str().unwrap().ends_with("-nixstream-data") {
            v["files"][0] = serde_json::json!("0".repeat(32));
        }
        std::fs::write(copy.join("digests").join(e.file_name()), v.to_string()).unwrap();
    }
    let bad = bin().args(["stream", "-q"]).arg(&copy).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    // Blamed on the digest file, not on the store.
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("nixstream-data") && err.contains("is wrong for this layer"), "{err}");
    assert!(err.contains(&format!("the layer digest file {}", copy.join("digests").display())), "{err}");
    assert!(!err.contains("changed while"), "{err}");
    let partial = tmp.path().join("partial.tar");
    std::fs::write(&partial, &bad.stdout).unwrap();
    assert!(!bin().args(["verify", "-q"]).arg(&partial).output().unwrap().status.success(), "nothing loadable");
    let load =
        Command::new("docker").arg("load").stdin(std::fs::File::open(&partial).unwrap()).output().expect("docker");
    assert!(!load.status.success(), "docker loaded the partial output: {load:?}");

    // Only the changed app's layer needs hashing again.
    let before = nix("nix-instantiate", "streamWithDigests.layerDigestDrvs", false, &[]);
    let after = nix("nix-instantiate", "streamWithDigests.layerDigestDrvs", false, &["--argstr", "message", "v2"]);
    assert_eq!(before.len(), 3);
    let changed: Vec<_> = after.iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(changed.len(), 1, "{before:?} -> {after:?}");
    assert!(changed[0].to_string_lossy().ends_with("-nixstream-layer-nixstream-app.drv"), "{changed:?}");
}
