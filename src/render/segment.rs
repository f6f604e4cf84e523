//! One layer rendered by several readers at once, merged in order.
//!
//! A store layer's tar is a prologue (`/nix`, `/nix/store`), its members,
//! and the end padding; the members of any run of entries can be written
//! without the others ([`crate::render::layer::write_entries`] opens the directories
//! above a run's first entry itself).  So a layer is cut into segments of
//! about [`SEGMENT_BYTES`] of file data or [`SEGMENT_ENTRIES`] entries, and
//! `readers` threads render alternate segments into chunk channels of their
//! own while the calling thread takes the chunks in segment order into `out`:
//! the sha256 sink in the hashing pass, the verifying writer in the streaming
//! pass.  Opening, reading and checking files (most of a small-file layer's
//! cost) then runs on several cores even when one store path dominates the
//! image, whose layer would otherwise be hashed and streamed by one thread
//! each.  The bytes are those of [`crate::render::layer::write_store_layer`] whatever
//! the number of readers (tested), and memory stays bounded: each reader has
//! [`POOL`] chunks of [`CHUNK`] bytes.

use std::ops::Range;
use std::sync::atomic::AtomicBool;

use crossbeam_channel::{Receiver, Sender};

use crate::output::splice::Policy;
use crate::output::writer::{self, Chunks, Piece};
use crate::render::layer::{
    write_entries, write_epilogue, write_prologue, Counting, FileCheck, Identity, LayerError, Owner, Scratch,
};
use crate::render::sink::LayerOut;
use crate::store::walk::{Kind, Listing};

/// File bytes after which a segment ends.
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// Entries after which a segment ends.
pub const SEGMENT_ENTRIES: usize = 512;
/// Bytes per chunk a reader hands over.
pub const CHUNK: usize = 1 << 18;
/// Chunks in circulation per reader.
pub const POOL: usize = 4;

/// A run of entries, and how many files come before it in the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub entries: Range<usize>,
    pub first_file: usize,
}

/// Cuts `listing` into segments in entry order.
pub fn segments(listing: &Listing) -> Vec<Segment> {
    let mut out = Vec::new();
    let (mut start, mut first_file, mut files, mut bytes) = (0, 0, 0, 0u64);
    for (i, e) in listing.entries.iter().enumerate() {
        if e.kind == Kind::File {
            files += 1;
            bytes += e.size;
        }
        if bytes >= SEGMENT_BYTES || i + 1 - start >= SEGMENT_ENTRIES {
            out.push(Segment { entries: start..i + 1, first_file });
            (start, first_file, bytes) = (i + 1, files, 0);
        }
    }
    if start < listing.entries.len() || out.is_empty() {
        out.push(Segment { entries: start..listing.entries.len(), first_file });
    }
    out
}

/// Renders the layer tar for `listing` into `out` with up to `readers`
/// threads reading (at least one, never the calling thread); returns its
/// length.  Same contract as [`crate::render::layer::write_store_layer`].
pub fn render_layer<W: LayerOut>(
    listing: &Listing,
    owner: &Owner,
    out: &mut W,
    check: FileCheck<'_>,
    abort: Option<&AtomicBool>,
    readers: usize,
) -> Result<u64, LayerError> {
    let segs = segments(listing);
    let readers = readers.clamp(1, segs.len());
    let mut out = Counting { out, written: 0 };
    write_prologue(listing, owner, &mut out)?;

    let (record, verify) = match check {
        FileCheck::Off => (None, None),
        FileCheck::Record(v, identity) => (Some((v, identity)), None),
        FileCheck::Verify(v, splice) => (None, Some((v, splice))),
    };
    let recording = record.as_ref().map(|(_, identity)| *identity);
    let mut recorded: Recorded = Vec::new();

    let merged = std::thread::scope(|s| {
        let mut ends = Vec::with_capacity(readers);
        let mut handles = Vec::with_capacity(readers);
        for r in 0..readers {
            let (chunks, full, empty) = writer::channel_sized(CHUNK, POOL);
            ends.push((full, empty));
            let segs = &segs;
            handles.push(
                s.spawn(move || read_segments(listing, owner, segs, r, readers, chunks, recording, verify, abort)),
            );
        }
        let merged = merge(&mut out, ends, segs.len());
        let results: Vec<_> =
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect();
        (merged, results)
    });
    let (merged, results) = merged;

    // The cause, not its echoes: a reader's own failure (in segment order)
    // before the merge's view of it, and an output error before the readers
    // that stopped because of it.
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(mut v) => recorded.append(&mut v),
            Err(f) => failures.push(f),
        }
    }
    failures.sort_by_key(|(seg, e)| (matches!(e, LayerError::Output(_) | LayerError::Aborted), *seg));
    match merged {
        Err(Merge::Output(e)) => return Err(LayerError::Output(e)),
        Err(Merge::ReaderGone) => {
            return Err(failures.into_iter().next().map_or(LayerError::Aborted, |(_, e)| e));
        }
        Ok(()) => {
            if let Some((_, e)) = failures.into_iter().next() {
                return Err(e);
            }
        }
    }
    if let Some((v, _)) = record {
        recorded.sort_by_key(|(seg, _)| *seg);
        for (_, files) in recorded {
            v.extend(files);
        }
    }
    write_epilogue(&mut out)?;
    Ok(out.written)
}

