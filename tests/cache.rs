//! The digest cache (`--cache DIR`), through the binary: a warm run gives
//! the same bytes without the hashing pass, and no stale, torn or corrupt
//! entry ever yields a wrong digest.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{bin, conf_json, make_customisation};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    pkg: PathBuf,
    conf: PathBuf,
    cache: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let store = root.join("nix/store");
    let pkg = store.join("aaaa-pkg");
    let lib = store.join("bbbb-lib");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(pkg.join("bin/tool"), vec![7u8; 300_000]).unwrap();
    std::fs::write(pkg.join("readme"), b"hi\n").unwrap();
    std::fs::write(lib.join("libx.so"), vec![3u8; 50_000]).unwrap();
    let cust = make_customisation(&root);
    let conf = root.join("conf.json");
    std::fs::write(&conf, serde_json::to_vec(&conf_json(&store, &[vec![lib], vec![pkg.clone()]], &cust)).unwrap())
        .unwrap();
    let cache = root.join("cache");
    Fixture { _tmp: tmp, root, pkg, conf, cache }
}

fn stream(conf: &Path, cache: Option<&Path>) -> Vec<u8> {
    stream_stats(conf, cache, &[]).0
}

/// The archive, and what the run says it did (`--stats`): layers whose
/// digests came from the cache, bytes spliced into the pipe.
fn stream_stats(conf: &Path, cache: Option<&Path>, extra: &[&str]) -> (Vec<u8>, serde_json::Value) {
    let mut cmd = bin();
    cmd.args(["stream", "-q", "--stats"]).args(extra).arg(conf);
    if let Some(c) = cache {
        cmd.arg("--cache").arg(c);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("a stats line");
    (out.stdout, serde_json::from_str(line).unwrap())
}

fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(cache).unwrap() {
        for e in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(e.unwrap().path());
        }
    }
    out.sort();
    out
}

