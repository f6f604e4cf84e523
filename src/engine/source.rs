//! The three kinds of layer and how each becomes bytes, in both passes:
//! store paths (rendered by [`crate::render`]), a base image's layer (its
//! member, copied or decompressed), the customisation layer (its
//! `layer.tar`).  This is the one place the kinds differ; the hashing pass
//! ([`hash`]) and the streaming pass ([`write_blob`]) both come through it,
//! so they cannot disagree on what a layer's bytes are.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::AtomicBool;

use crate::compat::pyjson::repr_str_list;
use crate::engine::compress::Encoder;
use crate::engine::digest::{HashSink, LayerDigest, OverrunError, VerifyingWriter};
use crate::engine::hashing::{BlobWriter, Blobs, EngineError, EngineOptions, Hashed, Slots};
use crate::engine::image::Compression;
use crate::engine::origin::{Found, Origin, WrongDigest};
use crate::output::splice::Policy;
use crate::plan::{Customisation, ImagePlan, PlannedLayer};
use crate::read::baseimage::BaseError;
use crate::render::layer::{FileCheck, Identity, LayerError};
use crate::render::segment::render_layer;
use crate::render::sink::{FileRef, LayerOut};
use crate::store::walk::Listing;

/// The line the reference prints before writing layer `i` (0-based).
pub(crate) fn describe(plan: &ImagePlan, i: usize) -> String {
    let num = i + 1;
    match &plan.layers[i] {
        PlannedLayer::Base { index } => {
            let bl = &plan.base.as_ref().expect("base layer without base").layers[*index];
            format!("Adding base layer {} from {}", index + 1, bl.member.name_lossy())
        }
        PlannedLayer::Store { paths_text, .. } => {
            format!("Creating layer {num} from paths: {}", repr_str_list(paths_text))
        }
        PlannedLayer::Customisation(_) => format!("Creating layer {num} with customisation..."),
    }
}

/// A sha256 of the plain tar and, for an encoded blob, of its encoding;
/// with a [`BlobSink`], the blob's bytes go to it as well.
struct Tee {
    plain: HashSink,
    encoded: Option<Encoder<BlobHash>>,
    /// For a plain blob kept by the sink: the sink's writer.
    plain_copy: Option<Box<dyn BlobWriter>>,
}

/// The encoded blob's sha256, and the sink's writer if there is one.
struct BlobHash {
    hash: HashSink,
    copy: Option<Box<dyn BlobWriter>>,
}

