//! `layers` and `plan` with `--from-image BASE`: they plan within the
//! budget `image --from-image BASE` plans within (`--max-layers` less the
//! customisation layer and BASE's layers), so `layers` prints the very store
//! layers the image is built with; `plan` says where the base's layers sit;
//! a base that leaves no layer is one line and exit status 1, the same line
//! for the three commands.  A small store in a temporary directory, and a
//! base built by `nixstream image` itself: no Nix, no daemon.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bin, run};

/// A closure of `paths.len()` store paths under `store` (made if missing;
/// path number i of `names` is some i KiB), each referring to the next two,
/// written as a graph file `name`.
fn graph(dir: &Path, store: &Path, name: &str, paths: &[String]) -> PathBuf {
    let path = |p: &String| store.join(p);
    let mut nodes = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let dir = path(p);
        let n: u64 = p[..32].parse().unwrap();
        if !dir.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("f"), p.repeat(n as usize + 1)).unwrap();
        }
        let refs: Vec<PathBuf> = paths[i + 1..].iter().take(2).map(path).collect();
        nodes.push(serde_json::json!({"path": dir, "references": refs, "narSize": 1000 * (n + 1)}));
    }
    let f = dir.join(name);
    std::fs::write(&f, serde_json::to_vec(&serde_json::json!({"graph": nodes})).unwrap()).unwrap();
    f
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:032}-{prefix}{i}")).collect()
}

/// The store, an application's closure of 30 paths, and a base image of
/// `BASE_LAYERS` layers (four store layers and its customisation layer).
struct Setup {
    dir: tempfile::TempDir,
    store: PathBuf,
    app: PathBuf,
    base: PathBuf,
}

const BASE_LAYERS: usize = 5;

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let app = graph(dir.path(), &store, "app.json", &names("p", 30));
    let base_graph = graph(dir.path(), &store, "base.json", &names("base", 4));
    let base = dir.path().join("base.tar");
    run(bin()
        .args(["image", "-q", "--pipeline", r#"[["split_every", 1]]"#, "-o"])
        .arg(&base)
        .arg("--store-dir")
        .arg(&store)
        .arg(&base_graph));
    assert_eq!(diff_ids(&base), BASE_LAYERS, "the base's layer count");
    Setup { dir, store, app, base }
}

fn diff_ids(archive: &Path) -> usize {
    let a = common::validate(&std::fs::read(archive).unwrap());
    a.config["rootfs"]["diff_ids"].as_array().unwrap().len()
}

/// The store layers of an image built on a base of `base_layers` layers,
/// read back from its config's history: the base's entries come first, the
/// customisation layer's last, each store layer's names its paths.
fn store_layers_of(archive: &Path, base_layers: usize) -> Vec<Vec<String>> {
    let a = common::validate(&std::fs::read(archive).unwrap());
    let history = a.config["history"].as_array().unwrap();
    history[base_layers..history.len() - 1]
        .iter()
        .map(|h| {
            let c = h["comment"].as_str().unwrap().strip_prefix("store paths: ").unwrap();
            serde_json::from_str(&c.replace('\'', "\"")).unwrap()
        })
        .collect()
}

fn layers_of(out: &Output) -> Vec<Vec<String>> {
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn layers_from_image_are_the_store_layers_image_builds() {
    let s = setup();
    let max = "10";
    for planner in [&[][..], &["--popularity"], &["--stable"]] {
        let layers = layers_of(&run(bin()
            .args(["layers", "--max-layers", max])
            .args(planner)
            .arg(&s.app)
            .arg("--from-image")
            .arg(&s.base)));
        let image = s.dir.path().join("image.tar");
        run(bin()
            .args(["image", "-q", "--max-layers", max])
            .args(planner)
            .arg(&s.app)
            .arg("--from-image")
            .arg(&s.base)
            .arg("--store-dir")
            .arg(&s.store)
            .arg("-o")
            .arg(&image));
        assert_eq!(diff_ids(&image), BASE_LAYERS + layers.len() + 1, "{planner:?}: base, store, customisation");
        assert_eq!(store_layers_of(&image, BASE_LAYERS), layers, "{planner:?}");
        // The base lowered the budget: 10 less 1 less 5.
        assert!(layers.len() <= 4, "{planner:?}: {} store layers", layers.len());
        let without = layers_of(&run(bin().args(["layers", "--max-layers", max]).args(planner).arg(&s.app)));
        assert!(without.len() > 4, "{planner:?}: without the base the plan has room for more");
        let by_hand = layers_of(&run(bin().args(["layers", "--max-layers", "5"]).args(planner).arg(&s.app)));
        assert_eq!(layers, by_hand, "{planner:?}: --from-image is --max-layers less the base's layers");
    }
}

#[test]
fn plan_from_image_says_the_base_comes_first() {
    let s = setup();
    let plan = |extra: &[&str]| {
        let out =
            run(bin().args(["plan", "--max-layers", "10"]).args(extra).arg(&s.app).arg("--from-image").arg(&s.base));
        String::from_utf8(out.stdout).unwrap()
    };
    let layers = layers_of(&run(bin().args(["layers", "--max-layers", "10", "--from-image"]).arg(&s.base).arg(&s.app)));
    let table = plan(&[]);
    assert!(table.lines().next().unwrap().starts_with("the base image's 5 layers ("), "{table}");
    assert!(table.contains("store layer 1 is the image's layer 6"), "{table}");
    let in_all = format!("{} layers; {} in the image with the base image's 5", layers.len(), 5 + layers.len() + 1);
    assert!(table.lines().last().unwrap().contains(&in_all), "{table}");

    let v: serde_json::Value = serde_json::from_str(&plan(&["--json"])).unwrap();
    assert_eq!(v["base_layers"], BASE_LAYERS, "{v}");
    let paths: Vec<Vec<String>> =
        v["layers"].as_array().unwrap().iter().map(|l| serde_json::from_value(l["paths"].clone()).unwrap()).collect();
    assert_eq!(paths, layers, "plan and layers plan alike");
    assert_eq!(v["layers"][0]["layer"], 1, "layers count from the first store layer");

    // With --previous: the object gains the count, and the stack shows the base below layer 1.
    let prev = s.dir.path().join("prev.json");
    std::fs::write(&prev, serde_json::to_vec(&layers).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&plan(&["--json", "--previous", prev.to_str().unwrap()])).unwrap();
    assert_eq!(v["base_layers"], BASE_LAYERS, "{v}");
    assert_eq!(v["kept"], layers.len(), "{v}");
    let stack = plan(&["--previous", prev.to_str().unwrap()]);
    assert!(stack.contains("base  the base image's 5 layers") && stack.contains("below layer 1"), "{stack}");

    // Without a base, the JSON is nixpkgs-like as before: a list.
    let out = run(bin().args(["plan", "--json", "--max-layers", "10"]).arg(&s.app));
    assert!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().is_array());
    // A budget the plan leaves partly unused is said.
    let out = run(bin().args(["plan"]).arg(&s.app));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.lines().last().unwrap().ends_with("layers; the budget allows 99"), "{table}");
}

