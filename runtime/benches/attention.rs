//! Causal attention on the CPU: the fused operation (online softmax, never
//! storing the scores, key blocks past the diagonal skipped) against its
//! decomposition through the optimiser and the usual kernels (what training
//! runs: scores and probabilities stored, in row groups) and against
//! PyTorch's `scaled_dot_product_attention` with the same thread count,
//! measured in the same run: `cargo bench -p modelc-runtime --bench attention`.
//! LLaMA-like heads: 8 query heads sharing 2 key/value heads (GQA), head
//! size 64, batch 1. Needs `python3` with torch for the peer column; medians
//! of repeated runs; planned activation memory of each program.

use modelc::check::dim::Dim;
use modelc::check::types::TensorTy;
use modelc::ir::graph::{Attention, Graph};
use modelc::syntax::ast::DType;
use modelc_runtime::cpu::{Program, Tensor, bind};
use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

const HEADS: usize = 8;
const GROUPS: usize = 2;
const HEAD: usize = 64;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    xs[xs.len() / 2]
}

/// Seconds a run (median) and planned bytes of attention over t tokens.
fn ours(t: usize, window: Option<i64>, fused: bool, reps: usize) -> (f64, usize) {
    let d = |x: usize| Dim::constant(x as i64);
    let mut g = Graph::default();
    let q = g.input("q", TensorTy::new(DType::F32, vec![d(1), d(t), d(HEADS), d(HEAD)]));
    let k = g.input("k", TensorTy::new(DType::F32, vec![d(1), d(t), d(GROUPS), d(HEAD)]));
    let v = g.input("v", TensorTy::new(DType::F32, vec![d(1), d(t), d(GROUPS), d(HEAD)]));
    let offset = g.constant(0.0, DType::Int);
    let spec = Attention { scale: 1.0 / (HEAD as f64).sqrt(), causal: true, window, kv_heads_first: false };
    let y = if fused {
        g.attention(spec, &[q, k, v, offset])
    } else {
        modelc::ir::attention::decompose(&mut g, &spec, &[q, k, v, offset])
    };
    g.outputs.push(("y".into(), y));
    let g = modelc::opt::optimize(&modelc::ir::prune::prune(&g), modelc::opt::Limits::default()).0;
    let data = |n: usize, salt: usize| (0..n).map(|i| (((i + salt) * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let feeds: HashMap<String, Tensor> = HashMap::from([
        ("q".to_string(), Tensor::new(vec![1, t, HEADS, HEAD], data(t * HEADS * HEAD, 0))),
        ("k".to_string(), Tensor::new(vec![1, t, GROUPS, HEAD], data(t * GROUPS * HEAD, 1))),
        ("v".to_string(), Tensor::new(vec![1, t, GROUPS, HEAD], data(t * GROUPS * HEAD, 2))),
    ]);
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let program = Program::compile(&g, &bind(&g, &shapes).expect("sizes")).expect("compiles");
    program.run_kernels(&feeds).expect("runs");
    let time = median(
        (0..reps)
            .map(|_| {
                let started = Instant::now();
                program.run_kernels(&feeds).expect("runs");
                started.elapsed().as_secs_f64()
            })
            .collect(),
    );
    (time, program.peak_bytes())
}

fn torch(t: usize, window: Option<i64>, reps: usize, threads: usize) -> Option<f64> {
    // A sliding window is an explicit boolean mask for PyTorch.
    let call = match window {
        None => "F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)".to_string(),
        Some(w) => {
            format!("F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - {w}), enable_gqa=True)")
        }
    };
    let script = format!(
        "import torch, time\nimport torch.nn.functional as F\ntorch.set_num_threads({threads})\n\
         q = torch.rand(1, {HEADS}, {t}, {HEAD}); k = torch.rand(1, {GROUPS}, {t}, {HEAD}); v = torch.rand(1, {GROUPS}, {t}, {HEAD})\n\
         i = torch.arange({t})[:, None]; j = torch.arange({t})[None, :]\n\
         with torch.no_grad():\n    {call}\n    ts = []\n    for _ in range({reps}):\n        s = time.perf_counter(); {call}; ts.append(time.perf_counter() - s)\n\
         print(sorted(ts)[len(ts) // 2])\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() {
    let threads = rayon::current_num_threads();
    println!(
        "causal attention, batch 1, {HEADS} heads sharing {GROUPS} key/value heads, head size {HEAD}, {threads} threads (median ms; planned MiB)"
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for (t, window, reps) in [(256, None, 30), (1024, None, 10), (4096, None, 3), (4096, Some(512), 3)] {
        let (fused, fused_bytes) = ours(t, window, true, reps);
        let (stored, stored_bytes) = ours(t, window, false, reps);
        let label = match window {
            Some(w) => format!("T {t}, window {w}"),
            None => format!("T {t}"),
        };
        let peer = match torch(t, window, reps, threads) {
            Some(p) => format!("   torch {:8.2}   torch/fused {:.2}x", p * 1e3, p / fused),
            None => "   (torch not importable)".to_string(),
        };
        println!(
            "  {label:<18} fused {:8.2} ({:6.1} MiB)   decomposed {:8.2} ({:6.1} MiB)   decomposed/fused {:.2}x{peer}",
            fused * 1e3,
            mib(fused_bytes),
            stored * 1e3,
            mib(stored_bytes),
            stored / fused
        );
    }
}
