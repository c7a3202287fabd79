//! Reductions over the innermost axis and other axes, split in two before
//! scheduling: the innermost axis first, then the others on the result.
//!
//! The innermost reduction folds into the chain that computes its argument
//! (`Kernel::FusedReduce`: rows in parallel, the argument never stored), and
//! what is left is smaller by a row's length. Unsplit, a full reduction (a
//! gradient norm's sum of squares over a 32000 x 288 gradient) stored its
//! argument and then summed it in one serial loop on the CPU, and in a single
//! invocation on the GPU. Max and min are unchanged by the split; a sum adds
//! in another order, as any parallel sum does.

use crate::ir::graph::*;

/// `g` with each such reduction split; every other node as it is.
pub fn split_reductions(g: &Graph) -> Graph {
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let args: Vec<NodeId> = n.args.iter().map(|a| map[a.index()]).collect();
        out.at = n.origin;
        let id = match &n.op {
            Op::Reduce(r, axes) if axes.len() > 1 && axes.contains(&(g.ty(n.args[0]).rank() - 1)) => {
                let last = g.ty(n.args[0]).rank() - 1;
                let rows = out.reduce(*r, args[0], &[last]);
                let rest: Vec<usize> = axes.iter().copied().filter(|a| *a != last).collect();
                let id = out.reduce(*r, rows, &rest);
                debug_assert_eq!(out.ty(id), &n.ty, "bug: a split reduction changed its type");
                id
            }
            _ => out.push(n.op.clone(), args, n.ty.clone()),
        };
        map.push(id);
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("split_reductions", &out);
    out
}
