//! The memory plan: every value a kernel stores gets a range of one arena,
//! reused once the value is dead (liveness over the schedule), in place for
//! elementwise kernels whose same-sized input dies there. Peak bytes are
//! known before anything runs. The parts of a row group count as running
//! at once for reuse, since they run interleaved. On the CPU, a value a row
//! group computes and only the group reads never reaches the arena: each
//! thread keeps it for the block of rows it is working on in a buffer of
//! its own (`Place::Block`), which stays in cache and is reused block after
//! block.

use super::kernel::Kernel;
use super::schedule::Schedule;
use crate::ir::graph::*;
use crate::ir::signature::Role;
use crate::types::{Sizes, eval_dim};

/// Where a value lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// Elements `offset..offset + len` of the arena.
    Arena { offset: usize, len: usize },
    /// Given by the caller: an input or a weight.
    External(String),
    /// A program output its kernel writes straight into the buffer the
    /// caller keeps it in (a training step's new weights and moments: no
    /// arena range, no copy out). Only with `Inputs::Writable`.
    Output(String),
    /// A view of another value's memory (reshape).
    Alias(NodeId),
    /// A contiguous slice of another value (`schedule::is_window`): its
    /// memory from `offset` elements into that value's.
    Window { of: NodeId, offset: usize },
    /// Written by its kernel straight into its place in a concatenation
    /// (`Schedule::placed`): its address is the concatenation's, and the
    /// kernel offsets every element.
    Part(NodeId),
    /// A row group's value that nothing after the group reads: the rows of
    /// the block being computed, in the running thread's block buffer. The
    /// buffer holds `row`-element rows side by side per value: this value
    /// starts `column` elements into a row of the buffer (so at element
    /// `column * rows` of a buffer for blocks of `rows` rows). Only the CPU
    /// backend's plan has these (`Blocks::Buffered`).
    Block { column: usize, row: usize },
    /// Not stored: a constant read inline, or a value fused away.
    None,
}

/// What a backend may do with the memory of the caller's inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// Only read them.
    ReadOnly,
    /// A `WriteRows` whose base is an input writes its rows into that
    /// input where it lies (the caller hands it over to be written: a
    /// decoder's key/value cache), instead of copying it first; and an
    /// output that a fused kernel computes and nothing else reads is written
    /// into the caller's buffer for it (`Place::Output`), or over the input
    /// it replaces when that input is dead by then (a training step's new
    /// weights and optimiser state: `Role::replaces`).
    Writable,
}

/// Where a plan keeps values that only their row group reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// In the arena, like every other value (a backend that runs a group's
    /// parts one after the other over whole tensors: the GPU).
    InArena,
    /// In per-thread block buffers (`Place::Block`): the CPU, which runs a
    /// group block of rows by block.
    Buffered,
}

#[derive(Debug)]
pub struct Plan {
    pub places: Vec<Place>,
    /// Arena size in elements.
    pub arena_len: usize,
    /// Elements of the largest block buffer a row group needs (each thread
    /// running blocks has one; `Place::Block`).
    pub block_len: usize,
    /// Elements each node holds, with the sizes bound.
    pub lens: Vec<usize>,
    /// For each node its kernel computes: the step (`Schedule::leaves`)
    /// that writes it and the last that reads it (or its views); outputs
    /// live to the end. `None` for the rest. What `modelc plan` draws.
    pub live: Vec<Option<(usize, usize)>>,
    /// For each step, the step its row group starts at (itself outside
    /// one): a group's parts run interleaved, so a value one part writes
    /// shares no memory with one live when the group starts.
    pub group_starts: Vec<usize>,
    /// For each arena value, what its offset is: so the offsets, and the
    /// peak, can be written in the symbolic sizes (`modelc plan`).
    pub below: Vec<Below>,
    /// The inputs the program writes where they lie (`Inputs::Writable`):
    /// caches a `WriteRows` writes its rows into, and training state an
    /// output replaces (`Role::replaces`). The caller hands them over.
    pub written: Vec<String>,
}

/// Where an arena value starts, as the allocator chose it.
#[derive(Clone, Debug, PartialEq)]
pub enum Below {
    /// At the arena's start (or not an arena value).
    Start,
    /// Right above another value (the end of its range).
    Above(NodeId),
    /// Where another value starts (written in place over it).
    Over(NodeId),
    /// Above all of these (the values live then), at every size a plan is
    /// made for (`plan_over`) where no one of them is the highest at all.
    AboveAll(Vec<NodeId>),
}

