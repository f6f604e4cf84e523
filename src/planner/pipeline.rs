//! nixpkgs' layering pipeline (`layeringPipeline`, the engine behind
//! flatten-references-graph): the same JSON steps, the same result.
//!
//! The reference runs on igraph, so results follow igraph's conventions and
//! this module reproduces them: a graph's vertices are the closure's nodes
//! stably sorted by `narSize` (the order every layer lists its paths in),
//! induced subgraphs keep that order, `+` is a disjoint union, and deleted
//! edges stay deleted in the pieces `split_paths` returns.
//!
//! `popularity_contest` gives each path the count the reference's memoised
//! tree walk produces, computed in closed form: with `A(v)` the number of
//! paths from a virtual root (above every root) to `v`, the popularity of
//! `s` is the sum of `A(v)` over `s` and all its ancestors.  Counts can
//! exceed 128 bits in diamond-heavy graphs, so they fall back to big
//! integers rather than saturate.  Paths sort by popularity (descending),
//! then by "package name" (the path with its `/nix/store/HASH` part moved to
//! the end).
//!
//! Unlike the reference, a malformed pipeline gets an error naming the step
//! (its position, e.g. `pipeline[1][2]`), the argument and what was expected.

use std::collections::{HashMap, HashSet};

use num_bigint::BigUint;
use serde_json::Value;

use crate::input::closure::ClosureGraph;
use crate::input::conf::type_name as kind;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("layering pipeline, step {at}: {what}")]
pub struct PipelineError {
    /// Where in the pipeline JSON, e.g. `pipeline[1][2]`, with the step name.
    pub at: String,
    pub what: String,
}

/// The closure's nodes in vertex order (stable by narSize).
#[derive(Debug, Clone)]
pub struct Universe {
    pub names: Vec<String>,
    pub nar_size: Vec<u64>,
    by_name: HashMap<String, u32>,
}

/// A directed graph over some of the universe's vertices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Graph {
    /// Global vertex ids, in vertex order.
    verts: Vec<u32>,
    /// Successors as local indices, ascending (igraph's neighbour order).
    succ: Vec<Vec<u32>>,
}

/// What flows between steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Graph(Graph),
    List(Vec<Data>),
    Dict(Vec<(String, Data)>),
}

