//! The reference interpreter: evaluates a [`Graph`] with plain, obviously
//! correct loops over row-major arrays. It is the oracle that the optimiser
//! and the backends are tested against. Values are held in f64; in
//! [`Precision::F32`] every result is rounded to f32, as a float32 program would.

use super::graph::*;
use crate::types::DType;
use crate::types::Dim;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// A dense row-major array. Int and bool tensors hold whole numbers and 0/1.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Array {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Array {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "bug: array data does not fill its shape");
        Array { shape, data }
    }

    pub fn scalar(v: f64) -> Array {
        Array { shape: vec![], data: vec![v] }
    }

    pub fn zeros(shape: &[usize]) -> Array {
        Array { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Calls `f(flat_index, multi_index)` for every element of `shape`.
fn for_each_index(shape: &[usize], mut f: impl FnMut(usize, &[usize])) {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    for flat in 0..n {
        f(flat, &idx);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Sizes of the symbolic dimensions, bound from the shapes of inputs and params.
pub use crate::types::{Sizes, bind_sizes, eval_dim, strides};

fn eval_dims(dims: &[Dim], sizes: &Sizes) -> Result<Vec<usize>, String> {
    dims.iter().map(|d| eval_dim(d, sizes)).collect()
}

/// Evaluates every node; returns the named outputs. `feeds` holds inputs and
/// parameters by name; `step` seeds dropout masks.
pub fn run(g: &Graph, feeds: &HashMap<String, Array>, precision: Precision) -> Result<HashMap<String, Array>, String> {
    let values = run_all(g, feeds, precision)?;
    Ok(g.outputs.iter().map(|(name, id)| (name.clone(), values[id.index()].clone())).collect())
}

/// Evaluates every node and returns all values, indexed like `g.nodes`.
pub fn run_all(g: &Graph, feeds: &HashMap<String, Array>, precision: Precision) -> Result<Vec<Array>, String> {
    let mut sizes = Sizes::new();
    for n in &g.nodes {
        if let Op::Input(name) | Op::Param(name) = &n.op {
            let a = feeds.get(name).ok_or_else(|| format!("no value given for `{name}`"))?;
            bind_sizes(name, &n.ty.dims, &a.shape, &mut sizes)?;
        }
    }
    let mut values: Vec<Array> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let args: Vec<&Array> = n.args.iter().map(|a| &values[a.index()]).collect();
        let shape = eval_dims(&n.ty.dims, &sizes)?;
        let mut out = eval(n, &args, shape, feeds, &sizes)?;
        if precision == Precision::F32 && n.ty.dtype == DType::F32 {
            for v in &mut out.data {
                *v = *v as f32 as f64;
            }
        }
        values.push(out);
    }
    Ok(values)
}

/// Evaluates one node from its argument values (its shape already bound).
pub fn eval(
    n: &Node,
    args: &[&Array],
    shape: Vec<usize>,
    feeds: &HashMap<String, Array>,
    sizes: &Sizes,
) -> Result<Array, String> {
    let map = |a: &Array, f: &dyn Fn(f64) -> f64| Array::new(shape.clone(), a.data.iter().map(|x| f(*x)).collect());
    Ok(match &n.op {
        Op::Input(name) | Op::Param(name) => {
            let a = feeds[name].clone();
            if n.ty.dtype != DType::F32 && a.data.iter().any(|v| v.fract() != 0.0) {
                return Err(format!("`{name}` must hold whole numbers"));
            }
            a
        }
        Op::Const(v) => Array::scalar(*v),
        Op::Size(d) => Array::scalar(eval_dim(d, sizes)? as f64),
        Op::Iota => Array::new(shape.clone(), (0..shape[0]).map(|i| i as f64).collect()),
        Op::Unary(u) => map(args[0], &u.function()),
        Op::Binary(b) => {
            let (x, y) = (args[0], args[1]);
            let int = n.ty.dtype == DType::Int;
            Array::new(shape, x.data.iter().zip(&y.data).map(|(a, c)| b.eval(*a, *c, int)).collect())
        }
        Op::Select => {
            let (c, a, b) = (args[0], args[1], args[2]);
            Array::new(shape, (0..c.len()).map(|i| if c.data[i] != 0.0 { a.data[i] } else { b.data[i] }).collect())
        }
        Op::Cast(d) => match d {
            DType::F32 => args[0].clone(),
            DType::Int => map(args[0], &|x| x.trunc()),
            DType::Bool => map(args[0], &|x| f64::from(u8::from(x != 0.0))),
        },
        Op::Reduce(r, axes) => reduce(*r, args[0], axes, shape),
        Op::ArgMax(axis) => argmax(args[0], *axis, shape),
        Op::MatMul { ta, tb } => matmul(args[0], args[1], *ta, *tb, shape),
        Op::Reshape => Array::new(shape, args[0].data.clone()),
        Op::Permute(perm) => permute(args[0], perm, shape),
        Op::Broadcast => broadcast(args[0], shape),
        Op::Slice { axis, start, end } => {
            let (s, e) = (eval_dim(start, sizes)?, eval_dim(end, sizes)?);
            let x = args[0];
            if s > e || e > x.shape[*axis] {
                return Err(format!("slice {s}:{e} out of range for axis {axis} of size {}", x.shape[*axis]));
            }
            slice(x, *axis, s, shape)
        }
        Op::Concat(axis) => concat(args, *axis, shape),
        Op::Gather => gather(args[0], args[1], shape)?,
        Op::ScatterAdd => scatter_add(args[0], args[1], args.get(2).copied(), shape)?,
        Op::OneHot => {
            let n_classes = *shape.last().expect("one_hot has a class axis");
            let mut out = Array::zeros(&shape);
            for (i, id) in args[0].data.iter().enumerate() {
                if *id >= 0.0 && (*id as usize) < n_classes {
                    out.data[i * n_classes + *id as usize] = 1.0;
                }
            }
            out
        }
        Op::TopKValues(k) | Op::TopKIndices(k) => {
            let x = args[0];
            let last = *x.shape.last().expect("topk of a rank >= 1 tensor");
            let mut out = Vec::with_capacity(shape.iter().product());
            for row in x.data.chunks(last.max(1)) {
                // Largest first; ties as torch.topk leaves them (`ir::topk`).
                for i in super::topk::order(row, *k) {
                    out.push(if matches!(n.op, Op::TopKValues(_)) { row[i] } else { i as f64 });
                }
            }
            Array::new(shape, out)
        }
        Op::WriteRows => {
            let (base, rows, start) = (args[0], args[1], args[2].data[0]);
            let r = shape.len();
            let (len, d, t) = (shape[r - 2], shape[r - 1], rows.shape[r - 2]);
            let mut out = base.clone();
            for outer in 0..base.len() / (len * d).max(1) {
                for i in 0..t {
                    let at = (start + i as f64).rem_euclid(len as f64) as usize;
                    let (to, from) = ((outer * len + at) * d, (outer * t + i) * d);
                    out.data[to..to + d].copy_from_slice(&rows.data[from..from + d]);
                }
            }
            out
        }
        Op::DropoutMask { p, key } => {
            let step = args[0].data[0] as u64;
            let len: usize = shape.iter().product();
            let data = (0..len)
                .map(|i| {
                    let u = uniform(*key, step, i as u64);
                    if u < *p { 0.0 } else { 1.0 / (1.0 - p) }
                })
                .collect();
            let _ = feeds;
            Array::new(shape, data)
        }
        Op::Attention(a) => attention(a, args, shape),
        Op::AttentionBackward(a, pass) => attention_backward(a, *pass, args, shape),
        Op::ExpertOrder(experts) | Op::ExpertOffsets(experts) => {
            let (order, offsets) = super::experts::order(args[0].data.iter().copied(), *experts)?;
            let v = if matches!(n.op, Op::ExpertOrder(_)) { order } else { offsets };
            Array::new(shape, v.into_iter().map(|i| i as f64).collect())
        }
        Op::ExpertMatMul { tb } => {
            let (x, bounds) = (args[0], expert_bounds(args[1], args.len() - 2, args[0].shape[0])?);
            let mut out = Array::zeros(&shape);
            for (e, rows) in bounds.iter().enumerate() {
                let w = args[2 + e];
                let part = Array::new(
                    vec![rows.len(), x.shape[1]],
                    x.data[rows.start * x.shape[1]..rows.end * x.shape[1]].to_vec(),
                );
                let y = matmul(&part, w, false, *tb, vec![rows.len(), shape[1]]);
                out.data[rows.start * shape[1]..rows.end * shape[1]].copy_from_slice(&y.data);
            }
            out
        }
        Op::ExpertWeightGrad { tb } => {
            let (x, dy) = (args[0], args[1]);
            let bounds = expert_bounds(args[2], args[2].len() - 1, x.shape[0])?;
            let each: usize = shape[1..].iter().product();
            let mut out = Array::zeros(&shape);
            for (e, rows) in bounds.into_iter().enumerate() {
                let part = |a: &Array| {
                    let w = a.shape[1];
                    Array::new(vec![rows.len(), w], a.data[rows.start * w..rows.end * w].to_vec())
                };
                let (x, dy) = (part(x), part(dy));
                let one = shape[1..].to_vec();
                let g = if *tb { matmul(&dy, &x, true, false, one) } else { matmul(&x, &dy, true, false, one) };
                out.data[e * each..(e + 1) * each].copy_from_slice(&g.data);
            }
            out
        }
    })
}

/// One attention's inputs as the reference reads them.
struct Heads<'a> {
    a: &'a Attention,
    q: &'a Array,
    k: &'a Array,
    v: &'a Array,
    offset: i64,
    mask: Option<&'a Array>,
    /// batch, queries, heads, head size, keys, key/value heads, value size
    n: [usize; 7],
}

impl<'a> Heads<'a> {
    /// `forward`: queries, keys, values, offset and the optional mask.
    fn new(a: &'a Attention, forward: &[&'a Array]) -> Heads<'a> {
        let (q, k, v) = (forward[0], forward[1], forward[2]);
        let (s, g) = if a.kv_heads_first { (k.shape[2], k.shape[1]) } else { (k.shape[1], k.shape[2]) };
        let n = [q.shape[0], q.shape[1], q.shape[2], q.shape[3], s, g, v.shape[3]];
        Heads { a, q, k, v, offset: forward[3].data[0] as i64, mask: forward.get(4).copied(), n }
    }

    /// Offset of key/value row (b, j, g) with `width` features.
    fn kv(&self, b: usize, j: usize, g: usize, width: usize) -> usize {
        let [_, _, _, _, s, gs, _] = self.n;
        if self.a.kv_heads_first { ((b * gs + g) * s + j) * width } else { ((b * s + j) * gs + g) * width }
    }

    /// Offset of query row (b, i, h) with `width` features.
    fn query(&self, b: usize, i: usize, h: usize, width: usize) -> usize {
        ((b * self.n[1] + i) * self.n[2] + h) * width
    }

    fn group(&self, h: usize) -> usize {
        h / (self.n[2] / self.n[5])
    }

    /// The scaled score of query (b, i, h) and key j, or `None` where masked.
    fn score(&self, b: usize, i: usize, h: usize, j: usize) -> Option<f64> {
        let masked = self.mask.is_some_and(|m| {
            let mi = if m.shape[1] == 1 { 0 } else { i };
            m.data[(b * m.shape[1] + mi) * self.n[4] + j] == 0.0
        });
        if masked || !self.a.sees(i as i64 + self.offset, j as i64) {
            return None;
        }
        let d = self.n[3];
        let (qo, ko) = (self.query(b, i, h, d), self.kv(b, j, self.group(h), d));
        Some(self.a.scale * (0..d).map(|c| self.q.data[qo + c] * self.k.data[ko + c]).sum::<f64>())
    }

    /// A row's scores, -1e30 where masked, and their log-sum-exp (-1e30
    /// when every key is masked).
    fn row(&self, b: usize, i: usize, h: usize) -> (Vec<f64>, f64) {
        let scores: Vec<f64> = (0..self.n[4]).map(|j| self.score(b, i, h, j).unwrap_or(-1e30)).collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
        (scores, if max <= -1e30 { -1e30 } else { lse })
    }

    /// Calls `f(b, i, h)` for every query row.
    fn each_row(&self, mut f: impl FnMut(usize, usize, usize)) {
        for b in 0..self.n[0] {
            for i in 0..self.n[1] {
                for h in 0..self.n[2] {
                    f(b, i, h);
                }
            }
        }
    }
}

