//! Matrix-vector products (one row against weight rows, as decoding reads
//! every Linear layer): GB/s of weights read for each format, on one thread
//! and on all, against gemm on f32, at LLaMA stories15M/110M layer and
//! output shapes: `cargo bench -p modelc-runtime --bench matvec [-- FORMAT]`.
//! Every product reads a copy of its weights that has not been read for
//! 256 MiB (more than the caches hold), as decoding a large model does;
//! the ways are alternated run by run; medians. The pool's threads are
//! kept awake between products (`cpu::warm`), as while a program runs.

mod common;

use common::median;
use modelc_runtime::cpu::packed::{self, Format, Packed, Rhs};
use std::time::Instant;

fn main() {
    // As a program runs: the pool's threads awake between products.
    modelc_runtime::cpu::warm(products);
}

fn products() {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    for (n, k) in [(288, 288), (768, 288), (768, 768), (2048, 768), (768, 2048), (32000, 288), (32000, 768)] {
        let copies =
            std::env::var("COPIES").map(|c| c.parse().unwrap()).unwrap_or(((256usize << 20) / (n * k * 4)).max(4));
        let w: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..n * k).map(|i| (((i + c) * 7919) % 1000) as f32 / 1000.0 - 0.5).collect())
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 / 13.0).collect();
        let mut y = vec![0f32; n];
        for format in [Format::F32, Format::Bf16, Format::Q8, Format::Q4] {
            if filter.as_deref().is_some_and(|f| f != format.name()) {
                continue;
            }
            let packs: Vec<Packed> = if format == Format::F32 {
                Vec::new()
            } else {
                w.iter().map(|w| Packed::new(format, w, n, k)).collect()
            };
            // One thread, all threads, gemm (f32 only), in turn.
            let ways = if format == Format::F32 { 3 } else { 2 };
            let mut times = vec![Vec::new(); ways];
            let reps = copies.max(60).div_ceil(ways) * ways;
            for r in 0..reps {
                let (way, c) = (r % ways, r % copies);
                let t = Instant::now();
                // SAFETY: x is 1 x k, y 1 x n, the weights n x k.
                unsafe {
                    if way == 2 {
                        packed::gemm_product((1, n, k), y.as_mut_ptr(), n, (x.as_ptr(), k, 1), (w[c].as_ptr(), 1, k))
                    } else {
                        let rhs = match format {
                            Format::F32 => Rhs::Dense((w[c].as_ptr(), 1, k)),
                            _ => Rhs::Packed(&packs[c]),
                        };
                        packed::product((1, n, k), y.as_mut_ptr(), n, 0.0, (x.as_ptr(), k, 1), rhs, way == 1, None)
                    }
                }
                times[way].push(t.elapsed().as_secs_f64());
            }
            let bytes = n as f64 * k as f64 * format.bytes_per_weight();
            print!("{n:>6} x {k:<5} {:>4}:", format.name());
            for (way, t) in times.into_iter().enumerate() {
                let t = median(t);
                let how = ["1 thread", "all threads", "gemm f32"][way];
                print!("  {how} {:7.1} us {:5.1} GB/s", t * 1e6, bytes / t / 1e9);
            }
            println!();
        }
    }
}
