//! Lowering: the checker's walk through `forward` calls into this module to
//! emit IR for each primitive and operator, with the types it already
//! inferred. Composite operations (softmax, RoPE, routing, cross-entropy)
//! are decomposed into the primitive set here, never in a backend. The one
//! exception is attention, one `Op::Attention` whose meaning is its
//! decomposition (`ir::attention`), so that backends can run it (and its
//! gradient) without storing the scores.

use super::graph::*;
use super::signature::Role;
use crate::check::prims::Prim;
use crate::types::DType;
use crate::types::Dim;
use crate::types::TensorTy;

/// State of one lowering: the graph being built and what training needs.
#[derive(Debug, Default)]
pub struct Lowering {
    pub g: Graph,
    /// Emit dropout masks (training) or not (inference).
    pub training: bool,
    /// The `step` input that seeds dropout masks, made on first use.
    pub step: Option<NodeId>,
    /// Losses added by `add_loss`, with their weights.
    pub aux_losses: Vec<(NodeId, f64)>,
    /// Counter giving every dropout site its own key.
    pub dropout_sites: u64,
    /// Incremental decoding with a key/value cache, when asked for.
    pub cache: Option<Cache>,
    /// Output every layer call's result (`LowerOptions::trace`).
    pub trace: bool,
    /// Lower `route` densely (`LowerOptions::dense_routes`).
    pub dense_routes: bool,
}

/// Incremental decoding. The model sees `T` new tokens at positions
/// `position .. position + T` (`position` is an int input). Every causal
/// self-attention keeps its keys and values for `len` positions: it reads
/// them from the inputs `past.{i}.key` / `past.{i}.value` ([B, kv_heads, len,
/// head_dim]: heads first, as the products read them), writes the new tokens' rows, attends over all `len` slots
/// with the causal mask hiding the unwritten ones, and returns the updated
/// cache as the outputs `present.{i}.key` / `present.{i}.value`. Positions
/// count from `position`: RoPE's angles, and `arange` over the sequence axis
/// of the model's first input (learned or sinusoidal positions).
#[derive(Debug)]
pub struct Cache {
    pub len: usize,
    /// The sequence axis of the model's first input (or of `input`'s).
    pub time: Option<Dim>,
    /// The input whose sequence is cached, when not the first.
    pub input: Option<String>,
    /// The `position` input, made on first use.
    pub position: Option<NodeId>,
    /// Attention layers given a cache so far.
    pub layers: usize,
}

/// The slots of a sliding window's ring cache: the window and room for a
/// chunk of new tokens (`ring_chunk`), so that writing the chunk never
/// overwrites a key an earlier token of it still sees.
pub fn ring_len(window: usize) -> usize {
    window + window.min(RING_CHUNK) - 1
}

/// The most new tokens a program may read at once into a ring of `slots`
/// (the inverse of `ring_len`): longer prompts are read in chunks.
pub fn ring_chunk(slots: usize) -> usize {
    slots.div_ceil(2).min(RING_CHUNK)
}

/// The longest chunk of new tokens a sliding window's cache makes room for.
const RING_CHUNK: usize = 128;

/// A lowered argument: a tensor node, a compile-time value, or a list.
#[derive(Clone, Debug)]
pub enum LArg {
    Node(NodeId),
    Int(i64),
    Float(f64),
    Bool(bool),
    Size(Dim),
    Ints(Vec<i64>),
    Sizes(Vec<Dim>),
    Nodes(Vec<NodeId>),
    Absent,
}

