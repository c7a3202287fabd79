//! `modelc embed`: sentences to L2-normalised embeddings with an encoder
//! spec. Sentences come from the arguments or, one per line, from stdin;
//! they are tokenized with the model's tokenizer.json, padded into batches
//! with an attention mask, and run through the forward. The model's
//! `sentence_embedding` output is used as it is when it has one (the
//! MiniLM spec pools and normalises itself); otherwise `last_hidden_state`
//! is mean-pooled over the mask and normalised, as sentence-transformers do.

use crate::cpu::Tensor;
use crate::model::{DtypeArgs, RunArgs, compile, error, forward_graph, load_weights};
use crate::tokenize::Tokenizer;
use crate::weights::{self, Tensors};
use modelc::check::LowerOptions;
use modelc::cli::ModelArgs;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

const CODE: &str = "E0705";

#[derive(clap::Args, Clone, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// The model's weights: a safetensors file, a sharded checkpoint's index, or a folder.
    #[arg(long)]
    pub weights: PathBuf,
    /// A Hugging Face tokenizer.json (default: the one beside the weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The sentences, after the spec (default: one per line from stdin).
    pub sentences: Vec<String>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32, value_parser = crate::flags::count)]
    pub batch: usize,
    /// Write the embeddings as one safetensors tensor `embeddings` [N, dim] here
    /// instead of JSON lines on stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// JSON lines with `text` and `embedding` on stdout (the default without --output).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &EmbedArgs) -> ExitCode {
    let args = EmbedArgs { model: crate::model::with_folder_config(&args.model, &args.weights), ..args.clone() };
    crate::model::exit(embed(&args))
}

fn embed(args: &EmbedArgs) -> Result<(), ExitCode> {
    args.run.apply(CODE)?;
    let checked = crate::model::checked(&args.model)?;
    let output = ["sentence_embedding", "last_hidden_state"]
        .into_iter()
        .find(|o| checked.outputs.iter().any(|s| s.name == *o))
        .ok_or_else(|| {
            error(
                CODE,
                format!(
                    "`{}` has neither a `sentence_embedding` nor a `last_hidden_state` output to embed with",
                    checked.model
                ),
            )
        })?;
    let takes = |name: &str| checked.inputs.iter().any(|i| i.name == name);
    if !takes("input_ids") || checked.inputs.iter().any(|i| !i.optional && i.name != "input_ids") {
        return Err(error(
            CODE,
            format!("`embed` feeds `input_ids` (and an attention mask); `{}` needs more", checked.model),
        ));
    }
    let absent: Vec<String> =
        checked.inputs.iter().filter(|i| i.optional && i.name != "attention_mask").map(|i| i.name.clone()).collect();
    let (_, graph) = forward_graph(&args.model, LowerOptions { absent, ..Default::default() }, &[output])?;
    let mut weights = load_weights(CODE, &args.weights, &args.model, &checked)?;
    args.dtype.apply(CODE, &graph, &mut weights)?;
    let tokenizer = match Tokenizer::find(args.tokenizer.as_deref(), Some(&args.weights)) {
        Some(path) => Tokenizer::open(Some(&path)).map_err(|e| error(CODE, e))?,
        None => {
            return Err(error(CODE, "no tokenizer: give --tokenizer tokenizer.json or put one beside the weights"));
        }
    };
    let sentences: Vec<String> = if args.sentences.is_empty() {
        std::io::stdin().lock().lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).collect()
    } else {
        args.sentences.clone()
    };
    if sentences.is_empty() {
        return Err(error(CODE, "no sentences: give them as arguments or one per line on stdin"));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut feeds = weights;
    for chunk in sentences.chunks(args.batch.max(1)) {
        let ids: Vec<Vec<usize>> =
            chunk.iter().map(|s| tokenizer.encode(s)).collect::<Result<_, _>>().map_err(|e| error(CODE, e))?;
        let t = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let (mut flat, mut mask) = (Vec::new(), Vec::new());
        for row in &ids {
            flat.extend(row.iter().map(|i| *i as f32));
            flat.extend(std::iter::repeat_n(tokenizer.pad_id() as f32, t - row.len()));
            mask.extend(std::iter::repeat_n(1.0, row.len()));
            mask.extend(std::iter::repeat_n(0.0, t - row.len()));
        }
        let b = chunk.len();
        feeds.insert("input_ids".into(), Tensor::new(vec![b, t], flat));
        if takes("attention_mask") {
            feeds.insert("attention_mask".into(), Tensor::new(vec![b, t], mask.clone()));
        }
        let program = compile(CODE, &graph, &feeds)?;
        let out = program.run(&feeds).map_err(|e| error(CODE, e))?;
        let value = &out[output];
        let dim = *value.shape.last().expect("a feature axis");
        for r in 0..b {
            let v = if output == "sentence_embedding" {
                value.data[r * dim..(r + 1) * dim].to_vec()
            } else {
                mean_pool(&value.data[r * t * dim..(r + 1) * t * dim], &mask[r * t..(r + 1) * t], dim)
            };
            rows.push(normalize(v));
        }
    }
    match &args.output {
        Some(path) if !args.json => {
            let dim = rows[0].len();
            let tensors: Tensors =
                [("embeddings".to_string(), Tensor::new(vec![rows.len(), dim], rows.concat()))].into_iter().collect();
            weights::save(path, &tensors).map_err(|e| error(CODE, e))
        }
        _ => {
            let mut out = std::io::stdout().lock();
            for (text, v) in sentences.iter().zip(&rows) {
                let _ = writeln!(out, "{}", serde_json::json!({ "text": text, "embedding": v }));
            }
            Ok(())
        }
    }
}

/// The mean of the rows of `states` ([T, dim]) where `mask` is 1.
fn mean_pool(states: &[f32], mask: &[f32], dim: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; dim];
    for (row, m) in states.chunks_exact(dim).zip(mask) {
        sum.iter_mut().zip(row).for_each(|(s, v)| *s += v * m);
    }
    let count = mask.iter().sum::<f32>().max(1e-9);
    sum.into_iter().map(|s| s / count).collect()
}

fn normalize(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / norm).collect()
}
