//! `modelc train`: trains a spec's model on text (bytes as tokens, or a
//! Hugging Face tokenizer) or on one fixed batch, with AdamW or SGD, linear
//! warmup and cosine decay, clipping, gradient accumulation, an evaluation
//! split and the best-evaluated weights kept in `DIR/model.safetensors`.
//! Settings come from the spec's `train { }` block; flags override them.
//!
//! Batches depend only on (seed, step), so `--resume` repeats an
//! uninterrupted run exactly. Every file is written atomically.

use crate::cli::{ModelArgs, fail, load};
use crate::cpu::{Program, Tensor};
use crate::examples::{EvalBatch, Examples};
use crate::flags;
use crate::masking::Masking;
use crate::model::Compiled;
use crate::model::{Device, RunArgs, compile, error};
use crate::run_dir::{self, RunDir, write_atomic};
use crate::tokenize::Tokenizer;
use crate::weights::{self, Rng, Tensors};
use modelc::check::value::Value;
use modelc::check::{Checked, LowerOptions};
use modelc::ir::graph::Graph;
use modelc::ir::signature::Role;
use modelc::ir::train::{Optimizer, TrainConfig, gradient_program, state_names, training_program, update_program};
use modelc::types::TensorTy;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const CODE: &str = "E0701";

/// The bits of f32 infinity: a value whose magnitude's bits are below them is finite.
const INFINITY_BITS: u32 = 0x7f80_0000;

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Text to train on (bytes as tokens unless --tokenizer is given), or examples: a
    /// .safetensors file with a tensor per model input and target (`pixel_values` and
    /// `labels`; `src_ids`, `tgt_ids` and `labels`), examples along the first axis.
    #[arg(long, required_unless_present = "batch_file")]
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to turn the text into tokens.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Train on exactly the `input_ids` [B, T] in this safetensors file, every step
    /// (next-token targets shifted as Hugging Face does); no evaluation split.
    #[arg(long = "batch-file", conflicts_with = "data")]
    pub batch_file: Option<PathBuf>,
    /// Start from these weights (safetensors file, sharded index or folder) instead of
    /// the spec's initialisers.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where to write model.safetensors (the best evaluated weights), config.json,
    /// state.safetensors, metrics.jsonl and loss.png.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Optimiser steps, at least 1 (default: the spec's `steps`, else 1000).
    #[arg(long, conflicts_with = "epochs", value_parser = flags::count)]
    pub steps: Option<usize>,
    /// Train for this many passes over the training text instead of a number of steps (> 0).
    #[arg(long, value_parser = flags::positive)]
    pub epochs: Option<f64>,
    /// Sequences per step, at least 1 (default: the spec's `batch`, else 16).
    #[arg(long, value_parser = flags::count)]
    pub batch: Option<usize>,
    /// Tokens per sequence, at least 2 (default: the spec's `seq_len`, else 128).
    #[arg(long = "seq-len", value_parser = flags::count)]
    pub seq_len: Option<usize>,
    /// Micro-batches whose gradients are averaged per step, at least 1 (default: the spec's
    /// `grad_accum`, else 1).
    #[arg(long = "grad-accum", value_parser = flags::count)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate, >= 0 (default: the spec's `lr`, else 1e-3).
    #[arg(long, value_parser = flags::non_negative)]
    pub lr: Option<f64>,
    /// Decoupled weight decay, >= 0 (default: the spec's `weight_decay`, else 0).
    #[arg(long = "weight-decay", value_parser = flags::non_negative)]
    pub weight_decay: Option<f64>,
    /// Steps of linear warmup from 0 to --lr (default: the spec's `warmup`, else 0).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// How the learning rate falls after warmup: `cosine` (to --min-lr at the last step),
    /// `linear` (likewise) or `constant`; step k takes transformers' schedule at k - 1
    /// (default: the spec's `schedule`, else cosine).
    #[arg(long, value_parser = ["cosine", "linear", "constant"])]
    pub schedule: Option<String>,
    /// The learning rate the cosine and linear schedules end at, >= 0 (default: the
    /// spec's `min_lr`, else 0, as transformers' schedules).
    #[arg(long = "min-lr", value_parser = flags::non_negative)]
    pub min_lr: Option<f64>,
    /// Clip the global gradient norm, >= 0 (0 turns clipping off).
    #[arg(long, value_parser = flags::non_negative)]
    pub clip: Option<f64>,
    /// adamw or sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Fraction of the data held out for evaluation, in [0, 1).
    #[arg(long = "eval-split", value_parser = flags::fraction)]
    pub eval_split: Option<f64>,
    /// Evaluate (and keep the best weights) every N steps (default: the spec's `eval_every`, else 100).
    #[arg(long = "eval-every", value_parser = flags::count)]
    pub eval_every: Option<usize>,
    /// Seeds the initial weights and the batches; the same seed repeats a run exactly.
    /// (default: the spec's `seed`, else 0)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also write the whole training state (weights, optimiser state, step) every N steps.
    /// (default: the spec's `checkpoint_every`, else 100; 0: only at the end)
    #[arg(long = "checkpoint-every")]
    pub checkpoint_every: Option<usize>,
    /// Stop after this step (the schedule still spans --steps); continue later with --resume.
    #[arg(long)]
    pub until: Option<usize>,
    /// Continue the run saved in this folder (`state.safetensors`) with the same losses
    /// an uninterrupted run would have had.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace the run the --out folder holds (without it, a folder holding a run is
    /// only continued, with --resume).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Hold at most this much memory besides the training state (weights, gradients and
    /// the optimiser's moments), e.g. 2GiB or 300MB: the step's products in smaller row chunks and its activations
    /// recomputed between checkpoints in the backward pass, the fastest plan that fits
    /// (CPU). Without it, the fastest plan.
    #[arg(long = "memory-budget", value_parser = flags::bytes)]
    pub memory_budget: Option<u64>,
    /// How the matrix products multiply: `f32`, or `bf16` (operands rounded to bf16, sums
    /// in f32, weights and optimiser state kept in f32: mixed precision, twice the
    /// multiply-adds a second on CPUs with AVX512_BF16; CPU only). (default: the spec's
    /// `precision`, else f32)
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// Write the gradients of the first step, by weight name, to this safetensors file.
    #[arg(long = "dump-grads")]
    pub dump_grads: Option<PathBuf>,
}

/// A training setting: the flag, else the spec's `train` block, else a default.
fn setting(settings: &[(String, Value)], key: &str, flag: Option<f64>, default: f64) -> f64 {
    flag.or_else(|| settings.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_f64())).unwrap_or(default)
}

/// A setting that names a choice, quoted (`"linear"`) or bare (`bf16`).
fn word(v: &Value) -> String {
    match v {
        Value::Str(name) => name.clone(),
        Value::Record(name, fields) if fields.is_empty() => name.clone(),
        other => other.to_string(),
    }
}

/// Everything the run needs to know, resolved from flags and the spec.
struct Settings {
    seed: u64,
    checkpoint_every: usize,
    /// Passes over the training text, when given instead of steps.
    epochs: Option<f64>,
    steps: usize,
    batch: usize,
    seq: usize,
    accumulate: usize,
    lr: f64,
    warmup: usize,
    schedule: Schedule,
    min_lr: f64,
    eval_split: f64,
    eval_every: usize,
    config: TrainConfig,
    products: crate::cpu::Products,
}

/// The learning rate's course after warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Schedule {
    Cosine,
    Linear,
    Constant,
}