/// A plan's arena placement evaluated at other sizes (`plan_over`): each
/// value's length and offset there, and the arena's length.
#[derive(Debug)]
pub struct Placement {
    pub lens: Vec<usize>,
    pub offsets: Vec<usize>,
    pub arena_len: usize,
}

impl Placement {
    fn end(&self, v: NodeId) -> usize {
        self.offsets[v.index()] + self.lens[v.index()]
    }

    /// Where a value placed on `on` starts here.
    fn base(&self, on: &Below) -> usize {
        match on {
            Below::Start => 0,
            Below::Above(w) => self.end(*w),
            Below::Over(w) => self.offsets[w.index()],
            Below::AboveAll(ws) => ws.iter().map(|w| self.end(*w)).max().unwrap_or(0),
        }
    }

    /// Two arena values of `plan` live at once (`Plan::live`, a value
    /// written inside a row group from the group's start) whose ranges
    /// overlap here and not in the plan (which is checked by running it):
    /// this placement is sound at its sizes when there are none.
    pub fn conflict(&self, plan: &Plan) -> Option<(NodeId, NodeId)> {
        let mut ranges: Vec<(usize, usize, NodeId)> = (plan.places.iter().enumerate())
            .filter(|(_, p)| matches!(p, Place::Arena { .. }))
            .map(|(i, _)| NodeId(i as u32))
            .filter(|v| self.lens[v.index()] > 0)
            .map(|v| (self.offsets[v.index()], self.end(v), v))
            .collect();
        ranges.sort();
        let at_plan = |v: NodeId| match plan.places[v.index()] {
            Place::Arena { offset, len } => (offset, offset + len),
            _ => unreachable!(),
        };
        // Sweep up the offsets, holding the ranges still open.
        let mut open: Vec<(usize, NodeId)> = Vec::new();
        for &(from, to, v) in &ranges {
            open.retain(|(end, _)| *end > from);
            for &(_, w) in &open {
                let ((a, b), (c, d)) = (at_plan(v), at_plan(w));
                if a < d && c < b {
                    continue;
                }
                let lived = |x: NodeId| plan.live[x.index()].unwrap_or((0, usize::MAX));
                // The later written one is placed among those live when its group starts.
                let (first, then) = if lived(v).0 <= lived(w).0 { (v, w) } else { (w, v) };
                let starts = plan.group_starts.get(lived(then).0).copied().unwrap_or(0);
                if lived(first).1 >= starts {
                    return Some((w, v));
                }
            }
            open.push((to, v));
        }
        None
    }
}

impl Plan {
    pub fn peak_bytes(&self) -> usize {
        self.arena_len * std::mem::size_of::<f32>()
    }

    /// Bytes of the block buffer each thread keeps for row groups.
    pub fn block_bytes(&self) -> usize {
        self.block_len * std::mem::size_of::<f32>()
    }

