//! Dead-node removal and renumbering: keeps the nodes the outputs need,
//! in order, with dense ids, so printed IR does not churn.

use super::graph::*;

/// Returns a graph with only the nodes reachable from the outputs.
pub fn prune(g: &Graph) -> Graph {
    let mut live = vec![false; g.nodes.len()];
    for (_, id) in &g.outputs {
        live[id.index()] = true;
    }
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for a in &g.nodes[i].args {
                live[a.index()] = true;
            }
        }
    }
    let mut map = vec![NodeId(u32::MAX); g.nodes.len()];
    let mut out = Graph::default();
    for (i, n) in g.nodes.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let args = n.args.iter().map(|a| map[a.index()]).collect();
        out.at = n.origin;
        map[i] = out.push(n.op.clone(), args, n.ty.clone());
    }
    out.at = None;
    out.outputs = g.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect();
    super::verify::after("prune", &out);
    out
}
