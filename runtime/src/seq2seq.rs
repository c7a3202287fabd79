//! Generation with an encoder-decoder (the Transformer of "Attention Is All
//! You Need", or a T5- or BART-like spec): the prompt is the encoder's input;
//! the output starts from the `start` token and grows a token a step, each
//! step reading the logits at its last filled position. Many prompts
//! (`--prompts FILE`) are decoded together, padded to the longest, with the
//! encoder's padding mask, every row a token a step.
//!
//! By default the model is lowered with a key/value cache on the target
//! (`LowerOptions::cache_input`) and split by `ir::hoist`: the encoder,
//! and each cross-attention's keys and values, run once per batch of
//! prompts; a step then reads one target position, its self-attention's
//! keys and values kept in the cache. `--no-cache` recomputes the encoder
//! and the whole target prefix every step instead (the decoder is causal,
//! so a program compiled for a longer target gives the same logits at the
//! positions filled so far: programs for target lengths that double).
use crate::cpu::Tensor;
use crate::model::{Compiled, Device, compile_shapes};
use crate::tokenize::Tokenizer;
use crate::weights::{Rng, Tensors};
use modelc::check::Checked;
use modelc::ir::graph::{Graph, Op};
use modelc::ir::signature::Role;
use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

/// The inputs of an encoder-decoder, by role.
#[derive(Clone, Debug)]
pub struct Names {
    /// The encoder's token ids (`src_ids`, `input_ids`).
    pub source: String,
    /// The decoder's token ids so far (`tgt_ids`, `decoder_input_ids`).
    pub target: String,
    /// The encoder's padding mask, when the model takes one (`src_mask`, `attention_mask`).
    pub mask: Option<String>,
}

impl Names {
    /// The encoder-decoder reading of `checked`'s inputs: a decoder input
    /// named `tgt_ids` or `decoder_input_ids` beside the encoder's.
    pub fn of(checked: &Checked) -> Option<Names> {
        let has = |name: &str| checked.inputs.iter().any(|i| i.name == name);
        let target = ["tgt_ids", "decoder_input_ids"].into_iter().find(|n| has(n))?;
        let source = ["src_ids", "input_ids"].into_iter().find(|n| has(n))?;
        let mask = ["src_mask", "attention_mask"].into_iter().find(|n| has(n)).map(str::to_string);
        Some(Names { source: source.to_string(), target: target.to_string(), mask })
    }

    /// Inputs other than these the model needs: it cannot be fed here.
    pub fn unfed<'a>(&self, checked: &'a Checked) -> Option<&'a modelc::check::Signature> {
        let known = |n: &str| n == self.source || n == self.target || self.mask.as_deref() == Some(n);
        checked.inputs.iter().find(|i| !i.optional && !known(&i.name))
    }
}

/// How each next token is picked.
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
}

/// How the generations are printed.
pub struct Output<'a> {
    pub tokenizer: &'a Tokenizer,
    /// One JSON object a prompt rather than its text.
    pub json: bool,
    /// A JSON line of times on stderr at the end.
    pub timings: bool,
}

impl Output<'_> {
    /// A prompt's line: the new text without the stop token, or with `json`
    /// an object with the ids too.
    pub fn line(&self, prompt_ids: &[usize], new: &[usize], stop: Option<usize>) -> String {
        let shown = new.strip_suffix(&[stop.unwrap_or(usize::MAX)][..]).unwrap_or(new);
        let text = String::from_utf8_lossy(&self.tokenizer.decode(shown)).into_owned();
        if self.json {
            serde_json::json!({ "prompt_ids": prompt_ids, "new_token_ids": new, "text": text }).to_string()
        } else {
            text
        }
    }
}

pub struct Generator {
    device: Device,
    steps: Steps,
    names: Names,
    feeds: Tensors,
    /// The weights' names (kept on the GPU between runs).
    weights: Vec<String>,
    vocab: usize,
}

/// How a step's logits are computed.
enum Steps {
    /// The whole target prefix every step, on a program per (rows, source
    /// length, target length).
    Recompute { graph: Graph, programs: HashMap<(usize, usize, usize), Compiled> },
    /// `once` (the encoder's side) per batch, then `each` a position at a
    /// time with the cache, on programs per (rows, source length). On the
    /// CPU the caches are state written in place.
    Cached { once: Graph, each: Graph, programs: HashMap<(usize, usize), [Compiled; 2]> },
}

impl Generator {
    /// `graph`: the model's forward with `logits` [B, T, vocab] its output,
    /// recomputed every step.
    pub fn new(device: Device, graph: Graph, names: Names, weights: Tensors, vocab: usize) -> Generator {
        Generator::with(device, Steps::Recompute { graph, programs: HashMap::new() }, names, weights, vocab)
    }

