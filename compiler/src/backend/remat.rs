//! Recomputation instead of storage: a unary elementwise value read long
//! after it was made (GELU's or SiLU's output, which a training program's
//! weight gradient of the next product reads at the end) is computed again
//! from its input right where it is read, when that input outlives the
//! value's forward uses anyway (the activation's own gradient reads it).
//! The value then dies after its forward uses and the input, of the same
//! size, is kept in its place; the copy costs one pass over the input.
//!
//! It runs on the optimised graph, just before scheduling: the e-graph
//! would merge the copy back into the original.

use crate::ir::graph::*;
use std::collections::HashMap;

/// Nodes between a value and a use of it beyond which the use recomputes it.
const FAR: usize = 64;

/// `g` with far uses of unary values served by copies made next to them.
pub fn recompute_far_uses(g: &Graph) -> Graph {
    let n = g.nodes.len();
    let mut last_use = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for a in &node.args {
            last_use[a.index()] = last_use[a.index()].max(i);
        }
    }
    for (_, o) in &g.outputs {
        last_use[o.index()] = usize::MAX;
    }
    // Through reshapes to the value they view.
    let source = |mut a: NodeId| {
        while let Op::Reshape = g.node(a).op {
            a = g.node(a).args[0];
        }
        a
    };
    // The last use of each value within FAR of it (its forward uses).
    let mut near = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for a in &node.args {
            let s = source(*a);
            if i - s.index() <= FAR {
                near[s.index()] = near[s.index()].max(i);
            }
        }
    }
    // A far use of a unary value (possibly reshaped) recomputes it when its
    // input lives at least as long as the value's forward uses: the input
    // (as large) is then kept until the far use instead of the value, for
    // no longer than the value was.
    let recompute = |a: NodeId, at: usize| {
        let unary = source(a);
        let node = g.node(unary);
        matches!(node.op, Op::Unary(_))
            && at - unary.index() > FAR
            && last_use[node.args[0].index()] >= near[unary.index()]
            && last_use[unary.index()] != usize::MAX
    };
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    // The latest copy of each value: (copy, where it was made).
    let mut copies: HashMap<NodeId, (NodeId, usize)> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let mut args = Vec::with_capacity(node.args.len());
        for a in &node.args {
            if !recompute(*a, i) {
                args.push(map[a.index()]);
                continue;
            }
            let copy = match copies.get(a) {
                Some((copy, made)) if i - made <= FAR => *copy,
                _ => {
                    // The unary node again, then the reshapes between it and `a`.
                    let mut chain = vec![*a];
                    while let Op::Reshape = g.node(*chain.last().unwrap_or(a)).op {
                        chain.push(g.node(*chain.last().unwrap_or(a)).args[0]);
                    }
                    let unary = g.node(*chain.last().unwrap_or(a));
                    let mut copy = map[unary.args[0].index()];
                    for step in chain.iter().rev() {
                        let original = g.node(*step);
                        out.at = original.origin;
                        copy = out.push(original.op.clone(), vec![copy], original.ty.clone());
                    }
                    copies.insert(*a, (copy, i));
                    copy
                }
            };
            args.push(copy);
        }
        out.at = node.origin;
        map.push(out.push(node.op.clone(), args, node.ty.clone()));
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("recompute_far_uses", &out);
    out
}
