//! The CPU backend against the reference interpreter (`differential.rs`):
//! every spec (small configurations), forward and one training step,
//! generated graphs on shapes that are not multiples of the vector width,
//! and kernels under valgrind.

mod differential;
mod support;

use differential::*;
use modelc::ir::graph::Graph;
use modelc::ir::interp::{Array, Sizes};
use modelc_runtime::cpu::{CompileOptions, Program, Tensor};
use proptest::prelude::{ProptestConfig, any, prop, proptest};
use std::collections::HashMap;
use support::*;

fn cpu(g: &Graph, sizes: &Sizes, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
    Program::compile(g, sizes).map_err(|e| format!("compile: {e}"))?.run(feeds).map_err(|e| format!("run: {e}"))
}

/// The CPU backend with exp, erf, ... computed in f32x4 inside the kernels
/// (where the host has AVX2, `cpu` calls the wide-vector functions instead).
fn cpu_f32x4(g: &Graph, sizes: &Sizes, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
    Program::compile_with(g, sizes, CompileOptions { wide_math: false, ..CompileOptions::default() })
        .map_err(|e| format!("compile: {e}"))?
        .run(feeds)
        .map_err(|e| format!("run: {e}"))
}

#[test]
fn every_spec_matches_the_interpreter() {
    every_spec(cpu);
}

#[test]
fn convolutions_match_the_interpreter_and_torch_on_the_cpu() {
    convolutions(cpu);
}

#[test]
fn running_sums_match_the_interpreter_on_the_cpu() {
    running_sums(cpu);
}

#[test]
fn sparse_routes_match_the_dense_definition_on_the_cpu() {
    sparse_routes_match_the_dense_definition(cpu);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_graphs_match_the_interpreter(r in 1i64..7, c in 1i64..11, ops in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..12), seed in any::<u64>()) {
        generated(cpu, r, c, &ops, seed, 2e-4);
        generated(cpu_f32x4, r, c, &ops, seed, 2e-4);
    }

    // Rows long enough to run row by row, and row groups split into blocks
    // over threads (more than 16,384 elements), rows not multiples of 4. The
    // operations are those that work along rows (not the sums over columns
    // and products, whose long sums cancel beyond a fixed tolerance).
    #[test]
    fn generated_graphs_with_long_rows_match_the_interpreter(r in 1i64..300, c in 15i64..130, ops in prop::collection::vec((prop::sample::select(&[0u8, 1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14, 15][..]), any::<usize>(), any::<usize>()), 1..8), seed in any::<u64>()) {
        generated(cpu, r, c, &ops, seed, 2e-4);
        generated(cpu_f32x4, r, c, &ops, seed, 2e-4);
    }
}

#[test]
fn every_unary_operation_handles_the_edges_of_its_domain() {
    // Every row of scalar::UNARY (the wide-vector functions, the kernels'
    // own f32x4 versions, and composites built from their definitions) at zero, negatives, infinities, NaN, subnormals, the ends of exp's range
    // and ordinary values, 37 of them (groups of 4 and a tail).
    use modelc::ir::graph::Unary;
    use modelc::types::{Dim, TensorTy};
    let mut xs: Vec<f64> = vec![
        0.0,
        -0.0,
        -1.0,
        1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1e-40,
        1e-45,
        1e-30,
        0.5,
        2.0,
        1e30,
        3.4e38,
        0.999,
        1.001,
        7.0,
        88.7,
        88.8,
        -87.3,
        -87.4,
        -104.0,
        3.89,
        3.91,
        -3.95,
        -20.0,
        20.0,
    ];
    xs.extend((0..10).map(|i| -5.0 + 1.1 * i as f64));
    for op in Unary::all() {
        let mut g = Graph::default();
        let x = g.input("x", TensorTy::new(modelc::types::DType::F32, vec![Dim::constant(xs.len() as i64)]));
        let y = g.unary(op, x);
        g.outputs.push(("y".into(), y));
        let feeds = HashMap::from([("x".to_string(), Array::new(vec![xs.len()], xs.clone()))]);
        compare(cpu, &format!("{op:?}"), &g, &feeds, 1e-6);
        compare(cpu_f32x4, &format!("{op:?} in f32x4"), &g, &feeds, 1e-6);
    }
}

