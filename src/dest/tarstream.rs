//! A tar stream on an output owned by the writer thread: what the
//! docker-archive and oci-archive destinations write their members into.
//!
//! [`with_tar_stream`] starts the writer thread ([`crate::output::writer`])
//! over the output (and, for a pipe, the [`Splicer`] that takes big files by
//! reference), lets the destination write members through a [`TarStream`],
//! and joins the writer: the writer's own error (a closed pipe, a full disk,
//! a spliced file that changed) is the cause of any failure it sees.

use std::io::{self, Write};
use std::os::fd::BorrowedFd;

use crate::compat::tarheader::{self, Header};
use crate::engine::EngineError;
use crate::output::progress::Progress;
use crate::output::splice::{Changed, FileRef, Splicer};
use crate::output::writer::{self, Chunks};
use crate::render::sink::LayerOut;

/// The outer tar, counting its offset.
pub struct TarStream<'p> {
    out: Chunks,
    offset: u64,
    progress: &'p Progress,
    header: Vec<u8>,
    splicing: bool,
}

/// What the writer thread reports once the stream is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes of the whole stream.
    pub bytes: u64,
    /// Bytes of it spliced from files by reference.
    pub spliced: u64,
}

/// Runs `f` over a tar stream into `out`; `splice_into`: the pipe `out`
/// writes to, unbuffered, when files may be spliced into it.
pub fn with_tar_stream<W: Write + Send, T, E: From<EngineError>>(
    out: W,
    splice_into: Option<BorrowedFd<'_>>,
    progress: &Progress,
    f: impl FnOnce(&mut TarStream) -> Result<T, E>,
) -> Result<(T, Written), E> {
    let (chunks, full, empty) = writer::channel();
    let splicer = splice_into.map(Splicer::new);
    std::thread::scope(|s| {
        let w = s.spawn(move || writer::run(out, full, empty, splicer));
        let mut tar = TarStream {
            out: chunks,
            offset: 0,
            progress,
            header: Vec::with_capacity(2048),
            splicing: splice_into.is_some(),
        };
        let r = f(&mut tar);
        let bytes = tar.offset;
        drop(tar);
        let written = w.join().unwrap_or_else(|_| Err(io::Error::other("the output writer panicked")));
        match (r, written) {
            // The writer's own error is the cause; the destination only saw
            // the writer go.
            (_, Err(e)) => Err(E::from(match e.downcast::<Changed>() {
                Ok(changed) => EngineError::Spliced(changed),
                Err(e) => EngineError::Output(e),
            })),
            (Err(e), Ok(_)) => Err(e),
            (Ok(t), Ok((_, spliced))) => Ok((t, Written { bytes, spliced })),
        }
    })
}

impl Write for TarStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.offset += buf.len() as u64;
        self.progress.wrote(buf.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl LayerOut for TarStream<'_> {
    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        let len = file.len;
        self.out.pass_file(file)?;
        self.offset += len;
        self.progress.wrote(len);
        Ok(())
    }
}

impl TarStream<'_> {
    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn header(&mut self, h: &Header<'_>) -> Result<(), EngineError> {
        let mut buf = std::mem::take(&mut self.header);
        buf.clear();
        tarheader::encode(h, &mut buf);
        let r = self.write_all(&buf).map_err(EngineError::Output);
        self.header = buf;
        r
    }

    /// Zeros to the end of a member of `size` bytes.
    pub fn pad(&mut self, size: u64) -> Result<(), EngineError> {
        let zeros = [0u8; tarheader::BLOCK];
        self.write_all(&zeros[..tarheader::data_padding(size)]).map_err(EngineError::Output)
    }

    /// A whole regular-file member.
    pub fn member(&mut self, name: &str, data: &[u8], mtime: i64) -> Result<(), EngineError> {
        self.header(&Header::plain_file(name.as_bytes(), data.len() as u64, mtime))?;
        self.write_all(data).map_err(EngineError::Output)?;
        self.pad(data.len() as u64)
    }

    /// Hands the consumer everything written so far (before a wait).
    pub fn hand_over(&mut self) -> Result<(), EngineError> {
        self.flush().map_err(EngineError::Output)
    }

    /// Waits until every spliced file has been read by the consumer and
    /// checked again: called before the members that make the stream an
    /// image.
    pub fn barrier(&mut self) -> Result<(), EngineError> {
        if self.splicing {
            self.out.barrier().map_err(EngineError::Output)?;
        }
        Ok(())
    }

    /// The end-of-archive blocks and record padding; flushes.
    pub fn finish(&mut self) -> Result<(), EngineError> {
        let end = tarheader::end_of_archive_len(self.offset);
        self.write_all(&vec![0u8; end]).map_err(EngineError::Output)?;
        self.flush().map_err(EngineError::Output)
    }
}
