//! The digest-cache entry reader: any bytes in an entry file, no panic; an
//! entry it accepts is one `put` would write for that key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nixstream::engine::cache::{decode_entry, read_entry, DigestCache};

fuzz_target!(|data: &[u8]| {
    let key = [0x5a; 32];
    let _ = decode_entry(data, &key);
    // Through the file reader, with a bound below and above the data's size.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("entry");
    std::fs::write(&p, data).unwrap();
    let n = data.len() as u64;
    assert!(read_entry(&p, n.saturating_sub(1)).is_none() || n == 0);
    assert_eq!(read_entry(&p, n).as_deref(), Some(data));
    if let Some(entry) = decode_entry(data, &key) {
        let c = DigestCache::open(&dir.path().join("c")).unwrap();
        c.put(&key, &entry).unwrap();
        assert_eq!(c.get(&key, entry.files.len()), Some(entry));
    }
});
