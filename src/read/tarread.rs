//! Reading tar archives as a stream, the way CPython's `tarfile` reads them.
//!
//! One reader serves every archive nixstream reads: the base image
//! ([`crate::read::baseimage`], indexed once and copied through later) and any
//! docker-archive given to `nixstream verify` (read once, from a pipe if need
//! be, never held in memory).  [`TarReader`] yields each member's header with
//! pax, GNU long-name and ustar-prefix handling applied, and then reads that
//! member's data; whatever data the caller leaves unread is skipped.  It is
//! strict where a lenient reader would let a damaged archive pass: a bad
//! header checksum, a negative size, an archive that ends inside a member or
//! before its end-of-archive block are errors, each naming the member at
//! fault.  Extended headers are read with a size bound.

use std::io::{self, BufRead, Read};

use crate::compat::tarheader::{self, typeflag, Header};

/// Largest pax or GNU long-name extended header read into memory.
pub const MAX_EXTENDED: u64 = 16 << 20;
/// Most bytes read after the end-of-archive block (writers pad to a record,
/// 10 KiB for `tarfile` and GNU tar): more is not a tar archive as any
/// writer makes it, and reading on would never end on `/dev/zero`.
pub const MAX_TRAILER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a tar archive ({0})")]
    NotTar(String),
    /// The archive ends early: in or after the named member (empty: before
    /// its first member).
    #[error("truncated ({})", in_member(.0))]
    Truncated(String),
}

fn in_member(m: &str) -> String {
    if m.is_empty() {
        "before its first member".into()
    } else {
        format!("in member {m:?}")
    }
}

/// How a stream is compressed, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    /// The compression whose magic number `head` starts with.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// `r`, decompressed (multi-member/multi-frame streams included).
    pub fn decoder<'a, R: BufRead + 'a>(self, r: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
            Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
            Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// A member as `tarfile` would read it back (and write it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub linkname: Vec<u8>,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub devmajor: u64,
    pub devminor: u64,
    /// The member's pax records, in their order; `tarfile` writes them again.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the member's data in the (decompressed) archive.
    pub data_offset: u64,
}

impl Member {
    pub fn header(&self) -> Header<'_> {
        Header {
            name: &self.name,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime: self.mtime,
            typeflag: self.typeflag,
            linkname: &self.linkname,
            uname: &self.uname,
            gname: &self.gname,
            devmajor: self.devmajor,
            devminor: self.devminor,
            pax: &self.pax,
        }
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// A regular file (typeflag `0` or NUL).
    pub fn is_file(&self) -> bool {
        self.typeflag == typeflag::REGULAR || self.typeflag == 0
    }
}

/// Reads `buf.len()` bytes unless the stream ends first; returns how many.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads `r` to its end in large chunks (`io::copy` into a sink reads 8 KiB
/// at a time); returns the bytes read.
pub fn discard(r: &mut dyn Read) -> io::Result<u64> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        // Taken, not borrowed: `r` may itself call `discard` (nested readers).
        let mut buf = std::mem::take(&mut *b.borrow_mut());
        buf.resize(1 << 18, 0);
        let mut n = 0u64;
        let r = loop {
            match r.read(&mut buf) {
                Ok(0) => break Ok(n),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        *b.borrow_mut() = buf;
        r
    })
}