/// Attention as its decomposition computes it (`ir::attention`): every
/// score of a row, masked ones -1e30, a stable softmax, the weighted values.
fn attention(a: &Attention, args: &[&Array], shape: Vec<usize>) -> Array {
    let x = Heads::new(a, args);
    let e_n = x.n[6];
    let mut out = vec![0.0; shape.iter().product()];
    x.each_row(|b, i, h| {
        let (scores, _) = x.row(b, i, h);
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let oo = x.query(b, i, h, e_n);
        for (j, w) in weights.iter().enumerate() {
            let vo = x.kv(b, j, x.group(h), e_n);
            for e in 0..e_n {
                out[oo + e] += w / total * x.v.data[vo + e];
            }
        }
    });
    Array::new(shape, out)
}

/// A pass of the attention's backward (`ir::attention::gradient`): with
/// P = exp(score - lse) (0 where masked), dP = dY Vᵀ and dS = P (dP - delta),
/// dQ = scale dS K, dK = scale dSᵀ Q, dV = Pᵀ dY; a row with every key masked
/// has P = 1/S everywhere and no dS, as the decomposition's gradient gives.
fn attention_backward(a: &Attention, pass: AttentionPass, args: &[&Array], shape: Vec<usize>) -> Array {
    let mut out = vec![0.0; shape.iter().product()];
    if pass == AttentionPass::Lse {
        let x = Heads::new(a, args);
        x.each_row(|b, i, h| out[x.query(b, i, h, 1)] = x.row(b, i, h).1);
        return Array::new(shape, out);
    }
    if pass == AttentionPass::ValuesAndLse {
        let x = Heads::new(a, args);
        let [b_n, t_n, h_n, _, _, _, e_n] = x.n;
        let values = attention(a, args, vec![b_n, t_n, h_n, e_n]);
        let lse = attention_backward(a, AttentionPass::Lse, args, vec![b_n, t_n, h_n]);
        return Array::new(shape, [values.data, lse.data].concat());
    }
    let (gy, lse, delta) = (args[0], args[1], args[2]);
    let x = Heads::new(a, &args[3..]);
    let [b_n, t_n, h_n, d_n, s_n, _, e_n] = x.n;
    // dQ first, then the keys' and values' gradients side by side.
    let (dq, dkv) = out.split_at_mut(b_n * t_n * h_n * d_n);
    x.each_row(|b, i, h| {
        let (row, g) = (x.query(b, i, h, 1), x.group(h));
        let go = x.query(b, i, h, e_n);
        if lse.data[row] <= -1e30 {
            for j in 0..s_n {
                let o = x.kv(b, j, g, d_n + e_n) + d_n;
                for e in 0..e_n {
                    dkv[o + e] += gy.data[go + e] / s_n as f64;
                }
            }
            return;
        }
        for j in 0..s_n {
            let Some(s) = x.score(b, i, h, j) else { continue };
            let p = (s - lse.data[row]).exp();
            let vo = x.kv(b, j, g, e_n);
            let dp: f64 = (0..e_n).map(|e| gy.data[go + e] * x.v.data[vo + e]).sum();
            let ds = p * (dp - delta.data[row]) * a.scale;
            let (qo, ko, o) = (x.query(b, i, h, d_n), x.kv(b, j, g, d_n), x.kv(b, j, g, d_n + e_n));
            for c in 0..d_n {
                dq[qo + c] += ds * x.k.data[ko + c];
                dkv[o + c] += ds * x.q.data[qo + c];
            }
            for e in 0..e_n {
                dkv[o + d_n + e] += p * gy.data[go + e];
            }
        }
    });
    Array::new(shape, out)
}

