//! The primitive operations of the language: their signatures (as data) and
//! their shape rules. Layer calls, `route` and operators are typed in
//! forward.rs; everything with a fixed rule lives here.

use super::value::Value;
use crate::scalar::Unary;
use crate::types::DType;
use crate::types::Dim;
use crate::types::{TensorTy, broadcast, normalize_axis, shape_text};

/// What an argument must be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A tensor.
    T,
    /// A tensor, or a number used as a scalar.
    TS,
    /// A tensor or `none`.
    OptT,
    Int,
    OptInt,
    Float,
    OptFloat,
    Bool,
    /// One axis or a list of axes, or `none` for all.
    Axes,
    /// A list of integer axes.
    Ints,
    /// An int for every spatial axis alike, or a list with one per axis
    /// (a convolution's stride, padding, dilation).
    PerAxis,
    /// A size: an integer or a symbolic dimension such as `T`.
    Size,
    /// A list of sizes.
    Sizes,
    /// A list of tensors.
    Tensors,
    /// A `repeat` stack of layers.
    Stack,
}

/// Default of an optional argument.
#[derive(Clone, Copy, Debug)]
pub enum Fallback {
    Required,
    None,
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Fallback,
}

const fn p(name: &'static str, kind: Kind, default: Fallback) -> Param {
    Param { name, kind, default }
}
const fn req(name: &'static str, kind: Kind) -> Param {
    p(name, kind, Fallback::Required)
}

use Fallback as D;
use Kind as K;

/// The primitives of the language. `PRIMITIVES` gives each one's name and
/// parameters; its shape rule (`infer`) and its lowering (`ir::lower`) are
/// exhaustive matches, so a primitive cannot lack either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prim {
    /// `exp(x)`, `silu(x)`, ...: the unary primitives of `scalar::UNARY`.
    Math(Unary),
    Float,
    Int,
    Maximum,
    Minimum,
    Where,
    Sum,
    Mean,
    Max,
    Min,
    Var,
    Argmax,
    Softmax,
    LogSoftmax,
    Cumsum,
    Transpose,
    Permute,
    Reshape,
    Expand,
    Split,
    Merge,
    Unsqueeze,
    Squeeze,
    Concat,
    Stack,
    Gather,
    OneHot,
    Arange,
    Dropout,
    Linear,
    Conv1d,
    Conv2d,
    Attend,
    Rope,
    Topk,
    Route,
    CrossEntropy,
    Mse,
    AddLoss,
}

const CONV: &[Param] = &[
    req("x", K::T),
    req("weight", K::T),
    p("bias", K::OptT, D::None),
    p("stride", K::PerAxis, D::Int(1)),
    p("padding", K::PerAxis, D::Int(0)),
    p("dilation", K::PerAxis, D::Int(1)),
    p("groups", K::Int, D::Int(1)),
];

