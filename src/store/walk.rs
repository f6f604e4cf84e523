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
//! its parent's descriptor and its base name ([`crate::store::fsat`]), never through
//! its absolute path.  A big tree is listed by several threads, one
//! directory per task, then put in order from the per-directory results
//! (`Walk`): the listing does not depend on the number of threads.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};

use crate::store::fsat::{self, CName, Stat};

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
    /// Part of the digest cache's key (see [`crate::engine::cache`]).
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

    /// The first file that is no longer what the listing saw (identity,
    /// size, mtime, ctime), and how; looked up by absolute path.  What tells
    /// a file that changed under a run from a digest that was wrong for it
    /// all along, once a layer's bytes failed their check: only a file's
    /// content is read by the passes (names, modes and links come from the
    /// listing), and any write moves its ctime.
    pub fn first_changed(&self) -> Option<(PathBuf, String)> {
        let mut name = CName::default();
        self.entries.iter().filter(|e| e.kind == Kind::File).find_map(|e| {
            let path = self.path(e);
            let what = match name.set(path).and_then(|c| fsat::lstat(None, c)) {
                Ok(st) => Seen::of(e).differs(&st, true)?,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => "it was removed".into(),
                Err(err) => format!("it cannot be examined: {err}"),
            };
            Some((PathBuf::from(OsStr::from_bytes(path)), what))
        })
    }

    /// Appends the entry at `path` (base name from `base`) of `kind`, with
    /// its symlink target `link`; returns its index.
    fn push(&mut self, path: &[u8], base: usize, parent: u32, st: &Stat, kind: Kind, link: &[u8]) -> u32 {
        let start = self.arena.len();
        self.arena.extend_from_slice(path);
        let path_r = (start, self.arena.len());
        self.arena.extend_from_slice(link);
        let link_r = (path_r.1, self.arena.len());
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
        index
    }
}

/// The entry kind of `st`, or the error for a kind no store path can hold.
fn kind_of(st: &Stat, path: &[u8]) -> Result<Kind, WalkError> {
    Ok(match st.file_type() {
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
            return Err(WalkError::Unsupported { path: PathBuf::from(OsStr::from_bytes(path)), kind });
        }
    })
}

/// Lists the store paths of one layer, each path's tree in reference order,
/// the paths in the given order, with up to `threads` threads (`Walk`).
pub fn list_layer(paths: &[PathBuf], threads: usize) -> Result<Listing, WalkError> {
    let mut listing = Listing { nix_dirs: true, ..Listing::default() };
    let mut c = CName::default();
    let walk = Walk::default();
    // Each store path: its entry (by absolute path), and a task for its tree.
    let mut tops = Vec::with_capacity(paths.len());
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
        let kind = kind_of(&st, bytes)?;
        let mut link = Vec::new();
        if kind == Kind::Symlink {
            fsat::readlink(None, name, &mut link).map_err(|source| WalkError::Io { path: path.clone(), source })?;
        }
        let node = (kind == Kind::Directory).then(|| walk.task(None, bytes.to_vec(), bytes.to_vec()));
        tops.push((st, kind, link, node));
    }
    let mut nodes = walk.run(threads)?;
    for (path, (st, kind, link, node)) in paths.iter().zip(tops) {
        let bytes = path.as_os_str().as_bytes();
        let base = bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        let index = listing.push(bytes, base, NO_PARENT, &st, kind, &link);
        if let Some(node) = node {
            let mut buf = bytes.to_vec();
            assemble(&mut nodes, node, index, &mut buf, &mut listing);
        }
    }
    Ok(listing)
}

/// Lists what is inside `dir` (not `dir` itself) for a layer whose member
/// names are relative to `/`: the `--contents` of an image, which becomes its
/// customisation layer.  Same order and checks as store layers.
pub fn list_contents(dir: &Path, threads: usize) -> Result<Listing, WalkError> {
    let md = std::fs::metadata(dir).map_err(|source| WalkError::Io { path: dir.to_path_buf(), source })?;
    if !md.is_dir() {
        return Err(WalkError::Io { path: dir.to_path_buf(), source: std::io::Error::other("not a directory") });
    }
    let mut buf = dir.as_os_str().as_bytes().to_vec();
    while buf.len() > 1 && buf.ends_with(b"/") {
        buf.pop();
    }
    let mut listing = Listing { name_offset: buf.len() + 1, nix_dirs: false, ..Listing::default() };
    let walk = Walk::default();
    let root = walk.task(None, buf.clone(), buf.clone());
    let mut nodes = walk.run(threads)?;
    // Its children are opened by absolute path: there is no root entry.
    assemble(&mut nodes, root, NO_PARENT, &mut buf, &mut listing);
    Ok(listing)
}

