//! Runs of kernels that touch no memory in common, in one parallel
//! section. AdamW's update is a row group per parameter (its moments' and
//! weight's updates), 127 of them in the Mixtral step `benches/moe.py`
//! times, ~0.2 ms of work each; as a section each, every one paid the
//! threads' start and an uneven end (7 chunks over 2 threads). Together
//! the chunks and blocks of all of them are one list the threads share.
//!
//! Which kernels may go together is known from the graph (none reads what
//! another of the run writes); whether their memory is apart is checked as
//! they run, from the addresses themselves: the plan may put a kernel's
//! output where an earlier one's input was (dead after it), and the
//! caller's buffers (weights, moments) are known only then. A run splits
//! where a kernel's memory meets an earlier one's.

use super::row_groups::RowBlocks;
use super::{Compiled, Program, SendPtrs, kernels};
use modelc::backend::kernel::Kernel;
use modelc::backend::plan::{Place, Plan};
use modelc::backend::rows::{block_rows, row_product};
use modelc::ir::graph::{Graph, NodeId};
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::Mutex;

/// What a kernel of the schedule is to the kernels beside it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Batch {
    /// Runs as it is.
    Alone,
    /// Runs itself and the kernels after it: this many in all.
    Leads(usize),
    /// A kernel an earlier one runs.
    Follows,
}

/// The chunk of a fused kernel's range each task takes, where the kernel
/// is worth splitting over the threads: below two tasks' worth, as for the
/// native kernels, waking the other threads costs more than it saves.
/// Decoding runs dozens of kernels of ~75k elements a token (the KV cache
/// writes); splitting those at 64k made it 15% slower.
pub(super) fn fused_chunk(len: usize, row: usize) -> Option<usize> {
    let chunk = ((1 << 15) / row).max(1);
    if len * row < 2 * kernels::PARALLEL || len <= 2 * chunk {
        return None;
    }
    // A multiple of the threads' count of chunks: 7 over 2 threads left one
    // idle for an eighth of the kernel.
    let threads = rayon::current_num_threads().max(1);
    Some(len.div_ceil(len.div_ceil(chunk).div_ceil(threads) * threads))
}

/// Each kernel's part in the runs: kernels split over the threads anyway
/// (fused ones, row groups without a matrix product), each reading nothing
/// the run's earlier kernels write.
pub(super) fn runs(graph: &Graph, kernels: &[Kernel], compiled: &[Compiled], plan: &Plan) -> Vec<Batch> {
    let splits = |k: &Kernel, c: &Compiled| match (k, c) {
        (_, Compiled::Fused { row, .. }) => fused_chunk(plan.lens[k.output().index()], *row).is_some(),
        (Kernel::Rows(parts), Compiled::Rows { rows, len, .. }) => {
            !parts.iter().any(|p| matches!(p, Kernel::Single(n) if row_product(graph, *n)))
                && block_rows(graph, parts, *rows, *len) < *rows
        }
        _ => false,
    };
    let mut out = vec![Batch::Alone; kernels.len()];
    let mut k = 0;
    while k < kernels.len() {
        let mut end = k;
        let mut made: HashSet<NodeId> = HashSet::new();
        while end < kernels.len()
            && splits(&kernels[end], &compiled[end])
            && !kernels[end].reads(graph).iter().any(|r| made.contains(r))
        {
            made.extend(written(&kernels[end]));
            end += 1;
        }
        if end - k >= 2 {
            out[k] = Batch::Leads(end - k);
            out[k + 1..end].iter_mut().for_each(|b| *b = Batch::Follows);
            k = end;
        } else {
            k += 1;
        }
    }
    out
}

/// The values a kernel writes (a row group's parts' each).
fn written(k: &Kernel) -> Vec<NodeId> {
    match k {
        Kernel::Rows(parts) => parts.iter().map(Kernel::output).collect(),
        k => vec![k.output()],
    }
}

/// Memory a kernel reads or writes: a byte range.
type Span = (usize, usize);

