//! Forward passes on the reference interpreter and on the CPU backend, in
//! the same run: `cargo bench -p modelc-runtime --bench forward`. Prints
//! medians and the speed-up, and the JIT compile time of each program.

mod common;

use common::median;
use modelc::check::{self, LowerOptions, Options};
use modelc::ir::interp::{Array, Precision, run};
use modelc_runtime::cpu::{Program, Tensor, bind};
use std::collections::HashMap;
use std::time::Instant;

fn bench(spec: &str, sets: &[(&str, &str)], batch: usize, seq: usize) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo");
    let program = check::load_file(&root.join(spec)).unwrap_or_else(|_| panic!("{spec} loads"));
    let opts = Options { config: None, sets: sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
    let (checked, g) = check::lower(&program, &opts, LowerOptions::default()).expect("spec checks");
    let g = modelc::ir::prune::prune(&g);
    let (g, _) = modelc::opt::optimize(&g, modelc::opt::Limits::default());
    let mut state = 12345u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut feeds: HashMap<String, Array> = HashMap::new();
    for p in &checked.params {
        let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
        let n = shape.iter().product();
        feeds.insert(p.name.clone(), Array::new(shape, (0..n).map(|_| next() * 0.1).collect()));
    }
    feeds.insert(
        "input_ids".into(),
        Array::new(vec![batch, seq], (0..batch * seq).map(|i| (i * 7 % 200) as f64).collect()),
    );
    let tensors: HashMap<String, Tensor> = feeds
        .iter()
        .map(|(k, v)| (k.clone(), Tensor::new(v.shape.clone(), v.data.iter().map(|x| *x as f32).collect())))
        .collect();
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let sizes = bind(&g, &shapes).expect("sizes bind");
    let compile: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            Program::compile(&g, &sizes).expect("compiles");
            t.elapsed().as_secs_f64()
        })
        .collect();
    let compiled = Program::compile(&g, &sizes).expect("compiles");
    let time = |f: &mut dyn FnMut(), n: usize| -> f64 {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(Vec::new(), |mut v, x| {
                v.push(x);
                v
            })
            .pipe(median)
    };
    let interp = time(&mut || drop(run(&g, &feeds, Precision::F32).expect("runs")), 7);
    let cpu = time(&mut || drop(compiled.run(&tensors).expect("runs")), 31);
    println!(
        "{spec} {sets:?} batch {batch} x {seq}: interpreter {:.1} ms, cpu {:.2} ms, {:.0}x faster; jit compile {:.1} ms ({} kernels, peak {} KiB)",
        interp * 1e3,
        cpu * 1e3,
        interp / cpu,
        median(compile) * 1e3,
        compiled.schedule().kernels.len(),
        compiled.peak_bytes() / 1024
    );
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

/// One AdamW step of a spec's training program at `batch` x `seq`.
fn train_step(spec: &str, batch: usize, seq: usize) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo");
    let program = check::load_file(&root.join(spec)).unwrap_or_else(|_| panic!("{spec} loads"));
    let (checked, g) =
        check::lower(&program, &Options::default(), LowerOptions { training: true, ..Default::default() })
            .expect("spec checks");
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let cfg = modelc::ir::train::TrainConfig { clip: Some(1.0), ..Default::default() };
    let step =
        modelc::ir::prune::prune(&modelc::ir::train::training_program(&g, &trainable, &cfg).expect("has a loss"));
    let (step, _) = modelc::opt::optimize(&step, modelc::opt::Limits::default());
    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for (name, id) in step.inputs().chain(step.params()) {
        let dims: Vec<usize> = step
            .dims(id)
            .iter()
            .map(|d| d.as_const().map(|v| v as usize).unwrap_or(if d.to_string() == "B" { batch } else { seq }))
            .collect();
        let n = dims.iter().product();
        let data = match name {
            "input_ids" => (0..n).map(|i| (i * 31 % 256) as f32).collect(),
            "lr" => vec![1e-3],
            "step" => vec![1.0],
            _ => (0..n).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.02).collect(),
        };
        feeds.insert(name.to_string(), Tensor::new(dims, data));
    }
    let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let compiled = Program::compile(&step, &bind(&step, &shapes).expect("sizes")).expect("compiles");
    compiled.run(&feeds).expect("runs");
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            compiled.run(&feeds).expect("runs");
            t.elapsed().as_secs_f64()
        })
        .collect();
    let t = median(times);
    println!(
        "{spec} training step, batch {batch} x {seq}: {:.1} ms, {:.0} tokens/s; jit compile {:.0} ms ({} kernels, peak {} MiB)",
        t * 1e3,
        (batch * seq) as f64 / t,
        compiled.compile_seconds * 1e3,
        compiled.schedule().kernels.len(),
        compiled.peak_bytes() >> 20
    );
}

fn main() {
    bench("specs/tiny-gpt.model", &[], 4, 64);
    bench(
        "specs/llama.model",
        &[("vocab", "256"), ("dim", "64"), ("layers", "2"), ("heads", "4"), ("kv_heads", "2"), ("hidden", "128")],
        2,
        32,
    );
    train_step("specs/tiny-gpt.model", 16, 128);
}