/// A tree walked in parallel, then put in order.
///
/// Listing costs a `fstatat` per entry and an `openat` and `getdents` per
/// directory: about a quarter of a second for a 45,000-file store path here,
/// on one core, before its first byte can be hashed.  So directories are
/// tasks on a shared stack: each task opens its directory through its
/// parent's descriptor, reads and sorts the names, `lstat`s each (and reads
/// each symlink) and pushes a task for each subdirectory; the result is one
/// [`Node`] per directory.  The calling thread works alone at first; once it
/// has listed [`SOLO_DIRS`] directories with more than one still queued, it
/// starts up to `threads - 1` helpers, so small layers never start a thread.
/// Then [`assemble`] writes the entries in the reference's pre-order from
/// the nodes, without a system call: the listing is the same whatever the
/// number of threads (tested).
///
/// The stack is last in, first out, and a task holds its parent's
/// descriptor, not its own: open descriptors stay about the depth of the
/// tree times the threads, however wide a directory.
#[derive(Default)]
struct Walk {
    state: Mutex<WalkState>,
    more: Condvar,
    nodes: AtomicUsize,
}

/// Threads for a walk when the caller has no setting: one per core (at most 8).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8)
}

/// Directories a walk's calling thread lists before it starts helpers.
const SOLO_DIRS: usize = 32;

#[derive(Default)]
struct WalkState {
    stack: Vec<Task>,
    /// Tasks queued or being worked on.
    pending: usize,
    failed: bool,
}

/// A directory to list: its node number, its parent's descriptor (`None`:
/// opened by `path`), its name there, and its path (for messages).
struct Task {
    node: usize,
    parent: Option<Arc<OwnedFd>>,
    name: Vec<u8>,
    path: Vec<u8>,
}

/// One listed directory: its entries, sorted, their names and symlink
/// targets in one buffer (not an allocation per entry: a node tree holds a
/// whole layer until it is assembled).
struct Node {
    children: Vec<Child>,
    bytes: Vec<u8>,
}

struct Child {
    /// Where the name ends in `bytes` (it starts where the previous link ends).
    name_end: u32,
    /// Where the symlink target ends (empty for other kinds).
    link_end: u32,
    kind: Kind,
    /// The subdirectory's node, for a directory.
    node: u32,
    st: Stat,
}

impl Walk {
    /// Queues a directory; returns its node number.
    fn task(&self, parent: Option<Arc<OwnedFd>>, name: Vec<u8>, path: Vec<u8>) -> usize {
        let node = self.nodes.fetch_add(1, AtomicOrdering::Relaxed);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.stack.push(Task { node, parent, name, path });
        st.pending += 1;
        node
    }