/// A deterministic uniform number in [0, 1) from (key, step, index): splitmix64.
pub fn uniform(key: u64, step: u64, index: u64) -> f64 {
    uniform_bits(key, step, index) as f64 / (1u64 << 53) as f64
}

/// `uniform`'s 53 random bits, an integer below 2^53: `uniform(..) < p`
/// exactly when `uniform_bits(..) < (p * 2^53).ceil()`.
#[inline(always)]
pub fn uniform_bits(key: u64, step: u64, index: u64) -> u64 {
    let mut z = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ index;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 11
}

fn reduce(r: Reduce, x: &Array, axes: &[usize], shape: Vec<usize>) -> Array {
    let init = match r {
        Reduce::Sum => 0.0,
        Reduce::Max => f64::NEG_INFINITY,
        Reduce::Min => f64::INFINITY,
    };
    let mut out = vec![init; shape.iter().product()];
    let ostrides = strides(&shape);
    for_each_index(&x.shape, |flat, idx| {
        let mut o = 0;
        let mut k = 0;
        for (d, i) in idx.iter().enumerate() {
            if !axes.contains(&d) {
                o += i * ostrides[k];
                k += 1;
            }
        }
        let v = x.data[flat];
        out[o] = match r {
            Reduce::Sum => out[o] + v,
            Reduce::Max => out[o].max(v),
            Reduce::Min => out[o].min(v),
        };
    });
    Array::new(shape, out)
}

