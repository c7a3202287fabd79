//! Row groups (`backend::rows`) run: a block of rows through every part
//! in turn, in the running thread's cache, blocks side by side on the
//! threads; or, where the parts are fused loops over one shape reading each
//! other only element by element (AdamW's), as one fused loop.

use super::given::Given;
use super::{Compiled, Packed, Pending, Program, SendPtr, kernels, packed, tiles};
use modelc::backend::clif::{Jit, KernelFn};
use modelc::backend::kernel::Kernel;
use modelc::backend::plan::{Place, Plan};
use modelc::ir::graph::{Graph, NodeId, Op};
use modelc::types::Sizes;
use rayon::prelude::*;
use std::sync::Mutex;

impl Program {
    /// A row group: each block of rows through every part in turn, blocks in
    /// parallel. Values only the group reads live in the running thread's
    /// block buffer (`Place::Block`), the rest in the arena.
    pub(super) fn rows(
        &self,
        parts: &[Kernel],
        compiled: &[Compiled],
        rows: usize,
        len: usize,
        arena: &mut [f32],
        feeds: &Given,
    ) -> Option<Vec<f64>> {
        let part_seconds = self.profile_id.map(|_| Mutex::new(vec![0.0; parts.len()]));
        let blocks = self.row_blocks(parts, compiled, (rows, len), arena.as_mut_ptr(), feeds, part_seconds.as_ref());
        if blocks.count == 1 {
            (blocks.run)(0);
        } else {
            (0..blocks.count).into_par_iter().for_each(&blocks.run);
        }
        drop(blocks);
        part_seconds.map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// A row group's blocks, each to run once, in any order and side by
    /// side (by `rows`, or by `batch` with other kernels' tasks); with
    /// `part_seconds`, each adds the seconds of its parts there.
    pub(super) fn row_blocks<'a, 'f: 'a>(
        &'a self,
        parts: &[Kernel],
        compiled: &[Compiled],
        (rows, len): (usize, usize),
        base: *mut f32,
        feeds: &'a Given<'f>,
        part_seconds: Option<&'a Mutex<Vec<f64>>>,
    ) -> RowBlocks<impl Fn(usize) + Sync + 'a> {
        enum Part<'f> {
            /// A fused kernel: its output's then its inputs' locations, as it takes them.
            Jit { f: KernelFn, locs: Vec<Loc>, per_row: usize },
            /// Each row of `src` (`len` long) folded into a value of `out`.
            Reduce { op: modelc::ir::graph::Reduce, src: Loc, out: Loc, len: usize },
            /// `out = a b` for a block of rows: a's rows (`k` long) against
            /// all of `b` (`k x n`, or `n x k` with `tb`); on gemm's own
            /// threads when the group runs as one block.
            Product {
                a: Loc,
                b: SendPtr,
                packed: Option<&'f Packed>,
                /// `b` packed once for every block (`Program::tiles`).
                tiles: Option<std::sync::Arc<tiles::PackedB>>,
                out: Loc,
                k: usize,
                n: usize,
                tb: bool,
                parallel: bool,
            },
        }
        let block_rows = modelc::backend::rows::block_rows(&self.graph, parts, rows, len);
        let one_block = block_rows == rows;
        let buffer_len = block_rows * self.plan.block_row(parts);
        let loc = |n: NodeId| match self.plan.resolve(n) {
            Place::Block { column, row } => Loc::Block { start: column * block_rows, row },
            _ => Loc::At(SendPtr(self.pointer(n, base, feeds))),
        };
        let runnable: Vec<(usize, Part<'f>)> = parts
            .iter()
            .zip(compiled)
            .enumerate()
            .filter_map(|(i, (kernel, c))| {
                match (kernel, c) {
                    (_, Compiled::Fused { f, inputs, .. }) => {
                        let out = kernel.output();
                        let per_row = self.plan.lens[out.index()] / rows.max(1);
                        Some(Part::Jit {
                            f: *f,
                            locs: std::iter::once(out).chain(inputs.iter().copied()).map(loc).collect(),
                            per_row,
                        })
                    }
                    (Kernel::Single(n), _) if modelc::backend::rows::row_product(&self.graph, *n) => {
                        let node = self.graph.node(*n);
                        let Op::MatMul { tb, .. } = node.op else { unreachable!() };
                        let (a, b) = (node.args[0], node.args[1]);
                        let (k, columns) =
                            (self.plan.lens[a.index()] / rows.max(1), self.plan.lens[n.index()] / rows.max(1));
                        let (b, packed) = (self.pointer(b, base, feeds), self.packed(*n, feeds));
                        let b_strides = if tb { (1, k) } else { (columns, 1) };
                        // bf16: the weight packed once for all the group's blocks of
                        // rows. f32 packs it block by block into the thread's buffers
                        // (a 37 MB output layer packed afresh for each of 8 row chunks
                        // took 12 ms more each than that), unless it is fixed.
                        let prepacked = match packed {
                            None => (self.tiles)
                                .filter(|kind| *kind != tiles::Kind::F32 || self.fixed_weights.is_some())
                                // SAFETY: b is k x columns at these strides.
                                .map(|kind| unsafe {
                                    self.packed_rhs(*n, (b, b_strides.0, b_strides.1), k, columns, kind)
                                }),
                            Some(w) if rows > packed::SMALL_M => self.fixed_tiles(*n, w),
                            Some(_) => None,
                        };
                        Some(Part::Product {
                            a: loc(a),
                            b: SendPtr(b),
                            packed,
                            tiles: prepacked,
                            out: loc(*n),
                            k,
                            n: columns,
                            tb,
                            // As a product of its own (`single`).
                            parallel: one_block && packed::worth_threads(rows, columns, k),
                        })
                    }
                    (Kernel::Single(n), _) => {
                        let Op::Reduce(op, _) = self.graph.node(*n).op else {
                            unreachable!("bug: a row group's single kernel is a reduction or a product")
                        };
                        let src = self.graph.node(*n).args[0];
                        Some(Part::Reduce {
                            op,
                            src: loc(src),
                            out: loc(*n),
                            len: self.plan.lens[src.index()] / rows.max(1),
                        })
                    }
                    _ => None,
                }
                .map(|p| (i, p))
            })
            .collect();
        // The first value from before the group that a fused part reads
        // whole rows of: prefetched for the next block (`vmath::read_ahead`).
        let members: Vec<NodeId> = parts.iter().map(Kernel::output).collect();
        let streamed = compiled.iter().find_map(|c| match c {
            Compiled::Fused { inputs, .. } => inputs
                .iter()
                .find(|i| {
                    !members.contains(i)
                        && self.plan.lens[i.index()] == rows * len
                        && !matches!(self.plan.resolve(**i), Place::Block { .. })
                })
                .map(|i| SendPtr(self.pointer(*i, base, feeds))),
            _ => None,
        });
        let parts_count = parts.len();
        let block = move |r0: usize, r1: usize| {
            if let Some(p) = streamed {
                let end = (2 * r1 - r0).min(rows);
                // SAFETY: rows r1..end of a value of `rows` rows of `len`.
                let next = unsafe { std::slice::from_raw_parts(p.get().add(r1 * len), (end - r1) * len) };
                modelc::backend::vmath::read_ahead((r1 < end).then_some(next));
            }
            // The thread's buffers, taken (not borrowed) for the block: gemm's
            // threads may run another group's block on this thread meanwhile.
            let mut buffer = BLOCK_BUFFER.take();
            if buffer.len() < buffer_len {
                buffer.resize(buffer_len, 0.0);
            }
            let mut ptrs = BLOCK_POINTERS.take();
            let data = buffer.as_mut_ptr();
            let at = |l: &Loc| l.at(data, r0);
            let mut seconds = part_seconds.map(|_| vec![0.0; parts_count]);
            for (i, part) in &runnable {
                let started = seconds.as_ref().map(|_| std::time::Instant::now());
                match part {
                    Part::Jit { f, locs, per_row } => {
                        ptrs.clear();
                        ptrs.extend(locs.iter().map(&at));
                        // SAFETY: the part writes rows r0..r1 of its output and reads rows the
                        // parts before it wrote for this block, or values complete before the group.
                        unsafe { f(ptrs.as_ptr(), (r0 * per_row) as i64, (r1 * per_row) as i64) }
                    }
                    Part::Product { a, tiles: Some(w), out, k, parallel, .. } => {
                        let (k, m) = (*k, r1 - r0);
                        // SAFETY: rows r0..r1 of a (k each) and of the output (n each).
                        unsafe {
                            tiles::product_packed(
                                m,
                                at(out).add(r0 * w.n()),
                                w.n(),
                                0.0,
                                (at(a).add(r0 * k), k, 1),
                                w,
                                *parallel,
                            )
                        }
                    }
                    Part::Product { a, b, packed, out, k, n, tb, parallel, .. } => {
                        let (k, n, m) = (*k, *n, r1 - r0);
                        let b_strides = if *tb { (1, k) } else { (n, 1) };
                        let rhs = match packed {
                            Some(w) => packed::Rhs::Packed(w),
                            None => packed::Rhs::Dense((b.get(), b_strides.0, b_strides.1)),
                        };
                        // SAFETY: rows r0..r1 of a (k each) and of the output (n each), all of b.
                        unsafe {
                            packed::product(
                                (m, n, k),
                                at(out).add(r0 * n),
                                n,
                                0.0,
                                (at(a).add(r0 * k), k, 1),
                                rhs,
                                *parallel,
                                self.tiles,
                            )
                        }
                    }
                    Part::Reduce { op, src, out, len } => {
                        let (len, src, out) = (*len, at(src), at(out));
                        for r in r0..r1 {
                            // SAFETY: row r of the source and slot r of the output are planned memory.
                            unsafe {
                                let row = std::slice::from_raw_parts(src.add(r * len), len);
                                *out.add(r) = kernels::fold_row(*op, row);
                            }
                        }
                    }
                }
                if let (Some(s), Some(t)) = (seconds.as_mut(), started) {
                    s[*i] += t.elapsed().as_secs_f64();
                }
            }
            if let (Some(total), Some(s)) = (part_seconds, seconds) {
                let mut total = total.lock().unwrap_or_else(|e| e.into_inner());
                total.iter_mut().zip(s).for_each(|(t, s)| *t += s);
            }
            BLOCK_POINTERS.set(ptrs);
            BLOCK_BUFFER.set(buffer);
            modelc::backend::vmath::read_ahead(None);
        };
        RowBlocks {
            count: rows.div_ceil(block_rows).max(1),
            run: move |b: usize| block(b * block_rows, ((b + 1) * block_rows).min(rows)),
        }
    }
}

