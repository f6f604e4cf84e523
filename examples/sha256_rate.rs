//! Prints the single-core sha256 rate of the `sha2` crate on this machine
//! (MB/s, 10^6 bytes), as used by scripts/bench for the throughput floor.

use sha2::{Digest, Sha256};
use std::time::Instant;

fn main() {
    let buf: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut h = Sha256::new();
        h.update(&buf);
        std::hint::black_box(h.finalize());
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{:.0}", buf.len() as f64 / best / 1e6);
}
