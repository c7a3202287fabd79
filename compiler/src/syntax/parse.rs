//! Text to [`Module`]: the pest parser, a Pratt table for operators, and the
//! translation of pest's errors into diagnostics phrased for people.
//! pest types never leave this file.

use super::ast::*;
use crate::diag::Diagnostic;
use crate::source::{FileId, Span};
use la_arena::Arena;
use pest::Parser as _;
use pest::iterators::{Pair, Pairs};
use pest::pratt_parser::{Assoc, Op, PrattParser};
use std::cell::RefCell;
use std::sync::LazyLock;

#[derive(pest_derive::Parser)]
#[grammar = "syntax/grammar.pest"]
struct Grammar;

static PRATT: LazyLock<PrattParser<Rule>> = LazyLock::new(|| {
    // Lowest precedence first; must agree with BinOp::precedence.
    PrattParser::new()
        .op(Op::infix(Rule::pipe, Assoc::Left))
        .op(Op::infix(Rule::or, Assoc::Left))
        .op(Op::infix(Rule::and, Assoc::Left))
        .op(Op::prefix(Rule::not))
        .op(Op::infix(Rule::eq, Assoc::Left)
            | Op::infix(Rule::ne, Assoc::Left)
            | Op::infix(Rule::lt, Assoc::Left)
            | Op::infix(Rule::le, Assoc::Left)
            | Op::infix(Rule::gt, Assoc::Left)
            | Op::infix(Rule::ge, Assoc::Left))
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left)
            | Op::infix(Rule::div, Assoc::Left)
            | Op::infix(Rule::rem, Assoc::Left)
            | Op::infix(Rule::matmul, Assoc::Left))
        .op(Op::prefix(Rule::neg))
        .op(Op::infix(Rule::pow, Assoc::Right))
        .op(Op::postfix(Rule::call_args) | Op::postfix(Rule::dot) | Op::postfix(Rule::index))
});

/// Parses one file. On a syntax error the module is `None` and the
/// diagnostics say where and what was expected.
pub fn parse(file: FileId, text: &str) -> (Option<Module>, Vec<Diagnostic>) {
    // The parser and every pass over expressions recurse; bound the depth
    // first so that no input can overflow the stack.
    if let Some(d) = too_deep(file, text) {
        return (None, vec![d]);
    }
    let pairs = match Grammar::parse(Rule::file, text) {
        Ok(pairs) => pairs,
        Err(e) => return (None, vec![syntax_error(file, text, e)]),
    };
    let builder = Builder { file, exprs: RefCell::new(Arena::new()), errors: RefCell::new(Vec::new()) };
    let mut items = Vec::new();
    for pair in pairs.into_iter().next().expect("file rule").into_inner() {
        if pair.as_rule() != Rule::EOI {
            items.push(builder.item(pair));
        }
    }
    let mut errors = builder.errors.into_inner();
    let exprs = builder.exprs.into_inner();
    errors.extend(deepest_expr(&exprs));
    let module = Module { file, items, exprs, comments: comments(file, text) };
    (errors.is_empty().then_some(module), errors)
}

/// The deepest an expression may nest, counting brackets, prefix operators,
/// `if`s and operands of operator chains (`a - b - c` is 3 deep). Real specs
/// stay under 30; the compiler's recursive passes fit far more than this on
/// a 2 MiB thread stack.
pub const MAX_DEPTH: usize = 256;