impl Write for BlobHash {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.hash.write_all(buf)?;
        if let Some(c) = &mut self.copy {
            c.write_all(buf)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Tee {
    fn new(c: Compression, threads: usize, copy: Option<Box<dyn BlobWriter>>) -> io::Result<Tee> {
        Ok(match c {
            Compression::None => Tee { plain: HashSink::new(), encoded: None, plain_copy: copy },
            c => {
                let blob = BlobHash { hash: HashSink::new(), copy };
                Tee { plain: HashSink::new(), encoded: Some(Encoder::new(blob, c, threads)?), plain_copy: None }
            }
        })
    }

    /// The plain and encoded digests, and the sink's writer.
    #[allow(clippy::type_complexity)]
    fn finish(
        self,
        layer: usize,
    ) -> Result<(LayerDigest, Option<LayerDigest>, Option<Box<dyn BlobWriter>>), EngineError> {
        let plain = self.plain.finish();
        match self.encoded {
            None => Ok((plain, None, self.plain_copy)),
            Some(e) => {
                let blob = e.finish().map_err(|source| EngineError::Compress { layer, source })?;
                Ok((plain, Some(blob.hash.finish()), blob.copy))
            }
        }
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.plain.write_all(buf)?;
        if let Some(e) = &mut self.encoded {
            e.write_all(buf)?;
        }
        if let Some(c) = &mut self.plain_copy {
            c.write_all(buf)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LayerOut for Tee {}

/// The hashing pass for layer `i` (0-based): its digests, from the lookup
/// (the cache) where it knows them, else by reading it.
pub(crate) fn hash(
    plan: &ImagePlan,
    i: usize,
    opts: &EngineOptions,
    readers: usize,
    identity: Identity,
    abort: &AtomicBool,
) -> Result<Hashed, EngineError> {
    let num = i + 1;
    let c = opts.blobs.compression();
    let tee = |layer: usize| -> Result<Tee, EngineError> {
        let copy = match opts.blob_sink {
            Some(s) => Some(s.open(layer).map_err(|e| EngineError::Sink { layer: num, what: e.to_string() })?),
            None => None,
        };
        Tee::new(c, readers, copy).map_err(|source| EngineError::Compress { layer: num, source })
    };
    let done = |sink: Tee, files: Option<Vec<u128>>, unchanged_before_ns: i128| -> Result<Hashed, EngineError> {
        let (digest, blob, copy) = sink.finish(num)?;
        if let Some(w) = copy {
            w.commit(&blob.unwrap_or(digest)).map_err(|e| EngineError::Sink { layer: num, what: e.to_string() })?;
        }
        Ok(Hashed { digest, blob, unchanged_before_ns, files, origin: Origin::ThisRun })
    };
    match &plan.layers[i] {
        PlannedLayer::Store { listing, owner, .. } => {
            let listed = listing.get(readers).map_err(|source| EngineError::Walk { layer: num, source })?;
            if let Some(hit) = opts.lookup.and_then(|l| l.lookup(i, listed)) {
                if c == Compression::None || hit.blob.is_some() {
                    return Ok(hit);
                }
            }
            let owner = owner.as_ref().unwrap_or(&plan.owner);
            let mut files = Vec::new();
            let mut sink = tee(i)?;
            render_layer(listed, owner, &mut sink, FileCheck::Record(&mut files, identity), Some(abort), readers)
                .map_err(|source| EngineError::Layer { layer: num, source })?;
            done(sink, Some(files), i128::MAX)
        }
        PlannedLayer::Base { index } => {
            let mut sink = tee(i)?;
            base_plain(plan, *index, &mut sink)?;
            done(sink, None, i128::MIN)
        }
        PlannedLayer::Customisation(cust) => {
            let mut sink = tee(i)?;
            copy_customisation(cust, &mut sink)?;
            done(sink, None, i128::MIN)
        }
    }
}

/// What the streaming pass needs besides the layer.
pub(crate) struct Stream<'a> {
    pub blobs: Blobs,
    pub readers: usize,
    pub splice: Option<Policy>,
    pub slots: &'a Slots,
}

/// The streaming pass for layer `i`: its blob into `out`, checked against
/// `h` (the hashing pass's digests) as it goes.  Returns the per-file
/// hashes it confirmed (what the digest cache keeps).
pub(crate) fn write_blob(
    plan: &ImagePlan,
    i: usize,
    h: &Hashed,
    out: &mut dyn LayerOut,
    s: &Stream,
) -> Result<Option<Vec<u128>>, EngineError> {
    let num = i + 1;
    let c = s.blobs.compression();
    let layer = &plan.layers[i];
    match (s.blobs, layer) {
        (Blobs::DockerArchive, PlannedLayer::Base { index }) => {
            let base = plan.base.as_ref().expect("base layer without base");
            base.copy_layer(*index, &mut &mut *out).map_err(EngineError::Output)??;
            return Ok(None);
        }
        (Blobs::DockerArchive | Blobs::Encoded(Compression::None), PlannedLayer::Customisation(cust)) => {
            copy_customisation(cust, out)?;
            return Ok(None);
        }
        _ => {}
    }
    let expected = if c == Compression::None { h.digest } else { h.blob.expect("an encoded layer's blob digest") };
    let what = match c {
        Compression::None => "layer tar".to_string(),
        c => format!("{} blob", c.name()),
    };
    let paths = plan.history_paths(layer);
    let mut listed: Option<&Listing> = None;
    let mismatch = |listed: Option<&Listing>, promised: LayerDigest, what: &str, actual: Option<LayerDigest>| {
        mismatch(num, &paths, h, listed, promised, Found::Bytes { what: what.to_string(), actual })
    };
    // Uncompressed, with per-file hashes: each file is checked by its
    // xxh3 (or spliced, by metadata), the layer by its size only.
    let per_file = c == Compression::None && h.files.is_some();
    let mut v = if per_file { VerifyingWriter::size_only(out, expected) } else { VerifyingWriter::new(out, expected) };
    let mut enc = Encoder::new(&mut v, c, s.readers).map_err(|source| EngineError::Compress { layer: num, source })?;
    // An encoded blob's digest from outside vouches for the blob, not for
    // the diff_id that came with it: the plain tar is hashed too.
    let mut plain =
        PlainHash { out: &mut enc, hash: (c != Compression::None && h.origin.is_outside()).then(HashSink::new) };
    match layer {
        PlannedLayer::Store { listing, owner, .. } => {
            let listing = listing.get(s.readers).map_err(|source| EngineError::Walk { layer: num, source })?;
            listed = Some(listing);
            let owner = owner.as_ref().unwrap_or(&plan.owner);
            let policy =
                if c == Compression::None { s.splice.map(|p| p.unread_before(h.unchanged_before_ns)) } else { None };
            let check = match &h.files {
                Some(f) => FileCheck::Verify(f, policy),
                None => FileCheck::Off,
            };
            match render_layer(listing, owner, &mut plain, check, Some(&s.slots.abort), s.readers) {
                Ok(_) => {}
                Err(LayerError::Aborted) => {
                    return Err(s.slots.first_error().unwrap_or(EngineError::Worker("aborted".into())))
                }
                Err(LayerError::Output(e)) if is_overrun(&e) => return Err(mismatch(listed, expected, &what, None)),
                Err(LayerError::ContentDiffers(d)) => {
                    let found = Found::File { path: d.path, recorded: d.recorded, actual: d.actual };
                    return Err(self::mismatch(num, &paths, h, None, h.digest, found));
                }
                Err(source) => return Err(EngineError::Layer { layer: num, source }),
            }
        }
        PlannedLayer::Base { index } => base_plain(plan, *index, &mut plain)?,
        PlannedLayer::Customisation(cust) => copy_customisation(cust, &mut plain)?,
    }
    let plain = plain.hash.map(HashSink::finish);
    match enc.finish() {
        Ok(_) => {}
        Err(e) if is_overrun(&e) => return Err(mismatch(listed, expected, &what, None)),
        Err(source) => return Err(EngineError::Compress { layer: num, source }),
    }
    if let Err(m) = v.finish() {
        return Err(mismatch(listed, expected, &what, Some(m.actual)));
    }
    if let Some(actual) = plain.filter(|p| *p != h.digest) {
        return Err(mismatch(listed, h.digest, "layer tar", Some(actual)));
    }
    Ok(h.files.clone())
}

/// The plain tar on its way into the encoder, hashed when `hash` is set.
struct PlainHash<'a, W: LayerOut> {
    out: &'a mut W,
    hash: Option<HashSink>,
}

impl<W: LayerOut> Write for PlainHash<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|_| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Some(h) = &mut self.hash {
            h.write_all(buf)?;
        }
        self.out.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: LayerOut> LayerOut for PlainHash<'_, W> {
    // Bytes that bypass `write` would bypass the hash: only without one.
    fn read_into(&mut self, fd: std::os::fd::BorrowedFd<'_>, max: usize) -> Option<io::Result<&[u8]>> {
        match self.hash {
            None => self.out.read_into(fd, max),
            Some(_) => None,
        }
    }

    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        match self.hash {
            None => self.out.pass_file(file),
            Some(_) => {
                Err(io::Error::other(format!("{}: a hashed layer takes no file by reference", file.path.display())))
            }
        }
    }
}

fn is_overrun(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<OverrunError>())
}