    /// `graph`: the forward lowered with a cache of the target's positions
    /// (`cache_input` the target), split here into the encoder's side and a step.
    pub fn cached(device: Device, graph: &Graph, names: Names, weights: Tensors, vocab: usize) -> Generator {
        let fixed: Vec<&str> = [Some(names.source.as_str()), names.mask.as_deref()].into_iter().flatten().collect();
        let modelc::ir::hoist::Hoisted { once, mut each } = modelc::ir::hoist::hoist(graph, &fixed);
        if device == Device::Cpu {
            // The caches stay where the step writes them.
            each.outputs.retain(|(name, _)| !matches!(Role::of(name), Role::CacheOut { .. }));
        }
        let steps = Steps::Cached { once, each, programs: HashMap::new() };
        Generator::with(device, steps, names, weights, vocab)
    }

    fn with(device: Device, steps: Steps, names: Names, weights: Tensors, vocab: usize) -> Generator {
        let names_of_weights = weights.keys().cloned().collect();
        Generator { device, steps, names, feeds: weights, weights: names_of_weights, vocab }
    }

    fn compile_seconds(&self) -> f64 {
        match &self.steps {
            Steps::Recompute { programs, .. } => programs.values().map(Compiled::compile_seconds).sum(),
            Steps::Cached { programs, .. } => programs.values().flatten().map(Compiled::compile_seconds).sum(),
        }
    }

