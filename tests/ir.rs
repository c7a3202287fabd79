//! The IR: gradients of every primitive and every standard layer against
//! finite differences on the f64 interpreter, and training that lowers the
//! loss on the interpreter.

mod support;

use modelc::check::Options;
use modelc::ir::interp::{Array, Precision, run};
use modelc::ir::train::{TrainConfig, training_program};
use proptest::prelude::*;
use std::collections::HashMap;
use support::*;

/// (name, forward body over params a, b: [n, m] and ids: [n] int) -> a scalar.
const PRIMITIVE_CASES: &[(&str, &str)] = &[
    ("exp", "sum(exp(a) * b)"),
    ("log", "sum(log(a * a + 1.0) * b)"),
    ("sqrt", "sum(sqrt(a * a + 1.0) * b)"),
    ("rsqrt", "sum(rsqrt(a * a + 1.0) * b)"),
    ("tanh", "sum(tanh(a) * b)"),
    ("sigmoid", "sum(sigmoid(a) * b)"),
    ("relu", "sum(relu(a) * b)"),
    ("gelu", "sum(gelu(a) * b)"),
    ("gelu_tanh", "sum(gelu_tanh(a) * b)"),
    ("silu", "sum(silu(a) * b)"),
    ("softplus", "sum(softplus(a) * b)"),
    ("erf", "sum(erf(a) * b)"),
    ("sin", "sum(sin(a) * b)"),
    ("cos", "sum(cos(a) * b)"),
    ("abs", "sum(abs(a) * b)"),
    ("arithmetic", "sum((a + b) * (a - 2.0 * b) / (b * b + 1.0) + a ** 2 - -a)"),
    ("pow", "sum((a * a + 1.0) ** b)"),
    ("maximum", "sum(maximum(a, b) + minimum(a, 0.5) * b)"),
    ("where", "sum(where(a > b, a * b, b - a))"),
    ("sum", "sum(sum(a * b, axis: 1) * sum(b, axis: 0, keep: true)[0, 0])"),
    ("mean", "sum(mean(a, axis: 0) * mean(b * a))"),
    ("max", "sum(max(a * b, axis: 1)) + min(a)"),
    ("var", "sum(var(a * b, axis: -1, keep: true) * b)"),
    ("softmax", "sum(softmax(a * 2.0) * b)"),
    ("log_softmax", "sum(log_softmax(a, axis: 0) * b)"),
    ("matmul", "sum((transpose(a) @ b) * (transpose(b) @ a)) + sum(a[0] @ transpose(b))"),
    ("permute", "sum(permute(a.unsqueeze(0), [2, 0, 1]) * permute(b.unsqueeze(0), [2, 0, 1]))"),
    ("reshape", "sum(reshape(a, [m, n]) * reshape(b, [-1, n]))"),
    ("float_of_a_size", "sum(a * b) / sqrt(float(m))"),
    ("cumsum", "sum(cumsum(a * b, axis: 0) * b) + sum(cumsum(a) * a) + sum(float(cumsum(ids)) * b[:, 0])"),
    ("expand", "sum(expand(sum(a, axis: 0, keep: true), [2, n, -1]) * expand(b, [2, n, m]))"),
    ("split_merge", "sum(a.split(0, [1, n]).merge(0, 1) * b.unsqueeze(1).squeeze(1))"),
    ("concat", "sum(concat([a, b * a], axis: 0) * concat([b, a], axis: 0))"),
    ("stack", "sum(stack([a, b], axis: 1) * stack([b, a * a], axis: 1))"),
    ("index", "sum(a[:, 1:] * b[:, :-1]) + sum(a[-1] * b[0])"),
    ("gather", "sum(gather(a, ids) * b)"),
    ("one_hot", "sum(one_hot(ids, m) * a * b)"),
    ("arange", "sum(float(arange(m)) * a * b)"),
    ("linear", "sum(linear(a, b, bias: b[:, 0]) * (a @ transpose(b)))"),
    ("conv1d", "sum(conv1d(a.unsqueeze(0), b[:, :2].unsqueeze(0), bias: b[0, :1], stride: 2, padding: 1) ** 2)"),
    (
        "conv2d",
        "sum(conv2d(concat([a, b * b], axis: 0).reshape([1, 2, n, m]), reshape(a[:2, :2] - b[:2, :2], [2, 1, 1, 2]), padding: [0, 1], dilation: [1, 2], groups: 2) ** 2)",
    ),
    ("topk", "sum(topk(a * b, 2)[0] * b[:, :2])"),
    ("cross_entropy", "cross_entropy(a * b, ids % m)"),
    ("mse", "mse(a, b * b)"),
    ("add_loss", "sum(add_loss(a, sum(b * b), weight: 0.5) * b)"),
    (
        "attend",
        "sum(attend(a.split(0, [1, n]).split(-1, [2, m / 2]), b[:, :m / 2].split(0, [1, n]).split(-1, [1, m / 2]), (a * b)[:, :m / 2].split(0, [1, n]).split(-1, [1, m / 2]), causal: true) * b.split(0, [1, n]).split(-1, [2, m / 2]))",
    ),
    (
        "attend_window_mask",
        "sum(attend(a.split(0, [1, n]).split(-1, [1, m]), b.split(0, [1, n]).split(-1, [1, m]), a.split(0, [1, n]).split(-1, [1, m]), window: 2, mask: (ids % 2).split(0, [1, n]), scale: 0.3) * a.split(0, [1, n]).split(-1, [1, m]))",
    ),
    (
        "attend_softcap",
        "sum(attend(a.split(0, [1, n]).split(-1, [1, m]), (a * b).split(0, [1, n]).split(-1, [1, m]), b.split(0, [1, n]).split(-1, [1, m]), causal: true, softcap: 0.7) * a.split(0, [1, n]).split(-1, [1, m]))",
    ),
    (
        "rope",
        "sum(rope(concat([a, b], axis: -1).split(0, [1, n]).split(-1, [1, 2 * m]), theta: 100.0) * concat([b, a], axis: -1).split(0, [1, n]).split(-1, [1, 2 * m]))",
    ),
];

fn primitive_spec(body: &str) -> String {
    format!(
        "model M(n: int = 3, m: int = 4) {{\n    a: param[n, m]\n    b: param[n, m]\n\n    forward(ids: [n] int) -> y: [] = {body}\n\n    train {{\n        loss: y\n    }}\n}}\n"
    )
}

fn check_primitive(name: &str, body: &str, n: usize, m: usize, seed: u64) -> Result<(), String> {
    let opts = sets(&[("n", &n.to_string()), ("m", &m.to_string())]);
    let (checked, g) = lower_text(&primitive_spec(body), &opts, name == "dropout");
    let mut rng = Rng(seed | 1);
    let mut feeds = random_params(&checked, &mut rng, 1.0);
    let ids: Vec<f64> = (0..n).map(|i| ((i as u64 * 7 + seed) % n.min(m) as u64) as f64).collect();
    feeds.insert("ids".into(), Array::new(vec![n], ids));
    feeds.insert("step".into(), Array::scalar(1.0));
    check_gradients(&g, &feeds, &["a".into(), "b".into()], 12).map_err(|e| format!("{name}: {e}"))
}

