//! nixpkgs' size-based auto-layer (the default of current nixpkgs'
//! `streamLayeredImage`), with the same result for the same input.
//!
//! The largest store path not yet chosen becomes the primary path of a new
//! layer; each of its dependencies moves to that layer unless something that
//! does not depend on the new primary path also uses it; more generally, a
//! path's layer is identified by the set of primary paths that claim it.  The
//! loop stops just before the number of distinct layers would exceed the
//! limit.  Layers list their paths by (name, hash) and are ordered by closure
//! size.  Where the reference leaves an order to Python's set iteration
//! (layers of exactly equal closure size), we break the tie by the layers'
//! sorted paths so the result is reproducible.
//!
//! Each iteration changes only the entries of the new primary path and its
//! dependencies; those changes are kept in an undo list and the number of
//! distinct layers is maintained incrementally, so planning costs about the
//! total size of the dependency sets visited, not a copy of the whole map per
//! iteration.

use std::collections::{HashMap, HashSet};

use crate::input::closure::ClosureGraph;

/// `path_key`: (name, hash) for `/nix/store/HASH-name`.
fn path_key(path: &str) -> (&str, &str) {
    match path.split_once('-') {
        Some((hash, name)) => (name, hash),
        None => ("", path),
    }
}

fn closure_of(starts: &[u32], adj: &[Vec<u32>], mark: &mut [u32], stamp: u32, out: &mut Vec<u32>) {
    out.clear();
    let mut stack: Vec<u32> = starts.to_vec();
    while let Some(v) = stack.pop() {
        if mark[v as usize] != stamp {
            mark[v as usize] = stamp;
            out.push(v);
            stack.extend(adj[v as usize].iter().copied().filter(|&w| mark[w as usize] != stamp));
        }
    }
}

/// Splits the closure into at most `limit` layers (fewer when the closure is
/// small); `ignore` paths are left out of the result (but still shape it).
pub fn auto_layer(graph: &ClosureGraph, ignore: &HashSet<String>, limit: usize) -> Vec<Vec<String>> {
    auto_layer_parts(graph, ignore, limit).layers
}

/// Auto-layer's layers, and which of them holds what no primary path
/// claims (the roots that are no primary path, with what only they use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoLayers {
    pub layers: Vec<Vec<String>>,
    /// The index in `layers` of the unclaimed paths' layer, if any is left
    /// (none when every path became a primary path).
    pub unclaimed: Option<usize>,
}

