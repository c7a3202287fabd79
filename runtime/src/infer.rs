//! `modelc infer`: generates text from trained weights, streaming each token
//! as it comes. Decoding is KV-cached: the model is lowered with a key/value
//! cache (`ir::lower::Cache`), the prompt is read in one call and each new
//! token costs one call with a single position. When the cache is full, the
//! most recent half of the tokens is read again from position 0 and decoding
//! goes on. `--no-cache` recomputes the whole context for every token
//! instead (to measure what the cache saves). Greedy, temperature, top-k and
//! top-p sampling, seeded. An encoder-decoder generates from its prompt as
//! the encoder's input (`seq2seq`).

use crate::cli::ModelArgs;
use crate::cpu::Tensor;
use crate::model::Compiled;
use crate::model::{Device, DtypeArgs, RunArgs, compile, compile_shapes_with, error, forward_graph, load_weights};
use crate::tokenize::{Stream, Tokenizer};
use crate::weights::{Rng, Tensors};
use modelc::check::value::Value;
use modelc::check::{Checked, LowerOptions};
use modelc::ir::graph::{Graph, Op};
use modelc::ir::signature::Role;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

pub const CODE: &str = "E0702";

#[derive(clap::Args, Clone, Debug)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// Trained weights: a safetensors file, a sharded checkpoint's index, or a folder.
    #[arg(long)]
    pub weights: PathBuf,
    /// A Hugging Face tokenizer.json (default: one beside the weights, else bytes as tokens).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The text to continue.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// The prompt as token ids instead, e.g. `--prompt-ids 72,101`.
    #[arg(long = "prompt-ids", value_delimiter = ',')]
    pub prompt_ids: Vec<usize>,
    /// A file of prompts, one a line: one line of output each (the new text, or a JSON
    /// object with --json). An encoder-decoder decodes them together, a decoder one
    /// after another on the same programs.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids"])]
    pub prompts: Option<PathBuf>,
    /// The token an encoder-decoder's output starts from (default: the spec's `start`).
    #[arg(long = "start-id")]
    pub start_id: Option<usize>,
    /// Stop a generation after this token (default: the spec's `stop`, else none).
    #[arg(long = "stop-id")]
    pub stop_id: Option<usize>,
    /// How many tokens to generate (default: the spec's `max_new_tokens`, else 200).
    #[arg(long = "max-new-tokens")]
    pub max_new_tokens: Option<usize>,
    /// >= 0; 0 picks the most likely token (default: the spec's `temperature`, else 0.8).
    #[arg(long, value_parser = crate::flags::non_negative)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long = "top-k")]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities add up to p, in (0, 1].
    #[arg(long = "top-p", value_parser = crate::flags::probability)]
    pub top_p: Option<f64>,
    /// Seeds the sampling; the same seed repeats the text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Positions the model sees at once (default: the spec's `context` in `infer`,
    /// else its training `seq_len`, else its `positions` hyperparameter, else 2048); at least 1.
    #[arg(long, value_parser = crate::flags::count)]
    pub context: Option<usize>,
    /// Recompute the whole context for every token instead of using the key/value cache.
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// How the key/value cache keeps its values: f32, or f16 in half the
    /// memory and half the bytes a token reads (CPU). Default: f32 with f32
    /// weights, f16 with bf16, q8 or q4 ones (as llama.cpp keeps its cache).
    #[arg(long = "kv-cache", value_parser = ["f32", "f16"], conflicts_with = "no_cache")]
    pub kv_cache: Option<String>,
    /// Print one JSON object with the new token ids (and the text) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// End with one JSON line on stderr: prompt and decode times and tokens/s, compile time.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub retrieve: crate::retrieval::RetrieveArgs,
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

/// A setting: the flag, else the spec's block, else a default.
fn setting(block: &[(String, Value)], key: &str, flag: Option<f64>, default: f64) -> f64 {
    flag.or_else(|| block.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_f64())).unwrap_or(default)
}

/// How many positions the model can attend over.
fn context(args: &InferArgs, checked: &Checked) -> usize {
    let from = |block: &[(String, Value)], key: &str| {
        block.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_f64()).map(|v| v as usize)
    };
    args.context
        .or_else(|| from(&checked.infer, "context"))
        .or_else(|| from(&checked.train, "seq_len"))
        .or_else(|| from(&checked.hparams, "positions"))
        .unwrap_or(2048)
        .max(2)
}

