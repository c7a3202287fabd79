//! Causal attention on the CPU: the fused operation (online softmax, never
//! storing the scores, key blocks past the diagonal skipped) against its
//! decomposition through the optimiser and the usual kernels (scores and
//! probabilities stored, softmax in row groups) and against PyTorch's
//! `scaled_dot_product_attention` with the same thread count, measured in
//! the same run; then forward and backward (the fused backward's passes
//! against autodiff through the decomposition, PyTorch's `backward`):
//! `cargo bench -p modelc-runtime --bench attention`.
//! LLaMA-like heads: 8 query heads sharing 2 key/value heads (GQA), head
//! size 64, batch 1; and the attention shapes of the forward bench's small
//! models, and a 256-token prompt's at the stories15M and stories110M
//! shapes (`-- --prompt`: those alone). Needs `python3` with torch for the
//! peer column; medians of repeated runs; planned activation memory of
//! each program.

mod common;

use common::median;
use modelc::ir::graph::{Attention, Graph};
use modelc::types::DType;
use modelc::types::Dim;
use modelc::types::TensorTy;
use modelc_runtime::cpu::{Program, Tensor, bind};
use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

/// Batch, query heads, key/value heads, head size.
#[derive(Clone, Copy)]
struct Heads {
    batch: usize,
    heads: usize,
    groups: usize,
    size: usize,
}

const LLAMA: Heads = Heads { batch: 1, heads: 8, groups: 2, size: 64 };

/// Seconds a run (median) and planned bytes of attention over t tokens
/// (with `backward`, also the gradients of queries, keys and values of
/// `sum(y * w)`).
fn ours(x: Heads, t: usize, window: Option<i64>, fused: bool, backward: bool, reps: usize) -> (f64, usize) {
    let d = |x: usize| Dim::constant(x as i64);
    let mut g = Graph::default();
    let qs = [x.batch, t, x.heads, x.size];
    let ks = [x.batch, t, x.groups, x.size];
    let q = g.input("q", TensorTy::new(DType::F32, qs.iter().map(|n| d(*n)).collect()));
    let k = g.input("k", TensorTy::new(DType::F32, ks.iter().map(|n| d(*n)).collect()));
    let v = g.input("v", TensorTy::new(DType::F32, ks.iter().map(|n| d(*n)).collect()));
    let offset = g.constant(0.0, DType::Int);
    let spec = Attention { scale: 1.0 / (x.size as f64).sqrt(), causal: true, window, kv_heads_first: false };
    let y = if fused {
        g.attention(spec, &[q, k, v, offset])
    } else {
        modelc::ir::attention::decompose(&mut g, &spec, &[q, k, v, offset])
    };
    g.outputs.push(("y".into(), y));
    if backward {
        let w = g.input("w", TensorTy::new(DType::F32, qs.iter().map(|n| d(*n)).collect()));
        let weighted = g.mul(y, w);
        let loss = g.sum_all(weighted);
        let grads = modelc::ir::grad::grad(&mut g, loss, &[q, k, v]);
        g.outputs = ["dq", "dk", "dv"].iter().map(|n| n.to_string()).zip(grads).collect();
    }
    let g = modelc::opt::optimize(&modelc::ir::prune::prune(&g), modelc::opt::Limits::default()).0;
    timed(&g, qs, ks, backward, reps)
}

