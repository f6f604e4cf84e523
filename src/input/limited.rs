//! Reading input files with a bound: a configuration, a pipeline or config
//! given as `@FILE`, an exclude list or a closure graph that never ends
//! (`/dev/zero`, a fifo fed forever) is an error naming the file and the
//! limit, not a process that grows until the kernel kills it.  And opening
//! a file that must be regular without following a link or blocking on a
//! fifo.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest configuration (`stream CONF`): a conf lists store paths and
/// holds the image config, whose labels can reach tens of MB.
pub const MAX_CONF: u64 = 64 << 20;
/// Largest `--config @FILE`.
pub const MAX_CONFIG: u64 = 64 << 20;
/// Largest `--pipeline @FILE` (a pipeline is a few lines of JSON).
pub const MAX_PIPELINE: u64 = 16 << 20;
/// Largest `--exclude-paths FILE`.
pub const MAX_EXCLUDE: u64 = 64 << 20;
/// Largest closure graph file (about 1 KiB per store path).
pub const MAX_GRAPH: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LimitedError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} {path} is larger than the {limit}-byte limit")]
    TooLarge { what: &'static str, path: PathBuf, limit: u64 },
}

/// The whole of `path` (what it is: `what`), at most `limit` bytes.
pub fn read_capped(path: &Path, what: &'static str, limit: u64) -> Result<Vec<u8>, LimitedError> {
    let f = File::open(path).map_err(|source| LimitedError::Read { what, path: path.to_path_buf(), source })?;
    read_capped_from(f, path, what, limit)
}

/// The whole of `r` (read from `path`, for messages), at most `limit` bytes.
pub fn read_capped_from(r: impl Read, path: &Path, what: &'static str, limit: u64) -> Result<Vec<u8>, LimitedError> {
    let err = |source| LimitedError::Read { what, path: path.to_path_buf(), source };
    let mut data = Vec::new();
    r.take(limit + 1).read_to_end(&mut data).map_err(err)?;
    if data.len() as u64 > limit {
        return Err(LimitedError::TooLarge { what, path: path.to_path_buf(), limit });
    }
    Ok(data)
}

/// [`read_capped`], as UTF-8 text.
pub fn read_capped_text(path: &Path, what: &'static str, limit: u64) -> Result<String, LimitedError> {
    let data = read_capped(path, what, limit)?;
    String::from_utf8(data).map_err(|e| LimitedError::Read {
        what,
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Opens `path` for reading only if it is a regular file: a symbolic link
/// is not followed and a fifo does not block (both are errors), and
/// returns it with its size.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let f = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok((f, m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_input_is_cut_at_the_limit() {
        let e = read_capped(Path::new("/dev/zero"), "configuration", 4096).unwrap_err();
        assert_eq!(e.to_string(), "configuration /dev/zero is larger than the 4096-byte limit");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, [1u8; 4096]).unwrap();
        assert_eq!(read_capped(&p, "x", 4096).unwrap().len(), 4096);
    }

    #[test]
    fn only_regular_files_open() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(open_regular(&f).unwrap().1, 3);
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(open_regular(&l).is_err(), "a link is not followed");
        let fifo = d.path().join("p");
        use rustix::fs::{FileType, Mode, CWD};
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        assert!(open_regular(&fifo).is_err(), "a fifo neither blocks nor opens");
        assert!(open_regular(d.path()).is_err());
    }
}
