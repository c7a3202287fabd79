//! An attention whose backward's log-sum-exp pass (`AttentionPass::Lse`)
//! reads the same inputs computes both in one walk over the scores
//! (`AttentionPass::ValuesAndLse`): the forward already keeps each row's
//! running maximum and sum, from which the log-sum-exp follows, and the
//! pass computed the scores again (1.3-1.7% of a LLaMA- or Mixtral-shaped
//! training step). The output and the log-sum-exp are windows of the one
//! value (views, no copies); the log-sum-exp (a number a row and head)
//! lives from the forward to the backward.
//!
//! Runs on the optimised graph (after autodiff), with the other passes
//! before scheduling.

use crate::ir::graph::*;
use crate::types::{Dim, TensorTy};

/// `g` with each attention whose inputs a log-sum-exp pass also reads
/// computing that pass's result too.
pub fn attend_with_lse(g: &Graph) -> Graph {
    let n = g.nodes.len();
    // attention -> its log-sum-exp pass
    let mut pair: Vec<Option<NodeId>> = vec![None; n];
    let mut paired = vec![false; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::AttentionBackward(a, AttentionPass::Lse) = &node.op else { continue };
        let forward = (0..i).find(|&j| {
            matches!(&g.nodes[j].op, Op::Attention(b) if b == a) && g.nodes[j].args == node.args && pair[j].is_none()
        });
        if let Some(j) = forward {
            pair[j] = Some(NodeId(i as u32));
            paired[i] = true;
        }
    }
    if !paired.contains(&true) {
        return g.clone();
    }
    let count = |dims: &[Dim]| dims.iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    // Each paired pass's result, made with its attention.
    let mut lse_of: Vec<Option<NodeId>> = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        out.at = node.origin;
        let args: Vec<NodeId> = node.args.iter().map(|a| map[a.index()]).collect();
        let id = match (&node.op, pair[i]) {
            (Op::Attention(a), Some(l)) => {
                let (y_dims, lse_dims) = (node.ty.dims.clone(), g.dims(l).to_vec());
                let (ny, nl) = (count(&y_dims), count(&lse_dims));
                let both_ty = TensorTy::new(node.ty.dtype, vec![ny.add(&nl)]);
                let both = out.push(Op::AttentionBackward(a.clone(), AttentionPass::ValuesAndLse), args, both_ty);
                let window = |out: &mut Graph, start: Dim, len: Dim, dims: Vec<Dim>| {
                    let ty = TensorTy::new(node.ty.dtype, vec![len.clone()]);
                    let part =
                        out.push(Op::Slice { axis: 0, start: start.clone(), end: start.add(&len) }, vec![both], ty);
                    out.push(Op::Reshape, vec![part], TensorTy::new(node.ty.dtype, dims))
                };
                lse_of[l.index()] = Some(window(&mut out, ny.clone(), nl, lse_dims));
                window(&mut out, Dim::constant(0), ny, y_dims)
            }
            _ if paired[i] => lse_of[i].expect("bug: a log-sum-exp pass made before its attention"),
            _ => out.push(node.op.clone(), args, node.ty.clone()),
        };
        map.push(id);
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("attend_with_lse", &out);
    out
}
