//! Shape inference through `forward` bodies. Each call of a layer is walked
//! with the actual argument types (like inlining), so `...` and symbolic
//! sizes such as `B` and `T` are bound per call and checked exactly.
//! A failed expression yields `Ty::Error`, so independent errors are all
//! reported while errors caused by an earlier one are not.

use super::elaborate::{Checker, Env, FieldInst, InstId};
use super::prims::{self, Prim};
use super::value::Value;
use crate::diag::{Diagnostic, suggest};
use crate::ir::graph::{Binary as IrBinary, NodeId, Origin, Unary as IrUnary};
use crate::ir::lower::LArg;
use crate::source::Span;
use crate::syntax::ast::*;
use crate::types::Dim;
use crate::types::{TensorTy, shape_text};
use std::collections::HashMap;

/// A tensor value during the walk: its type and, when lowering, its IR node.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub ty: TensorTy,
    pub node: Option<NodeId>,
}

impl std::ops::Deref for Tensor {
    type Target = TensorTy;
    fn deref(&self) -> &TensorTy {
        &self.ty
    }
}

impl std::fmt::Display for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ty.fmt(f)
    }
}

/// What a forward expression is.
#[derive(Clone, Debug)]
pub enum Ty {
    Value(Value),
    Tensor(Tensor),
    Layer(InstId),
    Stack(Vec<InstId>),
    /// The first parts of a field's path (`model` of `model.layers`): only
    /// a member access continues it.
    Path(InstId, String),
    Tuple(Vec<Ty>),
    /// Already reported; silences follow-on errors.
    Error,
}

impl Ty {
    pub fn tensor(ty: TensorTy, node: Option<NodeId>) -> Ty {
        Ty::Tensor(Tensor { ty, node })
    }

    pub fn describe(&self) -> String {
        match self {
            Ty::Value(v) => format!("{} `{v}`", v.kind()),
            Ty::Tensor(t) => format!("a tensor {t}"),
            Ty::Layer(_) => "a layer".into(),
            Ty::Stack(_) => "a stack of layers".into(),
            Ty::Path(_, p) => format!("the path `{p}.` of fields"),
            Ty::Tuple(items) => format!("{} values", items.len()),
            Ty::Error => "an error".into(),
        }
    }
}

/// The scope of one forward body.
pub struct Frame {
    pub inst: InstId,
    pub locals: HashMap<String, Ty>,
    /// Symbolic sizes bound by the inputs' shapes.
    pub dims: HashMap<String, Dim>,
}

/// An evaluated call argument.
pub struct CallArg {
    pub name: Option<Name>,
    pub ty: Ty,
    pub span: Span,
}