#[test]
fn masked_scores_get_a_probability_of_exactly_zero() {
    // exp below its range is 0, not e^-87.3 (1.2e-38): a softmax over
    // masked scores (-1e30) gives them exactly 0, so the products of a
    // backward pass never meet subnormals, which an Intel core computes a
    // hundred times slower (a stories15M step took 1.8 s instead of 0.8).
    use modelc::types::{Dim, TensorTy};
    let xs: Vec<f64> = vec![0.3, -1e30, 1.2, -1e30, -90.0, -87.4, -1e30, 0.0, -200.0];
    let mut g = Graph::default();
    let x = g.input("x", TensorTy::new(modelc::types::DType::F32, vec![Dim::constant(xs.len() as i64)]));
    let e = g.unary(modelc::ir::graph::Unary::Exp, x);
    let p = g.softmax(x, 0);
    g.outputs.push(("e".into(), e));
    g.outputs.push(("p".into(), p));
    let feeds = HashMap::from([("x".to_string(), to_tensor(&Array::new(vec![xs.len()], xs.clone())))]);
    let sizes = modelc_runtime::cpu::bind(&g, &HashMap::from([("x".to_string(), vec![xs.len()])])).unwrap();
    for (label, backend) in [("wide", cpu as Backend), ("f32x4", cpu_f32x4)] {
        let got = backend(&g, &sizes, &feeds).unwrap();
        for (i, x) in xs.iter().enumerate() {
            if *x < -87.34 {
                assert_eq!(got["e"].data[i], 0.0, "{label}: exp({x})");
                assert_eq!(got["p"].data[i], 0.0, "{label}: softmax at {x}");
            } else {
                assert!(got["p"].data[i] > 0.0, "{label}: softmax at {x}");
            }
        }
    }
}

#[test]
fn tanh_keeps_its_relative_precision_near_zero() {
    // 1 - 2 / (e^(2x) + 1) cancels near 0 (tanh(1.28e-5) came out 0.5% off,
    // and its log 5e-3 off); the kernels use a polynomial there.
    use modelc::types::{Dim, TensorTy};
    let xs: Vec<f64> = vec![1.28e-5, -3e-6, 2e-7, 1e-3, -0.01, 0.3, -0.6, 0.62, 0.624, 0.626, -0.7, 0.9, 37.0 / 41.0];
    let mut g = Graph::default();
    let x = g.input("x", TensorTy::new(modelc::types::DType::F32, vec![Dim::constant(xs.len() as i64)]));
    let y = g.unary(modelc::ir::graph::Unary::Tanh, x);
    g.outputs.push(("y".into(), y));
    let feeds = HashMap::from([("x".to_string(), to_tensor(&Array::new(vec![xs.len()], xs.clone())))]);
    let sizes = modelc_runtime::cpu::bind(&g, &HashMap::from([("x".to_string(), vec![xs.len()])])).unwrap();
    for (label, backend) in [("wide", cpu as Backend), ("f32x4", cpu_f32x4)] {
        let got = backend(&g, &sizes, &feeds).unwrap();
        for (x, y) in xs.iter().zip(&got["y"].data) {
            let want = (*x as f32 as f64).tanh();
            let error = ((*y as f64) - want).abs() / want.abs();
            assert!(error < 3e-7, "{label}: tanh({x}) = {y}, want {want} (relative error {error:e})");
        }
    }
}

#[test]
fn wide_function_arguments_fold_into_the_call() {
    // exp(x op c) with x read in place (an input, a slice along the row) and
    // c fixed over the loop (a constant, a scalar input, a value broadcast
    // along the row), c on either side: the kernel passes x, a scale and a
    // shift to the wide function instead of computing the argument. And
    // `x op c` alone: one call of the affine map (c / x is not affine).
    use modelc::ir::graph::{Binary, Unary};
    use modelc::types::DType;
    use modelc::types::{Dim, TensorTy};
    let (r, c) = (5usize, 70usize);
    let d = |v: usize| Dim::constant(v as i64);
    let mut rng = Rng(11);
    let away = |a: Array| Array::new(a.shape.clone(), a.data.iter().map(|v| v.signum() * (0.5 + v.abs())).collect());
    for (op, wrap) in
        [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div].into_iter().flat_map(|op| [(op, true), (op, false)])
    {
        for fixed in 0..3 {
            for (sliced, fixed_first) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut g = Graph::default();
                let wide = g.input("x", TensorTy::new(DType::F32, vec![d(r), d(c + 3)]));
                let z = g.input("z", TensorTy::new(DType::F32, vec![d(r), d(c)]));
                let s = g.input("s", TensorTy::new(DType::F32, vec![d(1)]));
                let m = g.input("m", TensorTy::new(DType::F32, vec![d(r), d(1)]));
                let x = if sliced { g.slice(wide, 1, d(2), d(c + 2)) } else { z };
                let k = match fixed {
                    0 => g.constant(0.75, DType::F32),
                    1 => g.broadcast(s, &[d(r), d(c)]),
                    _ => g.broadcast(m, &[d(r), d(c)]),
                };
                let arg = if fixed_first { g.binary(op, k, x) } else { g.binary(op, x, k) };
                let y = if wrap { g.unary(Unary::Exp, arg) } else { arg };
                g.outputs.push(("y".into(), y));
                let feeds = HashMap::from([
                    ("x".to_string(), rng.array(&[r, c + 3], 1.5)),
                    ("z".to_string(), rng.array(&[r, c], 1.5)),
                    // Away from zero: some cases divide by them.
                    ("s".to_string(), away(rng.array(&[1], 1.0))),
                    ("m".to_string(), away(rng.array(&[r, 1], 1.0))),
                ]);
                let label = format!("{op:?} (exp {wrap}) fixed {fixed} sliced {sliced} first {fixed_first}");
                compare(cpu, &label, &g, &feeds, 1e-5);
                compare(cpu_f32x4, &label, &g, &feeds, 1e-5);
            }
        }
    }
}