    /// Lists every queued directory and what it leads to, with up to
    /// `threads` threads; returns the nodes by number.
    fn run(&self, threads: usize) -> Result<Vec<Option<Node>>, WalkError> {
        std::thread::scope(|s| {
            let mut c = CName::default();
            let mut mine = Vec::new();
            let mut solo = 0usize;
            // Alone first: a small tree is done before any thread starts.
            let mut r = self.work(&mut c, &mut mine, Some(&mut solo));
            let mut helpers = Vec::new();
            if r.is_ok() && solo >= SOLO_DIRS {
                for _ in 1..threads {
                    helpers.push(s.spawn(|| {
                        let mut mine = Vec::new();
                        self.work(&mut CName::default(), &mut mine, None).map(|()| mine)
                    }));
                }
                r = self.work(&mut c, &mut mine, None);
            }
            let mut results = vec![r.map(|()| mine)];
            results.extend(helpers.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
            let mut nodes: Vec<Option<Node>> = Vec::new();
            nodes.resize_with(self.nodes.load(AtomicOrdering::Relaxed), || None);
            for r in results {
                for (i, node) in r? {
                    nodes[i] = Some(node);
                }
            }
            Ok(nodes)
        })
    }

    /// Lists directories from the stack into `out` until none is left (or,
    /// with `solo`, counting them, until it is time to start helpers).
    fn work(&self, c: &mut CName, out: &mut Vec<(usize, Node)>, mut solo: Option<&mut usize>) -> Result<(), WalkError> {
        // A walker that panics stops the others too (they would wait for
        // its task forever, and the scope for them).
        struct FailOnPanic<'w>(&'w Walk);
        impl Drop for FailOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.fail();
                }
            }
        }
        let _guard = FailOnPanic(self);
        loop {
            if solo.as_deref().is_some_and(|n| *n >= SOLO_DIRS) {
                return Ok(());
            }
            let Some(task) = self.next() else { return Ok(()) };
            match self.list_dir(task, c) {
                Ok((i, node, subdirs)) => {
                    out.push((i, node));
                    self.done(subdirs);
                    if let Some(n) = solo.as_deref_mut() {
                        *n += 1;
                    }
                }
                Err(e) => {
                    self.fail();
                    return Err(e);
                }
            }
        }
    }

    /// Stops every walker: no task is handed out any more.
    fn fail(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failed = true;
        self.more.notify_all();
    }

    /// The next task, waiting while others may still queue some; `None`
    /// once every directory is listed or a walker failed.
    fn next(&self) -> Option<Task> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.failed {
                return None;
            }
            if let Some(t) = st.stack.pop() {
                return Some(t);
            }
            if st.pending == 0 {
                return None;
            }
            st = self.more.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// One task done; queues its subdirectories (the first on top).
    fn done(&self, mut subdirs: Vec<Task>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.pending += subdirs.len();
        st.pending -= 1;
        subdirs.reverse();
        st.stack.append(&mut subdirs);
        self.more.notify_all();
    }

    /// Lists one directory: its node, and a task per subdirectory.
    fn list_dir(&self, task: Task, c: &mut CName) -> Result<(usize, Node, Vec<Task>), WalkError> {
        let Task { node, parent, name, path } = task;
        // The panic test's directory (see `a_walker_that_panics_stops_the_others`).
        #[cfg(test)]
        assert!(name != b"panic-while-listing", "injected panic");
        let err = |path: &[u8], source| WalkError::Io { path: PathBuf::from(OsStr::from_bytes(path)), source };
        let cname = c.set(&name).map_err(|e| err(&path, e))?;
        let fd = fsat::open_dir(parent.as_deref().map(|p| p.as_fd()), cname).map_err(|e| err(&path, e))?;
        let mut names = fsat::read_dir(fd.as_fd()).map_err(|e| err(&path, e))?;
        names.sort_unstable_by(|a, b| compare_names(a, b));
        let fd = Arc::new(fd);
        let mut children = Vec::with_capacity(names.len());
        let mut bytes = Vec::with_capacity(names.iter().map(Vec::len).sum());
        let mut subdirs = Vec::new();
        let mut child_path = path;
        let base_len = child_path.len();
        for name in names {
            child_path.truncate(base_len);
            child_path.push(b'/');
            child_path.extend_from_slice(&name);
            let cname = c.set(&name).map_err(|e| err(&child_path, e))?;
            let st = fsat::lstat(Some(fd.as_fd()), cname).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    err(&child_path, std::io::Error::other("vanished while being listed"))
                } else {
                    err(&child_path, source)
                }
            })?;
            let kind = kind_of(&st, &child_path)?;
            bytes.extend_from_slice(&name);
            let name_end = bytes.len();
            let mut sub = u32::MAX;
            match kind {
                Kind::Symlink => {
                    fsat::readlink(Some(fd.as_fd()), cname, &mut bytes).map_err(|e| err(&child_path, e))?;
                }
                Kind::Directory => {
                    let n = self.nodes.fetch_add(1, AtomicOrdering::Relaxed);
                    sub = u32::try_from(n).expect("fewer than 4 billion directories in a layer");
                    subdirs.push(Task { node: n, parent: Some(Arc::clone(&fd)), name, path: child_path.clone() });
                }
                Kind::File => {}
            }
            let end = |n: usize| u32::try_from(n).expect("less than 4 GiB of names in a directory");
            children.push(Child { name_end: end(name_end), link_end: end(bytes.len()), kind, node: sub, st });
        }
        Ok((node, Node { children, bytes }, subdirs))
    }
}

