//! `modelc embed`: sentences to L2-normalised embeddings with an encoder
//! spec. Sentences come from the arguments or, one per line, from stdin;
//! they are tokenized with the model's tokenizer.json, padded into batches
//! with an attention mask, and run through the forward. The model's
//! `sentence_embedding` output is used as it is when it has one (the
//! MiniLM spec pools and normalises itself); otherwise `last_hidden_state`
//! is mean-pooled over the mask and normalised, as sentence-transformers do.

use crate::cli::ModelArgs;
use crate::cpu::Tensor;
use crate::model::{DtypeArgs, RunArgs, compile_shapes_with, error, forward_graph, load_weights};
use crate::tokenize::Tokenizer;
use crate::weights::{self, Tensors};
use modelc::check::LowerOptions;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
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
    crate::model::exit(embed(args))
}

fn embed(args: &EmbedArgs) -> Result<(), ExitCode> {
    let mut embedder =
        Embedder::open(CODE, &args.model, &args.weights, args.tokenizer.as_deref(), &args.run, &args.dtype)?;
    let sentences: Vec<String> = if args.sentences.is_empty() {
        std::io::stdin().lock().lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).collect()
    } else {
        args.sentences.clone()
    };
    if sentences.is_empty() {
        return Err(error(CODE, "no sentences: give them as arguments or one per line on stdin"));
    }
    let ids: Vec<Vec<usize>> =
        sentences.iter().map(|s| embedder.tokenizer.encode(s)).collect::<Result<_, _>>().map_err(|e| error(CODE, e))?;
    let rows = embedder.embed(&ids, args.batch)?;
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

/// An encoder loaded once, embedding token ids batch by batch (`embed`,
/// `index`, `search`): its programs are compiled once per padded length.
pub struct Embedder {
    code: &'static str,
    device: crate::model::Device,
    graph: modelc::ir::graph::Graph,
    feeds: Tensors,
    /// Compiled programs by (batch, padded length).
    programs: HashMap<(usize, usize), crate::model::Compiled>,
    /// The weights as the programs' products packed them, shared by all.
    packed_weights: std::sync::Arc<crate::cpu::FixedWeights>,
    /// The one arena the programs run in, each in turn.
    arena: crate::cpu::Arena,
    /// The JIT they are compiled in, each kernel once for all of them.
    jit: crate::cpu::SharedJit,
    /// The model's tokenizer, cutting texts where the model must.
    pub tokenizer: Tokenizer,
    /// The most tokens (special tokens included) one text may have.
    pub max_len: Option<usize>,
    output: &'static str,
    pooling: Pooling,
    normalize: bool,
    takes_mask: bool,
}

impl Embedder {
    pub fn open(
        code: &'static str,
        model: &ModelArgs,
        weights_path: &Path,
        tokenizer: Option<&Path>,
        run: &RunArgs,
        dtype: &DtypeArgs,
    ) -> Result<Embedder, ExitCode> {
        let model = crate::model::with_folder_config(model, weights_path);
        let device = run.apply(code)?;
        let checked = crate::model::checked(&model)?;
        let folder = if weights_path.is_dir() { weights_path.to_path_buf() } else { weights_path.with_file_name("") };
        let sentence = Sentence::read(&folder).map_err(|e| error(code, e))?;
        let has = |name: &str| checked.outputs.iter().any(|s| s.name == name);
        // A sentence-transformers folder says how to pool; without one, the
        // model's own `sentence_embedding`, else mean pooling.
        let output = match &sentence {
            Some(_) if has("last_hidden_state") => "last_hidden_state",
            _ if has("sentence_embedding") => "sentence_embedding",
            _ if has("last_hidden_state") => "last_hidden_state",
            _ => {
                return Err(error(
                    code,
                    format!(
                        "`{}` has neither a `sentence_embedding` nor a `last_hidden_state` output to embed with",
                        checked.model
                    ),
                ));
            }
        };
        let (pooling, normalize) = sentence.as_ref().map_or((Pooling::Mean, true), |s| (s.pooling, s.normalize));
        let takes = |name: &str| checked.inputs.iter().any(|i| i.name == name);
        if !takes("input_ids") || checked.inputs.iter().any(|i| !i.optional && i.name != "input_ids") {
            return Err(error(
                code,
                format!("embedding feeds `input_ids` (and an attention mask); `{}` needs more", checked.model),
            ));
        }
        let absent: Vec<String> = checked
            .inputs
            .iter()
            .filter(|i| i.optional && i.name != "attention_mask")
            .map(|i| i.name.clone())
            .collect();
        let (_, graph) = forward_graph(&model, LowerOptions { absent, ..Default::default() }, &[output])?;
        let mut feeds = load_weights(code, weights_path, &model, &checked, run)?;
        dtype.apply(code, device, &graph, &mut feeds)?;
        let mut tokenizer = match Tokenizer::find(tokenizer, Some(weights_path)) {
            Some(path) => Tokenizer::open(Some(&path)).map_err(|e| error(code, e))?,
            None => {
                return Err(error(code, "no tokenizer: give --tokenizer tokenizer.json or put one beside the weights"));
            }
        };
        // Longer texts are cut, as sentence-transformers cuts them: at its
        // `max_seq_length`, else at the positions the model has.
        let positions = checked.hparams.iter().find(|(k, _)| k == "positions").and_then(|(_, v)| v.as_f64());
        let max_len = sentence.as_ref().and_then(|s| s.max_len).or(positions.map(|p| p as usize));
        if let Some(n) = max_len {
            tokenizer.truncate(n).map_err(|e| error(code, e))?;
        }
        Ok(Embedder {
            code,
            device,
            graph,
            feeds,
            programs: HashMap::new(),
            packed_weights: Default::default(),
            arena: Default::default(),
            jit: crate::cpu::SharedJit::new(true).map_err(|e| error(code, e))?,
            tokenizer,
            max_len,
            output,
            pooling,
            normalize,
            takes_mask: takes("attention_mask"),
        })
    }