/// Each rendered segment's index and its files' xxh3s.
type Recorded = Vec<(usize, Vec<u128>)>;
/// A reader's failure and the segment it happened in.
type Failure = (usize, LayerError);
/// The merging end of one reader's chunk channel: full chunks in, empty ones back.
type Ends = (Receiver<Piece>, Sender<Vec<u8>>);

/// Reader `r` of `readers`: renders segments r, r + readers, ... in turn,
/// each followed by an end marker; returns each segment's recorded xxh3s.
#[allow(clippy::too_many_arguments)]
fn read_segments(
    listing: &Listing,
    owner: &Owner,
    segs: &[Segment],
    r: usize,
    readers: usize,
    mut chunks: Chunks,
    recording: Option<Identity>,
    verify: Option<(&[u128], Option<Policy>)>,
    abort: Option<&AtomicBool>,
) -> Result<Recorded, Failure> {
    let mut scratch = Scratch::default();
    let mut recorded = Vec::new();
    for k in (r..segs.len()).step_by(readers) {
        let seg = &segs[k];
        let mut files = Vec::new();
        let check = match verify {
            Some((all, splice)) => FileCheck::Verify(all.get(seg.first_file..).unwrap_or(&[]), splice),
            None => match recording {
                Some(identity) => FileCheck::Record(&mut files, identity),
                None => FileCheck::Off,
            },
        };
        write_entries(listing, seg.entries.clone(), owner, &mut chunks, &mut scratch, check, abort)
            .map_err(|e| (k, e))?;
        chunks.end_part().map_err(|e| (k, LayerError::Output(e)))?;
        if recording.is_some() {
            recorded.push((k, files));
        }
    }
    Ok(recorded)
}

enum Merge {
    /// Writing to `out` failed.
    Output(std::io::Error),
    /// A reader stopped before its segment's end (its result says why).
    ReaderGone,
}

