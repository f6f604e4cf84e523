//! File data spliced into the output pipe, and how it is still checked.
//!
//! When the archive goes, uncompressed, into a pipe, the streaming pass need
//! not read a big file's bytes at all: `splice(2)` moves references to its
//! page-cache pages into the pipe, and the consumer copies them out.  That
//! saves the read copy, the pipe write copy (and its page allocation) and
//! the per-file xxh3 of [`crate::render::layer`]: on the `large` benchmark input,
//! files of 64 KiB and more are 75% of the bytes, and moving them took a
//! quarter of the CPU that reading and writing them did.
//!
//! A spliced file's content is never seen by us, so the content check
//! becomes a metadata check, stricter than GNU tar's "file changed as we
//! read it":
//! - only files whose ctime is [`SETTLE_NS`] older than the run's start are
//!   spliced ([`Policy`]), so a change after the listing always moves the
//!   ctime, whatever the file system's timestamp granularity (git's "racily
//!   clean" rule); younger files take the reading path;
//! - when opened, the file must be what the listing saw: same device, inode,
//!   size, mtime and ctime (a write, truncate, chmod or `touch -m` all move
//!   the ctime, which cannot be set back);
//! - the pages stay shared with the file until the consumer has read them,
//!   so the descriptor is kept ([`Splicer`]) until the consumer's read
//!   position (bytes written less `FIONREAD`) is past the file's last byte,
//!   and then checked again;
//! - before config and manifest.json, a barrier ([`Splicer::drain`]) waits
//!   for every spliced file to be read and checked: a file changed at any
//!   point stops the archive before manifest.json, like any other mismatch.
//!
//! What this does not see: a write through a shared `mmap` to a page that
//! was already dirty before the listing (the kernel updates the ctime only
//! when a clean page is first written), a consumer that itself splices the
//! pages on (then a change after our last check reaches its reader), and a
//! change made while the system clock was set back by more than
//! [`SETTLE_NS`] (its ctime could then equal an old one to the tick).
//! `--no-splice` reads and checks every byte instead.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::pipe::SpliceFlags;

pub use crate::render::sink::FileRef;
use crate::store::fsat;
use crate::store::walk::{Entry, Kind};

/// How long before the run a spliced file's ctime must be.
pub const SETTLE_NS: i128 = 2_000_000_000;
/// Files smaller than this are read, not spliced: below it the extra
/// system calls (the deferred `fstat`, `FIONREAD`) cost more than the copies.
pub const MIN_SIZE: u64 = 64 << 10;

/// [`SETTLE_NS`] before `now`, in nanoseconds since the epoch: a file whose
/// ctime is older than this and that is listed after `now` changes its ctime
/// with any change after the listing.
pub fn settled_before_ns(now: SystemTime) -> i128 {
    let now_ns = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    now_ns - SETTLE_NS
}

/// Which files the streaming pass splices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min_size: u64,
    /// Files whose ctime or mtime is at or after this are read instead.
    pub settled_before_ns: i128,
    /// Files whose ctime is at or after this are read and compared with
    /// their xxh3 before they are spliced: for a layer whose digest came
    /// from the cache, the files that entry cannot vouch for (see
    /// [`crate::engine::archive::Hashed::unchanged_before_ns`]).
    pub unread_before_ns: i128,
}

impl Policy {
    /// Files of `min_size` bytes or more, last changed [`SETTLE_NS`] before `now`.
    pub fn new(now: SystemTime, min_size: u64) -> Policy {
        Policy { min_size: min_size.max(1), settled_before_ns: settled_before_ns(now), unread_before_ns: i128::MAX }
    }

    /// The same, reading first the files not older than `ns` ([`Policy::unread_before_ns`]).
    pub fn unread_before(self, ns: i128) -> Policy {
        Policy { unread_before_ns: ns, ..self }
    }

    /// Whether an eligible file is spliced without being read first.
    pub fn unread(&self, e: &Entry) -> bool {
        e.ctime_ns < self.unread_before_ns
    }

    pub fn eligible(&self, e: &Entry) -> bool {
        e.kind == Kind::File
            && e.size >= self.min_size
            && e.ctime_ns < self.settled_before_ns
            && e.mtime_ns < self.settled_before_ns
    }
}

/// A spliced file that changed.  The archive stops there, before
/// manifest.json.
#[derive(Debug, thiserror::Error)]
#[error("{path} changed while the image was being written ({what}); rebuild or retry when the store is quiet")]
pub struct Changed {
    pub path: PathBuf,
    pub what: String,
}

