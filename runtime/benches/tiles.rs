//! The CPU's matrix products on the shapes of a training step at the
//! stories15M shape (8 x 256 tokens, dim 288, hidden 768, vocab 32000 in
//! row chunks of 256) and of MiniLM embedding batches (dim 384, hidden
//! 1536, 256 to 2048 tokens): the `gemm` crate's f32 products (what runs
//! without AVX-512) against `tiles.rs`'s f32 and bf16 products (`vdpbf16ps`,
//! and AMX tiles where the host has them), alternating in one run:
//! `cargo bench -p modelc-runtime --bench tiles`.
//! Prints medians in GFLOP/s and the ratios to gemm; the f32 peak of the
//! 2-core Zen 4 VM the docs quote is ~235 GFLOP/s, bf16's twice that.

mod common;

use common::median;
use modelc_runtime::cpu::{packed, tiles};
use std::time::Instant;

fn main() {
    let threads = rayon::current_num_threads();
    let (f32_tiles, bf16_tiles, amx) = (tiles::f32_hardware(), tiles::bf16_hardware(), tiles::amx_hardware());
    println!("{threads} threads, AVX-512: {f32_tiles}, AVX512_BF16: {bf16_tiles}, AMX: {amx}");
    println!(
        "{:>28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11}",
        "m x n x k (ta, tb)",
        "gemm",
        "f32",
        "f32 kept",
        "bf16",
        "AMX",
        "f32/gemm",
        "kept/gemm",
        "bf16/gemm",
        "AMX/gemm"
    );
    let shapes = [
        (2048, 288, 288, false, true),
        (2048, 768, 288, false, true),
        (2048, 288, 768, false, true),
        (2048, 288, 768, false, false),
        (288, 768, 2048, true, false),
        (256, 32000, 288, false, true),
        (256, 288, 32000, false, false),
        (288, 32000, 256, true, false),
        (256, 384, 384, false, true),
        (768, 384, 384, false, true),
        (768, 1536, 384, false, true),
        (768, 384, 1536, false, true),
        (2048, 384, 1536, false, true),
        // A 256-token prompt at the stories15M and stories110M shapes.
        (256, 288, 288, false, true),
        (256, 768, 288, false, true),
        (256, 288, 768, false, true),
        (256, 768, 768, false, true),
        (256, 2048, 768, false, true),
        (256, 768, 2048, false, true),
    ];
    let mut totals = [0.0; 5];
    for (m, n, k, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut c = vec![0f32; m * n];
        let ao = if ta { (a.as_ptr(), 1, m) } else { (a.as_ptr(), k, 1) };
        let bo = if tb { (b.as_ptr(), 1, k) } else { (b.as_ptr(), n, 1) };
        // The weight packed once, as programs with fixed weights keep it.
        // SAFETY: b covers k x n at its strides.
        let kept = f32_tiles.then(|| unsafe { tiles::PackedB::new(bo, k, n, true, tiles::Kind::F32) });
        let mut times: [Vec<f64>; 5] = Default::default();
        for _ in 0..9 {
            for (way, t) in times.iter_mut().enumerate() {
                let kind = match way {
                    1 if f32_tiles => tiles::Kind::F32,
                    2 if let Some(w) = &kept => {
                        let start = Instant::now();
                        // SAFETY: a and c cover their shapes; w is b packed.
                        unsafe { tiles::product_packed(m, c.as_mut_ptr(), n, 0.0, ao, w, true) };
                        t.push(start.elapsed().as_secs_f64());
                        continue;
                    }
                    3 if bf16_tiles => tiles::Kind::Bf16,
                    3 => tiles::Kind::Bf16Portable,
                    4 if amx => tiles::Kind::Amx,
                    4 => {
                        t.push(f64::NAN);
                        continue;
                    }
                    _ => {
                        let start = Instant::now();
                        // SAFETY: the operands and c cover their shapes.
                        unsafe { packed::gemm_product((m, n, k), c.as_mut_ptr(), n, ao, bo) };
                        t.push(start.elapsed().as_secs_f64());
                        continue;
                    }
                };
                let start = Instant::now();
                // SAFETY: as above; `kind` is one this host has.
                unsafe { tiles::product((m, n, k), c.as_mut_ptr(), n, 0.0, ao, bo, true, kind) };
                t.push(start.elapsed().as_secs_f64());
            }
        }
        let t = times.map(median);
        totals.iter_mut().zip(&t).for_each(|(total, t)| *total += t);
        let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{:>28} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2}x {:>10.2}x {:>10.2}x {:>10.2}x",
            format!("{m} x {n} x {k} ({}, {})", ta as u8, tb as u8),
            gflops(t[0]),
            gflops(t[1]),
            gflops(t[2]),
            gflops(t[3]),
            gflops(t[4]),
            t[0] / t[1],
            t[0] / t[2],
            t[0] / t[3],
            t[0] / t[4]
        );
    }
    println!(
        "all shapes: gemm {:.1} ms, f32 tiles {:.1} ms ({:.2}x), kept {:.1} ms ({:.2}x), bf16 tiles {:.1} ms ({:.2}x), AMX {:.1} ms ({:.2}x)",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[0] / totals[1],
        totals[2] * 1e3,
        totals[0] / totals[2],
        totals[3] * 1e3,
        totals[0] / totals[3],
        totals[4] * 1e3,
        totals[0] / totals[4]
    );
}
