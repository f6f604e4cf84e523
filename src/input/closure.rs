//! Closure graphs: the store paths of an image, their references and sizes.
//!
//! Read from what Nix writes — `exportReferencesGraph` (`{"graph": [...]}` or
//! the older `{"closure": [...]}`), `nix path-info --json --recursive` (the
//! list form, and the object form keyed by path that newer Nix prints) — or
//! asked of the local Nix for one or more store paths.  Nodes keep the order
//! of an `exportReferencesGraph` file, because the reference planners' ties
//! depend on it; path-info output is put in the order exportReferencesGraph
//! would give (sorted by path).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("{0}")]
    Read(#[from] crate::input::limited::LimitedError),
    #[error("closure graph {path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("closure graph {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("asking Nix for the closure of {paths} failed: {what}")]
    Nix { paths: String, what: String },
    #[error("{path} is not in the Nix store ({store}): give a store path, a result link, or a closure graph file (`nix path-info --json --recursive` or exportReferencesGraph; - reads one from stdin)")]
    NotInStore { path: String, store: String },
}

/// The largest `narSize` taken (1 TiB): far above any store path, and
/// small enough that sums over 2^24 such paths (more than a closure graph
/// within its size limit can list) fit in a u64.
pub const MAX_NAR_SIZE: u64 = 1 << 40;

/// One store path of the closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub path: String,
    /// As given (may include the path itself).
    pub references: Vec<String>,
    pub nar_size: u64,
    pub closure_size: Option<u64>,
    /// `narHash`, when the graph gives it: the digest cache keys by it.
    pub nar_hash: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClosureGraph {
    pub nodes: Vec<Node>,
}

impl ClosureGraph {
    /// Reads a closure graph file in any of the accepted forms (`-`:
    /// standard input).
    pub fn load(path: &Path) -> Result<ClosureGraph, ClosureError> {
        use crate::input::limited::{read_capped, read_capped_from, MAX_GRAPH};
        let bytes = match path == Path::new("-") {
            true => {
                read_capped_from(std::io::stdin().lock(), Path::new("(standard input)"), "closure graph", MAX_GRAPH)?
            }
            false => read_capped(path, "closure graph", MAX_GRAPH)?,
        };
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|source| ClosureError::Json { path: path.to_path_buf(), source })?;
        ClosureGraph::from_value(&v).map_err(|what| ClosureError::Invalid { path: path.to_path_buf(), what })
    }

    /// Parses any accepted form; the error says what is wrong where.
    pub fn from_value(v: &Value) -> Result<ClosureGraph, String> {
        let (list, sort) = match v {
            Value::Object(m) if m.contains_key("graph") => (m["graph"].clone(), false),
            Value::Object(m) if m.contains_key("closure") => (m["closure"].clone(), false),
            // `nix path-info --json` (Nix >= 2.19): an object keyed by path.
            Value::Object(m) => {
                let mut list = Vec::with_capacity(m.len());
                for (path, info) in m {
                    let mut info = match info {
                        Value::Object(o) => o.clone(),
                        Value::Null => return Err(format!("{path} is not valid in the store (path-info gave null)")),
                        _ => return Err(format!("{path}: expected an object")),
                    };
                    info.insert("path".into(), Value::String(path.clone()));
                    list.push(Value::Object(info));
                }
                (Value::Array(list), true)
            }
            // `nix path-info --json` (older Nix): a list.
            Value::Array(_) => (v.clone(), true),
            _ => return Err("expected {\"graph\": [...]}, {\"closure\": [...]} or nix path-info JSON".into()),
        };
        let items = list.as_array().ok_or("the node list is not a list")?;
        let mut nodes = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |what: &str| format!("node {i}: {what}");
            let o = item.as_object().ok_or_else(|| at("not an object"))?;
            let path = o.get("path").and_then(Value::as_str).ok_or_else(|| at("\"path\" missing or not a string"))?;
            let refs = o
                .get("references")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{path}: \"references\" missing or not a list"))?
                .iter()
                .map(|r| r.as_str().map(str::to_string).ok_or_else(|| format!("{path}: a reference is not a string")))
                .collect::<Result<Vec<_>, _>>()?;
            // Sizes are summed over whole closures: see MAX_NAR_SIZE.
            let nar_size = o
                .get("narSize")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("{path}: \"narSize\" missing or not a non-negative integer"))?;
            if nar_size > MAX_NAR_SIZE {
                return Err(format!(
                    "{path}: \"narSize\" {nar_size} is larger than any store path (at most {MAX_NAR_SIZE})"
                ));
            }
            let closure_size = o.get("closureSize").and_then(Value::as_u64);
            let nar_hash = o.get("narHash").and_then(Value::as_str).map(str::to_string);
            nodes.push(Node { path: path.to_string(), references: refs, nar_size, closure_size, nar_hash });
        }
        if sort {
            nodes.sort_by(|a, b| a.path.cmp(&b.path));
        }
        let g = ClosureGraph { nodes };
        g.check()?;
        Ok(g)
    }

    /// Every path once; every reference names a node.
    fn check(&self) -> Result<(), String> {
        let mut seen: HashMap<&str, ()> = HashMap::with_capacity(self.nodes.len());
        for n in &self.nodes {
            if seen.insert(&n.path, ()).is_some() {
                return Err(format!("{} appears twice", n.path));
            }
        }
        for n in &self.nodes {
            if let Some(r) = n.references.iter().find(|r| !seen.contains_key(r.as_str())) {
                return Err(format!(
                    "{} references {r}, which is not in the graph (the closure is incomplete)",
                    n.path
                ));
            }
        }
        Ok(())
    }

    /// Asks the local Nix for the closure of `paths`
    /// (`nix path-info --json --recursive --closure-size`).
    pub fn from_store(paths: &[String]) -> Result<ClosureGraph, ClosureError> {
        let joined = paths.join(" ");
        let nix_err = |what: String| ClosureError::Nix { paths: joined.clone(), what };
        let out = Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                "--recursive",
                "--closure-size",
            ])
            .args(paths)
            .output()
            .map_err(|e| nix_err(format!("cannot run nix: {e} (is Nix installed?)")))?;
        if !out.status.success() {
            // Nix reads a path outside the store as a flake: say what it is.
            let store = std::env::var("NIX_STORE_DIR").unwrap_or_else(|_| "/nix/store".into());
            let outside = paths.iter().find(|p| {
                let p = Path::new(p);
                p.exists() && std::fs::canonicalize(p).is_ok_and(|c| !c.starts_with(&store))
            });
            if let Some(p) = outside {
                return Err(ClosureError::NotInStore { path: p.clone(), store });
            }
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(nix_err(err.lines().last().unwrap_or("nix path-info failed").to_string()));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| nix_err(format!("unreadable output: {e}")))?;
        ClosureGraph::from_value(&v).map_err(nix_err)
    }

    /// Each path's narSize.
    pub fn nar_sizes(&self) -> HashMap<&str, u64> {
        self.nodes.iter().map(|n| (n.path.as_str(), n.nar_size)).collect()
    }

    pub fn index(&self) -> HashMap<&str, usize> {
        self.nodes.iter().enumerate().map(|(i, n)| (n.path.as_str(), i)).collect()
    }
}

