//! The IR as an egg language. Each node becomes `(kind arg... attr type)`:
//! the kind (`mul`, `permute`, ...) is what patterns match; the last two
//! children are leaves naming interned tables entries, the full operation
//! (with its attributes) and the result type. Equal types share a leaf, so a
//! repeated `?t` in a pattern means "the same type".

use crate::ir::graph::*;
use crate::types::TensorTy;
use egg::{Analysis, DidMerge, EGraph, Id, Symbol, define_language};
use std::collections::HashMap;

// One variant per kind of operation, so that egg's index by operator lets a
// pattern look only at the classes that hold its kind.
define_language! {
    pub enum IrLang {
        "input" = Input(Box<[Id]>),
        "param" = Param(Box<[Id]>),
        "const" = Const(Box<[Id]>),
        "size" = Size(Box<[Id]>),
        "iota" = Iota(Box<[Id]>),
        "add" = Add(Box<[Id]>),
        "sub" = Sub(Box<[Id]>),
        "mul" = Mul(Box<[Id]>),
        "div" = Div(Box<[Id]>),
        "pow" = Pow(Box<[Id]>),
        "rem" = Rem(Box<[Id]>),
        "max" = Max(Box<[Id]>),
        "min" = Min(Box<[Id]>),
        "eq" = Eq(Box<[Id]>),
        "ne" = Ne(Box<[Id]>),
        "lt" = Lt(Box<[Id]>),
        "le" = Le(Box<[Id]>),
        "gt" = Gt(Box<[Id]>),
        "ge" = Ge(Box<[Id]>),
        "and" = And(Box<[Id]>),
        "or" = Or(Box<[Id]>),
        "select" = Select(Box<[Id]>),
        "cast" = Cast(Box<[Id]>),
        "reduce_sum" = ReduceSum(Box<[Id]>),
        "reduce_max" = ReduceMax(Box<[Id]>),
        "reduce_min" = ReduceMin(Box<[Id]>),
        "argmax" = Argmax(Box<[Id]>),
        "matmul" = Matmul(Box<[Id]>),
        "reshape" = Reshape(Box<[Id]>),
        "permute" = Permute(Box<[Id]>),
        "broadcast" = Broadcast(Box<[Id]>),
        "slice" = Slice(Box<[Id]>),
        "concat" = Concat(Box<[Id]>),
        "gather" = Gather(Box<[Id]>),
        "scatter_add" = ScatterAdd(Box<[Id]>),
        "one_hot" = OneHot(Box<[Id]>),
        "topk_values" = TopkValues(Box<[Id]>),
        "topk_indices" = TopkIndices(Box<[Id]>),
        "write_rows" = WriteRows(Box<[Id]>),
        "dropout_mask" = DropoutMask(Box<[Id]>),
        "attention" = Attention(Box<[Id]>),
        "attention_backward" = AttentionBackward(Box<[Id]>),
        "expert_order" = ExpertOrder(Box<[Id]>),
        "expert_offsets" = ExpertOffsets(Box<[Id]>),
        "expert_matmul" = ExpertMatmul(Box<[Id]>),
        "expert_weight_grad" = ExpertWeightGrad(Box<[Id]>),
        Leaf(Symbol),
        // Unary operations, by their names in `scalar::UNARY` (so that a new
        // one needs no variant here): egg parses any other name with children as this.
        Unary(Symbol, Vec<Id>),
    }
}

/// The children of an operation node (`None` for a leaf).
pub fn op_children(n: &IrLang) -> Option<&[Id]> {
    match n {
        IrLang::Leaf(_) => None,
        other => Some(egg::Language::children(other)),
    }
}

/// Interned operations and types, owned by the analysis.
#[derive(Default, Debug)]
pub struct Tables {
    pub ops: Vec<Op>,
    op_index: HashMap<String, usize>,
    pub types: Vec<TensorTy>,
    type_index: HashMap<String, usize>,
}

