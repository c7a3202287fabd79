//! The rewrite rules, as named data grouped by topic. Each rule keeps the
//! meaning of the graph exactly (up to floating-point reassociation, which
//! no rule here performs) and never makes it larger: there is no blanket
//! commutativity or associativity.
//!
//! - algebra: identities with 0 and 1, double negation, log of exp
//! - layout: reshape and broadcast chains, no-op reshapes, permute chains
//! - softmax: `log(softmax x)` to a log-softmax; unshifted softmax made stable
//! - contractions: a transposed matmul operand becomes a transpose flag, a
//!   transposed product the product of its operands swapped
//! - sinking: elementwise work moved before a broadcast, on fewer elements
//! - constant folding happens in the analysis (`lang.rs`); common
//!   subexpressions merge by construction of the e-graph.

use super::lang::*;
use crate::ir::graph::{Binary, Op, Unary};
use egg::{Applier, Id, PatternAst, Rewrite, Subst, Symbol, Var, rewrite as rw};

type Rule = Rewrite<IrLang, IrAnalysis>;

fn var(s: &str) -> Var {
    s.parse().expect("valid variable")
}

fn pattern(text: &str) -> egg::Pattern<IrLang> {
    text.parse().expect("valid pattern")
}

/// The class of `v` holds the constant `c` everywhere.
fn is_const(v: &str, c: f64) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    let v = var(v);
    move |eg, _, s| eg[s[v]].data.constant == Some(c)
}

/// The class of `x` has the type named by the leaf bound to `t`.
fn same_type(x: &str, t: &str) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    let (x, t) = (var(x), var(t));
    move |eg, _, s| {
        let want = leaf_index(eg, s[t]);
        eg[s[x]].data.ty.is_some() && eg[s[x]].data.ty == want
    }
}