impl Checker<'_> {
    pub(super) fn module_of(&self, inst: InstId) -> usize {
        self.instances[inst].def.module
    }

    pub(super) fn field_ty(&mut self, inst: InstId, name: &str) -> Option<Ty> {
        let (_, f) = self.instances[inst].fields.iter().find(|(n, _)| n == name)?;
        Some(match f {
            FieldInst::Param(p) => {
                let info = &self.params[*p];
                let ty = TensorTy::new(info.dtype, info.shape.iter().map(|d| Dim::constant(*d)).collect());
                let node = self.lower.as_mut().map(|l| l.g.param(&info.name, ty.clone()));
                Ty::tensor(ty, node)
            }
            FieldInst::Sub(i) => Ty::Layer(*i),
            FieldInst::Stack(ids) => Ty::Stack(ids.clone()),
            FieldInst::Absent => Ty::Value(Value::None),
        })
    }

    /// Whether some field's name continues the path `prefix.`.
    fn path_of_fields(&self, inst: InstId, prefix: &str) -> bool {
        self.instances[inst].fields.iter().any(|(n, _)| n.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')))
    }

    pub(super) fn lookup(&mut self, frame: &Frame, name: &str) -> Option<Ty> {
        if let Some(t) = frame.locals.get(name) {
            return Some(t.clone());
        }
        if let Some(d) = frame.dims.get(name) {
            return Some(Ty::Value(Value::from_dim(d.clone())));
        }
        if let Some(t) = self.field_ty(frame.inst, name) {
            return Some(t);
        }
        if self.path_of_fields(frame.inst, name) {
            return Some(Ty::Path(frame.inst, name.to_string()));
        }
        self.instances[frame.inst].env.get(name).map(|v| match v {
            Value::Instance(i) => Ty::Layer(*i),
            v => Ty::Value(v.clone()),
        })
    }

    pub(super) fn unknown_in_forward(&mut self, frame: &Frame, name: &str, span: Span) {
        let inst = &self.instances[frame.inst];
        let mut candidates: Vec<String> = frame.locals.keys().cloned().collect();
        candidates.extend(frame.dims.keys().cloned());
        candidates.extend(inst.fields.iter().map(|(n, _)| n.split('.').next().unwrap_or(n).to_string()));
        candidates.extend(inst.env.keys().cloned());
        candidates.extend(Prim::names().map(String::from));
        let mut d = Diagnostic::at("E0104", span, format!("unknown name `{name}`"));
        if let Some(s) = suggest(name, candidates.iter().map(String::as_str)) {
            d = d.help(s);
        } else if name.chars().next().is_some_and(char::is_uppercase) {
            d = d.help(format!(
                "a layer must be declared as a field (`{}: {name}(...)`) before `forward` can call it",
                name.to_lowercase()
            ));
        }
        self.error(d);
    }

    /// Evaluates a forward expression of the instance's module. The IR it
    /// lowers to remembers the expression (`ir::graph::Origin`): the
    /// innermost one, as sub-expressions set their own.
    pub fn eval(&mut self, frame: &mut Frame, e: ExprId) -> Ty {
        let span = self.module(self.module_of(frame.inst)).expr(e).span;
        let Some(l) = self.lower.as_mut() else { return self.eval_expr(frame, e) };
        let outer = l.g.at.replace(Origin { span, instance: frame.inst.index() as u32 });
        let t = self.eval_expr(frame, e);
        if let Some(l) = self.lower.as_mut() {
            l.g.at = outer;
        }
        t
    }

    fn eval_expr(&mut self, frame: &mut Frame, e: ExprId) -> Ty {
        let m = self.module_of(frame.inst);
        let module = self.module(m);
        let expr = module.expr(e);
        let span = expr.span;
        match &expr.kind {
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::None | ExprKind::Str(_) => {
                let env = Env::new();
                self.eval_static(m, &env, e, false).map_or(Ty::Error, Ty::Value)
            }
            ExprKind::Name(n) => match self.lookup(frame, n) {
                Some(t) => t,
                None => {
                    self.unknown_in_forward(frame, n, span);
                    Ty::Error
                }
            },
            ExprKind::List(items) => {
                let tys: Vec<Ty> = items.iter().map(|i| self.eval(frame, *i)).collect();
                if tys.iter().any(|t| matches!(t, Ty::Error)) {
                    return Ty::Error;
                }
                if tys.iter().all(|t| matches!(t, Ty::Value(_))) {
                    Ty::Value(Value::List(
                        tys.into_iter().map(|t| if let Ty::Value(v) = t { v } else { unreachable!() }).collect(),
                    ))
                } else {
                    Ty::Tuple(tys)
                }
            }
            ExprKind::Unary(op, x) => {
                let t = self.eval(frame, *x);
                match (&t, op) {
                    (Ty::Error, _) => Ty::Error,
                    (Ty::Value(v), _) => match (op, v) {
                        (UnOp::Neg, Value::Int(i)) => Ty::Value(Value::Int(-i)),
                        (UnOp::Neg, Value::Float(f)) => Ty::Value(Value::Float(-f)),
                        (UnOp::Neg, Value::Dim(d)) => Ty::Value(Value::Dim(d.neg())),
                        (UnOp::Not, Value::Bool(b)) => Ty::Value(Value::Bool(!b)),
                        _ => {
                            self.error(Diagnostic::at(
                                "E0201",
                                span,
                                format!(
                                    "cannot apply `{}` to {}",
                                    if *op == UnOp::Neg { "-" } else { "not" },
                                    t.describe()
                                ),
                            ));
                            Ty::Error
                        }
                    },
                    (Ty::Tensor(tt), UnOp::Neg) if tt.dtype != DType::Bool => {
                        let node = self.emit(|l| l.g.unary(IrUnary::Neg, tt.node.expect("lowering")));
                        Ty::tensor(tt.ty.clone(), node)
                    }
                    (Ty::Tensor(tt), UnOp::Not) if tt.dtype == DType::Bool => {
                        let node = self.emit(|l| l.g.unary(IrUnary::Not, tt.node.expect("lowering")));
                        Ty::tensor(tt.ty.clone(), node)
                    }
                    _ => {
                        let what = if *op == UnOp::Neg { "`-`" } else { "`not`" };
                        self.error(Diagnostic::at("E0306", span, format!("cannot apply {what} to {}", t.describe())));
                        Ty::Error
                    }
                }
            }
            ExprKind::Binary(BinOp::Pipe, l, r) => {
                let lt = self.eval(frame, *l);
                let first = CallArg { name: None, ty: lt, span: module.expr(*l).span };
                match &module.expr(*r).kind {
                    ExprKind::Call { callee, args } => {
                        let mut all = vec![first];
                        all.extend(self.eval_args(frame, args));
                        self.call(frame, *callee, all, span)
                    }
                    _ => self.call(frame, *r, vec![first], span),
                }
            }
            ExprKind::Binary(op, l, r) => {
                let lt = self.eval(frame, *l);
                let rt = self.eval(frame, *r);
                self.binary(m, e, *op, lt, rt, span, module.expr(*l).span, module.expr(*r).span)
            }
            ExprKind::Call { callee, args } => {
                let args = self.eval_args(frame, args);
                self.call(frame, *callee, args, span)
            }
            ExprKind::Member { base, name } => {
                let b = self.eval(frame, *base);
                self.member(b, name, span)
            }
            ExprKind::Index { base, items } => {
                let b = self.eval(frame, *base);
                self.index(frame, b, items, span)
            }
            ExprKind::If { cond, then, otherwise } => match self.eval(frame, *cond) {
                Ty::Value(Value::Bool(true)) => self.eval(frame, *then),
                Ty::Value(Value::Bool(false)) => self.eval(frame, *otherwise),
                Ty::Error => Ty::Error,
                other => {
                    let d = Diagnostic::at(
                        "E0201",
                        module.expr(*cond).span,
                        format!("the condition of `if` must be known before running, found {}", other.describe()),
                    )
                    .help("for a choice per element, use `where(cond, a, b)`");
                    self.error(d);
                    Ty::Error
                }
            },
        }
    }

    pub(super) fn frame_env(&self, frame: &Frame) -> Env {
        let mut env = self.instances[frame.inst].env.clone();
        for (k, d) in &frame.dims {
            env.insert(k.clone(), Value::from_dim(d.clone()));
        }
        for (k, t) in &frame.locals {
            if let Ty::Value(v) = t {
                env.insert(k.clone(), v.clone());
            }
        }
        env
    }

    pub(super) fn eval_args(&mut self, frame: &mut Frame, args: &[Arg]) -> Vec<CallArg> {
        let m = self.module_of(frame.inst);
        args.iter()
            .map(|a| CallArg {
                name: a.name.clone(),
                ty: self.eval(frame, a.value),
                span: self.module(m).expr(a.value).span,
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn binary(
        &mut self,
        m: usize,
        e: ExprId,
        op: BinOp,
        lt: Ty,
        rt: Ty,
        span: Span,
        ls: Span,
        rs: Span,
    ) -> Ty {
        let is_none = |t: &Ty| matches!(t, Ty::Value(Value::None));
        if matches!(op, BinOp::Eq | BinOp::Ne)
            && (is_none(&lt) || is_none(&rt))
            && !matches!(lt, Ty::Error)
            && !matches!(rt, Ty::Error)
        {
            // `x != none` asks whether an optional input or field is present.
            let same = is_none(&lt) == is_none(&rt);
            return Ty::Value(Value::Bool(same == (op == BinOp::Eq)));
        }
        match (&lt, &rt) {
            (Ty::Error, _) | (_, Ty::Error) => Ty::Error,
            (Ty::Value(a), Ty::Value(b)) => {
                let module = self.module(m);
                let ExprKind::Binary(_, l, r) = module.expr(e).kind else { unreachable!("binary expression") };
                self.static_binary(op, a, b, span, ls, rs, module, l, r).map_or(Ty::Error, Ty::Value)
            }
            (Ty::Tensor(_) | Ty::Value(_), Ty::Tensor(_) | Ty::Value(_)) => {
                let as_tensor = |t: &Ty, other: &Ty| -> Option<TensorTy> {
                    match t {
                        Ty::Tensor(t) => Some(t.ty.clone()),
                        Ty::Value(Value::Float(_)) => Some(TensorTy::scalar(DType::F32)),
                        Ty::Value(Value::Int(_) | Value::Dim(_)) => {
                            // A whole number takes the other side's element type.
                            let dt = if let Ty::Tensor(o) = other { o.dtype } else { DType::F32 };
                            Some(TensorTy::scalar(if dt == DType::Bool { DType::Int } else { dt }))
                        }
                        Ty::Value(Value::Bool(_)) => Some(TensorTy::scalar(DType::Bool)),
                        _ => None,
                    }
                };
                let (Some(x), Some(y)) = (as_tensor(&lt, &rt), as_tensor(&rt, &lt)) else {
                    self.error(
                        Diagnostic::at(
                            "E0306",
                            span,
                            format!("cannot apply `{}` to {} and {}", op.symbol(), lt.describe(), rt.describe()),
                        )
                        .label(ls, "left")
                        .label(rs, "right"),
                    );
                    return Ty::Error;
                };
                let result = if op == BinOp::MatMul { prims::matmul(&x, &y) } else { prims::elementwise(&x, &y, 0, 1) };
                match result {
                    Ok(t) => {
                        let t = match op {
                            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                                t.with_dtype(DType::Bool)
                            }
                            BinOp::And | BinOp::Or if t.dtype != DType::Bool => {
                                self.error(
                                    Diagnostic::at("E0306", span, format!("`{}` needs bool tensors", op.symbol()))
                                        .label(ls, format!("{x}"))
                                        .label(rs, format!("{y}")),
                                );
                                return Ty::Error;
                            }
                            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::Pow
                                if t.dtype == DType::Bool =>
                            {
                                self.error(
                                    Diagnostic::at(
                                        "E0306",
                                        span,
                                        format!("arithmetic on bool tensors with `{}`", op.symbol()),
                                    )
                                    .help("convert with `float(x)`"),
                                );
                                return Ty::Error;
                            }
                            _ => t,
                        };
                        let node =
                            if self.lower.is_some() { Some(self.lower_binary(op, &lt, &rt, &x, &y)) } else { None };
                        Ty::tensor(t, node)
                    }
                    Err(pe) => {
                        self.prim_error(pe, span, &[ls, rs], &format!("`{}`", op.symbol()));
                        Ty::Error
                    }
                }
            }
            _ => {
                let d = Diagnostic::at(
                    "E0306",
                    span,
                    format!("cannot apply `{}` to {} and {}", op.symbol(), lt.describe(), rt.describe()),
                )
                .label(ls, lt.describe())
                .label(rs, rt.describe());
                let d = if matches!(lt, Ty::Layer(_)) || matches!(rt, Ty::Layer(_)) {
                    d.help("call the layer first, e.g. `mlp(x)`")
                } else {
                    d
                };
                self.error(d);
                Ty::Error
            }
        }
    }

    pub(super) fn prim_error(&mut self, pe: prims::PrimError, span: Span, arg_spans: &[Span], what: &str) {
        let code = if pe.message.contains("element type")
            || pe.message.contains("float tensor")
            || pe.message.contains("int tensor")
        {
            "E0306"
        } else {
            "E0301"
        };
        let mut d = Diagnostic::new(code, format!("{what}: {}", pe.message));
        d = d.label(span, "in this expression");
        for (i, label) in pe.args {
            let s = arg_spans.get(i).copied().unwrap_or(span);
            d = d.label(s, label);
        }
        // Put the most specific location first.
        if d.labels.len() > 1 {
            let first = d.labels.remove(0);
            d.labels.push(first);
        }
        if let Some(h) = pe.help {
            d = d.help(h);
        }
        self.error(d);
    }

    pub(super) fn member(&mut self, base: Ty, name: &Name, span: Span) -> Ty {
        match base {
            Ty::Error => Ty::Error,
            Ty::Layer(i) => match self.field_ty(i, &name.text) {
                Some(t) => t,
                None => {
                    let fields: Vec<String> = self.instances[i].fields.iter().map(|(n, _)| n.clone()).collect();
                    let layer = self.p.item_name(self.instances[i].def).to_string();
                    let mut d = Diagnostic::at("E0104", name.span, format!("`{layer}` has no field `{}`", name.text));
                    d = d.help(
                        suggest(&name.text, fields.iter().map(String::as_str))
                            .unwrap_or_else(|| format!("its fields are: {}", fields.join(", "))),
                    );
                    self.error(d);
                    Ty::Error
                }
            },
            Ty::Path(i, prefix) => {
                let path = format!("{prefix}.{}", name.text);
                if let Some(t) = self.field_ty(i, &path) {
                    return t;
                }
                if self.path_of_fields(i, &path) {
                    return Ty::Path(i, path);
                }
                let under: Vec<String> = self.instances[i]
                    .fields
                    .iter()
                    .filter_map(|(n, _)| n.strip_prefix(&format!("{prefix}.")).map(String::from))
                    .collect();
                let d = Diagnostic::at("E0104", name.span, format!("no field is named `{path}`"));
                let d = d.help(
                    suggest(&name.text, under.iter().map(String::as_str))
                        .unwrap_or_else(|| format!("the fields under `{prefix}.` are: {}", under.join(", "))),
                );
                self.error(d);
                Ty::Error
            }
            Ty::Stack(ids) => match name.text.parse::<usize>() {
                Ok(k) if k < ids.len() => Ty::Layer(ids[k]),
                _ => {
                    self.error(Diagnostic::at(
                        "E0104",
                        name.span,
                        format!("a stack of {} layers has no member `{}`", ids.len(), name.text),
                    ));
                    Ty::Error
                }
            },
            other => {
                let d = Diagnostic::at("E0104", span, format!("{} has no field `{}`", other.describe(), name.text));
                let d = if prims::signature(&name.text).is_some() {
                    d.help(format!("`x.{}(...)` calls a primitive; add the parentheses", name.text))
                } else {
                    d
                };
                self.error(d);
                Ty::Error
            }
        }
    }

    pub(super) fn index(&mut self, frame: &mut Frame, base: Ty, items: &[IndexItem], span: Span) -> Ty {
        let t = match base {
            Ty::Error => return Ty::Error,
            Ty::Tensor(t) => t,
            Ty::Stack(ids) => {
                if let [IndexItem::At(e)] = items
                    && let Ty::Value(Value::Int(k)) = self.eval(frame, *e)
                    && k >= 0
                    && (k as usize) < ids.len()
                {
                    return Ty::Layer(ids[k as usize]);
                }
                self.error(Diagnostic::at(
                    "E0201",
                    span,
                    format!("a stack of {} layers is indexed by one int in range", ids.len()),
                ));
                return Ty::Error;
            }
            Ty::Tuple(items_t) => {
                if let [IndexItem::At(e)] = items
                    && let Ty::Value(Value::Int(k)) = self.eval(frame, *e)
                    && k >= 0
                    && (k as usize) < items_t.len()
                {
                    return items_t[k as usize].clone();
                }
                self.error(Diagnostic::at("E0201", span, "a tuple is indexed by one int in range"));
                return Ty::Error;
            }
            other => {
                self.error(Diagnostic::at("E0201", span, format!("cannot index {}", other.describe())));
                return Ty::Error;
            }
        };
        let rests = items.iter().filter(|i| matches!(i, IndexItem::Rest)).count();
        let explicit = items.len() - rests;
        if rests > 1 || explicit > t.rank() {
            self.error(
                Diagnostic::at("E0305", span, format!("{} indices for a tensor of rank {}", explicit, t.rank()))
                    .label(span, format!("indexing {t}")),
            );
            return Ty::Error;
        }
        let mut dims = Vec::new();
        let mut axis = 0;
        // (axis, start, end) of every slice and picked index, for lowering.
        let mut cuts: Vec<(usize, Dim, Dim)> = Vec::new();
        for item in items {
            match item {
                IndexItem::Rest => {
                    let skip = t.rank() - explicit;
                    dims.extend(t.dims[axis..axis + skip].iter().cloned());
                    axis += skip;
                }
                IndexItem::At(e) => {
                    match self.eval(frame, *e) {
                        Ty::Value(v) if v.as_dim().is_some() => {
                            let d = v.as_dim().expect("checked");
                            let size = t.dims[axis].clone();
                            let start = if d.as_const().is_some_and(|c| c < 0) { size.add(&d) } else { d };
                            let end = start.add(&Dim::constant(1));
                            if size.as_const().zip(start.as_const()).is_some_and(|(s, i)| i < 0 || i >= s) {
                                self.error(Diagnostic::at(
                                    "E0305",
                                    span,
                                    format!("index {start} is out of range for an axis of size {size}"),
                                ));
                                return Ty::Error;
                            }
                            cuts.push((axis, start, end));
                        }
                        Ty::Error => return Ty::Error,
                        other => {
                            self.error(
                                Diagnostic::at(
                                    "E0201",
                                    span,
                                    format!("an index must be an int, found {}", other.describe()),
                                )
                                .help("to pick rows by a tensor of ids, use `gather(table, ids)`"),
                            );
                            return Ty::Error;
                        }
                    }
                    axis += 1;
                }
                IndexItem::Slice(lo, hi) => {
                    let size = t.dims[axis].clone();
                    let mut bound = |e: Option<ExprId>, default: Dim, this: &mut Self| -> Option<Dim> {
                        let Some(e) = e else { return Some(default) };
                        match this.eval(frame, e) {
                            Ty::Value(v) => {
                                let d = v.as_dim()?;
                                // Negative constants count from the end.
                                Some(match d.as_const() {
                                    Some(c) if c < 0 => size.add(&d),
                                    _ => d,
                                })
                            }
                            _ => None,
                        }
                    };
                    let (Some(l), Some(h)) = (bound(*lo, Dim::constant(0), self), bound(*hi, size.clone(), self))
                    else {
                        self.error(Diagnostic::at("E0201", span, "slice bounds must be ints or sizes"));
                        return Ty::Error;
                    };
                    let len = h.sub(&l);
                    if len.as_const().is_some_and(|v| v < 0)
                        || (size.as_const().zip(h.as_const()).is_some_and(|(s, h)| h > s))
                    {
                        self.error(Diagnostic::at(
                            "E0305",
                            span,
                            format!("slice {l}:{h} is out of range for an axis of size {size}"),
                        ));
                        return Ty::Error;
                    }
                    dims.push(len);
                    cuts.push((axis, l, h));
                    axis += 1;
                }
            }
        }
        dims.extend(t.dims[axis..].iter().cloned());
        let node = self.emit(|l| {
            let mut x = t.node.expect("lowering");
            for (axis, start, end) in cuts {
                x = l.g.slice(x, axis, start, end);
            }
            l.g.reshape(x, &dims)
        });
        Ty::tensor(TensorTy::new(t.dtype, dims), node)
    }

    /// Walks a forward's lets and result and checks the declared outputs.
    pub fn forward_body(&mut self, frame: &mut Frame, fwd: &Forward, rest: &mut Option<Vec<Dim>>) -> Ty {
        let m = self.module_of(frame.inst);
        for l in &fwd.lets {
            let t = self.eval(frame, l.value);
            if l.names.len() == 1 {
                frame.locals.insert(l.names[0].text.clone(), t);
                continue;
            }
            match t {
                Ty::Tuple(items) if items.len() == l.names.len() => {
                    for (n, t) in l.names.iter().zip(items) {
                        frame.locals.insert(n.text.clone(), t);
                    }
                }
                Ty::Error => {
                    for n in &l.names {
                        frame.locals.insert(n.text.clone(), Ty::Error);
                    }
                }
                other => {
                    self.error(Diagnostic::at(
                        "E0201",
                        l.span,
                        format!("cannot unpack {} into {} names", other.describe(), l.names.len()),
                    ));
                    for n in &l.names {
                        frame.locals.insert(n.text.clone(), Ty::Error);
                    }
                }
            }
        }
        let result = self.eval(frame, fwd.result);
        let results: Vec<Ty> = match (&result, fwd.outputs.len()) {
            (Ty::Error, _) => return Ty::Error,
            (Ty::Tuple(items), n) if n > 1 && items.len() == n => items.clone(),
            (_, 1) => vec![result.clone()],
            (other, n) => {
                self.error(Diagnostic::at(
                    "E0304",
                    self.module(m).expr(fwd.result).span,
                    format!("`forward` declares {n} outputs but returns {}", other.describe()),
                ));
                return Ty::Error;
            }
        };
        let result_span = self.module(m).expr(fwd.result).span;
        for (out, t) in fwd.outputs.iter().zip(&results) {
            let Ty::Tensor(t) = t else {
                self.error(
                    Diagnostic::at(
                        "E0304",
                        result_span,
                        format!("`forward` must return tensors, found {}", t.describe()),
                    )
                    .label(out.ty.span, "declared here"),
                );
                return Ty::Error;
            };
            if let Err(msg) = self.match_type(frame, &out.ty, t, rest) {
                let declared = self.declared_text(frame.inst, &out.ty);
                let d = Diagnostic::at("E0304", result_span, format!("`forward` returns {t} but declares {declared}"))
                    .label(result_span, format!("this is {t}"))
                    .label(out.ty.span, format!("declared here: {msg}"));
                self.error(d);
                return Ty::Error;
            }
        }
        result
    }

    /// Runs `f` on the lowering, if there is one.
    pub(super) fn emit(&mut self, f: impl FnOnce(&mut crate::ir::lower::Lowering) -> NodeId) -> Option<NodeId> {
        self.lower.as_mut().map(f)
    }

    fn lower_binary(&mut self, op: BinOp, lt: &Ty, rt: &Ty, x: &TensorTy, y: &TensorTy) -> NodeId {
        let l = self.lower.as_mut().expect("lowering");
        let a = l.operand(&larg(lt), x.dtype);
        let b = l.operand(&larg(rt), y.dtype);
        let ir = match op {
            BinOp::MatMul => return l.matmul(a, b),
            BinOp::Add => IrBinary::Add,
            BinOp::Sub => IrBinary::Sub,
            BinOp::Mul => IrBinary::Mul,
            BinOp::Div => IrBinary::Div,
            BinOp::Rem => IrBinary::Rem,
            BinOp::Pow => IrBinary::Pow,
            BinOp::Eq => IrBinary::Eq,
            BinOp::Ne => IrBinary::Ne,
            BinOp::Lt => IrBinary::Lt,
            BinOp::Le => IrBinary::Le,
            BinOp::Gt => IrBinary::Gt,
            BinOp::Ge => IrBinary::Ge,
            BinOp::And => IrBinary::And,
            BinOp::Or => IrBinary::Or,
            BinOp::Pipe => unreachable!("pipes are calls"),
        };
        l.g.binary(ir, a, b)
    }

    /// Writes a declared type with the instance's hyperparameters filled in.
    pub(super) fn declared_text(&self, inst: InstId, ty: &TensorType) -> String {
        let module = self.module(self.module_of(inst));
        let env = &self.instances[inst].env;
        let dims: Vec<String> = ty
            .dims
            .iter()
            .map(|d| match d {
                DimAst::Rest(_) => "...".to_string(),
                DimAst::Expr(e) => match &module.expr(*e).kind {
                    ExprKind::Name(n) if env.get(n).is_some_and(|v| v.as_dim().is_some()) => env[n].to_string(),
                    _ => crate::syntax::print_expr(module, *e),
                },
            })
            .collect();
        let dt = ty.dtype.filter(|d| *d != DType::F32).map(|d| format!(" {}", d.as_str())).unwrap_or_default();
        format!("[{}]{dt}", dims.join(", "))
    }

    /// Matches an actual tensor type against a declared one, binding `...`
    /// and symbolic sizes on first sight. Returns a reason on mismatch.
    pub fn match_type(
        &mut self,
        frame: &mut Frame,
        decl: &TensorType,
        actual: &TensorTy,
        rest: &mut Option<Vec<Dim>>,
    ) -> Result<(), String> {
        let want = decl.dtype.unwrap_or(DType::F32);
        if want != actual.dtype {
            return Err(format!("element type {} expected, found {}", want.as_str(), actual.dtype.as_str()));
        }
        let rest_at = decl.dims.iter().position(|d| matches!(d, DimAst::Rest(_)));
        let fixed = decl.dims.len() - usize::from(rest_at.is_some());
        if actual.rank() < fixed || (rest_at.is_none() && actual.rank() != fixed) {
            return Err(format!(
                "rank {} expected, found {}",
                if rest_at.is_some() { format!("at least {fixed}") } else { fixed.to_string() },
                actual.rank()
            ));
        }
        let mut axis = 0;
        for d in &decl.dims {
            match d {
                DimAst::Rest(_) => {
                    let n = actual.rank() - fixed;
                    let got = actual.dims[axis..axis + n].to_vec();
                    match rest {
                        Some(prev) if *prev != got => {
                            return Err(format!(
                                "`...` was {} for an earlier input, here {}",
                                shape_text(prev),
                                shape_text(&got)
                            ));
                        }
                        _ => *rest = Some(got),
                    }
                    axis += n;
                }
                DimAst::Expr(e) => {
                    let have = &actual.dims[axis];
                    let expected = self.decl_dim(frame, *e, have)?;
                    if expected != *have {
                        return Err(format!("axis {axis} should be {expected}, found {have}"));
                    }
                    axis += 1;
                }
            }
        }
        Ok(())
    }

    /// Evaluates a declared dimension; an unbound plain name binds to `have`.
    fn decl_dim(&mut self, frame: &mut Frame, e: ExprId, have: &Dim) -> Result<Dim, String> {
        let module = self.module(self.module_of(frame.inst));
        let env = &self.instances[frame.inst].env;
        match &module.expr(e).kind {
            ExprKind::Name(n) => {
                if let Some(v) = env.get(n) {
                    return v.as_dim().ok_or_else(|| format!("`{n}` is {}, not a size", v.kind()));
                }
                if let Some(d) = frame.dims.get(n) {
                    return Ok(d.clone());
                }
                frame.dims.insert(n.clone(), have.clone());
                Ok(have.clone())
            }
            ExprKind::Int(v) => Ok(Dim::constant(*v)),
            ExprKind::Binary(op, l, r) => {
                let (l, r) = (*l, *r);
                let a = self.decl_dim_closed(frame, l)?;
                let b = self.decl_dim_closed(frame, r)?;
                match op {
                    BinOp::Add => Ok(a.add(&b)),
                    BinOp::Sub => Ok(a.sub(&b)),
                    BinOp::Mul => Ok(a.mul(&b)),
                    BinOp::Div => a.div(&b).ok_or_else(|| match super::statics::whole_size_hint(&a) {
                        Some(h) => format!("{a} / {b} is not a whole size: {h}"),
                        None => format!("{a} / {b} is not a whole size"),
                    }),
                    _ => Err(format!("`{}` cannot appear in a shape", op.symbol())),
                }
            }
            _ => {
                let mut env = self.frame_env(frame);
                env.retain(|_, v| v.as_dim().is_some());
                let m = self.module_of(frame.inst);
                match self.eval_static(m, &env, e, false) {
                    Ok(v) => v.as_dim().ok_or_else(|| format!("a size is expected, found {}", v.kind())),
                    Err(()) => Err("this size could not be evaluated".into()),
                }
            }
        }
    }

    /// A declared dimension inside arithmetic: every name must be known.
    fn decl_dim_closed(&mut self, frame: &mut Frame, e: ExprId) -> Result<Dim, String> {
        let module = self.module(self.module_of(frame.inst));
        if let ExprKind::Name(n) = &module.expr(e).kind
            && !self.instances[frame.inst].env.contains_key(n)
            && !frame.dims.contains_key(n)
        {
            return Err(format!("size `{n}` is not bound by an earlier axis"));
        }
        self.decl_dim(frame, e, &Dim::constant(0))
    }
}

/// A walked value as a lowering argument.
pub fn larg(t: &Ty) -> LArg {
    match t {
        Ty::Tensor(t) => LArg::Node(t.node.expect("bug: lowering a tensor without a node")),
        Ty::Value(Value::Int(v)) => LArg::Int(*v),
        Ty::Value(Value::Float(v)) => LArg::Float(*v),
        Ty::Value(Value::Bool(b)) => LArg::Bool(*b),
        Ty::Value(Value::Dim(d)) => LArg::Size(d.clone()),
        Ty::Value(Value::List(items)) if items.iter().all(|v| matches!(v, Value::Int(_))) => {
            LArg::Ints(items.iter().map(|v| if let Value::Int(i) = v { *i } else { unreachable!() }).collect())
        }
        Ty::Value(Value::List(items)) if items.iter().all(|v| v.as_dim().is_some()) => {
            LArg::Sizes(items.iter().filter_map(Value::as_dim).collect())
        }
        Ty::Tuple(items) => LArg::Nodes(
            items
                .iter()
                .map(|i| if let LArg::Node(n) = larg(i) { n } else { unreachable!("bug: list of non-tensors") })
                .collect(),
        ),
        _ => LArg::Absent,
    }
}
