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
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, RawDir, CWD};

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
    // The field types of `struct stat` differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn from_raw(st: &rustix::fs::Stat) -> Stat {
        Stat {
            mode: st.st_mode as u32,
            size: st.st_size as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
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

fn dirfd(dir: Option<BorrowedFd<'_>>) -> BorrowedFd<'_> {
    dir.unwrap_or(CWD)
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC)`; `dir` None means
/// the working directory (for absolute paths).
pub fn open(dir: Option<BorrowedFd<'_>>, name: &CStr, flags: OFlags) -> io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat(dirfd(dir), name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
            Err(rustix::io::Errno::INTR) => {}
            r => return Ok(r?),
        }
    }
}

/// Opens a directory for reading its entries and reaching its children.
pub fn open_dir(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<OwnedFd> {
    open(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<Stat> {
    Ok(Stat::from_raw(&rustix::fs::statat(dirfd(dir), name, AtFlags::SYMLINK_NOFOLLOW)?))
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(Stat::from_raw(&rustix::fs::fstat(fd)?))
}

/// The target of the symlink `name` in `dir`, appended to `out`.
pub fn readlink(dir: Option<BorrowedFd<'_>>, name: &CStr, out: &mut Vec<u8>) -> io::Result<()> {
    let target = rustix::fs::readlinkat(dirfd(dir), name, Vec::new())?;
    out.extend_from_slice(target.as_bytes());
    Ok(())
}

/// The names in the open directory `dir` (without `.` and `..`), unsorted;
/// reads from the descriptor's current position (a fresh one: from the
/// start).  `getdents64` straight on the descriptor: `fdopendir` on a
/// duplicate cost five more system calls per directory (`dup`, `fstat`,
/// `fcntl`, `lseek`, `close`): 41,000 fewer on `large` (6,940 directories).
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    // Not zeroed (the kernel writes what is read, and `RawDir` reads only
    // that): a zeroed 32 KiB per directory was 220 MB of memset on `large`.
    let mut buf: Vec<u8> = Vec::with_capacity(32 << 10);
    let mut entries = RawDir::new(dir, buf.spare_capacity_mut());
    let mut names = Vec::new();
    loop {
        match entries.next() {
            None => return Ok(names),
            Some(Ok(entry)) => {
                let name = entry.file_name().to_bytes();
                if name != b"." && name != b".." {
                    names.push(name.to_vec());
                }
            }
            // The buffer is untouched: the next call reads again.
            Some(Err(rustix::io::Errno::INTR)) => {}
            Some(Err(e)) => return Err(e.into()),
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
            rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)).unwrap();
            fd = open_dir(Some(fd.as_fd()), name).unwrap();
        }
        // 25 x 201 bytes: beyond PATH_MAX.
        let f = c.set(b"file").unwrap();
        let file = open(Some(fd.as_fd()), f, OFlags::WRONLY | OFlags::CREATE).unwrap();
        drop(file);
        assert_eq!(read_dir(fd.as_fd()).unwrap(), vec![b"file".to_vec()]);
        assert_eq!(lstat(Some(fd.as_fd()), f).unwrap().file_type(), libc::S_IFREG);
        // A symlink is never followed.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("l")).unwrap();
        let top = open_dir(None, c.set(d.path().as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        let e = open(Some(top.as_fd()), c.set(b"l").unwrap(), OFlags::RDONLY).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let mut target = Vec::new();
        readlink(Some(top.as_fd()), c.set(b"l").unwrap(), &mut target).unwrap();
        assert_eq!(target, b"/etc/hostname");
    }
}
