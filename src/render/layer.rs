//! The one producer of store-layer tars, generic over `Write`.
//!
//! The hashing pass runs it into a [`crate::engine::digest::HashSink`]; the streaming
//! pass runs it again into the output through a
//! [`crate::engine::digest::VerifyingWriter`].  There is no second code path that has
//! to agree with this one.  The bytes are those of `archive_paths_to` in
//! `stream_layered_image.py`: `/nix` and `/nix/store` directories (mode 0755)
//! first, then every listed entry with the configured owner and mtime, hard
//! links as regular files, then `tarfile`'s end-of-archive padding.
//!
//! Every file is opened without following symlinks and must yield exactly
//! the listed size.  The streaming pass checks each entry against the
//! listing (type, size, inode, mtime) before a byte of it is used; a
//! hashing pass that a streaming pass follows spares itself that `fstat` per
//! entry ([`Identity::Unchecked`]), since a file that changed before or
//! while it was hashed no longer matches the listing when the streaming pass
//! opens it.  The hashing pass alone (`nixstream digest`) checks.  The
//! hashing pass also records each file's xxh3-128 ([`FileCheck::Record`])
//! and the streaming pass compares it
//! ([`FileCheck::Verify`]): the header bytes come from the same listing in
//! both passes, so equal contents mean an equal layer, and a file whose bytes
//! changed in between is an error naming that file, at about a twentieth of
//! the cost of hashing the layer with sha256 again.
//!
//! Into an output pipe, the streaming pass passes big settled files on by
//! reference instead of reading them ([`FileCheck::Verify`] with a
//! [`Policy`]; see [`crate::output::splice`]), after checking them against the
//! listing, ctime included.
//!
//! Files are read with large `read` calls, not `mmap`: a mapped file that is
//! truncated under us would kill the process with SIGBUS instead of giving a
//! message.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::OFlags;

use crate::compat::tarheader::{self, typeflag, Header};
use crate::output::splice::Policy;
use crate::render::sink::{FileRef, LayerOut};
use crate::store::fsat::{self, CName, Stat};
use crate::store::walk::{Entry, Kind, Listing, Seen, NO_PARENT};

/// Owner and time applied to every store-layer entry (`apply_filters`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u64,
    pub gid: u64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime: i64,
}

#[cfg(test)]
impl Owner {
    /// root:root, mtime 1: the owner the tests render with.
    pub(crate) fn test_root() -> Owner {
        Owner { uid: 0, gid: 0, uname: b"root".to_vec(), gname: b"root".to_vec(), mtime: 1 }
    }
}

/// Per-file content check between the two passes.
pub enum FileCheck<'a> {
    /// None here (the caller verifies the whole layer's sha256 instead).
    Off,
    /// Hashing pass: append each file's xxh3-128, in entry order.  With
    /// [`Identity::Unchecked`] entries are not compared with the listing
    /// (for a hashing pass that a streaming pass, which compares them,
    /// follows).
    Record(&'a mut Vec<u128>, Identity),
    /// Streaming pass: each file's xxh3-128 must equal the recorded one;
    /// or, for a file the [`Policy`] picks, the file is passed on by
    /// reference to be spliced ([`crate::output::splice`]), once it is checked to be
    /// what the listing saw, ctime included.
    Verify(&'a [u128], Option<Policy>),
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} changed while the image was being written ({what}); rebuild or retry when the store is quiet")]
    Changed { path: PathBuf, what: String },
    /// A file's content does not have its recorded xxh3 ([`FileCheck::Verify`]),
    /// though the file is still what the listing saw, ctime included: the
    /// record is what is wrong when it came from outside this run (the
    /// engine says so, naming where it came from).  `recorded` is `None`
    /// when the record has fewer files than the layer.
    #[error("{}: its content (xxh3 {:032x}) is not what was recorded for it", .0.path.display(), .0.actual)]
    ContentDiffers(Box<ContentDiffers>),
    #[error("writing the output failed: {0}")]
    Output(#[source] io::Error),
    #[error("stopped because another part of the image failed")]
    Aborted,
}

/// A file whose content hashed to `actual`, not to the `recorded` xxh3-128.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentDiffers {
    pub path: PathBuf,
    pub recorded: Option<u128>,
    pub actual: u128,
}

