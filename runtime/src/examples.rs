//! `train --data FILE.safetensors`: examples rather than text. The file holds
//! one tensor per model input and per target (`pixel_values` and `labels`,
//! or `src_ids`, `tgt_ids` and `labels`), examples along the first axis; the
//! last `eval_split` of them are held out. Batches are drawn from a fresh
//! shuffle of the training examples every epoch, and depend only on
//! (seed, step), as text batches do.

use crate::cpu::Tensor;
use crate::weights::{Rng, Tensors};
use modelc::check::{Checked, Signature};
use std::path::Path;

/// Whether `--data` names examples (a safetensors file) rather than text.
pub fn is_examples(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

pub struct Examples {
    /// By name, in name order; each [N, ...].
    tensors: Vec<(String, Tensor)>,
    /// The first `train` examples are trained on, the rest held out.
    train: usize,
    count: usize,
}

/// A batch of held-out examples and how many of its rows are distinct
/// examples (the last batch is topped up from the first ones).
pub struct EvalBatch {
    pub feeds: Tensors,
    pub rows: usize,
}

impl Examples {
    /// The file's tensors, checked against the model's inputs and targets.
    pub fn load(path: &Path, checked: &Checked, eval_split: f64) -> Result<Examples, String> {
        let (tensors, _) = crate::weights::load_all(path)?;
        let file = path.display();
        let fed: Vec<&Signature> = checked.inputs.iter().chain(&checked.targets).collect();
        let names = |list: &[Signature]| list.iter().map(|s| format!("`{}`", s.name)).collect::<Vec<_>>().join(", ");
        for name in tensors.keys() {
            if !fed.iter().any(|s| &s.name == name) {
                return Err(format!(
                    "{file} has `{name}`, which is neither an input nor a target of `{}` (inputs: {}; targets: {})",
                    checked.model,
                    names(&checked.inputs),
                    if checked.targets.is_empty() { "none".to_string() } else { names(&checked.targets) },
                ));
            }
        }
        let mut count = None;
        for s in fed {
            let Some(t) = tensors.get(&s.name) else {
                if s.optional {
                    continue;
                }
                return Err(format!("{file} has no `{}` {} for `{}`", s.name, s.ty, checked.model));
            };
            // Examples along the first axis; the rest as the model declares.
            let fits = t.shape.len() == s.ty.rank()
                && s.ty.dims.iter().zip(&t.shape).skip(1).all(|(d, n)| d.as_const().is_none_or(|c| c as usize == *n));
            if !fits {
                return Err(format!(
                    "{file}: `{}` is {:?}; `{}` takes {} (examples along the first axis)",
                    s.name, t.shape, checked.model, s.ty
                ));
            }
            if s.ty.dtype == modelc::types::DType::Int
                && let Some((i, v)) = t.data.iter().enumerate().find(|(_, v)| v.fract() != 0.0 || !v.is_finite())
            {
                return Err(format!("{file}: `{}` is int in `{}`, but its element {i} is {v}", s.name, checked.model));
            }
            match count {
                None => count = Some((s.name.clone(), t.shape[0])),
                Some((ref first, n)) if n != t.shape[0] => {
                    return Err(format!("{file}: `{first}` holds {n} examples but `{}` holds {}", s.name, t.shape[0]));
                }
                Some(_) => {}
            }
        }
        check_labels(&tensors, checked).map_err(|e| format!("{file}: {e}"))?;
        let count = count.map_or(0, |(_, n)| n);
        let held = (count as f64 * eval_split) as usize;
        if count == held {
            return Err(format!("{file} holds {count} examples: none left to train on with a {eval_split} eval split"));
        }
        let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Examples { tensors, train: count - held, count })
    }

    /// The names the file feeds.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    pub fn train_count(&self) -> usize {
        self.train
    }

    pub fn held_out(&self) -> usize {
        self.count - self.train
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Each tensor's shape for `batch` examples.
    pub fn shapes(&self, batch: usize) -> Vec<(String, Vec<usize>)> {
        self.tensors.iter().map(|(n, t)| (n.clone(), [&[batch], &t.shape[1..]].concat())).collect()
    }

    /// Micro-batch `micro` of `step` (from 1): the next `batch` examples of
    /// the epoch's shuffle, so that an epoch sees every training example once.
    pub fn batch(&self, seed: u64, step: usize, micro: usize, batch: usize, accumulate: usize) -> Tensors {
        let first = ((step - 1) * accumulate + micro) * batch;
        let mut order: Option<(usize, Vec<usize>)> = None;
        let rows: Vec<usize> = (first..first + batch)
            .map(|g| {
                let epoch = g / self.train;
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, self.shuffle(seed, epoch)));
                }
                order.as_ref().expect("set above").1[g % self.train]
            })
            .collect();
        self.take(&rows)
    }

    /// Every held-out example, `batch` at a time.
    pub fn eval_batches(&self, batch: usize) -> Vec<EvalBatch> {
        let held: Vec<usize> = (self.train..self.count).collect();
        held.chunks(batch)
            .map(|chunk| {
                let rows: Vec<usize> = held.iter().cycle().skip(chunk[0] - self.train).take(batch).copied().collect();
                EvalBatch { feeds: self.take(&rows), rows: chunk.len() }
            })
            .collect()
    }

    /// The training examples in the order epoch `epoch` visits them.
    fn shuffle(&self, seed: u64, epoch: usize) -> Vec<usize> {
        let mut rng = Rng::new(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ epoch as u64);
        let mut order: Vec<usize> = (0..self.train).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    fn take(&self, rows: &[usize]) -> Tensors {
        self.tensors
            .iter()
            .map(|(name, t)| {
                let size: usize = t.shape[1..].iter().product();
                let data = rows.iter().flat_map(|&r| &t.data[r * size..(r + 1) * size]).copied().collect();
                (name.clone(), Tensor::new([&[rows.len()], &t.shape[1..]].concat(), data))
            })
            .collect()
    }
}

/// Labels scored against `logits` [..., classes] name a class, or are
/// ignored (-100): any other value would train silently on nothing.
fn check_labels(tensors: &Tensors, checked: &Checked) -> Result<(), String> {
    let (Some(labels), Some(logits)) = (tensors.get("labels"), checked.outputs.iter().find(|o| o.name == "logits"))
    else {
        return Ok(());
    };
    let Some(classes) = logits.ty.dims.last().and_then(|d| d.as_const()) else { return Ok(()) };
    if labels.shape.len() + 1 != logits.ty.rank() {
        return Ok(());
    }
    let bad = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, v)| **v != crate::masking::IGNORED && !(0.0..classes as f32).contains(*v));
    match bad {
        Some((i, v)) => Err(format!(
            "`labels` element {i} is {v}, not a class of the {classes} `logits` (0 to {}) nor -100 (ignored)",
            classes - 1
        )),
        None => Ok(()),
    }
}