fn settings(args: &TrainArgs, s: &[(String, Value)]) -> Result<Settings, String> {
    let number = |key: &str, flag: Option<usize>, default: f64| setting(s, key, flag.map(|v| v as f64), default);
    let wd = setting(s, "weight_decay", args.weight_decay, 0.0);
    let record = s.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("optimizer", Value::Record(name, fields)) => Some((name.clone(), fields.clone())),
        _ => None,
    });
    let field = |key: &str| -> Option<Value> {
        let fields = record.as_ref().map(|(_, f)| f.as_slice()).unwrap_or(&[]);
        fields.iter().chain(s.iter()).find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let betas = match field("betas") {
        Some(Value::List(items)) if items.len() == 2 => {
            Some((items[0].as_f64().unwrap_or(0.9), items[1].as_f64().unwrap_or(0.999)))
        }
        _ => None,
    };
    let optimizer =
        match args.optimizer.clone().or(record.as_ref().map(|(n, _)| n.clone())).as_deref().unwrap_or("adamw") {
            "adamw" => {
                let (beta1, beta2) = betas.unwrap_or((0.9, 0.999));
                Optimizer::AdamW { beta1, beta2, eps: 1e-8, weight_decay: wd }
            }
            "sgd" => {
                let momentum = field("momentum").and_then(|v| v.as_f64()).unwrap_or(0.9);
                Optimizer::Sgd { momentum, weight_decay: wd }
            }
            other => return Err(format!("--optimizer {other}: expected adamw or sgd")),
        };
    let clip = flags::check("clip", setting(s, "clip", args.clip, 0.0), flags::non_negative)?;
    let spec_schedule = s.iter().find(|(k, _)| k == "schedule").map(|(_, v)| word(v));
    let schedule = match args.schedule.clone().or(spec_schedule).as_deref().unwrap_or("cosine") {
        "cosine" => Schedule::Cosine,
        "linear" => Schedule::Linear,
        "constant" => Schedule::Constant,
        other => return Err(format!("schedule `{other}`: expected cosine, linear or constant")),
    };
    let spec_precision = s.iter().find(|(k, _)| k == "precision").map(|(_, v)| word(v));
    let products = crate::cpu::Products::parse(args.precision.clone().or(spec_precision).as_deref().unwrap_or("f32"))?;
    flags::check("weight_decay", wd, flags::non_negative)?;
    let epochs = args.epochs.or_else(|| s.iter().find(|(k, _)| k == "epochs").and_then(|(_, v)| v.as_f64()));
    if let Some(e) = epochs {
        flags::check("epochs", e, flags::positive)?;
    }
    let settings = Settings {
        seed: args.seed.unwrap_or_else(|| setting(s, "seed", None, 0.0) as u64),
        checkpoint_every: number("checkpoint_every", args.checkpoint_every, 100.0) as usize,
        epochs: if args.steps.is_some() { None } else { epochs },
        steps: number("steps", args.steps, 1000.0) as usize,
        batch: number("batch", args.batch, 16.0) as usize,
        seq: number("seq_len", args.seq_len, 128.0) as usize,
        accumulate: number("grad_accum", args.grad_accum, 1.0) as usize,
        lr: flags::check("lr", setting(s, "lr", args.lr, 1e-3), flags::non_negative)?,
        warmup: number("warmup", args.warmup, 0.0) as usize,
        schedule,
        min_lr: flags::check("min_lr", setting(s, "min_lr", args.min_lr, 0.0), flags::non_negative)?,
        eval_split: flags::check("eval_split", setting(s, "eval_split", args.eval_split, 0.1), flags::fraction)?,
        eval_every: (number("eval_every", args.eval_every, 100.0) as usize).max(1),
        config: TrainConfig { optimizer, clip: (clip > 0.0).then_some(clip) },
        products,
    };
    if settings.batch == 0 || settings.seq < 2 || settings.steps == 0 || settings.accumulate == 0 {
        return Err("--batch, --steps and --grad-accum must be at least 1 and --seq-len at least 2".into());
    }
    Ok(settings)
}

impl Settings {
    /// The learning rate of step `step` (from 1): transformers' schedules
    /// (`get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
    /// constant with warmup) at step - 1, as their first optimiser step
    /// reads the schedule at 0; cosine and linear fall to `min_lr`.
    fn rate(&self, step: usize) -> f64 {
        let k = step.saturating_sub(1);
        if k < self.warmup {
            return self.lr * k as f64 / self.warmup as f64;
        }
        let progress = (k - self.warmup) as f64 / self.steps.saturating_sub(self.warmup).max(1) as f64;
        let factor = match self.schedule {
            Schedule::Constant => return self.lr,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => (1.0 - progress).max(0.0),
        };
        self.min_lr + (self.lr - self.min_lr) * factor
    }
}

/// What the batches come from.
enum Data {
    /// Token ids of the training text and of the held-out end of it.
    Text { train: Vec<u32>, eval: Vec<u32> },
    /// `--batch-file`: the same batch every step.
    Fixed(Tensor),
    /// A safetensors file of examples, one tensor per input and target.
    Examples(Examples),
}

impl Data {
    fn load(args: &TrainArgs, s: &mut Settings, checked: &Checked, vocab: Option<usize>) -> Result<Data, String> {
        if let Some(path) = &args.batch_file {
            let (mut tensors, _) = weights::load_all(path)?;
            let ids =
                tensors.remove("input_ids").ok_or_else(|| format!("{} has no `input_ids` tensor", path.display()))?;
            if ids.shape.len() != 2 || ids.shape[1] < 2 {
                return Err(format!("{}: `input_ids` is {:?}, expected [B, T] with T >= 2", path.display(), ids.shape));
            }
            (s.batch, s.seq, s.eval_split) = (ids.shape[0], ids.shape[1], 0.0);
            check_vocab(ids.data.iter().map(|v| *v as u32), vocab)?;
            return Ok(Data::Fixed(ids));
        }
        let path = args.data.as_ref().expect("clap requires --data or --batch-file");
        if crate::examples::is_examples(path) {
            let examples = Examples::load(path, checked, s.eval_split)?;
            if let Some(epochs) = s.epochs {
                let per_step = (s.batch * s.accumulate) as f64;
                s.steps = (epochs * examples.train_count() as f64 / per_step).ceil().max(1.0) as usize;
            }
            return Ok(Data::Examples(examples));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let tokens: Vec<u32> = match &args.tokenizer {
            None => bytes.iter().map(|b| u32::from(*b)).collect(),
            Some(t) => {
                let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
                let tok = Tokenizer::open(Some(t))?;
                tok.encode(&text)?.into_iter().map(|i| i as u32).collect()
            }
        };
        check_vocab(tokens.iter().copied(), vocab)?;
        let eval_len = (tokens.len() as f64 * s.eval_split) as usize;
        let (train, eval) = tokens.split_at(tokens.len() - eval_len);
        if train.len() <= s.seq || (eval_len > 0 && eval.len() <= s.seq) {
            return Err(format!(
                "{} has {} tokens: too few for sequences of {} with a {} eval split",
                path.display(),
                tokens.len(),
                s.seq,
                s.eval_split
            ));
        }
        if let Some(epochs) = s.epochs {
            s.steps =
                ((epochs * train.len() as f64) / (s.batch * s.seq * s.accumulate) as f64).ceil().max(1.0) as usize;
        }
        Ok(Data::Text { train: train.to_vec(), eval: eval.to_vec() })
    }

    /// Micro-batch `micro` of `step`'s feeds, which depend only on (seed, step,
    /// micro): random windows of the text (masked for a masked-language
    /// model), or the next examples.
    fn batch(&self, seed: u64, step: usize, micro: usize, s: &Settings, masking: Option<&Masking>) -> Tensors {
        let key = (step as u64) | ((micro as u64) << 40);
        let ids = match self {
            Data::Examples(e) => return e.batch(seed, step, micro, s.batch, s.accumulate),
            Data::Fixed(ids) => ids.clone(),
            Data::Text { train, .. } => {
                let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ key);
                let ids = (0..s.batch).flat_map(|_| window(train, rng.below(train.len() - s.seq), s.seq)).collect();
                Tensor::new(vec![s.batch, s.seq], ids)
            }
        };
        token_feeds(ids, masking, seed, key)
    }