impl Pending {
    /// A row group as one loop (`rows::one_loop`), where every value it
    /// stores lies whole in memory of its own.
    pub(super) fn one_loop(
        graph: &Graph,
        parts: &[Kernel],
        sizes: &Sizes,
        plan: &Plan,
        jit: &mut Jit,
        clif: &mut Vec<String>,
    ) -> Result<Option<Pending>, String> {
        let Some((nodes, inputs)) = modelc::backend::rows::one_loop(graph, parts) else { return Ok(None) };
        // Memory of its own, or the input it is written over (`Place::Alias`).
        let whole = |n: NodeId| {
            !matches!(plan.places[n.index()], Place::Part(_))
                && matches!(plan.resolve(n), Place::Arena { .. } | Place::External(_) | Place::Output(_))
        };
        let mut stores = Vec::new();
        for part in &parts[..parts.len() - 1] {
            match plan.places[part.output().index()] {
                Place::Block { .. } | Place::None => {}
                _ if whole(part.output()) => stores.push(part.output()),
                _ => return Ok(None),
            }
        }
        if !whole(parts[parts.len() - 1].output()) {
            return Ok(None);
        }
        let mut spec = modelc::backend::access::spec(graph, &nodes, &inputs, sizes, plan)?;
        if spec.row_len().is_some() || jit.calls_wide(&spec) {
            return Ok(None);
        }
        spec.stores = &stores;
        let (id, text) = jit.compile(&spec)?;
        clif.push(text);
        Ok(Some(Pending::Fused(id, inputs, 1, stores)))
    }
}

