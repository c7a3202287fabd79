//! `modelc infer`: generates text from trained weights, one byte per token,
//! streaming each token as it comes. The forward program is compiled once
//! for a fixed context; the tokens so far sit at its start (causal attention
//! makes the padding after them irrelevant) and the last real position's
//! logits give the next token. Greedy, temperature, top-k and top-p.

use crate::cpu::{Program, Tensor, bind};
use crate::weights::{self, Rng};
use modelc::cli::{ModelArgs, fail, load};
use modelc::diag::Diagnostic;
use modelc::source::SourceMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Trained weights (a safetensors file with the model's weight names).
    #[arg(long)]
    pub weights: PathBuf,
    /// The text to continue.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// The prompt as token ids instead, e.g. `--prompt-ids 72,101`.
    #[arg(long = "prompt-ids", value_delimiter = ',')]
    pub prompt_ids: Vec<usize>,
    /// How many tokens to generate.
    #[arg(long = "max-new-tokens", default_value_t = 200)]
    pub max_new_tokens: usize,
    /// 0 picks the most likely token.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long = "top-k", default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to p.
    #[arg(long = "top-p", default_value_t = 1.0)]
    pub top_p: f64,
    /// Seeds the sampling; the same seed repeats the text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens the model sees at once (the spec's seq_len, else 128).
    #[arg(long)]
    pub context: Option<usize>,
    /// Print one JSON object with the new token ids instead of text.
    #[arg(long)]
    pub json: bool,
}

fn usage(message: impl Into<String>) -> ExitCode {
    fail(&SourceMap::new(), &[Diagnostic::new("E0702", message)])
}

/// Picks a token from logits with temperature, top-k and top-p.
pub fn sample(logits: &[f32], temperature: f64, top_k: usize, top_p: f64, rng: &mut Rng) -> usize {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, v)| if *v > b.1 { (i, *v) } else { b }).0;
    if temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].partial_cmp(&logits[*a]).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order.iter().map(|i| ((logits[*i] as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= top_p {
            break;
        }
    }
    let total: f64 = weights[..kept].iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights[..kept].iter().enumerate() {
        u -= w;
        if u <= 0.0 {
            return order[i];
        }
    }
    order[kept - 1]
}

pub fn run(args: &InferArgs) -> ExitCode {
    let (program, opts) = match load(&args.model) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let (checked, g) = match modelc::check::lower(&program, &opts, modelc::check::LowerOptions { training: false }) {
        Ok(v) => v,
        Err(d) => return fail(&program.sources, &d),
    };
    let Some(logits_sig) = checked.outputs.iter().find(|o| o.name == "logits") else {
        return usage(format!("`{}` has no `logits` output to generate from", checked.model));
    };
    let vocab = logits_sig.ty.dims.last().and_then(|d| d.as_const()).unwrap_or(0) as usize;
    let mut g = modelc::ir::prune::prune(&g);
    g.outputs.retain(|(n, _)| n == "logits");
    let (g, _) = modelc::opt::optimize(&modelc::ir::prune::prune(&g), modelc::opt::Limits::default());
    let params = match weights::load(&args.weights, &checked.params) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let context = args
        .context
        .or_else(|| {
            checked.train.iter().find(|(k, _)| k == "seq_len").and_then(|(_, v)| v.as_f64()).map(|v| v as usize)
        })
        .unwrap_or(128);
    let mut tokens: Vec<usize> = if args.prompt_ids.is_empty() {
        args.prompt.bytes().map(usize::from).collect()
    } else {
        args.prompt_ids.clone()
    };
    if let Some(bad) = tokens.iter().find(|t| **t >= vocab) {
        return usage(format!("prompt token {bad} is outside the vocabulary of {vocab}"));
    }
    let mut shapes: HashMap<String, Vec<usize>> = params.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    shapes.insert("input_ids".into(), vec![1, context]);
    let compiled = match bind(&g, &shapes).and_then(|s| Program::compile(&g, &s)) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let mut feeds = params;
    let mut rng = Rng::new(args.seed);
    let mut out = std::io::stdout().lock();
    if !args.json {
        let _ = out.write_all(&tokens.iter().map(|t| *t as u8).collect::<Vec<u8>>());
    }
    let started = Instant::now();
    let mut fresh = Vec::new();
    for _ in 0..args.max_new_tokens {
        // The last `context` tokens, padded at the end.
        let start = tokens.len().saturating_sub(context - 1);
        let seen = &tokens[start..];
        let mut ids: Vec<f32> = seen.iter().map(|t| *t as f32).collect();
        ids.resize(context, 0.0);
        feeds.insert("input_ids".into(), Tensor::new(vec![1, context], ids));
        let logits = match compiled.run(&feeds) {
            Ok(o) => o,
            Err(e) => return usage(e),
        };
        let pos = seen.len().max(1) - 1;
        let row = &logits["logits"].data[pos * vocab..(pos + 1) * vocab];
        let next = sample(row, args.temperature, args.top_k, args.top_p, &mut rng);
        tokens.push(next);
        fresh.push(next);
        if !args.json {
            let _ = out.write_all(&[next as u8]);
            let _ = out.flush();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let _ = writeln!(out, "{}", serde_json::json!({ "new_token_ids": fresh }));
    } else {
        let _ = writeln!(out);
    }
    eprintln!("{} tokens in {secs:.2} s, {:.1} tokens/s", fresh.len(), fresh.len() as f64 / secs.max(1e-9));
    ExitCode::SUCCESS
}
