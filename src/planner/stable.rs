//! The stable planner: layers that survive releases.
//!
//! A registry stores, and a Docker host keeps, a layer only as long as its
//! exact set of store paths is unchanged; one changed path re-sends the whole
//! layer.  A store path changes whenever anything in its closure changes.
//! Each path is given a likelihood of changing by itself: the inverse square
//! of `1 + the number of paths that use it` (between two releases on one
//! package set, change gathers at the top: the application and what only it
//! uses; a library much of the closure builds on changes rarely).  A layer's
//! volatility is the sum of those likelihoods over the union of its paths'
//! closures.  A fresh plan hangs half the budget's layers on the largest
//! paths, as nixpkgs' auto-layer does (each large path with what only it
//! uses), which a small change of the closure leaves alone.  What no large
//! path claims (the application and what it alone builds on: where
//! releases change) gets the other half: what no other path uses (the
//! application: what a release is) a layer of its own on top; auto-layer
//! again within the rest for half of what is left; and the small paths left
//! over ordered by volatility (stable at the bottom, volatile at the top)
//! and merged, while there are more than the layers left, two neighbours at
//! a time where the merge adds the least expected re-sent bytes:
//! `size(A∪B)·v(A∪B) − size(A)·v(A) − size(B)·v(B)`.  The application thus
//! stays apart from its private dependencies, and small paths that change
//! with the same things share a layer.  The large paths' layers keep
//! auto-layer's order at the bottom (a small change leaves it as it is);
//! above them, the application's part (and what only the application uses)
//! is stacked in order of odds of changing per byte, which keeps the bytes
//! a host pulls again (everything above the lowest changed layer) least;
//! the application on top.  Closures and users are
//! k-minimum-values sketches over the paths' names (exact up to [`K`] paths,
//! an estimate above, and unmoved by a release that only rebuilds a path), so
//! planning stays linear in the graph.
//!
//! Given the previous release's layers, every previous layer whose paths are
//! all still in the closure (a store path that is still there is unchanged)
//! is kept, with its paths in their order, in its previous order at the
//! bottom; the rest of the closure is planned above in the layers left.
//! When fewer layers are left than the rest deserves (its share of the
//! budget by bytes, and enough that new roots stay apart), kept
//! layers above the first broken one are let go, smallest first (a host
//! pulls them anyway), then the topmost kept layers (the least pulled
//! again): a few bytes sent again now buy a plan that keeps paying.  They
//! may still come out whole, and so be reused, above; the result says so
//! in its notes.
//!
//! [`plan_joint`] plans several images at once: the paths all of them share
//! are planned once, as the same bottom layers of every image, whatever the
//! order the images come in.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::xxh3_64;

use crate::input::closure::ClosureGraph;
use crate::planner::autolayer::{auto_layer_parts, AutoLayers};

/// Sketch size: closure counts are exact up to this many paths.
pub const K: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StableError {
    #[error("a layer budget of 0 leaves no layer for the store paths")]
    NoBudget,
    #[error("joint planning needs at least two images, found {0}")]
    JointNeedsTwo(usize),
    #[error(
        "a layer budget of {0} is too small to plan jointly: the shared paths and each image's own need a layer each"
    )]
    JointNeedsBudget(usize),
    #[error(
        "joint planning of {images} images was given {plans} previous plans: give one per image (an empty one for an image that has none)"
    )]
    JointPrevious { images: usize, plans: usize },
    #[error("image {image} gives {path} other references than image {first} does (two different stores?)")]
    JointMismatch { image: usize, first: usize, path: String },
}

/// A plan and how it came about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    /// Bottom first.
    pub layers: Vec<Vec<String>>,
    /// How many bottom layers are previous layers kept as they were.
    pub kept: usize,
    /// What the user should know (previous layers let go, nothing reusable).
    pub notes: Vec<String>,
}

/// `/nix/store/HASH-name` → (name, hash): release-stable order first.
fn path_key(path: &str) -> (&str, &str) {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) => (name, hash),
        None => (base, ""),
    }
}

/// Sorted, deduplicated union of two sketches, cut to the K smallest.
fn merge_sketch(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(K.min(a.len() + b.len()));
    let (mut i, mut j) = (0, 0);
    while out.len() < K && (i < a.len() || j < b.len()) {
        let v = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(_), Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => unreachable!(),
        };
        out.push(v);
    }
    out
}

/// The number of distinct paths a sketch stands for.
fn estimate(s: &[u64]) -> f64 {
    if s.len() < K {
        s.len() as f64
    } else {
        (K - 1) as f64 / ((s[K - 1] as f64 + 1.0) / (u64::MAX as f64 + 1.0))
    }
}

/// A path's own change likelihood from `1 + the number of paths that use
/// it`: its inverse square.  Between two releases on one package set,
/// change gathers at the top: the application and what only it uses.
fn weight_of(users: f64) -> f64 {
    1.0 / (users * users)
}

/// The keys of [`Graph::weight`] are already hashes.
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The graph as the planner sees it: indices, sizes, closure sketches.
struct Graph<'g> {
    paths: Vec<&'g str>,
    size: Vec<u64>,
    /// The sketch of each path's closure (itself included).
    sketch: Vec<Vec<u64>>,
    /// Each path's hash → how likely it is to change by itself.
    weight: HashMap<u64, f64, BuildHasherDefault<HashIsKey>>,
    /// Whether no other path uses it: what is being released.
    root: Vec<bool>,
}