fn meets(a: &[Span], b: &[Span]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1))
}

/// A kernel of a run, ready: a fused kernel's pointers and chunks, or a row group's blocks.
enum Job<F> {
    Fused { f: modelc::backend::clif::KernelFn, ptrs: SendPtrs, len: usize, chunk: usize },
    Rows(RowBlocks<F>),
}

impl<F: Fn(usize) + Sync> Job<F> {
    fn tasks(&self) -> usize {
        match self {
            Job::Fused { len, chunk, .. } => len.div_ceil(*chunk),
            Job::Rows(blocks) => blocks.count,
        }
    }

    fn run(&self, task: usize) {
        match self {
            Job::Fused { f, ptrs, len, chunk } => {
                let (s, e) = (task * chunk, ((task + 1) * chunk).min(*len));
                // SAFETY: chunks write disjoint output ranges; inputs are only read.
                unsafe { f(ptrs.get(), s as i64, e as i64) }
            }
            Job::Rows(blocks) => (blocks.run)(task),
        }
    }
}

impl Program {
    /// The bytes of the memory `n` lies in (all of it, for a view or a
    /// part), or none for a value in a thread's block buffer or not stored.
    fn span(&self, n: NodeId, base: *mut f32, feeds: &super::Given) -> Option<Span> {
        let (start, len) = match self.plan.resolve(n) {
            Place::Arena { offset, len } => (base.wrapping_add(offset) as usize, len),
            Place::External(name) => (feeds.pointer(&name) as usize, feeds.values(&name).len()),
            Place::Output(name) => {
                let (p, len) = feeds.output(&name);
                (p as usize, len)
            }
            _ => return None,
        };
        Some((start, start + 4 * len))
    }

    /// Kernels `lead..lead + count` of a batch split where one's writes
    /// meet the memory of one before it in its section (indices from `lead`).
    fn sections(&self, lead: usize, count: usize, base: *mut f32, feeds: &super::Given) -> Vec<std::ops::Range<usize>> {
        let mut sections = Vec::new();
        let (mut reads, mut writes): (Vec<Span>, Vec<Span>) = (Vec::new(), Vec::new());
        let mut start = 0;
        for (j, kernel) in self.schedule.kernels[lead..lead + count].iter().enumerate() {
            let w: Vec<Span> = written(kernel).iter().filter_map(|n| self.span(*n, base, feeds)).collect();
            let r: Vec<Span> = kernel.reads(&self.graph).iter().filter_map(|n| self.span(*n, base, feeds)).collect();
            if meets(&w, &reads) || meets(&w, &writes) || meets(&r, &writes) {
                sections.push(start..j);
                (start, reads, writes) = (j, Vec::new(), Vec::new());
            }
            reads.extend(r);
            writes.extend(w);
        }
        sections.push(start..count);
        sections
    }