    /// What an evaluation reads, the same every time: every held-out
    /// example, or evenly spaced windows over the held-out text.
    fn eval_batches(&self, s: &Settings, masking: Option<&Masking>) -> Vec<EvalBatch> {
        if let Data::Examples(e) = self {
            return e.eval_batches(s.batch);
        }
        let windows = self.eval_windows(s).into_iter().enumerate();
        windows
            .map(|(i, ids)| EvalBatch { feeds: token_feeds(ids, masking, s.seed, u64::MAX - i as u64), rows: s.batch })
            .collect()
    }

    /// The fed tensors' shapes for a batch.
    fn shapes(&self, s: &Settings, masking: Option<&Masking>) -> Vec<(String, Vec<usize>)> {
        if let Data::Examples(e) = self {
            return e.shapes(s.batch);
        }
        let names = if masking.is_some() { &["input_ids", "labels"][..] } else { &["input_ids"][..] };
        names.iter().map(|n| (n.to_string(), vec![s.batch, s.seq])).collect()
    }

    fn eval_windows(&self, s: &Settings) -> Vec<Tensor> {
        let Data::Text { eval, .. } = self else { return Vec::new() };
        if eval.is_empty() {
            return Vec::new();
        }
        let positions = eval.len() - s.seq;
        let count = (positions / (s.batch * s.seq)).clamp(1, 8);
        (0..count)
            .map(|b| {
                let ids = (0..s.batch)
                    .flat_map(|k| window(eval, (b * s.batch + k) * positions / (count * s.batch), s.seq))
                    .collect();
                Tensor::new(vec![s.batch, s.seq], ids)
            })
            .collect()
    }

    fn held_out(&self) -> usize {
        match self {
            Data::Text { eval, .. } => eval.len(),
            Data::Fixed(_) => 0,
            Data::Examples(e) => e.held_out(),
        }
    }

    /// Tokens, or examples: what the run counts its data and speed in.
    fn size(&self) -> usize {
        match self {
            Data::Text { train, eval } => train.len() + eval.len(),
            Data::Fixed(t) => t.data.len(),
            Data::Examples(e) => e.count(),
        }
    }

    /// The unit of `size`, and the amount of it one micro-batch holds.
    fn unit(&self, s: &Settings) -> (&'static str, usize) {
        match self {
            Data::Examples(_) => ("examples", s.batch),
            _ => ("tokens", s.batch * s.seq),
        }
    }
}

/// The feeds of a batch of token ids: the ids, or for a masked-language
/// model the masked ids and their labels (seeded by `key`).
fn token_feeds(ids: Tensor, masking: Option<&Masking>, seed: u64, key: u64) -> Tensors {
    let Some(m) = masking else { return Tensors::from([("input_ids".to_string(), ids)]) };
    let (inputs, labels) = m.apply(&ids.data, &mut Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ key));
    Tensors::from([
        ("input_ids".to_string(), Tensor::new(ids.shape.clone(), inputs)),
        ("labels".to_string(), Tensor::new(ids.shape, labels)),
    ])
}

fn window(data: &[u32], start: usize, len: usize) -> Vec<f32> {
    data[start..start + len].iter().map(|t| *t as f32).collect()
}

fn check_vocab(tokens: impl Iterator<Item = u32>, vocab: Option<usize>) -> Result<(), String> {
    let (Some(vocab), Some(max)) = (vocab, tokens.max()) else { return Ok(()) };
    if max as usize >= vocab {
        return Err(format!(
            "the data holds token {max}, outside the model's vocabulary of {vocab} (a tokenizer for another model?)"
        ));
    }
    Ok(())
}

/// The compiled programs of one run.
enum Step {
    /// Forward, backward and update in one program.
    Fused(Compiled),
    /// Gradients per micro-batch, averaged, then the update.
    Accumulated { grads: Compiled, update: Compiled },
}

/// What a step reports.
struct Outcome {
    loss: f64,
    grad_norm: f64,
    /// What the step reports beside the loss (`Role::Metric`), by name.
    metrics: Vec<(String, Tensor)>,
    /// Whether every weight the step updated is finite.
    weights_finite: bool,
    /// Whether the state is still the one from before a step that failed:
    /// not when weights it wrote over in place overflowed.
    kept: bool,
}

impl Step {
    /// The weights and optimiser state the step writes over in place.
    fn written(&self) -> &[String] {
        match self {
            Step::Fused(p) => p.state(),
            Step::Accumulated { update, .. } => update.state(),
        }
    }

    /// Runs one step on `batches`; `state` becomes the updated weights and
    /// optimiser state. `spare` holds buffers for the outputs: the tensors the
    /// update replaced go back into it for the next step.
    fn run(
        &self,
        state: &mut Tensors,
        spare: &mut Tensors,
        batches: Vec<Tensors>,
        rate: f64,
        step: usize,
    ) -> Result<Outcome, String> {
        let mut feeds = std::mem::take(state);
        feeds.insert("lr".into(), Tensor::new(vec![], vec![rate as f32]));
        feeds.insert("step".into(), Tensor::new(vec![], vec![step as f32]));
        // The batch's feeds leave the state again after the step.
        let fed: Vec<String> =
            batches.iter().flat_map(|b| b.keys().cloned()).chain(["lr".into(), "step".into()]).collect();
        let result = self.outputs(&mut feeds, spare, batches);
        for k in &fed {
            feeds.remove(k);
        }
        let (out, loss) = match result {
            Ok(v) => v,
            Err(e) => {
                *state = feeds;
                return Err(e);
            }
        };
        let grad_norm = out.get("grad_norm").map(|t| t.data[0] as f64).unwrap_or(f64::NAN);
        let mut metrics: Vec<(String, Tensor)> = out
            .iter()
            .filter_map(|(n, t)| match Role::of(n) {
                Role::Metric(m) => Some((m.to_string(), t.clone())),
                _ => None,
            })
            .collect();
        metrics.sort_by(|a, b| a.0.cmp(&b.0));
        // A finite step can still produce non-finite weights (a learning rate
        // of 1e30): they would be saved as the state before the next step.
        // (A step whose loss or gradients are not finite left the weights as
        // they were; these overflowed from finite gradients: --lr 1e38.)
        // (Each chunk folds its magnitudes' bits without stopping early, which
        // vectorises: stopping at the first non-finite value read the weights
        // one by one, 2.9% of a Mixtral-shaped step's CPU time.)
        let finite = |t: &Tensor| {
            t.data.par_chunks(1 << 16).all(|c| c.iter().fold(0, |m, v| m.max(v.to_bits() & !(1 << 31))) < INFINITY_BITS)
        };
        let updated_finite =
            out.iter().filter(|(n, _)| matches!(Role::of(n), Role::Updated(_))).all(|(_, t)| finite(t))
                && self.written().iter().filter(|n| matches!(Role::of(n), Role::Plain(_))).all(|n| finite(&feeds[n]));
        if !loss.is_finite() || !grad_norm.is_finite() || !updated_finite {
            // Keep the weights from before the step, for the report and the saved state.
            *state = feeds;
            let kept = updated_finite || self.written().is_empty();
            return Ok(Outcome { loss, grad_norm, metrics, weights_finite: updated_finite, kept });
        }
        for (name, value) in out {
            let replaced = match Role::of(&name) {
                Role::Updated(weight) => feeds.insert(weight.to_string(), value),
                role if role.is_optimizer_state() => feeds.insert(name.clone(), value),
                _ => Some(value),
            };
            if let Some(old) = replaced {
                spare.insert(name, old);
            }
        }
        *state = feeds;
        Ok(Outcome { loss, grad_norm, metrics, weights_finite: true, kept: true })
    }

