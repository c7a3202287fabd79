//! Compact weights for inference and the matrix-vector products that read
//! them where they lie.
//!
//! A weight used as `x @ transpose(W)` (every Linear layer, a tied output
//! layer) has each output's `k` inputs contiguous: row `j` of `W`. Decoding
//! reads each such row once per token, so its speed is the memory's, and
//! fewer bytes a weight is more tokens a second. Formats, per row:
//!
//! - `bf16`: the top half of each f32 (rounded to nearest even);
//! - `q8`: blocks of 32 weights, one f16 scale `d` and 32 int8 `q`,
//!   `w = d q` (llama.cpp's Q8_0);
//! - `q4`: blocks of 32, one f16 scale and 16 bytes of 4-bit `q`,
//!   `w = d (q - 8)`, element `i` in the low nibble of byte `i` and element
//!   `i + 16` in its high nibble (llama.cpp's Q4_0).
//!
//! Scales are kept apart from the quants (one array each), so that the
//! quants of a row start aligned. Products dequantise in registers: no f32
//! copy of a weight is made, except up to 16 MiB of its rows at a time in
//! a thread's buffer when a prompt's many rows make a matrix product worth
//! it (`panels`).

use super::kernels::{self, Operand};
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod vnni_tiles;
#[cfg(target_arch = "x86_64")]
pub(super) use avx2::available as avx2_available;

/// How a weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F32,
    Bf16,
    Q8,
    Q4,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "f32" => Ok(Format::F32),
            "bf16" => Ok(Format::Bf16),
            "q8" => Ok(Format::Q8),
            "q4" => Ok(Format::Q4),
            other => Err(format!("--dtype {other}: expected f32, bf16, q8 or q4")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
            Format::Q8 => "q8",
            Format::Q4 => "q4",
        }
    }

    /// Bytes a weight takes, on average.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Format::F32 => 4.0,
            Format::Bf16 => 2.0,
            Format::Q8 => 34.0 / 32.0,
            Format::Q4 => 18.0 / 32.0,
        }
    }

    /// Whether rows of `k` weights can be stored this way (blocks of 32).
    pub fn fits(self, k: usize) -> bool {
        match self {
            Format::Q8 | Format::Q4 => k.is_multiple_of(BLOCK),
            Format::F32 | Format::Bf16 => true,
        }
    }
}

/// Weights a block of q8 or q4 has.
pub const BLOCK: usize = 32;

/// A weight matrix `[n, k]` (n rows of k) in a compact format.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    pub format: Format,
    pub n: usize,
    pub k: usize,
    /// Packed from the transpose of a weight stored `[k, n]` and used as
    /// `x @ W` (GPT-2's Conv1D), rather than one stored `[n, k]` for `x @ W^T`.
    pub transposed: bool,
    /// bf16 bits, row-major (bf16).
    halves: Vec<u16>,
    /// int8 quants (q8), or two 4-bit quants a byte (q4), row-major.
    quants: Vec<u8>,
    /// f16 bits of each block's scale, row-major (q8, q4).
    scales: Vec<u16>,
}

impl Packed {
    /// Packs `w` (`n` rows of `k`) in `format`, which must fit `k`.
    pub fn new(format: Format, w: &[f32], n: usize, k: usize) -> Packed {
        assert!(
            format != Format::F32 && format.fits(k) && w.len() == n * k,
            "bug: cannot pack {n} x {k} as {format:?}"
        );
        let mut p =
            Packed { format, n, k, transposed: false, halves: Vec::new(), quants: Vec::new(), scales: Vec::new() };
        match format {
            Format::Bf16 => p.halves = w.par_iter().with_min_len(1 << 16).map(|x| super::tiles::round(*x)).collect(),
            Format::Q8 | Format::Q4 => {
                let per_block = if format == Format::Q8 { BLOCK } else { BLOCK / 2 };
                let blocks = n * k / BLOCK;
                p.quants = vec![0; blocks * per_block];
                p.scales = vec![0; blocks];
                p.quants
                    .par_chunks_mut(per_block)
                    .zip(p.scales.par_iter_mut())
                    .zip(w.par_chunks(BLOCK))
                    .with_min_len(1 << 10)
                    .for_each(|((q, d), x)| *d = quantize_block(format, x, q));
            }
            Format::F32 => unreachable!(),
        }
        p
    }

    /// The weight as the right-hand side of bf16 tiles (`x @ W^T`), for
    /// products of many rows: where it is bf16 and the CPU multiplies bf16.
    pub fn bf16_tiles(&self, parallel: bool) -> Option<super::tiles::PackedB> {
        (self.format == Format::Bf16 && super::tiles::bf16_hardware() && self.k.is_multiple_of(2))
            .then(|| super::tiles::PackedB::from_rows(&self.halves, self.n, self.k, parallel))
    }

    /// The same, marked as packed from a weight's transpose (or not).
    pub fn transposed(mut self, transposed: bool) -> Packed {
        self.transposed = transposed;
        self
    }

    /// Row `j` as f32: what the products compute with.
    pub fn row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() >= self.k, "bug: row {j} of {} into {} floats", self.n, out.len());
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the host has AVX2 and F16C; row j exists and out holds k floats.
            return unsafe { avx2::row(self, j, out) };
        }
        self.portable_row(j, out)
    }

    /// `row` a weight at a time.
    fn portable_row(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match self.format {
            Format::Bf16 => {
                for (o, h) in out.iter_mut().zip(&self.halves[j * k..(j + 1) * k]) {
                    *o = f32::from_bits((*h as u32) << 16);
                }
            }
            Format::Q8 => {
                let first = j * k / BLOCK;
                for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let d = f16::from_bits(self.scales[first + b]).to_f32();
                    let q = &self.quants[(first + b) * BLOCK..(first + b + 1) * BLOCK];
                    for (o, q) in o.iter_mut().zip(q) {
                        *o = d * (*q as i8) as f32;
                    }
                }
            }
            Format::Q4 => {
                let first = j * k / BLOCK;
                let half = BLOCK / 2;
                for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let d = f16::from_bits(self.scales[first + b]).to_f32();
                    let q = &self.quants[(first + b) * half..(first + b + 1) * half];
                    let (lo, hi) = o.split_at_mut(half);
                    for i in 0..half {
                        lo[i] = d * ((q[i] & 15) as i32 - 8) as f32;
                        hi[i] = d * ((q[i] >> 4) as i32 - 8) as f32;
                    }
                }
            }
            Format::F32 => unreachable!(),
        }
    }

    /// Bytes the packed weight takes.
    pub fn bytes(&self) -> usize {
        2 * self.halves.len() + self.quants.len() + 2 * self.scales.len()
    }

    /// The stored arrays: bf16 bits, quants, f16 scale bits (each empty
    /// where the format has none), as `modelc quantize` writes them.
    pub fn parts(&self) -> (&[u16], &[u8], &[u16]) {
        (&self.halves, &self.quants, &self.scales)
    }

    /// A packed weight from its stored arrays, checked against its format
    /// and size (a file's bytes are not trusted).
    pub fn from_parts(
        format: Format,
        (n, k): (usize, usize),
        transposed: bool,
        (halves, quants, scales): (Vec<u16>, Vec<u8>, Vec<u16>),
    ) -> Result<Packed, String> {
        let weights = n.checked_mul(k).ok_or_else(|| format!("{n} x {k} weights overflow"))?;
        let want = match format {
            Format::F32 => return Err("f32 weights are not packed".into()),
            Format::Bf16 => (weights, 0, 0),
            Format::Q8 => (0, weights, weights / BLOCK),
            Format::Q4 => (0, weights / 2, weights / BLOCK),
        };
        let have = (halves.len(), quants.len(), scales.len());
        if !format.fits(k) || have != want {
            return Err(format!(
                "{} x {k} as {} needs (halves, quants, scales) of {want:?} elements, found {have:?}",
                n,
                format.name()
            ));
        }
        Ok(Packed { format, n, k, transposed, halves, quants, scales })
    }
}

