//! The text form of the IR: one node per line, `%id = op args : type`,
//! then the named outputs. `modelc ir` prints it; snapshots compare it.

use super::graph::*;

pub fn print(g: &Graph) -> String {
    let mut out = String::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let args: Vec<String> = n.args.iter().map(|a| a.to_string()).collect();
        let args = if args.is_empty() { String::new() } else { format!(" {}", args.join(", ")) };
        out.push_str(&format!("%{i} = {}{args} : {}\n", n.op.name(), n.ty));
    }
    for (name, id) in &g.outputs {
        out.push_str(&format!("output {name} = {id}\n"));
    }
    out
}

/// Counts of nodes by kind and an estimate of floating-point operations.
pub fn stats(g: &Graph) -> (usize, crate::types::Dim) {
    let flops = g.nodes.iter().fold(crate::types::Dim::constant(0), |acc, n| acc.add(&flops(g, n)));
    (g.nodes.len(), flops)
}

/// The floating-point operations of the routed experts' products (forward
/// and gradients): what sparse routing executes of the experts.
pub fn expert_flops(g: &Graph) -> crate::types::Dim {
    g.nodes
        .iter()
        .filter(|n| matches!(n.op, Op::ExpertMatMul { .. } | Op::ExpertWeightGrad { .. }))
        .fold(crate::types::Dim::constant(0), |acc, n| acc.add(&flops(g, n)))
}

/// An estimate of one node's floating-point operations.
pub fn flops(g: &Graph, n: &Node) -> crate::types::Dim {
    use crate::types::Dim;
    let numel = n.ty.dims.iter().fold(Dim::constant(1), |acc, d| acc.mul(d));
    match &n.op {
        Op::MatMul { ta, .. } => {
            let a = g.ty(n.args[0]);
            let k = if *ta { &a.dims[a.rank() - 2] } else { &a.dims[a.rank() - 1] };
            numel.mul(k).mul(&Dim::constant(2))
        }
        // Each routed row by its own expert's weight only.
        Op::ExpertMatMul { .. } => numel.mul(&g.ty(n.args[0]).dims[1]).mul(&Dim::constant(2)),
        // Each expert's rows by its own adjoint: every routed row once.
        Op::ExpertWeightGrad { .. } => {
            let (x, dy) = (g.ty(n.args[0]), g.ty(n.args[1]));
            x.dims[0].mul(&x.dims[1]).mul(&dy.dims[1]).mul(&Dim::constant(2))
        }
        // Products over every (query, key) pair, as if nothing were masked:
        // scores and values forward; the backward's passes recompute the
        // scores, and add dP (queries), dQ (queries), or dP, dK and dV.
        Op::Attention(a) | Op::AttentionBackward(a, _) => {
            let forward = n.op.attention_inputs().unwrap_or(0);
            let (q, k, v) = (g.ty(n.args[forward]), g.ty(n.args[forward + 1]), g.ty(n.args[forward + 2]));
            let (d, e) = (&q.dims[3], &v.dims[3]);
            let keys = &k.dims[if a.kv_heads_first { 2 } else { 1 }];
            let per_pair = match &n.op {
                Op::AttentionBackward(_, AttentionPass::Lse) => d.clone(),
                Op::AttentionBackward(_, AttentionPass::ValuesAndLse) => d.add(e),
                // The scores, dP, dQ, dK and dV.
                Op::AttentionBackward(..) => d.add(e).add(d).add(d).add(e),
                _ => d.add(e),
            };
            let rows = q.dims[..3].iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
            rows.mul(keys).mul(&per_pair).mul(&Dim::constant(2))
        }
        Op::Unary(_) | Op::Binary(_) | Op::Select => numel,
        Op::Reduce(..) | Op::ArgMax(_) | Op::TopKValues(_) => {
            g.ty(n.args[0]).dims.iter().fold(Dim::constant(1), |acc, d| acc.mul(d))
        }
        _ => Dim::constant(0),
    }
}