    fn outputs(
        &self,
        feeds: &mut Tensors,
        spare: &mut Tensors,
        batches: Vec<Tensors>,
    ) -> Result<(Tensors, f64), String> {
        match self {
            Step::Fused(p) => {
                feeds.extend(batches.into_iter().next().expect("one batch"));
                let mut out = std::mem::take(spare);
                run_writing_state(p, feeds, &mut out)?;
                let loss = out["loss"].data[0] as f64;
                Ok((out, loss))
            }
            Step::Accumulated { grads, update } => {
                let n = batches.len();
                let mut sum: Tensors = HashMap::new();
                let mut loss = 0.0;
                for b in batches {
                    feeds.extend(b);
                    for (name, mut g) in grads.run(feeds)? {
                        if name == "loss" {
                            loss += g.data[0] as f64 / n as f64;
                            continue;
                        }
                        // Gradients and the auxiliary loss are averaged; tokens per expert add up.
                        if Role::of(&name).expert_load().is_some() {
                            g.data.iter_mut().for_each(|v| *v *= n as f32);
                        }
                        if let Some(acc) = sum.get_mut(&name) {
                            acc.data.iter_mut().zip(&g.data).for_each(|(a, v)| *a += v);
                        } else {
                            sum.insert(name, g);
                        }
                    }
                }
                for g in sum.values_mut() {
                    g.data.iter_mut().for_each(|v| *v /= n as f32);
                }
                let metrics: Tensors = sum.extract_if(|name, _| matches!(Role::of(name), Role::Metric(_))).collect();
                feeds.extend(sum);
                let mut out = std::mem::take(spare);
                if loss.is_finite() {
                    run_writing_state(update, feeds, &mut out)?;
                } else {
                    // The update is not run: the state stays as it was (see `ir::train::update`).
                    out.insert("grad_norm".into(), Tensor::new(vec![], vec![f32::NAN]));
                }
                out.extend(metrics);
                feeds.retain(|k, _| !matches!(Role::of(k), Role::Gradient(_)));
                Ok((out, loss))
            }
        }
    }
}

/// Runs `program` with the weights and optimiser state it writes over
/// (`Compiled::state`) handed over apart from the other feeds, and put back.
fn run_writing_state(program: &Compiled, feeds: &mut Tensors, out: &mut Tensors) -> Result<(), String> {
    let mut state: Tensors = program.state().iter().filter_map(|name| feeds.remove_entry(name)).collect();
    let result = program.run_state(feeds, &mut state, out);
    feeds.extend(state);
    result
}

pub fn run(args: &TrainArgs) -> ExitCode {
    let model = match &args.weights {
        Some(w) => crate::model::with_folder_config(&args.model, w),
        None => args.model.clone(),
    };
    crate::model::exit(train(&TrainArgs { model, ..args.clone() }))
}

fn usage(message: impl Into<String>) -> ExitCode {
    error(CODE, message)
}

fn train(args: &TrainArgs) -> Result<(), ExitCode> {
    let device = args.run.apply(CODE)?;
    crate::model::on_device(device, || train_on(args, device))
}

fn train_on(args: &TrainArgs, device: Device) -> Result<(), ExitCode> {
    let spec = crate::model::checked(&args.model)?;
    let mut s = settings(args, &spec.train).map_err(usage)?;
    let vocab = spec
        .outputs
        .iter()
        .find(|o| o.name == "logits")
        .and_then(|o| o.ty.dims.last().and_then(|d| d.as_const()))
        .map(|v| v as usize);
    let data = Data::load(args, &mut s, &spec, vocab).map_err(usage)?;
    let Model { program, opts, checked, train_fwd, eval_fwd, absent } = model(args, &data)?;
    let masking = masking(args, &checked).map_err(usage)?;
    let masking = masking.as_ref();
    let eval_batches = data.eval_batches(&s, masking);
    let mode = match &args.resume {
        Some(dir) if same_dir(dir, &args.out) => run_dir::Mode::Resume,
        _ if args.overwrite => run_dir::Mode::Overwrite,
        _ => run_dir::Mode::Fresh,
    };
    let out = RunDir::open(&args.out, mode).map_err(usage)?;

    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    use modelc::opt::optimized;
    let mut eval_graph = eval_fwd.clone();
    // The logits too where there are labels to score them against.
    let labelled = eval_batches.first().is_some_and(|b| b.feeds.contains_key("labels"));
    eval_graph.outputs.retain(|(n, _)| n == "loss" || (labelled && n == "logits"));
    let eval_graph = optimized(&eval_graph);

    // What the process holds besides weights and optimiser state, for --memory-budget.
    let resident_before_state = crate::memory::resident().unwrap_or(0);
    let mut state = initial_state(args, &checked, &s, device)?;
    let mut first_step = 1;
    let mut best = f64::INFINITY;
    if let Some(dir) = &args.resume {
        (state, first_step, best) = resume(dir, state, &trainable, s.steps)?;
        eprintln!("resuming {} at step {first_step}", dir.display());
    }
    let gradient_bytes = 4 * checked.trainable_params() as u64;
    let budget = args.memory_budget.map(|b| crate::budget::Budget {
        bytes: b,
        resident: resident_before_state,
        code: crate::budget::CODE_ROOM,
        gradients: gradient_bytes,
    });
    let fed = data.shapes(&s, masking);
    let (step_program, eval_program) = programs(device, &checked, (&train_fwd, &eval_graph), &state, &fed, &s, budget)?;
    write_config(args, &program, &checked, &opts)?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = out.metrics(mode, first_step - 1).map_err(usage)?;
    let (unit, per_batch) = data.unit(&s);
    let examples = matches!(data, Data::Examples(_));
    eprintln!(
        "training {} ({} trainable parameters) on {} {unit} ({} held out): {} steps of {}{}{}",
        checked.model,
        modelc::check::report::thousands(checked.trainable_params()),
        data.size(),
        data.held_out(),
        s.steps,
        if examples { format!("{}", s.batch) } else { format!("{} x {}", s.batch, s.seq) },
        if s.accumulate > 1 { format!(" x {} micro-batches", s.accumulate) } else { String::new() },
        match s.products {
            crate::cpu::Products::F32 => String::new(),
            crate::cpu::Products::Bf16 if crate::cpu::tiles::amx_hardware() => ", products in bf16 (AMX)".to_string(),
            crate::cpu::Products::Bf16 if crate::cpu::tiles::bf16_hardware() => ", products in bf16".to_string(),
            crate::cpu::Products::Bf16 => {
                ", products in bf16 (emulated: this CPU has no AVX512_BF16, so they run slower than f32)".to_string()
            }
        }
    );

    let checkpoints = Checkpoints {
        out: args.out.clone(),
        trainable: trainable.clone(),
        adapter: modelc::peft::adapter_of(&program, &checked),
    };
    let save_state = |state: &Tensors, step: usize, best: f64| checkpoints.save_state(state, step, best);
    let save_model = |state: &Tensors| checkpoints.save_model(state);
    let mut last = args.until.unwrap_or(s.steps).min(s.steps);
    // Ctrl-C ends the run after the current step, with everything saved.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let progress = Progress::new(s.steps, first_step);
    let (mut curve, mut eval_curve) = read_curves(&metrics_path, mode == run_dir::Mode::Resume);
    let started = Instant::now();
    let mut step = first_step;
    // Output buffers handed from step to step (see `Step::run`).
    let mut spare = Tensors::new();
    while step <= last {
        let rate = s.rate(step);
        let batches: Vec<Tensors> = (0..s.accumulate).map(|m| data.batch(s.seed, step, m, &s, masking)).collect();
        if step == first_step
            && let Some(path) = &args.dump_grads
        {
            dump_grads(path, gradients(&train_fwd, &trainable, &state, &batches[0], step))?;
        }
        let first = batches[0].clone();
        let step_started = Instant::now();
        let outcome = step_program
            .run(&mut state, &mut spare, batches, rate, step)
            .map_err(|e| usage(format!("step {step}: {e}")))?;
        let loss = outcome.loss;
        if !loss.is_finite() || !outcome.grad_norm.is_finite() || !outcome.weights_finite {
            let (what, culprit) = divergence(args, (&train_fwd, &absent), &trainable, &state, &first, step, &outcome);
            let path = args.out.join("state.safetensors");
            let kept = if outcome.kept {
                let _ = save_state(&state, step - 1, best);
                format!("The state before this step is in {}", path.display())
            } else if path.exists() {
                // Written over in place by this step: the last checkpoint is what is left.
                format!("The weights were written over; the last checkpoint's state is in {}", path.display())
            } else {
                "The weights were written over, and no checkpoint was saved before this step".to_string()
            };
            return Err(usage(format!("step {step}: {what}; {culprit}. {kept}; lower --lr or set --clip")));
        }
        let step_seconds = step_started.elapsed().as_secs_f64();
        crate::profile::span("training step", step_started);
        curve.push((step, loss));
        let elapsed = started.elapsed().as_secs_f64();
        let tps = ((step - first_step + 1) * per_batch * s.accumulate) as f64 / elapsed;
        // A failed write (a full disk) ends the run with the state saved, if it still can be.
        let record = |metrics: &mut run_dir::Metrics, line: String, state: &Tensors, best: f64| {
            metrics.append(&line).map_err(|e| {
                let saved = match save_state(state, step, best) {
                    Ok(()) => format!("the state at step {step} is saved"),
                    Err(e) => format!("the state could not be saved either ({e}); the last checkpoint stands"),
                };
                usage(format!("step {step}: {e}; {saved}"))
            })
        };
        let mut fields = vec![
            ("step", step.into()),
            ("loss", rounded(loss, 5)),
            ("lr", rate.into()),
            ("grad_norm", rounded(outcome.grad_norm, 4)),
            ("seconds", rounded(step_seconds, 4)),
            (if examples { "examples_per_s" } else { "tokens_per_s" }, rounded(tps, 0)),
        ];
        fields.extend(step_metrics(&outcome.metrics));
        record(&mut metrics, json_line(&fields), &state, best)?;
        let speed = if examples { format!("{tps:.0} examples/s") } else { format!("{tps:.0} tok/s") };
        let mut line = format!("loss {loss:.3}  lr {rate:.2e}  {speed}");
        if !eval_batches.is_empty() && (step % s.eval_every == 0 || step == last) {
            let (eval, scores) = evaluate(&eval_program, &eval_batches, &state, examples)
                .map_err(|e| usage(format!("evaluation at step {step}: {e}")))?;
            let mut fields = vec![("step", step.into()), ("eval_loss", rounded(eval, 5))];
            fields.extend(scores.accuracy.map(|a| ("eval_accuracy", rounded(a, 5))));
            fields.extend(scores.exact.map(|a| ("eval_exact_match", rounded(a, 5))));
            record(&mut metrics, json_line(&fields), &state, best)?;
            eval_curve.push((step, eval));
            let improved = eval < best;
            if improved {
                best = eval;
                save_model(&state).map_err(usage)?;
            }
            let mut accuracy_text = scores.accuracy.map(|a| format!(", {:.1}% right", a * 100.0)).unwrap_or_default();
            accuracy_text += &scores.exact.map(|a| format!(", {:.1}% exact", a * 100.0)).unwrap_or_default();
            line = format!(
                "loss {loss:.3}  eval {eval:.3}{accuracy_text}{}  lr {rate:.2e}  {speed}",
                if improved { " (best, saved)" } else { "" }
            );
            progress.log(step, &line, elapsed);
        }
        progress.advance(step, &line, elapsed);
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            progress.println(&format!(
                "interrupted: saving the state at step {step}; continue with --resume {}",
                args.out.display()
            ));
            last = step;
        }
        let checkpoint = (s.checkpoint_every > 0 && step % s.checkpoint_every == 0) || step == last;
        if checkpoint {
            save_state(&state, step, best).map_err(usage)?;
        }
        step += 1;
    }
    progress.finish();
    if eval_batches.is_empty() {
        save_model(&state).map_err(usage)?;
    }
    let best = (!eval_batches.is_empty()).then_some(best);
    report(args, &checked.model, (&curve, &eval_curve), best, &checkpoints.weights_file());
    Ok(())
}