/// An error at the first place where `text` nests more than [`MAX_DEPTH`]
/// brackets, prefix operators and `if`s, found by a scan that never recurses
/// (the parser itself recurses once per level). Within one bracket level,
/// prefix operators and `if`s count until the next `,`, `=` or `let`.
fn too_deep(file: FileId, text: &str) -> Option<Diagnostic> {
    let bytes = text.as_bytes();
    // For each open bracket, the prefix operators and `if`s seen in it.
    let mut levels: Vec<usize> = vec![0];
    let mut depth = 0usize; // brackets + every level's count
    let mut operand_before = false; // `-` after an operand is subtraction
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let mut opened = false;
        match c {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
                operand_before = true;
            }
            b'(' | b'[' | b'{' => {
                levels.push(0);
                depth += 1;
                opened = true;
                operand_before = false;
            }
            b')' | b']' | b'}' => {
                if levels.len() > 1 {
                    depth -= 1 + levels.pop().unwrap_or(0);
                }
                operand_before = true;
            }
            b',' | b'=' => {
                let level = levels.last_mut().expect("the file level");
                depth -= *level;
                *level = 0;
                operand_before = false;
            }
            b'-' if !operand_before => {
                *levels.last_mut().expect("the file level") += 1;
                depth += 1;
                opened = true;
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' => {
                while i + 1 < bytes.len()
                    && (bytes[i + 1].is_ascii_alphanumeric() || matches!(bytes[i + 1], b'_' | b'.'))
                {
                    i += 1;
                }
                match &text[start..=i] {
                    "if" | "not" => {
                        *levels.last_mut().expect("the file level") += 1;
                        depth += 1;
                        opened = true;
                        operand_before = false;
                    }
                    "let" => {
                        let level = levels.last_mut().expect("the file level");
                        depth -= *level;
                        *level = 0;
                        operand_before = false;
                    }
                    "then" | "else" | "and" | "or" => operand_before = false,
                    _ => operand_before = true,
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => operand_before = false,
        }
        if opened && depth > MAX_DEPTH {
            let span = Span::new(file, start, i + 1);
            return Some(
                Diagnostic::new("E0003", format!("nested more than {MAX_DEPTH} deep"))
                    .label(span, "this bracket, `-`, `not` or `if` is one level too many")
                    .help("name the inner parts with `let`, or define a layer for them"),
            );
        }
        i += 1;
    }
    None
}

/// An error at the first expression more than [`MAX_DEPTH`] deep, computed
/// over the arena in allocation order (operands are allocated before the
/// expressions that use them), without recursion.
fn deepest_expr(exprs: &Arena<Expr>) -> Option<Diagnostic> {
    let mut depth = la_arena::ArenaMap::default();
    for (id, e) in exprs.iter() {
        let mut deepest = 0;
        e.kind.for_each_child(|c| deepest = deepest.max(depth.get(c).copied().unwrap_or(0)));
        let d = deepest + 1;
        if d > MAX_DEPTH {
            let span =
                Span::new(e.span.file, e.span.start as usize, (e.span.start as usize + 1).min(e.span.end as usize));
            return Some(
                Diagnostic::new("E0003", format!("expression nested more than {MAX_DEPTH} deep"))
                    .label(span, "this expression is one level too deep")
                    .help("split a long chain of operators with `let`, or define a layer for a part of it"),
            );
        }
        depth.insert(id, d);
    }
    None
}

/// Parses a lone expression (used by `--set key=value`).
pub fn parse_expr(file: FileId, text: &str) -> Result<(Arena<Expr>, ExprId), Diagnostic> {
    // Parse a tiny file, `layer L { let x = <text> }`, and take the expression.
    let wrapped = format!("layer L {{ let x = {text} }}");
    let offset = "layer L { let x = ".len();
    let (module, errors) = parse(file, &wrapped);
    let Some(module) = module else {
        let mut d = errors.into_iter().next().expect("an error");
        for l in &mut d.labels {
            l.span.start = l.span.start.saturating_sub(offset as u32).min(text.len() as u32);
            l.span.end = l.span.end.saturating_sub(offset as u32).min(text.len() as u32);
        }
        return Err(d);
    };
    let Some(Item::Def(def)) = module.items.first() else { unreachable!("wrapper is a layer") };
    let Some(Member::Let(l)) = def.members.first() else { unreachable!("wrapper has a let") };
    Ok((module.exprs, l.value))
}

