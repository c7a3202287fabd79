//! bf16 matrix products (`--precision bf16`) against the f32 ones (gemm) on
//! the shapes of a training step at the stories15M shape (8 x 256 tokens,
//! dim 288, hidden 768, vocab 32000 in row chunks of 256), alternating the
//! two in one run: `cargo bench -p modelc-runtime --bench bf16`.
//! Prints medians, GFLOP/s and the ratio; the peak is 2x f32's where the
//! CPU has AVX512_BF16.

use modelc_runtime::cpu::{bf16, packed};
use std::time::Instant;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("{threads} threads, AVX512_BF16: {}", bf16::hardware());
    println!("{:>28} {:>10} {:>10} {:>7}", "m x n x k (ta, tb)", "f32 GF/s", "bf16 GF/s", "ratio");
    let shapes = [
        (2048, 288, 288, false, true),
        (2048, 768, 288, false, true),
        (2048, 288, 768, false, true),
        (2048, 288, 768, false, false),
        (2048, 768, 288, false, false),
        (288, 288, 2048, true, false),
        (288, 768, 2048, true, false),
        (768, 288, 2048, true, false),
        (256, 32000, 288, false, true),
        (256, 288, 32000, false, false),
        (288, 32000, 256, true, false),
        (256, 32000, 288, false, false),
        (256, 4096, 288, false, true),
        (256, 4096, 288, false, false),
    ];
    let (mut f32_total, mut bf16_total) = (0.0, 0.0);
    for (m, n, k, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut c = vec![0f32; m * n];
        let ao = if ta { (a.as_ptr(), 1, m) } else { (a.as_ptr(), k, 1) };
        let bo = if tb { (b.as_ptr(), 1, k) } else { (b.as_ptr(), n, 1) };
        let (mut tf, mut tb16) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            let t = Instant::now();
            // SAFETY: the operands and c cover their shapes.
            unsafe { packed::gemm_product((m, n, k), c.as_mut_ptr(), n, ao, bo) };
            tf.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { bf16::product((m, n, k), c.as_mut_ptr(), n, 0.0, ao, bo, true) };
            tb16.push(t.elapsed().as_secs_f64());
        }
        let (f, h) = (median(tf), median(tb16));
        f32_total += f;
        bf16_total += h;
        let flops = 2.0 * (m * n * k) as f64;
        println!(
            "{:>28} {:>10.1} {:>10.1} {:>6.2}x",
            format!("{m} x {n} x {k} ({}, {})", ta as u8, tb as u8),
            flops / f / 1e9,
            flops / h / 1e9,
            f / h
        );
    }
    println!(
        "all shapes: f32 {:.1} ms, bf16 {:.1} ms, {:.2}x",
        f32_total * 1e3,
        bf16_total * 1e3,
        f32_total / bf16_total
    );
}
