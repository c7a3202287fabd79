//! The tensor IR: a graph of primitive operations in an arena, each node
//! created after its inputs, each with its result type (element type and
//! symbolic shape). Every backend consumes this one IR.
//!
//! The builder methods compute result types and check the invariants of
//! each op, so a malformed graph is a bug caught where it is made.

use crate::types::DType;
use crate::types::Dim;
use crate::types::TensorTy;
use std::fmt;

/// Index of a node in [`Graph::nodes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

pub use crate::scalar::{Binary, Unary};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduce {
    Sum,
    Max,
    Min,
}

/// The closed set of primitive operations. Composite operations (softmax,
/// attention, norms, routing) are decomposed into these when lowering.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A named model input (`input_ids`).
    Input(String),
    /// A named weight (`model.layers.0.mlp.up_proj.weight`).
    Param(String),
    /// A scalar constant; broadcast it for a tensor.
    Const(f64),
    /// A scalar equal to a (possibly symbolic) size, known when running.
    Size(Dim),
    /// `[n]` int: 0, 1, ..., n-1.
    Iota,
    Unary(Unary),
    /// Elementwise on equal shapes.
    Binary(Binary),
    /// `where(cond, a, b)` on equal shapes.
    Select,
    /// Conversion; casts have no gradient, so a cast of f32 to f32 is the
    /// IR's stop-gradient (`Graph::detach`).
    Cast(DType),
    /// Reduces the listed axes away.
    Reduce(Reduce, Vec<usize>),
    /// Index of the largest element along an axis, which is removed.
    ArgMax(usize),
    /// `[..., n, k] x [..., k, m] -> [..., n, m]` with equal batch axes;
    /// `ta` / `tb` read an operand with its last two axes swapped.
    MatMul {
        ta: bool,
        tb: bool,
    },
    /// Same elements, the node's shape.
    Reshape,
    Permute(Vec<usize>),
    /// Right-aligned expansion of size-1 or missing axes to the node's shape.
    Broadcast,
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
    },
    Concat(usize),
    /// `table [V, ...rest]`, `ids [...] int` -> `[...ids, ...rest]`.
    Gather,
    /// `ids [...] int`, `updates [...ids, ...rest]` -> the node's shape `[V, ...rest]`:
    /// each row of `updates` added into row `ids[k]` of zeros, or of `base`
    /// (a third argument of that shape; `backend/scatter_into.rs`).
    ScatterAdd,
    /// `ids [...] int` -> `[..., n]` f32 with n the node's last axis.
    OneHot,
    TopKValues(usize),
    TopKIndices(usize),
    /// `base [..., L, D]` with rows `rows [..., T, D]` written at positions
    /// `(start + i) mod L` of its second-to-last axis (`start` a scalar int;
    /// a later row wins a slot): a key/value cache taking the new tokens'
    /// rows, or a ring of the last L of them. A backend may write them
    /// into `base`'s own memory.
    WriteRows,
    /// A mask of the node's shape: 0 with probability p, else 1/(1-p).
    /// Its one input is the step (a scalar), so masks differ between steps.
    DropoutMask {
        p: f64,
        key: u64,
    },
    /// Scaled dot-product attention in one operation, so that a backend can
    /// run it without storing the [B, H, T, S] scores (online softmax).
    /// Inputs: queries `[B, T, H, D]`, keys `[B, S, G, D]` and values
    /// `[B, S, G, E]` (`[B, G, S, _]` with `kv_heads_first`: a KV cache),
    /// the offset of the first query among the keys (a scalar int: query
    /// `i` sits at key position `i + offset`), and optionally a padding mask
    /// `[B, 1 or T, S]` (a key is seen where it is non-zero). Each key/value
    /// head serves H/G query heads. Result `[B, T, H, E]`. Its meaning is
    /// `ir::attention::decompose`: masked scores are -1e30, so a row with
    /// every key masked averages all S values, as the decomposed softmax does.
    Attention(Attention),
    /// A pass of the attention's backward that never stores the scores
    /// either (see [`AttentionPass`]); its meaning is given with the
    /// gradient in `ir::attention`.
    AttentionBackward(Attention, AttentionPass),
    /// Sparse routing to E experts. `choices [N, k] int` (each row's experts)
    /// -> `[N * k]` int: the slots `i * k + j` ordered by expert, then by slot
    /// (a stable counting sort), so each expert's rows are contiguous.
    ExpertOrder(usize),
    /// `choices [N, k] int` -> `[E + 1]` int: where each expert's rows start
    /// in [`Op::ExpertOrder`]'s order (the last entry is N * k).
    ExpertOffsets(usize),
    /// `x [R, k]`, `offsets [E + 1] int`, then E weights `[k, n]` (`[n, k]`
    /// with `tb`) -> `[R, n]`: rows `offsets[e] .. offsets[e + 1]` of x times
    /// weight e. One product per expert over only its rows (grouped GEMM).
    ExpertMatMul {
        tb: bool,
    },
    /// The gradients of the weights of an [`Op::ExpertMatMul`]: `x [R, k]`,
    /// the output's adjoint `dy [R, n]`, `offsets [E + 1]` -> `[E, k, n]`:
    /// for each expert e, `x_eᵀ dy_e` over its rows only (`dy_eᵀ x_e`,
    /// `[E, n, k]`, with `tb`).
    ExpertWeightGrad {
        tb: bool,
    },
}

