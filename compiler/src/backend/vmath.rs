//! Transcendental functions over slices, compiled for the host's widest
//! vectors.
//!
//! Cranelift's x64 backend stops at 128-bit vectors, so exp, erf and the
//! rest run 4 lanes at a time in generated code. Where the CPU has AVX2 and
//! FMA (or AVX-512), fused kernels instead compute such an operation's
//! argument into a small buffer and call one of these functions over it:
//! the loops below are the same algorithms as `clif.rs`'s f32x4 versions,
//! written per element so that LLVM vectorises them for 8 or 16 lanes
//! (exp on 16M floats in cache: 1.2 ms with AVX-512 against 4.7 ms for
//! f32x4 on this machine's two cores). Each function is
//! `extern "C" fn(src, dst, n, scale, shift)`, mapping `src * scale +
//! shift`; `src` may equal `dst`.

/// What a wide function maps its argument (`src * scale + shift`) through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    Unary(crate::ir::graph::Unary),
    /// Nothing: the argument itself. A kernel that only scales or shifts a
    /// value it reads (softmax's division by the row sum, a norm's scaling)
    /// is one call of this.
    Affine,
}

/// The math function a kernel calls for a unary operation, by symbol name.
pub struct WideFn {
    pub name: &'static str,
    pub ptr: *const u8,
}

/// Rounds an f64 literal as the generated code's constants are rounded, so
/// the two implementations compute with the same f32 coefficients.
const fn k(v: f64) -> f32 {
    v as f32
}

/// e^r on |r| <= ln 2 / 2: Taylor coefficients, highest degree first
/// (shared with `clif::vexp`, so that both compute the same values).
pub const EXP_POLY: [f64; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// Cephes' logf polynomial in m - 1, highest degree first (with `clif::vlog`).
pub const LOG_POLY: [f64; 9] = [
    7.037_683_629_2e-2,
    -1.151_461_031_0e-1,
    1.167_699_874_0e-1,
    -1.242_014_084_6e-1,
    1.424_932_278_7e-1,
    -1.666_805_766_5e-1,
    2.000_071_476_5e-1,
    -2.499_999_399_3e-1,
    3.333_333_117_4e-1,
];

/// erf(x) ~ x P(x^2) / Q(x^2) (Eigen's and XLA's), highest degree first
/// (with `clif::verf`).
pub const ERF_P: [f64; 5] = [
    2.290_506_586_135_064_6e-4,
    3.408_291_010_710_950_6e-3,
    5.095_569_506_238_086e-2,
    0.185_208_322_399_761_45,
    1.128_379_143_519_084,
];
pub const ERF_Q: [f64; 7] = [
    -1.179_160_295_436_169_7e-7,
    2.354_796_647_131_318_5e-5,
    1.017_962_527_891_488_5e-3,
    1.407_047_017_116_766_7e-2,
    0.110_985_051_782_853_62,
    0.497_469_251_100_675_4,
    1.0,
];

/// A polynomial in `x`, coefficients highest degree first (Horner, fused
/// multiply-adds), as `clif::horner` evaluates it.
#[inline(always)]
fn horner(coefficients: &[f64], x: f32) -> f32 {
    coefficients[1..].iter().fold(k(coefficients[0]), |p, c| p.mul_add(x, k(*c)))
}

/// e^x: the algorithm and coefficients of `clif::vexp`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let (lo, hi) = (k(-87.336_55), k(88.722_83));
    // Compare-and-select, not f32::max: NaN passes through, and it vectorises
    // to one max/min instruction.
    let c = if x < lo { lo } else { x };
    let c = if hi < c { hi } else { c };
    let magic = k(12_582_912.0);
    let km = c.mul_add(k(std::f64::consts::LOG2_E), magic);
    let kf = km - magic;
    let r = kf.mul_add(k(-0.693_145_75), c);
    let r = kf.mul_add(k(-1.428_606_8e-6), r);
    let p = horner(&EXP_POLY, r);
    let e = f32::from_bits(p.to_bits().wrapping_add(km.to_bits() << 23));
    let e = if x > hi { f32::INFINITY } else { e };
    // Below the clamp: 0, not e^lo (see `clif::vexp`).
    let e = if x < lo { 0.0 } else { e };
    if x.is_nan() { x } else { e }
}

