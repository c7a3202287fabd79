//! q8 and q4 prompts on AVX-512 VNNI where the CPU has no AMX-INT8:
//! `vpdpbusd` sums four products of unsigned and signed bytes into each of
//! 16 int32 lanes, so one instruction multiplies an activation's four
//! bytes (broadcast) by the same four bytes of 16 weight rows. A tile is 8
//! prompt rows by 16 weight rows; per block of 32, eight such steps give
//! each prompt row its 16 int32 sums, which are scaled by the block's two
//! scales and added in floats, as decoding's integer products do, with the
//! activations rounded to int8 blocks exactly as decoding rounds them.
//!
//! The activations are the unsigned side (their quants plus 128, a flip of
//! the sign bit); the extra 128 times each weight row's block sum is taken
//! off the int32 sums. The weight rows of a tile are laid out per block and
//! group of four bytes, 16 rows' four bytes side by side (64 bytes, one
//! vector), once per call.

use super::{BLOCK, Format, Packed, Shared};
use half::f16;
use std::arch::x86_64::*;

/// Weight rows of a tile (one vector of int32 lanes).
const COLS: usize = 16;
/// Prompt rows of a tile.
const ROWS: usize = 8;

/// Whether the host has AVX-512 VNNI for this.
pub fn available() -> bool {
    super::vnni()
}

/// One weight tile, as `tile` reads it.
struct Weights {
    /// Per block and group of four bytes, 16 rows' four bytes (zeros past the last row).
    q: Vec<i8>,
    /// Per block, 128 times each row's sum of quants.
    offsets: Vec<i32>,
    /// Per block, each row's scale (zeros past the last row).
    d: Vec<f32>,
}

impl Weights {
    fn new(blocks: usize) -> Weights {
        Weights { q: vec![0; blocks * BLOCK * COLS], offsets: vec![0; blocks * COLS], d: vec![0.0; blocks * COLS] }
    }

    /// Weight rows j0..j0 + rows of `w`.
    fn fill(&mut self, w: &Packed, j0: usize, rows: usize) {
        let (k, blocks) = (w.k, w.k / BLOCK);
        self.q.fill(0);
        self.offsets.fill(0);
        self.d.fill(0.0);
        let mut row = vec![0i8; k];
        for c in 0..rows {
            let j = j0 + c;
            w.int8_row(j, &mut row);
            for b in 0..blocks {
                let block = &row[b * BLOCK..(b + 1) * BLOCK];
                for (g, four) in block.chunks_exact(4).enumerate() {
                    self.q[((b * BLOCK / 4 + g) * COLS + c) * 4..][..4].copy_from_slice(four);
                }
                self.offsets[b * COLS + c] = 128 * block.iter().map(|q| *q as i32).sum::<i32>();
                self.d[b * COLS + c] = f16::from_bits(w.scales[j * blocks + b]).to_f32();
            }
        }
    }
}

