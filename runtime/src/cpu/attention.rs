//! Attention in one pass over the keys, never storing the [B, H, T, S]
//! scores: each task takes a block of queries of one head and walks the
//! blocks of keys that block may see, keeping each row's running maximum,
//! sum and weighted values (online softmax, as in FlashAttention). Causal
//! and sliding-window attention skip the key blocks no query of the block
//! sees, half the work of the materialised form for causal self-attention.
//! The backward's passes (`ir::attention::gradient`) work the same way:
//! each row's log-sum-exp, then the queries', keys' and values' gradients
//! by blocks of keys, recomputing the probabilities of a block from its
//! scores. The block products go through `gemm`; exp through the wide
//! math functions where the host has them.

use super::kernels::{self, Operand, fold_row};
use modelc::backend::vmath;
use modelc::ir::graph::{Attention, AttentionPass, Reduce};
use rayon::prelude::*;
use std::ops::Range;

/// Queries per task: the block's scores and running sums stay in cache.
const QUERY_BLOCK: usize = 64;
/// Keys per step of the walk.
const KEY_BLOCK: usize = 256;
/// Keys per block of the gradient pass.
const KV_BLOCK: usize = 128;
/// Query rows up to which a block's products are dot products and scaled
/// row sums on the task's thread: a decoding step's one row paid `gemm`'s
/// packing for every block of keys (a quarter of a stories15M token).
const DIRECT_ROWS: usize = 2;
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
    pub k: Stored<'a>,
    pub v: Stored<'a>,
    pub offset: i64,
    pub mask: Option<(&'a [f32], usize)>,
}

/// Keys or values as they are stored: f32, or f16 (a key/value cache kept
/// in half the bytes, `infer --kv-cache f16`), read as f32.
#[derive(Clone, Copy)]
pub enum Stored<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl<'a> Stored<'a> {
    /// The f32 values; only those reach a gradient (caches never train).
    fn f32(self) -> &'a [f32] {
        match self {
            Stored::F32(x) => x,
            Stored::F16(_) => unreachable!("bug: an f16 key/value cache in a gradient"),
        }
    }

    fn len(self) -> usize {
        match self {
            Stored::F32(x) => x.len(),
            Stored::F16(x) => x.len(),
        }
    }

    fn get(self, i: usize) -> f32 {
        match self {
            Stored::F32(x) => x[i],
            Stored::F16(x) => half::f16::from_bits(x[i]).to_f32(),
        }
    }

    /// `count` rows of `width` values from `start` at `stride`, as f32 and
    /// their row stride: f32 rows where they lie, f16 rows widened into
    /// `buf` (a block of keys or values for the block products).
    fn rows<'b>(
        self,
        start: usize,
        count: usize,
        stride: usize,
        width: usize,
        buf: &'b mut Vec<f32>,
    ) -> (&'b [f32], usize)
    where
        'a: 'b,
    {
        match self {
            Stored::F32(x) => (&x[start..], stride),
            Stored::F16(x) => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                buf.resize(count * width, 0.0);
                for (r, dst) in buf.chunks_exact_mut(width).enumerate() {
                    x[start + r * stride..][..width].reinterpret_cast::<half::f16>().convert_to_f32_slice(dst);
                }
                (&buf[..], width)
            }
        }
    }
}

/// What the backward's gradient passes read besides the forward's inputs:
/// the output's adjoint `[b, t, h, e]`, each row's log-sum-exp and
/// `rowsum(adjoint * output)` (both `[b, t, h]`).
pub struct Adjoint<'a> {
    pub gy: &'a [f32],
    pub lse: &'a [f32],
    pub delta: &'a [f32],
}

type ExpFn = extern "C" fn(*const f32, *mut f32, i64, f32, f32);

/// `x[i] = exp(x[i] - shift)` over a row, wide where the host allows.
fn exp_shifted(wide: Option<ExpFn>, x: &mut [f32], shift: f32) {
    match wide {
        Some(f) => f(x.as_ptr(), x.as_mut_ptr(), x.len() as i64, 1.0, -shift),
        None => x.iter_mut().for_each(|v| *v = vmath::exp(*v - shift)),
    }
}

/// The host's wide exp, looked up once (a decoding step calls attention
/// once a layer, and the lookup builds the whole table).
fn wide_exp() -> Option<ExpFn> {
    static EXP: std::sync::OnceLock<Option<ExpFn>> = std::sync::OnceLock::new();
    *EXP.get_or_init(|| {
        let functions = vmath::functions();
        let (_, f) = functions.iter().find(|(m, _)| *m == vmath::Map::Unary(modelc::ir::graph::Unary::Exp))?;
        // SAFETY: the wide functions all have this signature (see `vmath`).
        Some(unsafe { std::mem::transmute::<*const u8, ExpFn>(f.ptr) })
    })
}

