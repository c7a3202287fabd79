//! Row chunks: a matrix product whose output is far larger than what it
//! reduces to (the vocabulary projection: `[B*T, vocab]` logits that the
//! cross-entropy turns into one number, and whose gradient turns into a
//! `[B*T, dim]` gradient and a weight-sized one) runs a block of rows at a
//! time through everything that reads it row by row: products, the
//! cross-entropy's max, exp-sum and pick, and the gradient. Only one
//! chunk's logits exist at a time. What leaves the chunks is summed over
//! them (the loss total, the weight's gradient `hᵀ·dlogits`) or
//! concatenated (the `[B*T, dim]` input gradient, per-row values).
//!
//! This is what the row groups of `rows.rs` do for cache blocks, done for
//! memory at the scale of the arena: the chunks are nodes of the graph,
//! planned and scheduled like any other. The FLOPs are the same; the
//! weight gradient's partial sums cost one pass over a weight-sized value
//! per chunk. The chunk count is fixed at the bound sizes (the last chunk
//! takes the rows left over), so it runs where the sizes are known.

use crate::ir::graph::*;
use crate::types::{Dim, Sizes, TensorTy, eval_dim};
use std::collections::HashMap;

/// The default size of one chunk of a split product's output.
pub const CHUNK_BYTES: usize = 32 << 20;

/// The fewest rows a chunk has, so that its products stay efficient.
const MIN_ROWS: usize = 16;

/// `g` with every product whose output exceeds two chunks of
/// `chunk_bytes`, and which only row-wise work and sums over rows read,
/// computed in row chunks. Other graphs come back unchanged.
pub fn split_rows(g: &Graph, sizes: &Sizes, chunk_bytes: usize) -> Graph {
    let mut g = g.clone();
    let mut tried = 0;
    loop {
        let len =
            |n: &Node| n.ty.dims.iter().map(|d| eval_dim(d, sizes).unwrap_or(0)).fold(1usize, usize::saturating_mul);
        let candidate = (g.nodes.iter().enumerate().skip(tried)).find(|(_, n)| {
            matches!(n.op, Op::MatMul { ta: false, .. })
                && n.ty.rank() == 2
                && len(n).saturating_mul(4) > 2 * chunk_bytes
        });
        let Some((at, node)) = candidate else { return g };
        tried = at + 1;
        let rows = eval_dim(&node.ty.dims[0], sizes).unwrap_or(0);
        let row_bytes = len(node) / rows.max(1) * 4;
        let per_chunk = (chunk_bytes / row_bytes.max(1)).max(MIN_ROWS) / MIN_ROWS * MIN_ROWS;
        // A weight gradient summed over chunks holds two weight-sized values
        // while it is summed: worth it only when the product is larger.
        let worth = |r: &Region| {
            let summed: usize = (r.boundary.iter())
                .filter(|(_, kind)| matches!(kind, Boundary::Contract))
                .map(|(b, _)| len(g.node(*b)))
                .sum();
            len(node) > 2 * summed
        };
        let region = Region::grow(&g, NodeId(at as u32)).filter(worth);
        if let Some(split) = region.and_then(|r| r.emit(&g, rows, per_chunk)) {
            crate::ir::verify::after("split_rows", &split);
            g = split;
        }
    }
}

/// How a node outside the chunks reads the values made in them.
enum Boundary {
    /// A sum (or max) over all the row axes, and possibly others: reduced
    /// per chunk, the partial results combined.
    Reduce,
    /// `aᵀ·b` contracting the rows: a partial product per chunk, summed.
    Contract,
    /// Anything else: the values it reads, concatenated back whole.
    Whole,
}

struct Region {
    /// The rows of the split product.
    rows: Dim,
    /// Nodes computed per chunk, in graph order, each with its number of
    /// leading row axes (the product of whose sizes is `rows`).
    nodes: Vec<(NodeId, usize)>,
    row_axes: HashMap<NodeId, usize>,
    /// Nodes outside that read region values.
    boundary: Vec<(NodeId, Boundary)>,
}

