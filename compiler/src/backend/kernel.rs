//! What every backend compiles, described backend-neutrally: the kernels
//! the scheduler makes (`Kernel`) and, for a fused one, a `FusedSpec`: its
//! members (elementwise operations of `scalar::UNARY`, selects, casts and
//! reads in place), how it reads each input (`Access`) and where it writes.
//! The Cranelift and WGSL generators are printers of a `FusedSpec`;
//! `access.rs` makes one from a kernel and its memory plan.

use crate::ir::graph::*;
use std::collections::HashMap;

/// One unit of work, in execution order.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// `nodes` (elementwise, in order) computed in one pass over the shape of
    /// the last one, which is the only value written to memory. `inputs`
    /// are the values read from memory, each possibly through a broadcast.
    Fused { nodes: Vec<NodeId>, inputs: Vec<NodeId> },
    /// A fused chain like `Fused` whose result is never stored: `reduce`
    /// (a reduction over the innermost axis, the chain's only user) folds
    /// each row of it as it is computed, and only the reduction is written.
    FusedReduce { nodes: Vec<NodeId>, inputs: Vec<NodeId>, reduce: NodeId },
    /// A single operation with a kernel of its own.
    Single(NodeId),
    /// A reshape, or a contiguous slice (`is_window`): the output is (part
    /// of) the input's memory.
    View(NodeId),
    /// Kernels over the same rows (softmax, norms, their backward passes)
    /// run one block of rows at a time, each part over the block in turn,
    /// so the values they pass each other stay in cache. See `rows.rs`.
    Rows(Vec<Kernel>),
}

impl Kernel {
    /// The node whose value the kernel produces.
    /// (For a row group, its last part's.)
    pub fn output(&self) -> NodeId {
        match self {
            Kernel::Fused { nodes, .. } => *nodes.last().expect("a fused kernel has nodes"),
            Kernel::FusedReduce { reduce, .. } => *reduce,
            Kernel::Single(n) | Kernel::View(n) => *n,
            Kernel::Rows(parts) => parts.last().expect("a row group has parts").output(),
        }
    }

    /// The values the kernel reads from memory.
    pub fn reads(&self, g: &Graph) -> Vec<NodeId> {
        match self {
            Kernel::Fused { inputs, .. } | Kernel::FusedReduce { inputs, .. } => inputs.clone(),
            Kernel::Single(x) => g.node(*x).args.clone(),
            Kernel::View(_) => vec![],
            Kernel::Rows(parts) => parts.iter().flat_map(|p| p.reads(g)).collect(),
        }
    }
}

/// How a fused kernel reads one input.
#[derive(Clone, Debug, PartialEq)]
pub enum Access {
    /// Same shape as the output: element i.
    Contiguous,
    /// One element, for every i.
    Scalar,
    /// Through a broadcast or a slice: element `offset + sum over output axes
    /// of ((i / output stride) % output size) * input stride`.
    Indexed { offset: i64, axes: Vec<(i64, i64, i64)> },
}

/// A fused kernel ready for code generation, sizes bound.
pub struct FusedSpec<'a> {
    pub graph: &'a Graph,
    pub nodes: &'a [NodeId],
    pub inputs: &'a [NodeId],
    /// How each member that reads memory reads it (inputs, or broadcast members).
    pub access: HashMap<NodeId, Access>,
    /// Values of `size` nodes, which are inlined as constants.
    pub sizes: HashMap<NodeId, f64>,
    /// For a `FusedReduce` kernel: the reduction and the row length it folds;
    /// the kernel's range is then one of rows.
    pub reduce: Option<(Reduce, i64)>,
    /// Where output element i goes: i, or (a part placed into a
    /// concatenation) the concatenation's element for it.
    pub output: Access,
    /// Members stored besides the last, element i to element i of each
    /// (a row group run as one loop, `rows::one_loop`): their pointers
    /// follow the inputs'.
    pub stores: &'a [NodeId],
}

impl FusedSpec<'_> {
    /// The output's row length, when some input is read (or the output
    /// written) through index arithmetic.
    pub fn row_len(&self) -> Option<i64> {
        self.access.values().chain([&self.output]).find_map(|a| match a {
            Access::Indexed { axes, .. } => axes.last().map(|a| a.1),
            _ => None,
        })
    }
}