fn field_str(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

/// `nti`: octal (NUL/space terminated) or GNU base-256.
fn field_num(b: &[u8]) -> Option<i64> {
    if b[0] & 0x80 != 0 {
        let mut n: i64 = 0;
        for &c in &b[1..] {
            n = n.checked_mul(256)?.checked_add(i64::from(c))?;
        }
        return Some(if b[0] == 0xff { -n } else { n });
    }
    let s = field_str(b);
    let s = std::str::from_utf8(&s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(s, 8).ok()
}

/// The sum of `b`'s bytes, eight at a time (archives of millions of empty
/// members spend most of their reading time here).
fn byte_sum(b: &[u8]) -> i64 {
    const LO8: u64 = 0x00ff_00ff_00ff_00ff;
    const LO16: u64 = 0x0000_ffff_0000_ffff;
    let mut total = 0u64;
    let whole = b.len() - b.len() % 8;
    let mut i = 0;
    while i < whole {
        let w = u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let pairs = (w & LO8) + ((w >> 8) & LO8);
        let quads = (pairs & LO16) + ((pairs >> 16) & LO16);
        total += (quads & 0xffff_ffff) + (quads >> 32);
        i += 8;
    }
    for &c in &b[whole..] {
        total += u64::from(c);
    }
    total as i64
}

/// A header block's checksum: its bytes summed with the checksum field
/// read as eight spaces.
fn header_sum(block: &[u8]) -> i64 {
    byte_sum(&block[..tarheader::BLOCK]) - byte_sum(&block[148..156]) + 8 * i64::from(b' ')
}

/// True when `b` starts with a tar header block whose checksum holds (a
/// plain layer tar, whatever its first name looks like).
pub fn is_header_block(b: &[u8]) -> bool {
    b.len() >= tarheader::BLOCK
        && byte_sum(&b[..tarheader::BLOCK]) != 0
        && field_num(&b[148..156]) == Some(header_sum(b))
}

fn parse_pax(data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&c| c == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return None;
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&c| c == b'=')?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Some(out)
}

/// A tar archive read member by member.  Also a `Read` of the current
/// member's data.
pub struct TarReader<R> {
    r: R,
    /// Bytes consumed from `r`.
    offset: u64,
    /// Data bytes of the current member not yet read.
    left: u64,
    /// Padding after the current member's data.
    pad: u64,
    current: String,
    global_pax: Vec<(Vec<u8>, Vec<u8>)>,
    members: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            offset: 0,
            left: 0,
            pad: 0,
            current: String::new(),
            global_pax: Vec::new(),
            members: 0,
            ended: false,
        }
    }

    /// Bytes of the archive consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Members returned so far.
    pub fn members(&self) -> u64 {
        self.members
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    fn truncated(&self) -> TarError {
        TarError::Truncated(self.current.clone())
    }

    /// A read error of the underlying stream; a decompressor's early end
    /// (`UnexpectedEof`) is a truncation at the current member.
    fn io(&self, e: io::Error) -> TarError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.truncated()
        } else {
            TarError::Io(e)
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let skipped = discard(&mut (&mut self.r).take(n)).map_err(|e| self.io(e))?;
        self.offset += skipped;
        if skipped < n {
            return Err(self.truncated());
        }
        Ok(())
    }

    fn read_block(&mut self, block: &mut [u8; tarheader::BLOCK]) -> Result<usize, TarError> {
        let n = read_full(&mut self.r, block).map_err(|e| self.io(e))?;
        self.offset += n as u64;
        Ok(n)
    }

    /// An extended header's data, bounded by [`MAX_EXTENDED`].
    fn read_extended(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENDED {
            return Err(TarError::NotTar(format!("an extended header of {size} bytes is too large")));
        }
        let padded = size + tarheader::data_padding(size) as u64;
        let mut d = vec![0u8; padded as usize];
        let n = read_full(&mut self.r, &mut d).map_err(|e| self.io(e))?;
        self.offset += n as u64;
        if n < d.len() {
            return Err(TarError::Truncated("an extended header".into()));
        }
        d.truncate(size as usize);
        Ok(d)
    }

    /// The next member's header, after skipping what is left of the current
    /// member; `None` at the end-of-archive block.
    pub fn next_member(&mut self) -> Result<Option<Member>, TarError> {
        if self.ended {
            return Ok(None);
        }
        let rest = self.left + self.pad;
        self.left = 0;
        self.pad = 0;
        self.skip(rest)?;
        let mut block = [0u8; tarheader::BLOCK];
        let mut pending_pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let start = self.offset;
            let n = self.read_block(&mut block)?;
            if n == 0 && start == 0 {
                return Err(TarError::NotTar("it is empty".into()));
            }
            if n < tarheader::BLOCK {
                return Err(self.truncated());
            }
            if byte_sum(&block) == 0 {
                self.ended = true;
                return Ok(None);
            }
            let not_tar = |why: String| TarError::NotTar(why);
            let stored = field_num(&block[148..156])
                .ok_or_else(|| not_tar(format!("bad header checksum field at offset {start}")))?;
            if stored != header_sum(&block) {
                return Err(not_tar(format!("header checksum mismatch at offset {start}")));
            }
            let size =
                field_num(&block[124..136]).ok_or_else(|| not_tar(format!("bad size field at offset {start}")))?;
            let size = u64::try_from(size).map_err(|_| not_tar(format!("negative member size at offset {start}")))?;
            let flag = block[156];
            match flag {
                b'x' | b'X' => {
                    let d = self.read_extended(size)?;
                    pending_pax =
                        parse_pax(&d).ok_or_else(|| not_tar(format!("malformed pax header at offset {start}")))?;
                    continue;
                }
                b'g' => {
                    let d = self.read_extended(size)?;
                    self.global_pax = parse_pax(&d)
                        .ok_or_else(|| not_tar(format!("malformed pax global header at offset {start}")))?;
                    continue;
                }
                b'L' => {
                    long_name = Some(field_str(&self.read_extended(size)?));
                    continue;
                }
                b'K' => {
                    long_link = Some(field_str(&self.read_extended(size)?));
                    continue;
                }
                _ => {}
            }
            let member = self.member_from(&block, size, pending_pax, long_name, long_link);
            self.current = member.name_lossy();
            // Links, directories, devices and fifos carry no data, whatever
            // their size field says (tarfile skips data only for the others).
            let data = if matches!(member.typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') { 0 } else { member.size };
            self.left = data;
            self.pad = tarheader::data_padding(data) as u64;
            self.members += 1;
            return Ok(Some(member));
        }
    }

    fn member_from(
        &self,
        block: &[u8; tarheader::BLOCK],
        size: u64,
        pending_pax: Vec<(Vec<u8>, Vec<u8>)>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Member {
        let is_ustar = &block[257..263] == b"ustar\0";
        let mut name = field_str(&block[0..100]);
        let prefix = if is_ustar { field_str(&block[345..500]) } else { Vec::new() };
        let mut member = Member {
            name: Vec::new(),
            mode: field_num(&block[100..108]).unwrap_or(0) as u32,
            uid: field_num(&block[108..116]).unwrap_or(0) as u64,
            gid: field_num(&block[116..124]).unwrap_or(0) as u64,
            size,
            mtime: field_num(&block[136..148]).unwrap_or(0),
            typeflag: block[156],
            linkname: field_str(&block[157..257]),
            uname: field_str(&block[265..297]),
            gname: field_str(&block[297..329]),
            devmajor: field_num(&block[329..337]).unwrap_or(0) as u64,
            devminor: field_num(&block[337..345]).unwrap_or(0) as u64,
            pax: Vec::new(),
            data_offset: self.offset,
        };
        // tarfile.frombuf: old-style directories, trailing slashes, prefix.
        if member.typeflag == 0 && name.ends_with(b"/") {
            member.typeflag = typeflag::DIRECTORY;
        }
        if !prefix.is_empty() {
            let mut full = prefix;
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
        if let Some(n) = long_name {
            name = n;
        }
        if let Some(l) = long_link {
            member.linkname = l;
        }
        let mut pax = self.global_pax.clone();
        for (k, v) in pending_pax {
            if let Some(slot) = pax.iter_mut().find(|(key, _)| *key == k) {
                slot.1 = v;
            } else {
                pax.push((k, v));
            }
        }
        for (k, v) in &pax {
            let text = || std::str::from_utf8(v).ok().map(str::trim);
            match k.as_slice() {
                b"path" => name = v.clone(),
                b"linkpath" => member.linkname = v.clone(),
                b"uname" => member.uname = v.clone(),
                b"gname" => member.gname = v.clone(),
                b"uid" => member.uid = text().and_then(|t| t.parse().ok()).unwrap_or(member.uid),
                b"gid" => member.gid = text().and_then(|t| t.parse().ok()).unwrap_or(member.gid),
                b"size" => member.size = text().and_then(|t| t.parse().ok()).unwrap_or(member.size),
                // A float in pax; tarfile puts round() (half to even) in the ustar field.
                b"mtime" => {
                    if let Some(f) = text().and_then(|t| t.parse::<f64>().ok()) {
                        member.mtime = f.round_ties_even() as i64;
                    }
                }
                _ => {}
            }
        }
        // A directory's name loses its trailing slash whichever field it
        // came from (the ustar name, a GNU long name or a pax path; found by
        // fuzzing: a non-UTF-8 directory name travels in a pax record).
        if member.typeflag == typeflag::DIRECTORY {
            while name.len() > 1 && name.ends_with(b"/") {
                name.pop();
            }
        }
        member.name = name;
        member.pax = pax;
        member
    }

    /// Reads to the end of the archive's data (the zero blocks and any record
    /// padding after them), so a checksum over the whole stream is complete;
    /// more than [`MAX_TRAILER`] bytes of it is an error.
    pub fn drain(&mut self) -> Result<u64, TarError> {
        let n = discard(&mut (&mut self.r).take(MAX_TRAILER + 1)).map_err(|e| self.io(e))?;
        self.offset += n;
        if n > MAX_TRAILER {
            return Err(TarError::NotTar(format!(
                "more than {MAX_TRAILER} bytes follow its end-of-archive block, the limit; writers pad to 10240"
            )));
        }
        Ok(n)
    }
}

impl<R: Read> Read for TarReader<R> {
    /// Reads the current member's data; an archive that ends inside it is an
    /// `UnexpectedEof` error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the archive ends inside member {:?}", self.current),
            ));
        }
        self.left -= n as u64;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        tarheader::encode(&Header::plain_file(name, data.len() as u64, 7), &mut out);
        out.extend_from_slice(data);
        out.resize(out.len() + tarheader::data_padding(data.len() as u64), 0);
        out
    }

    fn archive(members: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out: Vec<u8> = members.iter().flat_map(|(n, d)| member(n, d)).collect();
        out.resize(out.len() + tarheader::end_of_archive_len(out.len() as u64), 0);
        out
    }

    #[test]
    fn reads_members_and_their_data_and_skips_what_is_left() {
        let long = vec![b'n'; 300];
        let a = archive(&[(b"a", b"hello"), (&long, b"x"), (b"c", &[9u8; 1000])]);
        let mut t = TarReader::new(&a[..]);
        let m = t.next_member().unwrap().unwrap();
        assert_eq!((m.name.as_slice(), m.size, m.mtime), (&b"a"[..], 5, 7));
        let mut d = String::new();
        t.read_to_string(&mut d).unwrap();
        assert_eq!(d, "hello");
        let m = t.next_member().unwrap().unwrap();
        assert_eq!(m.name, long, "the pax path wins");
        let m = t.next_member().unwrap().unwrap();
        assert_eq!(m.size, 1000); // data left unread: skipped by the next call
        assert!(t.next_member().unwrap().is_none());
        assert!(t.next_member().unwrap().is_none(), "stays ended");
        assert_eq!(t.members(), 3);
        t.drain().unwrap();
        assert_eq!(t.offset(), a.len() as u64);
    }

    #[test]
    fn damaged_archives_are_errors_naming_the_member() {
        let a = archive(&[(b"first", b"abc"), (b"second", &[1u8; 2000])]);
        // Cut inside the second member's data.
        let cut = &a[..1024 + 512 + 700];
        let mut t = TarReader::new(cut);
        t.next_member().unwrap();
        t.next_member().unwrap();
        let e = t.next_member().unwrap_err();
        assert!(matches!(&e, TarError::Truncated(m) if m == "second"), "{e}");
        let mut t = TarReader::new(cut);
        t.next_member().unwrap();
        t.next_member().unwrap();
        let e = io::copy(&mut t, &mut io::sink()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // No end-of-archive block: truncated, not silently complete.
        let mut t = TarReader::new(&a[..1024]);
        t.next_member().unwrap();
        assert!(matches!(t.next_member(), Err(TarError::Truncated(_))));
        // A flipped header byte fails the checksum.
        let mut bad = a.clone();
        bad[10] ^= 1;
        assert!(matches!(TarReader::new(&bad[..]).next_member(), Err(TarError::NotTar(_))));
        assert!(matches!(TarReader::new(&b""[..]).next_member(), Err(TarError::NotTar(_))));
        assert!(matches!(TarReader::new(&[1u8; 100][..]).next_member(), Err(TarError::Truncated(_))));
        let e = TarReader::new(&[1u8; 100][..]).next_member().unwrap_err();
        assert_eq!(e.to_string(), "truncated (before its first member)");
        // A decompressor's early end is a truncation too, not an I/O error.
        let z = zstd::encode_all(&a[..], 3).unwrap();
        let mut t = TarReader::new(Compression::Zstd.decoder(&z[..z.len() - 8]).unwrap());
        let e = loop {
            match t.next_member() {
                Ok(Some(_)) => {}
                Ok(None) => match t.drain() {
                    Ok(_) => panic!("a cut zstd stream read to its end"),
                    Err(e) => break e,
                },
                Err(e) => break e,
            }
        };
        assert!(matches!(e, TarError::Truncated(_)), "{e}");
    }

    #[test]
    fn directory_names_lose_their_slash_from_pax_paths_too() {
        // The fuzzer's case: a non-UTF-8 directory name, written by our
        // encoder with a trailing slash inside a pax path record.
        let name = [91u8, 243, 22, 157];
        let h = Header { typeflag: typeflag::DIRECTORY, size: 0, ..Header::plain_file(&name, 0, 1) };
        let mut out = Vec::new();
        tarheader::encode(&h, &mut out);
        out.resize(out.len() + 1024, 0);
        let m = TarReader::new(&out[..]).next_member().unwrap().unwrap();
        assert_eq!(m.name, name);
        assert!(out.windows(6).any(|w| w == b"path=["), "the name is in a pax record");
    }

    #[test]
    fn byte_sums_are_sums() {
        let b: Vec<u8> = (0..1029u32).map(|i| (i * 7919 % 256) as u8).collect();
        for len in [0, 1, 7, 8, 9, 512, 1029] {
            assert_eq!(byte_sum(&b[..len]), b[..len].iter().map(|&c| i64::from(c)).sum::<i64>(), "{len}");
        }
        assert_eq!(byte_sum(&[255u8; 512]), 255 * 512);
    }

    #[test]
    fn sniffs_compression() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(b"BZh9"), Compression::Bzip2);
        assert_eq!(Compression::sniff(&[0xfd, b'7', b'z', b'X', b'Z', 0]), Compression::Xz);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"nix/"), Compression::None);
        let z = zstd::encode_all(&b"some data"[..], 3).unwrap();
        let mut out = String::new();
        Compression::Zstd.decoder(&z[..]).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "some data");
    }
}
