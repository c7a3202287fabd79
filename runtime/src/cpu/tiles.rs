//! Matrix products in tiles, on AVX-512: f32 operands with FMAs, or bf16
//! operands with f32 sums (`--precision bf16`).
//!
//! bf16: both operands are rounded to bf16 (to nearest, ties to even) as
//! they are packed, and the products are summed in f32, as PyTorch's bf16
//! autocast does. Where the CPU has AVX512_BF16, one `vdpbf16ps` multiplies
//! 16 pairs of bf16 and adds each pair's sum into one of 16 f32 sums: twice
//! the multiply-adds of an f32 FMA. Elsewhere the same packed operands are
//! multiplied in f32 arithmetic: the same numbers (up to the order of the
//! sums), more slowly. Where it has AMX (`amx.rs`), the tiles are 32 x 32
//! on its tile registers, from the same packed operands. f32: the operands as they are, one FMA per element
//! (where the CPU has AVX-512; elsewhere products go through `gemm`).
//!
//! The loops are BLIS's. `c` is computed in tiles of `MR x NR`; for each
//! block of the depth, a panel of `b` (`KC x NC`) is packed, then for each
//! block of `MC` rows of `a` the rows are packed and every tile of the
//! block computed. A packed element is a u32: an f32, or a pair of bf16
//! along the depth (`k`, `k + 1`), the even one in the low half, which is
//! what `vdpbf16ps` multiplies. `b` is packed in strips of NR columns,
//! element by element (`[p][j]`), so that a tile loads each element's NR
//! columns as two vectors; `a` in strips of MR rows, either row by row
//! (`[i][p]`, when its rows are contiguous, a plain copy or conversion) or
//! element by element (`[p][i]`, when its columns are: the transposed
//! operands of weight gradients).
//!
//! The product is split over the thread pool into blocks of rows or of
//! columns (whichever is longer), each packing its own operands, or into
//! parts of a long depth summed at the end. A right-hand side many blocks
//! multiply (a weight in a row group, the output layer's weight in every
//! row chunk, a model's weights in every run of an inference program) is
//! packed once beforehand (`PackedB`).

use super::kernels::Operand;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    //! No AMX off x86-64.
    pub const ROWS: usize = 32;
    pub const DEPTH: usize = 16;
    pub fn available() -> bool {
        false
    }
    pub fn configure() {}
    pub fn release() {}
}

/// Rows of a tile: 12 x 2 vectors of f32 sums, 24 of the 32 registers.
const MR: usize = 12;
/// Columns of a tile: two vectors of 16.
const NR: usize = 32;
/// The longest block of the depth, in packed elements (u32). bf16: a
/// strip of `b` (KC_BF16 x NR pairs, 20 KiB) stays in the level-1 cache
/// while a block's tiles read it. f32: longer blocks, each tile's sums
/// written fewer times, were faster (MiniLM's products, depth 384 and
/// 1536: 160 -> 512 elements, 3-5%) though a strip leaves level 1.
const KC_BF16: usize = 160;
const KC_F32: usize = 512;
/// Rows of `a` packed at a time, at most: 24 strips (180 KiB, in the
/// level-2 cache); a block's rows are split evenly into such blocks.
const MC: usize = MR * 24;
/// A product with this many times more columns than rows is computed
/// transposed (`product_on`).
const WIDE: usize = 4;
/// Parts a long depth is split into (`depth_split`).
const DEPTH_PARTS: usize = 4;
/// Columns of `b` packed at a time (a panel of 2.5 MiB at most).
const NC: usize = NR * 128;

/// How a strip of `a` is laid out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// `[i][p]`: each row's elements in order (rows of `a` contiguous).
    RowWise,
    /// `[p][i]`: each element's MR rows together (columns of `a` contiguous).
    DepthWise,
}

/// What the packed operands hold, and how a tile multiplies them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// f32 as they are, multiplied by AVX-512 FMAs (`f32_hardware()`).
    F32,
    /// Pairs of bf16 along the depth, multiplied by `vdpbf16ps` (`bf16_hardware()`).
    Bf16,
    /// Pairs of bf16, multiplied in portable f32 arithmetic.
    Bf16Portable,
    /// Pairs of bf16 multiplied by AMX tiles (`amx::available()`): 32 x 32
    /// outputs, 16 pairs deep, a step.
    Amx,
}

impl Kind {
    /// bf16 products as this host computes them.
    pub fn bf16() -> Kind {
        if amx::available() {
            Kind::Amx
        } else if bf16_hardware() {
            Kind::Bf16
        } else {
            Kind::Bf16Portable
        }
    }

    /// Depth elements in one packed u32.
    fn depth(self) -> usize {
        if self == Kind::F32 { 1 } else { 2 }
    }

    /// Packed elements of a depth block of `kd`: AMX tiles load them 16 at
    /// a time, so its strips run on in zeros to a multiple of 16.
    fn units(self, kd: usize) -> usize {
        let units = kd.div_ceil(self.depth());
        if self == Kind::Amx { units.next_multiple_of(amx::DEPTH) } else { units }
    }

    /// Rows of `a` a tile multiplies.
    fn rows(self) -> usize {
        if self == Kind::Amx { amx::ROWS } else { MR }
    }
}

/// Whether the host multiplies bf16 in hardware (checked once).
pub fn bf16_hardware() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("MODELC_NO_AVX512").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the host multiplies bf16 on AMX tiles (`Kind::Amx`; checked once).
pub fn amx_hardware() -> bool {
    amx::available()
}

/// Whether the host has AVX-512 for f32 products (`Kind::F32`; checked once).
pub fn f32_hardware() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("MODELC_NO_AVX512").is_none() && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Rounds to bf16 (nearest even), as `vcvtneps2bf16` does (NaN stays NaN).
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn widen(h: u32) -> f32 {
    f32::from_bits(h << 16)
}

/// `c = alpha c + a b` with operands of `kind` (`alpha` 0 overwrites
/// `c`), for `a` m x k, `b` k x n and `c` m x n row-major with row stride
/// `c_rs`. `parallel`: split over the thread pool.
///
/// # Safety
/// Each operand covers its rows and columns at its strides; `c` overlaps
/// neither input; `kind` is one the host has (`Kind::F32` only where
/// `f32_hardware()`, `Kind::Bf16` where `bf16_hardware()`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    parallel: bool,
    kind: Kind,
) {
    // SAFETY: the caller's contract.
    unsafe { product_on((m, n, k), c, (c_rs, 1), alpha, a, Rhs::Pack(b), parallel, kind) }
}

/// `product` against a `b` packed beforehand: `c = alpha c + a b` for `a`
/// m x k (at its strides) and `c` m x n.
///
/// # Safety
/// As `product`.
pub unsafe fn product_packed(m: usize, c: *mut f32, c_rs: usize, alpha: f32, a: Operand, b: &PackedB, parallel: bool) {
    // SAFETY: the caller's contract.
    unsafe { product_on((m, b.n, b.k), c, (c_rs, 1), alpha, a, Rhs::Packed(b), parallel, b.kind) }
}