/// Buffers reused across layers by one worker.
pub struct Scratch {
    header: Vec<u8>,
    /// [`READ`] bytes, made on first use: an output with buffers of its own
    /// ([`LayerOut::read_into`]) never needs it.
    buf: Vec<u8>,
    name: CName,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { header: Vec::with_capacity(4096), buf: Vec::new(), name: CName::default() }
    }
}

/// Bytes per `read`: 256 KiB stays in L2 between the kernel's copy and the
/// hash (1 MiB reads cost twice the system time on a 1.2 GB input).
const READ: usize = 1 << 18;

/// Enough zeros for any padding: end of archive is at most two blocks plus a record less one block.
const ZEROS: [u8; tarheader::RECORD + 2 * tarheader::BLOCK] = [0; tarheader::RECORD + 2 * tarheader::BLOCK];

/// Writes the layer tar for `listing` into `out`; returns its length.
pub fn write_store_layer<W: LayerOut>(
    listing: &Listing,
    owner: &Owner,
    out: &mut W,
    scratch: &mut Scratch,
    check: FileCheck<'_>,
    abort: Option<&AtomicBool>,
) -> Result<u64, LayerError> {
    let mut out = Counting { out, written: 0 };
    write_prologue(listing, owner, &mut out)?;
    write_entries(listing, 0..listing.entries.len(), owner, &mut out, scratch, check, abort)?;
    write_epilogue(&mut out)?;
    Ok(out.written)
}

/// The layer's first members: "to be consistent with the docker
/// utilities", `/nix` and `/nix/store`, literally, whatever store_dir is
/// (not in a contents layer).
pub fn write_prologue<W: Write>(listing: &Listing, owner: &Owner, out: &mut W) -> Result<(), LayerError> {
    if listing.nix_dirs {
        let mut header = Vec::with_capacity(2 * tarheader::BLOCK);
        for dir in [&b"/nix"[..], b"/nix/store"] {
            tarheader::encode(&entry_header(dir, b"", Kind::Directory, 0o755, 0, owner), &mut header);
        }
        out.write_all(&header).map_err(LayerError::Output)?;
    }
    Ok(())
}

/// `tarfile`'s end of archive for a layer `written` bytes long so far: two
/// zero blocks, then zeros to the end of a 10240-byte record.
pub fn write_epilogue<W: Write>(out: &mut Counting<'_, W>) -> Result<(), LayerError> {
    let end = tarheader::end_of_archive_len(out.written);
    out.emit(&ZEROS[..end])
}

/// Writes the members of `listing.entries[range]`: each header, and each
/// file's content and padding.  A range may start anywhere: the directories
/// above its first entry are opened first (from its store path down, each
/// checked like any entry), so a layer can be rendered in independent runs
/// whose outputs, concatenated in order, are the layer's middle.  With
/// [`FileCheck`], file numbers count from the range's first file.
pub fn write_entries<W: LayerOut>(
    listing: &Listing,
    range: std::ops::Range<usize>,
    owner: &Owner,
    out: &mut W,
    scratch: &mut Scratch,
    mut check: FileCheck<'_>,
    abort: Option<&AtomicBool>,
) -> Result<(), LayerError> {
    let mut file_no = 0usize;
    let mut out = Counting { out, written: 0 };

    // Open directories from the current entry up: each entry is opened
    // relative to its parent's descriptor (see `crate::store::fsat`).
    let mut dirs: Vec<(u32, OwnedFd)> = Vec::new();
    if let Some(first) = listing.entries.get(range.start) {
        open_ancestors(listing, first.parent, &mut dirs, &mut scratch.name)?;
    }
    for index in range {
        let e = &listing.entries[index];
        if abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(LayerError::Aborted);
        }
        let path = listing.path(e);
        scratch.header.clear();
        let name = listing.name(e);
        tarheader::encode(&entry_header(name, listing.link(e), e.kind, e.mode, e.size, owner), &mut scratch.header);
        out.emit(&scratch.header)?;
        if e.kind == Kind::Symlink {
            continue;
        }
        // Pre-order: the parent is on the stack, under its later siblings' subtrees.
        while dirs.last().is_some_and(|(i, _)| *i != e.parent) {
            dirs.pop();
        }
        let parent = dirs.last().map(|(_, fd)| fd.as_fd());
        let open_name = if parent.is_some() { listing.open_name(e) } else { path };
        // A hashing pass that a streaming pass follows opens without
        // checking: the streaming pass checks every entry against the
        // listing (a file that changed before or during the hashing pass has
        // another mtime, size or inode by then).
        let identity = match check {
            FileCheck::Record(_, identity) => identity,
            _ => Identity::Checked,
        };
        let (fd, st) = open_entry(e, path, parent, open_name, &mut scratch.name, identity)?;
        if e.kind == Kind::Directory {
            dirs.push((index as u32, fd));
            continue;
        }
        let file = File::from(fd);
        match (&mut check, st) {
            (FileCheck::Verify(v, Some(policy)), Some(st)) if policy.eligible(e) => {
                let recorded = v.get(file_no).copied();
                pass_on(e, path, file, &st, *policy, recorded, &mut out, &mut scratch.buf)?;
            }
            (check, _) => {
                let hashed = copy_file(e, path, &file, &mut out, &mut scratch.buf, !matches!(check, FileCheck::Off))?;
                match check {
                    FileCheck::Off => {}
                    FileCheck::Record(v, _) => v.push(hashed),
                    FileCheck::Verify(v, _) => {
                        let recorded = v.get(file_no).copied();
                        if recorded != Some(hashed) {
                            return Err(content_differs(e, path, &file, recorded, hashed));
                        }
                    }
                }
            }
        }
        file_no += 1;
        out.emit(&ZEROS[..tarheader::data_padding(e.size)])?;
    }
    Ok(())
}