struct Builder {
    file: FileId,
    exprs: RefCell<Arena<Expr>>,
    errors: RefCell<Vec<Diagnostic>>,
}

impl Builder {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        Span::new(self.file, s.start(), s.end())
    }

    fn name(&self, pair: Pair<Rule>) -> Name {
        Name { text: pair.as_str().to_string(), span: self.span(&pair) }
    }

    fn alloc(&self, kind: ExprKind, span: Span) -> ExprId {
        self.exprs.borrow_mut().alloc(Expr { kind, span })
    }

    fn item(&self, pair: Pair<Rule>) -> Item {
        let span = self.span(&pair);
        match pair.as_rule() {
            Rule::import => {
                let target = pair.into_inner().next().expect("import target");
                let target = match target.as_rule() {
                    Rule::string => ImportTarget::Path(unquote(target.as_str())),
                    _ => ImportTarget::Module(target.as_str().split('.').map(str::to_string).collect()),
                };
                Item::Import(Import { target, span })
            }
            Rule::layer_def | Rule::model_def => {
                let kind = if pair.as_rule() == Rule::layer_def { DefKind::Layer } else { DefKind::Model };
                let mut inner = pair.into_inner();
                let name = self.name(inner.next().expect("name"));
                let mut def = Def { kind, name, hparams: Vec::new(), hf: Vec::new(), members: Vec::new(), span };
                for p in inner {
                    match p.as_rule() {
                        Rule::hparams => def.hparams = p.into_inner().map(|h| self.hparam(h)).collect(),
                        Rule::hf_map => def.hf = p.into_inner().map(|e| self.hf_entry(e)).collect(),
                        _ => def.members.push(self.member(p)),
                    }
                }
                Item::Def(def)
            }
            Rule::adapt_def => {
                let mut inner = pair.into_inner();
                let name = self.name(inner.next().expect("name"));
                let base = self.name(inner.next().expect("base"));
                let adapter = self.name(inner.next().expect("adapter"));
                let mut args = Vec::new();
                let mut targets = Vec::new();
                for p in inner {
                    match p.as_rule() {
                        Rule::call_args => args = self.args(p),
                        _ => targets.push(self.name(p)),
                    }
                }
                Item::Adapt(Adapt { name, base, adapter, args, targets, span })
            }
            r => unreachable!("item rule {r:?}"),
        }
    }

    fn hparam(&self, pair: Pair<Rule>) -> HParam {
        let span = self.span(&pair);
        let mut inner = pair.into_inner();
        let name = self.name(inner.next().expect("name"));
        let ty_pair = inner.next().expect("type");
        let ty_span = self.span(&ty_pair);
        let mut ty_inner = ty_pair.into_inner();
        let word = match ty_inner.next().expect("type word").as_str() {
            "int" => HTypeWord::Int,
            "float" => HTypeWord::Float,
            "bool" => HTypeWord::Bool,
            "str" => HTypeWord::Str,
            _ => HTypeWord::Layer,
        };
        let ty = HType { word, optional: ty_inner.next().is_some(), span: ty_span };
        let default = inner.next().map(|e| self.expr(e));
        HParam { name, ty, default, span }
    }

    fn hf_entry(&self, pair: Pair<Rule>) -> HfEntry {
        let mut inner = pair.into_inner();
        let name = self.name(inner.next().expect("name"));
        HfEntry { name, keys: inner.map(|k| self.name(k)).collect() }
    }

    fn member(&self, pair: Pair<Rule>) -> Member {
        let span = self.span(&pair);
        match pair.as_rule() {
            Rule::let_stmt => Member::Let(self.let_stmt(pair)),
            Rule::field => {
                let mut inner = pair.into_inner();
                let name = self.name(inner.next().expect("name"));
                let kind_pair = inner.next().expect("field kind");
                let kind = match kind_pair.as_rule() {
                    Rule::param_decl => {
                        let mut p = kind_pair.into_inner();
                        let buffer = p.next().expect("param kind").as_str() == "buffer";
                        let shape = p.next().expect("shape");
                        let mut ty = self.tensor_type_parts(shape, None);
                        let mut init = None;
                        for rest in p {
                            match rest.as_rule() {
                                Rule::dtype => ty.dtype = Some(dtype(rest.as_str())),
                                _ => init = Some(self.expr(rest)),
                            }
                        }
                        FieldKind::Param { buffer, ty, init }
                    }
                    Rule::repeat_decl => {
                        let mut p = kind_pair.into_inner().peekable();
                        let count = self.expr(p.next().expect("count"));
                        let index = p.next_if(|q| q.as_rule() == Rule::repeat_index).map(|q| {
                            let name = q.into_inner().next().expect("index name");
                            self.name(name)
                        });
                        let layer = self.expr(p.next().expect("layer"));
                        FieldKind::Repeat { count, index, layer }
                    }
                    _ => FieldKind::Sublayer(self.expr(kind_pair.into_inner().next().expect("expr"))),
                };
                let cond = inner.next().map(|c| self.expr(c.into_inner().next().expect("cond")));
                Member::Field(Field { name, kind, cond, span })
            }
            Rule::forward_def => Member::Forward(self.forward(pair)),
            Rule::train_block => Member::Train(self.block(pair)),
            Rule::infer_block => Member::Infer(self.block(pair)),
            r => unreachable!("member rule {r:?}"),
        }
    }

    fn let_stmt(&self, pair: Pair<Rule>) -> Let {
        let span = self.span(&pair);
        let mut names = Vec::new();
        let mut value = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => names.push(self.name(p)),
                _ => value = Some(self.expr(p)),
            }
        }
        Let { names, value: value.expect("let value"), span }
    }

    fn forward(&self, pair: Pair<Rule>) -> Forward {
        let span = self.span(&pair);
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        let mut outputs_parenthesised = false;
        let mut lets = Vec::new();
        let mut result = None;
        let mut braced = false;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::input => {
                    let mut i = p.into_inner();
                    let name = self.name(i.next().expect("input name"));
                    let ty = self.tensor_type(i.next().expect("input type"));
                    inputs.push(Input { name, ty, optional: i.next().is_some() });
                }
                Rule::outputs => {
                    outputs_parenthesised = p.as_str().trim_start().starts_with('(');
                    for o in p.into_inner() {
                        let mut o = o.into_inner();
                        let first = o.next().expect("output");
                        let (name, ty) = if first.as_rule() == Rule::ident {
                            (Some(self.name(first)), o.next().expect("output type"))
                        } else {
                            (None, first)
                        };
                        outputs.push(Output { name, ty: self.tensor_type(ty) });
                    }
                }
                Rule::body => {
                    braced = true;
                    for b in p.into_inner() {
                        match b.as_rule() {
                            Rule::let_stmt => lets.push(self.let_stmt(b)),
                            _ => result = Some(self.expr(b)),
                        }
                    }
                }
                _ => result = Some(self.expr(p)),
            }
        }
        Forward { inputs, outputs, outputs_parenthesised, lets, result: result.expect("forward result"), braced, span }
    }

    fn block(&self, pair: Pair<Rule>) -> Block {
        let span = self.span(&pair);
        let mut settings = Vec::new();
        for s in pair.into_inner() {
            let mut inner = s.into_inner();
            let first = inner.next().expect("setting");
            if first.as_rule() == Rule::target_decl {
                let mut t = first.into_inner();
                let name = self.name(t.next().expect("target name"));
                let ty = self.tensor_type(t.next().expect("target type"));
                settings.push(Setting::Target { name, ty });
            } else {
                let name = self.name(first);
                let value = self.expr(inner.next().expect("setting value"));
                settings.push(Setting::Value { name, value });
            }
        }
        Block { settings, span }
    }

    fn tensor_type(&self, pair: Pair<Rule>) -> TensorType {
        let mut inner = pair.into_inner();
        let shape = inner.next().expect("shape");
        let dtype = inner.next().map(|d| dtype(d.as_str()));
        self.tensor_type_parts(shape, dtype)
    }

    fn tensor_type_parts(&self, shape: Pair<Rule>, dtype: Option<DType>) -> TensorType {
        let span = self.span(&shape);
        let dims = shape
            .into_inner()
            .map(|d| {
                let d = d.into_inner().next().expect("dim");
                match d.as_rule() {
                    Rule::ellipsis => DimAst::Rest(self.span(&d)),
                    _ => DimAst::Expr(self.expr(d)),
                }
            })
            .collect();
        TensorType { dims, dtype, span }
    }

    fn args(&self, pair: Pair<Rule>) -> Vec<Arg> {
        pair.into_inner()
            .map(|a| {
                let mut inner = a.into_inner();
                let first = inner.next().expect("arg");
                match inner.next() {
                    Some(value) => Arg { name: Some(self.name(first)), value: self.expr(value) },
                    None => Arg { name: None, value: self.expr(first) },
                }
            })
            .collect()
    }

    fn expr(&self, pair: Pair<Rule>) -> ExprId {
        debug_assert_eq!(pair.as_rule(), Rule::expr);
        self.pratt(pair.into_inner())
    }

    fn pratt(&self, pairs: Pairs<Rule>) -> ExprId {
        // `postfixed` groups an operand with its postfixes (to control
        // whitespace); the Pratt parser wants them as a flat sequence.
        let flat = pairs
            .flat_map(|p| if p.as_rule() == Rule::postfixed { p.into_inner().collect::<Vec<_>>() } else { vec![p] });
        PRATT
            .map_primary(|p| self.primary(p))
            .map_prefix(|op, operand| {
                let span = self.span(&op).to(self.exprs.borrow()[operand].span);
                let op = if op.as_rule() == Rule::neg { UnOp::Neg } else { UnOp::Not };
                self.alloc(ExprKind::Unary(op, operand), span)
            })
            .map_postfix(|base, op| {
                let span = self.exprs.borrow()[base].span.to(self.span(&op));
                let kind = match op.as_rule() {
                    Rule::call_args => ExprKind::Call { callee: base, args: self.args(op) },
                    Rule::dot => ExprKind::Member { base, name: self.name(op.into_inner().next().expect("member")) },
                    _ => ExprKind::Index { base, items: op.into_inner().map(|i| self.index_item(i)).collect() },
                };
                self.alloc(kind, span)
            })
            .map_infix(|lhs, op, rhs| {
                let span = {
                    let exprs = self.exprs.borrow();
                    exprs[lhs].span.to(exprs[rhs].span)
                };
                let op = match op.as_rule() {
                    Rule::pipe => BinOp::Pipe,
                    Rule::or => BinOp::Or,
                    Rule::and => BinOp::And,
                    Rule::eq => BinOp::Eq,
                    Rule::ne => BinOp::Ne,
                    Rule::lt => BinOp::Lt,
                    Rule::le => BinOp::Le,
                    Rule::gt => BinOp::Gt,
                    Rule::ge => BinOp::Ge,
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::div => BinOp::Div,
                    Rule::rem => BinOp::Rem,
                    Rule::matmul => BinOp::MatMul,
                    _ => BinOp::Pow,
                };
                self.alloc(ExprKind::Binary(op, lhs, rhs), span)
            })
            .parse(flat)
    }

    fn index_item(&self, pair: Pair<Rule>) -> IndexItem {
        let inner = pair.into_inner().next().expect("index item");
        match inner.as_rule() {
            Rule::ellipsis => IndexItem::Rest,
            Rule::slice => {
                let text = inner.as_str();
                let colon = text.find(':').expect("slice colon") + inner.as_span().start();
                let mut lo = None;
                let mut hi = None;
                for e in inner.into_inner() {
                    if e.as_span().start() < colon {
                        lo = Some(self.expr(e));
                    } else {
                        hi = Some(self.expr(e));
                    }
                }
                IndexItem::Slice(lo, hi)
            }
            _ => IndexItem::At(self.expr(inner)),
        }
    }

    fn primary(&self, pair: Pair<Rule>) -> ExprId {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::int => match pair.as_str().replace('_', "").parse::<i64>() {
                Ok(v) => ExprKind::Int(v),
                Err(_) => {
                    self.error(
                        Diagnostic::at("E0002", span, "integer literal is too large")
                            .help("integers must fit in 64 bits"),
                    );
                    ExprKind::Int(0)
                }
            },
            Rule::float => {
                let v: f64 = pair.as_str().replace('_', "").parse().unwrap_or(f64::INFINITY);
                if !v.is_finite() {
                    self.error(Diagnostic::at("E0002", span, "number is too large").help("floats must fit in 64 bits"));
                }
                ExprKind::Float(if v.is_finite() { v } else { 0.0 })
            }
            Rule::string => ExprKind::Str(unquote(pair.as_str())),
            Rule::true_lit => ExprKind::Bool(true),
            Rule::false_lit => ExprKind::Bool(false),
            Rule::none_lit => ExprKind::None,
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            Rule::list => ExprKind::List(pair.into_inner().map(|e| self.expr(e)).collect()),
            Rule::paren => return self.expr(pair.into_inner().next().expect("paren expr")),
            Rule::if_expr => {
                let mut i = pair.into_inner();
                let cond = self.expr(i.next().expect("cond"));
                let then = self.expr(i.next().expect("then"));
                let otherwise = self.expr(i.next().expect("else"));
                ExprKind::If { cond, then, otherwise }
            }
            r => unreachable!("primary rule {r:?}"),
        };
        self.alloc(kind, span)
    }

    fn error(&self, d: Diagnostic) {
        self.errors.borrow_mut().push(d);
    }
}

