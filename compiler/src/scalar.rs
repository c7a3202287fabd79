//! Elementwise operations, each defined once. A row of [`UNARY`] gives a
//! unary operation's name (in the language, the IR text and the optimiser),
//! its meaning (a function every backend implements natively, or an
//! expression over other operations) and its local gradient rule as an
//! expression of the operand `x`, the result `y` and the incoming gradient
//! `g`. The interpreter, constant folding, autodiff, Cranelift and WGSL all
//! read these rows, so adding a unary primitive is one row here; a backend
//! may still give an operation a faster form of its own (the CPU's
//! wide-vector `silu`), tested against the row.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Relu,
    Gelu,
    GeluTanh,
    Silu,
    Erf,
    Sin,
    Cos,
    Abs,
    Floor,
    Not,
    /// The value as it is; no gradient flows through it (PyTorch's `detach`).
    Detach,
    Softplus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Rem,
    Max,
    Min,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// A scalar expression of an operation's operand, result and incoming gradient.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The operand.
    X,
    /// The operation's result (in gradient rules).
    Y,
    /// The gradient arriving at the result (in gradient rules).
    G,
    Const(f64),
    Unary(Unary, Box<Expr>),
    Binary(Binary, Box<Expr>, Box<Expr>),
    /// `if c != 0 { a } else { b }`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
}

/// What a unary operation computes.
#[derive(Clone, Copy)]
pub enum Meaning {
    /// A function each backend implements itself; this is its f64 value.
    Native(fn(f64) -> f64),
    /// An expression over other operations of the operand `X`.
    Composite(fn() -> Expr),
}

/// One unary operation.
pub struct UnaryRow {
    pub op: Unary,
    pub name: &'static str,
    /// Callable in the language as `name(x)`; the others come from operators
    /// (`-x`, `not x`) or from lowering.
    pub primitive: bool,
    pub meaning: Meaning,
    /// The gradient reaching `x`, in terms of `X`, `Y` and `G`; `None` where
    /// none flows (`floor`, `not`, `detach`).
    pub gradient: Option<fn() -> Expr>,
}

use Expr::{G, X, Y};

/// `c` as an expression.
pub fn c(v: f64) -> Expr {
    Expr::Const(v)
}

impl Expr {
    pub fn unary(self, u: Unary) -> Expr {
        Expr::Unary(u, Box::new(self))
    }
    pub fn binary(self, b: Binary, other: Expr) -> Expr {
        Expr::Binary(b, Box::new(self), Box::new(other))
    }
    pub fn exp(self) -> Expr {
        self.unary(Unary::Exp)
    }
    pub fn select(cond: Expr, a: Expr, b: Expr) -> Expr {
        Expr::Select(Box::new(cond), Box::new(a), Box::new(b))
    }

    /// The value at `x` (with `y` and `g` for gradient rules).
    pub fn eval(&self, x: f64, y: f64, g: f64) -> f64 {
        match self {
            Expr::X => x,
            Expr::Y => y,
            Expr::G => g,
            Expr::Const(v) => *v,
            Expr::Unary(u, a) => u.eval(a.eval(x, y, g)),
            Expr::Binary(b, p, q) => b.eval(p.eval(x, y, g), q.eval(x, y, g), false),
            Expr::Select(k, p, q) => {
                if k.eval(x, y, g) != 0.0 {
                    p.eval(x, y, g)
                } else {
                    q.eval(x, y, g)
                }
            }
        }
    }
}

macro_rules! arithmetic {
    ($($trait:ident $method:ident $op:ident),*) => {$(
        impl std::ops::$trait for Expr {
            type Output = Expr;
            fn $method(self, other: Expr) -> Expr {
                self.binary(Binary::$op, other)
            }
        }
    )*};
}
arithmetic!(Add add Add, Sub sub Sub, Mul mul Mul, Div div Div);

impl std::ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.unary(Unary::Neg)
    }
}

/// `sqrt(2 / pi)`, the tanh approximation of GELU's scale.
pub const GELU_TANH_SCALE: f64 = 0.797_884_560_802_865_4;
/// The cubic term's coefficient in the tanh approximation of GELU.
pub const GELU_TANH_CUBIC: f64 = 0.044715;

fn sigmoid_of(x: Expr) -> Expr {
    c(1.0) / (c(1.0) + (-x).exp())
}