#[test]
fn a_warm_run_gives_the_same_bytes() {
    let f = fixture();
    let plain = stream(&f.conf, None);
    let (cold, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(cold, plain, "cold");
    assert_eq!(stats["layers_from_cache"], 0, "{stats}");
    assert_eq!(entries(&f.cache).len(), 2, "one entry per store layer");
    let before: Vec<_> = entries(&f.cache).iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    let (warm, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(warm, plain, "warm");
    assert_eq!(stats["layers_from_cache"], 2, "both store layers from the cache: {stats}");
    let after: Vec<_> = entries(&f.cache).iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    assert_eq!(before, after, "hits are not written again");
}

/// Files settled before the run that filled the cache are spliced unread by
/// a warm run (the entry vouches for them): the same bytes, and a file
/// rewritten since is still a miss by its key.
#[test]
fn a_warm_run_over_settled_files_gives_the_same_bytes() {
    let f = fixture();
    std::thread::sleep(common::SETTLE);
    let plain = stream(&f.conf, None);
    assert_eq!(stream(&f.conf, Some(&f.cache)), plain, "cold");
    let (warm, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(warm, plain, "warm");
    assert_eq!(stats["layers_from_cache"], 2, "{stats}");
    // bin/tool (300,000 bytes) went into the pipe by reference, unread.
    assert!(stats["bytes_spliced"].as_u64().unwrap() >= 300_000, "{stats}");
    let tool = f.pkg.join("bin/tool");
    let mtime = std::fs::metadata(&tool).unwrap().modified().unwrap();
    let fh = std::fs::OpenOptions::new().write(true).open(&tool).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&fh, &[1u8; 100], 0).unwrap();
    fh.set_modified(mtime).unwrap();
    drop(fh);
    let fresh = stream(&f.conf, None);
    assert_ne!(fresh, plain);
    let (again, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(again, fresh, "rewritten since");
    assert_eq!(stats["layers_from_cache"], 1, "only the unchanged layer hits: {stats}");
}

#[test]
fn a_file_rewritten_in_place_is_hashed_again() {
    let f = fixture();
    stream(&f.conf, Some(&f.cache));
    // Same size, mtime put back: only ctime and content tell.
    let tool = f.pkg.join("bin/tool");
    let mtime = std::fs::metadata(&tool).unwrap().modified().unwrap();
    let mut fh = std::fs::OpenOptions::new().write(true).open(&tool).unwrap();
    fh.write_all(&[9u8; 1000]).unwrap();
    fh.set_modified(mtime).unwrap();
    drop(fh);
    let fresh = stream(&f.conf, None);
    let (again, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(again, fresh);
    assert_eq!(stats["layers_from_cache"], 1, "the changed layer misses: {stats}");
    assert_eq!(entries(&f.cache).len(), 3, "a new entry for the changed layer");
}

#[test]
fn damaged_entries_are_misses() {
    let f = fixture();
    let plain = stream(&f.conf, Some(&f.cache));
    let list = entries(&f.cache);
    // One entry torn, one with a flipped byte in its digest.
    let a = std::fs::read(&list[0]).unwrap();
    std::fs::write(&list[0], &a[..a.len() / 2]).unwrap();
    let mut b = std::fs::read(&list[1]).unwrap();
    b[50] ^= 1;
    std::fs::write(&list[1], &b).unwrap();
    let (again, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(again, plain);
    assert_eq!(stats["layers_from_cache"], 0, "{stats}");
    // Both were rewritten whole by that run.
    assert_eq!(std::fs::read(&list[0]).unwrap().len(), a.len(), "the torn entry is whole again");
    assert_eq!(std::fs::read(&list[1]).unwrap().len(), b.len());
    assert_ne!(std::fs::read(&list[1]).unwrap(), b);
    // And hit next time.
    assert_eq!(stream_stats(&f.conf, Some(&f.cache), &[]).1["layers_from_cache"], 2);
}

#[test]
fn an_entry_whose_files_no_longer_match_stops_the_archive() {
    // A narHash-keyed entry survives a change the key cannot see (here:
    // the entry is moved under the new key by hand); the streaming pass
    // still checks every file against the entry and refuses.
    let f = fixture();
    stream(&f.conf, Some(&f.cache));
    let old = entries(&f.cache);
    let tool = f.pkg.join("bin/tool");
    std::fs::write(&tool, vec![8u8; 300_000]).unwrap();
    stream(&f.conf, Some(&f.cache));
    let new: Vec<_> = entries(&f.cache).into_iter().filter(|p| !old.contains(p)).collect();
    assert_eq!(new.len(), 1);
    // Put the stale entry's contents where the new key points: its key
    // field no longer matches, so it is a miss...
    let stale_for_pkg = old
        .iter()
        .find(|p| {
            let d = std::fs::read(p).unwrap();
            // the pkg layer has 2 files; lib has 1 (the count follows magic,
            // key, size, sha256 and the settled time)
            u64::from_le_bytes(d[96..104].try_into().unwrap()) == 2
        })
        .unwrap();
    let mut d = std::fs::read(stale_for_pkg).unwrap();
    std::fs::write(&new[0], &d).unwrap();
    let fresh = stream(&f.conf, None);
    assert_eq!(stream(&f.conf, Some(&f.cache)), fresh, "a key mismatch is a miss");
    // ...and one forged to carry the new key (with its checksum made good)
    // is caught by the per-file check while streaming.
    let key = hex_to_bytes(new[0].file_name().unwrap().to_str().unwrap());
    d[8..40].copy_from_slice(&key);
    let body = d.len() - 32;
    let sum = <sha2::Sha256 as sha2::Digest>::digest(&d[..body]);
    d[body..].copy_from_slice(&sum);
    // Read and copied; then, once bin/tool is settled enough to be spliced
    // into the output pipe, read and checked before it is spliced.  The
    // error blames the entry, not the store, and the entry is removed.
    for (how, wait) in [("--no-splice", 0), ("--jobs=2", 2100)] {
        std::fs::write(&new[0], &d).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(wait));
        let out = bin().args(["stream", "-q", how, "--cache"]).arg(&f.cache).arg(&f.conf).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{how}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{how}: {err}");
        for needle in [
            "layer 2 (",
            &format!("the digest from the digest cache {} is wrong for this layer", f.cache.display()),
            "bin/tool has xxh3",
            "the entry was removed from the cache",
        ] {
            assert!(err.contains(needle), "{how}: {needle:?} in {err}");
        }
        assert!(!err.contains("changed while"), "{how}: nothing changed: {err}");
        assert!(!new[0].exists(), "{how}: the wrong entry is gone");
        assert!(!nixstream::read::verify::verify(&out.stdout[..], "out").is_ok_and(|r| r.ok()), "{how}");
    }
    // So the next run hashes the layer and is right.
    let (again, stats) = stream_stats(&f.conf, Some(&f.cache), &[]);
    assert_eq!(again, fresh);
    assert_eq!(stats["layers_from_cache"], 1, "only the other layer hit: {stats}");
}

fn hex_to_bytes(h: &str) -> [u8; 32] {
    nixstream::engine::digest::parse_sha256_hex(h).unwrap()
}

#[test]
fn a_cache_whose_entries_cannot_be_written_only_warns() {
    let f = fixture();
    std::fs::create_dir_all(&f.cache).unwrap();
    // Every entry directory name taken by a file: every put fails.
    for i in 0..256 {
        std::fs::write(f.cache.join(format!("{i:02x}")), b"").unwrap();
    }
    let plain = stream(&f.conf, None);
    let out = bin().args(["stream", "-q", "--cache"]).arg(&f.cache).arg(&f.conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, plain);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("warning") && err.contains("digest cache"), "{err}");
}

#[test]
fn an_unusable_cache_dir_is_a_warning() {
    let f = fixture();
    std::fs::create_dir_all(&f.cache).unwrap();
    let blocker = f.cache.join("blocked");
    std::fs::write(&blocker, b"").unwrap();
    // A cache "directory" that is a file: every put fails.
    let out = bin().args(["stream", "-q", "--cache"]).arg(&blocker).arg(&f.conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // It costs speed, not the image (issue 17): a warning, and the image.
    assert!(out.status.success(), "an unusable --cache is a warning: {err}");
    assert_eq!(out.stdout, stream(&f.conf, None));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("warning") && err.contains("digest cache") && err.contains("blocked"), "{err}");
    let _ = f.root;
}

/// OCI outputs keep each layer's compressed digest too (keyed by the
/// compressor's identity): a warm run writes the same bytes without a
/// hashing pass, and another compression is a miss for the blob.
#[test]
fn a_warm_oci_run_knows_the_compressed_digests() {
    let f = fixture();
    for c in ["gzip", "zstd"] {
        let args = ["--format", "oci-archive", "--layer-compression", c];
        let (plain, _) = stream_stats(&f.conf, None, &args);
        let (cold, stats) = stream_stats(&f.conf, Some(&f.cache), &args);
        assert_eq!(cold, plain, "{c} cold");
        assert_eq!(stats["layers_from_cache"], 0, "{c}: {stats}");
        let (warm, stats) = stream_stats(&f.conf, Some(&f.cache), &args);
        assert_eq!(warm, plain, "{c} warm");
        assert_eq!(stats["layers_from_cache"], 2, "{c}: {stats}");
    }
    // Two layer entries, and a blob entry per layer and compression.
    assert_eq!(entries(&f.cache).len(), 2 + 2 * 2);
}

/// Only the pushing commands default to a cache: `stream` and `digest` with
/// a home and an XDG cache directory still make no cache there (a second
/// run hashes again), and write the same bytes.
#[test]
fn stream_and_digest_use_no_default_cache() {
    let f = fixture();
    let home = f.root.join("home");
    std::fs::create_dir(&home).unwrap();
    let xdg = f.root.join("xdg");
    let plain = stream(&f.conf, None);
    for _ in 0..2 {
        for env in [vec![("HOME", &home)], vec![("HOME", &home), ("XDG_CACHE_HOME", &xdg)]] {
            let out = bin().envs(env.clone()).args(["stream", "-q", "--stats"]).arg(&f.conf).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{err}");
            assert_eq!(out.stdout, plain);
            assert!(err.contains("\"layers_from_cache\":0"), "{err}");
            let out = bin().envs(env).args(["digest", "-q"]).arg(&f.conf).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert!(!xdg.exists() && !home.join(".cache").exists());
}
