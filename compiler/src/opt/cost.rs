//! The cost model for extraction: the elements an operation touches,
//! weighted by how expensive each element is, plus the dearest input.
//! Symbolic sizes count as 64. Views (reshape) are nearly free; a broadcast
//! costs less than computing.

use super::lang::{IrGraph, IrLang, node_op};
use crate::ir::graph::Op;
use crate::types::Dim;
use egg::{CostFunction, Id, Language};

pub struct Cost<'a> {
    egraph: &'a IrGraph,
}

impl<'a> Cost<'a> {
    pub fn new(egraph: &'a IrGraph) -> Cost<'a> {
        Cost { egraph }
    }
}

fn elements(dims: &[Dim]) -> f64 {
    dims.iter().map(|d| d.substitute(&|_| Some(Dim::constant(64))).as_const().unwrap_or(64) as f64).product()
}

impl CostFunction<IrLang> for Cost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &IrLang, mut costs: C) -> f64 {
        let Some(children) = super::lang::op_children(enode) else { return 0.0 };
        let ty_leaf = children[children.len() - 1];
        let ty_index = super::lang::leaf_index(self.egraph, ty_leaf);
        let n = ty_index.map_or(1.0, |t| elements(&self.egraph.analysis.tables.types[t].dims));
        let op = node_op(self.egraph, children);
        let own = match &op {
            Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Size(_) => 0.0,
            Op::Reshape => 0.01 * n,
            Op::Broadcast => 0.5 * n,
            Op::ExpertMatMul { .. } => {
                let k = self.egraph[children[0]].data.ty.map_or(64.0, |t| {
                    let dims = &self.egraph.analysis.tables.types[t].dims;
                    elements(&dims[1..2])
                });
                2.0 * n * k
            }
            Op::MatMul { ta, .. } => {
                let a = children[0];
                let k = self.egraph[a].data.ty.map_or(64.0, |t| {
                    let dims = &self.egraph.analysis.tables.types[t].dims;
                    let axis = if *ta { dims.len() - 2 } else { dims.len() - 1 };
                    elements(&dims[axis..=axis])
                });
                2.0 * n * k
            }
            // Both products over every (query, key) pair: the output's
            // elements times twice the key count.
            Op::Attention(a) | Op::AttentionBackward(a, _) => {
                let forward = 1 + op.attention_inputs().unwrap_or(0);
                let keys = self.egraph[children[forward]].data.ty.map_or(64.0, |t| {
                    let dims = &self.egraph.analysis.tables.types[t].dims;
                    elements(&dims[if a.kv_heads_first { 2 } else { 1 }..][..1])
                });
                4.0 * n * keys
            }
            // An exp of a value not shifted by its maximum can overflow: when a
            // stable form exists (`stable-softmax`), it must win.
            Op::Unary(crate::ir::graph::Unary::Exp) if !self.egraph[children[0]].data.shifted => 50.0 * n,
            Op::Unary(_) => 2.0 * n,
            _ => n,
        };
        // Own cost plus the dearest child: summing children would count shared
        // subgraphs once per use and grow exponentially on deep DAGs. Strictly
        // above every child, so a cycle is never cheaper than its way out.
        own + 1.0 + enode.fold(0.0, |acc: f64, c| acc.max(costs(c)))
    }
}