#[test]
fn products_of_one_row_match_the_interpreter() {
    // One row on the left (decoding): x W^T and x B on weights large enough
    // to split over threads (37 x 4099) and small ones, odd sizes, a batch.
    use modelc::types::DType;
    use modelc::types::{Dim, TensorTy};
    let mut rng = Rng(7);
    for (batch, k, n) in [(1, 37, 4099), (1, 5, 3), (1, 300, 17), (3, 19, 2053), (6, 48, 7)] {
        for tb in [true, false] {
            let d = |v: usize| Dim::constant(v as i64);
            let mut g = Graph::default();
            let x = g.input("x", TensorTy::new(DType::F32, vec![d(batch), d(1), d(k)]));
            let w_dims = if tb { vec![d(batch), d(n), d(k)] } else { vec![d(batch), d(k), d(n)] };
            let w = g.input("w", TensorTy::new(DType::F32, w_dims));
            let y = g.matmul_t(x, w, false, tb);
            g.outputs.push(("y".into(), y));
            let w_shape = if tb { [batch, n, k] } else { [batch, k, n] };
            let feeds = HashMap::from([
                ("x".to_string(), rng.array(&[batch, 1, k], 1.0)),
                ("w".to_string(), rng.array(&w_shape, 1.0)),
            ]);
            compare(cpu, &format!("[{batch}, 1, {k}] x {n} (tb {tb})"), &g, &feeds, 2e-4);
        }
    }
}

#[test]
fn a_weight_multiplied_both_ways_keeps_its_f32_values() {
    // W [64, 64] in x @ W^T and in x @ W: a packed copy serves one way, the
    // f32 values the other, and neither is freed.
    use modelc::types::DType;
    use modelc::types::{Dim, TensorTy};
    use modelc_runtime::cpu::{Format, drop_unread, f32_reads, pack_weights};
    let d = |v: usize| Dim::constant(v as i64);
    let mut g = Graph::default();
    let x = g.input("x", TensorTy::new(DType::F32, vec![d(1), d(64)]));
    let w = g.param("w", TensorTy::new(DType::F32, vec![d(64), d(64)]));
    let rows = g.matmul_t(x, w, false, true);
    let columns = g.matmul_t(x, w, false, false);
    g.outputs.push(("rows".into(), rows));
    g.outputs.push(("columns".into(), columns));
    let mut rng = Rng(5);
    let feeds =
        HashMap::from([("x".to_string(), rng.array(&[1, 64], 1.0)), ("w".to_string(), rng.array(&[64, 64], 1.0))]);
    let want = modelc::ir::interp::run(&g, &feeds, modelc::ir::interp::Precision::F32).unwrap();
    let mut tensors: HashMap<String, Tensor> = feeds.iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
    assert_eq!(pack_weights(&g, &mut tensors, Format::Q8), 1);
    assert!(f32_reads(&g).contains("w"));
    drop_unread(&[&g], &mut tensors);
    assert_eq!(tensors["w"].data.len(), 64 * 64, "the f32 values another product reads were freed");
    let shapes = tensors.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let got = Program::compile(&g, &modelc_runtime::cpu::bind(&g, &shapes).unwrap()).unwrap().run(&tensors).unwrap();
    let worst = |name: &str| {
        got[name].data.iter().zip(&want[name].data).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
    };
    // The first use packed it (x @ W^T, within q8's rounding); the other is exact.
    assert!(worst("rows") > 1e-6 && worst("rows") < 0.1, "{}", worst("rows"));
    assert!(worst("columns") < 1e-4, "{}", worst("columns"));
}

