//! The WGSL backend: every shader of every spec validates with naga,
//! snapshots of one shader per kernel kind, and the GPU (lavapipe on
//! machines without one: CI installs Mesa's Vulkan drivers) against the
//! interpreter on every spec and on generated graphs, as the CPU backend is
//! tested (`differential.rs`).

mod differential;
mod support;

use differential::*;
use modelc::backend::{kernel::Kernel, schedule::schedule};
use modelc::backend::{
    plan::{Blocks, Inputs, plan},
    wgsl,
};
use modelc::ir::graph::Graph;
use modelc::ir::train::{TrainConfig, training_program};
use modelc::types::Sizes;
use modelc_runtime::cpu::Tensor;
use modelc_runtime::gpu::GpuProgram;
use proptest::prelude::{ProptestConfig, any, prop, proptest};
use std::collections::HashMap;
use support::*;

fn gpu(g: &Graph, sizes: &Sizes, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
    GpuProgram::compile(g, sizes).map_err(|e| format!("compile: {e}"))?.run(feeds).map_err(|e| format!("run: {e}"))
}

/// The forward and training programs of a spec in its small configuration.
fn programs(path: &std::path::Path) -> Vec<(String, Graph)> {
    let name = stem(path);
    let text = std::fs::read_to_string(path).unwrap();
    let base = if name.starts_with("llama-") { "llama" } else { name.as_str() };
    let opts = sets(&small(base));
    let program = modelc::check::load_source(&format!("{name}.model"), &text, path.parent()).ok().unwrap();
    let lower = |training| {
        modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training, ..Default::default() }).unwrap()
    };
    let (checked, forward) = lower(false);
    let mut out = vec![(format!("{name} forward"), modelc::ir::prune::prune(&forward))];
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let (_, train) = lower(true);
    if let Some(step) = training_program(&train, &trainable, &TrainConfig { clip: Some(1.0), ..Default::default() }) {
        out.push((format!("{name} training step"), modelc::ir::prune::prune(&step)));
    }
    out
}

/// Sizes for shader emission: B = 2, every other symbol 5.
fn sizes_of(g: &Graph) -> Sizes {
    let mut sizes = Sizes::new();
    for n in &g.nodes {
        for d in &n.ty.dims {
            for s in d.symbols() {
                sizes.entry(s.to_string()).or_insert(if s == "B" { 2 } else { 5 });
            }
        }
    }
    sizes
}

fn shaders(g: &Graph) -> Vec<(Kernel, wgsl::Shader)> {
    let sizes = sizes_of(g);
    let sched = schedule(g);
    let memory = plan(g, &sched, &sizes, Blocks::InArena, Inputs::ReadOnly).unwrap();
    let layout = wgsl::layout(g, &memory);
    let shaders = wgsl::shaders(g, &sched, &memory, &sizes, &layout).unwrap();
    sched.leaves().into_iter().cloned().zip(shaders).filter_map(|(k, s)| Some((k, s?))).collect()
}

#[test]
fn every_shader_of_every_spec_validates() {
    let mut count = 0;
    for path in specs() {
        for (label, g) in programs(&path) {
            for (_, shader) in shaders(&g) {
                wgsl::validate(&shader).unwrap_or_else(|e| panic!("{label}: {e}"));
                count += 1;
            }
        }
    }
    assert!(count > 3000, "only {count} shaders");
}

#[test]
fn one_shader_of_each_kind_is_snapshotted() {
    // The tiny-gpt training program has every kind: fused (and folded into a
    // reduction), matmul, reductions, copies, concat, gather, scatter-add,
    // dropout masks, iota; its forward (inference) program adds attention.
    let mut programs = programs(&repo().join("specs/tiny-gpt.model"));
    let (_, forward) = programs.remove(0);
    let (_, train) = programs.remove(0);
    // The attention writing its backward's log-sum-exp too (a pass of `prepare`).
    let with_lse = modelc::backend::attention_lse::attend_with_lse(&train);
    let mut seen = std::collections::BTreeMap::new();
    for (g, (kernel, shader)) in
        [&train, &forward, &with_lse].into_iter().flat_map(|g| shaders(g).into_iter().map(move |s| (g, s)))
    {
        let kind = match &kernel {
            Kernel::Fused { .. } => "fused".to_string(),
            Kernel::FusedReduce { .. } => "fused_reduce".to_string(),
            Kernel::Single(n) => g.node(*n).op.name().split_whitespace().next().unwrap_or("").to_string(),
            Kernel::View(_) | Kernel::Rows(_) => continue,
        };
        seen.entry(kind).or_insert(shader.source);
    }
    for (kind, source) in &seen {
        insta::assert_snapshot!(format!("wgsl-{kind}"), source);
    }
    assert!(seen.len() >= 11 && seen.contains_key("attention"), "{:?}", seen.keys());
}