impl<'g> Graph<'g> {
    fn new(graph: &'g ClosureGraph) -> Graph<'g> {
        let index = graph.index();
        let n = graph.nodes.len();
        let refs: Vec<Vec<u32>> = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                node.references.iter().map(|r| index[r.as_str()] as u32).filter(|&r| r as usize != i).collect()
            })
            .collect();
        let sccs = tarjan(&refs);
        let mut comp = vec![0u32; n];
        for (c, members) in sccs.iter().enumerate() {
            for &v in members {
                comp[v as usize] = c as u32;
            }
        }
        // Paths are told apart by name, not by store hash, so that a
        // release that only rebuilds a path leaves every sketch, and so the
        // plan, as it was; paths of the same name are numbered in (name,
        // hash) order.
        let mut by_key: Vec<u32> = (0..n as u32).collect();
        by_key.sort_by(|&a, &b| path_key(&graph.nodes[a as usize].path).cmp(&path_key(&graph.nodes[b as usize].path)));
        let mut hash = vec![0u64; n];
        let mut last: Option<(&str, u64)> = None;
        for &v in &by_key {
            let name = path_key(&graph.nodes[v as usize].path).0;
            let nth = match last {
                Some((prev, k)) if prev == name => k + 1,
                _ => 0,
            };
            last = Some((name, nth));
            hash[v as usize] = xxh3_64(format!("{name}\0{nth}").as_bytes());
        }
        let own = |members: &[u32]| {
            let mut s: Vec<u64> = members.iter().map(|&v| hash[v as usize]).collect();
            s.sort_unstable();
            s.dedup();
            s.truncate(K);
            s
        };
        // Tarjan yields a component after every component it reaches:
        // closures in that order, users (ancestors) in the reverse one.
        let mut down: Vec<Vec<u64>> = Vec::with_capacity(sccs.len());
        for (c, members) in sccs.iter().enumerate() {
            let mut s = own(members);
            for &v in members {
                for &r in &refs[v as usize] {
                    let rc = comp[r as usize] as usize;
                    if rc != c {
                        s = merge_sketch(&s, &down[rc]);
                    }
                }
            }
            down.push(s);
        }
        let mut users: Vec<Vec<u32>> = vec![Vec::new(); sccs.len()];
        for (v, rs) in refs.iter().enumerate() {
            for &r in rs {
                let (cv, cr) = (comp[v], comp[r as usize]);
                if cv != cr {
                    users[cr as usize].push(cv);
                }
            }
        }
        let mut up: Vec<Vec<u64>> = vec![Vec::new(); sccs.len()];
        for c in (0..sccs.len()).rev() {
            let mut s = own(&sccs[c]);
            for &u in &users[c] {
                s = merge_sketch(&s, &up[u as usize]);
            }
            up[c] = s;
        }
        // A path much of the closure builds on changes rarely (changing it
        // rebuilds all of that); a path little or nothing uses is what
        // releases change: its own change likelihood is the inverse square
        // of 1 + the number of paths that use it.
        let weight = (0..n).map(|v| (hash[v], weight_of(estimate(&up[comp[v] as usize])))).collect();
        Graph {
            paths: graph.nodes.iter().map(|n| n.path.as_str()).collect(),
            size: graph.nodes.iter().map(|n| n.nar_size).collect(),
            sketch: (0..n).map(|v| down[comp[v] as usize].clone()).collect(),
            weight,
            root: (0..n).map(|v| users[comp[v] as usize].is_empty() && sccs[comp[v] as usize].len() == 1).collect(),
        }
    }

    /// How likely a layer whose closures' union has sketch `s` is to
    /// change: the sum of its paths' weights (exact for small unions, else
    /// the estimated count times the sample's mean weight).
    fn volatility(&self, s: &[u64]) -> f64 {
        let sum: f64 = s.iter().map(|h| self.weight.get(h).copied().unwrap_or(1.0)).sum();
        if s.len() < K {
            sum
        } else {
            estimate(s) * sum / s.len() as f64
        }
    }
}

/// Strongly connected components of `adj`, each after every component it
/// reaches (iterative Tarjan).
fn tarjan(adj: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let n = adj.len();
    const UNSEEN: u32 = u32::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut out = Vec::new();
    let mut next = 0u32;
    let mut call: Vec<(u32, usize)> = Vec::new();
    for root in 0..n as u32 {
        if index[root as usize] != UNSEEN {
            continue;
        }
        call.push((root, 0));
        index[root as usize] = next;
        low[root as usize] = next;
        next += 1;
        stack.push(root);
        on_stack[root as usize] = true;
        while let Some(&mut (v, ref mut edge)) = call.last_mut() {
            if let Some(&w) = adj[v as usize].get(*edge) {
                *edge += 1;
                if index[w as usize] == UNSEEN {
                    index[w as usize] = next;
                    low[w as usize] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w as usize] = true;
                    call.push((w, 0));
                } else if on_stack[w as usize] {
                    low[v as usize] = low[v as usize].min(index[w as usize]);
                }
                continue;
            }
            call.pop();
            if let Some(&(parent, _)) = call.last() {
                low[parent as usize] = low[parent as usize].min(low[v as usize]);
            }
            if low[v as usize] == index[v as usize] {
                let mut members = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w as usize] = false;
                    members.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(members);
            }
        }
    }
    out
}

/// A layer being formed.
#[derive(Debug, Clone)]
struct Group {
    /// Graph indices; for a previous layer, in that layer's order.
    members: Vec<u32>,
    size: u64,
    sketch: Vec<u64>,
    volatility: f64,
    /// Expected bytes sent again: size × volatility.
    cost: f64,
    /// Whole previous layer (its paths keep their order while it stays whole).
    previous: bool,
}

impl Group {
    fn new(g: &Graph, members: Vec<u32>, sketch: Vec<u64>, previous: bool) -> Group {
        let size = members.iter().map(|&m| g.size[m as usize]).sum();
        let volatility = g.volatility(&sketch);
        Group { members, size, cost: size as f64 * volatility, volatility, sketch, previous }
    }
}

/// Where a layer goes in the stack, bottom first.  A host pulls every layer
/// above the lowest one that changed, so the expected bytes pulled are
/// least when layers go up in order of their odds of changing per byte
/// (swapping two neighbours a, b pays when `odds(b)/size(b) < odds(a)/size(a)`);
/// a layer's chance of changing is `1 − e^(−volatility)`, so its odds are
/// `e^volatility − 1`.
fn pull_key(gr: &Group) -> f64 {
    gr.volatility.exp_m1() / gr.size.max(1) as f64
}

/// A merge: (cost, left group, its stamp, right group, its stamp); a
/// stamp that moved on means the candidate is stale.
type Candidate = (i128, usize, u32, usize, u32);