#[test]
fn cache_writes_land_in_place_and_match_the_interpreter() {
    // A cache [1, 2, 7, 3] taking 2 or 3 rows at positions inside it, at its
    // end (rows past it are dropped) and at 0; its user reads it whole.
    use modelc::types::DType;
    use modelc::types::{Dim, TensorTy};
    let d = |v: usize| Dim::constant(v as i64);
    let mut rng = Rng(11);
    for (t, start) in [(2, 3), (3, 5), (1, 6), (2, 0)] {
        let mut g = Graph::default();
        let cache = g.input("cache", TensorTy::new(DType::F32, vec![d(1), d(2), d(7), d(3)]));
        let rows = g.input("rows", TensorTy::new(DType::F32, vec![d(1), d(2), d(t), d(3)]));
        let at = g.input("at", TensorTy::scalar(DType::Int));
        let written = g.write_rows(cache, rows, at);
        let doubled = g.add(written, written);
        g.outputs.push(("doubled".into(), doubled));
        let feeds = HashMap::from([
            ("cache".to_string(), rng.array(&[1, 2, 7, 3], 1.0)),
            ("rows".to_string(), rng.array(&[1, 2, t, 3], 1.0)),
            ("at".to_string(), Array::new(vec![], vec![start as f64])),
        ]);
        let want = modelc::ir::interp::run(&g, &feeds, modelc::ir::interp::Precision::F32).unwrap();
        let tensors: HashMap<String, Tensor> = feeds.iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
        let shapes = tensors.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
        let program = Program::compile(&g, &modelc_runtime::cpu::bind(&g, &shapes).unwrap()).unwrap();
        assert_eq!(program.state(), ["cache".to_string()]);
        // Without the cache handed over, the program writes a copy of it.
        let copied = program.run(&tensors).unwrap();
        let mut state = HashMap::from([("cache".to_string(), tensors["cache"].clone())]);
        let mut given = tensors.clone();
        given.remove("cache");
        let mut out = HashMap::new();
        program.run_state(&given, &mut state, &mut out).unwrap();
        let doubled: Vec<f32> = want["doubled"].data.iter().map(|v| *v as f32).collect();
        assert_eq!(out["doubled"].data, doubled, "t {t} at {start}");
        assert_eq!(copied["doubled"].data, doubled, "t {t} at {start}, on a copy of the cache");
        let halves: Vec<f32> = doubled.iter().map(|v| v / 2.0).collect();
        assert_eq!(state["cache"].data, halves, "t {t} at {start}: the cache itself holds the new rows");
        // Kept as f16, a cache may be read only by attention: this one's
        // user adds it to itself, so the program refuses it.
        let mut state = HashMap::from([("cache".to_string(), Tensor::halves(vec![1, 2, 7, 3]))]);
        let err = program.run_state(&given, &mut state, &mut out).unwrap_err();
        assert!(err.contains("`cache` is kept as f16, but the program reads it other than"), "{err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    // Query blocks are 64 rows and key blocks 256 keys: these span several
    // of each, with partial last blocks.
    #[test]
    fn fused_attention_matches_the_interpreter(c in attention_cases(150, 300), seed in any::<u64>()) {
        fused_attention(cpu, &c, seed);
    }
}

#[test]
fn fused_attention_of_a_decoding_step_matches_the_interpreter() {
    // One new token (or two: still dot products, not `gemm`) against a
    // cache longer than one key block, at positions inside it, at its end,
    // and a sliding window; head sizes with partial vectors (20, 7), values
    // wider than the 64 lanes held at once (72, 120, 130), a padding mask.
    let cases = [
        (0, None, 1, 16, 16, 0),
        (5, None, 1, 16, 16, 0),
        (299, None, 1, 16, 16, 0),
        (299, Some(40), 1, 16, 16, 0),
        (130, Some(1), 1, 16, 16, 0),
        (298, None, 2, 20, 72, 0),
        (150, Some(90), 2, 7, 130, 1),
        (299, None, 1, 64, 64, 2),
        (299, None, 1, 48, 120, 0),
        (200, None, 1, 48, 48, 0),
    ];
    for (offset, window, t, d, e, mask) in cases {
        let c =
            AttentionCase { b: 2, t, s: 300, h: 4, g: 2, d, e, offset, causal: true, window, heads_first: true, mask };
        fused_attention(cpu, &c, offset as u64);
    }
}

#[test]
fn products_in_row_groups_on_odd_shapes() {
    // A product, its bias and activation, a norm over its rows, a second
    // product of the normed rows (rows of another length: 37, then 23), and
    // a sum over that product's rows run as one row group, block of rows by
    // block (600 rows: blocks of 221 rows, in parallel, the last one
    // partial), with the right operands plain or transposed.
    use modelc::backend::{kernel::Kernel, schedule::schedule};
    use modelc::ir::graph::{Reduce, Unary};
    use modelc::types::{Dim, TensorTy};
    let d = |x: i64| Dim::constant(x);
    let f32s = |dims: &[i64]| TensorTy::new(modelc::types::DType::F32, dims.iter().map(|x| d(*x)).collect());
    for tb in [false, true] {
        let (m, k, n) = (600, 19, 37);
        let mut g = Graph::default();
        let x = g.input("x", f32s(&[m, k]));
        let w_dims = if tb { [n, k] } else { [k, n] };
        let w = g.input("w", f32s(&w_dims));
        let (n2, w2_dims) = (23, if tb { [23, n] } else { [n, 23] });
        let w2 = g.input("w2", f32s(&w2_dims));
        let bias = g.input("bias", f32s(&[n]));
        let y = g.matmul_t(x, w, false, tb);
        let bias = g.broadcast(bias, &[d(m), d(n)]);
        let y = g.add(y, bias);
        let y = g.unary(Unary::Gelu, y);
        let sq = g.mul(y, y);
        let ms = g.reduce_keep(Reduce::Sum, sq, &[1]);
        let inv = g.unary(Unary::Rsqrt, ms);
        let normed = g.mul(y, inv);
        let z = g.matmul_t(normed, w2, false, tb);
        let total = g.reduce_keep(Reduce::Sum, z, &[1]);
        let total = g.broadcast(total, &[d(m), d(n2)]);
        let out = g.sub(z, total);
        g.outputs.push(("out".into(), out));
        let is_product = |k: &Kernel| matches!(k, Kernel::Single(p) if matches!(g.node(*p).op, modelc::ir::graph::Op::MatMul { .. }));
        let grouped = schedule(&g)
            .kernels
            .iter()
            .any(|k| matches!(k, Kernel::Rows(parts) if is_product(&parts[0]) && parts[1..].iter().any(is_product)));
        assert!(grouped, "the products do not run in one row group");
        // What only the group reads lives in per-thread block buffers, not the arena.
        use modelc::backend::plan::{Blocks, Inputs, Place, plan};
        let (sched, sizes) = (schedule(&g), modelc::types::Sizes::new());
        let (buffered, in_arena) = (
            plan(&g, &sched, &sizes, Blocks::Buffered, Inputs::ReadOnly).unwrap(),
            plan(&g, &sched, &sizes, Blocks::InArena, Inputs::ReadOnly).unwrap(),
        );
        let blocks = buffered.places.iter().filter(|p| matches!(p, Place::Block { .. })).count();
        assert!(blocks >= 3 && buffered.arena_len < in_arena.arena_len, "{blocks} values in block buffers");
        let mut rng = Rng(9);
        let feeds = HashMap::from([
            ("x".to_string(), rng.array(&[m as usize, k as usize], 1.0)),
            ("w".to_string(), rng.array(&w_dims.map(|x| x as usize), 1.0)),
            ("w2".to_string(), rng.array(&w2_dims.map(|x| x as usize), 1.0)),
            ("bias".to_string(), rng.array(&[n as usize], 1.0)),
        ]);
        compare(cpu, &format!("product group, tb {tb}"), &g, &feeds, 2e-4);
    }
}

#[test]
fn fused_attention_gradients_with_many_key_value_heads() {
    // Eight (batch, key/value head) pairs or more: the gradient pass keeps
    // one sum of dQ per pair instead of partial sums over chunks of keys.
    let c = AttentionCase {
        b: 2,
        t: 70,
        s: 300,
        h: 8,
        g: 4,
        d: 8,
        e: 6,
        offset: 230,
        causal: true,
        window: Some(100),
        heads_first: false,
        mask: 1,
    };
    fused_attention(cpu, &c, 11);
}

#[test]
fn fused_attention_averages_rows_with_every_key_masked() {
    // The first query sees no key (padding mask) and its block skips keys
    // 64..: its row is the mean of all 100 values, as in the decomposition.
    let c = AttentionCase {
        b: 1,
        t: 100,
        s: 100,
        h: 2,
        g: 1,
        d: 8,
        e: 8,
        offset: 0,
        causal: true,
        window: None,
        heads_first: false,
        mask: 2,
    };
    fused_attention(cpu, &c, 3);
}

#[test]
fn attention_row_groups_match_the_interpreter() {
    // The masked softmax over the scores runs as a row group, at these sizes
    // split into blocks over threads; head dimensions not multiples of 4.
    for (b, h, t, d, seed) in [(2, 3, 100, 20, 1), (1, 2, 37, 7, 2), (3, 2, 64, 16, 3)] {
        attention(cpu, b, h, t, d, seed);
    }
}

#[test]
fn kernels_stay_in_bounds_under_valgrind() {
    if std::env::var_os("MODELC_UNDER_VALGRIND").is_some() {
        for (r, c) in [(1, 1), (3, 5), (2, 7), (5, 3), (4, 9), (2, 8), (3, 37), (150, 129)] {
            let ops: Vec<(u8, usize, usize)> = (0..16u8).map(|k| (k, k as usize + 1, k as usize * 7 + 2)).collect();
            let g = random_graph(r, c, &ops);
            let mut rng = Rng(r as u64 * 31 + c as u64);
            let mut feeds = HashMap::new();
            feeds.insert("x".to_string(), rng.array(&[r as usize, c as usize], 1.0));
            feeds.insert("y".to_string(), rng.array(&[r as usize, c as usize], 1.0));
            feeds.insert("v".to_string(), rng.array(&[c as usize], 1.0));
            compare(cpu, "valgrind", &g, &feeds, 2e-4);
        }
        let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
        let (checked, g) =
            lower_text(&text, &sets(&[("layers", "1"), ("dim", "12"), ("heads", "2"), ("vocab", "7")]), true);
        let mut rng = Rng(5);
        let mut feeds = random_params(&checked, &mut rng, 0.3);
        feeds.insert("input_ids".into(), Array::new(vec![1, 3], vec![1.0, 6.0, 0.0]));
        feeds.insert("step".into(), Array::scalar(1.0));
        compare(cpu, "valgrind tiny-gpt", &modelc::ir::prune::prune(&g), &feeds, 2e-4);
        attention(cpu, 2, 2, 70, 5, 4);
        for (causal, mask, heads_first) in [(true, 2, false), (false, 1, true)] {
            let c = AttentionCase {
                b: 1,
                t: 70,
                s: 270,
                h: 2,
                g: 1,
                d: 5,
                e: 3,
                offset: 200,
                causal,
                window: None,
                heads_first,
                mask,
            };
            fused_attention(cpu, &c, 7);
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("valgrind")
        .args(["--error-exitcode=99", "--quiet", "--smc-check=all-non-file"])
        .arg(&exe)
        .args(["--exact", "kernels_stay_in_bounds_under_valgrind", "--test-threads=1"])
        .env("MODELC_UNDER_VALGRIND", "1")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("valgrind runs (CI installs it)");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "valgrind reported errors ({:?}):\n{log}", out.status.code());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "the child did not run the kernels:\n{stdout}");
}

#[test]
fn reductions_over_several_axes_match_the_interpreter() {
    reductions_over_several_axes(cpu);
}

/// One AdamW step (clipping at 1) of the llama spec at a size whose kernels
/// split across threads (logits of 8 x 64 x 256: fused kernels, row groups
/// and products in parallel), compiled for the CPU, with random weights,
/// zero moments and random token ids.
fn small_llama_step() -> (Program, HashMap<String, Tensor>) {
    use modelc::ir::train::{TrainConfig, training_program};
    let text = std::fs::read_to_string(repo().join("specs/llama.model")).unwrap();
    let opts =
        sets(&[("vocab", "256"), ("dim", "32"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "48")]);
    let program = modelc::check::load_source("llama.model", &text, Some(&repo().join("specs"))).ok().unwrap();
    let lower = |training| {
        modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training, ..Default::default() }).unwrap()
    };
    let (checked, _) = lower(false);
    let (_, forward) = lower(true);
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let step = training_program(&forward, &trainable, &TrainConfig { clip: Some(1.0), ..Default::default() }).unwrap();
    let step = modelc::ir::prune::prune(&step);
    let (step, _) = modelc::opt::optimize(&step, modelc::opt::Limits::default());
    let mut rng = Rng(3);
    let mut feeds: HashMap<String, Tensor> =
        random_params(&checked, &mut rng, 0.3).iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
    for (name, id) in step.inputs() {
        if feeds.contains_key(name) {
            continue;
        }
        let shape: Vec<usize> = step
            .dims(id)
            .iter()
            .map(|d| d.as_const().map(|v| v as usize).unwrap_or(if d.to_string() == "B" { 8 } else { 64 }))
            .collect();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match modelc::ir::signature::Role::of(name) {
            _ if name == "step" => vec![1.0],
            _ if name == "lr" => vec![1e-3],
            role if role.is_optimizer_state() => vec![0.0; n],
            _ => (0..n).map(|_| (rng.next() * 256.0).floor() as f32).collect(),
        };
        feeds.insert(name.to_string(), Tensor::new(shape, data));
    }
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let sizes = modelc_runtime::cpu::bind(&step, &shapes).unwrap();
    // The logits (8 x 64 x 256 floats) are large enough for their kernels to split.
    let largest = (step.nodes.iter().filter(|n| matches!(n.op, modelc::ir::graph::Op::MatMul { .. })))
        .map(|n| n.ty.dims.iter().map(|d| modelc::types::eval_dim(d, &sizes).unwrap()).product::<usize>())
        .max();
    assert!(largest >= Some(1 << 17), "the logits are large enough to split");
    (Program::compile(&step, &sizes).unwrap(), feeds)
}