/// Quantises 32 weights as llama.cpp does (its reference quantize_row_*),
/// returning the scale's f16 bits.
fn quantize_block(format: Format, x: &[f32], q: &mut [u8]) -> u16 {
    if format == Format::Q8 {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(x) {
            *q = (v * id).round() as i8 as u8;
        }
        return f16::from_f32(d).to_bits();
    }
    // q4: the value of largest magnitude, with its sign, maps to -8.
    let max = x.iter().fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for i in 0..BLOCK / 2 {
        let lo = ((x[i] * id + 8.5) as i32).min(15) as u8;
        let hi = ((x[i + BLOCK / 2] * id + 8.5) as i32).min(15) as u8;
        q[i] = lo | (hi << 4);
    }
    f16::from_f32(d).to_bits()
}

/// A matrix product's right-hand side, `k x n` as `op(B)`: f32 in memory at
/// strides, or a packed weight read as its transpose (`x @ W^T`).
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Dense(Operand),
    Packed(&'a Packed),
}

/// `c = alpha c + a op(B)` for `a` m x k and `c` m x n (row stride `c_rs`):
/// the matrix products of programs. A few rows against weight rows
/// (decoding) go a weight row at a time, read once (`matvec`); many rows
/// against a packed weight by panels; the rest in `tiles` (f32 or bf16
/// operands), or through gemm. `parallel`: the product may use the thread pool.
///
/// # Safety
/// Each operand covers its rows and columns at its strides; `c` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    alpha: f32,
    (a, a_rs, a_cs): Operand,
    b: Rhs,
    parallel: bool,
    tiles: Option<super::tiles::Kind>,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match b {
            Rhs::Dense(b) if let Some(kind) = tiles => {
                super::tiles::product((m, n, k), c, c_rs, alpha, (a, a_rs, a_cs), b, parallel, kind)
            }
            Rhs::Packed(w) => {
                assert!(a_cs == 1 && (w.n, w.k) == (n, k), "bug: a packed product's operands do not fit");
                if m <= SMALL_M {
                    matvec((m, n, k), (a, a_rs), (c, c_rs), alpha, Rows::Packed(w), parallel)
                } else if let Some(b) = w.bf16_tiles(parallel) {
                    // A prompt against bf16 weights: bf16 products, the
                    // activations rounded to bf16 too (as llama.cpp does).
                    super::tiles::product_packed(m, c, c_rs, alpha, (a, a_rs, 1), &b, parallel)
                } else if int8_tiles(w.format) {
                    // A prompt against q8 or q4 weights: int8 blocks against
                    // activations rounded as decoding rounds them.
                    #[cfg(target_arch = "x86_64")]
                    if amx::available() {
                        amx::product(m, (a, a_rs), (c, c_rs), alpha, w, parallel)
                    } else {
                        vnni_tiles::product(m, (a, a_rs), (c, c_rs), alpha, w, parallel)
                    }
                } else {
                    panels(m, (a, a_rs), (c, c_rs), alpha, w, parallel)
                }
            }
            Rhs::Dense((b, 1, b_cs)) if m <= SMALL_M && a_cs == 1 => {
                matvec((m, n, k), (a, a_rs), (c, c_rs), alpha, Rows::F32(b, b_cs), parallel)
            }
            Rhs::Dense(b) => {
                let threads = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
                kernels::product((m, n, k), c, c_rs, alpha, (a, a_rs, a_cs), b, threads)
            }
        }
    }
}

/// `c = a b` through gemm on all threads (what `product` does for many
/// rows): for benchmarks.
///
/// # Safety
/// As `product`.
pub unsafe fn gemm_product((m, n, k): (usize, usize, usize), c: *mut f32, c_rs: usize, a: Operand, b: Operand) {
    // SAFETY: the caller's contract.
    unsafe { kernels::product((m, n, k), c, c_rs, 0.0, a, b, gemm::Parallelism::Rayon(0)) }
}

/// Whether a product of this size is worth splitting over the thread pool:
/// from 2^18 multiply-adds, or, a few rows against weight rows, from 2^14
/// weights (waking the other threads costs a few microseconds).
pub fn worth_threads(m: usize, n: usize, k: usize) -> bool {
    m * n * k > 1 << 18 || (m <= SMALL_M && n * k >= 1 << 14)
}

/// Rows of the left operand up to which a product is computed a weight row
/// at a time (each weight read once, dequantised in registers) rather than
/// as a blocked matrix product (the rows up to which the kernel order
/// runs products sharing their left operand side by side, for `matvecs`).
pub const SMALL_M: usize = modelc::backend::order::FEW_ROWS;

/// `c = alpha c + a op(B)` for `a` m x k (row stride `a_rs`, contiguous
/// rows), `c` m x n (row stride `c_rs`), where column j of op(B) is the
/// contiguous row `w(j)` of k weights. Columns are split over the thread
/// pool when `parallel`.
///
/// # Safety
/// `a`, `c` and every weight row cover what they are read or written at;
/// `c` overlaps neither.
pub unsafe fn matvec(
    (m, n, k): (usize, usize, usize),
    a: (*const f32, usize),
    c: (*mut f32, usize),
    alpha: f32,
    rhs: Rows,
    parallel: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { matvecs((m, k), a, alpha, &[Target { n, c, rhs }], parallel) }
}

/// One of the products `matvecs` computes: `c` (m x n, row stride `c.1`)
/// from the n weight rows `rhs`.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub n: usize,
    pub c: (*mut f32, usize),
    pub rhs: Rows<'a>,
}