/// The error for layer `layer`'s bytes that are not what `h` promised
/// (`promised`: its plain tar's or its blob's digest).  For digests from
/// this run, the store changed between the passes.  For digests from
/// outside, the store changed only if a file of the layer is no longer what
/// the listing saw (`listed`, looked at again now; `None` when a file's own
/// check already found it unchanged); else the digest is wrong.
fn mismatch(
    layer: usize,
    paths: &[String],
    h: &Hashed,
    listed: Option<&Listing>,
    promised: LayerDigest,
    found: Found,
) -> EngineError {
    if h.origin.is_outside() {
        if let Some((path, what)) = listed.and_then(Listing::first_changed) {
            return EngineError::Layer { layer, source: LayerError::Changed { path, what } };
        }
        return EngineError::WrongDigest(Box::new(WrongDigest::new(
            layer,
            repr_str_list(paths),
            h.origin.clone(),
            promised,
            found,
        )));
    }
    let actual = match found {
        Found::Bytes { actual, .. } => actual,
        Found::File { path, .. } => {
            let what = "its content differs from the hashing pass".to_string();
            return EngineError::Layer { layer, source: LayerError::Changed { path, what } };
        }
    };
    EngineError::DigestMismatch {
        layer,
        paths: repr_str_list(paths),
        expected: promised.hex(),
        expected_size: promised.size,
        became: match actual {
            Some(a) => format!("became sha256:{}, {} bytes", a.hex(), a.size),
            None => format!("grew past {} bytes", promised.size),
        },
    }
}