/// Programs sharing one arena (`CompileOptions::arena`, as `embed`'s do,
/// one per padded length) run in turn: it grows to the largest plan, and
/// each program's results are bit for bit those it gives in an arena of
/// its own, whatever the one before left there.
#[test]
fn programs_sharing_an_arena_give_their_own_results() {
    let ops = [(13, 0, 1), (1, 3, 2), (12, 4, 0), (10, 5, 1), (9, 6, 6), (0, 7, 3)];
    let shared = modelc_runtime::cpu::Arena::default();
    let mut programs = Vec::new();
    for (r, c) in [(7, 40), (64, 96), (3, 24)] {
        let g = random_graph(r, c, &ops);
        let mut rng = Rng(r as u64);
        let feeds: HashMap<String, Tensor> = [("x", vec![r, c]), ("y", vec![r, c]), ("v", vec![c])]
            .into_iter()
            .map(|(name, dims)| {
                let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
                (name.to_string(), to_tensor(&rng.array(&dims, 1.0)))
            })
            .collect();
        let own = Program::compile(&g, &Sizes::new()).unwrap();
        let options = CompileOptions { arena: Some(shared.clone()), ..CompileOptions::default() };
        let in_shared = Program::compile_with(&g, &Sizes::new(), options).unwrap();
        programs.push((own.run(&feeds).unwrap(), in_shared, feeds, own.peak_bytes()));
    }
    for (want, program, feeds, _) in programs.iter().chain(&programs).rev() {
        let got = program.run(feeds).unwrap();
        let same = want["out"].data.iter().zip(&got["out"].data).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "a program in the shared arena computed something else");
    }
    let largest = programs.iter().map(|p| p.3).max().unwrap();
    assert!(largest > programs[0].3, "the plans differ in size");
    assert_eq!(shared.lock().unwrap().len() * 4, largest);
}