/// A node `/s/{p}` referring to `/s/{r}...`, of narSize `s`: for the
/// planners' tests.
#[cfg(test)]
pub(crate) fn test_node(p: &str, r: &[&str], s: u64) -> Node {
    Node {
        path: format!("/s/{p}"),
        references: r.iter().map(|x| format!("/s/{x}")).collect(),
        nar_size: s,
        closure_size: None,
        nar_hash: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_every_form() {
        let node = |p: &str, r: &[&str], s: u64| json!({"path": p, "references": r, "narSize": s});
        let g1 =
            ClosureGraph::from_value(&json!({"graph": [node("/s/b", &["/s/a"], 2), node("/s/a", &[], 1)]})).unwrap();
        assert_eq!(g1.nodes[0].path, "/s/b", "exportReferencesGraph order kept");
        let g2 = ClosureGraph::from_value(&json!({"closure": [node("/s/a", &[], 1)]})).unwrap();
        assert_eq!(g2.nodes.len(), 1);
        let g3 = ClosureGraph::from_value(&json!([node("/s/b", &["/s/a"], 2), node("/s/a", &[], 1)])).unwrap();
        assert_eq!(g3.nodes[0].path, "/s/a", "path-info sorted by path");
        let g4 = ClosureGraph::from_value(
            &json!({"/s/b": {"references": ["/s/a"], "narSize": 2}, "/s/a": {"references": [], "narSize": 1}}),
        )
        .unwrap();
        assert_eq!(g4, g3);
    }

    #[test]
    fn incomplete_or_malformed_graphs_are_named() {
        let e = ClosureGraph::from_value(&json!({"graph": [{"path": "/s/a", "references": ["/s/x"], "narSize": 1}]}))
            .unwrap_err();
        assert!(e.contains("/s/x") && e.contains("incomplete"), "{e}");
        let e = ClosureGraph::from_value(&json!({"graph": [{"path": "/s/a", "references": []}]})).unwrap_err();
        assert!(e.contains("narSize"), "{e}");
        let huge = json!({"graph": [{"path": "/s/a", "references": [], "narSize": u64::MAX}]});
        let e = ClosureGraph::from_value(&huge).unwrap_err();
        assert!(e.contains("is larger than any store path"), "{e}");
        let e = ClosureGraph::from_value(&json!({"/s/a": null})).unwrap_err();
        assert!(e.contains("not valid"), "{e}");
    }
}
