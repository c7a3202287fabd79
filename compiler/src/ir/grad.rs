//! Reverse-mode automatic differentiation as a graph-to-graph transform:
//! appends to the graph the nodes that compute d(loss)/d(x) for each x
//! asked for. One local rule per primitive, in an exhaustive match, so an
//! operation cannot exist without its gradient.

use super::graph::*;
use crate::scalar::Expr;
use crate::types::DType;
use crate::types::Dim;

/// Appends the gradient of the scalar `loss` with respect to each of `wrt`;
/// returns their nodes (zeros for one the loss does not depend on).
pub fn grad(g: &mut Graph, loss: NodeId, wrt: &[NodeId]) -> Vec<NodeId> {
    let n = loss.index() + 1;
    let at = g.at;
    // Which nodes lie on a path from a `wrt` node to the loss.
    let mut needs = vec![false; n];
    for w in wrt {
        if w.index() < n {
            needs[w.index()] = true;
        }
    }
    for i in 0..n {
        if !needs[i] && g.nodes[i].ty.dtype == DType::F32 {
            needs[i] = g.nodes[i].args.iter().any(|a| needs[a.index()]);
        }
    }
    let mut adj: Vec<Option<NodeId>> = vec![None; n];
    adj[loss.index()] = Some(g.constant(1.0, DType::F32));
    for i in (0..n).rev() {
        let Some(gy) = adj[i] else { continue };
        if !needs[i] {
            continue;
        }
        let node = g.nodes[i].clone();
        // A gradient's nodes come from the line its forward node came from.
        g.at = node.origin;
        for (k, contribution) in local(g, &node, NodeId(i as u32), gy).into_iter().enumerate() {
            let Some(c) = contribution else { continue };
            let a = node.args[k];
            if !needs[a.index()] {
                continue;
            }
            adj[a.index()] = Some(match adj[a.index()] {
                Some(prev) => g.add(prev, c),
                None => c,
            });
        }
    }
    g.at = at;
    wrt.iter()
        .map(|w| match adj.get(w.index()).copied().flatten() {
            Some(a) => a,
            None => {
                let dims = g.dims(*w).to_vec();
                g.full(0.0, DType::F32, &dims)
            }
        })
        .collect()
}

