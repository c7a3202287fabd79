//! Native f32 kernels for the operations that are not fused or contractions:
//! one strided-copy routine serves permute, broadcast and slice; concat,
//! reductions, gather and iota have loops of their own.

use modelc::ir::graph::Reduce;
use modelc::types::strides;
use rayon::prelude::*;

/// Elements per parallel task: outputs of two tasks or more are split over
/// the thread pool, by rows (fused kernels too).
pub const PARALLEL: usize = 1 << 16;

/// Rows of `inner` elements per parallel task: about `PARALLEL` elements.
fn rows_per_task(inner: usize) -> usize {
    (PARALLEL / inner.max(1)).max(1)
}

/// Copies `out_shape` elements from `src`, element `idx` read at
/// `base + sum(idx[d] * eff[d])`. The innermost axis runs as a tight loop;
/// large copies split their rows over the thread pool.
pub fn strided_copy(src: &[f32], base: usize, eff: &[usize], out_shape: &[usize], out: &mut [f32]) {
    let rank = out_shape.len();
    if out.is_empty() {
        return;
    }
    if rank == 0 {
        out[0] = src[base];
        return;
    }
    let inner = out_shape[rank - 1].max(1);
    if out.len() >= 2 * PARALLEL {
        let rows = rows_per_task(inner);
        out.par_chunks_mut(rows * inner).enumerate().for_each(|(c, chunk)| {
            copy_rows(src, base, eff, out_shape, c * rows, chunk);
        });
    } else {
        copy_rows(src, base, eff, out_shape, 0, out);
    }
}

/// The rows of a strided copy from row `first` on, filling `out`.
fn copy_rows(src: &[f32], base: usize, eff: &[usize], out_shape: &[usize], first: usize, out: &mut [f32]) {
    let rank = out_shape.len();
    let inner = out_shape[rank - 1];
    let inner_stride = eff[rank - 1];
    let outer = out.len() / inner.max(1);
    // The index of row `first` and its source offset.
    let mut idx = vec![0usize; rank - 1];
    let mut rest = first;
    let mut offset = base;
    for d in (0..rank - 1).rev() {
        idx[d] = rest % out_shape[d];
        rest /= out_shape[d];
        offset += idx[d] * eff[d];
    }
    for o in 0..outer {
        let dst = &mut out[o * inner..(o + 1) * inner];
        if inner_stride == 1 {
            dst.copy_from_slice(&src[offset..offset + inner]);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = src[offset + j * inner_stride];
            }
        }
        // Advance the outer index, updating the source offset incrementally.
        for d in (0..rank - 1).rev() {
            idx[d] += 1;
            offset += eff[d];
            if idx[d] < out_shape[d] {
                break;
            }
            offset -= eff[d] * out_shape[d];
            idx[d] = 0;
        }
    }
}

pub fn permute(src: &[f32], in_shape: &[usize], perm: &[usize], out: &mut [f32]) {
    let s = strides(in_shape);
    let eff: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
    let out_shape: Vec<usize> = perm.iter().map(|p| in_shape[*p]).collect();
    strided_copy(src, 0, &eff, &out_shape, out);
}

pub fn broadcast(src: &[f32], in_shape: &[usize], out_shape: &[usize], out: &mut [f32]) {
    let off = out_shape.len() - in_shape.len();
    let s = strides(in_shape);
    let eff: Vec<usize> =
        (0..out_shape.len()).map(|d| if d < off || in_shape[d - off] == 1 { 0 } else { s[d - off] }).collect();
    strided_copy(src, 0, &eff, out_shape, out);
}

pub fn slice(src: &[f32], in_shape: &[usize], axis: usize, start: usize, out_shape: &[usize], out: &mut [f32]) {
    let s = strides(in_shape);
    strided_copy(src, start * s[axis], &s, out_shape, out);
}

