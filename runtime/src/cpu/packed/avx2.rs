//! The matrix-vector products with AVX2, FMA and F16C: what most laptop and
//! desktop x86 CPUs have where they lack AVX-512. f32 and bf16 rows meet
//! f32 activations; q8 and q4 rows meet the activations rounded to int8
//! blocks (`Activation`) in integers, as llama.cpp multiplies them on such
//! CPUs: `vpmaddubsw` (unsigned bytes times signed bytes, adjacent pairs
//! summed into 16 bits) then `vpmaddwd` by ones (pairs again, into 32
//! bits), each block's sum scaled in floats by its two scales.

use super::{Activation, BLOCK, Format, Packed, Rows};
use std::arch::x86_64::*;

/// How far ahead of the weights being read the next are asked for, in
/// bytes (the hardware's prefetcher stops at each 4 KiB page).
const AHEAD: usize = 1024;

/// Whether the host has AVX2, FMA and F16C (checked once).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Columns j0..j1 of `c = alpha c + a W^T` for f32 or bf16 weight rows.
///
/// # Safety
/// The host has AVX2, FMA and F16C; as `super::matvec`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn columns(
    m: usize,
    k: usize,
    (a, a_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
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
                    Rows::Packed(p) if p.format == Format::Bf16 => bf16(x, k, p.halves.as_ptr().add(j * k)),
                    Rows::Packed(p) => unreachable!("bug: {:?} rows meet rounded activations", p.format),
                };
                super::put(c.add(i * c_rs + j), alpha, dot);
            }
        }
    }
}

/// Columns j0..j1 of `c = alpha c + x W^T` for q8 or q4 weight rows and
/// each rounded row `x`.
///
/// # Safety
/// The host has AVX2, FMA and F16C; `c` holds `xs.len()` rows at `c_rs`
/// with columns up to j1, and `w` has rows up to j1.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn int_columns(xs: &[Activation], c: *mut f32, c_rs: usize, alpha: f32, w: &Packed, j0: usize, j1: usize) {
    let (k, blocks) = (w.k, w.k / BLOCK);
    let end = w.scales.as_ptr_range().end;
    let mut j = j0;
    while j < j1 {
        // q4 takes `ROWS` weight rows at once (sharing the activations'
        // loads and the loop's work; q8 gained nothing from it), the last
        // few one by one.
        let rows = if w.format == Format::Q4 && j + ROWS <= j1 { ROWS } else { 1 };
        // SAFETY: rows j..j + rows' scales and quants; elements (i, j..j + rows) of c.
        unsafe {
            let d = w.scales.as_ptr().add(j * blocks);
            for (i, x) in xs.iter().enumerate() {
                let out = c.add(i * c_rs + j);
                let (q8s, q4s) = (w.quants.as_ptr().add(j * k) as *const i8, w.quants.as_ptr().add(j * k / 2));
                let dots: &[f32] = match (w.format, rows) {
                    (Format::Q8, _) => &[q8(x, q8s, (d, end), blocks)],
                    (Format::Q4, ROWS) => &q4::<ROWS>(x, q4s, (d, end), blocks),
                    (Format::Q4, _) => &q4::<1>(x, q4s, (d, end), blocks),
                    (other, _) => unreachable!("bug: {other:?} rows in integer products"),
                };
                dots.iter().enumerate().for_each(|(r, dot)| super::put(out.add(r), alpha, *dot));
            }
        }
        j += rows;
    }
}

