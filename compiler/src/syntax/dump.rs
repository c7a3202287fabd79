//! The syntax tree as an indented s-expression without spans: what
//! `modelc ast` prints, and how tests compare two trees for equality.

use super::ast::*;
use super::print::float_text;

pub fn dump_module(m: &Module) -> String {
    let mut out = String::new();
    for item in &m.items {
        match item {
            Item::Import(i) => match &i.target {
                ImportTarget::Module(p) => out.push_str(&format!("(import {})\n", p.join("."))),
                ImportTarget::Path(p) => out.push_str(&format!("(import \"{p}\")\n")),
            },
            Item::Adapt(a) => {
                let targets: Vec<&str> = a.targets.iter().map(|t| t.text.as_str()).collect();
                out.push_str(&format!(
                    "(adapt {} {} (with {}{}) (on {}))\n",
                    a.name.text,
                    a.base.text,
                    a.adapter.text,
                    args(m, &a.args),
                    targets.join(" ")
                ));
            }
            Item::Def(d) => {
                let kw = if d.kind == DefKind::Layer { "layer" } else { "model" };
                out.push_str(&format!("({kw} {}\n", d.name.text));
                for h in &d.hparams {
                    let ty = format!("{:?}{}", h.ty.word, if h.ty.optional { "?" } else { "" }).to_lowercase();
                    let default = h.default.map(|e| format!(" {}", expr(m, e))).unwrap_or_default();
                    out.push_str(&format!("  (hparam {} {ty}{default})\n", h.name.text));
                }
                for e in &d.hf {
                    let keys: Vec<&str> = e.keys.iter().map(|k| k.text.as_str()).collect();
                    out.push_str(&format!("  (hf {} {})\n", e.name.text, keys.join(" | ")));
                }
                for member in &d.members {
                    out.push_str(&format!("  {}\n", self::member(m, member)));
                }
                out.push_str(")\n");
            }
        }
    }
    out
}

fn member(m: &Module, member: &Member) -> String {
    match member {
        Member::Let(l) => let_stmt(m, l),
        Member::Field(f) => {
            let cond = f.cond.map(|c| format!(" (if {})", expr(m, c))).unwrap_or_default();
            match &f.kind {
                FieldKind::Param { buffer, ty, init } => {
                    let kw = if *buffer { "buffer" } else { "param" };
                    let init = init.map(|e| format!(" {}", expr(m, e))).unwrap_or_default();
                    format!("({kw} {} {}{init}{cond})", f.name.text, tensor_type(m, ty))
                }
                FieldKind::Sublayer(e) => format!("(field {} {}{cond})", f.name.text, expr(m, *e)),
                FieldKind::Repeat { count, index, layer } => {
                    let with = index.as_ref().map(|i| format!("(with {}) ", i.text)).unwrap_or_default();
                    format!("(repeat {} {} {with}{}{cond})", f.name.text, expr(m, *count), expr(m, *layer))
                }
            }
        }
        Member::Forward(f) => {
            let inputs: Vec<String> = f
                .inputs
                .iter()
                .map(|i| format!("({} {}{})", i.name.text, tensor_type(m, &i.ty), if i.optional { "?" } else { "" }))
                .collect();
            let outputs: Vec<String> = f
                .outputs
                .iter()
                .map(|o| match &o.name {
                    Some(n) => format!("({} {})", n.text, tensor_type(m, &o.ty)),
                    None => tensor_type(m, &o.ty),
                })
                .collect();
            let lets: Vec<String> = f.lets.iter().map(|l| format!(" {}", let_stmt(m, l))).collect();
            format!(
                "(forward ({}) -> ({}){} {})",
                inputs.join(" "),
                outputs.join(" "),
                lets.concat(),
                expr(m, f.result)
            )
        }
        Member::Train(b) => block(m, "train", b),
        Member::Infer(b) => block(m, "infer", b),
    }
}

fn block(m: &Module, kw: &str, b: &Block) -> String {
    let items: Vec<String> = b
        .settings
        .iter()
        .map(|s| match s {
            Setting::Target { name, ty } => {
                format!("(target {} {})", name.text, tensor_type(m, ty))
            }
            Setting::Value { name, value } => format!("({} {})", name.text, expr(m, *value)),
        })
        .collect();
    format!("({kw} {})", items.join(" "))
}

fn let_stmt(m: &Module, l: &Let) -> String {
    let names: Vec<&str> = l.names.iter().map(|n| n.text.as_str()).collect();
    format!("(let {} {})", names.join(","), expr(m, l.value))
}

fn tensor_type(m: &Module, t: &TensorType) -> String {
    let dims: Vec<String> = t
        .dims
        .iter()
        .map(|d| match d {
            DimAst::Rest(_) => "...".into(),
            DimAst::Expr(e) => expr(m, *e),
        })
        .collect();
    let dt = t.dtype.map(|d| format!(" {}", d.as_str())).unwrap_or_default();
    format!("[{}]{dt}", dims.join(" "))
}

fn args(m: &Module, args: &[Arg]) -> String {
    args.iter()
        .map(|a| match &a.name {
            Some(n) => format!(" {}={}", n.text, expr(m, a.value)),
            None => format!(" {}", expr(m, a.value)),
        })
        .collect()
}

pub fn expr(m: &Module, e: ExprId) -> String {
    match &m.expr(e).kind {
        ExprKind::Int(v) => v.to_string(),
        ExprKind::Float(v) => float_text(*v),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::None => "none".into(),
        ExprKind::Str(s) => format!("\"{s}\""),
        ExprKind::Name(n) => n.clone(),
        ExprKind::List(items) => {
            let items: Vec<String> = items.iter().map(|i| expr(m, *i)).collect();
            format!("(list {})", items.join(" "))
        }
        ExprKind::Unary(op, x) => format!("({} {})", if *op == UnOp::Neg { "neg" } else { "not" }, expr(m, *x)),
        ExprKind::Binary(op, l, r) => format!("({} {} {})", op.symbol(), expr(m, *l), expr(m, *r)),
        ExprKind::Call { callee, args: a } => format!("(call {}{})", expr(m, *callee), args(m, a)),
        ExprKind::Member { base, name } => format!("(. {} {})", expr(m, *base), name.text),
        ExprKind::Index { base, items } => {
            let items: Vec<String> = items
                .iter()
                .map(|i| match i {
                    IndexItem::Rest => "...".into(),
                    IndexItem::At(e) => expr(m, *e),
                    IndexItem::Slice(lo, hi) => format!(
                        "{}:{}",
                        lo.map(|e| expr(m, e)).unwrap_or_default(),
                        hi.map(|e| expr(m, e)).unwrap_or_default()
                    ),
                })
                .collect();
            format!("(index {} {})", expr(m, *base), items.join(" "))
        }
        ExprKind::If { cond, then, otherwise } => {
            format!("(if {} {} {})", expr(m, *cond), expr(m, *then), expr(m, *otherwise))
        }
    }
}