/// `c = alpha c + a W^T` for a q8 or q4 `w` and `a` m x k (row stride
/// `a.1`), the rows of `a` rounded to int8 blocks as `matvec` rounds them.
///
/// # Safety
/// `a` and `c` (m x n, row stride `c.1`) cover their elements; `c`
/// overlaps neither; `available()`.
pub unsafe fn product(m: usize, a: (*const f32, usize), c: (*mut f32, usize), alpha: f32, w: &Packed, parallel: bool) {
    assert!(matches!(w.format, Format::Q8 | Format::Q4) && available(), "bug: VNNI tiles for {:?}", w.format);
    let (n, k) = (w.n, w.k);
    let blocks = k / BLOCK;
    // SAFETY: the caller's contract.
    let xs = unsafe { super::round_rows(m, k, a, parallel) };
    // The activations' quants plus 128 (unsigned), and their scales, row by row.
    let unsigned: Vec<u8> = xs.iter().flat_map(|x| x.q.iter().map(|q| (*q as u8) ^ 0x80)).collect();
    let dx: Vec<f32> = xs.iter().flat_map(|x| x.d[..blocks].iter().copied()).collect();
    let c = Shared(c.0, c.1);
    let tiles = |t0: usize, t1: usize| {
        let mut weights = Weights::new(blocks);
        for t in t0..t1 {
            let (j0, cols) = (t * COLS, COLS.min(n - t * COLS));
            weights.fill(w, j0, cols);
            let mut i0 = 0;
            while i0 < m {
                let rows = if m - i0 >= ROWS { ROWS } else { 1 };
                let (x, d) = (&unsigned[i0 * k..], &dx[i0 * blocks..]);
                // SAFETY: rows i0..i0 + rows of the activations; c's rows and columns j0..j0 + cols.
                unsafe {
                    if rows == ROWS {
                        tile::<ROWS>(&weights, x, d, k, c, (i0, j0, cols), alpha);
                    } else {
                        tile::<1>(&weights, x, d, k, c, (i0, j0, cols), alpha);
                    }
                }
                i0 += rows;
            }
        }
    };
    super::over_tiles(n.div_ceil(COLS), parallel, tiles);
}

/// `R` prompt rows (`x`: their unsigned quants, k apart; `dx`: their
/// scales, `blocks` apart) against a weight tile, block by block, into
/// c's rows `at.0..` and `at.2` columns from `at.1`: `c = alpha c + sums`.
///
/// # Safety
/// x and dx hold R rows; c covers those rows and columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize>(
    w: &Weights,
    x: &[u8],
    dx: &[f32],
    k: usize,
    c: Shared,
    at: (usize, usize, usize),
    alpha: f32,
) {
    let blocks = k / BLOCK;
    assert!(x.len() >= (R - 1) * k + k && dx.len() >= (R - 1) * blocks + blocks, "bug: VNNI tile rows");
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let mut sums = [_mm512_setzero_si512(); R];
        for g in 0..BLOCK / 4 {
            // SAFETY: group g of block b of the tile's weights; four bytes of each row.
            unsafe {
                let wv = _mm512_loadu_si512(w.q.as_ptr().add((b * BLOCK / 4 + g) * COLS * 4).cast());
                for (r, s) in sums.iter_mut().enumerate() {
                    let four = (x.as_ptr().add(r * k + b * BLOCK + 4 * g) as *const i32).read_unaligned();
                    *s = _mm512_dpbusd_epi32(*s, _mm512_set1_epi32(four), wv);
                }
            }
        }
        // SAFETY: block b's offsets and scales of the tile's rows.
        unsafe {
            let offsets = _mm512_loadu_si512(w.offsets.as_ptr().add(b * COLS).cast());
            let dw = _mm512_loadu_ps(w.d.as_ptr().add(b * COLS));
            for (r, (acc, s)) in acc.iter_mut().zip(&sums).enumerate() {
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[r * blocks + b]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(*s, offsets)), scale, *acc);
            }
        }
    }
    let mask = if at.2 >= COLS { 0xffff } else { ((1u32 << at.2) - 1) as __mmask16 };
    for (r, v) in acc.iter().enumerate() {
        let to = c.at(at.0 + r, at.1);
        // SAFETY: row at.0 + r's columns of the tile (masked).
        unsafe {
            let v = if alpha == 0.0 {
                *v
            } else {
                _mm512_fmadd_ps(_mm512_set1_ps(alpha), _mm512_maskz_loadu_ps(mask, to), *v)
            };
            _mm512_mask_storeu_ps(to, mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    /// VNNI tile products equal the rounded operands' product.
    #[test]
    fn vnni_tile_products_equal_the_rounded_operands_product() {
        if !super::available() {
            return; // the host has no AVX-512 VNNI: nothing here runs
        }
        super::super::int8_prompt_agrees(super::product);
    }
}