/// Natural log: `clif::vlog` (Cephes' logf).
#[inline(always)]
pub fn log(x: f32) -> f32 {
    let subnormal = x < f32::MIN_POSITIVE;
    let xs = if subnormal { x * k(8_388_608.0) } else { x };
    let adjust = if subnormal { -23.0 } else { 0.0 };
    let bits = xs.to_bits();
    let e = ((bits >> 23) as i32).wrapping_sub(126) as f32 + adjust;
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    let low = m < k(std::f64::consts::FRAC_1_SQRT_2);
    let e = if low { e - 1.0 } else { e };
    let m = if low { m + m } else { m };
    let t = m - 1.0;
    let z = t * t;
    let p = horner(&LOG_POLY, t);
    let y = p * t * z;
    let y = e.mul_add(k(-2.121_944_40e-4), y);
    let y = z.mul_add(-0.5, y);
    let r = e.mul_add(k(0.693_359_375), t + y);
    let r = if x == 0.0 { f32::NEG_INFINITY } else { r };
    let r = if x == f32::INFINITY { f32::INFINITY } else { r };
    if x >= 0.0 { r } else { f32::NAN }
}

/// tanh for |x| < `TANH_SMALL` as x + x^3 P(x^2) (Cephes' tanhf), highest
/// degree first: 1 - 2 / (e^(2x) + 1) cancels there (tanh(1e-5) came out
/// 0.5% off).
pub const TANH_POLY: [f64; 5] =
    [-5.704_988_727_45e-3, 2.063_908_879_54e-2, -5.373_971_555_31e-2, 1.333_144_220_36e-1, -3.333_328_194_22e-1];
pub const TANH_SMALL: f64 = 0.625;

/// tanh: the polynomial near 0, else 1 - 2 / (e^(2x) + 1); `clif::vtanh`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let s = x * x;
    let p = horner(&TANH_POLY, s);
    let small = (p * s).mul_add(x, x);
    let large = 1.0 - 2.0 / (exp(x * 2.0) + 1.0);
    if x.abs() < k(TANH_SMALL) { small } else { large }
}

/// erf: `clif::verf` (the rational approximation Eigen and XLA use).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let c = if x < -4.0 { -4.0 } else { x };
    let c = if 4.0 < c { 4.0 } else { c };
    let x2 = c * c;
    let p = horner(&ERF_P, x2) * c;
    let q = horner(&ERF_Q, x2);
    let unit = f32::from_bits(1.0f32.to_bits() | (c.to_bits() & 0x8000_0000));
    if c.abs() > k(3.9) { unit } else { p / q }
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let e = erf(x * k(std::f64::consts::FRAC_1_SQRT_2));
    (0.5 * x) * (1.0 + e)
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = x + k(0.044715) * (x * x * x);
    let t = tanh(k((2.0 / std::f64::consts::PI).sqrt()) * inner);
    (0.5 * x) * (1.0 + t)
}

/// sin and cos stay the standard library's (no vector version yet); a call
/// per chunk still lets the rest of the kernel run on vectors.
#[inline(always)]
pub fn sin(x: f32) -> f32 {
    x.sin()
}

#[inline(always)]
pub fn cos(x: f32) -> f32 {
    x.cos()
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn identity(x: f32) -> f32 {
    x
}

thread_local! {
    /// Memory the running thread reads next, from `start` up to `end`
    /// (addresses): `read_ahead`.
    static AHEAD: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// Tells the wide functions what this thread reads next: a row group's
/// next block of a value it reads from memory (`None`: nothing). While they
/// compute, they prefetch it, a cache line for every 16 elements they map,
/// so that the group's next first pass (softmax's row maxima, memory-bound)
/// finds its rows in cache instead of stalling, while the exponentials
/// (bound by arithmetic) hide the loads. Softmax over 16M floats: 3.7 ->
/// 3.3 ms.
pub fn read_ahead(next: Option<&[f32]>) {
    let range = next.map(|s| (s.as_ptr() as usize, s.as_ptr() as usize + std::mem::size_of_val(s))).unwrap_or((0, 0));
    AHEAD.set(range);
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(at: usize) {
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at as *const i8) }
}

/// `dst[i] = f(src[i] * scale + shift)` for `i < n` (one rounding: with
/// `scale` 1 it is exactly `src[i] + shift`; with `shift` -0.0 as well, the
/// argument is `src[i]` itself, signed zeros included), in place when
/// `src == dst`. The kernel folds an argument like softmax's `x - max`
/// (its row's max in `shift`) into the call instead of a pass of its own.
///
/// # Safety
/// `src` and `dst` point to `n` floats each, and are equal or do not overlap.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
unsafe fn map(src: *const f32, dst: *mut f32, n: usize, scale: f32, shift: f32, f: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        let (mut next, end) = AHEAD.get();
        if next < end {
            // 16 elements, one line of what is read next (`read_ahead`).
            let mut at = 0;
            while at < n {
                if next < end {
                    prefetch(next);
                    next += 64;
                }
                let m = (n - at).min(16);
                // SAFETY: the caller's contract, for the 16 elements from `at`.
                unsafe { map_all(src.add(at), dst.add(at), m, scale, shift, &f) };
                at += m;
            }
            AHEAD.set((next, end));
            return;
        }
    }
    // SAFETY: the caller's.
    unsafe { map_all(src, dst, n, scale, shift, f) }
}

