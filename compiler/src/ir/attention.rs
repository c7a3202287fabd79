//! Attention in primitives: what [`Op::Attention`] means (the interpreter
//! and the tests hold the fused kernels to it), the form a training forward
//! lowers to, and its gradient, which recomputes the probabilities from the
//! inputs instead of keeping a [B, H, T, S] tensor alive until the backward.

use super::graph::*;
use crate::check::dim::Dim;
use crate::syntax::ast::DType;

/// The pieces of an attention in primitives, heads first.
pub struct Parts {
    /// Queries `[B, H, T, D]`.
    pub queries: NodeId,
    /// Keys and values `[B, H, S, _]`, repeated for the query heads each serves.
    pub keys: NodeId,
    pub values: NodeId,
    /// Softmax probabilities `[B, H, T, S]`.
    pub probs: NodeId,
    /// Where a query sees a key (`[T, S]` or `[B, 1, T or 1, S]` bool), if not everywhere.
    pub allowed: Option<NodeId>,
}

/// Keys or values `[B, H, S, _]`: heads first, each key/value head repeated
/// for the H/G query heads it serves.
fn per_query_head(g: &mut Graph, a: &Attention, x: NodeId, heads: &Dim) -> NodeId {
    let x = if a.kv_heads_first { x } else { g.permute(x, &[0, 2, 1, 3]) };
    let groups = g.dims(x)[1].clone();
    if groups == *heads {
        return x;
    }
    let per = heads.div(&groups).expect("bug: heads divisible by groups");
    let mut dims = g.dims(x).to_vec();
    dims.insert(2, Dim::constant(1));
    let e = g.reshape(x, &dims);
    dims[2] = per;
    let e = g.broadcast(e, &dims);
    dims.remove(2);
    dims[1] = heads.clone();
    g.reshape(e, &dims)
}

/// The inverse of `per_query_head` for gradients: sums the query heads a
/// key/value head serves and restores the input's layout.
fn per_kv_head(g: &mut Graph, a: &Attention, x: NodeId, groups: &Dim) -> NodeId {
    let dims = g.dims(x).to_vec();
    let x = if dims[1] == *groups {
        x
    } else {
        let per = dims[1].div(groups).expect("bug: heads divisible by groups");
        let split = [dims[0].clone(), groups.clone(), per, dims[2].clone(), dims[3].clone()];
        let x = g.reshape(x, &split);
        g.reduce(Reduce::Sum, x, &[2])
    };
    if a.kv_heads_first { x } else { g.permute(x, &[0, 2, 1, 3]) }
}

/// Where query i (at key position i + offset) sees key j: the causal and
/// window rules as `[T, S]`, and'ed with the padding mask as `[B, 1, T or 1, S]`.
fn allowed(g: &mut Graph, a: &Attention, t: &Dim, s: &Dim, offset: NodeId, mask: Option<NodeId>) -> Option<NodeId> {
    let mut ok = None;
    if a.causal || a.window.is_some() {
        let qi = g.iota(t.clone());
        let qi = g.reshape(qi, &[t.clone(), Dim::constant(1)]);
        let qpos = g.add(qi, offset);
        let kj = g.iota(s.clone());
        let kj = g.reshape(kj, &[Dim::constant(1), s.clone()]);
        if a.causal {
            ok = Some(g.binary(Binary::Le, kj, qpos));
        }
        if let Some(w) = a.window {
            let wn = g.constant(w as f64, DType::Int);
            let lo = g.sub(qpos, wn);
            let recent = g.binary(Binary::Gt, kj, lo);
            ok = Some(match ok {
                Some(o) => g.binary(Binary::And, o, recent),
                None => recent,
            });
        }
    }
    if let Some(m) = mask {
        let md = g.dims(m).to_vec();
        let m = g.reshape(m, &[md[0].clone(), Dim::constant(1), md[1].clone(), md[2].clone()]);
        let zero = g.constant(0.0, g.ty(m).dtype);
        let keep = g.binary(Binary::Ne, m, zero);
        ok = Some(match ok {
            Some(o) => g.binary(Binary::And, o, keep),
            None => keep,
        });
    }
    ok
}

/// The attention's probabilities and operands in primitives; `args` as
/// [`Op::Attention`] takes them.
pub fn parts(g: &mut Graph, a: &Attention, args: &[NodeId]) -> Parts {
    let (q, k, v, offset, mask) = (args[0], args[1], args[2], args[3], args.get(4).copied());
    let (t, h) = (g.dims(q)[1].clone(), g.dims(q)[2].clone());
    let queries = g.permute(q, &[0, 2, 1, 3]);
    let keys = per_query_head(g, a, k, &h);
    let values = per_query_head(g, a, v, &h);
    let s = g.dims(keys)[2].clone();
    let scores = g.matmul_t(queries, keys, false, true);
    let scores = g.scale(scores, a.scale);
    let allowed = allowed(g, a, &t, &s, offset, mask);
    let scores = match allowed {
        Some(ok) => {
            let neg = g.constant(-1e30, DType::F32);
            g.select(ok, scores, neg)
        }
        None => scores,
    };
    let probs = g.softmax(scores, 3);
    Parts { queries, keys, values, probs, allowed }
}

/// [`Op::Attention`] in primitives, materialising the [B, H, T, S] scores.
pub fn decompose(g: &mut Graph, a: &Attention, args: &[NodeId]) -> NodeId {
    let p = parts(g, a, args);
    let y = g.matmul(p.probs, p.values); // [B, H, T, E]
    g.permute(y, &[0, 2, 1, 3])
}

/// The gradients of queries, keys and values of `y = attention(args)` given
/// `gy`, the adjoint of `y`. With P the probabilities: dV = Pᵀ dY,
/// dP = dY Vᵀ, dS = P (dP - rowsum(dY ∘ Y)) (rowsum(dP ∘ P) = rowsum(dY ∘ Y)),
/// dQ = scale dS K, dK = scale dSᵀ Q.
pub fn gradient(g: &mut Graph, a: &Attention, args: &[NodeId], y: NodeId, gy: NodeId) -> Vec<Option<NodeId>> {
    let groups = g.dims(args[1])[if a.kv_heads_first { 1 } else { 2 }].clone();
    let p = parts(g, a, args);
    let gyh = g.permute(gy, &[0, 2, 1, 3]); // [B, H, T, E]
    let yh = g.permute(y, &[0, 2, 1, 3]);
    let dv = g.matmul_t(p.probs, gyh, true, false); // [B, H, S, E]
    let dp = g.matmul_t(gyh, p.values, false, true); // [B, H, T, S]
    let gy_y = g.mul(gyh, yh);
    let delta = g.reduce_keep(Reduce::Sum, gy_y, &[3]);
    let centred = g.sub(dp, delta);
    let ds = g.mul(p.probs, centred);
    // Masked scores were replaced by a constant: no gradient reaches them
    // (P is 0 there anyway, unless a row has every key masked).
    let ds = match p.allowed {
        Some(ok) => {
            let zero = g.constant(0.0, DType::F32);
            g.select(ok, ds, zero)
        }
        None => ds,
    };
    let ds = g.scale(ds, a.scale);
    let dq = g.matmul(ds, p.keys); // [B, H, T, D]
    let dq = g.permute(dq, &[0, 2, 1, 3]);
    let dk = g.matmul_t(ds, p.queries, true, false); // [B, H, S, D]
    let dk = per_kv_head(g, a, dk, &groups);
    let dv = per_kv_head(g, a, dv, &groups);
    let mut grads = vec![Some(dq), Some(dk), Some(dv), None];
    grads.extend(args.get(4).map(|_| None));
    grads
}