/// Next-token logits for a growing sequence.
trait Decoder {
    /// Compiles what reading a prompt of `prompt` tokens and then decoding
    /// `new` more needs, so that no token waits for the compiler.
    fn prepare(&mut self, _prompt: usize, _new: usize) -> Result<(), String> {
        Ok(())
    }
    /// Reads `new` (the tokens after those already read) and returns the
    /// logits after the last of them.
    fn next(&mut self, tokens: &[usize], new: usize) -> Result<Vec<f32>, String>;
    /// Seconds spent compiling programs so far.
    fn compile_seconds(&self) -> f64;
    /// Forgets what was read, for another prompt (programs are kept).
    fn reset(&mut self) {}
}

/// The lengths of the pieces `read` cuts `n` tokens into.
fn chunk_sizes(n: usize, chunk: usize) -> Vec<usize> {
    let mut sizes = vec![chunk; n / chunk];
    if !n.is_multiple_of(chunk) {
        sizes.push(n % chunk);
    }
    sizes.dedup();
    sizes
}

/// KV-cached decoding: one program per number of new tokens (the prompt,
/// then 1), sharing the weights and the cache tensors. On the CPU the
/// caches are state the programs write the new rows into where they lie
/// (`Program::run_state`); on the GPU each run returns them updated
/// (`present.*`), and they become the next run's inputs.
struct Cached {
    device: Device,
    graph: Graph,
    feeds: Tensors,
    /// The caches written in place (CPU), by input name.
    caches: Tensors,
    programs: HashMap<usize, Compiled>,
    len: usize,
    vocab: usize,
    /// Tokens whose keys and values the cache holds.
    held: usize,
    /// The most tokens one program reads at once: a sliding window's ring
    /// cache makes room for so many (`ring_chunk`); unbounded otherwise.
    chunk: usize,
    /// Every cache is a sliding window's ring: decoding goes on forever
    /// with the memory it has, never starting over.
    rolling: bool,
    /// Last token's outputs, the buffers of the next token's (`run_into`).
    spare: Tensors,
    /// The programs take turns (a prompt's, then a token's): on the CPU
    /// they share one arena and one JIT (a kernel of the prompt's program
    /// the token's has too is compiled once).
    arena: crate::cpu::Arena,
    jit: Option<crate::cpu::SharedJit>,
}

impl Cached {
    /// `halves`: the caches kept as f16 (CPU).
    fn new(device: Device, mut graph: Graph, weights: Tensors, len: usize, vocab: usize, halves: bool) -> Cached {
        let mut feeds = weights;
        let mut caches = Tensors::new();
        let in_place = device == Device::Cpu;
        if in_place {
            // The caches stay where the programs write them: nothing to return.
            graph.outputs.retain(|(name, _)| !matches!(Role::of(name), Role::CacheOut { .. }));
        }
        let (mut chunk, mut rolling) = (usize::MAX, true);
        for n in &graph.nodes {
            if let Op::Input(name) = &n.op
                && let Role::CacheIn { .. } = Role::of(name)
            {
                // [B, kv_heads, slots, head_dim]: fewer slots than the context is a ring.
                let slots = n.ty.dims[2].as_const().unwrap_or(0) as usize;
                if slots < len {
                    chunk = chunk.min(modelc::ir::lower::ring_chunk(slots));
                } else {
                    rolling = false;
                }
                // [B, kv_heads, len, head_dim] with B = 1.
                let shape: Vec<usize> =
                    n.ty.dims
                        .iter()
                        .enumerate()
                        .map(|(i, d)| if i == 0 { 1 } else { d.as_const().unwrap_or(1) as usize })
                        .collect();
                let count = shape.iter().product();
                let cache =
                    if halves && in_place { Tensor::halves(shape) } else { Tensor::new(shape, vec![0.0; count]) };
                if in_place {
                    caches.insert(name.clone(), cache)
                } else {
                    feeds.insert(name.clone(), cache)
                };
            }
        }
        let bytes: usize =
            caches.values().chain(feeds.values()).filter(|t| t.is_half()).map(|t| t.halves.len() * 2).sum();
        if bytes > 0 {
            eprintln!("key/value cache: f16 ({:.1} MB)", bytes as f64 / 1e6);
        }
        let rolling = rolling && chunk < usize::MAX;
        let (programs, spare) = (HashMap::new(), Tensors::new());
        let (arena, jit) = (Default::default(), None);
        Cached { device, graph, feeds, caches, programs, len, vocab, held: 0, chunk, rolling, spare, arena, jit }
    }