/// `c (x + 0.044715 x^3)`, the argument of GELU's tanh.
fn gelu_tanh_inner() -> Expr {
    c(GELU_TANH_SCALE) * (X + c(GELU_TANH_CUBIC) * (X * X * X))
}

/// Every unary operation, in the order of [`Unary`].
pub const UNARY: &[UnaryRow] = &[
    UnaryRow { op: Unary::Neg, name: "neg", primitive: false, meaning: Meaning::Native(|x| -x), gradient: Some(|| -G) },
    UnaryRow {
        op: Unary::Exp,
        name: "exp",
        primitive: true,
        meaning: Meaning::Native(f64::exp),
        gradient: Some(|| G * Y),
    },
    UnaryRow {
        op: Unary::Log,
        name: "log",
        primitive: true,
        meaning: Meaning::Native(f64::ln),
        gradient: Some(|| G / X),
    },
    UnaryRow {
        op: Unary::Sqrt,
        name: "sqrt",
        primitive: true,
        meaning: Meaning::Native(f64::sqrt),
        gradient: Some(|| G / Y * c(0.5)),
    },
    UnaryRow {
        op: Unary::Rsqrt,
        name: "rsqrt",
        primitive: true,
        meaning: Meaning::Composite(|| c(1.0) / X.unary(Unary::Sqrt)),
        gradient: Some(|| G * (Y * Y * Y) * c(-0.5)),
    },
    UnaryRow {
        op: Unary::Tanh,
        name: "tanh",
        primitive: true,
        meaning: Meaning::Native(f64::tanh),
        gradient: Some(|| G * (c(1.0) - Y * Y)),
    },
    UnaryRow {
        op: Unary::Sigmoid,
        name: "sigmoid",
        primitive: true,
        meaning: Meaning::Composite(|| sigmoid_of(X)),
        gradient: Some(|| G * (Y * (c(1.0) - Y))),
    },
    UnaryRow {
        op: Unary::Relu,
        name: "relu",
        primitive: true,
        meaning: Meaning::Composite(|| X.binary(Binary::Max, c(0.0))),
        gradient: Some(|| Expr::select(X.binary(Binary::Gt, c(0.0)), G, c(0.0))),
    },
    UnaryRow {
        op: Unary::Gelu,
        name: "gelu",
        primitive: true,
        meaning: Meaning::Composite(|| c(0.5) * X * (c(1.0) + (X * c(FRAC_1_SQRT_2)).unary(Unary::Erf))),
        // d/dx x Φ(x) = Φ(x) + x φ(x)
        gradient: Some(|| {
            let cdf = ((X * c(FRAC_1_SQRT_2)).unary(Unary::Erf) + c(1.0)) * c(0.5);
            let pdf = (X * X * c(-0.5)).exp() * c(1.0 / (2.0 * PI).sqrt());
            G * (cdf + X * pdf)
        }),
    },
    UnaryRow {
        op: Unary::GeluTanh,
        name: "gelu_tanh",
        primitive: true,
        meaning: Meaning::Composite(|| c(0.5) * X * (c(1.0) + gelu_tanh_inner().unary(Unary::Tanh))),
        // With t = tanh(u): 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2).
        gradient: Some(|| {
            let t = || gelu_tanh_inner().unary(Unary::Tanh);
            let left = (c(1.0) + t()) * c(0.5);
            let sech2 = c(1.0) - t() * t();
            let poly = c(1.0) + X * X * c(3.0 * GELU_TANH_CUBIC);
            let right = sech2 * poly * X * c(0.5 * GELU_TANH_SCALE);
            G * (left + right)
        }),
    },
    UnaryRow {
        op: Unary::Silu,
        name: "silu",
        primitive: true,
        meaning: Meaning::Composite(|| X / (c(1.0) + (-X).exp())),
        // s (1 + x (1 - s)) with s = sigmoid(x).
        gradient: Some(|| {
            let s = || X.unary(Unary::Sigmoid);
            G * (s() * (c(1.0) + X * (c(1.0) - s())))
        }),
    },
    UnaryRow {
        op: Unary::Erf,
        name: "erf",
        primitive: true,
        meaning: Meaning::Native(erf),
        gradient: Some(|| G * ((-(X * X)).exp() * c(2.0 / PI.sqrt()))),
    },
    UnaryRow {
        op: Unary::Sin,
        name: "sin",
        primitive: true,
        meaning: Meaning::Native(f64::sin),
        gradient: Some(|| G * X.unary(Unary::Cos)),
    },
    UnaryRow {
        op: Unary::Cos,
        name: "cos",
        primitive: true,
        meaning: Meaning::Native(f64::cos),
        gradient: Some(|| -(G * X.unary(Unary::Sin))),
    },
    UnaryRow {
        op: Unary::Abs,
        name: "abs",
        primitive: true,
        meaning: Meaning::Native(f64::abs),
        gradient: Some(|| Expr::select(X.binary(Binary::Lt, c(0.0)), -G, G)),
    },
    UnaryRow {
        op: Unary::Floor,
        name: "floor",
        primitive: false,
        meaning: Meaning::Native(f64::floor),
        gradient: None,
    },
    UnaryRow {
        op: Unary::Not,
        name: "not",
        primitive: false,
        meaning: Meaning::Native(|x| f64::from(u8::from(x == 0.0))),
        gradient: None,
    },
    UnaryRow { op: Unary::Detach, name: "detach", primitive: true, meaning: Meaning::Composite(|| X), gradient: None },
    UnaryRow {
        op: Unary::Softplus,
        name: "softplus",
        primitive: true,
        // log(1 + e^x) without overflow, max(x, 0) + log(1 + e^-|x|), and
        // e^x itself far below 0, where 1 + e^x rounds to 1.
        meaning: Meaning::Composite(|| {
            let stable = X.binary(Binary::Max, c(0.0)) + (c(1.0) + (-X.unary(Unary::Abs)).exp()).unary(Unary::Log);
            Expr::select(X.binary(Binary::Lt, c(-20.0)), X.exp(), stable)
        }),
        gradient: Some(|| G * X.unary(Unary::Sigmoid)),
    },
];

