//! Memory-aware order: a node that is the last reader of values larger than
//! its own output runs as soon as its inputs are made, not where the
//! optimiser's extraction happened to put it. A training program's weight
//! gradients are the case that matters: extraction emits them at the end,
//! after the whole backward pass (they feed the gradient norm, which every
//! update reads), so each one kept its layer's activation and output
//! gradient alive through all the layers after it, the logits' gradient
//! among them. Run as soon as they can, each frees those and holds only a
//! weight-sized result until the update.
//!
//! A node moves when the values it frees (at the bound sizes) outweigh the
//! one it makes, which it would otherwise have made later: memory never
//! grows where it moves. That keeps a small batch's activations alive when
//! a weight gradient is larger than them, though the gradient lives to the
//! update anyway and what it frees would be held over the backward's peak;
//! moving when it frees more than a quarter of what it makes plans lower
//! there (tiny-gpt 4 x 128 24.2 -> 19.2 MB, BERT-MLM 591.6 -> 481.2) and
//! higher elsewhere (LLaMA-7B 8 x 1,024 +18%). `free_early_orders` gives
//! both orders; the backend plans each and keeps the lower peak. Views
//! (reshapes) share their source's memory and move with it.
//!
//! Products of a few rows against weights that share their left operand
//! (a decoding step's q/k/v projections, its gate and up projections) run
//! side by side, the first where it was: a backend can then read all
//! their weight rows in one parallel section (`sibling_products`). Their
//! outputs are a few rows each, so memory grows by next to nothing.

use super::kernel::Kernel;
use crate::ir::graph::*;
use crate::types::{Sizes, eval_dim};

/// `g` in an order that frees memory early: the same nodes renumbered, the
/// same outputs. A node moves when it frees more than it makes.
pub fn free_early(g: &Graph, sizes: &Sizes) -> Graph {
    renumber(g, &order_by(g, sizes, 1))
}

/// `g` in each order that frees memory early, a node moving when it frees
/// more than what it makes, or more than a quarter of it (one order where
/// the two agree).
pub fn free_early_orders(g: &Graph, sizes: &Sizes) -> Vec<Graph> {
    let (whole, quarter) = (order_by(g, sizes, 1), order_by(g, sizes, 4));
    let mut orders = vec![renumber(g, &whole)];
    if quarter != whole {
        orders.push(renumber(g, &quarter));
    }
    orders
}

/// The order in which `g`'s nodes run, a node moving when what it frees
/// times `share` is more than what it makes.
fn order_by(g: &Graph, sizes: &Sizes, share: usize) -> Vec<usize> {
    let mut order = Order::new(g, sizes, share);
    for i in 0..g.nodes.len() {
        order.emit(i);
    }
    order.order
}

/// `g`'s nodes renumbered in `order`.
fn renumber(g: &Graph, order: &[usize]) -> Graph {
    let n = g.nodes.len();
    let mut map = vec![NodeId(0); n];
    let mut out = Graph::default();
    for &i in order {
        let node = &g.nodes[i];
        out.at = node.origin;
        map[i] = out.push(node.op.clone(), node.args.iter().map(|a| map[a.index()]).collect(), node.ty.clone());
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    crate::ir::verify::after("free_early", &out);
    out
}

struct Order<'g> {
    g: &'g Graph,
    sizes: &'g Sizes,
    /// A node moves when what it frees times this is more than what it makes.
    share: usize,
    /// Elements of each value at the bound sizes.
    len: Vec<usize>,
    /// The value whose memory each value is (itself, or a view's source).
    storage: Vec<usize>,
    /// The reshapes of each value.
    views: Vec<Vec<usize>>,
    /// The nodes (views excepted) reading each storage, directly or through a view.
    readers: Vec<Vec<usize>>,
    /// Readers of each storage not yet emitted (an output counts as one).
    left: Vec<usize>,
    emitted: Vec<bool>,
    order: Vec<usize>,
}

impl<'g> Order<'g> {
    fn new(g: &'g Graph, sizes: &'g Sizes, share: usize) -> Self {
        let n = g.nodes.len();
        let len = (g.nodes.iter())
            .map(|node| node.ty.dims.iter().map(|d| eval_dim(d, sizes).unwrap_or(0)).fold(1, usize::saturating_mul))
            .collect();
        let mut storage: Vec<usize> = (0..n).collect();
        let mut views = vec![Vec::new(); n];
        let mut readers = vec![Vec::new(); n];
        for (i, node) in g.nodes.iter().enumerate() {
            if let Op::Reshape = node.op {
                storage[i] = storage[node.args[0].index()];
                views[node.args[0].index()].push(i);
                continue;
            }
            let mut stores: Vec<usize> = node.args.iter().map(|a| storage[a.index()]).collect();
            stores.sort_unstable();
            stores.dedup();
            stores.into_iter().for_each(|s: usize| readers[s].push(i));
        }
        let mut left: Vec<usize> = readers.iter().map(Vec::len).collect();
        for (_, o) in &g.outputs {
            left[storage[o.index()]] += 1;
        }
        let (emitted, order) = (vec![false; n], Vec::with_capacity(n));
        Order { g, sizes, share, len, storage, views, readers, left, emitted, order }
    }