/// Fresh weights from the spec's initialisers (or `--weights`), and zeroed optimiser state.
fn initial_state(
    args: &TrainArgs,
    checked: &Checked,
    s: &Settings,
    device: crate::model::Device,
) -> Result<Tensors, ExitCode> {
    // A trainable weight and its optimiser state are held once on the CPU
    // (the step writes the new values over the old), twice on the GPU
    // (passed in, and read back); gradients are part of the program's plan,
    // checked when it compiles.
    let held = if device == crate::model::Device::Cpu { 1 } else { 2 };
    let copies = held * (1 + state_names(&s.config.optimizer, "").len()) as u64;
    let items: Vec<(String, u64)> = (checked.params.iter())
        .map(|p| {
            let bytes = (p.count() as u64).saturating_mul(4);
            let shape = format!("{:?}", p.shape);
            if p.trainable {
                let times = if held == 1 { "" } else { ", twice" };
                (format!("`{}` {shape}, with its optimiser state{times}", p.name), bytes.saturating_mul(copies))
            } else {
                (format!("`{}` {shape}", p.name), bytes)
            }
        })
        .collect();
    crate::memory::ensure_available("the weights and optimiser state", crate::memory::total(&items), &items)
        .map_err(usage)?;
    // Random weights only where the file does not give them (adapters, or no file).
    let fresh = || weights::init(&checked.params, &mut Rng::new(s.seed));
    let mut state = match (&args.weights, &args.model.adapter) {
        (Some(w), Some(a)) => weights::load_model(w, Some(a), &checked.params)
            .and_then(|w| weights::unpacked(w, "training"))
            .map_err(usage)?,
        (Some(w), None) if checked.params.iter().any(|p| weights::is_adapter(&p.name)) => {
            // A new adapter on pretrained weights: the base from the file, the adapter
            // initialised; DoRA's magnitude starts at the base rows' norms (W' = W).
            let base: Vec<_> = checked.params.iter().filter(|p| !weights::is_adapter(&p.name)).cloned().collect();
            let mut state = weights::load(w, &base).and_then(|w| weights::unpacked(w, "training")).map_err(usage)?;
            let fresh = fresh();
            for p in checked.params.iter().filter(|p| weights::is_adapter(&p.name)) {
                let mut t = fresh[&p.name].clone();
                if let Some(layer) = p.name.strip_suffix(".lora_magnitude_vector") {
                    let base = &state[&format!("{layer}.weight")];
                    let row = base.shape[1];
                    t.data = base.data.chunks_exact(row).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
                }
                state.insert(p.name.clone(), t);
            }
            state
        }
        (Some(w), None) => {
            weights::load(w, &checked.params).and_then(|w| weights::unpacked(w, "training")).map_err(usage)?
        }
        (None, _) => fresh(),
    };
    for p in checked.params.iter().filter(|p| p.trainable) {
        for n in state_names(&s.config.optimizer, &p.name) {
            let t = &state[&p.name];
            let mut zeros = vec![0.0; t.data.len()];
            // Faulted in now, in one call a tensor, not a page at a time by
            // the first step's writes (the Mixtral-shape first step: ~2.2x a later one).
            crate::pages::populate(&mut zeros);
            state.insert(n, Tensor::new(t.shape.clone(), zeros));
        }
    }
    Ok(state)
}