impl Data {
    fn describe(&self) -> String {
        match self {
            Data::Graph(g) => format!("a graph of {} paths", g.verts.len()),
            Data::List(l) => format!("a list of {} items", l.len()),
            Data::Dict(d) => {
                format!("a dict with keys {:?}", d.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitSpec {
    Path(String),
    ChildrenOf(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PopularityContest,
    LimitLayers(usize),
    SplitEvery(usize),
    SubcomponentIn(Vec<String>),
    SubcomponentOut(Vec<String>),
    SplitPaths(Vec<SplitSpec>),
    RemovePaths(Vec<String>),
    Over(String, Box<Step>),
    Map(Box<Step>),
    Pipe(Vec<Step>),
    Flatten,
    Reverse,
}

/// One parsed step and where it was in the JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub at: String,
    pub op: Op,
}

const OPS: &str = "popularity_contest, limit_layers, split_every, subcomponent_in, subcomponent_out, split_paths, \
                   remove_paths, over, map, pipe, flatten, reverse";

fn err(at: &str, what: impl Into<String>) -> PipelineError {
    PipelineError { at: at.to_string(), what: what.into() }
}

/// Parses a pipeline: a JSON list of steps.
pub fn parse(v: &Value) -> Result<Vec<Step>, PipelineError> {
    parse_steps(v, "pipeline")
}

fn parse_steps(v: &Value, at: &str) -> Result<Vec<Step>, PipelineError> {
    let items = v.as_array().ok_or_else(|| err(at, format!("expected a list of steps, found {}", kind(v))))?;
    items.iter().enumerate().map(|(i, s)| parse_step(s, &format!("{at}[{i}]"))).collect()
}

fn parse_step(v: &Value, at: &str) -> Result<Step, PipelineError> {
    let items = v
        .as_array()
        .ok_or_else(|| err(at, format!("expected a step like [\"popularity_contest\"], found {}", kind(v))))?;
    let name = items
        .first()
        .and_then(Value::as_str)
        .ok_or_else(|| err(at, "a step is a list starting with the operation's name"))?;
    let here = format!("{at} ({name:?})");
    let args = &items[1..];
    let want = |n: usize| -> Result<(), PipelineError> {
        if args.len() == n {
            Ok(())
        } else {
            Err(err(&here, format!("takes {n} argument{}, found {}", if n == 1 { "" } else { "s" }, args.len())))
        }
    };
    let count = |i: usize| -> Result<usize, PipelineError> {
        match args[i].as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(err(&here, format!("argument {}: expected a whole number above 0, found {}", i + 1, args[i]))),
        }
    };
    let paths = |i: usize, single_ok: bool| -> Result<Vec<String>, PipelineError> {
        match &args[i] {
            Value::String(s) if single_ok => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|p| {
                    p.as_str().map(str::to_string).ok_or_else(|| {
                        err(&here, format!("argument {}: expected store paths (strings), found {}", i + 1, kind(p)))
                    })
                })
                .collect(),
            other => {
                Err(err(&here, format!("argument {}: expected a list of store paths, found {}", i + 1, kind(other))))
            }
        }
    };
    let op = match name {
        "popularity_contest" => want(0).map(|_| Op::PopularityContest)?,
        "flatten" => want(0).map(|_| Op::Flatten)?,
        "reverse" => want(0).map(|_| Op::Reverse)?,
        "limit_layers" => {
            want(1)?;
            Op::LimitLayers(count(0)?)
        }
        "split_every" => {
            want(1)?;
            Op::SplitEvery(count(0)?)
        }
        "subcomponent_in" => {
            want(1)?;
            Op::SubcomponentIn(paths(0, false)?)
        }
        "subcomponent_out" => {
            want(1)?;
            Op::SubcomponentOut(paths(0, false)?)
        }
        "remove_paths" => {
            want(1)?;
            Op::RemovePaths(paths(0, true)?)
        }
        "split_paths" => {
            want(1)?;
            let specs = args[0].as_array().ok_or_else(|| {
                err(
                    &here,
                    format!(
                        "argument 1: expected a list of paths or {{\"children_of\": ...}}, found {}",
                        kind(&args[0])
                    ),
                )
            })?;
            let mut out = Vec::with_capacity(specs.len());
            for (i, s) in specs.iter().enumerate() {
                out.push(match s {
                    Value::String(p) => SplitSpec::Path(p.clone()),
                    Value::Object(o) if o.len() == 1 && o.contains_key("children_of") => match &o["children_of"] {
                        Value::String(p) => SplitSpec::ChildrenOf(vec![p.clone()]),
                        Value::Array(a) if a.iter().all(Value::is_string) => {
                            SplitSpec::ChildrenOf(a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                        }
                        other => {
                            return Err(err(
                                &here,
                                format!(
                                    "argument 1, item {i}: children_of takes a path or a list of paths, found {}",
                                    kind(other)
                                ),
                            ))
                        }
                    },
                    other => {
                        return Err(err(
                            &here,
                            format!(
                                "argument 1, item {i}: expected a path or {{\"children_of\": PATH}}, found {other}"
                            ),
                        ))
                    }
                });
            }
            Op::SplitPaths(out)
        }
        "over" => {
            want(2)?;
            let key = args[0].as_str().ok_or_else(|| {
                err(&here, format!("argument 1: expected a key such as \"rest\", found {}", kind(&args[0])))
            })?;
            Op::Over(key.to_string(), Box::new(parse_step(&args[1], &format!("{at}[2]"))?))
        }
        "map" => {
            want(1)?;
            Op::Map(Box::new(parse_step(&args[0], &format!("{at}[1]"))?))
        }
        "pipe" => {
            want(1)?;
            Op::Pipe(parse_steps(&args[0], &format!("{at}[1]"))?)
        }
        other => return Err(err(at, format!("unknown operation {other:?} (known: {OPS})"))),
    };
    Ok(Step { at: here, op })
}

impl Universe {
    /// Builds the universe and the full graph: nodes (less `exclude`) stably
    /// sorted by narSize; references to excluded paths and self-references
    /// dropped.
    pub fn build(closure: &ClosureGraph, exclude: &HashSet<String>) -> (Universe, Graph) {
        let mut nodes: Vec<_> = closure.nodes.iter().filter(|n| !exclude.contains(&n.path)).collect();
        nodes.sort_by_key(|n| n.nar_size);
        let by_name: HashMap<String, u32> = nodes.iter().enumerate().map(|(i, n)| (n.path.clone(), i as u32)).collect();
        let succ = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut s: Vec<u32> =
                    n.references.iter().filter_map(|r| by_name.get(r).copied()).filter(|&j| j as usize != i).collect();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let u = Universe {
            names: nodes.iter().map(|n| n.path.clone()).collect(),
            nar_size: nodes.iter().map(|n| n.nar_size).collect(),
            by_name,
        };
        let verts = (0..u.names.len() as u32).collect();
        (u, Graph { verts, succ })
    }
}

impl Graph {
    pub fn len(&self) -> usize {
        self.verts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.verts.is_empty()
    }

    /// The paths, in vertex order.
    pub fn names<'u>(&self, u: &'u Universe) -> Vec<&'u str> {
        self.verts.iter().map(|&v| u.names[v as usize].as_str()).collect()
    }

    fn local(&self, u: &Universe, name: &str) -> Option<u32> {
        let g = *u.by_name.get(name)?;
        self.verts.iter().position(|&v| v == g).map(|i| i as u32)
    }

    fn preds(&self) -> Vec<Vec<u32>> {
        let mut p = vec![Vec::new(); self.len()];
        for (i, s) in self.succ.iter().enumerate() {
            for &j in s {
                p[j as usize].push(i as u32);
            }
        }
        p
    }

    /// The subgraph on the vertices marked `keep`, in vertex order.
    fn induced(&self, keep: &[bool]) -> Graph {
        let mut map = vec![u32::MAX; self.len()];
        let mut verts = Vec::new();
        for (i, &k) in keep.iter().enumerate() {
            if k {
                map[i] = verts.len() as u32;
                verts.push(self.verts[i]);
            }
        }
        let succ = (0..self.len())
            .filter(|&i| keep[i])
            .map(|i| {
                self.succ[i].iter().filter_map(|&j| (map[j as usize] != u32::MAX).then_some(map[j as usize])).collect()
            })
            .collect();
        Graph { verts, succ }
    }

    /// [`Graph::induced`] on the vertices `range`, in time of the range
    /// alone (so `split_every 1` stays linear).
    fn induced_range(&self, range: std::ops::Range<usize>) -> Graph {
        let start = range.start as u32;
        let inside = |j: u32| range.contains(&(j as usize));
        let succ =
            range.clone().map(|i| self.succ[i].iter().filter(|&&j| inside(j)).map(|&j| j - start).collect()).collect();
        Graph { verts: self.verts[range].to_vec(), succ }
    }

    /// Vertices reachable from `starts` (included), along edges or against them.
    fn reach(&self, starts: &[u32], adj: &[Vec<u32>]) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut stack: Vec<u32> = starts.to_vec();
        while let Some(v) = stack.pop() {
            if !std::mem::replace(&mut seen[v as usize], true) {
                stack.extend(adj[v as usize].iter().copied().filter(|&w| !seen[w as usize]));
            }
        }
        seen
    }

    /// Disjoint union (igraph's `+` of two graphs).
    fn union(graphs: impl IntoIterator<Item = Graph>) -> Graph {
        let mut out = Graph::default();
        for g in graphs {
            let off = out.verts.len() as u32;
            out.verts.extend(&g.verts);
            out.succ.extend(g.succ.into_iter().map(|s| s.into_iter().map(|j| j + off).collect()));
        }
        out
    }
}

/// `package_name`: the path with its first `-`-separated part moved last.
fn package_key(path: &str) -> String {
    match path.split_once('-') {
        Some((first, rest)) => format!("{rest}-{first}"),
        None => path.to_string(),
    }
}

/// The popularity order of `g`'s vertices (local indices).
///
/// The reference expands the graph into a tree from its roots (in vertex
/// order, children in index order), memoising each path's subtree when it is
/// complete.  An edge back to a path still being expanded (a reference cycle,
/// e.g. Debian's libc6 <-> libgcc-s1) becomes a leaf: a copy of that path
/// with no children (this is what reproduces nixpkgs' output on the golden
/// closures).  On that expanded DAG, with `A(x)` the number of paths from the
/// virtual root to `x`, the popularity of `s` is the sum of `A` over the
/// copies of `s` plus the sum of `A` over every vertex that strictly reaches
/// a copy of `s`.  Paths no root reaches come last, sorted by name (the
/// reference appends them in hash-set order).
fn popularity_order(g: &Graph, u: &Universe) -> Vec<u32> {
    popularity_order_within(g, u, ANCESTOR_BITS_BUDGET)
}

/// [`popularity_order`], holding at most `budget` bytes of ancestor bits.
fn popularity_order_within(g: &Graph, u: &Universe, budget: usize) -> Vec<u32> {
    let n = g.len();
    let preds = g.preds();
    // Depth-first expansion; back edges become leaf copies (index >= n).
    const NEW: u8 = 0;
    const OPEN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![NEW; n];
    let mut children: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut copy_of: Vec<u32> = Vec::new(); // leaf index - n -> original
    for root in (0..n).filter(|&v| preds[v].is_empty()) {
        let mut stack: Vec<(u32, usize)> = vec![(root as u32, 0)];
        state[root] = OPEN;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            let succ = &g.succ[v as usize];
            if *next == succ.len() {
                state[v as usize] = DONE;
                stack.pop();
                continue;
            }
            let w = succ[*next];
            *next += 1;
            match state[w as usize] {
                NEW => {
                    children[v as usize].push(w);
                    state[w as usize] = OPEN;
                    stack.push((w, 0));
                }
                OPEN => {
                    children[v as usize].push((n + copy_of.len()) as u32);
                    copy_of.push(w);
                }
                _ => children[v as usize].push(w),
            }
        }
    }
    let total = n + copy_of.len();
    children.resize(total, Vec::new());
    let mut xpreds: Vec<Vec<u32>> = vec![Vec::new(); total];
    for (v, ch) in children.iter().enumerate() {
        for &c in ch {
            xpreds[c as usize].push(v as u32);
        }
    }
    let mut copies: Vec<Vec<u32>> = (0..n as u32).map(|v| vec![v]).collect();
    for (i, &orig) in copy_of.iter().enumerate() {
        copies[orig as usize].push((n + i) as u32);
    }
    // Topological order of the reached part (Kahn over the expanded DAG).
    let reached: Vec<bool> = (0..total).map(|v| v >= n || state[v] == DONE).collect();
    let mut indeg: Vec<usize> = xpreds.iter().map(Vec::len).collect();
    let mut order: Vec<u32> = (0..total as u32).filter(|&v| reached[v as usize] && indeg[v as usize] == 0).collect();
    let mut k = 0;
    while k < order.len() {
        let v = order[k] as usize;
        k += 1;
        for &w in &children[v] {
            indeg[w as usize] -= 1;
            if indeg[w as usize] == 0 {
                order.push(w);
            }
        }
    }
    let keys: Vec<String> = g.verts.iter().map(|&v| package_key(&u.names[v as usize])).collect();
    let scores = Scores::new(&xpreds, &children, &order, &copies, &reached, budget);
    let mut idx: Vec<u32> = (0..n as u32).collect();
    idx.sort_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        reached[b].cmp(&reached[a]).then_with(|| scores.cmp(b, a)).then_with(|| keys[a].cmp(&keys[b]))
    });
    idx
}

