//! Digests: the sink the hashing pass writes layers into, and the writer
//! the streaming pass writes them through, which hashes what it forwards and
//! refuses to vouch for bytes whose digest or size differ from the first pass.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use crate::render::sink::{FileRef, LayerOut};

/// A layer's size and sha256, as the hashing pass found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDigest {
    pub size: u64,
    pub sha256: [u8; 32],
}

impl LayerDigest {
    pub fn hex(&self) -> String {
        hex(&self.sha256)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Parses 64 lowercase or uppercase hex digits.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = (d(pair[0])? * 16 + d(pair[1])?) as u8;
    }
    Some(out)
}

/// A `Write` that only hashes and counts: the hashing pass's output.
#[derive(Default, Clone)]
pub struct HashSink {
    hasher: Sha256,
    len: u64,
}

impl HashSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `n` bytes without hashing them (their digest comes from elsewhere).
    pub fn skip(&mut self, n: u64) {
        self.len += n;
    }

    pub fn finish(self) -> LayerDigest {
        LayerDigest { size: self.len, sha256: self.hasher.finalize().into() }
    }
}

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write(buf).map(|_| ())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The streaming pass's writer: forwards to `inner`, hashing and counting.
/// It refuses to write past the expected size, so the outer archive can
/// never receive more bytes than its member header announced.
pub struct VerifyingWriter<W> {
    inner: W,
    sink: HashSink,
    expected: LayerDigest,
    /// False: count only (the caller verifies content another way).
    hashing: bool,
}

/// What the streaming pass found when it did not match the hashing pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub expected: LayerDigest,
    pub actual: LayerDigest,
}

impl<W: Write> VerifyingWriter<W> {
    pub fn new(inner: W, expected: LayerDigest) -> Self {
        VerifyingWriter { inner, sink: HashSink::new(), expected, hashing: true }
    }

    /// Checks only the size; for content verified file by file.
    pub fn size_only(inner: W, expected: LayerDigest) -> Self {
        VerifyingWriter { inner, sink: HashSink::new(), expected, hashing: false }
    }

    /// Checks size and digest; returns the inner writer on success.
    pub fn finish(self) -> Result<W, Box<Mismatch>> {
        let len = self.sink.len;
        let mut actual = self.sink.finish();
        if !self.hashing {
            actual = LayerDigest { size: len, sha256: self.expected.sha256 };
        }
        if actual == self.expected {
            Ok(self.inner)
        } else {
            Err(Box::new(Mismatch { expected: self.expected, actual }))
        }
    }
}

impl<W: Write> Write for VerifyingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.sink.len + buf.len() as u64 > self.expected.size {
            return Err(io::Error::other(OverrunError));
        }
        self.inner.write_all(buf)?;
        if self.hashing {
            self.sink.write_all(buf)
        } else {
            self.sink.len += buf.len() as u64;
            Ok(())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl LayerOut for HashSink {}

impl<W: LayerOut> LayerOut for VerifyingWriter<W> {
    /// Passes a file on, counting its size; only a size-only writer can (the
    /// bytes are never seen here).
    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        if self.hashing {
            return Err(io::Error::other("a hashing writer cannot pass a file on unread"));
        }
        if self.sink.len + file.len > self.expected.size {
            return Err(io::Error::other(OverrunError));
        }
        let len = file.len;
        self.inner.pass_file(file)?;
        self.sink.len += len;
        Ok(())
    }
}

/// Marker inside an `io::Error`: a layer grew between the passes.
#[derive(Debug, thiserror::Error)]
#[error("layer is larger than in the hashing pass")]
pub struct OverrunError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_matches_sha256_of_empty_and_abc() {
        assert_eq!(HashSink::new().finish().hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let mut s = HashSink::new();
        s.write_all(b"ab").unwrap();
        s.write_all(b"c").unwrap();
        let d = s.finish();
        assert_eq!(d.size, 3);
        assert_eq!(d.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(parse_sha256_hex(&d.hex()), Some(d.sha256));
        assert_eq!(parse_sha256_hex("xyz"), None);
    }

    #[test]
    fn verifying_writer_accepts_equal_and_rejects_different_bytes() {
        let mut s = HashSink::new();
        s.write_all(b"hello").unwrap();
        let want = s.finish();

        let mut w = VerifyingWriter::new(Vec::new(), want);
        w.write_all(b"hello").unwrap();
        assert_eq!(w.finish().unwrap(), b"hello");

        let mut w = VerifyingWriter::new(Vec::new(), want);
        w.write_all(b"jello").unwrap();
        let m = w.finish().unwrap_err();
        assert_eq!(m.expected, want);
        assert_ne!(m.actual.sha256, want.sha256);

        let mut w = VerifyingWriter::new(Vec::new(), want);
        assert!(w.write_all(b"hello!").is_err(), "overrun refused before it reaches the output");

        let mut w = VerifyingWriter::size_only(Vec::new(), want);
        w.write_all(b"jello").unwrap();
        assert!(w.finish().is_ok(), "size-only does not look at content");
        let mut w = VerifyingWriter::size_only(Vec::new(), want);
        w.write_all(b"hell").unwrap();
        assert_eq!(w.finish().unwrap_err().actual.size, 4);
    }
}