/// The length of each block of a depth of `k` (whole packed elements, and
/// the blocks of nearly equal lengths).
fn depth_block(k: usize, kind: Kind) -> usize {
    let units = k.div_ceil(kind.depth());
    let most = if kind == Kind::F32 { KC_F32 } else { KC_BF16 };
    let per = units.div_ceil(units.div_ceil(most).max(1));
    kind.units(per * kind.depth()) * kind.depth()
}

/// A right-hand side `b` (k x n) packed once for many products: a weight
/// that every block of rows of a row group multiplies. Every panel of NC
/// columns of every block of the depth, each in a slot of its own.
pub struct PackedB {
    k: usize,
    n: usize,
    kc: usize,
    /// u32 a slot holds: elements of a depth block by the columns of a panel.
    slot: usize,
    panels: usize,
    /// The slots from `data[start]`, on a cache line's boundary.
    data: Vec<u32>,
    start: usize,
    kind: Kind,
}

/// `v` grown to hold `len` u32 from a 64-byte boundary, and that part: a
/// strip's rows then start on cache lines, and an AMX tile's 64-byte rows
/// or a 16-lane load never straddle two (which made AMX tiles 3x slower).
/// (It only grows: what it holds is overwritten by the packing, and
/// shrinking would have the next growth zero it all again.)
fn aligned(v: &mut Vec<u32>, len: usize) -> (&mut [u32], usize) {
    if v.len() < len + 15 {
        v.resize(len + 15, 0);
    }
    let start = v.as_ptr().align_offset(64).min(15);
    (&mut v[start..start + len], start)
}

impl PackedB {
    /// Packs `b` (k x n at its strides) for products of `kind` (`Kind::F32`
    /// only where `f32_hardware()`), on the thread pool when `parallel`.
    ///
    /// # Safety
    /// `b` covers k x n at its strides.
    pub unsafe fn new(b: Operand, k: usize, n: usize, parallel: bool, kind: Kind) -> PackedB {
        assert!(kind != Kind::F32 || f32_hardware(), "bug: f32 tiles without AVX-512");
        assert!(kind != Kind::Bf16 || bf16_hardware(), "bug: bf16 tiles without AVX512_BF16");
        assert!(kind != Kind::Amx || amx::available(), "bug: AMX tiles without AMX");
        let kc = depth_block(k, kind);
        let (panels, depths) = (n.div_ceil(NC), k.div_ceil(kc));
        let slot = kind.units(kc) * NC.min(n.next_multiple_of(NR));
        let mut data = Vec::new();
        let (slots, start) = aligned(&mut data, slot * panels * depths);
        let b = Shared(b.0, b.1, b.2);
        let pack = |(i, out): (usize, &mut [u32])| {
            let (d, p) = (i / panels, i % panels);
            let (k0, j0) = (d * kc, p * NC);
            let b = b.get();
            // SAFETY: columns j0.. and depth k0.. of b.
            unsafe { pack_b((b.0.add(j0 * b.2 + k0 * b.1), b.1, b.2), kc.min(k - k0), NC.min(n - j0), out, kind) }
        };
        if parallel && slots.len() > 1 << 16 {
            slots.par_chunks_mut(slot.max(1)).enumerate().for_each(pack);
        } else {
            slots.chunks_mut(slot.max(1)).enumerate().for_each(pack);
        }
        PackedB { k, n, kc, slot, panels, data, start, kind }
    }

    /// A weight stored as bf16 rows (`[n, k]`, used as `x @ w^T`): `b` is
    /// its transpose, whose pairs are the rows' pairs as they lie. Needs
    /// the hardware (`bf16_hardware()`) and an even `k`.
    pub fn from_rows(w: &[u16], n: usize, k: usize, parallel: bool) -> PackedB {
        assert!(
            bf16_hardware() && k.is_multiple_of(2) && w.len() == n * k,
            "bug: bf16 rows {n} x {k} cannot be packed"
        );
        let kind = Kind::bf16();
        let kc = depth_block(k, kind);
        let (panels, depths) = (n.div_ceil(NC), k.div_ceil(kc));
        let slot = kind.units(kc) * NC.min(n.next_multiple_of(NR));
        let mut data = Vec::new();
        let (slots, start) = aligned(&mut data, slot * panels * depths);
        let pack = |(i, out): (usize, &mut [u32])| {
            let (d, p) = (i / panels, i % panels);
            let (k0, j0) = (d * kc, p * NC);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: rows j0.. of w from depth k0; the host has AVX512_BF16 (asserted).
            unsafe {
                let kd = kc.min(k - k0);
                x86::pack_rows(w.as_ptr().add(j0 * k + k0), k, kd, NC.min(n - j0), out, kind.units(kd))
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (out, k0, j0);
        };
        if parallel && slots.len() > 1 << 16 {
            slots.par_chunks_mut(slot.max(1)).enumerate().for_each(pack);
        } else {
            slots.chunks_mut(slot.max(1)).enumerate().for_each(pack);
        }
        PackedB { k, n, kc, slot, panels, data, start, kind }
    }

    /// Columns of `b`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The slot of depth block `d` and the panel from column `j0` (a multiple of NC).
    fn panel(&self, d: usize, j0: usize) -> &[u32] {
        &self.data[self.start + (d * self.panels + j0 / NC) * self.slot..][..self.slot]
    }
}

/// A product's right-hand side: to pack as it goes, or packed.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    Pack(Operand),
    Packed(&'a PackedB),
}

// SAFETY: operands are only read.
unsafe impl Send for Rhs<'_> {}
unsafe impl Sync for Rhs<'_> {}

#[derive(Clone, Copy)]
struct Shared(*const f32, usize, usize);
// SAFETY: operands are only read; tasks write disjoint blocks of `c`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The operand (a method, so that closures capture the whole `Shared`).
    fn get(&self) -> Operand {
        (self.0, self.1, self.2)
    }
}

