//! The e-graph optimiser: every rule fires on a graph made for it and keeps
//! the values; generated graphs compute the same before and after; the
//! optimised forward of each spec matches the unoptimised one.

mod support;

use modelc::ir::graph::*;
use modelc::ir::interp::{Array, Precision, run};
use modelc::opt::{Limits, optimize};
use modelc::types::DType;
use modelc::types::Dim;
use modelc::types::TensorTy;
use proptest::prelude::*;
use std::collections::HashMap;
use support::*;

fn d(v: i64) -> Dim {
    Dim::constant(v)
}

fn f32s(dims: &[i64]) -> TensorTy {
    TensorTy::new(DType::F32, dims.iter().map(|v| d(*v)).collect())
}

/// Runs both graphs on the same inputs and compares every output (f64).
fn assert_same(before: &Graph, after: &Graph, feeds: &HashMap<String, Array>) {
    let a = run(before, feeds, Precision::F64).unwrap();
    let b = run(after, feeds, Precision::F64).unwrap();
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.shape, y.shape, "{name}");
        for (p, q) in x.data.iter().zip(&y.data) {
            assert!((p - q).abs() <= 1e-12 * (1.0 + p.abs()), "{name}: {p} vs {q}");
        }
    }
}

fn feeds_for(g: &Graph, seed: u64) -> HashMap<String, Array> {
    let mut rng = Rng(seed | 1);
    g.inputs()
        .map(|(name, id)| {
            let shape: Vec<usize> = g.dims(id).iter().map(|d| d.as_const().unwrap() as usize).collect();
            // Positive values keep log and sqrt defined.
            let mut a = rng.array(&shape, 1.0);
            for v in &mut a.data {
                *v = v.abs() + 0.1;
            }
            (name.to_string(), a)
        })
        .collect()
}

/// Optimises `g`, checks `rule` was applied and values are unchanged.
fn fires(rule: &str, g: Graph) {
    let (opt, report) = optimize(&g, Limits::default());
    let applied = report.applied.iter().find(|(r, _)| r == rule).map_or(0, |(_, n)| *n);
    assert!(applied > 0, "{rule} did not fire: {:?}", report.applied);
    assert_same(&g, &opt, &feeds_for(&g, 11));
}

/// Builds the graph a rule should fire on, from the input `x`.
type Build = Box<dyn Fn(&mut Graph, NodeId) -> NodeId>;

fn base() -> (Graph, NodeId) {
    let mut g = Graph::default();
    let x = g.input("x", f32s(&[2, 3]));
    (g, x)
}

