//! q8 and q4 prompts on AMX-INT8: one `tdpbssd` multiplies a 16 x 32 tile
//! of int8 by a 32 x 16 one into 16 x 16 int32 sums. 32 is one block of
//! the depth, so each block's sums are scaled by its two scales (the weight
//! row's and the activation row's) and added in floats, as the integer
//! products of `matvec` do: a prompt and the tokens after it compute alike
//! (rounding bf16 operands for AMX's bf16 tiles did not: q8 decoding with
//! and without the cache gave different tokens).
//!
//! The weight is the left operand: a tile of 16 weight rows loads straight
//! from the packed quants (q8; q4's nibbles are widened first, 16 rows at
//! a time, as is a last tile of fewer rows). The rounded activations are
//! laid out as a right operand wants them: per 16 rows and block, 8 lines
//! of 64 bytes, line r holding each row's bytes 4r..4r+4. The sums come out
//! with weight rows down and prompt rows across, and go to c transposed.

use super::{Activation, BLOCK, Format, Packed, Shared};
use half::f16;
use std::arch::asm;
use std::arch::x86_64::*;

/// Rows of a tile: weight rows, and prompt rows.
const ROWS: usize = 16;

/// Whether the host multiplies int8 on AMX and this process may (the
/// process's tile permission as for bf16 tiles; `MODELC_NO_AMX` turns both
/// off).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // CPUID leaf 7: EDX bit 25 AMX-INT8 (leaf 7 exists where AMX-BF16 does).
    *HAS.get_or_init(|| crate::cpu::tiles::amx_hardware() && __cpuid_count(7, 0).edx & (1 << 25) != 0)
}

/// This thread's tiles: tmm0 the sums (16 rows of 16 int32), tmm1 the
/// weight (16 rows of one block), tmm2 the activations (8 lines of 16
/// rows' 4 bytes). (Two blocks in flight, each in tiles of its own, was
/// slower: 110M q8 prompts 2,020-2,070 against 2,260-2,380 tokens/s.)
fn configure() {
    crate::cpu::tiles::configure_amx(&[(64, 16), (BLOCK as u16, 16), (64, BLOCK as u8 / 4)]);
}

/// The rounded activations as right-hand tiles, and their scales.
struct Right {
    /// Per 16 rows and block, 8 lines of 64 bytes (zeros past the last row).
    q: Vec<i8>,
    /// Per 16 rows and block, the 16 rows' scales.
    d: Vec<f32>,
}

impl Right {
    fn new(xs: &[Activation], blocks: usize) -> Right {
        let tiles = xs.len().div_ceil(ROWS);
        let mut right = Right { q: vec![0; tiles * blocks * ROWS * BLOCK], d: vec![0.0; tiles * blocks * ROWS] };
        for (i, x) in xs.iter().enumerate() {
            let (t, row) = (i / ROWS, i % ROWS);
            for b in 0..blocks {
                let at = (t * blocks + b) * ROWS * BLOCK + 4 * row;
                for line in 0..BLOCK / 4 {
                    let from = b * BLOCK + 4 * line;
                    right.q[at + line * 4 * ROWS..][..4].copy_from_slice(&x.q[from..from + 4]);
                }
                right.d[(t * blocks + b) * ROWS + row] = x.d[b];
            }
        }
        right
    }
}

/// A tile's int32 sums as `tilestored` writes them.
#[repr(C, align(64))]
struct Sums([[i32; ROWS]; ROWS]);

/// `c = alpha c + a W^T` for a q8 or q4 `w` and `a` m x k (row stride
/// `a.1`), the rows of `a` rounded to int8 blocks as `matvec` rounds them.
///
/// # Safety
/// `a` and `c` (m x n, row stride `c.1`) cover their elements; `c`
/// overlaps neither; `available()`.
pub unsafe fn product(m: usize, a: (*const f32, usize), c: (*mut f32, usize), alpha: f32, w: &Packed, parallel: bool) {
    assert!(matches!(w.format, Format::Q8 | Format::Q4) && available(), "bug: AMX-INT8 for {:?}", w.format);
    let (n, k) = (w.n, w.k);
    let blocks = k / BLOCK;
    // SAFETY: the caller's contract.
    let right = Right::new(&unsafe { super::round_rows(m, k, a, parallel) }, blocks);
    let c = Shared(c.0, c.1);
    // Tiles of weight rows t0..t1, each against every 16 prompt rows.
    let tiles = |t0: usize, t1: usize| {
        configure();
        let mut widened = vec![0i8; ROWS * k];
        let mut scales = vec![0f32; ROWS * blocks];
        for t in t0..t1 {
            let (j0, rows) = (t * ROWS, ROWS.min(n - t * ROWS));
            let left = weight_tile(w, j0, rows, &mut widened);
            for (r, s) in scales.chunks_exact_mut(blocks).enumerate() {
                for (b, s) in s.iter_mut().enumerate() {
                    *s = if r < rows { f16::from_bits(w.scales[(j0 + r) * blocks + b]).to_f32() } else { 0.0 };
                }
            }
            for i0 in (0..m).step_by(ROWS) {
                let x = &right.q[(i0 / ROWS) * blocks * ROWS * BLOCK..];
                let dx = &right.d[(i0 / ROWS) * blocks * ROWS..];
                // SAFETY: the tiles are configured; the weight tile's 16
                // rows of k, the activations' tiles and scales of these 16
                // rows; c's rows i0.. and columns j0.. (the caller's).
                unsafe {
                    let sums = tile(left, k, x, dx, &scales, blocks);
                    write(sums, c, (i0, j0), (ROWS.min(m - i0), rows), alpha);
                }
            }
        }
        crate::cpu::tiles::release_amx();
    };
    super::over_tiles(n.div_ceil(ROWS), parallel, tiles);
}