/// The writer thread's side: splices files into the pipe `pipe`, counts
/// every byte that goes in, and checks each spliced file once the consumer
/// has read past it.
pub struct Splicer<'p> {
    pipe: BorrowedFd<'p>,
    written: u64,
    pending: VecDeque<Pending>,
}

struct Pending {
    /// Stream offset just past the file's bytes.
    end: u64,
    file: FileRef,
}

fn changed(f: &FileRef, what: String) -> io::Error {
    io::Error::other(Changed { path: f.path.clone(), what })
}

impl<'p> Splicer<'p> {
    /// `pipe` must be the pipe every byte of the archive goes into, in
    /// order, unbuffered.
    pub fn new(pipe: BorrowedFd<'p>) -> Splicer<'p> {
        Splicer { pipe, written: 0, pending: VecDeque::new() }
    }

    /// Counts `n` bytes written into the pipe by other means, and checks the
    /// files the consumer has read past by now.
    pub fn wrote(&mut self, n: u64) -> io::Result<()> {
        self.written += n;
        self.settle()
    }

    /// Splices the whole file into the pipe.  A file that ends early is a
    /// [`Changed`] error inside the `io::Error`; the pipe's own failures are
    /// plain `io::Error`s.
    pub fn splice(&mut self, f: FileRef) -> io::Result<()> {
        let mut off: u64 = 0;
        let mut cleared = false;
        while off < f.len {
            let left = (f.len - off).min(1 << 30) as usize;
            match rustix::pipe::splice(&f.fd, Some(&mut off), self.pipe, None, left, SpliceFlags::MOVE) {
                // `off` moved by `n` already.
                Ok(n) if n > 0 => self.written += n as u64,
                Ok(_) => return Err(changed(&f, fsat::ended_early(f.fd.as_fd(), f.len, f.len - off))),
                Err(Errno::INTR) => {}
                // Either side may be non-blocking: the file was opened
                // O_NONBLOCK (against a fifo in its place; it is a regular
                // file, so blocking is fine), and the pipe may be a parent's
                // non-blocking one, full for now.
                Err(Errno::AGAIN) if !cleared => {
                    cleared = true;
                    // A failure here shows as the next splice's EAGAIN.
                    if let Ok(fl) = rustix::fs::fcntl_getfl(&f.fd) {
                        let _ = rustix::fs::fcntl_setfl(&f.fd, fl - OFlags::NONBLOCK);
                    }
                }
                Err(Errno::AGAIN) => wait_writable(self.pipe)?,
                Err(e) => return Err(e.into()),
            }
        }
        self.pending.push_back(Pending { end: self.written, file: f });
        self.settle()
    }

    /// Checks the spliced files the consumer has read past.
    fn settle(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Saturating: another writer's bytes in a shared pipe only make
        // the consumer look behind, which delays the checks.
        let read = self.written.saturating_sub(self.in_pipe()?);
        while self.pending.front().is_some_and(|p| p.end <= read) {
            let p = self.pending.pop_front().expect("checked");
            check(&p.file)?;
        }
        Ok(())
    }

    /// Waits until the consumer has read every spliced file, checking each.
    /// A consumer that goes away is a broken pipe.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut nap = Duration::from_micros(50);
        loop {
            self.settle()?;
            if self.pending.is_empty() {
                return Ok(());
            }
            // POLLERR is reported whatever `events` says.
            let mut pfd = [PollFd::new(&self.pipe, PollFlags::empty())];
            let r = rustix::event::poll(&mut pfd, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }));
            if r.is_ok_and(|n| n > 0) && pfd[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    /// Bytes written into the pipe that the consumer has not read yet.
    fn in_pipe(&self) -> io::Result<u64> {
        Ok(rustix::io::ioctl_fionread(self.pipe)?)
    }

    /// Spliced files not yet checked (the consumer has not read them all).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn check(f: &FileRef) -> io::Result<()> {
    let st = fsat::fstat(f.fd.as_fd()).map_err(|e| changed(f, format!("cannot stat it again: {e}")))?;
    match f.seen.differs(&st, true) {
        Some(what) => Err(changed(f, what)),
        None => Ok(()),
    }
}

/// Waits until `fd` takes more bytes; a reader that left is a broken pipe.
pub fn wait_writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
    loop {
        match rustix::event::poll(&mut pfd, None) {
            Ok(_) if pfd[0].revents().contains(PollFlags::ERR) => {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::walk::Seen;
    use std::io::{Read, Write};

    /// A consumer: reads the pipe to its end on a thread of its own.
    fn read_all(mut r: std::io::PipeReader) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        })
    }