/// A block product on the task's own thread (see `kernels::product`).
///
/// # Safety
/// As `kernels::product`'s.
unsafe fn product(mnk: (usize, usize, usize), c: *mut f32, c_rs: usize, alpha: f32, a: Operand, b: Operand) {
    // SAFETY: the caller's contract.
    unsafe { kernels::product(mnk, c, c_rs, alpha, a, b, gemm::Parallelism::None) }
}

/// The output pointer, shared by tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only the rows of its own block.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Runs `tasks` on the thread pool when the attention is big enough to pay
/// for waking it, each with its thread's scratch memory grown to hold
/// blocks of `keys` keys; every task computes the same values on any thread.
fn run_tasks(n: Sizes, tasks: usize, keys: usize, run: impl Fn(&mut Scratch, usize) + Sync + Send) {
    let with_scratch = |task: usize| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.grow(n, keys);
            run(&mut s, task)
        })
    };
    // Reading the keys and values bounds it: a decoding step's attention at
    // the stories15M shape (885 KB of cache) took 30 us on one thread and 19
    // on two; the pool's wake-up pays for itself from ~32K multiply-adds.
    if tasks > 1 && n.b * n.h * n.t * n.s * (n.d + n.e) > 1 << 15 {
        (0..tasks).into_par_iter().for_each(with_scratch);
    } else {
        (0..tasks).for_each(with_scratch);
    }
}

/// The keys query `i` sees by position, as a range (before the padding mask).
fn visible(a: &Attention, i: usize, offset: i64, s: usize) -> Range<usize> {
    let p = i as i64 + offset;
    let hi = if a.causal { (p + 1).clamp(0, s as i64) } else { s as i64 };
    let lo = a.window.map_or(0, |w| (p - w + 1).clamp(0, s as i64));
    lo as usize..(hi as usize).max(lo as usize)
}

/// The keys some query of `rows` sees; the rest are skipped.
fn keys_seen(a: &Attention, rows: &Range<usize>, offset: i64, s: usize) -> Range<usize> {
    let (first, last) = (visible(a, rows.start, offset, s), visible(a, rows.end - 1, offset, s));
    first.start.min(last.start)..first.end.max(last.end)
}

/// `out[j] = q · rows[start + j * stride..][..q.len()]` for every j of `out`.
fn dots(q: &[f32], rows: Stored, start: usize, stride: usize, out: &mut [f32]) {
    assert!(out.is_empty() || rows.len() >= start + (out.len() - 1) * stride + q.len(), "bug: key rows");
    #[cfg(target_arch = "x86_64")]
    if super::packed::avx2_available() {
        // SAFETY: the host has AVX2, FMA and F16C; the rows were checked above.
        return unsafe {
            match rows {
                Stored::F32(x) => avx2::dots::<false>(q, x.as_ptr().add(start).cast(), stride, out),
                Stored::F16(x) => avx2::dots::<true>(q, x.as_ptr().add(start).cast(), stride, out),
            }
        };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = q.iter().enumerate().map(|(i, x)| x * rows.get(start + j * stride + i)).sum();
    }
}

/// `acc += Σ_j weights[j] * rows[start + j * stride..][..acc.len()]`.
fn add_scaled_rows(weights: &[f32], rows: Stored, start: usize, stride: usize, acc: &mut [f32]) {
    let n = weights.len();
    assert!(n == 0 || rows.len() >= start + (n - 1) * stride + acc.len(), "bug: value rows");
    #[cfg(target_arch = "x86_64")]
    if super::packed::avx2_available() {
        // SAFETY: as in `dots`.
        return unsafe {
            match rows {
                Stored::F32(x) => avx2::add_scaled_rows::<false>(weights, x.as_ptr().add(start).cast(), stride, acc),
                Stored::F16(x) => avx2::add_scaled_rows::<true>(weights, x.as_ptr().add(start).cast(), stride, acc),
            }
        };
    }
    for (j, &w) in weights.iter().enumerate() {
        acc.iter_mut().enumerate().for_each(|(i, a)| *a += w * rows.get(start + j * stride + i));
    }
}

