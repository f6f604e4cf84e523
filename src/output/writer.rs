//! The one ordered writer that owns the output.
//!
//! The streaming pass (opening files, reading them, checking each file's
//! xxh3, encoding headers) fills fixed-size chunks through a [`Chunks`]
//! writer; a dedicated thread ([`run`]) takes them in order and writes them
//! to the output (a pipe, a file, or a compressor), so the `write` system
//! calls and the compressor overlap with the reading.  Memory stays bounded:
//! [`POOL`] chunks of [`CHUNK`] bytes circulate between the two.
//! [`Chunks::hand_over`] passes on a partly filled chunk, which the streaming
//! pass does whenever it is about to wait for a digest, so the consumer gets
//! every byte that is ready (the first bytes of the archive do not wait for
//! later layers).  The chunk boundaries never change the bytes written.
//!
//! Besides chunks, the channel carries files to splice into the output
//! ([`Piece::File`], see [`crate::output::splice`]), which the writer thread hands
//! to its [`Splicer`], and a barrier that waits until the consumer has read
//! and the splicer checked every spliced file.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::output::splice::{wait_writable, Splicer};
use crate::render::sink::{FileRef, LayerOut, WriterGone};

/// Bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks in circulation (the bound on buffered output).
pub const POOL: usize = 8;

/// What goes down a chunk channel, in stream order.
#[derive(Debug)]
pub enum Piece {
    /// Bytes (a pool buffer: the receiver sends it back).
    Bytes(Vec<u8>),
    /// A file's content, by reference.
    File(Box<FileRef>),
    /// The end of one part of the stream (a segment, see [`crate::render::segment`]).
    EndPart,
    /// Wait for the consumer to read every spliced file (the writer thread).
    Barrier,
}

/// The streaming pass's side: a `Write` that fills chunks and sends them on.
pub struct Chunks {
    full: Sender<Piece>,
    empty: Receiver<Vec<u8>>,
    current: Vec<u8>,
    size: usize,
}

impl Chunks {
    /// Sends the current chunk, however full, to the writer.
    pub fn hand_over(&mut self) -> io::Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let next = match self.empty.try_recv() {
            Ok(b) => b,
            Err(_) => self.empty.recv().map_err(|_| io::Error::other(WriterGone))?,
        };
        let full = std::mem::replace(&mut self.current, next);
        self.send(Piece::Bytes(full))
    }

    fn send(&mut self, piece: Piece) -> io::Result<()> {
        self.full.send(piece).map_err(|_| io::Error::other(WriterGone))
    }

    /// Hands over the current chunk, then a marker that ends one part of the
    /// stream (a segment, see [`crate::render::segment`]).
    pub fn end_part(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.send(Piece::EndPart)
    }

    /// Hands over the current chunk, then `file`, whose bytes come next.
    pub fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        self.hand_over()?;
        self.send(Piece::File(Box::new(file)))
    }

    /// Hands over the current chunk, then a [`Piece::Barrier`].
    pub fn barrier(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.send(Piece::Barrier)
    }
}

