//! Generation with an encoder-decoder (the Transformer of "Attention Is All
//! You Need", or a T5- or BART-like spec): the prompt is the encoder's input;
//! the output starts from the `start` token and grows a token a step, each
//! step reading the logits at its last filled position. The decoder is
//! causal, so a program compiled for a longer target gives the same logits
//! at the positions filled so far: programs are compiled for target lengths
//! that double, and reused. Many prompts (`--prompts FILE`) are decoded
//! together, padded to the longest, with the encoder's padding mask.
//! Each step recomputes the encoder and the decoder's whole prefix (there
//! is no cache for this path).

use crate::cpu::Tensor;
use crate::model::{Compiled, Device, compile_shapes};
use crate::tokenize::Tokenizer;
use crate::weights::{Rng, Tensors};
use modelc::check::Checked;
use modelc::ir::graph::Graph;
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
    graph: Graph,
    names: Names,
    feeds: Tensors,
    /// By (rows, source length, target length).
    programs: HashMap<(usize, usize, usize), Compiled>,
    vocab: usize,
}

impl Generator {
    /// `graph`: the model's forward with `logits` [B, T, vocab] its output.
    pub fn new(device: Device, graph: Graph, names: Names, weights: Tensors, vocab: usize) -> Generator {
        Generator { device, graph, names, feeds: weights, programs: HashMap::new(), vocab }
    }

    fn compile_seconds(&self) -> f64 {
        self.programs.values().map(Compiled::compile_seconds).sum()
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
        let mut out: Vec<Vec<usize>> = vec![Vec::new(); rows];
        let mut done = vec![false; rows];
        for filled in 1..=max_new {
            // Target lengths double (up to the most a generation needs).
            let t = filled.next_power_of_two().min(max_new);
            let mut target = vec![pad as f32; rows * t];
            for (r, new) in out.iter().enumerate() {
                target[r * t] = start as f32;
                for (i, tok) in new.iter().enumerate() {
                    target[r * t + 1 + i] = *tok as f32;
                }
            }
            self.feeds.insert(self.names.target.clone(), Tensor::new(vec![rows, t], target));
            let logits = self.run(rows, s, t)?;
            for r in 0..rows {
                if done[r] {
                    continue;
                }
                let at = (r * t + filled - 1) * self.vocab;
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

    fn run(&mut self, rows: usize, s: usize, t: usize) -> Result<Vec<f32>, String> {
        if !self.programs.contains_key(&(rows, s, t)) {
            let shapes = self.feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
            let p = compile_shapes(crate::infer::CODE, self.device, &self.graph, &shapes)
                .map_err(|_| "cannot compile the encoder-decoder".to_string())?;
            self.programs.insert((rows, s, t), p);
        }
        let mut out = self.programs[&(rows, s, t)].run(&self.feeds)?;
        Ok(out.remove("logits").expect("the graph's output").data)
    }
}