/// 2^k as a float, built from its exponent bits (0 below the normal range).
fn pow2(k: i64) -> f64 {
    if k < -1022 {
        0.0
    } else if k > 1023 {
        f64::INFINITY
    } else {
        f64::from_bits(((k + 1023) as u64) << 52)
    }
}

/// A positive number as `m * 2^e`, `m` in [1, 2): path counts overflow
/// every fixed width on dense graphs, and only their order matters here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ext {
    m: f64,
    e: i64,
}

impl Ext {
    const ZERO: Ext = Ext { m: 0.0, e: i64::MIN };

    fn from_f64(x: f64) -> Ext {
        if x == 0.0 {
            return Ext::ZERO;
        }
        let e = x.log2().floor() as i64;
        let mut ext = Ext { m: x / pow2(e), e };
        ext.normalise();
        ext
    }

    fn normalise(&mut self) {
        while self.m >= 2.0 {
            self.m /= 2.0;
            self.e += 1;
        }
        while self.m > 0.0 && self.m < 1.0 {
            self.m *= 2.0;
            self.e -= 1;
        }
    }

    fn add(self, o: Ext) -> Ext {
        if self.m == 0.0 {
            return o;
        }
        if o.m == 0.0 {
            return self;
        }
        let (hi, lo) = if self.e >= o.e { (self, o) } else { (o, self) };
        let d = hi.e - lo.e;
        let mut r = Ext { m: hi.m + lo.m * pow2(-d), e: hi.e };
        r.normalise();
        r
    }

