//! The compressor floor for scripts/bench: the best wall time (of three)
//! that nixstream's layer compressor (`engine::compress`, the same pinned
//! parameters, every core) takes over a file's bytes held in memory, with
//! no reading, hashing or output.
//!
//! Usage: compress_floor gzip|zstd FILE THREADS

use std::io::Write;
use std::time::Instant;

use nixstream::engine::compress::Encoder;
use nixstream::engine::image::Compression;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let c = match args.get(1).map(String::as_str) {
        Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        _ => panic!("usage: compress_floor gzip|zstd FILE THREADS"),
    };
    let data = std::fs::read(&args[2]).expect("read the input file");
    let threads: usize = args[3].parse().expect("threads");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut e = Encoder::new(std::io::sink(), c, threads).unwrap();
        for piece in data.chunks(1 << 20) {
            e.write_all(piece).unwrap();
        }
        e.finish().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{best:.3}");
}