/// `product` with operands of `kind` (tests run every kind the host has).
///
/// # Safety
/// As `product`; `kind` one the host has.
#[allow(clippy::too_many_arguments)]
unsafe fn product_on(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    (c_rs, c_cs): (usize, usize),
    alpha: f32,
    a: Operand,
    b: Rhs,
    parallel: bool,
    kind: Kind,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: element (i, j) of c.
                unsafe {
                    let c = c.add(i * c_rs + j * c_cs);
                    *c = if alpha == 0.0 { 0.0 } else { alpha * *c };
                }
            }
        }
        return;
    }
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if let Rhs::Pack(b) = b
        && parallel
        && c_cs == 1
        && k >= 8 * m.max(n)
    {
        // A long depth (a gradient through the output layer): split it, each
        // part summing into a buffer of its own, rather than pack either
        // operand once per thread.
        // SAFETY: the caller's contract.
        unsafe { depth_split((m, n, k), c, c_rs, alpha, a, b, kind) };
        return;
    }
    if let Rhs::Pack(b) = b
        && n >= WIDE * m
    {
        // Far more columns than rows (the output layer's logits and weight
        // gradient): cᵀ = bᵀ aᵀ, so that the large operand is packed as
        // rows (a copy) rather than transposed into strips, and each tile's
        // sums are written down columns of c.
        let (at, bt) = ((b.0, b.2, b.1), (a.0, a.2, a.1));
        // SAFETY: the same elements, each operand and c seen transposed.
        unsafe { product_on((n, m, k), c, (c_cs, c_rs), alpha, at, Rhs::Pack(bt), parallel, kind) };
        return;
    }
    let (a, c) = (Shared(a.0, a.1, a.2), Shared(c, c_rs, c_cs));
    // Blocks of the longer side; twice as many as threads where each stays
    // long enough (256) that packing the other operand again is cheap.
    let (long, step) = if n >= m { (n, NR) } else { (m, MR) };
    let tasks = if long >= 512 * threads { 2 * threads } else { threads }.min(long.div_ceil(step)).max(1);
    let per = long.div_ceil(tasks).next_multiple_of(step);
    let run = |t: usize| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(long));
        let (rows, cols) = if n >= m { (0..m, r0..r1) } else { (r0..r1, 0..n) };
        let (a, c) = (a.get(), c.get());
        // SAFETY: the block's rows of `a` and `c`, and columns `cols` of `b` and `c`.
        unsafe {
            block(
                (rows.len(), k),
                cols,
                c.0.cast_mut().add(rows.start * c_rs),
                (c_rs, c_cs),
                alpha,
                (a.0.add(rows.start * a.1), a.1, a.2),
                b,
                kind,
            )
        }
    };
    let count = long.div_ceil(per);
    // Not `parallel` (the caller runs this product beside others on the
    // threads: the experts', a row group's blocks): its blocks one after
    // the other here. (They went to the pool all the same, nested.)
    if count == 1 || !parallel {
        (0..count).for_each(run);
    } else {
        (0..count).into_par_iter().for_each(run);
    }
}

/// `product_on` over DEPTH_PARTS parts of the depth, the first into `c` and
/// the rest into buffers then added to it in order: as many parts on any
/// number of threads, so that the sums, and a training step's bits, do not
/// depend on the threads.
///
/// # Safety
/// As `product`.
#[allow(clippy::too_many_arguments)]
unsafe fn depth_split(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    alpha: f32,
    a: Operand,
    b: Operand,
    kind: Kind,
) {
    let per = k.div_ceil(DEPTH_PARTS).next_multiple_of(kind.depth());
    let (a, b, c) = (Shared(a.0, a.1, a.2), Shared(b.0, b.1, b.2), Shared(c, c_rs, 0));
    let mut parts: Vec<Vec<f32>> = (1..k.div_ceil(per)).map(|_| vec![0f32; m * n]).collect();
    let run = |t: usize, out: (*mut f32, usize, f32)| {
        let (a, b) = (a.get(), b.get());
        let (k0, k1) = (t * per, ((t + 1) * per).min(k));
        // SAFETY: depth k0..k1 of both operands; `out` is c or a buffer of m x n.
        unsafe {
            block(
                (m, k1 - k0),
                0..n,
                out.0,
                (out.1, 1),
                out.2,
                (a.0.add(k0 * a.2), a.1, a.2),
                Rhs::Pack((b.0.add(k0 * b.1), b.1, b.2)),
                kind,
            )
        }
    };
    rayon::scope(|s| {
        for (t, part) in parts.iter_mut().enumerate() {
            let out = Shared(part.as_mut_ptr(), n, 0);
            let run = &run;
            s.spawn(move |_| run(t + 1, (out.get().0.cast_mut(), n, 0.0)));
        }
        run(0, (c.get().0.cast_mut(), c_rs, alpha));
    });
    for i in 0..m {
        // SAFETY: row i of c.
        let row = unsafe { std::slice::from_raw_parts_mut(c.get().0.cast_mut().add(i * c_rs), n) };
        for part in &parts {
            row.iter_mut().zip(&part[i * n..][..n]).for_each(|(c, p)| *c += p);
        }
    }
}

thread_local! {
    /// Each thread's packed blocks of `a` and `b`, kept between products.
    static PACKED: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// One thread's product of `m` rows and the columns `cols` (multiples of
/// NR apart from the end), through the BLIS loops; `c` is its first row's
/// column 0, `b` all of the right-hand side.
///
/// # Safety
/// As `product`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    (m, k): (usize, usize),
    cols: std::ops::Range<usize>,
    c: *mut f32,
    (c_rs, c_cs): (usize, usize),
    alpha: f32,
    a: Operand,
    b: Rhs,
    kind: Kind,
) {
    let layout = if a.2 == 1 || a.1 != 1 { Layout::RowWise } else { Layout::DepthWise };
    let kc = match b {
        Rhs::Pack(_) => depth_block(k, kind),
        Rhs::Packed(p) => p.kc,
    };
    let mr = kind.rows();
    let mc_max = m.div_ceil(m.div_ceil(MC)).next_multiple_of(mr);
    let (mut pa_buffer, mut pb_buffer) = PACKED.take();
    let (pa, _) = aligned(&mut pa_buffer, mc_max * kind.units(kc));
    let pb_len = if let Rhs::Pack(_) = b { NC.min(cols.len().next_multiple_of(NR)) * kind.units(kc) } else { 0 };
    let (pb, _) = aligned(&mut pb_buffer, pb_len);
    if kind == Kind::Amx {
        amx::configure();
    }
    // Runs of columns in one panel: NC from the start when packing here,
    // split where the packed panels are.
    let mut segments = Vec::new();
    let mut j = cols.start;
    while j < cols.end {
        let end = match b {
            Rhs::Pack(_) => (j + NC).min(cols.end),
            Rhs::Packed(_) => (j / NC + 1).saturating_mul(NC).min(cols.end),
        };
        segments.push(j..end);
        j = end;
    }
    for seg in segments {
        for (d, k0) in (0..k).step_by(kc).enumerate() {
            let kd = kc.min(k - k0);
            let units = kind.units(kd);
            let (panel, first_strip) = match b {
                Rhs::Pack(b) => {
                    // SAFETY: columns seg of b, depth k0..k0+kd.
                    unsafe { pack_b((b.0.add(seg.start * b.2 + k0 * b.1), b.1, b.2), kd, seg.len(), pb, kind) };
                    (&pb[..], 0)
                }
                Rhs::Packed(p) => (p.panel(d, seg.start / NC * NC), seg.start % NC / NR),
            };
            // The first block of the depth writes c (scaled by alpha); the rest add to it.
            let beta = if d == 0 { alpha } else { 1.0 };
            for i0 in (0..m).step_by(mc_max) {
                let mc = mc_max.min(m - i0);
                // SAFETY: rows i0.. of a, depth k0..k0+kd.
                unsafe { pack_a((a.0.add(i0 * a.1 + k0 * a.2), a.1, a.2), mc, kd, layout, pa, kind) };
                for js in 0..seg.len().div_ceil(NR) {
                    let strip_b = &panel[(first_strip + js) * units * NR..][..units * NR];
                    let width = NR.min(seg.len() - js * NR);
                    for is in 0..mc.div_ceil(mr) {
                        let strip_a = &pa[is * units * mr..][..units * mr];
                        let rows = mr.min(mc - is * mr);
                        let at = c.wrapping_add((i0 + is * mr) * c_rs + (seg.start + js * NR) * c_cs);
                        let out = Out { c: at, c_rs, c_cs, rows, cols: width, beta };
                        // SAFETY: the tile's rows and columns of c.
                        unsafe { tile(strip_a, strip_b, units, layout, out, kind) }
                    }
                }
            }
        }
    }
    if kind == Kind::Amx {
        amx::release();
    }
    PACKED.set((pa_buffer, pb_buffer));
}

