//! Compression of the whole output stream (`--compress`), for clients that
//! cannot read an uncompressed docker-archive from a pipe (Debian's skopeo
//! re-opens a non-seekable docker-archive unless it is compressed).
//!
//! Output stays deterministic: gzip with a zero header mtime and no name;
//! zstd in multithreaded mode, whose frames do not depend on the number of
//! worker threads (zstd >= 1.5), always with at least one worker.

use std::io::{self, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    None,
    Zstd,
    Gzip,
}

/// A writer that compresses (or not) into `inner`; call [`Compressed::finish`].
pub enum Compressed<W: Write> {
    Plain(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Compressed<W> {
    pub fn new(inner: W, how: Compress, threads: usize) -> io::Result<Self> {
        Ok(match how {
            Compress::None => Compressed::Plain(inner),
            Compress::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(inner, 3)?;
                e.multithread(threads.max(1) as u32)?;
                e.include_checksum(true)?;
                Compressed::Zstd(e)
            }
            Compress::Gzip => {
                let e = flate2::GzBuilder::new().mtime(0).write(inner, flate2::Compression::new(6));
                Compressed::Gzip(e)
            }
        })
    }

    /// Ends the compressed stream and flushes.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressed::Plain(mut w) => {
                w.flush()?;
                Ok(w)
            }
            Compressed::Zstd(e) => {
                let mut w = e.finish()?;
                w.flush()?;
                Ok(w)
            }
            Compressed::Gzip(e) => {
                let mut w = e.finish()?;
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Compressed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressed::Plain(w) => w.write(buf),
            Compressed::Zstd(w) => w.write(buf),
            Compressed::Gzip(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Compressed::Plain(w) => w.write_all(buf),
            Compressed::Zstd(w) => w.write_all(buf),
            Compressed::Gzip(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing a compressor mid-stream would end a block early and
        // change the bytes; only `finish` ends the stream.
        match self {
            Compressed::Plain(w) => w.flush(),
            _ => Ok(()),
        }
    }
}
