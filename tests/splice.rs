//! Files spliced into the output pipe (`nixstream::output::splice`), through the
//! binary: the same bytes as reading them, and a file changed while its
//! pages sit in the pipe stops the archive.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{bin, conf_json, make_customisation, validate, SETTLE};

struct Fixture {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    /// The one file of the bottom layer (600 KB).
    victim: PathBuf,
}

/// Bottom layer: one 600 KB file.  Above it: big and small files, sizes off
/// the 512-byte grid, an empty file, one over the pipe's 1 MiB.  Returned
/// once every file is settled enough to be spliced.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("nix/store");
    let bottom = store.join("aaaa-bottom");
    let mixed = store.join("bbbb-mixed");
    std::fs::create_dir_all(&bottom).unwrap();
    std::fs::create_dir_all(mixed.join("share/deep")).unwrap();
    let victim = bottom.join("data");
    std::fs::write(&victim, pattern(600_000, 1)).unwrap();
    for (i, len) in [65_536usize, 65_535, 70_001, 3 << 20, 0, 100, 5_000, 1_048_577].into_iter().enumerate() {
        std::fs::write(mixed.join(format!("share/deep/f{i}")), pattern(len, i as u8 + 2)).unwrap();
    }
    std::os::unix::fs::symlink("deep/f3", mixed.join("share/link")).unwrap();
    let cust = make_customisation(tmp.path());
    let conf = tmp.path().join("conf.json");
    let layers = [vec![bottom], vec![mixed]];
    std::fs::write(&conf, serde_json::to_vec(&conf_json(&store, &layers, &cust)).unwrap()).unwrap();
    std::thread::sleep(SETTLE);
    Fixture { _tmp: tmp, conf, victim }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed).collect()
}

#[test]
fn spliced_and_copied_archives_are_the_same_bytes() {
    let f = fixture();
    let mut outs = Vec::new();
    // Files of 64 KiB and more by default; every non-empty file with
    // --splice-min=1; none with --no-splice.
    let big: u64 = 600_000 + 65_536 + 70_001 + (3 << 20) + 1_048_577;
    let all: u64 = big + 65_535 + 100 + 5_000;
    for (how, spliced) in [("--jobs=2", big), ("--splice-min=1", all), ("--no-splice", 0)] {
        let out = bin().args(["stream", "-q", "--stats", how]).arg(&f.conf).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{how}: {err}");
        let stats: serde_json::Value =
            serde_json::from_str(err.lines().find_map(|l| l.strip_prefix("nixstream: stats ")).expect("stats"))
                .unwrap();
        assert_eq!(stats["bytes_spliced"], spliced, "{how}: {stats}");
        validate(&out.stdout);
        outs.push(out.stdout);
    }
    assert!(outs[0] == outs[2], "default (spliced) differs from --no-splice");
    assert!(outs[1] == outs[2], "--splice-min=1 differs from --no-splice");
}

/// Runs `stream` into a pipe nobody reads until the bottom layer's file has
/// gone into it, rewrites that file (same size, mtime put back), then reads
/// everything.  Returns exit code, stderr and stdout.
fn change_while_in_the_pipe(f: &Fixture, how: &str) -> (Option<i32>, String, Vec<u8>) {
    let mut child =
        bin().args(["stream", "-q", how]).arg(&f.conf).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Hashing 5 MB and filling the pipe take milliseconds; the file's 600 KB
    // come first and fit in the 1 MiB pipe.
    std::thread::sleep(Duration::from_millis(1_500));
    let mtime = std::fs::metadata(&f.victim).unwrap().modified().unwrap();
    let fh = std::fs::OpenOptions::new().write(true).open(&f.victim).unwrap();
    fh.write_all_at(&[0xEE; 4096], 8192).unwrap();
    fh.set_modified(mtime).unwrap();
    drop(fh);
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code(), err, out)
}

#[test]
fn a_file_changed_while_its_pages_are_in_the_pipe_stops_the_archive() {
    let f = fixture();
    let (code, err, out) = change_while_in_the_pipe(&f, "--jobs=2");
    // The consumer read the new bytes (the pipe held the file's pages, not
    // a copy): the archive must not end as an image.
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&*f.victim.to_string_lossy()) && err.contains("ctime"), "{err}");
    assert!(
        !nixstream::read::verify::verify(&out[..], "out").is_ok_and(|r| r.ok()),
        "what reached stdout must not verify"
    );
}

#[test]
fn copied_bytes_are_not_affected_by_a_later_change() {
    // The same change with --no-splice: the bytes were copied into the pipe
    // before it, so the archive is whole and right (and the test above
    // shows the splicing path is the one that ran there).
    let f = fixture();
    let (code, err, out) = change_while_in_the_pipe(&f, "--no-splice");
    assert_eq!(code, Some(0), "{err}");
    assert!(nixstream::read::verify::verify(&out[..], "out").unwrap().ok());
    validate(&out);
}

/// Regression: a parent's non-blocking pipe (Node.js hands those out) made
/// every write that found the pipe full fail with EAGAIN ("Resource
/// temporarily unavailable"); the writer now waits for the reader.
#[test]
fn a_non_blocking_output_pipe_is_waited_on() {
    let f = fixture();
    let want = bin().args(["stream", "-q", "--no-splice"]).arg(&f.conf).output().unwrap();
    assert!(want.status.success());
    for how in ["--jobs=2", "--no-splice"] {
        let (mut r, w) = std::io::pipe().unwrap();
        let fl = rustix::fs::fcntl_getfl(&w).unwrap();
        rustix::fs::fcntl_setfl(&w, fl | rustix::fs::OFlags::NONBLOCK).unwrap();
        let mut child =
            bin().args(["stream", "-q", how]).arg(&f.conf).stdout(w).stderr(Stdio::piped()).spawn().unwrap();
        // Let it fill the pipe and find it full.
        std::thread::sleep(Duration::from_millis(500));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(child.wait().unwrap().success(), "{how}: {err}");
        assert!(out == want.stdout, "{how}: other bytes");
    }
}