/// The saved state of `dir`, checked against the model's: (state, next step, best eval).
fn resume(
    dir: &Path,
    mut fresh: Tensors,
    trainable: &[String],
    steps: usize,
) -> Result<(Tensors, usize, f64), ExitCode> {
    let (saved, meta) = weights::load_all(&dir.join("state.safetensors")).map_err(usage)?;
    let kept = |k: &str| Role::of(k).is_optimizer_state() || trainable.iter().any(|t| t == k);
    for (name, t) in fresh.iter().filter(|(k, _)| kept(k)) {
        match saved.get(name) {
            Some(s) if s.shape == t.shape => {}
            Some(s) => {
                return Err(usage(format!(
                    "--resume: `{name}` is {:?} in the saved state, the model has {:?}",
                    s.shape, t.shape
                )));
            }
            None => return Err(usage(format!("--resume: the saved state has no `{name}`"))),
        }
    }
    let state_file = dir.join("state.safetensors");
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| usage(format!("--resume: {} has no `{key}` in its metadata", state_file.display())))
    };
    let step = field("step")?;
    let step = step.parse::<usize>().ok().filter(|&s| s <= steps).ok_or_else(|| {
        usage(format!("--resume: the `step` of {} is `{step}`, not a step of this run's {steps}", state_file.display()))
    })?;
    let best = field("best_eval")?;
    let best = best.parse::<f64>().ok().filter(|b| !b.is_nan()).ok_or_else(|| {
        usage(format!("--resume: the `best_eval` of {} is `{best}`, not a loss", state_file.display()))
    })?;
    let step = step + 1;
    fresh.extend(saved);
    Ok((fresh, step, best))
}

/// The spec's `masking: mlm(probability: p, mask_token: id)` setting:
/// special tokens and `[MASK]` from the tokenizer, random tokens from the
/// model's vocabulary; it fills the `labels` target.
fn masking(args: &TrainArgs, checked: &Checked) -> Result<Option<crate::masking::Masking>, String> {
    let Some((_, setting)) = checked.train.iter().find(|(k, _)| k == "masking") else { return Ok(None) };
    let Value::Record(name, fields) = setting else {
        return Err(format!("masking: expected `mlm(probability: 0.15)`, found `{setting}`"));
    };
    if name != "mlm" {
        return Err(format!("masking: `{name}` is not a masking scheme; the one there is is `mlm`"));
    }
    let field = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let probability = field("probability").and_then(Value::as_f64).unwrap_or(0.15);
    flags::check("masking probability", probability, flags::fraction)?;
    if !checked.targets.iter().any(|t| t.name == "labels") {
        return Err(format!(
            "masking fills the target `labels`; declare `target labels: [B, T] int` in `{}`'s train block",
            checked.model
        ));
    }
    let vocab = (checked.outputs.iter().find(|o| o.name == "logits"))
        .and_then(|o| o.ty.dims.last().and_then(|d| d.as_const()))
        .ok_or("masking needs a `logits` output over the vocabulary")? as usize;
    let tokenizer = Tokenizer::open(args.tokenizer.as_deref())?;
    let mask = match field("mask_token").and_then(Value::as_f64) {
        Some(id) => id as usize,
        None => tokenizer.id_of("[MASK]").or_else(|| tokenizer.id_of("<mask>")).ok_or(
            "masking needs a mask token: the tokenizer has no [MASK]; give --tokenizer or `mlm(mask_token: id)`",
        )?,
    };
    Ok(Some(crate::masking::Masking { probability, mask, vocab, special: tokenizer.special_ids() }))
}

/// Whether two paths name the same folder (`runs/a` and `./runs/a/`).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.components().eq(b.components()),
    }
}

/// The losses already in metrics.jsonl when resuming, so the curve covers the whole run.
/// Losses by step.
type Curve = Vec<(usize, f64)>;

fn read_curves(path: &Path, resuming: bool) -> (Curve, Curve) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    if !resuming {
        return (train, eval);
    }
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_u64() else { continue };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step as usize, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step as usize, l));
        }
    }
    (train, eval)
}

/// `DIR/config.json` with the model's hyperparameters under Hugging Face's
/// keys (and `DIR/tokenizer.json`), so `transformers` and `infer` find them.
fn write_config(
    args: &TrainArgs,
    program: &modelc::check::load::Program,
    checked: &Checked,
    opts: &modelc::check::Options,
) -> Result<(), ExitCode> {
    let base = opts.config.as_ref().map(|(json, _)| json);
    if let Some(config) = modelc::check::hf_config(program, checked, base) {
        let text = serde_json::to_string_pretty(&config).expect("JSON") + "\n";
        write_atomic(&args.out.join("config.json"), text.as_bytes()).map_err(usage)?;
    }
    if let Some(t) = &args.tokenizer {
        let bytes = std::fs::read(t).map_err(|e| usage(format!("cannot read {}: {e}", t.display())))?;
        write_atomic(&args.out.join("tokenizer.json"), &bytes).map_err(usage)?;
    }
    Ok(())
}

/// The gradients of the loss on `batch` with the weights in `state`, by weight name.
fn gradients(
    forward: &Graph,
    trainable: &[String],
    state: &Tensors,
    batch: &Tensors,
    step: usize,
) -> Result<Tensors, String> {
    let g = gradient_program(forward, trainable).expect("has a loss");
    let g = modelc::opt::optimized(&g);
    let mut feeds: Tensors = weights_of(state);
    feeds.extend(batch.clone());
    feeds.insert("step".into(), Tensor::new(vec![], vec![step as f32]));
    let shapes: HashMap<String, Vec<usize>> = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let program = crate::cpu::bind(&g, &shapes).and_then(|s| Program::compile(&g, &s))?;
    let out = program.run(&feeds)?;
    Ok(out
        .into_iter()
        .filter_map(|(k, v)| match Role::of(&k) {
            Role::Gradient(weight) => Some((weight.to_string(), v)),
            _ => None,
        })
        .collect())
}

/// `--dump-grads`: the gradients of the first step's loss, by weight name.
fn dump_grads(path: &Path, grads: Result<Tensors, String>) -> Result<(), ExitCode> {
    let grads = grads.map_err(|e| usage(format!("--dump-grads: {e}")))?;
    weights::save(path, &grads).map_err(usage)
}

/// Names the first layer call whose output is not finite on `batch` (or a
/// weight that is not finite); `None` when everything is finite.
fn first_non_finite(args: &TrainArgs, absent: &[String], state: &Tensors, batch: &Tensors) -> Option<String> {
    let traced = || -> Result<Option<String>, String> {
        let (program, opts) = load(&args.model).map_err(|_| "cannot reload the spec".to_string())?;
        let how = args.model.lowering(LowerOptions { trace: true, absent: absent.to_vec(), ..Default::default() });
        let (_, g) = modelc::check::lower(&program, &opts, how).map_err(|_| "cannot lower the spec".to_string())?;
        let g = modelc::ir::prune::prune(&g);
        let mut feeds: Tensors = weights_of(state);
        // The batch's inputs (not its targets: the forward has no loss).
        let inputs = |name: &str| g.nodes.iter().any(|n| matches!(&n.op, modelc::ir::graph::Op::Input(i) if i == name));
        feeds.extend(batch.iter().filter(|(k, _)| inputs(k)).map(|(k, v)| (k.clone(), v.clone())));
        // On the CPU whatever the run's device: it reads the host's copy of the state.
        let p = compile(CODE, crate::model::Device::Cpu, &g, &feeds)
            .map_err(|_| "cannot compile the traced forward".to_string())?;
        let out = p.run(&feeds)?;
        let weights_bad =
            feeds.iter().filter(|(_, t)| t.data.iter().any(|v| !v.is_finite())).map(|(k, _)| k.clone()).min();
        if let Some(w) = weights_bad {
            return Ok(Some(format!("the weight `{w}` is not finite")));
        }
        Ok(g.outputs.iter().find_map(|(name, _)| {
            let Role::Trace(layer) = Role::of(name) else { return None };
            out[name]
                .data
                .iter()
                .any(|v| !v.is_finite())
                .then(|| format!("the first layer whose output is not finite is `{layer}`"))
        }))
    };
    match traced() {
        Ok(found) => found,
        Err(e) => Some(format!("could not find the layer ({e})")),
    }
}

