//! The static evaluator: hyperparameter expressions, lets, initialisers and
//! settings, all known before anything runs.

use super::elaborate::{Checker, Env, Fallible, INITS, STATIC_FUNCTIONS, is_static_function};
use super::value::{Init, Value};
use crate::diag::Diagnostic;
use crate::source::Span;
use crate::syntax::ast::*;
use std::rc::Rc;

impl Checker<'_> {
    /// Evaluates an expression whose value must be known before anything runs.
    /// `settings` allows records such as `adamw(lr: 3e-4)`.
    pub fn eval_static(&mut self, m: usize, env: &Env, e: ExprId, settings: bool) -> Fallible<Value> {
        let module = self.module(m);
        let expr = module.expr(e);
        let span = expr.span;
        match &expr.kind {
            ExprKind::Int(v) => Ok(Value::Int(*v)),
            ExprKind::Float(v) => Ok(Value::Float(*v)),
            ExprKind::Bool(b) => Ok(Value::Bool(*b)),
            ExprKind::None => Ok(Value::None),
            ExprKind::Str(s) => Ok(Value::Str(s.clone())),
            ExprKind::List(items) => {
                let mut out = Vec::new();
                for i in items {
                    out.push(self.eval_static(m, env, *i, settings)?);
                }
                Ok(Value::List(out))
            }
            ExprKind::Name(n) => {
                if let Some(v) = env.get(n) {
                    return Ok(v.clone());
                }
                if let Some(def) = self.p.scopes[m].get(n) {
                    return Ok(self.layer_value(*def, Vec::new(), Vec::new(), span));
                }
                match n.as_str() {
                    "zeros" => return Ok(Value::Init(Init::Zeros)),
                    "ones" => return Ok(Value::Init(Init::Ones)),
                    "fan_in" => return Ok(Value::Init(Init::FanIn)),
                    _ => {}
                }
                if settings {
                    return Ok(Value::Record(n.clone(), Vec::new()));
                }
                self.unknown_name(m, env, n, span, &[]);
                Err(())
            }
            ExprKind::Unary(op, x) => {
                let v = self.eval_static(m, env, *x, settings)?;
                match (op, &v) {
                    (UnOp::Neg, Value::Int(i)) => Ok(Value::Int(-i)),
                    (UnOp::Neg, Value::Float(f)) => Ok(Value::Float(-f)),
                    (UnOp::Neg, Value::Dim(d)) => Ok(Value::Dim(d.neg())),
                    (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
                    _ => {
                        let what = if *op == UnOp::Neg { "negate" } else { "apply `not` to" };
                        self.error(
                            Diagnostic::at("E0201", span, format!("cannot {what} a {}", v.kind()))
                                .label(module.expr(*x).span, format!("this is {v}")),
                        );
                        Err(())
                    }
                }
            }
            ExprKind::Binary(op, l, r) => {
                let lv = self.eval_static(m, env, *l, settings)?;
                let rv = self.eval_static(m, env, *r, settings)?;
                let (ls, rs) = (module.expr(*l).span, module.expr(*r).span);
                self.static_binary(*op, &lv, &rv, span, ls, rs, module, *l, *r)
            }
            ExprKind::Call { callee, args } => self.static_call(m, env, *callee, args, span, settings),
            ExprKind::If { cond, then, otherwise } => match self.eval_static(m, env, *cond, settings)? {
                Value::Bool(true) => self.eval_static(m, env, *then, settings),
                Value::Bool(false) => self.eval_static(m, env, *otherwise, settings),
                other => {
                    self.error(
                        Diagnostic::at(
                            "E0201",
                            module.expr(*cond).span,
                            format!("the condition of `if` must be a bool, found {}", other.kind()),
                        )
                        .help("compare with `==`, e.g. `if window == none then ...`"),
                    );
                    Err(())
                }
            },
            ExprKind::Index { base, items } => {
                let b = self.eval_static(m, env, *base, settings)?;
                match (&b, items.as_slice()) {
                    (Value::List(list), [IndexItem::At(i)]) => match self.eval_static(m, env, *i, settings)? {
                        Value::Int(k) if k >= -(list.len() as i64) && k < list.len() as i64 => {
                            Ok(list[if k < 0 { (k + list.len() as i64) as usize } else { k as usize }].clone())
                        }
                        other => {
                            self.error(Diagnostic::at(
                                "E0201",
                                span,
                                format!("index {other} is out of range for a list of {}", list.len()),
                            ));
                            Err(())
                        }
                    },
                    _ => {
                        self.error(
                            Diagnostic::at("E0201", span, format!("cannot index a {} here", b.kind()))
                                .help("only lists can be indexed in hyperparameter expressions"),
                        );
                        Err(())
                    }
                }
            }
            ExprKind::Member { name, .. } => {
                self.error(
                    Diagnostic::at("E0201", span, format!("`.{}` is only available inside `forward`", name.text))
                        .help("hyperparameter expressions see hyperparameters and `let`s, not fields"),
                );
                Err(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn static_binary(
        &mut self,
        op: BinOp,
        lv: &Value,
        rv: &Value,
        span: Span,
        ls: Span,
        rs: Span,
        module: &Module,
        l: ExprId,
        r: ExprId,
    ) -> Fallible<Value> {
        use Value as V;
        let mismatch = |this: &mut Self| {
            this.error(
                Diagnostic::at(
                    "E0201",
                    span,
                    format!("cannot apply `{}` to {} and {}", op.symbol(), lv.kind(), rv.kind()),
                )
                .label(ls, format!("this is {lv}"))
                .label(rs, format!("this is {rv}")),
            );
            Err(())
        };
        match op {
            BinOp::Eq | BinOp::Ne => {
                let eq = match (lv, rv) {
                    (V::Int(a), V::Float(b)) | (V::Float(b), V::Int(a)) => (*a as f64) == *b,
                    _ => lv == rv,
                };
                Ok(V::Bool(if op == BinOp::Eq { eq } else { !eq }))
            }
            BinOp::And | BinOp::Or => match (lv, rv) {
                (V::Bool(a), V::Bool(b)) => Ok(V::Bool(if op == BinOp::And { *a && *b } else { *a || *b })),
                _ => mismatch(self),
            },
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => match (lv.as_f64(), rv.as_f64()) {
                (Some(a), Some(b)) => Ok(V::Bool(match op {
                    BinOp::Lt => a < b,
                    BinOp::Le => a <= b,
                    BinOp::Gt => a > b,
                    _ => a >= b,
                })),
                _ => mismatch(self),
            },
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::Pow => {
                if let (V::Int(a), V::Int(b)) = (lv, rv) {
                    let (a, b) = (*a, *b);
                    let result = match op {
                        BinOp::Add => a.checked_add(b),
                        BinOp::Sub => a.checked_sub(b),
                        BinOp::Mul => a.checked_mul(b),
                        BinOp::Pow if b >= 0 => u32::try_from(b).ok().and_then(|b| a.checked_pow(b)),
                        BinOp::Pow => return Ok(V::Float((a as f64).powf(b as f64))),
                        _ if b == 0 => {
                            self.error(Diagnostic::at("E0205", span, "division by zero").label(rs, "this is 0"));
                            return Err(());
                        }
                        BinOp::Rem => a.checked_rem_euclid(b),
                        // i64::MIN / -1 overflows.
                        _ if a.checked_rem(b).is_none() => None,
                        _ => {
                            if a % b != 0 {
                                let (lt, rt) =
                                    (crate::syntax::print_expr(module, l), crate::syntax::print_expr(module, r));
                                self.error(
                                    Diagnostic::at("E0204", span, format!("`{lt} / {rt}` does not divide evenly: {a} / {b} leaves {}", a % b))
                                        .label(ls, format!("{lt} = {a}"))
                                        .label(rs, format!("{rt} = {b}"))
                                        .help(format!("`/` on integers must be exact; choose {lt} as a multiple of {b}, or write `float({lt}) / {rt}` for a fraction")),
                                );
                                return Err(());
                            }
                            Some(a / b)
                        }
                    };
                    return match result {
                        Some(v) => Ok(V::Int(v)),
                        None => {
                            self.error(Diagnostic::at("E0205", span, "integer overflow"));
                            Err(())
                        }
                    };
                }
                if let (Some(a), Some(b)) = (lv.as_dim(), rv.as_dim()) {
                    let d = match op {
                        BinOp::Add => Some(a.add(&b)),
                        BinOp::Sub => Some(a.sub(&b)),
                        BinOp::Mul => Some(a.mul(&b)),
                        BinOp::Div => a.div(&b),
                        _ => None,
                    };
                    return match d {
                        Some(d) => Ok(Value::from_dim(d)),
                        None => {
                            let d =
                                Diagnostic::at("E0204", span, format!("`{a} {} {b}` is not a whole size", op.symbol()))
                                    .label(ls, format!("{a}"))
                                    .label(rs, format!("{b}"));
                            self.error(match whole_size_hint(&a) {
                                Some(h) => d.help(h),
                                None => d,
                            });
                            Err(())
                        }
                    };
                }
                match (lv.as_f64(), rv.as_f64()) {
                    (Some(a), Some(b)) => {
                        if matches!(op, BinOp::Div | BinOp::Rem) && b == 0.0 {
                            self.error(Diagnostic::at("E0205", span, "division by zero").label(rs, "this is 0"));
                            return Err(());
                        }
                        Ok(V::Float(match op {
                            BinOp::Add => a + b,
                            BinOp::Sub => a - b,
                            BinOp::Mul => a * b,
                            BinOp::Div => a / b,
                            BinOp::Rem => a.rem_euclid(b),
                            _ => a.powf(b),
                        }))
                    }
                    _ => mismatch(self),
                }
            }
            BinOp::MatMul | BinOp::Pipe => {
                self.error(
                    Diagnostic::at(
                        "E0201",
                        span,
                        format!("`{}` needs tensors; this expression is evaluated before anything runs", op.symbol()),
                    )
                    .help("tensor operations belong in `forward`"),
                );
                Err(())
            }
        }
    }

    fn static_call(
        &mut self,
        m: usize,
        env: &Env,
        callee: ExprId,
        args: &[Arg],
        span: Span,
        settings: bool,
    ) -> Fallible<Value> {
        let module = self.module(m);
        if let ExprKind::Member { base, name } = &module.expr(callee).kind
            && name.text == "named"
        {
            return self.renamed(m, env, *base, args, span, settings);
        }
        let ExprKind::Name(name) = &module.expr(callee).kind else {
            self.error(
                Diagnostic::at("E0201", module.expr(callee).span, "only layers and functions can be called here")
                    .help("a layer's weights can be given other names with `Layer(...).named(field: \"path\")`"),
            );
            return Err(());
        };
        let mut positional = Vec::new();
        let mut named = Vec::new();
        for a in args {
            let v = self.eval_static(m, env, a.value, settings)?;
            match &a.name {
                Some(n) => named.push((n.text.clone(), v)),
                None => positional.push(v),
            }
        }
        if let Some(v) = env.get(name) {
            // A layer-valued hyperparameter called with more arguments.
            if let Value::Layer(lv) = v {
                let mut lv = (**lv).clone();
                lv.positional.extend(positional);
                lv.named.extend(named);
                lv.span = span;
                return Ok(Value::Layer(Rc::new(lv)));
            }
            self.error(Diagnostic::at("E0201", span, format!("`{name}` is a {}, not a layer", v.kind())));
            return Err(());
        }
        if let Some(def) = self.p.scopes[m].get(name) {
            return Ok(self.layer_value(*def, positional, named, span));
        }
        if settings && !is_static_function(name) && !INITS.contains(&name.as_str()) {
            return Ok(Value::Record(name.clone(), named));
        }
        if !is_static_function(name) && !INITS.contains(&name.as_str()) {
            let unary: Vec<&str> = crate::scalar::UNARY.iter().filter(|r| r.primitive).map(|r| r.name).collect();
            let extra = [INITS, STATIC_FUNCTIONS, &unary].concat();
            self.unknown_name(m, env, name, module.expr(callee).span, &extra);
            return Err(());
        }
        let result = static_function(name, &positional, &named);
        match result {
            Some(v) => Ok(v),
            None => {
                self.error(
                    Diagnostic::at("E0202", span, format!("wrong arguments for `{name}`")).help(static_usage(name)),
                );
                Err(())
            }
        }
    }
}

impl Checker<'_> {
    /// `Layer(...).named(field: "path", ...)`: the layer with those fields'
    /// weights under other paths (a checkpoint's names: `o_proj: "dense"`,
    /// `q_proj: "self.query"`).
    fn renamed(
        &mut self,
        m: usize,
        env: &Env,
        base: ExprId,
        args: &[Arg],
        span: Span,
        settings: bool,
    ) -> Fallible<Value> {
        let layer = self.eval_static(m, env, base, settings)?;
        let Value::Layer(lv) = layer else {
            self.error(
                Diagnostic::at("E0201", span, format!("`.named` renames a layer's fields, not a {}", layer.kind()))
                    .label(self.module(m).expr(base).span, format!("this is {layer}")),
            );
            return Err(());
        };
        let mut lv = (*lv).clone();
        for a in args {
            let value = self.eval_static(m, env, a.value, settings)?;
            let path = match (&a.name, value) {
                (Some(_), Value::Str(path)) if path.split('.').all(is_identifier) => path,
                (field, value) => {
                    let what = match field {
                        Some(f) => format!("`{}` must be renamed to a path of names, found {value}", f.text),
                        None => "`.named` takes a field and the path its weights live at".into(),
                    };
                    self.error(
                        Diagnostic::at("E0202", self.module(m).expr(a.value).span, what)
                            .help("e.g. `Attention(dim, heads).named(o_proj: \"dense\", q_proj: \"self.query\")`"),
                    );
                    return Err(());
                }
            };
            let field = a.name.as_ref().expect("matched a named argument").text.clone();
            lv.renames.push((field, path));
        }
        lv.span = span;
        Ok(Value::Layer(Rc::new(lv)))
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn static_usage(name: &str) -> String {
    match name {
        "normal" => "usage: normal(std)".into(),
        "uniform" => "usage: uniform(bound)".into(),
        "constant" => "usage: constant(value)".into(),
        "min" | "max" => format!("usage: {name}(a, b, ...) with numbers"),
        _ => format!("usage: {name}(x) with a number"),
    }
}

/// A function of hyperparameter values (`sqrt(hd)`, `normal(0.02)`); `None`
/// when `name` is not such a function or the arguments do not fit it.
pub fn static_function(name: &str, positional: &[Value], named: &[(String, Value)]) -> Option<Value> {
    let get = |key: &str, pos: usize| {
        named.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).or_else(|| positional.get(pos).cloned())
    };
    let num = |v: Option<Value>| v.and_then(|v| v.as_f64());
    match name {
        "normal" => num(get("std", 0)).map(|std| Value::Init(Init::Normal { std })),
        "uniform" => num(get("bound", 0)).map(|bound| Value::Init(Init::Uniform { bound })),
        "constant" => num(get("value", 0)).map(|v| Value::Init(Init::Constant(v))),
        n if let Some(u) = crate::scalar::Unary::primitive(n)
            && n != "abs" =>
        {
            num(get("x", 0)).map(|x| Value::Float(u.eval(x)))
        }
        "abs" => get("x", 0).and_then(|v| match v {
            Value::Int(i) => Some(Value::Int(i.abs())),
            Value::Float(f) => Some(Value::Float(f.abs())),
            _ => None,
        }),
        "float" => num(get("x", 0)).map(Value::Float),
        "int" | "floor" => num(get("x", 0)).map(|x| Value::Int(x.floor() as i64)),
        "ceil" => num(get("x", 0)).map(|x| Value::Int(x.ceil() as i64)),
        "round" => num(get("x", 0)).map(|x| Value::Int(x.round() as i64)),
        "min" | "max" => {
            let all: Vec<Value> = positional.to_vec();
            if all.is_empty() || all.iter().any(|v| v.as_f64().is_none()) {
                None
            } else {
                let pick = |a: &Value, b: &Value| {
                    let less = a.as_f64() < b.as_f64();
                    if less == (name == "min") { a.clone() } else { b.clone() }
                };
                Some(all[1..].iter().fold(all[0].clone(), |acc, v| pick(&acc, v)))
            }
        }
        _ => None,
    }
}

/// What to write instead of dividing a size only known when running (an
/// image's height): sizes are exact, so make it a hyperparameter, whose
/// division is checked once it is set.
pub(super) fn whole_size_hint(a: &crate::types::Dim) -> Option<String> {
    a.as_const().is_none().then(|| {
        format!(
            "`{a}` is known only when running, so it may not divide; make it a hyperparameter \
             (`image: int = 224` and `x: [B, C, image, image]`), whose division is checked when it is set"
        )
    })
}
