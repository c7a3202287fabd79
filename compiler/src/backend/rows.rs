//! Row groups: consecutive kernels over the same rows become one
//! `Kernel::Rows`. Softmax is a max over each row, an exponential of the row
//! minus it, a sum, and a division: four passes over the whole tensor, each
//! reading what the last one wrote back from memory. Run one block of rows
//! at a time through all four instead and the block stays in cache: the
//! tensor is read from memory once and written once, like a copy. Norms,
//! the cross-entropy and their backward passes have the same shape.
//!
//! A group fixes a number of rows `R`; its rows may have several lengths.
//! Its parts are fused kernels over outer axes of `R` elements then one of
//! the lengths ("wide"), or over `R` elements, possibly with a last axis of
//! 1 ("narrow", a value per row); reductions of a wide value over its last
//! axis; views between narrow shapes or between wide ones (rows are counted
//! in memory order, so `[B*T, N]` and `[B, T, N]` have the same rows); and
//! matrix products whose output rows are the group's, row r from row r of
//! the left operand. A product may start the group (the kernels after it
//! are its epilogue: they read each block while gemm has just written it)
//! or read a wide value of the group as its left operand (then the kernels
//! before it are its prologue: a LayerNorm's block goes into the product
//! while it is in cache), and its rows' length joins the group's. A part
//! may read anything computed before the group, but a value computed inside
//! the group only row by row: the same shape, or a per-row value broadcast
//! along the row. Then block `b` of every part needs only block `b` of the
//! parts before it.

use super::kernel::Kernel;
use crate::ir::graph::*;
use crate::types::{Dim, Sizes};
use std::collections::HashSet;

/// `kernels` (in execution order) with runs of row-wise kernels grouped.
pub fn group(g: &Graph, kernels: Vec<Kernel>, sizes: &Sizes) -> Vec<Kernel> {
    // Products that run side by side with others of their left operand
    // (`order::sibling_runs`) run together, not as parts of row groups.
    let beside_sibling: HashSet<usize> = super::order::sibling_runs(g, &kernels, sizes).into_iter().flatten().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < kernels.len() {
        let Some(mut rows) = Rows::anchored_at(g, &kernels[i]).filter(|_| !beside_sibling.contains(&i)) else {
            out.push(kernels[i].clone());
            i += 1;
            continue;
        };
        let mut members: HashSet<NodeId> = HashSet::from([kernels[i].output()]);
        let (mut parts, mut hoisted) = (vec![kernels[i].clone()], Vec::new());
        let mut j = i + 1;
        while j < kernels.len() {
            let k = &kernels[j];
            if rows.joins(g, k, &members) && !beside_sibling.contains(&j) {
                if let Kernel::Single(n) = k
                    && row_product(g, *n)
                {
                    rows.lens.push(g.dims(*n)[1].clone());
                }
                members.insert(k.output());
                parts.push(k.clone());
            } else if let Some(next) = rows.beside(g, k, &members).then(|| {
                // The next kernel that cannot run before the group (scalars
                // between, AdamW's coefficients, can).
                let with_k: HashSet<NodeId> = members.iter().copied().chain([k.output()]).collect();
                (j + 1..kernels.len()).find(|&n| !reads_nothing_computed(g, &kernels[n], &with_k)).filter(|&n| {
                    matches!(kernels[n], Kernel::Fused { .. })
                        && !beside_sibling.contains(&n)
                        && kernels[n].reads(g).contains(&k.output())
                        && rows.joins(g, &kernels[n], &with_k)
                })
            }) && let Some(next) = next
            {
                // A kernel over the same rows that reads none of the group's
                // values, and the next reads both it and the group's: the
                // three moments' and weight's updates of AdamW, each read
                // from memory once where they were read twice.
                members.extend([k.output(), kernels[next].output()]);
                parts.extend([k.clone(), kernels[next].clone()]);
                hoisted.extend(kernels[j + 1..next].iter().cloned());
                j = next;
            } else if reads_nothing_computed(g, k, &members) {
                // Free to run before the group: a size, a constant, a view of a value from before.
                hoisted.push(k.clone());
            } else {
                break;
            }
            j += 1;
        }
        // Views at the end belong after the group: they cost nothing either way.
        let trailing = parts.iter().rev().take_while(|p| matches!(p, Kernel::View(_))).count();
        hoisted.extend(parts.drain(parts.len() - trailing..));
        let work = parts.iter().filter(|p| !matches!(p, Kernel::View(_))).count();
        if work >= 2 {
            let (before, after): (Vec<_>, Vec<_>) =
                hoisted.into_iter().partition(|k| reads_nothing_computed(g, k, &members));
            out.extend(before);
            out.push(Kernel::Rows(parts));
            out.extend(after);
        } else {
            out.extend(kernels[i..j].iter().cloned());
        }
        i = j;
    }
    out
}