/// The one-row products in AVX2 FMAs, over f32 rows or (`HALF`) f16 rows
/// widened as they are loaded (F16C).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of a vector's 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// Elements i..i + 8 of a row of f32 or (`HALF`) f16 values.
    ///
    /// # Safety
    /// The row holds them.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8<const HALF: bool>(row: *const u8, i: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            if HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(row.cast::<u16>().add(i).cast()))
            } else {
                _mm256_loadu_ps(row.cast::<f32>().add(i))
            }
        }
    }

    /// Element i of a row, as `load8`.
    ///
    /// # Safety
    /// The row holds it.
    #[inline]
    unsafe fn load1<const HALF: bool>(row: *const u8, i: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe {
            if HALF { half::f16::from_bits(*row.cast::<u16>().add(i)).to_f32() } else { *row.cast::<f32>().add(i) }
        }
    }

    /// Row j of rows `stride` elements apart.
    fn row<const HALF: bool>(rows: *const u8, j: usize, stride: usize) -> *const u8 {
        rows.wrapping_add(j * stride * if HALF { 2 } else { 4 })
    }

    /// As `super::dots`, four rows a step (each query chunk loaded once).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `rows` holds `(out.len() - 1) * stride + q.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots<const HALF: bool>(q: &[f32], rows: *const u8, stride: usize, out: &mut [f32]) {
        let (d, wide) = (q.len(), q.len() / 8 * 8);
        let qp = q.as_ptr();
        let tail = |r: *const u8| -> f32 {
            // SAFETY: elements wide..d of a row.
            (wide..d).map(|i| unsafe { *qp.add(i) * load1::<HALF>(r, i) }).sum::<f32>()
        };
        let mut j = 0;
        // SAFETY: every row read is one of out.len() rows of d values.
        unsafe {
            while j + 4 <= out.len() {
                let r = [0, 1, 2, 3].map(|u| row::<HALF>(rows, j + u, stride));
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in (0..wide).step_by(8) {
                    let x = _mm256_loadu_ps(qp.add(i));
                    for u in 0..4 {
                        acc[u] = _mm256_fmadd_ps(x, load8::<HALF>(r[u], i), acc[u]);
                    }
                }
                for u in 0..4 {
                    out[j + u] = sum8(acc[u]) + tail(r[u]);
                }
                j += 4;
            }
            for (j, o) in out.iter_mut().enumerate().skip(j) {
                let r = row::<HALF>(rows, j, stride);
                let mut acc = _mm256_setzero_ps();
                for i in (0..wide).step_by(8) {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8::<HALF>(r, i), acc);
                }
                *o = sum8(acc) + tail(r);
            }
        }
    }

    /// As `super::add_scaled_rows`: the accumulator held in registers, up
    /// to 64 lanes at a time, while the rows stream past (one 8-lane
    /// accumulator at a time waited on each addition: 4 cycles a key).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `rows` holds `(weights.len() - 1) * stride + acc.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add_scaled_rows<const HALF: bool>(weights: &[f32], rows: *const u8, stride: usize, acc: &mut [f32]) {
        let (e, wide) = (acc.len(), acc.len() / 8 * 8);
        let ap = acc.as_mut_ptr();
        let mut i = 0;
        // SAFETY: lanes i.. of the accumulator and of each row.
        unsafe {
            while wide - i >= 64 {
                lanes::<8, HALF>(weights, rows, i, stride, ap.add(i));
                i += 64;
            }
            match (wide - i) / 8 {
                1 => lanes::<1, HALF>(weights, rows, i, stride, ap.add(i)),
                2 => lanes::<2, HALF>(weights, rows, i, stride, ap.add(i)),
                3 => lanes::<3, HALF>(weights, rows, i, stride, ap.add(i)),
                4 => lanes::<4, HALF>(weights, rows, i, stride, ap.add(i)),
                5 => lanes::<5, HALF>(weights, rows, i, stride, ap.add(i)),
                6 => lanes::<6, HALF>(weights, rows, i, stride, ap.add(i)),
                7 => lanes::<7, HALF>(weights, rows, i, stride, ap.add(i)),
                _ => {}
            }
            for i in wide..e {
                for (j, &w) in weights.iter().enumerate() {
                    *ap.add(i) += w * load1::<HALF>(row::<HALF>(rows, j, stride), i);
                }
            }
        }
    }

    /// `N` registers of the accumulator at `acc` over elements `i..` of every row.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `8 N` values at `acc` and from element i of each row.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lanes<const N: usize, const HALF: bool>(
        weights: &[f32],
        rows: *const u8,
        i: usize,
        stride: usize,
        acc: *mut f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut a: [__m256; N] = std::array::from_fn(|u| _mm256_loadu_ps(acc.add(8 * u)));
            for (j, &w) in weights.iter().enumerate() {
                let (w, r) = (_mm256_set1_ps(w), row::<HALF>(rows, j, stride));
                for (u, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, load8::<HALF>(r, i + 8 * u), *a);
                }
            }
            for (u, a) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(8 * u), *a);
            }
        }
    }
}

