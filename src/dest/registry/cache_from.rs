//! `--cache-from` as a push uses it: the layer annotations of an image
//! nixstream pushed ([`super::fetch_cache_hints`]) as where a store layer's
//! digests are looked up once the digest cache has missed.  A layer matches
//! by its content key (the engine's [`crate::engine::content_key`]) and an
//! encoded blob of this push's compression; its digests then carry
//! [`Origin::CacheFrom`], so the streaming pass, if it writes the layer,
//! blames the annotation and not the store when they are wrong.

use std::collections::HashMap;

use super::push::CacheHint;
use crate::engine::digest::LayerDigest;
use crate::engine::image::Compression;
use crate::engine::{Hashed, Lookup, Origin};
use crate::plan::ImagePlan;
use crate::store::walk::Listing;

/// The digest cache, then `--cache-from`'s hints: a store layer whose
/// content key (as the engine makes it for [`crate::engine::image::LayerInfo::key`])
/// is annotated on a layer of that image takes its digests from there.  The
/// streaming pass checks them if the layer is ever written; a layer the
/// registry already has is not read at all (see docs/push.md on trust).
#[derive(Debug)]
pub struct HintLookup<'a> {
    cache: Option<&'a dyn Lookup>,
    plan: &'a ImagePlan,
    nar_hashes: &'a HashMap<String, String>,
    compression: Compression,
    hints: HashMap<String, CacheHint>,
    /// `--cache-from`'s reference, for an error if a hint is wrong.
    from: String,
}

impl<'a> HintLookup<'a> {
    /// Looks layers of `plan` up in `cache` first, then in `hints` (read
    /// from the image `from` names); `nar_hashes` make the content keys.
    pub fn new(
        cache: Option<&'a dyn Lookup>,
        plan: &'a ImagePlan,
        nar_hashes: &'a HashMap<String, String>,
        compression: Compression,
        hints: Vec<CacheHint>,
        from: String,
    ) -> HintLookup<'a> {
        let hints = hints.into_iter().map(|h| (h.key.clone(), h)).collect();
        HintLookup { cache, plan, nar_hashes, compression, hints, from }
    }
}

impl Lookup for HintLookup<'_> {
    fn lookup(&self, layer: usize, listing: &Listing) -> Option<Hashed> {
        if let Some(hit) = self.cache.and_then(|c| c.lookup(layer, listing)) {
            return Some(hit);
        }
        if self.hints.is_empty() {
            return None;
        }
        let key = crate::engine::content_key(self.plan, layer, listing, self.nar_hashes, self.compression)?;
        let hint = self.hints.get(&key)?;
        // The key covers the compressor: another compression's media type
        // means the annotation was not written by this code.
        let ours = [Some(self.compression.oci_layer_media_type()), self.compression.docker_layer_media_type()];
        if !ours.contains(&Some(hint.blob.media_type.as_str())) {
            return None;
        }
        let digest = LayerDigest { size: hint.tar_size, sha256: hint.diff_id };
        let blob = LayerDigest { size: hint.blob.size, sha256: hint.blob.digest };
        Some(Hashed {
            digest,
            blob: (self.compression != Compression::None).then_some(blob),
            unchanged_before_ns: i128::MIN,
            files: None,
            origin: Origin::CacheFrom(self.from.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::image::Descriptor;
    use crate::plan::PlannedLayer;

    fn listing(plan: &ImagePlan, i: usize) -> &Listing {
        let PlannedLayer::Store { listing, .. } = &plan.layers[i] else { panic!("layer {i} is no store layer") };
        listing.get(1).unwrap()
    }

    /// A cache that knows layer 0 only.
    #[derive(Debug)]
    struct Layer0;

    impl Lookup for Layer0 {
        fn lookup(&self, layer: usize, _: &Listing) -> Option<Hashed> {
            (layer == 0).then(|| Hashed {
                digest: LayerDigest { size: 1, sha256: [1; 32] },
                blob: None,
                unchanged_before_ns: 0,
                files: Some(Vec::new()),
                origin: Origin::ThisRun,
            })
        }
    }

    #[test]
    fn a_hint_matches_by_content_key_and_media_type_after_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = crate::engine::cache_use::test_plan(&tmp.path().join("nix/store"));
        let nar: HashMap<String, String> = plan
            .layers
            .iter()
            .filter_map(|l| match l {
                PlannedLayer::Store { paths_text, .. } => Some(paths_text.clone()),
                _ => None,
            })
            .flatten()
            .map(|p| (p, "sha256-AAAA".to_string()))
            .collect();
        let gz = Compression::Gzip;
        let key = |i| crate::engine::content_key(&plan, i, listing(&plan, i), &nar, gz).unwrap();
        let hint = |i, media_type: &str| CacheHint {
            key: key(i),
            blob: Descriptor { media_type: media_type.into(), digest: [5; 32], size: 77 },
            diff_id: [6; 32],
            tar_size: 10240,
        };
        let from = "docker://r.example/app:1".to_string();
        let hints = vec![hint(0, gz.oci_layer_media_type()), hint(1, gz.docker_layer_media_type().unwrap())];
        let cache = Layer0;
        let l = HintLookup::new(Some(&cache), &plan, &nar, gz, hints.clone(), from.clone());
        assert_eq!(l.lookup(0, listing(&plan, 0)).unwrap().origin, Origin::ThisRun, "the cache first");
        let h = l.lookup(1, listing(&plan, 1)).expect("a hint");
        assert_eq!(h.digest, LayerDigest { size: 10240, sha256: [6; 32] });
        assert_eq!(h.blob, Some(LayerDigest { size: 77, sha256: [5; 32] }));
        assert_eq!((h.files, h.unchanged_before_ns), (None, i128::MIN), "checked whole if ever written");
        assert_eq!(h.origin, Origin::CacheFrom(from.clone()));

        // Without the cache the first layer's hint serves too.
        let l = HintLookup::new(None, &plan, &nar, gz, hints.clone(), from.clone());
        assert_eq!(l.lookup(0, listing(&plan, 0)).unwrap().origin, Origin::CacheFrom(from.clone()));
        // Another compression's media type under the key: not ours.
        let zstd = vec![hint(1, Compression::Zstd.oci_layer_media_type())];
        assert!(HintLookup::new(None, &plan, &nar, gz, zstd, from.clone()).lookup(1, listing(&plan, 1)).is_none());
        // Another push compression makes other keys.
        let l = HintLookup::new(None, &plan, &nar, Compression::Zstd, hints, from.clone());
        assert!(l.lookup(1, listing(&plan, 1)).is_none());
        // No narHash for the layer: no key, no match.
        let none = HashMap::new();
        let l = HintLookup::new(None, &plan, &none, gz, vec![hint(1, gz.oci_layer_media_type())], from);
        assert!(l.lookup(1, listing(&plan, 1)).is_none());
    }
}
