//! The archive readers: `verify` (streaming) and the base-image reader
//! (`from_image`: index, manifest, config, then every layer copied through
//! with its diff_id checked).  Any bytes: an error or a result, no panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nixstream::read::baseimage::BaseImage;

fuzz_target!(|data: &[u8]| {
    let _ = nixstream::read::verify::verify(data, "fuzz");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, data).unwrap();
    if let Ok(base) = BaseImage::open(f.path()) {
        for i in 0..base.layers.len() {
            let _ = base.copy_layer(i, &mut std::io::sink());
        }
    }
});