/// `map` without reading ahead.
///
/// # Safety
/// As `map`'s.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
unsafe fn map_all(src: *const f32, dst: *mut f32, n: usize, scale: f32, shift: f32, f: impl Fn(f32) -> f32) {
    if std::ptr::eq(src, dst) {
        // SAFETY: the caller's contract; one mutable view of the one buffer.
        for v in unsafe { std::slice::from_raw_parts_mut(dst, n) } {
            *v = f(v.mul_add(scale, shift));
        }
    } else {
        // SAFETY: the caller's contract; the buffers do not overlap.
        let (s, d) = unsafe { (std::slice::from_raw_parts(src, n), std::slice::from_raw_parts_mut(dst, n)) };
        for (d, s) in d.iter_mut().zip(s) {
            *d = f(s.mul_add(scale, shift));
        }
    }
}

/// The vectors the wide functions use on this host, for `modelc info`:
/// `None` where they are not used (no AVX2 and FMA).
pub fn vectors() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if !functions().is_empty() {
            return Some(if std::arch::is_x86_feature_detected!("avx512f") { "AVX-512" } else { "AVX2" });
        }
    }
    None
}

/// The wide functions by the unary operation they compute; empty where the
/// host lacks the vectors they are built for (the kernels then keep f32x4).
pub fn functions() -> Vec<(Map, WideFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return x86::all();
        }
    }
    Vec::new()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// Whether the host has AVX-512F (else AVX2 and FMA, which `functions`
    /// requires); the standard library caches the answer.
    fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    macro_rules! wide {
        ($($map:expr, $symbol:literal => $element:path),* $(,)?) => {
            pub fn all() -> Vec<(Map, WideFn)> {
                use crate::ir::graph::Unary;
                vec![$(
                    ($map, WideFn { name: $symbol, ptr: {
                        extern "C" fn f(src: *const f32, dst: *mut f32, n: i64, scale: f32, shift: f32) {
                            #[target_feature(enable = "avx512f,avx2,fma")]
                            unsafe fn avx512(src: *const f32, dst: *mut f32, n: usize, scale: f32, shift: f32) {
                                // SAFETY: `map`'s contract is the caller's.
                                unsafe { map(src, dst, n, scale, shift, $element) }
                            }
                            #[target_feature(enable = "avx2,fma")]
                            unsafe fn avx2(src: *const f32, dst: *mut f32, n: usize, scale: f32, shift: f32) {
                                // SAFETY: as above.
                                unsafe { map(src, dst, n, scale, shift, $element) }
                            }
                            let n = n.max(0) as usize;
                            // SAFETY: the kernel passes buffers of n floats (its chunk buffer,
                            // an input or its output), equal or disjoint; `functions` only
                            // hands these out where the host has AVX2 and FMA.
                            unsafe {
                                if has_avx512() { avx512(src, dst, n, scale, shift) } else { avx2(src, dst, n, scale, shift) }
                            }
                        }
                        f as *const u8
                    } }),
                )*]
            }
        };
    }

    wide! {
        Map::Unary(Unary::Exp), "modelc_wide_exp" => exp,
        Map::Unary(Unary::Log), "modelc_wide_log" => log,
        Map::Unary(Unary::Tanh), "modelc_wide_tanh" => tanh,
        Map::Unary(Unary::Erf), "modelc_wide_erf" => erf,
        Map::Unary(Unary::Sigmoid), "modelc_wide_sigmoid" => sigmoid,
        Map::Unary(Unary::Silu), "modelc_wide_silu" => silu,
        Map::Unary(Unary::Gelu), "modelc_wide_gelu" => gelu,
        Map::Unary(Unary::GeluTanh), "modelc_wide_gelu_tanh" => gelu_tanh,
        Map::Unary(Unary::Sin), "modelc_wide_sin" => sin,
        Map::Unary(Unary::Cos), "modelc_wide_cos" => cos,
        Map::Affine, "modelc_wide_affine" => identity,
    }
}