/// A progress bar on a terminal; plain lines (every few seconds and at
/// evaluations) when stderr is a file or a pipe.
struct Progress {
    bar: indicatif::ProgressBar,
    last_line: std::cell::Cell<Instant>,
    steps: usize,
    first: usize,
}

impl Progress {
    fn new(steps: usize, first: usize) -> Progress {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_position(first.saturating_sub(1) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len}  {msg}  eta {eta}")
                .expect("a valid template"),
        );
        Progress { bar, last_line: std::cell::Cell::new(Instant::now()), steps, first }
    }

    fn advance(&self, step: usize, line: &str, elapsed: f64) {
        self.bar.set_position(step as u64);
        self.bar.set_message(line.to_string());
        if self.bar.is_hidden() && self.last_line.get().elapsed().as_secs_f64() > 5.0 {
            let eta = elapsed / (step - self.first + 1) as f64 * (self.steps - step) as f64;
            eprintln!("step {step:>5}/{}  {line}  eta {eta:.0} s", self.steps);
            self.last_line.set(Instant::now());
        }
    }

    fn log(&self, step: usize, line: &str, elapsed: f64) {
        self.println(&format!("step {step:>5}/{}  {line}  {elapsed:.0} s", self.steps));
        self.last_line.set(Instant::now());
    }

    fn println(&self, line: &str) {
        if self.bar.is_hidden() { eprintln!("{line}") } else { self.bar.println(line) }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The loss curve drawn, and where the weights and the picture are
/// (with the best evaluation loss, when the run evaluated).
fn report(
    args: &TrainArgs,
    model: &str,
    (curve, eval_curve): (&Curve, &Curve),
    best: Option<f64>,
    weights_file: &Path,
) {
    let title = format!(
        "{} on {}",
        model,
        args.data.as_ref().or(args.batch_file.as_ref()).map(|p| p.display().to_string()).unwrap_or_default()
    );
    if let Err(e) = crate::plot::loss_curve(&args.out.join("loss.png"), &title, curve, eval_curve) {
        eprintln!("warning: {e}");
    }
    match best {
        Some(best) => eprintln!("best eval loss {best:.3}; weights in {}", weights_file.display()),
        None => eprintln!("weights in {}", weights_file.display()),
    }
    eprintln!("loss curve in {}", args.out.join("loss.png").display());
}

/// The spec's model as training needs it: checked, and lowered for training
/// (dropout, the loss) and for evaluation.
struct Model {
    program: modelc::check::Program,
    opts: modelc::check::Options,
    checked: Checked,
    train_fwd: Graph,
    eval_fwd: Graph,
    /// The optional inputs the data does not give, lowered as absent.
    absent: Vec<String>,
}

fn model(args: &TrainArgs, data: &Data) -> Result<Model, ExitCode> {
    let (program, opts) = load(&args.model)?;
    // Text feeds token ids (and targets) only: optional inputs (an attention
    // mask, token types) are lowered as absent; examples give what they hold.
    let given: Vec<&str> = match data {
        Data::Examples(e) => e.names().collect(),
        _ => Vec::new(),
    };
    let absent: Vec<String> = (modelc::check::check(&program, &opts).map_err(|d| fail(&program.sources, &d))?.inputs)
        .into_iter()
        .filter(|i| i.optional && !given.contains(&i.name.as_str()))
        .map(|i| i.name)
        .collect();
    let lower = |training| {
        let how = args.model.lowering(LowerOptions { training, absent: absent.clone(), ..Default::default() });
        modelc::check::lower(&program, &opts, how).map_err(|d| fail(&program.sources, &d))
    };
    let (checked, train_fwd) = lower(true)?;
    let (_, eval_fwd) = lower(false)?;
    crate::profile::add_spec(&program.sources, &checked);
    if eval_fwd.output("loss").is_none() {
        return Err(usage(format!("`{}` has no `train {{ loss: ... }}` block to train", checked.model)));
    }
    if let Some(other) = checked.inputs.iter().find(|i| !i.optional && i.name != "input_ids")
        && !matches!(data, Data::Examples(_))
    {
        return Err(usage(format!(
            "text feeds token ids as `input_ids`; `{}` also takes `{}` {}: give --data FILE.safetensors with a tensor per input and target, examples along the first axis",
            checked.model, other.name, other.ty
        )));
    }
    Ok(Model { program, opts, checked, train_fwd, eval_fwd, absent })
}

/// Where a run saves: the state (trainable weights and optimiser state, with
/// the step and best evaluation loss) and the model (the weights, or a PEFT
/// adapter: frozen base weights come from --weights again).
struct Checkpoints {
    out: PathBuf,
    trainable: Vec<String>,
    adapter: Option<modelc::peft::AdapterConfig>,
}

impl Checkpoints {
    fn save_state(&self, state: &Tensors, step: usize, best: f64) -> Result<(), String> {
        let meta = HashMap::from([("step".to_string(), step.to_string()), ("best_eval".to_string(), best.to_string())]);
        let saved = |k: &str| Role::of(k).is_optimizer_state() || self.trainable.iter().any(|t| t == k);
        weights::save_with(&self.out.join("state.safetensors"), state.iter().filter(|(k, _)| saved(k)), Some(meta))
    }

    fn save_model(&self, state: &Tensors) -> Result<(), String> {
        match &self.adapter {
            Some(cfg) => weights::save_adapter(&self.out, state, cfg, "CAUSAL_LM"),
            None => weights::save_with(
                &self.out.join("model.safetensors"),
                state.iter().filter(|(k, _)| !Role::of(k).is_optimizer_state()),
                None,
            ),
        }
    }

    fn weights_file(&self) -> PathBuf {
        self.out.join(if self.adapter.is_some() { "adapter_model.safetensors" } else { "model.safetensors" })
    }
}

/// The step program (fused, or gradients and update for accumulation) and
/// the evaluation program, compiled for the shapes of the state and a batch.
fn programs(
    device: crate::model::Device,
    checked: &Checked,
    (train_fwd, eval_graph): (&Graph, &Graph),
    state: &Tensors,
    fed: &[(String, Vec<usize>)],
    s: &Settings,
    budget: Option<crate::budget::Budget>,
) -> Result<(Step, Compiled), ExitCode> {
    use modelc::opt::optimized;
    let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    // Only shapes matter to the compiler.
    let placeholder = |shape: Vec<usize>| Tensor { shape, data: Vec::new(), packed: None, halves: Vec::new() };
    let mut shapes: Tensors = state.iter().map(|(k, v)| (k.clone(), placeholder(v.shape.clone()))).collect();
    shapes.extend(fed.iter().map(|(name, shape)| (name.clone(), placeholder(shape.clone()))));
    shapes.insert("lr".into(), placeholder(vec![]));
    shapes.insert("step".into(), placeholder(vec![]));
    let shapes_of = |feeds: &Tensors| feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    if s.products != crate::cpu::Products::F32 && device == crate::model::Device::Gpu {
        return Err(usage("--precision bf16 runs on the CPU; on the GPU products are f32"));
    }
    // The programs run one after another, so they share one arena (grown to
    // the largest plan: evaluation's activations take no memory of their
    // own) and one JIT (evaluation's forward kernels are mostly the step's).
    // (The GPU's programs take neither.)
    let arena = crate::cpu::Arena::default();
    let jit = match device {
        crate::model::Device::Cpu => Some(crate::cpu::SharedJit::new(true).map_err(|e| error(CODE, e))?),
        crate::model::Device::Gpu => None,
    };
    let options = |memory| crate::cpu::CompileOptions {
        memory,
        products: s.products,
        arena: Some(arena.clone()),
        jit: jit.clone(),
        ..Default::default()
    };
    let planned = |g: &Graph, shapes: &HashMap<String, Vec<usize>>| match (budget, device) {
        (None, _) => Ok(modelc::backend::Memory::default()),
        (Some(_), crate::model::Device::Gpu) => {
            Err(usage("--memory-budget plans the CPU program; on the GPU the step is planned whole"))
        }
        (Some(budget), crate::model::Device::Cpu) => {
            let sizes = crate::cpu::bind(g, shapes).map_err(|e| error(CODE, e))?;
            let choice = crate::budget::choose(g, &sizes, &budget).map_err(|e| error(CODE, e))?;
            eprintln!("{}", choice.report(&budget));
            Ok(choice.memory)
        }
    };
    let step_program = if s.accumulate == 1 {
        let g = optimized(&training_program(train_fwd, &trainable, &s.config).expect("has a loss"));
        let memory = planned(&g, &shapes_of(&shapes))?;
        Step::Fused(crate::model::compile_shapes_with(CODE, device, &g, &shapes_of(&shapes), options(memory))?)
    } else {
        let grads = gradient_program(train_fwd, &trainable).expect("has a loss");
        let params: Vec<(String, TensorTy)> = checked
            .params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| {
                (
                    p.name.clone(),
                    TensorTy::new(
                        modelc::types::DType::F32,
                        p.shape.iter().map(|d| modelc::types::Dim::constant(*d)).collect(),
                    ),
                )
            })
            .collect();
        let update = update_program(&params, &s.config);
        for (name, ty) in &params {
            let dims = ty.dims.iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
            shapes.insert(Role::Gradient(name).name(), placeholder(dims));
        }
        let grads = optimized(&grads);
        let memory = planned(&grads, &shapes_of(&shapes))?;
        Step::Accumulated {
            grads: crate::model::compile_shapes_with(CODE, device, &grads, &shapes_of(&shapes), options(memory))?,
            update: crate::model::compile_shapes_with(
                CODE,
                device,
                &optimized(&update),
                &shapes_of(&shapes),
                options(modelc::backend::Memory::default()),
            )?,
        }
    };
    // Evaluated as trained: with the same products.
    let eval_options = options(modelc::backend::Memory::default());
    let eval_program = crate::model::compile_shapes_with(CODE, device, eval_graph, &shapes_of(&shapes), eval_options)?;
    Ok((step_program, eval_program))
}