    /// How many of `tokens` a full cache starts over from.
    fn restart(&self, tokens: usize) -> usize {
        (self.len / 2).max(1).min(tokens)
    }

    /// The program for `t` new tokens, compiled on first use.
    fn program(&mut self, t: usize) -> Result<(), String> {
        if !self.programs.contains_key(&t) {
            self.feeds.insert("input_ids".into(), Tensor::new(vec![1, t], vec![0.0; t]));
            self.feeds.insert("position".into(), Tensor::new(vec![], vec![0.0]));
            let shapes = self.feeds.iter().chain(&self.caches).map(|(k, v)| (k.clone(), v.shape.clone())).collect();
            if self.device == Device::Cpu && self.jit.is_none() {
                self.jit = Some(crate::cpu::SharedJit::new(true)?);
            }
            let options = crate::cpu::CompileOptions {
                arena: Some(self.arena.clone()),
                jit: self.jit.clone(),
                ..Default::default()
            };
            let p = compile_shapes_with(CODE, self.device, &self.graph, &shapes, options)
                .map_err(|_| "cannot compile the decoder".to_string())?;
            // Weights stay on the device between tokens; the cache and the tokens move.
            let weights: Vec<String> = self
                .feeds
                .keys()
                .filter(|k| Role::of(k) == Role::Plain(k) && *k != "input_ids" && *k != "position")
                .cloned()
                .collect();
            p.keep_resident(&weights);
            self.programs.insert(t, p);
        }
        Ok(())
    }

    /// Reads `ids` at `position ..`, in chunks a ring has room for; the
    /// logits after the last.
    fn read(&mut self, ids: &[usize], position: usize) -> Result<Vec<f32>, String> {
        let mut logits = Vec::new();
        for (i, part) in ids.chunks(self.chunk).enumerate() {
            logits = self.read_chunk(part, position + i * self.chunk)?;
        }
        Ok(logits)
    }

    fn read_chunk(&mut self, ids: &[usize], position: usize) -> Result<Vec<f32>, String> {
        let t = ids.len();
        self.program(t)?;
        self.feeds.insert("input_ids".into(), Tensor::new(vec![1, t], ids.iter().map(|i| *i as f32).collect()));
        self.feeds.insert("position".into(), Tensor::new(vec![], vec![position as f32]));
        let mut out = std::mem::take(&mut self.spare);
        self.programs[&t].run_state(&self.feeds, &mut self.caches, &mut out)?;
        // The new cache becomes the input; the old one the next output's buffer.
        for (name, value) in out.iter_mut() {
            if let Some(input) = Role::of(name).cache_input() {
                match self.feeds.get_mut(&input) {
                    Some(past) => std::mem::swap(past, value),
                    None => unreachable!("bug: a cache output without its input"),
                }
            }
        }
        // The last position's logits (the program may compute only those).
        let all = &out["logits"].data;
        let logits = all[all.len() - self.vocab..].to_vec();
        self.spare = out;
        Ok(logits)
    }
}

impl Decoder for Cached {
    fn compile_seconds(&self) -> f64 {
        self.programs.values().map(Compiled::compile_seconds).sum()
    }

    fn reset(&mut self) {
        self.held = 0;
        let caches = self.caches.iter_mut().chain(self.feeds.iter_mut());
        for (_, t) in caches.filter(|(name, _)| matches!(Role::of(name), Role::CacheIn { .. })) {
            t.data.fill(0.0);
            t.halves.fill(0);
        }
    }

    fn prepare(&mut self, prompt: usize, new: usize) -> Result<(), String> {
        // The prompt's chunks, then one token at a time.
        let mut sizes = chunk_sizes(prompt.min(self.len), self.chunk);
        sizes.push(1);
        // A full cache starts over from the last half of the context
        // (`next`): reading it takes programs of their own, which were
        // compiled mid-generation before (36 ms of one token at tiny-gpt).
        if !self.rolling && prompt + new > self.len {
            sizes.extend(chunk_sizes(self.restart(prompt + new), self.chunk));
        }
        sizes.into_iter().filter(|t| *t > 0).try_for_each(|t| self.program(t))
    }