fn unquote(s: &str) -> String {
    s[1..s.len() - 1].to_string()
}

fn dtype(s: &str) -> DType {
    match s {
        "int" => DType::Int,
        "bool" => DType::Bool,
        _ => DType::F32,
    }
}

/// Collects `#` comments outside string literals, in order.
fn comments(file: FileId, text: &str) -> Vec<Comment> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => in_string = !in_string,
            '\n' => in_string = false,
            '#' if !in_string => {
                let end = text[i..].find('\n').map_or(text.len(), |n| i + n);
                let before = text[..i].trim_end_matches([' ', '\t']);
                let blank_before = before.ends_with("\n\n") || before.ends_with("\n\r\n");
                out.push(Comment {
                    span: Span::new(file, i, end),
                    text: text[i..end].trim_end().to_string(),
                    blank_before,
                });
                while chars.peek().is_some_and(|(j, _)| *j < end) {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    out
}

/// A phrase for each rule that can appear in "expected ..." lists.
fn phrase(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of file",
        Rule::file => "`import`, `layer` or `model`",
        Rule::ident | Rule::module_path | Rule::hf_key => "a name",
        Rule::keyword => "a keyword",
        Rule::int => "an integer",
        Rule::float => "a number",
        Rule::string => "a string",
        Rule::import => "`import`",
        Rule::layer_def => "`layer`",
        Rule::model_def | Rule::adapt_def => "`model`",
        Rule::hparams => "hyperparameters `(...)`",
        Rule::hparam => "a hyperparameter `name: type`",
        Rule::type_name | Rule::type_word => "a type (int, float, bool, str or layer)",
        Rule::optional_mark => "`?`",
        Rule::hf_map => "`from hf(...)`",
        Rule::hf_entry => "a mapping `name: config_key`",
        Rule::let_stmt => "`let`",
        Rule::field => "a field `name: ...`",
        Rule::field_name => "a field name",
        Rule::param_decl | Rule::param_kind => "`param[...]`",
        Rule::repeat_decl => "`repeat(n) ...`",
        Rule::sublayer => "a layer",
        Rule::field_cond => "`if`",
        Rule::forward_def => "`forward`",
        Rule::input => "an input `name: [shape]`",
        Rule::outputs | Rule::output => "an output type",
        Rule::body => "`{`",
        Rule::tensor_type | Rule::shape => "a shape `[...]`",
        Rule::dim => "a dimension",
        Rule::dtype => "an element type (f32, int or bool)",
        Rule::train_block => "`train { ... }`",
        Rule::infer_block => "`infer { ... }`",
        Rule::setting => "a setting `name: value`",
        Rule::target_decl => "`target`",
        Rule::expr | Rule::primary | Rule::if_expr | Rule::list | Rule::paren => "an expression",
        Rule::pipe
        | Rule::or
        | Rule::and
        | Rule::eq
        | Rule::ne
        | Rule::le
        | Rule::ge
        | Rule::lt
        | Rule::gt
        | Rule::add
        | Rule::sub
        | Rule::mul
        | Rule::div
        | Rule::rem
        | Rule::matmul
        | Rule::pow => "an operator",
        Rule::neg | Rule::not | Rule::prefix => "an expression",
        Rule::call_args => "`(`",
        Rule::arg => "an argument",
        Rule::dot => "`.`",
        Rule::index => "`[`",
        Rule::index_item | Rule::slice => "an index",
        Rule::ellipsis => "`...`",
        Rule::true_lit | Rule::false_lit => "`true` or `false`",
        Rule::none_lit => "`none`",
        _ => "something else",
    }
}

fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let found = found_token(text, pos);
    let end = (pos + found.len()).max(pos);
    let span = Span::new(file, pos, end);
    let mut expected: Vec<&str> = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => positives.iter().map(|r| phrase(*r)).collect(),
        pest::error::ErrorVariant::CustomError { .. } => Vec::new(),
    };
    expected.sort();
    expected.dedup();
    // Operators are always possible after an expression; listing them is noise.
    if expected.len() > 1 {
        expected.retain(|e| *e != "an operator" && *e != "something else");
    }
    let found_text = if found.is_empty() { "end of file".to_string() } else { format!("`{found}`") };
    let message = format!("unexpected {found_text}");
    let label = match expected.len() {
        0 => "not expected here".to_string(),
        1 => format!("expected {}", expected[0]),
        n => format!("expected {} or {}", expected[..n - 1].join(", "), expected[n - 1]),
    };
    let mut d = Diagnostic::new("E0001", message).label(span, label);
    if let Some(hint) = syntax_hint(text, pos, &found) {
        d = d.help(hint);
    }
    d
}

fn found_token(text: &str, pos: usize) -> String {
    let rest = &text[pos.min(text.len())..];
    let mut chars = rest.chars();
    match chars.next() {
        None => String::new(),
        Some(c) if c.is_alphanumeric() || c == '_' => {
            rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
        }
        Some(c) => c.to_string(),
    }
}

fn syntax_hint(text: &str, pos: usize, found: &str) -> Option<String> {
    let before = text[..pos.min(text.len())].trim_end();
    if found == "=" && before.ends_with(':') {
        return Some("a field is written `name: Layer(...)` or `name: param[...] = init`".into());
    }
    if found.is_empty() {
        return Some("the file ended early: is a `}` or `)` missing?".into());
    }
    if ["def", "fn", "class", "function"].contains(&found) {
        return Some("definitions start with `layer` or `model`".into());
    }
    if found == ";" {
        return Some("statements are separated by newlines, not `;`".into());
    }
    None
}