/// A tile's sums (row r: weight row r against 16 activation rows) into
/// c's `rows.0` rows from `at.0` by `rows.1` columns from `at.1`: `c =
/// alpha c + sums`, transposed.
///
/// # Safety
/// c covers those rows and columns.
#[target_feature(enable = "avx512f")]
unsafe fn write(sums: [__m512; ROWS], c: Shared, at: (usize, usize), rows: (usize, usize), alpha: f32) {
    let by_row = crate::cpu::tiles::transpose(sums.map(|v| _mm512_castps_si512(v)));
    let mask = if rows.1 >= ROWS { 0xffff } else { ((1u32 << rows.1) - 1) as __mmask16 };
    for (l, v) in by_row.iter().enumerate().take(rows.0) {
        let (to, v) = (c.at(at.0 + l, at.1), _mm512_castsi512_ps(*v));
        // SAFETY: the row's columns of the tile (masked); the caller's contract.
        unsafe {
            let v = if alpha == 0.0 {
                v
            } else {
                _mm512_fmadd_ps(_mm512_set1_ps(alpha), _mm512_maskz_loadu_ps(mask, to), v)
            };
            _mm512_mask_storeu_ps(to, mask, v);
        }
    }
}

/// Weight rows j0..j0 + rows as 16 rows of k int8 quants: the packed q8
/// rows where there are 16, else widened into `buf` (q4's nibbles less 8;
/// rows past the last zero).
fn weight_tile<'a>(w: &'a Packed, j0: usize, rows: usize, buf: &'a mut [i8]) -> &'a [i8] {
    let k = w.k;
    if w.format == Format::Q8 && rows == ROWS {
        // SAFETY: the quants of a q8 weight are int8 values.
        return unsafe { std::slice::from_raw_parts(w.quants.as_ptr().add(j0 * k) as *const i8, ROWS * k) };
    }
    buf.fill(0);
    for (r, out) in buf.chunks_exact_mut(k).enumerate().take(rows) {
        w.int8_row(j0 + r, out);
    }
    buf
}

/// The 16 x 16 products of a weight tile (16 rows of `k` int8, `w`) and 16
/// rounded activation rows (`x`, `Right`'s lines; scales `dx`), block by
/// block, each block's int32 sums times its weight row's scale (`dw`, each
/// row's `blocks`) and activation row's: row r of the result holds weight
/// row r against the 16 activation rows.
///
/// # Safety
/// This thread's tiles configured; `w` holds 16 rows of k, `x` and `dx`
/// the 16 rows' tiles and scales of every block.
#[target_feature(enable = "avx512f")]
unsafe fn tile(w: &[i8], k: usize, x: &[i8], dx: &[f32], dw: &[f32], blocks: usize) -> [__m512; ROWS] {
    assert!(w.len() >= ROWS * k && x.len() >= blocks * ROWS * BLOCK && dx.len() >= blocks * ROWS);
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let mut sums = Sums([[0; ROWS]; ROWS]);
    for b in 0..blocks {
        // SAFETY: block b of the 16 weight rows (k bytes apart) and the
        // activations' tile of block b (8 lines of 64 bytes); `sums` holds
        // 16 rows of 64 bytes.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{w} + {ws}]",
                "tileloadd tmm2, [{x} + {xs}]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tilestored [{s} + {ss}], tmm0",
                w = in(reg) w.as_ptr().add(b * BLOCK),
                ws = in(reg) k,
                x = in(reg) x.as_ptr().add(b * ROWS * BLOCK),
                xs = in(reg) 4 * ROWS,
                s = in(reg) sums.0.as_mut_ptr(),
                ss = in(reg) 4 * ROWS,
                options(nostack),
            );
            let dx = _mm512_loadu_ps(dx.as_ptr().add(b * ROWS));
            for (r, acc) in acc.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(_mm512_set1_ps(dw[r * blocks + b]), dx);
                let s = _mm512_cvtepi32_ps(_mm512_load_si512(sums.0[r].as_ptr().cast()));
                *acc = _mm512_fmadd_ps(s, scale, *acc);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    /// AMX-INT8 products equal the rounded operands' product.
    #[test]
    fn amx_int8_products_equal_the_rounded_operands_product() {
        if !super::available() {
            return; // the host has no AMX-INT8: nothing here runs
        }
        super::super::int8_prompt_agrees(super::product);
    }
}
