//! The `layers` and `plan` commands: the planned layers as JSON (nixpkgs'
//! list of lists, or with sizes), or as a table of paths, bytes and largest
//! paths per layer; with `--previous`, each layer against the previous
//! release (reused or new, pulled or not) and what a release would push.

use std::collections::HashMap;
use std::io::{self, Write};

use super::args::{LayersArgs, PlanArgs};
use super::planning::{joint_plans, load_closure, plan_with};
use crate::input::closure::ClosureGraph;
use crate::planner::compare;

pub(super) fn layers(a: &LayersArgs) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if a.layering.joint {
        let plans: Vec<Vec<Vec<String>>> = joint_plans(&a.closure, &a.layering)?.into_iter().map(|(_, l)| l).collect();
        serde_json::to_writer_pretty(&mut out, &plans)?;
        writeln!(out)?;
        return Ok(());
    }
    let l = &a.layering;
    anyhow::ensure!(
        l.previous.is_none() || (l.auto_layer.is_none() && l.pipeline.is_none() && !l.popularity),
        "`layers --previous` plans with the stable planner, which builds on it: drop --auto-layer, --pipeline or --popularity (or compare with `nixstream plan`)"
    );
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    serde_json::to_writer_pretty(&mut out, &chosen.planned.layers)?;
    writeln!(out)?;
    Ok(())
}

pub(super) fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    if a.layering.joint {
        let plans = joint_plans(&a.closure, &a.layering)?;
        let mut out = io::stdout().lock();
        let shared = plans
            .iter()
            .map(|(_, l)| l)
            .skip(1)
            .map(|l| l.iter().zip(&plans[0].1).take_while(|(x, y)| x == y).count())
            .min()
            .unwrap_or(0);
        if a.json {
            let v: Vec<serde_json::Value> =
                plans.iter().map(|(g, l)| serde_json::json!({"layers": plan_json(g, l), "shared": shared})).collect();
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
            return Ok(());
        }
        for ((g, l), input) in plans.iter().zip(&a.closure.input) {
            writeln!(out, "{input}: the bottom {shared} layers are shared by all {} images", plans.len())?;
            plan_table(&mut out, g, l)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    let layers = &chosen.planned.layers;
    let mut out = io::stdout().lock();
    if let Some(prev) = &chosen.previous {
        let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
        let c = compare::compare(layers, &prev.layers, &size);
        if a.json {
            let v = serde_json::json!({
                "layers": plan_json(&closure, layers).into_iter().zip(&c.layers)
                    .map(|(mut v, lc)| { v["reused"] = lc.reused.into(); v["pulled"] = lc.pulled.into(); v })
                    .collect::<Vec<_>>(),
                "pushed": c.pushed, "pulled": c.pulled, "changed": c.changed, "total": c.total,
                "ratio": c.ratio(), "kept": chosen.planned.kept, "previous_layers": prev.layers.len(),
            });
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        } else {
            compare_table(&mut out, &closure, layers, &c)?;
        }
        return Ok(());
    }
    if a.json {
        serde_json::to_writer_pretty(&mut out, &plan_json(&closure, layers))?;
        writeln!(out)?;
        return Ok(());
    }
    plan_table(&mut out, &closure, layers)
}

fn plan_json(closure: &ClosureGraph, layers: &[Vec<String>]) -> Vec<serde_json::Value> {
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    layers.iter().enumerate().map(|(i, l)| serde_json::json!({"layer": i + 1, "paths": l, "bytes": bytes(l)})).collect()
}

/// A store path's name, without the store directory and hash.
fn short_name(p: &str) -> String {
    p.rsplit('/').next().and_then(|b| b.split_once('-')).map(|(_, n)| n.to_string()).unwrap_or_else(|| p.into())
}

/// The three largest paths of a layer, by name.
fn largest(size: &HashMap<&str, u64>, l: &[String]) -> String {
    let mut by_size: Vec<&String> = l.iter().collect();
    by_size.sort_by_key(|p| std::cmp::Reverse(size.get(p.as_str()).copied().unwrap_or(0)));
    let names: Vec<String> = by_size.iter().take(3).map(|p| short_name(p)).collect();
    let more = if l.len() > 3 { format!(" (+{} more)", l.len() - 3) } else { String::new() };
    format!("{}{more}", names.join(", "))
}

fn plan_table(out: &mut impl Write, closure: &ClosureGraph, layers: &[Vec<String>]) -> anyhow::Result<()> {
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    writeln!(out, "{:>5} {:>6} {:>10}  largest paths", "layer", "paths", "bytes")?;
    for (i, l) in layers.iter().enumerate() {
        writeln!(
            out,
            "{:>5} {:>6} {:>10}  {}",
            i + 1,
            l.len(),
            crate::output::progress::human(bytes(l)),
            largest(&size, l)
        )?;
    }
    let total: u64 = layers.iter().map(|l| bytes(l)).sum();
    let paths: usize = layers.iter().map(Vec::len).sum();
    writeln!(
        out,
        "{:>5} {:>6} {:>10}  {} layers",
        "total",
        paths,
        crate::output::progress::human(total),
        layers.len()
    )?;
    Ok(())
}

/// The new plan against the previous one: a row and a bar per layer (top
/// first, as a stack), then the totals.
fn compare_table(
    out: &mut impl Write,
    closure: &ClosureGraph,
    layers: &[Vec<String>],
    c: &compare::Comparison,
) -> anyhow::Result<()> {
    const WIDTH: u64 = 30;
    let size: HashMap<&str, u64> = closure.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect();
    let most = c.layers.iter().map(|l| l.bytes).max().unwrap_or(0).max(1);
    writeln!(
        out,
        "{:>5} {:>6} {:>10}  {:<6} {:<4} {:<w$}  largest paths",
        "layer",
        "paths",
        "bytes",
        "",
        "pull",
        "",
        w = WIDTH as usize
    )?;
    for (i, (l, lc)) in layers.iter().zip(&c.layers).enumerate().rev() {
        let n = (lc.bytes * WIDTH).div_ceil(most).max(1) as usize;
        let bar = if lc.reused { "░".repeat(n) } else { "█".repeat(n) };
        writeln!(
            out,
            "{:>5} {:>6} {:>10}  {:<6} {:<4} {bar}{:pad$}  {}",
            i + 1,
            l.len(),
            crate::output::progress::human(lc.bytes),
            if lc.reused { "reused" } else { "new" },
            if lc.pulled { "↓" } else { "" },
            "",
            largest(&size, l),
            pad = WIDTH as usize - n,
        )?;
    }
    let reused = c.layers.iter().filter(|l| l.reused).count();
    writeln!(
        out,
        "{reused} of {} layers reused (░ reused, █ new; ↓ pulled by a host holding the previous image)",
        c.layers.len()
    )?;
    let new = c.layers.len() - reused;
    writeln!(
        out,
        "pushed            {:>10}  ({new} new layer{})",
        crate::output::progress::human(c.pushed),
        if new == 1 { "" } else { "s" }
    )?;
    writeln!(out, "pulled by a host  {:>10}", crate::output::progress::human(c.pulled))?;
    let ratio = c.ratio().map(|r| format!("pushed ÷ changed {r:.2}")).unwrap_or_else(|| "nothing changed".into());
    writeln!(out, "really changed    {:>10}  ({ratio})", crate::output::progress::human(c.changed))?;
    writeln!(out, "image             {:>10}", crate::output::progress::human(c.total))?;
    Ok(())
}
