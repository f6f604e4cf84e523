//! The stable planner across releases: the scenarios of
//! tests/fixtures/releases.nix built as real Nix closures (one test per
//! scenario, checking what must always hold), `--previous` read from real
//! images (docker-archive from `nixstream image`, oci-archive from skopeo),
//! `--joint`, and the edges (another store, a malformed plan, an image
//! without store-path history), which need no Nix.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use common::{bin, tar_of};
use nixstream::input::closure::ClosureGraph;
use nixstream::planner::compare::compare;
use nixstream::planner::stable;

/// `--max-layers` of the scenario tests: small enough that the ~50 paths
/// of a release must share layers.
const MAX_LAYERS: usize = 16;
const BUDGET: usize = MAX_LAYERS - 1;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run scripts/setup-deps)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// One release of releases.nix: its top store path and closure graph.
fn release(attr: &str, args: &[(&str, &str)]) -> (String, ClosureGraph) {
    // nix-build runs one at a time: the store's lock is per process.
    static LOCK: Mutex<()> = Mutex::new(());
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Command::new("nix-build");
    c.env("NIX_REMOTE", "local").arg("--no-out-link");
    c.args(["--option", "sandbox", "false", "--option", "substituters", "", "--option", "build-users-group", ""]);
    c.arg(repo().join("tests/fixtures/releases.nix")).args(["-A", attr]);
    for (k, v) in args {
        c.args(["--arg", k, v]);
    }
    let top = String::from_utf8(run(&mut c).stdout).unwrap().trim().to_string();
    let info = run(Command::new("nix")
        .env("NIX_REMOTE", "local")
        .args(["--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive"])
        .arg(&top));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    (top, ClosureGraph::from_value(&v).unwrap())
}

/// What must hold of every plan: each path of the closure in exactly one
/// layer, no empty layer, the budget respected.
fn check_plan(g: &ClosureGraph, layers: &[Vec<String>], budget: usize) {
    assert!(layers.len() <= budget, "{} layers over a budget of {budget}", layers.len());
    assert!(layers.iter().all(|l| !l.is_empty()), "an empty layer");
    let mut seen = HashSet::new();
    for p in layers.iter().flatten() {
        assert!(seen.insert(p.as_str()), "{p} is in two layers");
    }
    let want: HashSet<&str> = g.nodes.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(seen, want, "the layers do not hold exactly the closure");
}

/// And of a plan built on a previous one: its bottom `kept` layers are
/// previous layers, unchanged and in their previous order; every previous
/// layer still whole is kept unless the planner said it let some go; no
/// layer is pushed without need (pushed ≥ really changed, the floor).
fn check_on_previous(g: &ClosureGraph, p: &stable::Planned, previous: &[Vec<String>]) {
    check_plan(g, &p.layers, BUDGET);
    let present: HashSet<&str> = g.nodes.iter().map(|n| n.path.as_str()).collect();
    let whole: Vec<&Vec<String>> = previous.iter().filter(|l| l.iter().all(|x| present.contains(x.as_str()))).collect();
    let mut rest = whole.iter();
    for l in &p.layers[..p.kept] {
        assert!(rest.any(|w| *w == l), "kept layer {l:?} is not a previous layer in order");
    }
    if p.kept < whole.len() {
        assert!(p.notes.iter().any(|n| n.contains("let go of")), "whole previous layers dropped silently");
    }
    let size = g.nar_sizes();
    let c = compare(&p.layers, previous, &size);
    assert!(c.pushed >= c.changed, "pushed {} under the floor {}", c.pushed, c.changed);
    assert!(c.layers.iter().take_while(|l| l.reused).count() >= p.kept, "a kept layer counted as pushed");
}