/// Appends the entries below node `node` (the directory entry `index`,
/// whose path is in `path`, reused as the path buffer) in pre-order.
fn assemble(nodes: &mut [Option<Node>], node: usize, index: u32, path: &mut Vec<u8>, listing: &mut Listing) {
    let Node { children, bytes } = nodes[node].take().expect("every queued directory was listed");
    let base_len = path.len();
    let mut start = 0;
    for child in children {
        let (name_end, link_end) = (child.name_end as usize, child.link_end as usize);
        path.truncate(base_len);
        path.push(b'/');
        path.extend_from_slice(&bytes[start..name_end]);
        let i = listing.push(path, base_len + 1, index, &child.st, child.kind, &bytes[name_end..link_end]);
        if child.kind == Kind::Directory {
            assemble(nodes, child.node as usize, i, path, listing);
        }
        start = link_end;
    }
    path.truncate(base_len);
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
        let l = list_layer(std::slice::from_ref(&root), 1).unwrap();
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

    /// Regression: a walker that panicked left the others waiting for its
    /// task, and the walk hung instead of failing.
    #[test]
    fn a_walker_that_panics_stops_the_others() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("abc-pkg");
        big_tree(&root);
        std::fs::create_dir_all(root.join("d5/s20/deep/panic-while-listing")).unwrap();
        for threads in [1, 2, 4] {
            let (tx, rx) = std::sync::mpsc::channel();
            let r = root.clone();
            std::thread::spawn(move || {
                let caught = std::panic::catch_unwind(|| list_layer(&[r], threads));
                let _ = tx.send(caught.is_err());
            });
            let panicked = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk ends");
            assert!(panicked, "{threads} threads");
        }
    }

    #[test]
    fn missing_path_is_named() {
        let e = list_layer(&[PathBuf::from("/nonexistent/xyz")], 2).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/xyz"));
    }

    /// A tree with more directories than one thread lists alone (so the
    /// helpers start), deep and wide, with files, symlinks, empty
    /// directories and names whose Python order is not byte order.
    fn big_tree(root: &Path) {
        for a in 0..6 {
            for b in 0..(3 + a * 4) {
                let dir = root.join(format!("d{a}/s{b}/deep/er"));
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..(a + b) % 7 {
                    std::fs::write(dir.join(format!("f{f}")), vec![b'x'; f * 10 + a]).unwrap();
                }
                std::fs::write(root.join(format!("d{a}/s{b}/file")), b"12345").unwrap();
            }
            std::os::unix::fs::symlink(format!("d{a}/s0"), root.join(format!("l{a}"))).unwrap();
            std::fs::create_dir(root.join(format!("d{a}/empty"))).unwrap();
        }
        for name in [&b"\x80"[..], "\u{100}".as_bytes(), b"Z", b"_"] {
            std::fs::create_dir(root.join(OsStr::from_bytes(name))).unwrap();
            std::fs::write(root.join(OsStr::from_bytes(name)).join("in"), name).unwrap();
        }
    }

    /// Path, parent's position, kind, size, link target.
    type Expected = (Vec<u8>, u32, Kind, u64, Vec<u8>);

    /// The reference's order, from std's directory reading: every path in
    /// pre-order, with its parent's position, kind, size and link target.
    fn oracle(root: &Path) -> Vec<Expected> {
        fn walk(dir: &Path, parent: u32, out: &mut Vec<Expected>) {
            let mut names: Vec<Vec<u8>> =
                std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
            names.sort_by(|a, b| compare_names(a, b));
            for n in names {
                let p = dir.join(OsStr::from_bytes(&n));
                let md = std::fs::symlink_metadata(&p).unwrap();
                let (kind, size, link) = if md.is_dir() {
                    (Kind::Directory, 0, Vec::new())
                } else if md.file_type().is_symlink() {
                    (Kind::Symlink, 0, std::fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
                } else {
                    (Kind::File, md.len(), Vec::new())
                };
                out.push((p.as_os_str().as_bytes().to_vec(), parent, kind, size, link));
                if kind == Kind::Directory {
                    walk(&p, out.len() as u32 - 1, out);
                }
            }
        }
        let mut out = vec![(root.as_os_str().as_bytes().to_vec(), NO_PARENT, Kind::Directory, 0, Vec::new())];
        walk(root, 0, &mut out);
        out
    }

    #[test]
    fn the_listing_is_the_reference_order_whatever_the_threads() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("abc-pkg");
        big_tree(&root);
        let want = oracle(&root);
        let dirs = want.iter().filter(|w| w.2 == Kind::Directory).count();
        assert!(dirs > 2 * SOLO_DIRS, "{dirs} directories: helpers start");
        for threads in [1, 2, 3, 8] {
            let l = list_layer(std::slice::from_ref(&root), threads).unwrap();
            let got: Vec<_> =
                l.entries.iter().map(|e| (l.path(e).to_vec(), e.parent, e.kind, e.size, l.link(e).to_vec())).collect();
            assert_eq!(got, want, "{threads} threads");
            for e in &l.entries[1..] {
                let path = l.path(e);
                assert_eq!(l.open_name(e), &path[path.iter().rposition(|&b| b == b'/').unwrap() + 1..]);
            }
            assert_eq!(l.file_bytes, want.iter().map(|w| w.3).sum::<u64>());
        }
    }

    #[test]
    fn a_bad_entry_deep_in_a_parallel_walk_is_named() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("abc-pkg");
        big_tree(&root);
        let fifo = root.join("d5/s20/deep/er/pipe");
        use rustix::fs::{FileType, Mode, CWD};
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
        for threads in [1, 2, 4] {
            let e = list_layer(std::slice::from_ref(&root), threads).unwrap_err();
            assert!(matches!(&e, WalkError::Unsupported { path, kind: "fifo" } if *path == fifo), "{e}");
        }
    }
}
