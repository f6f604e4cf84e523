//! The layering-pipeline parser and interpreter on a small closure with a
//! reference cycle: any JSON, no panic; every plan it returns holds each
//! store path at most once.
#![no_main]
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use nixstream::input::closure::ClosureGraph;
use nixstream::planner::pipeline;

fn graph() -> ClosureGraph {
    let node = |p: &str, refs: &[&str], size: u64| {
        serde_json::json!({"path": format!("/nix/store/{p}"), "narSize": size, "narHash": "sha256:0",
            "references": refs.iter().map(|r| format!("/nix/store/{r}")).collect::<Vec<_>>()})
    };
    let v = serde_json::json!({"graph": [
        node("aaaa-app", &["bbbb-lib", "cccc-libc", "dddd-data"], 100),
        node("bbbb-lib", &["cccc-libc"], 50),
        node("cccc-libc", &["eeee-gcc"], 300),
        node("eeee-gcc", &["cccc-libc"], 70),
        node("dddd-data", &[], 1000),
        node("ffff-tool", &["cccc-libc"], 20),
    ]});
    ClosureGraph::from_value(&v).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(steps) = pipeline::parse(&v) else { return };
    if let Ok(layers) = pipeline::plan_layers(&graph(), &steps, &HashSet::new()) {
        let mut seen = HashSet::new();
        for p in layers.iter().flatten() {
            assert!(seen.insert(p.clone()), "{p} planned twice");
        }
    }
});