/// Row `j` of a bf16, q8 or q4 weight as f32 (`Packed::row`), eight lanes
/// at a time: each weight is the same product of its scale and its quant
/// as the portable loop computes, so the rows are the same bits.
///
/// # Safety
/// The host has AVX2 and F16C; `j` is a row of `w` and `out` holds `w.k`
/// floats.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn row(w: &Packed, j: usize, out: &mut [f32]) {
    let k = w.k;
    let o = out.as_mut_ptr();
    // SAFETY: row j's halves, quants and scales; k floats of out.
    unsafe {
        match w.format {
            Format::Bf16 => {
                let h = w.halves.as_ptr().add(j * k);
                let full = k / 8 * 8;
                for c in (0..full).step_by(8) {
                    _mm256_storeu_ps(o.add(c), widen(_mm_loadu_si128(h.add(c) as *const __m128i)));
                }
                for c in full..k {
                    *o.add(c) = f32::from_bits((*h.add(c) as u32) << 16);
                }
            }
            Format::Q8 => {
                let first = j * k / BLOCK;
                for b in 0..k / BLOCK {
                    let d = _mm256_set1_ps(widen_half(w.scales[first + b]));
                    let q = w.quants.as_ptr().add((first + b) * BLOCK);
                    for u in 0..4 {
                        let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * u) as *const __m128i));
                        _mm256_storeu_ps(o.add(b * BLOCK + 8 * u), _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
                    }
                }
            }
            Format::Q4 => {
                let (first, low, eight) = (j * k / BLOCK, _mm_set1_epi8(15), _mm256_set1_epi32(8));
                for b in 0..k / BLOCK {
                    let d = _mm256_set1_ps(widen_half(w.scales[first + b]));
                    let bytes = _mm_loadu_si128(w.quants.as_ptr().add((first + b) * BLOCK / 2) as *const __m128i);
                    // Elements 0-15 in the low nibbles, 16-31 in the high ones.
                    let halves = [_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16::<4>(bytes), low)];
                    for (h, nibbles) in halves.iter().enumerate() {
                        for u in 0..2 {
                            let part = if u == 0 { *nibbles } else { _mm_srli_si128::<8>(*nibbles) };
                            let v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(part), eight);
                            let at = b * BLOCK + 16 * h + 8 * u;
                            _mm256_storeu_ps(o.add(at), _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
                        }
                    }
                }
            }
            Format::F32 => unreachable!("bug: f32 rows are not packed"),
        }
    }
}

/// Weight rows a q4 product takes at a time.
const ROWS: usize = 4;

/// `Activation::new`'s rounding, eight lanes at a time: each block of 32
/// values of `x` to int8 quants `q` with the scale `d = max |x| / 127`
/// (rounded half away from zero, as the portable loop does, so both give
/// the same quants) and the block's sum of quants times its scale.
///
/// # Safety
/// The host has AVX2; `q` holds `x.len()` quants, `d` and `sums` a value
/// per whole block of `x`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn round(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [f32]) {
    let sign = _mm256_set1_ps(-0.0);
    let (half, minus_half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5), _mm256_set1_ps(1.0));
    // packs' lane order back to the values' (the 128-bit halves interleave).
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, (x, q)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
        // SAFETY: 32 values of the block, 32 quants.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let id = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let rounded = v.map(|v| {
                let r = _mm256_mul_ps(v, id);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                let frac = _mm256_sub_ps(r, t);
                let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), one);
                let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, minus_half), one);
                _mm256_sub_ps(_mm256_add_ps(t, up), down)
            });
            let total = _mm256_add_ps(_mm256_add_ps(rounded[0], rounded[1]), _mm256_add_ps(rounded[2], rounded[3]));
            let ints = rounded.map(|r| _mm256_cvtps_epi32(r));
            let words = [_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3])];
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), order);
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
            d[b] = scale;
            sums[b] = sum(total) * scale;
        }
    }
}

/// Asks for the line at `p`. (A prefetch never faults, so the last rows may
/// ask past their weights.)
#[inline(always)]
fn ahead<T>(p: *const T) {
    // SAFETY: prefetching reads nothing the program sees.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// The sum of a vector's lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dense(x: *const f32, k: usize, w: *const f32) -> f32 {
    let mut a = [_mm256_setzero_ps(); 4];
    let full = k / 32 * 32;
    // SAFETY: k floats of x and w.
    unsafe {
        for p in (0..full).step_by(32) {
            ahead(w.add(p + AHEAD / 4));
            ahead(w.add(p + 16 + AHEAD / 4));
            for (u, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(p + 8 * u)), _mm256_loadu_ps(x.add(p + 8 * u)), *a);
            }
        }
        let mut dot = sum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        for p in full..k {
            dot += *w.add(p) * *x.add(p);
        }
        dot
    }
}

