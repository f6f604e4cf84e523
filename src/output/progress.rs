//! Progress on stderr: a bar on a terminal (layers done, bytes, rate), the
//! reference's plain lines otherwise (so build logs read as they did with
//! nixpkgs' script), nothing with `--quiet`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quiet,
    Plain,
    Bar,
}

impl Mode {
    /// Bar on a terminal, plain lines otherwise, unless quiet.
    pub fn detect(quiet: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Plain
        }
    }
}

pub struct Progress {
    mode: Mode,
    bar: Option<ProgressBar>,
    known_bytes: AtomicU64,
}

impl Progress {
    pub fn new(mode: Mode, layers: usize) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} layer {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {elapsed} (ETA {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(format!("0/{layers}"));
            b
        });
        Progress { mode, bar, known_bytes: AtomicU64::new(0) }
    }

    /// A plain line, the reference's wording.
    pub fn line(&self, text: impl FnOnce() -> String) {
        if self.mode == Mode::Plain {
            let _ = writeln!(std::io::stderr(), "{}", text());
        }
    }

    /// A layer's size became known (hashing pass).
    pub fn sized(&self, bytes: u64) {
        let total = self.known_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    /// Bytes written to the output.
    pub fn wrote(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            // Member headers, the config and the manifest are not in the
            // layer sizes; never show more written than the total.
            if b.length().is_some_and(|l| b.position() > l) {
                b.set_length(b.position());
            }
        }
    }

    pub fn layer_done(&self, done: usize, total: usize) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{done}/{total}"));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A byte count for people: `512 B`, `1.5 MiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
