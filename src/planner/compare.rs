//! What a new plan costs against the previous release's: bytes pushed,
//! bytes a Docker host holding the previous image pulls, and bytes that
//! really changed.
//!
//! A layer is reused when the previous plan has a layer of exactly the same
//! store paths in the same order (same options, same bytes, same digest);
//! every other layer is pushed.  Docker keeps a layer by its position in the
//! stack (the ChainID), so a host pulls every layer from the first position
//! where the two plans differ.  The bytes that really changed are the
//! `narSize` of the new closure's paths the previous plan does not hold:
//! the floor no plan can go under.  Layer sizes are the sum of their paths'
//! `narSize`, which is close to, not equal to, the layer tar's size.

use std::collections::{HashMap, HashSet};

/// One layer of the new plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCost {
    pub bytes: u64,
    /// The previous plan has this very layer: not pushed.
    pub reused: bool,
    /// A host holding the previous image pulls it.
    pub pulled: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub layers: Vec<LayerCost>,
    pub pushed: u64,
    pub pulled: u64,
    pub changed: u64,
    pub total: u64,
}

impl Comparison {
    /// Bytes pushed per byte that really changed (1.0 is the floor; `None`
    /// when nothing changed).
    pub fn ratio(&self) -> Option<f64> {
        (self.changed > 0).then(|| self.pushed as f64 / self.changed as f64)
    }
}

/// Compares `new` with `old` (both bottom first); `size` gives each new
/// path's narSize.
pub fn compare(new: &[Vec<String>], old: &[Vec<String>], size: &HashMap<&str, u64>) -> Comparison {
    let old_layers: HashSet<&[String]> = old.iter().map(Vec::as_slice).collect();
    let old_paths: HashSet<&str> = old.iter().flatten().map(String::as_str).collect();
    let first_diff = new.iter().zip(old).take_while(|(a, b)| a == b).count();
    let bytes = |l: &[String]| l.iter().map(|p| size.get(p.as_str()).copied().unwrap_or(0)).sum::<u64>();
    let layers: Vec<LayerCost> = new
        .iter()
        .enumerate()
        .map(|(i, l)| LayerCost { bytes: bytes(l), reused: old_layers.contains(l.as_slice()), pulled: i >= first_diff })
        .collect();
    let changed = new
        .iter()
        .flatten()
        .filter(|p| !old_paths.contains(p.as_str()))
        .map(|p| size.get(p.as_str()).copied().unwrap_or(0))
        .sum();
    Comparison {
        pushed: layers.iter().filter(|l| !l.reused).map(|l| l.bytes).sum(),
        pulled: layers.iter().filter(|l| l.pulled).map(|l| l.bytes).sum(),
        total: layers.iter().map(|l| l.bytes).sum(),
        changed,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(ps: &[&str]) -> Vec<String> {
        ps.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn pushed_pulled_and_changed() {
        let size: HashMap<&str, u64> = [("/s/a", 100), ("/s/b", 10), ("/s/c2", 5), ("/s/d", 1000)].into();
        let old = vec![l(&["/s/a"]), l(&["/s/b", "/s/c1"]), l(&["/s/d"])];
        let new = vec![l(&["/s/a"]), l(&["/s/b", "/s/c2"]), l(&["/s/d"])];
        let c = compare(&new, &old, &size);
        assert_eq!(c.layers.iter().map(|x| x.reused).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!((c.pushed, c.pulled, c.changed, c.total), (15, 1015, 5, 1115));
        assert_eq!(c.ratio(), Some(3.0));
        let same = compare(&old[..1], &old[..1], &size);
        assert_eq!((same.pushed, same.pulled, same.changed, same.ratio()), (0, 0, 0, None));
    }
}
