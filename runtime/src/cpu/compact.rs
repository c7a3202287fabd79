//! Compact weights in a model's feeds: which weights products read (and
//! so can be packed in a compact format), packing them, checking weights
//! packed beforehand, and dropping the f32 values no kernel reads.

use super::{Format, Packed, Tensor, kernels};
use modelc::ir::graph::{Graph, NodeId, Op};
use std::collections::HashMap;

/// How node `user` reads argument `arg` when that is a product's 2-D right
/// operand, a weight a packed copy can serve: `Some(true)` for `x @ W^T`
/// (each output's weights are a row of W, as stored), `Some(false)` for
/// `x @ W` (GPT-2's Conv1D: a column, packed from W's transpose).
pub(super) fn product_weight(g: &Graph, user: NodeId, arg: usize) -> Option<bool> {
    let node = g.node(user);
    match node.op {
        Op::MatMul { ta: false, tb } if arg == 1 && g.dims(node.args[1]).len() == 2 => Some(tb),
        Op::ExpertMatMul { tb } if arg >= 2 => Some(tb),
        _ => None,
    }
}

/// Packs, in `format`, each weight of `feeds` that `g` multiplies by (as
/// `x @ W^T` or `x @ W`) and whose rows of inputs fit the format; returns
/// how many it packed.
pub fn pack_weights(g: &Graph, feeds: &mut HashMap<String, Tensor>, format: Format) -> usize {
    if format == Format::F32 {
        return 0;
    }
    let mut packed = 0;
    for (id, node) in g.nodes.iter().enumerate() {
        for (arg, input) in node.args.iter().enumerate() {
            let Op::Param(name) = &g.node(*input).op else { continue };
            let Some(tb) = product_weight(g, NodeId(id as u32), arg) else { continue };
            let Some(t) = feeds.get_mut(name) else { continue };
            if t.packed.is_some() || t.shape.len() != 2 {
                continue;
            }
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (n, k) = if tb { (rows, cols) } else { (cols, rows) };
            if !format.fits(k) {
                continue;
            }
            let w = if tb {
                std::borrow::Cow::Borrowed(&t.data)
            } else {
                let mut w = vec![0f32; rows * cols];
                kernels::permute(&t.data, &t.shape, &[1, 0], &mut w);
                std::borrow::Cow::Owned(w)
            };
            t.packed = Some(std::sync::Arc::new(Packed::new(format, &w, n, k).transposed(!tb)));
            packed += 1;
        }
    }
    packed
}

/// Packed weights read from a file (`modelc quantize`) checked against how
/// `g` uses them, since the file is not trusted: a product that reads one
/// must find it packed its way round with its sizes, and a weight `g` also
/// reads as f32 must have its f32 values.
pub fn check_packed(g: &Graph, feeds: &HashMap<String, Tensor>) -> Result<(), String> {
    let reads = f32_reads(g);
    for (id, node) in g.nodes.iter().enumerate() {
        for (arg, input) in node.args.iter().enumerate() {
            let Op::Param(name) = &g.node(*input).op else { continue };
            let Some(t @ Tensor { packed: Some(p), .. }) = feeds.get(name) else { continue };
            if t.data.is_empty() && reads.contains(name) {
                return Err(format!(
                    "`{name}` is stored packed without its f32 values, which the model also reads as f32"
                ));
            }
            let Some(tb) = product_weight(g, NodeId(id as u32), arg) else { continue };
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (n, k) = if tb { (rows, cols) } else { (cols, rows) };
            // Packed its way round, the product reads the packed copy; else the f32 values.
            let fits = if p.transposed != tb { (p.n, p.k) == (n, k) } else { !t.data.is_empty() };
            if !fits {
                return Err(format!(
                    "`{name}` is stored packed as {} x {}{}, but the model multiplies it as {n} x {k}{}",
                    p.n,
                    p.k,
                    if p.transposed { " (transposed)" } else { "" },
                    if tb { "" } else { " (transposed)" }
                ));
            }
        }
    }
    Ok(())
}

/// Weights `g` reads as f32 values: other than as a product's right
/// operand, or as one both ways (`x @ W` and `x @ W^T`; a packed copy
/// serves one).
pub fn f32_reads(g: &Graph) -> std::collections::HashSet<String> {
    let mut reads = std::collections::HashSet::new();
    let mut ways: HashMap<&str, bool> = HashMap::new();
    for (id, node) in g.nodes.iter().enumerate() {
        for (arg, input) in node.args.iter().enumerate() {
            let Op::Param(name) = &g.node(*input).op else { continue };
            match product_weight(g, NodeId(id as u32), arg) {
                Some(tb) if *ways.entry(name).or_insert(tb) == tb => {}
                _ => {
                    reads.insert(name.clone());
                }
            }
        }
    }
    for (_, out) in &g.outputs {
        if let Op::Param(name) = &g.node(*out).op {
            reads.insert(name.clone());
        }
    }
    reads
}

/// Empties the f32 values of packed weights that none of `graphs` reads
/// as f32 (their products read the packed copy): the memory compact
/// weights are for.
pub fn drop_unread(graphs: &[&Graph], feeds: &mut HashMap<String, Tensor>) {
    let reads: std::collections::HashSet<String> = graphs.iter().flat_map(|g| f32_reads(g)).collect();
    for (name, t) in feeds.iter_mut() {
        if t.packed.is_some() && !reads.contains(name) {
            t.data = Vec::new();
        }
    }
}
