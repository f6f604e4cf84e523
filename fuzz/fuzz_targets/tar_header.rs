//! Round trip of the tar header writer: any header nixstream can write is
//! read back by our reader with the same fields, as whole 512-byte blocks
//! with valid checksums.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nixstream::compat::tarheader::{self, typeflag, Header};
use nixstream::read::tarread::TarReader;

#[derive(Arbitrary, Debug)]
struct Input {
    name: Vec<u8>,
    link: Vec<u8>,
    uname: Vec<u8>,
    gname: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u16,
    mtime: i64,
    kind: u8,
}

fuzz_target!(|i: Input| {
    // Names the writer is given are never empty, contain no NUL and no
    // trailing slash (the walker and the reference never produce those).
    if i.name.is_empty() || i.name.contains(&0) || i.name.ends_with(b"/") {
        return;
    }
    if [&i.link, &i.uname, &i.gname].iter().any(|f| f.contains(&0)) {
        return;
    }
    let flag = [typeflag::REGULAR, typeflag::DIRECTORY, typeflag::SYMLINK][usize::from(i.kind % 3)];
    let size = if flag == typeflag::REGULAR { u64::from(i.size) } else { 0 };
    let link: &[u8] = if flag == typeflag::SYMLINK { &i.link } else { b"" };
    // Times the reference can write: within what a pax float keeps exactly.
    let mtime = i.mtime % (1 << 50);
    let h = Header {
        name: &i.name,
        mode: i.mode & 0o7777,
        uid: i.uid % (1 << 62),
        gid: i.gid % (1 << 62),
        size,
        mtime,
        typeflag: flag,
        linkname: link,
        uname: &i.uname,
        gname: &i.gname,
        devmajor: 0,
        devminor: 0,
        pax: &[],
    };
    let mut out = Vec::new();
    tarheader::encode(&h, &mut out);
    assert_eq!(out.len() % 512, 0);
    out.resize(out.len() + size as usize + tarheader::data_padding(size), 0);
    out.resize(out.len() + tarheader::end_of_archive_len(out.len() as u64), 0);
    let mut t = TarReader::new(&out[..]);
    let m = t.next_member().expect("reads back").expect("one member");
    assert_eq!(m.name, i.name);
    assert_eq!(m.typeflag, flag);
    assert_eq!(m.size, size);
    assert_eq!(m.mode, h.mode);
    assert_eq!((m.uid, m.gid), (h.uid, h.gid));
    assert_eq!(m.mtime, mtime);
    assert_eq!(m.linkname, link);
    assert_eq!(m.uname, i.uname);
    assert_eq!(m.gname, i.gname);
    assert!(t.next_member().unwrap().is_none());
});
