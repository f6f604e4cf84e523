//! File-system calls relative to an open directory (`openat`, `fstatat`,
//! `readlinkat`, reading a directory from its descriptor).
//!
//! The walker and both passes reach every entry through its parent
//! directory's descriptor and its own name, never through its absolute path:
//! the kernel then resolves one component per call instead of the whole path
//! (which was about a tenth of the run time on 50,000-file closures), and
//! paths longer than `PATH_MAX` (4096 bytes), which no absolute-path call can
//! reach, are archived like any other.  Nothing is followed: every call uses
//! `O_NOFOLLOW` or `AT_SYMLINK_NOFOLLOW`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// What `lstat` tells about an entry, as the walker keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub mode: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    /// Changes with any write or metadata change, and cannot be set back.
    pub ctime_ns: i128,
}

impl Stat {
    fn from_raw(st: &libc::stat) -> Stat {
        Stat {
            mode: st.st_mode,
            size: st.st_size as u64,
            dev: st.st_dev,
            ino: st.st_ino,
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// A NUL-terminated copy of a name or path, in a buffer reused per caller.
pub struct CName {
    buf: Vec<u8>,
}

impl Default for CName {
    fn default() -> Self {
        CName { buf: Vec::with_capacity(256) }
    }
}

impl CName {
    pub fn set(&mut self, name: &[u8]) -> io::Result<&CStr> {
        self.buf.clear();
        self.buf.extend_from_slice(name);
        self.buf.push(0);
        CStr::from_bytes_with_nul(&self.buf)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a file name holds a NUL byte"))
    }
}

fn dirfd(dir: Option<BorrowedFd<'_>>) -> RawFd {
    dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC)`; `dir` None means
/// the working directory (for absolute paths).
pub fn open(dir: Option<BorrowedFd<'_>>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated; the result is checked.
        let fd = unsafe { libc::openat(dirfd(dir), name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens a directory for reading its entries and reaching its children.
pub fn open_dir(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<OwnedFd> {
    open(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is written by the call when it returns 0.
    let r = unsafe { libc::fstatat(dirfd(dir), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call.
    Ok(Stat::from_raw(unsafe { &st.assume_init() }))
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: as in `lstat`.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call.
    Ok(Stat::from_raw(unsafe { &st.assume_init() }))
}

/// The target of the symlink `name` in `dir`, appended to `out`.
pub fn readlink(dir: Option<BorrowedFd<'_>>, name: &CStr, out: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` has `buf.len()` writable bytes.
        let n = unsafe { libc::readlinkat(dirfd(dir), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            out.extend_from_slice(&buf[..n]);
            return Ok(());
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// The names in the open directory `dir` (without `.` and `..`), unsorted;
/// reads from the descriptor's current position (a fresh one: from the
/// start).  `getdents64` straight on the descriptor: `fdopendir` on a
/// duplicate cost five more system calls per directory (`dup`, `fstat`,
/// `fcntl`, `lseek`, `close`): 41,000 fewer on `large` (6,940 directories).
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    // `struct linux_dirent64`: d_ino (8 bytes), d_off (8), d_reclen (2),
    // d_type (1), then the NUL-terminated name.
    const NAME: usize = 19;
    // Not zeroed (the kernel writes what is read): a zeroed 32 KiB per
    // directory was 220 MB of memset on `large`.
    let mut buf: Vec<u8> = Vec::with_capacity(32 << 10);
    let mut names = Vec::new();
    loop {
        buf.clear();
        // SAFETY: `buf` has `buf.capacity()` writable bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.capacity()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(names);
        }
        // SAFETY: the kernel wrote `n` bytes (at most the capacity).
        unsafe { buf.set_len(n as usize) };
        let mut at = 0;
        while at < n as usize {
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let rec = &buf[at + NAME..at + reclen];
            let name = &rec[..rec.iter().position(|&b| b == 0).unwrap_or(rec.len())];
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
            at += reclen;
        }
    }
}

/// Why a file ended with `left` of its `listed` bytes unread: its size
/// changed, or (same size) it was cut and grown again.
pub fn ended_early(f: std::os::fd::BorrowedFd<'_>, listed: u64, left: u64) -> String {
    match fstat(f) {
        Ok(st) if st.size != listed => format!("size {listed} became {}", st.size),
        _ => format!("it ended {left} bytes early"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn read_dir_returns_every_name_across_many_getdents_calls() {
        let d = tempfile::tempdir().unwrap();
        let mut want: Vec<Vec<u8>> =
            (0..3000).map(|i| format!("entry-{i:05}-{}", "x".repeat(i % 40)).into_bytes()).collect();
        want.push(vec![b'n'; 255]);
        want.push(b"\xff\x80 odd".to_vec());
        for name in &want {
            std::fs::write(d.path().join(std::ffi::OsStr::from_bytes(name)), b"").unwrap();
        }
        std::fs::create_dir(d.path().join("sub")).unwrap();
        want.push(b"sub".to_vec());
        let mut c = CName::default();
        let fd = open_dir(None, c.set(d.path().as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        let mut got = read_dir(fd.as_fd()).unwrap();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let empty = open_dir(Some(fd.as_fd()), c.set(b"sub").unwrap()).unwrap();
        assert!(read_dir(empty.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn relative_calls_reach_paths_longer_than_path_max() {
        let d = tempfile::tempdir().unwrap();
        let mut c = CName::default();
        let mut fd = open_dir(None, c.set(d.path().as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        let seg = "d".repeat(200);
        for _ in 0..25 {
            let name = c.set(seg.as_bytes()).unwrap();
            // SAFETY: a plain mkdirat on a NUL-terminated name.
            assert_eq!(unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) }, 0);
            fd = open_dir(Some(fd.as_fd()), name).unwrap();
        }
        // 25 x 201 bytes: beyond PATH_MAX.
        let f = c.set(b"file").unwrap();
        let file = open(Some(fd.as_fd()), f, libc::O_WRONLY | libc::O_CREAT).unwrap();
        drop(file);
        assert_eq!(read_dir(fd.as_fd()).unwrap(), vec![b"file".to_vec()]);
        assert_eq!(lstat(Some(fd.as_fd()), f).unwrap().file_type(), libc::S_IFREG);
        // A symlink is never followed.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("l")).unwrap();
        let top = open_dir(None, c.set(d.path().as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        let e = open(Some(top.as_fd()), c.set(b"l").unwrap(), libc::O_RDONLY).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let mut target = Vec::new();
        readlink(Some(top.as_fd()), c.set(b"l").unwrap(), &mut target).unwrap();
        assert_eq!(target, b"/etc/hostname");
    }
}
