//! Shape inference through `forward` bodies. Each call of a layer is walked
//! with the actual argument types (like inlining), so `...` and symbolic
//! sizes such as `B` and `T` are bound per call and checked exactly.
//! A failed expression yields `Ty::Error`, so independent errors are all
//! reported while errors caused by an earlier one are not.

use super::dim::Dim;
use super::elaborate::{Checker, Env, FieldInst, InstId, MAX_DEPTH, STATIC_FUNCTIONS};
use super::prims::{self, Arg as PArg, Kind, Out, PRIMITIVES, UNARY_MATH};
use super::types::{TensorTy, shape_text};
use super::value::Value;
use crate::diag::{Diagnostic, suggest};
use crate::source::Span;
use crate::syntax::ast::*;
use std::collections::HashMap;

/// What a forward expression is.
#[derive(Clone, Debug)]
pub enum Ty {
    Value(Value),
    Tensor(TensorTy),
    Layer(InstId),
    Stack(Vec<InstId>),
    Tuple(Vec<Ty>),
    /// Already reported; silences follow-on errors.
    Error,
}

impl Ty {
    fn describe(&self) -> String {
        match self {
            Ty::Value(v) => format!("{} `{v}`", v.kind()),
            Ty::Tensor(t) => format!("a tensor {t}"),
            Ty::Layer(_) => "a layer".into(),
            Ty::Stack(_) => "a stack of layers".into(),
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
    fn module_of(&self, inst: InstId) -> usize {
        self.instances[inst].def.module
    }

    fn field_ty(&self, inst: InstId, name: &str) -> Option<Ty> {
        let (_, f) = self.instances[inst].fields.iter().find(|(n, _)| n == name)?;
        Some(match f {
            FieldInst::Param(p) => {
                let info = &self.params[*p];
                Ty::Tensor(TensorTy::new(info.dtype, info.shape.iter().map(|d| Dim::constant(*d)).collect()))
            }
            FieldInst::Sub(i) => Ty::Layer(*i),
            FieldInst::Stack(ids) => Ty::Stack(ids.clone()),
            FieldInst::Absent => Ty::Value(Value::None),
        })
    }

    fn lookup(&self, frame: &Frame, name: &str) -> Option<Ty> {
        if let Some(t) = frame.locals.get(name) {
            return Some(t.clone());
        }
        if let Some(d) = frame.dims.get(name) {
            return Some(Ty::Value(Value::from_dim(d.clone())));
        }
        if let Some(t) = self.field_ty(frame.inst, name) {
            return Some(t);
        }
        self.instances[frame.inst].env.get(name).map(|v| match v {
            Value::Instance(i) => Ty::Layer(*i),
            v => Ty::Value(v.clone()),
        })
    }

    fn unknown_in_forward(&mut self, frame: &Frame, name: &str, span: Span) {
        let inst = &self.instances[frame.inst];
        let mut candidates: Vec<String> = frame.locals.keys().cloned().collect();
        candidates.extend(frame.dims.keys().cloned());
        candidates.extend(inst.fields.iter().map(|(n, _)| n.clone()));
        candidates.extend(inst.env.keys().cloned());
        candidates.extend(PRIMITIVES.iter().map(|(n, _)| n.to_string()));
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

    /// Evaluates a forward expression of the instance's module.
    pub fn eval(&mut self, frame: &mut Frame, e: ExprId) -> Ty {
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
                    (Ty::Tensor(tt), UnOp::Neg) if tt.dtype != DType::Bool => t.clone(),
                    (Ty::Tensor(tt), UnOp::Not) if tt.dtype == DType::Bool => t.clone(),
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

    fn frame_env(&self, frame: &Frame) -> Env {
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

    fn eval_args(&mut self, frame: &mut Frame, args: &[Arg]) -> Vec<CallArg> {
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
    fn binary(&mut self, m: usize, e: ExprId, op: BinOp, lt: Ty, rt: Ty, span: Span, ls: Span, rs: Span) -> Ty {
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
                        Ty::Tensor(t) => Some(t.clone()),
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
                        Ty::Tensor(t)
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

    fn prim_error(&mut self, pe: prims::PrimError, span: Span, arg_spans: &[Span], what: &str) {
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

    fn member(&mut self, base: Ty, name: &Name, span: Span) -> Ty {
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

    fn index(&mut self, frame: &mut Frame, base: Ty, items: &[IndexItem], span: Span) -> Ty {
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
        for item in items {
            match item {
                IndexItem::Rest => {
                    let skip = t.rank() - explicit;
                    dims.extend(t.dims[axis..axis + skip].iter().cloned());
                    axis += skip;
                }
                IndexItem::At(e) => {
                    match self.eval(frame, *e) {
                        Ty::Value(v) if v.as_dim().is_some() => {}
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
                    axis += 1;
                }
            }
        }
        dims.extend(t.dims[axis..].iter().cloned());
        Ty::Tensor(TensorTy::new(t.dtype, dims))
    }

    /// A call: of a sublayer, a stack, a primitive, or a function on numbers.
    fn call(&mut self, frame: &mut Frame, callee: ExprId, mut args: Vec<CallArg>, span: Span) -> Ty {
        if args.iter().any(|a| matches!(a.ty, Ty::Error)) {
            return Ty::Error;
        }
        let m = self.module_of(frame.inst);
        let module = self.module(m);
        let callee_expr = module.expr(callee);
        let target = match &callee_expr.kind {
            ExprKind::Name(n) => match self.lookup(frame, n) {
                // A number never calls; `dropout(x, dropout)` means the primitive.
                Some(Ty::Value(v)) if !matches!(v, Value::None) && prims::signature(n).is_some() => {
                    return self.prim(frame, n, args, span, callee_expr.span);
                }
                Some(t) => t,
                None if prims::signature(n).is_some() => {
                    return self.prim(frame, n, args, span, callee_expr.span);
                }
                None if STATIC_FUNCTIONS.contains(&n.as_str()) && args.iter().all(|a| matches!(a.ty, Ty::Value(_))) => {
                    let env = self.frame_env(frame);
                    return self.eval_static(m, &env, self.call_expr_of(m, callee), false).map_or(Ty::Error, Ty::Value);
                }
                None => {
                    self.unknown_in_forward(frame, n, callee_expr.span);
                    return Ty::Error;
                }
            },
            ExprKind::Member { base, name } => {
                let b = self.eval(frame, *base);
                match b {
                    Ty::Tensor(_) | Ty::Value(_) if prims::signature(&name.text).is_some() => {
                        args.insert(0, CallArg { name: None, ty: b, span: module.expr(*base).span });
                        return self.prim(frame, &name.text, args, span, name.span);
                    }
                    Ty::Tensor(_) => {
                        let mut d = Diagnostic::at("E0104", name.span, format!("unknown primitive `{}`", name.text));
                        if let Some(s) = suggest(&name.text, PRIMITIVES.iter().map(|(n, _)| *n)) {
                            d = d.help(s);
                        }
                        self.error(d);
                        return Ty::Error;
                    }
                    other => self.member(other, name, callee_expr.span),
                }
            }
            _ => self.eval(frame, callee),
        };
        match target {
            Ty::Error => Ty::Error,
            Ty::Layer(i) => self.call_layer(i, args, span),
            Ty::Stack(ids) => {
                // Each layer's output feeds the next; other arguments go to all.
                let mut it = args.into_iter();
                let Some(first) = it.next() else {
                    self.error(Diagnostic::at("E0202", span, "a stack of layers needs an input"));
                    return Ty::Error;
                };
                let rest: Vec<CallArg> = it.collect();
                let mut x = first.ty;
                for id in ids {
                    let mut call_args = vec![CallArg { name: first.name.clone(), ty: x, span: first.span }];
                    call_args.extend(rest.iter().map(|a| CallArg {
                        name: a.name.clone(),
                        ty: a.ty.clone(),
                        span: a.span,
                    }));
                    x = self.call_layer(id, call_args, span);
                    if matches!(x, Ty::Error) {
                        return Ty::Error;
                    }
                }
                x
            }
            Ty::Value(Value::None) => {
                self.error(
                    Diagnostic::at(
                        "E0201",
                        callee_expr.span,
                        "this optional field is absent here (its `if` condition is false)",
                    )
                    .help("guard the call: `if <condition> then f(x) else x`"),
                );
                Ty::Error
            }
            other => {
                self.error(Diagnostic::at("E0201", callee_expr.span, format!("{} cannot be called", other.describe())));
                Ty::Error
            }
        }
    }

    fn call_expr_of(&self, m: usize, callee: ExprId) -> ExprId {
        // The call expression is the one whose callee is `callee`.
        self.module(m)
            .exprs
            .iter()
            .find(|(_, e)| matches!(e.kind, ExprKind::Call { callee: c, .. } if c == callee))
            .map(|(id, _)| id)
            .expect("a callee belongs to a call")
    }

    fn prim(&mut self, frame: &mut Frame, name: &str, args: Vec<CallArg>, span: Span, name_span: Span) -> Ty {
        let sig = prims::signature(name).expect("caller checked");
        // Math on plain numbers folds to a number.
        if UNARY_MATH.contains(&name) && args.len() == 1 && matches!(args[0].ty, Ty::Value(_)) {
            let Some(x) = (if let Ty::Value(v) = &args[0].ty { v.as_f64() } else { None }) else {
                self.error(Diagnostic::at("E0201", span, format!("`{name}` of {}", args[0].ty.describe())));
                return Ty::Error;
            };
            return Ty::Value(Value::Float(prims::fold_unary(name, x)));
        }
        let mut bound: Vec<Option<(PArg, Span)>> = vec![None; sig.len()];
        let mut positional = 0;
        for a in args {
            let slot = match &a.name {
                Some(n) => match sig.iter().position(|p| p.name == n.text) {
                    Some(i) => i,
                    None => {
                        let mut d = Diagnostic::at("E0203", n.span, format!("`{name}` has no argument `{}`", n.text));
                        d = d.help(
                            suggest(&n.text, sig.iter().map(|p| p.name))
                                .unwrap_or_else(|| format!("usage: {}", usage(name))),
                        );
                        self.error(d);
                        return Ty::Error;
                    }
                },
                None => {
                    positional += 1;
                    positional - 1
                }
            };
            if slot >= sig.len() {
                self.error(
                    Diagnostic::at("E0202", a.span, format!("`{name}` takes at most {} arguments", sig.len()))
                        .help(format!("usage: {}", usage(name))),
                );
                return Ty::Error;
            }
            if bound[slot].is_some() {
                self.error(Diagnostic::at(
                    "E0202",
                    a.span,
                    format!("argument `{}` of `{name}` is given twice", sig[slot].name),
                ));
                return Ty::Error;
            }
            match convert(&a.ty, sig[slot].kind) {
                Some(v) => bound[slot] = Some((v, a.span)),
                None => {
                    let d = Diagnostic::at(
                        "E0201",
                        a.span,
                        format!(
                            "argument `{}` of `{name}` must be {}, found {}",
                            sig[slot].name,
                            kind_text(sig[slot].kind),
                            a.ty.describe()
                        ),
                    )
                    .help(format!("usage: {}", usage(name)));
                    self.error(d);
                    return Ty::Error;
                }
            }
        }
        let mut spans = Vec::new();
        let mut values = Vec::new();
        for (i, b) in bound.into_iter().enumerate() {
            match b {
                Some((v, s)) => {
                    values.push(v);
                    spans.push(s);
                }
                None => {
                    let v = match sig[i].default {
                        prims::Fallback::Required => {
                            let d = Diagnostic::at(
                                "E0202",
                                span,
                                format!("`{name}` is missing its argument `{}`", sig[i].name),
                            )
                            .help(format!("usage: {}", usage(name)));
                            self.error(d);
                            return Ty::Error;
                        }
                        prims::Fallback::None => PArg::Absent,
                        prims::Fallback::Int(v) => PArg::Value(Value::Int(v)),
                        prims::Fallback::Float(v) => PArg::Value(Value::Float(v)),
                        prims::Fallback::Bool(v) => PArg::Value(Value::Bool(v)),
                    };
                    values.push(v);
                    spans.push(span);
                }
            }
        }
        if name == "route" {
            return self.route(frame, &values, &spans, span);
        }
        let _ = name_span;
        match prims::infer(name, &values) {
            Ok(Out::One(t)) => Ty::Tensor(t),
            Ok(Out::Many(ts)) => Ty::Tuple(ts.into_iter().map(Ty::Tensor).collect()),
            Err(pe) => {
                self.prim_error(pe, span, &spans, &format!("`{name}`"));
                Ty::Error
            }
        }
    }

    /// `route(x, indices, weights, experts)`: each row of x goes to its top-k
    /// experts and their outputs are summed with the weights.
    fn route(&mut self, _frame: &mut Frame, values: &[PArg], spans: &[Span], span: Span) -> Ty {
        let (PArg::Tensor(x), PArg::Tensor(idx), PArg::Tensor(w)) = (&values[0], &values[1], &values[2]) else {
            return Ty::Error;
        };
        let PArg::Value(Value::List(experts)) = &values[3] else {
            return Ty::Error;
        };
        if x.rank() != 2 || idx.rank() != 2 || idx.dims[0] != x.dims[0] || w.dims != idx.dims || idx.dtype != DType::Int
        {
            let d = Diagnostic::at("E0301", span, format!("`route` takes x [tokens, dim], indices [tokens, k] int and weights [tokens, k]: found {x}, {idx} and {w}"))
                .label(spans[0], format!("{x}"))
                .label(spans[1], format!("{idx}"))
                .label(spans[2], format!("{w}"))
                .help("flatten the batch first: `x.merge(0, 1)`");
            self.error(d);
            return Ty::Error;
        }
        let mut out = None;
        for e in experts {
            let Value::Instance(id) = e else { continue };
            let arg = CallArg { name: None, ty: Ty::Tensor(x.clone()), span: spans[0] };
            match self.call_layer(*id, vec![arg], span) {
                Ty::Tensor(t) if t.rank() == 2 && t.dims[0] == x.dims[0] => out = Some(t),
                Ty::Error => return Ty::Error,
                other => {
                    self.error(Diagnostic::at(
                        "E0301",
                        spans[3],
                        format!(
                            "each expert must map [tokens, dim] to [tokens, out], this one gives {}",
                            other.describe()
                        ),
                    ));
                    return Ty::Error;
                }
            }
        }
        match out {
            Some(t) => Ty::Tensor(t),
            None => {
                self.error(Diagnostic::at("E0201", spans[3], "`route` needs at least one expert"));
                Ty::Error
            }
        }
    }

    /// Calls a layer instance's forward with the given arguments.
    pub fn call_layer(&mut self, inst: InstId, args: Vec<CallArg>, span: Span) -> Ty {
        let dref = self.instances[inst].def;
        let def = self.p.def(dref);
        let Some(fwd) = def.members.iter().find_map(|m| if let Member::Forward(f) = m { Some(f) } else { None }) else {
            self.error(
                Diagnostic::at("E0201", span, format!("layer `{}` has no `forward`", def.name.text))
                    .label(def.name.span, "defined here"),
            );
            return Ty::Error;
        };
        if self.depth >= MAX_DEPTH {
            self.error(
                Diagnostic::at("E0208", span, format!("forward calls nest more than {MAX_DEPTH} deep"))
                    .help("a layer probably calls itself"),
            );
            return Ty::Error;
        }
        let mut bound: Vec<Option<CallArg>> = (0..fwd.inputs.len()).map(|_| None).collect();
        let mut positional = 0;
        for a in args {
            let slot = match &a.name {
                Some(n) => match fwd.inputs.iter().position(|i| i.name.text == n.text) {
                    Some(i) => i,
                    None => {
                        let mut d =
                            Diagnostic::at("E0203", n.span, format!("`{}` has no input `{}`", def.name.text, n.text))
                                .label(fwd.span, "its forward is here");
                        if let Some(s) = suggest(&n.text, fwd.inputs.iter().map(|i| i.name.text.as_str())) {
                            d = d.help(s);
                        }
                        self.error(d);
                        return Ty::Error;
                    }
                },
                None => {
                    positional += 1;
                    positional - 1
                }
            };
            if slot >= fwd.inputs.len() {
                self.error(
                    Diagnostic::at(
                        "E0202",
                        a.span,
                        format!("`{}` takes {} inputs but more were given", def.name.text, fwd.inputs.len()),
                    )
                    .label(fwd.span, "its forward is here"),
                );
                return Ty::Error;
            }
            bound[slot] = Some(a);
        }
        let mut frame = Frame { inst, locals: HashMap::new(), dims: HashMap::new() };
        let mut rest: Option<Vec<Dim>> = None;
        for (input, arg) in fwd.inputs.iter().zip(bound) {
            match arg {
                None if input.optional => {
                    frame.locals.insert(input.name.text.clone(), Ty::Value(Value::None));
                }
                None => {
                    self.error(
                        Diagnostic::at(
                            "E0202",
                            span,
                            format!("`{}` is missing its input `{}`", def.name.text, input.name.text),
                        )
                        .label(input.name.span, "declared here"),
                    );
                    return Ty::Error;
                }
                Some(a) => match &a.ty {
                    Ty::Value(Value::None) if input.optional => {
                        frame.locals.insert(input.name.text.clone(), a.ty.clone());
                    }
                    Ty::Tensor(t) => {
                        if let Err(msg) = self.match_type(&mut frame, &input.ty, t, &mut rest) {
                            let d = Diagnostic::at(
                                "E0301",
                                a.span,
                                format!(
                                    "input `{}` of `{}` expects {}, found {t}",
                                    input.name.text,
                                    def.name.text,
                                    self.declared_text(inst, &input.ty)
                                ),
                            )
                            .label(a.span, format!("this is {t}"))
                            .label(input.ty.span, format!("declared here: {msg}"));
                            self.error(d);
                            return Ty::Error;
                        }
                        frame.locals.insert(input.name.text.clone(), a.ty.clone());
                    }
                    other => {
                        self.error(
                            Diagnostic::at(
                                "E0201",
                                a.span,
                                format!(
                                    "input `{}` of `{}` must be a tensor, found {}",
                                    input.name.text,
                                    def.name.text,
                                    other.describe()
                                ),
                            )
                            .label(input.name.span, "declared here"),
                        );
                        return Ty::Error;
                    }
                },
            }
        }
        self.depth += 1;
        self.context.push((span, format!("in this call of `{}`", def.name.text)));
        let result = self.forward_body(&mut frame, fwd, &mut rest);
        self.context.pop();
        self.depth -= 1;
        result
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

    /// Writes a declared type with the instance's hyperparameters filled in.
    fn declared_text(&self, inst: InstId, ty: &TensorType) -> String {
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
                    BinOp::Div => a.div(&b).ok_or_else(|| format!("{a} / {b} is not a whole size")),
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
            && self.instances[frame.inst].env.get(n).is_none()
            && !frame.dims.contains_key(n)
        {
            return Err(format!("size `{n}` is not bound by an earlier axis"));
        }
        self.decl_dim(frame, e, &Dim::constant(0))
    }
}

/// Converts an evaluated argument to what a parameter kind needs.
fn convert(t: &Ty, kind: Kind) -> Option<PArg> {
    let value = |v: &Value| PArg::Value(v.clone());
    match (kind, t) {
        (Kind::T | Kind::OptT | Kind::TS, Ty::Tensor(t)) => Some(PArg::Tensor(t.clone())),
        (Kind::OptT, Ty::Value(Value::None)) => Some(PArg::Absent),
        (Kind::TS, Ty::Value(v @ (Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Dim(_)))) => Some(value(v)),
        (Kind::Int, Ty::Value(v @ Value::Int(_))) => Some(value(v)),
        (Kind::OptInt, Ty::Value(v @ (Value::Int(_) | Value::None))) => Some(value(v)),
        (Kind::Float | Kind::OptFloat, Ty::Value(v @ (Value::Int(_) | Value::Float(_)))) => {
            Some(PArg::Value(Value::Float(v.as_f64()?)))
        }
        (Kind::OptFloat, Ty::Value(Value::None)) => Some(PArg::Absent),
        (Kind::Bool, Ty::Value(v @ Value::Bool(_))) => Some(value(v)),
        (Kind::Axes, Ty::Value(v @ (Value::Int(_) | Value::None))) => Some(value(v)),
        (Kind::Axes | Kind::Ints, Ty::Value(Value::List(items)))
            if items.iter().all(|i| matches!(i, Value::Int(_))) =>
        {
            Some(value(&Value::List(items.clone())))
        }
        (Kind::Size, Ty::Value(v)) if v.as_dim().is_some() => Some(value(v)),
        (Kind::Sizes, Ty::Value(Value::List(items))) if items.iter().all(|i| i.as_dim().is_some()) => {
            Some(value(&Value::List(items.clone())))
        }
        (Kind::Tensors, Ty::Tuple(items)) if items.iter().all(|i| matches!(i, Ty::Tensor(_))) => Some(PArg::Tensors(
            items.iter().map(|i| if let Ty::Tensor(t) = i { t.clone() } else { unreachable!() }).collect(),
        )),
        (Kind::Stack, Ty::Stack(ids)) => {
            Some(PArg::Value(Value::List(ids.iter().map(|i| Value::Instance(*i)).collect())))
        }
        _ => None,
    }
}

fn kind_text(kind: Kind) -> &'static str {
    match kind {
        Kind::T => "a tensor",
        Kind::TS => "a tensor or a number",
        Kind::OptT => "a tensor or none",
        Kind::Int => "an int",
        Kind::OptInt => "an int or none",
        Kind::Float => "a number",
        Kind::OptFloat => "a number or none",
        Kind::Bool => "a bool",
        Kind::Axes => "an axis, a list of axes or none",
        Kind::Ints => "a list of ints",
        Kind::Size => "a size",
        Kind::Sizes => "a list of sizes",
        Kind::Tensors => "a list of tensors",
        Kind::Stack => "a `repeat` stack of layers",
    }
}

/// `name(a, b: default, ...)` for messages.
pub fn usage(name: &str) -> String {
    let Some(sig) = prims::signature(name) else {
        return name.to_string();
    };
    let parts: Vec<String> = sig
        .iter()
        .map(|p| match p.default {
            prims::Fallback::Required => p.name.to_string(),
            prims::Fallback::None => format!("{}: none", p.name),
            prims::Fallback::Int(v) => format!("{}: {v}", p.name),
            prims::Fallback::Float(v) => format!("{}: {}", p.name, crate::syntax::float_text(v)),
            prims::Fallback::Bool(v) => format!("{}: {v}", p.name),
        })
        .collect();
    format!("{name}({})", parts.join(", "))
}
