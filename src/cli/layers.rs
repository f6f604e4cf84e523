//! The `layers` and `plan` commands: the planned layers as JSON (nixpkgs'
//! list of lists, or with sizes), or as a table of paths, bytes and largest
//! paths per layer; with `--previous`, each layer against the previous
//! release (reused or new, pulled or not) and what a release would push;
//! with `--from-image`, where the base image's layers sit below them.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use super::args::{LayersArgs, PlanArgs};
use super::planning::{joint_plans, load_closure, one_stdin_reader, plan_with, Joint};
use crate::input::closure::ClosureGraph;
use crate::planner::compare;

pub(super) fn layers(a: &LayersArgs) -> anyhow::Result<()> {
    let l = &a.layering;
    one_stdin_reader(&a.closure.input, &[], &l.previous, l.access.password_stdin)?;
    let mut out = io::stdout().lock();
    if a.layering.joint {
        let plans: Vec<Vec<Vec<String>>> =
            joint_plans(&a.closure, &a.layering)?.plans.into_iter().map(|(_, p)| p.layers).collect();
        serde_json::to_writer_pretty(&mut out, &plans)?;
        writeln!(out)?;
        return Ok(());
    }
    anyhow::ensure!(
        l.previous.is_empty() || (l.auto_layer.is_none() && l.pipeline.is_none() && !l.popularity),
        "`layers --previous` plans with the stable planner, which builds on it: drop --auto-layer, --pipeline or --popularity (or compare with `nixstream plan`)"
    );
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    serde_json::to_writer_pretty(&mut out, &chosen.planned.layers)?;
    writeln!(out)?;
    Ok(())
}

pub(super) fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    let l = &a.layering;
    one_stdin_reader(&a.closure.input, &[], &l.previous, l.access.password_stdin)?;
    if a.layering.joint {
        let Joint { plans, budget, previous } = joint_plans(&a.closure, &a.layering)?;
        let base = Base::of(a, budget.base_layers);
        let mut out = io::stdout().lock();
        let shared = plans
            .iter()
            .map(|(_, p)| &p.layers)
            .skip(1)
            .map(|l| l.iter().zip(&plans[0].1.layers).take_while(|(x, y)| x == y).count())
            .min()
            .unwrap_or(0);
        // With --previous, each image against its own previous plan.
        let compared: Vec<Option<compare::Comparison>> = plans
            .iter()
            .enumerate()
            .map(|(i, (g, p))| {
                let prev = previous.as_ref()?;
                let size = g.nar_sizes();
                Some(compare::compare(&p.layers, &prev[i], &size))
            })
            .collect();
        if a.json {
            let v: Vec<serde_json::Value> = plans
                .iter()
                .zip(&compared)
                .enumerate()
                .map(|(i, ((g, p), c))| match (c, &previous) {
                    (Some(c), Some(prev)) => {
                        let mut v = compared_json(g, &p.layers, c);
                        v["kept"] = p.kept.into();
                        v["previous_layers"] = prev[i].len().into();
                        v["shared"] = shared.into();
                        v["base_layers"] = budget.base_layers.into();
                        v
                    }
                    _ => serde_json::json!({"layers": plan_json(g, &p.layers), "shared": shared, "base_layers": budget.base_layers}),
                })
                .collect();
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
            return Ok(());
        }
        for (((g, p), input), c) in plans.iter().zip(&a.closure.input).zip(&compared) {
            let l = &p.layers;
            let all = if plans.len() == 2 { "both images".to_string() } else { format!("all {} images", plans.len()) };
            writeln!(out, "{input}: the bottom {shared} layers are shared by {all}")?;
            match c {
                None => plan_table(&mut out, g, l, base.as_ref(), Some(budget.store))?,
                Some(c) => compare_table(&mut out, g, l, c, base.as_ref())?,
            }
            writeln!(out)?;
        }
        return Ok(());
    }
    let (closure, exclude) = load_closure(&a.closure)?;
    let chosen = plan_with(&closure, &exclude, &a.layering)?;
    let base = Base::of(a, chosen.base_layers);
    let layers = &chosen.planned.layers;
    let mut out = io::stdout().lock();
    if let Some(prev) = &chosen.previous {
        let size = closure.nar_sizes();
        let c = compare::compare(layers, &prev.layers, &size);
        if a.json {
            let mut v = compared_json(&closure, layers, &c);
            v["kept"] = chosen.planned.kept.into();
            v["previous_layers"] = prev.layers.len().into();
            v["base_layers"] = chosen.base_layers.into();
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        } else {
            compare_table(&mut out, &closure, layers, &c, base.as_ref())?;
        }
        return Ok(());
    }
    if a.json {
        // Without a base, nixpkgs-like: the list alone; with one, an
        // object, so the base's layers can be said.
        let layers = plan_json(&closure, layers);
        let v = match base {
            None => serde_json::json!(layers),
            Some(b) => serde_json::json!({"layers": layers, "base_layers": b.layers}),
        };
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    plan_table(&mut out, &closure, layers, base.as_ref(), chosen.allowed)
}