/// One line, exit status 1, nothing on stdout.
fn fails(args: &[&str], s: &Setup) -> String {
    let mut c = bin();
    c.args(args).arg(&s.app).arg("--from-image").arg(&s.base);
    if args[0] == "image" {
        c.arg("--store-dir").arg(&s.store);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    assert!(out.stdout.is_empty(), "{args:?}");
    err
}

#[test]
fn a_base_that_leaves_no_layer_is_one_line() {
    let s = setup();
    let want = "nixstream: --max-layers 6 leaves no layer for the store paths: the base image has 5 layers and the customisation layer takes one\n";
    for cmd in [&["layers"][..], &["plan"], &["plan", "--json"], &["image", "-q"], &["layers", "--popularity"]] {
        let args: Vec<&str> = cmd.iter().copied().chain(["--max-layers", "6"]).collect();
        assert_eq!(fails(&args, &s), want, "{cmd:?}");
    }
    let err = fails(&["layers", "--joint", "--max-layers", "6"], &s);
    assert_eq!(err, want);
    // One more layer is one store layer.
    let one = layers_of(&run(bin().args(["layers", "--max-layers", "7", "--from-image"]).arg(&s.base).arg(&s.app)));
    assert_eq!(one.len(), 1);
}

#[test]
fn auto_layer_n_refuses_a_base_and_a_pipeline_ignores_it() {
    let s = setup();
    let err = fails(&["layers", "--auto-layer", "8"], &s);
    assert!(err.contains("--auto-layer 8 is a layer count of its own") && err.contains("M-6"), "{err}");
    fails(&["plan", "--auto-layer", "8"], &s);
    // A pipeline brings its own limit: the base does not change the plan.
    let pipeline = r#"[["popularity_contest"], ["limit_layers", 7]]"#;
    let plain = run(bin().args(["layers", "--pipeline", pipeline]).arg(&s.app));
    let on_base = run(bin().args(["layers", "--pipeline", pipeline, "--from-image"]).arg(&s.base).arg(&s.app));
    assert_eq!(layers_of(&plain).len(), 7);
    assert_eq!(plain.stdout, on_base.stdout);
}

/// `--joint` on a base: each image on the same base, within the budget it
/// leaves, as `image --joint-with --from-image` builds them.
#[test]
fn joint_plans_on_a_base() {
    let s = setup();
    let other = graph(s.dir.path(), &s.store, "other.json", &names("p", 30)[10..]);
    let joint = |args: &[&str]| -> Vec<Vec<Vec<String>>> {
        serde_json::from_slice(&run(bin().args(["layers", "--joint"]).args(args).arg(&s.app).arg(&other)).stdout)
            .unwrap()
    };
    let on_base = joint(&["--max-layers", "10", "--from-image", s.base.to_str().unwrap()]);
    assert_eq!(on_base, joint(&["--max-layers", "5"]));
    let image = s.dir.path().join("joint.tar");
    run(bin()
        .args(["image", "-q", "--max-layers", "10", "--from-image"])
        .arg(&s.base)
        .arg(&s.app)
        .arg("--joint-with")
        .arg(&other)
        .arg("--store-dir")
        .arg(&s.store)
        .arg("-o")
        .arg(&image));
    assert_eq!(store_layers_of(&image, BASE_LAYERS), on_base[0]);
    let table =
        run(bin().args(["plan", "--joint", "--max-layers", "10", "--from-image"]).arg(&s.base).arg(&s.app).arg(&other));
    let table = String::from_utf8(table.stdout).unwrap();
    assert_eq!(table.matches("the base image's 5 layers").count(), 2, "{table}");
}