/// One (batch, head) of an attention: where its keys and values start and
/// their row strides.
struct Head<'a> {
    a: &'a Attention,
    x: &'a Inputs<'a>,
    n: Sizes,
    b: usize,
    h: usize,
    k0: usize,
    v0: usize,
    k_stride: usize,
    v_stride: usize,
}

impl<'a> Head<'a> {
    fn new(a: &'a Attention, x: &'a Inputs<'a>, n: Sizes, b: usize, h: usize) -> Head<'a> {
        let g = h / (n.h / n.g);
        let (k_stride, v_stride, k0, v0) = if a.kv_heads_first {
            (n.d, n.e, (b * n.g + g) * n.s * n.d, (b * n.g + g) * n.s * n.e)
        } else {
            (n.g * n.d, n.g * n.e, b * n.s * n.g * n.d + g * n.d, b * n.s * n.g * n.e + g * n.e)
        };
        Head { a, x, n, b, h, k0, v0, k_stride, v_stride }
    }

    /// Index of row (b, i, h) of a `[b, t, h, width]` tensor.
    fn row(&self, i: usize, width: usize) -> usize {
        ((self.b * self.n.t + i) * self.n.h + self.h) * width
    }

    /// The queries of `rows`, times the scale, into `queries` (m x d).
    fn load_queries(&self, rows: &Range<usize>, queries: &mut [f32]) {
        let (d, scale) = (self.n.d, self.a.scale as f32);
        for (r, i) in rows.clone().enumerate() {
            let q = &self.x.q[self.row(i, d)..][..d];
            queries[r * d..(r + 1) * d].iter_mut().zip(q).for_each(|(dst, src)| *dst = src * scale);
        }
    }

    /// The scores of `rows` (scaled queries in `queries`) against keys
    /// j0..j0+bk into `scores` (m x bk), MASKED where a query does not see a
    /// key; f16 keys of a block product are widened into `widened`.
    fn scores(
        &self,
        rows: &Range<usize>,
        queries: &[f32],
        (j0, bk): (usize, usize),
        scores: &mut [f32],
        widened: &mut Vec<f32>,
    ) {
        let (m, n) = (rows.len(), self.n);
        let start = self.k0 + j0 * self.k_stride;
        if m <= DIRECT_ROWS {
            for r in 0..m {
                dots(
                    &queries[r * n.d..(r + 1) * n.d],
                    self.x.k,
                    start,
                    self.k_stride,
                    &mut scores[r * bk..(r + 1) * bk],
                );
            }
        } else {
            let (keys, stride) = self.x.k.rows(start, bk, self.k_stride, n.d, widened);
            // SAFETY: m x d queries and the key rows j0..j0+bk of this head, m x bk scores.
            unsafe {
                product(
                    (m, bk, n.d),
                    scores.as_mut_ptr(),
                    bk,
                    0.0,
                    (queries.as_ptr(), n.d, 1),
                    (keys.as_ptr(), 1, stride),
                )
            };
        }
        for (r, i) in rows.clone().enumerate() {
            let row = &mut scores[r * bk..(r + 1) * bk];
            let seen = visible(self.a, i, self.x.offset, n.s);
            let (s0, s1) = (seen.start.clamp(j0, j0 + bk) - j0, seen.end.clamp(j0, j0 + bk) - j0);
            row[..s0].fill(MASKED);
            row[s1.max(s0)..].fill(MASKED);
            if let Some((mask, mask_rows)) = self.x.mask {
                let mrow = &mask[(self.b * mask_rows + if mask_rows == 1 { 0 } else { i }) * n.s + j0..][..bk];
                for (s, keep) in row.iter_mut().zip(mrow) {
                    if *keep == 0.0 {
                        *s = MASKED;
                    }
                }
            }
        }
    }

    /// `dp = gy V_blockᵀ` (m x bk) for the adjoint rows in `gy` (m x e).
    fn adjoint_values(&self, m: usize, gy: &[f32], j0: usize, bk: usize, dp: &mut [f32]) {
        let e = self.n.e;
        // SAFETY: m x e adjoint rows, the value rows j0..j0+bk, m x bk out.
        unsafe {
            product(
                (m, bk, e),
                dp.as_mut_ptr(),
                bk,
                0.0,
                (gy.as_ptr(), e, 1),
                (self.x.v.f32().as_ptr().add(self.v0 + j0 * self.v_stride), 1, self.v_stride),
            )
        };
    }
}

/// Scratch memory of a task: one per thread, kept between calls (allocating
/// it per call cost a tenth of a small model's attention). Every task
/// writes what it reads.
#[derive(Default)]
struct Scratch {
    queries: Vec<f32>,
    adjoint: Vec<f32>,
    scores: Vec<f32>,
    dp: Vec<f32>,
    acc: Vec<f32>,
    acc2: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    /// A block of f16 keys or values widened for the block products.
    widened: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Scratch {
    /// Makes every buffer at least as long as blocks of `keys` keys need.
    fn grow(&mut self, n: Sizes, keys: usize) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.queries, QUERY_BLOCK * n.d);
        grow(&mut self.adjoint, QUERY_BLOCK * n.e);
        grow(&mut self.scores, QUERY_BLOCK * keys);
        grow(&mut self.dp, QUERY_BLOCK * keys);
        grow(&mut self.acc, QUERY_BLOCK.max(keys) * n.d.max(n.e));
        grow(&mut self.acc2, keys * n.e);
        grow(&mut self.max, QUERY_BLOCK);
        grow(&mut self.sum, QUERY_BLOCK);
    }
}