/// Passes on by reference a file the splice policy picked, once it is
/// checked against the listing (the ctime here; the rest was checked on
/// opening) and, where the policy cannot vouch for its content (a digest
/// from the cache), read and compared with its `recorded` xxh3: that still
/// saves the pipe write copy.
#[allow(clippy::too_many_arguments)]
fn pass_on<W: LayerOut>(
    e: &Entry,
    path: &[u8],
    file: File,
    st: &Stat,
    policy: Policy,
    recorded: Option<u128>,
    out: &mut Counting<'_, W>,
    buf: &mut Vec<u8>,
) -> Result<(), LayerError> {
    let seen = Seen::of(e);
    let path_buf = || PathBuf::from(std::ffi::OsStr::from_bytes(path));
    if let Some(what) = seen.differs(st, true) {
        return Err(LayerError::Changed { path: path_buf(), what });
    }
    if !policy.unread(e) {
        let hashed = copy_file(e, path, &file, &mut Counting { out: &mut io::sink(), written: 0 }, buf, true)?;
        if recorded != Some(hashed) {
            return Err(content_differs(e, path, &file, recorded, hashed));
        }
    }
    out.pass_file(FileRef { fd: file.into(), len: e.size, path: path_buf(), seen }).map_err(LayerError::Output)
}

/// A file whose content hashed to `actual`, not `recorded`: [`LayerError::Changed`]
/// if it is no longer what the listing saw (ctime included: a write moves
/// it), else [`LayerError::ContentDiffers`], the record's fault.
fn content_differs(e: &Entry, path: &[u8], file: &File, recorded: Option<u128>, actual: u128) -> LayerError {
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
    let now = match fsat::fstat(file.as_fd()) {
        Ok(st) => st,
        Err(source) => return LayerError::Read { path, source },
    };
    match Seen::of(e).differs(&now, true) {
        Some(what) => LayerError::Changed { path, what: format!("{what}; its content differs from the hashing pass") },
        None => LayerError::ContentDiffers(Box::new(ContentDiffers { path, recorded, actual })),
    }
}

/// Pushes onto `dirs` the directory `index` and those above it, outermost
/// first, each opened through the one above (the outermost by its path).
fn open_ancestors(
    listing: &Listing,
    index: u32,
    dirs: &mut Vec<(u32, OwnedFd)>,
    name: &mut CName,
) -> Result<(), LayerError> {
    let mut chain = Vec::new();
    let mut i = index;
    while i != NO_PARENT {
        chain.push(i);
        i = listing.entries[i as usize].parent;
    }
    for &i in chain.iter().rev() {
        let e = &listing.entries[i as usize];
        let parent = dirs.last().map(|(_, fd)| fd.as_fd());
        let path = listing.path(e);
        let open_name = if parent.is_some() { listing.open_name(e) } else { path };
        let (fd, _) = open_entry(e, path, parent, open_name, name, Identity::Checked)?;
        dirs.push((i, fd));
    }
    Ok(())
}

