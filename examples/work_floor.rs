//! The least work any two-pass streamer does on an input, timed on this
//! machine: the "work floor" that scripts/bench sets beside nixstream's wall
//! time.  Usage: `work_floor [--hashing-only] THREADS STORE_PATH...`;
//! prints the best wall time of three runs, in seconds (`--hashing-only`:
//! the listing and the first pass alone, what even a streamer with no
//! second pass would do).
//!
//! The hashing pass cannot skip a byte and the streaming pass cannot skip a
//! small file, so whatever the implementation, each run has to: list every
//! entry (one `fstatat` each), open, read and close every file and sha256
//! all of its bytes, then open, read and close again every file under 64
//! KiB (the big ones counted as free, as if spliced into the output at no
//! cost).  This program does just that, with the files shared out to
//! THREADS threads one at a time, each thread hashing what it read into a
//! sha256 of its own (a real layer's sha256 is one sequential stream, so
//! this spreads the hashing better than any streamer can), each file
//! opened relative to its directory's descriptor, reads of 256 KiB.  It
//! writes no tar headers, no output, and has no consumer to share the cores
//! with.  So it is a lower bound, optimistic on every count: a streamer's
//! wall time divided by it says how much of the time is its own overhead.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Files below this are read again by the streaming pass (nixstream's
/// splice threshold); the others are counted as spliced for free.
const SMALL: u64 = 64 << 10;
const READ: usize = 1 << 18;

struct File {
    dir: usize,
    name: CString,
    size: u64,
}

fn open_at(dir: i32, name: &CStr, flags: i32) -> OwnedFd {
    // SAFETY: a NUL-terminated name; the descriptor returned is ours.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
    assert!(fd >= 0, "open {name:?}: {}", std::io::Error::last_os_error());
    // SAFETY: just opened.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A directory to list: its index in `dirs`, and the names to list in it
/// (all of its entries when `None`).
type Task = (usize, Option<Vec<CString>>);

/// What the listing threads share: a stack of directories to list, how
/// many are queued or being listed, and every directory opened so far.
struct Walk {
    state: Mutex<(Vec<Task>, usize)>,
    more: Condvar,
    dirs: Mutex<Vec<Arc<OwnedFd>>>,
}

/// Lists every entry below the tasks on `THREADS` threads (each entry
/// `fstatat`ed once, in no particular order: a streamer must also sort, so
/// this is less work than it can do); returns the directories and files.
fn list(threads: usize, roots: Vec<(OwnedFd, Vec<CString>)>) -> (Vec<Arc<OwnedFd>>, Vec<File>) {
    let mut dirs = Vec::new();
    let mut tasks = Vec::new();
    for (fd, names) in roots {
        tasks.push((dirs.len(), Some(names)));
        dirs.push(Arc::new(fd));
    }
    let pending = tasks.len();
    let walk = Walk { state: Mutex::new((tasks, pending)), more: Condvar::new(), dirs: Mutex::new(dirs) };
    let files = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(|| list_worker(&walk))).collect();
        workers.into_iter().flat_map(|w| w.join().expect("lister")).collect()
    });
    (walk.dirs.into_inner().expect("dirs"), files)
}

fn list_worker(walk: &Walk) -> Vec<File> {
    let mut files = Vec::new();
    loop {
        let (d, names) = {
            let mut st = walk.state.lock().expect("state");
            loop {
                if let Some(t) = st.0.pop() {
                    break t;
                }
                if st.1 == 0 {
                    return files;
                }
                st = walk.more.wait(st).expect("state");
            }
        };
        let fd = walk.dirs.lock().expect("dirs")[d].clone();
        let names = names.unwrap_or_else(|| {
            nixstream::store::fsat::read_dir(fd.as_fd())
                .expect("read_dir")
                .into_iter()
                .map(|n| CString::new(n).expect("name"))
                .collect()
        });
        let mut subdirs = Vec::new();
        for name in names {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: a valid directory descriptor and name; st is written on success.
            let r = unsafe { libc::fstatat(fd.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
            assert_eq!(r, 0, "stat {name:?}");
            // SAFETY: fstatat succeeded.
            let st = unsafe { st.assume_init() };
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => subdirs.push(open_at(fd.as_raw_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY)),
                libc::S_IFREG => files.push(File { dir: d, name, size: st.st_size as u64 }),
                _ => {}
            }
        }
        let mut new = Vec::with_capacity(subdirs.len());
        {
            let mut dirs = walk.dirs.lock().expect("dirs");
            for sub in subdirs {
                new.push((dirs.len(), None));
                dirs.push(Arc::new(sub));
            }
        }
        let mut st = walk.state.lock().expect("state");
        st.1 += new.len();
        st.1 -= 1;
        st.0.extend(new);
        walk.more.notify_all();
    }
}

/// Opens, reads and closes `f`; hashes what it read when `sha` is given.
fn read_file(dirs: &[Arc<OwnedFd>], f: &File, buf: &mut [u8], mut sha: Option<&mut Sha256>) {
    let fd = open_at(dirs[f.dir].as_raw_fd(), &f.name, libc::O_RDONLY);
    let mut left = f.size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        // SAFETY: `want` bytes of `buf` are writable.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        assert!(n > 0, "read {:?}", f.name);
        if let Some(h) = sha.as_deref_mut() {
            h.update(&buf[..n as usize]);
        }
        left -= n as u64;
    }
}

fn run(threads: usize, passes: usize, roots: &[String]) -> f64 {
    let t = Instant::now();
    let mut tops = Vec::new();
    for root in roots {
        // A store path may be a directory, a file or a symlink: list it as
        // an entry of its parent.
        let root = std::path::Path::new(root);
        let parent = CString::new(root.parent().expect("parent").as_os_str().as_encoded_bytes()).expect("path");
        let name = CString::new(root.file_name().expect("name").as_encoded_bytes()).expect("name");
        tops.push((open_at(libc::AT_FDCWD, &parent, libc::O_RDONLY | libc::O_DIRECTORY), vec![name]));
    }
    let (dirs, files) = list(threads, tops);
    for pass in 0..passes {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut buf = vec![0u8; READ];
                    let mut sha = Sha256::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        if pass == 0 {
                            read_file(&dirs, f, &mut buf, Some(&mut sha));
                        } else if f.size < SMALL {
                            read_file(&dirs, f, &mut buf, None);
                        }
                    }
                    std::hint::black_box(sha.finalize());
                });
            }
        });
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let passes = if args.first().is_some_and(|a| a == "--hashing-only") {
        args.remove(0);
        1
    } else {
        2
    };
    let threads: usize =
        args.first().and_then(|a| a.parse().ok()).expect("usage: work_floor [--hashing-only] THREADS STORE_PATH...");
    let roots = &args[1..];
    // Every directory stays open (a descriptor each): lift the soft limit
    // (often 1024) to the hard one.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    run(threads, passes, roots); // warm the page cache and the dentry cache
    let best = (0..3).map(|_| run(threads, passes, roots)).fold(f64::MAX, f64::min);
    println!("{best:.3}");
}
