//! The syntax tree of one .model file. Expressions live in an arena and are
//! referred to by typed ids; every node keeps the byte span it came from.

use crate::source::{FileId, Span};
pub use crate::types::DType;
use la_arena::{Arena, Idx};

pub type ExprId = Idx<Expr>;

/// One parsed file.
pub struct Module {
    pub file: FileId,
    pub items: Vec<Item>,
    pub exprs: Arena<Expr>,
    /// Comments in source order, so that `fmt` can keep them.
    pub comments: Vec<Comment>,
}

impl Module {
    pub fn expr(&self, id: ExprId) -> &Expr {
        &self.exprs[id]
    }
}

#[derive(Clone, Debug)]
pub struct Comment {
    pub span: Span,
    pub text: String,
    /// A blank line separates it from what came before, so `fmt` keeps one.
    pub blank_before: bool,
}

/// A name as written, with where it was written.
#[derive(Clone, Debug)]
pub struct Name {
    pub text: String,
    pub span: Span,
}

#[derive(Debug)]
pub enum Item {
    Import(Import),
    /// `layer` and `model` definitions share one shape; `kind` tells them apart.
    Def(Def),
    Adapt(Adapt),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Import(i) => i.span,
            Item::Def(d) => d.span,
            Item::Adapt(a) => a.span,
        }
    }
}

