//! What a program's run is given besides its arena: the caller's inputs and
//! weights, the inputs handed over to be written in place (state, a
//! key/value cache among them, possibly kept as f16), and the buffers of
//! outputs kernels write straight into.

use super::{SendPtr, Tensor};
use modelc::ir::graph::{Graph, NodeId, Op};
use std::collections::HashMap;

/// What a run reads besides its arena: the caller's inputs and weights,
/// and the inputs handed over to be written in place (`Program::run_state`).
pub(super) struct Given<'a> {
    pub(super) feeds: &'a HashMap<String, Tensor>,
    /// Each state input's values (borrowed mutably for the run) and shape.
    pub(super) state: HashMap<&'a str, (SendPtr, usize, &'a [usize])>,
    /// State inputs kept as f16 (`Tensor::halves`): their bits (the
    /// pointer cast) and length.
    pub(super) halves: HashMap<&'a str, (SendPtr, usize)>,
    /// The caller's buffers of the outputs kernels write straight into
    /// (`Place::Output`), by output name: their values and lengths.
    pub(super) outputs: HashMap<String, (SendPtr, usize)>,
}

impl<'a> Given<'a> {
    pub(super) fn new(feeds: &'a HashMap<String, Tensor>, state: Option<&'a mut HashMap<String, Tensor>>) -> Given<'a> {
        let (mut f32s, mut halves) = (HashMap::new(), HashMap::new());
        for (k, t) in state.into_iter().flat_map(|s| s.iter_mut()) {
            if t.is_half() {
                halves.insert(k.as_str(), (SendPtr(t.halves.as_mut_ptr().cast()), t.halves.len()));
            }
            f32s.insert(k.as_str(), (SendPtr(t.data.as_mut_ptr()), t.data.len(), t.shape.as_slice()));
        }
        Given { feeds, state: f32s, halves, outputs: HashMap::new() }
    }

    /// A state input kept as f16: its bits, borrowed for the run.
    pub(super) fn halves(&self, name: &str) -> Option<(*mut u16, usize)> {
        self.halves.get(name).map(|(p, len)| (p.0.cast(), *len))
    }

    /// Where an output written in place goes (`Place::Output`).
    pub(super) fn output(&self, name: &str) -> (*mut f32, usize) {
        let (p, len) = self.outputs[name];
        (p.0, len)
    }

    pub(super) fn shape(&self, name: &str) -> Option<&'a [usize]> {
        match self.state.get(name) {
            Some((_, _, shape)) => Some(shape),
            None => self.feeds.get(name).map(|t| t.shape.as_slice()),
        }
    }

    /// Where an input's values are; kernels write only through state inputs'.
    pub(super) fn pointer(&self, name: &str) -> *mut f32 {
        match self.state.get(name) {
            Some((p, _, _)) => p.0,
            None => self.feeds[name].data.as_ptr() as *mut f32,
        }
    }

    pub(super) fn values(&self, name: &str) -> &[f32] {
        match self.state.get(name) {
            // SAFETY: the state tensor is borrowed for the run; no kernel writes it while this is read.
            Some((p, len, _)) => unsafe { std::slice::from_raw_parts(p.0, *len) },
            None => &self.feeds[name].data,
        }
    }
}

/// Whether input `name` is only a key/value cache: rows written into it
/// (`Op::WriteRows`) that only attention reads, as keys or values. Such an
/// input may be kept as f16 (`Tensor::halves`): no other kernel reads it.
pub(super) fn only_cached(g: &Graph, name: &str) -> bool {
    let users = |n: NodeId| g.nodes.iter().enumerate().filter(move |(_, u)| u.args.contains(&n));
    let Some(input) = g.nodes.iter().position(|n| matches!(&n.op, Op::Input(i) if i == name)) else {
        return false;
    };
    let input = NodeId(input as u32);
    users(input).all(|(w, write)| {
        let w = NodeId(w as u32);
        matches!(write.op, Op::WriteRows)
            && write.args[1..].iter().all(|a| *a != input)
            && !g.outputs.iter().any(|(_, o)| *o == w)
            && users(w)
                .all(|(_, u)| matches!(u.op, Op::Attention(_)) && u.args[0] != w && u.args[3..].iter().all(|a| *a != w))
    })
}
