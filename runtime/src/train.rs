//! `modelc train`: trains a spec's model on a text file, one byte per token,
//! with AdamW (or SGD), linear warmup and cosine decay, an evaluation split,
//! and the best-evaluated weights kept in `DIR/model.safetensors`.
//! Settings come from the spec's `train { }` block; flags override them.

use crate::cpu::{Program, Tensor, bind};
use crate::weights::{self, Rng};
use modelc::check::value::Value;
use modelc::cli::{ModelArgs, fail, load};
use modelc::diag::Diagnostic;
use modelc::ir::train::{Optimizer, TrainConfig, state_names, training_program};
use modelc::source::SourceMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to train on; each byte is a token.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write model.safetensors (the best evaluated weights) and metrics.jsonl.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Optimiser steps (default: the spec's `steps`, else 1000).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sequences per step (default: the spec's `batch`, else 16).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the spec's `seq_len`, else 128).
    #[arg(long = "seq-len")]
    pub seq_len: Option<usize>,
    /// Peak learning rate (default: the spec's `lr`, else 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay (default: the spec's `weight_decay`, else 0).
    #[arg(long = "weight-decay")]
    pub weight_decay: Option<f64>,
    /// Steps of linear warmup before the cosine decay to lr / 10.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Clip the global gradient norm (0 turns clipping off).
    #[arg(long)]
    pub clip: Option<f64>,
    /// adamw or sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Fraction of the data held out for evaluation.
    #[arg(long = "eval-split")]
    pub eval_split: Option<f64>,
    /// Evaluate (and keep the best weights) every N steps (default: the spec's `eval_every`, else 100).
    #[arg(long = "eval-every")]
    pub eval_every: Option<usize>,
    /// Seeds the initial weights and the batches; the same seed repeats a run exactly.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the whole training state (weights, optimiser state, step) every N steps.
    #[arg(long = "checkpoint-every", default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Stop after this step (the schedule still spans --steps); continue later with --resume.
    #[arg(long)]
    pub until: Option<usize>,
    /// Continue the run saved in this folder (`state.safetensors`) with the same losses
    /// an uninterrupted run would have had.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

fn usage(message: impl Into<String>) -> ExitCode {
    fail(&SourceMap::new(), &[Diagnostic::new("E0701", message)])
}

/// A training setting: the flag, else the spec's `train` block, else a default.
fn setting(settings: &[(String, Value)], key: &str, flag: Option<f64>, default: f64) -> f64 {
    flag.or_else(|| settings.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_f64())).unwrap_or(default)
}