/// The passes of the fused attention's backward. `Lse` takes the forward's
/// inputs and gives each row's log-sum-exp of its scores `[B, T, H]`
/// (-1e30 for a row whose every key is masked). `Gradients` takes the
/// output's adjoint `[B, T, H, E]`, the log-sum-exp, the row sums of
/// adjoint times output `[B, T, H]`, then the forward's inputs, and gives
/// the queries' gradient (`[B, T, H, D]`) then the keys' and values' side by
/// side in the keys' layout (`[B, S, G, D + E]` or `[B, G, S, D + E]`), both
/// flattened into one vector. `ValuesAndLse` takes the forward's inputs and
/// gives the forward's output and `Lse`'s, flattened into one vector: the
/// two from one walk over the scores (`backend/attention_lse.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPass {
    Lse,
    Gradients,
    ValuesAndLse,
}

impl AttentionPass {
    /// Where the forward's inputs start among the pass's arguments.
    pub fn forward_inputs(self) -> usize {
        if self == AttentionPass::Gradients { 3 } else { 0 }
    }
}

impl Op {
    /// Where an attention's (or a pass of its backward's) forward inputs
    /// start among its arguments; `None` for other operations.
    pub fn attention_inputs(&self) -> Option<usize> {
        match self {
            Op::Attention(_) => Some(0),
            Op::AttentionBackward(_, pass) => Some(pass.forward_inputs()),
            _ => None,
        }
    }
}

/// The attributes of [`Op::Attention`].
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    /// Multiplies the query-key dot products.
    pub scale: f64,
    /// Query at position p sees keys at positions <= p.
    pub causal: bool,
    /// Query at position p sees keys at positions > p - window.
    pub window: Option<i64>,
    /// Keys and values are `[B, G, S, _]` rather than `[B, S, G, _]`.
    pub kv_heads_first: bool,
}

impl Attention {
    /// ` scale S [causal] [window W] [kv_heads_first]`, as the IR prints it.
    pub fn attributes(&self) -> String {
        let mut s = format!(" scale {}", crate::syntax::float_text(self.scale));
        if self.causal {
            s += " causal";
        }
        if let Some(w) = self.window {
            s += &format!(" window {w}");
        }
        if self.kv_heads_first {
            s += " kv_heads_first";
        }
        s
    }

    /// Whether a key position is seen by a query position (before any padding mask).
    pub fn sees(&self, query: i64, key: i64) -> bool {
        (!self.causal || key <= query) && self.window.is_none_or(|w| key > query - w)
    }
}