/// Every primitive but the unary ones with its name and parameters, in the
/// order positional arguments bind.
pub const PRIMITIVES: &[(Prim, &str, &[Param])] = &[
    (Prim::Float, "float", &[req("x", K::T)]),
    (Prim::Int, "int", &[req("x", K::T)]),
    (Prim::Maximum, "maximum", &[req("a", K::TS), req("b", K::TS)]),
    (Prim::Minimum, "minimum", &[req("a", K::TS), req("b", K::TS)]),
    (Prim::Where, "where", &[req("cond", K::T), req("a", K::TS), req("b", K::TS)]),
    (Prim::Sum, "sum", &[req("x", K::T), p("axis", K::Axes, D::None), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Mean, "mean", &[req("x", K::T), p("axis", K::Axes, D::None), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Max, "max", &[req("x", K::T), p("axis", K::Axes, D::None), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Min, "min", &[req("x", K::T), p("axis", K::Axes, D::None), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Var, "var", &[req("x", K::T), p("axis", K::Axes, D::None), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Argmax, "argmax", &[req("x", K::T), p("axis", K::Int, D::Int(-1)), p("keep", K::Bool, D::Bool(false))]),
    (Prim::Softmax, "softmax", &[req("x", K::T), p("axis", K::Int, D::Int(-1))]),
    (Prim::LogSoftmax, "log_softmax", &[req("x", K::T), p("axis", K::Int, D::Int(-1))]),
    (Prim::Cumsum, "cumsum", &[req("x", K::T), p("axis", K::Int, D::Int(-1))]),
    (Prim::Transpose, "transpose", &[req("x", K::T), p("a", K::Int, D::Int(-2)), p("b", K::Int, D::Int(-1))]),
    (Prim::Permute, "permute", &[req("x", K::T), req("axes", K::Ints)]),
    (Prim::Reshape, "reshape", &[req("x", K::T), req("shape", K::Sizes)]),
    (Prim::Expand, "expand", &[req("x", K::T), req("shape", K::Sizes)]),
    (Prim::Split, "split", &[req("x", K::T), req("axis", K::Int), req("sizes", K::Sizes)]),
    (Prim::Merge, "merge", &[req("x", K::T), p("start", K::Int, D::Int(-2)), p("end", K::Int, D::Int(-1))]),
    (Prim::Unsqueeze, "unsqueeze", &[req("x", K::T), req("axis", K::Int)]),
    (Prim::Squeeze, "squeeze", &[req("x", K::T), req("axis", K::Int)]),
    (Prim::Concat, "concat", &[req("xs", K::Tensors), p("axis", K::Int, D::Int(-1))]),
    (Prim::Stack, "stack", &[req("xs", K::Tensors), p("axis", K::Int, D::Int(-1))]),
    (Prim::Gather, "gather", &[req("table", K::T), req("ids", K::T)]),
    (Prim::OneHot, "one_hot", &[req("ids", K::T), req("n", K::Size)]),
    (Prim::Arange, "arange", &[req("n", K::Size)]),
    (Prim::Dropout, "dropout", &[req("x", K::T), p("p", K::Float, D::Float(0.1))]),
    (Prim::Linear, "linear", &[req("x", K::T), req("weight", K::T), p("bias", K::OptT, D::None)]),
    (Prim::Conv1d, "conv1d", CONV),
    (Prim::Conv2d, "conv2d", CONV),
    (
        Prim::Attend,
        "attend",
        &[
            req("q", K::T),
            req("k", K::T),
            req("v", K::T),
            p("causal", K::Bool, D::Bool(false)),
            p("window", K::OptInt, D::None),
            p("mask", K::OptT, D::None),
            p("scale", K::OptFloat, D::None),
            p("softcap", K::OptFloat, D::None),
        ],
    ),
    (
        Prim::Rope,
        "rope",
        &[req("x", K::T), p("theta", K::Float, D::Float(10000.0)), p("rotary_dim", K::OptInt, D::None)],
    ),
    (Prim::Topk, "topk", &[req("x", K::T), req("k", K::Int)]),
    (Prim::Route, "route", &[req("x", K::T), req("indices", K::T), req("weights", K::T), req("experts", K::Stack)]),
    (
        Prim::CrossEntropy,
        "cross_entropy",
        &[req("logits", K::T), req("targets", K::T), p("ignore_index", K::Int, D::Int(-100))],
    ),
    (Prim::Mse, "mse", &[req("pred", K::T), req("target", K::T)]),
    (Prim::AddLoss, "add_loss", &[req("x", K::T), req("loss", K::T), p("weight", K::Float, D::Float(1.0))]),
];

impl Prim {
    /// The primitive called `name`, unary ones included.
    pub fn from_name(name: &str) -> Option<Prim> {
        Unary::primitive(name)
            .map(Prim::Math)
            .or_else(|| PRIMITIVES.iter().find(|(_, n, _)| *n == name).map(|(p, _, _)| *p))
    }

    pub fn name(self) -> &'static str {
        match self {
            Prim::Math(u) => u.name(),
            other => {
                PRIMITIVES.iter().find(|(p, _, _)| *p == other).map(|(_, n, _)| *n).expect("every primitive has a row")
            }
        }
    }

    /// Its parameters, in the order positional arguments bind.
    pub fn params(self) -> &'static [Param] {
        const X: &[Param] = &[req("x", K::T)];
        match self {
            Prim::Math(_) => X,
            other => {
                PRIMITIVES.iter().find(|(p, _, _)| *p == other).map(|(_, _, s)| *s).expect("every primitive has a row")
            }
        }
    }

    /// Every primitive's name (for suggestions and coverage tests).
    pub fn names() -> impl Iterator<Item = &'static str> {
        crate::scalar::UNARY.iter().filter(|r| r.primitive).map(|r| r.name).chain(PRIMITIVES.iter().map(|(_, n, _)| *n))
    }
}

pub fn signature(name: &str) -> Option<&'static [Param]> {
    Prim::from_name(name).map(Prim::params)
}

/// A bound argument, as the walker evaluated it.
#[derive(Clone, Debug)]
pub enum Arg {
    Tensor(TensorTy),
    Value(Value),
    Tensors(Vec<TensorTy>),
    Absent,
}

/// Why a primitive rejected its arguments; `args` are indices of the
/// parameters to point at (the call itself when empty).
#[derive(Debug)]
pub struct PrimError {
    pub message: String,
    pub args: Vec<(usize, String)>,
    pub help: Option<String>,
}

fn err(message: impl Into<String>) -> PrimError {
    PrimError { message: message.into(), args: Vec::new(), help: None }
}

impl PrimError {
    fn at(mut self, arg: usize, label: impl Into<String>) -> PrimError {
        self.args.push((arg, label.into()));
        self
    }
    fn help(mut self, h: impl Into<String>) -> PrimError {
        self.help = Some(h.into());
        self
    }
}

/// Result of a primitive: one tensor or several (`topk`).
pub enum Out {
    One(TensorTy),
    Many(Vec<TensorTy>),
}

struct Args<'a>(&'a [Arg]);