/// Copies each part into its place along `axis`; a part given as `None` is
/// already there (its kernel wrote it in place).
pub fn concat(parts: &[(Option<&[f32]>, &[usize])], axis: usize, out_shape: &[usize], out: &mut [f32]) {
    let outer: usize = out_shape[..axis].iter().product();
    let inner: usize = out_shape[axis + 1..].iter().product();
    let parallel = out.len() >= 1 << 18;
    // Each part's chunk of each outer row, cut into pieces of at most PIECE
    // floats, in output order: disjoint slices of `out`, copied in parallel
    // when large (the gradient of the LM loss's sliced logits is a 262 MB
    // concat) and on this thread when small (RoPE's rotate-half while
    // decoding: a few dozen floats a piece, less than waking a thread).
    const PIECE: usize = 1 << 16;
    let mut pieces: Vec<(&mut [f32], &[f32])> = Vec::new();
    let mut rest = out;
    for o in 0..outer {
        for (src, shape) in parts {
            let chunk = shape[axis] * inner;
            let Some(src) = src else {
                // In place already: step over its span of this outer row.
                rest = &mut std::mem::take(&mut rest)[chunk..];
                continue;
            };
            let mut from = &src[o * chunk..(o + 1) * chunk];
            while !from.is_empty() {
                let n = from.len().min(PIECE);
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n);
                pieces.push((dst, &from[..n]));
                from = &from[n..];
                rest = tail;
            }
        }
    }
    if parallel {
        pieces.into_par_iter().for_each(|(d, s)| d.copy_from_slice(s));
    } else {
        pieces.into_iter().for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// A matrix operand in memory: (first element, row stride, column stride).
pub type Operand = (*const f32, usize, usize);

/// `c = alpha c + a b` through `gemm` (`alpha` 0 overwrites `c`), for `a`
/// m x k, `b` k x n and `c` m x n row-major with row stride `c_rs`: the one
/// call the matrix products, the row groups' products and attention's
/// blocks share.
///
/// # Safety
/// Each operand covers its rows and columns at its strides; `c` overlaps neither input.
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    alpha: f32,
    (a, a_rs, a_cs): Operand,
    (b, b_rs, b_cs): Operand,
    threads: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            alpha != 0.0,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            alpha,
            1.0,
            false,
            false,
            false,
            threads,
        )
    }
}

/// Folds one row with 32 independent accumulators (which vectorise),
/// combined in a fixed order, so a row's result never depends on threads.
pub fn fold_row(op: Reduce, row: &[f32]) -> f32 {
    // (The standard library caches the feature check.)
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the host has AVX2.
        return unsafe { fold_row_avx2(op, row) };
    }
    fold_row_lanes(op, row)
}

/// `fold_row` built for AVX2 (the crate itself targets baseline x86-64):
/// the same additions in the same order, on wider registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fold_row_avx2(op: Reduce, row: &[f32]) -> f32 {
    fold_row_lanes(op, row)
}

/// 32 lanes (four 256-bit accumulators, so that additions do not wait on
/// each other), combined by halves (vector operations: combining them one
/// by one cost as much as the folding in attention's rows of 64), then the
/// tail.
#[inline(always)]
fn fold_row_lanes(op: Reduce, row: &[f32]) -> f32 {
    #[inline(always)]
    fn fold(row: &[f32], init: f32, combine: impl Fn(f32, f32) -> f32) -> f32 {
        let mut lanes = [init; 32];
        let (chunks, tail) = row.as_chunks::<32>();
        for c in chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l = combine(*l, *v);
            }
        }
        let mut width = 16;
        while width > 0 {
            for i in 0..width {
                lanes[i] = combine(lanes[i], lanes[i + width]);
            }
            width /= 2;
        }
        tail.iter().fold(lanes[0], |a, b| combine(a, *b))
    }
    match op {
        Reduce::Sum => fold(row, 0.0, |a, b| a + b),
        Reduce::Max => fold(row, f32::NEG_INFINITY, f32::max),
        Reduce::Min => fold(row, f32::INFINITY, f32::min),
    }
}