    fn next(&mut self, tokens: &[usize], new: usize) -> Result<Vec<f32>, String> {
        if self.rolling || self.held + new <= self.len {
            let start = tokens.len() - new;
            let logits = self.read(&tokens[start..], self.held)?;
            self.held += new;
            return Ok(logits);
        }
        // Full: start over from the most recent half of the context.
        let keep = self.restart(tokens.len());
        self.held = keep;
        self.read(&tokens[tokens.len() - keep..], 0)
    }
}

/// Recomputes the last `len` tokens for every new one, on a program compiled
/// once for a fixed length (causal attention makes the padding irrelevant).
struct Recompute {
    program: Compiled,
    feeds: Tensors,
    len: usize,
    vocab: usize,
}

impl Decoder for Recompute {
    fn compile_seconds(&self) -> f64 {
        self.program.compile_seconds()
    }

    fn next(&mut self, tokens: &[usize], _new: usize) -> Result<Vec<f32>, String> {
        let seen = &tokens[tokens.len().saturating_sub(self.len)..];
        let mut ids: Vec<f32> = seen.iter().map(|t| *t as f32).collect();
        ids.resize(self.len, 0.0);
        self.feeds.insert("input_ids".into(), Tensor::new(vec![1, self.len], ids));
        let out = self.program.run(&self.feeds)?;
        let pos = seen.len() - 1;
        Ok(out["logits"].data[pos * self.vocab..(pos + 1) * self.vocab].to_vec())
    }
}

pub fn run(args: &InferArgs) -> ExitCode {
    let args = InferArgs { model: crate::model::with_folder_config(&args.model, &args.weights), ..args.clone() };
    crate::model::exit(infer(&args))
}

fn infer(args: &InferArgs) -> Result<(), ExitCode> {
    let device = args.run.apply(CODE)?;
    crate::model::on_device(device, || infer_on(args, device))
}