    /// One embedding per text of token ids, in their order.
    pub fn embed(&mut self, ids: &[Vec<usize>], batch: usize) -> Result<Vec<Vec<f32>>, ExitCode> {
        let code = self.code;
        // Batches of similar lengths (longest first, as sentence-transformers
        // orders them), each padded to its longest, as sentence-transformers
        // pads them, and to a fixed batch size: a program per length, all in
        // one JIT, which compiles the kernels they share (all but a handful)
        // once. (Padded to multiples of 8 for fewer programs, the batches of
        // 2,000 sentences took 11% more tokens.)
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let b = batch.min(ids.len()).max(1);
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(b) {
            let longest = ids[chunk[0]].len().max(1);
            let t = longest;
            let (mut flat, mut mask) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
            for r in 0..b {
                let row: &[usize] = chunk.get(r).map_or(&[], |&i| &ids[i]);
                flat.extend(row.iter().map(|i| *i as f32));
                flat.extend(std::iter::repeat_n(self.tokenizer.pad_id() as f32, t - row.len()));
                // A filler row sees its first position, so no softmax is over nothing.
                let seen = row.len().max(1);
                mask.extend(std::iter::repeat_n(1.0, seen));
                mask.extend(std::iter::repeat_n(0.0, t - seen));
            }
            self.feeds.insert("input_ids".into(), Tensor::new(vec![b, t], flat));
            if self.takes_mask {
                self.feeds.insert("attention_mask".into(), Tensor::new(vec![b, t], mask.clone()));
            }
            let program = match self.programs.entry((b, t)) {
                std::collections::hash_map::Entry::Occupied(p) => p.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let shapes = self.feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
                    let options = crate::cpu::CompileOptions {
                        fixed_weights: Some(self.packed_weights.clone()),
                        arena: Some(self.arena.clone()),
                        jit: Some(self.jit.clone()),
                        ..Default::default()
                    };
                    slot.insert(compile_shapes_with(code, self.device, &self.graph, &shapes, options)?)
                }
            };
            let out = program.run(&self.feeds).map_err(|e| error(code, e))?;
            let value = &out[self.output];
            let dim = *value.shape.last().expect("a feature axis");
            for (r, &i) in chunk.iter().enumerate() {
                let v = if self.output == "sentence_embedding" {
                    value.data[r * dim..(r + 1) * dim].to_vec()
                } else {
                    self.pooling.pool(&value.data[r * t * dim..(r + 1) * t * dim], &mask[r * t..(r + 1) * t], dim)
                };
                rows[i] = if self.normalize { normalized(v) } else { v };
            }
        }
        Ok(rows)
    }
}

/// How sentence-transformers pools token states into one vector.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

impl Pooling {
    /// One vector from `states` ([T, dim]) where `mask` is 1.
    fn pool(self, states: &[f32], mask: &[f32], dim: usize) -> Vec<f32> {
        let seen = || states.chunks_exact(dim).zip(mask).filter(|(_, m)| **m > 0.0).map(|(row, _)| row);
        match self {
            Pooling::Cls => states[..dim].to_vec(),
            Pooling::Max => seen()
                .fold(vec![f32::NEG_INFINITY; dim], |acc, row| acc.iter().zip(row).map(|(a, v)| a.max(*v)).collect()),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mean = mean_pool(states, mask, dim);
                if self == Pooling::Mean {
                    return mean;
                }
                let count = mask.iter().sum::<f32>().max(1e-9);
                mean.into_iter().map(|v| v * count / count.sqrt()).collect()
            }
        }
    }
}

/// A sentence-transformers folder's settings: `modules.json` (is there a
/// `Normalize` module), the pooling module's `config.json`, and
/// `sentence_bert_config.json` (`max_seq_length`).
struct Sentence {
    max_len: Option<usize>,
    pooling: Pooling,
    normalize: bool,
}

impl Sentence {
    /// `None` when `dir` is not a sentence-transformers folder.
    fn read(dir: &Path) -> Result<Option<Sentence>, String> {
        let json = |path: PathBuf| -> Result<serde_json::Value, String> {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
        };
        let modules_file = dir.join("modules.json");
        if !modules_file.is_file() {
            return Ok(None);
        }
        let modules = json(modules_file.clone())?;
        let modules =
            modules.as_array().ok_or_else(|| format!("{} is not a list of modules", modules_file.display()))?;
        let kind = |m: &serde_json::Value| {
            m["type"].as_str().unwrap_or_default().rsplit('.').next().unwrap_or_default().to_string()
        };
        let normalize = modules.iter().any(|m| kind(m) == "Normalize");
        let pooling = match modules.iter().find(|m| kind(m) == "Pooling") {
            None => Pooling::Mean,
            Some(m) => {
                let config = json(dir.join(m["path"].as_str().unwrap_or("1_Pooling")).join("config.json"))?;
                let on = |key: &str| config[key].as_bool() == Some(true);
                if on("pooling_mode_cls_token") {
                    Pooling::Cls
                } else if on("pooling_mode_max_tokens") {
                    Pooling::Max
                } else if on("pooling_mode_mean_sqrt_len_tokens") {
                    Pooling::MeanSqrtLen
                } else {
                    Pooling::Mean
                }
            }
        };
        let settings = dir.join("sentence_bert_config.json");
        let max_len =
            if settings.is_file() { json(settings)?["max_seq_length"].as_u64().map(|n| n as usize) } else { None };
        Ok(Some(Sentence { max_len, pooling, normalize }))
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

fn normalized(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / norm).collect()
}