impl Region {
    /// The nodes that can run per chunk from product `at`, and the nodes
    /// reading them; `None` when something needs a large value whole or
    /// the chunks would depend on their own results.
    fn grow(g: &Graph, at: NodeId) -> Option<Region> {
        let n = g.nodes.len();
        let rows = g.dims(at)[0].clone();
        let product_row = g.dims(at)[1].as_const()?;
        // Rows of `product_row / 4` elements or more are wide: the values that chunks are for.
        let wide = |dims: &[Dim], k: usize| {
            let rest = dims[k..].iter().fold(Dim::constant(1), |p, d| p.mul(d));
            rest.as_const().is_none_or(|r| r * 4 >= product_row)
        };
        // 1. Nodes that could run per chunk: row-wise from the product, with
        //    their other inputs from outside (`blocked`: depending on the
        //    product through a node that cannot).
        let mut row_axes_of: HashMap<NodeId, usize> = HashMap::from([(at, 1)]);
        let mut blocked = vec![false; n];
        for (i, node) in g.nodes.iter().enumerate().skip(at.index() + 1) {
            let in_c = |a: &NodeId| row_axes_of.contains_key(a);
            if !node.args.iter().any(in_c) {
                blocked[i] = node.args.iter().any(|a| blocked[a.index()]);
                continue;
            }
            let k = row_axes(&node.ty.dims, &rows);
            let rows_of_arg = |a: &NodeId| row_axes_of.get(a).copied().or_else(|| row_axes(g.dims(*a), &rows));
            let chunked = k.is_some()
                && !node.args.iter().any(|a| blocked[a.index()])
                && match &node.op {
                    Op::Reshape | Op::Unary(_) | Op::Cast(_) => true,
                    Op::Binary(_) | Op::Select => node.args.iter().all(|a| in_c(a) || g.dims(*a) == node.ty.dims),
                    Op::Broadcast => {
                        let a = &node.args[0];
                        rows_of_arg(a) == k && k.is_some_and(|k| g.dims(*a)[..k] == node.ty.dims[..k])
                    }
                    Op::Reduce(_, axes) => axes.iter().all(|ax| *ax >= row_axes_of[&node.args[0]]),
                    Op::MatMul { ta: false, .. } => in_c(&node.args[0]) && !in_c(&node.args[1]) && node.ty.rank() == 2,
                    _ => false,
                }
                && (node.args.iter().enumerate())
                    .all(|(j, a)| in_c(a) || !reads_rows(node, j) || sliceable(g, *a, &rows));
            match (chunked, k) {
                (true, Some(k)) => {
                    row_axes_of.insert(NodeId(i as u32), k);
                }
                _ => blocked[i] = true,
            }
        }
        // 2. Of those, the ones worth it: wide, reading wide ones, or feeding
        //    ones kept (a per-row factor of the gradient). The rest (the
        //    backward of the layers below, reading the input gradient) run
        //    outside on whole values.
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in g.nodes.iter().enumerate() {
            node.args.iter().for_each(|a| users[a.index()].push(i));
        }
        let mut kept: HashMap<NodeId, usize> = HashMap::new();
        for i in (at.index()..n).rev() {
            let id = NodeId(i as u32);
            let Some(&k) = row_axes_of.get(&id) else { continue };
            let node = g.node(id);
            let reads_wide = node.args.iter().any(|a| row_axes_of.get(a).is_some_and(|ka| wide(g.dims(*a), *ka)));
            if wide(&node.ty.dims, k) || reads_wide || users[i].iter().any(|u| kept.contains_key(&NodeId(*u as u32))) {
                kept.insert(id, k);
            }
        }
        // 3. What reads them from outside, and whether that is possible: no
        //    chunk may read a value made from the chunks' results, and only
        //    narrow values are read whole.
        let mut region = Region { rows: rows.clone(), nodes: vec![], row_axes: kept, boundary: vec![] };
        let mut after = vec![false; n];
        for (i, node) in g.nodes.iter().enumerate().skip(at.index()) {
            let id = NodeId(i as u32);
            let in_region = |a: &NodeId| region.row_axes.contains_key(a);
            if let Some(k) = region.row_axes.get(&id) {
                if node.args.iter().any(|a| after[a.index()]) {
                    return None;
                }
                region.nodes.push((id, *k));
                continue;
            }
            after[i] = node.args.iter().any(|a| after[a.index()] || in_region(a));
            if !node.args.iter().any(in_region) {
                continue;
            }
            let rows_of_arg = |a: &NodeId| region.row_axes.get(a).copied().or_else(|| row_axes(g.dims(*a), &rows));
            let over_rows =
                |a: &NodeId, axes: &[usize]| rows_of_arg(a).is_some_and(|k| (0..k).all(|x| axes.contains(&x)));
            let kind = match &node.op {
                Op::Reduce(Reduce::Sum | Reduce::Max, axes) if over_rows(&node.args[0], axes) => Boundary::Reduce,
                Op::MatMul { ta: true, tb: false }
                    if (node.args.iter())
                        .all(|a| g.ty(*a).rank() == 2 && (in_region(a) || sliceable(g, *a, &rows))) =>
                {
                    Boundary::Contract
                }
                _ if node.args.iter().filter(|a| in_region(a)).any(|a| wide(g.dims(*a), region.row_axes[a])) => {
                    return None;
                }
                _ => Boundary::Whole,
            };
            region.boundary.push((id, kind));
        }
        // A program output is read whole by the caller.
        let output = g.outputs.iter().any(|(_, o)| region.row_axes.contains_key(o));
        (!region.boundary.is_empty() && !output).then_some(region)
    }