/// Plans the first release alone, then every next one on the previous
/// plan, checking each; returns the plans.
fn scenario(releases: &[&[(&str, &str)]]) -> Vec<stable::Planned> {
    let none = HashSet::new();
    let graphs: Vec<ClosureGraph> = releases.iter().map(|a| release("app", a).1).collect();
    let first = stable::plan(&graphs[0], &none, BUDGET, None).unwrap();
    check_plan(&graphs[0], &first.layers, BUDGET);
    let mut plans = vec![first];
    for g in &graphs[1..] {
        let prev = plans.last().unwrap().layers.clone();
        let p = stable::plan(g, &none, BUDGET, Some(&prev)).unwrap();
        check_on_previous(g, &p, &prev);
        plans.push(p);
    }
    plans
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn scenario_1_the_app_alone_changes() {
    let plans = scenario(&[&[], &[("app", "2")]]);
    // Only the app's own layer can have changed.
    assert_eq!(plans[1].kept, plans[0].layers.len() - 1, "{:?}", plans[1]);
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn scenario_2_a_private_dependency_changes() {
    scenario(&[&[], &[("priv", "2")]]);
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn scenario_3_the_bottom_library_changes() {
    let plans = scenario(&[&[], &[("lib", "2")]]);
    assert_eq!(plans[1].kept, 0, "every path changed");
    assert!(plans[1].notes.iter().any(|n| n.contains("none of the")), "{:?}", plans[1].notes);
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn scenario_4_a_dependency_is_added() {
    scenario(&[&[], &[("extra", "true")]]);
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn scenario_5_ten_releases() {
    scenario(&[
        &[],
        &[("app", "2")],
        &[("app", "3"), ("priv", "2")],
        &[("app", "4"), ("priv", "2")],
        &[("app", "4"), ("priv", "2"), ("extra", "true")],
        &[("app", "5"), ("priv", "2"), ("extra", "true")],
        &[("app", "5"), ("priv", "2"), ("extra", "true"), ("lib", "2")],
        &[("app", "6"), ("priv", "2"), ("extra", "true"), ("lib", "2")],
        &[("app", "6"), ("priv", "3"), ("extra", "true"), ("lib", "2")],
        &[("app", "7"), ("priv", "3"), ("extra", "true"), ("lib", "2")],
    ]);
}

/// The service shape (twenty private dependencies, priv-0 used by the
/// application alone): a changed priv-0 sends exactly its layer and the
/// application's again, a changed application its layer alone.
#[test]
#[ignore = "needs nix: run scripts/test"]
fn a_service_with_a_tree_of_private_dependencies() {
    let service = [("privCount", "20")];
    let plans = scenario(&[&service, &[("priv", "2"), service[0]], &[("priv", "2"), ("app", "2"), service[0]]]);
    // Release 2: the dependency's layer and the application's; release 3:
    // the application's alone.  The application is alone on top.
    for (i, want) in [(1, 2), (2, 1)] {
        let p = &plans[i];
        assert_eq!(p.layers.len() - p.kept, want, "release {}: {p:?}", i + 1);
        let top = p.layers.last().unwrap();
        assert!(top.len() == 1 && top[0].ends_with("-app"), "release {}: top {top:?}", i + 1);
    }
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn joint_layers_are_identical_across_images() {
    let (a, ga) = release("app", &[]);
    let (b, gb) = release("other", &[]);
    let out = run(bin().args(["layers", "--joint", "--max-layers", &MAX_LAYERS.to_string(), &a, &b]));
    let plans: Vec<Vec<Vec<String>>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plans.len(), 2);
    check_plan(&ga, &plans[0], BUDGET);
    check_plan(&gb, &plans[1], BUDGET);
    let in_b: HashSet<&str> = gb.nodes.iter().map(|n| n.path.as_str()).collect();
    let shared: HashSet<&str> = ga.nodes.iter().map(|n| n.path.as_str()).filter(|p| in_b.contains(p)).collect();
    let bottom = plans[0].iter().zip(&plans[1]).take_while(|(x, y)| x == y).count();
    let in_bottom: HashSet<&str> = plans[0][..bottom].iter().flatten().map(String::as_str).collect();
    assert_eq!(in_bottom, shared, "the shared paths are exactly the identical bottom layers");
}

/// `image A --joint-with B` and `image B --joint-with A` build the two
/// images of `layers A B --joint`: their shared bottom layers are the very
/// same layers (same diff_ids), as many as the joint plans share.
#[test]
#[ignore = "needs nix: run scripts/test"]
fn image_joint_with_builds_identical_shared_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = release("app", &[]);
    let (b, _) = release("other", &[]);
    let max = MAX_LAYERS.to_string();
    let out = run(bin().args(["layers", "--joint", "--max-layers", &max, &a, &b]));
    let plans: Vec<Vec<Vec<String>>> = serde_json::from_slice(&out.stdout).unwrap();
    let shared = plans[0].iter().zip(&plans[1]).take_while(|(x, y)| x == y).count();
    assert!(shared > 0);
    let mut diff_ids = Vec::new();
    for (this, other) in [(&a, &b), (&b, &a)] {
        let file = tmp.path().join(format!("{}.tar", diff_ids.len()));
        run(bin()
            .args(["image", "-q", "--max-layers", &max, this, "--joint-with", other])
            .stdout(std::fs::File::create(&file).unwrap()));
        let archive = common::validate(&std::fs::read(&file).unwrap());
        diff_ids.push(archive.config["rootfs"]["diff_ids"].as_array().unwrap().clone());
    }
    // Store layers, then the customisation layer.
    assert_eq!(diff_ids[0].len(), plans[0].len() + 1);
    assert_eq!(diff_ids[1].len(), plans[1].len() + 1);
    let same = diff_ids[0].iter().zip(&diff_ids[1]).take_while(|(x, y)| x == y).count();
    assert_eq!(same, shared, "the shared layers are byte-identical, and only those");
}

/// Two services released together, release after release: the next joint
/// plan builds on the last (a JSON list of plans, or each image's previous
/// image in any order). The unchanged service keeps its plan, the shared
/// layers stay identical at the bottom of both, and `image --joint-with`
/// builds the same layers.
#[test]
#[ignore = "needs nix: run scripts/test"]
fn joint_plans_build_on_the_previous_release() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = release("app", &[]);
    let (b, gb) = release("other", &[]);
    let (a2, ga2) = release("app", &[("app", "2"), ("extra", "true")]);
    let max = MAX_LAYERS.to_string();
    let out = run(bin().args(["layers", "--joint", "--max-layers", &max, &a, &b]));
    let first: Vec<Vec<Vec<String>>> = serde_json::from_slice(&out.stdout).unwrap();
    let plans_file = tmp.path().join("plans.json");
    std::fs::write(&plans_file, &out.stdout).unwrap();
    let joint_next = |previous: &[&Path]| -> Vec<Vec<Vec<String>>> {
        let mut c = bin();
        c.args(["layers", "--joint", "--max-layers", &max, &a2, &b]);
        for p in previous {
            c.arg("--previous").arg(p);
        }
        serde_json::from_slice(&run(&mut c).stdout).unwrap()
    };
    let next = joint_next(&[&plans_file]);
    check_plan(&ga2, &next[0], BUDGET);
    check_plan(&gb, &next[1], BUDGET);
    assert_eq!(next[1], first[1], "the unchanged service keeps its plan");
    let shared = first[0].iter().zip(&first[1]).take_while(|(x, y)| x == y).count();
    assert!(shared > 0);
    assert_eq!(next[0][..shared], first[0][..shared], "the shared layers stay, at the bottom of both");
    assert_eq!(next[1][..shared], first[0][..shared]);
    // The changed service keeps every previous layer still whole (a plan
    // made afresh may keep fewer).
    let kept = |plan: &[Vec<String>]| plan.iter().filter(|l| first[0].contains(l)).count();
    let fresh = joint_next(&[]);
    let paths: HashSet<&str> = ga2.nodes.iter().map(|n| n.path.as_str()).collect();
    let whole = first[0].iter().filter(|l| l.iter().all(|p| paths.contains(p.as_str()))).count();
    assert!(whole > 0 && whole < first[0].len(), "the release changed some layers, not all");
    assert_eq!(kept(&next[0]), whole, "{} afresh", kept(&fresh[0]));
    assert!(kept(&next[0]) >= kept(&fresh[0]));
    // Each image's previous plan given apart, in the other order: the same.
    let (pa, pb) = (tmp.path().join("a.json"), tmp.path().join("b.json"));
    std::fs::write(&pa, serde_json::to_vec(&first[0]).unwrap()).unwrap();
    std::fs::write(&pb, serde_json::to_vec(&first[1]).unwrap()).unwrap();
    assert_eq!(joint_next(&[&pb, &pa]), next);
    // `image --joint-with` builds the first plan of the two; from images.
    let old_b = tmp.path().join("b.tar");
    run(bin()
        .args(["image", "-q", "--max-layers", &max, &b, "--joint-with", &a])
        .stdout(std::fs::File::create(&old_b).unwrap()));
    let built = run(bin()
        .args(["image", "-q", "--max-layers", &max, &a2, "--joint-with", &b, "--previous"])
        .arg(&old_b)
        .arg("--previous")
        .arg(&pa));
    let archive = common::validate(&built.stdout);
    let diff_ids = archive.config["rootfs"]["diff_ids"].as_array().unwrap().len();
    assert_eq!(diff_ids, next[0].len() + 1, "the store layers of the joint plan, and the customisation layer");
    // `plan --joint --previous`: each image against its previous plan.
    let out =
        run(bin().args(["plan", "--joint", "--json", "--max-layers", &max, &a2, &b, "--previous"]).arg(&plans_file));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[1]["pushed"], 0, "nothing of the unchanged service goes up again: {}", v[1]);
    assert!(v[0]["pushed"].as_u64().unwrap() > 0);
    assert_eq!(v[0]["shared"], shared);
    assert_eq!(v[1]["kept"], first[1].len(), "{}", v[1]);
    assert_eq!(
        (v[0]["previous_layers"].clone(), v[1]["previous_layers"].clone()),
        (first[0].len().into(), first[1].len().into())
    );
    assert!(v[0]["kept"].as_u64().unwrap() >= shared as u64, "{}", v[0]);
    // One image builds on one previous plan.
    let err = one_line_error(bin().args(["layers", "--max-layers", &max, &a2, "--previous"]).arg(&plans_file));
    assert!(err.contains("--previous names 2 plans"), "{err}");
}

/// Weekly releases into one OCI layout (and a docker-archive of two
/// images): which image is the previous one must be said, as `PATH:NAME`;
/// without it the planner refuses rather than read the first.
#[test]
#[ignore = "needs nix: run scripts/test"]
fn previous_names_one_image_of_several() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, _) = release("app", &[]);
    let (two, _) = release("app", &[("app", "2"), ("extra", "true")]);
    let (three, _) = release("app", &[("app", "3"), ("extra", "true")]);
    let max = MAX_LAYERS.to_string();
    let layout = tmp.path().join("rel");
    run(bin().args(["image", "-q", "--max-layers", &max, &one, "-t", "app:1", "--oci-layout"]).arg(&layout));
    run(bin().args(["image", "-q", "--max-layers", &max, &two, "-t", "app:2", "--oci-layout"]).arg(&layout));
    let plan_of = |previous: &str| -> Vec<Vec<String>> {
        serde_json::from_slice(
            &run(bin().args(["layers", "--max-layers", &max, &three, "--previous", previous])).stdout,
        )
        .unwrap()
    };
    let msg = one_line_error(bin().args(["layers", "--max-layers", &max, &three, "--previous"]).arg(&layout));
    assert!(msg.contains("it holds 2 images (app:1, app:2): name the previous one as"), "{msg}");
    let json = tmp.path().join("two.json");
    // app:2 was planned afresh: its plan, as `layers` prints it.
    std::fs::write(&json, run(bin().args(["layers", "--max-layers", &max, &two])).stdout).unwrap();
    let by_name = plan_of(&format!("{}:app:2", layout.display()));
    assert_eq!(by_name, plan_of(json.to_str().unwrap()), "app:2 of the layout is the plan app:2 was built with");
    assert_eq!(plan_of(&format!("{}:2", layout.display())), by_name, "the tag alone names it too");
    assert_ne!(plan_of(&format!("{}:app:1", layout.display())), by_name);
    let err = one_line_error(bin().args(["layers", &three, "--previous"]).arg(format!("{}:app:9", layout.display())));
    assert!(err.contains("it has no image named \"app:9\""), "{err}");
}