    /// `self / 2^e` as a plain float (0 when negligible).
    fn scaled(self, e: i64) -> f64 {
        if self.m == 0.0 {
            0.0
        } else {
            self.m * pow2(self.e - e)
        }
    }
}

/// The terms of a popularity sum: each copy once, then each strict ancestor
/// of any copy once more (a copy that reaches another copy is both), in
/// vertex order.  One reverse search per copy: memory linear in the graph.
fn members_of(xpreds: &[Vec<u32>], copies: &[u32], out: &mut Vec<u32>) {
    let total = xpreds.len();
    out.clear();
    out.extend_from_slice(copies);
    let mut union = vec![false; total];
    let mut by_other = vec![false; copies.len()];
    let mut seen = vec![false; total];
    let mut stack = Vec::new();
    for (oi, &o) in copies.iter().enumerate() {
        seen.iter_mut().for_each(|x| *x = false);
        seen[o as usize] = true;
        stack.push(o);
        while let Some(v) = stack.pop() {
            union[v as usize] = true;
            for &p in &xpreds[v as usize] {
                if !std::mem::replace(&mut seen[p as usize], true) {
                    stack.push(p);
                }
            }
        }
        for (ci, &c) in copies.iter().enumerate() {
            by_other[ci] |= ci != oi && seen[c as usize];
        }
    }
    for (ci, &c) in copies.iter().enumerate() {
        if !by_other[ci] {
            union[c as usize] = false;
        }
    }
    out.extend((0..total).filter(|&v| union[v]).map(|v| v as u32));
}

/// Bytes of ancestor bits held at once: the sums are made a block of
/// target vertices at a time, so memory stays linear in the closure (all
/// targets at once took the square: 1.5 GB at 100,000 paths).
const ANCESTOR_BITS_BUDGET: usize = 32 << 20;

/// Popularity of every vertex: an extended float for magnitude, the exact
/// value modulo 2^128 for equality, and exact big integers on demand for the
/// rare pair whose floats agree but whose residues do not.
struct Scores<'a> {
    approx: Vec<Ext>,
    residue: Vec<u128>,
    copies: &'a [Vec<u32>],
    xpreds: &'a [Vec<u32>],
    order: &'a [u32],
    exact: std::cell::RefCell<Option<Vec<BigUint>>>,
}