impl Op {
    pub fn name(&self) -> String {
        match self {
            Op::Input(n) => format!("input \"{n}\""),
            Op::Param(n) => format!("param \"{n}\""),
            Op::Const(v) => format!("const {}", crate::syntax::float_text(*v)),
            Op::Size(d) => format!("size {d}"),
            Op::Iota => "iota".into(),
            Op::Unary(u) => u.name().into(),
            Op::Binary(b) => b.name().into(),
            Op::Select => "select".into(),
            Op::Cast(d) => format!("cast {}", d.as_str()),
            Op::Reduce(r, axes) => format!("reduce_{} {axes:?}", format!("{r:?}").to_lowercase()),
            Op::ArgMax(a) => format!("argmax {a}"),
            Op::MatMul { ta, tb } => {
                format!("matmul{}{}", if *ta { " ta" } else { "" }, if *tb { " tb" } else { "" })
            }
            Op::Reshape => "reshape".into(),
            Op::Permute(p) => format!("permute {p:?}"),
            Op::Broadcast => "broadcast".into(),
            Op::Slice { axis, start, end } => format!("slice {axis} {start}:{end}"),
            Op::Concat(a) => format!("concat {a}"),
            Op::Gather => "gather".into(),
            Op::ScatterAdd => "scatter_add".into(),
            Op::OneHot => "one_hot".into(),
            Op::TopKValues(k) => format!("topk_values {k}"),
            Op::TopKIndices(k) => format!("topk_indices {k}"),
            Op::WriteRows => "write_rows".into(),
            Op::DropoutMask { p, key } => format!("dropout_mask {} #{key}", crate::syntax::float_text(*p)),
            Op::Attention(a) => format!("attention{}", a.attributes()),
            Op::AttentionBackward(a, pass) => {
                let kind = match pass {
                    AttentionPass::Lse => "lse",
                    AttentionPass::Gradients => "grad",
                    AttentionPass::ValuesAndLse => "values_lse",
                };
                format!("attention_{kind}{}", a.attributes())
            }
            Op::ExpertOrder(e) => format!("expert_order {e}"),
            Op::ExpertOffsets(e) => format!("expert_offsets {e}"),
            Op::ExpertMatMul { tb } => format!("expert_matmul{}", if *tb { " tb" } else { "" }),
            Op::ExpertWeightGrad { tb } => format!("expert_weight_grad{}", if *tb { " tb" } else { "" }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub args: Vec<NodeId>,
    pub ty: TensorTy,
    /// The spec expression (and layer instance) the node was lowered from;
    /// gradients and rewrites inherit it. `None` for what no expression
    /// wrote (the optimiser's update, hand-written IR).
    pub origin: Option<Origin>,
}

/// Where a node came from: the innermost `forward` expression being
/// lowered, and the layer instance (`Checked::instances`) whose forward it
/// is. Profiles add kernel times up by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub span: crate::source::Span,
    pub instance: u32,
}

/// A program: nodes in creation (hence topological) order and named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, NodeId)>,
    /// The origin `push` gives new nodes: set by lowering as it walks the
    /// spec, and by passes as they copy or differentiate a node.
    pub at: Option<Origin>,
}

/// The result shape of a (transposed) matmul, or `None` if they do not fit.
pub fn matmul_dims(a: &TensorTy, b: &TensorTy, ta: bool, tb: bool) -> Option<Vec<Dim>> {
    let r = a.rank();
    if r < 2 || b.rank() != r || a.dims[..r - 2] != b.dims[..r - 2] {
        return None;
    }
    let (n, k) = if ta { (&a.dims[r - 1], &a.dims[r - 2]) } else { (&a.dims[r - 2], &a.dims[r - 1]) };
    let (k2, m) = if tb { (&b.dims[r - 1], &b.dims[r - 2]) } else { (&b.dims[r - 2], &b.dims[r - 1]) };
    if k != k2 {
        return None;
    }
    let mut dims = a.dims[..r - 2].to_vec();
    dims.push(n.clone());
    dims.push(m.clone());
    Some(dims)
}

/// The result shape of an expert's product `x [R, k]` by a weight `[k, n]`
/// (`[n, k]` with `tb`), or `None` if they do not fit.
pub fn expert_matmul_dims(x: &TensorTy, w: &TensorTy, tb: bool) -> Option<Vec<Dim>> {
    if x.rank() != 2 || w.rank() != 2 {
        return None;
    }
    let (k, n) = if tb { (&w.dims[1], &w.dims[0]) } else { (&w.dims[0], &w.dims[1]) };
    (x.dims[1] == *k).then(|| vec![x.dims[0].clone(), n.clone()])
}

/// The result shape of an attention over these inputs (see [`Op::Attention`]),
/// or why they do not fit.
pub fn attention_dims(a: &Attention, args: &[&TensorTy]) -> Result<Vec<Dim>, String> {
    let [q, k, v, offset, rest @ ..] = args else { return Err("takes queries, keys, values and an offset".into()) };
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(format!("queries {q}, keys {k} and values {v} should have 4 axes"));
    }
    let (s_axis, g_axis) = if a.kv_heads_first { (2, 1) } else { (1, 2) };
    let (b, t, h) = (&q.dims[0], &q.dims[1], &q.dims[2]);
    let fits = k.dims[0] == *b
        && v.dims[0] == *b
        && k.dims[s_axis] == v.dims[s_axis]
        && k.dims[g_axis] == v.dims[g_axis]
        && k.dims[3] == q.dims[3]
        && h.div(&k.dims[g_axis]).is_some();
    if !fits {
        return Err(format!("queries {q}, keys {k} and values {v} do not fit"));
    }
    if offset.rank() != 0 || offset.dtype != DType::Int {
        return Err(format!("the offset {offset} is not an int scalar"));
    }
    match rest {
        [] => {}
        [m] if m.rank() == 3
            && m.dims[0] == *b
            && (m.dims[1] == *t || m.dims[1].as_const() == Some(1))
            && m.dims[2] == k.dims[s_axis] => {}
        [m] => return Err(format!("the mask {m} is not [B, 1 or T, S]")),
        _ => return Err("takes at most one mask".into()),
    }
    Ok(vec![b.clone(), t.clone(), h.clone(), v.dims[3].clone()])
}

