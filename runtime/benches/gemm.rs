//! Matrix product GFLOP/s of the CPU backend (a one-matmul program through
//! the executor, output left in its arena) against numpy (OpenBLAS, into a
//! preallocated `out`) with the same number of threads, measured in the
//! same run: `cargo bench -p modelc-runtime --bench gemm`.
//! Needs `python3` with numpy; medians of repeated runs.

mod common;

use common::median;
use modelc::ir::graph::Graph;
use modelc::types::DType;
use modelc::types::Dim;
use modelc::types::TensorTy;
use modelc_runtime::cpu::{Program, Tensor, bind};
use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

fn ours(n: usize, reps: usize) -> f64 {
    let mut g = Graph::default();
    let ty = TensorTy::new(DType::F32, vec![Dim::constant(n as i64), Dim::constant(n as i64)]);
    let a = g.input("a", ty.clone());
    let b = g.input("b", ty);
    let c = g.matmul(a, b);
    g.outputs.push(("c".into(), c));
    let data: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let feeds: HashMap<String, Tensor> =
        ["a", "b"].iter().map(|k| (k.to_string(), Tensor::new(vec![n, n], data.clone()))).collect();
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let program = Program::compile(&g, &bind(&g, &shapes).expect("sizes")).expect("compiles");
    program.run(&feeds).expect("runs");
    // The product alone, into the arena (numpy writes into a preallocated `out` too).
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                program.run_kernels(&feeds).expect("runs");
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn numpy(n: usize, reps: usize, threads: usize) -> Option<f64> {
    let script = format!(
        "import numpy as np, time\n\
         a = np.random.rand({n}, {n}).astype(np.float32); b = np.random.rand({n}, {n}).astype(np.float32)\n\
         c = a @ b\n\
         ts = []\n\
         for _ in range({reps}):\n    t = time.perf_counter(); np.matmul(a, b, out=c); ts.append(time.perf_counter() - t)\n\
         print(sorted(ts)[len(ts) // 2])\n"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        // Older-OpenBLAS workarounds set on some machines slow current numpy.
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("matmul n x n x n, {threads} threads: GFLOP/s (median)");
    for (n, reps) in [(256, 50), (1024, 10), (4096, 3)] {
        let flops = 2.0 * (n as f64).powi(3);
        let t = ours(n, reps);
        match numpy(n, reps, threads) {
            Some(np) => println!(
                "  {n:>4}: modelc {:7.1}   numpy {:7.1}   ratio {:.2}",
                flops / t / 1e9,
                flops / np / 1e9,
                np / t
            ),
            None => println!("  {n:>4}: modelc {:7.1}   (numpy not importable)", flops / t / 1e9),
        }
    }
}