/// A plan against its previous one, as `plan --json` prints it.
fn compared_json(closure: &ClosureGraph, layers: &[Vec<String>], c: &compare::Comparison) -> serde_json::Value {
    serde_json::json!({
        "layers": plan_json(closure, layers).into_iter().zip(&c.layers)
            .map(|(mut v, lc)| { v["reused"] = lc.reused.into(); v["pulled"] = lc.pulled.into(); v })
            .collect::<Vec<_>>(),
        "pushed": c.pushed, "pulled": c.pulled, "changed": c.changed, "total": c.total, "ratio": c.ratio(),
    })
}

/// The `--from-image` base a plan sits on, for the tables.
struct Base<'a> {
    path: &'a Path,
    /// Its layers, below the plan's.
    layers: usize,
}

impl<'a> Base<'a> {
    fn of(a: &'a PlanArgs, layers: usize) -> Option<Base<'a>> {
        a.layering.base.from_image.as_deref().map(|path| Base { path, layers })
    }

    /// "the base image's 5 layers (base.tar)".
    fn describe(&self) -> String {
        let s = if self.layers == 1 { "" } else { "s" };
        format!("the base image's {} layer{s} ({})", self.layers, self.path.display())
    }
}

fn plan_json(closure: &ClosureGraph, layers: &[Vec<String>]) -> Vec<serde_json::Value> {
    let size = closure.nar_sizes();
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

fn plan_table(
    out: &mut impl Write,
    closure: &ClosureGraph,
    layers: &[Vec<String>],
    base: Option<&Base>,
    allowed: Option<usize>,
) -> anyhow::Result<()> {
    if let Some(b) = base {
        writeln!(out, "{} come first: store layer 1 is the image's layer {}", b.describe(), b.layers + 1)?;
    }
    let size = closure.nar_sizes();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    // Top first, as a stack, like the comparison with --previous.
    writeln!(out, "{:>5} {:>6} {:>10}  largest paths", "layer", "paths", "bytes")?;
    for (i, l) in layers.iter().enumerate().rev() {
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
    let in_all = match base {
        Some(b) => format!(
            "; {} in the image with the base image's {} and the customisation layer",
            b.layers + layers.len() + 1,
            b.layers
        ),
        None => String::new(),
    };
    // The stable planner may leave some of the budget unused.
    let of = match allowed {
        Some(n) if n > layers.len() => format!("; the budget allows {n}"),
        _ => String::new(),
    };
    writeln!(
        out,
        "{:>5} {:>6} {:>10}  {} layer{}{in_all}{of}",
        "total",
        paths,
        crate::output::progress::human(total),
        layers.len(),
        if layers.len() == 1 { "" } else { "s" }
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
    base: Option<&Base>,
) -> anyhow::Result<()> {
    const WIDTH: u64 = 30;
    let size = closure.nar_sizes();
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
    if let Some(b) = base {
        writeln!(out, "{:>5}  {}, below layer 1", "base", b.describe())?;
    }
    let reused = c.layers.iter().filter(|l| l.reused).count();
    writeln!(
        out,
        "{reused} of {} layer{} reused (░ reused, █ new; ↓ pulled by a host holding the previous image)",
        c.layers.len(),
        if c.layers.len() == 1 { "" } else { "s" }
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
