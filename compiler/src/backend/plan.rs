//! The memory plan: every value a kernel stores gets a range of one arena,
//! reused once the value is dead (liveness over the schedule), in place for
//! elementwise kernels whose same-sized input dies there. Peak bytes are
//! known before anything runs. The parts of a row group count as running
//! at once for reuse, since they run interleaved.

use super::schedule::{Kernel, Schedule};
use crate::ir::graph::*;
use crate::ir::interp::{Sizes, eval_dim};

/// Where a value lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// Elements `offset..offset + len` of the arena.
    Arena { offset: usize, len: usize },
    /// Given by the caller: an input or a weight.
    External(String),
    /// A view of another value's memory (reshape).
    Alias(NodeId),
    /// Written by its kernel straight into its place in a concatenation
    /// (`Schedule::placed`): its address is the concatenation's, and the
    /// kernel offsets every element.
    Part(NodeId),
    /// Not stored: a constant read inline, or a value fused away.
    None,
}

#[derive(Debug)]
pub struct Plan {
    pub places: Vec<Place>,
    /// Arena size in elements.
    pub arena_len: usize,
    /// Elements each node holds, with the sizes bound.
    pub lens: Vec<usize>,
}

impl Plan {
    pub fn peak_bytes(&self) -> usize {
        self.arena_len * std::mem::size_of::<f32>()
    }

    /// The arena range or external name a value is read from, following views.
    pub fn resolve(&self, mut n: NodeId) -> &Place {
        loop {
            match &self.places[n.index()] {
                Place::Alias(of) | Place::Part(of) => n = *of,
                p => return p,
            }
        }
    }
}

pub fn plan(g: &Graph, s: &Schedule, sizes: &Sizes) -> Result<Plan, String> {
    let n = g.nodes.len();
    let mut lens = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate() {
        lens[i] = node.ty.dims.iter().map(|d| eval_dim(d, sizes)).product::<Result<usize, String>>()?;
    }
    let mut places = vec![Place::None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Op::Input(name) | Op::Param(name) = &node.op {
            places[i] = Place::External(name.clone());
        }
    }
    // Kernels in execution order, each with its time and the time its row
    // group starts. The parts of a group run interleaved, block by block, so
    // memory freed inside a group is reused only after it.
    let mut steps: Vec<(&Kernel, usize)> = Vec::new();
    for kernel in &s.kernels {
        match kernel {
            Kernel::Rows(parts) => {
                let start = steps.len();
                steps.extend(parts.iter().map(|p| (p, start)));
            }
            k => steps.push((k, steps.len())),
        }
    }
    // Live ranges over times; a view extends its source's range.
    let storage = |mut k: NodeId, places: &[Place]| {
        while let Place::Alias(of) = places[k.index()] {
            k = of;
        }
        k
    };
    let mut def = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (time, (kernel, _)) in steps.iter().enumerate() {
        let out = kernel.output();
        if let Kernel::View(v) = kernel {
            places[v.index()] = Place::Alias(g.node(*v).args[0]);
        }
        for r in kernel.reads(g) {
            let st = storage(r, &places);
            last[st.index()] = last[st.index()].max(time);
        }
        if !matches!(kernel, Kernel::View(_)) {
            def[out.index()] = time;
            last[out.index()] = last[out.index()].max(time);
        }
    }
    for (_, o) in &g.outputs {
        let st = storage(*o, &places);
        last[st.index()] = usize::MAX;
    }
    // First-fit allocation in execution order.
    let mut live: Vec<(usize, usize, usize)> = Vec::new(); // (offset, len, last use)
    let mut arena_len = 0;
    for (time, (kernel, start)) in steps.iter().enumerate() {
        if matches!(kernel, Kernel::View(_)) {
            continue;
        }
        // A placed part takes its concatenation's memory, which is then
        // live from the first part computed to the concatenation's last use.
        let placed = s.placed.get(&kernel.output()).copied();
        if let Some(concat) = placed {
            places[kernel.output().index()] = Place::Part(concat);
        }
        let out = placed.unwrap_or(kernel.output());
        if matches!(places[out.index()], Place::Arena { .. }) {
            continue;
        }
        let len = lens[out.index()];
        // In place: an elementwise kernel may write over a same-sized input
        // that dies here. Inside a row group, only over a value of the group:
        // those are read row by row, so no earlier part needs the rows written.
        let mut chosen = None;
        if let (Kernel::Fused { inputs, .. }, None) = (kernel, placed) {
            for inp in inputs {
                let st = storage(*inp, &places);
                if let Place::Arena { offset, len: l } = places[st.index()]
                    && l == len
                    && last[st.index()] == time
                    && lens[inp.index()] == len
                    && (time == *start || def[st.index()] >= *start)
                {
                    chosen = Some(offset);
                    live.retain(|(o, _, _)| *o != offset);
                    break;
                }
            }
        }
        live.retain(|(_, _, end)| *end >= *start);
        let offset = chosen.unwrap_or_else(|| {
            live.sort();
            let mut at = 0;
            for (o, l, _) in &live {
                if at + len <= *o {
                    break;
                }
                at = at.max(o + l);
            }
            at
        });
        live.push((offset, len, last[out.index()]));
        arena_len = arena_len.max(offset + len);
        places[out.index()] = Place::Arena { offset, len };
    }
    Ok(Plan { places, arena_len, lens })
}