pub fn rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = vec![
        // algebra
        rw!("add-zero"; "(add ?x ?z ?a ?t)" => "?x" if is_const("?z", 0.0) if same_type("?x", "?t")),
        rw!("zero-add"; "(add ?z ?x ?a ?t)" => "?x" if is_const("?z", 0.0) if same_type("?x", "?t")),
        rw!("sub-zero"; "(sub ?x ?z ?a ?t)" => "?x" if is_const("?z", 0.0) if same_type("?x", "?t")),
        rw!("mul-one"; "(mul ?x ?o ?a ?t)" => "?x" if is_const("?o", 1.0) if same_type("?x", "?t")),
        rw!("one-mul"; "(mul ?o ?x ?a ?t)" => "?x" if is_const("?o", 1.0) if same_type("?x", "?t")),
        rw!("div-one"; "(div ?x ?o ?a ?t)" => "?x" if is_const("?o", 1.0) if same_type("?x", "?t")),
        rw!("neg-neg"; "(neg (neg ?x ?a ?t) ?a ?t)" => "?x"),
        rw!("log-exp"; "(log (exp ?x ?a ?t) ?b ?t)" => "?x"),
        // A sum of negated values is the negated sum, on fewer elements
        // (the backward of cross-entropy has this shape).
        rw!("sum-neg"; "(reduce_sum (neg ?x ?a ?t) ?r ?u)" => "(neg (reduce_sum ?x ?r ?u) ?a ?u)"),
        // layout
        rw!("reshape-reshape"; "(reshape (reshape ?x ?a ?t1) ?a ?t2)" => "(reshape ?x ?a ?t2)"),
        rw!("reshape-noop"; "(reshape ?x ?a ?t)" => "?x" if same_type("?x", "?t")),
        rw!("broadcast-broadcast"; "(broadcast (broadcast ?x ?a ?t1) ?a ?t2)" => "(broadcast ?x ?a ?t2)"),
        rw!("broadcast-noop"; "(broadcast ?x ?a ?t)" => "?x" if same_type("?x", "?t")),
        // softmax: log of a softmax becomes a log-softmax (never forming the
        // probabilities, as cross-entropy wants); an unshifted softmax gets its
        // maximum subtracted so that exp cannot overflow.
        Rewrite::new(
            "log-softmax",
            pattern("(log (div (exp ?s ?e ?t) (broadcast (reshape (reduce_sum (exp ?s ?e ?t) ?r ?u) ?h ?k) ?b ?t) ?d ?t) ?l ?t)"),
            LogSoftmax,
        )
        .expect("rule"),
        Rewrite::new(
            "stable-softmax",
            pattern("(div (exp ?x ?e ?t) (broadcast (reshape (reduce_sum (exp ?x ?e ?t) ?r ?u) ?h ?k) ?b ?t) ?d ?t)"),
            StableSoftmax,
        )
        .expect("rule"),
        // contractions
        Rewrite::new(
            "matmul-transposed-a",
            pattern("(matmul (permute ?x ?p ?s) ?y ?m ?t)"),
            FoldTranspose::Operand(0),
        )
        .expect("rule"),
        Rewrite::new(
            "matmul-transposed-b",
            pattern("(matmul ?x (permute ?y ?p ?s) ?m ?t)"),
            FoldTranspose::Operand(1),
        )
        .expect("rule"),
        // (op(X) op(Y))ᵀ = op(Y)ᵀ op(X)ᵀ: a transposed product is the product
        // of its operands swapped. The gradient of a tied output layer's
        // weight (`h @ transpose(W)`) was made [dim, vocab] and then copied
        // into [vocab, dim]: a weight-sized copy, both live at once.
        Rewrite::new("transposed-matmul", pattern("(permute (matmul ?x ?y ?m ?s) ?p ?t)"), FoldTranspose::Product)
            .expect("rule"),
        // Two concatenations along one axis, cut at the same place, added or
        // subtracted: the concatenation of the parts' sums. The gradient of
        // RoPE's rotate-half is `concat(0, a) + concat(b, 0)`, which becomes
        // `concat(b, a)` without the zeros.
        // (Autodiff accumulates it as `(x + concat(0, a)) + concat(b, 0)`.)
        Rewrite::new(
            "add-concats",
            pattern("(add (concat ?a ?b ?c ?t) (concat ?d ?e ?c ?t) ?o ?t)"),
            AlignedConcats { plus: false },
        )
        .expect("rule"),
        Rewrite::new(
            "sub-concats",
            pattern("(sub (concat ?a ?b ?c ?t) (concat ?d ?e ?c ?t) ?o ?t)"),
            AlignedConcats { plus: false },
        )
        .expect("rule"),
        Rewrite::new(
            "add-concats-after",
            pattern("(add (add ?x (concat ?a ?b ?c ?t) ?o ?t) (concat ?d ?e ?c ?t) ?o ?t)"),
            AlignedConcats { plus: true },
        )
        .expect("rule"),
        Rewrite::new(
            "permute-permute",
            "(permute (permute ?x ?q ?t1) ?p ?t)".parse::<egg::Pattern<IrLang>>().expect("pattern"),
            ComposePermutes,
        )
        .expect("rule"),
    ];
    // sinking: f(broadcast x) = broadcast(f x), computed on fewer elements
    let unary_kinds = Unary::all().map(|u| kind(&Op::Unary(u)));
    for k in unary_kinds.chain(["cast"]) {
        let pattern: egg::Pattern<IrLang> = format!("({k} (broadcast ?x ?a ?s) ?b ?t)").parse().expect("pattern");
        rules
            .push(Rewrite::new(format!("sink-broadcast-{k}"), pattern, SinkBroadcast { binary: false }).expect("rule"));
    }
    for k in ["add", "sub", "mul", "div", "max", "min", "pow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or"] {
        let pattern: egg::Pattern<IrLang> =
            format!("({k} (broadcast ?x ?a ?s) (broadcast ?y ?a ?s) ?b ?t)").parse().expect("pattern");
        rules.push(Rewrite::new(format!("sink-broadcast-{k}"), pattern, SinkBroadcast { binary: true }).expect("rule"));
    }
    rules
}