/// A reduction over the leading axes (a bias's or a norm's gain's gradient,
/// summed over batch and positions): `out[j]` folds `src[r * inner + j]`
/// over the rows r. Blocks of rows (by shape, ~`PARALLEL` elements) fold in
/// parallel into partial rows, added in block order: the same result on any
/// thread count. (It was one serial loop: 10% of tiny-gpt's training step.)
fn leading(op: Reduce, init: f32, src: &[f32], inner: usize, out: &mut [f32]) {
    let rows = src.len() / inner.max(1);
    let block = rows_per_task(inner);
    let fold = |acc: &mut [f32], r0: usize, r1: usize| {
        for r in r0..r1 {
            combine_rows(op, acc, &src[r * inner..(r + 1) * inner]);
        }
    };
    out.fill(init);
    if rows <= block || src.len() < 2 * PARALLEL {
        fold(out, 0, rows);
        return;
    }
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![init; inner];
            fold(&mut acc, b * block, ((b + 1) * block).min(rows));
            acc
        })
        .collect();
    for p in &partials {
        combine_rows(op, out, p);
    }
}

/// `acc[j] = op(acc[j], row[j])`.
fn combine_rows(op: Reduce, acc: &mut [f32], row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the host has AVX2.
        return unsafe { combine_rows_avx2(op, acc, row) };
    }
    combine_rows_lanes(op, acc, row)
}

/// `combine_rows` built for AVX2 (as `fold_row_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn combine_rows_avx2(op: Reduce, acc: &mut [f32], row: &[f32]) {
    combine_rows_lanes(op, acc, row)
}

#[inline(always)]
fn combine_rows_lanes(op: Reduce, acc: &mut [f32], row: &[f32]) {
    let pairs = acc.iter_mut().zip(row);
    match op {
        Reduce::Sum => pairs.for_each(|(a, v)| *a += v),
        Reduce::Max => pairs.for_each(|(a, v)| *a = a.max(*v)),
        Reduce::Min => pairs.for_each(|(a, v)| *a = a.min(*v)),
    }
}

pub fn reduce(op: Reduce, src: &[f32], in_shape: &[usize], axes: &[usize], out: &mut [f32]) {
    let rank = in_shape.len();
    if rank > 0 && axes == [rank - 1] {
        // The innermost axis: each output is one row, rows in parallel.
        let inner = in_shape[rank - 1];
        if inner == 0 {
            out.fill(fold_row(op, &[]));
            return;
        }
        let rows = if src.len() >= 2 * PARALLEL { rows_per_task(inner) } else { out.len().max(1) };
        out.par_chunks_mut(rows).enumerate().for_each(|(c, chunk)| {
            for (k, o) in chunk.iter_mut().enumerate() {
                let r = c * rows + k;
                *o = fold_row(op, &src[r * inner..(r + 1) * inner]);
            }
        });
        return;
    }
    let init = match op {
        Reduce::Sum => 0.0,
        Reduce::Max => f32::NEG_INFINITY,
        Reduce::Min => f32::INFINITY,
    };
    if !axes.is_empty() && axes.len() < rank && axes.iter().enumerate().all(|(i, a)| *a == i) {
        leading(op, init, src, in_shape[axes.len()..].iter().product(), out);
        return;
    }
    out.fill(init);
    // The output offset of each input element: output strides, 0 on reduced axes.
    let kept: Vec<usize> = (0..in_shape.len()).filter(|d| !axes.contains(d)).map(|d| in_shape[d]).collect();
    let ks = strides(&kept);
    let mut k = 0;
    let eff: Vec<usize> = (0..in_shape.len())
        .map(|d| {
            if axes.contains(&d) {
                0
            } else {
                k += 1;
                ks[k - 1]
            }
        })
        .collect();
    let rank = in_shape.len();
    if rank == 0 {
        out[0] = src[0];
        return;
    }
    let inner = in_shape[rank - 1];
    let inner_eff = eff[rank - 1];
    let outer: usize = in_shape[..rank - 1].iter().product();
    let mut idx = vec![0usize; rank - 1];
    let mut offset = 0;
    for o in 0..outer {
        let row = &src[o * inner..(o + 1) * inner];
        if inner_eff == 0 {
            // Reducing the innermost axis: fold the row into one slot.
            let acc = &mut out[offset];
            match op {
                Reduce::Sum => *acc += row.iter().sum::<f32>(),
                Reduce::Max => *acc = row.iter().fold(*acc, |a, b| a.max(*b)),
                Reduce::Min => *acc = row.iter().fold(*acc, |a, b| a.min(*b)),
            }
        } else {
            for (j, v) in row.iter().enumerate() {
                let acc = &mut out[offset + j * inner_eff];
                match op {
                    Reduce::Sum => *acc += v,
                    Reduce::Max => *acc = acc.max(*v),
                    Reduce::Min => *acc = acc.min(*v),
                }
            }
        }
        for d in (0..rank - 1).rev() {
            idx[d] += 1;
            offset += eff[d];
            if idx[d] < in_shape[d] {
                break;
            }
            offset -= eff[d] * in_shape[d];
            idx[d] = 0;
        }
    }
}