/// Merges neighbouring groups (in volatility order) until at most `slots`
/// remain; returns them bottom first, in [`pull_key`] order.
fn merge_down(g: &Graph, groups: Vec<Group>, slots: usize) -> Vec<Group> {
    let mut keyed: Vec<(f64, (&str, &str), Group)> = groups
        .into_iter()
        .map(|gr| {
            let first = gr.members.iter().map(|&m| path_key(g.paths[m as usize])).min().unwrap_or(("", ""));
            (gr.volatility, first, gr)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let mut groups: Vec<Group> = keyed.into_iter().map(|(_, _, gr)| gr).collect();
    let n = groups.len();
    if n <= slots {
        groups.sort_by(|a, b| pull_key(a).total_cmp(&pull_key(b)));
        return groups;
    }
    let slots = slots.max(1);
    let mut alive = vec![true; n];
    let mut stamp = vec![0u32; n];
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut next: Vec<Option<usize>> = (0..n).map(|i| Some(i + 1).filter(|&j| j < n)).collect();
    let pair_cost = |a: &Group, b: &Group| -> i128 {
        let s = merge_sketch(&a.sketch, &b.sketch);
        let merged = (a.size + b.size) as f64 * g.volatility(&s);
        (merged - a.cost - b.cost).round() as i128
    };
    // Smallest cost first, then the lowest pair.
    let mut heap: BinaryHeap<Reverse<Candidate>> = BinaryHeap::new();
    for i in 0..n - 1 {
        heap.push(Reverse((pair_cost(&groups[i], &groups[i + 1]), i, 0, i + 1, 0)));
    }
    let mut count = n;
    while count > slots {
        let Some(Reverse((_, a, sa, b, sb))) = heap.pop() else { break };
        if !alive[a] || !alive[b] || stamp[a] != sa || stamp[b] != sb {
            continue;
        }
        let right = std::mem::take(&mut groups[b].members);
        let mut members = std::mem::take(&mut groups[a].members);
        members.extend(right);
        let sketch = merge_sketch(&groups[a].sketch, &groups[b].sketch);
        groups[a] = Group::new(g, members, sketch, false);
        alive[b] = false;
        stamp[a] += 1;
        next[a] = next[b];
        if let Some(c) = next[b] {
            prev[c] = Some(a);
        }
        count -= 1;
        if let Some(p) = prev[a] {
            heap.push(Reverse((pair_cost(&groups[p], &groups[a]), p, stamp[p], a, stamp[a])));
        }
        if let Some(c) = next[a] {
            heap.push(Reverse((pair_cost(&groups[a], &groups[c]), a, stamp[a], c, stamp[c])));
        }
    }
    let mut out: Vec<Group> = groups.into_iter().zip(alive).filter(|(_, alive)| *alive).map(|(g, _)| g).collect();
    out.sort_by(|a, b| pull_key(a).total_cmp(&pull_key(b)));
    out
}

fn singleton(g: &Graph, v: u32) -> Group {
    Group::new(g, vec![v], g.sketch[v as usize].clone(), false)
}

fn layer_paths(g: &Graph, group: &Group) -> Vec<String> {
    let mut paths: Vec<&str> = group.members.iter().map(|&m| g.paths[m as usize]).collect();
    if !group.previous {
        paths.sort_by(|a, b| path_key(a).cmp(&path_key(b)));
    }
    paths.into_iter().map(str::to_string).collect()
}

/// Layers a group of graph indices, with its closures' sketch.
fn group_of(g: &Graph, members: Vec<u32>, previous: bool) -> Group {
    let mut sketch = Vec::new();
    for &m in &members {
        sketch = merge_sketch(&sketch, &g.sketch[m as usize]);
    }
    Group::new(g, members, sketch, previous)
}

/// Whether the paths no other path uses (`roots`: what is being released,
/// which changes every time) each get a layer of their own on top, with
/// nothing riding with them: when they are few (a quarter of the budget at
/// most) and leave a layer for the `rest` paths.
fn apart(roots: &[u32], rest: usize, slots: usize, budget: usize) -> bool {
    !roots.is_empty() && roots.len() * 4 <= budget && roots.len() + usize::from(rest > 0) <= slots
}

/// The layers of `roots`, one each, in name order.
fn root_layers(g: &Graph, mut roots: Vec<u32>) -> Vec<Group> {
    roots.sort_by(|&a, &b| path_key(g.paths[a as usize]).cmp(&path_key(g.paths[b as usize])));
    roots.into_iter().map(|v| singleton(g, v)).collect()
}

fn indices(index: &HashMap<&str, u32>, layer: &[String]) -> Vec<u32> {
    layer.iter().map(|p| index[p.as_str()]).collect()
}

/// Auto-layer's layers without the one of what no large path claims, and
/// that one: the last when every path became a large path's (with one
/// root, the root's closure is the whole, so its layer comes last).
fn unclaimed_apart(mut parts: AutoLayers) -> Option<(Vec<Vec<String>>, Vec<String>)> {
    let at = parts.unclaimed.or(parts.layers.len().checked_sub(1))?;
    let rest = parts.layers.remove(at);
    Some((parts.layers, rest))
}

/// A plan made afresh.  Auto-layer's grouping hangs layers on the largest
/// paths, which a small change of the closure leaves alone, so it is
/// planned with half the budget; the layer it leaves for what no large
/// path claims (the application and what it builds on alone: where
/// releases change) is then split with the other half, by [`split_top`].
/// A smaller share grouped a service's private dependencies so that a
/// change of one sent others again; grouping everything by volatility
/// regrouped much of the image when a path was added or removed
/// (docs/layering.md has the figures of both).
fn fresh(
    graph: &ClosureGraph,
    g: &Graph,
    index: &HashMap<&str, u32>,
    exclude: &HashSet<String>,
    budget: usize,
) -> Vec<Group> {
    let Some((skeleton, top)) = unclaimed_apart(auto_layer_parts(graph, exclude, budget - budget / 2)) else {
        return Vec::new();
    };
    let slots = budget - skeleton.len();
    // The large paths' layers keep auto-layer's order (by closure size),
    // which a small change leaves as it is; a host pulls every layer above
    // the first one that moved.  Ordering them by odds of changing per
    // byte too made a host pull 2.4-48 times more after a random path was
    // added or removed (docs/layering.md).  Only the layers of what the
    // application alone uses (what releases change) go above the others.
    let mut users: Vec<Vec<u32>> = vec![Vec::new(); graph.nodes.len()];
    for (v, node) in graph.nodes.iter().enumerate() {
        for r in &node.references {
            let r = index[r.as_str()];
            if r as usize != v {
                users[r as usize].push(v as u32);
            }
        }
    }
    let groups: Vec<Group> = skeleton.iter().map(|l| group_of(g, indices(index, l), false)).collect();
    let apps = |gr: &Group| {
        let members: HashSet<u32> = gr.members.iter().copied().collect();
        gr.members.iter().all(|&m| users[m as usize].iter().all(|&u| g.root[u as usize] || members.contains(&u)))
    };
    let (mut mine, mut out): (Vec<Group>, Vec<Group>) = groups.into_iter().partition(|gr| apps(gr));
    mine.extend(split_top(graph, g, index, &indices(index, &top), slots, budget));
    out.extend(stack(g, mine));
    out
}

/// Splits the paths no large path claims into `slots` layers: each path no
/// other path uses (the application) apart on top, when they are few;
/// below it, auto-layer again within these paths with half the layers
/// (their own large paths with what only they use), and what that leaves
/// unclaimed (small paths the application uses directly) merged by
/// volatility into the other half.
fn split_top(
    graph: &ClosureGraph,
    g: &Graph,
    index: &HashMap<&str, u32>,
    top: &[u32],
    slots: usize,
    budget: usize,
) -> Vec<Group> {
    let roots: Vec<u32> = top.iter().copied().filter(|&v| g.root[v as usize]).collect();
    let apart = apart(&roots, top.len() - roots.len(), slots, budget);
    let set: HashSet<u32> = top.iter().copied().collect();
    let nodes = top
        .iter()
        .filter(|&&v| !(apart && g.root[v as usize]))
        .map(|&v| {
            let mut n = graph.nodes[v as usize].clone();
            n.references.retain(|r| index.get(r.as_str()).is_some_and(|i| set.contains(i)));
            n
        })
        .collect();
    let limit = slots - if apart { roots.len() } else { 0 };
    let parts = auto_layer_parts(&ClosureGraph { nodes }, &HashSet::new(), limit - limit / 2);
    let (inner, unclaimed) = match limit / 2 {
        0 => (parts.layers, None),
        _ => unclaimed_apart(parts).map_or((Vec::new(), None), |(inner, rest)| (inner, Some(rest))),
    };
    let free = limit - inner.len();
    let mut out: Vec<Group> = inner.iter().map(|l| group_of(g, indices(index, l), false)).collect();
    if let Some(rest) = unclaimed {
        out.extend(merge_down(g, indices(index, &rest).into_iter().map(|v| singleton(g, v)).collect(), free));
    }
    if apart {
        out.extend(root_layers(g, roots));
    }
    out
}

/// Stacks layers by [`pull_key`], bottom first, with each layer of a path
/// no other path uses (the application, planned apart) on top.
fn stack(g: &Graph, groups: Vec<Group>) -> Vec<Group> {
    let is_root = |gr: &Group| gr.members.len() == 1 && g.root[gr.members[0] as usize];
    let (mut roots, mut rest): (Vec<Group>, Vec<Group>) = groups.into_iter().partition(|gr| is_root(gr));
    rest.sort_by(|a, b| pull_key(a).total_cmp(&pull_key(b)));
    roots.sort_by(|a, b| path_key(g.paths[a.members[0] as usize]).cmp(&path_key(g.paths[b.members[0] as usize])));
    rest.extend(roots);
    rest
}

/// Plans `pool` and `released` layers into `slots` layers, what no other
/// path uses [`apart`] on top.
fn plan_top(g: &Graph, pool: &[u32], released: Vec<Group>, slots: usize, budget: usize) -> Vec<Group> {
    let roots: Vec<u32> = pool.iter().copied().filter(|&v| g.root[v as usize]).collect();
    let apart = apart(&roots, pool.len() - roots.len() + released.len(), slots, budget);
    let mut groups: Vec<Group> =
        pool.iter().filter(|&&v| !apart || !g.root[v as usize]).map(|&v| singleton(g, v)).collect();
    groups.extend(released);
    let mut top =
        if groups.is_empty() { Vec::new() } else { merge_down(g, groups, slots - if apart { roots.len() } else { 0 }) };
    if apart {
        top.extend(root_layers(g, roots));
    }
    top
}

/// Plans `graph`'s paths (less `exclude`) into at most `budget` layers,
/// building on `previous` (bottom first) when given.
pub fn plan(
    graph: &ClosureGraph,
    exclude: &HashSet<String>,
    budget: usize,
    previous: Option<&[Vec<String>]>,
) -> Result<Planned, StableError> {
    if budget == 0 {
        return Err(StableError::NoBudget);
    }
    let g = Graph::new(graph);
    let index: HashMap<&str, u32> = g.paths.iter().enumerate().map(|(i, p)| (*p, i as u32)).collect();
    let wanted = |p: &str| index.contains_key(p) && !exclude.contains(p);
    let mut notes = Vec::new();

    // Previous layers whose every path is still wanted, in order.
    let mut kept: Vec<Group> = Vec::new();
    // Each kept layer's position in the previous plan, and the first
    // previous layer that is not kept: a host pulls from there up anyway.
    let mut kept_at: Vec<usize> = Vec::new();
    let mut first_break = usize::MAX;
    if let Some(prev) = previous {
        // A path in two previous layers (a plan not made here) keeps the
        // first only.
        let mut seen: HashSet<&str> = HashSet::new();
        for (i, layer) in prev.iter().enumerate() {
            let whole = layer.iter().all(|p| wanted(p) && !seen.contains(p.as_str()));
            seen.extend(layer.iter().map(String::as_str));
            if !layer.is_empty() && whole {
                kept.push(group_of(&g, indices(&index, layer), true));
                kept_at.push(i);
            } else if !layer.is_empty() {
                first_break = first_break.min(i);
            }
        }
        if kept.is_empty() && !prev.is_empty() {
            notes.push(format!(
                "none of the {} previous layers can be reused (each lost or changed a path): planned afresh",
                prev.len()
            ));
        }
    }
    let in_kept: HashSet<u32> = kept.iter().flat_map(|k| k.members.iter().copied()).collect();
    let pool: Vec<u32> =
        (0..g.paths.len() as u32).filter(|&v| wanted(g.paths[v as usize]) && !in_kept.contains(&v)).collect();

    // Room for what is not kept.  It deserves its share of the budget by
    // bytes, and a layer per new root and one more when they can stand
    // apart from the rest (see [`apart`]): kept layers above the first broken one are
    // let go for that (a host pulls them anyway), smallest first, then the
    // topmost kept layers (the least pulled again).  And it needs one layer
    // at the very least.
    let mut released: Vec<Group> = Vec::new();
    if !kept.is_empty() {
        let pool_bytes: u64 = pool.iter().map(|&v| g.size[v as usize]).sum();
        let total = pool_bytes + kept.iter().map(|k| k.size).sum::<u64>();
        let share = (budget as f64 * pool_bytes as f64 / total.max(1) as f64).round() as usize;
        let roots = pool.iter().filter(|&&v| g.root[v as usize]).count();
        // Standing apart takes a layer per root and one for the rest.
        let least = if roots > 0 && roots * 4 <= budget { roots + usize::from(pool.len() > roots) } else { 1 };
        let want = pool.len().min(share.max(least)).min(budget);
        let free = budget.saturating_sub(kept.len());
        // Layers let go need a layer too, so more kept layers than the
        // budget leaves room for (a smaller --max-layers) go as well.
        let need_room = !pool.is_empty() || kept.len() > budget;
        let must = (kept.len() + usize::from(need_room)).saturating_sub(budget);
        let mut above: Vec<usize> = (0..kept.len()).filter(|&j| kept_at[j] > first_break).collect();
        above.sort_by_key(|&j| (kept[j].size, Reverse(j)));
        let mut go: Vec<usize> = above.into_iter().take(want.saturating_sub(free)).collect();
        // Not enough above the first broken layer: the topmost kept layers
        // go (the least pulled again).
        for j in (0..kept.len()).rev() {
            if go.len() >= must.max(want.saturating_sub(free)) {
                break;
            }
            if !go.contains(&j) {
                go.push(j);
            }
        }
        go.sort_unstable();
        if !go.is_empty() {
            let bytes: u64 = go.iter().map(|&i| kept[i].size).sum();
            for &i in go.iter().rev() {
                released.push(kept.remove(i));
            }
            let layers = |n: usize| if n == 1 { "1 layer".to_string() } else { format!("{n} layers") };
            let why = if pool.is_empty() || must >= go.len() {
                format!("to fit within a budget of {}", layers(budget))
            } else {
                format!(
                    "to make room for {} new or moved paths ({} left for them, {} wanted)",
                    pool.len(),
                    layers(free),
                    want
                )
            };
            notes.push(format!("let go of {} of the previous layers ({bytes} bytes of paths) {why}", go.len()));
        }
    }
    let slots = budget - kept.len();
    let top = if kept.is_empty() && released.is_empty() {
        fresh(graph, &g, &index, exclude, budget)
    } else {
        plan_top(&g, &pool, released, slots, budget)
    };
    let kept_count = kept.len();
    let layers = kept.iter().chain(top.iter()).map(|gr| layer_paths(&g, gr)).collect();
    Ok(Planned { layers, kept: kept_count, notes })
}

/// Plans several images so that the paths all of them hold are the same
/// bottom layers of each; every image stays within `budget` layers.  With
/// `previous` (each image's previous plan, in the same order), the layers
/// every previous plan has are the shared part's previous layers, and each
/// image's other previous layers its own part's.
pub fn plan_joint(
    graphs: &[ClosureGraph],
    exclude: &HashSet<String>,
    budget: usize,
    previous: Option<&[Vec<Vec<String>>]>,
) -> Result<Vec<Planned>, StableError> {
    if let Some(prev) = previous {
        if prev.len() != graphs.len() {
            return Err(StableError::JointPrevious { images: graphs.len(), plans: prev.len() });
        }
    }
    if graphs.len() < 2 {
        return Err(StableError::JointNeedsTwo(graphs.len()));
    }
    if budget < 2 {
        return Err(StableError::JointNeedsBudget(budget));
    }
    // One graph of every path (each image's view of a path must agree).
    let mut union = ClosureGraph::default();
    let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
    let mut holders: HashMap<String, usize> = HashMap::new();
    for (i, graph) in graphs.iter().enumerate() {
        for node in &graph.nodes {
            *holders.entry(node.path.clone()).or_default() += 1;
            match seen.get(&node.path) {
                Some(&(first, at)) => {
                    let mut a = union.nodes[at].references.clone();
                    let mut b = node.references.clone();
                    a.sort();
                    b.sort();
                    if a != b {
                        return Err(StableError::JointMismatch {
                            image: i + 1,
                            first: first + 1,
                            path: node.path.clone(),
                        });
                    }
                }
                None => {
                    seen.insert(node.path.clone(), (i, union.nodes.len()));
                    union.nodes.push(node.clone());
                }
            }
        }
    }
    // Auto-layer breaks ties by the graph's order: in path order, the
    // shared layers are the same whichever image is named first.
    union.nodes.sort_by(|a, b| a.path.cmp(&b.path));
    for n in &mut union.nodes {
        n.references.sort();
    }
    let shared: HashSet<&str> =
        holders.iter().filter(|(p, &n)| n == graphs.len() && !exclude.contains(*p)).map(|(p, _)| p.as_str()).collect();
    let size = union.nar_sizes();
    let shared_bytes: u64 = shared.iter().map(|p| size[p]).sum();
    let largest: u64 = graphs
        .iter()
        .map(|gr| gr.nodes.iter().filter(|n| !exclude.contains(&n.path)).map(|n| n.nar_size).sum::<u64>())
        .max()
        .unwrap_or(0);
    // Each image's own paths (its application, what releases change) keep
    // a quarter of the budget, and at least two layers (its top apart from
    // the rest), when they are that many; the shared part gets its share of
    // the rest by bytes.
    let own_min = graphs
        .iter()
        .map(|gr| {
            let own = gr.nodes.iter().filter(|n| !shared.contains(n.path.as_str()) && !exclude.contains(&n.path));
            own.count().min((budget / 4).max(2))
        })
        .max()
        .unwrap_or(0);
    let shared_slots = if shared.is_empty() {
        0
    } else {
        let by_bytes = (budget as f64 * shared_bytes as f64 / largest.max(1) as f64).round() as usize;
        by_bytes.clamp(1, budget.saturating_sub(own_min).max(1))
    };
    let mut not_shared: HashSet<String> = exclude.clone();
    not_shared.extend(union.nodes.iter().filter(|n| !shared.contains(n.path.as_str())).map(|n| n.path.clone()));
    // Previous layers every image that has a previous plan had, all of
    // whose paths every image still holds, are the shared part's (an image
    // new to the group has none); the others are each image's own.
    let in_all: Vec<Vec<String>> = match previous {
        Some(prev) => {
            let given: Vec<&Vec<Vec<String>>> = prev.iter().filter(|p| !p.is_empty()).collect();
            let still_shared = |l: &&Vec<String>| l.iter().all(|p| shared.contains(p.as_str()));
            match given.split_first() {
                Some((first, rest)) => {
                    first.iter().filter(|l| rest.iter().all(|p| p.contains(l))).filter(still_shared).cloned().collect()
                }
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    let bottom = if shared.is_empty() {
        Planned::default()
    } else {
        plan(&union, &not_shared, shared_slots, previous.map(|_| in_all.as_slice()))?
    };
    let mut out = Vec::with_capacity(graphs.len());
    for (i, graph) in graphs.iter().enumerate() {
        let mut skip: HashSet<String> = exclude.clone();
        skip.extend(shared.iter().map(|p| p.to_string()));
        let own_slots = budget - bottom.layers.len();
        let has_own = graph.nodes.iter().any(|n| !skip.contains(&n.path));
        let own_prev: Option<Vec<Vec<String>>> =
            previous.map(|prev| prev[i].iter().filter(|l| !in_all.contains(l)).cloned().collect());
        let top = if has_own { plan(graph, &skip, own_slots, own_prev.as_deref())? } else { Planned::default() };
        let mut layers = bottom.layers.clone();
        layers.extend(top.layers);
        // Kept layers count from the bottom: the image's own only when every
        // shared layer was kept too.
        let kept = bottom.kept + if bottom.kept == bottom.layers.len() { top.kept } else { 0 };
        // The shared part's notes once, with the first image's.
        let shared_notes = bottom.notes.iter().filter(|_| i == 0);
        let mut notes: Vec<String> = shared_notes.map(|n| format!("shared layers: {n}")).collect();
        notes.extend(top.notes.iter().map(|n| format!("image {}: {n}", i + 1)));
        out.push(Planned { layers, kept, notes });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::closure::test_node as node;

    fn every_path_once(g: &ClosureGraph, layers: &[Vec<String>]) {
        let mut all: Vec<&String> = layers.iter().flatten().collect();
        all.sort();
        let mut want: Vec<&String> = g.nodes.iter().map(|n| &n.path).collect();
        want.sort();
        assert_eq!(all, want);
    }

    fn sample() -> ClosureGraph {
        ClosureGraph {
            nodes: vec![
                node("a1-app", &["b1-priv", "c1-runtime", "d1-libc"], 100),
                node("b1-priv", &["d1-libc"], 500),
                node("c1-runtime", &["d1-libc", "e1-tiny", "f1-tiny"], 1000),
                node("d1-libc", &[], 2000),
                node("e1-tiny", &["d1-libc"], 10),
                node("f1-tiny", &["d1-libc"], 10),
            ],
        }
    }

    #[test]
    fn sketches_count_closures_exactly_when_small() {
        let g = sample();
        let gg = Graph::new(&g);
        let counts: Vec<f64> = gg.sketch.iter().map(|s| estimate(s)).collect();
        assert_eq!(counts, [6.0, 2.0, 4.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn sketches_estimate_large_closures() {
        // A chain of 5,000 paths: the top's closure holds all of them.
        let n = 5000;
        let nodes = (0..n)
            .map(|i| {
                let refs: Vec<String> = if i > 0 { vec![format!("p{}", i - 1)] } else { vec![] };
                node(&format!("p{i}"), &refs.iter().map(String::as_str).collect::<Vec<_>>(), 1)
            })
            .collect();
        let g = ClosureGraph { nodes };
        let gg = Graph::new(&g);
        let top = estimate(&gg.sketch[n - 1]);
        assert!((top - n as f64).abs() < n as f64 * 0.35, "estimate {top} for {n}");
        assert_eq!(estimate(&gg.sketch[10]), 11.0);
    }

    #[test]
    fn cycles_share_one_closure() {
        let g = ClosureGraph {
            nodes: vec![node("a-x", &["b-y"], 1), node("b-y", &["a-x", "c-z"], 1), node("c-z", &[], 1)],
        };
        let gg = Graph::new(&g);
        assert_eq!(estimate(&gg.sketch[0]), 3.0);
        assert_eq!(estimate(&gg.sketch[1]), 3.0);
        assert_eq!(estimate(&gg.sketch[2]), 1.0);
    }

    #[test]
    fn the_app_stays_apart_and_large_paths_keep_what_only_they_use() {
        let g = sample();
        let p = plan(&g, &HashSet::new(), 5, None).unwrap();
        every_path_once(&g, &p.layers);
        // Half the budget is kept for what no large path claims; here only
        // the app and its private dependency are left for it, so a layer
        // stays unused.
        assert_eq!(p.layers.len(), 4, "{:?}", p.layers);
        assert_eq!(p.layers.last().unwrap(), &["/s/a1-app"], "{:?}", p.layers);
        assert!(p.layers.contains(&vec!["/s/b1-priv".to_string()]), "{:?}", p.layers);
        let runtime: Vec<String> = ["/s/c1-runtime", "/s/e1-tiny", "/s/f1-tiny"].map(String::from).into();
        assert!(p.layers.contains(&runtime), "what only the runtime uses rides with it: {:?}", p.layers);
        assert_eq!(p.layers[0], ["/s/d1-libc"], "the path everything uses at the bottom");
        let one = plan(&g, &HashSet::new(), 1, None).unwrap();
        assert_eq!(one.layers.len(), 1);
        every_path_once(&g, &one.layers);
        assert_eq!(plan(&g, &HashSet::new(), 0, None), Err(StableError::NoBudget));
    }

    /// libc; 40 packages on libc and two earlier ones (the last on the one
    /// before it and one half-way); 25 small private
    /// dependencies of the app (a few using each other); `extra` small
    /// paths only the app uses; the app on all of it.
    fn service(extra: usize) -> ClosureGraph {
        let mut nodes = vec![node("l0-libc", &[], 2_000_000)];
        let mut app_refs: Vec<String> = Vec::new();
        for i in 0..40u64 {
            let mut refs = vec!["l0-libc".to_string()];
            if i >= 2 {
                refs.push(format!("p{}-pkg{}", i - 1, i - 1));
                refs.push(format!("p{}-pkg{}", i / 2, i / 2));
            }
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            nodes.push(node(&format!("p{i}-pkg{i}"), &refs, 50_000 + (i * 7919 % 40) * 60_000));
            if i % 3 == 0 {
                app_refs.push(format!("p{i}-pkg{i}"));
            }
        }
        for i in 0..25u64 {
            let pkg = format!("p{}-pkg{}", i % 40, i % 40);
            let mut refs = vec!["l0-libc".to_string(), pkg];
            if i % 5 != 0 && i > 0 {
                refs.push(format!("q{}-priv{}", i - 1, i - 1));
            }
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            nodes.push(node(&format!("q{i}-priv{i}"), &refs, 10_000 + i * 1_000));
            app_refs.push(format!("q{i}-priv{i}"));
        }
        for i in 0..extra {
            nodes.push(node(&format!("x{i}-extra{i}"), &["l0-libc"], 20_000 + i as u64 * 1_000));
            app_refs.push(format!("x{i}-extra{i}"));
        }
        let refs: Vec<&str> = app_refs.iter().map(String::as_str).collect();
        nodes.push(node("a0-app", &refs, 80_000));
        ClosureGraph { nodes }
    }

    #[test]
    fn a_path_added_at_the_top_leaves_the_large_paths_layers_alone() {
        // A small path added (smaller than any large path, so auto-layer's
        // choice of large paths stands) regroups only what the large paths
        // leave unclaimed: the app's own part of the closure.
        for (budget, added) in [8, 12, 16, 20, 30, 40].into_iter().flat_map(|b| [(b, 1), (b, 2), (b, 3)]) {
            let (one, two) = (service(0), service(added));
            let before = plan(&one, &HashSet::new(), budget, None).unwrap().layers;
            let after = plan(&two, &HashSet::new(), budget, None).unwrap().layers;
            every_path_once(&two, &after);
            assert!(after.len() <= budget);
            assert_eq!(after.last().unwrap(), &["/s/a0-app"], "{budget}: {after:?}");
            let unclaimed: HashSet<String> =
                crate::planner::autolayer::auto_layer(&two, &HashSet::new(), budget - budget / 2)
                    .pop()
                    .unwrap()
                    .into_iter()
                    .collect();
            assert!(unclaimed.contains("/s/x0-extra0") && unclaimed.contains("/s/a0-app"));
            let own = |p: &String| unclaimed.contains(p);
            for layer in before.iter().filter(|l| !l.iter().any(own)) {
                assert!(after.contains(layer), "{budget}, {added}: {layer:?} was regrouped: {before:?} → {after:?}");
            }
            let size = two.nar_sizes();
            let sent: u64 = after.iter().filter(|l| !before.contains(l)).flatten().map(|p| size[p.as_str()]).sum();
            let top: u64 = two.nodes.iter().filter(|n| own(&n.path)).map(|n| n.nar_size).sum();
            assert!(sent <= top, "{budget}, {added}: {sent} bytes sent again, more than the app's own {top}");
        }
    }

    #[test]
    fn what_nothing_uses_has_a_layer_of_its_own() {
        // Five paths in four layers: the cheapest company for the app is
        // the tiny path only it uses (next to it in volatility order), but
        // the app is what every release changes, so it stays alone.
        let g = ClosureGraph {
            nodes: vec![
                node("a1-app", &["d1-libc", "p2-big", "p3-big", "z1-tiny"], 100),
                node("d1-libc", &[], 1_000_000),
                node("p2-big", &["d1-libc"], 1000),
                node("p3-big", &["d1-libc"], 1000),
                node("z1-tiny", &["d1-libc"], 1),
            ],
        };
        let p = plan(&g, &HashSet::new(), 4, None).unwrap();
        every_path_once(&g, &p.layers);
        assert_eq!(p.layers.len(), 4);
        assert_eq!(p.layers.last().unwrap(), &["/s/a1-app"], "{:?}", p.layers);
        // With too few layers for that, the app may share one.
        let p = plan(&g, &HashSet::new(), 2, None).unwrap();
        every_path_once(&g, &p.layers);
        assert_eq!(p.layers.len(), 2);
    }

    #[test]
    fn previous_layers_are_kept_in_order_at_the_bottom() {
        let g = sample();
        let prev: Vec<Vec<String>> = vec![
            vec!["/s/d1-libc".into()],
            vec!["/s/old-gone".into()],
            vec!["/s/f1-tiny".into(), "/s/e1-tiny".into()],
            vec!["/s/c1-runtime".into(), "/s/b1-priv".into()],
        ];
        let p = plan(&g, &HashSet::new(), 5, Some(&prev)).unwrap();
        assert_eq!(p.kept, 3);
        assert_eq!(p.layers[..3], [prev[0].clone(), prev[2].clone(), prev[3].clone()]);
        assert_eq!(p.layers[3..], [vec!["/s/a1-app".to_string()]]);
        every_path_once(&g, &p.layers);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn a_full_budget_lets_previous_layers_go_and_says_so() {
        let g = sample();
        let prev: Vec<Vec<String>> =
            ["/s/d1-libc", "/s/e1-tiny", "/s/f1-tiny", "/s/c1-runtime"].iter().map(|p| vec![p.to_string()]).collect();
        // Budget 4, four previous layers whole: app and priv deserve two
        // layers (the app apart), so the two topmost kept layers go (the
        // least pulled again).
        let p = plan(&g, &HashSet::new(), 4, Some(&prev)).unwrap();
        every_path_once(&g, &p.layers);
        assert_eq!(p.layers.len(), 4);
        assert_eq!(p.kept, 2, "{:?}", p.layers);
        assert_eq!(p.layers[..2], prev[..2]);
        assert_eq!(p.layers[3], ["/s/a1-app"]);
        assert!(p.notes[0].contains("let go of 2 of the previous layers"), "{:?}", p.notes);

        // A broken layer low in the stack: above it, the smallest kept
        // layer goes, so that what is new gets two layers.
        let mut prev = prev;
        prev.insert(1, vec!["/s/old-gone".into()]);
        let p = plan(&g, &HashSet::new(), 5, Some(&prev)).unwrap();
        every_path_once(&g, &p.layers);
        assert_eq!(p.kept, 3, "{:?}", p.layers);
        assert_eq!(p.layers[..3], [prev[0].clone(), prev[2].clone(), prev[4].clone()]);
        assert_eq!(p.layers.len(), 5);
    }

    #[test]
    fn a_smaller_budget_than_the_previous_plan_is_kept() {
        // The same closure, a previous plan of six layers, a budget of 3:
        // two previous layers stay, the rest share the third.
        let g = sample();
        let prev: Vec<Vec<String>> = g.nodes.iter().map(|n| vec![n.path.clone()]).collect();
        let p = plan(&g, &HashSet::new(), 3, Some(&prev)).unwrap();
        every_path_once(&g, &p.layers);
        assert_eq!(p.layers.len(), 3, "{:?}", p.layers);
        assert_eq!(p.kept, 2);
        assert!(p.notes[0].contains("to fit within a budget of 3 layers"), "{:?}", p.notes);
    }

    #[test]
    fn layers_are_stacked_by_odds_of_change_per_byte() {
        // Two paths only the app uses: a big one that changes rarely and a
        // small one that changes often.  Volatility order would put the
        // big one on top (its closure is the more volatile: it pulls in a
        // volatile helper); a host pulls less with the small one on top.
        let g = ClosureGraph {
            nodes: vec![
                node("a1-app", &["b1-big", "s1-small"], 10),
                node("b1-big", &["h1-helper"], 10_000_000),
                node("h1-helper", &[], 10),
                node("s1-small", &[], 10),
            ],
        };
        let p = plan(&g, &HashSet::new(), 3, None).unwrap();
        every_path_once(&g, &p.layers);
        let gg = Graph::new(&g);
        let at = |name: &str| p.layers.iter().position(|l| l.iter().any(|x| x.ends_with(name))).unwrap();
        let v = |name: &str| {
            let i = gg.paths.iter().position(|x| x.ends_with(name)).unwrap();
            gg.volatility(&gg.sketch[i])
        };
        assert!(v("b1-big") > v("s1-small"), "the case needs the two orders to disagree");
        assert!(at("s1-small") > at("b1-big"), "{:?}", p.layers);
    }

    #[test]
    fn nothing_reusable_is_said() {
        let g = sample();
        let prev = vec![vec!["/s/zz-gone".to_string()]];
        let p = plan(&g, &HashSet::new(), 5, Some(&prev)).unwrap();
        assert_eq!(p.kept, 0);
        assert!(p.notes[0].contains("none of the 1 previous layers"), "{:?}", p.notes);
        assert_eq!(p.layers, plan(&g, &HashSet::new(), 5, None).unwrap().layers);
    }

    #[test]
    fn excluded_paths_are_left_out_and_break_previous_layers() {
        let g = sample();
        let ex: HashSet<String> = ["/s/e1-tiny".to_string()].into();
        let prev = vec![vec!["/s/e1-tiny".to_string(), "/s/f1-tiny".to_string()]];
        let p = plan(&g, &ex, 3, Some(&prev)).unwrap();
        assert_eq!(p.kept, 0);
        assert!(!p.layers.iter().flatten().any(|x| x == "/s/e1-tiny"));
        assert_eq!(p.layers.iter().flatten().count(), 5);
    }

    #[test]
    fn joint_plans_share_the_common_bottom() {
        let a = sample();
        let mut b = sample();
        b.nodes[0] = node("a2-other", &["c1-runtime"], 300);
        b.nodes.remove(1);
        let plans = plan_joint(&[a.clone(), b.clone()], &HashSet::new(), 4, None).unwrap();
        every_path_once(&a, &plans[0].layers);
        every_path_once(&b, &plans[1].layers);
        assert!(plans.iter().all(|p| p.layers.len() <= 4));
        let shared: Vec<&Vec<String>> =
            plans[0].layers.iter().zip(&plans[1].layers).take_while(|(x, y)| x == y).map(|(x, _)| x).collect();
        let shared_paths: HashSet<&String> = shared.iter().copied().flatten().collect();
        assert_eq!(shared_paths.len(), 4, "libc, runtime and the tiny ones: {plans:?}");
        assert!(matches!(plan_joint(&[a], &HashSet::new(), 4, None), Err(StableError::JointNeedsTwo(1))));
    }

    #[test]
    fn with_too_few_layers_for_the_app_apart_nothing_whole_is_let_go() {
        // Three layers: the app cannot stand apart (a quarter of the
        // budget), so a changed app breaks its layer and nothing else.
        let one = service(0);
        let first = plan(&one, &HashSet::new(), 3, None).unwrap().layers;
        let mut two = one.clone();
        for n in &mut two.nodes {
            for p in std::iter::once(&mut n.path).chain(n.references.iter_mut()) {
                if p == "/s/a0-app" {
                    *p = "/s/z0-app".into();
                }
            }
        }
        let next = plan(&two, &HashSet::new(), 3, Some(&first)).unwrap();
        let whole = first.iter().filter(|l| !l.contains(&"/s/a0-app".to_string())).count();
        assert_eq!(next.kept, whole, "{:?}", next.notes);
        assert!(next.notes.is_empty(), "{:?}", next.notes);
    }

    #[test]
    fn with_more_layers_than_paths_the_apps_own_paths_sit_on_top() {
        // Every path a layer of its own: a changed private dependency (and
        // so the app) makes a host pull little more than those two.
        let one = service(0);
        let budget = 150;
        let first = plan(&one, &HashSet::new(), budget, None).unwrap().layers;
        assert_eq!(first.len(), one.nodes.len(), "a layer per path");
        let mut two = one.clone();
        for n in &mut two.nodes {
            for p in std::iter::once(&mut n.path).chain(n.references.iter_mut()) {
                if p == "/s/a0-app" || p == "/s/q24-priv24" {
                    *p = p.replace("/s/", "/s/z");
                }
            }
        }
        let next = plan(&two, &HashSet::new(), budget, Some(&first)).unwrap().layers;
        let size = two.nar_sizes();
        let c = crate::planner::compare::compare(&next, &first, &size);
        let changed = size["/s/za0-app"] + size["/s/zq24-priv24"];
        assert_eq!(c.pushed, changed);
        assert!(c.pulled <= 4 * changed, "pulled {} for {changed} changed: {first:?}", c.pulled);
    }

    #[test]
    fn joint_plans_build_on_each_images_previous_plan() {
        // Two services on one runtime; then the first one's app and
        // private dependency change.
        let a = service(0);
        let mut b = service(0);
        b.nodes.retain(|n| !n.path.contains("-priv") && !n.path.contains("-app"));
        b.nodes.push(node("b0-other", &["p39-pkg39", "p12-pkg12"], 90_000));
        let budget = 40;
        let first = plan_joint(&[a.clone(), b.clone()], &HashSet::new(), budget, None).unwrap();
        let previous: Vec<Vec<Vec<String>>> = first.iter().map(|p| p.layers.clone()).collect();
        let mut a2 = a.clone();
        for n in &mut a2.nodes {
            for p in std::iter::once(&mut n.path).chain(n.references.iter_mut()) {
                if p == "/s/a0-app" || p == "/s/q7-priv7" {
                    *p = p.replace("/s/", "/s/z");
                }
            }
        }
        let next = plan_joint(&[a2.clone(), b.clone()], &HashSet::new(), budget, Some(&previous)).unwrap();
        every_path_once(&a2, &next[0].layers);
        every_path_once(&b, &next[1].layers);
        assert!(next.iter().all(|p| p.layers.len() <= budget));
        // The second image is unchanged: its plan is its previous one.
        assert_eq!(next[1].layers, previous[1], "{:?}", next[1].notes);
        assert_eq!(next[1].kept, previous[1].len());
        // The shared layers are those of before, at the bottom of both.
        let shared = previous[0].iter().zip(&previous[1]).take_while(|(x, y)| x == y).count();
        assert!(shared > 0);
        assert_eq!(next[0].layers[..shared], previous[0][..shared]);
        assert!(next[0].kept >= shared);
        // Above them, the first image keeps what it can of its own layers.
        let own_kept = next[0].layers[shared..].iter().filter(|l| previous[0][shared..].contains(l)).count();
        assert!(own_kept > 0, "{:?} → {:?}", &previous[0][shared..], &next[0].layers[shared..]);
        // A third image joins (it has no previous plan): the shared layers
        // of the two that have one stay.
        let mut c = b.clone();
        c.nodes.retain(|n| !n.path.contains("-other"));
        c.nodes.push(node("c0-third", &["p20-pkg20"], 70_000));
        let three = [a2.clone(), b.clone(), c];
        let with_third = [previous[0].clone(), previous[1].clone(), Vec::new()];
        let next3 = plan_joint(&three, &HashSet::new(), budget, Some(&with_third)).unwrap();
        let kept_shared = next3[1].layers.iter().filter(|l| previous[1][..shared].contains(l)).count();
        assert!(kept_shared * 2 > shared, "{kept_shared} of {shared} shared layers kept: {:?}", next3[1].notes);
        let err = plan_joint(&[a2, b], &HashSet::new(), budget, Some(&previous[..1])).unwrap_err();
        assert_eq!(err, StableError::JointPrevious { images: 2, plans: 1 });
    }

    /// Two roots (`nixstream image ./app /nix/store/...-tool`): the layer
    /// split for the application's part is the one of what no large path
    /// claims, not the large tool's, which auto-layer orders last.
    #[test]
    fn with_two_roots_the_application_part_is_split() {
        let mut nodes = vec![node("l0-libc", &[], 2_000_000), node("t0-tool", &["l0-libc"], 50_000_000)];
        let mut app_refs = vec!["l0-libc".to_string()];
        for i in 0..11u64 {
            let p = format!("p{i}-priv{i}");
            nodes.push(node(&p, &["l0-libc"], 10_000 + 1_000 * i));
            app_refs.push(p);
        }
        let refs: Vec<&str> = app_refs.iter().map(String::as_str).collect();
        nodes.push(node("a0-app", &refs, 100));
        let g = ClosureGraph { nodes };
        let p = plan(&g, &HashSet::new(), 8, None).unwrap();
        every_path_once(&g, &p.layers);
        assert!(p.layers.len() <= 8);
        assert!(p.layers.contains(&vec!["/s/a0-app".to_string()]), "the application apart: {:?}", p.layers);
        let with_priv = p.layers.iter().filter(|l| l.iter().any(|x| x.contains("-priv"))).count();
        assert!(with_priv > 1, "its private dependencies in more than one layer: {:?}", p.layers);
    }

    /// Random pairs of closures on a common base, with sizes drawn from a
    /// few values so that ties are common: the shared layers are the same
    /// whichever image is named first, and the same whether or not the
    /// other image has a previous plan.
    #[test]
    fn joint_plans_do_not_depend_on_the_order_of_the_images() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for case in 0..200 {
            let shared_count = 2 + next(6) as usize;
            let mut base: Vec<crate::input::closure::Node> = Vec::new();
            for i in 0..shared_count {
                let refs: Vec<String> = (0..i).filter(|_| next(3) == 0).map(|j| format!("s{j}-lib{j}")).collect();
                let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                base.push(node(&format!("s{i}-lib{i}"), &refs, 100 * (1 + next(3))));
            }
            let image = |name: &str, own: usize, next: &mut dyn FnMut(u64) -> u64| {
                let mut nodes = base.clone();
                let mut top: Vec<String> = (0..shared_count).map(|j| format!("s{j}-lib{j}")).collect();
                for k in 0..own {
                    let p = format!("o{k}-{name}own{k}");
                    let j = next(shared_count as u64);
                    let dep = format!("s{j}-lib{j}");
                    nodes.push(node(&p, &[dep.as_str()], 100 * (1 + next(3))));
                    top.push(p);
                }
                let refs: Vec<&str> = top.iter().map(String::as_str).collect();
                nodes.push(node(&format!("r0-{name}"), &refs, 10));
                ClosureGraph { nodes }
            };
            let a = image("a", 1 + next(4) as usize, &mut next);
            let b = image("b", 1 + next(4) as usize, &mut next);
            let budget = 3 + next(6) as usize;
            let ab = plan_joint(&[a.clone(), b.clone()], &HashSet::new(), budget, None).unwrap();
            let ba = plan_joint(&[b.clone(), a.clone()], &HashSet::new(), budget, None).unwrap();
            assert_eq!(ab[0].layers, ba[1].layers, "case {case}: a");
            assert_eq!(ab[1].layers, ba[0].layers, "case {case}: b");
            // On a's previous plan only, a's own layers are kept too.
            let prev = [ab[0].layers.clone(), Vec::new()];
            let again = plan_joint(&[a.clone(), b.clone()], &HashSet::new(), budget, Some(&prev)).unwrap();
            assert_eq!(again[0].layers, ab[0].layers, "case {case}: a on its own previous plan");
            assert_eq!(again[0].kept, ab[0].layers.len(), "case {case}");
        }
    }

    /// Two roots released together on a full previous plan: room is made
    /// for each to stand apart from their changed dependency.
    #[test]
    fn two_changed_roots_get_a_layer_each() {
        let libs = ["l1-lib1", "l2-lib2", "l3-lib3", "l4-lib4", "l5-lib5"];
        let release = |v: u32| {
            let mut nodes = vec![node("l0-libc", &[], 2_000_000)];
            nodes.extend(libs.iter().map(|l| node(l, &["l0-libc"], 500_000)));
            let p = format!("p{v}-priv");
            nodes.push(node(&p, &["l0-libc"], 50_000));
            let mut refs: Vec<&str> = libs.to_vec();
            refs.push(&p);
            nodes.push(node(&format!("a{v}-app"), &refs, 1_000));
            nodes.push(node(&format!("b{v}-tool"), &refs, 1_000));
            ClosureGraph { nodes }
        };
        let s = |p: &str| format!("/s/{p}");
        let mut previous: Vec<Vec<String>> = vec![vec![s("l0-libc")]];
        previous.extend(libs.iter().map(|l| vec![s(l)]));
        previous.push(vec![s("p0-priv")]);
        previous.push(vec![s("a0-app"), s("b0-tool")]);
        let g = release(1);
        let p = plan(&g, &HashSet::new(), 8, Some(&previous)).unwrap();
        every_path_once(&g, &p.layers);
        assert!(p.layers.len() <= 8);
        let n = p.layers.len();
        assert_eq!(p.layers[n - 2..], [vec![s("a1-app")], vec![s("b1-tool")]], "{:?}", p.layers);
    }
}
