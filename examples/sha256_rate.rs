//! Prints the single-core sha256 rate of the `sha2` crate on this machine
//! (MB/s, 10^6 bytes), as used by scripts/bench for the throughput floor,
//! and on a second line the xxh3-128 rate (the streaming pass's per-file
//! check), so the benchmark can state what that check costs.

use sha2::{Digest, Sha256};
use std::time::Instant;

fn best_rate(buf: &[u8], f: impl Fn(&[u8])) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f(buf);
        best = best.min(t.elapsed().as_secs_f64());
    }
    buf.len() as f64 / best / 1e6
}

fn main() {
    let buf: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let sha = best_rate(&buf, |b| {
        let mut h = Sha256::new();
        h.update(b);
        std::hint::black_box(h.finalize());
    });
    let xxh = best_rate(&buf, |b| {
        std::hint::black_box(xxhash_rust::xxh3::xxh3_128(b));
    });
    println!("{sha:.0}");
    println!("{xxh:.0}");
}
