//! The optimiser's step alone (global-norm clipping, then AdamW) over the
//! parameters of the Mixtral shape `benches/moe.py` trains (dim 256, 4
//! layers, 8 experts of hidden 896, vocab 512: 23.1M parameters in 127
//! tensors), against a copy, in the same run: `cargo bench -p
//! modelc-runtime --bench update`. AdamW reads each parameter's gradient,
//! two moments and weight and writes three back, so at least 7 x 4 bytes a
//! parameter move; the copy moves 2 x 4. Prints medians, the effective
//! bandwidth of each and the kernels the update takes.

mod common;

use common::time;
use modelc::ir::train::{TrainConfig, update_program};
use modelc::types::{DType, Dim, TensorTy};
use modelc_runtime::cpu::{Program, Tensor, bind};
use rayon::prelude::*;
use std::collections::HashMap;

/// Mixtral's parameter shapes at the benchmark's size.
fn shapes() -> Vec<(String, Vec<usize>)> {
    let (dim, kv, hidden, experts, vocab) = (256, 128, 896, 8, 512);
    let mut out = vec![("embed".to_string(), vec![vocab, dim])];
    for l in 0..4 {
        for (name, shape) in
            [("q", [dim, dim]), ("k", [kv, dim]), ("v", [kv, dim]), ("o", [dim, dim]), ("router", [experts, dim])]
        {
            out.push((format!("{l}.{name}"), shape.to_vec()));
        }
        for e in 0..experts {
            out.push((format!("{l}.{e}.w1"), vec![hidden, dim]));
            out.push((format!("{l}.{e}.w2"), vec![dim, hidden]));
            out.push((format!("{l}.{e}.w3"), vec![hidden, dim]));
        }
        out.push((format!("{l}.norm1"), vec![dim]));
        out.push((format!("{l}.norm2"), vec![dim]));
    }
    out.push(("norm".to_string(), vec![dim]));
    out.push(("head".to_string(), vec![vocab, dim]));
    out
}

fn main() {
    let params = shapes();
    let count: usize = params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let typed: Vec<(String, TensorTy)> = (params.iter())
        .map(|(n, s)| (n.clone(), TensorTy::new(DType::F32, s.iter().map(|&d| Dim::constant(d as i64)).collect())))
        .collect();
    // Optimised, as `train --grad-accum` runs it (unoptimised, its clipping
    // ran apart from the updates and no row groups formed: 73 ms, not 44).
    let g = modelc::opt::optimized(&update_program(&typed, &TrainConfig { clip: Some(1.0), ..Default::default() }));
    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, shape)) in params.iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = |salt: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|j| (((j * 7919 + i * 104729 + salt) % 1000) as f32 / 1000.0 - 0.5) * scale).collect()
        };
        feeds.insert(name.clone(), Tensor::new(shape.clone(), values(1, 0.1)));
        feeds.insert(format!("grad:{name}"), Tensor::new(shape.clone(), values(2, 1e-3)));
        feeds.insert(format!("m:{name}"), Tensor::new(shape.clone(), values(3, 1e-4)));
        feeds
            .insert(format!("v:{name}"), Tensor::new(shape.clone(), values(4, 1e-6).iter().map(|x| x.abs()).collect()));
    }
    feeds.insert("lr".into(), Tensor::new(vec![], vec![1e-4]));
    feeds.insert("step".into(), Tensor::new(vec![], vec![3.0]));
    let sizes_of = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let program = bind(&g, &sizes_of).and_then(|s| Program::compile(&g, &s)).expect("compiles");
    // Weights and moments are written over in place, as a training loop keeps them.
    let mut state: HashMap<String, Tensor> =
        program.state().iter().map(|n| (n.clone(), feeds.remove(n).expect("a state input"))).collect();
    let mut outputs = HashMap::new();
    let update = time(11, || program.run_state(&feeds, &mut state, &mut outputs).expect("runs"));
    let src = vec![1f32; count];
    let mut dst = vec![0f32; count];
    let copy =
        time(11, || dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s)));
    let gbs = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
    println!("{} threads, {count} parameters in {} tensors", rayon::current_num_threads(), params.len());
    println!("copy   {:>8.2} ms {:>6.1} GB/s", copy * 1e3, gbs(8 * count, copy));
    println!(
        "update {:>8.2} ms {:>6.1} GB/s ({} kernels; {:.2}x the copy's time for 3.5x its bytes)",
        update * 1e3,
        gbs(28 * count, update),
        program.schedule().kernels.len(),
        update / copy
    );
}