/// The contribution of a node's output adjoint `gy` to each of its inputs.
fn local(g: &mut Graph, node: &Node, y: NodeId, gy: NodeId) -> Vec<Option<NodeId>> {
    let a = &node.args;
    let x = a.first().copied();
    let zero = |g: &mut Graph| g.constant(0.0, DType::F32);
    match &node.op {
        Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Size(_) | Op::Iota => vec![],
        Op::ArgMax(_) | Op::OneHot | Op::TopKIndices(_) | Op::DropoutMask { .. } => vec![None; a.len()],
        Op::Cast(_) => vec![None],
        Op::Attention(spec) => super::attention::gradient(g, spec, a, y, gy),
        Op::ExpertOrder(_) | Op::ExpertOffsets(_) => vec![None],
        // x: the adjoint times each expert's weight transposed, over the same rows;
        // weight e: from expert e's rows alone.
        Op::ExpertMatMul { tb } => {
            let (x, offsets) = (a[0], a[1]);
            let gx = g.expert_matmul(gy, offsets, &a[2..], !tb);
            let w = g.ty(a[2]).clone();
            let experts = Dim::constant((a.len() - 2) as i64);
            let all = crate::types::TensorTy::new(DType::F32, [vec![experts], w.dims.clone()].concat());
            let all = g.push(Op::ExpertWeightGrad { tb: *tb }, vec![x, gy, offsets], all);
            let mut out = vec![Some(gx), None];
            for e in 0..a.len() - 2 {
                let one = g.slice(all, 0, Dim::constant(e as i64), Dim::constant(e as i64 + 1));
                out.push(Some(g.reshape(one, &w.dims)));
            }
            out
        }
        // Only gradients compute these; nothing differentiates a gradient twice.
        Op::ExpertWeightGrad { .. } => panic!("bug: a second derivative of an expert's product"),
        // Only gradients compute these; nothing differentiates a gradient twice.
        Op::AttentionBackward(..) => panic!("bug: a second derivative of attention"),
        // Only decoding writes a cache, and nothing differentiates it.
        Op::WriteRows => panic!("bug: a gradient through a key/value cache write"),
        Op::Unary(u) => match u.row().gradient {
            Some(rule) => {
                let x = x.expect("unary has an input");
                vec![Some(build(g, &rule(), x, y, gy, &mut Vec::new()))]
            }
            None => vec![None],
        },
        Op::Binary(b) => {
            let (p, q) = (a[0], a[1]);
            match b {
                Binary::Add => vec![Some(gy), Some(gy)],
                Binary::Sub => {
                    let n = g.neg(gy);
                    vec![Some(gy), Some(n)]
                }
                Binary::Mul => {
                    let gp = g.mul(gy, q);
                    let gq = g.mul(gy, p);
                    vec![Some(gp), Some(gq)]
                }
                Binary::Div => {
                    let gp = g.div(gy, q);
                    let t = g.mul(gp, y);
                    let gq = g.neg(t);
                    vec![Some(gp), Some(gq)]
                }
                Binary::Pow => {
                    let one = g.constant(1.0, DType::F32);
                    let qm1 = g.sub(q, one);
                    let pw = g.binary(Binary::Pow, p, qm1);
                    let d = g.mul(q, pw);
                    let gp = g.mul(gy, d);
                    let lp = g.unary(Unary::Log, p);
                    let t = g.mul(y, lp);
                    let gq = g.mul(gy, t);
                    vec![Some(gp), Some(gq)]
                }
                Binary::Rem => {
                    let r = g.div(p, q);
                    let f = g.unary(Unary::Floor, r);
                    let t = g.mul(gy, f);
                    let gq = g.neg(t);
                    vec![Some(gy), Some(gq)]
                }
                Binary::Max | Binary::Min => {
                    // Ties send the gradient to the first operand.
                    let first = if *b == Binary::Max { Binary::Ge } else { Binary::Le };
                    let c = g.binary(first, p, q);
                    let z = zero(g);
                    let gp = g.select(c, gy, z);
                    let gq = g.select(c, z, gy);
                    vec![Some(gp), Some(gq)]
                }
                Binary::Eq
                | Binary::Ne
                | Binary::Lt
                | Binary::Le
                | Binary::Gt
                | Binary::Ge
                | Binary::And
                | Binary::Or => {
                    vec![None, None]
                }
            }
        }
        Op::Select => {
            let z = zero(g);
            let ga = g.select(a[0], gy, z);
            let gb = g.select(a[0], z, gy);
            vec![None, Some(ga), Some(gb)]
        }
        Op::Reduce(r, axes) => {
            let x = a[0];
            let xd = g.dims(x).to_vec();
            let mut kept = xd.clone();
            for ax in axes {
                kept[*ax] = Dim::constant(1);
            }
            let gk = g.reshape(gy, &kept);
            let gb = g.broadcast(gk, &xd);
            match r {
                Reduce::Sum => vec![Some(gb)],
                Reduce::Max | Reduce::Min => {
                    // Split evenly among the elements equal to the extreme.
                    let yk = g.reshape(y, &kept);
                    let hit = g.binary(Binary::Eq, x, yk);
                    let hit = g.cast(hit, DType::F32);
                    let count = g.reduce_keep(Reduce::Sum, hit, axes);
                    let share = g.div(hit, count);
                    vec![Some(g.mul(gb, share))]
                }
            }
        }
        Op::MatMul { ta, tb } => {
            // C = op(A) op(B); each gradient is a matmul with the right transposes.
            let (p, q) = (a[0], a[1]);
            let (gp, gq) = match (ta, tb) {
                (false, false) => (g.matmul_t(gy, q, false, true), g.matmul_t(p, gy, true, false)),
                (false, true) => (g.matmul_t(gy, q, false, false), g.matmul_t(gy, p, true, false)),
                (true, false) => (g.matmul_t(q, gy, false, true), g.matmul_t(p, gy, false, false)),
                (true, true) => (g.matmul_t(q, gy, true, true), g.matmul_t(gy, p, true, true)),
            };
            vec![Some(gp), Some(gq)]
        }
        Op::Reshape => {
            let xd = g.dims(a[0]).to_vec();
            vec![Some(g.reshape(gy, &xd))]
        }
        Op::Permute(perm) => {
            let mut inverse = vec![0; perm.len()];
            for (i, p) in perm.iter().enumerate() {
                inverse[*p] = i;
            }
            vec![Some(g.permute(gy, &inverse))]
        }
        Op::Broadcast => {
            let xd = g.dims(a[0]).to_vec();
            let od = node.ty.dims.clone();
            let off = od.len() - xd.len();
            let one = Dim::constant(1);
            let axes: Vec<usize> = (0..od.len()).filter(|&i| i < off || (xd[i - off] == one && od[i] != one)).collect();
            let s = g.reduce(Reduce::Sum, gy, &axes);
            vec![Some(g.reshape(s, &xd))]
        }
        Op::Slice { axis, start, end } => {
            let xd = g.dims(a[0]).to_vec();
            let mut parts = Vec::new();
            if start.as_const() != Some(0) {
                let mut d = xd.clone();
                d[*axis] = start.clone();
                parts.push(g.full(0.0, DType::F32, &d));
            }
            parts.push(gy);
            let after = xd[*axis].sub(end);
            if after.as_const() != Some(0) {
                let mut d = xd.clone();
                d[*axis] = after;
                parts.push(g.full(0.0, DType::F32, &d));
            }
            vec![Some(g.concat(&parts, *axis))]
        }
        Op::Concat(axis) => {
            let mut offset = Dim::constant(0);
            let mut out = Vec::new();
            for arg in a {
                let len = g.dims(*arg)[*axis].clone();
                let end = offset.add(&len);
                out.push(Some(g.slice(gy, *axis, offset.clone(), end.clone())));
                offset = end;
            }
            out
        }
        Op::Gather => {
            let table = g.dims(a[0]).to_vec();
            vec![Some(g.scatter_add(a[1], gy, &table)), None]
        }
        Op::ScatterAdd => {
            let mut grads = vec![None, Some(g.gather(gy, a[0]))];
            grads.extend(a.get(2).map(|_| Some(gy)));
            grads
        }
        Op::TopKValues(k) => {
            let x = a[0];
            let xd = g.dims(x).to_vec();
            let mut idx_dims = xd.clone();
            *idx_dims.last_mut().expect("rank >= 1") = Dim::constant(*k as i64);
            let idx = g.push(Op::TopKIndices(*k), vec![x], crate::types::TensorTy::new(DType::Int, idx_dims.clone()));
            let hot = g.one_hot(idx, xd.last().expect("rank >= 1").clone()); // [..., k, N]
            let mut col = idx_dims;
            col.push(Dim::constant(1));
            let gcol = g.reshape(gy, &col); // [..., k, 1]
            let spread = g.mul(hot, gcol);
            let r = g.ty(spread).rank();
            vec![Some(g.reduce(Reduce::Sum, spread, &[r - 2]))]
        }
    }
}

/// Adds a gradient rule of `scalar::UNARY` to the graph, elementwise over
/// `x`, `y` and `gy`; equal subexpressions become one node.
fn build(g: &mut Graph, e: &Expr, x: NodeId, y: NodeId, gy: NodeId, built: &mut Vec<(Expr, NodeId)>) -> NodeId {
    if let Some((_, n)) = built.iter().find(|(done, _)| done == e) {
        return *n;
    }
    let mut arg = |g: &mut Graph, a: &Expr| build(g, a, x, y, gy, built);
    let n = match e {
        Expr::X => x,
        Expr::Y => y,
        Expr::G => gy,
        Expr::Const(v) => g.constant(*v, DType::F32),
        Expr::Unary(u, a) => {
            let a = arg(g, a);
            g.unary(*u, a)
        }
        Expr::Binary(b, p, q) => {
            let (p, q) = (arg(g, p), arg(g, q));
            g.binary(*b, p, q)
        }
        Expr::Select(k, p, q) => {
            let (k, p, q) = (arg(g, k), arg(g, p), arg(g, q));
            g.select(k, p, q)
        }
    };
    built.push((e.clone(), n));
    n
}