/// The query blocks of an attention as tasks: (batch, head, rows).
fn query_tasks(n: Sizes) -> (usize, impl Fn(usize) -> (usize, usize, Range<usize>)) {
    let blocks = n.t.div_ceil(QUERY_BLOCK);
    (n.b * n.h * blocks, move |task: usize| {
        let (bh, block) = (task / blocks, task % blocks);
        (bh / n.h, bh % n.h, block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(n.t))
    })
}

/// Runs the attention `a` into `out` (`[b, t, h, e]`).
pub fn attention(a: &Attention, x: &Inputs, n: Sizes, out: &mut [f32]) {
    assert!(out.len() == n.b * n.t * n.h * n.e, "bug: attention output size");
    forward(a, x, n, Forward { values: Some(Out(out.as_mut_ptr())), lse: None });
}

/// Each row's log-sum-exp of its scores into `out` (`[b, t, h]`), MASKED
/// for a row whose every key is masked.
pub fn log_sum_exp(a: &Attention, x: &Inputs, n: Sizes, out: &mut [f32]) {
    assert!(out.len() == n.b * n.t * n.h, "bug: attention lse size");
    forward(a, x, n, Forward { values: None, lse: Some(Out(out.as_mut_ptr())) });
}

/// The output (`[b, t, h, e]`) then each row's log-sum-exp (`[b, t, h]`)
/// into `out`, from one walk over the scores.
pub fn values_and_lse(a: &Attention, x: &Inputs, n: Sizes, out: &mut [f32]) {
    let values = n.b * n.t * n.h * n.e;
    assert!(out.len() == values + n.b * n.t * n.h, "bug: attention values and lse size");
    let (y, lse) = out.split_at_mut(values);
    forward(a, x, n, Forward { values: Some(Out(y.as_mut_ptr())), lse: Some(Out(lse.as_mut_ptr())) });
}

/// The forward's query blocks as tasks.
fn forward(a: &Attention, x: &Inputs, n: Sizes, out: Forward) {
    let wide = wide_exp();
    let per = n.h / n.g;
    // A decoding step of grouped-query attention walks each key/value head
    // once for all the query heads it serves, so its keys and values are
    // read from memory once, not once a query head (each row's sums are the
    // same either way). Where that leaves a thread idle, heads go apart.
    if per > 1 && n.t <= DIRECT_ROWS && per * n.t <= QUERY_BLOCK && n.b * n.g >= rayon::current_num_threads() {
        run_tasks(n, n.b * n.g, KEY_BLOCK, |sc, t| {
            let (b, g) = (t / n.g, t % n.g);
            forward_block(|u| Head::new(a, x, n, b, g * per + u), per, 0..n.t, sc, wide, out);
        });
        return;
    }
    let (tasks, task) = query_tasks(n);
    run_tasks(n, tasks, KEY_BLOCK, |sc, t| {
        let (b, h, rows) = task(t);
        forward_block(|_| Head::new(a, x, n, b, h), 1, rows, sc, wide, out);
    });
}

/// Where a block of the forward writes the output rows and each row's
/// log-sum-exp, either or both (without the output, no values are read).
#[derive(Clone, Copy)]
struct Forward {
    values: Option<Out>,
    lse: Option<Out>,
}

