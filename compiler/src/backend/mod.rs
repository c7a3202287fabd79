//! Backends: the kernel program every backend shares (`prepare`: split
//! reductions -> recompute far uses -> order to free memory early ->
//! schedule -> memory plan, assembled here only), Cranelift code generation for the CPU, and WGSL for the GPU. Neither code
//! generator imports the other; both print `kernel::FusedSpec`s.

pub mod access;
pub mod clif;
pub mod kernel;
pub mod order;
pub mod plan;
pub mod remat;
pub mod rows;
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

/// The kernel program of an (optimised) graph at the given sizes.
pub fn prepare(graph: &Graph, sizes: &Sizes, target: Target) -> Result<KernelProgram, String> {
    let graph = remat::recompute_far_uses(&split::split_reductions(graph));
    let graph = order::free_early(&graph, sizes);
    let schedule = schedule::schedule(&graph);
    let (blocks, inputs) = match target {
        Target::Cpu => (Blocks::Buffered, Inputs::Writable),
        Target::Gpu => (Blocks::InArena, Inputs::ReadOnly),
    };
    let plan = plan::plan(&graph, &schedule, sizes, blocks, inputs)?;
    Ok(KernelProgram { graph, schedule, plan })
}