#[test]
fn algebra_rules_fire_and_keep_values() {
    let cases: Vec<(&str, Build)> = vec![
        (
            "add-zero",
            Box::new(|g, x| {
                let z = g.full(0.0, DType::F32, &[d(2), d(3)]);
                let e = g.unary(Unary::Exp, x);
                g.push(Op::Binary(Binary::Add), vec![e, z], f32s(&[2, 3]))
            }),
        ),
        (
            "zero-add",
            Box::new(|g, x| {
                let z = g.full(0.0, DType::F32, &[d(2), d(3)]);
                g.push(Op::Binary(Binary::Add), vec![z, x], f32s(&[2, 3]))
            }),
        ),
        (
            "sub-zero",
            Box::new(|g, x| {
                let z = g.full(0.0, DType::F32, &[d(2), d(3)]);
                g.push(Op::Binary(Binary::Sub), vec![x, z], f32s(&[2, 3]))
            }),
        ),
        (
            "mul-one",
            Box::new(|g, x| {
                let o = g.full(1.0, DType::F32, &[d(2), d(3)]);
                g.push(Op::Binary(Binary::Mul), vec![x, o], f32s(&[2, 3]))
            }),
        ),
        (
            "one-mul",
            Box::new(|g, x| {
                let o = g.full(1.0, DType::F32, &[d(2), d(3)]);
                g.push(Op::Binary(Binary::Mul), vec![o, x], f32s(&[2, 3]))
            }),
        ),
        (
            "div-one",
            Box::new(|g, x| {
                let o = g.full(1.0, DType::F32, &[d(2), d(3)]);
                g.push(Op::Binary(Binary::Div), vec![x, o], f32s(&[2, 3]))
            }),
        ),
        (
            "neg-neg",
            Box::new(|g, x| {
                let n = g.neg(x);
                g.neg(n)
            }),
        ),
        (
            "log-exp",
            Box::new(|g, x| {
                let e = g.unary(Unary::Exp, x);
                g.unary(Unary::Log, e)
            }),
        ),
        (
            "sum-neg",
            Box::new(|g, x| {
                let n = g.neg(x);
                g.reduce(Reduce::Sum, n, &[1])
            }),
        ),
        (
            "reshape-reshape",
            Box::new(|g, x| {
                let r = g.reshape(x, &[d(3), d(2)]);
                g.reshape(r, &[d(6)])
            }),
        ),
        (
            "reshape-noop",
            Box::new(|g, x| {
                let r = g.reshape(x, &[d(6)]);
                g.reshape(r, &[d(2), d(3)])
            }),
        ),
        (
            "broadcast-broadcast",
            Box::new(|g, x| {
                let b = g.broadcast(x, &[d(4), d(2), d(3)]);
                g.broadcast(b, &[d(5), d(4), d(2), d(3)])
            }),
        ),
        ("broadcast-noop", Box::new(|g, x| g.push(Op::Broadcast, vec![x], f32s(&[2, 3])))),
        (
            "permute-permute",
            Box::new(|g, x| {
                let p = g.permute(x, &[1, 0]);
                g.permute(p, &[1, 0])
            }),
        ),
        // Concatenations cut at the same place: [2, 1] then [2, 2] parts.
        (
            "add-concats",
            Box::new(|g, x| {
                let (a, b) = (g.slice(x, 1, d(0), d(1)), g.slice(x, 1, d(1), d(3)));
                let (na, eb) = (g.neg(a), g.unary(Unary::Exp, b));
                let (p, q) = (g.concat(&[a, b], 1), g.concat(&[na, eb], 1));
                g.add(p, q)
            }),
        ),
        (
            "sub-concats",
            Box::new(|g, x| {
                let (a, b) = (g.slice(x, 1, d(0), d(1)), g.slice(x, 1, d(1), d(3)));
                let ea = g.unary(Unary::Exp, a);
                let (p, q) = (g.concat(&[a, b], 1), g.concat(&[ea, b], 1));
                g.sub(p, q)
            }),
        ),
        (
            // RoPE's backward: (x + concat(0, a)) + concat(b, 0).
            "add-concats-after",
            Box::new(|g, x| {
                let (a, b) = (g.slice(x, 1, d(0), d(2)), g.slice(x, 1, d(2), d(3)));
                let (zb, za) = (g.full(0.0, DType::F32, &[d(2), d(1)]), g.full(0.0, DType::F32, &[d(2), d(2)]));
                let (na, eb) = (g.neg(a), g.unary(Unary::Exp, b));
                let (p, q) = (g.concat(&[na, zb], 1), g.concat(&[za, eb], 1));
                let s = g.add(x, p);
                g.add(s, q)
            }),
        ),
    ];
    for (rule, build) in cases {
        let (mut g, x) = base();
        let y = build(&mut g, x);
        g.outputs.push(("y".into(), y));
        fires(rule, g);
    }
}

#[test]
fn permutes_compose_into_one() {
    let mut g = Graph::default();
    let x = g.input("x", f32s(&[2, 3, 4]));
    let p = g.permute(x, &[1, 2, 0]);
    let q = g.permute(p, &[2, 0, 1]);
    let r = g.permute(q, &[0, 2, 1]);
    g.outputs.push(("y".into(), r));
    let (opt, _) = optimize(&g, Limits::default());
    let permutes = opt.nodes.iter().filter(|n| matches!(n.op, Op::Permute(_))).count();
    assert_eq!(permutes, 1, "{}", modelc::ir::print::print(&opt));
    assert_same(&g, &opt, &feeds_for(&g, 3));
}

