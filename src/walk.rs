//! Listing store paths into layer entries, once, in the reference's order.
//!
//! The reference archives `[path] + path.rglob("*")` sorted as `pathlib`
//! paths: component by component, each component compared as a Python string
//! (code points, with undecodable bytes as surrogates `U+DC80..U+DCFF`).  That
//! is a pre-order walk with each directory's children sorted by that key.
//! Symlinks are never followed; a store path that is itself a symlink is one
//! entry.  The listing is kept (in one byte arena per layer, not one
//! allocation per file) and reused by both passes; each file's size, inode and
//! mtime are recorded so a pass can tell when a file changed underneath us
//! (and its ctime, for the digest cache's key).  Each entry also records its
//! parent directory's index: the walk and both passes reach an entry through
//! its parent's descriptor and its base name ([`crate::fsat`]), never through
//! its absolute path.

use std::cmp::Ordering;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::fsat::{self, CName, Stat};

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("store path {path} does not exist (is it built and in the store?)")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is a {kind}; Nix store paths cannot hold one (NAR has no such entry), so it is not archived")]
    Unsupported { path: PathBuf, kind: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Symlink,
    /// A regular file (hard links included: the reference writes every name
    /// as a regular file with its full content).
    File,
}

/// `Entry::parent` of an entry reached by its absolute path (a store path,
/// or a top-level entry of a contents directory).
pub const NO_PARENT: u32 = u32::MAX;

/// One archive member of a store layer.
#[derive(Debug, Clone)]
pub struct Entry {
    path: (usize, usize),
    link: (usize, usize),
    /// Index of the directory entry this one is in ([`NO_PARENT`] for one
    /// opened by absolute path); the passes open it relative to that
    /// directory's descriptor, by its base name.
    pub parent: u32,
    /// Where the base name starts in the path.
    base: u32,
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// Content size for files, else 0.
    pub size: u64,
    /// Identity used to detect a file replaced or modified between passes.
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    /// Part of the digest cache's key (see [`crate::cache`]).
    pub ctime_ns: i128,
}

/// What the listing saw of an entry's identity: a file the passes open
/// must still be that (a spliced one, ctime included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Seen {
    pub fn of(e: &Entry) -> Seen {
        Seen { dev: e.dev, ino: e.ino, size: e.size, mtime_ns: e.mtime_ns, ctime_ns: e.ctime_ns }
    }

    /// How `st` differs from what was seen (the ctime too when `ctime`),
    /// if it does.
    pub fn differs(&self, st: &Stat, ctime: bool) -> Option<String> {
        if let Some(what) = self.replaced(st) {
            Some(what)
        } else if st.size != self.size {
            Some(format!("size {} became {}", self.size, st.size))
        } else if st.mtime_ns != self.mtime_ns {
            Some("it was modified".into())
        } else if ctime && st.ctime_ns != self.ctime_ns {
            Some("its ctime moved: it was written to, or its metadata changed".into())
        } else {
            None
        }
    }

    /// Whether `st` is another file than the one seen.
    pub fn replaced(&self, st: &Stat) -> Option<String> {
        (st.dev != self.dev || st.ino != self.ino).then(|| "it was replaced by another file".into())
    }
}

/// The entries of one layer, in archive order.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: Vec<Entry>,
    arena: Vec<u8>,
    /// Sum of file content sizes.
    pub file_bytes: u64,
    /// Bytes of each path that are not part of its member name: 0 for store
    /// layers (absolute names, as the reference writes them), the root
    /// directory and its slash for a contents layer (names relative to `/`).
    pub name_offset: usize,
    /// Whether the layer starts with the `/nix` and `/nix/store` entries.
    pub nix_dirs: bool,
}

impl Listing {
    /// The absolute path of `e` on this machine.
    pub fn path(&self, e: &Entry) -> &[u8] {
        &self.arena[e.path.0..e.path.1]
    }

    /// What opens `e`: its base name when it has a parent, else its path.
    pub fn open_name(&self, e: &Entry) -> &[u8] {
        if e.parent == NO_PARENT {
            self.path(e)
        } else {
            &self.arena[e.path.0 + e.base as usize..e.path.1]
        }
    }

    /// The member name of `e`.
    pub fn name(&self, e: &Entry) -> &[u8] {
        &self.arena[e.path.0 + self.name_offset..e.path.1]
    }

    /// The symlink target of `e` (empty for other kinds).
    pub fn link(&self, e: &Entry) -> &[u8] {
        &self.arena[e.link.0..e.link.1]
    }