/// Eight bf16 bits to f32: the bits in the top half.
#[target_feature(enable = "avx2")]
#[inline]
fn widen(h: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn bf16(x: *const f32, k: usize, w: *const u16) -> f32 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let full = k / 16 * 16;
    // SAFETY: k floats of x, k halves of w.
    unsafe {
        for p in (0..full).step_by(16) {
            if p % 32 == 0 {
                ahead(w.add(p + AHEAD / 2));
            }
            let h = _mm256_loadu_si256(w.add(p) as *const __m256i);
            a0 = _mm256_fmadd_ps(widen(_mm256_castsi256_si128(h)), _mm256_loadu_ps(x.add(p)), a0);
            a1 = _mm256_fmadd_ps(widen(_mm256_extracti128_si256::<1>(h)), _mm256_loadu_ps(x.add(p + 8)), a1);
        }
        let mut dot = sum(_mm256_add_ps(a0, a1));
        for p in full..k {
            dot += f32::from_bits((*w.add(p) as u32) << 16) * *x.add(p);
        }
        dot
    }
}

/// Eight blocks' scales from block 8g of a row whose scales are `d` (the
/// weight's times `x`'s, the activations' scales or block sums, which are
/// zero past the last block).
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn group(d: *const u16, end: *const u16, g: usize, blocks: usize, x: &[f32]) -> __m256 {
    // SAFETY: the caller's contract; x holds 8 from block 8g (`Activation`).
    unsafe { _mm256_mul_ps(row_scales(d, end, g, blocks), _mm256_loadu_ps(x.as_ptr().add(8 * g))) }
}

/// The weight's own scales of blocks 8g.. of a row (`d`), zero past the
/// row. A row's last group of fewer than 8 reads 8 scales where the array
/// (ending at `end`) has them, its lanes past the row cleared, else it
/// converts the scales one by one.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn row_scales(d: *const u16, end: *const u16, g: usize, blocks: usize) -> __m256 {
    let n = (blocks - 8 * g).min(8);
    // SAFETY: n scales of the row from block 8g, and 8 where the array has them.
    unsafe {
        let at = d.add(8 * g);
        if n == 8 {
            _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i))
        } else if at.add(8) <= end {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i));
            let lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            _mm256_and_ps(dw, _mm256_castsi256_ps(lanes))
        } else {
            let mut dw = [0f32; 8];
            for (i, dw) in dw.iter_mut().enumerate().take(n) {
                *dw = widen_half(*at.add(i));
            }
            _mm256_loadu_ps(dw.as_ptr())
        }
    }
}

/// An f16's bits as an f32.
#[target_feature(enable = "f16c")]
#[inline]
fn widen_half(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// A 32-bit lane index for every lane.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes(i: i32) -> __m256i {
    _mm256_set1_epi32(i)
}

/// Σ_b dw_b dx_b Σ q_w q_x over a q8 row, a block a step: `vpmaddubsw`
/// takes |q_w| as the unsigned side and q_x with q_w's sign as the signed
/// one (|q| <= 128, so no pair of products saturates 16 bits). Eight blocks
/// share a vector of scales; the lane each block takes is a constant (the
/// loop over a group's blocks unrolls), not an index built every block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8(x: &Activation, q: *const i8, (d, end): (*const u16, *const u16), blocks: usize) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    // SAFETY: block b's 32 quants of the row and of the activations.
    let mut block = |b: usize, scale: __m256| unsafe {
        ahead(q.add(b * BLOCK + AHEAD));
        let w = _mm256_loadu_si256(q.add(b * BLOCK) as *const __m256i);
        let v = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), scale, acc);
    };
    // SAFETY: the row's scales (`group`); blocks as above.
    unsafe {
        for g in 0..blocks / 8 {
            let scales = group(d, end, g, blocks, &x.d);
            for i in 0..8 {
                block(8 * g + i, _mm256_permutevar8x32_ps(scales, lanes(i as i32)));
            }
        }
        let g = blocks / 8;
        if !blocks.is_multiple_of(8) {
            let scales = group(d, end, g, blocks, &x.d);
            for i in 0..blocks % 8 {
                block(8 * g + i, _mm256_permutevar8x32_ps(scales, lanes(i as i32)));
            }
        }
    }
    sum(acc)
}

