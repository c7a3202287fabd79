//! Attention in one pass over the keys, never storing the [B, H, T, S]
//! scores: each task takes a block of queries of one head and walks the
//! blocks of keys that block may see, keeping each row's running maximum,
//! sum and weighted values (online softmax, as in FlashAttention). Causal
//! and sliding-window attention skip the key blocks no query of the block
//! sees, half the work of the materialised form for causal self-attention.
//! The two products of a block go through `gemm`; exp through the wide
//! math functions where the host has them.

use super::kernels::fold_row;
use modelc::backend::vmath;
use modelc::ir::graph::{Attention, Reduce};
use rayon::prelude::*;

/// Queries per task: the block's scores and running sums stay in cache.
const QUERY_BLOCK: usize = 64;
/// Keys per step of the walk.
const KEY_BLOCK: usize = 256;
/// What every masked score is, as in the decomposition: a row with every
/// key masked has all its scores equal, and averages all the values.
const MASKED: f32 = -1e30;

/// Sizes of one attention: queries `[b, t, h, d]`, keys `[b, s, g, d]`
/// (or `[b, g, s, d]`), values likewise with `e` features.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub g: usize,
    pub d: usize,
    pub e: usize,
}

/// The inputs of one attention; `mask` is `[b, mask_rows, s]` with
/// `mask_rows` 1 or t.
pub struct Inputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub offset: i64,
    pub mask: Option<(&'a [f32], usize)>,
}

type ExpFn = extern "C" fn(*const f32, *mut f32, i64, f32, f32);

/// `x[i] = exp(x[i] - shift)` over a row, wide where the host allows.
fn exp_shifted(wide: Option<ExpFn>, x: &mut [f32], shift: f32) {
    match wide {
        Some(f) => f(x.as_ptr(), x.as_mut_ptr(), x.len() as i64, 1.0, -shift),
        None => x.iter_mut().for_each(|v| *v = vmath::exp(*v - shift)),
    }
}

fn wide_exp() -> Option<ExpFn> {
    let functions = vmath::functions();
    let (_, f) = functions.iter().find(|(m, _)| *m == vmath::Map::Unary(modelc::ir::graph::Unary::Exp))?;
    // SAFETY: the wide functions all have this signature (see `vmath`).
    Some(unsafe { std::mem::transmute::<*const u8, ExpFn>(f.ptr) })
}

/// One task's scratch memory, reused across the tasks a thread runs.
struct Scratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The output pointer, shared by tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only the rows of its (batch, head, query block).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Runs the attention `a` into `out` (`[b, t, h, e]`).
pub fn attention(a: &Attention, x: &Inputs, n: Sizes, out: &mut [f32]) {
    assert!(out.len() == n.b * n.t * n.h * n.e, "bug: attention output size");
    let blocks = n.t.div_ceil(QUERY_BLOCK);
    let tasks = n.b * n.h * blocks;
    let wide = wide_exp();
    let out = Out(out.as_mut_ptr());
    let scratch = || Scratch {
        queries: vec![0.0; QUERY_BLOCK * n.d],
        scores: vec![0.0; QUERY_BLOCK * KEY_BLOCK],
        acc: vec![0.0; QUERY_BLOCK * n.e],
        max: vec![0.0; QUERY_BLOCK],
        sum: vec![0.0; QUERY_BLOCK],
    };
    let run = |scratch: &mut Scratch, task: usize| {
        let (bh, block) = (task / blocks, task % blocks);
        let rows = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(n.t);
        query_block(a, x, n, bh / n.h, bh % n.h, rows, scratch, wide, out);
    };
    // Every task computes the same values whichever thread runs it.
    if tasks > 1 && n.b * n.h * n.t * n.s * (n.d + n.e) > 1 << 18 {
        (0..tasks).into_par_iter().for_each_init(scratch, run);
    } else {
        let mut s = scratch();
        (0..tasks).for_each(|task| run(&mut s, task));
    }
}

/// The keys query `i` sees by position, as a range (before the padding mask).
fn visible(a: &Attention, i: usize, offset: i64, s: usize) -> std::ops::Range<usize> {
    let p = i as i64 + offset;
    let hi = if a.causal { (p + 1).clamp(0, s as i64) } else { s as i64 };
    let lo = a.window.map_or(0, |w| (p - w + 1).clamp(0, s as i64));
    lo as usize..(hi as usize).max(lo as usize)
}