    /// Elements per row of the block buffer a row group's parts need
    /// (`Place::Block` values side by side); 0 when all are in the arena.
    pub fn block_row(&self, parts: &[Kernel]) -> usize {
        parts
            .iter()
            .map(|p| match self.places[p.output().index()] {
                Place::Block { column, row } => column + row,
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// The arena range or external name a value is read from, following
    /// views (a window's range is its own part of its source's).
    pub fn resolve(&self, n: NodeId) -> Place {
        let (mut at, mut skipped) = (n, None);
        loop {
            match &self.places[at.index()] {
                Place::Alias(of) | Place::Part(of) => at = *of,
                Place::Window { of, offset } => {
                    skipped = Some(skipped.unwrap_or(0) + offset);
                    at = *of;
                }
                Place::Arena { offset, .. } if let Some(skip) = skipped => {
                    return Place::Arena { offset: offset + skip, len: self.lens[n.index()] };
                }
                p => return p.clone(),
            }
        }
    }
}

pub fn plan(g: &Graph, s: &Schedule, sizes: &Sizes, blocks: Blocks, inputs: Inputs) -> Result<Plan, String> {
    plan_over(g, s, sizes, &[], blocks, inputs).map(|(plan, _)| plan)
}

/// Every node's length in elements at `sizes`.
fn lens_at(g: &Graph, sizes: &Sizes) -> Result<Vec<usize>, String> {
    (g.nodes.iter().enumerate())
        .map(|(i, node)| {
            let dims = node.ty.dims.iter().map(|d| eval_dim(d, sizes)).collect::<Result<Vec<usize>, String>>()?;
            dims.iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n as u64 <= crate::check::MAX_ELEMENTS as u64)
                .ok_or_else(|| format!("%{i} of shape {dims:?} is too large: a tensor holds at most 2^48 elements"))
        })
        .collect()
}

/// The plan at `sizes` (best fit there), placed so that the same stacking
/// (`Plan::below`) is also sound at each of `also`: one placement whose
/// peak is one formula in the symbolic sizes at all of them (`modelc
/// plan`). Returns the placement at each of `also` too. The schedule is
/// the one made at `sizes`; it must run at the others (chunk counts are
/// fixed at `sizes`, so those must not be smaller).
pub fn plan_over(
    g: &Graph,
    s: &Schedule,
    sizes: &Sizes,
    also: &[Sizes],
    blocks: Blocks,
    inputs: Inputs,
) -> Result<(Plan, Vec<Placement>), String> {
    let n = g.nodes.len();
    let lens = lens_at(g, sizes)?;
    let mut others: Vec<Placement> = (also.iter())
        .map(|sz| Ok(Placement { lens: lens_at(g, sz)?, offsets: vec![0; n], arena_len: 0 }))
        .collect::<Result<_, String>>()?;
    let mut places = vec![Place::None; n];
    let mut users = vec![0usize; n];
    for node in &g.nodes {
        node.args.iter().for_each(|a| users[a.index()] += 1);
    }
    for (i, node) in g.nodes.iter().enumerate() {
        if let Op::Input(name) | Op::Param(name) = &node.op {
            places[i] = Place::External(name.clone());
        }
        if inputs == Inputs::Writable
            && matches!(node.op, Op::WriteRows)
            && matches!(g.node(node.args[0]).op, Op::Input(_))
            && users[node.args[0].index()] == 1
        {
            places[i] = Place::Alias(node.args[0]);
        }
    }
    // Kernels in execution order, each with its time and its row group's:
    // the times the group starts and ends, and its row count. The parts of a
    // group run interleaved, block by block, so memory freed inside a group
    // is reused only after it.
    let mut steps: Vec<(&Kernel, Group)> = Vec::new();
    let mut groups = Vec::new();
    for kernel in &s.kernels {
        match kernel {
            Kernel::Rows(parts) => {
                let start = steps.len();
                let first = super::rows::row_value(g, &parts[0]).expect("bug: a group starts a row");
                let row_len = g.dims(first).last().map(|d| eval_dim(d, sizes)).transpose()?.unwrap_or(1);
                let group = Group { start, end: start + parts.len() - 1, rows: lens[first.index()] / row_len.max(1) };
                steps.extend(parts.iter().map(|p| (p, group)));
                groups.push((parts.as_slice(), group.rows, row_len));
            }
            k => steps.push((k, Group { start: steps.len(), end: steps.len(), rows: 0 })),
        }
    }
    // Outputs written where the caller keeps them: a whole fused kernel's
    // (not a row group's part, which writes block by block); later kernels
    // read them there (AdamW's new moments, read by the weight's update).
    if inputs == Inputs::Writable {
        for kernel in &s.kernels {
            let out = kernel.output();
            let named: Vec<&String> = g.outputs.iter().filter(|(_, o)| *o == out).map(|(name, _)| name).collect();
            if let ([name], Kernel::Fused { .. } | Kernel::FusedReduce { .. }) = (named.as_slice(), kernel)
                && places[out.index()] == Place::None
                && !s.placed.contains_key(&out)
            {
                places[out.index()] = Place::Output((*name).clone());
            }
        }
    }
    // Live ranges over times; a view extends its source's range.
    let storage = |mut k: NodeId, places: &[Place]| {
        while let Place::Alias(of) | Place::Window { of, .. } = places[k.index()] {
            k = of;
        }
        k
    };
    let mut def = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (time, (kernel, _)) in steps.iter().enumerate() {
        let out = kernel.output();
        if let Kernel::View(v) = kernel {
            let src = g.node(*v).args[0];
            places[v.index()] = match &g.node(*v).op {
                Op::Slice { axis, start, .. } => {
                    let inner =
                        g.dims(src)[axis + 1..].iter().map(|d| eval_dim(d, sizes)).product::<Result<usize, _>>()?;
                    Place::Window { of: src, offset: eval_dim(start, sizes)? * inner }
                }
                _ => Place::Alias(src),
            };
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
    let mut written: Vec<String> = (g.nodes.iter().enumerate())
        .filter(|(i, node)| matches!(node.op, Op::WriteRows) && places[*i] == Place::Alias(node.args[0]))
        .filter_map(|(_, node)| match &g.node(node.args[0]).op {
            Op::Input(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    if inputs == Inputs::Writable {
        written.extend(write_over_replaced(g, &steps, &lens, &mut places, &mut last));
    }
    // A group's value that an elementwise part writing to the arena would
    // write over in place (below) stays in the arena: softmax's exp(x - max)
    // is then written where the output goes, and the division by the sum
    // writes over it in cache. (In a block buffer, the output's first
    // writes came in a pass of their own: softmax 3.7 -> 4.4 ms.) Found
    // from the group's end, so that chains of such values stay too.
    let mut in_arena_chain = vec![false; n];
    for (time, (kernel, group)) in steps.iter().enumerate().rev() {
        let out = kernel.output();
        let Kernel::Fused { inputs, .. } = kernel else { continue };
        if group.rows == 0
            || s.placed.contains_key(&out)
            || (last[out.index()] <= group.end && !in_arena_chain[out.index()])
        {
            continue;
        }
        for inp in inputs {
            let st = storage(*inp, &places);
            if def[st.index()] != usize::MAX
                && def[st.index()] >= group.start
                && lens[st.index()] == lens[out.index()]
                && lens[inp.index()] == lens[out.index()]
                && last[st.index()] == time
            {
                in_arena_chain[st.index()] = true;
                break;
            }
        }
    }
    // First-fit allocation in execution order; a group's buffered values
    // first-fit in its block buffer's columns.
    let mut live: Vec<(usize, usize, usize, NodeId)> = Vec::new(); // (offset, len, last use, value)
    let mut columns: Vec<(usize, usize, usize, NodeId)> = Vec::new(); // the same, in the block buffer
    let mut below = vec![Below::Start; n];
    let mut arena_len = 0;
    for (time, (kernel, group)) in steps.iter().enumerate() {
        let start = &group.start;
        if time == group.start {
            columns.clear();
        }
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
        if matches!(places[out.index()], Place::Arena { .. } | Place::Alias(_) | Place::Output(_)) {
            continue;
        }
        let len = lens[out.index()];
        // In place: the first input of an elementwise kernel (or the base of
        // a scatter-add onto one, which reads each element only where it
        // writes it) that dies here, of the output's length, whose memory
        // `reuse` accepts (its offset or column).
        let dying_input = |kernel: &Kernel, places: &[Place], reuse: &dyn Fn(&Place, NodeId) -> Option<usize>| {
            let inputs = match kernel {
                Kernel::Fused { inputs, .. } => inputs.as_slice(),
                Kernel::Single(n) if matches!(g.node(*n).op, Op::ScatterAdd) => &g.node(*n).args[2..],
                _ => return None,
            };
            inputs.iter().find_map(|inp| {
                let st = storage(*inp, places);
                let same_len = |lens: &[usize]| lens[inp.index()] == lens[out.index()];
                (last[st.index()] == time && same_len(&lens) && others.iter().all(|p| same_len(&p.lens)))
                    .then(|| reuse(&places[st.index()], st))
                    .flatten()
            })
        };
        // Values of one element a row stay in the arena: they are small, and
        // softmax was 5-8% slower with its row maxima and sums in the buffer.
        if blocks == Blocks::Buffered
            && group.rows > 0
            && placed.is_none()
            && last[out.index()] <= group.end
            && !in_arena_chain[out.index()]
            && len > group.rows
        {
            // Only the group reads it: a block buffer's columns, over a dying
            // input's when elementwise (as in the arena below).
            let row = len / group.rows;
            let chosen = dying_input(kernel, &places, &|place: &Place, _| match *place {
                Place::Block { column, row: r } if r == row => Some(column),
                _ => None,
            });
            if let Some(column) = chosen {
                columns.retain(|(c, _, _, _)| *c != column);
            }
            // Parts run one after the other within a block: a column is free once its last reader has run.
            columns.retain(|(_, _, end, _)| *end >= time);
            let column = chosen.unwrap_or_else(|| {
                columns.sort();
                fit(&columns, row, 0, &|_| true).0
            });
            columns.push((column, row, last[out.index()], out));
            places[out.index()] = Place::Block { column, row };
            continue;
        }
        // In place: an elementwise kernel may write over a same-sized input
        // that dies here. Inside a row group, only over a value of the group:
        // those are read row by row, so no earlier part needs the rows written.
        let chosen = dying_input(kernel, &places, &|place: &Place, st: NodeId| match *place {
            Place::Arena { offset, len: l }
                if l == len
                    && (time == *start || def[st.index()] >= *start)
                    && others.iter().all(|p| p.lens[st.index()] == p.lens[out.index()]) =>
            {
                Some(offset)
            }
            _ => None,
        })
        .filter(|_| placed.is_none());
        if let Some(offset) = chosen {
            let over = live.iter().find(|(o, _, _, _)| *o == offset).map(|l| l.3);
            below[out.index()] = over.map_or(Below::Start, Below::Over);
            live.retain(|(o, _, _, _)| *o != offset);
        }
        live.retain(|(_, _, end, _)| *end >= *start);
        let offset = match chosen {
            Some(offset) => offset,
            None => {
                live.sort();
                let (offset, on) = fit(&live, len, arena_len, &|b| sound(&others, &live, out, b));
                below[out.index()] = on;
                offset
            }
        };
        for p in &mut others {
            p.offsets[out.index()] = p.base(&below[out.index()]);
            p.arena_len = p.arena_len.max(p.end(out));
        }
        live.push((offset, len, last[out.index()], out));
        arena_len = arena_len.max(offset + len);
        places[out.index()] = Place::Arena { offset, len };
    }
    let end = steps.len().saturating_sub(1);
    let live = def.iter().zip(&last).map(|(d, l)| (*d != usize::MAX).then(|| (*d, (*l).min(end)))).collect();
    let group_starts = steps.iter().map(|(_, group)| group.start).collect();
    let mut plan = Plan { places, arena_len, lens, block_len: 0, live, group_starts, below, written };
    for (parts, rows, len) in groups {
        plan.block_len = plan.block_len.max(super::rows::block_rows(g, parts, rows, len) * plan.block_row(parts));
    }
    Ok((plan, others))
}

/// Whether `out` placed on `on` overlaps none of the `live` values at any
/// of the other sizes.
fn sound(others: &[Placement], live: &[(usize, usize, usize, NodeId)], out: NodeId, on: &Below) -> bool {
    others.iter().all(|p| {
        let (from, to) = (p.base(on), p.base(on) + p.lens[out.index()]);
        from == to || live.iter().all(|(_, _, _, v)| p.end(*v) <= from || to <= p.offsets[v.index()])
    })
}

/// Places each output that replaces an input (`Role::replaces`: a training
/// step's new weight or optimiser state) over that input, where the fused
/// kernel making it (alone or as a row group's part) and the group's parts
/// before it read the input only at the elements they write, and no later
/// kernel reads it: the caller then keeps one copy of the training state
/// instead of two. Returns the inputs written so.
fn write_over_replaced(
    g: &Graph,
    steps: &[(&Kernel, Group)],
    lens: &[usize],
    places: &mut [Place],
    last: &mut [usize],
) -> Vec<String> {
    let inputs: std::collections::HashMap<&str, NodeId> = (g.nodes.iter().enumerate())
        .filter_map(|(i, n)| match &n.op {
            Op::Input(name) | Op::Param(name) => Some((name.as_str(), NodeId(i as u32))),
            _ => None,
        })
        .collect();
    let mut written = Vec::new();
    for (time, (kernel, group)) in steps.iter().enumerate() {
        let Kernel::Fused { .. } = kernel else { continue };
        let out = kernel.output();
        let named: Vec<&String> = g.outputs.iter().filter(|(_, o)| *o == out).map(|(name, _)| name).collect();
        let [name] = named.as_slice() else { continue };
        let Some(&input) = Role::of(name).replaces().and_then(|r| inputs.get(r.as_str())) else { continue };
        let views_of_input = |n: &NodeId| {
            let mut at = *n;
            while let Place::Alias(of) | Place::Window { of, .. } = places[at.index()] {
                at = of;
            }
            at == input
        };
        // A row group runs its parts block of rows by block: the parts up to
        // this one may read the input only at the rows of the block (fused,
        // elementwise over its shape), which are written after they read them.
        let elementwise = steps[group.start..=time].iter().all(|(k, _)| match k {
            Kernel::Fused { inputs: reads, .. } => {
                reads.iter().filter(|r| views_of_input(r)).all(|r| lens[r.index()] == lens[out.index()])
            }
            k => !k.reads(g).iter().any(views_of_input),
        });
        if lens[input.index()] == lens[out.index()]
            && elementwise
            && last[input.index()] <= time
            && matches!(places[out.index()], Place::Output(_) | Place::None)
        {
            places[out.index()] = Place::Alias(input);
            last[input.index()] = last[input.index()].max(last[out.index()]);
            written.push(name_of(g, input));
        }
    }
    written
}

fn name_of(g: &Graph, n: NodeId) -> String {
    match &g.node(n).op {
        Op::Input(name) | Op::Param(name) => name.clone(),
        _ => unreachable!("bug: {n} is not an input"),
    }
}

/// A kernel's row group (a kernel of its own is a group of one, `rows` 0).
#[derive(Clone, Copy)]
struct Group {
    start: usize,
    end: usize,
    rows: usize,
}

/// Where `len` elements go among the `live` ranges (sorted), in an arena
/// of `size` so far, and what they go on: the start of the smallest gap
/// they fit in (best fit, the space after the last range up to `size`
/// counting as a gap), else past the last range (as for a gap far larger
/// than the value). First fit put a row's loss in the gap a freed
/// logit-sized tensor left, and the logits' gradient then went above
/// everything. Only places `sound` accepts are taken; past every live
/// value is sound at any size.
fn fit(
    live: &[(usize, usize, usize, NodeId)],
    len: usize,
    size: usize,
    sound: &dyn Fn(&Below) -> bool,
) -> (usize, Below) {
    let mut gaps: Vec<(usize, usize, Below)> = Vec::new(); // (gap size, offset, what it is on)
    let mut top = (0, Below::Start);
    for (o, l, _, id) in live {
        if *o >= top.0 + len {
            gaps.push((o - top.0, top.0, top.1.clone()));
        }
        if o + l > top.0 {
            top = (o + l, Below::Above(*id));
        }
    }
    if size >= top.0 + len {
        gaps.push((size - top.0, top.0, top.1.clone()));
    }
    gaps.sort_by_key(|(gap, _, _)| *gap);
    match gaps.into_iter().find(|(_, _, on)| sound(on)) {
        // A value in a hole more than SPLITS times its size, below the top,
        // goes on top instead: the hole stays whole for a value of its size
        // (GPT-2's training step at 4 x 128 planned 876 MB, now 725 MB).
        Some((gap, offset, _)) if gap > SPLITS * len && offset != top.0 && sound(&top.1) => top,
        Some((_, offset, on)) => (offset, on),
        None if sound(&top.1) => top,
        None => (top.0, Below::AboveAll(live.iter().map(|l| l.3).collect())),
    }
}

/// How many times a value's size a hole must be for the value to go on
/// top rather than split it.
const SPLITS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the value on top at the planned sizes is not on top at
    /// another, the only sound place is above all the live values.
    #[test]
    fn a_value_goes_above_all_where_no_one_value_is_on_top_at_every_size() {
        let (a, b, out) = (NodeId(0), NodeId(1), NodeId(2));
        // Planned: a at 0..10, b at 10..20. Elsewhere: b at 0..30, a at 30..50.
        let live = [(0, 10, 9, a), (10, 10, 9, b)];
        let other = Placement { lens: vec![20, 30, 5], offsets: vec![30, 0, 0], arena_len: 50 };
        let others = [other];
        let (offset, on) = fit(&live, 5, 20, &|on| sound(&others, &live, out, on));
        assert_eq!((offset, &on), (20, &Below::AboveAll(vec![a, b])));
        assert_eq!(others[0].base(&on), 50);
        assert!(!sound(&others, &live, out, &Below::Above(b)), "b's end is inside a there");
        // With no other sizes, right above the top.
        assert_eq!(fit(&live, 5, 20, &|on| sound(&[], &live, out, on)), (20, Below::Above(b)));
    }
}
