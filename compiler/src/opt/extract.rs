//! Extraction of the cheapest node of each e-class. egg's generic extractor
//! iterates to a fixpoint over all classes, which on the deep graphs of
//! training programs (tens of thousands of classes, long chains) takes
//! hundreds of passes. Here a worklist revisits only the parents of a class
//! whose best cost improved.

use super::cost::Cost;
use super::lang::{IrGraph, IrLang, op_children};
use egg::{CostFunction, Id};
use std::collections::{HashMap, VecDeque};

pub struct Best {
    choice: HashMap<Id, (f64, IrLang)>,
}

impl Best {
    pub fn new(egraph: &IrGraph) -> Best {
        let mut cost_fn = Cost::new(egraph);
        let mut choice: HashMap<Id, (f64, IrLang)> = HashMap::new();
        let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        // Inputs first: classes are created in topological order.
        classes.sort();
        let mut queue: VecDeque<Id> = classes.into_iter().collect();
        let mut queued: std::collections::HashSet<Id> = queue.iter().copied().collect();
        while let Some(class) = queue.pop_front() {
            queued.remove(&class);
            let mut improved = false;
            for node in &egraph[class].nodes {
                let Some(children) = op_children(node) else { continue };
                let args = &children[..children.len() - 2];
                if !args.iter().all(|a| choice.contains_key(&egraph.find(*a))) {
                    continue;
                }
                let c = cost_fn.cost(node, |id| choice.get(&egraph.find(id)).map_or(0.0, |(c, _)| *c));
                if choice.get(&class).is_none_or(|(best, _)| c < *best) {
                    choice.insert(class, (c, node.clone()));
                    improved = true;
                }
            }
            if improved {
                for parent in egraph[class].parents() {
                    let parent = egraph.find(parent);
                    if queued.insert(parent) {
                        queue.push_back(parent);
                    }
                }
            }
        }
        Best { choice }
    }

    pub fn node(&self, class: Id) -> &IrLang {
        &self.choice.get(&class).expect("bug: a needed class has no finite cost").1
    }
}