/// `matvec` for several products of the same `a` against weight rows of
/// the same format (a layer's q/k/v projections, its gate and up): the
/// activations rounded once, and the columns of all of them split over
/// the thread pool in one parallel section.
///
/// # Safety
/// As `matvec`, for every target; no `c` overlaps another or `a`.
pub unsafe fn matvecs((m, k): (usize, usize), a: (*const f32, usize), alpha: f32, targets: &[Target], parallel: bool) {
    let Some(first) = targets.first() else { return };
    assert!(targets.iter().all(|t| t.rhs.format() == first.rhs.format()), "bug: products of several formats at once");
    // q8 and q4 multiply activations rounded to int8 blocks, as llama.cpp
    // does: integer dot products where the host has them (AVX-512 VNNI, or
    // AVX2), else the rounded values as f32; rows of `a` are rounded once, here.
    let quantized: Vec<Activation> = match first.rhs.format() {
        Format::Q8 | Format::Q4 => (0..m)
            // SAFETY: row i of a holds k floats.
            .map(|i| Activation::new(unsafe { std::slice::from_raw_parts(a.0.add(i * a.1), k) }))
            .collect(),
        _ => Vec::new(),
    };
    let rounded: Vec<f32> = if quantized.is_empty() || integer_products() {
        Vec::new()
    } else {
        let mut rounded = Vec::with_capacity(m * k);
        quantized.iter().for_each(|x| x.values_into(&mut rounded));
        rounded
    };
    let a = if rounded.is_empty() { Shared(a.0 as *mut f32, a.1) } else { Shared(rounded.as_ptr() as *mut f32, k) };
    let quantized = &quantized;
    let columns = |t: &Target, j0: usize, j1: usize| {
        let c = Shared(t.c.0, t.c.1);
        // SAFETY: the caller's contract; tasks write disjoint columns of c.
        unsafe {
            match t.rhs {
                #[cfg(target_arch = "x86_64")]
                Rows::Packed(p) if !quantized.is_empty() && vnni() => {
                    vnni::columns(quantized, c.0, c.1, alpha, p, j0, j1)
                }
                #[cfg(target_arch = "x86_64")]
                Rows::Packed(p) if !quantized.is_empty() && avx2::available() => {
                    avx2::int_columns(quantized, c.0, c.1, alpha, p, j0, j1)
                }
                rhs => matvec_columns(m, k, a, c, alpha, rhs, j0, j1),
            }
        }
    };
    // Columns s..e of the targets' columns one after another.
    let span = |s: usize, e: usize| {
        let mut offset = 0;
        for t in targets {
            let (j0, j1) = (s.max(offset) - offset, e.min(offset + t.n).saturating_sub(offset));
            if j0 < j1 {
                columns(t, j0, j1);
            }
            offset += t.n;
        }
    };
    let total: usize = targets.iter().map(|t| t.n).sum();
    let tasks = if parallel { (rayon::current_num_threads() * 2).min(total / 16).max(1) } else { 1 };
    if tasks == 1 {
        span(0, total);
    } else {
        // Column ranges of whole 16s, so vector loads stay aligned to rows.
        let per = total.div_ceil(tasks).next_multiple_of(16);
        (0..total.div_ceil(per)).into_par_iter().for_each(|t| span(t * per, ((t + 1) * per).min(total)));
    }
}

/// Where a product's weight rows are: f32 rows `stride` apart, or packed.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(*const f32, usize),
    Packed(&'a Packed),
}

// SAFETY: the rows are only read.
unsafe impl Send for Rows<'_> {}
unsafe impl Sync for Rows<'_> {}

impl Rows<'_> {
    /// The rows' format (f32 for f32 rows).
    pub fn format(&self) -> Format {
        match self {
            Rows::F32(..) => Format::F32,
            Rows::Packed(p) => p.format,
        }
    }
}

// SAFETY: the target's rows are only read, and tasks write disjoint columns of its c.
unsafe impl Send for Target<'_> {}
unsafe impl Sync for Target<'_> {}

#[derive(Clone, Copy)]
struct Shared(*mut f32, usize);
// SAFETY: tasks read `a` and write disjoint columns of `c`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Element (i, j)'s address.
    fn at(&self, i: usize, j: usize) -> *mut f32 {
        self.0.wrapping_add(i * self.1 + j)
    }
}

/// The m rows of `a` (k each, row stride `a.1`) rounded to int8 blocks as
/// `matvec` rounds them; on the thread pool when `parallel`.
///
/// # Safety
/// `a` covers its rows.
unsafe fn round_rows(m: usize, k: usize, a: (*const f32, usize), parallel: bool) -> Vec<Activation> {
    let a = Shared(a.0 as *mut f32, a.1);
    // SAFETY: row i of a holds k floats.
    let round = |i: usize| Activation::new(unsafe { std::slice::from_raw_parts(a.at(i, 0), k) });
    if parallel { (0..m).into_par_iter().map(round).collect() } else { (0..m).map(round).collect() }
}

/// `tiles(t0, t1)` over tiles 0..count of a product's columns: on this
/// thread, or in a few runs a thread on the pool when `parallel`.
fn over_tiles(count: usize, parallel: bool, tiles: impl Fn(usize, usize) + Sync) {
    if !parallel {
        return tiles(0, count);
    }
    let per = count.div_ceil(rayon::current_num_threads() * 4).max(1);
    (0..count.div_ceil(per)).into_par_iter().for_each(|task| tiles(task * per, ((task + 1) * per).min(count)));
}

impl Packed {
    /// Row j of a q8 or q4 weight as int8 quants (q4's nibbles less 8).
    fn int8_row(&self, j: usize, out: &mut [i8]) {
        let k = self.k;
        match self.format {
            Format::Q8 => out.iter_mut().zip(&self.quants[j * k..(j + 1) * k]).for_each(|(o, q)| *o = *q as i8),
            Format::Q4 => {
                let half = BLOCK / 2;
                for (out, q) in out.chunks_exact_mut(BLOCK).zip(self.quants[j * k / 2..(j + 1) * k / 2].chunks(half)) {
                    for (i, q) in q.iter().enumerate() {
                        out[i] = (q & 15) as i8 - 8;
                        out[i + half] = (q >> 4) as i8 - 8;
                    }
                }
            }
            f => unreachable!("bug: {f:?} weights as int8"),
        }
    }
}

/// Columns j0..j1 of the product.
///
/// # Safety
/// As `matvec`.
#[allow(clippy::too_many_arguments)]
unsafe fn matvec_columns(m: usize, k: usize, a: Shared, c: Shared, alpha: f32, rhs: Rows, j0: usize, j1: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the host has AVX-512 (F, BW), FMA and F16C.
        unsafe { avx512::columns(m, k, a.0, a.1, c.0, c.1, alpha, rhs, j0, j1) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the host has AVX2, FMA and F16C; q8 and q4 rows went to
        // `avx2::int_columns` (`integer_products`).
        unsafe { avx2::columns(m, k, (a.0, a.1), (c.0, c.1), alpha, rhs, j0, j1) };
        return;
    }
    // SAFETY: as above.
    unsafe { generic_columns(m, k, a, c, alpha, rhs, j0, j1) }
}

