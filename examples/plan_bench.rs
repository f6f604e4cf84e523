//! Times layer planning on a synthetic closure (default 20,000 store paths):
//! a deterministic DAG shaped like a real one (a few hub libraries used by
//! almost everything, most paths using a handful of lower paths), plus a
//! reference cycle like Debian's libc6 <-> libgcc-s1.  Prints the time of
//! each planner.  Usage: plan_bench [PATHS]

use std::collections::HashSet;
use std::time::Instant;

use nixstream::input::closure::{ClosureGraph, Node};
use nixstream::planner::autolayer::auto_layer;
use nixstream::planner::pipeline::{parse, plan_layers};
use nixstream::planner::stable;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rand = move |m: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m as u64) as usize
    };
    let path = |i: usize| format!("/nix/store/{:032x}-pkg-{i}", (i as u128).wrapping_mul(0x9e3779b97f4a7c15));
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| {
            let mut refs = vec![path(i)];
            if i > 0 {
                refs.push(path(0)); // the libc of this closure
            }
            if i > 10 {
                for _ in 0..1 + rand(6) {
                    // mostly recent paths, sometimes a hub
                    let j = if rand(4) == 0 { rand(10) } else { i - 1 - rand(i.min(200)) };
                    refs.push(path(j));
                }
            }
            refs.sort();
            refs.dedup();
            Node {
                path: path(i),
                references: refs,
                nar_size: 1000 + (rand(1 << 20) as u64) * (1 + rand(8) as u64),
                closure_size: None,
                nar_hash: None,
            }
        })
        .collect();
    nodes[0].references.push(path(1)); // libc6 <-> libgcc-s1
    nodes.sort_by(|a, b| a.path.cmp(&b.path));
    let g = ClosureGraph { nodes };
    let edges: usize = g.nodes.iter().map(|x| x.references.len()).sum();
    println!("synthetic closure: {n} paths, {edges} references");
    for (name, pipeline) in [
        ("popularity_contest + limit_layers 99", r#"[["popularity_contest"], ["limit_layers", 99]]"#),
        (
            "split_paths + popularity",
            r#"[["split_paths", ["/nix/store/0000000000000000000000000000000a-pkg-10"]], ["over", "rest", ["pipe", [["popularity_contest"], ["limit_layers", 50]]]]]"#,
        ),
    ] {
        let steps = parse(&serde_json::from_str(pipeline).unwrap()).unwrap();
        let t = Instant::now();
        let layers = plan_layers(&g, &steps, &HashSet::new()).unwrap();
        println!("{name:<40} {:>8.3} s  {} layers", t.elapsed().as_secs_f64(), layers.len());
    }
    for limit in [99, 1000] {
        let t = Instant::now();
        let layers = auto_layer(&g, &HashSet::new(), limit);
        println!(
            "{:<40} {:>8.3} s  {} layers",
            format!("auto-layer, limit {limit}"),
            t.elapsed().as_secs_f64(),
            layers.len()
        );
    }
    let (t, c) = (Instant::now(), cpu_seconds());
    let fresh = stable::plan(&g, &HashSet::new(), 99, None).unwrap();
    println!(
        "{:<40} {:>8.3} s  {} layers ({:.3} s of CPU time)",
        "stable, 99 layers",
        t.elapsed().as_secs_f64(),
        fresh.layers.len(),
        cpu_seconds() - c
    );
    // A previous release of 100 layers, a third of which lost a path
    // since (they are planned again, with the paths new to the closure).
    let mut previous = fresh.layers.clone();
    previous.push(vec![path(n + 1)]);
    for (i, l) in previous.iter_mut().enumerate() {
        if i % 3 == 0 {
            l.push(format!("/nix/store/{:032}-gone-{i}", 0));
        }
    }
    let (t, c) = (Instant::now(), cpu_seconds());
    let again = stable::plan(&g, &HashSet::new(), 99, Some(&previous)).unwrap();
    println!(
        "{:<40} {:>8.3} s  {} layers, {} kept ({:.3} s of CPU time)",
        format!("stable, {}-layer previous", previous.len()),
        t.elapsed().as_secs_f64(),
        again.layers.len(),
        again.kept,
        cpu_seconds() - c
    );
}

/// This process's CPU time: on a busy machine, what the planner itself took.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