/// `image` writes the history the next release reads back, from a
/// docker-archive, from the oci-archive skopeo makes of it, and from an OCI
/// layout.
#[test]
#[ignore = "needs nix and skopeo: run scripts/test"]
fn previous_image_history_is_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, g_old) = release("app", &[]);
    let (new, g_new) = release("app", &[("app", "2")]);
    let max = MAX_LAYERS.to_string();
    let archive = tmp.path().join("old.tar");
    run(bin()
        .args(["image", "-q", "--stable", "--max-layers", &max, &old])
        .stdout(std::fs::File::create(&archive).unwrap()));
    let old_plan = stable::plan(&g_old, &HashSet::new(), BUDGET, None).unwrap();
    let oci = tmp.path().join("old.oci.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", archive.display()))
        .arg(format!("oci-archive:{}:old:latest", oci.display())));
    let json_plan = tmp.path().join("old.json");
    std::fs::write(&json_plan, serde_json::to_vec(&old_plan.layers).unwrap()).unwrap();
    let layout = tmp.path().join("old-layout");
    run(bin().args(["image", "-q", "--stable", "--max-layers", &max, &old, "--oci-layout"]).arg(&layout));
    let mut got = Vec::new();
    // `-` last: the docker-archive on standard input, as `docker save` gives it.
    let stdin = PathBuf::from("-");
    for previous in [&json_plan, &archive, &oci, &layout, &stdin] {
        let mut cmd = bin();
        cmd.args(["plan", "--json", "--max-layers", &max, &new, "--previous"]).arg(previous);
        if previous == &stdin {
            cmd.stdin(std::fs::File::open(&archive).unwrap());
        }
        let out = run(&mut cmd);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["previous_layers"], old_plan.layers.len(), "{}: {v}", previous.display());
        assert_eq!(v["kept"], old_plan.layers.len() - 1, "{}: all but the app's layer", previous.display());
        let layers: Vec<Vec<String>> = v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_value(l["paths"].clone()).unwrap())
            .collect();
        check_plan(&g_new, &layers, BUDGET);
        got.push(layers);
    }
    assert!(got.windows(2).all(|w| w[0] == w[1]), "a JSON plan and the four images give the same plan");

    // The next image, built on the previous one: its kept layers are the
    // very same layers (same diff_ids, in the same places).
    let next = tmp.path().join("new.tar");
    run(bin()
        .args(["image", "-q", "--max-layers", &max, &new, "--previous"])
        .arg(&archive)
        .stdout(std::fs::File::create(&next).unwrap()));
    let diff_ids = |f: &Path| {
        let a = common::validate(&std::fs::read(f).unwrap());
        a.config["rootfs"]["diff_ids"].as_array().unwrap().clone()
    };
    let (before, after) = (diff_ids(&archive), diff_ids(&next));
    let kept = old_plan.layers.len() - 1;
    assert_eq!(before[..kept], after[..kept], "the kept layers are byte-identical");
    assert_ne!(before[kept], after[kept], "the app's layer changed");
}