impl LArg {
    fn node(&self) -> NodeId {
        match self {
            LArg::Node(n) => *n,
            other => unreachable!("bug: expected a tensor argument, got {other:?}"),
        }
    }
    fn opt_node(&self) -> Option<NodeId> {
        match self {
            LArg::Node(n) => Some(*n),
            _ => None,
        }
    }
    fn int(&self) -> i64 {
        match self {
            LArg::Int(v) => *v,
            other => unreachable!("bug: expected an int argument, got {other:?}"),
        }
    }
    fn float(&self) -> f64 {
        match self {
            LArg::Float(v) => *v,
            LArg::Int(v) => *v as f64,
            other => unreachable!("bug: expected a number argument, got {other:?}"),
        }
    }
    fn bool(&self) -> bool {
        matches!(self, LArg::Bool(true))
    }
    fn size(&self) -> Dim {
        match self {
            LArg::Int(v) => Dim::constant(*v),
            LArg::Size(d) => d.clone(),
            other => unreachable!("bug: expected a size argument, got {other:?}"),
        }
    }
}

fn axis_of(rank: usize, a: i64) -> usize {
    crate::types::normalize_axis(a, rank).expect("bug: axis checked by the checker")
}

impl Lowering {
    pub fn new(training: bool, cache: Option<usize>, input: Option<String>) -> Lowering {
        let cache = cache.map(|len| Cache { len, time: None, input, position: None, layers: 0 });
        Lowering { training, cache, ..Default::default() }
    }

    /// A model input; with a cache, the first one fixes the sequence axis.
    pub fn model_input(&mut self, name: &str, ty: TensorTy) -> NodeId {
        if let Some(c) = self.cache.as_mut()
            && c.time.is_none()
            && ty.rank() >= 2
            && c.input.as_ref().is_none_or(|input| input == name)
        {
            c.time = Some(ty.dims[1].clone());
        }
        self.g.input(name, ty)
    }

    /// `iota(n)`, shifted to absolute positions when `n` is the cached sequence axis.
    fn positions(&mut self, n: Dim) -> NodeId {
        let i = self.g.iota(n.clone());
        let shifted = self.cache.as_ref().is_some_and(|c| c.time.as_ref() == Some(&n));
        if !shifted {
            return i;
        }
        let p = self.position_input();
        self.g.add(i, p)
    }

    fn position_input(&mut self) -> NodeId {
        let c = self.cache.as_mut().expect("bug: position without a cache");
        match c.position {
            Some(p) => p,
            None => {
                let p = self.g.input("position", TensorTy::scalar(DType::Int));
                self.cache.as_mut().expect("checked").position = Some(p);
                p
            }
        }
    }

    /// The cache `past` ([B, G, len, D], heads first) with the new tokens'
    /// rows `new` ([B, G, T, D]) written at `position ..` (`Op::WriteRows`:
    /// the CPU writes them into the cache where it lies).
    fn cache_write(&mut self, past: NodeId, new: NodeId) -> NodeId {
        let position = self.position_input();
        self.g.write_rows(past, new, position)
    }

    pub fn step_input(&mut self) -> NodeId {
        match self.step {
            Some(s) => s,
            None => {
                let s = self.g.input("step", TensorTy::scalar(DType::F32));
                self.step = Some(s);
                s
            }
        }
    }

    /// A number as a scalar node of the given element type.
    pub fn scalar(&mut self, v: f64, dtype: DType) -> NodeId {
        self.g.constant(v, dtype)
    }