/// Where a tile's sums go: `c = beta c + sums` (`beta` 0: `c` not read).
struct Out {
    c: *mut f32,
    c_rs: usize,
    /// 1, or (a product computed transposed) c's row stride.
    c_cs: usize,
    rows: usize,
    cols: usize,
    beta: f32,
}

/// The elements of `a` (`mc` rows from its first, depth `kd`) into strips
/// of `kind.rows()` rows, rows past `mc` (and the odd last pair's second
/// half, and AMX's pairs past the depth) zero. AMX's strips are row-wise
/// whatever `layout` (which then says how `a` lies).
///
/// # Safety
/// `a` covers mc x kd at its strides.
unsafe fn pack_a(a: Operand, mc: usize, kd: usize, layout: Layout, out: &mut [u32], kind: Kind) {
    #[cfg(target_arch = "x86_64")]
    if kind != Kind::Bf16Portable && (a.2 == 1 || (layout == Layout::DepthWise && a.1 == 1)) {
        // SAFETY: as above; the host has what `kind` needs.
        unsafe {
            match kind {
                Kind::F32 => x86::pack_a_f32(a, mc, kd, layout, out),
                Kind::Amx => x86::pack_a_rows(a, mc, kd, layout, out, amx::ROWS, kind.units(kd)),
                _ => x86::pack_a(a, mc, kd, layout, out),
            }
        }
        return;
    }
    // SAFETY: inside mc x kd.
    let at = |i: usize, kk: usize| unsafe { *a.0.add(i * a.1 + kk * a.2) };
    let layout = if kind == Kind::Amx { Layout::RowWise } else { layout };
    pack_strips(at, (mc, kd), kind.rows(), layout, out, kind);
}

/// Strips of `width` lines (rows of `a`, or columns of `b`) of the depth's
/// packed elements, `at(line, depth)` giving an element of the `lines x kd`
/// operand (bf16 kinds: rounded, in pairs); past the operand, zero. The
/// portable packing.
fn pack_strips(
    at: impl Fn(usize, usize) -> f32,
    (lines, kd): (usize, usize),
    width: usize,
    layout: Layout,
    out: &mut [u32],
    kind: Kind,
) {
    let units = kind.units(kd);
    let get = |l: usize, kk: usize| if l < lines && kk < kd { at(l, kk) } else { 0.0 };
    for s in 0..lines.div_ceil(width) {
        let strip = &mut out[s * units * width..][..units * width];
        for i in 0..width {
            for p in 0..units {
                let l = s * width + i;
                let unit = match kind {
                    Kind::F32 => get(l, p).to_bits(),
                    _ => round(get(l, 2 * p)) as u32 | ((round(get(l, 2 * p + 1)) as u32) << 16),
                };
                match layout {
                    Layout::RowWise => strip[i * units + p] = unit,
                    Layout::DepthWise => strip[p * width + i] = unit,
                }
            }
        }
    }
}

/// The elements of `b` (depth `kd`, `nc` columns from its first) into
/// strips of NR columns, depth by depth; columns past `nc` zero.
///
/// # Safety
/// `b` covers kd x nc at its strides.
unsafe fn pack_b(b: Operand, kd: usize, nc: usize, out: &mut [u32], kind: Kind) {
    #[cfg(target_arch = "x86_64")]
    if kind != Kind::Bf16Portable && (b.1 == 1 || b.2 == 1) {
        // SAFETY: as above; the host has what `kind` needs.
        unsafe {
            match kind {
                Kind::F32 => x86::pack_b_f32(b, kd, nc, out),
                _ => x86::pack_b(b, kd, nc, out, kind.units(kd)),
            }
        }
        return;
    }
    // SAFETY: inside kd x nc.
    let at = |j: usize, kk: usize| unsafe { *b.0.add(kk * b.1 + j * b.2) };
    pack_strips(at, (nc, kd), NR, Layout::DepthWise, out, kind);
}

