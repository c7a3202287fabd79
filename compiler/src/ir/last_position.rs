//! Only the last position's output of a projection: reading a prompt, a
//! decoder needs the next-token logits after the last prompt token alone,
//! and the output layer's product over every position was most of the
//! prompt's work at small sizes (61% of a 256-token prompt's FLOPs at the
//! stories15M shape).

use super::graph::*;
use super::prune::prune;
use crate::types::Dim;

/// `g` with its output `name` ([1, T, V] for one sequence, a product of
/// rows `[T, D]` with a weight, reshaped) computed for the last row only,
/// as [1, 1, V]; `None` when the output is not such a product (the caller
/// keeps every position then).
pub fn last_position(g: &Graph, name: &str) -> Option<Graph> {
    let out = g.output(name)?;
    let dims = g.dims(out).to_vec();
    if dims.len() != 3 {
        return None;
    }
    // Through reshapes to the product.
    let mut x = out;
    while matches!(g.node(x).op, Op::Reshape) {
        x = g.node(x).args[0];
    }
    let Op::MatMul { ta: false, tb } = g.node(x).op else { return None };
    let (a, w) = (g.node(x).args[0], g.node(x).args[1]);
    let rows = g.dims(a).to_vec();
    // The product's rows are the positions (one sequence: B * T rows, B = 1 when it runs).
    if rows.len() != 2 || g.dims(w).len() != 2 || rows[0] != dims[0].mul(&dims[1]) {
        return None;
    }
    let mut g = g.clone();
    g.at = g.node(x).origin;
    let last = g.slice(a, 0, rows[0].sub(&Dim::constant(1)), rows[0].clone());
    let product = g.matmul_t(last, w, false, tb);
    let one = Dim::constant(1);
    let logits = g.reshape(product, &[one.clone(), one, dims[2].clone()]);
    for (n, id) in g.outputs.iter_mut() {
        if n == name {
            *id = logits;
        }
    }
    g.at = None;
    Some(prune(&g))
}