impl Unary {
    /// Every unary operation, for tables that range over them.
    pub fn all() -> impl Iterator<Item = Unary> {
        UNARY.iter().map(|r| r.op)
    }

    pub fn row(self) -> &'static UnaryRow {
        let row = &UNARY[self as usize];
        debug_assert_eq!(row.op, self, "bug: UNARY is not in the order of Unary");
        row
    }

    pub fn name(self) -> &'static str {
        self.row().name
    }

    pub fn from_name(name: &str) -> Option<Unary> {
        UNARY.iter().find(|r| r.name == name).map(|r| r.op)
    }

    /// A unary primitive of the language by name (`exp`, `silu`, ...).
    pub fn primitive(name: &str) -> Option<Unary> {
        UNARY.iter().find(|r| r.primitive && r.name == name).map(|r| r.op)
    }

    /// The operation as an expression of `X`: itself when native, else its definition.
    pub fn expression(self) -> Expr {
        match self.row().meaning {
            Meaning::Native(_) => X.unary(self),
            Meaning::Composite(define) => define(),
        }
    }

    /// The value at `x` in f64 (the interpreter's meaning; f32 rounds it).
    pub fn eval(self, x: f64) -> f64 {
        match self.row().meaning {
            Meaning::Native(f) => f(x),
            Meaning::Composite(define) => define().eval(x, f64::NAN, f64::NAN),
        }
    }

    /// `eval` as a function, its definition built once (for loops over elements).
    pub fn function(self) -> impl Fn(f64) -> f64 {
        let row = self.row();
        let expression = match row.meaning {
            Meaning::Native(_) => None,
            Meaning::Composite(define) => Some(define()),
        };
        move |x| match (&expression, row.meaning) {
            (_, Meaning::Native(f)) => f(x),
            (Some(e), _) => e.eval(x, f64::NAN, f64::NAN),
            (None, _) => unreachable!("a composite has its expression"),
        }
    }
}

/// Every binary operation with its name, in the order of [`Binary`].
pub const BINARY: &[(Binary, &str)] = &[
    (Binary::Add, "add"),
    (Binary::Sub, "sub"),
    (Binary::Mul, "mul"),
    (Binary::Div, "div"),
    (Binary::Pow, "pow"),
    (Binary::Rem, "rem"),
    (Binary::Max, "max"),
    (Binary::Min, "min"),
    (Binary::Eq, "eq"),
    (Binary::Ne, "ne"),
    (Binary::Lt, "lt"),
    (Binary::Le, "le"),
    (Binary::Gt, "gt"),
    (Binary::Ge, "ge"),
    (Binary::And, "and"),
    (Binary::Or, "or"),
];