/// One tile: `units` packed elements of a strip of `a` and of `b`, summed
/// into `out`.
///
/// # Safety
/// `out` covers its rows and columns of c; `kind` one the host has.
unsafe fn tile(a: &[u32], b: &[u32], units: usize, layout: Layout, out: Out, kind: Kind) {
    #[cfg(target_arch = "x86_64")]
    if kind == Kind::Amx {
        // SAFETY: as above; `block` configured the tiles.
        unsafe { amx::tile(a, b, units, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kind != Kind::Bf16Portable {
        let row_wise = layout == Layout::RowWise;
        // SAFETY: as above; the host has what `kind` needs.
        unsafe {
            match (kind, row_wise) {
                (Kind::F32, true) => x86::tile_f32::<true>(a, b, units, out),
                (Kind::F32, false) => x86::tile_f32::<false>(a, b, units, out),
                (_, true) => x86::tile::<true>(a, b, units, out),
                (_, false) => x86::tile::<false>(a, b, units, out),
            }
        }
        return;
    }
    assert!(kind == Kind::Bf16Portable, "bug: f32 tiles without AVX-512");
    #[cfg(target_arch = "x86_64")]
    if super::packed::avx2_available() {
        // SAFETY: as above; the host has AVX2 and FMA.
        unsafe {
            match layout {
                Layout::RowWise => avx2::tile::<true>(a, b, units, out),
                Layout::DepthWise => avx2::tile::<false>(a, b, units, out),
            }
        }
        return;
    }
    // SAFETY: as above.
    unsafe { portable_tile(a, b, units, layout, out) }
}

/// `tile` for bf16 pairs in plain arithmetic.
///
/// # Safety
/// `out` covers its rows and columns of c.
unsafe fn portable_tile(a: &[u32], b: &[u32], units: usize, layout: Layout, out: Out) {
    let pairs = units;
    let mut sums = [[0f32; NR]; MR];
    for p in 0..pairs {
        let bp = &b[p * NR..][..NR];
        for (i, row) in sums.iter_mut().enumerate() {
            let x = match layout {
                Layout::RowWise => a[i * pairs + p],
                Layout::DepthWise => a[p * MR + i],
            };
            let (lo, hi) = (widen(x & 0xffff), widen(x >> 16));
            for (s, y) in row.iter_mut().zip(bp) {
                *s += hi * widen(y >> 16) + lo * widen(y & 0xffff);
            }
        }
    }
    for (i, row) in sums.iter().enumerate().take(out.rows) {
        for (j, s) in row.iter().enumerate().take(out.cols) {
            // SAFETY: element (i, j) of the tile.
            unsafe {
                let c = out.c.add(i * out.c_rs + j * out.c_cs);
                *c = if out.beta == 0.0 { *s } else { out.beta * *c + s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The bf16 tile where the CPU has AVX2 and FMA but no AVX512_BF16:
    //! each pair widened to two f32 (the high half as it lies, the low one
    //! shifted up) and multiplied by FMAs, 4 rows by 16 columns at a time
    //! (8 accumulators, the four widened vectors of `b` and two of `a` in
    //! the 16 registers).

    use super::{MR, NR, Out};
    use std::arch::x86_64::*;

    /// # Safety
    /// As `super::tile`; the host has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const ROW_WISE: bool>(a: &[u32], b: &[u32], pairs: usize, out: Out) {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        for r0 in (0..out.rows).step_by(4) {
            for c0 in (0..out.cols).step_by(16) {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for p in 0..pairs {
                    // SAFETY: pair p of the strip of b holds NR columns.
                    let (v0, v1) = unsafe {
                        let at = b.as_ptr().add(p * NR + c0) as *const __m256i;
                        (_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1)))
                    };
                    let lo = [_mm256_slli_epi32::<16>(v0), _mm256_slli_epi32::<16>(v1)].map(|v| _mm256_castsi256_ps(v));
                    let hi = [_mm256_and_si256(v0, high), _mm256_and_si256(v1, high)].map(|v| _mm256_castsi256_ps(v));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = if ROW_WISE { a[(r0 + r) * pairs + p] } else { a[p * MR + r0 + r] };
                        let x = _mm256_set1_epi32(x as i32);
                        let (xl, xh) = (
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x)),
                            _mm256_castsi256_ps(_mm256_and_si256(x, high)),
                        );
                        for h in 0..2 {
                            acc[h] = _mm256_fmadd_ps(xh, hi[h], _mm256_fmadd_ps(xl, lo[h], acc[h]));
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(out.rows - r0) {
                    let mut sums = [0f32; 16];
                    // SAFETY: 16 floats.
                    unsafe {
                        _mm256_storeu_ps(sums.as_mut_ptr(), acc[0]);
                        _mm256_storeu_ps(sums.as_mut_ptr().add(8), acc[1]);
                    }
                    for (j, s) in sums.iter().enumerate().take(out.cols - c0) {
                        // SAFETY: element (r0 + r, c0 + j) of the tile.
                        unsafe {
                            let c = out.c.add((r0 + r) * out.c_rs + (c0 + j) * out.c_cs);
                            *c = if out.beta == 0.0 { *s } else { out.beta * *c + s };
                        }
                    }
                }
            }
        }
    }
}

/// A 16 x 16 matrix of u32 transposed in registers.
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::transpose;

/// This thread's AMX tiles configured to given shapes, and handed back.
#[cfg(target_arch = "x86_64")]
pub(crate) use amx::{configure_as as configure_amx, release as release_amx};

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The packing and the tiles with AVX-512 (and AVX512_BF16 for bf16).

    use super::{Layout, MR, NR, Operand, Out};
    use std::arch::x86_64::*;

    /// Lanes `0..n` of 16.
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
    }

    /// Sixteen floats to bf16 pairs' halves: each in the low 16 bits of a lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn halves(x: __m512) -> __m512i {
        // SAFETY: same-sized vectors.
        _mm512_cvtepu16_epi32(unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) })
    }

    /// The pairs of two rows of sixteen: `even | odd << 16`, lane by lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn interleave(even: __m512, odd: __m512) -> __m512i {
        _mm512_or_si512(halves(even), _mm512_slli_epi32::<16>(halves(odd)))
    }

    /// Thirty-two consecutive floats (of which `n`) as sixteen pairs.
    ///
    /// # Safety
    /// The first `n` floats at `p` are readable.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pairs32(p: *const f32, n: usize) -> __m512i {
        // SAFETY: masked loads read only the first n.
        let (lo, hi) = unsafe {
            (_mm512_maskz_loadu_ps(mask(n), p), _mm512_maskz_loadu_ps(mask(n.saturating_sub(16)), p.add(16)))
        };
        // SAFETY: same-sized vectors; the low half of the result is `lo`'s.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// # Safety
    /// As `super::pack_a`, with `a`'s rows contiguous (row-wise) or columns (depth-wise).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_a(a: Operand, mc: usize, kd: usize, layout: Layout, out: &mut [u32]) {
        let pairs = kd.div_ceil(2);
        for is in 0..mc.div_ceil(MR) {
            let strip = out[is * pairs * MR..][..pairs * MR].as_mut_ptr();
            let rows = MR.min(mc - is * MR);
            match layout {
                Layout::RowWise => {
                    assert!(a.2 == 1, "bug: row-wise packing of a strided a");
                    for i in 0..MR {
                        let row = strip.wrapping_add(i * pairs);
                        for p0 in (0..pairs).step_by(16) {
                            let n = if i < rows { kd - 2 * p0 } else { 0 };
                            // SAFETY: row i's floats 2 p0.. (n of them), pairs p0.. of the strip row.
                            unsafe {
                                let v = pairs32(a.0.wrapping_add((is * MR + i) * a.1 + 2 * p0), n);
                                _mm512_mask_storeu_epi32(row.add(p0).cast(), mask(pairs - p0), v);
                            }
                        }
                    }
                }
                Layout::DepthWise => {
                    // Pair p of rows i..: depth 2p and 2p + 1 of MR consecutive rows.
                    let m = mask(rows);
                    let col = |kk: usize| {
                        // SAFETY: depth kk (< kd) of the strip's rows, which are contiguous.
                        if kk < kd {
                            unsafe { _mm512_maskz_loadu_ps(m, a.0.add(kk * a.2 + is * MR)) }
                        } else {
                            _mm512_setzero_ps()
                        }
                    };
                    for p in 0..pairs {
                        let v = interleave(col(2 * p), col(2 * p + 1));
                        // SAFETY: MR lanes at pair p of the strip.
                        unsafe { _mm512_mask_storeu_epi32(strip.add(p * MR).cast(), mask(MR), v) };
                    }
                }
            }
        }
    }

    /// # Safety
    /// As `super::pack_b`, with `b`'s rows (b.2 == 1) or columns (b.1 == 1)
    /// contiguous; strips of `pairs` (at least the depth's), zero past the depth.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_b(b: Operand, kd: usize, nc: usize, out: &mut [u32], pairs: usize) {
        if b.2 != 1 {
            // Columns contiguous: 32 floats of a column are 16 of its pairs.
            // SAFETY: column j's depth 2 p0.. (up to kd).
            let load =
                |j: usize, p0: usize| unsafe { pairs32(b.0.wrapping_add(j * b.2 + 2 * p0), kd.saturating_sub(2 * p0)) };
            // SAFETY: as above.
            return unsafe { pack_columns(pairs, nc, out, load) };
        }
        // Rows contiguous: two rows' sixteen columns make sixteen pairs. Pair
        // by pair, each two rows read from start to end (strip by strip, a
        // deep `b` was read 64 bytes from each of hundreds of rows at a time).
        let out = out.as_mut_ptr();
        for p in 0..pairs {
            for j0 in (0..nc.div_ceil(NR) * NR).step_by(16) {
                let cols = nc.saturating_sub(j0).min(16);
                let row = |kk: usize| {
                    // SAFETY: row kk (< kd), columns j0..j0 + cols.
                    if kk < kd {
                        unsafe { _mm512_maskz_loadu_ps(mask(cols), b.0.wrapping_add(kk * b.1 + j0)) }
                    } else {
                        _mm512_setzero_ps()
                    }
                };
                // SAFETY: sixteen lanes of pair p in strip j0 / NR.
                unsafe {
                    let at = out.add(j0 / NR * pairs * NR + p * NR + j0 % NR);
                    _mm512_storeu_si512(at.cast(), interleave(row(2 * p), row(2 * p + 1)))
                };
            }
        }
    }

    /// Rows of bf16 weights (`[n, k]`, row stride `k`, from depth `k0`; `kd`
    /// even) as `b`'s columns, in strips of `units` pairs: each row's pairs
    /// are already u32s.
    ///
    /// # Safety
    /// `w` covers nc rows of k0 + kd halves at stride `k`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_rows(w: *const u16, k: usize, kd: usize, nc: usize, out: &mut [u32], units: usize) {
        let pairs = kd / 2;
        // SAFETY: row j's pairs p0.. (up to kd / 2).
        let load = |j: usize, p0: usize| unsafe {
            _mm512_maskz_loadu_epi32(mask(pairs.saturating_sub(p0)), w.wrapping_add(j * k + 2 * p0).cast::<i32>())
        };
        // SAFETY: as above.
        unsafe { pack_columns(units, nc, out, load) }
    }

    /// `a` (`mc` rows, depth `kd`) in strips of `mr` rows, each row's
    /// `units` pairs together (what an AMX tile loads), zero past the
    /// depth and past `mc`: rows as they lie (row-wise `layout`), or
    /// (depth-wise: `a`'s columns contiguous) sixteen rows by sixteen
    /// pairs transposed.
    ///
    /// # Safety
    /// As `super::pack_a`; `mr` a multiple of 16, `units` of 16 and at least the depth's pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_a_rows(
        a: Operand,
        mc: usize,
        kd: usize,
        layout: Layout,
        out: &mut [u32],
        mr: usize,
        units: usize,
    ) {
        if layout == Layout::DepthWise {
            // Sixteen pairs of the depth at a time for every group of sixteen
            // rows of the block in turn, so that each depth's row of `a`
            // (contiguous) is read from start to end: by strips, a large `a`
            // (a chunk's logits gradient, 32,000 wide) was read 64 bytes from
            // each of hundreds of rows, too many streams to prefetch.
            let out = out.as_mut_ptr();
            for p0 in (0..units).step_by(16) {
                for g in 0..mc.div_ceil(mr) * mr / 16 {
                    let m = mask(mc.saturating_sub(16 * g));
                    let col = |kk: usize| {
                        // SAFETY: depth kk (< kd) of rows 16 g.. of the block, which are contiguous.
                        if kk < kd {
                            unsafe { _mm512_maskz_loadu_ps(m, a.0.wrapping_add(kk * a.2 + 16 * g)) }
                        } else {
                            _mm512_setzero_ps()
                        }
                    };
                    let mut t = [_mm512_setzero_si512(); 16];
                    for (q, v) in t.iter_mut().enumerate() {
                        *v = interleave(col(2 * (p0 + q)), col(2 * (p0 + q) + 1));
                    }
                    // Row 16 g + i is row (16 g) % mr + i of strip 16 g / mr.
                    let first = (16 * g / mr) * units * mr + (16 * g % mr) * units;
                    for (i, v) in transpose(t).iter().enumerate() {
                        // SAFETY: pairs p0.. of that row of the strip.
                        unsafe { _mm512_storeu_si512(out.add(first + i * units + p0).cast(), *v) };
                    }
                }
            }
            return;
        }
        assert!(a.2 == 1, "bug: row-wise packing of a strided a");
        for is in 0..mc.div_ceil(mr) {
            let strip = out[is * units * mr..][..units * mr].as_mut_ptr();
            let rows = mr.min(mc - is * mr);
            for i in 0..mr {
                let row = a.0.wrapping_add((is * mr + i) * a.1);
                for p0 in (0..units).step_by(16) {
                    let n = if i < rows { kd.saturating_sub(2 * p0) } else { 0 };
                    // SAFETY: row i's floats 2 p0.. (n of them); pairs p0.. of the strip row.
                    unsafe {
                        _mm512_storeu_si512(strip.add(i * units + p0).cast(), pairs32(row.wrapping_add(2 * p0), n))
                    };
                }
            }
        }
    }

    /// Strips of columns whose `pairs` packed elements `load(column, p0)`
    /// gives sixteen at a time (p0..p0 + 16, zero past the depth, which may
    /// end before `pairs`): sixteen columns by sixteen elements, transposed.
    ///
    /// # Safety
    /// `load` reads only inside its operand.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_columns(pairs: usize, nc: usize, out: &mut [u32], load: impl Fn(usize, usize) -> __m512i) {
        for js in 0..nc.div_ceil(NR) {
            let strip = out[js * pairs * NR..][..pairs * NR].as_mut_ptr();
            for half in 0..2 {
                let j0 = js * NR + half * 16;
                let cols = nc.saturating_sub(j0).min(16);
                for p0 in (0..pairs).step_by(16) {
                    let mut t = [_mm512_setzero_si512(); 16];
                    for (j, v) in t.iter_mut().enumerate().take(cols) {
                        *v = load(j0 + j, p0);
                    }
                    let t = transpose(t);
                    for (p, v) in t.iter().enumerate().take(pairs - p0) {
                        // SAFETY: sixteen lanes of pair p0 + p in the strip.
                        unsafe { _mm512_storeu_si512(strip.add((p0 + p) * NR + half * 16).cast(), *v) };
                    }
                }
            }
        }
    }

    /// The f32 `pack_a`: elements as they are.
    ///
    /// # Safety
    /// As `super::pack_a`, with `a`'s rows contiguous (row-wise) or columns (depth-wise).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_a_f32(a: Operand, mc: usize, kd: usize, layout: Layout, out: &mut [u32]) {
        for is in 0..mc.div_ceil(MR) {
            let strip = out[is * kd * MR..][..kd * MR].as_mut_ptr().cast::<f32>();
            let rows = MR.min(mc - is * MR);
            match layout {
                Layout::RowWise => {
                    assert!(a.2 == 1, "bug: row-wise packing of a strided a");
                    for i in 0..MR {
                        for p0 in (0..kd).step_by(16) {
                            let n = if i < rows { kd - p0 } else { 0 };
                            // SAFETY: row i's elements p0.. (n of them), and the strip row's.
                            unsafe {
                                let v = _mm512_maskz_loadu_ps(mask(n), a.0.wrapping_add((is * MR + i) * a.1 + p0));
                                _mm512_mask_storeu_ps(strip.add(i * kd + p0), mask(kd - p0), v);
                            }
                        }
                    }
                }
                Layout::DepthWise => {
                    for p in 0..kd {
                        // SAFETY: depth p of the strip's rows, which are contiguous; MR lanes of the strip.
                        unsafe {
                            let v = _mm512_maskz_loadu_ps(mask(rows), a.0.add(p * a.2 + is * MR));
                            _mm512_mask_storeu_ps(strip.add(p * MR), mask(MR), v);
                        }
                    }
                }
            }
        }
    }

    /// The f32 `pack_b`: elements as they are.
    ///
    /// # Safety
    /// As `super::pack_b`, with `b`'s rows (b.2 == 1) or columns (b.1 == 1) contiguous.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_b_f32(b: Operand, kd: usize, nc: usize, out: &mut [u32]) {
        if b.2 != 1 {
            // Columns contiguous: sixteen of a column's depth at a time, transposed.
            // SAFETY: column j's depth p0.. (up to kd).
            let load = |j: usize, p0: usize| unsafe {
                _mm512_castps_si512(_mm512_maskz_loadu_ps(mask(kd - p0), b.0.add(j * b.2 + p0)))
            };
            // SAFETY: as above.
            return unsafe { pack_columns(kd, nc, out, load) };
        }
        for js in 0..nc.div_ceil(NR) {
            let strip = out[js * kd * NR..][..kd * NR].as_mut_ptr().cast::<f32>();
            let masks = [mask(nc - js * NR), mask((nc - js * NR).saturating_sub(16))];
            for p in 0..kd {
                for (half, m) in masks.iter().enumerate() {
                    // SAFETY: row p's columns of the strip (masked), sixteen lanes of the strip.
                    unsafe {
                        let v = _mm512_maskz_loadu_ps(*m, b.0.add(p * b.1 + js * NR + half * 16));
                        _mm512_storeu_ps(strip.add(p * NR + half * 16), v);
                    }
                }
            }
        }
    }

    /// The f32 tile: `kd` elements of the strips, a broadcast of `a` and
    /// two FMAs a row each.
    ///
    /// # Safety
    /// As `super::tile`; `ROW_WISE` as `a` was packed.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_f32<const ROW_WISE: bool>(a: &[u32], b: &[u32], kd: usize, out: Out) {
        prefetch_c(&out);
        let mut sums = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a.as_ptr().cast::<f32>(), b.as_ptr().cast::<f32>());
        for p in 0..kd {
            // SAFETY: element p of the strips.
            unsafe {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                for (i, s) in sums.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(if ROW_WISE { i * kd + p } else { p * MR + i }));
                    s[0] = _mm512_fmadd_ps(x, b0, s[0]);
                    s[1] = _mm512_fmadd_ps(x, b1, s[1]);
                }
            }
        }
        // SAFETY: as above.
        unsafe { store(&sums, out) }
    }

    /// A 16 x 16 matrix of u32 transposed: unpacks of 32 and 64 bits, then
    /// two rounds of 128-bit lane shuffles.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            let (x, y) = (4 * i, 4 * i + 2);
            u[4 * i] = _mm512_unpacklo_epi64(t[x], t[y]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[x], t[y]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[x + 1], t[y + 1]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[x + 1], t[y + 1]);
        }
        // u[4q + s] holds rows 4q..4q+3, column s of each 128-bit lane.
        let mut v = [_mm512_setzero_si512(); 16];
        for q in 0..2 {
            for s in 0..4 {
                let (x, y) = (u[8 * q + s], u[8 * q + 4 + s]);
                v[8 * q + s] = _mm512_shuffle_i32x4::<0x88>(x, y);
                v[8 * q + 4 + s] = _mm512_shuffle_i32x4::<0xdd>(x, y);
            }
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for s in 0..8 {
            out[s] = _mm512_shuffle_i32x4::<0x88>(v[s], v[8 + s]);
            out[8 + s] = _mm512_shuffle_i32x4::<0xdd>(v[s], v[8 + s]);
        }
        out
    }

    /// # Safety
    /// As `super::tile`; `ROW_WISE` as `a` was packed.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile<const ROW_WISE: bool>(a: &[u32], b: &[u32], pairs: usize, out: Out) {
        prefetch_c(&out);
        let mut sums = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        for p in 0..pairs {
            // SAFETY: pair p of the strips.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                for (i, s) in sums.iter_mut().enumerate() {
                    let x = *a.add(if ROW_WISE { i * pairs + p } else { p * MR + i });
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x as i32));
                    s[0] = _mm512_dpbf16_ps(s[0], x, b0);
                    s[1] = _mm512_dpbf16_ps(s[1], x, b1);
                }
            }
        }
        // SAFETY: as above.
        unsafe { store(&sums, out) }
    }

    /// The tile of c asked for before the sums are computed, to be in cache
    /// when they are written: otherwise each row's first store waits on
    /// memory. (A transposed product's tile spans 32 rows of c: not asked.)
    #[target_feature(enable = "avx512f")]
    fn prefetch_c(out: &Out) {
        if out.c_cs != 1 {
            return;
        }
        for i in 0..out.rows {
            let row = out.c.wrapping_add(i * out.c_rs);
            _mm_prefetch::<_MM_HINT_T0>(row.cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16).cast());
        }
    }

    /// A tile's sums into `c` (`c = beta c + sums`, masked to its rows and columns).
    ///
    /// # Safety
    /// `out` covers its rows and columns of c.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(sums: &[[__m512; 2]; MR], out: Out) {
        if out.c_cs != 1 {
            // A transposed product's tile: its rows are columns of c.
            let mut tile = [[0f32; NR]; MR];
            for (row, s) in tile.iter_mut().zip(sums) {
                // SAFETY: NR floats of the row.
                unsafe {
                    _mm512_storeu_ps(row.as_mut_ptr(), s[0]);
                    _mm512_storeu_ps(row.as_mut_ptr().add(16), s[1]);
                }
            }
            // Down each of c's rows (the tile's columns) in turn.
            for j in 0..out.cols {
                for (i, row) in tile.iter().enumerate().take(out.rows) {
                    // SAFETY: element (i, j) of the tile.
                    unsafe {
                        let c = out.c.add(i * out.c_rs + j * out.c_cs);
                        *c = if out.beta == 0.0 { row[j] } else { out.beta * *c + row[j] };
                    }
                }
            }
            return;
        }
        let masks = [mask(out.cols), mask(out.cols.saturating_sub(16))];
        let beta = _mm512_set1_ps(out.beta);
        for (i, s) in sums.iter().enumerate().take(out.rows) {
            for h in 0..2 {
                // SAFETY: row i's columns of the tile (masked).
                unsafe {
                    let c = out.c.add(i * out.c_rs + 16 * h);
                    let v = if out.beta == 0.0 {
                        s[h]
                    } else {
                        _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(masks[h], c), s[h])
                    };
                    _mm512_mask_storeu_ps(c, masks[h], v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of the operands (rounded to bf16 when `rounded`), in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], ta: bool, tb: bool, rounded: bool) -> Vec<f64> {
        let r = |x: f32| if rounded { widen(round(x) as u32) as f64 } else { x as f64 };
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| {
                        let x = if ta { a[kk * m + i] } else { a[i * k + kk] };
                        let y = if tb { b[j * k + kk] } else { b[kk * n + j] };
                        r(x) * r(y)
                    })
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn weights_stored_as_bf16_rows_multiply_as_their_f32_values() {
        if !bf16_hardware() {
            return;
        }
        for (m, n, k) in [(13, 33, 8), (25, 70, 642), (5, 4200, 34), (40, 9, 64)] {
            let (a, w) = (values(m * k, 1), values(n * k, 2));
            let want = reference(m, n, k, &a, &w, false, true, true);
            let halves: Vec<u16> = w.iter().map(|x| round(*x)).collect();
            for parallel in [false, true] {
                let packed = PackedB::from_rows(&halves, n, k, parallel);
                let mut c = vec![0f32; m * n];
                // SAFETY: a is m x k and c m x n.
                unsafe { product_packed(m, c.as_mut_ptr(), n, 0.0, (a.as_ptr(), k, 1), &packed, parallel) };
                for (idx, got) in c.iter().enumerate() {
                    let bound = 4e-6 * (k as f64).sqrt() + 1e-6 * want[idx].abs();
                    assert!(
                        (*got as f64 - want[idx]).abs() <= bound,
                        "{m}x{n}x{k}: c[{idx}] = {got}, want {}",
                        want[idx]
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between two bf16: ties go to the even one (1.0).
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(widen(round(f32::NAN) as u32).is_nan());
    }

    /// The AVX2 bf16 tile against the plain one: both layouts of `a`, whole
    /// and partial tiles, c overwritten or added to, stored down rows or
    /// (a product computed transposed) down columns.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_bf16_tiles_equal_the_plain_ones() {
        if !super::super::packed::avx2_available() {
            return;
        }
        let pairs = 37;
        let bits = |v: Vec<f32>| -> Vec<u32> {
            v.chunks(2).map(|p| round(p[0]) as u32 | (round(p[1]) as u32) << 16).collect()
        };
        let (a, b) = (bits(values(2 * MR * pairs, 4)), bits(values(2 * pairs * NR, 5)));
        for layout in [Layout::RowWise, Layout::DepthWise] {
            for (rows, cols) in [(MR, NR), (5, 17), (1, 1), (12, 3)] {
                for (beta, transposed) in [(0.0, false), (0.5, false), (0.0, true), (0.5, true)] {
                    let prior = values(MR * NR, 6);
                    let (mut plain, mut wide) = (prior.clone(), prior.clone());
                    let (c_rs, c_cs) = if transposed { (1, MR) } else { (NR, 1) };
                    let out = |c: &mut Vec<f32>| Out { c: c.as_mut_ptr(), c_rs, c_cs, rows, cols, beta };
                    // SAFETY: c holds MR x NR at either strides; the host has AVX2.
                    unsafe {
                        portable_tile(&a, &b, pairs, layout, out(&mut plain));
                        match layout {
                            Layout::RowWise => avx2::tile::<true>(&a, &b, pairs, out(&mut wide)),
                            Layout::DepthWise => avx2::tile::<false>(&a, &b, pairs, out(&mut wide)),
                        }
                    }
                    for (i, (p, w)) in plain.iter().zip(&wide).enumerate() {
                        assert!(
                            (p - w).abs() <= 1e-5 * (1.0 + p.abs()),
                            "{layout:?} {rows}x{cols} beta {beta}: [{i}] {p} vs {w}"
                        );
                    }
                    assert_ne!(plain, prior, "{layout:?} {rows}x{cols}");
                }
            }
        }
    }

    /// The kinds of product this host computes.
    fn kinds() -> Vec<Kind> {
        let mut kinds = vec![Kind::Bf16Portable];
        kinds.extend(bf16_hardware().then_some(Kind::Bf16));
        kinds.extend(amx::available().then_some(Kind::Amx));
        kinds.extend(f32_hardware().then_some(Kind::F32));
        kinds
    }

    #[test]
    fn products_equal_the_rounded_operands_product() {
        // Edges of every block: tiles, depth blocks, odd depths, row and
        // column panels, products computed transposed (n >= 4 m), each
        // operand plain and transposed.
        for (m, n, k) in
            [(1, 1, 1), (13, 33, 7), (25, 70, 321), (200, 40, 1100), (5, 4200, 3), (40, 9, 64), (25, 700, 321)]
        {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                for kind in kinds() {
                    let want = reference(m, n, k, &a, &b, ta, tb, kind != Kind::F32);
                    let ao = if ta { (a.as_ptr(), 1, m) } else { (a.as_ptr(), k, 1) };
                    let bo = if tb { (b.as_ptr(), 1, k) } else { (b.as_ptr(), n, 1) };
                    // SAFETY: b covers k x n.
                    let packed = unsafe { PackedB::new(bo, k, n, true, kind) };
                    for (alpha, prepacked, parallel) in
                        [(0.0f32, false, true), (0.5, false, false), (0.0, true, true), (0.5, true, false)]
                    {
                        let prior = values(m * n, 3);
                        let mut c = prior.clone();
                        let rhs = if prepacked { Rhs::Packed(&packed) } else { Rhs::Pack(bo) };
                        // SAFETY: the operands and c cover their shapes.
                        unsafe { product_on((m, n, k), c.as_mut_ptr(), (n, 1), alpha, ao, rhs, parallel, kind) };
                        for (idx, got) in c.iter().enumerate() {
                            let want = want[idx] + alpha as f64 * prior[idx] as f64;
                            // f32 sums of k exact products.
                            let bound = 1e-6 * (k as f64).sqrt().max(1.0) * 4.0 + 1e-6 * want.abs();
                            assert!(
                                (*got as f64 - want).abs() <= bound,
                                "{m}x{n}x{k} ta {ta} tb {tb} {kind:?} alpha {alpha} packed {prepacked}: c[{idx}] = {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