    /// Kernels `lead..lead + count` (`Batch::Leads`), as few parallel
    /// sections as their memory allows. With `--profile`, the seconds of
    /// each of their leaves (a row group's parts apart).
    pub(super) fn batch(&self, lead: usize, count: usize, arena: &mut [f32], feeds: &super::Given) -> Option<Vec<f64>> {
        let base = arena.as_mut_ptr();
        let kernels = &self.schedule.kernels[lead..lead + count];
        let compiled = &self.kernels[lead..lead + count];
        let leaves = |k: &Kernel| if let Kernel::Rows(parts) = k { parts.len() } else { 1 };
        // Per kernel: its leaves' seconds, each task adding its own.
        let seconds: Option<Vec<Mutex<Vec<f64>>>> =
            self.profile_id.map(|_| kernels.iter().map(|k| Mutex::new(vec![0.0; leaves(k)])).collect());
        for std::ops::Range { start: k, end } in self.sections(lead, count, base, feeds) {
            let jobs: Vec<Job<_>> = (k..end)
                .map(|j| match (&kernels[j], &compiled[j]) {
                    (Kernel::Rows(parts), Compiled::Rows { parts: compiled, rows, len }) => {
                        let part_seconds = seconds.as_ref().map(|s| &s[j]);
                        Job::Rows(self.row_blocks(parts, compiled, (*rows, *len), base, feeds, part_seconds))
                    }
                    (kernel, Compiled::Fused { f, inputs, row, stores }) => {
                        let out = kernel.output();
                        let len = self.plan.lens[out.index()];
                        let chunk = fused_chunk(len, *row).expect("bug: a batched kernel splits");
                        Job::Fused { f: *f, ptrs: self.pointers(out, inputs, stores, base, feeds), len, chunk }
                    }
                    _ => unreachable!("bug: a batch holds fused kernels and row groups"),
                })
                .collect();
            let tasks: Vec<(usize, usize)> =
                jobs.iter().enumerate().flat_map(|(j, job)| (0..job.tasks()).map(move |t| (j, t))).collect();
            tasks.into_par_iter().for_each(|(j, t)| match (&jobs[j], &seconds) {
                (Job::Fused { .. }, Some(seconds)) => {
                    let started = std::time::Instant::now();
                    jobs[j].run(t);
                    seconds[k + j].lock().unwrap_or_else(|e| e.into_inner())[0] += started.elapsed().as_secs_f64();
                }
                (job, _) => job.run(t),
            });
        }
        seconds.map(|s| s.into_iter().flat_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{Given, SendPtr, Tensor};
    use modelc::ir::graph::Unary;
    use modelc::types::{DType, Dim, Sizes, TensorTy};
    use std::collections::HashMap;

    /// Independent kernels large enough to split run as one batch; where
    /// the plan puts one's output over memory another of the batch reads
    /// (a value dead after it), the batch runs in two sections, and the
    /// results are those of the kernels one by one.
    #[test]
    fn a_batch_splits_where_its_kernels_memory_meets() {
        let ty = |r: i64, c: i64| TensorTy::new(DType::F32, vec![Dim::constant(r), Dim::constant(c)]);
        let mut g = Graph::default();
        let (x, w) = (g.input("x", ty(128, 512)), g.input("w", ty(512, 2048)));
        let (y, v) = (g.input("y", ty(256, 1024)), g.input("v", ty(1024, 2048)));
        let a = g.matmul(x, w);
        let p = g.unary(Unary::Exp, a);
        let t = g.scale(y, 3.0);
        let u = g.matmul(t, v);
        for (name, v) in [("p", p), ("u", u)] {
            g.outputs.push((name.into(), v));
        }
        let mut program = Program::compile(&g, &Sizes::new()).unwrap();
        assert_eq!(program.batches, [Batch::Alone, Batch::Leads(2), Batch::Follows, Batch::Alone]);
        let value = |name: &str, n: usize| (0..n).map(|i| ((i * 7919 + name.len()) % 101) as f32 / 404.0).collect();
        let feeds: HashMap<String, Tensor> =
            [("x", [128, 512]), ("w", [512, 2048]), ("y", [256, 1024]), ("v", [1024, 2048])]
                .into_iter()
                .map(|(name, shape)| (name.to_string(), Tensor::new(shape.to_vec(), value(name, shape[0] * shape[1]))))
                .collect();
        // exp(x w) reads x w where 3 y is written: two sections.
        let (mut p, mut given) = (vec![0f32; 128 * 2048], Given::new(&feeds, None));
        given.outputs.insert("p".into(), (SendPtr(p.as_mut_ptr()), p.len()));
        let mut arena = vec![0f32; program.plan.arena_len];
        assert_eq!(program.sections(1, 2, arena.as_mut_ptr(), &given), [0..1, 1..2]);
        let batched = program.run(&feeds).unwrap();
        program.batches = vec![Batch::Alone; 4];
        let alone = program.run(&feeds).unwrap();
        for name in ["p", "u"] {
            assert!(batched[name].data == alone[name].data, "`{name}` differs run in one section");
        }
    }
}