    /// The graph with the region computed in chunks of `per_chunk` rows
    /// (of `rows` at the bound sizes); `None` when that is one chunk.
    fn emit(&self, g: &Graph, rows: usize, per_chunk: usize) -> Option<Graph> {
        let chunks = rows.div_ceil(per_chunk.max(1));
        if chunks < 2 {
            return None;
        }
        let boundary: Vec<NodeId> = self.boundary.iter().map(|(b, _)| *b).collect();
        let mut e = Emitter {
            g,
            rows: self.rows.clone(),
            out: Graph::default(),
            map: vec![None; g.nodes.len()],
            remade: HashMap::new(),
        };
        for i in 0..g.nodes.len() {
            let id = NodeId(i as u32);
            if self.row_axes.contains_key(&id) || e.map[i].is_some() {
                continue;
            }
            if boundary.contains(&id) {
                self.emit_chunks(&mut e, chunks, per_chunk);
            }
            e.emit(id);
        }
        e.out.at = None;
        e.out.outputs =
            g.outputs.iter().map(|(name, id)| (name.clone(), e.map[id.index()].expect("emitted"))).collect();
        // Outside values only the chunks read, remade there, are dead whole.
        Some(crate::ir::prune::prune(&e.out))
    }

    /// Every chunk of the region, then the boundary nodes' results.
    fn emit_chunks(&self, e: &mut Emitter, chunks: usize, per_chunk: usize) {
        let g = e.g;
        // Inputs from outside first: none depends on the region.
        for (n, _) in &self.nodes {
            for a in &g.node(*n).args {
                if !self.row_axes.contains_key(a) && !remade(g, *a, &self.rows) {
                    e.emit(*a);
                }
            }
        }
        let mut partial: Vec<Option<NodeId>> = vec![None; self.boundary.len()];
        let mut pieces: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        for c in 0..chunks {
            let start = Dim::constant((c * per_chunk) as i64);
            let end = if c + 1 == chunks { self.rows.clone() } else { Dim::constant(((c + 1) * per_chunk) as i64) };
            let mut copy: HashMap<NodeId, NodeId> = HashMap::new();
            e.remade.clear();
            // Argument `j` of `reader` in this chunk.
            let arg = |e: &mut Emitter, copy: &HashMap<NodeId, NodeId>, reader: &Node, j: usize| {
                let a = reader.args[j];
                match copy.get(&a) {
                    Some(x) => *x,
                    None if reads_rows(reader, j) => e.rows_of(a, &start, &end),
                    None => e.emit(a),
                }
            };
            for (n, k) in &self.nodes {
                let node = g.node(*n);
                let args: Vec<NodeId> = (0..node.args.len()).map(|j| arg(e, &copy, node, j)).collect();
                let mut dims = vec![end.sub(&start)];
                dims.extend(node.ty.dims[*k..].iter().cloned());
                let made = match &node.op {
                    Op::Reshape if e.out.dims(args[0]) == dims.as_slice() => args[0],
                    op => {
                        let op = match op {
                            Op::Reduce(r, axes) => {
                                let ka = self.row_axes[&node.args[0]];
                                Op::Reduce(*r, axes.iter().map(|x| x + 1 - ka).collect())
                            }
                            op => op.clone(),
                        };
                        e.out.at = node.origin;
                        e.out.push(op, args, TensorTy::new(node.ty.dtype, dims))
                    }
                };
                copy.insert(*n, made);
            }
            for (i, (b, kind)) in self.boundary.iter().enumerate() {
                let node = g.node(*b);
                let piece = match kind {
                    Boundary::Reduce => {
                        let Op::Reduce(r, axes) = &node.op else { unreachable!("a reduce boundary") };
                        let x = arg(e, &copy, node, 0);
                        let k = self.row_axes.get(&node.args[0]).copied().unwrap_or(1);
                        let axes = std::iter::once(0).chain(axes.iter().filter(|x| **x >= k).map(|x| x + 1 - k));
                        e.out.at = node.origin;
                        let p = e.out.push(Op::Reduce(*r, axes.collect()), vec![x], node.ty.clone());
                        Some((p, if *r == Reduce::Max { Binary::Max } else { Binary::Add }))
                    }
                    Boundary::Contract => {
                        let args = (0..2).map(|j| arg(e, &copy, node, j)).collect();
                        e.out.at = node.origin;
                        Some((e.out.push(node.op.clone(), args, node.ty.clone()), Binary::Add))
                    }
                    Boundary::Whole => {
                        for a in node.args.iter().filter(|a| self.row_axes.contains_key(a)) {
                            let v = pieces.entry(*a).or_default();
                            if v.len() == c {
                                v.push(copy[a]);
                            }
                        }
                        None
                    }
                };
                if let Some((p, combine)) = piece {
                    partial[i] = Some(match partial[i] {
                        Some(acc) => e.out.push(Op::Binary(combine), vec![acc, p], node.ty.clone()),
                        None => p,
                    });
                }
            }
        }
        // Values read whole: the chunks concatenated, in the value's shape.
        let mut whole: HashMap<NodeId, NodeId> = HashMap::new();
        for (a, parts) in pieces {
            let ty = g.ty(a);
            let k = self.row_axes[&a];
            let mut dims: Vec<Dim> = vec![self.rows.clone()];
            dims.extend(ty.dims[k..].iter().cloned());
            e.out.at = g.node(a).origin;
            let cat = e.out.push(Op::Concat(0), parts, TensorTy::new(ty.dtype, dims));
            let full = if k == 1 { cat } else { e.out.push(Op::Reshape, vec![cat], ty.clone()) };
            whole.insert(a, full);
        }
        for (i, (b, kind)) in self.boundary.iter().enumerate() {
            e.map[b.index()] = match kind {
                Boundary::Whole => {
                    let node = g.node(*b);
                    let args = node.args.iter().map(|a| whole.get(a).copied().unwrap_or_else(|| e.emit(*a))).collect();
                    e.out.at = node.origin;
                    Some(e.out.push(node.op.clone(), args, node.ty.clone()))
                }
                _ => partial[i],
            };
        }
    }
}