/// `matvec_columns` in portable code (16 lanes that LLVM vectorises).
///
/// # Safety
/// As `matvec`.
#[allow(clippy::too_many_arguments)]
unsafe fn generic_columns(m: usize, k: usize, a: Shared, c: Shared, alpha: f32, rhs: Rows, j0: usize, j1: usize) {
    let mut row = vec![0f32; k];
    for j in j0..j1 {
        let w: &[f32] = match rhs {
            // SAFETY: row j of the weights holds k floats.
            Rows::F32(p, stride) => unsafe { std::slice::from_raw_parts(p.add(j * stride), k) },
            Rows::Packed(p) => {
                p.row(j, &mut row);
                &row
            }
        };
        for i in 0..m {
            // SAFETY: row i of a holds k floats; element (i, j) of c is the caller's.
            unsafe {
                let x = std::slice::from_raw_parts(a.0.add(i * a.1), k);
                put(c.0.add(i * c.1 + j), alpha, dot16(x, w));
            }
        }
    }
}

/// `*out = alpha *out + dot`, `out` not read where alpha is 0 (every
/// product path's store).
///
/// # Safety
/// `out` is an element of c.
#[inline(always)]
unsafe fn put(out: *mut f32, alpha: f32, dot: f32) {
    // SAFETY: the caller's contract.
    unsafe { *out = if alpha == 0.0 { dot } else { alpha * *out + dot } };
}