/// A block of query rows of the forward, of one head or of `count` that
/// share their keys and values (`head(u)`, u < count: one group's), row
/// `u * rows.len() + r` of the scratch being head u's query `rows.start + r`.
fn forward_block<'a>(
    head: impl Fn(usize) -> Head<'a>,
    count: usize,
    rows: Range<usize>,
    sc: &mut Scratch,
    wide: Option<ExpFn>,
    out: Forward,
) {
    let values = out.values.is_some();
    let (first, per) = (head(0), rows.len());
    let (n, m) = (first.n, count * per);
    for u in 0..count {
        head(u).load_queries(&rows, &mut sc.queries[u * per * n.d..]);
    }
    sc.max[..m].fill(f32::NEG_INFINITY);
    sc.sum[..m].fill(0.0);
    sc.acc[..m * n.e].fill(0.0);
    let seen = keys_seen(first.a, &rows, first.x.offset, n.s);
    let mut j0 = seen.start;
    while j0 < seen.end {
        let bk = KEY_BLOCK.min(seen.end - j0);
        let scores = &mut sc.scores[..m * bk];
        for u in 0..count {
            let queries = &sc.queries[u * per * n.d..(u + 1) * per * n.d];
            head(u).scores(&rows, queries, (j0, bk), &mut scores[u * per * bk..(u + 1) * per * bk], &mut sc.widened);
        }
        for r in 0..m {
            let row = &mut scores[r * bk..(r + 1) * bk];
            let new_max = fold_row(Reduce::Max, row).max(sc.max[r]);
            let rescale = (sc.max[r] - new_max).exp();
            exp_shifted(wide, row, new_max);
            sc.sum[r] = sc.sum[r] * rescale + fold_row(Reduce::Sum, row);
            sc.max[r] = new_max;
            if rescale != 1.0 && values {
                sc.acc[r * n.e..(r + 1) * n.e].iter_mut().for_each(|v| *v *= rescale);
            }
        }
        let start = first.v0 + j0 * first.v_stride;
        if values && per <= DIRECT_ROWS {
            for r in 0..m {
                let acc = &mut sc.acc[r * n.e..(r + 1) * n.e];
                add_scaled_rows(&scores[r * bk..(r + 1) * bk], first.x.v, start, first.v_stride, acc);
            }
        } else if values {
            let (v, stride) = first.x.v.rows(start, bk, first.v_stride, n.e, &mut sc.widened);
            for u in 0..count {
                // SAFETY: per x bk weights, bk value rows of e, per x e accumulators.
                unsafe {
                    product(
                        (per, n.e, bk),
                        sc.acc.as_mut_ptr().add(u * per * n.e),
                        n.e,
                        1.0,
                        (scores.as_ptr().add(u * per * bk), bk, 1),
                        (v.as_ptr(), stride, 1),
                    )
                };
            }
        }
        j0 += bk;
    }
    for u in 0..count {
        let head = head(u);
        for (r, i) in rows.clone().enumerate().map(|(r, i)| (u * per + r, i)) {
            // Every key masked (or none visited): the decomposition's softmax
            // of S equal scores.
            let all_masked = sc.max[r] <= MASKED;
            if let Some(lse) = out.lse {
                let value = if all_masked { MASKED } else { sc.max[r] + sc.sum[r].ln() };
                // SAFETY: row (b, i, h) of the output belongs to this task alone.
                unsafe { *lse.at(head.row(i, 1)) = value };
            }
            let Some(out) = out.values else { continue };
            // SAFETY: as above.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(head.row(i, n.e)), n.e) };
            if all_masked {
                // The mean of all the values.
                dst.fill(0.0);
                for j in 0..n.s {
                    let at = head.v0 + j * head.v_stride;
                    dst.iter_mut().enumerate().for_each(|(i, o)| *o += head.x.v.get(at + i));
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
}

/// The probabilities P = exp(score - lse) of a block of scores, in place,
/// and dS = P (dP - delta) in place of dP; rows with every key masked get
/// neither (P 0: their values' share is added separately).
#[allow(clippy::too_many_arguments)]
fn probabilities_and_ds(
    head: &Head,
    dy: &Adjoint,
    rows: &Range<usize>,
    bk: usize,
    scores: &mut [f32],
    dp: &mut [f32],
    wide: Option<ExpFn>,
) {
    for (r, i) in rows.clone().enumerate() {
        let (row, dprow) = (&mut scores[r * bk..(r + 1) * bk], &mut dp[r * bk..(r + 1) * bk]);
        let at = head.row(i, 1);
        let (lse, delta) = (dy.lse[at], dy.delta[at]);
        if lse <= MASKED {
            row.fill(0.0);
            dprow.fill(0.0);
            continue;
        }
        exp_shifted(wide, row, lse);
        dprow.iter_mut().zip(row.iter()).for_each(|(g, p)| *g = p * (*g - delta));
    }
}

/// How many partial sums of dQ the gradient pass keeps per (batch, key/value
/// head): one when there are enough of those to share the threads, else up
/// to 4, chunk c taking key blocks c, c + chunks, ... (by shape only, so
/// the sums are the same on any thread count).
fn dq_chunks(n: Sizes, blocks: usize) -> usize {
    if n.b * n.g >= 8 { 1 } else { blocks.clamp(1, 4) }
}

/// The queries', keys' and values' gradients in one pass (`out`: dQ
/// `[b, t, h, d]`, then dK beside dV in the keys' layout with d + e
/// features). A task is a (batch, key/value head, chunk of key blocks): for
/// each of its key blocks, the query blocks of every head of the group that
/// see it give dV += Pᵀ dY and dK += dSᵀ (scale Q) for the block, and
/// dQ += dS K into the task's partial sum of dQ (the output itself for
/// chunk 0), added in chunk order at the end.
pub fn gradients(a: &Attention, x: &Inputs, dy: &Adjoint, n: Sizes, out: &mut [f32]) {
    let nq = n.b * n.t * n.h * n.d;
    assert!(out.len() == nq + n.b * n.s * n.g * (n.d + n.e), "bug: attention gradients size");
    let blocks = n.s.div_ceil(KV_BLOCK);
    let chunks = dq_chunks(n, blocks);
    let (dq, dkv) = out.split_at_mut(nq);
    dq.fill(0.0);
    let mut partials = vec![0.0f32; (chunks - 1) * nq];
    let wide = wide_exp();
    let (dq_out, partial_out, dkv_out) = (Out(dq.as_mut_ptr()), Out(partials.as_mut_ptr()), Out(dkv.as_mut_ptr()));
    let per = n.h / n.g;
    run_tasks(n, n.b * n.g * chunks, KV_BLOCK, |sc, t| {
        let (bg, chunk) = (t / chunks, t % chunks);
        let (b, g) = (bg / n.g, bg % n.g);
        // This task's sum of dQ: the output, or a partial of the same layout.
        let dq_sum = if chunk == 0 { dq_out } else { Out(partial_out.at((chunk - 1) * nq)) };
        // Rows with every key masked spread their adjoint over all values.
        let mut uniform = vec![0.0f32; n.e];
        for h in g * per..(g + 1) * per {
            let head = Head::new(a, x, n, b, h);
            for i in 0..n.t {
                if dy.lse[head.row(i, 1)] <= MASKED {
                    let gy = &dy.gy[head.row(i, n.e)..][..n.e];
                    uniform.iter_mut().zip(gy).for_each(|(u, v)| *u += v / n.s as f32);
                }
            }
        }
        for block in (chunk..blocks).step_by(chunks) {
            let keys = block * KV_BLOCK..((block + 1) * KV_BLOCK).min(n.s);
            let (j0, bk) = (keys.start, keys.len());
            let (dk, dv) = (&mut sc.acc[..bk * n.d], &mut sc.acc2[..bk * n.e]);
            dk.fill(0.0);
            dv.fill(0.0);
            for h in g * per..(g + 1) * per {
                let head = Head::new(a, x, n, b, h);
                let mut i0 = 0;
                while i0 < n.t {
                    let rows = i0..(i0 + QUERY_BLOCK).min(n.t);
                    i0 = rows.end;
                    let seen = keys_seen(a, &rows, x.offset, n.s);
                    if seen.end <= j0 || seen.start >= keys.end {
                        continue;
                    }
                    let m = rows.len();
                    head.load_queries(&rows, &mut sc.queries);
                    for (r, i) in rows.clone().enumerate() {
                        sc.adjoint[r * n.e..(r + 1) * n.e].copy_from_slice(&dy.gy[head.row(i, n.e)..][..n.e]);
                    }
                    let (scores, dp) = (&mut sc.scores[..m * bk], &mut sc.dp[..m * bk]);
                    head.scores(&rows, &sc.queries, (j0, bk), scores, &mut sc.widened);
                    head.adjoint_values(m, &sc.adjoint, j0, bk, dp);
                    probabilities_and_ds(&head, dy, &rows, bk, scores, dp, wide);
                    // dv += Pᵀ gy, dk += dSᵀ (scale q), dq += dS K. SAFETY: bk x m views of the
                    // m x bk blocks, m x e adjoint and m x d query rows, bk-row accumulators;
                    // rows `rows` of head h in this task's dQ sum, which only this task writes.
                    unsafe {
                        let (p, ds) = ((scores.as_ptr(), 1, bk), (dp.as_ptr(), 1, bk));
                        product((bk, n.e, m), dv.as_mut_ptr(), n.e, 1.0, p, (sc.adjoint.as_ptr(), n.e, 1));
                        product((bk, n.d, m), dk.as_mut_ptr(), n.d, 1.0, ds, (sc.queries.as_ptr(), n.d, 1));
                        let key_rows = (x.k.f32().as_ptr().add(head.k0 + j0 * head.k_stride), head.k_stride, 1);
                        let dq_rows = dq_sum.at(head.row(rows.start, n.d));
                        product((m, n.d, bk), dq_rows, n.h * n.d, 1.0, (dp.as_ptr(), bk, 1), key_rows);
                    }
                }
            }
            let width = n.d + n.e;
            for (r, j) in keys.enumerate() {
                let at = if a.kv_heads_first {
                    ((b * n.g + g) * n.s + j) * width
                } else {
                    ((b * n.s + j) * n.g + g) * width
                };
                // SAFETY: key row (b, j, g) of the output belongs to this task alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(dkv_out.at(at), width) };
                dst[..n.d].copy_from_slice(&dk[r * n.d..(r + 1) * n.d]);
                for ((o, v), u) in dst[n.d..].iter_mut().zip(&dv[r * n.e..(r + 1) * n.e]).zip(&uniform) {
                    *o = v + u;
                }
            }
        }
    });
    // dQ = scale (chunk 0 + chunk 1 + ...), in that order.
    let scale = a.scale as f32;
    dq.par_chunks_mut(1 << 14).enumerate().for_each(|(c, part)| {
        let at = c << 14;
        for (k, v) in part.iter_mut().enumerate() {
            let mut sum = *v;
            for p in 0..chunks - 1 {
                sum += partials[p * nq + at + k];
            }
            *v = sum * scale;
        }
    });
}

/// The pass of the backward `pass` names (see [`AttentionPass`]).
pub fn backward(a: &Attention, pass: AttentionPass, x: &Inputs, dy: Option<&Adjoint>, n: Sizes, out: &mut [f32]) {
    match (pass, dy) {
        (AttentionPass::Lse, _) => log_sum_exp(a, x, n, out),
        (AttentionPass::ValuesAndLse, _) => values_and_lse(a, x, n, out),
        (AttentionPass::Gradients, Some(dy)) => gradients(a, x, dy, n, out),
        _ => unreachable!("bug: a gradient pass without the adjoint"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys and values kept as f16 attend as their f32 values do: decoding
    /// steps (one and two rows: the direct path, grouped heads sharing their
    /// walk) and prompts (block products over widened blocks), with head
    /// sizes that leave vector tails (20) and values wider than 64 lanes (72).
    #[test]
    fn f16_keys_and_values_attend_as_their_f32_values() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for (t, s, h, g) in [(1, 300, 4, 2), (2, 37, 4, 4), (1, 9, 6, 1), (70, 300, 4, 2), (5, 5, 2, 2)] {
            let (b, d, e) = (1, 20, 72);
            let n = Sizes { b, t, s, h, g, d, e };
            let a = Attention { scale: 0.3, causal: true, window: None, kv_heads_first: true };
            let q: Vec<f32> = (0..b * t * h * d).map(|_| next()).collect();
            let halves = |len: usize, next: &mut dyn FnMut() -> f32| -> Vec<u16> {
                (0..len).map(|_| half::f16::from_f32(4.0 * next()).to_bits()).collect()
            };
            let (k16, v16) = (halves(b * g * s * d, &mut next), halves(b * g * s * e, &mut next));
            let widen = |x: &[u16]| x.iter().map(|h| half::f16::from_bits(*h).to_f32()).collect::<Vec<f32>>();
            let (k32, v32) = (widen(&k16), widen(&v16));
            let run = |k: Stored, v: Stored| {
                let x = Inputs { q: &q, k, v, offset: (s - t) as i64, mask: None };
                let mut out = vec![0.0; b * t * h * e];
                attention(&a, &x, n, &mut out);
                out
            };
            let want = run(Stored::F32(&k32), Stored::F32(&v32));
            let got = run(Stored::F16(&k16), Stored::F16(&v16));
            let worst = want.iter().zip(&got).map(|(w, g)| (w - g).abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-5, "t {t}, s {s}, h {h}, g {g}: f16 keys and values differ by {worst}");
            assert!(want.iter().any(|w| w.abs() > 0.1), "the outputs are not trivial");
        }
    }
}