/// How well the held-out labels are predicted: the share of labels (not
/// ignored) that are the logits' most likely class, and for sequence labels
/// the share of examples with every label right, which is what greedy
/// decoding gets right (each step then reads the true prefix).
#[derive(Default)]
struct Scores {
    accuracy: Option<f64>,
    exact: Option<f64>,
}

/// The mean loss over the evaluation batches, and where they hold labels,
/// how well the logits predict them (`whole`: also the share of examples
/// with every label right).
fn evaluate(
    eval_program: &Compiled,
    eval_batches: &[EvalBatch],
    state: &Tensors,
    whole_examples: bool,
) -> Result<(f64, Scores), String> {
    let started = Instant::now();
    let (mut total, mut right, mut labelled) = (0.0, 0usize, 0usize);
    let (mut whole, mut examples, mut sequences) = (0usize, 0usize, false);
    for b in eval_batches {
        let mut feeds: Tensors = weights_of(state);
        feeds.extend(b.feeds.clone());
        let out = eval_program.run(&feeds)?;
        total += out["loss"].data[0] as f64;
        let (Some(logits), Some(labels)) = (out.get("logits"), b.feeds.get("labels")) else { continue };
        let classes = *logits.shape.last().expect("a class axis");
        if logits.data.len() != labels.data.len() * classes {
            continue;
        }
        sequences = whole_examples && labels.shape.len() >= 2;
        let per_example = labels.data.len() / labels.shape[0];
        let rows = logits.data.chunks_exact(classes).zip(&labels.data).take(b.rows * per_example);
        let mut all_right = true;
        for (i, (row, label)) in rows.enumerate() {
            if *label != crate::masking::IGNORED {
                let best = (0..classes).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap_or(0);
                right += usize::from(best as f32 == *label);
                all_right &= best as f32 == *label;
                labelled += 1;
            }
            if (i + 1) % per_example == 0 {
                whole += usize::from(all_right);
                examples += 1;
                all_right = true;
            }
        }
    }
    let scores = Scores {
        accuracy: (labelled > 0).then(|| right as f64 / labelled as f64),
        exact: (sequences && examples > 0).then(|| whole as f64 / examples as f64),
    };
    crate::profile::span("evaluation", started);
    Ok((total / eval_batches.len() as f64, scores))
}

/// Why a step diverged: what was not finite, and where it started (the
/// first layer whose output is not, from a traced forward, or else the
/// weights whose gradients are not).
fn divergence(
    args: &TrainArgs,
    (train_fwd, absent): (&Graph, &[String]),
    trainable: &[String],
    state: &Tensors,
    first: &Tensors,
    step: usize,
    outcome: &Outcome,
) -> (String, String) {
    let loss = outcome.loss;
    let what = if !loss.is_finite() {
        format!("the loss is {loss}")
    } else if !outcome.grad_norm.is_finite() {
        format!("the gradient norm is {}", outcome.grad_norm)
    } else {
        "the updated weights are not finite".to_string()
    };
    let culprit = first_non_finite(args, absent, state, first).unwrap_or_else(|| {
        // The forward is fine: name the weights whose gradients are not.
        let grads = gradients(train_fwd, trainable, state, first, step).unwrap_or_default();
        let bad: Vec<&String> =
            trainable.iter().filter(|n| grads.get(*n).is_some_and(|g| g.data.iter().any(|v| !v.is_finite()))).collect();
        match bad.as_slice() {
            [] => "every layer's output and every gradient is finite without dropout".to_string(),
            [one] => format!("every layer's output is finite, but the gradient of `{one}` is not"),
            [first, ..] => format!(
                "every layer's output is finite, but the gradients of {} weights are not, the first `{first}`",
                bad.len()
            ),
        }
    });
    (what, culprit)
}

/// The step's reports for `metrics.jsonl`: `aux_loss`, and `expert_load`
/// (tokens per expert, one list per mixture in layer order).
fn step_metrics(metrics: &[(String, Tensor)]) -> Vec<(&'static str, serde_json::Value)> {
    let mut fields = Vec::new();
    if let Some((_, aux)) = metrics.iter().find(|(n, _)| n == "aux_loss") {
        fields.push(("aux_loss", rounded(aux.data[0] as f64, 5)));
    }
    let mut loads: Vec<(usize, Vec<u64>)> = metrics
        .iter()
        .filter_map(|(n, t)| Some((Role::Metric(n).expert_load()?, t.data.iter().map(|v| v.round() as u64).collect())))
        .collect();
    if !loads.is_empty() {
        loads.sort();
        fields.push(("expert_load", loads.into_iter().map(|(_, l)| l).collect::<Vec<_>>().into()));
    }
    fields
}

/// One line of `metrics.jsonl`: the fields in this order, as JSON.
fn json_line(fields: &[(&str, serde_json::Value)]) -> String {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{}: {v}", serde_json::Value::from(*k))).collect();
    format!("{{{}}}", fields.join(", "))
}

/// `x` to `digits` decimals, as a JSON number (non-finite values as null).
fn rounded(x: f64, digits: i32) -> serde_json::Value {
    let scale = 10f64.powi(digits);
    let r = (x * scale).round() / scale;
    if digits == 0 { serde_json::Value::from(r as i64) } else { serde_json::Value::from(r) }
}

/// The weights of a training state, without the optimiser's.
fn weights_of(state: &Tensors) -> Tensors {
    state.iter().filter(|(k, _)| !Role::of(k).is_optimizer_state()).map(|(k, v)| (k.clone(), v.clone())).collect()
}
