//! The scheduler: groups the IR into kernels, the unit every backend
//! compiles. Chains of elementwise operations fuse into one loop over the
//! output, reading broadcast inputs in place and keeping intermediates in
//! registers; everything else (contractions, reductions, layout changes,
//! indexing) is a kernel of its own. Reshapes are views: no kernel at all.
//! Kernels over the same rows are then grouped to run row block by row
//! block (`rows.rs`).

use super::kernel::Kernel;
use crate::ir::graph::*;
use std::collections::HashMap;

/// A slice that is a contiguous part of its source (on the leading axis, or
/// after axes of size 1: the attention gradient's dQ and dK/dV parts), of a
/// value the program computes: a view of it rather than a copy. (Inputs and
/// weights are the caller's tensors; their slices are copied.)
pub fn is_window(g: &Graph, n: NodeId) -> bool {
    let Op::Slice { axis, .. } = g.node(n).op else { return false };
    let mut src = g.node(n).args[0];
    if !g.dims(src)[..axis].iter().all(|d| *d == crate::types::Dim::constant(1)) {
        return false;
    }
    while let Op::Reshape = g.node(src).op {
        src = g.node(src).args[0];
    }
    !matches!(g.node(src).op, Op::Input(_) | Op::Param(_) | Op::Const(_))
}

/// Operations computed element by element (possibly of broadcast inputs).
pub fn is_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast(_))
}

/// Layout operations a fused loop reads through (index arithmetic on the
/// source) instead of a kernel copying them out.
fn is_read_in_place(op: &Op) -> bool {
    matches!(op, Op::Broadcast | Op::Slice { .. })
}

/// Values that cost nothing to read inside a fused loop.
fn is_inline(op: &Op) -> bool {
    matches!(op, Op::Const(_))
}

#[derive(Debug, Default)]
pub struct Schedule {
    pub kernels: Vec<Kernel>,
    /// Concatenation parts written straight into the concatenation's memory
    /// (part -> concatenation): each is the output of a fused kernel that
    /// nothing else reads, so the concatenation copies only its other parts.
    pub placed: HashMap<NodeId, NodeId>,
}

impl Schedule {
    /// Every kernel in execution order, row groups opened: what a backend
    /// that runs parts one after the other (the GPU) sees.
    pub fn leaves(&self) -> Vec<&Kernel> {
        self.kernels
            .iter()
            .flat_map(|k| match k {
                Kernel::Rows(parts) => parts.iter().collect(),
                k => vec![k],
            })
            .collect()
    }

    /// The names of `leaves()` as `modelc kernels` prints them: `k3`, or
    /// `k3.1` for part 1 of row group 3.
    pub fn leaf_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (k, kernel) in self.kernels.iter().enumerate() {
            match kernel {
                Kernel::Rows(parts) => names.extend((0..parts.len()).map(|p| format!("k{k}.{p}"))),
                _ => names.push(format!("k{k}")),
            }
        }
        names
    }
}

/// Whether `arg` is a running sum that node `i` adds a product made after it
/// to (`chunk.rs`'s partial weight gradients): fused, every partial product
/// would be held until the last one is made, instead of each being added as
/// it comes.
fn running_sum(g: &Graph, i: usize, arg: NodeId) -> bool {
    let add = |n: &Node| matches!(n.op, Op::Binary(Binary::Add));
    add(&g.nodes[i])
        && add(g.node(arg))
        && (g.nodes[i].args.iter())
            .any(|b| *b != arg && b.index() > arg.index() && matches!(g.node(*b).op, Op::MatMul { .. }))
}

/// Groups `g` into kernels. A node joins its single consumer's fused kernel
/// when both are elementwise over the same shape. A broadcast or slice
/// feeding only elementwise nodes of its shape is never materialised: every
/// kernel that uses it reads its source in place (re-reading is cheaper than
/// a pass that writes the broadcast or sliced tensor out).
pub fn schedule(g: &Graph) -> Schedule {
    schedule_at(g, &crate::types::Sizes::new())
}

