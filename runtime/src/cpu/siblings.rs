//! Products of a few rows that share their left operand (a decoding
//! step's q/k/v projections, its gate and up projections), which the
//! kernel order puts side by side (`backend::order`): one parallel
//! section reads all their weight rows, the activations rounded once.
//! Three 768 x 768 q4 products cost ~38 us from memory on a 2-core Zen 3
//! VM where one of 2304 x 768 costs ~34 (~8.5 against ~6.2 us for three
//! 288 x 288 ones): a section's start and end paid once instead of three
//! times. `--profile` times such a run as one and splits the time over
//! its products by the weights each reads.

use super::Program;
use super::given::Given;
use super::packed::{self, Rows, Target};
use modelc::backend::kernel::Kernel;
use modelc::backend::order::sibling_runs;
use modelc::ir::graph::{Graph, NodeId};
use modelc::types::{Sizes, eval_dim};

/// What a kernel of the schedule is to the products beside it.
pub(super) enum Sibling {
    /// Runs as it is.
    Alone,
    /// A product that runs the products after it (views between) with its
    /// own; `shares` splits the run's time over its kernels from this one
    /// to the last product, by weights read (`--profile`; views get none).
    Leads { others: Vec<NodeId>, shares: Vec<f64> },
    /// A product an earlier one runs.
    Follows,
}

/// For each kernel of `kernels`, its part in the runs of products that
/// share their left operand (`order::sibling_runs`).
pub(super) fn runs(graph: &Graph, kernels: &[Kernel], sizes: &Sizes) -> Vec<Sibling> {
    let mut out: Vec<Sibling> = kernels.iter().map(|_| Sibling::Alone).collect();
    for run in sibling_runs(graph, kernels, sizes) {
        let (first, last) = (run[0], run[run.len() - 1]);
        let weights = |j: usize| match kernels[j] {
            Kernel::View(_) => 0.0,
            _ => {
                let w = graph.node(kernels[j].output()).args[1];
                graph.dims(w).iter().map(|d| eval_dim(d, sizes).unwrap_or(1) as f64).product()
            }
        };
        let shares = (first..=last).map(weights).collect();
        let others = run[1..].iter().map(|&j| kernels[j].output()).collect();
        run[1..].iter().for_each(|&j| out[j] = Sibling::Follows);
        out[first] = Sibling::Leads { others, shares };
    }
    out
}

impl Program {
    /// Products `lead` and `others` (`Sibling::Leads`) in one section, or
    /// one by one where their weights are not all rows of one format.
    pub(super) fn sibling_products(
        &self,
        lead: NodeId,
        others: &[NodeId],
        arena: &mut [f32],
        feeds: &Given,
    ) -> Result<(), String> {
        let nodes: Vec<NodeId> = std::iter::once(lead).chain(others.iter().copied()).collect();
        let base = arena.as_mut_ptr();
        let (m, k) = {
            let a = self.shape(self.graph.node(lead).args[0])?;
            (a[0], a[1])
        };
        let target = |n: NodeId| -> Result<Option<Target>, String> {
            let cols = self.shape(n)?[1];
            let rhs = match self.packed(n, feeds) {
                Some(w) => Rows::Packed(w),
                // f32 weights in tiles go through `single`.
                None if self.tiles.is_none() => Rows::F32(self.pointer(self.graph.node(n).args[1], base, feeds), k),
                None => return Ok(None),
            };
            Ok(Some(Target { n: cols, c: (self.pointer(n, base, feeds), cols), rhs }))
        };
        let targets = nodes.iter().map(|&n| target(n)).collect::<Result<Option<Vec<Target>>, String>>()?;
        match targets {
            Some(targets) if targets.iter().all(|t| t.rhs.format() == targets[0].rhs.format()) => {
                let cols = targets.iter().map(|t| t.n).sum();
                let a = self.pointer(self.graph.node(lead).args[0], base, feeds);
                // SAFETY: `a` is m x k, each output m x its columns, each weight its
                // columns' rows of k: planned memory or the caller's, the outputs
                // disjoint from each other and from `a` (each is its own value).
                unsafe { packed::matvecs((m, k), (a, k), 0.0, &targets, packed::worth_threads(m, cols, k)) };
                Ok(())
            }
            _ => nodes.into_iter().try_for_each(|n| self.single(n, arena, feeds)),
        }
    }
}