struct Emitter<'g> {
    g: &'g Graph,
    /// The split product's row count.
    rows: Dim,
    out: Graph,
    map: Vec<Option<NodeId>>,
    /// The current chunk's copies of `remade` values.
    remade: HashMap<NodeId, NodeId>,
}

/// The number of leading axes of `dims` whose sizes multiply to `rows`.
fn row_axes(dims: &[Dim], rows: &Dim) -> Option<usize> {
    let mut product = Dim::constant(1);
    for (k, d) in dims.iter().enumerate() {
        product = product.mul(d);
        if product == *rows {
            return Some(k + 1);
        }
    }
    None
}

/// Whether chunks can read rows of outside value `a` (see `Emitter::rows_of`).
fn sliceable(g: &Graph, a: NodeId, rows: &Dim) -> bool {
    let node = g.node(a);
    let Some(k) = row_axes(&node.ty.dims, rows) else { return false };
    match node.op {
        Op::Broadcast => {
            let src = node.args[0];
            let lead = node.ty.rank() - g.ty(src).rank();
            lead >= k || (lead == 0 && g.dims(src)[..k] == node.ty.dims[..k] && sliceable(g, src, rows))
        }
        _ => true,
    }
}

/// An outside value that each chunk computes again for its rows rather than
/// slicing it out of a whole one: elementwise over broadcasts (the one-hot
/// targets, `targets == class`), which would otherwise be made whole.
fn remade(g: &Graph, a: NodeId, rows: &Dim) -> bool {
    let node = g.node(a);
    crate::backend::schedule::is_elementwise(&node.op)
        && node.args.iter().all(|x| g.dims(*x) == node.ty.dims && sliceable(g, *x, rows))
}