/// `schedule` for a program at bound `sizes`: products of a few rows
/// beside others of the same left operand stay out of row groups
/// (`rows::group`).
pub fn schedule_at(g: &Graph, sizes: &crate::types::Sizes) -> Schedule {
    let n = g.nodes.len();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for a in &node.args {
            users[a.index()].push(i);
        }
    }
    let mut is_output = vec![false; n];
    for (_, id) in &g.outputs {
        is_output[id.index()] = true;
    }
    let single_use = |k: usize| users[k].len() == 1 && !is_output[k];
    let shared: Vec<bool> = (0..n)
        .map(|k| {
            let node = &g.nodes[k];
            is_read_in_place(&node.op)
                && !is_output[k]
                && users[k].len() > 1
                && users[k].iter().all(|u| is_elementwise(&g.nodes[*u].op) && g.nodes[*u].ty.dims == node.ty.dims)
        })
        .collect();
    // A slice only a concatenation reads (RoPE's rotate-half, the halves of
    // a gradient) is a fused kernel of its own, which then writes straight
    // into the concatenation (`placed_parts`) instead of being copied out
    // and copied again.
    let into_concat = |k: usize| {
        matches!(g.nodes[k].op, Op::Slice { .. }) && single_use(k) && matches!(g.nodes[users[k][0]].op, Op::Concat(_))
    };
    // The fused group each node belongs to, by its root (the node stored).
    let mut root: Vec<Option<usize>> = vec![None; n];
    for i in (0..n).rev() {
        let node = &g.nodes[i];
        if !is_elementwise(&node.op) && !into_concat(i) {
            continue;
        }
        let r = root[i].unwrap_or(i);
        root[i] = Some(r);
        for a in &node.args {
            let arg = &g.nodes[a.index()];
            // A single-use broadcast or slice is read in place: its source becomes the kernel's input.
            let joins = is_read_in_place(&arg.op) || is_elementwise(&arg.op);
            if joins && single_use(a.index()) && arg.ty.dims == node.ty.dims && !running_sum(g, i, *a) {
                root[a.index()] = Some(r);
            }
        }
    }
    let group_of = |r: usize| -> Vec<usize> { (0..=r).filter(|k| root[*k] == Some(r)).collect() };
    // A chain that reads memory only through broadcasts (a one-hot built by
    // comparing targets with the class index, a mask) and feeds only
    // elementwise kernels of its shape is computed again inside each of
    // them: cheaper than storing the full-size result and reading it back.
    let recompute: Vec<bool> = (0..n)
        .map(|r| {
            let node = &g.nodes[r];
            if root[r] != Some(r) || is_output[r] || users[r].len() < 2 {
                return false;
            }
            if !users[r].iter().all(|u| is_elementwise(&g.nodes[*u].op) && g.nodes[*u].ty.dims == node.ty.dims) {
                return false;
            }
            let members = group_of(r);
            members.iter().all(|m| {
                let through_broadcast = matches!(g.nodes[*m].op, Op::Broadcast);
                g.nodes[*m].args.iter().all(|a| {
                    let k = a.index();
                    members.contains(&k) || is_inline(&g.nodes[k].op) || shared[k] || through_broadcast
                })
            })
        })
        .collect();
    // A reduction over the innermost axis of a chain nothing else reads folds into it.
    let mut folds: Vec<Option<usize>> = vec![None; n];
    let mut folded = vec![false; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::Reduce(_, axes) = &node.op else { continue };
        let a = node.args[0].index();
        let rank = g.nodes[a].ty.rank();
        if rank > 0 && axes.as_slice() == [rank - 1] && root[a] == Some(a) && single_use(a) {
            folds[a] = Some(i);
            folded[i] = true;
        }
    }
    let mut kernels = Vec::new();
    for i in 0..n {
        let node = &g.nodes[i];
        match (&node.op, root[i]) {
            _ if folded[i] => {}
            (Op::Input(_) | Op::Param(_), _) => {}
            // A constant a view reads (a scalar reshaped) is stored, so that the view has memory.
            (Op::Const(_), _) if users[i].iter().any(|u| matches!(g.nodes[*u].op, Op::Reshape)) => {
                kernels.push(Kernel::Single(NodeId(i as u32)))
            }
            (op, _) if is_inline(op) => {}
            (Op::Reshape, _) => kernels.push(Kernel::View(NodeId(i as u32))),
            (_, None) if shared[i] => {}
            (_, None) if !is_output[i] && is_window(g, NodeId(i as u32)) => {
                kernels.push(Kernel::View(NodeId(i as u32)))
            }
            (_, Some(r)) if r == i && recompute[i] => {}
            (_, Some(r)) if r == i => {
                let mut members: Vec<usize> = group_of(i);
                // Borrowed: shared broadcasts and recomputed chains this one reads.
                let mut k = 0;
                while k < members.len() {
                    for a in &g.nodes[members[k]].args {
                        let a = a.index();
                        let more = match root[a] {
                            _ if members.contains(&a) => vec![],
                            _ if shared[a] => vec![a],
                            Some(r) if recompute[r] => group_of(r),
                            _ => vec![],
                        };
                        members.extend(more.into_iter().filter(|m| !members.contains(m)).collect::<Vec<_>>());
                    }
                    k += 1;
                }
                members.sort_unstable();
                members.dedup();
                let mut inputs = Vec::new();
                for &m in &members {
                    for a in &g.nodes[m].args {
                        let k = a.index();
                        if !members.contains(&k) && !is_inline(&g.nodes[k].op) && !inputs.contains(a) {
                            inputs.push(*a);
                        }
                    }
                }
                let nodes = members.into_iter().map(|m| NodeId(m as u32)).collect();
                kernels.push(match folds[i] {
                    Some(r) => Kernel::FusedReduce { nodes, inputs, reduce: NodeId(r as u32) },
                    None => Kernel::Fused { nodes, inputs },
                });
            }
            (_, Some(_)) => {}
            (_, None) => kernels.push(Kernel::Single(NodeId(i as u32))),
        }
    }
    let kernels = super::rows::group(g, kernels, sizes);
    let placed = placed_parts(g, &kernels, &users, &is_output);
    Schedule { kernels, placed }
}

