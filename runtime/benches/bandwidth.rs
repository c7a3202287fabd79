//! Memory bandwidth of fused row operations against a plain copy, in the
//! same run and on the same threads: `cargo bench -p modelc-runtime --bench
//! bandwidth`. Softmax, RMSNorm, GELU and a log over rows of 1024 floats, 16384 rows
//! (64 MiB in, 64 MiB out: beyond the caches). Effective bandwidth counts the
//! bytes the operation must move at least (read x once, write y once); the
//! kernels are timed without copying the output out of the arena. Names
//! given after `--` keep only those operations (`-- softmax rmsnorm`);
//! `ROWS=512` sets the row count (512 rows: in cache).

mod common;

use common::time;
use modelc::check::{self, LowerOptions, Options};
use modelc_runtime::cpu::{Program, Tensor, bind};
use rayon::prelude::*;
use std::collections::HashMap;

const WIDTH: usize = 1024;

fn program(name: &str, body: &str, rows: usize) -> (Program, HashMap<String, Tensor>) {
    let text = format!("model {name}() {{\n    forward(x: [R, N]) -> y: [R, N] = {body}\n}}\n");
    let program = check::load_source("bench.model", &text, None).unwrap_or_else(|_| panic!("{name} loads"));
    let (_, g) = check::lower(&program, &Options::default(), LowerOptions::default()).expect("checks");
    let (g, _) = modelc::opt::optimize(&modelc::ir::prune::prune(&g), modelc::opt::Limits::default());
    let x: Vec<f32> = (0..rows * WIDTH).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let feeds: HashMap<String, Tensor> = [("x".to_string(), Tensor::new(vec![rows, WIDTH], x))].into_iter().collect();
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let compiled = bind(&g, &shapes).and_then(|s| Program::compile(&g, &s)).expect("compiles");
    (compiled, feeds)
}

fn main() {
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rows: usize = std::env::var("ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(16384);
    let bytes = (2 * rows * WIDTH * 4) as f64;
    let src: Vec<f32> = vec![1.0; rows * WIDTH];
    let mut dst: Vec<f32> = vec![0.0; rows * WIDTH];
    let copy = time(15, || {
        dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    println!(
        "{} threads, [{rows}, {WIDTH}] f32; effective GB/s = (read x + write y) / time",
        rayon::current_num_threads()
    );
    println!("{:<10} {:>9} {:>8} {:>9}", "", "ms", "GB/s", "vs copy");
    println!("{:<10} {:>9.2} {:>8.1} {:>8.2}x", "copy", copy * 1e3, bytes / copy / 1e9, 1.0);
    for (name, body) in [
        ("softmax", "softmax(x, axis: -1)"),
        ("rmsnorm", "x * rsqrt(mean(x * x, axis: -1, keep: true) + 1e-5)"),
        ("gelu", "gelu(x)"),
        ("log", "log(x * x + 1.0)"),
    ] {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let (p, feeds) = program(name, body, rows);
        let t = time(15, || {
            p.run_kernels(&feeds).expect("runs");
        });
        println!("{name:<10} {:>9.2} {:>8.1} {:>8.2}x", t * 1e3, bytes / t / 1e9, copy / t);
    }
}
