//! What the CPU and GPU backend tests share: running a graph on a backend
//! and on the reference interpreter and comparing every output, every spec
//! in a small configuration (forward and one training step), and generated
//! graphs on odd shapes.
//!
//! Tolerance: the backends compute in f32 and the interpreter in f64 rounded
//! to f32 after every operation, and products sum in another order, so
//! values agree to |a - b| <= 2e-4 * (1 + |a|) (forward) and 2e-3 (a
//! training step, whose gradients go through more operations).

use crate::support::*;
use modelc::ir::graph::{Binary, Graph, Reduce, Unary};
use modelc::ir::interp::{Array, Precision, run};
use modelc::ir::train::{TrainConfig, training_program};
use modelc::types::DType;
use modelc::types::Dim;
use modelc::types::Sizes;
use modelc::types::TensorTy;
use modelc_runtime::cpu::{Tensor, bind};
use std::collections::HashMap;

/// Compiles a graph for the sizes and runs it on the given feeds.
pub type Backend = fn(&Graph, &Sizes, &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String>;

pub fn to_tensor(a: &Array) -> Tensor {
    Tensor::new(a.shape.clone(), a.data.iter().map(|v| *v as f32).collect())
}

/// Runs `g` on both and compares every output.
pub fn compare(backend: Backend, label: &str, g: &Graph, feeds: &HashMap<String, Array>, tol: f64) {
    compare_with(backend, label, g, g, feeds, tol)
}

/// Runs `oracle` on the interpreter and `g` (the same outputs, computed
/// another way) on the backend, and compares every output.
pub fn compare_with(
    backend: Backend,
    label: &str,
    oracle: &Graph,
    g: &Graph,
    feeds: &HashMap<String, Array>,
    tol: f64,
) {
    let expected = run(oracle, feeds, Precision::F32).unwrap_or_else(|e| panic!("{label}: interpreter: {e}"));
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let sizes = bind(g, &shapes).unwrap();
    let tensors: HashMap<String, Tensor> = feeds.iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
    let got = backend(g, &sizes, &tensors).unwrap_or_else(|e| panic!("{label}: {e}"));
    for (name, want) in &expected {
        let have = &got[name];
        assert_eq!(have.shape, want.shape, "{label}: {name}");
        for (i, (w, h)) in want.data.iter().zip(&have.data).enumerate() {
            let h = *h as f64;
            // Infinities must match exactly (the relative bound would accept anything).
            assert!(
                *w == h || (w.is_finite() && (w - h).abs() <= tol * (1.0 + w.abs())) || (w.is_nan() && h.is_nan()),
                "{label}: {name}[{i}]: interpreter {w}, cpu {h}"
            );
        }
    }
}

pub fn small(name: &str) -> Vec<(&'static str, &'static str)> {
    match name {
        "mlp" => vec![("inputs", "8"), ("hidden", "16"), ("classes", "3")],
        "tiny-gpt" => vec![("layers", "1"), ("dim", "32"), ("heads", "2")],
        "transformer" => vec![
            ("vocab", "50"),
            ("dim", "16"),
            ("encoder_layers", "1"),
            ("decoder_layers", "1"),
            ("heads", "2"),
            ("hidden", "24"),
        ],
        "gpt2" => vec![("vocab", "50"), ("positions", "16"), ("dim", "16"), ("layers", "1"), ("heads", "2")],
        "bert" | "bert-mlm" | "minilm" => {
            vec![("vocab", "50"), ("positions", "16"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("hidden", "24")]
        }
        "mixtral" => vec![
            ("vocab", "50"),
            ("dim", "16"),
            ("layers", "1"),
            ("heads", "2"),
            ("kv_heads", "1"),
            ("hidden", "24"),
            ("experts", "3"),
        ],
        "gpt-neox" => vec![("vocab", "50"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("hidden", "24")],
        "cnn" => vec![("image", "8"), ("width", "4"), ("classes", "3")],
        "gemma2" => vec![
            ("vocab", "50"),
            ("dim", "16"),
            ("layers", "2"),
            ("heads", "2"),
            ("kv_heads", "1"),
            ("head_dim", "8"),
            ("hidden", "24"),
            ("window", "3"),
            ("attention_softcap", "0.5"),
        ],
        "vit" => vec![
            ("image", "8"),
            ("patch", "4"),
            ("dim", "16"),
            ("layers", "1"),
            ("heads", "2"),
            ("hidden", "24"),
            ("classes", "3"),
        ],
        _ => vec![("vocab", "50"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")],
    }
}

/// Inputs for a spec: token ids below 50, masks of ones, float data.
pub fn inputs(checked: &modelc::check::Checked, rng: &mut Rng) -> HashMap<String, Array> {
    let mut feeds = HashMap::new();
    let (b, t) = (2usize, 5usize);
    for sig in checked.inputs.iter().chain(&checked.targets) {
        let shape: Vec<usize> = sig
            .ty
            .dims
            .iter()
            .map(|d| d.as_const().map(|v| v as usize).unwrap_or(if d.to_string() == "B" { b } else { t }))
            .collect();
        let n: usize = shape.iter().product();
        let data: Vec<f64> = match sig.ty.dtype {
            modelc::types::DType::F32 => (0..n).map(|_| rng.signed()).collect(),
            _ if sig.name.contains("mask") => vec![1.0; n],
            _ if sig.name.contains("type") => vec![0.0; n],
            _ => (0..n).map(|_| (rng.next() * 3.0).floor()).collect(),
        };
        feeds.insert(sig.name.clone(), Array::new(shape, data));
    }
    feeds
}

/// Every spec, forward and one AdamW step, against the interpreter.
pub fn every_spec(backend: Backend) {
    for path in specs() {
        let name = stem(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let base = if name.starts_with("llama-") { "llama" } else { name.as_str() };
        let opts = sets(&small(base));
        let program = modelc::check::load_source(&format!("{name}.model"), &text, path.parent()).ok().unwrap();
        let (checked, forward) = modelc::check::lower(
            &program,
            &opts,
            modelc::check::LowerOptions { training: false, ..Default::default() },
        )
        .unwrap();
        let mut rng = Rng(99);
        let mut feeds = random_params(&checked, &mut rng, 0.3);
        feeds.extend(inputs(&checked, &mut rng));
        compare(backend, &format!("{name} forward"), &modelc::ir::prune::prune(&forward), &feeds, 2e-4);

        let (_, train_fwd) =
            modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training: true, ..Default::default() })
                .unwrap();
        let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        if let Some(step) =
            training_program(&train_fwd, &trainable, &TrainConfig { clip: Some(1.0), ..Default::default() })
        {
            let step = modelc::ir::prune::prune(&step);
            let mut feeds = feeds.clone();
            for (n, id) in step.inputs() {
                if !feeds.contains_key(n) {
                    let shape: Vec<usize> = step.dims(id).iter().map(|d| d.as_const().unwrap_or(1) as usize).collect();
                    let value = if n == "step" {
                        Array::scalar(1.0)
                    } else if n == "lr" {
                        Array::scalar(1e-3)
                    } else {
                        Array::zeros(&shape)
                    };
                    feeds.insert(n.to_string(), value);
                }
            }
            compare(backend, &format!("{name} training step"), &step, &feeds, 2e-3);
        }
    }
}

/// A random chain of elementwise, broadcast, reduction and layout operations
/// (softmax and RMSNorm among them) on inputs of shape [r, c] and [c].
pub fn random_graph(r: i64, c: i64, ops: &[(u8, usize, usize)]) -> Graph {
    let d = Dim::constant;
    let mut g = Graph::default();
    let x = g.input("x", TensorTy::new(DType::F32, vec![d(r), d(c)]));
    let y = g.input("y", TensorTy::new(DType::F32, vec![d(r), d(c)]));
    let v = g.input("v", TensorTy::new(DType::F32, vec![d(c)]));
    let bv = g.broadcast(v, &[d(r), d(c)]);
    let mut pool = vec![x, y, bv];
    for &(op, i, j) in ops {
        let (a, b) = (pool[i % pool.len()], pool[j % pool.len()]);
        let n = match op % 16 {
            0 => g.add(a, b),
            1 => g.mul(a, b),
            2 => g.unary(Unary::Tanh, a),
            3 => g.unary(Unary::Exp, a),
            4 => g.binary(Binary::Max, a, b),
            5 => {
                let m = g.reduce_keep(Reduce::Max, a, &[1]);
                g.sub(a, m)
            }
            6 => {
                let s = g.reduce_keep(Reduce::Sum, a, &[0]);
                g.mul(s, b)
            }
            7 => {
                let t = g.transpose_last(a);
                let t = g.unary(Unary::Neg, t);
                g.transpose_last(t)
            }
            8 => {
                let c0 = g.binary(Binary::Gt, a, b);
                g.select(c0, a, b)
            }
            9 => g.unary(Unary::Gelu, a),
            10 => {
                let t = g.transpose_last(b);
                let m = g.matmul(a, t);
                let m = g.reduce_keep(Reduce::Sum, m, &[1]);
                g.mul(m, a)
            }
            11 => g.unary(Unary::Silu, a),
            12 => {
                // RMSNorm: a row reduction, per-row values, and a broadcast back.
                let sq = g.mul(a, a);
                let ms = g.reduce_keep(Reduce::Sum, sq, &[1]);
                let ms = g.scale(ms, 1.0 / c as f64);
                let one = g.full(1.0, DType::F32, &[d(r), d(1)]);
                let ms = g.add(ms, one);
                let inv = g.unary(Unary::Rsqrt, ms);
                g.mul(a, inv)
            }
            13 => {
                // Softmax over rows.
                let m = g.reduce_keep(Reduce::Max, a, &[1]);
                let z = g.sub(a, m);
                let e = g.unary(Unary::Exp, z);
                let s = g.reduce_keep(Reduce::Sum, e, &[1]);
                g.div(e, s)
            }
            15 => {
                // log(|a| + 1): log|a| of a value that cancelled (a - max(a) at a
                // near tie) magnifies its last bits' rounding beyond any relative
                // tolerance, whichever order of additions is right.
                let m = g.unary(Unary::Abs, a);
                let one = g.full(1.0, DType::F32, &[d(r), d(c)]);
                let m = g.add(m, one);
                g.unary(Unary::Log, m)
            }
            _ if c < 2 => g.neg(a),
            _ => {
                // RoPE's rotate-half on columns: slices read in place by the
                // elementwise kernels that use them, one copied into a concat.
                let back = g.slice(a, 1, d(1), d(c));
                let back = g.neg(back);
                let front = g.slice(a, 1, d(0), d(1));
                let front = g.mul(front, front);
                let rolled = g.concat(&[back, front], 1);
                let b2 = if r < 2 {
                    b
                } else {
                    let late = g.slice(b, 0, d(r / 2), d(r));
                    let early = g.slice(b, 0, d(0), d(r / 2));
                    g.concat(&[late, early], 0)
                };
                g.add(rolled, b2)
            }
        };
        pool.push(n);
    }
    let last = *pool.last().expect("non-empty");
    g.outputs.push(("out".into(), last));
    g
}

/// A generated graph on random inputs x, y [r, c] and v [c], against the
/// interpreter, to relative tolerance `tol`.
pub fn generated(backend: Backend, r: i64, c: i64, ops: &[(u8, usize, usize)], seed: u64, tol: f64) {
    let g = random_graph(r, c, ops);
    let mut rng = Rng(seed | 1);
    let mut feeds = HashMap::new();
    feeds.insert("x".to_string(), rng.array(&[r as usize, c as usize], 1.0));
    feeds.insert("y".to_string(), rng.array(&[r as usize, c as usize], 1.0));
    feeds.insert("v".to_string(), rng.array(&[c as usize], 1.0));
    compare(backend, "generated", &g, &feeds, tol);
}

/// Attention over heads, `softmax(q k^T / 4 + mask) v` with a causal mask,
/// on random q, k, v [b, h, t, d]: against the interpreter.
pub fn attention(backend: Backend, b: usize, h: usize, t: usize, d: usize, seed: u64) {
    let dims = |xs: &[usize]| xs.iter().map(|x| Dim::constant(*x as i64)).collect::<Vec<_>>();
    let mut g = Graph::default();
    let ty = TensorTy::new(DType::F32, dims(&[b, h, t, d]));
    let (q, k, v) = (g.input("q", ty.clone()), g.input("k", ty.clone()), g.input("v", ty));
    let scores = g.matmul_t(q, k, false, true);
    let scores = g.scale(scores, 0.25);
    let row = g.iota(Dim::constant(t as i64));
    let row = g.reshape(row, &dims(&[t, 1]));
    let col = g.iota(Dim::constant(t as i64));
    let col = g.reshape(col, &dims(&[1, t]));
    let (row, col) = (g.broadcast(row, &dims(&[t, t])), g.broadcast(col, &dims(&[t, t])));
    let allowed = g.binary(Binary::Le, col, row);
    let allowed = g.broadcast(allowed, &dims(&[b, h, t, t]));
    let hidden = g.full(-1e9, DType::F32, &dims(&[b, h, t, t]));
    let scores = g.select(allowed, scores, hidden);
    let m = g.reduce_keep(Reduce::Max, scores, &[3]);
    let z = g.sub(scores, m);
    let e = g.unary(Unary::Exp, z);
    let s = g.reduce_keep(Reduce::Sum, e, &[3]);
    let p = g.div(e, s);
    let out = g.matmul(p, v);
    g.outputs.push(("out".into(), out));
    let mut rng = Rng(seed | 1);
    let feeds: HashMap<String, Array> =
        ["q", "k", "v"].iter().map(|n| (n.to_string(), rng.array(&[b, h, t, d], 1.0))).collect();
    compare(backend, "attention", &g, &feeds, 2e-4);
}

/// Reductions over several axes, the innermost among them or not, of a
/// chain (`x * x - 0.5`, so the innermost part folds into it), against the
/// interpreter. The backends split those that include the innermost axis.
pub fn reductions_over_several_axes(backend: Backend) {
    let d = Dim::constant;
    let mut rng = Rng(5);
    // The second shape is large enough for leading axes to fold in blocks
    // of rows in parallel (three blocks, the last partial).
    for shape in [[3i64, 5, 37], [700, 3, 67]] {
        let axes_cases: &[Vec<usize>] = if shape[0] == 3 {
            &[vec![0, 2], vec![1, 2], vec![0, 1, 2], vec![0, 1], vec![2]]
        } else {
            &[vec![0], vec![0, 1]]
        };
        for axes in axes_cases {
            for op in [Reduce::Sum, Reduce::Max, Reduce::Min] {
                let mut g = Graph::default();
                let x = g.input("x", TensorTy::new(DType::F32, shape.iter().map(|s| d(*s)).collect()));
                let sq = g.mul(x, x);
                let half = g.constant(0.5, DType::F32);
                let y = g.sub(sq, half);
                let r = g.reduce(op, y, axes);
                g.outputs.push(("r".into(), r));
                let dims = shape.map(|s| s as usize);
                let feeds = HashMap::from([("x".to_string(), rng.array(&dims, 1.0))]);
                compare(backend, &format!("{op:?} over {axes:?} of {shape:?}"), &g, &feeds, 2e-4);
            }
        }
    }
}

/// One fused attention (`Op::Attention`) to test: queries `[b, t, h, d]`,
/// keys and values `[b, s, g, _]` (or heads first), the first query at key
/// position `offset`, and a padding mask `[b, 1, s]` (`mask` 1) or
/// `[b, t, s]` (2) with about a third of the keys hidden and, in the
/// second case, every key of the first row.
#[derive(Clone, Debug)]
pub struct AttentionCase {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub g: usize,
    pub d: usize,
    pub e: usize,
    pub offset: i64,
    pub causal: bool,
    pub window: Option<i64>,
    pub heads_first: bool,
    pub mask: u8,
}

/// The fused operation and its decomposition (`ir::attention`), and the
/// gradients of each (the fused backward's passes, autodiff through the
/// decomposition), on the backend against the interpreter; and the
/// interpreter's references for the fused ones against the decomposition's
/// (tight: all in f64).
pub fn fused_attention(backend: Backend, c: &AttentionCase, seed: u64) {
    let dims = |xs: &[usize]| xs.iter().map(|x| Dim::constant(*x as i64)).collect::<Vec<_>>();
    let kv = |w: usize| if c.heads_first { [c.b, c.g, c.s, w] } else { [c.b, c.s, c.g, w] };
    let mut g = Graph::default();
    let f32s = |xs: &[usize]| TensorTy::new(DType::F32, dims(xs));
    let q = g.input("q", f32s(&[c.b, c.t, c.h, c.d]));
    let k = g.input("k", f32s(&kv(c.d)));
    let v = g.input("v", f32s(&kv(c.e)));
    let offset = g.input("offset", TensorTy::new(DType::Int, vec![]));
    let mut args = vec![q, k, v, offset];
    let mut rng = Rng(seed | 1);
    let mut feeds: HashMap<String, Array> = HashMap::from([
        ("q".to_string(), rng.array(&[c.b, c.t, c.h, c.d], 1.5)),
        ("k".to_string(), rng.array(&kv(c.d), 1.5)),
        ("v".to_string(), rng.array(&kv(c.e), 1.0)),
        ("offset".to_string(), Array::scalar(c.offset as f64)),
    ]);
    if c.mask > 0 {
        let rows = if c.mask == 1 { 1 } else { c.t };
        args.push(g.input("mask", f32s(&[c.b, rows, c.s])));
        let mut m: Vec<f64> = (0..c.b * rows * c.s).map(|_| f64::from(rng.next() > 0.3)).collect();
        if c.mask == 2 {
            m[..c.s].fill(0.0);
        }
        feeds.insert("mask".into(), Array::new(vec![c.b, rows, c.s], m));
    }
    let spec = modelc::ir::graph::Attention {
        scale: 1.0 / (c.d as f64).sqrt(),
        causal: c.causal,
        window: c.window,
        kv_heads_first: c.heads_first,
    };
    let fused = g.attention(spec.clone(), &args);
    let decomposed = modelc::ir::attention::decompose(&mut g, &spec, &args);
    // The gradients of sum(y * w): the fused operation's passes against
    // autodiff through the decomposition.
    let w = g.input("w", f32s(&[c.b, c.t, c.h, c.e]));
    feeds.insert("w".into(), rng.array(&[c.b, c.t, c.h, c.e], 1.0));
    for (name, y) in [("fused", fused), ("decomposed", decomposed)] {
        g.outputs.push((name.into(), y));
        let weighted = g.mul(y, w);
        let loss = g.sum_all(weighted);
        for (x, grad) in ["q", "k", "v"].iter().zip(modelc::ir::grad::grad(&mut g, loss, &[q, k, v])) {
            g.outputs.push((format!("{name} d{x}"), grad));
        }
    }
    let g = modelc::ir::prune::prune(&g);
    modelc::ir::verify::verify(&g).unwrap();
    let reference = run(&g, &feeds, Precision::F64).unwrap();
    for out in ["", " dq", " dk", " dv"] {
        let (want, have) = (&reference[&format!("decomposed{out}")], &reference[&format!("fused{out}")]);
        for (i, (w, h)) in want.data.iter().zip(&have.data).enumerate() {
            assert!((w - h).abs() <= 1e-9 * (1.0 + w.abs()), "{c:?}: reference{out} [{i}] {h}, decomposition {w}");
        }
    }
    // As programs run: optimised (the unoptimised gradient reads a reshaped
    // constant, which the optimiser folds and the backends expect folded).
    let (g, _) = modelc::opt::optimize(&g, modelc::opt::Limits::default());
    compare(backend, &format!("{c:?}"), &g, &feeds, 1e-3);
}

/// Attention cases: up to `max_t` queries and `max_extra` more keys than
/// queries, every head grouping, odd head sizes, every mask kind, and
/// offsets a few positions either side of the usual S - T.
pub fn attention_cases(max_t: usize, max_extra: usize) -> impl proptest::strategy::Strategy<Value = AttentionCase> {
    use proptest::prelude::*;
    let heads = prop::sample::select(vec![(1, 1), (2, 1), (2, 2), (4, 2), (3, 1), (6, 3)]);
    (
        (1usize..3, 1usize..max_t, 0usize..max_extra, heads, 1usize..20, 1usize..20),
        (any::<bool>(), prop::option::of(1i64..40), any::<bool>(), 0u8..3, -3i64..4),
    )
        .prop_map(|((b, t, extra, (h, g), d, e), (causal, window, heads_first, mask, shift))| AttentionCase {
            b,
            t,
            s: t + extra,
            h,
            g,
            d,
            e,
            offset: extra as i64 + shift,
            causal,
            window,
            heads_first,
            mask,
        })
}

/// A mixture whose experts have biases and a norm (weights broadcast over
/// rows, not only multiplied), one expert chosen of four.
pub const BIASED_EXPERTS: &str = "import std.core
import std.moe

layer Expert(dim: int, hidden: int) {
    norm: LayerNorm(dim)
    up: Linear(dim, hidden)
    down: Linear(hidden, dim)

    forward(x: [..., dim]) -> [..., dim] = down(gelu(up(norm(x)))) * 0.5 + 1.0
}

model Routed(vocab: int = 50, dim: int = 16, experts: int = 4, top_k: int = 1) {
    embed: Embedding(vocab, dim)
    moe: MoE(dim, experts, top_k, expert: Expert(dim, 24), balance: 0.01)
    head: Linear(dim, vocab)

    forward(input_ids: [B, T] int) -> logits: [B, T, vocab] = input_ids |> embed |> moe |> head

    train {
        loss: cross_entropy(logits[:, :-1], input_ids[:, 1:])
    }
}
";

/// Mixtures of experts lowered sparsely (each token through its chosen
/// experts only) on the backend against the dense definition (every expert
/// over every token) on the interpreter: the logits and the gradient of the
/// loss with respect to every weight.
pub fn sparse_routes_match_the_dense_definition(backend: Backend) {
    let mixtral = std::fs::read_to_string(repo().join("specs/mixtral.model")).unwrap();
    let cases = [
        ("mixtral", mixtral.as_str(), small("mixtral")),
        ("mixtral top-1", mixtral.as_str(), [small("mixtral"), vec![("top_k", "1")]].concat()),
        ("biased experts", BIASED_EXPERTS, vec![]),
    ];
    for (label, text, sizes) in cases {
        let program = modelc::check::load_source("routed.model", text, Some(&repo().join("specs"))).ok().unwrap();
        let lower = |dense_routes| {
            let how = modelc::check::LowerOptions { training: true, dense_routes, ..Default::default() };
            let (checked, mut g) = modelc::check::lower(&program, &sets(&sizes), how).unwrap();
            let loss = g.output("loss").unwrap();
            let params: Vec<(String, modelc::ir::graph::NodeId)> =
                g.params().map(|(n, id)| (n.to_string(), id)).collect();
            let ids: Vec<_> = params.iter().map(|(_, id)| *id).collect();
            let grads = modelc::ir::grad::grad(&mut g, loss, &ids);
            for ((name, _), d) in params.iter().zip(grads) {
                g.outputs.push((format!("grad:{name}"), d));
            }
            (checked, modelc::ir::prune::prune(&g))
        };
        let ((checked, dense), (_, sparse)) = (lower(true), lower(false));
        let routed =
            |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, modelc::ir::graph::Op::ExpertMatMul { .. })).count();
        assert_eq!(routed(&dense), 0, "{label}: the dense lowering has no expert products");
        assert!(routed(&sparse) >= 2, "{label}: the sparse lowering routes the experts' products");
        let mut rng = Rng(7);
        let mut feeds = random_params(&checked, &mut rng, 0.5);
        feeds.extend(inputs(&checked, &mut rng));
        compare_with(backend, label, &dense, &sparse, &feeds, 2e-4);
    }
}

/// Running sums over the first and the last axis, of floats and of a mask's
/// ints, with the gradient of a loss through them.
pub const RUNNING_SUMS: &str = "model Sums(n: int = 5, m: int = 70) {
    a: param[n, m]

    forward(mask: [n, m] int) -> y: [n, m] = cumsum(a, axis: 0) * 2.0 + cumsum(a * a) + float(cumsum(mask, axis: -1))

    train {
        loss: sum(y * y) / 100.0
    }
}
";

/// `conv1d` / `conv2d` and their gradients on the backend against the
/// interpreter and torch (`tests/fixtures/conv.json`).
pub fn convolutions(backend: Backend) {
    for case in conv_cases() {
        compare(backend, &case.label, &case.graph, &case.feeds, 2e-4);
        let shapes = case.feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
        let sizes = bind(&case.graph, &shapes).unwrap();
        let tensors = case.feeds.iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
        let got = backend(&case.graph, &sizes, &tensors).unwrap();
        for (name, want) in &case.torch {
            for (i, (h, w)) in got[name].data.iter().zip(want).enumerate() {
                let h = *h as f64;
                assert!((h - w).abs() <= 2e-4 * (1.0 + w.abs()), "{}: {name}[{i}]: {h} vs torch {w}", case.label);
            }
        }
    }
}

/// `cumsum` on the backend against the interpreter: values and the
/// gradient of the loss.
pub fn running_sums(backend: Backend) {
    let program = modelc::check::load_source("sums.model", RUNNING_SUMS, None).ok().unwrap();
    let how = modelc::check::LowerOptions { training: true, ..Default::default() };
    let (checked, mut g) = modelc::check::lower(&program, &sets(&[]), how).unwrap();
    let (loss, a) = (g.output("loss").unwrap(), g.params().next().unwrap().1);
    let grads = modelc::ir::grad::grad(&mut g, loss, &[a]);
    g.outputs.push(("grad:a".into(), grads[0]));
    let g = modelc::ir::prune::prune(&g);
    let mut rng = Rng(3);
    let mut feeds = random_params(&checked, &mut rng, 1.0);
    let mask = (0..5 * 70).map(|i| ((i * 7) % 3 != 0) as u8 as f64).collect();
    feeds.insert("mask".into(), Array::new(vec![5, 70], mask));
    compare(backend, "running sums", &g, &feeds, 2e-4);
}