/// A row group whose parts are all fused loops over one shape, each reading
/// the others' values only at its own elements (AdamW's moments and weight):
/// it can run as one loop instead, its parts' values in registers and stored
/// where they live in memory (`FusedSpec::stores`), each input read once.
/// Its members in order, and the values they read from before the group.
pub fn one_loop(g: &Graph, parts: &[Kernel]) -> Option<(Vec<NodeId>, Vec<NodeId>)> {
    let dims = g.dims(parts.last()?.output());
    let members: HashSet<NodeId> = parts.iter().map(Kernel::output).collect();
    let (mut nodes, mut inputs) = (Vec::new(), Vec::new());
    for part in parts {
        let Kernel::Fused { nodes: ns, inputs: reads } = part else { return None };
        if g.dims(part.output()) != dims {
            return None;
        }
        for &n in ns {
            let node = g.node(n);
            let through_index = matches!(node.op, Op::Broadcast | Op::Slice { .. });
            if node.args.iter().any(|a| members.contains(a) && (through_index || g.dims(*a) != g.dims(n))) {
                return None;
            }
        }
        nodes.extend(ns.iter().copied());
        for r in reads {
            if !members.contains(r) && !inputs.contains(r) {
                inputs.push(*r);
            }
        }
    }
    Some((nodes, inputs))
}

/// Kernels that compute nothing from the group's values and cost nothing to
/// run before it: views, sizes, constants, and scalars (AdamW's coefficients).
fn reads_nothing_computed(g: &Graph, k: &Kernel, members: &HashSet<NodeId>) -> bool {
    match k {
        Kernel::View(v) => !members.contains(&g.node(*v).args[0]),
        Kernel::Single(n) => g.node(*n).args.is_empty(),
        Kernel::Fused { inputs, .. } => g.dims(k.output()).is_empty() && !inputs.iter().any(|i| members.contains(i)),
        _ => false,
    }
}

/// The rows of a group: how many, and their lengths (the first value's,
/// then each product's).
struct Rows {
    count: Dim,
    lens: Vec<Dim>,
}

fn product(dims: &[Dim]) -> Dim {
    dims.iter().fold(Dim::constant(1), |acc, d| acc.mul(d))
}

impl Rows {
    /// The rows a group starting with `k` runs over: a fused kernel's output
    /// rows, the rows a reduction folds, or a matrix product's output rows.
    fn anchored_at(g: &Graph, k: &Kernel) -> Option<Rows> {
        let (len, outer) = g.dims(row_value(g, k)?).split_last()?;
        Some(Rows { count: product(outer), lens: vec![len.clone()] })
    }

    /// The group's rows (outer axes of any shape with that many rows), of one of its lengths.
    fn wide(&self, dims: &[Dim]) -> bool {
        dims.split_last().is_some_and(|(l, o)| self.lens.contains(l) && product(o) == self.count)
    }

    /// One value per row: as many elements as rows, or that and a last axis of 1.
    fn narrow(&self, dims: &[Dim]) -> bool {
        !dims.is_empty()
            && (product(dims) == self.count
                || dims.split_last().is_some_and(|(l, o)| *l == Dim::constant(1) && product(o) == self.count))
    }

    /// Whether `k` can run row block by row block after the group's parts so
    /// far, whose values are `members`. It must read at least one of them.
    fn joins(&self, g: &Graph, k: &Kernel, members: &HashSet<NodeId>) -> bool {
        match k {
            Kernel::View(v) => {
                let (src, view) = (g.node(*v).args[0], g.dims(*v));
                members.contains(&src)
                    && ((self.narrow(g.dims(src)) && self.narrow(view)) || (self.wide(g.dims(src)) && self.wide(view)))
            }
            Kernel::Fused { nodes, .. } => {
                let out = g.dims(k.output());
                (self.wide(out) || self.narrow(out)) && self.reads_by_row(g, nodes, members, self.wide(out))
            }
            Kernel::FusedReduce { nodes, reduce, .. } => {
                nodes.last().is_some_and(|c| self.wide(g.dims(*c)))
                    && self.narrow(g.dims(*reduce))
                    && self.reads_by_row(g, nodes, members, true)
            }
            // A product whose left operand is the group's: its prologue is the group so far.
            Kernel::Single(n) if row_product(g, *n) => {
                let (a, b) = (g.node(*n).args[0], g.node(*n).args[1]);
                members.contains(&a) && !members.contains(&b) && self.wide(g.dims(a)) && g.dims(*n)[0] == self.count
            }
            Kernel::Single(n) => {
                let src = g.node(*n).args.first();
                innermost_reduce(g, *n)
                    && src.is_some_and(|s| members.contains(s) && self.wide(g.dims(*s)))
                    && self.narrow(g.dims(*n))
            }
            Kernel::Rows(_) => false,
        }
    }