#[test]
fn every_sinking_rule_fires_and_keeps_values() {
    let names: Vec<String> =
        modelc::opt::rules::rules().iter().map(|r| r.name.to_string()).filter(|n| n.starts_with("sink-")).collect();
    assert_eq!(names.len(), Unary::all().count() + 1 + 15);
    for name in names {
        let k = name.trim_start_matches("sink-broadcast-");
        let mut g = Graph::default();
        let x = g.input("x", f32s(&[3]));
        let y = g.input("y", f32s(&[3]));
        let bx = g.broadcast(x, &[d(4), d(3)]);
        let by = g.broadcast(y, &[d(4), d(3)]);
        let op = match k {
            "cast" => Some(Op::Cast(DType::Int)),
            _ => Unary::from_name(k).map(Op::Unary),
        };
        let out = match op {
            Some(op @ Op::Cast(_)) => g.push(op, vec![bx], TensorTy::new(DType::Int, vec![d(4), d(3)])),
            Some(op) => g.push(op, vec![bx], f32s(&[4, 3])),
            None => {
                let b = Binary::from_name(k).unwrap_or_else(|| panic!("no operation `{k}`"));
                let (p, q) = if matches!(b, Binary::And | Binary::Or) {
                    // Bool operands that are themselves broadcasts of [3].
                    let h = g.input("h", f32s(&[3]));
                    let bh = g.broadcast(h, &[d(4), d(3)]);
                    (g.binary(Binary::Gt, bx, bh), g.binary(Binary::Gt, by, bh))
                } else {
                    (bx, by)
                };
                g.binary(b, p, q)
            }
        };
        g.outputs.push(("y".into(), out));
        fires(&name, g);
    }
}

#[test]
fn constants_fold_and_duplicates_merge() {
    let mut g = Graph::default();
    let x = g.input("x", f32s(&[2]));
    let two = g.constant(2.0, DType::F32);
    let three = g.constant(3.0, DType::F32);
    let six = g.mul(two, three);
    let root = g.unary(Unary::Sqrt, six);
    let a = g.mul(x, root);
    let e1 = g.unary(Unary::Exp, a);
    let e2 = g.unary(Unary::Exp, a);
    let y = g.add(e1, e2);
    g.outputs.push(("y".into(), y));
    let (opt, _) = optimize(&g, Limits::default());
    assert!(
        !opt.nodes.iter().any(|n| matches!(n.op, Op::Unary(Unary::Sqrt))),
        "sqrt(2 * 3) folds:\n{}",
        modelc::ir::print::print(&opt)
    );
    assert_eq!(opt.nodes.iter().filter(|n| matches!(n.op, Op::Unary(Unary::Exp))).count(), 1, "exp is computed once");
    assert_same(&g, &opt, &feeds_for(&g, 9));
}

// ------------------------------------------------------------------ generated graphs

fn build_random(ops: &[(u8, usize, usize)]) -> Graph {
    let mut g = Graph::default();
    let x = g.input("x", f32s(&[2, 3]));
    let y = g.input("y", f32s(&[2, 3]));
    let s = g.input("s", f32s(&[3]));
    let mut pool = vec![x, y, g.broadcast(s, &[d(2), d(3)])];
    for &(op, i, j) in ops {
        let a = pool[i % pool.len()];
        let b = pool[j % pool.len()];
        let n = match op % 14 {
            0 => g.add(a, b),
            1 => g.mul(a, b),
            2 => g.neg(a),
            3 => g.unary(Unary::Tanh, a),
            4 => {
                let z = g.full(0.0, DType::F32, &[d(2), d(3)]);
                g.add(a, z)
            }
            5 => {
                let o = g.full(1.0, DType::F32, &[d(2), d(3)]);
                g.mul(o, a)
            }
            6 => {
                let p = g.permute(a, &[1, 0]);
                g.permute(p, &[1, 0])
            }
            7 => {
                let r = g.reshape(a, &[d(6)]);
                g.reshape(r, &[d(2), d(3)])
            }
            8 => {
                let s1 = g.reduce_keep(Reduce::Sum, a, &[1]);
                g.broadcast(s1, &[d(2), d(3)])
            }
            9 => {
                let e = g.unary(Unary::Exp, a);
                g.unary(Unary::Log, e)
            }
            10 => g.sub(a, b),
            11 => {
                let t = g.transpose_last(a);
                let m = g.matmul(b, t);
                let m = g.slice(m, 1, d(0), d(2));
                let m = g.reduce_keep(Reduce::Sum, m, &[1]);
                g.broadcast(m, &[d(2), d(3)])
            }
            12 => g.binary(Binary::Max, a, b),
            _ => {
                let c = g.binary(Binary::Gt, a, b);
                g.select(c, a, b)
            }
        };
        pool.push(n);
    }
    let last = *pool.last().expect("non-empty");
    g.outputs.push(("out".into(), last));
    g.outputs.push(("mid".into(), pool[pool.len() / 2]));
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn optimised_graphs_compute_the_same(ops in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..24), seed in any::<u64>()) {
        let g = build_random(&ops);
        let (opt, _) = optimize(&g, Limits::default());
        assert_same(&g, &opt, &feeds_for(&g, seed));
    }
}