fn graph_file(dir: &Path, store: &str) -> PathBuf {
    let node = |p: &str, r: &[&str], s: u64| serde_json::json!({"path": format!("{store}/{p}"), "references": r.iter().map(|x| format!("{store}/{x}")).collect::<Vec<_>>(), "narSize": s});
    let g = serde_json::json!({"graph": [node("aaa-app", &["bbb-lib"], 10), node("bbb-lib", &[], 100)]});
    let f = dir.join("graph.json");
    std::fs::write(&f, serde_json::to_vec(&g).unwrap()).unwrap();
    f
}

fn fails_with(args: &[&str], previous: &Path, graph: &Path) -> String {
    one_line_error(bin().args(args).arg(graph).arg("--previous").arg(previous))
}

/// Runs `cmd`, which must exit 1 with one line on stderr: that line.
fn one_line_error(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_plan_for_another_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let prev = tmp.path().join("prev.json");
    std::fs::write(&prev, r#"[["/gnu/store/bbb-lib"], ["/gnu/store/aaa-app"]]"#).unwrap();
    let err = fails_with(&["layers"], &prev, &graph);
    assert!(err.contains("names store paths under /gnu/store, but the closure is under /nix/store"), "{err}");
    assert!(err.contains(&prev.display().to_string()), "{err}");
}

#[test]
fn a_malformed_plan_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let prev = tmp.path().join("prev.json");
    for (text, want) in [
        (r#"[["/nix/store/bbb-lib"], "/nix/store/aaa-app"]"#, "layer 2: expected a list of store paths"),
        (r#"[["/nix/store/bbb-lib"], ["/nix/store/bbb-lib"]]"#, "layer 2: /nix/store/bbb-lib is already in layer 1"),
        ("[[\"/nix/store/bbb-lib\"", "not valid JSON"),
    ] {
        std::fs::write(&prev, text).unwrap();
        let err = fails_with(&["plan"], &prev, &graph);
        assert!(err.contains(want) && err.contains("prev.json"), "{text}: {err}");
    }
    std::fs::write(&prev, b"\x00\x01 neither JSON nor tar").unwrap();
    let err = fails_with(&["plan"], &prev, &graph);
    assert!(err.contains("prev.json") && err.contains("image archive"), "{err}");
    // A directory that is no OCI layout, a file that is not there (with
    // the forms that are), and `layers` with a planner that would ignore it.
    let err = fails_with(&["plan"], tmp.path(), &graph);
    assert!(err.contains("without index.json"), "{err}");
    let err = fails_with(&["plan"], Path::new("old.tar"), &graph);
    assert!(err.contains("no such file") && err.contains("docker://"), "{err}");
    let err = fails_with(&["plan"], Path::new("oci-archive:old.tar"), &graph);
    assert!(err.contains("no such file: give the path without skopeo's oci-archive: prefix (old.tar)"), "{err}");
    std::fs::write(&prev, r#"[["/nix/store/bbb-lib"]]"#).unwrap();
    let err = fails_with(&["layers", "--auto-layer", "2"], &prev, &graph);
    assert!(err.contains("drop --auto-layer"), "{err}");
    // Standard input holds one thing: `-` twice, or with --password-stdin,
    // or a closure graph on it too.
    let err = fails_with(&["plan", "--previous=-:app"], Path::new("-"), &graph);
    assert!(err.contains("--previous - is given 2 times"), "{err}");
    let err = fails_with(&["plan", "--creds", "u", "--password-stdin"], Path::new("-"), &graph);
    assert!(err.contains("--previous - and --password-stdin both read standard input"), "{err}");
    let err = one_line_error(bin().args(["layers", "-", "--previous", "-"]));
    assert!(err.contains("a closure graph - and --previous - both read standard input"), "{err}");
    let push = ["image", "-", "--creds", "u", "--password-stdin", "--push", "docker://127.0.0.1:1/a:1"];
    let err = one_line_error(bin().args(push));
    assert!(err.contains("a closure graph - and --password-stdin both read"), "{err}");
}

/// `-` is a closure graph on standard input (`nix path-info --json
/// --recursive ... | nixstream layers -`).
#[test]
fn a_closure_graph_on_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let from_file = run(bin().arg("layers").arg(&graph));
    let from_stdin = run(bin().args(["layers", "-"]).stdin(std::fs::File::open(&graph).unwrap()));
    assert_eq!(from_stdin.stdout, from_file.stdout);
}

#[test]
#[ignore = "needs nix: run scripts/test"]
fn a_directory_outside_the_store_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = one_line_error(bin().arg("layers").arg(tmp.path()));
    assert!(err.contains(&format!("{} is not in the Nix store", tmp.path().display())), "{err}");
}

#[test]
fn the_same_previous_plan_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let other = tmp.path().join("other.json");
    let svc = serde_json::json!({"graph": [
        {"path": "/nix/store/ccc-svc", "references": ["/nix/store/bbb-lib"], "narSize": 10},
        {"path": "/nix/store/bbb-lib", "references": [], "narSize": 100}]});
    std::fs::write(&other, serde_json::to_vec(&svc).unwrap()).unwrap();
    let prev = tmp.path().join("prev.json");
    std::fs::write(&prev, r#"[["/nix/store/bbb-lib"], ["/nix/store/aaa-app"]]"#).unwrap();
    let err = one_line_error(bin().args(["layers", "--joint", "--max-layers", "2"]).arg(&graph).arg(&other));
    assert!(
        err.contains("--max-layers leaves 1 layer for the store paths") && err.contains("raise --max-layers by 1"),
        "{err}"
    );
    let twice = [&graph, &other, Path::new("--previous"), &prev, Path::new("--previous"), &prev];
    let err = one_line_error(bin().args(["plan", "--joint"]).args(twice));
    assert!(err.contains("prev.json are the same plan"), "{err}");
}

#[test]
fn an_image_planned_jointly_with_itself_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let copy = tmp.path().join("copy.json");
    std::fs::copy(&graph, &copy).unwrap();
    for cmd in ["layers", "plan"] {
        let err = one_line_error(bin().args([cmd, "--joint"]).arg(&graph).arg(&copy));
        assert!(err.contains("copy.json are the same closure"), "{err}");
    }
}