/// A dot product in 16 lanes (which vectorise), summed by halves.
fn dot16(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let (xt, wt) = (xc.remainder(), wc.remainder());
    for (x, w) in xc.zip(wc) {
        for l in 0..16 {
            acc[l] += x[l] * w[l];
        }
    }
    for (l, (x, w)) in xt.iter().zip(wt).enumerate() {
        acc[l] += x * w;
    }
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Whether the host runs the AVX-512 kernels (checked once).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("MODELC_NO_AVX512").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The products with AVX-512, a weight row at a time: each row follows
    //! the last in memory, so the weights are one stream. (Four rows at once,
    //! sharing each load of x, read at 10-12 GB/s here against 16-17 for one:
    //! four streams the prefetcher follows worse.)

    use super::{BLOCK, Format, Rows};
    use std::arch::x86_64::*;

    /// How far ahead of the weights being read the next are asked for, in
    /// bytes: the hardware's prefetcher stops at each 4 KiB page.
    const AHEAD: usize = 1024;

    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(
        m: usize,
        k: usize,
        a: *mut f32,
        a_rs: usize,
        c: *mut f32,
        c_rs: usize,
        alpha: f32,
        rhs: Rows,
        j0: usize,
        j1: usize,
    ) {
        for j in j0..j1 {
            for i in 0..m {
                // SAFETY: the caller's contract (row i of a, weight row j, element (i, j) of c).
                unsafe {
                    let x = a.add(i * a_rs);
                    let dot = match rhs {
                        Rows::F32(w, stride) => dense(x, k, w.add(j * stride)),
                        Rows::Packed(p) => match p.format {
                            Format::Bf16 => bf16(x, k, p.halves.as_ptr().add(j * k)),
                            Format::Q8 => q8(
                                x,
                                k,
                                p.quants.as_ptr().add(j * k) as *const i8,
                                p.scales.as_ptr().add(j * k / BLOCK),
                            ),
                            Format::Q4 => {
                                q4(x, k, p.quants.as_ptr().add(j * k / 2), p.scales.as_ptr().add(j * k / BLOCK))
                            }
                            Format::F32 => unreachable!("bug: f32 is not packed"),
                        },
                    };
                    super::put(c.add(i * c_rs + j), alpha, dot);
                }
            }
        }
    }

    /// Asks for the line at `p`. (A prefetch never faults, so the last rows
    /// may ask past their weights.)
    #[inline(always)]
    fn ahead<T>(p: *const T) {
        // SAFETY: prefetching reads nothing the program sees.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    /// Lanes of the last partial vector of a row of k.
    #[inline(always)]
    fn tail(k: usize) -> __mmask16 {
        ((1u32 << (k % 16)) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn dense(x: *const f32, k: usize, w: *const f32) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let full = k / 16 * 16;
        unsafe {
            for p in (0..full).step_by(16) {
                ahead(w.add(p + AHEAD / 4));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(p)), _mm512_loadu_ps(x.add(p)), acc);
            }
            if full < k {
                let mask = tail(k);
                let (wv, xv) = (_mm512_maskz_loadu_ps(mask, w.add(full)), _mm512_maskz_loadu_ps(mask, x.add(full)));
                acc = _mm512_fmadd_ps(wv, xv, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// bf16 bits to f32: the bits in the top half.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn widen(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx512f,avx512bw,fma")]
    #[inline]
    unsafe fn bf16(x: *const f32, k: usize, w: *const u16) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let full = k / 16 * 16;
        unsafe {
            for p in (0..full).step_by(16) {
                if p % 32 == 0 {
                    ahead(w.add(p + AHEAD / 2));
                }
                let h = _mm256_loadu_si256(w.add(p) as *const __m256i);
                acc = _mm512_fmadd_ps(widen(h), _mm512_loadu_ps(x.add(p)), acc);
            }
            if full < k {
                let mask = tail(k);
                let h = _mm256_maskz_loadu_epi16(mask, w.add(full) as *const i16);
                acc = _mm512_fmadd_ps(widen(h), _mm512_maskz_loadu_ps(mask, x.add(full)), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// A block's scale as a vector.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    fn scale(bits: u16) -> __m512 {
        _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))))
    }

    /// One row of q8 blocks (`q`: its quants, `d`: its scales).
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    #[inline]
    unsafe fn q8(x: *const f32, k: usize, q: *const i8, d: *const u16) -> f32 {
        let mut acc = _mm512_setzero_ps();
        unsafe {
            for b in 0..k / BLOCK {
                let qb = q.add(b * BLOCK);
                if b % 2 == 0 {
                    ahead(qb.add(AHEAD));
                }
                let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb as *const __m128i)));
                let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb.add(16) as *const __m128i)));
                let (x0, x1) = (_mm512_loadu_ps(x.add(b * BLOCK)), _mm512_loadu_ps(x.add(b * BLOCK + 16)));
                let s = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
                acc = _mm512_fmadd_ps(s, scale(*d.add(b)), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// One row of q4 blocks (`q`: its packed quants, `d`: its scales).
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    #[inline]
    unsafe fn q4(x: *const f32, k: usize, q: *const u8, d: *const u16) -> f32 {
        let mut acc = _mm512_setzero_ps();
        unsafe {
            let low = _mm_set1_epi8(15);
            let eight = _mm512_set1_epi32(8);
            for b in 0..k / BLOCK {
                let qb = q.add(b * BLOCK / 2);
                if b % 4 == 0 {
                    ahead(qb.add(AHEAD));
                }
                let bytes = _mm_loadu_si128(qb as *const __m128i);
                let lo = _mm_and_si128(bytes, low);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
                let w0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
                let w1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
                let (x0, x1) = (_mm512_loadu_ps(x.add(b * BLOCK)), _mm512_loadu_ps(x.add(b * BLOCK + 16)));
                let s = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
                acc = _mm512_fmadd_ps(s, scale(*d.add(b)), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// A row of activations rounded for q8/q4 products: blocks of 32 as int8
/// with an f32 scale each (`x ~ d q`, as llama.cpp's Q8_0 rounds them).
pub struct Activation {
    q: Vec<i8>,
    /// The same quants ordered as q4 rows unpack: per 4 blocks, the first 16
    /// of each block, then the last 16 of each (zeros past the last block).
    q4: Vec<i8>,
    /// Each block's scale (zeros after the last, to a whole 8).
    d: Vec<f32>,
    /// Each block's sum of quants times its scale: what the products'
    /// offsets (q8's +128, q4's -8) cost, taken off once per block (zeros
    /// after the last, to a whole 8).
    sums: Vec<f32>,
}

impl Activation {
    /// Rounds `x` (a whole number of blocks).
    pub fn new(x: &[f32]) -> Activation {
        let blocks = x.len() / BLOCK;
        let mut a = Activation {
            q: vec![0; x.len()],
            q4: vec![0; blocks.div_ceil(4) * 4 * BLOCK],
            d: vec![0.0; blocks.next_multiple_of(8)],
            sums: vec![0.0; blocks.next_multiple_of(8)],
        };
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the host has AVX2; `q` holds x.len() quants, d and sums a value a block.
            unsafe { avx2::round(x, &mut a.q, &mut a.d, &mut a.sums) };
        } else {
            round(x, &mut a.q, &mut a.d, &mut a.sums);
        }
        #[cfg(not(target_arch = "x86_64"))]
        round(x, &mut a.q, &mut a.d, &mut a.sums);
        let half = BLOCK / 2;
        for (b, q) in a.q.chunks_exact(BLOCK).enumerate() {
            let at = (b / 4) * 4 * BLOCK + (b % 4) * half;
            a.q4[at..at + half].copy_from_slice(&q[..half]);
            a.q4[at + 2 * BLOCK..at + 2 * BLOCK + half].copy_from_slice(&q[half..]);
        }
        a
    }

    /// The rounded values as f32.
    pub fn values(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.q.len());
        self.values_into(&mut out);
        out
    }

    /// Appends the rounded values as f32 to `out`.
    pub fn values_into(&self, out: &mut Vec<f32>) {
        for (q, d) in self.q.chunks_exact(BLOCK).zip(&self.d) {
            out.extend(q.iter().map(|q| d * *q as f32));
        }
    }
}

/// Each block of 32 values of `x` as int8 quants `q` with the scale `d =
/// max |x| / 127`, and the block's sum of quants times its scale
/// (`Activation::new`; `avx2::round` the same eight lanes at a time).
fn round(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [f32]) {
    for (b, (x, q)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(x) {
            // Rounded half away from zero, as `f32::round` does, without its libm
            // call (the crate targets baseline x86-64): |v id| <= 127, so
            // the fraction is exact.
            let r = v * id;
            let t = r as i32;
            let frac = r - t as f32;
            *q = (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)) as i8;
            sum += *q as i32;
        }
        d[b] = scale;
        sums[b] = sum as f32 * scale;
    }
}

/// Whether a prompt against `format` weights multiplies int8 blocks in
/// tiles (AMX-INT8, else AVX-512 VNNI).
fn int8_tiles(format: Format) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(format, Format::Q8 | Format::Q4) && (amx::available() || vnni_tiles::available());
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the host has the integer dot products (AVX-512 VNNI, on 256-bit
/// vectors) the q8 and q4 products use.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        avx512() && std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni() -> bool {
    false
}

/// Whether q8 and q4 rows meet rounded activations in integers (AVX-512
/// VNNI, or AVX2), not as f32 values.
fn integer_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return vnni() || avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    //! q8 and q4 rows against rounded activations in integers: per block of
    //! 32, one `vpdpbusd` (unsigned bytes times signed bytes, summed by
    //! fours into 8 lanes), then the lanes scaled by the two blocks' scales
    //! into a float sum. The unsigned side is the weight: q8's quants plus
    //! 128 (a flip of the sign bit), q4's nibbles as they are (the value
    //! plus 8); the offset times the activations' block sum is taken off
    //! once per block, in floats.

    use super::{Activation, BLOCK, Format, Packed};
    use std::arch::x86_64::*;

    /// Columns j0..j1 of `c = alpha c + x W^T` for each rounded row `x`.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx512bw,fma,f16c")]
    pub unsafe fn columns(xs: &[Activation], c: *mut f32, c_rs: usize, alpha: f32, w: &Packed, j0: usize, j1: usize) {
        let k = w.k;
        let blocks = k / BLOCK;
        for j in j0..j1 {
            // SAFETY: row j's scales and quants; element (i, j) of c.
            unsafe {
                let d = w.scales.as_ptr().add(j * blocks);
                for (i, x) in xs.iter().enumerate() {
                    // The offsets' cost, Σ_b dw_b sums_b, sixteen blocks at a time.
                    let mut offsets = _mm512_setzero_ps();
                    for g in (0..blocks).step_by(16) {
                        let mask = (((1u32 << (blocks - g).min(16)) - 1) & 0xffff) as __mmask16;
                        let mask = if blocks - g >= 16 { 0xffff } else { mask };
                        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d.add(g) as *const i16));
                        offsets = _mm512_fmadd_ps(dw, _mm512_maskz_loadu_ps(mask, x.sums.as_ptr().add(g)), offsets);
                    }
                    let offset = _mm512_reduce_add_ps(offsets);
                    let dot = match w.format {
                        Format::Q8 => q8(x, w.quants.as_ptr().add(j * k) as *const i8, d, blocks) - 128.0 * offset,
                        _ => q4(x, w.quants.as_ptr().add(j * k / 2), d, blocks) - 8.0 * offset,
                    };
                    super::put(c.add(i * c_rs + j), alpha, dot);
                }
            }
        }
    }

    /// The scales of blocks 8g .. 8g + 8 (the weight's times the
    /// activations'; 0 past the last block), as a vector's low half.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c")]
    #[inline]
    unsafe fn group_scales(d: *const u16, g: usize, blocks: usize, x: &Activation) -> __m512 {
        let n = (blocks - 8 * g).min(8);
        let mask = ((1u32 << n) - 1) as __mmask8;
        // SAFETY: the row's scales and the activations' of the group's blocks.
        unsafe {
            let dw = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(mask, d.add(8 * g) as *const i16));
            _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_maskz_loadu_ps(mask, x.d.as_ptr().add(8 * g))))
        }
    }

    /// For the p-th pair of blocks in a group of 8: lanes 0-7 take scale 2p,
    /// lanes 8-15 scale 2p + 1 (a `vpdpbusd` over two blocks sums each
    /// block's bytes into 8 lanes).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn pairs() -> [__m512i; 4] {
        std::array::from_fn(|p| {
            let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
        })
    }

    /// Σ_b dw_b dx_b Σ (q_w + 128) q_x over a q8 row, two blocks a step.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx512bw,fma")]
    #[inline]
    unsafe fn q8(x: &Activation, q: *const i8, d: *const u16, blocks: usize) -> f32 {
        let (xq, pairs) = (x.q.as_ptr(), pairs());
        let flip = _mm512_set1_epi8(-128);
        let (mut acc, mut group) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // SAFETY: blocks 2p, 2p + 1 of the row and of the activations; an odd
        // last block is read as half a vector.
        unsafe {
            for p in 0..blocks.div_ceil(2) {
                if p % 4 == 0 {
                    group = group_scales(d, p / 4, blocks, x);
                }
                _mm_prefetch::<_MM_HINT_T0>(q.add(p * 2 * BLOCK + 1024));
                let mask: __mmask64 = if 2 * p + 1 < blocks { !0 } else { (1 << BLOCK) - 1 };
                let w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q.add(p * 2 * BLOCK)), flip);
                let xv = _mm512_maskz_loadu_epi8(mask, xq.add(p * 2 * BLOCK));
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                let scale = _mm512_permutexvar_ps(pairs[p % 4], group);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// Σ_b dw_b dx_b Σ (q_w + 8) q_x over a q4 row, four blocks a step: the
    /// 64 bytes of four blocks hold their first halves in the low nibbles
    /// and their second halves in the high ones, so the two masked nibble
    /// vectors meet the activations in `Activation::q4`'s order with no
    /// shuffle, and two `vpdpbusd` leave each block's sum in 4 lanes.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx512bw,fma")]
    #[inline]
    unsafe fn q4(x: &Activation, q: *const u8, d: *const u16, blocks: usize) -> f32 {
        let xq = x.q4.as_ptr();
        let low = _mm512_set1_epi8(15);
        // Lanes 4b..4b+3 take block b of the step's four: scales 4h+b of the group's eight.
        let quads: [__m512i; 2] = std::array::from_fn(|h| {
            let b = |i: i32| 4 * h as i32 + i;
            _mm512_set_epi32(
                b(3),
                b(3),
                b(3),
                b(3),
                b(2),
                b(2),
                b(2),
                b(2),
                b(1),
                b(1),
                b(1),
                b(1),
                b(0),
                b(0),
                b(0),
                b(0),
            )
        });
        let (mut acc, mut group) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // SAFETY: blocks 4s.. of the row (16 bytes each, the last step's masked
        // to the blocks there are) and the activations' 128 bytes of the step.
        unsafe {
            for step in 0..blocks.div_ceil(4) {
                if step % 2 == 0 {
                    group = group_scales(d, step / 2, blocks, x);
                }
                _mm_prefetch::<_MM_HINT_T0>(q.add(step * 2 * BLOCK + 1024) as *const i8);
                let here = (blocks - 4 * step).min(4);
                let mask: __mmask64 = if here == 4 { !0 } else { (1u64 << (16 * here)) - 1 };
                let bytes = _mm512_maskz_loadu_epi8(mask, q.add(step * 2 * BLOCK) as *const i8);
                let lo = _mm512_and_si512(bytes, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
                let x_lo = _mm512_loadu_si512(xq.add(step * 4 * BLOCK) as *const __m512i);
                let x_hi = _mm512_loadu_si512(xq.add(step * 4 * BLOCK + 2 * BLOCK) as *const __m512i);
                let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x_lo), hi, x_hi);
                let scale = _mm512_permutexvar_ps(quads[step % 2], group);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// `c = a W^T` for a packed `W` when `a` has many rows (a prompt): the
/// weight's rows dequantised into the running thread's buffer, as many as
/// CHUNK floats hold (all of a small model's), then multiplied by one gemm
/// product. (Panels of 64 rows, each its own product, packed all of `a`
/// again for every panel: a stories15M q8 prompt ran at 0.6x its f32 one.)
///
/// # Safety
/// `a` (m x k, row stride `a_rs`) and `c` (m x n, row stride `c_rs`) cover
/// their elements; `c` overlaps neither.
pub unsafe fn panels(m: usize, a: (*const f32, usize), c: (*mut f32, usize), alpha: f32, w: &Packed, parallel: bool) {
    /// Floats of dequantised weight at a time (16 MiB).
    const CHUNK: usize = 1 << 22;
    // SAFETY: the caller's contract.
    unsafe { panels_of(m, a, c, alpha, w, parallel, CHUNK) }
}

/// `panels`, dequantising `chunk` floats of the weight at a time.
///
/// # Safety
/// As `panels`.
unsafe fn panels_of(
    m: usize,
    a: (*const f32, usize),
    c: (*mut f32, usize),
    alpha: f32,
    w: &Packed,
    parallel: bool,
    chunk: usize,
) {
    let (n, k) = (w.n, w.k);
    // q8 and q4 multiply activations rounded as `matvec` rounds them, so
    // that a prompt and the tokens after it compute alike.
    let mut rounded: Vec<f32> = Vec::new();
    if matches!(w.format, Format::Q8 | Format::Q4) {
        rounded.reserve_exact(m * k);
        for i in 0..m {
            // SAFETY: row i of a holds k floats.
            Activation::new(unsafe { std::slice::from_raw_parts(a.0.add(i * a.1), k) }).values_into(&mut rounded);
        }
    }
    let a = if rounded.is_empty() { a } else { (rounded.as_ptr(), k) };
    let rows = (chunk / k.max(1)).clamp(1, n.max(1));
    let threads = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // Taken, not borrowed: while gemm's threads work, this thread may take
    // up another task that comes here.
    let mut buf = PANEL_BUFFER.take();
    for j0 in (0..n).step_by(rows) {
        let j1 = (j0 + rows).min(n);
        buf.resize((j1 - j0) * k, 0.0);
        let dequantise = |(r, out): (usize, &mut [f32])| w.row(j0 + r, out);
        if parallel {
            buf.par_chunks_mut(k).enumerate().for_each(dequantise);
        } else {
            buf.chunks_mut(k).enumerate().for_each(dequantise);
        }
        // SAFETY: columns j0..j1 of c; the buffer holds j1 - j0 rows of k.
        unsafe {
            kernels::product((m, j1 - j0, k), c.0.add(j0), c.1, alpha, (a.0, a.1, 1), (buf.as_ptr(), 1, k), threads)
        }
    }
    PANEL_BUFFER.set(buf);
}

thread_local! {
    static PANEL_BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A prompt's product against packed weights: `(m, a, c, alpha, w, parallel)`.
#[cfg(all(test, target_arch = "x86_64"))]
type PromptProduct = unsafe fn(usize, (*const f32, usize), (*mut f32, usize), f32, &Packed, bool);

/// An int8 prompt product (`amx::product`, `vnni_tiles::product`) equals
/// the rounded operands' product (`panels`: dequantised weights,
/// activations rounded alike, in f32) to float rounding, at edges of
/// tiles: 37 rows, 45 weight rows, 3 blocks; q8 and q4; overwriting c and
/// adding to it, on one thread and on the pool.
#[cfg(all(test, target_arch = "x86_64"))]
fn int8_prompt_agrees(product: PromptProduct) {
    let (m, n, k) = (37, 45, 96);
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
    let start: Vec<f32> = (0..m * n).map(|_| next()).collect();
    for format in [Format::Q8, Format::Q4] {
        let packed = Packed::new(format, &w, n, k);
        for (alpha, parallel) in [(0.0, false), (1.0, true), (0.5, false)] {
            let (mut ours, mut want) = (start.clone(), start.clone());
            // SAFETY: a is m x k, c m x n, both contiguous.
            unsafe {
                product(m, (a.as_ptr(), k), (ours.as_mut_ptr(), n), alpha, &packed, parallel);
                panels_of(m, (a.as_ptr(), k), (want.as_mut_ptr(), n), alpha, &packed, false, 1 << 22);
            }
            for (i, (x, y)) in ours.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{format:?} alpha {alpha}: c[{i}] {x} vs {y}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture's matrix and its encodings by llama.cpp's reference
    /// quantisers (`tests/quant_fixtures.py`).
    fn fixture() -> (Vec<f32>, usize, usize, std::collections::HashMap<String, Vec<u8>>) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/quant/blocks.safetensors");
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("w").unwrap();
        let (n, k) = (w.shape()[0], w.shape()[1]);
        let data = w.data().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let enc =
            ["bf16", "q8_0", "q4_0"].iter().map(|e| (e.to_string(), st.tensor(e).unwrap().data().to_vec())).collect();
        (data, n, k, enc)
    }

    /// A packed weight in llama.cpp's byte layout: per block, the f16 scale then the quants.
    fn ggml_bytes(p: &Packed) -> Vec<u8> {
        if p.format == Format::Bf16 {
            return p.halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        }
        let per = p.quants.len() / p.scales.len();
        p.scales
            .iter()
            .enumerate()
            .flat_map(|(b, d)| d.to_le_bytes().into_iter().chain(p.quants[b * per..(b + 1) * per].iter().copied()))
            .collect()
    }

    #[test]
    fn stored_parts_read_back_and_damaged_ones_are_refused() {
        let w: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        for format in [Format::Bf16, Format::Q8, Format::Q4] {
            let p = Packed::new(format, &w, 2, 64);
            let (h, q, d) = p.parts();
            let back = Packed::from_parts(format, (2, 64), false, (h.to_vec(), q.to_vec(), d.to_vec())).unwrap();
            assert_eq!(back, p);
            let short = Packed::from_parts(
                format,
                (2, 64),
                false,
                (h[h.len().min(1)..].to_vec(), q[q.len().min(1)..].to_vec(), d.to_vec()),
            );
            assert!(short.is_err(), "{format:?}");
        }
        assert!(Packed::from_parts(Format::Q8, (1, 33), false, (vec![], vec![0; 33], vec![0; 1])).is_err());
        assert!(Packed::from_parts(Format::Q8, (usize::MAX, 2), false, (vec![], vec![], vec![])).is_err());
    }

    #[test]
    fn packing_matches_llama_cpp_bit_for_bit() {
        let (w, n, k, enc) = fixture();
        for (format, name) in [(Format::Bf16, "bf16"), (Format::Q8, "q8_0"), (Format::Q4, "q4_0")] {
            let p = Packed::new(format, &w, n, k);
            assert_eq!(ggml_bytes(&p), enc[name], "{name}");
            assert_eq!(p.bytes(), enc[name].len(), "{name}");
        }
    }

    #[test]
    fn dequantised_rows_stay_within_half_a_step() {
        let (w, n, k, _) = fixture();
        for format in [Format::Bf16, Format::Q8, Format::Q4] {
            let p = Packed::new(format, &w, n, k);
            let mut row = vec![0f32; k];
            for j in 0..n {
                p.row(j, &mut row);
                for (b, (got, want)) in row.chunks(BLOCK).zip(w[j * k..(j + 1) * k].chunks(BLOCK)).enumerate() {
                    let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Half a step of the block's grid (q4: a whole step at the clamped
                    // end, opposite the value that set the scale), plus the f16 scale's
                    // rounding (2^-11 of the scale, times a quant of at most amax / scale).
                    let bound = match format {
                        Format::Bf16 => amax / 256.0,
                        Format::Q8 => amax / 127.0 / 2.0 + amax / 2048.0,
                        _ => amax / 8.0 + amax / 2048.0,
                    };
                    for (g, v) in got.iter().zip(want) {
                        assert!((g - v).abs() <= bound * 1.0001, "{format:?} row {j} block {b}: {g} vs {v}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_the_same_bits_with_and_without_avx2() {
        let (w, n, k, _) = fixture();
        // bf16 rows also at a length that is not a multiple of 8 (the tail).
        let odd: Vec<f32> = w[..n * 13].to_vec();
        for (format, w, k) in
            [(Format::Bf16, &w, k), (Format::Bf16, &odd, 13), (Format::Q8, &w, k), (Format::Q4, &w, k)]
        {
            let p = Packed::new(format, w, n, k);
            let (mut fast, mut plain) = (vec![0f32; k], vec![0f32; k]);
            for j in 0..n {
                p.row(j, &mut fast);
                p.portable_row(j, &mut plain);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&plain), "{format:?} row {j} of {k}");
            }
        }
    }

    #[test]
    fn activations_round_alike_with_and_without_avx2() {
        // Random blocks, a block of zeros, and values that land exactly on
        // halves once scaled (ties round away from zero on both paths).
        let mut x: Vec<f32> = (0..32 * 9).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 3.0).collect();
        x[32..64].fill(0.0);
        // Scale 1: -127, then -14.5, -13.5, ..., 15.5.
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = if i == 0 { -127.0 } else { i as f32 - 15.5 };
        }
        let (mut q, mut d, mut sums) = (vec![0i8; x.len()], vec![0f32; 9], vec![0f32; 9]);
        round(&x, &mut q, &mut d, &mut sums);
        assert_eq!(q[64..68], [-127, -15, -14, -13], "ties round away from zero");
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let (mut q2, mut d2, mut sums2) = (vec![0i8; x.len()], vec![0f32; 9], vec![0f32; 9]);
            // SAFETY: the host has AVX2; the buffers hold 9 blocks.
            unsafe { avx2::round(&x, &mut q2, &mut d2, &mut sums2) };
            assert_eq!(q, q2);
            assert_eq!(d, d2);
            assert_eq!(sums, sums2);
        }
    }

    /// Every product path (AVX-512 and AVX2 where the host has them,
    /// portable, one or several tasks, alpha 0 or 1) against a plain f64
    /// sum over the dequantised rows.
    #[test]
    fn products_match_the_dequantised_sums() {
        let mut seed = 1u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (n, k) in [(37, 64), (131, 96), (16, 40), (300, 288), (5, 448), (3, 1024)] {
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            for format in [Format::F32, Format::Bf16, Format::Q8, Format::Q4] {
                if !format.fits(k) {
                    continue;
                }
                let packed = (format != Format::F32).then(|| Packed::new(format, &w, n, k));
                let dense: Vec<f32> = match &packed {
                    Some(p) => (0..n)
                        .flat_map(|j| {
                            let mut r = vec![0f32; k];
                            p.row(j, &mut r);
                            r
                        })
                        .collect(),
                    None => w.clone(),
                };
                for m in [1, 3, SMALL_M + 5] {
                    let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                    let start: Vec<f32> = (0..m * n).map(|_| rand()).collect();
                    // q8 and q4 multiply the activations rounded to int8 blocks;
                    // bf16 against many rows (a prompt), rounded to bf16 where
                    // the CPU multiplies bf16 (`super::super::bf16`).
                    let x: Vec<f32> = match format {
                        Format::Q8 | Format::Q4 => a.chunks(k).flat_map(|r| Activation::new(r).values()).collect(),
                        Format::Bf16 if m > SMALL_M && super::super::tiles::bf16_hardware() && k.is_multiple_of(2) => {
                            a.iter().map(|v| f32::from_bits((super::super::tiles::round(*v) as u32) << 16)).collect()
                        }
                        _ => a.clone(),
                    };
                    // `panels` (the chunks) multiplies bf16 weights in f32,
                    // the activations as they are.
                    let x_chunks = if format == Format::Bf16 { &a } else { &x };
                    for alpha in [0.0, 1.0] {
                        let sums = |x: &[f32]| -> Vec<f64> {
                            (0..m * n)
                                .map(|e| {
                                    let (i, j) = (e / n, e % n);
                                    let dot: f64 = (0..k).map(|p| x[i * k + p] as f64 * dense[j * k + p] as f64).sum();
                                    alpha as f64 * start[e] as f64 + dot
                                })
                                .collect()
                        };
                        let (want, want_chunks) = (sums(&x), sums(x_chunks));
                        let rhs = match &packed {
                            Some(p) => Rhs::Packed(p),
                            None => Rhs::Dense((w.as_ptr(), 1, k)),
                        };
                        let mut runs: Vec<(&str, Vec<f32>)> = Vec::new();
                        for parallel in [false, true] {
                            let mut c = start.clone();
                            // SAFETY: a is m x k, c m x n, the weights n x k.
                            unsafe {
                                product((m, n, k), c.as_mut_ptr(), n, alpha, (a.as_ptr(), k, 1), rhs, parallel, None)
                            };
                            runs.push(("product", c));
                        }
                        if let Some(p) = packed.as_ref().filter(|_| m > SMALL_M) {
                            // Chunks of 7 rows of the weight (a prompt's products take
                            // up to 16 MiB at once).
                            let mut c = start.clone();
                            // SAFETY: as above.
                            unsafe { panels_of(m, (a.as_ptr(), k), (c.as_mut_ptr(), n), alpha, p, true, 7 * k) };
                            runs.push(("chunks", c));
                        }
                        if m <= SMALL_M {
                            let rows = match &packed {
                                Some(p) => Rows::Packed(p),
                                None => Rows::F32(w.as_ptr(), k),
                            };
                            let mut c = start.clone();
                            let (sa, sc) = (Shared(x.as_ptr() as *mut f32, k), Shared(c.as_mut_ptr(), n));
                            // SAFETY: as above.
                            unsafe { generic_columns(m, k, sa, sc, alpha, rows, 0, n) };
                            runs.push(("portable", c));
                            #[cfg(target_arch = "x86_64")]
                            if avx2::available() {
                                let mut c = start.clone();
                                // SAFETY: the host has AVX2; the operands as above.
                                unsafe {
                                    match &packed {
                                        Some(p) if matches!(p.format, Format::Q8 | Format::Q4) => {
                                            let xs: Vec<Activation> = a.chunks(k).map(Activation::new).collect();
                                            avx2::int_columns(&xs, c.as_mut_ptr(), n, alpha, p, 0, n)
                                        }
                                        _ => {
                                            avx2::columns(m, k, (x.as_ptr(), k), (c.as_mut_ptr(), n), alpha, rows, 0, n)
                                        }
                                    }
                                }
                                runs.push(("avx2", c));
                            }
                        }
                        for (how, c) in runs {
                            let want = if how == "chunks" { &want_chunks } else { &want };
                            for (e, (g, v)) in c.iter().zip(want).enumerate() {
                                assert!(
                                    (*g as f64 - v).abs() < 1e-4 * (1.0 + v.abs()),
                                    "{format:?} {how} m {m} n {n} k {k} alpha {alpha} [{e}]: {g} vs {v}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Products of one left operand in one section (`matvecs`, columns
    /// split across their boundaries) give each product's own values.
    #[test]
    fn products_sharing_their_rows_match_each_alone() {
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
        let (k, ns) = (288, [37, 16, 131]);
        let a: Vec<f32> = (0..2 * k).map(|i| value(i * 31 + 5)).collect();
        let weights: Vec<Vec<f32>> =
            ns.iter().enumerate().map(|(t, n)| (0..n * k).map(|i| value(i + t)).collect()).collect();
        for format in [Format::F32, Format::Bf16, Format::Q8, Format::Q4] {
            let packs: Vec<Packed> = match format {
                Format::F32 => Vec::new(),
                _ => weights.iter().zip(ns).map(|(w, n)| Packed::new(format, w, n, k)).collect(),
            };
            let rows = |t: usize| match format {
                Format::F32 => Rows::F32(weights[t].as_ptr(), k),
                _ => Rows::Packed(&packs[t]),
            };
            for (m, parallel) in [(1, false), (1, true), (2, true)] {
                let mut alone: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
                let mut together = alone.clone();
                for (t, (c, n)) in alone.iter_mut().zip(ns).enumerate() {
                    // SAFETY: a is m x k, c m x n, the rows n of k.
                    unsafe { matvec((m, n, k), (a.as_ptr(), k), (c.as_mut_ptr(), n), 0.0, rows(t), parallel) };
                }
                let targets: Vec<Target> = (together.iter_mut().zip(ns).enumerate())
                    .map(|(t, (c, n))| Target { n, c: (c.as_mut_ptr(), n), rhs: rows(t) })
                    .collect();
                // SAFETY: as above, for each target.
                unsafe { matvecs((m, k), (a.as_ptr(), k), 0.0, &targets, parallel) };
                assert_eq!(alone, together, "{format:?}, {m} rows");
            }
        }
    }
}