impl Chunks {
    /// Reads up to `max` bytes of `fd` into the current chunk (handing it
    /// over first if it is full) and returns them; empty at end of file.  A
    /// writer that stopped is a [`WriterGone`] error inside the `io::Error`.
    pub fn read_from(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<&[u8]> {
        if self.current.len() >= self.size {
            self.hand_over()?;
        }
        let start = self.current.len();
        let want = max.min(self.size - start);
        self.current.reserve(want);
        // Into the spare capacity, not zeroed first: the kernel writes
        // what is read.
        let n = loop {
            match rustix::io::read(fd, &mut self.current.spare_capacity_mut()[..want]) {
                Ok((read, _)) => break read.len(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        // SAFETY: `read` initialised the first `n` bytes of the spare
        // capacity, which start at `start`, the vector's length.  (rustix's
        // `spare_capacity` would do this safely, but reads into all of the
        // spare capacity, which can exceed `max`.)
        unsafe { self.current.set_len(start + n) };
        Ok(&self.current[start..])
    }
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let room = self.size - self.current.len();
            let take = room.min(buf.len());
            self.current.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.current.len() == self.size {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Hands over what is buffered; the writer thread writes it.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

/// The output descriptor, waiting (in `poll`) whenever it would block: a
/// parent may hand us a non-blocking pipe (Node.js does), whose writes fail
/// with `EAGAIN` when it is full instead of waiting for the reader.
pub struct Blocking<'a>(pub &'a std::fs::File);

impl Write for Blocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&*self.0).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(self.0.as_fd())?,
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

/// A connected pair for the output: the [`Chunks`] writer and the receiving
/// end for [`run`], with [`POOL`] chunks of [`CHUNK`] bytes.
pub fn channel() -> (Chunks, Receiver<Piece>, Sender<Vec<u8>>) {
    channel_sized(CHUNK, POOL)
}

/// The same with `pool` chunks of `size` bytes (at least two chunks).
pub fn channel_sized(size: usize, pool: usize) -> (Chunks, Receiver<Piece>, Sender<Vec<u8>>) {
    let pool = pool.max(2);
    let (full_tx, full_rx) = bounded(pool);
    let (empty_tx, empty_rx) = bounded(pool);
    for _ in 0..pool - 1 {
        empty_tx.send(Vec::with_capacity(size)).expect("room for the pool");
    }
    (Chunks { full: full_tx, empty: empty_rx, current: Vec::with_capacity(size), size }, full_rx, empty_tx)
}

/// The writer thread: writes every chunk, in order, to `out` and returns the
/// buffers; ends when the [`Chunks`] side is dropped, then flushes `out`.  On
/// an output error it stops at once (dropping its ends, so the streaming pass
/// stops too) and returns the error.  Files are spliced by `splicer`, which
/// must splice into the pipe `out` writes to, unbuffered; without one, a
/// file piece is an error (nothing sends one then).  Returns `out` and the
/// bytes spliced.
pub fn run<W: Write>(
    mut out: W,
    full: Receiver<Piece>,
    empty: Sender<Vec<u8>>,
    mut splicer: Option<Splicer<'_>>,
) -> io::Result<(W, u64)> {
    let mut spliced = 0u64;
    for piece in full.iter() {
        match piece {
            Piece::Bytes(mut chunk) => {
                out.write_all(&chunk)?;
                if let Some(s) = splicer.as_mut() {
                    s.wrote(chunk.len() as u64)?;
                }
                chunk.clear();
                // The streaming pass may have finished: a closed pool is fine.
                let _ = empty.send(chunk);
            }
            Piece::File(file) => {
                let s = splicer.as_mut().ok_or_else(|| io::Error::other("a file to splice, but no pipe"))?;
                out.flush()?;
                spliced += file.len;
                s.splice(*file)?;
            }
            Piece::Barrier => {
                if let Some(s) = splicer.as_mut() {
                    out.flush()?;
                    s.drain()?;
                }
            }
            Piece::EndPart => {}
        }
    }
    out.flush()?;
    Ok((out, spliced))
}

impl LayerOut for Chunks {
    fn read_into(&mut self, fd: BorrowedFd<'_>, max: usize) -> Option<io::Result<&[u8]>> {
        Some(self.read_from(fd, max))
    }

    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        Chunks::pass_file(self, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_whatever_the_chunking() {
        let (mut chunks, full, empty) = channel();
        let writer = std::thread::spawn(move || run(Vec::new(), full, empty, None));
        let mut want = Vec::new();
        for i in 0..5000u32 {
            let piece: Vec<u8> = (0..(i % 3000)).map(|j| (i ^ j) as u8).collect();
            chunks.write_all(&piece).unwrap();
            want.extend_from_slice(&piece);
            if i % 7 == 0 {
                chunks.hand_over().unwrap();
            }
        }
        chunks.flush().unwrap();
        drop(chunks);
        assert_eq!(writer.join().unwrap().unwrap().0, want);
    }

    #[test]
    fn an_output_error_stops_the_producer() {
        #[derive(Debug)]
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut chunks, full, empty) = channel();
        let writer = std::thread::spawn(move || run(Full, full, empty, None));
        let mut failed = false;
        for _ in 0..100 {
            if chunks.write_all(&vec![1u8; CHUNK]).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the producer notices within the pool's bound");
        assert_eq!(writer.join().unwrap().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
