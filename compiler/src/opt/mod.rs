//! The e-graph optimiser (egg): load the IR into an e-graph, saturate it
//! with the rules in `rules.rs` under node and iteration limits, and extract
//! the cheapest equivalent graph by the cost model in `cost.rs`.

pub mod cost;
mod extract;
pub mod lang;
pub mod rules;

use crate::ir::graph::{Graph, NodeId, Origin};
use egg::{Id, Runner};
use lang::type_of;
use std::collections::HashMap;
use std::time::Duration;

/// Bounds that keep optimisation time predictable on the largest specs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { iterations: 30, nodes: 3_000_000, time: Duration::from_secs(20) }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub stop_reason: String,
    pub iterations: usize,
    pub egraph_nodes: usize,
    /// How often each rule was applied.
    pub applied: Vec<(String, usize)>,
    /// Per iteration: e-nodes, search, apply and rebuild seconds.
    pub timeline: Vec<(usize, f64, f64, f64)>,
}

/// A program as the commands run it: dead nodes pruned, then optimised
/// within the default limits.
pub fn optimized(g: &Graph) -> Graph {
    optimize(&crate::ir::prune::prune(g), Limits::default()).0
}

/// Returns an equivalent graph with the same outputs, and a report.
pub fn optimize(g: &Graph, limits: Limits) -> (Graph, Report) {
    let (egraph, ids) = lang::to_egraph(g);
    let roots: Vec<Id> = g.outputs.iter().map(|(_, id)| ids[id.index()]).collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(&rules::rules());
    let mut applied: HashMap<String, usize> = HashMap::new();
    for it in &runner.iterations {
        for (rule, n) in &it.applied {
            *applied.entry(rule.to_string()).or_default() += n;
        }
    }
    let mut applied: Vec<(String, usize)> = applied.into_iter().collect();
    applied.sort();
    let report = Report {
        stop_reason: format!("{:?}", runner.stop_reason.as_ref().expect("a run ends with a reason")),
        iterations: runner.iterations.len(),
        egraph_nodes: runner.egraph.total_number_of_nodes(),
        applied,
        timeline: runner
            .iterations
            .iter()
            .map(|i| (i.egraph_nodes, i.search_time, i.apply_time, i.rebuild_time))
            .collect(),
    };
    let egraph = runner.egraph;
    let extractor = extract::Best::new(&egraph);
    // Each class keeps the origin of the first node of `g` in it; a class
    // only a rewrite made takes its consumer's.
    let mut origins: HashMap<Id, Origin> = HashMap::new();
    for (node, id) in g.nodes.iter().zip(&ids) {
        if let Some(o) = node.origin {
            origins.entry(egraph.find(*id)).or_insert(o);
        }
    }
    // Rebuild a graph from the best node of each needed class, inputs first.
    let mut out = Graph::default();
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    for (root, (name, _)) in roots.iter().zip(&g.outputs) {
        let root = egraph.find(*root);
        let mut stack = vec![(root, false, origins.get(&root).copied())];
        while let Some((class, expanded, consumer)) = stack.pop() {
            if built.contains_key(&class) {
                continue;
            }
            let Some(children) = lang::op_children(extractor.node(class)) else {
                unreachable!("bug: a leaf as a value")
            };
            let args: Vec<Id> = children[..children.len() - 2].iter().map(|c| egraph.find(*c)).collect();
            let origin = origins.get(&class).copied().or(consumer);
            if !expanded {
                stack.push((class, true, origin));
                for a in args.iter().rev() {
                    if !built.contains_key(a) {
                        stack.push((*a, false, origin));
                    }
                }
                continue;
            }
            let op = lang::node_op(&egraph, children);
            let ty = type_of(&egraph, class).expect("typed class").clone();
            let arg_nodes = args.iter().map(|a| built[a]).collect();
            out.at = origin;
            built.insert(class, out.push(op, arg_nodes, ty));
        }
        out.outputs.push((name.clone(), built[&root]));
    }
    out.at = None;
    crate::ir::verify::after("the optimiser", &out);
    (out, report)
}