fn argmax(x: &Array, axis: usize, shape: Vec<usize>) -> Array {
    let mut best = vec![(f64::NEG_INFINITY, 0usize); shape.iter().product()];
    let ostrides = strides(&shape);
    for_each_index(&x.shape, |flat, idx| {
        let mut o = 0;
        let mut k = 0;
        for (d, i) in idx.iter().enumerate() {
            if d != axis {
                o += i * ostrides[k];
                k += 1;
            }
        }
        // The first maximum wins, as in NumPy.
        if idx[axis] == 0 || x.data[flat] > best[o].0 {
            best[o] = (x.data[flat], idx[axis]);
        }
    });
    Array::new(shape, best.into_iter().map(|(_, i)| i as f64).collect())
}

fn matmul(a: &Array, b: &Array, ta: bool, tb: bool, shape: Vec<usize>) -> Array {
    let r = a.shape.len();
    let (n, m) = (shape[r - 2], shape[r - 1]);
    let k = if ta { a.shape[r - 2] } else { a.shape[r - 1] };
    let batch: usize = a.shape[..r - 2].iter().product();
    let mut out = vec![0.0; batch * n * m];
    // Element (i, p) of op(a) and (p, j) of op(b), in their stored layouts.
    let at = |i: usize, p: usize| if ta { p * n + i } else { i * k + p };
    let bt = |p: usize, j: usize| if tb { j * k + p } else { p * m + j };
    for bi in 0..batch {
        let (ao, bo, oo) = (bi * n * k, bi * k * m, bi * n * m);
        for i in 0..n {
            for j in 0..m {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a.data[ao + at(i, p)] * b.data[bo + bt(p, j)];
                }
                out[oo + i * m + j] = acc;
            }
        }
    }
    Array::new(shape, out)
}

