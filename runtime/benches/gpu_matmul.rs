//! GEMM GFLOP/s of the WGSL backend (`cargo bench -p modelc-runtime --bench
//! gpu_matmul -- 4096`): kernels alone, inputs uploaded once. Run by
//! `benches/gpu.sh` on machines with a GPU; on lavapipe it measures the CPU.

use modelc::ir::graph::Graph;
use modelc::types::DType;
use modelc::types::{Dim, TensorTy};
use modelc_runtime::cpu::Tensor;
use modelc_runtime::gpu::{GpuProgram, gpu};
use std::collections::HashMap;

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![256, 1024] } else { sizes };
    let device = match gpu() {
        Ok(g) => g.name.clone(),
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    for n in sizes {
        let d = Dim::constant(n as i64);
        let mut g = Graph::default();
        let a = g.input("a", TensorTy::new(DType::F32, vec![d.clone(), d.clone()]));
        let b = g.input("b", TensorTy::new(DType::F32, vec![d.clone(), d.clone()]));
        let c = g.matmul(a, b);
        g.outputs.push(("c".into(), c));
        let program = GpuProgram::compile(&g, &Default::default()).expect("compiles");
        let data: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let feeds: HashMap<String, Tensor> =
            ["a", "b"].into_iter().map(|k| (k.to_string(), Tensor::new(vec![n, n], data.clone()))).collect();
        let repeats = (2e11 / (2.0 * (n as f64).powi(3))).clamp(1.0, 50.0) as usize;
        let mut times: Vec<f64> = (0..3).map(|_| program.time_kernels(&feeds, repeats).expect("runs")).collect();
        times.sort_by(f64::total_cmp);
        let gflops = 2.0 * (n as f64).powi(3) / times[1] / 1e9;
        println!("matmul {n}^3 on {device}: {gflops:.1} GFLOP/s (median of 3, {repeats} runs each)");
    }
}