    /// Appends the entry at `path` (base name from `base`), reached through
    /// `dir` (None: by absolute path); returns its index and kind.
    fn push(
        &mut self,
        path: &[u8],
        base: usize,
        dir: Option<BorrowedFd<'_>>,
        parent: u32,
        st: &Stat,
        c: &CStr,
    ) -> Result<(u32, Kind), WalkError> {
        // Borrowed: a PathBuf is made only for an error.
        let p = || PathBuf::from(OsStr::from_bytes(path));
        let kind = match st.file_type() {
            libc::S_IFDIR => Kind::Directory,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFREG => Kind::File,
            t => {
                let kind = match t {
                    libc::S_IFIFO => "fifo",
                    libc::S_IFSOCK => "socket",
                    libc::S_IFCHR => "character device",
                    _ => "block device",
                };
                return Err(WalkError::Unsupported { path: p(), kind });
            }
        };
        let start = self.arena.len();
        self.arena.extend_from_slice(path);
        let path_r = (start, self.arena.len());
        let mut link_r = (self.arena.len(), self.arena.len());
        if kind == Kind::Symlink {
            let s = self.arena.len();
            fsat::readlink(dir, c, &mut self.arena).map_err(|source| WalkError::Io { path: p(), source })?;
            link_r = (s, self.arena.len());
        }
        let size = if kind == Kind::File { st.size } else { 0 };
        self.file_bytes += size;
        let index = u32::try_from(self.entries.len()).expect("fewer than 4 billion entries in a layer");
        self.entries.push(Entry {
            path: path_r,
            link: link_r,
            parent,
            base: base as u32,
            kind,
            mode: st.mode & 0o7777,
            size,
            dev: st.dev,
            ino: st.ino,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
        });
        Ok((index, kind))
    }
}

/// Lists the store paths of one layer, each path's tree in reference order,
/// the paths in the given order.
pub fn list_layer(paths: &[PathBuf]) -> Result<Listing, WalkError> {
    let mut listing = Listing { nix_dirs: true, ..Listing::default() };
    let mut c = CName::default();
    for path in paths {
        let bytes = path.as_os_str().as_bytes();
        let name = c.set(bytes).map_err(|source| WalkError::Io { path: path.clone(), source })?;
        let st = fsat::lstat(None, name).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                WalkError::Missing { path: path.clone() }
            } else {
                WalkError::Io { path: path.clone(), source }
            }
        })?;
        let base = bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        let (index, kind) = listing.push(bytes, base, None, NO_PARENT, &st, name)?;
        if kind == Kind::Directory {
            let fd = fsat::open_dir(None, name).map_err(|source| WalkError::Io { path: path.clone(), source })?;
            let mut buf = bytes.to_vec();
            walk_dir(fd.as_fd(), index, &mut buf, &mut listing, &mut c)?;
        }
    }
    Ok(listing)
}

/// Lists what is inside `dir` (not `dir` itself) for a layer whose member
/// names are relative to `/`: the `--contents` of an image, which becomes its
/// customisation layer.  Same order and checks as store layers.
pub fn list_contents(dir: &Path) -> Result<Listing, WalkError> {
    let md = std::fs::metadata(dir).map_err(|source| WalkError::Io { path: dir.to_path_buf(), source })?;
    if !md.is_dir() {
        return Err(WalkError::Io { path: dir.to_path_buf(), source: std::io::Error::other("not a directory") });
    }
    let mut buf = dir.as_os_str().as_bytes().to_vec();
    while buf.len() > 1 && buf.ends_with(b"/") {
        buf.pop();
    }
    let mut c = CName::default();
    let io = |source| WalkError::Io { path: dir.to_path_buf(), source };
    let fd = fsat::open_dir(None, c.set(&buf).map_err(io)?).map_err(io)?;
    let mut listing = Listing { name_offset: buf.len() + 1, nix_dirs: false, ..Listing::default() };
    // Its children are opened by absolute path: there is no root entry.
    walk_dir(fd.as_fd(), NO_PARENT, &mut buf, &mut listing, &mut c)?;
    Ok(listing)
}