/// The parts of each concatenation that a fused kernel of its own computes
/// and only the concatenation reads (once): the gradient of a slice (the LM
/// loss's shifted logits), RoPE's rotate-half. Writing them in place saves
/// a copy of each.
fn placed_parts(g: &Graph, kernels: &[Kernel], users: &[Vec<usize>], is_output: &[bool]) -> HashMap<NodeId, NodeId> {
    let fused: std::collections::HashSet<NodeId> =
        kernels.iter().filter(|k| matches!(k, Kernel::Fused { .. })).map(Kernel::output).collect();
    let mut placed = HashMap::new();
    for kernel in kernels {
        let Kernel::Single(c) = kernel else { continue };
        let Op::Concat(_) = g.node(*c).op else { continue };
        let args = &g.node(*c).args;
        for p in args {
            let once = args.iter().filter(|a| *a == p).count() == 1;
            if once && fused.contains(p) && users[p.index()] == [c.index()] && !is_output[p.index()] {
                placed.insert(*p, *c);
            }
        }
    }
    placed
}

/// The schedule as text: what `modelc kernels` prints.
pub fn describe(g: &Graph, s: &Schedule) -> String {
    s.kernels.iter().enumerate().map(|(k, kernel)| describe_kernel(g, s, kernel, &format!("k{k}"))).collect()
}

/// One kernel as text, named `name`; a row group lists its parts indented.
pub fn describe_kernel(g: &Graph, s: &Schedule, kernel: &Kernel, name: &str) -> String {
    let ops = |nodes: &[NodeId]| nodes.iter().map(|n| g.node(*n).op.name()).collect::<Vec<_>>().join(", ");
    let ids = |nodes: &[NodeId]| nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
    match kernel {
        Kernel::Fused { nodes, inputs } => {
            let out = kernel.output();
            let into = s.placed.get(&out).map(|c| format!(" (into {c})")).unwrap_or_default();
            format!("{name} fused {} -> {out}{into} : {} [{}]\n", ids(inputs), g.ty(out), ops(nodes))
        }
        Kernel::FusedReduce { nodes, inputs, reduce } => format!(
            "{name} fused {} -> {reduce} : {} [{}] then {}\n",
            ids(inputs),
            g.ty(*reduce),
            ops(nodes),
            g.node(*reduce).op.name()
        ),
        Kernel::Single(n) => {
            format!("{name} {} {} -> {n} : {}\n", g.node(*n).op.name(), ids(&g.node(*n).args), g.ty(*n))
        }
        Kernel::View(n) => {
            let slice = if matches!(g.node(*n).op, Op::Slice { .. }) {
                format!(" [{}]", g.node(*n).op.name())
            } else {
                String::new()
            };
            format!("{name} view {} -> {n} : {}{slice}\n", g.node(*n).args[0], g.ty(*n))
        }
        Kernel::Rows(parts) => {
            let mut out = format!("{name} rows ({} parts, row block by row block)\n", parts.len());
            for (p, part) in parts.iter().enumerate() {
                out.push_str("  ");
                out.push_str(&describe_kernel(g, s, part, &format!("{name}.{p}")));
            }
            out
        }
    }
}