/// Programs compiled into one JIT (`CompileOptions::jit`, as `embed`'s
/// are, one per batch length) compile a kernel another already compiled
/// only once, and compute what programs with JITs of their own compute.
/// (Debug builds also rebuild the IR of each kernel found by its key and
/// assert it is the one compiled.)
#[test]
fn programs_sharing_a_jit_compile_each_kernel_once() {
    let ops = [(13, 0, 1), (1, 3, 2), (12, 4, 0), (9, 5, 5), (0, 6, 3), (11, 7, 1)];
    let jit = modelc_runtime::cpu::SharedJit::new(true).unwrap();
    let mut compiled = Vec::new();
    for r in [9, 9, 40] {
        let g = random_graph(r, 64, &ops);
        let mut rng = Rng(r as u64);
        let feeds: HashMap<String, Tensor> = [("x", vec![r, 64]), ("y", vec![r, 64]), ("v", vec![64])]
            .into_iter()
            .map(|(name, dims)| {
                let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
                (name.to_string(), to_tensor(&rng.array(&dims, 1.0)))
            })
            .collect();
        let options = CompileOptions { jit: Some(jit.clone()), ..CompileOptions::default() };
        let shared = Program::compile_with(&g, &Sizes::new(), options).unwrap();
        compiled.push(jit.kernels());
        let own = Program::compile(&g, &Sizes::new()).unwrap().run(&feeds).unwrap();
        let got = shared.run(&feeds).unwrap();
        assert!(own["out"].data.iter().zip(&got["out"].data).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    assert!(compiled[0] > 2, "{compiled:?}");
    assert_eq!(compiled[1], compiled[0], "the same program compiled again compiles nothing new");
    assert!(compiled[2] - compiled[1] < compiled[0], "more rows share kernels: {compiled:?}");
}

#[test]
fn a_training_step_gives_the_same_bits_on_any_thread_count() {
    // One step run on 1, 2 and 3 threads and twice on 2: every output bit
    // for bit the same (rows, blocks and products never split a sum).
    let (compiled, feeds) = small_llama_step();
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| compiled.run(&feeds).unwrap())
    };
    let reference = on(2);
    for threads in [1, 2, 3] {
        let got = on(threads);
        for (name, want) in &reference {
            let same = want.data.iter().zip(&got[name].data).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} differs on {threads} threads");
        }
    }
}

