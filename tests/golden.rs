//! The reference's own output, byte for byte: each golden case streamed by
//! the real binary must equal nixpkgs' `expected.tar`.

mod common;

use common::{bin, golden_dir, golden_tree, golden_tree_settled, validate};

fn check(case: &str) {
    golden_tree();
    let dir = golden_dir().join("cases").join(case);
    let expected = std::fs::read(dir.join("expected.tar")).unwrap();
    // Whatever the number of hashing workers and segment readers.
    for jobs in ["2", "1", "5"] {
        let out = bin().args(["stream", "--quiet", "--jobs", jobs]).arg(dir.join("conf.json")).output().unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        assert_same(case, &format!("--jobs {jobs}"), &out.stdout, &expected);
    }
    // Every file spliced into the output pipe (the tree is settled by now),
    // and none (read and copied): the same bytes, and the run says it did
    // splice (a splice path turned off would still give the same bytes).
    golden_tree_settled();
    for how in ["--splice-min=1", "--no-splice"] {
        let out = bin().args(["stream", "--quiet", "--stats", how]).arg(dir.join("conf.json")).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{case} {how}: {err}");
        assert_same(case, how, &out.stdout, &expected);
        let stats: serde_json::Value =
            serde_json::from_str(err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("stats"))
                .unwrap();
        let spliced = stats["bytes_spliced"].as_u64().unwrap();
        assert_eq!(spliced > 0, how == "--splice-min=1", "{case} {how}: {stats}");
    }
    let txt = std::fs::read_to_string(dir.join("expected.txt")).unwrap();

    // `nixstream digest` prints expected.txt's lines but the archive's own
    // digest, with no archive written, with and without a digest cache.
    let cache = tempfile::tempdir().unwrap();
    for pass in ["cold", "warm"] {
        let d = bin().args(["digest", "-q", "--cache"]).arg(cache.path()).arg(dir.join("conf.json")).output().unwrap();
        assert!(d.status.success(), "{case}: {}", String::from_utf8_lossy(&d.stderr));
        let want: String = txt.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&d.stdout), want, "{case}: digest ({pass} cache)");
    }
}

fn assert_same(case: &str, jobs: &str, got: &[u8], expected: &[u8]) {
    if got != expected {
        let at = got.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(got.len().min(expected.len()));
        panic!(
            "{case} ({jobs}): differs from expected.tar at byte {at} (block {}, offset {} in it); lengths {} vs {}",
            at / 512,
            at % 512,
            got.len(),
            expected.len()
        );
    }
}

#[test]
fn golden_basic() {
    check("basic");
}

#[test]
fn golden_from_image() {
    check("from-image");
}

#[test]
fn golden_grouped() {
    check("grouped");
}

#[test]
fn golden_odd_bytes() {
    check("odd-bytes");
}

#[test]
fn golden_repo_tag_override_changes_only_the_manifest() {
    golden_tree();
    let conf = golden_dir().join("cases/basic/conf.json");
    for flag in ["-t", "--repo-tag", "--repo_tag"] {
        let out = bin().args(["stream", "-q", flag, "other/name:tag"]).arg(&conf).output().unwrap();
        assert!(out.status.success());
        let a = validate(&out.stdout);
        assert_eq!(a.manifest[0]["RepoTags"][0], "other/name:tag", "{flag}");
        assert_eq!(a.config_name, "99309cd52e10552c598f9b1a37beaaf742118f6cc4a47cf9f8ef277fbc601543.json");
    }
}

#[test]
fn golden_plain_progress_lines_on_a_pipe() {
    golden_tree();
    let out = bin().arg("stream").arg(golden_dir().join("cases/basic/conf.json")).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Creating layer 1 from paths: ['/tmp/nixstream-golden/nix/store/3849ab733g5767g42b4650b7aa54ff94-hello-2.12']"), "{err}");
    assert!(err.contains("Creating layer 5 with customisation..."), "{err}");
    assert!(err.trim_end().ends_with("Done."), "{err}");
}

#[test]
fn golden_compressed_streams_decompress_to_the_same_bytes() {
    golden_tree();
    let dir = golden_dir().join("cases/basic");
    let expected = std::fs::read(dir.join("expected.tar")).unwrap();
    for (how, decode) in [
        ("zstd", Box::new(|b: &[u8]| zstd::decode_all(b).unwrap()) as Box<dyn Fn(&[u8]) -> Vec<u8>>),
        (
            "gzip",
            Box::new(|b: &[u8]| {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(b), &mut v).unwrap();
                v
            }),
        ),
    ] {
        let run = |jobs: &str| {
            bin().args(["stream", "-q", "--compress", how, "--jobs", jobs]).arg(dir.join("conf.json")).output().unwrap()
        };
        let one = run("1");
        let two = run("2");
        assert!(one.status.success());
        assert_eq!(one.stdout, two.stdout, "{how}: output must not depend on the thread count");
        assert_eq!(decode(&one.stdout), expected, "{how}");
    }
}
