//! Hoisting: a graph run many times with some inputs unchanged (an
//! encoder-decoder generating: the source, its mask and the weights stay,
//! the target token and the cache move) is split in two. `once` computes,
//! from the unchanged inputs only, every value the rest reads (the
//! encoder's output, each cross-attention's keys and values); `each` reads
//! those as inputs (`hoisted:N`) and computes what changes. Running `once`
//! then `each` gives the original graph's outputs.

use super::graph::*;
use super::signature::Role;
use std::collections::BTreeSet;

pub struct Hoisted {
    pub once: Graph,
    pub each: Graph,
}

/// Splits `g` for inputs `fixed` that keep their values between runs. A
/// node goes to `once` when it reads a fixed input, no other input reaches
/// it and its sizes are known from the fixed inputs' (a node sized by the
/// target's length is computed each time); leaves (weights, constants) are
/// in both, not passed.
pub fn hoist(g: &Graph, fixed: &[&str]) -> Hoisted {
    let known: BTreeSet<String> = g
        .nodes
        .iter()
        .filter(|n| matches!(&n.op, Op::Input(name) if fixed.contains(&name.as_str())))
        .flat_map(|n| n.ty.dims.iter().flat_map(|d| d.symbols().map(str::to_string)).collect::<Vec<_>>())
        .collect();
    let sized = |n: &Node| {
        let size = if let Op::Size(d) = &n.op { Some(d) } else { None };
        n.ty.dims.iter().chain(size).all(|d| d.symbols().all(|s| known.contains(s)))
    };
    // `once`: computable from the fixed inputs and weights alone; only what
    // reads a fixed input is worth computing once (a view of a weight stays
    // in the step, where the backend reads the weight as it is kept).
    let (mut still, mut reads) = (vec![false; g.nodes.len()], vec![false; g.nodes.len()]);
    for (i, n) in g.nodes.iter().enumerate() {
        let input = |fixed_one: bool| matches!(&n.op, Op::Input(name) if fixed.contains(&name.as_str()) == fixed_one);
        still[i] = !input(false) && sized(n) && n.args.iter().all(|a| still[a.index()]);
        reads[i] = still[i] && (input(true) || n.args.iter().any(|a| reads[a.index()]));
    }
    let once = |i: usize| reads[i] && !g.nodes[i].args.is_empty();
    // What `each` reads of `once`: the values it (or an output) uses.
    let mut passed = vec![false; g.nodes.len()];
    let outputs = g.outputs.iter().map(|(_, id)| *id);
    let users = g.nodes.iter().enumerate().filter(|(i, _)| !once(*i)).flat_map(|(_, n)| n.args.iter().copied());
    for id in users.chain(outputs) {
        passed[id.index()] = once(id.index());
    }
    let mut first = Graph::default();
    let mut second = Graph::default();
    let (mut in_first, mut in_second) = (vec![None; g.nodes.len()], vec![None; g.nodes.len()]);
    for (i, n) in g.nodes.iter().enumerate() {
        // Everything the fixed inputs and weights give (pruned to what `each` reads).
        if still[i] {
            first.at = n.origin;
            let args = n.args.iter().map(|a| in_first[a.index()].expect("once reads once")).collect();
            in_first[i] = Some(first.push(n.op.clone(), args, n.ty.clone()));
        }
        second.at = n.origin;
        in_second[i] = if passed[i] {
            let name = Role::Hoisted(&first.outputs.len().to_string()).name();
            first.outputs.push((name.clone(), in_first[i].expect("passed values are once")));
            Some(second.input(&name, n.ty.clone()))
        } else if !once(i) {
            let args = n.args.iter().map(|a| in_second[a.index()].expect("each reads its own or passed values"));
            let args = args.collect();
            Some(second.push(n.op.clone(), args, n.ty.clone()))
        } else {
            None
        };
    }
    first.at = None;
    second.at = None;
    second.outputs =
        g.outputs.iter().map(|(name, id)| (name.clone(), in_second[id.index()].expect("output"))).collect();
    let (once, each) = (super::prune::prune(&first), super::prune::prune(&second));
    super::verify::after("hoist", &once);
    super::verify::after("hoist", &each);
    Hoisted { once, each }
}
