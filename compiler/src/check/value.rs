//! Compile-time values: hyperparameters, lets, settings and initialisers.

use crate::syntax::float_text;
use crate::types::Dim;
use std::fmt;
use std::rc::Rc;

/// Which definition a layer value or instance comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DefRef {
    pub module: usize,
    pub item: usize,
}

/// A value known before anything runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    List(Vec<Value>),
    /// A size that depends on symbolic dimensions (`T`, `B*T`).
    Dim(Dim),
    /// A layer with (some of) its hyperparameters: `SwiGLU(dim, hidden)`.
    Layer(Rc<LayerValue>),
    /// A parameter initialiser: `zeros`, `normal(0.02)`, ...
    Init(Init),
    /// A named record in settings: `adamw(lr: 3e-4)`.
    Record(String, Vec<(String, Value)>),
    /// An existing layer instance (the wrapped base of an adapter).
    Instance(super::ids::InstId),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerValue {
    pub def: DefRef,
    /// Where the layer was written, for messages.
    pub span: crate::source::Span,
    pub name: String,
    pub positional: Vec<Value>,
    pub named: Vec<(String, Value)>,
    /// Fields whose weights live under another path (`.named(o_proj:
    /// "dense")`): (field, path).
    pub renames: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear.
    FanIn,
    Constant(f64),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bool(_) => "bool",
            Value::Str(_) => "str",
            Value::None => "none",
            Value::List(_) => "list",
            Value::Dim(_) => "int",
            Value::Layer(_) => "layer",
            Value::Init(_) => "initialiser",
            Value::Record(..) => "record",
            Value::Instance(_) => "layer",
        }
    }

    /// An integer, or a symbolic size, as a dimension.
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            Value::Int(v) => Some(Dim::constant(*v)),
            Value::Dim(d) => Some(d.clone()),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(v) => Some(*v as f64),
            Value::Float(v) => Some(*v),
            _ => None,
        }
    }

    /// Normalises a symbolic dim that turned out constant.
    pub fn from_dim(d: Dim) -> Value {
        match d.as_const() {
            Some(v) => Value::Int(v),
            None => Value::Dim(d),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Int(v) => (*v).into(),
            Value::Float(v) => (*v).into(),
            Value::Bool(b) => (*b).into(),
            Value::Str(s) => s.clone().into(),
            Value::None => serde_json::Value::Null,
            Value::List(items) => items.iter().map(Value::to_json).collect(),
            other => other.to_string().into(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => f.write_str(&float_text(*v)),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "\"{s}\""),
            Value::None => f.write_str("none"),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Dim(d) => write!(f, "{d}"),
            Value::Layer(l) => {
                write!(f, "{}(", l.name)?;
                let mut first = true;
                for v in &l.positional {
                    if !first {
                        f.write_str(", ")?;
                    }
                    first = false;
                    write!(f, "{v}")?;
                }
                for (k, v) in &l.named {
                    if !first {
                        f.write_str(", ")?;
                    }
                    first = false;
                    write!(f, "{k}: {v}")?;
                }
                f.write_str(")")
            }
            Value::Init(i) => match i {
                Init::Zeros => f.write_str("zeros"),
                Init::Ones => f.write_str("ones"),
                Init::Normal { std } => write!(f, "normal({})", float_text(*std)),
                Init::Uniform { bound } => write!(f, "uniform({})", float_text(*bound)),
                Init::FanIn => f.write_str("fan_in"),
                Init::Constant(v) => write!(f, "constant({})", float_text(*v)),
            },
            Value::Instance(i) => write!(f, "<layer #{i}>"),
            Value::Record(name, fields) => {
                write!(f, "{name}(")?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str(")")
            }
        }
    }
}