/// Whether region node `reader` reads its argument `i` by rows (else whole:
/// a product's right operand, unless the product contracts the rows, aᵀ·b).
fn reads_rows(reader: &Node, i: usize) -> bool {
    !(matches!(reader.op, Op::MatMul { ta: false, .. }) && i == 1)
}

impl Emitter<'_> {
    /// Node `n` and whatever it needs, in order (all outside the region).
    fn emit(&mut self, n: NodeId) -> NodeId {
        if let Some(m) = self.map[n.index()] {
            return m;
        }
        let node = &self.g.nodes[n.index()];
        let args = node.args.iter().map(|a| self.emit(*a)).collect();
        self.out.at = node.origin;
        let m = self.out.push(node.op.clone(), args, node.ty.clone());
        self.map[n.index()] = Some(m);
        m
    }

    /// Rows `start..end` of outside value `a` as `[rows, rest...]`: a
    /// broadcast made again at the chunk's shape (from its source's rows
    /// when the source has them), or a slice of the value's rows.
    fn rows_of(&mut self, a: NodeId, start: &Dim, end: &Dim) -> NodeId {
        let g = self.g;
        let node = g.node(a);
        let k = row_axes(&node.ty.dims, &self.rows).expect("checked by sliceable");
        let mut dims: Vec<Dim> = vec![end.sub(start)];
        dims.extend(node.ty.dims[k..].iter().cloned());
        let ty = TensorTy::new(node.ty.dtype, dims);
        if let Op::Broadcast = node.op {
            let src = node.args[0];
            let source =
                if node.ty.rank() - g.ty(src).rank() >= k { self.emit(src) } else { self.rows_of(src, start, end) };
            self.out.at = node.origin;
            return self.out.push(Op::Broadcast, vec![source], ty);
        }
        if remade(g, a, &self.rows) {
            if let Some(x) = self.remade.get(&a) {
                return *x;
            }
            let args = node.args.iter().map(|x| self.rows_of(*x, start, end)).collect();
            self.out.at = node.origin;
            let x = self.out.push(node.op.clone(), args, ty);
            self.remade.insert(a, x);
            return x;
        }
        let mut x = self.emit(a);
        self.out.at = node.origin;
        if k != 1 {
            let mut flat = ty.clone();
            flat.dims[0] = self.rows.clone();
            x = self.out.push(Op::Reshape, vec![x], flat);
        }
        self.out.push(Op::Slice { axis: 0, start: start.clone(), end: end.clone() }, vec![x], ty)
    }
}