#[test]
fn a_training_step_writes_the_weights_and_moments_over_the_old_ones() {
    // The caller keeps one copy of the training state: every weight and
    // both its moments are written where they lie (none is an output of
    // its own), to the same bits as the step run on copies of them; and a
    // step whose loss is not finite leaves all of them as they were.
    use modelc::ir::signature::Role;
    let (compiled, feeds) = small_llama_step();
    let weights: Vec<&String> =
        feeds.keys().filter(|k| matches!(Role::of(k), Role::Plain(_)) && k.contains(".weight")).collect();
    let mut written: Vec<String> = compiled.state().to_vec();
    written.sort();
    let mut want: Vec<String> = weights
        .iter()
        .flat_map(|w| [w.to_string(), Role::FirstMoment(w).name(), Role::SecondMoment(w).name()])
        .collect();
    want.sort();
    assert_eq!(written, want);
    let copied = compiled.run(&feeds).unwrap();
    let (mut given, mut state) = (feeds.clone(), HashMap::new());
    for name in compiled.state() {
        state.insert(name.clone(), given.remove(name).unwrap());
    }
    let mut out = HashMap::new();
    compiled.run_state(&given, &mut state, &mut out).unwrap();
    let mut names: Vec<&String> = out.keys().collect();
    names.sort();
    assert_eq!(names, ["grad_norm", "loss"], "only what is not state comes out");
    for w in &weights {
        for (output, input) in
            [(Role::Updated(w).name(), w.to_string()), (Role::FirstMoment(w).name(), Role::FirstMoment(w).name())]
        {
            let same = copied[&output].data.iter().zip(&state[&input].data).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "`{input}` holds `{output}` of the step run on copies");
        }
        assert_ne!(state[*w].data, feeds[*w].data, "`{w}` was updated");
    }
    // A weight that makes the loss NaN: the step writes nothing new.
    let embedding = weights.iter().find(|w| w.contains("embed")).unwrap();
    let mut state: HashMap<String, Tensor> = compiled.state().iter().map(|n| (n.clone(), feeds[n].clone())).collect();
    state.get_mut(*embedding).unwrap().data.fill(f32::NAN);
    let before = state.clone();
    compiled.run_state(&given, &mut state, &mut out).unwrap();
    assert!(out["loss"].data[0].is_nan());
    for (name, t) in &before {
        let same = t.data.iter().zip(&state[name].data).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "`{name}` is as it was before the diverging step");
    }
}