    fn file_ref(path: &std::path::Path) -> FileRef {
        let f = std::fs::File::open(path).unwrap();
        let st = fsat::fstat(f.as_fd()).unwrap();
        let seen = Seen { dev: st.dev, ino: st.ino, size: st.size, mtime_ns: st.mtime_ns, ctime_ns: st.ctime_ns };
        FileRef { fd: f.into(), len: st.size, path: path.to_path_buf(), seen }
    }

    #[test]
    fn spliced_bytes_arrive_in_order_with_written_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let reader = read_all(r);
        let mut s = Splicer::new(w.as_fd());
        (&w).write_all(b"head").unwrap();
        s.wrote(4).unwrap();
        s.splice(file_ref(&p)).unwrap();
        (&w).write_all(b"tail").unwrap();
        s.wrote(4).unwrap();
        s.drain().unwrap();
        assert_eq!(s.pending(), 0);
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..got.len() - 4] == data[..]);
        assert_eq!(&got[got.len() - 4..], b"tail");
    }

    /// The deferred check: a file changed after it was spliced, while its
    /// pages still sat in the pipe, is named when the consumer has read them.
    #[test]
    fn a_file_changed_while_its_pages_are_in_the_pipe_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("victim");
        // Within a pipe's default 64 KiB: spliced with nobody reading yet.
        std::fs::write(&p, vec![1u8; 40_000]).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let mut s = Splicer::new(w.as_fd());
        s.splice(file_ref(&p)).unwrap();
        assert_eq!(s.pending(), 1, "nothing read yet: the check waits");
        // Past the file system's timestamp granularity (a coarse clock
        // tick), as the policy's settling time ensures for real runs.
        std::thread::sleep(Duration::from_millis(50));
        // Same size; the mtime put back; only the ctime tells.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[2u8; 10], 0).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let reader = read_all(r);
        let e = s.drain().unwrap_err();
        let c = e.get_ref().and_then(|i| i.downcast_ref::<Changed>()).expect("a Changed error");
        assert_eq!(c.path, p);
        assert!(c.what.contains("ctime"), "{}", c.what);
        drop(s);
        drop(w);
        reader.join().unwrap();
    }

    #[test]
    fn a_file_shorter_than_listed_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("short");
        std::fs::write(&p, vec![1u8; 70_000]).unwrap();
        let mut f = file_ref(&p);
        f.len = 80_000;
        let (r, w) = std::io::pipe().unwrap();
        let reader = read_all(r);
        let e = Splicer::new(w.as_fd()).splice(f).unwrap_err();
        let c = e.get_ref().and_then(|i| i.downcast_ref::<Changed>()).expect("a Changed error");
        assert!(c.what.contains("size 80000 became 70000"), "{}", c.what);
        drop(w);
        reader.join().unwrap();
    }

    #[test]
    fn a_consumer_that_left_is_a_broken_pipe_at_the_barrier() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        std::fs::write(&p, vec![1u8; 40_000]).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let mut s = Splicer::new(w.as_fd());
        s.splice(file_ref(&p)).unwrap();
        drop(r);
        assert_eq!(s.drain().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn policy_takes_big_settled_files_only() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let p = Policy::new(now, MIN_SIZE);
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("pkg")).unwrap();
        std::fs::write(d.path().join("pkg/f"), b"x").unwrap();
        let listing = crate::store::walk::list_layer(&[d.path().join("pkg")], 2).unwrap();
        let mut e = listing.entries.iter().find(|e| e.kind == Kind::File).unwrap().clone();
        let s = |secs: i128| secs * 1_000_000_000;
        (e.size, e.ctime_ns, e.mtime_ns) = (MIN_SIZE, s(997), s(1));
        assert!(p.eligible(&e));
        e.size = MIN_SIZE - 1;
        assert!(!p.eligible(&e), "small");
        e.size = MIN_SIZE;
        e.ctime_ns = s(999);
        assert!(!p.eligible(&e), "changed within the settling time");
        e.ctime_ns = s(1_001);
        assert!(!p.eligible(&e), "ctime after the start");
        e.ctime_ns = s(997);
        e.mtime_ns = s(5_000);
        assert!(!p.eligible(&e), "mtime in the future");
        e.mtime_ns = s(1);
        assert!(p.unread(&e), "hashed by this run");
        assert!(!p.unread_before(s(997)).unread(&e), "not older than the cache entry's settled time");
        assert!(p.unread_before(s(998)).unread(&e));
        assert!(!p.unread_before(i128::MIN).unread(&e), "a narHash-keyed entry vouches for none");
    }
}