#[test]
fn optimised_specs_compute_the_same() {
    let small = [("vocab", "32"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")];
    for (spec, sets_) in
        [("specs/llama.model", &small[..]), ("specs/tiny-gpt.model", &[("layers", "1"), ("dim", "16")][..])]
    {
        let text = std::fs::read_to_string(repo().join(spec)).unwrap();
        let (checked, g) = lower_text(&text, &sets(sets_), false);
        let g = modelc::ir::prune::prune(&g);
        let (opt, _) = optimize(&g, Limits::default());
        assert!(opt.nodes.len() < g.nodes.len(), "{spec}: nothing optimised");
        let mut rng = Rng(77);
        let mut feeds = random_params(&checked, &mut rng, 0.3);
        feeds.insert(
            "input_ids".into(),
            Array::new(vec![2, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]),
        );
        let a = run(&g, &feeds, Precision::F64).unwrap();
        let b = run(&opt, &feeds, Precision::F64).unwrap();
        for (p, q) in a["logits"].data.iter().zip(&b["logits"].data) {
            assert!((p - q).abs() < 1e-9, "{spec}: {p} vs {q}");
        }
    }
}

/// `exp(x) / sum(exp(x))` as written by hand, over the last axis of [2, 3].
fn naive_softmax(g: &mut Graph, x: NodeId) -> NodeId {
    let e = g.unary(Unary::Exp, x);
    let s = g.reduce_keep(Reduce::Sum, e, &[1]);
    g.div(e, s)
}

#[test]
fn softmax_rules_make_it_stable_and_fuse_the_log() {
    // Stable: large inputs would overflow exp without the shift.
    let (mut g, x) = base();
    let p = naive_softmax(&mut g, x);
    g.outputs.push(("p".into(), p));
    let (opt, report) = optimize(&g, Limits::default());
    assert!(report.applied.iter().any(|(r, _)| r == "stable-softmax"), "{:?}", report.applied);
    assert!(opt.nodes.iter().any(|n| matches!(n.op, Op::Reduce(Reduce::Max, _))), "{}", modelc::ir::print::print(&opt));
    let mut feeds = feeds_for(&g, 1);
    assert_same(&g, &opt, &feeds);
    feeds.get_mut("x").unwrap().data[0] = 1000.0;
    let out = run(&opt, &feeds, Precision::F64).unwrap();
    assert!(out["p"].data.iter().all(|v| v.is_finite()), "stable softmax overflowed: {:?}", out["p"].data);

    // log(softmax) becomes a log-softmax: no division of probabilities remains.
    let (mut g, x) = base();
    let p = naive_softmax(&mut g, x);
    let l = g.unary(Unary::Log, p);
    g.outputs.push(("l".into(), l));
    let (opt, report) = optimize(&g, Limits::default());
    assert!(report.applied.iter().any(|(r, _)| r == "log-softmax"), "{:?}", report.applied);
    assert!(!opt.nodes.iter().any(|n| matches!(n.op, Op::Binary(Binary::Div))), "{}", modelc::ir::print::print(&opt));
    assert_same(&g, &opt, &feeds_for(&g, 2));
}
