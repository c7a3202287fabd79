//! `--memory-budget`: how a training step trades memory for work. The
//! budget is what the process may hold besides the training state (weights,
//! gradients, the optimiser's moments); the planner tries the backend's
//! ways of saving memory (`modelc::backend::Memory`: smaller row chunks,
//! activations recomputed between checkpoints) and takes the fastest plan
//! whose activations fit.

use modelc::ir::graph::Graph;
use modelc::types::Sizes;

/// `--memory-budget`: the bytes the process may hold besides the training
/// state (the weights, their gradients and the optimiser's moments), what it
/// held before loading the weights (the program, the spec, the data), the
/// room kept for code, and the gradients' bytes (in the step's arena, but
/// state).
#[derive(Clone, Copy)]
pub struct Budget {
    pub bytes: u64,
    pub resident: u64,
    pub code: u64,
    pub gradients: u64,
}

/// Room kept in a training run's budget for the compiled programs' code and
/// the buffers a step allocates outside its arena (outputs, the gradient
/// norm's scan).
pub const CODE_ROOM: u64 = 48 << 20;

impl Budget {
    /// What is left for the step's activations and gradients.
    pub fn activations(&self) -> u64 {
        self.bytes.saturating_sub(self.resident).saturating_sub(self.code).saturating_add(self.gradients)
    }
}

/// A way of running the training step within `--memory-budget`.
pub struct MemoryChoice {
    pub memory: modelc::backend::Memory,
    /// The plan's arena and every thread's block buffers.
    activations: u64,
    /// FLOPs of the step, and those the recomputation adds.
    flops: f64,
    extra_flops: f64,
    /// Checkpoints kept, of the cut points there are.
    kept: usize,
    cuts: usize,
}

impl MemoryChoice {
    pub fn report(&self, budget: &Budget) -> String {
        use crate::memory::human;
        let chunks = format!(
            "products of more than {} in row chunks of at most {}",
            human(2 * self.memory.chunk_bytes as u64),
            human(self.memory.chunk_bytes as u64)
        );
        let recompute = match self.memory.keep_every {
            0 => "no activations recomputed".to_string(),
            _ => format!(
                "activations recomputed between {} of {} checkpoints: +{:.1} GFLOP a step ({:+.1}%)",
                self.kept,
                self.cuts,
                self.extra_flops / 1e9,
                100.0 * self.extra_flops / self.flops.max(1.0)
            ),
        };
        let process = match budget.resident.saturating_add(budget.code) {
            0 => String::new(),
            _ => format!("{} held before the weights, {} kept for code, ", human(budget.resident), human(budget.code)),
        };
        format!(
            "memory budget {} besides the weights, gradients and moments: {process}{} planned for the step's \
             activations ({chunks}; {recompute})",
            human(budget.bytes),
            human(self.activations.saturating_sub(budget.gradients))
        )
    }
}

/// The cheapest plan of training step `g` whose activations (arena and
/// block buffers) fit in `budget` bytes: the default if it fits, else
/// smaller row chunks, else activations recomputed between checkpoints
/// (then the largest chunks, the fewest extra FLOPs, the least memory).
pub fn choose(g: &Graph, sizes: &Sizes, budget: &Budget) -> Result<MemoryChoice, String> {
    use modelc::backend::{Memory, Target, checkpoint, prepare_with};
    let threads = rayon::current_num_threads() as u64;
    let flops_of = |g: &Graph| modelc::types::eval_dim(&modelc::ir::print::stats(g).1, sizes).unwrap_or(0) as f64;
    let flops = flops_of(g);
    let cuts = checkpoint::cut_points(g, sizes).len();
    let mut candidates = Vec::new();
    for keep_every in std::iter::once(0).chain(1..=cuts.min(8)) {
        for chunk_bytes in [32 << 20, 8 << 20, 2 << 20] {
            candidates.push(Memory { chunk_bytes, keep_every });
        }
    }
    let mut best: Option<MemoryChoice> = None;
    let mut smallest = u64::MAX;
    for memory in candidates {
        let program = prepare_with(g, sizes, Target::Cpu, memory)?;
        let activations = (program.plan.peak_bytes() as u64)
            .saturating_add((program.plan.block_bytes() as u64).saturating_mul(threads));
        smallest = smallest.min(activations);
        if activations > budget.activations() {
            continue;
        }
        let extra_flops = match memory.keep_every {
            0 => 0.0,
            k => flops_of(&checkpoint::recompute_between(g, sizes, k)) - flops,
        };
        let kept = if memory.keep_every == 0 { cuts } else { cuts / memory.keep_every.max(1) };
        let choice = MemoryChoice { memory, activations, flops, extra_flops, kept, cuts };
        // No recomputation first; then the largest chunks (small ones make
        // slow products and many partial sums); then the fewest FLOPs.
        let key = |c: &MemoryChoice| {
            (c.memory.keep_every > 0, std::cmp::Reverse(c.memory.chunk_bytes), c.extra_flops, c.activations)
        };
        let better = |b: &MemoryChoice| key(&choice) < key(b);
        if best.as_ref().is_none_or(better) {
            best = Some(choice);
        }
    }
    best.ok_or_else(|| {
        format!(
            "--memory-budget {}: the smallest plan of the step's activations needs {} (row chunks of 2 MiB, \
             activations recomputed between checkpoints), and {} is left for them ({} held before the weights, \
             {} kept for code); give a larger budget, or a smaller --batch or --seq-len",
            crate::memory::human(budget.bytes),
            crate::memory::human(smallest.saturating_sub(budget.gradients)),
            crate::memory::human(budget.activations().saturating_sub(budget.gradients)),
            crate::memory::human(budget.resident),
            crate::memory::human(budget.code)
        )
    })
}
