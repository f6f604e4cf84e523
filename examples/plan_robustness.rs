//! What a small random change of a closure costs each planner: auto-layer
//! and the stable planner planning the changed closure afresh, and the
//! stable planner building on its plan of the original (`--previous`).
//! Trials cycle through three kinds of change of one release's closure
//! graph: a path added (1 to 3 random references, 5 kB to 1.3 MB, the root
//! using it), a random path changed (it and every path using it rebuilt),
//! and a path only the root uses removed.  Prints, per planner and kind,
//! the bytes pushed, really changed and pulled, summed over the trials.
//! Usage: plan_robustness GRAPH [MAX_LAYERS [TRIALS]]

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nixstream::input::closure::{ClosureGraph, Node};
use nixstream::planner::autolayer::auto_layer;
use nixstream::planner::compare::compare;
use nixstream::planner::stable;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn renamed(path: &str, salt: u64) -> String {
    let (dir, base) = path.rsplit_once('/').unwrap();
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    format!("{dir}/{:032x}-{name}", (xxhash_rust::xxh3::xxh3_64(format!("{base}{salt}").as_bytes()) as u128) << 8)
}

/// Renames `changed` paths and every path that uses one of them.
fn rebuild(g: &ClosureGraph, changed: &HashSet<String>, salt: u64) -> ClosureGraph {
    let mut users: HashMap<&str, Vec<&str>> = HashMap::new();
    for n in &g.nodes {
        for r in &n.references {
            if r != &n.path {
                users.entry(r.as_str()).or_default().push(&n.path);
            }
        }
    }
    let mut dirty: HashSet<String> = HashSet::new();
    let mut stack: Vec<String> = changed.iter().cloned().collect();
    while let Some(p) = stack.pop() {
        if dirty.insert(p.clone()) {
            for u in users.get(p.as_str()).into_iter().flatten() {
                stack.push(u.to_string());
            }
        }
    }
    let name = |p: &String| if dirty.contains(p) { renamed(p, salt) } else { p.clone() };
    ClosureGraph {
        nodes: g
            .nodes
            .iter()
            .map(|n| Node {
                path: name(&n.path),
                references: n.references.iter().map(name).collect(),
                nar_size: n.nar_size,
                closure_size: None,
                nar_hash: None,
            })
            .collect(),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: plan_robustness GRAPH [MAX_LAYERS [TRIALS]]");
    let max_layers = args.next().map(|a| a.parse::<usize>().expect("MAX_LAYERS")).unwrap_or(100);
    assert!(max_layers >= 2, "MAX_LAYERS must leave a store layer beside the customisation layer");
    let budget = max_layers - 1;
    let trials: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(100);
    let g = ClosureGraph::load(Path::new(&file)).unwrap();
    let used: HashSet<&str> =
        g.nodes.iter().flat_map(|n| n.references.iter().filter(move |r| **r != n.path)).map(String::as_str).collect();
    let root = g.nodes.iter().find(|n| !used.contains(n.path.as_str())).unwrap().path.clone();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let none = HashSet::new();
    let auto = |g: &ClosureGraph| auto_layer(g, &none, budget);
    let fresh = |g: &ClosureGraph| stable::plan(g, &none, budget, None).unwrap().layers;
    let (base_auto, base_stable) = (auto(&g), fresh(&g));
    let mut totals: HashMap<(&str, &str), (u64, u64, u64, usize)> = HashMap::new();
    for t in 0..trials {
        let kind = ["add", "change", "remove"][t % 3];
        let next = match kind {
            "add" => {
                let mut h = g.clone();
                let path = format!("/nix/store/{:032x}-added-{t}", t as u128 + 1);
                let mut refs = vec![];
                for _ in 0..1 + rng.below(3) {
                    let r = &g.nodes[rng.below(g.nodes.len())].path;
                    if *r != root && !refs.contains(r) {
                        refs.push(r.clone());
                    }
                }
                let size = 5_000u64 << rng.below(9);
                h.nodes.push(Node {
                    path: path.clone(),
                    references: refs,
                    nar_size: size,
                    closure_size: None,
                    nar_hash: None,
                });
                let ri = h.nodes.iter().position(|n| n.path == root).unwrap();
                h.nodes[ri].references.push(path);
                rebuild(&h, &HashSet::from([root.clone()]), t as u64)
            }
            "change" => {
                let p = loop {
                    let p = &g.nodes[rng.below(g.nodes.len())].path;
                    if *p != root {
                        break p.clone();
                    }
                };
                rebuild(&g, &HashSet::from([p]), t as u64)
            }
            _ => {
                let ri = g.nodes.iter().position(|n| n.path == root).unwrap();
                let only_root: Vec<&String> = g.nodes[ri]
                    .references
                    .iter()
                    .filter(|r| {
                        **r != root && g.nodes.iter().filter(|n| n.references.contains(r) && n.path != **r).count() == 1
                    })
                    .collect();
                let Some(victim) = only_root.get(rng.below(only_root.len().max(1))).map(|s| s.to_string()) else {
                    continue;
                };
                let mut h = g.clone();
                h.nodes.retain(|n| n.path != victim);
                let ri = h.nodes.iter().position(|n| n.path == root).unwrap();
                h.nodes[ri].references.retain(|r| *r != victim);
                rebuild(&h, &HashSet::from([root.clone()]), t as u64)
            }
        };
        let mut size = g.nar_sizes();
        size.extend(next.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)));
        let with_previous = stable::plan(&next, &none, budget, Some(&base_stable)).unwrap().layers;
        let results = [
            ("auto-layer", auto(&next), &base_auto),
            ("stable", fresh(&next), &base_stable),
            ("stable --previous", with_previous, &base_stable),
        ];
        for (name, new, old) in results {
            let c = compare(&new, old, &size);
            let e = totals.entry((name, kind)).or_default();
            e.0 += c.pushed;
            e.1 += c.changed;
            e.2 += c.pulled;
            e.3 += 1;
        }
    }
    let mut keys: Vec<_> = totals.keys().copied().collect();
    keys.sort();
    println!("{file}: {} paths, budget {budget}, {trials} trials (MiB summed)", g.nodes.len());
    for k in keys {
        let (pu, ch, pl, n) = totals[&k];
        let m = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "{:>17} {:>7} n={n:3} pushed {:9.2} changed {:8.2} ratio {:6.2} pulled {:9.2}",
            k.0,
            k.1,
            m(pu),
            m(ch),
            pu as f64 / ch.max(1) as f64,
            m(pl)
        );
    }
}