#[allow(clippy::too_many_arguments)]
fn query_block(
    a: &Attention,
    x: &Inputs,
    n: Sizes,
    b: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    sc: &mut Scratch,
    wide: Option<ExpFn>,
    out: Out,
) {
    let g = h / (n.h / n.g);
    let m = rows.len();
    // Row strides and the first row of this (batch, group) in keys and values.
    let (k_stride, v_stride, k0, v0) = if a.kv_heads_first {
        (n.d, n.e, (b * n.g + g) * n.s * n.d, (b * n.g + g) * n.s * n.e)
    } else {
        (n.g * n.d, n.g * n.e, b * n.s * n.g * n.d + g * n.d, b * n.s * n.g * n.e + g * n.e)
    };
    let scale = a.scale as f32;
    for (r, i) in rows.clone().enumerate() {
        let q = &x.q[((b * n.t + i) * n.h + h) * n.d..][..n.d];
        for (dst, src) in sc.queries[r * n.d..(r + 1) * n.d].iter_mut().zip(q) {
            *dst = src * scale;
        }
    }
    sc.max[..m].fill(f32::NEG_INFINITY);
    sc.sum[..m].fill(0.0);
    sc.acc[..m * n.e].fill(0.0);
    // The keys some query of the block sees; the rest are skipped.
    let first = visible(a, rows.start, x.offset, n.s);
    let last = visible(a, rows.end - 1, x.offset, n.s);
    let (lo, hi) = (first.start.min(last.start), first.end.max(last.end));
    let mut j0 = lo;
    while j0 < hi {
        let bk = KEY_BLOCK.min(hi - j0);
        let scores = &mut sc.scores[..m * bk];
        // SAFETY: the strides describe the scratch blocks and the key rows
        // j0..j0+bk of this (batch, group), all inside their buffers.
        unsafe {
            gemm::gemm(
                m,
                bk,
                n.d,
                scores.as_mut_ptr(),
                1,
                bk as isize,
                false,
                sc.queries.as_ptr(),
                1,
                n.d as isize,
                x.k.as_ptr().add(k0 + j0 * k_stride),
                k_stride as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (r, i) in rows.clone().enumerate() {
            let row = &mut scores[r * bk..(r + 1) * bk];
            let seen = visible(a, i, x.offset, n.s);
            let (s0, s1) = (seen.start.clamp(j0, j0 + bk) - j0, seen.end.clamp(j0, j0 + bk) - j0);
            row[..s0].fill(MASKED);
            row[s1.max(s0)..].fill(MASKED);
            if let Some((mask, mask_rows)) = x.mask {
                let mrow = &mask[(b * mask_rows + if mask_rows == 1 { 0 } else { i }) * n.s + j0..][..bk];
                for (s, keep) in row.iter_mut().zip(mrow) {
                    if *keep == 0.0 {
                        *s = MASKED;
                    }
                }
            }
            let new_max = fold_row(Reduce::Max, row).max(sc.max[r]);
            let rescale = (sc.max[r] - new_max).exp();
            exp_shifted(wide, row, new_max);
            sc.sum[r] = sc.sum[r] * rescale + fold_row(Reduce::Sum, row);
            sc.max[r] = new_max;
            if rescale != 1.0 {
                sc.acc[r * n.e..(r + 1) * n.e].iter_mut().for_each(|v| *v *= rescale);
            }
        }
        // SAFETY: as above, for the value rows and the accumulator.
        unsafe {
            gemm::gemm(
                m,
                n.e,
                bk,
                sc.acc.as_mut_ptr(),
                1,
                n.e as isize,
                true,
                scores.as_ptr(),
                1,
                bk as isize,
                x.v.as_ptr().add(v0 + j0 * v_stride),
                1,
                v_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        j0 += bk;
    }
    for (r, i) in rows.enumerate() {
        // SAFETY: row (b, i, h) of the output belongs to this task alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(((b * n.t + i) * n.h + h) * n.e), n.e) };
        if sc.max[r] <= MASKED {
            // Every key masked (or none visited): the decomposition's softmax
            // of S equal scores, the mean of all the values.
            dst.fill(0.0);
            for j in 0..n.s {
                let vrow = &x.v[v0 + j * v_stride..][..n.e];
                dst.iter_mut().zip(vrow).for_each(|(o, v)| *o += v);
            }
            dst.iter_mut().for_each(|o| *o /= n.s as f32);
        } else {
            let inv = 1.0 / sc.sum[r];
            for (o, acc) in dst.iter_mut().zip(&sc.acc[r * n.e..(r + 1) * n.e]) {
                *o = acc * inv;
            }
        }
    }
}