/// A writer that decompresses what it is given (gzip or zstd, found by
/// the first bytes; anything else passes through) into `out`.
enum Decompress<'a> {
    Undecided(&'a mut dyn Write),
    Plain(&'a mut dyn Write),
    Gzip(flate2::write::MultiGzDecoder<&'a mut dyn Write>),
    Zstd(zstd::stream::write::Decoder<'static, &'a mut dyn Write>),
    Gone,
}

impl Write for Decompress<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Decompress::Undecided(_) = self {
            let Decompress::Undecided(out) = std::mem::replace(self, Decompress::Gone) else { unreachable!() };
            *self = if buf.starts_with(&[0x1f, 0x8b]) {
                Decompress::Gzip(flate2::write::MultiGzDecoder::new(out))
            } else if buf.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Decompress::Zstd(zstd::stream::write::Decoder::new(out)?)
            } else {
                Decompress::Plain(out)
            };
        }
        match self {
            Decompress::Plain(w) => w.write(buf),
            Decompress::Gzip(w) => w.write(buf),
            Decompress::Zstd(w) => w.write(buf),
            _ => unreachable!("decided above"),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Decompress::Gzip(w) => w.try_finish(),
            Decompress::Zstd(w) => w.flush(),
            _ => Ok(()),
        }
    }
}

/// Base layer `index` as a plain tar into `out`, its diff_id checked.
fn base_plain(plan: &ImagePlan, index: usize, out: &mut dyn Write) -> Result<(), EngineError> {
    let base = plan.base.as_ref().expect("base layer without base");
    let mut d = Decompress::Undecided(out);
    base.copy_layer(index, &mut d).map_err(EngineError::Output)??;
    d.flush().map_err(|e| {
        EngineError::Base(BaseError::Invalid {
            path: base.path.clone(),
            what: format!("layer {} cannot be decompressed: {e}", base.layers[index].path),
        })
    })
}

/// The customisation layer's `layer.tar` into `out`, checked against its
/// checksum file and against the file the plan stat'ed.
pub(crate) fn copy_customisation(c: &Customisation, out: &mut dyn Write) -> Result<(), EngineError> {
    let err = |what: String| EngineError::Customisation { path: c.tar_path.clone(), what };
    let expected = LayerDigest { size: c.size, sha256: c.digest };
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&c.tar_path)
        .map_err(|e| err(format!("cannot open: {e}")))?;
    let md = f.metadata().map_err(|e| err(format!("cannot stat: {e}")))?;
    let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    if md.size() != c.size || md.ino() != c.ino || mtime_ns != c.mtime_ns {
        return Err(err("changed while the image was being written".into()));
    }
    let mut v = VerifyingWriter::new(out, expected);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = c.size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => return Err(err("it ended early".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(format!("cannot read: {e}"))),
        };
        v.write_all(&buf[..n]).map_err(EngineError::Output)?;
        left -= n as u64;
    }
    if let Err(m) = v.finish() {
        return Err(err(format!(
            "its sha256 is {}, but its checksum file says {}; the customisation layer is corrupt",
            m.actual.hex(),
            m.expected.hex()
        )));
    }
    Ok(())
}
