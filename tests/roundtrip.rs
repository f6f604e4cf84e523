//! Property test: random store trees (files of many sizes, directories,
//! symlinks, hard links, long, non-ASCII and undecodable names) are streamed,
//! read back with the `tar` crate and compared entry by entry with the source
//! tree; streaming twice gives the same bytes.

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nixstream::dest::docker_archive::write_archive;
use nixstream::engine::EngineOptions;
use nixstream::input::conf::Conf;
use nixstream::input::isotime::DateTime;
use nixstream::output::progress::{Mode, Progress};
use nixstream::plan::ImagePlan;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Kind {
    File { size: usize, mode: u32 },
    Dir,
    Symlink(Vec<u8>),
    HardLink(usize),
}

#[derive(Debug, Clone)]
struct Op {
    parent: usize,
    name: Vec<u8>,
    kind: Kind,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zA-Z0-9._ -]{1,12}".prop_map(|s| s.into_bytes()),
        1 => (100usize..=255).prop_map(|n| vec![b'l'; n]),
        1 => "[a-z\u{e9}\u{fc}\u{65e5}\u{672c}\u{1f600}]{1,8}".prop_map(|s| s.into_bytes()),
        1 => proptest::collection::vec(prop_oneof![Just(b'a'), Just(0x80u8), Just(0xffu8), Just(0xc3u8), Just(b'-')], 1..8),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (prop_oneof![0usize..600, Just(512), Just(1024), 1000usize..70000], prop_oneof![Just(0o444), Just(0o555), Just(0o644), Just(0o4755)])
            .prop_map(|(size, mode)| Kind::File { size, mode }),
        2 => Just(Kind::Dir),
        1 => prop_oneof![
            "[a-z./]{1,20}".prop_map(|s| s.into_bytes()),
            (101usize..300).prop_map(|n| vec![b't'; n]),
        ].prop_map(Kind::Symlink),
        1 => any::<usize>().prop_map(Kind::HardLink),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        (any::<usize>(), name(), kind()).prop_map(|(parent, name, kind)| Op { parent, name, kind }),
        0..40,
    )
}

/// Builds the tree under `root`; returns the store paths.
fn build(root: &Path, ops: &[Op], seed: u64) -> Vec<PathBuf> {
    let store_paths: Vec<PathBuf> = (0..3).map(|i| root.join(format!("{i}ab{seed:x}-pkg{i}"))).collect();
    let mut dirs: Vec<PathBuf> = store_paths.clone();
    let mut files: Vec<PathBuf> = Vec::new();
    for d in &store_paths {
        std::fs::create_dir_all(d).unwrap();
    }
    for (n, op) in ops.iter().enumerate() {
        let parent = dirs[op.parent % dirs.len()].clone();
        let p = parent.join(OsStr::from_bytes(&op.name));
        if std::fs::symlink_metadata(&p).is_ok() || p.as_os_str().len() > 3000 {
            continue;
        }
        match &op.kind {
            Kind::File { size, mode } => {
                let data: Vec<u8> =
                    (0..*size).map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(n as u64) as u8).collect();
                std::fs::write(&p, data).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
                files.push(p);
            }
            Kind::Dir => {
                std::fs::create_dir(&p).unwrap();
                dirs.push(p);
            }
            Kind::Symlink(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), &p).unwrap(),
            Kind::HardLink(i) if !files.is_empty() => {
                std::fs::hard_link(&files[i % files.len()], &p).unwrap();
            }
            Kind::HardLink(_) => {}
        }
    }
    // A store path that is one file and one that is a symlink.
    let single = root.join(format!("9cd{seed:x}-single"));
    std::fs::write(&single, b"single\n").unwrap();
    let link = root.join(format!("8ef{seed:x}-link"));
    std::os::unix::fs::symlink(&store_paths[0], &link).unwrap();
    let mut all = store_paths;
    all.push(single);
    all.push(link);
    all
}

