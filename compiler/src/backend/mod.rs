//! Backends: the kernel program every backend shares (`prepare`:
//! activations recomputed between checkpoints -> large products in row
//! chunks -> split reductions -> recompute far uses ->
//! order to free memory early -> schedule -> memory plan, assembled here
//! only), Cranelift code generation for the CPU, and WGSL for the GPU.
//! Neither code generator imports the other; both print
//! `kernel::FusedSpec`s.

pub mod access;
pub mod attention_lse;
pub mod checkpoint;
pub mod chunk;
pub mod clif;
pub mod kernel;
pub mod order;
pub mod plan;
pub mod remat;
pub mod rows;
pub mod scatter_into;
pub mod schedule;
pub mod split;
pub mod vmath;
pub mod wgsl;

use crate::ir::graph::Graph;
use crate::types::Sizes;
use plan::{Blocks, Inputs, Plan};
use schedule::Schedule;

/// Which backend a program is prepared for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Row groups' blocks in per-thread buffers; inputs a program writes in
    /// place (a decoder's cache) may alias their outputs.
    Cpu,
    /// Everything in one buffer, row groups' blocks in the arena; inputs
    /// read-only (a shader cannot alias them).
    Gpu,
}

/// A graph ready for code generation: reductions split, kernels scheduled,
/// memory planned at bound sizes.
pub struct KernelProgram {
    pub graph: Graph,
    pub schedule: Schedule,
    pub plan: Plan,
}

/// How a program trades memory for work (`modelc train --memory-budget`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// Products larger than two chunks of this many bytes run in row
    /// chunks (`chunk.rs`).
    pub chunk_bytes: usize,
    /// Keep every this-many-th checkpoint and recompute the activations
    /// between them in the backward pass (`checkpoint.rs`); 0 keeps all.
    pub keep_every: usize,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory { chunk_bytes: chunk::CHUNK_BYTES, keep_every: 0 }
    }
}

/// The kernel program of an (optimised) graph at the given sizes.
pub fn prepare(graph: &Graph, sizes: &Sizes, target: Target) -> Result<KernelProgram, String> {
    prepare_with(graph, sizes, target, Memory::default())
}

/// The kernel program of an (optimised) graph at the given sizes, with
/// memory traded for work as `memory` says.
pub fn prepare_with(graph: &Graph, sizes: &Sizes, target: Target, memory: Memory) -> Result<KernelProgram, String> {
    prepare_over(graph, sizes, &[], target, memory).map(|(program, _)| program)
}

/// The kernel program at `sizes`, its memory placed so that the same
/// stacking is sound at each of `also` (`plan::plan_over`), with the
/// placement there.
pub fn prepare_over(
    graph: &Graph,
    sizes: &Sizes,
    also: &[Sizes],
    target: Target,
    memory: Memory,
) -> Result<(KernelProgram, Vec<plan::Placement>), String> {
    let graph = checkpoint::recompute_between(graph, sizes, memory.keep_every);
    let graph = chunk::split_rows(&graph, sizes, memory.chunk_bytes);
    let graph = remat::recompute_far_uses(&split::split_reductions(&graph));
    let graph = scatter_into::scatter_onto_sums(&graph);
    let graph = attention_lse::attend_with_lse(&graph);
    let (blocks, inputs) = match target {
        Target::Cpu => (Blocks::Buffered, Inputs::Writable),
        Target::Gpu => (Blocks::InArena, Inputs::ReadOnly),
    };
    // Each order that frees memory early, planned; the lower peak kept.
    let mut best: Option<(KernelProgram, Vec<plan::Placement>)> = None;
    for graph in order::free_early_orders(&graph, sizes) {
        let schedule = schedule::schedule_at(&graph, sizes);
        let (plan, placements) = plan::plan_over(&graph, &schedule, sizes, also, blocks, inputs)?;
        if best.as_ref().is_none_or(|(b, _)| plan.peak_bytes() < b.plan.peak_bytes()) {
            best = Some((KernelProgram { graph, schedule, plan }, placements));
        }
    }
    Ok(best.expect("bug: no order"))
}