fn infer_on(args: &InferArgs, device: Device) -> Result<(), ExitCode> {
    let checked = crate::model::checked(&args.model)?;
    let Some(logits_sig) = checked.outputs.iter().find(|o| o.name == "logits") else {
        return Err(error(CODE, format!("`{}` has no `logits` output to generate from", checked.model)));
    };
    let vocab = logits_sig.ty.dims.last().and_then(|d| d.as_const()).unwrap_or(0) as usize;
    let absent: Vec<String> = checked.inputs.iter().filter(|i| i.optional).map(|i| i.name.clone()).collect();
    let seq2seq = crate::seq2seq::Names::of(&checked);
    if let Some(names) = &seq2seq
        && let Some(other) = names.unfed(&checked)
    {
        return Err(error(
            CODE,
            format!(
                "`infer` feeds an encoder-decoder `{}`, `{}`{}; `{}` also needs `{}`",
                names.source,
                names.target,
                names.mask.as_ref().map(|m| format!(" and `{m}`")).unwrap_or_default(),
                checked.model,
                other.name
            ),
        ));
    }
    if seq2seq.is_none() && checked.inputs.iter().any(|i| !i.optional && i.name != "input_ids") {
        return Err(error(CODE, format!("`infer` feeds `input_ids` only; `{}` needs other inputs too", checked.model)));
    }
    let weights = load_weights(CODE, &args.weights, &args.model, &checked, &args.run)?;
    let tokenizer_path = Tokenizer::find(args.tokenizer.as_deref(), Some(&args.weights));
    let tokenizer = Tokenizer::open(tokenizer_path.as_deref()).map_err(|e| error(CODE, e))?;
    let prompt = match &args.retrieve.retrieve {
        Some(_) => args.retrieve.prompt(&args.prompt).map_err(|e| error(CODE, e))?,
        None => args.prompt.clone(),
    };
    let prompts: Vec<Vec<usize>> = match &args.prompts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error(CODE, format!("cannot read {}: {e}", path.display())))?;
            let lines = text.lines().map(|l| tokenizer.encode(l)).collect::<Result<Vec<_>, _>>();
            lines.map_err(|e| error(CODE, e))?
        }
        None if args.prompt_ids.is_empty() => vec![tokenizer.encode(&prompt).map_err(|e| error(CODE, e))?],
        None => vec![args.prompt_ids.clone()],
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        let line = prompts.iter().position(Vec::is_empty).filter(|_| args.prompts.is_some());
        let empty = line.map(|i| format!(" (line {})", i + 1)).unwrap_or_default();
        return Err(error(CODE, format!("the prompt is empty{empty}: give --prompt TEXT or --prompt-ids 1,2,3")));
    }
    if let Some(bad) = prompts.iter().flatten().find(|t| **t >= vocab) {
        return Err(error(CODE, format!("prompt token {bad} is outside the vocabulary of {vocab}")));
    }
    let s = &checked.infer;
    let token_setting = |key: &str, flag: Option<usize>| -> Result<Option<usize>, ExitCode> {
        let id = flag.or_else(|| s.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_f64()).map(|v| v as usize));
        match id {
            Some(id) if id >= vocab => {
                Err(error(CODE, format!("the {key} token {id} is outside the vocabulary of {vocab}")))
            }
            id => Ok(id),
        }
    };
    let stop = token_setting("stop", args.stop_id)?;
    let max_new = setting(s, "max_new_tokens", args.max_new_tokens.map(|v| v as f64), 200.0) as usize;
    let checked_setting = |key: &str, flag: Option<f64>, default: f64, parser| {
        crate::flags::check(key, setting(s, key, flag, default), parser).map_err(|e| error(CODE, e))
    };
    let temperature = checked_setting("temperature", args.temperature, 0.8, crate::flags::non_negative)?;
    let top_k = setting(s, "top_k", args.top_k.map(|v| v as f64), 0.0) as usize;
    let top_p = checked_setting("top_p", args.top_p, 1.0, crate::flags::probability)?;
    let seed = setting(s, "seed", args.seed.map(|v| v as f64), 0.0) as u64;
    let context = context(args, &checked);
    if let Some(names) = seq2seq {
        let Some(start) = token_setting("start", args.start_id)? else {
            return Err(error(
                CODE,
                format!(
                    "`{}` is an encoder-decoder: give the token its output starts from, --start-id N or `start: N` in its `infer` block",
                    checked.model
                ),
            ));
        };
        let sampling = crate::seq2seq::Sampling { temperature, top_k, top_p };
        let absent = absent_of(&checked, &names);
        let mut weights = weights;
        let mut generator = if args.no_cache {
            let how = LowerOptions { absent, ..Default::default() };
            let (_, g) = forward_graph(&args.model, how, &["logits"])?;
            args.dtype.apply(CODE, device, &g, &mut weights)?;
            crate::seq2seq::Generator::new(device, g, names, weights, vocab)
        } else {
            // The cache holds every new position of the target.
            let cache_input = Some(names.target.clone());
            let how = LowerOptions { absent, cache: Some(max_new.max(1)), cache_input, ..Default::default() };
            let (_, g) = forward_graph(&args.model, how, &[])?;
            args.dtype.apply(CODE, device, &g, &mut weights)?;
            crate::seq2seq::Generator::cached(device, &g, names, weights, vocab)
        };
        let output = crate::seq2seq::Output { tokenizer: &tokenizer, json: args.json, timings: args.timings };
        let ids = (start, stop, tokenizer.pad_id());
        generator
            .print(&prompts, ids, max_new, (&sampling, &mut Rng::new(seed)), &output)
            .map_err(|e| error(CODE, e))?;
        return Ok(());
    }
    // The cache holds the longest prompt and its new tokens.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);

    let mut decoder: Box<dyn Decoder> = if args.no_cache {
        let (_, g) = forward_graph(&args.model, LowerOptions { absent, ..Default::default() }, &["logits"])?;
        let len = context.min(longest.saturating_add(max_new));
        let mut feeds = weights;
        args.dtype.apply(CODE, device, &g, &mut feeds)?;
        feeds.insert("input_ids".into(), Tensor::new(vec![1, len], vec![0.0; len]));
        let program = compile(CODE, device, &g, &feeds)?;
        let weights: Vec<String> = feeds.keys().filter(|k| *k != "input_ids").cloned().collect();
        program.keep_resident(&weights);
        Box::new(Recompute { program, feeds, len, vocab })
    } else {
        let len = context.min(longest.saturating_add(max_new));
        let how = LowerOptions { absent, cache: Some(len), ..Default::default() };
        let (_, g) = forward_graph(&args.model, how, &[])?;
        // The prompt's logits after its last token only (what decoding reads).
        let g = modelc::ir::last_position::last_position(&g, "logits").unwrap_or(g);
        let mut weights = weights;
        args.dtype.apply(CODE, device, &g, &mut weights)?;
        let halves = match args.kv_cache.as_deref() {
            Some("f16") if device != Device::Cpu => {
                return Err(error(CODE, "--kv-cache f16 is for the CPU; the GPU keeps its cache as f32"));
            }
            Some(kind) => kind == "f16",
            None => device == Device::Cpu && weights.values().any(|t| t.packed.is_some()),
        };
        Box::new(Cached::new(device, g, weights, len, vocab, halves))
    };

    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout().lock();
    if args.prompts.is_some() {
        // One prompt after another on the same programs, a line each.
        decoder.prepare(longest, max_new).map_err(|e| error(CODE, e))?;
        let output = crate::seq2seq::Output { tokenizer: &tokenizer, json: args.json, timings: false };
        let (started, mut count) = (Instant::now(), 0);
        for prompt_ids in &prompts {
            decoder.reset();
            let (mut tokens, mut new, mut fresh) = (prompt_ids.clone(), prompt_ids.len(), Vec::new());
            for _ in 0..max_new {
                let logits = decoder.next(&tokens, new).map_err(|e| error(CODE, e))?;
                let next = sample(&logits, temperature, top_k, top_p, &mut rng);
                tokens.push(next);
                fresh.push(next);
                new = 1;
                if Some(next) == stop {
                    break;
                }
            }
            count += fresh.len();
            let _ = writeln!(out, "{}", output.line(prompt_ids, &fresh, stop));
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!("{count} tokens in {secs:.2} s, {:.1} tokens/s", count as f64 / secs.max(1e-9));
        return Ok(());
    }
    let prompt_ids = prompts.into_iter().next().expect("one prompt");
    let mut tokens = prompt_ids.clone();
    if !args.json {
        let _ = out.write_all(&tokenizer.decode(&tokens));
        let _ = out.flush();
    }
    decoder.prepare(tokens.len(), max_new).map_err(|e| error(CODE, e))?;
    let mut stream = Stream::new(&tokenizer);
    let started = Instant::now();
    let mut fresh = Vec::new();
    let mut new = tokens.len();
    // When the prompt has been read (its logits are the first token's).
    let mut prompt_read = None;
    for _ in 0..max_new {
        let token_started = Instant::now();
        let logits = decoder.next(&tokens, new).map_err(|e| error(CODE, e))?;
        prompt_read.get_or_insert_with(Instant::now);
        let next = sample(&logits, temperature, top_k, top_p, &mut rng);
        crate::profile::span(if new > 1 { "prompt" } else { "token" }, token_started);
        tokens.push(next);
        fresh.push(next);
        new = 1;
        if Some(next) == stop {
            break;
        }
        if !args.json {
            let _ = out.write_all(&stream.push(next));
            let _ = out.flush();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let output = crate::seq2seq::Output { tokenizer: &tokenizer, json: true, timings: false };
        let _ = writeln!(out, "{}", output.line(&prompt_ids, &fresh, stop));
    } else {
        let _ = out.write_all(&stream.finish());
        let _ = writeln!(out);
    }
    eprintln!("{} tokens in {secs:.2} s, {:.1} tokens/s", fresh.len(), fresh.len() as f64 / secs.max(1e-9));
    if args.timings {
        // The prompt's time includes sampling the first token; decoding is every later token.
        let prefill = prompt_read.map_or(0.0, |t| (t - started).as_secs_f64());
        let decode = secs - prefill;
        let decoded = fresh.len().saturating_sub(1);
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_tokens": prompt_ids.len(),
                "prefill_s": prefill,
                "prefill_tokens_per_s": prompt_ids.len() as f64 / prefill.max(1e-9),
                "decode_tokens": decoded,
                "decode_s": decode,
                "decode_tokens_per_s": decoded as f64 / decode.max(1e-9),
                "compile_s": decoder.compile_seconds(),
            })
        );
    }
    Ok(())
}

/// The optional inputs an encoder-decoder is not fed: all but its source mask.
fn absent_of(checked: &Checked, names: &crate::seq2seq::Names) -> Vec<String> {
    let fed = |n: &str| names.mask.as_deref() == Some(n);
    checked.inputs.iter().filter(|i| i.optional && !fed(&i.name)).map(|i| i.name.clone()).collect()
}