impl Tables {
    pub fn op_leaf(&mut self, op: &Op) -> Symbol {
        let key = op.name();
        let n = *self.op_index.entry(key).or_insert_with(|| {
            self.ops.push(op.clone());
            self.ops.len() - 1
        });
        Symbol::from(format!("a{n}"))
    }

    pub fn type_leaf(&mut self, ty: &TensorTy) -> Symbol {
        let key = ty.to_string();
        let n = *self.type_index.entry(key).or_insert_with(|| {
            self.types.push(ty.clone());
            self.types.len() - 1
        });
        Symbol::from(format!("t{n}"))
    }
}

/// The pattern-facing name of an operation.
pub fn kind(op: &Op) -> &'static str {
    match op {
        Op::Input(_) => "input",
        Op::Param(_) => "param",
        Op::Const(_) => "const",
        Op::Size(_) => "size",
        Op::Iota => "iota",
        Op::Unary(u) => u.name(),
        Op::Binary(b) => b.name(),
        Op::Select => "select",
        Op::Cast(_) => "cast",
        Op::Reduce(Reduce::Sum, _) => "reduce_sum",
        Op::Reduce(Reduce::Max, _) => "reduce_max",
        Op::Reduce(Reduce::Min, _) => "reduce_min",
        Op::ArgMax(_) => "argmax",
        Op::MatMul { .. } => "matmul",
        Op::Reshape => "reshape",
        Op::Permute(_) => "permute",
        Op::Broadcast => "broadcast",
        Op::Slice { .. } => "slice",
        Op::Concat(_) => "concat",
        Op::Gather => "gather",
        Op::ScatterAdd => "scatter_add",
        Op::OneHot => "one_hot",
        Op::TopKValues(_) => "topk_values",
        Op::TopKIndices(_) => "topk_indices",
        Op::WriteRows => "write_rows",
        Op::DropoutMask { .. } => "dropout_mask",
        Op::Attention(_) => "attention",
        Op::AttentionBackward(..) => "attention_backward",
        Op::ExpertOrder(_) => "expert_order",
        Op::ExpertOffsets(_) => "expert_offsets",
        Op::ExpertMatMul { .. } => "expert_matmul",
        Op::ExpertWeightGrad { .. } => "expert_weight_grad",
    }
}

/// What the analysis knows of an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// Index into `Tables::types`; `None` for leaves.
    pub ty: Option<usize>,
    /// The value, when every element is the same known constant.
    pub constant: Option<f64>,
    /// A maximum (possibly reshaped or broadcast): what softmax subtracts.
    pub is_max: bool,
    /// `x - max(x)`: at most 0, so its `exp` cannot overflow.
    pub shifted: bool,
}

#[derive(Default, Debug)]
pub struct IrAnalysis {
    pub tables: Tables,
}

pub type IrGraph = EGraph<IrLang, IrAnalysis>;

/// The table index named by the leaf in class `id`.
pub fn leaf_index(egraph: &IrGraph, id: Id) -> Option<usize> {
    egraph[id].nodes.iter().find_map(|n| match n {
        IrLang::Leaf(s) => s.as_str()[1..].parse().ok(),
        _ => None,
    })
}

/// The operation of an e-node (from its attribute leaf).
pub fn node_op(egraph: &IrGraph, children: &[Id]) -> Op {
    let a = leaf_index(egraph, children[children.len() - 2]).expect("bug: attribute leaf");
    egraph.analysis.tables.ops[a].clone()
}

pub fn type_of(egraph: &IrGraph, id: Id) -> Option<&TensorTy> {
    egraph[id].data.ty.map(|t| &egraph.analysis.tables.types[t])
}

impl Analysis<IrLang> for IrAnalysis {
    type Data = Facts;