/// The blocks of a row group (`Program::row_blocks`): `run(b)` computes block `b` of `count`.
pub(super) struct RowBlocks<F> {
    pub count: usize,
    pub run: F,
}

thread_local! {
    /// Each thread's block buffer for row groups (`Place::Block` values),
    /// and the pointers it passes a part: kept between blocks and runs.
    static BLOCK_BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static BLOCK_POINTERS: std::cell::Cell<Vec<*mut f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where a row group's part finds a value: memory of its own (the arena, an
/// input), or `start` elements into the thread's block buffer with rows of
/// `row` elements (a `Place::Block` value).
#[derive(Clone, Copy)]
enum Loc {
    At(SendPtr),
    Block { start: usize, row: usize },
}

impl Loc {
    /// The value's address for block r0..: element `r * row + j` of a block
    /// value is the buffer's element `start + (r - r0) * row + j`, so kernels
    /// index it as they index a whole tensor. (Wrapping: the address of
    /// element 0 is outside the buffer, and only rows r0.. are read.)
    fn at(&self, buffer: *mut f32, r0: usize) -> *mut f32 {
        match self {
            Loc::At(p) => p.0,
            Loc::Block { start, row } => buffer.wrapping_add(*start).wrapping_sub(r0 * row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Tensor;
    use modelc::ir::interp::{Array, Precision};
    use modelc::ir::train::{TrainConfig, update_program};
    use modelc::types::{DType, Dim, TensorTy};
    use std::collections::HashMap;

    /// AdamW's update of a parameter is a row group of three fused parts (its
    /// moments, then the weight; the first parameter's with the clip's
    /// coefficients between them, computed before) run as one loop that
    /// stores all three over the old ones; the values are the interpreter's.
    #[test]
    fn adamw_row_groups_run_as_one_loop_and_match_the_interpreter() {
        let ty = |dims: &[i64]| TensorTy::new(DType::F32, dims.iter().map(|d| Dim::constant(*d)).collect());
        let params = [("w".to_string(), ty(&[96, 64])), ("b".to_string(), ty(&[64]))];
        let cfg = TrainConfig { clip: Some(1.0), ..Default::default() };
        let g = modelc::opt::optimized(&update_program(&params, &cfg));
        let mut arrays: HashMap<String, Array> = HashMap::new();
        for (i, (name, shape)) in [("w", vec![96, 64]), ("b", vec![64])].into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let values = |salt: usize, scale: f64| -> Vec<f64> {
                (0..n).map(|j| (((j * 7919 + i * 104729 + salt) % 1000) as f64 / 1000.0 - 0.5) * scale).collect()
            };
            arrays.insert(name.into(), Array::new(shape.clone(), values(1, 0.1)));
            arrays.insert(format!("grad:{name}"), Array::new(shape.clone(), values(2, 1e-2)));
            arrays.insert(format!("m:{name}"), Array::new(shape.clone(), values(3, 1e-3)));
            let v = values(4, 1e-4).iter().map(|x| x.abs()).collect();
            arrays.insert(format!("v:{name}"), Array::new(shape.clone(), v));
        }
        arrays.insert("lr".into(), Array::scalar(1e-3));
        arrays.insert("step".into(), Array::scalar(3.0));
        let program = Program::compile(&g, &Sizes::new()).unwrap();
        let one_loops = (program.schedule.kernels.iter().zip(&program.kernels))
            .filter(|(k, c)| matches!((k, c), (Kernel::Rows(_), Compiled::Fused { stores, .. }) if stores.len() == 2))
            .count();
        assert_eq!(one_loops, 2, "each parameter's update runs as one loop");
        let feeds: HashMap<String, Tensor> = (arrays.iter())
            .map(|(k, a)| (k.clone(), Tensor::new(a.shape.clone(), a.data.iter().map(|v| *v as f32).collect())))
            .collect();
        let got = program.run(&feeds).unwrap();
        let want = modelc::ir::interp::run(&g, &arrays, Precision::F32).unwrap();
        for (name, want) in &want {
            let got = &got[name].data;
            let worst =
                (want.data.iter().zip(got)).map(|(w, g)| (w - *g as f64).abs() / w.abs().max(1e-3)).fold(0.0, f64::max);
            assert!(worst < 1e-5, "`{name}` is {worst} off the interpreter's");
        }
    }
}