impl Binary {
    pub fn is_comparison(self) -> bool {
        matches!(self, Binary::Eq | Binary::Ne | Binary::Lt | Binary::Le | Binary::Gt | Binary::Ge)
    }

    pub fn name(self) -> &'static str {
        BINARY[self as usize].1
    }

    pub fn from_name(name: &str) -> Option<Binary> {
        BINARY.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }

    /// The value in f64; `int` divides with truncation (integer tensors).
    /// Comparisons and logic give 1 or 0.
    pub fn eval(self, x: f64, y: f64, int: bool) -> f64 {
        let flag = |c: bool| f64::from(u8::from(c));
        match self {
            Binary::Add => x + y,
            Binary::Sub => x - y,
            Binary::Mul => x * y,
            Binary::Div if int => (x / y).trunc(),
            Binary::Div => x / y,
            Binary::Pow => x.powf(y),
            Binary::Rem => x - (x / y).floor() * y,
            // NaN propagates, as in PyTorch (`relu(nan)` is nan) and Cranelift's fmax.
            Binary::Max | Binary::Min if x.is_nan() || y.is_nan() => f64::NAN,
            Binary::Max => x.max(y),
            Binary::Min => x.min(y),
            Binary::Eq => flag(x == y),
            Binary::Ne => flag(x != y),
            Binary::Lt => flag(x < y),
            Binary::Le => flag(x <= y),
            Binary::Gt => flag(x > y),
            Binary::Ge => flag(x >= y),
            Binary::And => flag(x != 0.0 && y != 0.0),
            Binary::Or => flag(x != 0.0 || y != 0.0),
        }
    }
}

/// The error function (Abramowitz and Stegun 7.1.26 refined by a series for
/// small arguments); accurate to about 1e-12.
pub fn erf(x: f64) -> f64 {
    if x.abs() < 2.0 {
        // Maclaurin series: 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)).
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for n in 1..60 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        return sum * 2.0 / PI.sqrt();
    }
    // Continued fraction for erfc at larger |x|.
    let t = x.abs();
    let mut f = 0.0;
    for k in (1..60).rev() {
        f = (k as f64 / 2.0) / (t + f);
    }
    let erfc = (-t * t).exp() / PI.sqrt() / (t + f);
    if x > 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_in_the_order_of_the_enums_with_unique_names() {
        for (i, row) in UNARY.iter().enumerate() {
            assert_eq!(row.op as usize, i, "{}", row.name);
            assert_eq!(Unary::from_name(row.name), Some(row.op));
        }
        for (i, (b, name)) in BINARY.iter().enumerate() {
            assert_eq!(*b as usize, i, "{name}");
            assert_eq!(Binary::from_name(name), Some(*b));
        }
    }

    #[test]
    fn composites_keep_their_values_where_a_plain_formula_overflows() {
        assert!((Unary::Softplus.eval(0.0) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(Unary::Softplus.eval(1000.0), 1000.0);
        assert!((Unary::Softplus.eval(-50.0) / (-50f64).exp() - 1.0).abs() < 1e-15);
        assert_eq!(Unary::Relu.eval(-3.0), 0.0);
        assert!(Unary::Relu.eval(f64::NAN).is_nan());
    }

    #[test]
    fn each_gradient_rule_is_the_derivative_of_its_meaning() {
        for row in UNARY {
            let Some(gradient) = row.gradient else { continue };
            let rule = gradient();
            for x in [-2.3f64, -0.7, 0.3, 1.1, 2.9] {
                let x: f64 =
                    if row.op == Unary::Log || row.op == Unary::Sqrt || row.op == Unary::Rsqrt { x.abs() } else { x };
                let h = 1e-6;
                let numeric = (row.op.eval(x + h) - row.op.eval(x - h)) / (2.0 * h);
                let analytic = rule.eval(x, row.op.eval(x), 1.0);
                assert!(
                    (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "{} at {x}: {numeric} vs {analytic}",
                    row.name
                );
            }
        }
    }
}