/// Python's pathlib order, written independently of the crate: component
/// lists of code points, undecodable bytes as U+DC80..U+DCFF.
fn python_key(p: &[u8]) -> Vec<Vec<u32>> {
    p.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            let mut out = Vec::new();
            let mut rest = c;
            while !rest.is_empty() {
                match std::str::from_utf8(rest) {
                    Ok(s) => {
                        out.extend(s.chars().map(|ch| ch as u32));
                        break;
                    }
                    Err(e) => {
                        let good = e.valid_up_to();
                        out.extend(std::str::from_utf8(&rest[..good]).unwrap().chars().map(|ch| ch as u32));
                        let bad = e.error_len().unwrap_or(rest.len() - good);
                        out.extend(rest[good..good + bad].iter().map(|&b| 0xDC00 + u32::from(b)));
                        rest = &rest[good + bad..];
                    }
                }
            }
            out
        })
        .collect()
}

fn expected_entries(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let md = std::fs::symlink_metadata(path).unwrap();
    if md.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            out.extend(expected_entries(&e.unwrap().path()));
        }
    }
    out
}

fn stream(conf: &serde_json::Value) -> Vec<u8> {
    let conf = Conf::from_value(conf.clone(), None, DateTime::now_utc()).unwrap();
    let plan = ImagePlan::from_conf(&conf).unwrap();
    let mut out = Vec::new();
    write_archive(&plan, &mut out, &EngineOptions { jobs: 2, ..Default::default() }, &Progress::new(Mode::Quiet, 0))
        .unwrap();
    out
}

fn check_layer(layer: &[u8], paths: &[PathBuf]) {
    assert_eq!(layer.len() % 10240, 0, "store layers are padded to tarfile records");
    let mut want: Vec<PathBuf> = Vec::new();
    for p in paths {
        let mut entries = expected_entries(p);
        entries.sort_by_key(|e| python_key(e.as_os_str().as_bytes()));
        want.extend(entries);
    }
    let mut ar = tar::Archive::new(layer);
    let mut got = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path_bytes().to_vec();
        let h = e.header().clone();
        assert_eq!(h.uid().unwrap(), 0);
        assert_eq!(h.mtime().unwrap(), 1);
        if got.is_empty() && (name == b"/nix/" || name == b"/nix/store/") || got.len() == 1 && name == b"/nix/store/" {
            got.push(PathBuf::from(OsStr::from_bytes(&name)));
            continue;
        }
        let trimmed = name.strip_suffix(b"/").unwrap_or(&name);
        let p = PathBuf::from(OsStr::from_bytes(trimmed));
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(h.mode().unwrap(), md.mode() & 0o7777, "{}", p.display());
        if md.is_dir() {
            assert!(h.entry_type().is_dir(), "{}", p.display());
            assert!(name.ends_with(b"/"));
        } else if md.file_type().is_symlink() {
            assert!(h.entry_type().is_symlink());
            let target = std::fs::read_link(&p).unwrap();
            assert_eq!(e.link_name_bytes().unwrap().as_ref(), target.as_os_str().as_bytes());
        } else {
            assert!(h.entry_type().is_file(), "hard links are regular files: {}", p.display());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(data, std::fs::read(&p).unwrap(), "{}", p.display());
        }
        got.push(p);
    }
    assert_eq!(&got[..2], [PathBuf::from("/nix/"), PathBuf::from("/nix/store/")]);
    assert_eq!(got[2..], want[..], "entries and their order");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(ops in ops(), seed in any::<u32>()) {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("nix/store");
        std::fs::create_dir_all(&store).unwrap();
        let paths = build(&store, &ops, u64::from(seed));
        let cust = common::make_customisation(tmp.path());
        let layers = vec![vec![paths[0].clone(), paths[3].clone()], vec![paths[1].clone()], vec![paths[2].clone(), paths[4].clone()]];
        let conf = common::conf_json(&store, &layers, &cust);
        let bytes = stream(&conf);
        let a = common::validate(&bytes);
        prop_assert_eq!(a.layers.len(), 4);
        for (layer, paths) in a.layers.iter().zip(&layers) {
            check_layer(layer, paths);
        }
        prop_assert!(stream(&conf) == bytes, "streaming twice gives the same bytes");
    }
}