#[test]
fn every_spec_has_ir_and_kernel_snapshots() {
    // Each spec's forward in its small configuration, optimised as the
    // commands run it, and the kernels it becomes at B = 2 (other sizes 8):
    // a change in lowering, the optimiser or the scheduler shows here.
    for path in specs() {
        let name = stem(&path);
        let base = if name.starts_with("llama-") { "llama" } else { name.as_str() };
        let text = std::fs::read_to_string(&path).unwrap();
        let program = modelc::check::load_source(&format!("{name}.model"), &text, path.parent()).ok().unwrap();
        let (_, forward) = modelc::check::lower(&program, &sets(&small(base)), Default::default()).unwrap();
        let forward = modelc::opt::optimized(&forward);
        let mut sizes = modelc::types::Sizes::new();
        for d in forward.nodes.iter().flat_map(|n| &n.ty.dims) {
            for s in d.symbols() {
                sizes.entry(s.to_string()).or_insert(if s == "B" { 2 } else { 8 });
            }
        }
        let kernels = modelc::backend::prepare(&forward, &sizes, modelc::backend::Target::Cpu).unwrap();
        insta::assert_snapshot!(format!("ir-opt-{name}"), modelc::ir::print::print(&forward));
        insta::assert_snapshot!(
            format!("kernels-{name}"),
            modelc::backend::schedule::describe(&kernels.graph, &kernels.schedule)
        );
    }
}