/// The result shape of a pass of the attention's backward (see
/// [`AttentionPass`]), or why its inputs do not fit.
pub fn attention_backward_dims(a: &Attention, pass: AttentionPass, args: &[&TensorTy]) -> Result<Vec<Dim>, String> {
    let count = |dims: &[Dim]| dims.iter().fold(Dim::constant(1), |acc, x| acc.mul(x));
    match pass {
        AttentionPass::Lse => {
            let mut dims = attention_dims(a, args)?;
            dims.pop();
            return Ok(dims);
        }
        AttentionPass::ValuesAndLse => {
            let dims = attention_dims(a, args)?;
            return Ok(vec![count(&dims).add(&count(&dims[..3]))]);
        }
        AttentionPass::Gradients => {}
    }
    let [gy, lse, delta, forward @ ..] = args else {
        return Err("takes the adjoint, lse, delta and the forward's inputs".into());
    };
    let y = attention_dims(a, forward)?;
    if gy.dims != y || lse.dims != y[..3] || delta.dims != y[..3] {
        return Err(format!("adjoint {gy}, lse {lse} and delta {delta} do not fit the output {y:?}"));
    }
    let mut kv = forward[1].dims.clone();
    kv[3] = kv[3].add(&forward[2].dims[3]);
    Ok(vec![count(&forward[0].dims).add(&count(&kv))])
}

fn f32s(dims: Vec<Dim>) -> TensorTy {
    TensorTy::new(DType::F32, dims)
}

impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn ty(&self, id: NodeId) -> &TensorTy {
        &self.nodes[id.index()].ty
    }

    pub fn dims(&self, id: NodeId) -> &[Dim] {
        &self.nodes[id.index()].ty.dims
    }

    pub fn push(&mut self, op: Op, args: Vec<NodeId>, ty: TensorTy) -> NodeId {
        for a in &args {
            assert!(a.index() < self.nodes.len(), "bug: node argument {a} does not exist yet");
        }
        self.nodes.push(Node { op, args, ty, origin: self.at });
        NodeId(self.nodes.len() as u32 - 1)
    }

    pub fn inputs(&self) -> impl Iterator<Item = (&str, NodeId)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Input(name) => Some((name.as_str(), NodeId(i as u32))),
            _ => None,
        })
    }

    pub fn params(&self) -> impl Iterator<Item = (&str, NodeId)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Param(name) => Some((name.as_str(), NodeId(i as u32))),
            _ => None,
        })
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, id)| *id)
    }

    // ------------------------------------------------------------ leaves

    pub fn input(&mut self, name: &str, ty: TensorTy) -> NodeId {
        if let Some((_, id)) = self.inputs().find(|(n, _)| *n == name) {
            return id;
        }
        self.push(Op::Input(name.into()), vec![], ty)
    }

    pub fn param(&mut self, name: &str, ty: TensorTy) -> NodeId {
        if let Some((_, id)) = self.params().find(|(n, _)| *n == name) {
            return id;
        }
        self.push(Op::Param(name.into()), vec![], ty)
    }

    pub fn constant(&mut self, v: f64, dtype: DType) -> NodeId {
        self.push(Op::Const(v), vec![], TensorTy::scalar(dtype))
    }

    /// A constant filling `dims`.
    pub fn full(&mut self, v: f64, dtype: DType, dims: &[Dim]) -> NodeId {
        let c = self.constant(v, dtype);
        self.broadcast(c, dims)
    }

    pub fn size(&mut self, d: Dim) -> NodeId {
        match d.as_const() {
            Some(v) => self.constant(v as f64, DType::F32),
            None => self.push(Op::Size(d), vec![], TensorTy::scalar(DType::F32)),
        }
    }

    pub fn iota(&mut self, n: Dim) -> NodeId {
        self.push(Op::Iota, vec![], TensorTy::new(DType::Int, vec![n]))
    }

    // ------------------------------------------------------------ elementwise

    pub fn unary(&mut self, u: Unary, x: NodeId) -> NodeId {
        let ty = self.ty(x).clone();
        self.push(Op::Unary(u), vec![x], ty)
    }

    /// Elementwise binary op; operands are broadcast to a common shape.
    pub fn binary(&mut self, b: Binary, x: NodeId, y: NodeId) -> NodeId {
        let dims = crate::types::broadcast(self.dims(x), self.dims(y))
            .unwrap_or_else(|_| panic!("bug: {b:?} of {} and {}", self.ty(x), self.ty(y)));
        let (x, y) = (self.broadcast(x, &dims), self.broadcast(y, &dims));
        let dtype = if b.is_comparison() { DType::Bool } else { self.ty(x).dtype };
        self.push(Op::Binary(b), vec![x, y], TensorTy::new(dtype, dims))
    }

    pub fn add(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.binary(Binary::Add, x, y)
    }
    pub fn sub(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.binary(Binary::Sub, x, y)
    }
    pub fn mul(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.binary(Binary::Mul, x, y)
    }
    pub fn div(&mut self, x: NodeId, y: NodeId) -> NodeId {
        self.binary(Binary::Div, x, y)
    }
    pub fn neg(&mut self, x: NodeId) -> NodeId {
        self.unary(Unary::Neg, x)
    }
    /// `x * c` for a constant c.
    pub fn scale(&mut self, x: NodeId, c: f64) -> NodeId {
        let k = self.constant(c, self.ty(x).dtype);
        self.mul(x, k)
    }

    pub fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> NodeId {
        let ab = crate::types::broadcast(self.dims(a), self.dims(b)).expect("bug: select operands");
        let dims = crate::types::broadcast(self.dims(cond), &ab).expect("bug: select condition");
        let (c, a, b) = (self.broadcast(cond, &dims), self.broadcast(a, &dims), self.broadcast(b, &dims));
        let dtype = self.ty(a).dtype;
        self.push(Op::Select, vec![c, a, b], TensorTy::new(dtype, dims))
    }

    /// `x` as a value the autodiff treats as a constant: an f32-to-f32 cast
    /// (casts have no gradient), which kernels read as `x` itself.
    pub fn detach(&mut self, x: NodeId) -> NodeId {
        let ty = self.ty(x).clone();
        self.push(Op::Cast(DType::F32), vec![x], ty)
    }

    pub fn cast(&mut self, x: NodeId, dtype: DType) -> NodeId {
        if self.ty(x).dtype == dtype {
            return x;
        }
        let ty = self.ty(x).with_dtype(dtype);
        self.push(Op::Cast(dtype), vec![x], ty)
    }

    // ------------------------------------------------------------ reductions

    pub fn reduce(&mut self, r: Reduce, x: NodeId, axes: &[usize]) -> NodeId {
        if axes.is_empty() {
            return x;
        }
        let mut axes = axes.to_vec();
        axes.sort();
        axes.dedup();
        let t = self.ty(x).clone();
        let dims = t.dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect();
        self.push(Op::Reduce(r, axes), vec![x], TensorTy::new(t.dtype, dims))
    }

    /// Reduction that keeps the axes as size 1.
    pub fn reduce_keep(&mut self, r: Reduce, x: NodeId, axes: &[usize]) -> NodeId {
        let mut dims = self.dims(x).to_vec();
        for a in axes {
            dims[*a] = Dim::constant(1);
        }
        let y = self.reduce(r, x, axes);
        self.reshape(y, &dims)
    }

    /// The row maximum subtracted for stability. Softmax does not depend on
    /// it, so its gradient is exactly zero: detached, the backward pass has no
    /// max-mask kernels to compute a sum that rounds to about zero.
    pub fn stable_shift(&mut self, x: NodeId, axis: usize) -> NodeId {
        let fixed = self.detach(x);
        self.reduce_keep(Reduce::Max, fixed, &[axis])
    }

    pub fn softmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        let m = self.stable_shift(x, axis);
        let shifted = self.sub(x, m);
        let e = self.unary(Unary::Exp, shifted);
        let s = self.reduce_keep(Reduce::Sum, e, &[axis]);
        self.div(e, s)
    }

    pub fn sum_all(&mut self, x: NodeId) -> NodeId {
        let axes: Vec<usize> = (0..self.ty(x).rank()).collect();
        self.reduce(Reduce::Sum, x, &axes)
    }

    pub fn argmax(&mut self, x: NodeId, axis: usize) -> NodeId {
        let mut dims = self.dims(x).to_vec();
        dims.remove(axis);
        self.push(Op::ArgMax(axis), vec![x], TensorTy::new(DType::Int, dims))
    }

    // ------------------------------------------------------------ layout

    pub fn reshape(&mut self, x: NodeId, dims: &[Dim]) -> NodeId {
        if self.dims(x) == dims {
            return x;
        }
        let dtype = self.ty(x).dtype;
        self.push(Op::Reshape, vec![x], TensorTy::new(dtype, dims.to_vec()))
    }

    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> NodeId {
        if perm.iter().enumerate().all(|(i, p)| i == *p) {
            return x;
        }
        let t = self.ty(x).clone();
        let dims = perm.iter().map(|p| t.dims[*p].clone()).collect();
        self.push(Op::Permute(perm.to_vec()), vec![x], TensorTy::new(t.dtype, dims))
    }

    /// Swaps the last two axes.
    pub fn transpose_last(&mut self, x: NodeId) -> NodeId {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, &perm)
    }

    pub fn broadcast(&mut self, x: NodeId, dims: &[Dim]) -> NodeId {
        if self.dims(x) == dims {
            return x;
        }
        let t = self.ty(x).clone();
        assert!(t.rank() <= dims.len(), "bug: broadcast {t} to fewer axes {dims:?}");
        let off = dims.len() - t.rank();
        for (i, d) in t.dims.iter().enumerate() {
            assert!(*d == dims[off + i] || d.as_const() == Some(1), "bug: broadcast {t} to {dims:?}");
        }
        self.push(Op::Broadcast, vec![x], TensorTy::new(t.dtype, dims.to_vec()))
    }

    pub fn slice(&mut self, x: NodeId, axis: usize, start: Dim, end: Dim) -> NodeId {
        let t = self.ty(x).clone();
        if start.as_const() == Some(0) && end == t.dims[axis] {
            return x;
        }
        let mut dims = t.dims.clone();
        dims[axis] = end.sub(&start);
        self.push(Op::Slice { axis, start, end }, vec![x], TensorTy::new(t.dtype, dims))
    }

    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> NodeId {
        if xs.len() == 1 {
            return xs[0];
        }
        let first = self.ty(xs[0]).clone();
        let mut dims = first.dims.clone();
        dims[axis] = xs.iter().fold(Dim::constant(0), |acc, x| acc.add(&self.dims(*x)[axis]));
        self.push(Op::Concat(axis), xs.to_vec(), TensorTy::new(first.dtype, dims))
    }

    // ------------------------------------------------------------ contractions and indexing

    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.matmul_t(a, b, false, false)
    }

    /// `op(a) x op(b)` where `op` swaps the last two axes when its flag is set.
    pub fn matmul_t(&mut self, a: NodeId, b: NodeId, ta: bool, tb: bool) -> NodeId {
        let dims = matmul_dims(self.ty(a), self.ty(b), ta, tb)
            .unwrap_or_else(|| panic!("bug: matmul of {} and {} (ta {ta}, tb {tb})", self.ty(a), self.ty(b)));
        self.push(Op::MatMul { ta, tb }, vec![a, b], f32s(dims))
    }

    /// `base` with `rows` written from position `start` of its second-to-last axis.
    pub fn write_rows(&mut self, base: NodeId, rows: NodeId, start: NodeId) -> NodeId {
        let ty = self.ty(base).clone();
        self.push(Op::WriteRows, vec![base, rows, start], ty)
    }

    pub fn gather(&mut self, table: NodeId, ids: NodeId) -> NodeId {
        let t = self.ty(table).clone();
        let mut dims = self.dims(ids).to_vec();
        dims.extend(t.dims[1..].iter().cloned());
        self.push(Op::Gather, vec![table, ids], TensorTy::new(t.dtype, dims))
    }

    pub fn scatter_add(&mut self, ids: NodeId, updates: NodeId, table_dims: &[Dim]) -> NodeId {
        self.push(Op::ScatterAdd, vec![ids, updates], f32s(table_dims.to_vec()))
    }

    pub fn one_hot(&mut self, ids: NodeId, n: Dim) -> NodeId {
        let mut dims = self.dims(ids).to_vec();
        dims.push(n);
        self.push(Op::OneHot, vec![ids], f32s(dims))
    }

    pub fn topk(&mut self, x: NodeId, k: usize) -> (NodeId, NodeId) {
        let t = self.ty(x).clone();
        let mut dims = t.dims.clone();
        *dims.last_mut().expect("bug: topk of a scalar") = Dim::constant(k as i64);
        let v = self.push(Op::TopKValues(k), vec![x], TensorTy::new(t.dtype, dims.clone()));
        let i = self.push(Op::TopKIndices(k), vec![x], TensorTy::new(DType::Int, dims));
        (v, i)
    }

    /// The order and offsets of a sparse routing of `choices [N, k]` to
    /// `experts` experts (see [`Op::ExpertOrder`]).
    pub fn expert_order(&mut self, choices: NodeId, experts: usize) -> (NodeId, NodeId) {
        let slots = self.dims(choices).iter().fold(Dim::constant(1), |acc, d| acc.mul(d));
        let order = self.push(Op::ExpertOrder(experts), vec![choices], TensorTy::new(DType::Int, vec![slots]));
        let bounds = Dim::constant(experts as i64 + 1);
        let offsets = self.push(Op::ExpertOffsets(experts), vec![choices], TensorTy::new(DType::Int, vec![bounds]));
        (order, offsets)
    }

    /// Each expert's rows of `x` times its weight (see [`Op::ExpertMatMul`]).
    pub fn expert_matmul(&mut self, x: NodeId, offsets: NodeId, weights: &[NodeId], tb: bool) -> NodeId {
        let w = self.ty(weights[0]).clone();
        let dims = expert_matmul_dims(self.ty(x), &w, tb)
            .unwrap_or_else(|| panic!("bug: expert_matmul of {} and {w} (tb {tb})", self.ty(x)));
        let mut args = vec![x, offsets];
        args.extend_from_slice(weights);
        self.push(Op::ExpertMatMul { tb }, args, f32s(dims))
    }

    pub fn dropout_mask(&mut self, step: NodeId, p: f64, key: u64, dims: &[Dim]) -> NodeId {
        self.push(Op::DropoutMask { p, key }, vec![step], f32s(dims.to_vec()))
    }

    /// Fused attention (see [`Op::Attention`]); `args` are queries, keys,
    /// values, offset and an optional mask.
    pub fn attention(&mut self, a: Attention, args: &[NodeId]) -> NodeId {
        let tys: Vec<&TensorTy> = args.iter().map(|x| self.ty(*x)).collect();
        let dims = attention_dims(&a, &tys).unwrap_or_else(|e| panic!("bug: attention: {e}"));
        self.push(Op::Attention(a), args.to_vec(), f32s(dims))
    }

    /// A pass of the fused attention's backward (see [`AttentionPass`]).
    pub fn attention_backward(&mut self, a: Attention, pass: AttentionPass, args: &[NodeId]) -> NodeId {
        let tys: Vec<&TensorTy> = args.iter().map(|x| self.ty(*x)).collect();
        let dims = attention_backward_dims(&a, pass, &tys).unwrap_or_else(|e| panic!("bug: attention backward: {e}"));
        self.push(Op::AttentionBackward(a, pass), args.to_vec(), f32s(dims))
    }
}
