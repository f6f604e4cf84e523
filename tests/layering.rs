//! nixpkgs' layer planners, case by case: every golden request in
//! ../shared/golden/layering must give the identical list of lists.

mod common;

use std::collections::HashSet;
use std::path::Path;

use nixstream::input::closure::ClosureGraph;
use nixstream::planner::autolayer::auto_layer;
use nixstream::planner::pipeline::{parse, plan_layers};

fn run_corpus(corpus: &str) {
    let dir = common::golden_dir().join("layering").join(corpus);
    let graph = ClosureGraph::load(&dir.join("graph.json")).unwrap();
    let mut cases = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "graph.json" {
            continue;
        }
        cases += 1;
        let case: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let expected: Vec<Vec<String>> = serde_json::from_value(case["expected_layers"].clone()).unwrap();
        let got = plan(&graph, &case["request"], &path);
        if got != expected {
            failures.push(format!("{}: got {} layers, expected {}", path.display(), got.len(), expected.len()));
        }
    }
    assert!(cases >= 13, "{corpus}: only {cases} cases found");
    assert!(failures.is_empty(), "{corpus}:\n{}", failures.join("\n"));
}

fn strings(v: &serde_json::Value) -> HashSet<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn plan(graph: &ClosureGraph, request: &serde_json::Value, case: &Path) -> Vec<Vec<String>> {
    if let Some(auto) = request.get("auto_layer") {
        let limit = auto["layer_limit"].as_u64().unwrap() as usize;
        return auto_layer(graph, &strings(&auto["ignore_paths"]), limit);
    }
    let steps = parse(&request["pipeline"]).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    plan_layers(graph, &steps, &strings(&request["exclude_paths"])).unwrap()
}

#[test]
fn golden_layering_medium() {
    run_corpus("medium");
}

#[test]
fn golden_layering_smallfiles() {
    run_corpus("smallfiles");
}

#[test]
fn layers_command_prints_the_golden_plan() {
    let dir = common::golden_dir().join("layering/medium");
    let case: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("split-two.json")).unwrap()).unwrap();
    let pipeline = serde_json::to_string(&case["request"]["pipeline"]).unwrap();
    let out = common::bin().arg("layers").arg(dir.join("graph.json")).args(["--pipeline", &pipeline]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, case["expected_layers"]);

    let out = common::bin()
        .arg("layers")
        .arg(dir.join("graph.json"))
        .args(["--pipeline", "[[\"limit_layers\", -1]]"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pipeline[0] (\"limit_layers\"): argument 1: expected a whole number above 0"), "{err}");
}