impl Args<'_> {
    fn t(&self, i: usize) -> &TensorTy {
        match &self.0[i] {
            Arg::Tensor(t) => t,
            other => unreachable!("binder checked tensor argument, got {other:?}"),
        }
    }
    fn opt_t(&self, i: usize) -> Option<&TensorTy> {
        match &self.0[i] {
            Arg::Tensor(t) => Some(t),
            _ => None,
        }
    }
    fn int(&self, i: usize) -> i64 {
        match &self.0[i] {
            Arg::Value(Value::Int(v)) => *v,
            other => unreachable!("binder checked int argument, got {other:?}"),
        }
    }
    fn opt_int(&self, i: usize) -> Option<i64> {
        match &self.0[i] {
            Arg::Value(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }
    fn float(&self, i: usize) -> f64 {
        match &self.0[i] {
            Arg::Value(v) => v.as_f64().unwrap_or(0.0),
            _ => 0.0,
        }
    }
    fn opt_float(&self, i: usize) -> Option<f64> {
        match &self.0[i] {
            Arg::Value(v) => v.as_f64(),
            _ => None,
        }
    }
    fn bool(&self, i: usize) -> bool {
        matches!(&self.0[i], Arg::Value(Value::Bool(true)))
    }
    fn ints(&self, i: usize) -> Vec<i64> {
        match &self.0[i] {
            Arg::Value(Value::List(items)) => {
                items.iter().filter_map(|v| if let Value::Int(x) = v { Some(*x) } else { None }).collect()
            }
            Arg::Value(Value::Int(v)) => vec![*v],
            _ => Vec::new(),
        }
    }
    fn size(&self, i: usize) -> Dim {
        match &self.0[i] {
            Arg::Value(v) => v.as_dim().expect("binder checked size"),
            _ => unreachable!("binder checked size"),
        }
    }
    fn sizes(&self, i: usize) -> Vec<Dim> {
        match &self.0[i] {
            Arg::Value(Value::List(items)) => items.iter().filter_map(Value::as_dim).collect(),
            Arg::Value(v) => v.as_dim().into_iter().collect(),
            _ => Vec::new(),
        }
    }
    fn tensors(&self, i: usize) -> &[TensorTy] {
        match &self.0[i] {
            Arg::Tensors(ts) => ts,
            _ => &[],
        }
    }
    /// A tensor argument or a number as a rank-0 tensor.
    fn ts(&self, i: usize, like: DType) -> TensorTy {
        match &self.0[i] {
            Arg::Tensor(t) => t.clone(),
            Arg::Value(Value::Int(_)) if like == DType::Int => TensorTy::scalar(DType::Int),
            Arg::Value(Value::Bool(_)) => TensorTy::scalar(DType::Bool),
            _ => TensorTy::scalar(DType::F32),
        }
    }
}

fn axis(t: &TensorTy, a: i64, arg: usize) -> Result<usize, PrimError> {
    t.axis(a).ok_or_else(|| {
        err(format!("axis {a} is out of range for a tensor of rank {}", t.rank()))
            .at(arg, format!("valid axes are -{r}..{r}", r = t.rank()))
            .at(0, format!("this has shape {}", shape_text(&t.dims)))
    })
}

fn need_float(t: &TensorTy, arg: usize, op: &str) -> Result<(), PrimError> {
    if t.dtype == DType::F32 {
        Ok(())
    } else {
        Err(err(format!("`{op}` needs a float tensor, found {}", t.dtype.as_str()))
            .at(arg, format!("this is {t}"))
            .help("convert with `float(x)`"))
    }
}

fn need_int(t: &TensorTy, arg: usize, what: &str) -> Result<(), PrimError> {
    if t.dtype == DType::Int {
        Ok(())
    } else {
        Err(err(format!("{what} must be an int tensor, found {}", t.dtype.as_str())).at(arg, format!("this is {t}")))
    }
}

fn product(dims: &[Dim]) -> Dim {
    dims.iter().fold(Dim::constant(1), |acc, d| acc.mul(d))
}

/// Infers the result of primitive `prim` from its bound arguments.
pub fn infer(prim: Prim, args: &[Arg]) -> Result<Out, PrimError> {
    let name = prim.name();
    let a = Args(args);
    let one = |t: TensorTy| Ok(Out::One(t));
    match prim {
        Prim::Math(_) => {
            need_float(a.t(0), 0, name)?;
            one(a.t(0).clone())
        }
        Prim::Float => one(a.t(0).with_dtype(DType::F32)),
        Prim::Int => one(a.t(0).with_dtype(DType::Int)),
        Prim::Maximum | Prim::Minimum => {
            let (x, y) = (a.ts(0, DType::F32), a.ts(1, DType::F32));
            elementwise(&x, &y, 0, 1).map(Out::One)
        }
        Prim::Where => {
            let cond = a.t(0);
            if cond.dtype != DType::Bool {
                return Err(err("the condition of `where` must be a bool tensor")
                    .at(0, format!("this is {cond}"))
                    .help("compare, e.g. `mask == 1`"));
            }
            let x = a.ts(1, a.opt_t(2).map_or(DType::F32, |t| t.dtype));
            let y = a.ts(2, x.dtype);
            let xy = elementwise(&x, &y, 1, 2)?;
            let dims = broadcast(&cond.dims, &xy.dims).map_err(|(p, q)| {
                err(format!(
                    "cannot broadcast the condition {} with the values {}",
                    shape_text(&cond.dims),
                    shape_text(&xy.dims)
                ))
                .at(0, format!("size {p} here"))
                .at(1, format!("against {q}"))
            })?;
            one(TensorTy::new(xy.dtype, dims))
        }
        Prim::Sum | Prim::Mean | Prim::Max | Prim::Min | Prim::Var => {
            let x = a.t(0);
            if name != "max" && name != "min" && x.dtype == DType::Bool {
                return Err(err(format!("`{name}` of a bool tensor")).at(0, "convert with `float(x)`"));
            }
            if matches!(name, "mean" | "var") {
                need_float(x, 0, name)?;
            }
            let axes: Vec<usize> = match &args[1] {
                Arg::Value(Value::None) | Arg::Absent => (0..x.rank()).collect(),
                _ => a.ints(1).into_iter().map(|ax| axis(x, ax, 1)).collect::<Result<_, _>>()?,
            };
            let mut sorted = axes.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != axes.len() {
                return Err(err("an axis is listed twice").at(1, "here"));
            }
            let keep = a.bool(2);
            let dims = x
                .dims
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                    (true, true) => Some(Dim::constant(1)),
                    (true, false) => None,
                    (false, _) => Some(d.clone()),
                })
                .collect();
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Argmax => {
            let x = a.t(0);
            let ax = axis(x, a.int(1), 1)?;
            let mut dims = x.dims.clone();
            if a.bool(2) {
                dims[ax] = Dim::constant(1);
            } else {
                dims.remove(ax);
            }
            one(TensorTy::new(DType::Int, dims))
        }
        Prim::Softmax | Prim::LogSoftmax => {
            let x = a.t(0);
            need_float(x, 0, name)?;
            axis(x, a.int(1), 1)?;
            one(x.clone())
        }
        Prim::Cumsum => {
            // Running sums of ints or bools (a mask's positions) are ints.
            let x = a.t(0);
            axis(x, a.int(1), 1)?;
            let dtype = if x.dtype == DType::F32 { DType::F32 } else { DType::Int };
            one(TensorTy::new(dtype, x.dims.clone()))
        }
        Prim::Transpose => {
            let x = a.t(0);
            let (i, j) = (axis(x, a.int(1), 1)?, axis(x, a.int(2), 2)?);
            let mut dims = x.dims.clone();
            dims.swap(i, j);
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Permute => {
            let x = a.t(0);
            let axes = a.ints(1);
            let resolved: Vec<usize> = axes.iter().map(|ax| axis(x, *ax, 1)).collect::<Result<_, _>>()?;
            let mut check = resolved.clone();
            check.sort();
            if check != (0..x.rank()).collect::<Vec<_>>() {
                return Err(err(format!("`permute` needs each of the {} axes exactly once", x.rank()))
                    .at(1, "not a permutation"));
            }
            one(TensorTy::new(x.dtype, resolved.iter().map(|i| x.dims[*i].clone()).collect()))
        }
        Prim::Reshape => {
            let x = a.t(0);
            let dims = fill_wildcard(&x.dims, a.sizes(1), 1)?;
            let (before, after) = (product(&x.dims), product(&dims));
            if before != after {
                return Err(err(format!(
                    "cannot reshape {} ({before} elements) to {} ({after} elements)",
                    shape_text(&x.dims),
                    shape_text(&dims)
                ))
                .at(0, format!("this has shape {}", shape_text(&x.dims)))
                .at(1, "this shape"));
            }
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Expand => {
            let x = a.t(0);
            let mut dims = a.sizes(1);
            let extra = dims.len().checked_sub(x.rank()).ok_or_else(|| {
                err(format!("cannot expand {} to fewer axes, {}", shape_text(&x.dims), shape_text(&dims)))
                    .at(0, format!("this has shape {}", shape_text(&x.dims)))
                    .at(1, "this shape")
            })?;
            // Right-aligned as in broadcasting: -1 keeps an axis, a size-1 axis repeats.
            for (i, from) in x.dims.iter().enumerate() {
                let to = &mut dims[extra + i];
                if *to == Dim::constant(-1) {
                    *to = from.clone();
                } else if from != to && from.as_const() != Some(1) {
                    return Err(err(format!(
                        "cannot expand {} to {}: axis {i} has size {from}, not 1",
                        shape_text(&x.dims),
                        shape_text(&dims)
                    ))
                    .at(0, format!("this has shape {}", shape_text(&x.dims)))
                    .at(1, "this shape")
                    .help("only axes of size 1 repeat; -1 keeps an axis as it is"));
                }
            }
            if let Some(bad) = dims.iter().find(|d| d.as_const().is_some_and(|v| v < 1)) {
                return Err(err(format!("size {bad} must be at least 1")).at(1, "here"));
            }
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Split => {
            let x = a.t(0);
            let ax = axis(x, a.int(1), 1)?;
            let sizes = fill_wildcard(&x.dims[ax..=ax], a.sizes(2), 2)?;
            if product(&sizes) != x.dims[ax] {
                let parts: Vec<String> = sizes.iter().map(|d| d.to_string()).collect();
                return Err(err(format!(
                    "cannot split axis {} of size {} into {}",
                    a.int(1),
                    x.dims[ax],
                    shape_text(&sizes)
                ))
                .at(2, format!("{} = {}", parts.join(" * "), product(&sizes)))
                .at(0, format!("this has shape {}", shape_text(&x.dims)))
                .help("the sizes must multiply to the size of the axis"));
            }
            let mut dims = x.dims.clone();
            dims.splice(ax..=ax, sizes);
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Merge => {
            let x = a.t(0);
            let (s, e) = (axis(x, a.int(1), 1)?, axis(x, a.int(2), 2)?);
            if s > e {
                return Err(err("`merge` needs start <= end")
                    .at(1, format!("start is axis {s}"))
                    .at(2, format!("end is axis {e}")));
            }
            let mut dims = x.dims.clone();
            let merged = product(&dims[s..=e]);
            dims.splice(s..=e, [merged]);
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Unsqueeze => {
            let x = a.t(0);
            let ax = normalize_axis(a.int(1), x.rank() + 1).ok_or_else(|| {
                err(format!("axis {} is out of range for unsqueezing a tensor of rank {}", a.int(1), x.rank()))
                    .at(1, "here")
            })?;
            let mut dims = x.dims.clone();
            dims.insert(ax, Dim::constant(1));
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Squeeze => {
            let x = a.t(0);
            let ax = axis(x, a.int(1), 1)?;
            if x.dims[ax] != Dim::constant(1) {
                return Err(err(format!("cannot squeeze axis {} of size {}", a.int(1), x.dims[ax]))
                    .at(0, format!("this has shape {}", shape_text(&x.dims))));
            }
            let mut dims = x.dims.clone();
            dims.remove(ax);
            one(TensorTy::new(x.dtype, dims))
        }
        Prim::Concat | Prim::Stack => {
            let xs = a.tensors(0);
            let Some(first) = xs.first() else {
                return Err(err(format!("`{name}` needs at least one tensor")).at(0, "empty list"));
            };
            let rank = if name == "stack" { first.rank() + 1 } else { first.rank() };
            let ax = normalize_axis(a.int(1), rank)
                .ok_or_else(|| err(format!("axis {} is out of range", a.int(1))).at(1, "here"))?;
            let mut total = Dim::constant(0);
            for t in xs {
                let same = t.rank() == first.rank()
                    && t.dtype == first.dtype
                    && t.dims
                        .iter()
                        .zip(&first.dims)
                        .enumerate()
                        .all(|(i, (p, q))| (name == "concat" && i == ax) || p == q);
                if !same {
                    let e =
                        err(format!("`{name}` needs tensors that agree except on the joined axis: {first} and {t}"))
                            .at(0, "these");
                    // One whose differing axes are all 1 repeats along them with `expand`.
                    let to_expand = |small: &TensorTy, big: &TensorTy| {
                        let fits = small.rank() == big.rank()
                            && small.dtype == big.dtype
                            && (0..small.rank()).all(|i| {
                                (name == "concat" && i == ax)
                                    || small.dims[i] == big.dims[i]
                                    || small.dims[i].as_const() == Some(1)
                            });
                        fits.then(|| {
                            let mut dims = big.dims.clone();
                            if name == "concat" {
                                dims[ax] = small.dims[ax].clone();
                            }
                            (shape_text(&small.dims), shape_text(&dims))
                        })
                    };
                    return Err(match to_expand(first, t).or_else(|| to_expand(t, first)) {
                        Some((from, to)) => e.help(format!(
                            "repeat the {from} tensor along its axes of size 1 first: `expand(x, {to})`"
                        )),
                        None => e,
                    });
                }
                if name == "concat" {
                    total = total.add(&t.dims[ax]);
                }
            }
            let mut dims = first.dims.clone();
            if name == "concat" {
                dims[ax] = total;
            } else {
                dims.insert(ax, Dim::constant(xs.len() as i64));
            }
            one(TensorTy::new(first.dtype, dims))
        }
        Prim::Gather => {
            let (table, ids) = (a.t(0), a.t(1));
            need_int(ids, 1, "the indices of `gather`")?;
            if table.rank() == 0 {
                return Err(err("`gather` needs a table of rank at least 1").at(0, "this is a scalar"));
            }
            let mut dims = ids.dims.clone();
            dims.extend(table.dims[1..].iter().cloned());
            one(TensorTy::new(table.dtype, dims))
        }
        Prim::OneHot => {
            let ids = a.t(0);
            need_int(ids, 0, "the indices of `one_hot`")?;
            let mut dims = ids.dims.clone();
            dims.push(a.size(1));
            one(TensorTy::new(DType::F32, dims))
        }
        Prim::Arange => one(TensorTy::new(DType::Int, vec![a.size(0)])),
        Prim::Dropout => {
            let p = a.float(1);
            if !(0.0..1.0).contains(&p) {
                return Err(err(format!("dropout probability {p} is not in [0, 1)")).at(1, "here"));
            }
            need_float(a.t(0), 0, "dropout")?;
            one(a.t(0).clone())
        }
        Prim::Linear => {
            let (x, w) = (a.t(0), a.t(1));
            if w.rank() != 2 {
                return Err(err(format!("the weight of `linear` must be [out, in], found {}", shape_text(&w.dims)))
                    .at(1, "here"));
            }
            let last = x.dims.last().cloned().unwrap_or(Dim::constant(1));
            if last != w.dims[1] {
                return Err(err(format!(
                    "`linear` of {} by a weight of shape {}: {} inputs but the weight takes {}",
                    shape_text(&x.dims),
                    shape_text(&w.dims),
                    last,
                    w.dims[1]
                ))
                .at(0, format!("last axis is {last}"))
                .at(1, format!("weight is [out = {}, in = {}]", w.dims[0], w.dims[1])));
            }
            if let Some(b) = a.opt_t(2)
                && b.dims != [w.dims[0].clone()]
            {
                return Err(err(format!(
                    "the bias of `linear` must be [{}], found {}",
                    w.dims[0],
                    shape_text(&b.dims)
                ))
                .at(2, "here"));
            }
            let mut dims = x.dims.clone();
            *dims.last_mut().expect("rank >= 1") = w.dims[0].clone();
            one(TensorTy::new(DType::F32, dims))
        }
        Prim::Conv1d => conv(&a, 1).map(Out::One),
        Prim::Conv2d => conv(&a, 2).map(Out::One),
        Prim::Attend => attend(&a),
        Prim::Rope => {
            let x = a.t(0);
            need_float(x, 0, "rope")?;
            if x.rank() != 4 {
                return Err(err(format!(
                    "`rope` expects [batch, time, heads, head_dim], found {}",
                    shape_text(&x.dims)
                ))
                .at(0, "here")
                .help("split the heads first: `x.split(-1, [heads, head_dim])`"));
            }
            let d = &x.dims[3];
            let rot = a.opt_int(2).map(Dim::constant).unwrap_or_else(|| d.clone());
            if let (Some(r), Some(dd)) = (rot.as_const(), d.as_const())
                && (r % 2 != 0 || r > dd)
            {
                return Err(
                    err(format!("rotary dimension {r} must be even and at most the head dimension {dd}")).at(0, "here")
                );
            }
            one(x.clone())
        }
        Prim::Topk => {
            let x = a.t(0);
            let k = a.int(1);
            let Some(last) = x.dims.last() else {
                return Err(err("`topk` of a scalar").at(0, "here"));
            };
            if k < 1 || last.as_const().is_some_and(|n| k > n) {
                return Err(err(format!("cannot take the top {k} of {last} values")).at(1, "here"));
            }
            let mut dims = x.dims.clone();
            *dims.last_mut().expect("rank >= 1") = Dim::constant(k);
            Ok(Out::Many(vec![TensorTy::new(x.dtype, dims.clone()), TensorTy::new(DType::Int, dims)]))
        }
        Prim::CrossEntropy => {
            let (logits, targets) = (a.t(0), a.t(1));
            need_float(logits, 0, "cross_entropy")?;
            need_int(targets, 1, "the targets of `cross_entropy`")?;
            if logits.rank() != targets.rank() + 1 || logits.dims[..targets.rank()] != targets.dims[..] {
                return Err(err(format!(
                    "`cross_entropy` needs logits [..., classes] and targets [...]: found {} and {}",
                    shape_text(&logits.dims),
                    shape_text(&targets.dims)
                ))
                .at(0, format!("logits {}", shape_text(&logits.dims)))
                .at(1, format!("targets {}", shape_text(&targets.dims))));
            }
            one(TensorTy::scalar(DType::F32))
        }
        Prim::Mse => {
            let (p, t) = (a.t(0), a.t(1));
            if p.dims != t.dims {
                return Err(err(format!(
                    "`mse` needs equal shapes, found {} and {}",
                    shape_text(&p.dims),
                    shape_text(&t.dims)
                ))
                .at(0, "prediction")
                .at(1, "target"));
            }
            one(TensorTy::scalar(DType::F32))
        }
        Prim::AddLoss => {
            let loss = a.t(1);
            if loss.rank() != 0 {
                return Err(err(format!("an added loss must be a scalar, found {}", shape_text(&loss.dims)))
                    .at(1, "here")
                    .help("reduce it with `sum` or `mean`"));
            }
            one(a.t(0).clone())
        }
        Prim::Route => unreachable!("bug: `route` is typed by the checker's call walk"),
    }
}

/// Broadcast of two operands of an elementwise operation.
pub fn elementwise(x: &TensorTy, y: &TensorTy, xi: usize, yi: usize) -> Result<TensorTy, PrimError> {
    if x.dtype != y.dtype {
        return Err(err(format!("element types differ: {} and {}", x.dtype.as_str(), y.dtype.as_str()))
            .at(xi, format!("this is {x}"))
            .at(yi, format!("this is {y}"))
            .help("convert one side with `float(...)` or `int(...)`"));
    }
    let dims = broadcast(&x.dims, &y.dims).map_err(|(p, q)| {
        err(format!("shapes {} and {} do not broadcast", shape_text(&x.dims), shape_text(&y.dims)))
            .at(xi, format!("this has shape {}", shape_text(&x.dims)))
            .at(yi, format!("this has shape {}", shape_text(&y.dims)))
            .help(format!("sizes {p} and {q} differ and neither is 1"))
    })?;
    Ok(TensorTy::new(x.dtype, dims))
}

/// NumPy `matmul`: batch axes broadcast, 1-D operands are vectors.
pub fn matmul(x: &TensorTy, y: &TensorTy) -> Result<TensorTy, PrimError> {
    for (i, t) in [x, y].into_iter().enumerate() {
        if t.dtype != DType::F32 {
            return Err(
                err(format!("`@` needs float tensors, found {}", t.dtype.as_str())).at(i, format!("this is {t}"))
            );
        }
        if t.rank() == 0 {
            return Err(err("`@` needs tensors of rank at least 1").at(i, "this is a scalar").help("use `*` to scale"));
        }
    }
    let xv = x.rank() == 1;
    let yv = y.rank() == 1;
    let xd: Vec<Dim> = if xv { vec![Dim::constant(1), x.dims[0].clone()] } else { x.dims.clone() };
    let yd: Vec<Dim> = if yv { vec![y.dims[0].clone(), Dim::constant(1)] } else { y.dims.clone() };
    let (n, k) = (&xd[xd.len() - 2], &xd[xd.len() - 1]);
    let (k2, m) = (&yd[yd.len() - 2], &yd[yd.len() - 1]);
    if k != k2 {
        return Err(err(format!(
            "matrix product of {} and {}: inner sizes {k} and {k2} differ",
            shape_text(&x.dims),
            shape_text(&y.dims)
        ))
        .at(0, format!("has {k} columns"))
        .at(1, format!("has {k2} rows"))
        .help("transpose one side (`transpose(w)`) or check the layer's sizes"));
    }
    let batch = broadcast(&xd[..xd.len() - 2], &yd[..yd.len() - 2]).map_err(|(p, q)| {
        err(format!("batch axes of {} and {} do not broadcast ({p} vs {q})", shape_text(&x.dims), shape_text(&y.dims)))
            .at(0, "left")
            .at(1, "right")
    })?;
    let mut dims = batch;
    if !xv {
        dims.push(n.clone());
    }
    if !yv {
        dims.push(m.clone());
    }
    Ok(TensorTy::new(DType::F32, dims))
}

/// `conv1d` / `conv2d` as PyTorch's `F.conv1d` / `F.conv2d`: `x [B, C, *S]`,
/// `weight [O, C / groups, *K]` -> `[B, O, *P]` with, on each spatial axis,
/// P = (S + 2 padding - dilation (K - 1) - 1) / stride + 1.
fn conv(a: &Args, spatial: usize) -> Result<TensorTy, PrimError> {
    let name = if spatial == 1 { "conv1d" } else { "conv2d" };
    let (x, w) = (a.t(0), a.t(1));
    let axes = if spatial == 1 { "[batch, channels, length]" } else { "[batch, channels, height, width]" };
    for (i, t) in [x, w].into_iter().enumerate() {
        need_float(t, i, name)?;
        if t.rank() != spatial + 2 {
            let what = match i {
                0 => format!("the input must be {axes}"),
                _ => format!("the weight must be [out, in / groups, {}]", kernel_axes(spatial)),
            };
            return Err(err(format!("{what}, found {}", shape_text(&t.dims))).at(i, "here").help(if i == 0 {
                "add a batch axis of 1 with `unsqueeze(x, 0)`"
            } else {
                "the weight as PyTorch lays it out"
            }));
        }
    }
    let per_axis = |i: usize, what: &str, least: i64| -> Result<Vec<i64>, PrimError> {
        let vs = a.ints(i);
        let vs = if vs.len() == 1 { vec![vs[0]; spatial] } else { vs };
        if vs.len() != spatial {
            return Err(err(format!("one {what} or {spatial} are needed, found {}", vs.len())).at(i, "here"));
        }
        match vs.iter().find(|v| **v < least) {
            Some(v) => Err(err(format!("{what} {v} is less than {least}")).at(i, "here")),
            None => Ok(vs),
        }
    };
    let (stride, padding, dilation) =
        (per_axis(3, "stride", 1)?, per_axis(4, "padding", 0)?, per_axis(5, "dilation", 1)?);
    let groups = a.int(6);
    let (channels, out) = (&x.dims[1], &w.dims[0]);
    let whole = |d: &Dim| d.div(&Dim::constant(groups)).is_some();
    if groups < 1 || !whole(channels) || !whole(out) {
        return Err(err(format!("{groups} groups do not divide {channels} input and {out} output channels"))
            .at(6, "here")
            .at(0, format!("{channels} channels"))
            .at(1, format!("{out} output channels")));
    }
    if channels.div(&Dim::constant(groups)).as_ref() != Some(&w.dims[1]) {
        return Err(err(format!(
            "{channels} channels in {groups} group(s) need a weight of {} inputs per output, found {}",
            channels.div(&Dim::constant(groups)).unwrap_or_else(|| channels.clone()),
            w.dims[1]
        ))
        .at(0, format!("this has shape {}", shape_text(&x.dims)))
        .at(1, format!("this has shape {}", shape_text(&w.dims))));
    }
    if let Some(b) = a.opt_t(2)
        && b.dims != [out.clone()]
    {
        return Err(err(format!("the bias of `{name}` must be [{out}], found {}", shape_text(&b.dims))).at(2, "here"));
    }
    let mut dims = vec![x.dims[0].clone(), out.clone()];
    for i in 0..spatial {
        let Some(k) = w.dims[2 + i].as_const() else {
            return Err(err(format!("the kernel size {} of `{name}` is not a number", w.dims[2 + i]))
                .at(1, "here")
                .help("give the weight a fixed size"));
        };
        let size = &x.dims[2 + i];
        // S + 2p - d(K - 1) - 1, then divided by the stride.
        let reach = 2 * padding[i] - dilation[i] * (k - 1) - 1;
        let span = size.add(&Dim::constant(reach));
        // A number of positions rounds down, as in PyTorch; a symbolic
        // one must divide exactly.
        let steps = match span.as_const() {
            Some(n) if n >= 0 => Some(Dim::constant(n / stride[i])),
            Some(_) => Some(Dim::constant(-1)),
            None => span.div(&Dim::constant(stride[i])),
        };
        let Some(steps) = steps else {
            return Err(err(format!(
                "stride {} over {size} (padded by {}) does not give a whole number of positions",
                stride[i], padding[i]
            ))
            .at(0, format!("this has shape {}", shape_text(&x.dims)))
            .help(format!("make {size} a number (a hyperparameter of the layer)")));
        };
        let p = steps.add(&Dim::constant(1));
        if p.as_const().is_some_and(|p| p < 1) {
            return Err(err(format!(
                "`{name}`'s kernel of {k} (dilation {}) does not fit in {size} padded by {}",
                dilation[i], padding[i]
            ))
            .at(0, format!("this has shape {}", shape_text(&x.dims)))
            .at(1, format!("this has shape {}", shape_text(&w.dims))));
        }
        dims.push(p);
    }
    Ok(TensorTy::new(DType::F32, dims))
}

fn kernel_axes(spatial: usize) -> &'static str {
    if spatial == 1 { "kernel" } else { "kernel_h, kernel_w" }
}

fn attend(a: &Args) -> Result<Out, PrimError> {
    let (q, k, v) = (a.t(0), a.t(1), a.t(2));
    for (i, t) in [q, k, v].into_iter().enumerate() {
        need_float(t, i, "attend")?;
        if t.rank() != 4 {
            return Err(err(format!(
                "`attend` takes [batch, time, heads, head_dim] tensors, found {}",
                shape_text(&t.dims)
            ))
            .at(i, "here")
            .help("split the heads first: `q_proj(x).split(-1, [heads, head_dim])`"));
        }
    }
    if q.dims[0] != k.dims[0] || k.dims[0] != v.dims[0] {
        return Err(err("query, key and value have different batch sizes")
            .at(0, format!("{q}"))
            .at(1, format!("{k}"))
            .at(2, format!("{v}")));
    }
    if k.dims[1] != v.dims[1] || k.dims[2] != v.dims[2] {
        return Err(err(format!(
            "keys {} and values {} must agree on time and heads",
            shape_text(&k.dims),
            shape_text(&v.dims)
        ))
        .at(1, "keys")
        .at(2, "values"));
    }
    if q.dims[3] != k.dims[3] {
        return Err(err(format!("query head size {} differs from key head size {}", q.dims[3], k.dims[3]))
            .at(0, "query")
            .at(1, "key"));
    }
    if let (Some(h), Some(g)) = (q.dims[2].as_const(), k.dims[2].as_const())
        && (g == 0 || h % g != 0)
    {
        return Err(err(format!("{h} query heads cannot share {g} key/value heads"))
            .at(0, format!("{h} heads"))
            .at(1, format!("{g} heads"))
            .help("grouped-query attention needs the query heads to be a multiple of the key/value heads"));
    }
    if let Some(w) = a.opt_int(4)
        && w < 1
    {
        return Err(err(format!("attention window {w} must be at least 1")).at(4, "here"));
    }
    if let Some(mask) = a.opt_t(5) {
        let (b, t, s) = (&q.dims[0], &q.dims[1], &k.dims[1]);
        let ok = match mask.rank() {
            2 => mask.dims[0] == *b && mask.dims[1] == *s,
            3 => mask.dims[0] == *b && mask.dims[1] == *t && mask.dims[2] == *s,
            _ => false,
        };
        if !ok || mask.dtype == DType::F32 {
            return Err(err(format!("an attention mask must be [batch, key_time] or [batch, query_time, key_time] of int or bool: here [{b}, {s}] or [{b}, {t}, {s}], found {mask}")).at(5, "this mask"));
        }
    }
    if let Some(cap) = a.opt_float(7)
        && !(cap > 0.0 && cap.is_finite())
    {
        return Err(err(format!("a soft cap of the scores must be a positive number, found {cap}")).at(7, "here"));
    }
    let mut dims = q.dims.clone();
    dims[3] = v.dims[3].clone();
    Ok(Out::One(TensorTy::new(DType::F32, dims)))
}

/// Replaces one `-1` in a target shape by what the element count implies.
fn fill_wildcard(from: &[Dim], mut to: Vec<Dim>, arg: usize) -> Result<Vec<Dim>, PrimError> {
    let minus_one = Dim::constant(-1);
    let holes = to.iter().filter(|d| **d == minus_one).count();
    if holes > 1 {
        return Err(err("at most one size may be -1").at(arg, "here"));
    }
    if holes == 1 {
        let known: Vec<Dim> = to.iter().filter(|d| **d != minus_one).cloned().collect();
        let inferred = product(from).div(&product(&known)).ok_or_else(|| {
            err(format!(
                "cannot infer the -1 in {}: {} is not divisible by {}",
                shape_text(&to),
                product(from),
                product(&known)
            ))
            .at(arg, "here")
        })?;
        for d in &mut to {
            if *d == minus_one {
                *d = inferred.clone();
            }
        }
    }
    if let Some(bad) = to.iter().find(|d| d.as_const().is_some_and(|v| v < 1)) {
        return Err(err(format!("size {bad} must be at least 1")).at(arg, "here"));
    }
    Ok(to)
}
