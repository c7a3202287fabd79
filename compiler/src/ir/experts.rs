//! Lowering `route` (mixture of experts). Each expert is first lowered
//! over every token, one after the other; then either
//! - `sparse`: when the experts are one row-wise layer applied alike (the
//!   same nodes up to their weights), their nodes are replayed once over
//!   only the chosen (token, expert) pairs, ordered by expert, with every
//!   product by an expert's weight an `expert_matmul` (one product per
//!   expert over its rows), and the results scattered back to their tokens
//!   with their weights: each token pays for its k experts, not all E; or
//! - `dense`: every expert sees every token, weighted by zero where it was
//!   not chosen. This is the definition (the interpreter's oracle with
//!   `LowerOptions::dense_routes`) and the fallback for other experts.
//!
//! Both sum a token's k contributions in expert order.

use super::graph::*;
use super::signature::{EXPERT_LOAD, Role};
use crate::types::{DType, Dim, TensorTy};

/// One expert lowered over the tokens: its nodes `start..end` and result.
#[derive(Clone, Copy, Debug)]
pub struct Lowered {
    pub start: usize,
    pub end: usize,
    pub out: NodeId,
}

/// Every expert over every token, each weighted by
/// `sum_j weights[:, j] * (choices[:, j] == e)`.
pub fn dense(g: &mut Graph, experts: &[Lowered], choices: NodeId, weights: NodeId) -> NodeId {
    let mut acc: Option<NodeId> = None;
    for (e, expert) in experts.iter().enumerate() {
        let id = g.constant(e as f64, DType::Int);
        let hit = g.binary(Binary::Eq, choices, id);
        let hit = g.cast(hit, DType::F32);
        let gate = g.mul(weights, hit);
        let gate = g.reduce_keep(Reduce::Sum, gate, &[1]);
        let y = g.mul(expert.out, gate);
        acc = Some(match acc {
            Some(a) => g.add(a, y),
            None => y,
        });
    }
    acc.expect("bug: `route` without experts")
}

/// Outputs the tokens each expert was given (`[E]`, summed over the k
/// choices) as the next `metric:expert_load.{i}`, for training metrics.
pub fn report_load(g: &mut Graph, choices: NodeId, experts: usize) {
    let layer = g.outputs.iter().filter(|(n, _)| Role::of(n).expert_load().is_some()).count();
    let hits = g.one_hot(choices, Dim::constant(experts as i64));
    let load = g.reduce(Reduce::Sum, hits, &[0, 1]);
    g.outputs.push((Role::Metric(&format!("{EXPERT_LOAD}{layer}")).name(), load));
}