fn permute(x: &Array, perm: &[usize], shape: Vec<usize>) -> Array {
    let xs = strides(&x.shape);
    let mut out = vec![0.0; x.len()];
    for_each_index(&shape, |flat, idx| {
        let src: usize = idx.iter().enumerate().map(|(d, i)| i * xs[perm[d]]).sum();
        out[flat] = x.data[src];
    });
    Array::new(shape, out)
}

fn broadcast(x: &Array, shape: Vec<usize>) -> Array {
    let off = shape.len() - x.shape.len();
    let xs = strides(&x.shape);
    let mut out = vec![0.0; shape.iter().product()];
    for_each_index(&shape, |flat, idx| {
        let mut src = 0;
        for (d, &n) in x.shape.iter().enumerate() {
            if n != 1 {
                src += idx[off + d] * xs[d];
            }
        }
        out[flat] = x.data[src];
    });
    Array::new(shape, out)
}

fn slice(x: &Array, axis: usize, start: usize, shape: Vec<usize>) -> Array {
    let xs = strides(&x.shape);
    let mut out = vec![0.0; shape.iter().product()];
    for_each_index(&shape, |flat, idx| {
        let src: usize = idx.iter().enumerate().map(|(d, i)| (if d == axis { i + start } else { *i }) * xs[d]).sum();
        out[flat] = x.data[src];
    });
    Array::new(shape, out)
}