/// [`auto_layer`], saying which layer is the unclaimed one: with a single
/// root it is the last (its closure is the whole), with several not always.
pub fn auto_layer_parts(graph: &ClosureGraph, ignore: &HashSet<String>, limit: usize) -> AutoLayers {
    let n = graph.nodes.len();
    let index = graph.index();
    let refs: Vec<Vec<u32>> =
        graph.nodes.iter().map(|node| node.references.iter().map(|r| index[r.as_str()] as u32).collect()).collect();
    let mut users: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (u, rs) in refs.iter().enumerate() {
        for &r in rs {
            users[r as usize].push(u as u32);
        }
    }
    // nodes_by_size, popped from the end: largest first, later ties first.
    let mut by_size: Vec<u32> = (0..n as u32).collect();
    by_size.sort_by_key(|&i| graph.nodes[i as usize].nar_size);

    // split[path] = sorted set of primary paths that claim it.
    let mut split: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    if n > 0 {
        counts.insert(Vec::new(), n);
    }
    let mut dep_mark = vec![u32::MAX; n];
    let mut user_mark = vec![u32::MAX; n];
    let (mut deps, mut users_of) = (Vec::new(), Vec::new());
    let mut undo: Vec<(u32, Vec<u32>)> = Vec::new();

    let set_entry = |split: &mut Vec<Vec<u32>>, counts: &mut HashMap<Vec<u32>, usize>, i: u32, new: Vec<u32>| {
        let old = std::mem::replace(&mut split[i as usize], new.clone());
        if let Some(c) = counts.get_mut(&old) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&old);
            }
        }
        *counts.entry(new).or_insert(0) += 1;
        old
    };

    for (iteration, p) in by_size.iter().rev().copied().enumerate() {
        let stamp = iteration as u32;
        closure_of(&[p], &refs, &mut dep_mark, stamp, &mut deps);
        closure_of(&[p], &users, &mut user_mark, stamp, &mut users_of);
        // dependencies() excludes the path itself.
        dep_mark[p as usize] = u32::MAX;
        user_mark[p as usize] = u32::MAX;
        undo.clear();
        undo.push((p, set_entry(&mut split, &mut counts, p, vec![p])));
        for &d in &deps {
            if d == p {
                continue;
            }
            let cur = &split[d as usize];
            let mut new: Vec<u32> = cur.iter().copied().filter(|&x| user_mark[x as usize] != stamp).collect();
            if !new.iter().any(|&x| dep_mark[x as usize] == stamp) {
                if let Err(pos) = new.binary_search(&p) {
                    new.insert(pos, p);
                }
            }
            if new != *cur {
                undo.push((d, set_entry(&mut split, &mut counts, d, new)));
            }
        }
        if counts.len() > limit {
            for (i, old) in undo.drain(..).rev() {
                set_entry(&mut split, &mut counts, i, old);
            }
            break;
        }
    }

    // Group into layers.
    let mut groups: HashMap<&[u32], Vec<u32>> = HashMap::new();
    for (i, id) in split.iter().enumerate() {
        groups.entry(id.as_slice()).or_default().push(i as u32);
    }
    let mut mark = vec![u32::MAX; n];
    let mut buf = Vec::new();
    let mut layers: Vec<(u64, Vec<&str>, bool)> = groups
        .into_iter()
        .enumerate()
        .map(|(k, (id, members))| {
            closure_of(&members, &refs, &mut mark, k as u32, &mut buf);
            let closure_size: u64 = buf.iter().map(|&v| graph.nodes[v as usize].nar_size).sum();
            let mut paths: Vec<&str> = members.iter().map(|&i| graph.nodes[i as usize].path.as_str()).collect();
            paths.sort_by(|a, b| path_key(a).cmp(&path_key(b)));
            (closure_size, paths, id.is_empty())
        })
        .collect();
    layers.sort_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| a.1.iter().map(|p| path_key(p)).cmp(b.1.iter().map(|p| path_key(p))))
    });
    let mut out = AutoLayers { layers: Vec::with_capacity(layers.len()), unclaimed: None };
    for (_, paths, unclaimed) in layers {
        let kept: Vec<String> = paths.into_iter().filter(|p| !ignore.contains(*p)).map(str::to_string).collect();
        if !kept.is_empty() {
            if unclaimed {
                out.unclaimed = Some(out.layers.len());
            }
            out.layers.push(kept);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::closure::test_node as node;

    #[test]
    fn big_paths_take_their_private_dependencies() {
        // app uses big and lib; big uses dep (only big) and lib.
        let g = ClosureGraph {
            nodes: vec![
                node("h1-app", &["h2-big", "h4-lib"], 10),
                node("h2-big", &["h3-dep", "h4-lib"], 1000),
                node("h3-dep", &[], 5),
                node("h4-lib", &[], 50),
            ],
        };
        // Room for three layers: big (with dep, which only big uses), lib
        // (app uses it too), app; ordered by closure size.
        let l = auto_layer(&g, &HashSet::new(), 3);
        assert_eq!(l, [vec!["/s/h4-lib"], vec!["/s/h2-big", "/s/h3-dep"], vec!["/s/h1-app"]]);
        // Room for all: every path becomes a primary path of its own.
        let l = auto_layer(&g, &HashSet::new(), 100);
        assert_eq!(l, [vec!["/s/h3-dep"], vec!["/s/h4-lib"], vec!["/s/h2-big"], vec!["/s/h1-app"]]);
        let l = auto_layer(&g, &HashSet::new(), 1);
        assert_eq!(l, [vec!["/s/h1-app", "/s/h2-big", "/s/h3-dep", "/s/h4-lib"]], "one layer: nothing split");
        let ignore: HashSet<String> = ["/s/h1-app".to_string()].into();
        let l = auto_layer(&g, &ignore, 3);
        assert_eq!(l.len(), 2, "a layer of ignored paths only disappears");
    }
}
