//! Activation recompute (checkpointing): the forward values a training
//! program's backward pass reads are, by default, all kept from the forward
//! pass until their gradient is taken: for a transformer, every layer's
//! intermediate activations at once. With checkpoints, only some values are
//! kept and the backward recomputes the others from the nearest checkpoint
//! before them, right where it first needs them, so that one stretch of
//! activations is alive at a time.
//!
//! The checkpoints are cut points of the forward pass: values that are the
//! only thing alive in it at their place in the program (the residual
//! stream between two blocks, or between a block's attention and its MLP).
//! Everything between two kept cut points is recomputed from the first;
//! what comes after the last cut point (the final norm, the output
//! projection and the loss) is kept, since the backward starts there. The
//! recomputation costs the FLOPs of the copied nodes, about one more
//! forward pass through the layers.

use crate::ir::graph::*;
use crate::types::{Sizes, eval_dim};
use std::collections::HashMap;

/// The forward pass's cut points (see the module), in program order: the
/// values alive across them besides the cut point itself are inputs and
/// values under an eighth of its size (a mask, the targets), kept anyway.
pub fn cut_points(g: &Graph, sizes: &Sizes) -> Vec<NodeId> {
    let Forward { forward, live_input } = Forward::of(g);
    let n = g.nodes.len();
    let numel =
        |i: usize| g.nodes[i].ty.dims.iter().map(|d| eval_dim(d, sizes).unwrap_or(0)).fold(1, usize::saturating_mul);
    let mut last_forward_use = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate().filter(|(i, _)| forward[*i]) {
        for a in &node.args {
            last_forward_use[a.index()] = last_forward_use[a.index()].max(i);
        }
    }
    let mut cuts = Vec::new();
    let mut live: Vec<(usize, usize)> = Vec::new(); // (last forward use, elements)
    for i in (0..n).filter(|i| forward[*i] && live_input[*i] && !g.nodes[*i].args.is_empty()) {
        live.retain(|(end, _)| *end > i);
        let size = numel(i);
        if last_forward_use[i] > i && live.iter().all(|(_, m)| m.saturating_mul(8) < size) {
            cuts.push(NodeId(i as u32));
        }
        live.push((last_forward_use[i], size));
    }
    // Of those, the ones of the residual stream's shape, the shape most of
    // them have: the output head's values (the logits) are not checkpoints,
    // and what follows the last one is never recomputed.
    let mut counts: HashMap<&[crate::types::Dim], usize> = HashMap::new();
    for c in &cuts {
        *counts.entry(g.dims(*c)).or_default() += 1;
    }
    let Some((stream, _)) = counts.into_iter().max_by_key(|(dims, k)| (*k, dims.to_vec())) else { return cuts };
    let stream = stream.to_vec();
    cuts.retain(|c| g.dims(*c) == stream.as_slice());
    cuts
}

/// `g` with the activations between kept checkpoints recomputed where the
/// backward pass reads them. Every `every`-th cut point is kept (and the
/// last); `every == 0` keeps everything (the graph comes back unchanged).
pub fn recompute_between(g: &Graph, sizes: &Sizes, every: usize) -> Graph {
    if every == 0 {
        return g.clone();
    }
    let cuts = cut_points(g, sizes);
    let Some(&last) = cuts.last() else { return g.clone() };
    let Forward { forward, live_input } = Forward::of(g);
    let kept: Vec<NodeId> =
        cuts.iter().copied().enumerate().filter(|(i, _)| (i + 1) % every == 0).map(|(_, c)| c).collect();
    // Forward values that are dropped after the forward pass and made again.
    let remade = |x: NodeId| {
        forward[x.index()] && live_input[x.index()] && !g.node(x).args.is_empty() && x < last && !kept.contains(&x)
    };
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    let mut copies: HashMap<NodeId, NodeId> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let mut args = Vec::with_capacity(node.args.len());
        for &a in &node.args {
            if forward[i] || !remade(a) {
                args.push(map[a.index()]);
                continue;
            }
            // The cone of `a` back to kept values, inputs and weights, in
            // program order, each node copied once.
            let mut todo = vec![a];
            let mut cone = Vec::new();
            while let Some(x) = todo.pop() {
                if copies.contains_key(&x) || cone.contains(&x) {
                    continue;
                }
                cone.push(x);
                todo.extend(g.node(x).args.iter().copied().filter(|y| remade(*y)));
            }
            cone.sort();
            for x in cone {
                let original = g.node(x);
                let xs = original.args.iter().map(|y| copies.get(y).copied().unwrap_or(map[y.index()])).collect();
                out.at = original.origin;
                copies.insert(x, out.push(original.op.clone(), xs, original.ty.clone()));
            }
            args.push(copies[&a]);
        }
        out.at = node.origin;
        map.push(out.push(node.op.clone(), args, node.ty.clone()));
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("recompute_between", &out);
    out
}

/// Which nodes are the forward pass (what the loss is computed from), and
/// which of those depend on the program's inputs (the rest, such as
/// rotary tables, are made from sizes and constants: kept, never remade).
struct Forward {
    forward: Vec<bool>,
    live_input: Vec<bool>,
}

impl Forward {
    fn of(g: &Graph) -> Forward {
        let n = g.nodes.len();
        let mut forward = vec![false; n];
        for (name, id) in &g.outputs {
            if name == "loss" {
                forward[id.index()] = true;
            }
        }
        for i in (0..n).rev() {
            if forward[i] {
                g.nodes[i].args.iter().for_each(|a| forward[a.index()] = true);
            }
        }
        let mut live_input = vec![false; n];
        for (i, node) in g.nodes.iter().enumerate() {
            live_input[i] = matches!(node.op, Op::Input(_)) || node.args.iter().any(|a| live_input[a.index()]);
        }
        Forward { forward, live_input }
    }
}
