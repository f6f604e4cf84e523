//! The layer planners measured across releases (scripts/bench-layers builds
//! the inputs).  Usage: bench_layers DIR [MAX_LAYERS]
//!
//! Every subdirectory of DIR but `joint` is a scenario: closure graphs
//! `01.json`, `02.json`, ... of successive releases.  For each planner the
//! first release is planned alone, then each next release is planned (the
//! stable planner with `--previous` building on its own previous plan) and
//! compared with the previous release's plan: bytes pushed, bytes that
//! really changed (narSize of paths new to the closure), bytes a Docker host
//! holding the previous image pulls, and the most layers used.  `joint`
//! holds two images' graphs sharing a runtime: the share of their common
//! closure's bytes that lands in identical layers of both.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nixstream::input::closure::ClosureGraph;
use nixstream::planner::autolayer::auto_layer;
use nixstream::planner::compare::compare;
use nixstream::planner::pipeline::{parse, plan_layers};
use nixstream::planner::stable;

#[derive(Clone, Copy, PartialEq)]
enum Planner {
    AutoLayer,
    Popularity,
    Stable,
    StablePrevious,
}

impl Planner {
    fn name(self) -> &'static str {
        match self {
            Planner::AutoLayer => "auto-layer",
            Planner::Popularity => "popularity",
            Planner::Stable => "stable",
            Planner::StablePrevious => "stable --previous",
        }
    }

    fn plan(self, g: &ClosureGraph, budget: usize, previous: Option<&[Vec<String>]>) -> Vec<Vec<String>> {
        let none = HashSet::new();
        match self {
            Planner::AutoLayer => auto_layer(g, &none, budget),
            Planner::Popularity => {
                let steps = parse(&serde_json::json!([["popularity_contest"], ["limit_layers", budget]])).unwrap();
                plan_layers(g, &steps, &none).unwrap()
            }
            Planner::Stable => stable::plan(g, &none, budget, None).unwrap().layers,
            Planner::StablePrevious => stable::plan(g, &none, budget, previous).unwrap().layers,
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 20) as f64)
}

fn graphs(dir: &Path) -> Vec<ClosureGraph> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.iter().map(|f| ClosureGraph::load(f).unwrap_or_else(|e| panic!("{e}"))).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: bench_layers DIR [MAX_LAYERS]");
    let max_layers: usize = args.next().map(|a| a.parse().expect("MAX_LAYERS")).unwrap_or(100);
    let budget = max_layers - 1;
    let mut scenarios: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    scenarios.sort();
    println!("budget: {budget} store layers (--max-layers {max_layers}); sizes in MiB of narSize");
    println!(
        "| scenario | paths | planner | pushed | changed | pushed ÷ changed | pulled | layers |\n|---|---:|---|---:|---:|---:|---:|---:|"
    );
    let mut totals: HashMap<(String, &str), u64> = HashMap::new();
    for s in scenarios.iter().filter(|s| s.file_name().unwrap() != "joint") {
        let name = s.file_name().unwrap().to_string_lossy().to_string();
        let releases = graphs(s);
        let paths = releases.iter().map(|g| g.nodes.len()).max().unwrap_or(0);
        for planner in [Planner::AutoLayer, Planner::Popularity, Planner::Stable, Planner::StablePrevious] {
            let mut prev = planner.plan(&releases[0], budget, None);
            let (mut pushed, mut changed, mut pulled, mut layers) = (0, 0, 0, prev.len());
            for g in &releases[1..] {
                let new = planner.plan(g, budget, Some(&prev));
                let size = g.nar_sizes();
                let c = compare(&new, &prev, &size);
                pushed += c.pushed;
                changed += c.changed;
                pulled += c.pulled;
                layers = layers.max(new.len());
                prev = new;
            }
            if name.contains("sequence") {
                totals.insert((name.clone(), planner.name()), pushed);
            }
            println!(
                "| {name} | {paths} | {} | {} | {} | {:.2} | {} | {layers} |",
                planner.name(),
                mib(pushed),
                mib(changed),
                pushed as f64 / changed.max(1) as f64,
                mib(pulled),
            );
        }
    }
    let mut sequences: Vec<&String> = totals.keys().map(|(s, _)| s).collect();
    sequences.sort();
    sequences.dedup();
    for s in sequences {
        let get = |p: &'static str| totals[&(s.clone(), p)] as f64;
        println!(
            "\n{s}: stable --previous pushes {:.2} of what auto-layer pushes (stable alone: {:.2})",
            get("stable --previous") / get("auto-layer"),
            get("stable") / get("auto-layer")
        );
    }
    let joint = Path::new(&dir).join("joint");
    if joint.is_dir() {
        let gs = graphs(&joint);
        let common: HashSet<&str> = gs[0]
            .nodes
            .iter()
            .map(|n| n.path.as_str())
            .filter(|p| gs[1..].iter().all(|g| g.nodes.iter().any(|n| n.path == *p)))
            .collect();
        let size: HashMap<&str, u64> = gs[0].nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
        let common_bytes: u64 = common.iter().map(|p| size[p]).sum();
        let shared_share = |plans: &[Vec<Vec<String>>]| {
            let in_all: Vec<&Vec<String>> =
                plans[0].iter().filter(|l| plans[1..].iter().all(|p| p.contains(l))).collect();
            let b: u64 = in_all.iter().copied().flatten().map(|p| size[p.as_str()]).sum();
            b as f64 / common_bytes.max(1) as f64
        };
        let auto: Vec<_> = gs.iter().map(|g| auto_layer(g, &HashSet::new(), budget)).collect();
        let alone: Vec<_> = gs.iter().map(|g| stable::plan(g, &HashSet::new(), budget, None).unwrap().layers).collect();
        let joint: Vec<_> =
            stable::plan_joint(&gs, &HashSet::new(), budget, None).unwrap().into_iter().map(|p| p.layers).collect();
        println!(
            "\njoint: {} images, common closure {} paths, {} MiB; share of its bytes in identical layers of every image:",
            gs.len(),
            common.len(),
            mib(common_bytes)
        );
        println!("| planner | shared | layers |\n|---|---:|---:|");
        for (name, plans) in
            [("auto-layer, each alone", &auto), ("stable, each alone", &alone), ("stable --joint", &joint)]
        {
            let most = plans.iter().map(Vec::len).max().unwrap_or(0);
            println!("| {name} | {:.1}% | {most} |", 100.0 * shared_share(plans));
        }
    }
}