impl<'a> Scores<'a> {
    fn new(
        xpreds: &'a [Vec<u32>],
        children: &[Vec<u32>],
        order: &'a [u32],
        copies: &'a [Vec<u32>],
        reached: &[bool],
        budget: usize,
    ) -> Scores<'a> {
        let total = xpreds.len();
        let n = copies.len();
        // A(v): paths from the virtual root, as Ext and modulo 2^128.
        let mut a_ext = vec![Ext::ZERO; total];
        let mut a_mod = vec![0u128; total];
        for &v in order {
            let v = v as usize;
            if xpreds[v].is_empty() {
                a_ext[v] = Ext::from_f64(1.0);
                a_mod[v] = 1;
            } else {
                for &p in &xpreds[v] {
                    a_ext[v] = a_ext[v].add(a_ext[p as usize]);
                    a_mod[v] = a_mod[v].wrapping_add(a_mod[p as usize]);
                }
            }
        }
        // A never decreases along an edge, so the largest term is a copy's.
        let top: Vec<i64> = (0..n).map(|s| copies[s].iter().map(|&c| a_ext[c as usize].e).max().unwrap_or(0)).collect();
        let single: Vec<bool> = (0..n).map(|s| reached[s] && copies[s].len() == 1).collect();
        let mut sum = vec![0f64; n];
        let mut residue = vec![0u128; n];
        // A vertex with one copy (no cycle through it) sums A over its
        // ancestors (itself included).  For a block of such targets, each
        // vertex gets the bits of the targets it reaches (in reverse
        // topological order); the sums then take their terms in vertex
        // order, as one ancestor row read in order would.
        let words = (budget / 8 / total.max(1)).clamp(1, n.div_ceil(64).max(1));
        let mut reach = vec![0u64; total * words];
        for start in (0..n).step_by(words * 64) {
            let end = n.min(start + words * 64);
            if !(start..end).any(|s| single[s]) {
                continue;
            }
            reach.fill(0);
            for &v in order.iter().rev() {
                let v = v as usize;
                if (start..end).contains(&v) && single[v] {
                    let b = v - start;
                    reach[v * words + b / 64] |= 1 << (b % 64);
                }
                for &c in &children[v] {
                    for w in 0..words {
                        let bits = reach[c as usize * words + w];
                        reach[v * words + w] |= bits;
                    }
                }
            }
            for v in 0..total {
                for (w, &bits) in reach[v * words..(v + 1) * words].iter().enumerate() {
                    let mut b = bits;
                    while b != 0 {
                        let s = start + w * 64 + b.trailing_zeros() as usize;
                        sum[s] += a_ext[v].scaled(top[s]);
                        residue[s] = residue[s].wrapping_add(a_mod[v]);
                        b &= b - 1;
                    }
                }
            }
        }
        drop(reach);
        let mut approx = Vec::with_capacity(n);
        let mut members = Vec::new();
        for s in 0..n {
            if !reached[s] {
                approx.push(Ext::ZERO);
                residue[s] = 0;
                continue;
            }
            if !single[s] {
                members_of(xpreds, &copies[s], &mut members);
                for &x in &members {
                    sum[s] += a_ext[x as usize].scaled(top[s]);
                    residue[s] = residue[s].wrapping_add(a_mod[x as usize]);
                }
            }
            let mut e = Ext::from_f64(sum[s]);
            e.e = e.e.saturating_add(top[s]);
            approx.push(e);
        }
        Scores { approx, residue, copies, xpreds, order, exact: std::cell::RefCell::new(None) }
    }

    fn cmp(&self, a: usize, b: usize) -> std::cmp::Ordering {
        let (x, y) = (self.approx[a], self.approx[b]);
        let d = x.e.saturating_sub(y.e);
        let near = d.abs() <= 2 && y.m > 0.0 && ((x.m * pow2(d) / y.m) - 1.0).abs() <= 1e-9;
        if !near {
            return (x.e, x.m).partial_cmp(&(y.e, y.m)).unwrap_or(std::cmp::Ordering::Equal);
        }
        if self.residue[a] == self.residue[b] {
            // Within 1e-9 and equal modulo 2^128: equal.
            return std::cmp::Ordering::Equal;
        }
        let mut cache = self.exact.borrow_mut();
        let exact = cache.get_or_insert_with(|| {
            let mut a = vec![BigUint::default(); self.xpreds.len()];
            for &v in self.order {
                let v = v as usize;
                a[v] = if self.xpreds[v].is_empty() {
                    BigUint::from(1u8)
                } else {
                    self.xpreds[v].iter().fold(BigUint::default(), |s, &p| s + &a[p as usize])
                };
            }
            a
        });
        let sum = |s: usize| {
            let mut m = Vec::new();
            members_of(self.xpreds, &self.copies[s], &mut m);
            m.iter().fold(BigUint::default(), |acc, &x| acc + &exact[x as usize])
        };
        sum(a).cmp(&sum(b))
    }
}

fn expect_graph(d: Data, step: &Step) -> Result<Graph, PipelineError> {
    match d {
        Data::Graph(g) => Ok(g),
        other => Err(err(&step.at, format!("expects a graph, but was given {}", other.describe()))),
    }
}

fn expect_list(d: Data, step: &Step) -> Result<Vec<Data>, PipelineError> {
    match d {
        Data::List(l) => Ok(l),
        other => Err(err(&step.at, format!("expects a list, but was given {}", other.describe()))),
    }
}

/// Runs `steps` on `data`.
pub fn run(steps: &[Step], data: Data, u: &Universe) -> Result<Data, PipelineError> {
    steps.iter().try_fold(data, |d, s| apply(s, d, u))
}

fn apply(step: &Step, data: Data, u: &Universe) -> Result<Data, PipelineError> {
    Ok(match &step.op {
        Op::PopularityContest => {
            let g = expect_graph(data, step)?;
            let order = popularity_order(&g, u);
            Data::List(
                order
                    .into_iter()
                    .map(|i| Data::Graph(Graph { verts: vec![g.verts[i as usize]], succ: vec![Vec::new()] }))
                    .collect(),
            )
        }
        Op::LimitLayers(n) => {
            let mut items = expect_list(data, step)?.into_iter();
            let mut out: Vec<Data> = items.by_ref().take(n - 1).collect();
            let rest: Vec<Data> = items.collect();
            if !rest.is_empty() {
                let graphs = rest.into_iter().map(|d| expect_graph(d, step)).collect::<Result<Vec<_>, _>>()?;
                out.push(Data::Graph(Graph::union(graphs)));
            }
            Data::List(out)
        }
        Op::SplitEvery(n) => {
            let g = expect_graph(data, step)?;
            Data::List(
                (0..g.len())
                    .step_by(*n)
                    .map(|start| Data::Graph(g.induced_range(start..(start + n).min(g.len()))))
                    .collect(),
            )
        }
        Op::SubcomponentIn(paths) | Op::SubcomponentOut(paths) => {
            let g = expect_graph(data, step)?;
            let starts: Vec<u32> = paths.iter().filter_map(|p| g.local(u, p)).collect();
            let adj = if matches!(step.op, Op::SubcomponentIn(_)) { g.preds() } else { g.succ.clone() };
            let main = g.reach(&starts, &adj);
            let rest: Vec<bool> = main.iter().map(|m| !m).collect();
            Data::Dict(vec![
                ("main".into(), Data::Graph(g.induced(&main))),
                ("rest".into(), Data::Graph(g.induced(&rest))),
            ])
        }
        Op::SplitPaths(specs) => split_paths(expect_graph(data, step)?, specs, u),
        Op::RemovePaths(paths) => {
            let g = expect_graph(data, step)?;
            let mut keep = vec![true; g.len()];
            for p in paths {
                if let Some(i) = g.local(u, p) {
                    keep[i as usize] = false;
                }
            }
            Data::Graph(g.induced(&keep))
        }
        Op::Over(key, f) => match data {
            Data::Dict(entries) => {
                if !entries.iter().any(|(k, _)| k == key) {
                    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
                    return Err(err(&step.at, format!("there is no {key:?} here (the dict has {keys:?})")));
                }
                let mut out = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    let v = if &k == key { apply(f, v, u)? } else { v };
                    out.push((k, v));
                }
                Data::Dict(out)
            }
            other => {
                return Err(err(
                    &step.at,
                    format!("expects a dict (from split_paths or subcomponent_*), but was given {}", other.describe()),
                ))
            }
        },
        Op::Map(f) => {
            Data::List(expect_list(data, step)?.into_iter().map(|d| apply(f, d, u)).collect::<Result<_, _>>()?)
        }
        Op::Pipe(steps) => run(steps, data, u)?,
        Op::Flatten => Data::List(flatten(data).into_iter().map(Data::Graph).collect()),
        Op::Reverse => {
            let mut l = expect_list(data, step)?;
            l.reverse();
            Data::List(l)
        }
    })
}