pub fn run(args: &TrainArgs) -> ExitCode {
    let (program, opts) = match load(&args.model) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let lower = |training| {
        modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training, ..Default::default() })
    };
    let (checked, train_fwd) = match lower(true) {
        Ok(v) => v,
        Err(d) => return fail(&program.sources, &d),
    };
    let (_, eval_fwd) = match lower(false) {
        Ok(v) => v,
        Err(d) => return fail(&program.sources, &d),
    };
    if eval_fwd.output("loss").is_none() {
        return usage(format!("`{}` has no `train {{ loss: ... }}` block to train", checked.model));
    }
    if checked.inputs.len() != 1 || checked.inputs[0].name != "input_ids" {
        return usage(format!("`train --data` feeds bytes as `input_ids`; `{}` takes other inputs", checked.model));
    }
    let s = &checked.train;
    let steps = setting(s, "steps", args.steps.map(|v| v as f64), 1000.0) as usize;
    let batch = setting(s, "batch", args.batch.map(|v| v as f64), 16.0) as usize;
    let seq = setting(s, "seq_len", args.seq_len.map(|v| v as f64), 128.0) as usize;
    let lr = setting(s, "lr", args.lr, 1e-3);
    let wd = setting(s, "weight_decay", args.weight_decay, 0.0);
    let warmup = setting(s, "warmup", args.warmup.map(|v| v as f64), 0.0) as usize;
    let clip = setting(s, "clip", args.clip, 0.0);
    let eval_split = setting(s, "eval_split", args.eval_split, 0.1);
    let eval_every = (setting(s, "eval_every", args.eval_every.map(|v| v as f64), 100.0) as usize).max(1);
    let betas = s.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("optimizer", Value::Record(_, fields)) => {
            fields.iter().find(|(f, _)| f == "betas").and_then(|(_, b)| match b {
                Value::List(items) if items.len() == 2 => Some((items[0].as_f64()?, items[1].as_f64()?)),
                _ => None,
            })
        }
        _ => None,
    });
    let spec_opt = s.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("optimizer", Value::Record(name, _)) => Some(name.clone()),
        _ => None,
    });
    let optimizer = match args.optimizer.clone().or(spec_opt).as_deref().unwrap_or("adamw") {
        "adamw" => {
            let (beta1, beta2) = betas.unwrap_or((0.9, 0.999));
            Optimizer::AdamW { beta1, beta2, eps: 1e-8, weight_decay: wd }
        }
        "sgd" => Optimizer::Sgd { momentum: 0.9, weight_decay: wd },
        other => return usage(format!("--optimizer {other}: expected adamw or sgd")),
    };
    if batch == 0 || seq < 2 || steps == 0 {
        return usage("--batch, --steps must be at least 1 and --seq-len at least 2");
    }
    let text = match std::fs::read(&args.data) {
        Ok(t) => t,
        Err(e) => return usage(format!("cannot read {}: {e}", args.data.display())),
    };
    let eval_len = ((text.len() as f64) * eval_split.clamp(0.0, 0.9)) as usize;
    let (train_text, eval_text) = text.split_at(text.len() - eval_len);
    if train_text.len() <= seq || (eval_len > 0 && eval_text.len() <= seq) {
        return usage(format!(
            "{} has {} bytes: too few for sequences of {seq} with a {eval_split} eval split",
            args.data.display(),
            text.len()
        ));
    }

    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let cfg = TrainConfig { optimizer, clip: (clip > 0.0).then_some(clip) };
    let step_graph = modelc::ir::prune::prune(&training_program(&train_fwd, &trainable, &cfg).expect("has a loss"));
    let (step_graph, _) = modelc::opt::optimize(&step_graph, modelc::opt::Limits::default());
    let mut eval_graph = modelc::ir::prune::prune(&eval_fwd);
    eval_graph.outputs.retain(|(n, _)| n == "loss");
    let eval_graph = modelc::ir::prune::prune(&eval_graph);
    let (eval_graph, _) = modelc::opt::optimize(&eval_graph, modelc::opt::Limits::default());

    let mut rng = Rng::new(args.seed);
    let mut state = weights::init(&checked.params, &mut rng);
    for p in &checked.params {
        if p.trainable {
            for n in state_names(&optimizer, &p.name) {
                let t = &state[&p.name];
                state.insert(n, Tensor::new(t.shape.clone(), vec![0.0; t.data.len()]));
            }
        }
    }
    let mut first_step = 1;
    let mut best = f64::INFINITY;
    if let Some(dir) = &args.resume {
        let (saved, meta) = match weights::load_all(&dir.join("state.safetensors")) {
            Ok(v) => v,
            Err(e) => return usage(e),
        };
        for (name, t) in &state {
            match saved.get(name) {
                Some(s) if s.shape == t.shape => {}
                Some(s) => {
                    return usage(format!(
                        "--resume: `{name}` is {:?} in the saved state, the model has {:?}",
                        s.shape, t.shape
                    ));
                }
                None => return usage(format!("--resume: the saved state has no `{name}`")),
            }
        }
        state = saved;
        first_step = meta.get("step").and_then(|s| s.parse::<usize>().ok()).unwrap_or(0) + 1;
        best = meta.get("best_eval").and_then(|s| s.parse().ok()).unwrap_or(f64::INFINITY);
        eprintln!("resuming {} at step {first_step}", dir.display());
    }
    let mut shapes: HashMap<String, Vec<usize>> = state.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    shapes.insert("input_ids".into(), vec![batch, seq]);
    shapes.insert("lr".into(), vec![]);
    shapes.insert("step".into(), vec![]);
    let compile = |g| bind(g, &shapes).and_then(|sizes| Program::compile(g, &sizes));
    let (step_program, eval_program) = match (compile(&step_graph), compile(&eval_graph)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return usage(format!("cannot create {}: {e}", args.out.display()));
    }
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(args.resume.is_some())
        .write(true)
        .truncate(args.resume.is_none())
        .open(args.out.join("metrics.jsonl"));
    let mut metrics = match metrics_file {
        Ok(f) => f,
        Err(e) => return usage(format!("cannot write {}: {e}", args.out.join("metrics.jsonl").display())),
    };
    eprintln!(
        "training {} ({} trainable parameters) on {} ({} bytes, {} held out): {steps} steps of {batch} x {seq}",
        checked.model,
        modelc::check::report::thousands(checked.trainable_params()),
        args.data.display(),
        text.len(),
        eval_len
    );

    let window =
        |data: &[u8], start: usize| -> Vec<f32> { data[start..start + seq].iter().map(|b| *b as f32).collect() };
    let evaluate = |state: &HashMap<String, Tensor>| -> Result<f64, String> {
        // Evenly spaced windows over the held-out text, the same every time.
        let positions = eval_text.len() - seq;
        let batches = (positions / (batch * seq)).clamp(1, 8);
        let mut total = 0.0;
        for b in 0..batches {
            let ids: Vec<f32> =
                (0..batch).flat_map(|k| window(eval_text, (b * batch + k) * positions / (batches * batch))).collect();
            let mut feeds: HashMap<String, Tensor> =
                state.iter().filter(|(k, _)| !k.contains(':')).map(|(k, v)| (k.clone(), v.clone())).collect();
            feeds.insert("input_ids".into(), Tensor::new(vec![batch, seq], ids));
            total += eval_program.run(&feeds)?["loss"].data[0] as f64;
        }
        Ok(total / batches as f64)
    };

    let started = Instant::now();
    let mut last_report = Instant::now();
    let save_state = |state: &HashMap<String, Tensor>, step: usize, best: f64| {
        let meta = HashMap::from([("step".to_string(), step.to_string()), ("best_eval".to_string(), best.to_string())]);
        weights::save_with(&args.out.join("state.safetensors"), state, Some(meta))
    };
    let mut last = args.until.unwrap_or(steps).min(steps);
    // Ctrl-C ends the run after the current step, with everything saved.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let mut step = first_step;
    while step <= last {
        let rate = if step <= warmup {
            lr * step as f64 / warmup as f64
        } else {
            // Cosine from lr down to lr / 10 over the remaining steps.
            let progress = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
            lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
        };
        // Batches depend only on (seed, step), so a resumed run sees the same ones.
        let mut batch_rng = Rng::new(args.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step as u64);
        let ids: Vec<f32> =
            (0..batch).flat_map(|_| window(train_text, batch_rng.below(train_text.len() - seq))).collect();
        let mut feeds = std::mem::take(&mut state);
        feeds.insert("input_ids".into(), Tensor::new(vec![batch, seq], ids));
        feeds.insert("lr".into(), Tensor::new(vec![], vec![rate as f32]));
        feeds.insert("step".into(), Tensor::new(vec![], vec![step as f32]));
        let out = match step_program.run(&feeds) {
            Ok(o) => o,
            Err(e) => return usage(format!("step {step}: {e}")),
        };
        let loss = out["loss"].data[0] as f64;
        if !loss.is_finite() {
            return usage(format!("step {step}: the loss is {loss}; lower --lr or enable --clip"));
        }
        state = feeds;
        state.remove("input_ids");
        state.remove("lr");
        state.remove("step");
        for (name, value) in out {
            if let Some(p) = name.strip_prefix("new:") {
                state.insert(p.to_string(), value);
            } else if name.contains(':') {
                state.insert(name, value);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let tps = ((step - first_step + 1) * batch * seq) as f64 / elapsed;
        let _ = writeln!(
            metrics,
            "{{\"step\": {step}, \"loss\": {loss:.5}, \"lr\": {rate:.3e}, \"tokens_per_s\": {tps:.0}}}"
        );
        let eval_now = eval_len > 0 && (step % eval_every == 0 || step == last);
        if eval_now {
            let eval = match evaluate(&state) {
                Ok(e) => e,
                Err(e) => return usage(format!("evaluation at step {step}: {e}")),
            };
            let _ = writeln!(metrics, "{{\"step\": {step}, \"eval_loss\": {eval:.5}}}");
            let improved = eval < best;
            if improved {
                best = eval;
                let params: HashMap<String, Tensor> =
                    state.iter().filter(|(k, _)| !k.contains(':')).map(|(k, v)| (k.clone(), v.clone())).collect();
                if let Err(e) = weights::save(&args.out.join("model.safetensors"), &params) {
                    return usage(e);
                }
            }
            eprintln!(
                "step {step:>5}/{steps}  loss {loss:.3}  eval {eval:.3}{}  lr {rate:.2e}  {tps:.0} tok/s  {elapsed:.0} s",
                if improved { " (best, saved)" } else { "" }
            );
            last_report = Instant::now();
        } else if last_report.elapsed().as_secs_f64() > 5.0 && step % 10 == 0 {
            let eta = elapsed / (step - first_step + 1) as f64 * (steps - step) as f64;
            eprintln!("step {step:>5}/{steps}  loss {loss:.3}  lr {rate:.2e}  {tps:.0} tok/s  eta {eta:.0} s");
            last_report = Instant::now();
        }
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("interrupted: saving the state at step {step}; continue with --resume {}", args.out.display());
            last = step;
        }
        let checkpoint = (args.checkpoint_every > 0 && step % args.checkpoint_every == 0) || step == last;
        if checkpoint && let Err(e) = save_state(&state, step, best) {
            return usage(e);
        }
        step += 1;
    }
    if eval_len == 0 {
        let params: HashMap<String, Tensor> = state.into_iter().filter(|(k, _)| !k.contains(':')).collect();
        if let Err(e) = weights::save(&args.out.join("model.safetensors"), &params) {
            return usage(e);
        }
    }
    eprintln!("best eval loss {best:.3}; weights in {}", args.out.join("model.safetensors").display());
    ExitCode::SUCCESS
}