    /// Generates for every prompt, up to 64 at a time (the logits of every
    /// target position are held), and prints a line each: the text without
    /// the stop token, or with `json` the ids too.
    pub fn print(
        &mut self,
        prompts: &[Vec<usize>],
        ids: (usize, Option<usize>, usize),
        max_new: usize,
        (sampling, rng): (&Sampling, &mut Rng),
        output: &Output,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut out = std::io::stdout().lock();
        let mut count = 0;
        let stop = ids.1;
        for chunk in prompts.chunks(64) {
            for (prompt_ids, new) in chunk.iter().zip(self.generate(chunk, ids, max_new, sampling, rng)?) {
                count += new.len();
                let _ = writeln!(out, "{}", output.line(prompt_ids, &new, stop));
            }
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!("{count} tokens in {secs:.2} s, {:.1} tokens/s", count as f64 / secs.max(1e-9));
        if output.timings {
            let compile_s = self.compile_seconds();
            let times = serde_json::json!({ "prompts": prompts.len(), "new_tokens": count, "seconds": secs, "compile_s": compile_s });
            eprintln!("{times}");
        }
        Ok(())
    }

    /// Each prompt's new tokens: from `start`, at most `max_new`, ending
    /// after `stop` when it comes. `pad` fills the shorter prompts (masked).
    pub fn generate(
        &mut self,
        prompts: &[Vec<usize>],
        (start, stop, pad): (usize, Option<usize>, usize),
        max_new: usize,
        sampling: &Sampling,
        rng: &mut Rng,
    ) -> Result<Vec<Vec<usize>>, String> {
        let rows = prompts.len();
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut source = Vec::with_capacity(rows * s);
        let mut mask = Vec::with_capacity(rows * s);
        for p in prompts {
            source.extend(p.iter().map(|t| *t as f32).chain(std::iter::repeat_n(pad as f32, s - p.len())));
            mask.extend((0..s).map(|i| if i < p.len() { 1.0 } else { 0.0 }));
        }
        self.feeds.insert(self.names.source.clone(), Tensor::new(vec![rows, s], source));
        if let Some(m) = &self.names.mask {
            self.feeds.insert(m.clone(), Tensor::new(vec![rows, s], mask));
        }
        if let Steps::Cached { .. } = self.steps {
            self.encode(rows, s)?;
        }
        let mut out: Vec<Vec<usize>> = vec![Vec::new(); rows];
        let mut done = vec![false; rows];
        for filled in 1..=max_new {
            let (logits, t) = match self.steps {
                Steps::Recompute { .. } => self.recompute(&out, start, pad, filled, max_new, s)?,
                Steps::Cached { .. } => {
                    let last = out.iter().map(|new| new.last().copied().unwrap_or(start)).collect::<Vec<_>>();
                    (self.step(&last, filled - 1, s)?, 1)
                }
            };
            for r in 0..rows {
                if done[r] {
                    continue;
                }
                // The logits of the last filled position of row r.
                let at = (r * t + t.min(filled) - 1) * self.vocab;
                let next = crate::infer::sample(
                    &logits[at..at + self.vocab],
                    sampling.temperature,
                    sampling.top_k,
                    sampling.top_p,
                    rng,
                );
                out[r].push(next);
                done[r] = Some(next) == stop;
            }
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Ok(out)
    }

    /// The logits of every target position with the prefix filled so far:
    /// `start`, then each row's tokens, padded to a doubling length t.
    fn recompute(
        &mut self,
        out: &[Vec<usize>],
        start: usize,
        pad: usize,
        filled: usize,
        max_new: usize,
        s: usize,
    ) -> Result<(Vec<f32>, usize), String> {
        let rows = out.len();
        let t = filled.next_power_of_two().min(max_new);
        let mut target = vec![pad as f32; rows * t];
        for (r, new) in out.iter().enumerate() {
            target[r * t] = start as f32;
            for (i, tok) in new.iter().enumerate() {
                target[r * t + 1 + i] = *tok as f32;
            }
        }
        self.feeds.insert(self.names.target.clone(), Tensor::new(vec![rows, t], target));
        let Steps::Recompute { graph, programs } = &mut self.steps else { unreachable!("recomputing") };
        let program = match programs.entry((rows, s, t)) {
            std::collections::hash_map::Entry::Occupied(p) => p.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let shapes = self.feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
                let p = compile_shapes(crate::infer::CODE, self.device, graph, &shapes)
                    .map_err(|_| "cannot compile the encoder-decoder".to_string())?;
                p.keep_resident(&self.weights);
                slot.insert(p)
            }
        };
        let mut result = program.run(&self.feeds)?;
        Ok((result.remove("logits").expect("the graph's output").data, t))
    }

    /// Runs the encoder's side for the batch in the feeds (its values fed
    /// to every step as `hoisted:N`) and empties the caches.
    fn encode(&mut self, rows: usize, s: usize) -> Result<(), String> {
        let Steps::Cached { once, each, programs } = &mut self.steps else { unreachable!("cached") };
        // [B, kv_heads, len, head_dim] for each layer's keys and values.
        for n in &each.nodes {
            if let Op::Input(name) = &n.op
                && let Role::CacheIn { .. } = Role::of(name)
            {
                let mut shape: Vec<usize> = n.ty.dims.iter().map(|d| d.as_const().unwrap_or(1) as usize).collect();
                shape[0] = rows;
                self.feeds.insert(name.clone(), Tensor::new(shape.clone(), vec![0.0; shape.iter().product()]));
            }
        }
        self.feeds.insert(self.names.target.clone(), Tensor::new(vec![rows, 1], vec![0.0; rows]));
        self.feeds.insert("position".into(), Tensor::new(vec![], vec![0.0]));
        let compile = |g: &Graph, feeds: &Tensors| {
            let shapes = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
            let p = compile_shapes(crate::infer::CODE, self.device, g, &shapes)
                .map_err(|_| "cannot compile the encoder-decoder".to_string())?;
            p.keep_resident(&self.weights);
            Ok::<_, String>(p)
        };
        // The step's program is compiled once the encoder's values it reads are known.
        let pair = match programs.remove(&(rows, s)) {
            Some([first, step]) => {
                self.feeds.extend(first.run(&self.feeds)?);
                [first, step]
            }
            None => {
                let first = compile(once, &self.feeds)?;
                self.feeds.extend(first.run(&self.feeds)?);
                [first, compile(each, &self.feeds)?]
            }
        };
        programs.insert((rows, s), pair);
        Ok(())
    }

    /// Reads one target token a row at `position`; the logits after it.
    fn step(&mut self, tokens: &[usize], position: usize, s: usize) -> Result<Vec<f32>, String> {
        let rows = tokens.len();
        let Steps::Cached { programs, .. } = &self.steps else { unreachable!("cached") };
        let target = Tensor::new(vec![rows, 1], tokens.iter().map(|t| *t as f32).collect());
        self.feeds.insert(self.names.target.clone(), target);
        self.feeds.insert("position".into(), Tensor::new(vec![], vec![position as f32]));
        // The CPU writes the caches where they lie; the GPU returns them.
        let mut caches: Tensors = self
            .feeds
            .extract_if(|name, _| self.device == Device::Cpu && matches!(Role::of(name), Role::CacheIn { .. }))
            .collect();
        let mut out = Tensors::new();
        let ran = programs[&(rows, s)][1].run_state(&self.feeds, &mut caches, &mut out);
        self.feeds.extend(caches);
        ran?;
        for (name, value) in out.iter_mut() {
            if let Some(input) = Role::of(name).cache_input() {
                self.feeds.insert(input, std::mem::replace(value, Tensor::new(vec![], vec![0.0])));
            }
        }
        Ok(out.remove("logits").expect("the step's output").data)
    }
}