/// Appends the sorted subtree of the directory open as `fd`, entry `index`,
/// whose path is in `path` (reused as the path buffer).
fn walk_dir(
    fd: BorrowedFd<'_>,
    index: u32,
    path: &mut Vec<u8>,
    listing: &mut Listing,
    c: &mut CName,
) -> Result<(), WalkError> {
    let err = |path: &[u8], source| WalkError::Io { path: PathBuf::from(OsStr::from_bytes(path)), source };
    let mut children = fsat::read_dir(fd).map_err(|e| err(path, e))?;
    children.sort_unstable_by(|a, b| compare_names(a, b));
    let base_len = path.len();
    for name in children {
        path.truncate(base_len);
        path.push(b'/');
        path.extend_from_slice(&name);
        let cname = c.set(&name).map_err(|e| err(path, e))?;
        let st = fsat::lstat(Some(fd), cname).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                err(path, std::io::Error::other("vanished while being listed"))
            } else {
                err(path, source)
            }
        })?;
        let (child, kind) = listing.push(path, base_len + 1, Some(fd), index, &st, cname)?;
        if kind == Kind::Directory {
            let cfd = fsat::open_dir(Some(fd), cname).map_err(|e| err(path, e))?;
            // Entries of a contents root are opened by path; below it, by parent.
            walk_dir(cfd.as_fd(), child, path, listing, c)?;
        }
    }
    path.truncate(base_len);
    Ok(())
}

/// Python's `str` order of two file names decoded with `surrogateescape`.
/// Where the names first differ in two ASCII bytes (or one ends and the
/// other goes on with an ASCII byte), the common prefix decodes the same in
/// both (an ASCII byte completes no sequence) and byte order is the answer:
/// almost every comparison of a sort.  Otherwise: byte order when both are
/// valid UTF-8 (it is code point order), else the decoded code points.
pub fn compare_names(a: &[u8], b: &[u8]) -> Ordering {
    let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if a.get(i).is_none_or(u8::is_ascii) && b.get(i).is_none_or(u8::is_ascii) {
        return a.cmp(b);
    }
    if std::str::from_utf8(a).is_ok() && std::str::from_utf8(b).is_ok() {
        return a.cmp(b);
    }
    code_points(a).cmp(code_points(b))
}

fn code_points(s: &[u8]) -> impl Iterator<Item = u32> + '_ {
    s.utf8_chunks()
        .flat_map(|c| c.valid().chars().map(|ch| ch as u32).chain(c.invalid().iter().map(|&b| 0xDC00 + u32::from(b))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path agrees with decoding both names, on names built from
    /// the bytes that matter (ASCII, lead and continuation bytes, invalid).
    #[test]
    fn fast_path_agrees_with_decoded_code_points() {
        use proptest::prelude::*;
        let byte = prop::sample::select(vec![b'a', b'b', 0x80, 0xBF, 0xC4, 0xE2, 0xF0, 0xFF]);
        let name = prop::collection::vec(byte, 0..6);
        proptest!(ProptestConfig::with_cases(20_000), |(a in name.clone(), b in name)| {
            let slow = if std::str::from_utf8(&a).is_ok() && std::str::from_utf8(&b).is_ok() {
                a.cmp(&b)
            } else {
                code_points(&a).cmp(code_points(&b))
            };
            prop_assert_eq!(compare_names(&a, &b), slow, "{:?} {:?}", a, b);
        });
        // The prefix case: a lead byte ends one name, the other completes it.
        assert_eq!(compare_names(b"\xc4", b"\xc4\x80"), Ordering::Greater);
    }

    #[test]
    fn python_order_differs_from_byte_order_for_undecodable_names() {
        // U+0100 (bytes C4 80) sorts before the escaped byte 0x80 (U+DC80),
        // although C4 > 80 as bytes.
        assert_eq!(compare_names("\u{100}".as_bytes(), b"\x80"), Ordering::Less);
        // U+E000 (EE 80 80) sorts after 0xFF (U+DCFF).
        assert_eq!(compare_names("\u{e000}".as_bytes(), b"\xff"), Ordering::Greater);
        assert_eq!(compare_names(b"A", b"_x"), Ordering::Less);
        assert_eq!(compare_names(b"a", b"a-c"), Ordering::Less);
    }

    #[test]
    fn walk_is_component_wise_preorder() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("s");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/b"), b"1").unwrap();
        std::fs::write(root.join("a-c"), b"22").unwrap();
        std::fs::write(root.join("a0"), b"").unwrap();
        std::os::unix::fs::symlink("a", root.join("l")).unwrap();
        let l = list_layer(std::slice::from_ref(&root)).unwrap();
        let names: Vec<String> = l
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&l.path(e)[root.as_os_str().len()..]).into_owned())
            .collect();
        assert_eq!(names, ["", "/a", "/a/b", "/a-c", "/a0", "/l"]);
        assert_eq!(l.file_bytes, 3);
        assert_eq!(l.link(&l.entries[5]), b"a");
        assert_eq!(l.entries[5].kind, Kind::Symlink);
    }

    #[test]
    fn missing_path_is_named() {
        let e = list_layer(&[PathBuf::from("/nonexistent/xyz")]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/xyz"));
    }
}