/// A layer's output, counting bytes; output errors become `LayerError::Output`.
pub struct Counting<'a, W> {
    pub out: &'a mut W,
    pub written: u64,
}

impl<W: Write> Counting<'_, W> {
    fn emit(&mut self, bytes: &[u8]) -> Result<(), LayerError> {
        self.write_all(bytes).map_err(LayerError::Output)
    }
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn entry_header<'a>(name: &'a [u8], link: &'a [u8], kind: Kind, mode: u32, size: u64, owner: &'a Owner) -> Header<'a> {
    Header {
        name,
        mode,
        uid: owner.uid,
        gid: owner.gid,
        size,
        mtime: owner.mtime,
        typeflag: match kind {
            Kind::Directory => typeflag::DIRECTORY,
            Kind::Symlink => typeflag::SYMLINK,
            Kind::File => typeflag::REGULAR,
        },
        linkname: link,
        uname: &owner.uname,
        gname: &owner.gname,
        devmajor: 0,
        devminor: 0,
        pax: &[],
    }
}

/// Whether a pass compares each entry it opens with the listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Checked,
    Unchecked,
}

/// Opens a directory or file entry (never following a symlink, never
/// blocking on a fifo put in its place) and, when `identity` says so, checks
/// it is still what the listing saw: same type, device, inode, size and
/// mtime (and returns its status).
fn open_entry(
    e: &Entry,
    path: &[u8],
    parent: Option<BorrowedFd<'_>>,
    open_name: &[u8],
    name: &mut CName,
    identity: Identity,
) -> Result<(OwnedFd, Option<Stat>), LayerError> {
    let p = || PathBuf::from(std::ffi::OsStr::from_bytes(path));
    let changed = |what: String| LayerError::Changed { path: p(), what };
    let c = name.set(open_name).map_err(|source| LayerError::Read { path: p(), source })?;
    let flags =
        if e.kind == Kind::Directory { OFlags::RDONLY | OFlags::DIRECTORY } else { OFlags::RDONLY | OFlags::NONBLOCK };
    let fd = match fsat::open(parent, c, flags) {
        Ok(fd) => fd,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(changed("it was removed".into())),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => return Err(changed("it became a symlink".into())),
        Err(err) if err.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(changed("it is no longer a directory".into()))
        }
        Err(source) => return Err(LayerError::Read { path: p(), source }),
    };
    if identity == Identity::Unchecked {
        return Ok((fd, None));
    }
    let st = fsat::fstat(fd.as_fd()).map_err(|source| LayerError::Read { path: p(), source })?;
    let (want, what) = if e.kind == Kind::Directory {
        (libc::S_IFDIR, "it is no longer a directory")
    } else {
        (libc::S_IFREG, "it is no longer a regular file")
    };
    if st.file_type() != want {
        return Err(changed(what.into()));
    }
    let seen = Seen::of(e);
    // A directory's size and times change with its entries: its identity is enough.
    let differs = if e.kind == Kind::File { seen.differs(&st, false) } else { seen.replaced(&st) };
    if let Some(what) = differs {
        return Err(changed(what));
    }
    Ok((fd, Some(st)))
}

/// Copies the file's content; returns its xxh3-128 when `hash` is set.
fn copy_file<W: LayerOut>(
    e: &Entry,
    path: &[u8],
    f: &File,
    out: &mut Counting<'_, W>,
    buf: &mut Vec<u8>,
    hash: bool,
) -> Result<u128, LayerError> {
    let p = || PathBuf::from(std::ffi::OsStr::from_bytes(path));
    let changed = |what: String| LayerError::Changed { path: p(), what };
    let failed = |err: io::Error| {
        if err.get_ref().is_some_and(|r| r.is::<crate::render::sink::WriterGone>()) {
            LayerError::Output(err)
        } else if err.raw_os_error() == Some(libc::EISDIR) {
            changed("it is no longer a regular file".into())
        } else {
            LayerError::Read { path: p(), source: err }
        }
    };
    let mut xxh = hash.then(xxhash_rust::xxh3::Xxh3::new);
    let mut left = e.size;
    while left > 0 {
        let want = READ.min(left as usize);
        // Straight into the output's buffer where it has one (no copy).
        let n = match out.read_into(f.as_fd(), want) {
            Some(r) => {
                let got = r.map_err(failed)?;
                if let Some(x) = xxh.as_mut() {
                    x.update(got);
                }
                got.len()
            }
            None => {
                buf.resize(READ, 0);
                let n = loop {
                    match (&*f).read(&mut buf[..want]) {
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r.map_err(failed)?,
                    }
                };
                if let Some(x) = xxh.as_mut() {
                    x.update(&buf[..n]);
                }
                out.emit(&buf[..n])?;
                n
            }
        };
        if n == 0 {
            return Err(changed(fsat::ended_early(f.as_fd(), e.size, left)));
        }
        left -= n as u64;
    }
    Ok(xxh.map_or(0, |x| x.digest128()))
}

