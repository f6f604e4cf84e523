//! What a layer producer writes into, shared by every pass and output
//! without depending on any of them: the [`LayerOut`] trait, a file passed
//! on by reference ([`FileRef`], for splicing), and the error a writer
//! thread that stopped leaves behind ([`WriterGone`]).  Each output
//! implements `LayerOut` beside its own type.

use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

use crate::store::walk::Seen;

/// A file whose bytes go into the output by reference: the reader checked
/// it on opening; the writer thread splices it and checks it again later.
#[derive(Debug)]
pub struct FileRef {
    pub fd: OwnedFd,
    pub len: u64,
    pub path: PathBuf,
    pub seen: Seen,
}

/// Why a chunk could not be sent: the writer stopped (its own error says why).
#[derive(Debug, thiserror::Error)]
#[error("the output writer stopped")]
pub struct WriterGone;

/// A layer producer's output.  Where it has a buffer of its own (the chunks
/// of [`crate::output::writer`]), file data is read straight into it, saving a copy
/// of every byte; elsewhere the producer reads into its scratch buffer and
/// writes.
pub trait LayerOut: Write {
    /// Reads up to `max` bytes of `fd` into the output as its next bytes and
    /// returns them (empty at the end of the file); `None` when the output
    /// has no buffer of its own.
    fn read_into(&mut self, _fd: BorrowedFd<'_>, _max: usize) -> Option<io::Result<&[u8]>> {
        None
    }

    /// Passes `file`'s bytes on by reference, as the output's next bytes.
    /// Only outputs that end in a [`crate::output::splice::Splicer`] can.
    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        Err(io::Error::other(format!("{}: this output cannot take a file by reference", file.path.display())))
    }
}

impl<T: LayerOut + ?Sized> LayerOut for &mut T {
    fn read_into(&mut self, fd: BorrowedFd<'_>, max: usize) -> Option<io::Result<&[u8]>> {
        (**self).read_into(fd, max)
    }

    fn pass_file(&mut self, file: FileRef) -> io::Result<()> {
        (**self).pass_file(file)
    }
}

impl LayerOut for Vec<u8> {}
impl LayerOut for io::Sink {}
