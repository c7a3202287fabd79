//! A scatter-add whose only use adds it to a value of its shape becomes a
//! scatter-add onto that value (`ScatterAdd`'s third argument). A tied
//! embedding's gradient is the output layer's weight gradient plus the
//! rows the embedding scattered: both weight-sized, and the first is made
//! early in the backward pass and held to its end, so both were live at
//! once at the training step's peak (GPT-2: 2 x 154 MB). Scattered onto
//! the first, written over it in place when it dies there (`plan.rs`),
//! one of them is enough. A mixture of experts' tokens scattered back and
//! added to the residual stream take one pass less the same way.
//!
//! Runs on the optimised graph, with the other passes before scheduling.

use crate::ir::graph::*;

/// `g` with each `add(x, scatter_add(ids, u))` (either order) whose scatter
/// nothing else reads, and whose `x` has the sum's shape and memory of its
/// own, made `scatter_add(ids, u, x)`.
pub fn scatter_onto_sums(g: &Graph) -> Graph {
    let n = g.nodes.len();
    let mut users = vec![0usize; n];
    for node in &g.nodes {
        for a in &node.args {
            users[a.index()] += 1;
        }
    }
    for (_, o) in &g.outputs {
        users[o.index()] += 1;
    }
    // Values a kernel stores: not read in place by their readers.
    let stored = |x: NodeId| !matches!(g.node(x).op, Op::Broadcast | Op::Slice { .. } | Op::Const(_) | Op::Reshape);
    // add node -> (scatter, base)
    let mut onto: Vec<Option<(NodeId, NodeId)>> = vec![None; n];
    let mut folded = vec![false; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let (Op::Binary(Binary::Add), [a, b]) = (&node.op, node.args.as_slice()) else { continue };
        let scatter =
            |s: NodeId| matches!(g.node(s).op, Op::ScatterAdd) && g.node(s).args.len() == 2 && users[s.index()] == 1;
        let pick = if scatter(*b) {
            Some((*b, *a))
        } else if scatter(*a) {
            Some((*a, *b))
        } else {
            None
        };
        let Some((s, base)) = pick else { continue };
        if s != base && g.dims(base) == node.ty.dims.as_slice() && g.dims(s) == node.ty.dims.as_slice() && stored(base)
        {
            onto[i] = Some((s, base));
            folded[s.index()] = true;
        }
    }
    if !folded.contains(&true) {
        return g.clone();
    }
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    for (i, node) in g.nodes.iter().enumerate() {
        let id = match onto[i] {
            Some((s, base)) => {
                let scatter = g.node(s);
                let args = vec![map[scatter.args[0].index()], map[scatter.args[1].index()], map[base.index()]];
                out.at = node.origin;
                out.push(Op::ScatterAdd, args, node.ty.clone())
            }
            // Its only use is the sum made above; nothing reads this id.
            None if folded[i] => NodeId(u32::MAX),
            None => {
                let args = node.args.iter().map(|a| map[a.index()]).collect();
                out.at = node.origin;
                out.push(node.op.clone(), args, node.ty.clone())
            }
        };
        map.push(id);
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("scatter_onto_sums", &out);
    out
}
