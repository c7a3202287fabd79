//! A fused kernel's `FusedSpec` at bound sizes: how each input is read
//! (contiguously, as one scalar, or through a broadcast's or slice's index
//! arithmetic) and where the output goes (a concatenation's part writes
//! into the concatenation).

use super::kernel::{Access, FusedSpec};
use super::plan::Plan;
use crate::ir::graph::*;
use crate::types::{Sizes, eval_dim, strides};
use std::collections::HashMap;

/// The fused kernel's spec: how each input is read, sizes bound.
pub fn spec<'a>(
    graph: &'a Graph,
    nodes: &'a [NodeId],
    inputs: &'a [NodeId],
    sizes: &Sizes,
    plan: &Plan,
) -> Result<FusedSpec<'a>, String> {
    let concrete =
        |n: NodeId| -> Result<Vec<usize>, String> { graph.dims(n).iter().map(|d| eval_dim(d, sizes)).collect() };
    let out_shape = concrete(*nodes.last().expect("a fused kernel has nodes"))?;
    let mut access = HashMap::new();
    let mut size_values = HashMap::new();
    for inp in inputs {
        if let Op::Size(d) = &graph.node(*inp).op {
            size_values.insert(*inp, eval_dim(d, sizes)? as f64);
        }
    }
    for n in nodes {
        let node = graph.node(*n);
        match &node.op {
            Op::Broadcast => {
                access.insert(*n, broadcast_access(&concrete(node.args[0])?, &out_shape));
            }
            Op::Slice { axis, start, .. } => {
                let start = eval_dim(start, sizes)?;
                access.insert(*n, slice_access(&concrete(node.args[0])?, &out_shape, *axis, start));
            }
            _ => {}
        }
        for a in &node.args {
            if inputs.contains(a) && !access.contains_key(a) {
                access.insert(*a, if plan.lens[a.index()] == 1 { Access::Scalar } else { Access::Contiguous });
            }
        }
    }
    // A part placed into a concatenation writes where a slice of the
    // concatenation at the part's position would read.
    let output = match plan.places[nodes.last().expect("a fused kernel has nodes").index()] {
        super::plan::Place::Part(concat) => {
            let Op::Concat(axis) = graph.node(concat).op else {
                return Err(format!("bug: {concat} holds a part but is not a concatenation"));
            };
            let out = *nodes.last().expect("a fused kernel has nodes");
            let mut at = 0;
            for a in graph.node(concat).args.iter().take_while(|a| **a != out) {
                at += concrete(*a)?[axis];
            }
            slice_access(&concrete(concat)?, &out_shape, axis, at)
        }
        _ => Access::Contiguous,
    };
    Ok(FusedSpec { graph, nodes, inputs, access, sizes: size_values, reduce: None, output, stores: &[] })
}

/// The spec of a `FusedReduce` kernel: the chain's, and the reduction that folds its rows.
pub fn reduce_spec<'a>(
    graph: &'a Graph,
    nodes: &'a [NodeId],
    inputs: &'a [NodeId],
    reduce: NodeId,
    sizes: &Sizes,
    plan: &Plan,
) -> Result<FusedSpec<'a>, String> {
    let mut s = spec(graph, nodes, inputs, sizes, plan)?;
    let Op::Reduce(r, _) = graph.node(reduce).op else { return Err(format!("bug: {reduce} is not a reduction")) };
    let chain = *nodes.last().expect("a fused kernel has nodes");
    let row = eval_dim(graph.dims(chain).last().expect("a reduced axis"), sizes)?;
    s.reduce = Some((r, row as i64));
    Ok(s)
}

/// How an input of shape `src` is read for an output of shape `out`.
fn broadcast_access(src: &[usize], out: &[usize]) -> Access {
    if src.iter().product::<usize>() == 1 {
        return Access::Scalar;
    }
    if src == out {
        return Access::Contiguous;
    }
    let off = out.len() - src.len();
    let (ss, os) = (strides(src), strides(out));
    let axes = (0..out.len())
        .map(|d| {
            let istride = if d < off || src[d - off] == 1 { 0 } else { ss[d - off] };
            (os[d] as i64, out[d] as i64, istride as i64)
        })
        .collect();
    Access::Indexed { offset: 0, axes }
}

/// How a slice of `src` along `axis` from `start` is read for an output of shape `out`.
fn slice_access(src: &[usize], out: &[usize], axis: usize, start: usize) -> Access {
    if src == out {
        return Access::Contiguous;
    }
    let (ss, os) = (strides(src), strides(out));
    let axes = (0..out.len()).map(|d| (os[d] as i64, out[d] as i64, ss[d] as i64)).collect();
    Access::Indexed { offset: (start * ss[axis]) as i64, axes }
}