#[test]
fn every_language_primitive_is_covered() {
    for prim in modelc::check::prims::Prim::names() {
        let covered = PRIMITIVE_CASES.iter().any(|(_, body)| body.contains(&format!("{prim}(")))
            || [
                "float",
                "int",
                "squeeze",
                "unsqueeze",
                "split",
                "merge",
                "transpose",
                "dropout",
                "route",
                "min",
                "argmax",
                // Finite differences see through a stop-gradient by design;
                // tests/hf.rs checks `detach` against PyTorch (a padded embedding).
                "detach",
            ]
            .contains(&prim);
        assert!(covered, "no gradient check uses `{prim}`");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn primitive_gradients_match_finite_differences(n in 2usize..5, half in 1usize..3, seed in any::<u64>()) {
        let m = 2 * half;
        for (name, body) in PRIMITIVE_CASES {
            if let Err(e) = check_primitive(name, body, n, m.max(2), seed) {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}

#[test]
fn cumsum_gives_running_sums_as_torch_cumsum_does() {
    // torch.cumsum(x, dim) on these values; a mask's running count is an int.
    let spec = "model M {\n    forward(x: [2, 3], mask: [2, 3] bool) -> (down: [2, 3], across: [2, 3], count: [2, 3] int) {\n        [cumsum(x, axis: 0), cumsum(x), cumsum(mask, axis: 1) - 1]\n    }\n}\n";
    let (_, g) = lower_text(spec, &Options::default(), false);
    let feeds = HashMap::from([
        ("x".to_string(), Array::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        ("mask".to_string(), Array::new(vec![2, 3], vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0])),
    ]);
    let out = run(&g, &feeds, Precision::F64).unwrap();
    assert_eq!(out["down"].data, [1.0, 2.0, 3.0, 5.0, 7.0, 9.0]);
    assert_eq!(out["across"].data, [1.0, 3.0, 6.0, 4.0, 9.0, 15.0]);
    assert_eq!(out["count"].data, [0.0, 1.0, 1.0, -1.0, 0.0, 1.0]);
}

/// `conv1d` / `conv2d` and their gradients equal torch's (in float64, from
/// `tests/conv_fixtures.py`) over strides, padding, dilation and groups.
#[test]
fn convolutions_and_their_gradients_match_torch() {
    let cases = conv_cases();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let out = run(&case.graph, &case.feeds, Precision::F64).unwrap();
        assert_eq!(out.len(), case.torch.len(), "{}", case.label);
        for (name, want) in &case.torch {
            let have = &out[name].data;
            assert_eq!(have.len(), want.len(), "{}: {name}", case.label);
            for (i, (h, w)) in have.iter().zip(want).enumerate() {
                assert!((h - w).abs() <= 1e-9 * (1.0 + w.abs()), "{}: {name}[{i}]: {h} vs torch {w}", case.label);
            }
        }
    }
}

/// `cumsum` and `expand` and their gradients equal torch's (float64, from
/// `tests/conv_fixtures.py`: torch.cumsum, Tensor.expand).
#[test]
fn cumsum_and_expand_and_their_gradients_match_torch() {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/scans.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 6);
    let (numbers, shape, dims) = (json_numbers, json_shape, dims_text);
    for c in cases {
        let (expr, xs, rs) = (c["expr"].as_str().unwrap(), shape(&c["x"]["shape"]), shape(&c["r"]["shape"]));
        let spec = format!(
            "model C {{\n    x: param[{}]\n\n    forward(r: [{}]) -> (y: [{}], s: []) {{\n        let y = {expr}\n        [y, sum(y * r)]\n    }}\n}}\n",
            dims(&xs),
            dims(&rs),
            dims(&rs)
        );
        let (_, mut g) = lower_text(&spec, &Options::default(), false);
        let (loss, x) = (g.output("s").unwrap(), g.params().next().unwrap().1);
        let grad = modelc::ir::grad::grad(&mut g, loss, &[x])[0];
        g.outputs.push(("grad_x".into(), grad));
        let feeds = HashMap::from([
            ("x".to_string(), Array::new(xs, numbers(&c["x"]["data"]))),
            ("r".to_string(), Array::new(rs, numbers(&c["r"]["data"]))),
        ]);
        let out = run(&g, &feeds, Precision::F64).unwrap();
        for name in ["y", "grad_x"] {
            let want = numbers(&c[name]);
            assert_eq!(out[name].data.len(), want.len(), "{expr}: {name}");
            for (h, w) in out[name].data.iter().zip(&want) {
                assert!((h - w).abs() <= 1e-9 * (1.0 + w.abs()), "{expr}: {name}: {h} vs torch {w}");
            }
        }
    }
}

#[test]
fn dropout_gradient_uses_the_same_mask() {
    check_primitive("dropout", "sum(dropout(a, 0.5) * b)", 3, 4, 7).unwrap();
    // The mask really drops: the training graph differs from the identity.
    let (checked, g) = lower_text(&primitive_spec("sum(dropout(a, 0.5) * b)"), &Options::default(), true);
    let mut rng = Rng(3);
    let mut feeds = random_params(&checked, &mut rng, 1.0);
    feeds.insert("ids".into(), Array::new(vec![3], vec![0.0, 1.0, 2.0]));
    feeds.insert("step".into(), Array::scalar(1.0));
    let dropped = run(&g, &feeds, Precision::F64).unwrap()["y"].data[0];
    let plain: f64 = feeds["a"].data.iter().zip(&feeds["b"].data).map(|(a, b)| a * b).sum();
    assert!((dropped - plain).abs() > 1e-6, "dropout changed nothing");
}

/// (layer, declarations, forward over x: [B, T, d]) with d = 8.
const LAYER_CASES: &[(&str, &str)] = &[
    ("Linear", "l: Linear(8, 8)"),
    ("Conv1D", "l: Conv1D(8, 8)"),
    ("LayerNorm", "l: LayerNorm(8)"),
    ("RMSNorm", "l: RMSNorm(8)"),
    ("GELU", "p: param[8]\n    g: GELU(approximate: true)\n    l: MLP(8, 4, activation: GELU)"),
    ("SiLU", "p: param[8]\n    l: MLP(8, 4, activation: SiLU)"),
    ("ReLU", "p: param[8]\n    l: MLP(8, 4, activation: Tanh)"),
    ("SwiGLU", "l: SwiGLU(8, 12)"),
    ("SinusoidalPositions", "p: Linear(8, 8)\n    s: SinusoidalPositions(8)"),
    ("LearnedPositions", "l: LearnedPositions(16, 8)"),
    ("Attention", "l: Attention(8, 2)"),
    ("GroupedQueryAttention", "l: Attention(8, 4, kv_heads: 2, window: 2, bias: true)"),
    ("MultiQueryAttention", "l: Attention(8, 2, kv_heads: 1, causal: false, rotary: false)"),
    ("PartialRotaryQkNorm", "l: Attention(8, 2, head_dim: 8, rotary_dim: 4, qk_norm: true)"),
    ("PreNormBlock", "l: PreNormBlock(8, 2, 16, kv_heads: 1)"),
    ("ParallelBlock", "l: PreNormBlock(8, 2, 16, parallel: true)"),
    ("ParallelBlockTwoNorms", "l: PreNormBlock(8, 2, 16, parallel: true, shared_norm: false)"),
    ("EncoderBlock", "l: EncoderBlock(8, 2, 16, dropout: 0.0)"),
    ("MoE", "l: MoE(8, 3, 2, expert: SwiGLU(8, 4), balance: 0.1)"),
    ("OffsetRMSNorm", "l: OffsetRMSNorm(8)"),
    ("HeadNormLayer", "l: Attention(8, 2, qk_norm: true, head_norm: OffsetRMSNorm(4))"),
    ("FusedAttention", "l: FusedAttention(8, 2, kv_heads: 1, bias: true, scale: 0.3)"),
    ("FusedAttentionPerHead", "l: FusedAttention(8, 2, per_head: true, softcap: 0.5)"),
    ("Conv1d", "l: Conv1d(8, 8, 3, padding: 2, dilation: 2, groups: 2)"),
];

fn layer_spec(decls: &str) -> String {
    let call = if decls.contains("s: SinusoidalPositions") {
        "s(p(x))"
    } else if decls.contains("Conv1d") {
        "transpose(l(transpose(x)))" // the 8 features as channels, T as the length
    } else {
        "l(x)"
    };
    format!(
        "import std.core\nimport std.mlp\nimport std.positions\nimport std.attention\nimport std.blocks\nimport std.moe\n\nmodel M {{\n    {decls}\n    w: param[8]\n\n    forward(x: [B, T, 8]) -> y: [B, T, 8] = {call} * w\n\n    train {{\n        loss: sum(y * y) * 0.5\n    }}\n}}\n"
    )
}

#[test]
fn standard_layer_gradients_match_finite_differences() {
    let mut cases: Vec<(String, String)> = LAYER_CASES.iter().map(|(n, d)| (n.to_string(), layer_spec(d))).collect();
    cases.push((
        "DecoderBlock".into(),
        "import std.blocks\n\nmodel M {\n    l: DecoderBlock(8, 2, 16, dropout: 0.0)\n    w: param[8]\n\n    forward(x: [B, T, 8], memory: [B, S, 8]) -> y: [B, T, 8] = l(x, memory) * w\n\n    train {\n        loss: sum(y * y) * 0.5\n    }\n}\n".into(),
    ));
    for adapter in ["LoRA", "DoRA"] {
        cases.push((
            adapter.into(),
            format!("import std.core\nimport std.adapters\n\nmodel Base {{\n    proj: Linear(8, 8)\n\n    forward(x: [B, T, 8]) -> y: [B, T, 8] = proj(x)\n\n    train {{\n        loss: sum(y * y) * 0.5\n    }}\n}}\n\nmodel Tuned = adapt Base with {adapter}(rank: 2, alpha: 4.0) on proj\n"),
        ));
    }
    for (name, spec) in cases {
        let (checked, g) = lower_text(&spec, &Options::default(), false);
        let mut rng = Rng(0x5eed ^ name.len() as u64);
        let mut feeds = random_params(&checked, &mut rng, 0.5);
        feeds.insert("x".into(), rng.array(&[2, 3, 8], 1.0));
        feeds.insert("memory".into(), rng.array(&[2, 4, 8], 1.0));
        let in_graph: Vec<String> = g.params().map(|(n, _)| n.to_string()).collect();
        let wrt: Vec<String> = checked
            .params
            .iter()
            .filter(|p| p.trainable && in_graph.contains(&p.name))
            .map(|p| p.name.clone())
            .collect();
        assert!(!wrt.is_empty(), "{name} has no trainable parameters");
        check_gradients(&g, &feeds, &wrt, 6).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Runs `steps` AdamW steps of a spec on the interpreter; returns the losses.
fn train(spec_path: &str, sets_: &[(&str, &str)], batch: &Array, steps: usize, lr: f64) -> Vec<f64> {
    let text = std::fs::read_to_string(repo().join(spec_path)).unwrap();
    let (checked, g) = lower_text(&text, &sets(sets_), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let cfg = TrainConfig { clip: Some(1.0), ..TrainConfig::default() };
    let program = modelc::ir::prune::prune(&training_program(&g, &trainable, &cfg).expect("spec has a loss"));
    let mut rng = Rng(42);
    let mut state: HashMap<String, Array> = random_params(&checked, &mut rng, 0.1);
    for p in &checked.params {
        let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
        state.insert(format!("m:{}", p.name), Array::zeros(&shape));
        state.insert(format!("v:{}", p.name), Array::zeros(&shape));
    }
    let mut losses = Vec::new();
    for step in 1..=steps {
        let mut feeds = state.clone();
        feeds.insert("input_ids".into(), batch.clone());
        feeds.insert("lr".into(), Array::scalar(lr));
        feeds.insert("step".into(), Array::scalar(step as f64));
        let out = run(&program, &feeds, Precision::F32).unwrap();
        losses.push(out["loss"].data[0]);
        for (name, value) in out {
            if let Some(p) = name.strip_prefix("new:") {
                state.insert(p.to_string(), value);
            } else if name.starts_with("m:") || name.starts_with("v:") {
                state.insert(name, value);
            }
        }
    }
    losses
}

#[test]
fn tiny_gpt_trains_on_the_interpreter() {
    let text = b"the cat sat on the mat. the cat sat on the mat. ";
    let ids: Vec<f64> = text.iter().take(32).map(|b| *b as f64).collect();
    let batch = Array::new(vec![2, 16], ids);
    let losses = train("specs/tiny-gpt.model", &[("layers", "1"), ("dim", "32"), ("heads", "2")], &batch, 8, 1e-2);
    // A byte-level model starts near ln(256) = 5.55 and must learn this batch.
    assert!((losses[0] - 256f64.ln()).abs() < 0.5, "first loss {losses:?}");
    assert!(losses.windows(2).all(|w| w[1] < w[0]) && losses[7] < losses[0] - 0.5, "loss did not fall: {losses:?}");
}

#[test]
fn small_llama_trains_on_the_interpreter() {
    let batch = Array::new(vec![1, 8], vec![1.0, 5.0, 9.0, 2.0, 1.0, 5.0, 9.0, 2.0]);
    let sets_ = [("vocab", "16"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    let losses = train("specs/llama.model", &sets_, &batch, 6, 2e-2);
    assert!(losses.windows(2).all(|w| w[1] < w[0]) && losses[5] < losses[0] - 0.15, "loss did not fall: {losses:?}");
}

fn graphs(spec: &str, sets_: &[(&str, &str)]) -> (String, String, String) {
    let text = std::fs::read_to_string(repo().join(spec)).unwrap();
    let (checked, forward) = lower_text(&text, &sets(sets_), false);
    let forward = modelc::ir::prune::prune(&forward);
    let (_, train_fwd) = lower_text(&text, &sets(sets_), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let cfg = TrainConfig { clip: Some(1.0), ..TrainConfig::default() };
    let training = modelc::ir::prune::prune(&training_program(&train_fwd, &trainable, &cfg).unwrap());
    let (optimized, _) = modelc::opt::optimize(&forward, modelc::opt::Limits::default());
    let print = modelc::ir::print::print;
    (print(&forward), print(&training), print(&optimized))
}

#[test]
fn ir_snapshots() {
    let small_llama =
        [("vocab", "32"), ("dim", "16"), ("layers", "2"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    for (name, spec, sets_) in
        [("tiny-gpt", "specs/tiny-gpt.model", &[("layers", "1")][..]), ("llama", "specs/llama.model", &small_llama[..])]
    {
        let (forward, training, optimized) = graphs(spec, sets_);
        insta::assert_snapshot!(format!("ir-{name}"), forward);
        insta::assert_snapshot!(format!("ir-train-{name}"), training);
        insta::assert_snapshot!(format!("ir-opt-{name}"), optimized);
    }
}

#[test]
fn frozen_weights_get_no_gradient_or_update() {
    let text = "import std.core\nimport std.adapters\n\nmodel Base {\n    proj: Linear(4, 4)\n\n    forward(x: [B, 4]) -> y: [B, 4] = proj(x)\n\n    train {\n        loss: sum(y * y)\n    }\n}\n\nmodel Tuned = adapt Base with LoRA(rank: 2) on proj\n";
    let (checked, g) = lower_text(text, &Options::default(), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    assert_eq!(trainable, ["proj.lora_A.weight", "proj.lora_B.weight"]);
    let program = training_program(&g, &trainable, &TrainConfig::default()).unwrap();
    let updated: Vec<&str> = program.outputs.iter().filter_map(|(n, _)| n.strip_prefix("new:")).collect();
    assert_eq!(updated, ["proj.lora_A.weight", "proj.lora_B.weight"]);
}

#[test]
fn printed_ir_parses_back_and_verifies() {
    let small_llama =
        [("vocab", "32"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    for (spec, sets_) in [
        ("specs/tiny-gpt.model", &[("layers", "1")][..]),
        ("specs/llama.model", &small_llama[..]),
        (
            "specs/mixtral.model",
            &[
                ("vocab", "32"),
                ("dim", "16"),
                ("layers", "1"),
                ("heads", "2"),
                ("kv_heads", "1"),
                ("hidden", "8"),
                ("experts", "3"),
            ][..],
        ),
        (
            "specs/bert.model",
            &[("vocab", "32"), ("positions", "16"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("hidden", "24")][..],
        ),
    ] {
        let text = std::fs::read_to_string(repo().join(spec)).unwrap();
        let (checked, forward) = lower_text(&text, &sets(sets_), true);
        modelc::ir::verify::verify(&forward).unwrap_or_else(|e| panic!("{spec} forward: {e}"));
        let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        let programs = match training_program(&forward, &trainable, &TrainConfig::default()) {
            Some(t) => vec![forward.clone(), t],
            None => vec![forward.clone()],
        };
        for g in programs {
            let g = modelc::ir::prune::prune(&g);
            modelc::ir::verify::verify(&g).unwrap_or_else(|e| panic!("{spec}: {e}"));
            let (opt, _) = modelc::opt::optimize(&g, modelc::opt::Limits::default());
            modelc::ir::verify::verify(&opt).unwrap_or_else(|e| panic!("{spec} optimised: {e}"));
            let printed = modelc::ir::print::print(&g);
            let parsed = modelc::ir::parse::parse(&printed).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(modelc::ir::print::print(&parsed), printed, "{spec}: print . parse . print differs");
        }
    }
}

#[test]
fn the_verifier_rejects_a_broken_graph() {
    let text = "%0 = input \"x\" : [2, 3]\n%1 = reshape %0 : [4, 2]\noutput y = %1\n";
    let g = modelc::ir::parse::parse(text).unwrap();
    let err = modelc::ir::verify::verify(&g).unwrap_err();
    assert!(err.contains("changes the element count"), "{err}");
    assert!(
        modelc::ir::parse::parse("%0 = frobnicate : [2]\n").unwrap_err().contains("unknown operation `frobnicate`")
    );
    assert!(modelc::ir::parse::parse("%0 = neg %3 : [2]\n").unwrap_err().contains("used before it is defined"));
}

#[test]
fn transposed_matmul_gradients_match_finite_differences() {
    use modelc::types::DType;
    use modelc::types::Dim;
    use modelc::types::TensorTy;
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut g = modelc::ir::graph::Graph::default();
        let shape =
            |r: i64, c: i64| TensorTy::new(DType::F32, vec![Dim::constant(2), Dim::constant(r), Dim::constant(c)]);
        let a = g.param("a", if ta { shape(4, 3) } else { shape(3, 4) });
        let b = g.param("b", if tb { shape(5, 4) } else { shape(4, 5) });
        let c = g.matmul_t(a, b, ta, tb);
        let w = g.param("w", shape(3, 5));
        let y = g.mul(c, w);
        let loss = g.sum_all(y);
        g.outputs.push(("loss".into(), loss));
        modelc::ir::verify::verify(&g).unwrap();
        let mut rng = Rng(17);
        let feeds: HashMap<String, Array> = ["a", "b", "w"]
            .iter()
            .map(|n| {
                let id = g.params().find(|(p, _)| p == n).unwrap().1;
                let dims: Vec<usize> = g.dims(id).iter().map(|d| d.as_const().unwrap() as usize).collect();
                (n.to_string(), rng.array(&dims, 1.0))
            })
            .collect();
        check_gradients(&g, &feeds, &["a".into(), "b".into()], 24).unwrap_or_else(|e| panic!("ta {ta}, tb {tb}: {e}"));
    }
}

#[test]
fn fused_attention_gradients_match_finite_differences() {
    use modelc::ir::graph::Attention;
    use modelc::types::DType;
    use modelc::types::Dim;
    use modelc::types::TensorTy;
    // (heads, groups, causal, window, keys heads first, mask rows (0: none), offset)
    let cases = [
        (4, 2, true, Some(3), false, 0, 2),
        (2, 2, false, None, true, 3, 0),
        (3, 1, true, None, false, 1, 2),
        (2, 1, true, None, true, 3, -2),
    ];
    for (h, groups, causal, window, heads_first, mask_rows, offset) in cases {
        let (b, t, s, d, e) = (2, 3, 5, 3, 2);
        let dims = |xs: &[usize]| TensorTy::new(DType::F32, xs.iter().map(|x| Dim::constant(*x as i64)).collect());
        let kv = |w: usize| if heads_first { [b, groups, s, w] } else { [b, s, groups, w] };
        let mut g = modelc::ir::graph::Graph::default();
        let q = g.param("q", dims(&[b, t, h, d]));
        let k = g.param("k", dims(&kv(d)));
        let v = g.param("v", dims(&kv(e)));
        let off = g.constant(offset as f64, DType::Int);
        let mut args = vec![q, k, v, off];
        let mut rng = Rng(23);
        let mut feeds = HashMap::new();
        if mask_rows > 0 {
            args.push(g.input("mask", dims(&[b, mask_rows, s])));
            // Some keys hidden; with a mask per query, one query sees none.
            let mut m: Vec<f64> = (0..b * mask_rows * s).map(|i| f64::from(i % 3 != 1)).collect();
            if mask_rows > 1 {
                m[s..2 * s].fill(0.0);
            }
            feeds.insert("mask".to_string(), Array::new(vec![b, mask_rows, s], m));
        }
        let spec = Attention { scale: 0.7, causal, window, kv_heads_first: heads_first };
        let y = g.attention(spec, &args);
        let w = g.param("w", dims(&[b, t, h, e]));
        let weighted = g.mul(y, w);
        let loss = g.sum_all(weighted);
        g.outputs.push(("loss".into(), loss));
        modelc::ir::verify::verify(&g).unwrap();
        for n in ["q", "k", "v", "w"] {
            let id = g.params().find(|(p, _)| *p == n).unwrap().1;
            let shape: Vec<usize> = g.dims(id).iter().map(|d| d.as_const().unwrap() as usize).collect();
            feeds.insert(n.to_string(), rng.array(&shape, 1.0));
        }
        check_gradients(&g, &feeds, &["q".into(), "k".into(), "v".into()], 40)
            .unwrap_or_else(|e| panic!("heads {h}/{groups}, causal {causal}, mask {mask_rows}: {e}"));
    }
}

/// Sparse routing executes top_k / n_experts of the dense lowering's expert
/// products, at every size (the FLOPs are polynomials in B and T): in the
/// forward, and in the training program's gradients.
#[test]
fn sparse_routing_runs_top_k_of_n_experts_products() {
    use modelc::ir::graph::{Graph, Op};
    let text = std::fs::read_to_string(repo().join("specs/mixtral.model")).unwrap();
    // The dense lowering's products by an expert's weight (read through a transpose).
    let dense_expert_flops = |g: &Graph| {
        let is_expert = |id: modelc::ir::graph::NodeId| {
            let mut n = g.node(id);
            if let Op::Permute(_) = n.op {
                n = g.node(n.args[0]);
            }
            matches!(&n.op, Op::Param(name) if name.contains(".experts."))
        };
        g.nodes
            .iter()
            .filter(|n| matches!(n.op, Op::MatMul { .. }) && n.args.iter().any(|a| is_expert(*a)))
            .fold(modelc::types::Dim::constant(0), |acc, n| acc.add(&modelc::ir::print::flops(g, n)))
    };
    for (experts, top_k) in [(8, 2), (4, 1), (3, 2)] {
        let (e, k) = (experts.to_string(), top_k.to_string());
        let opts = sets(&[
            ("vocab", "32"),
            ("dim", "16"),
            ("layers", "2"),
            ("heads", "2"),
            ("kv_heads", "1"),
            ("hidden", "24"),
            ("experts", &e),
            ("top_k", &k),
        ]);
        let program = modelc::check::load_source("mixtral.model", &text, Some(&repo().join("specs"))).ok().unwrap();
        let lower = |dense_routes| {
            let how = modelc::check::LowerOptions { training: true, dense_routes, ..Default::default() };
            let (checked, g) = modelc::check::lower(&program, &opts, how).unwrap();
            let trainable: Vec<String> = checked.params.iter().map(|p| p.name.clone()).collect();
            let step = training_program(&g, &trainable, &TrainConfig::default()).unwrap();
            (modelc::ir::prune::prune(&g), modelc::ir::prune::prune(&step))
        };
        let ((sparse, sparse_step), (dense, dense_step)) = (lower(false), lower(true));
        let c = |v: i64| modelc::types::Dim::constant(v);
        let of = |g: &Graph, weights: bool| {
            g.nodes
                .iter()
                .filter(|n| match n.op {
                    Op::ExpertMatMul { .. } => !weights,
                    Op::ExpertWeightGrad { .. } => weights,
                    _ => false,
                })
                .fold(c(0), |acc, n| acc.add(&modelc::ir::print::flops(g, n)))
        };
        // Products by the experts' weights: the forward's, and the backward's for the inputs.
        for (label, sparse, dense) in [("forward", &sparse, &dense), ("training step", &sparse_step, &dense_step)] {
            let (routed, all) = (of(sparse, false), dense_expert_flops(dense));
            assert_ne!(routed, c(0), "{label}: routed");
            assert_eq!(
                routed.mul(&c(experts)),
                all.mul(&c(top_k)),
                "{label}, {top_k} of {experts}: {routed} against {all}"
            );
        }
        // The weights' gradients: as many as the forward's products, over the routed rows only.
        assert_eq!(of(&sparse_step, true), of(&sparse, false), "{top_k} of {experts}: weight gradients");
        assert_eq!(modelc::ir::print::expert_flops(&sparse_step), of(&sparse_step, true).add(&of(&sparse_step, false)));
    }
}

/// Every product keeps the spec expression and layer it came from through
/// lowering, autodiff and the optimiser (what `--profile` adds time up by):
/// a projection's forward product and its gradients point at the stdlib's
/// `linear(...)` in that very projection.
#[test]
fn products_keep_their_spec_line_and_layer_through_autodiff_and_the_optimiser() {
    let text = std::fs::read_to_string(repo().join("specs/llama.model")).unwrap();
    let small =
        sets(&[("vocab", "32"), ("dim", "16"), ("layers", "2"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")]);
    let program =
        modelc::check::load_source("llama.model", &text, Some(&repo().join("specs"))).unwrap_or_else(|_| panic!());
    let how = |training| modelc::check::LowerOptions { training, ..Default::default() };
    let (checked, forward) = modelc::check::lower(&program, &small, how(false)).unwrap_or_else(|_| panic!());
    let (_, train_fwd) = modelc::check::lower(&program, &small, how(true)).unwrap_or_else(|_| panic!());
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let training = training_program(&train_fwd, &trainable, &TrainConfig::default()).unwrap();
    let optimized = modelc::opt::optimized(&forward);
    let optimized_training = modelc::opt::optimized(&training);
    // Products by the layer they came from, each with the text it came from.
    let products = |g: &modelc::ir::graph::Graph| {
        let mut by_layer: std::collections::BTreeMap<String, usize> = Default::default();
        for n in g.nodes.iter().filter(|n| matches!(n.op, modelc::ir::graph::Op::MatMul { .. })) {
            let origin = n.origin.unwrap_or_else(|| panic!("a product without an origin: {:?}", n.op));
            let path = &checked.instances[origin.instance as usize].path;
            let code = program.sources.snippet(origin.span);
            if path.ends_with("_proj") {
                assert_eq!(code, "linear(x, weight, bias)", "{path}");
            }
            *by_layer.entry(path.clone()).or_default() += 1;
        }
        by_layer
    };
    let projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    for (g, per_projection) in [(&forward, 1), (&optimized, 1)] {
        let by_layer = products(g);
        for layer in 0..2 {
            for p in projections {
                let block = if ["gate_proj", "up_proj", "down_proj"].contains(&p) { "mlp" } else { "self_attn" };
                let path = format!("model.layers.{layer}.{block}.{p}");
                assert_eq!(by_layer.get(&path), Some(&per_projection), "{path}: {by_layer:?}");
            }
        }
    }
    // Training: each projection's forward product, the gradient of its
    // weight and (but for the first layer's inputs, which need none past
    // the embedding's) of its input.
    for g in [&training, &optimized_training] {
        let by_layer = products(g);
        let down = by_layer.get("model.layers.1.mlp.down_proj");
        assert_eq!(down, Some(&3), "{by_layer:?}");
        assert!(by_layer.iter().filter(|(p, _)| p.ends_with("_proj")).all(|(_, n)| *n >= 2), "{by_layer:?}");
    }
}

/// A training step's feeds on the interpreter: random weights (seeded),
/// zero AdamW moments, the first `b x t` bytes of `text` as token ids.
fn step_feeds(
    checked: &modelc::check::Checked,
    seed: u64,
    text: &[u8],
    (b, t): (usize, usize),
) -> HashMap<String, Array> {
    let mut rng = Rng(seed);
    let mut feeds: HashMap<String, Array> = random_params(checked, &mut rng, 0.1);
    for p in &checked.params {
        let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
        feeds.insert(format!("m:{}", p.name), Array::zeros(&shape));
        feeds.insert(format!("v:{}", p.name), Array::zeros(&shape));
    }
    let ids: Vec<f64> = text.iter().take(b * t).map(|c| *c as f64).collect();
    assert_eq!(ids.len(), b * t, "text for {b} x {t} tokens");
    feeds.insert("input_ids".into(), Array::new(vec![b, t], ids));
    feeds.insert("lr".into(), Array::scalar(1e-3));
    feeds.insert("step".into(), Array::scalar(1.0));
    feeds
}

/// A pass's program gives every output the program before it gave, to
/// 1e-12 relative in f64.
fn same_values(pass: &str, before: &HashMap<String, Array>, after: &HashMap<String, Array>) {
    assert_eq!(before.len(), after.len(), "{pass}");
    for (name, value) in before {
        for (a, b) in value.data.iter().zip(&after[name].data) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()), "{pass}: {name}: {a} vs {b}");
        }
    }
}

/// The planned peak of `g` as the CPU schedules it (no other pass), at B x T.
fn planned_peak(g: &modelc::ir::graph::Graph, b: i64, t: i64) -> usize {
    let sizes: modelc::types::Sizes = [("B".to_string(), b), ("T".to_string(), t)].into();
    let schedule = modelc::backend::schedule::schedule(g);
    let plan = modelc::backend::plan::plan(
        g,
        &schedule,
        &sizes,
        modelc::backend::plan::Blocks::Buffered,
        modelc::backend::plan::Inputs::Writable,
    );
    plan.unwrap().peak_bytes()
}

/// Recomputing far uses (`backend::remat`) keeps the training program's
/// meaning, makes a copy of each MLP activation for its weight gradient,
/// and lowers the planned peak.
#[test]
fn recomputing_activations_keeps_the_values_and_lowers_the_peak() {
    let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
    let (checked, g) = lower_text(&text, &sets(&[("layers", "3"), ("dim", "32"), ("heads", "2")]), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let program = training_program(&g, &trainable, &TrainConfig::default()).unwrap();
    let split = modelc::backend::split::split_reductions(&modelc::opt::optimized(&program));
    let recomputed = modelc::backend::remat::recompute_far_uses(&split);
    let gelus = |g: &modelc::ir::graph::Graph| {
        g.nodes.iter().filter(|n| matches!(n.op, modelc::ir::graph::Op::Unary(modelc::ir::graph::Unary::Gelu))).count()
    };
    assert_eq!(gelus(&split), 3);
    assert_eq!(gelus(&recomputed), 6, "one copy per layer's activation");
    let feeds = step_feeds(&checked, 7, b"the cat sat on the mat. the cat sat", (2, 16));
    let (before, after) =
        (run(&split, &feeds, Precision::F64).unwrap(), run(&recomputed, &feeds, Precision::F64).unwrap());
    assert_eq!(before.len(), after.len());
    for (name, value) in &before {
        assert_eq!(value.data, after[name].data, "{name}");
    }
    let peak = |g| planned_peak(g, 16, 128);
    assert!(peak(&recomputed) < peak(&split), "{} vs {}", peak(&recomputed), peak(&split));
}

/// The memory passes keep the training program's meaning and lower its
/// planned peak: weight gradients run early (`backend::order`), the output
/// projection and loss in row chunks with a ragged last chunk
/// (`backend::chunk`), activations recomputed between checkpoints
/// (`backend::checkpoint`).
#[test]
fn memory_passes_keep_the_values_and_lower_the_peak() {
    use modelc::backend::{checkpoint, chunk, order};
    use modelc::ir::graph::Graph;
    let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
    let (checked, g) =
        lower_text(&text, &sets(&[("layers", "3"), ("dim", "32"), ("heads", "2"), ("vocab", "2048")]), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let program = modelc::opt::optimized(&training_program(&g, &trainable, &TrainConfig::default()).unwrap());
    // 2 x 39 = 78 rows: four chunks of 16 (the fewest) and one of 14.
    let text = b"the cat sat on the mat. the dog sat on the log. the cat saw the dog and ran off.";
    let feeds = step_feeds(&checked, 11, text, (2, 39));
    let at: modelc::types::Sizes = [("B".to_string(), 2), ("T".to_string(), 39)].into();
    let row_bytes =
        4 * checked.params.iter().find(|p| p.name.contains("wte") || p.name.contains("embed")).unwrap().shape[0]
            as usize;
    let chunked = chunk::split_rows(&program, &at, 8 * row_bytes);
    let recomputed = checkpoint::recompute_between(&program, &at, 1);
    let ordered = order::free_early(&program, &at);
    let matmuls = |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, modelc::ir::graph::Op::MatMul { .. })).count();
    assert!(matmuls(&chunked) > matmuls(&program), "the output products once per chunk");
    assert!(checkpoint::cut_points(&program, &at).len() >= 6, "two per block");
    assert!(matmuls(&recomputed) > matmuls(&program), "the blocks' forward products again");
    let before = run(&program, &feeds, Precision::F64).unwrap();
    for (pass, g) in [("split_rows", &chunked), ("recompute_between", &recomputed), ("free_early", &ordered)] {
        same_values(pass, &before, &run(g, &feeds, Precision::F64).unwrap());
    }
    // At a training size, each lowers the planned peak.
    let sizes: modelc::types::Sizes = [("B".to_string(), 16), ("T".to_string(), 128)].into();
    let peak = |memory: modelc::backend::Memory| {
        let program = modelc::backend::prepare_with(&program, &sizes, modelc::backend::Target::Cpu, memory);
        program.unwrap().plan.peak_bytes()
    };
    let unchunked = modelc::backend::Memory { chunk_bytes: usize::MAX / 4, keep_every: 0 };
    let chunked = modelc::backend::Memory { chunk_bytes: 64 * row_bytes, keep_every: 0 };
    assert!(peak(chunked) < peak(unchunked), "{} vs {}", peak(chunked), peak(unchunked));
    let recomputed: Vec<usize> =
        (1..=3).map(|keep_every| peak(modelc::backend::Memory { keep_every, ..chunked })).collect();
    assert!(recomputed.iter().all(|p| *p < peak(chunked)), "{recomputed:?} vs {}", peak(chunked));
    // Moving a weight gradient when it frees more than a quarter of what it
    // makes gives another order, with the same values; at one sequence of
    // 32 it plans a fifth lower (`prepare` plans both, keeps the lower).
    let one: modelc::types::Sizes = [("B".to_string(), 1), ("T".to_string(), 32)].into();
    let orders = order::free_early_orders(&program, &one);
    assert_eq!(orders.len(), 2);
    same_values("free_early_orders", &before, &run(&orders[1], &feeds, Precision::F64).unwrap());
    let (whole, quarter) = (planned_peak(&orders[0], 1, 32), planned_peak(&orders[1], 1, 32));
    assert!(quarter * 5 < whole * 4, "{quarter} vs {whole}");
}

/// One placement for several sizes (`backend::prepare_over`): sound at each
/// (no two values share memory there that do not at the sizes planned),
/// with its peak the symbolic formula at each; and the soundness check
/// finds two live values put in one place.
#[test]
fn a_plan_over_several_sizes_is_sound_at_each_and_its_peak_is_the_formula() {
    use modelc::backend::{Memory, Target, prepare_over, prepare_with};
    use modelc::draw_plan::{peak_terms, peak_value};
    let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
    let (checked, g) = lower_text(&text, &sets(&[("layers", "2"), ("dim", "32"), ("heads", "2")]), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let program = modelc::opt::optimized(&training_program(&g, &trainable, &TrainConfig::default()).unwrap());
    let at = |b: i64, t: i64| -> modelc::types::Sizes { [("B".to_string(), b), ("T".to_string(), t)].into() };
    let others = [at(8, 32), at(4, 64), at(8, 64), at(16, 32), at(4, 128)];
    let (kernels, placements) = prepare_over(&program, &at(4, 32), &others, Target::Cpu, Memory::default()).unwrap();
    let terms = peak_terms(&kernels.graph, &kernels.plan);
    assert_eq!(peak_value(&terms, &at(4, 32)).unwrap(), kernels.plan.peak_bytes());
    let alone = prepare_with(&program, &at(4, 32), Target::Cpu, Memory::default()).unwrap();
    assert_eq!(kernels.plan.live, alone.plan.live, "the same program");
    let mut formula_differs_from_alone = false;
    for (sizes, placement) in others.iter().zip(&placements) {
        assert_eq!(peak_value(&terms, sizes).unwrap(), 4 * placement.arena_len, "{sizes:?}");
        assert_eq!(placement.conflict(&kernels.plan), None, "{sizes:?}");
        let alone = prepare_with(&program, sizes, Target::Cpu, Memory::default()).unwrap();
        formula_differs_from_alone |=
            peak_value(&peak_terms(&alone.graph, &alone.plan), sizes).unwrap() != peak_value(&terms, sizes).unwrap();
    }
    // Each plan's own formula holds at its sizes; the one placement's at all.
    assert!(formula_differs_from_alone, "planned alone, some size stacks otherwise (else the test shows nothing)");
    // Two values live at once, one moved onto the other.
    let mut placement = placements.into_iter().next().unwrap();
    let arena: Vec<usize> = (0..kernels.plan.places.len())
        .filter(|i| matches!(kernels.plan.places[*i], modelc::backend::plan::Place::Arena { .. }))
        .filter(|i| placement.lens[*i] > 0)
        .collect();
    let overlap = |a: usize, b: usize| {
        let ((s, e), (t, f)) = (kernels.plan.live[a].unwrap(), kernels.plan.live[b].unwrap());
        s < f && t < e
    };
    let (a, b) = (arena.iter())
        .flat_map(|a| arena.iter().map(move |b| (*a, *b)))
        .find(|(a, b)| a != b && overlap(*a, *b))
        .unwrap();
    let moved = placement.offsets[b];
    placement.offsets[b] = placement.offsets[a];
    assert!(placement.conflict(&kernels.plan).is_some());
    placement.offsets[b] = moved;
    // Two values whose steps do not meet, the later one written in a row
    // group that starts while the earlier is live: its parts run
    // interleaved, so the two may not share memory either.
    let lived = |v: usize| kernels.plan.live[v].unwrap();
    let (a, b) = (arena.iter())
        .flat_map(|a| arena.iter().map(move |b| (*a, *b)))
        .find(|(a, b)| lived(*a).1 < lived(*b).0 && lived(*a).1 >= kernels.plan.group_starts[lived(*b).0])
        .expect("a value live into a row group that writes another");
    placement.offsets[b] = placement.offsets[a];
    assert!(placement.conflict(&kernels.plan).is_some());
}

/// A tied embedding's gradient (`backend::scatter_into`): the output
/// layer's weight gradient is made in the weight's own layout (no permuted
/// copy: the e-graph's `transposed-matmul`), the embedding's rows are
/// scattered onto it, the values stay the same, and the planned peak falls
/// where the weight is what dominates it.
#[test]
fn a_tied_embeddings_gradient_is_scattered_onto_the_output_layers() {
    use modelc::backend::scatter_into::scatter_onto_sums;
    use modelc::ir::graph::{Graph, Op};
    let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
    let step = |settings: &[(&str, &str)]| {
        let (checked, g) = lower_text(&text, &sets(settings), true);
        let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        let program = modelc::opt::optimized(&training_program(&g, &trainable, &TrainConfig::default()).unwrap());
        (checked, program)
    };
    let (checked, program) = step(&[("layers", "2"), ("dim", "32"), ("heads", "2"), ("vocab", "300")]);
    let table = [modelc::types::Dim::constant(300), modelc::types::Dim::constant(32)];
    let weight_sized_permutes =
        |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, Op::Permute(_)) && n.ty.dims == table).count();
    assert_eq!(weight_sized_permutes(&program), 0, "the weight's gradient made in its layout");
    let onto = scatter_onto_sums(&program);
    let scatters = |g: &Graph, args: usize| {
        g.nodes.iter().filter(|n| matches!(n.op, Op::ScatterAdd) && n.args.len() == args).count()
    };
    assert_eq!((scatters(&program, 2), scatters(&program, 3)), (1, 0));
    assert_eq!((scatters(&onto, 2), scatters(&onto, 3)), (0, 1));
    let feeds = step_feeds(&checked, 5, b"the cat sat on the mat. the dog sat on the log", (2, 20));
    let (before, after) = (run(&program, &feeds, Precision::F64).unwrap(), run(&onto, &feeds, Precision::F64).unwrap());
    same_values("scatter_onto_sums", &before, &after);
    // A vocabulary's weight (4096 x 256) larger than a few tokens' activations.
    let (_, big) = step(&[("layers", "2"), ("dim", "256"), ("heads", "2"), ("vocab", "4096")]);
    let (unfolded, folded) = (planned_peak(&big, 1, 16), planned_peak(&scatter_onto_sums(&big), 1, 16));
    assert!(folded < unfolded, "{folded} vs {unfolded}");
}

/// An attention and its backward's log-sum-exp pass over the same inputs
/// become one pass writing both (`backend::attention_lse`), with the same
/// values; the output and the log-sum-exp are views of it.
#[test]
fn an_attention_writes_the_log_sum_exp_its_backward_reads() {
    use modelc::ir::graph::{AttentionPass, Graph, Op};
    let text = std::fs::read_to_string(repo().join("specs/llama.model")).unwrap();
    let small = [("vocab", "128"), ("dim", "16"), ("layers", "2"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    let (checked, g) = lower_text(&text, &sets(&small), true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let program = modelc::opt::optimized(&training_program(&g, &trainable, &TrainConfig::default()).unwrap());
    let both = modelc::backend::attention_lse::attend_with_lse(&program);
    let passes = |g: &Graph, pass: AttentionPass| {
        g.nodes.iter().filter(|n| matches!(&n.op, Op::AttentionBackward(_, p) if *p == pass)).count()
    };
    let forwards = |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, Op::Attention(_))).count();
    assert_eq!((forwards(&program), passes(&program, AttentionPass::Lse)), (2, 2));
    assert_eq!(
        (forwards(&both), passes(&both, AttentionPass::Lse), passes(&both, AttentionPass::ValuesAndLse)),
        (0, 0, 2)
    );
    let feeds = step_feeds(&checked, 3, b"the cat sat on the mat. the dog sat on the log", (2, 20));
    let (before, after) = (run(&program, &feeds, Precision::F64).unwrap(), run(&both, &feeds, Precision::F64).unwrap());
    same_values("attend_with_lse", &before, &after);
    // Both parts are windows of the pass's value: no copies.
    let sizes: modelc::types::Sizes = [("B".to_string(), 2), ("T".to_string(), 20)].into();
    let kernels = modelc::backend::schedule::schedule_at(&both, &sizes).kernels;
    let views = kernels.iter().filter(|k| matches!(k, modelc::backend::kernel::Kernel::View(v)
        if matches!(both.node(*v).op, Op::Slice { .. }) && matches!(both.node(both.node(*v).args[0]).op, Op::AttentionBackward(_, AttentionPass::ValuesAndLse)))).count();
    assert_eq!(views, 4, "the output and the log-sum-exp of each layer's pass");
}

/// `topk` takes tied entries in `torch.topk`'s order (the router of a
/// mixture of experts chooses among equal experts as transformers does),
/// on the interpreter: rows of ties and NaN from `tests/topk_fixtures.py`.
#[test]
fn topk_breaks_ties_as_torch_does() {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/topk.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() > 300);
    for case in cases {
        let row: Vec<f64> = case["row"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect();
        let k = case["k"].as_u64().unwrap() as usize;
        let want: Vec<f64> = case["indices"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut g = modelc::ir::graph::Graph::default();
        let ty = modelc::types::TensorTy::new(
            modelc::types::DType::F32,
            vec![modelc::types::Dim::constant(1), modelc::types::Dim::constant(row.len() as i64)],
        );
        let x = g.input("x", ty);
        let (_, indices) = g.topk(x, k);
        g.outputs.push(("indices".into(), indices));
        let feeds = HashMap::from([("x".to_string(), Array::new(vec![1, row.len()], row.clone()))]);
        let got = run(&g, &feeds, Precision::F64).unwrap().remove("indices").unwrap().data;
        assert_eq!(got, want, "topk {k} of {row:?}");
    }
}

/// At a decoding step's few rows the products that share their left
/// operand (q/k/v, gate/up) run side by side, outside row groups, so that
/// the CPU reads their weights in one parallel section; the order keeps
/// the values. At many rows the schedule keeps them where they were.
#[test]
fn few_row_products_of_one_operand_run_side_by_side() {
    use modelc::backend::kernel::Kernel;
    use modelc::ir::graph::{Graph, NodeId};
    let text = std::fs::read_to_string(repo().join("specs/llama.model")).unwrap();
    let small = [("vocab", "32"), ("dim", "16"), ("layers", "2"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    let (checked, forward) = lower_text(&text, &sets(&small), false);
    let g = modelc::opt::optimized(&forward);
    let at = |b: i64, t: i64| -> modelc::types::Sizes { [("B".to_string(), b), ("T".to_string(), t)].into() };
    // Each run of top-level products of one left operand (views between), as their counts.
    let runs = |sizes: &modelc::types::Sizes| {
        let program = modelc::backend::prepare(&g, sizes, modelc::backend::Target::Cpu).unwrap();
        let operand = |k: &Kernel| match k {
            Kernel::Single(n) => modelc::backend::order::sibling_products(&program.graph, *n),
            _ => None,
        };
        let mut runs: Vec<(NodeId, usize)> = Vec::new();
        for k in program.schedule.kernels.iter().filter(|k| !matches!(k, Kernel::View(_))) {
            match (operand(k), runs.last_mut()) {
                (Some(a), Some((last, count))) if *last == a => *count += 1,
                (Some(a), _) => runs.push((a, 1)),
                (None, _) => runs.push((NodeId(u32::MAX), 0)),
            }
        }
        let mut counts: Vec<usize> = runs.into_iter().map(|(_, c)| c).filter(|c| *c > 1).collect();
        counts.sort();
        counts
    };
    // Two layers: q/k/v and gate/up each; the output layer alone.
    assert_eq!(runs(&at(1, 1)), [2, 2, 3, 3]);
    assert!(runs(&at(2, 16)).iter().all(|c| *c < 3), "{:?}", runs(&at(2, 16)));
    let ordered: Graph = modelc::backend::order::free_early(&g, &at(1, 1));
    let mut rng = Rng(5);
    let mut feeds: HashMap<String, Array> = random_params(&checked, &mut rng, 0.5);
    feeds.insert("input_ids".into(), Array::new(vec![1, 1], vec![7.0]));
    let (before, after) = (run(&g, &feeds, Precision::F64).unwrap(), run(&ordered, &feeds, Precision::F64).unwrap());
    for (name, value) in &before {
        assert_eq!(value.data, after[name].data, "{name}");
    }
}

/// `FusedAttention` is `Attention` with the q/k/v weights in one: rows one
/// after another, or head by head with `per_head`; `.named` moves weights
/// without changing what they compute.
#[test]
fn fused_attention_equals_separate_projections() {
    let spec = "import std.core\nimport std.attention\n\nmodel M {\n    a: Attention(16, 4, kv_heads: 2, bias: true, rotary_dim: 2)\n    f: FusedAttention(16, 4, kv_heads: 2, bias: true, rotary_dim: 2).named(qkv_proj: \"attn.c_attn\")\n    h: Attention(16, 2, bias: true).named(q_proj: \"self.query\", o_proj: \"output.dense\")\n    p: FusedAttention(16, 2, per_head: true, bias: true)\n    c: FusedAttention(16, 4, kv_heads: 2, bias: true, rotary_dim: 2, qkv: Conv1D(16, 32), out: Conv1D(16, 16)).named(qkv_proj: \"c_attn\", o_proj: \"c_proj\")\n\n    forward(x: [2, 5, 16]) -> (a: [2, 5, 16], f: [2, 5, 16], h: [2, 5, 16], p: [2, 5, 16], c: [2, 5, 16]) {\n        [a(x), f(x), h(x), p(x), c(x)]\n    }\n}\n";
    let (checked, g) = lower_text(spec, &Options::default(), false);
    let mut feeds = random_params(&checked, &mut Rng(5), 1.0);
    let names: Vec<&str> = g.params().map(|(n, _)| n).collect();
    assert!(names.contains(&"f.attn.c_attn.weight") && names.contains(&"h.self.query.weight"), "{names:?}");
    assert!(names.contains(&"h.output.dense.bias") && !names.contains(&"h.o_proj.bias"), "{names:?}");
    // A weight's (or bias's) rows, one part after another.
    let stack = |parts: &[&Array]| {
        let rows = parts.iter().map(|p| p.shape[0]).sum();
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Array::new([vec![rows], parts[0].shape[1..].to_vec()].concat(), data)
    };
    for kind in ["weight", "bias"] {
        let [q, k, v, o] = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|p| feeds[&format!("a.{p}.{kind}")].clone());
        feeds.insert(format!("f.attn.c_attn.{kind}"), stack(&[&q, &k, &v]));
        feeds.insert(format!("f.o_proj.{kind}"), o);
        // Head by head: each head's query, key and value rows side by side.
        let [q, k, v] = ["self.query", "k_proj", "v_proj"].map(|p| feeds[&format!("h.{p}.{kind}")].clone());
        let per = q.shape[0] / 2;
        let rows = |x: &Array, h: usize| {
            let width: usize = x.shape[1..].iter().product();
            let data = x.data[h * per * width..(h + 1) * per * width].to_vec();
            Array::new([vec![per], x.shape[1..].to_vec()].concat(), data)
        };
        let parts: Vec<Array> = (0..2).flat_map(|h| [rows(&q, h), rows(&k, h), rows(&v, h)]).collect();
        feeds.insert(format!("p.qkv_proj.{kind}"), stack(&parts.iter().collect::<Vec<_>>()));
        feeds.insert(format!("p.o_proj.{kind}"), feeds[&format!("h.output.dense.{kind}")].clone());
        // GPT-2's Conv1D: the same weights as [in, out].
        let transposed = |x: &Array| match x.shape[..] {
            [rows, cols] => {
                Array::new(vec![cols, rows], (0..rows * cols).map(|i| x.data[(i % rows) * cols + i / rows]).collect())
            }
            _ => x.clone(),
        };
        let qkv = feeds[&format!("f.attn.c_attn.{kind}")].clone();
        feeds.insert(format!("c.c_attn.{kind}"), transposed(&qkv));
        feeds.insert(format!("c.c_proj.{kind}"), transposed(&feeds[&format!("a.o_proj.{kind}")]));
    }
    let x: Vec<f64> = (0..2 * 5 * 16).map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0).collect();
    feeds.insert("x".into(), Array::new(vec![2, 5, 16], x));
    let out = run(&g, &feeds, Precision::F64).unwrap();
    for (got, want) in [("f", "a"), ("p", "h"), ("c", "a")] {
        let worst = out[got].data.iter().zip(&out[want].data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "{got} differs from {want} by {worst}");
    }
    assert!(out["a"].data.iter().zip(&out["h"].data).any(|(a, b)| (a - b).abs() > 1e-3));
}

/// `ir::hoist` splits an encoder-decoder's forward into what the source
/// alone gives (the encoder, each cross-attention's keys and values) and
/// what each target needs; the two run after each other give the logits.
#[test]
fn hoisting_the_encoder_keeps_the_logits() {
    let text = std::fs::read_to_string(repo().join("specs/transformer.model")).unwrap();
    let small = [("vocab", "20"), ("dim", "8"), ("encoder_layers", "2"), ("decoder_layers", "2"), ("heads", "2")];
    let (checked, mut g) = lower_text(&text, &sets(&[&small[..], &[("hidden", "12")]].concat()), false);
    g.outputs.retain(|(name, _)| name == "logits");
    let g = modelc::ir::prune::prune(&g);
    let split = modelc::ir::hoist::hoist(&g, &["src_ids", "src_mask"]);
    let inputs = |g: &modelc::ir::graph::Graph| g.inputs().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
    assert!(!inputs(&split.once).contains(&"tgt_ids".to_string()), "{:?}", inputs(&split.once));
    let hoisted = inputs(&split.each).into_iter().filter(|n| n.starts_with("hoisted:")).count();
    // The encoder's output, and keys and values for each decoder layer; not
    // the output layer's transposed embedding, which reads no source (the
    // step reads the weight as its backend keeps it: packed, resident).
    assert!(hoisted >= 3, "{:?}", inputs(&split.each));
    let vocab = modelc::types::Dim::constant(20);
    assert!(split.each.inputs().all(|(n, id)| !n.starts_with("hoisted:") || !split.each.dims(id).contains(&vocab)));
    let mut feeds = random_params(&checked, &mut Rng(9), 0.5);
    let ids = |n: usize, k: usize| Array::new(vec![2, n], (0..2 * n).map(|i| ((i * k) % 19 + 1) as f64).collect());
    feeds.insert("src_ids".into(), ids(6, 7));
    feeds.insert("tgt_ids".into(), ids(4, 5));
    feeds.insert(
        "src_mask".into(),
        Array::new(vec![2, 6], vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    );
    let want = run(&g, &feeds, Precision::F64).unwrap().remove("logits").unwrap();
    feeds.extend(run(&split.once, &feeds, Precision::F64).unwrap());
    let got = run(&split.each, &feeds, Precision::F64).unwrap().remove("logits").unwrap();
    assert_eq!(got, want);
}
