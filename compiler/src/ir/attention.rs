//! Attention in primitives: what [`Op::Attention`] means (the interpreter
//! and the tests hold the fused kernels to it) and the form a training
//! forward lowers to; and the fused operation's gradient, as passes that
//! recompute the probabilities block by block instead of keeping a
//! [B, H, T, S] tensor alive until the backward.

use super::graph::*;
use crate::types::DType;
use crate::types::Dim;

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

/// [`Op::Attention`] in primitives, materialising the [B, H, T, S] scores
/// and probabilities.
pub fn decompose(g: &mut Graph, a: &Attention, args: &[NodeId]) -> NodeId {
    decompose_capped(g, a, args, None)
}

/// Attention whose scaled scores are soft-capped before the mask, `cap *
/// tanh(score / cap)` (Gemma 2's `attn_logit_softcapping`), or not (`None`:
/// [`decompose`]).
pub fn decompose_capped(g: &mut Graph, a: &Attention, args: &[NodeId], cap: Option<f64>) -> NodeId {
    let (q, k, v, offset, mask) = (args[0], args[1], args[2], args[3], args.get(4).copied());
    let (t, h) = (g.dims(q)[1].clone(), g.dims(q)[2].clone());
    let queries = g.permute(q, &[0, 2, 1, 3]);
    let keys = per_query_head(g, a, k, &h);
    let values = per_query_head(g, a, v, &h);
    let s = g.dims(keys)[2].clone();
    let scores = g.matmul_t(queries, keys, false, true);
    let scores = g.scale(scores, a.scale);
    let scores = match cap {
        Some(cap) => {
            let inner = g.scale(scores, 1.0 / cap);
            let bounded = g.unary(Unary::Tanh, inner);
            g.scale(bounded, cap)
        }
        None => scores,
    };
    let scores = match allowed(g, a, &t, &s, offset, mask) {
        Some(ok) => {
            let neg = g.constant(-1e30, DType::F32);
            g.select(ok, scores, neg)
        }
        None => scores,
    };
    let probs = g.softmax(scores, 3);
    let y = g.matmul(probs, values); // [B, H, T, E]
    g.permute(y, &[0, 2, 1, 3])
}

/// The gradients of queries, keys and values of `y = attention(args)` given
/// `gy`, the adjoint of `y`, as passes that never store the [B, H, T, S]
/// probabilities: each row's log-sum-exp of its scores, then, recomputing
/// P = exp(score - lse) block by block, dQ = scale dS K, dK = scale dSᵀ Q
/// and dV = Pᵀ dY in one pass, with dP = dY Vᵀ and dS = P (dP - delta),
/// delta = rowsum(dY ∘ Y) (equal to rowsum(dP ∘ P)). Masked scores get no gradient; a row with every key
/// masked spreads its adjoint evenly over all the values (its P is 1/S),
/// as the decomposition's gradient does.
pub fn gradient(g: &mut Graph, a: &Attention, args: &[NodeId], y: NodeId, gy: NodeId) -> Vec<Option<NodeId>> {
    let lse = g.attention_backward(a.clone(), AttentionPass::Lse, args);
    let gy_y = g.mul(gy, y);
    let delta = g.reduce(Reduce::Sum, gy_y, &[3]);
    let mut pass_args = vec![gy, lse, delta];
    pass_args.extend_from_slice(args);
    let both = g.attention_backward(a.clone(), AttentionPass::Gradients, &pass_args);
    let count = |dims: &[Dim]| dims.iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
    let q_dims = g.dims(args[0]).to_vec();
    let mut kv_dims = g.dims(args[1]).to_vec();
    let (d, e) = (kv_dims[3].clone(), g.dims(args[2])[3].clone());
    kv_dims[3] = d.add(&e);
    let (nq, total) = (count(&q_dims), g.dims(both)[0].clone());
    let dq = g.slice(both, 0, Dim::constant(0), nq.clone());
    let dq = g.reshape(dq, &q_dims);
    let dkv = g.slice(both, 0, nq, total);
    let dkv = g.reshape(dkv, &kv_dims);
    let dk = g.slice(dkv, 3, Dim::constant(0), d.clone());
    let dv = g.slice(dkv, 3, d, kv_dims[3].clone());
    let mut grads = vec![Some(dq), Some(dk), Some(dv), None];
    grads.extend(args.get(4).map(|_| None));
    grads
}