/// Copies the readers' chunks (and passes their files on) into `out` in
/// segment order.  Returns (and so drops every channel end, which stops the
/// readers) at the first failure.
fn merge<W: LayerOut>(out: &mut W, ends: Vec<Ends>, segments: usize) -> Result<(), Merge> {
    for k in 0..segments {
        let (full, empty) = &ends[k % ends.len()];
        loop {
            match full.recv() {
                Err(_) => return Err(Merge::ReaderGone),
                Ok(Piece::EndPart) => break,
                Ok(Piece::Bytes(mut chunk)) => {
                    out.write_all(&chunk).map_err(Merge::Output)?;
                    chunk.clear();
                    let _ = empty.send(chunk);
                }
                Ok(Piece::File(f)) => out.pass_file(*f).map_err(Merge::Output)?,
                Ok(Piece::Barrier) => unreachable!("readers send no barrier"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::layer::write_store_layer;
    use crate::store::walk::list_layer;
    use std::io::Write;

    /// A store path deep and wide enough for many segments of both kinds
    /// (cut by entries and by bytes), with symlinks and empty files.
    fn tree(root: &std::path::Path) -> std::path::PathBuf {
        let p = root.join("store/abc-pkg");
        for d in 0..6 {
            let dir = p.join(format!("d{d}/sub/deeper"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..300 {
                let len = if f % 97 == 0 { 3 << 20 } else { (f * 37 + d) % 5000 };
                std::fs::write(dir.join(format!("f{f}")), vec![(f + d) as u8; len]).unwrap();
            }
            std::os::unix::fs::symlink("sub", p.join(format!("d{d}/link"))).unwrap();
            std::fs::write(p.join(format!("d{d}/empty")), b"").unwrap();
        }
        p
    }

    #[test]
    fn same_bytes_and_file_hashes_as_one_thread_whatever_the_readers() {
        let d = tempfile::tempdir().unwrap();
        let listing = list_layer(&[tree(d.path())], 2).unwrap();
        assert!(segments(&listing).len() > 8, "the tree spans many segments");
        let mut want = Vec::new();
        let mut want_files = Vec::new();
        let n = write_store_layer(
            &listing,
            &Owner::test_root(),
            &mut want,
            &mut Scratch::default(),
            FileCheck::Record(&mut want_files, Identity::Checked),
            None,
        )
        .unwrap();
        assert_eq!(n, want.len() as u64);
        for readers in [1, 2, 3, 7] {
            let mut got = Vec::new();
            let mut files = Vec::new();
            let n = render_layer(
                &listing,
                &Owner::test_root(),
                &mut got,
                FileCheck::Record(&mut files, Identity::Checked),
                None,
                readers,
            )
            .unwrap();
            assert_eq!(n, got.len() as u64);
            assert!(got == want, "{readers} readers: other bytes");
            assert_eq!(files, want_files, "{readers} readers");
            let mut again = Vec::new();
            render_layer(
                &listing,
                &Owner::test_root(),
                &mut again,
                FileCheck::Verify(&want_files, None),
                None,
                readers,
            )
            .unwrap();
            assert!(again == want);
        }
    }

    #[test]
    fn segments_cover_every_entry_once_and_count_files() {
        let d = tempfile::tempdir().unwrap();
        let listing = list_layer(&[tree(d.path())], 2).unwrap();
        let segs = segments(&listing);
        let mut next = 0;
        let mut files = 0;
        for s in &segs {
            assert_eq!(s.entries.start, next);
            assert_eq!(s.first_file, files);
            assert!(!s.entries.is_empty());
            files += listing.entries[s.entries.clone()].iter().filter(|e| e.kind == Kind::File).count();
            next = s.entries.end;
        }
        assert_eq!(next, listing.entries.len());
    }

    #[test]
    fn a_changed_file_in_a_late_segment_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = tree(d.path());
        let listing = list_layer(std::slice::from_ref(&p), 2).unwrap();
        let mut files = Vec::new();
        render_layer(
            &listing,
            &Owner::test_root(),
            &mut std::io::sink(),
            FileCheck::Record(&mut files, Identity::Unchecked),
            None,
            2,
        )
        .unwrap();
        let victim = p.join("d5/sub/deeper/f250");
        let len = std::fs::metadata(&victim).unwrap().len() as usize;
        let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&victim).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xEE; len], 0).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let e =
            render_layer(&listing, &Owner::test_root(), &mut std::io::sink(), FileCheck::Verify(&files, None), None, 2)
                .unwrap_err();
        assert!(e.to_string().contains("d5/sub/deeper/f250"), "{e}");
        assert!(e.to_string().contains("differs from the hashing pass"), "{e}");
    }

    #[test]
    fn an_output_error_stops_every_reader() {
        struct Failing(usize);
        impl LayerOut for Failing {}
        impl Write for Failing {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.0 < buf.len() {
                    return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed"));
                }
                self.0 -= buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let d = tempfile::tempdir().unwrap();
        let listing = list_layer(&[tree(d.path())], 2).unwrap();
        let e =
            render_layer(&listing, &Owner::test_root(), &mut Failing(5 << 20), FileCheck::Off, None, 3).unwrap_err();
        assert!(matches!(&e, LayerError::Output(io) if io.kind() == std::io::ErrorKind::BrokenPipe), "{e}");
    }
}