/// All graphs in `d`, depth first (dict values in order).
pub fn flatten(d: Data) -> Vec<Graph> {
    match d {
        Data::Graph(g) => vec![g],
        Data::List(l) => l.into_iter().flat_map(flatten).collect(),
        Data::Dict(d) => d.into_iter().flat_map(|(_, v)| flatten(v)).collect(),
    }
}

/// `split_paths`: the split paths with what only they use ("main"), what
/// they share with the rest ("common"), and the rest; empty parts omitted.
fn split_paths(g: Graph, specs: &[SplitSpec], u: &Universe) -> Data {
    let mut split: Vec<u32> = Vec::new();
    for s in specs {
        match s {
            SplitSpec::Path(p) => split.extend(g.local(u, p)),
            SplitSpec::ChildrenOf(ps) => {
                for p in ps {
                    if let Some(i) = g.local(u, p) {
                        split.extend(&g.succ[i as usize]);
                    }
                }
            }
        }
    }
    if split.is_empty() {
        return Data::Dict(vec![("rest".into(), Data::Graph(g))]);
    }
    let preds = g.preds();
    let roots: Vec<u32> = (0..g.len() as u32).filter(|&v| preds[v as usize].is_empty()).collect();
    // One root, or a fake one (index n) above all roots.
    let mut work = g.clone();
    let (root, fake) = if roots.len() == 1 {
        (roots[0], false)
    } else {
        work.succ.push(roots.clone());
        work.verts.push(u32::MAX);
        (g.len() as u32, true)
    };
    if split.contains(&root) {
        return Data::Dict(vec![("main".into(), Data::Graph(g))]);
    }
    let split_off = work.reach(&split, &work.succ);
    let is_split: HashSet<u32> = split.iter().copied().collect();
    for s in work.succ.iter_mut() {
        s.retain(|j| !is_split.contains(j));
    }
    let rest_with_common = work.reach(&[root], &work.succ);
    let n = work.len();
    let common: Vec<bool> = (0..n).map(|i| split_off[i] && rest_with_common[i]).collect();
    let mut rest: Vec<bool> = (0..n).map(|i| rest_with_common[i] && !common[i]).collect();
    let main: Vec<bool> = (0..n).map(|i| split_off[i] && !common[i]).collect();
    if fake {
        rest[n - 1] = false;
    }
    Data::Dict(
        [("main", main), ("common", common), ("rest", rest)]
            .into_iter()
            .map(|(k, keep)| (k.to_string(), work.induced(&keep)))
            .filter(|(_, part)| !part.is_empty())
            .map(|(k, part)| (k, Data::Graph(part)))
            .collect(),
    )
}

