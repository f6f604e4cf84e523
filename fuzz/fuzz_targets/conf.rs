//! The configuration parser: any bytes, no panic; a configuration it accepts
//! keeps the invariants the later stages rely on.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nixstream::input::conf::Conf;
use nixstream::input::isotime::DateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let now = DateTime::parse_iso("2024-01-02T03:04:05Z").unwrap();
    if let Ok(c) = Conf::from_value(v, None, now) {
        // Every accepted store path is absolute and free of `..`.
        for layer in &c.store_layers {
            for p in layer {
                assert!(p.is_absolute(), "{p:?}");
                assert!(!p.components().any(|c| c == std::path::Component::ParentDir), "{p:?}");
            }
        }
    }
});