/// `concat(a, b) op concat(d, e)` = `concat(a op d, b op e)` when a and d
/// (so b and e too) have the same type; with `plus`, `(x + concat(a, b)) +
/// concat(d, e)` = `x + concat(a + d, b + e)`.
struct AlignedConcats {
    plus: bool,
}

impl Applier<IrLang, IrAnalysis> for AlignedConcats {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let [a, b, d, e] = ["?a", "?b", "?d", "?e"].map(|v| subst[var(v)]);
        let (Some(first), Some(second)) = (type_of(eg, a).cloned(), type_of(eg, b).cloned()) else { return vec![] };
        if type_of(eg, d) != Some(&first) || type_of(eg, e) != Some(&second) {
            return vec![];
        }
        let (op, t) = (attr_op(eg, subst, "?o"), leaf_type(eg, subst, "?t"));
        let (left, right) = (add_op(eg, &op, &[a, d], &first), add_op(eg, &op, &[b, e], &second));
        let joined = add_op(eg, &attr_op(eg, subst, "?c"), &[left, right], &t);
        let result = if self.plus { add_op(eg, &op, &[subst[var("?x")], joined], &t) } else { joined };
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}

/// permute p of permute q of x is permute (q . p) of x, or x itself.
struct ComposePermutes;

impl Applier<IrLang, IrAnalysis> for ComposePermutes {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let (Op::Permute(q), Op::Permute(p)) = (attr_op(eg, subst, "?q"), attr_op(eg, subst, "?p")) else {
            return vec![];
        };
        let composed: Vec<usize> = p.iter().map(|i| q[*i]).collect();
        let x = subst[var("?x")];
        let Some(ty) = type_of(eg, eclass).cloned() else { return vec![] };
        let result = if composed.iter().enumerate().all(|(i, c)| i == *c) {
            x
        } else {
            add_op(eg, &Op::Permute(composed), &[x], &ty)
        };
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}

/// The type named by the leaf bound to `v`.
fn leaf_type(eg: &IrGraph, subst: &Subst, v: &str) -> crate::types::TensorTy {
    eg.analysis.tables.types[leaf_index(eg, subst[var(v)]).expect("type leaf")].clone()
}

/// The class of `sum(exp s)` kept as `[..., 1, ...]`, re-found by adding it
/// (an e-graph adds an existing node as the class that has it).
fn kept_sum(eg: &mut IrGraph, subst: &Subst, exp_of: Id) -> Id {
    let t = leaf_type(eg, subst, "?t");
    let e = add_op(eg, &Op::Unary(Unary::Exp), &[exp_of], &t);
    let reduce = attr_op(eg, subst, "?r");
    let z = add_op(eg, &reduce, &[e], &leaf_type(eg, subst, "?u"));
    add_op(eg, &Op::Reshape, &[z], &leaf_type(eg, subst, "?k"))
}

/// `log(exp s / sum exp s)` = `s - log(sum exp s)`.
struct LogSoftmax;

impl Applier<IrLang, IrAnalysis> for LogSoftmax {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let s = subst[var("?s")];
        let z = kept_sum(eg, subst, s);
        let (t, kt) = (leaf_type(eg, subst, "?t"), leaf_type(eg, subst, "?k"));
        let log_sum = add_op(eg, &Op::Unary(Unary::Log), &[z], &kt);
        let spread = add_op(eg, &Op::Broadcast, &[log_sum], &t);
        let result = add_op(eg, &Op::Binary(Binary::Sub), &[s, spread], &t);
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}

/// `exp x / sum exp x` = `exp(x - m) / sum exp(x - m)` with m the maximum
/// over the same axes, unless x is already shifted by a maximum.
struct StableSoftmax;

