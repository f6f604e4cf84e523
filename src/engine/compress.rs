//! Layer compression whose bytes are a function of the input alone.
//!
//! A compressed layer's digest names its blob in every OCI output and in a
//! registry, and both passes must agree on it, so every parameter that
//! changes the bytes is fixed here, for every thread count:
//! - gzip: the input is cut into [`GZIP_BLOCK`]-byte blocks, each deflated
//!   on its own (no dictionary shared between blocks) at [`GZIP_LEVEL`] and
//!   ended with a sync flush (the last with the final block), inside one
//!   gzip member with a fixed header (no name, MTIME 0, OS 255) and the
//!   CRC-32 and length of the whole input.  Blocks are compressed by several
//!   threads and written in order, so a big layer's gzip uses every core,
//!   and the block boundaries, not the threads, decide the bytes (pigz's
//!   scheme without its shared dictionary).  Any gzip reader reads it.
//! - zstd: libzstd at [`ZSTD_LEVEL`] in its multithreaded mode with at least
//!   one worker, whose frames do not depend on the worker count, with a
//!   content checksum.
//!
//! Crate versions are pinned in `Cargo.lock`; [`identity`] names them and
//! goes into every cache key and layer annotation, and golden digests in
//! the tests catch a dependency whose bytes changed.

use std::io::{self, Write};

use crossbeam_channel::{bounded, Receiver, Sender};
use flate2::{Compress, FlushCompress};

use crate::engine::image::Compression;

/// Uncompressed bytes per independently deflated gzip block.
pub const GZIP_BLOCK: usize = 1 << 20;
/// Fastest deflate, as go-containerregistry (crane, ko) writes layers: each
/// OCI output compresses a layer twice (a tar member's header needs the
/// blob's size and digest first), and level 1 costs about a third of level
/// 6's CPU for about a tenth more bytes (`gzip -1` against `gzip -6` on
/// 200 MB of /usr/lib: 3.4 s against 10.1 s of CPU, 83.5 MB against 76.1 MB).
pub const GZIP_LEVEL: u32 = 1;
/// zstd's default level.
pub const ZSTD_LEVEL: i32 = 3;
/// Bytes per zstd job (the default at level 3 is several MiB, so most
/// layers would be one job on one thread).
pub const ZSTD_JOB: u32 = 1 << 20;

/// Everything that decides a compressed blob's bytes besides its input.
pub fn identity(c: Compression) -> String {
    match c {
        Compression::None => "none".into(),
        Compression::Gzip => {
            format!("gzip level {GZIP_LEVEL} block {GZIP_BLOCK} flate2 1.1 miniz_oxide 0.9")
        }
        Compression::Zstd => {
            format!("zstd level {ZSTD_LEVEL} mt job {ZSTD_JOB} checksum libzstd {}", zstd::zstd_safe::version_string())
        }
    }
}

/// Compresses into `inner`; [`Encoder::finish`] ends the stream.
pub enum Encoder<W: Write> {
    Plain(W),
    Gzip(Box<ParGzip<W>>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// `threads`: how many cores compression may use (at least one).
    pub fn new(inner: W, c: Compression, threads: usize) -> io::Result<Encoder<W>> {
        Ok(match c {
            Compression::None => Encoder::Plain(inner),
            Compression::Gzip => Encoder::Gzip(Box::new(ParGzip::new(inner, threads))),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
                e.multithread(threads.max(1) as u32)?;
                // Fixed, and small enough that a layer of a few MiB is
                // several jobs spread over the workers.
                e.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB))?;
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
        })
    }

    /// Writes what is left and the stream's end; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.write_all(buf),
            Encoder::Gzip(g) => g.write_all(buf),
            Encoder::Zstd(e) => e.write_all(buf),
        }
    }

    /// Forwards to an uncompressed output only: a compressor flushed
    /// mid-stream would end a block early and change the bytes.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            _ => Ok(()),
        }
    }
}

impl<W: crate::render::sink::LayerOut> crate::render::sink::LayerOut for Encoder<W> {
    fn read_into(&mut self, fd: std::os::fd::BorrowedFd<'_>, max: usize) -> Option<io::Result<&[u8]>> {
        match self {
            Encoder::Plain(w) => w.read_into(fd, max),
            _ => None,
        }
    }

    fn pass_file(&mut self, file: crate::output::splice::FileRef) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.pass_file(file),
            _ => Err(io::Error::other(format!(
                "{}: a compressed layer cannot take a file by reference",
                file.path.display()
            ))),
        }
    }
}

/// Deflates one block; `last` ends the deflate stream.
///
/// In one call, with room for the worst case: miniz_oxide loses input when a
/// sync flush is resumed after filling the output (seen on a 1 MiB block of
/// shared libraries: 4,035 bytes short).  Should a call still run out of
/// room, the block is deflated afresh with twice the room, so the result is
/// always the one-call result, a function of the block alone.
fn deflate_block(input: &[u8], last: bool) -> Vec<u8> {
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    let mut room = input.len() + input.len() / 8 + 4096;
    loop {
        let mut c = Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
        let mut out = Vec::with_capacity(room);
        let st = c.compress_vec(input, &mut out, flush).expect("deflate of memory cannot fail");
        let whole = c.total_in() as usize == input.len() && out.len() < out.capacity();
        if whole && (!last || st == flate2::Status::StreamEnd) {
            return out;
        }
        room *= 2;
    }
}

