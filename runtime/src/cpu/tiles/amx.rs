//! bf16 tiles on AMX (Intel's Advanced Matrix Extensions, Sapphire Rapids
//! and later): eight tile registers of 16 rows by 64 bytes, and one
//! `tdpbf16ps` that multiplies a 16 x 32 tile of bf16 by a 32 x 16 one into
//! 16 x 16 f32 sums: 16 times the multiply-adds of a `vdpbf16ps`.
//!
//! A tile here is 32 x 32 outputs in four sum registers (tmm0-3), `a`'s
//! two 16-row halves (tmm4-5) and `b`'s two 16-column halves (tmm6-7), 16
//! pairs of the depth at a time. The packed operands are `tiles.rs`'s: a
//! strip of `b` is `[pair][32 columns]` of u32 pairs, which is what a `b`
//! tile loads (16 pair rows of 16 columns, 128 bytes apart); a strip of `a`
//! is `[32 rows][pairs]`, each row's pairs together. Strips run on in zero
//! pairs to a multiple of 16 (`Kind::units`), so every step loads whole
//! tiles.
//!
//! Rust has no AMX intrinsics on stable; the instructions are inline
//! assembly. Nothing else in the program touches the tile registers, so
//! they keep their values from one `asm!` to the next, and the kernel
//! saves them with the thread's state when it is switched out. Linux hands
//! out the tile state only to a process that asks (`arch_prctl`), once.

use super::{NR, Out};
use std::arch::asm;
use std::arch::x86_64::*;

/// Rows of `a` (and of outputs) a tile multiplies.
pub const ROWS: usize = 32;
/// Pairs of the depth a step multiplies: the rows of a `b` tile.
pub const DEPTH: usize = 16;