/// Runs a pipeline on a closure: the layers, bottom first, as path lists.
pub fn plan_layers(
    closure: &ClosureGraph,
    pipeline: &[Step],
    exclude: &HashSet<String>,
) -> Result<Vec<Vec<String>>, PipelineError> {
    let (u, g) = Universe::build(closure, exclude);
    let result = run(pipeline, Data::Graph(g), &u)?;
    Ok(flatten(result).iter().map(|g| g.names(&u).into_iter().map(str::to_string).collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::closure::Node;
    use serde_json::json;

    /// The example of the reference's popularity docstring: A-B-C-D-F,
    /// C-E, B-E, E-F, A-G.
    fn docstring_graph() -> ClosureGraph {
        let n = |p: &str, r: &[&str], s: u64| Node {
            path: format!("/s/{p}"),
            references: r.iter().map(|x| format!("/s/{x}")).collect(),
            nar_size: s,
            closure_size: None,
            nar_hash: None,
        };
        ClosureGraph {
            nodes: vec![
                n("a", &["b", "g"], 7),
                n("b", &["c", "e"], 6),
                n("c", &["d", "e"], 5),
                n("d", &["f"], 4),
                n("e", &["f"], 3),
                n("f", &[], 2),
                n("g", &[], 1),
            ],
        }
    }

    fn pipe(v: Value) -> Vec<Step> {
        parse(&v).unwrap()
    }

    #[test]
    fn popularity_matches_the_reference_docstring() {
        // F 9, E 5, D 4, C 3, B 2 = G 2 (B before G by name), A 1.
        let layers = plan_layers(&docstring_graph(), &pipe(json!([["popularity_contest"]])), &HashSet::new()).unwrap();
        let order: Vec<&str> = layers.iter().map(|l| &l[0][3..]).collect();
        assert_eq!(order, ["f", "e", "d", "c", "b", "g", "a"]);
    }

    #[test]
    fn popularity_counts_overflowing_u128_stay_exact() {
        // 140 diamonds in a row: 2^140 paths to the bottom.
        let mut nodes = Vec::new();
        for i in 0..140 {
            let next = format!("/s/{:03}-top", i + 1);
            nodes.push(Node {
                path: format!("/s/{i:03}-top"),
                references: vec![format!("/s/{i:03}-l"), format!("/s/{i:03}-r")],
                nar_size: 1,
                closure_size: None,
                nar_hash: None,
            });
            nodes.push(Node {
                path: format!("/s/{i:03}-l"),
                references: vec![next.clone()],
                nar_size: 1,
                closure_size: None,
                nar_hash: None,
            });
            nodes.push(Node {
                path: format!("/s/{i:03}-r"),
                references: vec![next],
                nar_size: 1,
                closure_size: None,
                nar_hash: None,
            });
        }
        nodes.push(Node {
            path: "/s/140-top".into(),
            references: vec![],
            nar_size: 1,
            closure_size: None,
            nar_hash: None,
        });
        let layers =
            plan_layers(&ClosureGraph { nodes }, &pipe(json!([["popularity_contest"]])), &HashSet::new()).unwrap();
        assert_eq!(layers[0], ["/s/140-top"], "the bottom of the chain is the most popular");
        assert_eq!(layers.last().unwrap(), &["/s/000-top"]);
    }

    /// The reference's algorithm, literally: expand the tree from the roots
    /// (memoised, an edge back to an open path a leaf), count popularity with
    /// a per-path cache, order by (popularity desc, package name).
    fn naive_popularity(c: &ClosureGraph) -> Vec<String> {
        use std::rc::Rc;
        struct Tree(Vec<(usize, Rc<Tree>)>);
        let (u, g) = Universe::build(c, &HashSet::new());
        let n = g.len();
        let roots: Vec<usize> = (0..n).filter(|&v| !g.succ.iter().any(|s| s.contains(&(v as u32)))).collect();
        fn seg(v: usize, g: &Graph, cache: &mut HashMap<usize, Rc<Tree>>, open: &mut HashSet<usize>) -> Tree {
            open.insert(v);
            let mut ch = Vec::new();
            for &r in &g.succ[v] {
                let r = r as usize;
                if open.contains(&r) && !cache.contains_key(&r) {
                    ch.push((r, Rc::new(Tree(Vec::new()))));
                    continue;
                }
                if !cache.contains_key(&r) {
                    let t = seg(r, g, cache, open);
                    cache.insert(r, Rc::new(t));
                }
                ch.push((r, cache[&r].clone()));
            }
            open.remove(&v);
            Tree(ch)
        }
        fn contest(t: &Tree, pc: &mut HashMap<usize, HashMap<usize, u128>>) -> HashMap<usize, u128> {
            let mut pop: HashMap<usize, u128> = HashMap::new();
            for (path, sub) in &t.0 {
                *pop.entry(*path).or_default() += 1;
                if !pc.contains_key(path) {
                    let r = contest(sub, pc);
                    pc.insert(*path, r);
                }
                for (sp, sv) in pc[path].clone() {
                    *pop.entry(sp).or_default() += sv + 1;
                }
            }
            pop
        }
        let mut cache = HashMap::new();
        let full = Tree(roots.iter().map(|&r| (r, Rc::new(seg(r, &g, &mut cache, &mut HashSet::new())))).collect());
        let pop = contest(&full, &mut HashMap::new());
        let name = |v: usize| u.names[v].clone();
        let mut ordered: Vec<usize> = pop.keys().copied().collect();
        ordered.sort_by(|&a, &b| pop[&b].cmp(&pop[&a]).then_with(|| package_key(&name(a)).cmp(&package_key(&name(b)))));
        let mut missing: Vec<usize> = (0..n).filter(|v| !pop.contains_key(v)).collect();
        missing.sort_by_key(|&v| package_key(&name(v)));
        ordered.into_iter().chain(missing).map(name).collect()
    }

    proptest::proptest! {
        #[test]
        fn popularity_equals_the_literal_algorithm(
            sizes in proptest::collection::vec(0u64..4, 1..11),
            edges in proptest::collection::vec((0usize..11, 0usize..11), 0..30),
            names in proptest::collection::vec("[a-c]{1,2}", 11),
        ) {
            let n = sizes.len();
            let nodes: Vec<Node> = (0..n)
                .map(|i| Node {
                    path: format!("/s/{i:02}-{}", names[i]),
                    references: edges.iter().filter(|(a, _)| *a % n == i).map(|(_, b)| format!("/s/{:02}-{}", b % n, names[b % n])).collect(),
                    nar_size: sizes[i],
                    closure_size: None,
            nar_hash: None,
                })
                .collect();
            let g = ClosureGraph { nodes };
            let ours: Vec<String> = plan_layers(&g, &pipe(json!([["popularity_contest"]])), &HashSet::new())
                .unwrap()
                .into_iter()
                .flatten()
                .collect();
            proptest::prop_assert_eq!(ours, naive_popularity(&g));
        }
    }

    #[test]
    fn block_size_does_not_change_the_order() {
        // 400 paths, a few references each, and a reference cycle: many
        // blocks of 64 targets against one block of all.
        let name = |i: usize| format!("/nix/store/{:032}-p{i}", i * 7919 % 1000);
        let nodes: Vec<Node> = (0..400)
            .map(|i| {
                let mut refs: Vec<String> =
                    [i + 1, i * 3 + 2, i * 5 + 7].iter().filter(|&&j| j < 400).map(|&j| name(j)).collect();
                if i == 399 {
                    refs.push(name(350));
                }
                Node {
                    path: name(i),
                    references: refs,
                    nar_size: (i as u64 * 37) % 11,
                    closure_size: None,
                    nar_hash: None,
                }
            })
            .collect();
        let (u, g) = Universe::build(&ClosureGraph { nodes }, &HashSet::new());
        let whole = popularity_order_within(&g, &u, 1 << 30);
        assert_eq!(popularity_order_within(&g, &u, 1), whole);
        assert_eq!(popularity_order_within(&g, &u, 400 * 8 * 2), whole);
    }

    #[test]
    fn limit_layers_merges_the_rest_in_order() {
        let g = docstring_graph();
        let l = plan_layers(&g, &pipe(json!([["popularity_contest"], ["limit_layers", 3]])), &HashSet::new()).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2], ["/s/d", "/s/c", "/s/b", "/s/g", "/s/a"]);
        let l = plan_layers(&g, &pipe(json!([["popularity_contest"], ["limit_layers", 30]])), &HashSet::new()).unwrap();
        assert_eq!(l.len(), 7, "no empty extra layer");
    }

    #[test]
    fn split_every_and_reverse_follow_vertex_order() {
        let l =
            plan_layers(&docstring_graph(), &pipe(json!([["split_every", 3], ["reverse"]])), &HashSet::new()).unwrap();
        assert_eq!(l, [vec!["/s/a"], vec!["/s/d", "/s/c", "/s/b"], vec!["/s/g", "/s/f", "/s/e"]]);
    }

    #[test]
    fn subcomponent_and_remove_paths() {
        let g = docstring_graph();
        let l = plan_layers(&g, &pipe(json!([["subcomponent_out", ["/s/d"]]])), &HashSet::new()).unwrap();
        assert_eq!(l, [vec!["/s/f", "/s/d"], vec!["/s/g", "/s/e", "/s/c", "/s/b", "/s/a"]]);
        let l = plan_layers(&g, &pipe(json!([["subcomponent_in", ["/s/e"]]])), &HashSet::new()).unwrap();
        assert_eq!(l, [vec!["/s/e", "/s/c", "/s/b", "/s/a"], vec!["/s/g", "/s/f", "/s/d"]]);
        let l = plan_layers(&g, &pipe(json!([["remove_paths", "/s/f"]])), &HashSet::new()).unwrap();
        assert_eq!(l, [vec!["/s/g", "/s/e", "/s/d", "/s/c", "/s/b", "/s/a"]]);
    }

    #[test]
    fn split_paths_main_common_rest() {
        // Split C off: main = C, D (only C uses D); common = E, F (B uses E);
        // rest = A, B, G.
        let l = plan_layers(&docstring_graph(), &pipe(json!([["split_paths", ["/s/c"]]])), &HashSet::new()).unwrap();
        assert_eq!(l, [vec!["/s/d", "/s/c"], vec!["/s/f", "/s/e"], vec!["/s/g", "/s/b", "/s/a"]]);
        let l = plan_layers(&docstring_graph(), &pipe(json!([["split_paths", ["/s/a"]]])), &HashSet::new()).unwrap();
        assert_eq!(l.len(), 1, "splitting at the root gives everything as main");
    }

    #[test]
    fn malformed_pipelines_get_precise_errors() {
        for (p, needle) in [
            (json!("popularity_contest"), "pipeline: expected a list of steps"),
            (json!([["popularity"]]), "pipeline[0]: unknown operation \"popularity\""),
            (
                json!([["limit_layers", 0]]),
                "pipeline[0] (\"limit_layers\"): argument 1: expected a whole number above 0, found 0",
            ),
            (json!([["limit_layers"]]), "takes 1 argument, found 0"),
            (json!([["over", "rest", ["pipe", [["split_every", "x"]]]]]), "pipeline[0][2][1][0] (\"split_every\")"),
            (json!([["split_paths", [{"child_of": "/s/a"}]]]), "argument 1, item 0"),
            (json!([["subcomponent_in", "/s/a"]]), "expected a list of store paths, found a string"),
        ] {
            let e = parse(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should contain {needle}");
        }
    }

    #[test]
    fn type_errors_at_run_time_name_the_step() {
        let e = plan_layers(
            &docstring_graph(),
            &pipe(json!([["popularity_contest"], ["popularity_contest"]])),
            &HashSet::new(),
        )
        .unwrap_err();
        assert_eq!(e.at, "pipeline[1] (\"popularity_contest\")");
        assert!(e.what.contains("expects a graph, but was given a list of 7 items"), "{e}");
        let e = plan_layers(
            &docstring_graph(),
            &pipe(json!([["split_paths", ["/s/zzz"]], ["over", "main", ["flatten"]]])),
            &HashSet::new(),
        )
        .unwrap_err();
        assert!(e.what.contains("no \"main\""), "{e}");
    }
}