#[test]
fn attention_matches_the_interpreter_on_the_gpu() {
    for (b, h, t, d, seed) in [(2, 3, 100, 20, 1), (1, 2, 37, 7, 2)] {
        attention(gpu, b, h, t, d, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fused_attention_matches_the_interpreter_on_the_gpu(c in attention_cases(40, 60), seed in any::<u64>()) {
        fused_attention(gpu, &c, seed);
    }
}

#[test]
fn every_spec_matches_the_interpreter_on_the_gpu() {
    every_spec(gpu);
}

#[test]
fn convolutions_match_the_interpreter_and_torch_on_the_gpu() {
    convolutions(gpu);
}

#[test]
fn running_sums_match_the_interpreter_on_the_gpu() {
    running_sums(gpu);
}

#[test]
fn sparse_routes_match_the_dense_definition_on_the_gpu() {
    sparse_routes_match_the_dense_definition(gpu);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_graphs_match_the_interpreter_on_the_gpu(r in 1i64..7, c in 1i64..70, ops in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..10), seed in any::<u64>()) {
        generated(gpu, r, c, &ops, seed, 2e-4);
    }
}

#[test]
fn tiny_gpt_trains_on_the_gpu_with_the_cpu_losses() {
    let dir = std::env::temp_dir().join(format!("modelc-gpu-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let losses = |device: &str| -> Vec<f64> {
        let out = dir.join(device);
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_modelc"))
            .args(["train", "specs/tiny-gpt.model", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--set", "layers=1", "--set", "dim=16", "--set", "heads=2", "--steps", "6", "--batch", "2"])
            .args(["--seq-len", "16", "--eval-every", "3", "--lr", "1e-2", "--device", device])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        metrics
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().or(v["eval_loss"].as_f64())
            })
            .collect()
    };
    // Dropout (0.25 in tiny-gpt) draws the same masks on both devices.
    let (cpu, gpu) = (losses("cpu"), losses("gpu"));
    assert_eq!(cpu.len(), 8);
    for (a, b) in cpu.iter().zip(&gpu) {
        assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "cpu {cpu:?}\ngpu {gpu:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn matrix_products_span_many_tiles_with_transposes() {
    use modelc::types::DType;
    use modelc::types::{Dim, TensorTy};
    // 3 batches of 70 x 37 @ 37 x 130: several 64 x 64 tiles, ragged edges, and
    // a k that is not a multiple of 16, for each way of storing A and B.
    let (b, m, k, n) = (3, 70, 37, 130);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let d = |v: usize| Dim::constant(v as i64);
        let mut g = Graph::default();
        let a_dims = if ta { vec![d(b), d(k), d(m)] } else { vec![d(b), d(m), d(k)] };
        let b_dims = if tb { vec![d(b), d(n), d(k)] } else { vec![d(b), d(k), d(n)] };
        let x = g.input("a", TensorTy::new(DType::F32, a_dims.clone()));
        let y = g.input("b", TensorTy::new(DType::F32, b_dims.clone()));
        let p = g.matmul_t(x, y, ta, tb);
        g.outputs.push(("c".into(), p));
        let mut rng = Rng(7);
        let shape = |dims: &[Dim]| dims.iter().map(|v| v.as_const().unwrap() as usize).collect::<Vec<_>>();
        let mut feeds = HashMap::new();
        feeds.insert("a".to_string(), rng.array(&shape(&a_dims), 1.0));
        feeds.insert("b".to_string(), rng.array(&shape(&b_dims), 1.0));
        compare(gpu, &format!("matmul ta={ta} tb={tb}"), &g, &feeds, 2e-4);
    }
}

#[test]
fn kv_cached_decoding_on_the_gpu_gives_transformers_tokens() {
    let dir = repo().join("tests/fixtures/hf/llama");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(["infer", "specs/llama.model", "--config", dir.join("config.json").to_str().unwrap()])
        .args(["--weights", dir.join("model.safetensors").to_str().unwrap(), "--prompt", "This License"])
        .args(["--temperature", "0", "--max-new-tokens", "24", "--json", "--device", "gpu"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    assert_eq!(got["new_token_ids"], want["new_token_ids"]);
}

#[test]
fn reductions_over_several_axes_match_the_interpreter() {
    reductions_over_several_axes(gpu);
}

#[test]
fn every_unary_operation_matches_the_interpreter_on_the_gpu() {
    // Each row of scalar::UNARY as WGSL prints it (composites from their
    // definitions), over ordinary values: a GPU's handling of infinities and
    // NaN in WGSL's built-ins is the implementation's.
    use modelc::ir::graph::Unary;
    use modelc::ir::interp::Array;
    use modelc::types::{Dim, TensorTy};
    let xs: Vec<f64> = (0..41).map(|i| -6.0 + 0.3 * i as f64).chain([0.0, 1e-3, -1e-3, 14.0, -14.0, 40.0]).collect();
    for op in Unary::all() {
        let mut g = Graph::default();
        let x = g.input("x", TensorTy::new(modelc::types::DType::F32, vec![Dim::constant(xs.len() as i64)]));
        let x = if matches!(op, Unary::Log | Unary::Sqrt | Unary::Rsqrt) { g.unary(Unary::Abs, x) } else { x };
        let y = g.unary(op, x);
        g.outputs.push(("y".into(), y));
        let feeds = HashMap::from([("x".to_string(), Array::new(vec![xs.len()], xs.clone()))]);
        compare(gpu, &format!("{op:?}"), &g, &feeds, 2e-5);
    }
}

/// `topk` takes tied entries in `torch.topk`'s order on the GPU too (as
/// `ir/topk.rs` does on the CPU): the cases of `tests/fixtures/topk.json`
/// of lengths and k that take each path (partial sort; selection then a
/// sort by insertion, or by introsort with its stack), NaN included, rows
/// of one length and k side by side in one program (each program's shader
/// takes lavapipe about a second to compile).
#[test]
fn topk_breaks_ties_as_torch_does_on_the_gpu() {
    use modelc::types::{DType, Dim, TensorTy};
    let text = std::fs::read_to_string(repo().join("tests/fixtures/topk.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    // Rows and their expected indices, by (row length, k).
    type Rows = Vec<(Vec<f32>, Vec<f32>)>;
    let mut groups: std::collections::BTreeMap<(usize, usize), Rows> = Default::default();
    for case in &cases {
        let row: Vec<f32> =
            case["row"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN) as f32).collect();
        let want: Vec<f32> = case["indices"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        groups.entry((row.len(), want.len())).or_default().push((row, want));
    }
    let mut tested = 0;
    let chosen =
        [(8, 1), (8, 2), (8, 8), (17, 2), (17, 17), (31, 31), (64, 64), (65, 17), (129, 2), (200, 3), (200, 200)];
    for ((n, k), rows) in groups.into_iter().filter(|(nk, _)| chosen.contains(nk)) {
        let mut g = Graph::default();
        let ty = TensorTy::new(DType::F32, vec![Dim::constant(rows.len() as i64), Dim::constant(n as i64)]);
        let x = g.input("x", ty);
        let (values, indices) = g.topk(x, k);
        g.outputs.push(("values".into(), values));
        g.outputs.push(("indices".into(), indices));
        let data = rows.iter().flat_map(|(row, _)| row.iter().copied()).collect();
        let feeds = HashMap::from([("x".to_string(), Tensor::new(vec![rows.len(), n], data))]);
        let out = gpu(&g, &Sizes::new(), &feeds).unwrap();
        tested += 1;
        for (r, (row, want)) in rows.iter().enumerate() {
            let got = &out["indices"].data[r * k..(r + 1) * k];
            assert_eq!(got, &want[..], "topk {k} of {row:?}");
            for (j, i) in want.iter().enumerate() {
                let (have, expected) = (out["values"].data[r * k + j], row[*i as usize]);
                assert!(have == expected || (have.is_nan() && expected.is_nan()), "topk {k} of {row:?}: value {j}");
            }
        }
    }
    assert_eq!(tested, chosen.len());
}