/// A block to deflate, with where its result goes.
type Job = (Vec<u8>, Sender<Vec<u8>>);

/// gzip in independent blocks, deflated by up to `threads` threads and
/// written in order (see the module documentation).
pub struct ParGzip<W: Write> {
    inner: Option<W>,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    header_written: bool,
    /// Blocks handed to workers, oldest first, each as the receiver of its result.
    pending: std::collections::VecDeque<Receiver<Vec<u8>>>,
    jobs: Option<Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    threads: usize,
}

const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

impl<W: Write> ParGzip<W> {
    pub fn new(inner: W, threads: usize) -> ParGzip<W> {
        let threads = threads.max(1);
        let (jobs, workers) = if threads > 1 {
            let (tx, rx) = bounded::<Job>(threads);
            let workers = (0..threads)
                .map(|_| {
                    let rx = rx.clone();
                    std::thread::spawn(move || {
                        for (block, reply) in rx {
                            let _ = reply.send(deflate_block(&block, false));
                        }
                    })
                })
                .collect();
            (Some(tx), workers)
        } else {
            (None, Vec::new())
        };
        ParGzip {
            inner: Some(inner),
            buf: Vec::with_capacity(GZIP_BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            header_written: false,
            pending: Default::default(),
            jobs,
            workers,
            threads,
        }
    }

    fn out(&mut self) -> &mut W {
        self.inner.as_mut().expect("written after finish")
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.header_written = true;
            self.out().write_all(&GZIP_HEADER)?;
        }
        Ok(())
    }

    /// Writes finished blocks in order; `all` waits for every one.
    fn drain(&mut self, all: bool) -> io::Result<()> {
        self.header()?;
        while let Some(rx) = self.pending.front() {
            let block = if all || self.pending.len() > 2 * self.threads {
                rx.recv().map_err(|_| io::Error::other("a gzip worker stopped"))?
            } else {
                match rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(()),
                }
            };
            self.pending.pop_front();
            self.out().write_all(&block)?;
        }
        Ok(())
    }

    /// A full block: deflated here or by a worker.
    fn block(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(GZIP_BLOCK));
        match &self.jobs {
            None => {
                self.header()?;
                let d = deflate_block(&block, false);
                self.out().write_all(&d)
            }
            Some(jobs) => {
                let (tx, rx) = bounded(1);
                jobs.send((block, tx)).map_err(|_| io::Error::other("the gzip workers stopped"))?;
                self.pending.push_back(rx);
                self.drain(false)
            }
        }
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.drain(true)?;
        let last = std::mem::take(&mut self.buf);
        let d = deflate_block(&last, true);
        let crc = std::mem::take(&mut self.crc).finalize();
        let len = self.len;
        let out = self.out();
        out.write_all(&d)?;
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(&(len as u32).to_le_bytes())?;
        Ok(self.inner.take().expect("finished once"))
    }
}

impl<W: Write> Drop for ParGzip<W> {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<W: Write> Write for ParGzip<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        self.crc.update(data);
        self.len += n as u64;
        while !data.is_empty() {
            let take = (GZIP_BLOCK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == GZIP_BLOCK {
                self.block()?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a counter in text with a pseudo-random tail.
        let mut v = Vec::with_capacity(len);
        let mut x: u32 = 1;
        while v.len() < len {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            v.extend_from_slice(format!("line {} {}\n", v.len() / 7, x >> 28).as_bytes());
        }
        v.truncate(len);
        v
    }

    fn encode(c: Compression, data: &[u8], threads: usize, piece: usize) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), c, threads).unwrap();
        for p in data.chunks(piece.max(1)) {
            e.write_all(p).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn gzip_and_zstd_bytes_do_not_depend_on_threads_or_write_sizes() {
        for len in [0, 1, GZIP_BLOCK - 1, GZIP_BLOCK, GZIP_BLOCK + 1, 3 * GZIP_BLOCK + 12345] {
            let data = sample(len);
            for c in [Compression::Gzip, Compression::Zstd] {
                let one = encode(c, &data, 1, 1 << 16);
                for (threads, piece) in [(2, 4096), (3, 1 << 20), (8, 777)] {
                    assert!(one == encode(c, &data, threads, piece), "{c:?} len {len} threads {threads}");
                }
            }
        }
    }

    #[test]
    fn gzip_reads_back_with_a_standard_reader() {
        let data = sample(2 * GZIP_BLOCK + 999);
        let gz = encode(Compression::Gzip, &data, 2, 10_000);
        assert_eq!(&gz[..10], &GZIP_HEADER);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert!(back == data);
        // One member: a single-member decoder reads it all too.
        let mut back = Vec::new();
        flate2::bufread::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), data.len());
        let empty = encode(Compression::Gzip, &[], 1, 1);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&empty[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn gzip_of_incompressible_blocks_reads_back() {
        let mut x: u64 = 7;
        let data: Vec<u8> = (0..3 * GZIP_BLOCK + 100)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 17 == 0 {
                    b'a'
                } else {
                    x as u8
                }
            })
            .collect();
        for threads in [1, 2] {
            let gz = encode(Compression::Gzip, &data, threads, 100_000);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
            assert!(back == data, "threads {threads}");
        }
    }

    #[test]
    fn zstd_reads_back() {
        let data = sample(GZIP_BLOCK * 2 + 5);
        let z = encode(Compression::Zstd, &data, 2, 65536);
        assert!(zstd::decode_all(&z[..]).unwrap() == data);
    }
}
