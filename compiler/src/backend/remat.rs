//! Recomputation instead of storage, where it costs no memory:
//! - A unary elementwise value read long after it was made (GELU's or
//!   SiLU's output, which a training program's weight gradient of the next
//!   product reads late) is computed again from its input right where it is
//!   read, when that input outlives the value's forward uses anyway (the
//!   activation's own gradient reads it). The value then dies after its
//!   forward uses and the input, of the same size, is kept in its place.
//! - An elementwise value read only by reductions and by one elementwise
//!   use of its shape, made from one input of its shape (and broadcasts of
//!   small ones) that outlives the reductions anyway: the cross-entropy's
//!   exp(logits - max), summed in the forward and read by the gradient.
//!   Recomputed at that use, it is never stored (its reductions read it in
//!   their row group's block), and the use, now the input's last reader,
//!   writes over the input in place: one logits-sized tensor less.
//!
//! Each copy costs one pass over the input. It runs on the optimised graph,
//! just before scheduling: the e-graph would merge the copy back into the
//! original.

use super::schedule::is_elementwise;
use crate::ir::graph::*;
use std::collections::HashMap;

/// Nodes between a value and a use of it beyond which the use recomputes it.
const FAR: usize = 64;

/// The most nodes one recomputation copies.
const CONE: usize = 8;

/// `g` with such uses served by copies made next to them.
pub fn recompute_far_uses(g: &Graph) -> Graph {
    let n = g.nodes.len();
    let mut last_use = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for a in &node.args {
            last_use[a.index()] = last_use[a.index()].max(i);
            users[a.index()].push(i);
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
    // The last read of each value, through its views.
    let mut last_read = vec![0usize; n];
    for (i, last) in last_use.iter().enumerate() {
        let s = source(NodeId(i as u32)).index();
        last_read[s] = last_read[s].max(*last);
    }
    // Rule 1: the unary node, then the reshapes between it and `a`.
    let far_unary = |a: NodeId, at: usize| -> Option<Vec<NodeId>> {
        let unary = source(a);
        let node = g.node(unary);
        let recompute = matches!(node.op, Op::Unary(_))
            && at - unary.index() > FAR
            && last_use[node.args[0].index()] >= near[unary.index()]
            && last_use[unary.index()] != usize::MAX;
        recompute.then(|| {
            let mut chain = vec![a];
            while let Op::Reshape = g.node(*chain.last().unwrap_or(&a)).op {
                chain.push(g.node(*chain.last().unwrap_or(&a)).args[0]);
            }
            chain.reverse();
            chain
        })
    };
    // Rule 2: the value's elementwise cone down to one input of its shape
    // (a leaf) and broadcasts of others, in graph order.
    let reduced_then_used = |a: NodeId, at: usize| -> Option<Vec<NodeId>> {
        let node = g.node(a);
        let reduce = |u: &&usize| matches!(g.nodes[**u].op, Op::Reduce(..));
        let others_reduce = users[a.index()].iter().filter(|u| **u != at).all(|u| reduce(&u))
            && users[a.index()].iter().any(|u| reduce(&u));
        if !is_elementwise(&node.op)
            || !is_elementwise(&g.nodes[at].op)
            || g.nodes[at].ty.dims != node.ty.dims
            || !others_reduce
            || users[a.index()].iter().filter(|&&u| u == at).count() != 1
            || last_use[a.index()] == usize::MAX
        {
            return None;
        }
        let (mut cone, mut leaves, mut todo) = (vec![a], Vec::new(), vec![a]);
        while let Some(x) = todo.pop() {
            for &arg in &g.node(x).args {
                let op = &g.node(arg).op;
                if matches!(op, Op::Const(_) | Op::Size(_)) || cone.contains(&arg) {
                    continue;
                }
                if matches!(op, Op::Broadcast) && g.node(arg).ty.dims == node.ty.dims {
                    cone.push(arg); // read in place from its small source
                } else if is_elementwise(op) && users[arg.index()].len() == 1 {
                    cone.push(arg);
                    todo.push(arg);
                } else if g.node(arg).ty.dims == node.ty.dims || matches!(op, Op::Reshape) {
                    leaves.push(arg);
                } else {
                    return None;
                }
            }
        }
        let [leaf] = leaves[..] else { return None };
        // The leaf is read after the reductions, and last here: the use can write over it.
        let reductions_end = users[a.index()].iter().filter(|&&u| u != at).max().copied().unwrap_or(0);
        let leaf_read = last_read[source(leaf).index()];
        (cone.len() <= CONE && reductions_end < leaf_read && leaf_read <= at).then(|| {
            cone.sort();
            cone
        })
    };
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    // The latest copy of each value: (copy, where it was made).
    let mut copies: HashMap<NodeId, (NodeId, usize)> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let mut args = Vec::with_capacity(node.args.len());
        for a in &node.args {
            let Some(nodes) = far_unary(*a, i).or_else(|| reduced_then_used(*a, i)) else {
                args.push(map[a.index()]);
                continue;
            };
            let copy = match copies.get(a) {
                Some((copy, made)) if i - made <= FAR => *copy,
                _ => {
                    let mut copied: HashMap<NodeId, NodeId> = HashMap::new();
                    for step in &nodes {
                        let original = g.node(*step);
                        let args = original.args.iter().map(|x| copied.get(x).copied().unwrap_or(map[x.index()]));
                        out.at = original.origin;
                        copied.insert(*step, out.push(original.op.clone(), args.collect(), original.ty.clone()));
                    }
                    let copy = copied[a];
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