#[derive(Debug)]
pub struct Import {
    pub target: ImportTarget,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImportTarget {
    /// `import std.attention`: a file under stdlib/.
    Module(Vec<String>),
    /// `import "blocks.model"`: a path relative to the importing file.
    Path(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefKind {
    Layer,
    Model,
}

#[derive(Debug)]
pub struct Def {
    pub kind: DefKind,
    pub name: Name,
    pub hparams: Vec<HParam>,
    /// `from hf(...)`: hyperparameter -> config.json keys, first present wins.
    pub hf: Vec<HfEntry>,
    pub members: Vec<Member>,
    pub span: Span,
}

#[derive(Debug)]
pub struct HParam {
    pub name: Name,
    pub ty: HType,
    pub default: Option<ExprId>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HTypeWord {
    Int,
    Float,
    Bool,
    Str,
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HType {
    pub word: HTypeWord,
    pub optional: bool,
    pub span: Span,
}

#[derive(Debug)]
pub struct HfEntry {
    pub name: Name,
    pub keys: Vec<Name>,
}

#[derive(Debug)]
pub enum Member {
    Let(Let),
    Field(Field),
    Forward(Forward),
    Train(Block),
    Infer(Block),
}

impl Member {
    pub fn span(&self) -> Span {
        match self {
            Member::Let(l) => l.span,
            Member::Field(f) => f.span,
            Member::Forward(f) => f.span,
            Member::Train(b) | Member::Infer(b) => b.span,
        }
    }
}

#[derive(Debug)]
pub struct Let {
    pub names: Vec<Name>,
    pub value: ExprId,
    pub span: Span,
}

#[derive(Debug)]
pub struct Field {
    pub name: Name,
    pub kind: FieldKind,
    /// `if cond`: the field exists only when cond holds.
    pub cond: Option<ExprId>,
    pub span: Span,
}

#[derive(Debug)]
pub enum FieldKind {
    /// `param[shape] = init`; a `buffer` is saved but never trained.
    Param { buffer: bool, ty: TensorType, init: Option<ExprId> },
    /// `Linear(a, b)` or a layer-valued hyperparameter.
    Sublayer(ExprId),
    /// `repeat(n) Block(...)`: n copies named `name.0`, `name.1`, ...;
    /// with `repeat(n) with i -> Block(...)` the layer is evaluated per copy
    /// with `i` its index.
    Repeat { count: ExprId, index: Option<Name>, layer: ExprId },
}

#[derive(Debug, Clone)]
pub struct TensorType {
    pub dims: Vec<DimAst>,
    /// Written element type; `None` means the default, f32.
    pub dtype: Option<DType>,
    pub span: Span,
}

#[derive(Debug, Clone, Copy)]
pub enum DimAst {
    /// `...`
    Rest(Span),
    Expr(ExprId),
}

#[derive(Debug)]
pub struct Forward {
    pub inputs: Vec<Input>,
    pub outputs: Vec<Output>,
    /// Whether the outputs were written in parentheses.
    pub outputs_parenthesised: bool,
    pub lets: Vec<Let>,
    pub result: ExprId,
    /// `{ ... }` rather than `= expr`.
    pub braced: bool,
    pub span: Span,
}

#[derive(Debug)]
pub struct Input {
    pub name: Name,
    pub ty: TensorType,
    pub optional: bool,
}

#[derive(Debug)]
pub struct Output {
    pub name: Option<Name>,
    pub ty: TensorType,
}

#[derive(Debug)]
pub struct Block {
    pub settings: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug)]
pub enum Setting {
    /// `target labels: [B] int`
    Target { name: Name, ty: TensorType },
    /// `lr: 3e-4`
    Value { name: Name, value: ExprId },
}

#[derive(Debug)]
pub struct Adapt {
    pub name: Name,
    pub base: Name,
    pub adapter: Name,
    pub args: Vec<Arg>,
    pub targets: Vec<Name>,
    pub span: Span,
}

#[derive(Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    Str(String),
    Name(String),
    List(Vec<ExprId>),
    Unary(UnOp, ExprId),
    Binary(BinOp, ExprId, ExprId),
    Call { callee: ExprId, args: Vec<Arg> },
    Member { base: ExprId, name: Name },
    Index { base: ExprId, items: Vec<IndexItem> },
    If { cond: ExprId, then: ExprId, otherwise: ExprId },
}

impl ExprKind {
    /// Calls `f` with each operand, in source order.
    pub fn for_each_child(&self, mut f: impl FnMut(ExprId)) {
        match self {
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::None => {}
            ExprKind::Str(_) | ExprKind::Name(_) => {}
            ExprKind::List(items) => items.iter().copied().for_each(f),
            ExprKind::Unary(_, e) | ExprKind::Member { base: e, .. } => f(*e),
            ExprKind::Binary(_, a, b) => {
                f(*a);
                f(*b);
            }
            ExprKind::Call { callee, args } => {
                f(*callee);
                args.iter().for_each(|a| f(a.value));
            }
            ExprKind::Index { base, items } => {
                f(*base);
                for item in items {
                    match *item {
                        IndexItem::Rest => {}
                        IndexItem::Slice(lo, hi) => lo.into_iter().chain(hi).for_each(&mut f),
                        IndexItem::At(e) => f(e),
                    }
                }
            }
            ExprKind::If { cond, then, otherwise } => {
                f(*cond);
                f(*then);
                f(*otherwise);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Arg {
    pub name: Option<Name>,
    pub value: ExprId,
}

#[derive(Debug, Clone, Copy)]
pub enum IndexItem {
    Rest,
    Slice(Option<ExprId>, Option<ExprId>),
    At(ExprId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Pipe,
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    MatMul,
    Pow,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Pipe => "|>",
            BinOp::Or => "or",
            BinOp::And => "and",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::MatMul => "@",
            BinOp::Pow => "**",
        }
    }

    /// Binding strength, higher binds tighter; shared by parser and printer.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Pipe => 1,
            BinOp::Or => 2,
            BinOp::And => 3,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 5,
            BinOp::Add | BinOp::Sub => 6,
            BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::MatMul => 7,
            BinOp::Pow => 9,
        }
    }
}

/// Precedence of prefix `not` (between `and` and comparisons).
pub const NOT_PRECEDENCE: u8 = 4;
/// Precedence of prefix `-` (between `*` and `**`: `-x ** 2` is `-(x ** 2)`).
pub const NEG_PRECEDENCE: u8 = 8;
/// Calls, members, indexing and atoms.
pub const POSTFIX_PRECEDENCE: u8 = 10;