/// Rows of `table` ([V, row]) picked by `ids`; an id out of range is an error.
pub fn gather(table: &[f32], rows: usize, ids: &[f32], out: &mut [f32]) -> Result<(), String> {
    let row = table.len().checked_div(rows).unwrap_or(0);
    for (k, id) in ids.iter().enumerate() {
        let i = *id as usize;
        // NaN would become row 0 through `as usize`.
        if id.is_nan() || *id < 0.0 || i >= rows {
            return Err(format!("index {id} is out of range for a table of {rows} rows"));
        }
        out[k * row..(k + 1) * row].copy_from_slice(&table[i * row..(i + 1) * row]);
    }
    Ok(())
}

/// Index of the first maximum along `axis` of `[outer, n, inner]`.
pub fn argmax(src: &[f32], outer: usize, n: usize, inner: usize, out: &mut [f32]) {
    for o in 0..outer {
        for i in 0..inner {
            let mut best = (f32::NEG_INFINITY, 0usize);
            for k in 0..n {
                let v = src[(o * n + k) * inner + i];
                if k == 0 || v > best.0 {
                    best = (v, k);
                }
            }
            out[o * inner + i] = best.1 as f32;
        }
    }
}

/// Rows of zeros with a one at each id; ids outside `0..classes` give a zero row.
pub fn one_hot(ids: &[f32], classes: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (k, id) in ids.iter().enumerate() {
        if *id >= 0.0 && (*id as usize) < classes {
            out[k * classes + *id as usize] = 1.0;
        }
    }
}

/// Adds each row of `updates` into row `ids[k]` of `out` ([rows, row]).
pub fn scatter_add(ids: &[f32], updates: &[f32], rows: usize, out: &mut [f32]) -> Result<(), String> {
    out.fill(0.0);
    scatter_add_onto(ids, updates, rows, out)
}

/// `scatter_add` onto what `out` holds.
pub fn scatter_add_onto(ids: &[f32], updates: &[f32], rows: usize, out: &mut [f32]) -> Result<(), String> {
    let row = out.len().checked_div(rows).unwrap_or(0);
    for (k, id) in ids.iter().enumerate() {
        let i = *id as usize;
        // NaN would become row 0 through `as usize`.
        if id.is_nan() || *id < 0.0 || i >= rows {
            return Err(format!("index {id} is out of range for a table of {rows} rows"));
        }
        for (dst, v) in out[i * row..(i + 1) * row].iter_mut().zip(&updates[k * row..(k + 1) * row]) {
            *dst += v;
        }
    }
    Ok(())
}

/// The `k` largest of each row of `n` (ties as `torch.topk` leaves them, `modelc::ir::topk`):
/// their values, or their indices.
pub fn topk(src: &[f32], n: usize, k: usize, indices: bool, out: &mut [f32]) {
    for (r, row) in src.chunks(n.max(1)).enumerate() {
        for (j, i) in modelc::ir::topk::order(row, k).into_iter().enumerate() {
            out[r * k + j] = if indices { i as f32 } else { row[i] };
        }
    }
}