impl Applier<IrLang, IrAnalysis> for StableSoftmax {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let x = subst[var("?x")];
        let shifted = eg[x].data.shifted;
        if shifted {
            return vec![];
        }
        let Op::Reduce(_, axes) = attr_op(eg, subst, "?r") else { return vec![] };
        let (t, ut, kt) = (leaf_type(eg, subst, "?t"), leaf_type(eg, subst, "?u"), leaf_type(eg, subst, "?k"));
        let m = add_op(eg, &Op::Reduce(crate::ir::graph::Reduce::Max, axes.clone()), &[x], &ut);
        let m = add_op(eg, &Op::Reshape, &[m], &kt);
        let m = add_op(eg, &Op::Broadcast, &[m], &t);
        let s = add_op(eg, &Op::Binary(Binary::Sub), &[x, m], &t);
        let e = add_op(eg, &Op::Unary(Unary::Exp), &[s], &t);
        let z = add_op(eg, &Op::Reduce(crate::ir::graph::Reduce::Sum, axes), &[e], &ut);
        let z = add_op(eg, &Op::Reshape, &[z], &kt);
        let z = add_op(eg, &Op::Broadcast, &[z], &t);
        let result = add_op(eg, &Op::Binary(Binary::Div), &[e, z], &t);
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}

/// A transpose (a permute swapping the last two axes) folded into a
/// product: of an operand (`Operand(k)`: the product reads the operand's
/// input directly, that transpose flag flipped), or of the product itself
/// (`Product`: (op(X) op(Y))ᵀ = op(Y)ᵀ op(X)ᵀ, the operands swapped and
/// both flags flipped).
enum FoldTranspose {
    Operand(usize),
    Product,
}

/// The operation named by the attribute leaf bound to `v`.
fn attr_op(eg: &IrGraph, subst: &Subst, v: &str) -> Op {
    eg.analysis.tables.ops[leaf_index(eg, subst[var(v)]).expect("attribute leaf")].clone()
}

impl Applier<IrLang, IrAnalysis> for FoldTranspose {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let (Op::Permute(p), Op::MatMul { ta, tb }) = (attr_op(eg, subst, "?p"), attr_op(eg, subst, "?m")) else {
            return vec![];
        };
        let r = p.len();
        let swaps_last_two =
            r >= 2 && p[..r - 2].iter().enumerate().all(|(i, v)| i == *v) && p[r - 2] == r - 1 && p[r - 1] == r - 2;
        let Some(ty) = type_of(eg, eclass).cloned() else { return vec![] };
        if !swaps_last_two {
            return vec![];
        }
        let (x, y) = (subst[var("?x")], subst[var("?y")]);
        let (op, args) = match self {
            FoldTranspose::Operand(0) => (Op::MatMul { ta: !ta, tb }, [x, y]),
            FoldTranspose::Operand(_) => (Op::MatMul { ta, tb: !tb }, [x, y]),
            FoldTranspose::Product => (Op::MatMul { ta: !tb, tb: !ta }, [y, x]),
        };
        let (Some(t0), Some(t1)) = (type_of(eg, args[0]), type_of(eg, args[1])) else { return vec![] };
        let Op::MatMul { ta, tb } = op else { unreachable!("a product") };
        if crate::ir::graph::matmul_dims(t0, t1, ta, tb).as_deref() != Some(ty.dims.as_slice()) {
            return vec![];
        }
        let result = add_op(eg, &op, &args, &ty);
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}

/// `(f (broadcast x) ...)` to `(broadcast (f x ...))`, the inner result typed
/// with x's shape and f's element type.
struct SinkBroadcast {
    binary: bool,
}

impl Applier<IrLang, IrAnalysis> for SinkBroadcast {
    fn apply_one(
        &self,
        eg: &mut IrGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<IrLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let x = subst[var("?x")];
        let (Some(inner_in), Some(outer)) = (type_of(eg, x).cloned(), type_of(eg, eclass).cloned()) else {
            return vec![];
        };
        if self.binary && type_of(eg, subst[var("?y")]) != Some(&inner_in) {
            return vec![];
        }
        let op = attr_op(eg, subst, "?b");
        let inner_ty = crate::types::TensorTy::new(outer.dtype, inner_in.dims.clone());
        let args: Vec<Id> = if self.binary { vec![x, subst[var("?y")]] } else { vec![x] };
        let inner = add_op(eg, &op, &args, &inner_ty);
        let result = add_op(eg, &Op::Broadcast, &[inner], &outer);
        if eg.union(eclass, result) { vec![result] } else { vec![] }
    }
}