/// Compiles `g` (inputs q `qs`, keys and values `ks`, and with `weighted`
/// the weights w `qs` of the loss) and times its runs: (median seconds,
/// planned bytes).
fn timed(g: &Graph, qs: [usize; 4], ks: [usize; 4], weighted: bool, reps: usize) -> (f64, usize) {
    let data = |n: usize, salt: usize| (0..n).map(|i| (((i + salt) * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let (qn, kn) = (qs.iter().product(), ks.iter().product());
    let mut feeds: HashMap<String, Tensor> = HashMap::from([
        ("q".to_string(), Tensor::new(qs.to_vec(), data(qn, 0))),
        ("k".to_string(), Tensor::new(ks.to_vec(), data(kn, 1))),
        ("v".to_string(), Tensor::new(ks.to_vec(), data(kn, 2))),
    ]);
    if weighted {
        feeds.insert("w".to_string(), Tensor::new(qs.to_vec(), data(qn, 3)));
    }
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let program = Program::compile(g, &bind(g, &shapes).expect("sizes")).expect("compiles");
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

/// Seconds (median) of one decoding step's attention: one query row per
/// head against `s` cached keys and values, heads first as the KV cache
/// keeps them.
fn decode_step(x: Heads, s: usize, reps: usize) -> f64 {
    let d = |x: usize| Dim::constant(x as i64);
    let mut g = Graph::default();
    let qs = [x.batch, 1, x.heads, x.size];
    let ks = [x.batch, x.groups, s, x.size];
    let q = g.input("q", TensorTy::new(DType::F32, qs.iter().map(|n| d(*n)).collect()));
    let k = g.input("k", TensorTy::new(DType::F32, ks.iter().map(|n| d(*n)).collect()));
    let v = g.input("v", TensorTy::new(DType::F32, ks.iter().map(|n| d(*n)).collect()));
    let offset = g.constant((s - 1) as f64, DType::Int);
    let spec = Attention { scale: 1.0 / (x.size as f64).sqrt(), causal: true, window: None, kv_heads_first: true };
    let y = g.attention(spec, &[q, k, v, offset]);
    g.outputs.push(("y".into(), y));
    timed(&g, qs, ks, false, reps).0
}

fn torch(x: Heads, t: usize, window: Option<i64>, backward: bool, reps: usize, threads: usize) -> Option<f64> {
    let Heads { batch, heads, groups, size } = x;
    let grad = if backward { "True" } else { "False" };
    let (context, step) = if backward { ("torch.enable_grad()", "; y.backward(w)") } else { ("torch.no_grad()", "") };
    // A sliding window is an explicit boolean mask for PyTorch.
    let call = match window {
        None => "y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)".to_string(),
        Some(w) => {
            format!("y = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - {w}), enable_gqa=True)")
        }
    } + step;
    let script = format!(
        "import torch, time\nimport torch.nn.functional as F\ntorch.set_num_threads({threads})\n\
         q = torch.rand({batch}, {heads}, {t}, {size}, requires_grad={grad}); k = torch.rand({batch}, {groups}, {t}, {size}, requires_grad={grad}); v = torch.rand({batch}, {groups}, {t}, {size}, requires_grad={grad})\n\
         w = torch.rand({batch}, {heads}, {t}, {size}); i = torch.arange({t})[:, None]; j = torch.arange({t})[None, :]\n\
         with {context}:\n    {call}\n    ts = []\n    for _ in range({reps}):\n        s = time.perf_counter(); {call}; ts.append(time.perf_counter() - s)\n\
         print(sorted(ts)[len(ts) // 2])\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() {
    let threads = rayon::current_num_threads();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let tiny_gpt = Heads { batch: 4, heads: 4, groups: 4, size: 32 };
    let small_llama = Heads { batch: 2, heads: 4, groups: 2, size: 16 };
    println!("one decoding step's attention (one query row a head), {threads} threads: median us");
    for (name, x) in [
        ("stories15M, 6 heads of 48", Heads { batch: 1, heads: 6, groups: 6, size: 48 }),
        ("stories110M, 12 heads of 64", Heads { batch: 1, heads: 12, groups: 12, size: 64 }),
        ("8/2 heads of 64", LLAMA),
        ("LLaMA-3-8B, 32/8 heads of 128", Heads { batch: 1, heads: 32, groups: 8, size: 128 }),
    ] {
        for s in [384, 2048, 8192] {
            println!("  {name:<30} {s:>5} keys {:8.1}", decode_step(x, s, 300) * 1e6);
        }
    }
    if std::env::args().any(|a| a == "--decode") {
        return;
    }
    // A 256-token prompt's attention at the decode benchmark's shapes (`--prompt`: these alone).
    let prompts = [
        ("stories15M prompt", Heads { batch: 1, heads: 6, groups: 6, size: 48 }, 256, None, 50),
        ("stories110M prompt", Heads { batch: 1, heads: 12, groups: 12, size: 64 }, 256, None, 30),
    ];
    let prompt_only = std::env::args().any(|a| a == "--prompt");
    for backward in [false, true] {
        if prompt_only && backward {
            break;
        }
        println!(
            "causal attention{}, {threads} threads: median ms (planned MiB); ratios are speed-ups of the fused kernels",
            if backward { ", forward and backward (gradients of q, k, v)" } else { "" }
        );
        let cases = [
            ("small llama", small_llama, 32, None, 200),
            ("tiny-gpt", tiny_gpt, 64, None, 100),
            ("8/2 heads of 64", LLAMA, 256, None, 30),
            ("8/2 heads of 64", LLAMA, 1024, None, 10),
            ("8/2 heads of 64", LLAMA, 4096, None, 3),
            ("8/2 heads of 64", LLAMA, 4096, Some(512), 3),
        ];
        let cases: Vec<_> = match (prompt_only, backward) {
            (true, _) => prompts.to_vec(),
            (false, true) => cases.to_vec(),
            (false, false) => prompts.iter().chain(&cases).copied().collect(),
        };
        for (name, x, t, window, reps) in cases {
            let (fused, fused_bytes) = ours(x, t, window, true, backward, reps);
            let (stored, stored_bytes) = ours(x, t, window, false, backward, reps);
            let label =
                format!("{name}, B {} T {t}{}", x.batch, window.map(|w| format!(", window {w}")).unwrap_or_default());
            let peer = match torch(x, t, window, backward, reps, threads) {
                Some(p) => format!("   torch {:8.3}   vs torch {:.2}x", p * 1e3, p / fused),
                None => "   (torch not importable)".to_string(),
            };
            println!(
                "  {label:<36} fused {:8.3} ({:5.1})   decomposed {:8.3} ({:6.1})   vs decomposed {:.2}x{peer}",
                fused * 1e3,
                mib(fused_bytes),
                stored * 1e3,
                mib(stored_bytes),
                stored / fused
            );
        }
    }
}