/// An image from another tool (no `store paths:` history): a clear
/// statement, and the plan made afresh.
#[test]
fn an_image_without_store_path_history_reuses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let config = br#"{"history": [{"created_by": "/bin/sh -c #(nop) ADD file:abc in /"}, {"created_by": "CMD", "empty_layer": true}], "rootfs": {"type": "layers", "diff_ids": []}}"#;
    let manifest = br#"[{"Config": "c.json", "RepoTags": ["x:y"], "Layers": ["l/layer.tar"]}]"#;
    let prev = tmp.path().join("other-tool.tar");
    std::fs::write(&prev, tar_of(&[("c.json", config), ("l/layer.tar", &[0u8; 1024]), ("manifest.json", manifest)]))
        .unwrap();
    let out = bin().args(["layers"]).arg(&graph).arg("--previous").arg(&prev).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("nothing can be reused, planning afresh") && err.contains("other-tool.tar"), "{err}");
    let fresh = run(bin().args(["layers", "--stable"]).arg(&graph));
    assert_eq!(out.stdout, fresh.stdout);
}

/// An oci-archive (index.json → manifest → config) built by hand: its
/// store layers are kept.
#[test]
fn an_oci_archive_history_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let config = br#"{"history": [{"comment": "store paths: ['/nix/store/bbb-lib']"}, {"comment": "store paths: ['/nix/store/gone-app']"}, {"comment": "store paths: ['/tmp/cust']"}]}"#;
    let cdigest = common::sha256_hex(config);
    let manifest = format!(r#"{{"schemaVersion": 2, "config": {{"digest": "sha256:{cdigest}"}}, "layers": []}}"#);
    let mdigest = common::sha256_hex(manifest.as_bytes());
    let index = format!(r#"{{"schemaVersion": 2, "manifests": [{{"digest": "sha256:{mdigest}"}}]}}"#);
    let prev = tmp.path().join("old.oci");
    std::fs::write(
        &prev,
        tar_of(&[
            ("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#),
            (&format!("blobs/sha256/{cdigest}"), config),
            (&format!("blobs/sha256/{mdigest}"), manifest.as_bytes()),
            ("index.json", index.as_bytes()),
        ]),
    )
    .unwrap();
    let out = run(bin().args(["plan", "--json"]).arg(&graph).arg("--previous").arg(&prev));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kept"], 1, "{v}");
    assert_eq!(v["previous_layers"], 3, "{v}");
    assert_eq!(v["layers"][0]["paths"], serde_json::json!(["/nix/store/bbb-lib"]));
    assert_eq!(v["layers"][0]["reused"], true);
    assert_eq!(v["changed"], 10, "the app is new: {v}");
    assert_eq!(v["pushed"], 10, "{v}");
}

#[test]
fn plan_previous_draws_a_bar_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let graph = graph_file(tmp.path(), "/nix/store");
    let prev = tmp.path().join("prev.json");
    std::fs::write(&prev, r#"[["/nix/store/bbb-lib"], ["/nix/store/old-app"]]"#).unwrap();
    let out = run(bin().args(["plan"]).arg(&graph).arg("--previous").arg(&prev));
    let text = String::from_utf8(out.stdout).unwrap();
    let lib = text.lines().find(|l| l.contains("lib")).unwrap();
    let app = text.lines().find(|l| l.contains(" app")).unwrap();
    assert!(lib.contains("reused") && lib.contains('░') && !lib.contains('█'), "{text}");
    assert!(app.contains("new") && app.contains('█') && app.contains('↓'), "{text}");
    assert!(text.contains("pushed ÷ changed 1.00"), "{text}");
}