/// The dropout mask of the interpreter, in f32: element i is 0 where
/// `uniform(key, step, i) < p`, else `1 / (1 - p)`, compared as integers
/// (`uniform_bits`), in parallel pieces (each element's number depends on
/// its index only). The hash's three 64-bit multiplies are the cost: where
/// the CPU has AVX-512DQ (a vector 64-bit multiply) the loop is built for
/// it and LLVM vectorises them. One mask of tiny-gpt's step (262k floats):
/// 0.38 ms serial, 0.29-0.37 in pieces, 0.031-0.033 with AVX-512DQ.
pub fn dropout_mask(p: f64, key: u64, step: u64, out: &mut [f32]) {
    let keep = (1.0 / (1.0 - p)) as f32;
    let below = (p * (1u64 << 53) as f64).ceil() as u64;
    out.par_chunks_mut(PARALLEL).enumerate().for_each(|(c, piece)| {
        let first = (c * PARALLEL) as u64;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the host has AVX-512F and DQ (both checked, as the build enables both).
            return unsafe { mask_avx512(key, step, first, below, keep, piece) };
        }
        mask(key, step, first, below, keep, piece)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn mask_avx512(key: u64, step: u64, first: u64, below: u64, keep: f32, piece: &mut [f32]) {
    mask(key, step, first, below, keep, piece)
}

/// Elements `first..` of the mask into `piece`.
#[inline(always)]
fn mask(key: u64, step: u64, first: u64, below: u64, keep: f32, piece: &mut [f32]) {
    for (j, v) in piece.iter_mut().enumerate() {
        *v = if modelc::ir::interp::uniform_bits(key, step, first + j as u64) < below { 0.0 } else { keep };
    }
}

#[cfg(test)]
mod tests {
    use super::concat;

    /// The parallel mask (several pieces) is the interpreter's, element by element.
    #[test]
    fn dropout_masks_match_the_interpreter() {
        for p in [0.1, 0.3, 0.5, 1.0 / 3.0] {
            let mut out = vec![f32::NAN; 3 * super::PARALLEL + 17];
            super::dropout_mask(p, 7, 11, &mut out);
            let keep = (1.0 / (1.0 - p)) as f32;
            for (i, v) in out.iter().enumerate() {
                let want = if modelc::ir::interp::uniform(7, 11, i as u64) < p { 0.0 } else { keep };
                assert_eq!(*v, want, "p {p}, element {i}");
            }
        }
    }

    /// The parallel path (outputs of 256k floats and more) against an
    /// element-by-element concatenation, on every axis of a [3, 5, N] shape.
    #[test]
    fn large_concatenations_put_every_element_in_place() {
        let (a_shape, b_shape) = ([3usize, 5, 20_000], [3usize, 5, 7_001]);
        let a: Vec<f32> = (0..a_shape.iter().product::<usize>()).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..a_shape.iter().product::<usize>()).map(|i| -(i as f32) - 1.0).collect();
        for axis in 0..3 {
            // Parts that differ only along `axis`.
            let mut bs = a_shape;
            bs[axis] = b_shape[axis];
            let b = &b[..bs.iter().product::<usize>()];
            let mut out_shape = a_shape;
            out_shape[axis] += bs[axis];
            let mut out = vec![f32::NAN; out_shape.iter().product()];
            assert!(out.len() >= 1 << 18);
            let index = |s: &[usize], i: [usize; 3]| (i[0] * s[1] + i[1]) * s[2] + i[2];
            // A part already in place (None) is stepped over, left as it is.
            concat(&[(None, &a_shape), (Some(b), &bs)], axis, &out_shape, &mut out);
            let untouched = (0..out.len()).filter(|i| out[*i].is_nan()).count();
            assert_eq!(untouched, a.len(), "axis {axis}: only the part in place is left");
            concat(&[(Some(&a), &a_shape), (Some(b), &bs)], axis, &out_shape, &mut out);
            for i in 0..out_shape[0] {
                for j in 0..out_shape[1] {
                    for k in 0..out_shape[2] {
                        let at = [i, j, k];
                        let want = if at[axis] < a_shape[axis] {
                            a[index(&a_shape, at)]
                        } else {
                            let mut at = at;
                            at[axis] -= a_shape[axis];
                            b[index(&bs, at)]
                        };
                        assert_eq!(out[index(&out_shape, [i, j, k])], want, "axis {axis} at {i},{j},{k}");
                    }
                }
            }
        }
    }
}
