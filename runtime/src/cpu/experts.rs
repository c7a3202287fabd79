//! The sparse experts' kernels on the CPU: `expert_order` and
//! `expert_offsets` (a stable counting sort of the chosen (token, expert)
//! rows), `expert_matmul` (one product per expert over only its rows) and
//! `expert_weight_grad` (each expert's weight gradient from its rows), the
//! experts side by side on the threads, largest first.

use super::{Given, Program, SendPtr, SendRhs, packed};
use modelc::ir::graph::{NodeId, Op};
use rayon::prelude::*;

impl Program {
    /// Runs `n` if it is one of the experts' kernels (true), else nothing (false).
    pub(super) fn experts<'a>(
        &self,
        n: NodeId,
        out: &mut [f32],
        feeds: &Given,
        input: &dyn Fn(NodeId) -> &'a [f32],
    ) -> Result<bool, String> {
        let node = self.graph.node(n);
        let shape_of = |x: NodeId| self.shape(x);
        match node.op {
            Op::ExpertOrder(experts) | Op::ExpertOffsets(experts) => {
                let choices = input(node.args[0]).iter().map(|c| *c as f64);
                let (order, offsets) = modelc::ir::experts::order(choices, experts)?;
                let v = if matches!(node.op, Op::ExpertOrder(_)) { order } else { offsets };
                out.iter_mut().zip(v).for_each(|(o, i)| *o = i as f32);
                Ok(true)
            }
            Op::ExpertMatMul { tb } => {
                let (x, rows) = (node.args[0], shape_of(node.args[0])?);
                let (k, cols) = (rows[1], out.len() / rows[0].max(1));
                let bounds = expert_bounds(input(node.args[1]), node.args.len() - 2, rows[0])?;
                let mut jobs: Vec<(std::ops::Range<usize>, SendRhs)> = bounds
                    .into_iter()
                    .enumerate()
                    .filter(|(_, r)| !r.is_empty())
                    .map(|(e, r)| {
                        let rhs = match self.packed_arg(n, 2 + e, feeds) {
                            Some(p) => packed::Rhs::Packed(p),
                            None => {
                                let w = input(node.args[2 + e]).as_ptr();
                                packed::Rhs::Dense((w, if tb { 1 } else { cols }, if tb { k } else { 1 }))
                            }
                        };
                        (r, SendRhs(rhs))
                    })
                    .collect();
                let (xp, op) = (SendPtr(input(x).as_ptr() as *mut f32), SendPtr(out.as_mut_ptr()));
                // SAFETY: rows r of x and of the output (disjoint between experts),
                // and the whole weight, at their layouts' strides.
                let product = |r: &std::ops::Range<usize>, rhs: &SendRhs, parallel: bool| unsafe {
                    let (x, o) = (xp.get().add(r.start * k), op.get().add(r.start * cols) as *mut f32);
                    packed::product((r.len(), cols, k), o, cols, 0.0, (x, k, 1), rhs.0, parallel, self.tiles)
                };
                // Experts side by side on the threads when there are enough of
                // them; else one after the other, each product on every thread.
                if jobs.len() >= rayon::current_num_threads() {
                    largest_first(&mut jobs, |(r, _)| r.len(), |(r, rhs)| product(r, rhs, false));
                } else {
                    jobs.iter().for_each(|(r, rhs)| product(r, rhs, packed::worth_threads(r.len(), cols, k)));
                }
                Ok(true)
            }
            Op::ExpertWeightGrad { tb } => {
                let (x, dy) = (shape_of(node.args[0])?, shape_of(node.args[1])?);
                let (k, cols) = (x[1], dy[1]);
                let offsets = input(node.args[2]);
                let bounds = expert_bounds(offsets, offsets.len() - 1, x[0])?;
                // An expert no row went to has a zero gradient; the others'
                // products write theirs whole (zeroing all of it first was
                // ~0.4 ms of each 4 ms kernel at the Mixtral bench's shape).
                for (e, _) in bounds.iter().enumerate().filter(|(_, r)| r.is_empty()) {
                    out[e * k * cols..(e + 1) * k * cols].fill(0.0);
                }
                let mut jobs: Vec<(usize, std::ops::Range<usize>)> =
                    bounds.into_iter().enumerate().filter(|(_, r)| !r.is_empty()).collect();
                let xp = SendPtr(input(node.args[0]).as_ptr() as *mut f32);
                let (dp, op) = (SendPtr(input(node.args[1]).as_ptr() as *mut f32), SendPtr(out.as_mut_ptr()));
                // SAFETY: the expert's rows of x and dy, read transposed, into its
                // own [k, n] (or [n, k]) block of the output.
                let product = |e: usize, r: &std::ops::Range<usize>, parallel: bool| unsafe {
                    let (xr, dr) = (xp.get().add(r.start * k), dp.get().add(r.start * cols));
                    let (shape, a, b) = match tb {
                        false => ((k, cols, r.len()), (xr, 1, k), (dr, cols, 1)),
                        true => ((cols, k, r.len()), (dr, 1, cols), (xr, k, 1)),
                    };
                    let o = op.get().add(e * k * cols) as *mut f32;
                    packed::product(shape, o, shape.1, 0.0, a, packed::Rhs::Dense(b), parallel, self.tiles)
                };
                if jobs.len() >= rayon::current_num_threads() {
                    largest_first(&mut jobs, |(_, r)| r.len(), |(e, r)| product(*e, r, false));
                } else {
                    jobs.iter().for_each(|(e, r)| product(*e, r, packed::worth_threads(k, cols, r.len())));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Runs `jobs` on the threads, largest first, each thread taking the next
/// when it is done (greedy longest-first scheduling): experts' products
/// differ up to 3x in rows, and split in halves the threads ended unevenly.
fn largest_first<J: Sync>(jobs: &mut [J], size: impl Fn(&J) -> usize, run: impl Fn(&J) + Sync) {
    jobs.sort_by_key(|j| std::cmp::Reverse(size(j)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // One taker a thread; any thread may run several (a busy one none):
    // `rayon::broadcast` would wait for every thread, and one may be
    // spinning for a section that waits on this one.
    (0..rayon::current_num_threads()).into_par_iter().for_each(|_| {
        while let Some(job) = jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            run(job);
        }
    });
}

/// Each expert's rows from an `expert_offsets` value, checked to rise within `rows`.
fn expert_bounds(offsets: &[f32], experts: usize, rows: usize) -> Result<Vec<std::ops::Range<usize>>, String> {
    let fits = offsets.len() == experts + 1
        && offsets[0] == 0.0
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets[experts] as usize == rows;
    if !fits {
        return Err(format!("expert offsets {offsets:?} do not split {rows} rows"));
    }
    Ok(offsets.windows(2).map(|w| w[0] as usize..w[1] as usize).collect())
}
