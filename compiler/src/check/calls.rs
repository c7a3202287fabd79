//! Calls inside `forward`: of sublayers and stacks (walked with the actual
//! argument types), of primitives (bound against their signatures and typed
//! by prims.rs), and `route`, which calls every expert.

use super::elaborate::{Checker, InstId, MAX_DEPTH, STATIC_FUNCTIONS, is_static_function};
use super::forward::{CallArg, Frame, Ty, larg};
use super::prims::{self, Arg as PArg, Kind, Out, Prim};
use super::value::Value;
use crate::diag::{Diagnostic, suggest};
use crate::ir::experts;
use crate::ir::graph::NodeId;
use crate::ir::lower::LArg;
use crate::ir::signature::Role;
use crate::source::Span;
use crate::syntax::ast::*;
use crate::types::Dim;
use crate::types::TensorTy;
use std::collections::HashMap;

impl Checker<'_> {
    /// A call: of a sublayer, a stack, a primitive, or a function on numbers.
    pub(super) fn call(&mut self, frame: &mut Frame, callee: ExprId, mut args: Vec<CallArg>, span: Span) -> Ty {
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
                // `float(dim)` on numbers is arithmetic, not the tensor cast.
                None if prims::signature(n).is_some()
                    && !(STATIC_FUNCTIONS.contains(&n.as_str())
                        && args.iter().all(|a| matches!(a.ty, Ty::Value(_)))) =>
                {
                    return self.prim(frame, n, args, span, callee_expr.span);
                }
                None if is_static_function(n) && args.iter().all(|a| matches!(a.ty, Ty::Value(_))) => {
                    let (mut positional, mut named) = (Vec::new(), Vec::new());
                    for a in args {
                        let Ty::Value(v) = a.ty else { unreachable!("checked above") };
                        match a.name {
                            Some(k) => named.push((k.text, v)),
                            None => positional.push(v),
                        }
                    }
                    return match super::statics::static_function(n, &positional, &named) {
                        Some(v) => Ty::Value(v),
                        None => {
                            self.error(Diagnostic::at("E0202", span, format!("wrong arguments for `{n}`")));
                            Ty::Error
                        }
                    };
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
                        if let Some(s) = suggest(&name.text, Prim::names()) {
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
            Ty::Path(i, prefix) => {
                let under: Vec<&str> = self.instances[i]
                    .fields
                    .iter()
                    .filter(|(n, _)| n.starts_with(&format!("{prefix}.")))
                    .map(|(n, _)| n.as_str())
                    .collect();
                let d = Diagnostic::at(
                    "E0201",
                    callee_expr.span,
                    format!("the path `{prefix}.` of fields cannot be called"),
                )
                .help(format!("call the fields under it: {}", under.join(", ")));
                self.error(d);
                Ty::Error
            }
            other => {
                self.error(Diagnostic::at("E0201", callee_expr.span, format!("{} cannot be called", other.describe())));
                Ty::Error
            }
        }
    }

    pub(super) fn prim(
        &mut self,
        frame: &mut Frame,
        name: &str,
        args: Vec<CallArg>,
        span: Span,
        name_span: Span,
    ) -> Ty {
        let prim = Prim::from_name(name).expect("caller checked");
        let sig = prim.params();
        // Math on plain numbers folds to a number.
        if let Prim::Math(u) = prim
            && args.len() == 1
            && matches!(args[0].ty, Ty::Value(_))
        {
            let Some(x) = (if let Ty::Value(v) = &args[0].ty { v.as_f64() } else { None }) else {
                self.error(Diagnostic::at("E0201", span, format!("`{name}` of {}", args[0].ty.describe())));
                return Ty::Error;
            };
            return Ty::Value(Value::Float(u.eval(x)));
        }
        let mut bound: Vec<Option<(PArg, Span, LArg)>> = vec![None; sig.len()];
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
                Some(v) => {
                    let l = if self.lower.is_some() { lower_arg(&a.ty, sig[slot].kind) } else { LArg::Absent };
                    bound[slot] = Some((v, a.span, l));
                }
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
        let mut largs = Vec::new();
        for (i, b) in bound.into_iter().enumerate() {
            match b {
                Some((v, s, l)) => {
                    values.push(v);
                    spans.push(s);
                    largs.push(l);
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
                    largs.push(match sig[i].default {
                        prims::Fallback::Int(v) => LArg::Int(v),
                        prims::Fallback::Float(v) => LArg::Float(v),
                        prims::Fallback::Bool(v) => LArg::Bool(v),
                        _ => LArg::Absent,
                    });
                    values.push(v);
                    spans.push(span);
                }
            }
        }
        if prim == Prim::Route {
            return self.route(frame, &values, &spans, &largs, span);
        }
        let _ = name_span;
        match prims::infer(prim, &values) {
            Ok(out) => {
                let types = match out {
                    Out::One(t) => vec![t],
                    Out::Many(ts) => ts,
                };
                let nodes: Vec<Option<NodeId>> = match self.lower.as_mut() {
                    Some(l) => l.prim(prim, &largs, &types).into_iter().map(Some).collect(),
                    None => vec![None; types.len()],
                };
                let mut tys: Vec<Ty> = types.into_iter().zip(nodes).map(|(t, n)| Ty::tensor(t, n)).collect();
                if tys.len() == 1 { tys.pop().expect("one") } else { Ty::Tuple(tys) }
            }
            Err(pe) => {
                self.prim_error(pe, span, &spans, &format!("`{name}`"));
                Ty::Error
            }
        }
    }

    /// `route(x, indices, weights, experts)`: each row of x goes to its top-k
    /// experts and their outputs are summed with the weights.
    pub(super) fn route(
        &mut self,
        _frame: &mut Frame,
        values: &[PArg],
        spans: &[Span],
        largs: &[LArg],
        span: Span,
    ) -> Ty {
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
        let x_node = if let Some(LArg::Node(n)) = largs.first() { Some(*n) } else { None };
        let mut out: Option<TensorTy> = None;
        let mut lowered = Vec::with_capacity(experts.len());
        for expert in experts.iter() {
            let Value::Instance(id) = expert else { continue };
            let arg = CallArg { name: None, ty: Ty::tensor(x.clone(), x_node), span: spans[0] };
            let start = self.lower.as_ref().map_or(0, |l| l.g.nodes.len());
            match self.call_layer(*id, vec![arg], span) {
                Ty::Tensor(t) if t.rank() == 2 && t.dims[0] == x.dims[0] => {
                    if let (Some(l), Some(node)) = (self.lower.as_ref(), t.node) {
                        lowered.push(experts::Lowered { start, end: l.g.nodes.len(), out: node });
                    }
                    out = Some(t.ty.clone());
                }
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
        let Some(t) = out else {
            self.error(Diagnostic::at("E0201", spans[3], "`route` needs at least one expert"));
            return Ty::Error;
        };
        let node = match (self.lower.as_mut(), x_node, &largs[1], &largs[2]) {
            (Some(l), Some(x), LArg::Node(choices), LArg::Node(weights)) => {
                let sparse =
                    if l.dense_routes { None } else { experts::sparse(&mut l.g, x, &lowered, *choices, *weights) };
                let routed = sparse.unwrap_or_else(|| experts::dense(&mut l.g, &lowered, *choices, *weights));
                if l.training {
                    experts::report_load(&mut l.g, *choices, lowered.len());
                }
                Some(routed)
            }
            _ => None,
        };
        Ty::tensor(t, node)
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
        if let (Some(l), Ty::Tensor(t)) = (self.lower.as_mut(), &result)
            && l.trace
            && let Some(node) = t.node
        {
            let name = Role::Trace(&format!("{} ({})", self.instances[inst].path, def.name.text)).name();
            l.g.outputs.push((name, node));
        }
        result
    }
}

/// Converts an evaluated argument to what a parameter kind needs.
fn convert(t: &Ty, kind: Kind) -> Option<PArg> {
    let value = |v: &Value| PArg::Value(v.clone());
    match (kind, t) {
        (Kind::T | Kind::OptT | Kind::TS, Ty::Tensor(t)) => Some(PArg::Tensor(t.ty.clone())),
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
        (Kind::PerAxis, Ty::Value(v @ Value::Int(_))) => Some(value(v)),
        (Kind::Axes | Kind::Ints | Kind::PerAxis, Ty::Value(Value::List(items)))
            if items.iter().all(|i| matches!(i, Value::Int(_))) =>
        {
            Some(value(&Value::List(items.clone())))
        }
        (Kind::Size, Ty::Value(v)) if v.as_dim().is_some() => Some(value(v)),
        (Kind::Sizes, Ty::Value(Value::List(items))) if items.iter().all(|i| i.as_dim().is_some()) => {
            Some(value(&Value::List(items.clone())))
        }
        (Kind::Tensors, Ty::Tuple(items)) if items.iter().all(|i| matches!(i, Ty::Tensor(_))) => Some(PArg::Tensors(
            items.iter().map(|i| if let Ty::Tensor(t) = i { t.ty.clone() } else { unreachable!() }).collect(),
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
        Kind::PerAxis => "an int or a list of ints",
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

/// A call argument as lowering needs it, guided by the parameter's kind.
fn lower_arg(t: &Ty, kind: Kind) -> LArg {
    match (kind, t) {
        (Kind::Float | Kind::OptFloat, Ty::Value(v)) if v.as_f64().is_some() => {
            LArg::Float(v.as_f64().expect("number"))
        }
        (Kind::Stack, _) => LArg::Absent,
        _ => larg(t),
    }
}