    /// Lowers primitive `prim`; `out` are the result types the checker inferred.
    pub fn prim(&mut self, prim: Prim, a: &[LArg], out: &[TensorTy]) -> Vec<NodeId> {
        let g = &mut self.g;
        let one = |n: NodeId| vec![n];
        match prim {
            Prim::Math(u) => one(g.unary(u, a[0].node())),
            Prim::Float => one(g.cast(a[0].node(), DType::F32)),
            Prim::Int => one(g.cast(a[0].node(), DType::Int)),
            Prim::Maximum | Prim::Minimum => {
                let op = if prim == Prim::Maximum { Binary::Max } else { Binary::Min };
                let (x, y) = (self.operand(&a[0], out[0].dtype), self.operand(&a[1], out[0].dtype));
                one(self.g.binary(op, x, y))
            }
            Prim::Where => {
                let (x, y) = (self.operand(&a[1], out[0].dtype), self.operand(&a[2], out[0].dtype));
                one(self.g.select(a[0].node(), x, y))
            }
            Prim::Sum | Prim::Mean | Prim::Max | Prim::Min | Prim::Var => {
                let x = a[0].node();
                let rank = g.ty(x).rank();
                let axes: Vec<usize> = match &a[1] {
                    LArg::Int(v) => vec![axis_of(rank, *v)],
                    LArg::Ints(vs) => vs.iter().map(|v| axis_of(rank, *v)).collect(),
                    _ => (0..rank).collect(),
                };
                let keep = a[2].bool();
                let y = match prim {
                    Prim::Sum => self.reduce(Reduce::Sum, x, &axes, keep),
                    Prim::Max => self.reduce(Reduce::Max, x, &axes, keep),
                    Prim::Min => self.reduce(Reduce::Min, x, &axes, keep),
                    Prim::Mean => self.mean(x, &axes, keep),
                    _ => {
                        let mu = self.mean(x, &axes, true);
                        let centered = self.g.sub(x, mu);
                        let sq = self.g.mul(centered, centered);
                        self.mean(sq, &axes, keep)
                    }
                };
                one(y)
            }
            Prim::Argmax => {
                let x = a[0].node();
                let axis = axis_of(g.ty(x).rank(), a[1].int());
                let y = g.argmax(x, axis);
                one(g.reshape(y, &out[0].dims))
            }
            Prim::Softmax => {
                let x = a[0].node();
                let axis = axis_of(g.ty(x).rank(), a[1].int());
                one(self.softmax(x, axis))
            }
            Prim::LogSoftmax => {
                let x = a[0].node();
                let axis = axis_of(g.ty(x).rank(), a[1].int());
                one(self.log_softmax(x, axis))
            }
            Prim::Cumsum => {
                let x = a[0].node();
                let axis = axis_of(g.ty(x).rank(), a[1].int());
                one(self.cumsum(x, axis))
            }
            Prim::Transpose => {
                let x = a[0].node();
                let r = g.ty(x).rank();
                let mut perm: Vec<usize> = (0..r).collect();
                perm.swap(axis_of(r, a[1].int()), axis_of(r, a[2].int()));
                one(g.permute(x, &perm))
            }
            Prim::Permute => {
                let x = a[0].node();
                let r = g.ty(x).rank();
                let perm: Vec<usize> = match &a[1] {
                    LArg::Ints(vs) => vs.iter().map(|v| axis_of(r, *v)).collect(),
                    other => unreachable!("bug: permute axes {other:?}"),
                };
                one(g.permute(x, &perm))
            }
            Prim::Reshape | Prim::Split | Prim::Merge | Prim::Unsqueeze | Prim::Squeeze => {
                one(g.reshape(a[0].node(), &out[0].dims))
            }
            Prim::Expand => one(g.broadcast(a[0].node(), &out[0].dims)),
            Prim::Concat | Prim::Stack => {
                let LArg::Nodes(xs) = &a[0] else { unreachable!("bug: concat of a non-list") };
                let rank = out[0].rank();
                let axis = axis_of(rank, a[1].int());
                let parts: Vec<NodeId> = if prim == Prim::Stack {
                    xs.iter()
                        .map(|x| {
                            let mut dims = self.g.dims(*x).to_vec();
                            dims.insert(axis, Dim::constant(1));
                            self.g.reshape(*x, &dims)
                        })
                        .collect()
                } else {
                    xs.clone()
                };
                one(self.g.concat(&parts, axis))
            }
            Prim::Gather => one(g.gather(a[0].node(), a[1].node())),
            Prim::OneHot => one(g.one_hot(a[0].node(), a[1].size())),
            Prim::Arange => one(self.positions(a[0].size())),
            Prim::Dropout => {
                let x = a[0].node();
                let p = a[1].float();
                if !self.training || p == 0.0 {
                    return one(x);
                }
                let step = self.step_input();
                self.dropout_sites += 1;
                let dims = self.g.dims(x).to_vec();
                let mask = self.g.dropout_mask(step, p, self.dropout_sites, &dims);
                one(self.g.mul(x, mask))
            }
            Prim::Linear => {
                let (x, w) = (a[0].node(), a[1].node());
                let wt = g.transpose_last(w);
                let y = self.matmul(x, wt);
                match a[2].opt_node() {
                    Some(b) => one(self.g.add(y, b)),
                    None => one(y),
                }
            }
            Prim::Conv1d | Prim::Conv2d => {
                let n = out[0].rank() - 2;
                let per_axis = |arg: &LArg| match arg {
                    LArg::Int(v) => vec![*v; n],
                    LArg::Ints(vs) if vs.len() == 1 => vec![vs[0]; n],
                    LArg::Ints(vs) => vs.clone(),
                    other => unreachable!("bug: convolution setting {other:?}"),
                };
                let at = super::conv::Geometry {
                    stride: per_axis(&a[3]),
                    padding: per_axis(&a[4]),
                    dilation: per_axis(&a[5]),
                    groups: a[6].int(),
                };
                one(super::conv::conv(g, a[0].node(), a[1].node(), a[2].opt_node(), &at, &out[0].dims))
            }
            Prim::Attend => one(self.attend(a)),
            Prim::Rope => {
                let x = a[0].node();
                let theta = a[1].float();
                let d = g.dims(x)[3].as_const().expect("bug: rope head size is known");
                let rot = match a[2] {
                    LArg::Int(r) => r,
                    _ => d,
                };
                one(self.rope(x, theta, rot as usize))
            }
            Prim::Topk => {
                let (v, i) = g.topk(a[0].node(), a[1].int() as usize);
                vec![v, i]
            }
            Prim::CrossEntropy => one(self.cross_entropy(a[0].node(), a[1].node(), a[2].int())),
            Prim::Mse => {
                let d = g.sub(a[0].node(), a[1].node());
                let sq = g.mul(d, d);
                let axes: Vec<usize> = (0..g.ty(sq).rank()).collect();
                one(self.mean(sq, &axes, false))
            }
            Prim::AddLoss => {
                self.aux_losses.push((a[1].node(), a[2].float()));
                one(a[0].node())
            }
            Prim::Route => unreachable!("bug: `route` is lowered by the checker's call walk"),
        }
    }