/// Whether the host multiplies bf16 on AMX and this process may (checked
/// once; `MODELC_NO_AMX` turns it off, e.g. to compare with `vdpbf16ps`).
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        if std::env::var_os("MODELC_NO_AMX").is_some() || !super::bf16_hardware() {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        // Leaf 7 exists where AVX-512 does (checked above).
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first
        // tile instruction faults.
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request about this process's own state.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

/// A tile configuration (palette 1).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Configures this thread's tiles (before its first `tile`): eight tiles
/// of 16 rows by 64 bytes.
pub fn configure() {
    configure_as(&[(64, 16); 8]);
}

/// Configures this thread's tiles tmm0.. as (bytes a row, rows) each.
pub fn configure_as(shapes: &[(u16, u8)]) {
    let mut config = Config { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    for (t, (bytes, rows)) in shapes.iter().enumerate() {
        config.bytes_per_row[t] = *bytes;
        config.rows[t] = *rows;
    }
    // SAFETY: `available()` (the caller's) said the process may use tiles.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
}

/// Hands this thread's tile state back (after its last `tile`), so that
/// switching threads does not save it.
pub fn release() {
    // SAFETY: as `configure`.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// A tile's sums, as `tilestored` writes them.
#[repr(C, align(64))]
struct Sums([[f32; NR]; ROWS]);

/// One tile: `units` pairs (a multiple of DEPTH) of a strip of `a`
/// (ROWS rows) and of `b` (NR columns), summed into `out`.
///
/// # Safety
/// `out` covers its rows and columns of c; this thread's tiles configured
/// (`configure`); the strips hold ROWS and NR lines of `units` pairs.
pub unsafe fn tile(a: &[u32], b: &[u32], units: usize, out: Out) {
    assert!(
        units.is_multiple_of(DEPTH) && a.len() >= ROWS * units && b.len() >= NR * units,
        "bug: AMX strips of {units} pairs"
    );
    let (a_stride, b_stride) = (units * 4, NR * 4);
    // A whole tile of c along its rows, overwritten or added to, is loaded
    // and stored by the tile instructions themselves; else the sums go
    // through `store`.
    let direct = out.c_cs == 1 && out.rows == ROWS && out.cols == NR && (out.beta == 0.0 || out.beta == 1.0);
    // SAFETY: the tiles are configured; every load lies inside its strip:
    // a's rows 0..32 at pairs p0..p0 + 16, b's pairs p0..p0 + 16 by 32
    // columns; a direct tile's c covers 32 x 32 at its row stride.
    unsafe {
        if direct && out.beta == 1.0 {
            let [c0, c1, c2, c3] = [out.c, out.c.add(16), out.c.add(16 * out.c_rs), out.c.add(16 * out.c_rs + 16)];
            asm!(
                "tileloadd tmm0, [{c0} + {s}]",
                "tileloadd tmm1, [{c1} + {s}]",
                "tileloadd tmm2, [{c2} + {s}]",
                "tileloadd tmm3, [{c3} + {s}]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                s = in(reg) out.c_rs * 4,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        for p0 in (0..units).step_by(DEPTH) {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}]",
                "tileloadd tmm6, [{b0} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.as_ptr().add(p0),
                a1 = in(reg) a.as_ptr().add(16 * units + p0),
                b0 = in(reg) b.as_ptr().add(p0 * NR),
                b1 = in(reg) b.as_ptr().add(p0 * NR + 16),
                sa = in(reg) a_stride,
                sb = in(reg) b_stride,
                options(nostack, readonly),
            );
        }
    }
    if direct {
        // SAFETY: c's tile covers 32 x 32 at its row stride.
        unsafe { store_tiles(out.c, out.c_rs) };
    } else {
        let mut sums = Sums([[0.0; NR]; ROWS]);
        // SAFETY: `sums` holds 32 rows of NR; `out` as the caller's.
        unsafe {
            store_tiles(sums.0.as_mut_ptr().cast(), NR);
            store(&sums.0, out);
        }
    }
}

/// The four sum tiles into the 32 x 32 floats at `to` (rows `rs` apart).
///
/// # Safety
/// `to` covers 32 rows of 32 floats at row stride `rs`.
unsafe fn store_tiles(to: *mut f32, rs: usize) {
    // SAFETY: the caller's contract; the quarters are 16 rows and columns apart.
    unsafe {
        asm!(
            "tilestored [{s0} + {stride}], tmm0",
            "tilestored [{s1} + {stride}], tmm1",
            "tilestored [{s2} + {stride}], tmm2",
            "tilestored [{s3} + {stride}], tmm3",
            s0 = in(reg) to,
            s1 = in(reg) to.add(16),
            s2 = in(reg) to.add(16 * rs),
            s3 = in(reg) to.add(16 * rs + 16),
            stride = in(reg) rs * 4,
            options(nostack),
        )
    }
}

/// A tile's sums into `c` (`c = beta c + sums`, to its rows and columns).
///
/// # Safety
/// `out` covers its rows and columns of c.
#[target_feature(enable = "avx512f")]
unsafe fn store(sums: &[[f32; NR]; ROWS], out: Out) {
    let lanes = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 };
    if out.c_cs != 1 {
        // A transposed product's tile: its columns are rows of c (whose
        // elements are contiguous: c's column stride is the tile's row
        // stride). Each 16 x 16 quarter transposed, then sixteen elements
        // of a row of c at a time.
        assert!(out.c_rs == 1, "bug: a transposed tile of strided c");
        for (i0, j0) in [(0, 0), (0, 16), (16, 0), (16, 16)] {
            if i0 >= out.rows || j0 >= out.cols {
                continue;
            }
            let mut q = [_mm512_setzero_si512(); 16];
            for (r, v) in q.iter_mut().enumerate() {
                // SAFETY: 16 floats of a row of sums.
                *v = _mm512_castps_si512(unsafe { _mm512_loadu_ps(sums[i0 + r].as_ptr().add(j0)) });
            }
            let m = lanes(out.rows - i0);
            for (j, v) in super::x86::transpose(q).iter().enumerate().take(out.cols - j0) {
                // SAFETY: row j0 + j of c, the tile's rows i0.. (masked).
                unsafe { put(out.c.add((j0 + j) * out.c_cs + i0), m, _mm512_castsi512_ps(*v), out.beta) };
            }
        }
        return;
    }
    let masks = [lanes(out.cols), lanes(out.cols.saturating_sub(16))];
    for (i, row) in sums.iter().enumerate().take(out.rows) {
        for (h, m) in masks.iter().enumerate() {
            // SAFETY: 16 floats of the row of sums; row i's columns of the tile (masked).
            unsafe { put(out.c.add(i * out.c_rs + 16 * h), *m, _mm512_loadu_ps(row.as_ptr().add(16 * h)), out.beta) };
        }
    }
}

/// `c = beta c + v` on the lanes of `m` (`beta` 0: c not read).
///
/// # Safety
/// The lanes of `m` from `c` are c's.
#[target_feature(enable = "avx512f")]
unsafe fn put(c: *mut f32, m: __mmask16, v: __m512, beta: f32) {
    // SAFETY: the caller's contract.
    unsafe {
        let v = if beta == 0.0 { v } else { _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(m, c), v) };
        _mm512_mask_storeu_ps(c, m, v);
    }
}