fn concat(xs: &[&Array], axis: usize, shape: Vec<usize>) -> Array {
    let mut out = vec![0.0; shape.iter().product()];
    let os = strides(&shape);
    let mut offset = 0;
    for x in xs {
        for_each_index(&x.shape, |flat, idx| {
            let dst: usize =
                idx.iter().enumerate().map(|(d, i)| (if d == axis { i + offset } else { *i }) * os[d]).sum();
            out[dst] = x.data[flat];
        });
        offset += x.shape[axis];
    }
    Array::new(shape, out)
}

/// Each expert's rows from an `expert_offsets` value, checked to rise within `rows`.
fn expert_bounds(offsets: &Array, experts: usize, rows: usize) -> Result<Vec<std::ops::Range<usize>>, String> {
    let o = &offsets.data;
    if o.len() != experts + 1 || o[0] != 0.0 || o.windows(2).any(|w| w[1] < w[0]) || o[experts] != rows as f64 {
        return Err(format!("expert offsets {o:?} do not split {rows} rows"));
    }
    Ok(o.windows(2).map(|w| w[0] as usize..w[1] as usize).collect())
}

fn row_size(shape: &[usize]) -> usize {
    shape[1..].iter().product()
}

fn gather(table: &Array, ids: &Array, shape: Vec<usize>) -> Result<Array, String> {
    let row = row_size(&table.shape);
    let mut out = Vec::with_capacity(shape.iter().product());
    for id in &ids.data {
        if id.is_nan() || *id < 0.0 || *id as usize >= table.shape[0] {
            return Err(format!("index {id} is out of range for a table of {} rows", table.shape[0]));
        }
        let i = *id as usize;
        out.extend_from_slice(&table.data[i * row..(i + 1) * row]);
    }
    Ok(Array::new(shape, out))
}

fn scatter_add(ids: &Array, updates: &Array, base: Option<&Array>, shape: Vec<usize>) -> Result<Array, String> {
    let row = row_size(&shape);
    let mut out = base.cloned().unwrap_or_else(|| Array::zeros(&shape));
    for (k, id) in ids.data.iter().enumerate() {
        if id.is_nan() || *id < 0.0 || *id as usize >= shape[0] {
            return Err(format!("index {id} is out of range for a table of {} rows", shape[0]));
        }
        let i = *id as usize;
        for j in 0..row {
            out.data[i * row + j] += updates.data[k * row + j];
        }
    }
    Ok(out)
}