    /// The products not yet emitted that share `k`'s left operand and run
    /// beside it (`sibling_products`), each after its weight.
    fn siblings(&self, k: usize) -> Vec<usize> {
        let Some(a) = few_row_sibling(self.g, NodeId(k as u32), self.sizes) else { return Vec::new() };
        let mut work = Vec::new();
        for &s in &self.readers[self.storage[a.index()]] {
            if s != k && !self.emitted[s] && few_row_sibling(self.g, NodeId(s as u32), self.sizes) == Some(a) {
                work.push(s);
                work.extend(self.g.nodes[s].args.iter().map(|w| w.index()).filter(|&w| !self.emitted[w]));
            }
        }
        work
    }

    fn stores(&self, k: usize) -> Vec<usize> {
        let mut stores: Vec<usize> = self.g.nodes[k].args.iter().map(|a| self.storage[a.index()]).collect();
        stores.sort_unstable();
        stores.dedup();
        stores
    }

    fn ready(&self, k: usize) -> bool {
        !self.emitted[k] && self.g.nodes[k].args.iter().all(|a| self.emitted[a.index()])
    }

    /// Running `k` now frees more than `share`-th of what it makes.
    fn worth_moving(&self, k: usize) -> bool {
        let owned = |s: usize| !matches!(self.g.nodes[s].op, Op::Input(_) | Op::Param(_) | Op::Const(_) | Op::Size(_));
        let freed: usize =
            (self.stores(k).into_iter()).filter(|&s| owned(s) && self.left[s] == 1).map(|s| self.len[s]).sum();
        self.ready(k) && !matches!(self.g.nodes[k].op, Op::Reshape) && freed.saturating_mul(self.share) > self.len[k]
    }

    /// Emits `k` (if not yet), then whatever that lets run early.
    fn emit(&mut self, k: usize) {
        let mut work = vec![k];
        while let Some(k) = work.pop() {
            if !self.ready(k) {
                continue;
            }
            self.emitted[k] = true;
            self.order.push(k);
            work.extend(self.views[k].iter().copied());
            let mut woken = Vec::new();
            if !matches!(self.g.nodes[k].op, Op::Reshape) {
                for s in self.stores(k) {
                    self.left[s] -= 1;
                    if self.left[s] == 1 {
                        woken.extend(self.readers[s].iter().copied());
                    }
                }
            }
            woken.extend(self.readers[self.storage[k]].iter().copied());
            work.extend(woken.into_iter().filter(|&r| self.worth_moving(r)));
            // Last on the stack, so first off it: each sibling's weight, then the sibling.
            work.extend(self.siblings(k));
        }
    }
}

/// Rows of a product's output up to which products sharing their left
/// operand run side by side (the runtime's matrix-vector products).
pub const FEW_ROWS: usize = 4;

/// The left operand of `n` when `n` is a product that can share a parallel
/// section with others of the same left operand: `x W^T` for a weight `W`
/// the program is given (read as rows), `x` of two dimensions.
pub fn sibling_products(g: &Graph, n: NodeId) -> Option<NodeId> {
    let node = g.node(n);
    let (Op::MatMul { ta: false, tb: true }, [a, w]) = (&node.op, node.args.as_slice()) else { return None };
    let leaf = matches!(g.node(*w).op, Op::Param(_) | Op::Input(_));
    (leaf && g.dims(*w).len() == 2 && g.dims(*a).len() == 2).then_some(*a)
}

/// The runs of two or more kernels of `kernels` (in execution order, views
/// between) that are products of a few rows of one left operand
/// (`few_row_sibling`), as their indices: what the kernel order puts side
/// by side, which row groups leave out (`rows.rs`) and the CPU runs as one.
pub fn sibling_runs(g: &Graph, kernels: &[Kernel], sizes: &Sizes) -> Vec<Vec<usize>> {
    let operand = |k: &Kernel| match k {
        Kernel::Single(n) => few_row_sibling(g, *n, sizes),
        _ => None,
    };
    let mut runs: Vec<(Option<NodeId>, Vec<usize>)> = Vec::new();
    for (i, k) in kernels.iter().enumerate().filter(|(_, k)| !matches!(k, Kernel::View(_))) {
        match (operand(k), runs.last_mut()) {
            (Some(a), Some((Some(last), run))) if *last == a => run.push(i),
            (a, _) => runs.push((a, vec![i])),
        }
    }
    runs.into_iter().filter(|(a, run)| a.is_some() && run.len() > 1).map(|(_, run)| run).collect()
}

/// `sibling_products` for a product of at most `FEW_ROWS` rows at `sizes`.
pub fn few_row_sibling(g: &Graph, n: NodeId, sizes: &Sizes) -> Option<NodeId> {
    let a = sibling_products(g, n)?;
    let rows = eval_dim(&g.dims(a)[0], sizes).ok()?;
    (1..=FEW_ROWS).contains(&rows).then_some(a)
}