/// The meaning of `expert_order` and `expert_offsets`: the slots of
/// `choices` (row-major, k per token) ordered by expert, stably, and where
/// each expert's slots start. Errors on a choice that names no expert.
pub fn order(
    choices: impl ExactSizeIterator<Item = f64> + Clone,
    experts: usize,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let mut offsets = vec![0usize; experts + 1];
    for c in choices.clone() {
        if !(c >= 0.0 && c < experts as f64) {
            return Err(format!("expert {c} is out of range for {experts} experts"));
        }
        offsets[c as usize + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut order = vec![0; choices.len()];
    for (slot, c) in choices.enumerate() {
        order[next[c as usize]] = slot;
        next[c as usize] += 1;
    }
    Ok((order, offsets))
}

/// A template node's value in the replay.
#[derive(Clone, Debug)]
enum Class {
    /// Computed over the routed rows (`[R, ...]`, R = tokens * k).
    Row(NodeId),
    /// The same for every expert and free of tokens (a constant).
    Shared(NodeId),
    /// Each expert's own (its weights and what is made of them alone).
    Each(Vec<NodeId>),
}

/// The routed lowering, or `None` (and the graph untouched) when the
/// experts are not the same row-wise layer. `x [N, d]` is what every
/// expert was lowered over; `choices [N, k]` int and `weights [N, k]`.
pub fn sparse(g: &mut Graph, x: NodeId, experts: &[Lowered], choices: NodeId, weights: NodeId) -> Option<NodeId> {
    let mark = g.nodes.len();
    let routed = Replay::new(g, x, experts, choices).and_then(|mut r| r.run(weights));
    if routed.is_none() {
        g.nodes.truncate(mark);
    }
    routed
}

struct Replay<'a> {
    g: &'a mut Graph,
    x: NodeId,
    experts: &'a [Lowered],
    choices: NodeId,
    /// Tokens N and routed rows R.
    tokens: Dim,
    rows: Dim,
    order: NodeId,
    offsets: NodeId,
    /// The token of each routed row.
    token_of: NodeId,
    /// The expert of each routed row, made when a weight is broadcast over rows.
    expert_of: Option<NodeId>,
    classes: Vec<Class>,
}

impl<'a> Replay<'a> {
    fn new(g: &'a mut Graph, x: NodeId, experts: &'a [Lowered], choices: NodeId) -> Option<Replay<'a>> {
        let first = experts.first()?;
        let (len, out) = (first.end - first.start, first.out.index() - first.start);
        let alike = experts.iter().all(|e| e.end - e.start == len && e.out.index().checked_sub(e.start) == Some(out));
        let (tokens, k) = match g.dims(choices) {
            [n, k] => (n.clone(), k.clone()),
            _ => return None,
        };
        if !alike || g.ty(x).rank() != 2 || g.dims(x)[0] != tokens {
            return None;
        }
        let (order, offsets) = g.expert_order(choices, experts.len());
        let per_token = g.constant(k.as_const()? as f64, DType::Int);
        let per_token = g.broadcast(per_token, &[tokens.mul(&k)]);
        let token_of = g.binary(Binary::Div, order, per_token);
        Some(Replay {
            g,
            x,
            experts,
            choices,
            rows: tokens.mul(&k),
            tokens,
            order,
            offsets,
            token_of,
            expert_of: None,
            classes: Vec::with_capacity(len),
        })
    }

    fn run(&mut self, weights: NodeId) -> Option<NodeId> {
        let routed_x = self.g.gather(self.x, self.token_of);
        let first = self.experts[0];
        for i in 0..first.end - first.start {
            let class = self.step(i, routed_x)?;
            self.classes.push(class);
        }
        let Class::Row(y) = self.classes[first.out.index() - first.start].clone() else { return None };
        let out_dims = self.g.dims(y).to_vec();
        let flat = self.g.reshape(weights, std::slice::from_ref(&self.rows));
        let w = self.g.gather(flat, self.order);
        let w = self.g.reshape(w, &[self.rows.clone(), Dim::constant(1)]);
        let w = self.g.broadcast(w, &out_dims);
        let weighted = self.g.mul(y, w);
        let mut dims = out_dims;
        dims[0] = self.tokens.clone();
        Some(self.g.scatter_add(self.token_of, weighted, &dims))
    }

    /// Replays node `i` of the template (expert 0's nodes).
    fn step(&mut self, i: usize, routed_x: NodeId) -> Option<Class> {
        let nodes: Vec<&Node> = self.experts.iter().map(|e| self.g.node(NodeId((e.start + i) as u32))).collect();
        let t = nodes[0].clone();
        let alike = nodes.iter().all(|n| {
            n.ty == t.ty
                && n.args.len() == t.args.len()
                && match (&n.op, &t.op) {
                    (Op::Param(_), Op::Param(_)) => true,
                    (a, b) => a == b,
                }
        });
        // Sizes, positions and dropout masks mean something else over routed rows.
        if !alike || matches!(t.op, Op::Size(_) | Op::Iota | Op::DropoutMask { .. }) {
            return None;
        }
        let ids: Vec<NodeId> = self.experts.iter().map(|e| NodeId((e.start + i) as u32)).collect();
        let mut args = Vec::with_capacity(t.args.len());
        for j in 0..t.args.len() {
            let of: Vec<NodeId> = nodes.iter().map(|n| n.args[j]).collect();
            args.push(self.class_of(&of, routed_x)?);
        }
        if !args.iter().any(|a| matches!(a, Class::Row(_))) {
            return Some(if args.iter().any(|a| matches!(a, Class::Each(_))) || matches!(t.op, Op::Param(_)) {
                Class::Each(ids)
            } else {
                Class::Shared(ids[0])
            });
        }
        self.row(&t, &args).map(Class::Row)
    }

    /// The class of one argument, given as each expert's node.
    fn class_of(&self, of: &[NodeId], routed_x: NodeId) -> Option<Class> {
        let inside: Vec<Option<usize>> = self
            .experts
            .iter()
            .zip(of)
            .map(|(e, a)| (e.start..e.end).contains(&a.index()).then(|| a.index() - e.start))
            .collect();
        if inside.iter().all(Option::is_some) {
            let rel = inside[0]?;
            return inside.iter().all(|r| *r == Some(rel)).then(|| self.classes[rel].clone());
        }
        if inside.iter().any(Option::is_some) {
            return None;
        }
        if of.iter().all(|a| *a == self.x) {
            return Some(Class::Row(routed_x));
        }
        if of.contains(&self.x) {
            return None;
        }
        Some(if of.iter().all(|a| *a == of[0]) { Class::Shared(of[0]) } else { Class::Each(of.to_vec()) })
    }

    /// The template node `t` over routed rows: only operations that keep
    /// each row to itself (so that rows of different experts never mix).
    fn row(&mut self, t: &Node, args: &[Class]) -> Option<NodeId> {
        let mut dims = t.ty.dims.clone();
        if dims.first() != Some(&self.tokens) {
            return None;
        }
        dims[0] = self.rows.clone();
        let ty = TensorTy::new(t.ty.dtype, dims.clone());
        let row = |c: &Class| match c {
            Class::Row(n) => Some(*n),
            _ => None,
        };
        let mapped: Vec<NodeId> = match &t.op {
            Op::Unary(_) | Op::Cast(_) | Op::Reshape | Op::Broadcast => vec![row(&args[0])?],
            Op::Reduce(_, axes) if !axes.contains(&0) => vec![row(&args[0])?],
            Op::Permute(p) if p.first() == Some(&0) => vec![row(&args[0])?],
            Op::Slice { axis, .. } if *axis != 0 => vec![row(&args[0])?],
            Op::Concat(axis) if *axis != 0 => args.iter().map(row).collect::<Option<_>>()?,
            Op::Binary(_) | Op::Select => args.iter().map(|a| self.over_rows(a, &dims)).collect::<Option<_>>()?,
            Op::MatMul { ta: false, tb } if dims.len() == 2 => {
                let x = row(&args[0])?;
                return match &args[1] {
                    Class::Shared(w) if self.g.ty(*w).rank() == 2 => Some(self.g.matmul_t(x, *w, false, *tb)),
                    Class::Each(ws) => {
                        // A transposed weight is read transposed rather than copied.
                        let transposed: Option<Vec<NodeId>> = ws
                            .iter()
                            .map(|w| match &self.g.node(*w).op {
                                Op::Permute(p) if p == &[1, 0] => Some(self.g.node(*w).args[0]),
                                _ => None,
                            })
                            .collect();
                        Some(match transposed {
                            Some(ws) => self.g.expert_matmul(x, self.offsets, &ws, !tb),
                            None => self.g.expert_matmul(x, self.offsets, ws, *tb),
                        })
                    }
                    _ => None,
                };
            }
            _ => return None,
        };
        Some(self.g.push(t.op.clone(), mapped, ty))
    }

    /// An operand of an elementwise operation over rows `dims`: a routed
    /// value, or a broadcast of something without rows (each expert's own
    /// taken by the expert of each row).
    fn over_rows(&mut self, c: &Class, dims: &[Dim]) -> Option<NodeId> {
        let spread = |g: &Graph, n: NodeId| {
            let node = g.node(n);
            let src = *node.args.first()?;
            let r = g.ty(src).rank();
            let free = r < dims.len() || g.dims(src)[0].as_const() == Some(1);
            (matches!(node.op, Op::Broadcast) && free).then_some(src)
        };
        match c {
            Class::Row(n) => Some(*n),
            Class::Shared(n) => {
                let src = spread(self.g, *n)?;
                Some(self.g.broadcast(src, dims))
            }
            Class::Each(ns) => {
                let srcs: Vec<NodeId> = ns.iter().map(|n| spread(self.g, *n)).collect::<Option<_>>()?;
                // [1, ...] per expert, right-aligned under the rows' axes.
                let src_dims = self.g.dims(srcs[0]).to_vec();
                let mut one = vec![Dim::constant(1); dims.len() - src_dims.len().min(dims.len() - 1)];
                one.extend(src_dims.iter().skip(src_dims.len().saturating_sub(dims.len() - 1)).cloned());
                let parts: Vec<NodeId> = srcs.iter().map(|s| self.g.reshape(*s, &one)).collect();
                let stacked = self.g.concat(&parts, 0);
                let expert_of = self.expert_of();
                let per_row = self.g.gather(stacked, expert_of);
                Some(self.g.broadcast(per_row, dims))
            }
        }
    }

    fn expert_of(&mut self) -> NodeId {
        if let Some(e) = self.expert_of {
            return e;
        }
        let flat = self.g.reshape(self.choices, std::slice::from_ref(&self.rows));
        let e = self.g.gather(flat, self.order);
        self.expert_of = Some(e);
        e
    }
}