    /// A tensor argument, or a number made a scalar of `dtype`.
    pub fn operand(&mut self, a: &LArg, dtype: DType) -> NodeId {
        match a {
            LArg::Node(n) => *n,
            LArg::Int(v) => self.scalar(*v as f64, dtype),
            LArg::Float(v) => self.scalar(*v, dtype),
            LArg::Bool(b) => self.scalar(f64::from(u8::from(*b)), DType::Bool),
            LArg::Size(d) => {
                let s = self.g.size(d.clone());
                self.g.cast(s, dtype)
            }
            other => unreachable!("bug: operand {other:?}"),
        }
    }

    pub fn reduce(&mut self, r: Reduce, x: NodeId, axes: &[usize], keep: bool) -> NodeId {
        if keep { self.g.reduce_keep(r, x, axes) } else { self.g.reduce(r, x, axes) }
    }

    pub fn mean(&mut self, x: NodeId, axes: &[usize], keep: bool) -> NodeId {
        let count = axes.iter().fold(Dim::constant(1), |acc, a| acc.mul(&self.g.dims(x)[*a]));
        let s = self.reduce(Reduce::Sum, x, axes, keep);
        let n = self.g.size(count);
        self.g.div(s, n)
    }

    pub fn softmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        self.g.softmax(x, axis)
    }

    pub fn log_softmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        let m = self.g.stable_shift(x, axis);
        let shifted = self.g.sub(x, m);
        let e = self.g.unary(Unary::Exp, shifted);
        let s = self.g.reduce_keep(Reduce::Sum, e, &[axis]);
        let l = self.g.unary(Unary::Log, s);
        self.g.sub(shifted, l)
    }

    /// Running sums along `axis`: a product with the `[n, n]` triangle of
    /// ones (column i sums entries 0..=i), so its gradient (the running
    /// sums from the end) and every backend are the product's. n
    /// multiply-adds an element rather than one: sized for positions and
    /// masks (`cumsum(attention_mask) - 1`), not for long scans.
    pub fn cumsum(&mut self, x: NodeId, axis: usize) -> NodeId {
        let ty = self.g.ty(x).clone();
        let (rank, n) = (ty.rank(), ty.dims[axis].clone());
        let mut perm: Vec<usize> = (0..rank).filter(|&i| i != axis).collect();
        perm.push(axis);
        let last = if axis + 1 == rank { x } else { self.g.permute(x, &perm) };
        let values = if ty.dtype == DType::F32 { last } else { self.g.cast(last, DType::F32) };
        let i = self.g.iota(n.clone());
        let (one, n) = (Dim::constant(1), n.clone());
        let (rows, columns) = (self.g.reshape(i, &[n.clone(), one.clone()]), self.g.reshape(i, &[one, n]));
        let below = self.g.binary(Binary::Le, rows, columns);
        let triangle = self.g.cast(below, DType::F32);
        let sums = self.matmul(values, triangle);
        let sums = if ty.dtype == DType::F32 { sums } else { self.g.cast(sums, DType::Int) };
        if axis + 1 == rank {
            return sums;
        }
        let mut back = vec![0; rank];
        perm.iter().enumerate().for_each(|(at, &from)| back[from] = at);
        self.g.permute(sums, &back)
    }

    /// NumPy matmul on the IR's batched matmul: broadcast batch axes and
    /// treat 1-D operands as vectors.
    pub fn matmul(&mut self, x: NodeId, y: NodeId) -> NodeId {
        let (xd, yd) = (self.g.dims(x).to_vec(), self.g.dims(y).to_vec());
        let one = Dim::constant(1);
        let (xv, yv) = (xd.len() == 1, yd.len() == 1);
        let x2 = if xv { self.g.reshape(x, &[one.clone(), xd[0].clone()]) } else { x };
        let y2 = if yv { self.g.reshape(y, &[yd[0].clone(), one.clone()]) } else { y };
        let (xd, yd) = (self.g.dims(x2).to_vec(), self.g.dims(y2).to_vec());
        let batch = crate::types::broadcast(&xd[..xd.len() - 2], &yd[..yd.len() - 2]).expect("bug: matmul batch");
        let out = if yd.len() == 2 && !batch.is_empty() {
            // [..., n, k] @ [k, m]: fold the batch into rows, one big product.
            let rows = batch.iter().fold(xd[xd.len() - 2].clone(), |acc, d| acc.mul(d));
            let flat = self.g.broadcast(x2, &[batch.clone(), xd[xd.len() - 2..].to_vec()].concat());
            let flat = self.g.reshape(flat, &[rows, xd[xd.len() - 1].clone()]);
            let p = self.g.matmul(flat, y2);
            let mut dims = batch.clone();
            dims.push(xd[xd.len() - 2].clone());
            dims.push(yd[1].clone());
            self.g.reshape(p, &dims)
        } else {
            let xb = self.g.broadcast(x2, &[batch.clone(), xd[xd.len() - 2..].to_vec()].concat());
            let yb = self.g.broadcast(y2, &[batch.clone(), yd[yd.len() - 2..].to_vec()].concat());
            self.g.matmul(xb, yb)
        };
        let mut dims = self.g.dims(out).to_vec();
        if yv {
            dims.pop();
        }
        if xv {
            dims.remove(dims.len() - if yv { 1 } else { 2 });
        }
        self.g.reshape(out, &dims)
    }

    /// Scaled dot-product attention as one `Op::Attention`.
    fn attend(&mut self, a: &[LArg]) -> NodeId {
        let (q, k, v) = (a[0].node(), a[1].node(), a[2].node());
        let (qd, kd) = (self.g.dims(q).to_vec(), self.g.dims(k).to_vec());
        let (t, d) = (qd[1].clone(), qd[3].clone());
        let mut s = kd[1].clone();
        let causal = a[3].bool();
        let window = if let LArg::Int(w) = a[4] { Some(w) } else { None };
        // Causal self-attention reads and extends the key/value cache.
        let (mut k, mut v, mut cached, mut ring) = (k, v, false, None);
        if causal && s == t && self.cache.is_some() {
            let c = self.cache.as_mut().expect("checked");
            let (i, len) = (c.layers, c.len);
            c.layers += 1;
            // A sliding window needs only its last positions: a ring of them.
            ring = window.map(|w| ring_len(w.max(1) as usize)).filter(|r| *r < len);
            s = Dim::constant(ring.unwrap_or(len) as i64);
            // The cache is kept heads first, [B, G, len, D]: the products read
            // it as it is (keys transposed by a flag), with no copy of the
            // whole cache per token to put the heads first.
            for (x, kind) in [(&mut k, "key"), (&mut v, "value")] {
                let rows = self.g.permute(*x, &[0, 2, 1, 3]); // [B, G, T, D]: the new tokens only
                let mut dims = self.g.dims(rows).to_vec();
                dims[2] = s.clone();
                let past = self.g.input(&Role::CacheIn { layer: i, kind }.name(), TensorTy::new(DType::F32, dims));
                *x = self.cache_write(past, rows);
                self.g.outputs.push((Role::CacheOut { layer: i, kind }.name(), *x));
            }
            cached = true;
        }
        let scale = match a[6] {
            LArg::Float(f) => f,
            _ => 1.0 / (d.as_const().expect("bug: head size is known") as f64).sqrt(),
        };
        let cap = if let LArg::Float(cap) = a[7] { Some(cap) } else { None };
        if let (Some(slots), Some(w)) = (ring, window) {
            // Which slot holds which position is in the mask, not in the order.
            let mut args = vec![q, k, v, self.position_input()];
            args.push(self.ring_mask(&qd[0], &t, slots, w));
            let plain = Attention { scale, causal: false, window: None, kv_heads_first: true };
            return match cap {
                Some(_) => super::attention::decompose_capped(&mut self.g, &plain, &args, cap),
                None => self.g.attention(plain, &args),
            };
        }
        // Query i sits at position i + (S - T) of the keys (a KV cache holds S - T earlier keys).
        // Without a causal mask or a window no position is compared: cross
        // attention from more queries than keys (T > S) is fine.
        let offset = if cached {
            self.position_input()
        } else if !causal && window.is_none() {
            self.g.constant(0.0, DType::Int)
        } else {
            let o = self.g.size(s.sub(&t));
            self.g.cast(o, DType::Int)
        };
        let mut args = vec![q, k, v, offset];
        // A padding mask covers the new tokens only; decoding with a cache has none.
        if let Some(mask) = a[5].opt_node().filter(|_| !cached) {
            let md = self.g.dims(mask).to_vec();
            args.push(match md.len() {
                2 => self.g.reshape(mask, &[md[0].clone(), Dim::constant(1), md[1].clone()]),
                _ => mask,
            });
        }
        let attention = Attention { scale, causal, window, kv_heads_first: cached };
        // Soft-capped scores (Gemma 2) are computed as they are defined; the
        // fused operation's kernels have no cap.
        if cap.is_some() {
            return super::attention::decompose_capped(&mut self.g, &attention, &args, cap);
        }
        // One operation, which backends run without storing the scores; its
        // gradient is passes that recompute them (`ir::attention`).
        self.g.attention(attention, &args)
    }

    /// Which ring slots each of the `t` new tokens sees, `[B, T, slots]`: the
    /// tokens were written at `position ..` modulo `slots`, so slot s holds
    /// the latest position p <= last with p = s (mod slots), last =
    /// position + T - 1; query q sees it when 0 <= p, p <= q and p > q - window.
    fn ring_mask(&mut self, b: &Dim, t: &Dim, slots: usize, window: i64) -> NodeId {
        let int = |g: &mut Graph, v: i64| g.constant(v as f64, DType::Int);
        let position = self.position_input();
        let count = self.g.size(t.clone());
        let count = self.g.cast(count, DType::Int);
        let one = int(&mut self.g, 1);
        let last = self.g.add(position, count);
        let last = self.g.sub(last, one);
        let slot = self.g.iota(Dim::constant(slots as i64));
        let back = self.g.sub(last, slot);
        let modulus = int(&mut self.g, slots as i64);
        let back = self.g.binary(crate::scalar::Binary::Rem, back, modulus);
        let held = self.g.sub(last, back); // [slots]
        let held = self.g.reshape(held, &[Dim::constant(1), Dim::constant(slots as i64)]);
        let query = self.g.iota(t.clone());
        let query = self.g.add(query, position);
        let query = self.g.reshape(query, &[t.clone(), Dim::constant(1)]);
        let zero = int(&mut self.g, 0);
        let written = self.g.binary(crate::scalar::Binary::Ge, held, zero);
        let past = self.g.binary(crate::scalar::Binary::Le, held, query);
        let w = int(&mut self.g, window);
        let oldest = self.g.sub(query, w);
        let recent = self.g.binary(crate::scalar::Binary::Gt, held, oldest);
        let seen = self.g.binary(crate::scalar::Binary::And, past, recent);
        let seen = self.g.binary(crate::scalar::Binary::And, seen, written);
        let seen = self.g.cast(seen, DType::F32);
        let seen = self.g.reshape(seen, &[Dim::constant(1), t.clone(), Dim::constant(slots as i64)]);
        self.g.broadcast(seen, &[b.clone(), t.clone(), Dim::constant(slots as i64)])
    }

    /// Rotary embedding on [B, T, H, D], rotating halves of the first `rot` features.
    fn rope(&mut self, x: NodeId, theta: f64, rot: usize) -> NodeId {
        let dims = self.g.dims(x).to_vec();
        let (t, d) = (dims[1].clone(), dims[3].as_const().expect("bug: head size is known") as usize);
        let half = rot / 2;
        // inverse frequencies theta^(-2i/rot), i < half
        let i = self.g.iota(Dim::constant(half as i64));
        let i = self.g.cast(i, DType::F32);
        let inv = self.g.scale(i, -2.0 * theta.ln() / rot as f64);
        let inv = self.g.unary(Unary::Exp, inv);
        let pos = match self.cache {
            Some(_) => {
                let i = self.g.iota(t.clone());
                let p = self.position_input();
                self.g.add(i, p)
            }
            None => self.g.iota(t.clone()),
        };
        let pos = self.g.cast(pos, DType::F32);
        let pos = self.g.reshape(pos, &[t.clone(), Dim::constant(1)]);
        let angle = self.g.mul(pos, inv); // [T, half]
        let angle = self.g.concat(&[angle, angle], 1); // [T, rot]
        let shape4 = [Dim::constant(1), t.clone(), Dim::constant(1), Dim::constant(rot as i64)];
        let cos = self.g.unary(Unary::Cos, angle);
        let cos = self.g.reshape(cos, &shape4);
        let sin = self.g.unary(Unary::Sin, angle);
        let sin = self.g.reshape(sin, &shape4);
        let xr = self.g.slice(x, 3, Dim::constant(0), Dim::constant(rot as i64));
        let x1 = self.g.slice(x, 3, Dim::constant(0), Dim::constant(half as i64));
        let x2 = self.g.slice(x, 3, Dim::constant(half as i64), Dim::constant(rot as i64));
        let nx2 = self.g.neg(x2);
        let rotated = self.g.concat(&[nx2, x1], 3);
        let a = self.g.mul(xr, cos);
        let b = self.g.mul(rotated, sin);
        let y = self.g.add(a, b);
        if rot == d {
            y
        } else {
            let rest = self.g.slice(x, 3, Dim::constant(rot as i64), Dim::constant(d as i64));
            self.g.concat(&[y, rest], 3)
        }
    }

    /// Logits sliced along an axis before the classes (`logits[:, :-1]`
    /// against `input_ids[:, 1:]`) as the whole logits against targets
    /// padded with `ignore`: the same loss, whose gradient then has the
    /// logits' own shape instead of being the sliced gradient concatenated
    /// with rows of zeros, so that it can be written over the logits.
    fn unsliced(&mut self, logits: NodeId, targets: NodeId, ignore: i64) -> (NodeId, NodeId) {
        let node = self.g.node(logits);
        let Op::Slice { axis, ref start, ref end } = node.op else { return (logits, targets) };
        let (source, start, end) = (node.args[0], start.clone(), end.clone());
        if axis + 1 >= self.g.ty(logits).rank() {
            return (logits, targets);
        }
        let fill = |g: &mut Graph, len: Dim| {
            let mut dims = g.dims(targets).to_vec();
            dims[axis] = len;
            let c = g.constant(ignore as f64, DType::Int);
            g.broadcast(c, &dims)
        };
        let mut parts = Vec::new();
        if start.as_const() != Some(0) {
            parts.push(fill(&mut self.g, start));
        }
        parts.push(targets);
        let after = self.g.dims(source)[axis].sub(&end);
        if after.as_const() != Some(0) {
            parts.push(fill(&mut self.g, after));
        }
        (source, self.g.concat(&parts, axis))
    }

    /// Mean negative log-likelihood over targets that are not `ignore`, as
    /// logsumexp(logits) - logits[target]. The backward pass then needs only
    /// exp(logits - max) and its sum (the softmax), not a stored log-softmax
    /// as well: one tensor of the logits' size less to write and read.
    fn cross_entropy(&mut self, logits: NodeId, targets: NodeId, ignore: i64) -> NodeId {
        let (logits, targets) = self.unsliced(logits, targets, ignore);
        let rank = self.g.ty(logits).rank();
        let classes = self.g.dims(logits)[rank - 1].clone();
        let m = self.g.stable_shift(logits, rank - 1);
        let shifted = self.g.sub(logits, m);
        let e = self.g.unary(Unary::Exp, shifted);
        let s = self.g.reduce_keep(Reduce::Sum, e, &[rank - 1]);
        let l = self.g.unary(Unary::Log, s);
        let lse = self.g.add(l, m);
        let per_target = self.g.dims(targets).to_vec();
        let lse = self.g.reshape(lse, &per_target);
        // One-hot as a comparison with the class index, so that it fuses into
        // the kernels that use it instead of filling a [..., classes] tensor.
        let mut dims = self.g.dims(targets).to_vec();
        dims.push(Dim::constant(1));
        let t = self.g.reshape(targets, &dims);
        let class = self.g.iota(classes.clone());
        dims.pop();
        dims.push(classes);
        let t = self.g.broadcast(t, &dims);
        let class = self.g.broadcast(class, &dims);
        let hot = self.g.binary(Binary::Eq, t, class);
        let hot = self.g.cast(hot, DType::F32);
        let picked = self.g.mul(logits, hot);
        let picked = self.g.reduce(Reduce::Sum, picked, &[rank - 1]);
        let nll = self.g.sub(lse, picked);
        let ig = self.g.constant(ignore as f64, DType::Int);
        let valid = self.g.binary(Binary::Ne, targets, ig);
        let valid = self.g.cast(valid, DType::F32);
        let total = self.g.mul(nll, valid);
        let total = self.g.sum_all(total);
        let count = self.g.sum_all(valid);
        let one = self.g.constant(1.0, DType::F32);
        let count = self.g.binary(Binary::Max, count, one);
        self.g.div(total, count)
    }
}