/// Σ_b dw_b dx_b Σ (q_w - 8) q_x over `R` adjacent q4 rows (from `q`,
/// their scales from `d`): the nibbles (q_w, 0..15) are `vpmaddubsw`'s
/// unsigned side as they are, and the 8 is taken off once per block in
/// floats (Σ_b dw_b dx_b Σ q_x, from the block sums). Four blocks a step:
/// a q4 row's 64 bytes of four blocks hold their first halves in the low
/// nibbles and their second halves in the high ones, the order
/// `Activation::q4` keeps the activations in; a single block's step for
/// the last one to three. The rows share each step's activations, loaded
/// once. Two steps share a vector of scales, and the lanes each pair of
/// blocks takes are constants (the steps of a group unroll), not indices
/// built every step.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4<const R: usize>(
    x: &Activation,
    q: *const u8,
    (d, end): (*const u16, *const u16),
    blocks: usize,
) -> [f32; R] {
    let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(15));
    // Lanes 0-3 take the first block of a pair, lanes 4-7 the second.
    let pair = |p: i32| _mm256_set_epi32(p + 1, p + 1, p + 1, p + 1, p, p, p, p);
    let (mut acc, mut offsets) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let (steps, row_bytes) = (blocks / 4, blocks * BLOCK / 2);
    // Step s (blocks 4s..4s+4: each row's 64 bytes and the activations'
    // 128) with the group's scales of each row, its four blocks at lanes
    // `first`..`first + 3`.
    // SAFETY: as said.
    let step = |acc: &mut [__m256; R], s: usize, scales: &[__m256; R], first: i32| unsafe {
        let xq = x.q4.as_ptr().add(s * 4 * BLOCK);
        let v: [__m256i; 4] = std::array::from_fn(|i| _mm256_loadu_si256(xq.add(i * BLOCK) as *const __m256i));
        for r in 0..R {
            let at = q.add(r * row_bytes + s * 2 * BLOCK);
            // The rows are read side by side, but lie one after another:
            // ask for the lines as far ahead (in time) as one row's reader would.
            ahead(q.add((s * R + r) * 2 * BLOCK + R * AHEAD));
            for half in 0..2 {
                let bytes = _mm256_loadu_si256(at.add(half * BLOCK) as *const __m256i);
                let (lo, hi) = (_mm256_and_si256(bytes, low), _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low));
                let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, v[half]), _mm256_maddubs_epi16(hi, v[half + 2]));
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                let scale = _mm256_permutevar8x32_ps(scales[r], pair(first + 2 * half as i32));
                acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
            }
        }
    };
    // A group of 8 blocks at a time: each row's scales converted once for
    // the products (times the activations' scales) and the offsets (times
    // their block sums); two steps, or the last step and single blocks.
    // SAFETY: the rows' scales (`row_scales`), the activations' 8 scales
    // and sums from block 8g, the steps as above, single blocks after them.
    unsafe {
        for g in 0..blocks.div_ceil(8) {
            let (xd, sums) = (_mm256_loadu_ps(x.d.as_ptr().add(8 * g)), _mm256_loadu_ps(x.sums.as_ptr().add(8 * g)));
            // A loop, not `std::array::from_fn` and a closure: the closure
            // stayed a function of its own in some builds, depending on what
            // else the crate held (a `call` per row and group, 14% of a
            // stories15M q4 token, ~30% slower decoding), and was inlined in others.
            let mut scales = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let dw = row_scales(d.add(r * blocks), end, g, blocks);
                offsets[r] = _mm256_add_ps(offsets[r], _mm256_mul_ps(dw, sums));
                scales[r] = _mm256_mul_ps(dw, xd);
            }
            if 2 * g + 1 < steps {
                step(&mut acc, 2 * g, &scales, 0);
                step(&mut acc, 2 * g + 1, &scales, 4);
            } else if 2 * g < steps {
                step(&mut acc, 2 * g, &scales, 0);
            }
            for b in (steps * 4).max(8 * g)..blocks.min(8 * g + 8) {
                let v = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
                for r in 0..R {
                    let bytes = _mm_loadu_si128(q.add(r * row_bytes + b * BLOCK / 2) as *const __m128i);
                    let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes), low);
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, v), ones));
                    let scale = _mm256_permutevar8x32_ps(scales[r], lanes((b - 8 * g) as i32));
                    acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
                }
            }
        }
        let mut dots = [0f32; R];
        for r in 0..R {
            dots[r] = sum(_mm256_fnmadd_ps(_mm256_set1_ps(8.0), offsets[r], acc[r]));
        }
        dots
    }
}
