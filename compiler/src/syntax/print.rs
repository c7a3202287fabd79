//! [`Module`] back to canonical source text: the form `modelc fmt` writes.
//! Parentheses are inserted from operator precedence alone, so printing
//! then parsing gives back the same tree; comments are kept, each on its own
//! line before the construct that follows it.

use super::ast::*;

const WIDTH: usize = 100;
const INDENT: &str = "    ";

/// Canonical source of a module.
pub fn print_module(m: &Module) -> String {
    let mut p = Printer { m, out: String::new(), next_comment: 0 };
    for (i, item) in m.items.iter().enumerate() {
        let is_import = matches!(item, Item::Import(_));
        let prev_import = i > 0 && matches!(m.items[i - 1], Item::Import(_));
        if i > 0 && !(is_import && prev_import) {
            p.out.push('\n');
        }
        p.comments_before(item.span().start, 0);
        p.item(item);
    }
    p.comments_before(u32::MAX, 0);
    p.out
}

/// Canonical source of one expression.
pub fn print_expr(m: &Module, e: ExprId) -> String {
    Printer { m, out: String::new(), next_comment: 0 }.expr(e)
}

struct Printer<'a> {
    m: &'a Module,
    out: String,
    next_comment: usize,
}

impl Printer<'_> {
    fn comments_before(&mut self, offset: u32, depth: usize) {
        while let Some(c) = self.m.comments.get(self.next_comment) {
            if c.span.start >= offset {
                break;
            }
            if c.blank_before && !self.out.is_empty() && !self.out.ends_with("\n\n") && !self.out.ends_with("{\n") {
                self.out.push('\n');
            }
            self.line(depth, &c.text);
            self.next_comment += 1;
        }
    }

    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.out.push_str(INDENT);
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Import(i) => {
                let text = match &i.target {
                    ImportTarget::Module(path) => format!("import {}", path.join(".")),
                    ImportTarget::Path(p) => format!("import \"{p}\""),
                };
                self.line(0, &text);
            }
            Item::Adapt(a) => {
                let args = if a.args.is_empty() { String::new() } else { self.args(&a.args) };
                let targets: Vec<&str> = a.targets.iter().map(|t| t.text.as_str()).collect();
                let text = format!(
                    "model {} = adapt {} with {}{} on {}",
                    a.name.text,
                    a.base.text,
                    a.adapter.text,
                    args,
                    targets.join(", ")
                );
                self.line(0, &text);
            }
            Item::Def(d) => self.def(d),
        }
    }

    fn def(&mut self, d: &Def) {
        let keyword = match d.kind {
            DefKind::Layer => "layer",
            DefKind::Model => "model",
        };
        let hparams: Vec<String> = d.hparams.iter().map(|h| self.hparam(h)).collect();
        let hf: Vec<String> =
            d.hf.iter()
                .map(|e| {
                    let keys: Vec<&str> = e.keys.iter().map(|k| k.text.as_str()).collect();
                    format!("{}: {}", e.name.text, keys.join(" | "))
                })
                .collect();
        let params = if d.hparams.is_empty() { String::new() } else { format!("({})", hparams.join(", ")) };
        let from = if hf.is_empty() { String::new() } else { format!(" from hf({})", hf.join(", ")) };
        let header = format!("{keyword} {}{params}{from} {{", d.name.text);
        if header.len() <= WIDTH {
            self.line(0, &header);
        } else {
            let mut text = format!("{keyword} {}", d.name.text);
            if !hparams.is_empty() {
                text.push_str("(\n");
                for h in &hparams {
                    text.push_str(&format!("{INDENT}{h},\n"));
                }
                text.push(')');
            }
            if !hf.is_empty() {
                text.push_str(" from hf(\n");
                for h in &hf {
                    text.push_str(&format!("{INDENT}{h},\n"));
                }
                text.push(')');
            }
            text.push_str(" {");
            self.line(0, &text);
        }
        for (i, member) in d.members.iter().enumerate() {
            let spaced = matches!(member, Member::Forward(_) | Member::Train(_) | Member::Infer(_));
            if i > 0 && (spaced || !matches!(d.members[i - 1], Member::Let(_) | Member::Field(_))) {
                self.out.push('\n');
            }
            self.comments_before(member.span().start, 1);
            self.member(member);
        }
        self.comments_before(d.span.end, 1);
        self.line(0, "}");
    }

    fn hparam(&self, h: &HParam) -> String {
        let word = match h.ty.word {
            HTypeWord::Int => "int",
            HTypeWord::Float => "float",
            HTypeWord::Bool => "bool",
            HTypeWord::Str => "str",
            HTypeWord::Layer => "layer",
        };
        let opt = if h.ty.optional { "?" } else { "" };
        match h.default {
            Some(e) => format!("{}: {word}{opt} = {}", h.name.text, self.expr(e)),
            None => format!("{}: {word}{opt}", h.name.text),
        }
    }

    fn member(&mut self, member: &Member) {
        match member {
            Member::Let(l) => {
                let text = self.let_stmt(l);
                self.line(1, &text);
            }
            Member::Field(f) => {
                let body = match &f.kind {
                    FieldKind::Param { buffer, ty, init } => {
                        let kind = if *buffer { "buffer" } else { "param" };
                        let init = init.map(|e| format!(" = {}", self.expr(e))).unwrap_or_default();
                        format!("{kind}{}{init}", self.tensor_type(ty))
                    }
                    FieldKind::Sublayer(e) => self.expr(*e),
                    FieldKind::Repeat { count, index, layer } => {
                        let with = index.as_ref().map(|i| format!("with {} -> ", i.text)).unwrap_or_default();
                        format!("repeat({}) {with}{}", self.expr(*count), self.expr(*layer))
                    }
                };
                let cond = f.cond.map(|c| format!(" if {}", self.expr(c))).unwrap_or_default();
                let text = format!("{}: {body}{cond}", f.name.text);
                self.line(1, &text);
            }
            Member::Forward(f) => self.forward(f),
            Member::Train(b) => self.block("train", b),
            Member::Infer(b) => self.block("infer", b),
        }
    }

    fn let_stmt(&self, l: &Let) -> String {
        let names: Vec<&str> = l.names.iter().map(|n| n.text.as_str()).collect();
        format!("let {} = {}", names.join(", "), self.expr(l.value))
    }

    fn forward(&mut self, f: &Forward) {
        let inputs: Vec<String> = f
            .inputs
            .iter()
            .map(|i| format!("{}: {}{}", i.name.text, self.tensor_type(&i.ty), if i.optional { "?" } else { "" }))
            .collect();
        let outputs: Vec<String> = f
            .outputs
            .iter()
            .map(|o| match &o.name {
                Some(n) => format!("{}: {}", n.text, self.tensor_type(&o.ty)),
                None => self.tensor_type(&o.ty),
            })
            .collect();
        let outputs = if f.outputs_parenthesised || outputs.len() > 1 {
            format!("({})", outputs.join(", "))
        } else {
            outputs.join(", ")
        };
        let head = format!("forward({}) -> {outputs}", inputs.join(", "));
        if !f.braced {
            let result = self.expr(f.result);
            if INDENT.len() + head.len() + 3 + result.len() <= WIDTH {
                self.line(1, &format!("{head} = {result}"));
            } else {
                self.line(1, &format!("{head} ="));
                self.line(2, &result);
            }
            return;
        }
        self.line(1, &format!("{head} {{"));
        for l in &f.lets {
            self.comments_before(l.span.start, 2);
            let text = self.let_stmt(l);
            self.line(2, &text);
        }
        self.comments_before(self.m.expr(f.result).span.start, 2);
        let result = self.expr(f.result);
        self.line(2, &result);
        self.comments_before(f.span.end, 2);
        self.line(1, "}");
    }

    fn block(&mut self, keyword: &str, b: &Block) {
        self.line(1, &format!("{keyword} {{"));
        for s in &b.settings {
            let text = match s {
                Setting::Target { name, ty } => {
                    format!("target {}: {}", name.text, self.tensor_type(ty))
                }
                Setting::Value { name, value } => format!("{}: {}", name.text, self.expr(*value)),
            };
            self.line(2, &text);
        }
        self.comments_before(b.span.end, 2);
        self.line(1, "}");
    }

    fn tensor_type(&self, t: &TensorType) -> String {
        let dims: Vec<String> = t
            .dims
            .iter()
            .map(|d| match d {
                DimAst::Rest(_) => "...".to_string(),
                DimAst::Expr(e) => self.expr(*e),
            })
            .collect();
        match t.dtype {
            Some(d) => format!("[{}] {}", dims.join(", "), d.as_str()),
            None => format!("[{}]", dims.join(", ")),
        }
    }

    fn args(&self, args: &[Arg]) -> String {
        let parts: Vec<String> = args
            .iter()
            .map(|a| match &a.name {
                Some(n) => format!("{}: {}", n.text, self.expr(a.value)),
                None => self.expr(a.value),
            })
            .collect();
        format!("({})", parts.join(", "))
    }

    fn expr(&self, id: ExprId) -> String {
        let e = self.m.expr(id);
        match &e.kind {
            ExprKind::Int(v) => v.to_string(),
            ExprKind::Float(v) => float_text(*v),
            ExprKind::Bool(b) => b.to_string(),
            ExprKind::None => "none".into(),
            ExprKind::Str(s) => format!("\"{s}\""),
            ExprKind::Name(n) => n.clone(),
            ExprKind::List(items) => {
                let items: Vec<String> = items.iter().map(|i| self.expr(*i)).collect();
                format!("[{}]", items.join(", "))
            }
            ExprKind::Unary(op, operand) => match op {
                UnOp::Neg => format!("-{}", self.operand(*operand, NEG_PRECEDENCE)),
                UnOp::Not => format!("not {}", self.operand(*operand, NOT_PRECEDENCE)),
            },
            ExprKind::Binary(op, l, r) => {
                let p = op.precedence();
                let (lp, rp) = if *op == BinOp::Pow { (p + 1, p) } else { (p, p + 1) };
                format!("{} {} {}", self.operand(*l, lp), op.symbol(), self.operand(*r, rp))
            }
            ExprKind::Call { callee, args } => {
                format!("{}{}", self.postfix_base(*callee), self.args(args))
            }
            ExprKind::Member { base, name } => {
                format!("{}.{}", self.postfix_base(*base), name.text)
            }
            ExprKind::Index { base, items } => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        IndexItem::Rest => "...".to_string(),
                        IndexItem::At(e) => self.expr(*e),
                        IndexItem::Slice(lo, hi) => format!(
                            "{}:{}",
                            lo.map(|e| self.expr(e)).unwrap_or_default(),
                            hi.map(|e| self.expr(e)).unwrap_or_default()
                        ),
                    })
                    .collect();
                format!("{}[{}]", self.postfix_base(*base), items.join(", "))
            }
            ExprKind::If { cond, then, otherwise } => {
                format!("if {} then {} else {}", self.expr(*cond), self.expr(*then), self.expr(*otherwise))
            }
        }
    }

    /// An operand that must bind at least as tightly as `min`.
    fn operand(&self, id: ExprId, min: u8) -> String {
        let text = self.expr(id);
        if precedence(&self.m.expr(id).kind) < min { format!("({text})") } else { text }
    }

    fn postfix_base(&self, id: ExprId) -> String {
        match self.m.expr(id).kind {
            // `1.x` or `2.0` would lex as a number.
            ExprKind::Int(_) | ExprKind::Float(_) => format!("({})", self.expr(id)),
            _ => self.operand(id, POSTFIX_PRECEDENCE),
        }
    }
}

fn precedence(kind: &ExprKind) -> u8 {
    match kind {
        ExprKind::Binary(op, ..) => op.precedence(),
        ExprKind::Unary(UnOp::Neg, _) => NEG_PRECEDENCE,
        ExprKind::Unary(UnOp::Not, _) => NOT_PRECEDENCE,
        // `if` extends as far right as it can, so it is the loosest of all.
        ExprKind::If { .. } => 0,
        _ => POSTFIX_PRECEDENCE,
    }
}

/// Shortest text that reads back as the same f64 and lexes as a float.
pub fn float_text(v: f64) -> String {
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E']) || !s.bytes().all(|b| b.is_ascii_digit()) { s } else { format!("{s}.0") }
}