    fn make(egraph: &mut IrGraph, enode: &IrLang) -> Facts {
        let Some(children) = op_children(enode) else {
            return Facts { ty: None, constant: None, is_max: false, shifted: false };
        };
        let ty = leaf_index(egraph, *children.last().expect("type leaf"));
        let op = node_op(egraph, children);
        let args = &children[..children.len() - 2];
        let c = |i: usize| egraph[args[i]].data.constant;
        let scalar = ty.is_some_and(|t| egraph.analysis.tables.types[t].rank() == 0);
        let constant = match &op {
            Op::Const(v) => Some(*v),
            Op::Broadcast | Op::Reshape | Op::Cast(crate::types::DType::F32) => c(0),
            // As the interpreter casts (an attention's offset is `cast int` of a size).
            Op::Cast(crate::types::DType::Int) => c(0).map(f64::trunc),
            Op::Cast(crate::types::DType::Bool) => c(0).map(|x| f64::from(u8::from(x != 0.0))),
            Op::Unary(u) if scalar && !matches!(u, Unary::Not) => c(0).map(|x| u.eval(x)),
            Op::Binary(b) if scalar && !b.is_comparison() && !matches!(b, Binary::And | Binary::Or) => {
                let int = ty.is_some_and(|t| egraph.analysis.tables.types[t].dtype == crate::types::DType::Int);
                c(0).zip(c(1)).map(|(x, y)| b.eval(x, y, int))
            }
            _ => None,
        };
        let is_max = match &op {
            Op::Reduce(Reduce::Max, _) => true,
            Op::Reshape | Op::Broadcast => egraph[args[0]].data.is_max,
            _ => false,
        };
        let shifted = matches!(op, Op::Binary(Binary::Sub)) && egraph[args[1]].data.is_max;
        Facts { ty, constant: constant.filter(|v| v.is_finite()), is_max, shifted }
    }

    fn merge(&mut self, a: &mut Facts, b: Facts) -> DidMerge {
        let mut changed = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed = true;
        }
        if a.constant.is_none() && b.constant.is_some() {
            a.constant = b.constant;
            changed = true;
        }
        for (x, y) in [(&mut a.is_max, b.is_max), (&mut a.shifted, b.shifted)] {
            if !*x && y {
                *x = true;
                changed = true;
            }
        }
        DidMerge(changed, true)
    }

    /// A scalar known to be constant gets a `const` node, so extraction can
    /// replace the computation by the value (constant folding).
    fn modify(egraph: &mut IrGraph, id: Id) {
        let Facts { ty: Some(t), constant: Some(v), .. } = egraph[id].data.clone() else { return };
        if egraph.analysis.tables.types[t].rank() != 0 {
            return;
        }
        let is_const = egraph[id].nodes.iter().any(|n| matches!(n, IrLang::Const(_)));
        if !is_const {
            let ty = egraph.analysis.tables.types[t].clone();
            let c = add_op(egraph, &Op::Const(v), &[], &ty);
            egraph.union(id, c);
        }
    }
}

/// Adds `(kind args... attr type)` to the e-graph.
pub fn add_op(egraph: &mut IrGraph, op: &Op, args: &[Id], ty: &TensorTy) -> Id {
    let attr = egraph.analysis.tables.op_leaf(op);
    let tyl = egraph.analysis.tables.type_leaf(ty);
    let a = egraph.add(IrLang::Leaf(attr));
    let t = egraph.add(IrLang::Leaf(tyl));
    let mut children = args.to_vec();
    children.push(a);
    children.push(t);
    egraph.add(<IrLang as egg::FromOp>::from_op(kind(op), children).expect("bug: every kind has a variant"))
}

/// Loads a graph; returns the e-class of every node.
pub fn to_egraph(g: &Graph) -> (IrGraph, Vec<Id>) {
    let mut egraph = IrGraph::new(IrAnalysis::default());
    let mut ids: Vec<Id> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let args: Vec<Id> = n.args.iter().map(|a| ids[a.index()]).collect();
        ids.push(add_op(&mut egraph, &n.op, &args, &n.ty));
    }
    egraph.rebuild();
    (egraph, ids)
}