    /// Whether `k` is a fused kernel over the group's rows reading none of its values.
    fn beside(&self, g: &Graph, k: &Kernel, members: &HashSet<NodeId>) -> bool {
        matches!(k, Kernel::Fused { nodes, .. } if self.wide(g.dims(k.output()))
            && nodes.iter().all(|n| g.node(*n).args.iter().all(|a| !members.contains(a))))
    }

    /// Whether a fused chain reads the group's values only row by row (a
    /// wide chain may broadcast a per-row value along its rows), and reads one at all.
    fn reads_by_row(&self, g: &Graph, nodes: &[NodeId], members: &HashSet<NodeId>, wide: bool) -> bool {
        let mut reads_any = false;
        for &n in nodes {
            let node = g.node(n);
            for a in node.args.iter().filter(|a| members.contains(a)) {
                reads_any = true;
                let ok = match node.op {
                    Op::Broadcast => {
                        let d = g.dims(*a);
                        wide && self.narrow(d) && d.last() == Some(&Dim::constant(1)) && d.len() == g.dims(n).len()
                    }
                    _ => g.dims(*a) == g.dims(n),
                };
                if !ok {
                    return false;
                }
            }
        }
        reads_any
    }
}

/// The value whose rows a group starting with `k` runs over (outer axes,
/// then the row): a fused kernel's output, what a reduction folds, or a
/// matrix product's output (`[M, N]`, row r from row r of its left
/// operand, so the kernels after it can take it block of rows by block
/// while the block is in cache: its epilogue). `None` when `k` cannot
/// start a group.
pub fn row_value(g: &Graph, k: &Kernel) -> Option<NodeId> {
    match k {
        Kernel::Fused { .. } => Some(k.output()),
        Kernel::FusedReduce { nodes, .. } => nodes.last().copied(),
        Kernel::Single(n) if innermost_reduce(g, *n) => Some(g.node(*n).args[0]),
        Kernel::Single(n) if row_product(g, *n) => Some(*n),
        _ => None,
    }
}

/// A matrix product a row group can start with: two-dimensional, its left
/// operand not transposed (rows of the output from rows of it), and rows of
/// at most `ROW_PRODUCT_COLUMNS` (a block of 128 of them stays in a core's
/// cache for the parts after it; with the output layer's 32,000 columns
/// the stories15M step was 4% slower).
pub fn row_product(g: &Graph, n: NodeId) -> bool {
    matches!(g.node(n).op, Op::MatMul { ta: false, .. })
        && g.dims(n).len() == 2
        && g.dims(n)[1].as_const().is_some_and(|c| c <= ROW_PRODUCT_COLUMNS)
}

/// Elements a row group works on per block of rows: small enough that the
/// values its parts pass each other stay in the core's cache.
const ROW_BLOCK: usize = 1 << 13;

/// Rows a block of a row group with a matrix product takes at least: gemm
/// packs the whole right operand again for each block.
const PRODUCT_ROWS: usize = 128;

/// The rows of each block a group of `rows` rows runs in (the last block
/// may have fewer), `len` being its first value's row length: all of them
/// when the group runs as one block (at most two blocks' worth).
pub fn block_rows(g: &Graph, parts: &[Kernel], rows: usize, len: usize) -> usize {
    let product = parts.iter().any(|p| matches!(p, Kernel::Single(n) if row_product(g, *n)));
    let per_block = (ROW_BLOCK / len.max(1)).max(if product { PRODUCT_ROWS } else { 1 });
    if rows * len <= 2 * ROW_BLOCK || rows <= per_block { rows } else { per_block }
}

/// Columns of a row group's product, at most.
const ROW_PRODUCT_COLUMNS: i64 = 1024;

fn innermost_reduce(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    let Op::Reduce(_, axes) = &node.op else { return false };
    let rank = g.dims(node.args[0]).len();
    rank > 0 && axes.as_slice() == [rank - 1]
}