impl<W: LayerOut> LayerOut for Counting<'_, W> {
    fn read_into(&mut self, fd: BorrowedFd<'_>, max: usize) -> Option<io::Result<&[u8]>> {
        let Counting { out, written } = self;
        let r = out.read_into(fd, max)?;
        if let Ok(got) = &r {
            *written += got.len() as u64;
        }
        Some(r)
    }

    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        let len = file.len;
        self.out.pass_file(file)?;
        self.written += len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::digest::HashSink;
    use crate::store::walk::list_layer;

    #[test]
    fn same_size_same_mtime_content_change_is_caught_per_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pkg");
        std::fs::create_dir(&p).unwrap();
        let f = p.join("data");
        std::fs::write(&f, vec![1u8; 5000]).unwrap();
        let listing = list_layer(std::slice::from_ref(&p), 2).unwrap();
        let mut files = Vec::new();
        let mut sink = HashSink::new();
        let n = write_store_layer(
            &listing,
            &Owner::test_root(),
            &mut sink,
            &mut Scratch::default(),
            FileCheck::Record(&mut files, Identity::Checked),
            None,
        )
        .unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(sink.finish().size, n);

        // Same bytes again: the verify pass accepts them.
        let mut out = Vec::new();
        write_store_layer(
            &listing,
            &Owner::test_root(),
            &mut out,
            &mut Scratch::default(),
            FileCheck::Verify(&files, None),
            None,
        )
        .unwrap();

        // Same size, same inode, mtime put back: only the content differs.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        let mut fh = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        fh.write_all(&[2u8; 10]).unwrap();
        fh.set_modified(mtime).unwrap();
        drop(fh);
        let e = write_store_layer(
            &listing,
            &Owner::test_root(),
            &mut Vec::new(),
            &mut Scratch::default(),
            FileCheck::Verify(&files, None),
            None,
        )
        .unwrap_err();
        assert!(matches!(&e, LayerError::Changed { path, .. } if path == &f), "{e}");
        assert!(e.to_string().contains("differs from the hashing pass"), "{e}");
    }

    /// Hashes recorded from other content than the file had when it was
    /// listed (a record from outside the run) are the record's fault, not a
    /// change: the file is still what the listing saw.
    #[test]
    fn a_record_of_other_content_is_not_a_change() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pkg");
        std::fs::create_dir(&p).unwrap();
        let f = p.join("data");
        std::fs::write(&f, vec![1u8; 5000]).unwrap();
        let record = |listing: &Listing| {
            let mut files = Vec::new();
            let check = FileCheck::Record(&mut files, Identity::Checked);
            write_store_layer(listing, &Owner::test_root(), &mut HashSink::new(), &mut Scratch::default(), check, None)
                .unwrap();
            files
        };
        let old = record(&list_layer(std::slice::from_ref(&p), 2).unwrap());
        std::fs::write(&f, vec![2u8; 5000]).unwrap();
        let listing = list_layer(std::slice::from_ref(&p), 2).unwrap();
        let new = record(&listing);
        let e = write_store_layer(
            &listing,
            &Owner::test_root(),
            &mut Vec::new(),
            &mut Scratch::default(),
            FileCheck::Verify(&old, None),
            None,
        )
        .unwrap_err();
        match &e {
            LayerError::ContentDiffers(d) => {
                assert_eq!(**d, ContentDiffers { path: f.clone(), recorded: Some(old[0]), actual: new[0] });
            }
            e => panic!("{e}"),
        }
    }
}
