//! The verifier: re-derives every node's type from its operation and inputs
//! and checks the graph's invariants (inputs defined first, outputs exist).
//! Every pass that makes a graph calls `after` on its result: in debug
//! builds (and so in every test) a pass that breaks the IR fails where it
//! breaks it; release builds skip it.

use super::graph::*;
use crate::types::DType;
use crate::types::Dim;
use crate::types::{TensorTy, broadcast};

/// Verifies the graph a pass made, in debug builds; panics naming the pass.
pub fn after(pass: &str, g: &Graph) {
    if cfg!(debug_assertions)
        && let Err(e) = verify(g)
    {
        panic!("bug: {pass} made a malformed graph: {e}");
    }
}

pub fn verify(g: &Graph) -> Result<(), String> {
    for (i, n) in g.nodes.iter().enumerate() {
        let here = |m: String| format!("%{i} = {}: {m}", n.op.name());
        for a in &n.args {
            if a.index() >= i {
                return Err(here(format!("uses {a}, which is not defined before it")));
            }
        }
        let t = |k: usize| g.ty(n.args[k]);
        let want_args = |k: usize| {
            if n.args.len() == k { Ok(()) } else { Err(here(format!("takes {k} inputs, has {}", n.args.len()))) }
        };
        let same =
            |a: &[Dim], b: &[Dim]| if a == b { Ok(()) } else { Err(here(format!("shapes {a:?} and {b:?} differ"))) };
        let out = &n.ty;
        match &n.op {
            Op::Input(_) | Op::Param(_) | Op::Iota => want_args(0)?,
            Op::Const(_) | Op::Size(_) => {
                want_args(0)?;
                if out.rank() != 0 {
                    return Err(here("a constant is a scalar".into()));
                }
            }
            Op::Unary(_) | Op::Cast(_) => {
                want_args(1)?;
                same(&t(0).dims, &out.dims)?;
            }
            Op::Binary(b) => {
                want_args(2)?;
                same(&t(0).dims, &t(1).dims)?;
                same(&t(0).dims, &out.dims)?;
                if t(0).dtype != t(1).dtype {
                    return Err(here("operands have different element types".into()));
                }
                let want = if b.is_comparison() { DType::Bool } else { t(0).dtype };
                if out.dtype != want {
                    return Err(here(format!("result should be {}", want.as_str())));
                }
            }
            Op::Select => {
                want_args(3)?;
                same(&t(0).dims, &out.dims)?;
                same(&t(1).dims, &out.dims)?;
                same(&t(2).dims, &out.dims)?;
            }
            Op::Reduce(_, axes) => {
                want_args(1)?;
                let kept: Vec<Dim> =
                    t(0).dims.iter().enumerate().filter(|(k, _)| !axes.contains(k)).map(|(_, d)| d.clone()).collect();
                same(&kept, &out.dims)?;
            }
            Op::ArgMax(axis) => {
                want_args(1)?;
                let mut kept = t(0).dims.clone();
                kept.remove(*axis);
                same(&kept, &out.dims)?;
            }
            Op::MatMul { ta, tb } => {
                want_args(2)?;
                let Some(dims) = matmul_dims(t(0), t(1), *ta, *tb) else {
                    return Err(here(format!("cannot multiply {} by {}", t(0), t(1))));
                };
                same(&dims, &out.dims)?;
            }
            Op::Reshape => {
                want_args(1)?;
                let count = |d: &[Dim]| d.iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
                if count(&t(0).dims) != count(&out.dims) {
                    return Err(here(format!("reshape of {} to {out} changes the element count", t(0))));
                }
            }
            Op::Permute(perm) => {
                want_args(1)?;
                let mut sorted = perm.clone();
                sorted.sort();
                if sorted != (0..t(0).rank()).collect::<Vec<_>>() {
                    return Err(here("not a permutation".into()));
                }
                same(&perm.iter().map(|p| t(0).dims[*p].clone()).collect::<Vec<_>>(), &out.dims)?;
            }
            Op::Broadcast => {
                want_args(1)?;
                if broadcast(&t(0).dims, &out.dims).ok().as_deref() != Some(&out.dims[..]) {
                    return Err(here(format!("{} does not broadcast to {out}", t(0))));
                }
            }
            Op::Slice { axis, start, end } => {
                want_args(1)?;
                let mut dims = t(0).dims.clone();
                dims[*axis] = end.sub(start);
                same(&dims, &out.dims)?;
            }
            Op::Concat(axis) => {
                let mut dims = t(0).dims.clone();
                dims[*axis] = n.args.iter().fold(Dim::constant(0), |acc, a| acc.add(&g.ty(*a).dims[*axis]));
                same(&dims, &out.dims)?;
            }
            Op::Gather => {
                want_args(2)?;
                let mut dims = t(1).dims.clone();
                dims.extend(t(0).dims[1..].iter().cloned());
                same(&dims, &out.dims)?;
            }
            Op::ScatterAdd => {
                if n.args.len() != 3 {
                    want_args(2)?;
                }
                let mut dims = t(0).dims.clone();
                dims.extend(out.dims[1..].iter().cloned());
                same(&dims, &t(1).dims)?;
                if n.args.len() == 3 {
                    same(&t(2).dims, &out.dims)?;
                }
            }
            Op::OneHot => {
                want_args(1)?;
                same(&t(0).dims, &out.dims[..out.rank() - 1])?;
            }
            Op::TopKValues(k) | Op::TopKIndices(k) => {
                want_args(1)?;
                let mut dims = t(0).dims.clone();
                *dims.last_mut().ok_or_else(|| here("topk of a scalar".into()))? = Dim::constant(*k as i64);
                same(&dims, &out.dims)?;
            }
            Op::DropoutMask { .. } => want_args(1)?,
            Op::WriteRows => {
                want_args(3)?;
                same(&t(0).dims, &out.dims)?;
                let (b, r) = (&t(0).dims, &t(1).dims);
                if b.len() < 2 || r.len() != b.len() || b[..b.len() - 2] != r[..r.len() - 2] || b.last() != r.last() {
                    return Err(here(format!("rows {r:?} do not fit {b:?}")));
                }
                if t(2).rank() != 0 {
                    return Err(here("the start of write_rows is a scalar".into()));
                }
            }
            Op::Attention(a) => {
                let tys: Vec<&TensorTy> = n.args.iter().map(|x| g.ty(*x)).collect();
                same(&attention_dims(a, &tys).map_err(here)?, &out.dims)?;
            }
            Op::AttentionBackward(a, pass) => {
                let tys: Vec<&TensorTy> = n.args.iter().map(|x| g.ty(*x)).collect();
                same(&attention_backward_dims(a, *pass, &tys).map_err(here)?, &out.dims)?;
            }
            Op::ExpertOrder(_) | Op::ExpertOffsets(_) => {
                want_args(1)?;
                if t(0).rank() != 2 || t(0).dtype != DType::Int || out.dtype != DType::Int {
                    return Err(here(format!("routes int choices [N, k], not {}", t(0))));
                }
                let want = match &n.op {
                    Op::ExpertOffsets(e) => Dim::constant(*e as i64 + 1),
                    _ => t(0).dims[0].mul(&t(0).dims[1]),
                };
                same(&[want], &out.dims)?;
            }
            Op::ExpertMatMul { tb } => {
                let experts = n.args.len().saturating_sub(2);
                if experts == 0 || t(1).dims != [Dim::constant(experts as i64 + 1)] {
                    return Err(here(format!("{experts} weights and offsets {} do not fit", t(1))));
                }
                if n.args[3..].iter().any(|w| g.ty(*w).dims != t(2).dims) {
                    return Err(here("the experts' weights differ in shape".into()));
                }
                let Some(dims) = expert_matmul_dims(t(0), t(2), *tb) else {
                    return Err(here(format!("cannot multiply {} by {}", t(0), t(2))));
                };
                same(&dims, &out.dims)?;
            }
            Op::ExpertWeightGrad { tb } => {
                want_args(3)?;
                let (x, dy) = (t(0), t(1));
                if x.rank() != 2 || dy.rank() != 2 || x.dims[0] != dy.dims[0] || t(2).rank() != 1 {
                    return Err(here(format!("rows {x} and adjoint {dy} do not fit")));
                }
                let experts = t(2).dims[0].sub(&Dim::constant(1));
                let (k, m) = (x.dims[1].clone(), dy.dims[1].clone());
                same(&if *tb { [experts, m, k] } else { [experts, k, m] }, &out.dims)?;
            }
        }
    }
    for (name, id) in &g.outputs {
        if id.index() >= g.nodes.len() {
            return Err(format!("output {name} refers to {id}, which does not exist"));
        }
    }
    Ok(())
}
