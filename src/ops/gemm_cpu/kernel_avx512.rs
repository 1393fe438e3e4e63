//! The packed kernels' register tile in 512-bit FMAs: 12 rows × 16 columns,
//! one zmm per row, over the same f32 panels as the AVX2 6×16 tile. Where
//! the CPU issues two 512-bit FMAs per cycle it multiplies twice as much
//! per cycle as the AVX2 tile, and on Intel cores also twice as much as
//! `vdpbf16ps`, which they run at one per two cycles (measured here:
//! 1.3 G/s against 5.4 G/s FMAs per core); AMD Zen 4 is the other way
//! round, so [`fma_beats_dpbf16`] measures it.

use super::bf16_avx512::mask16;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows of the tile at most.
pub(crate) const MR_WIDE: usize = 12;

/// `C[r, 0..16] (+)= A[r, k0..k0+kc] · panel` (`panel[kk * 16 + j]`) for
/// the rows `r` of `a` (at most [`MR_WIDE`]; every row is a real one: a
/// group of fewer rows runs a tile of that height, no padding rows); only
/// `ns` columns are stored, at `c[r] + col`.
///
/// # Safety
/// AVX-512F available; every `a[r] + k0` addresses `kc` readable f32,
/// `panel` holds `kc * 16`, and every `c[r] + col` addresses `ns` writable
/// f32; `c` is as long as `a`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_12x16(
    a: &[*const f32],
    k0: usize,
    panel: &[f32],
    kc: usize,
    c: &[*mut f32],
    col: usize,
    ns: usize,
    accumulate: bool,
) {
    debug_assert!(panel.len() >= kc * 16 && c.len() == a.len());
    let args = (k0, panel, kc, col, ns, accumulate);
    match a.len() {
        0 => {}
        1 => tile::<1>(a, c, args),
        2 => tile::<2>(a, c, args),
        3 => tile::<3>(a, c, args),
        4 => tile::<4>(a, c, args),
        5 => tile::<5>(a, c, args),
        6 => tile::<6>(a, c, args),
        7 => tile::<7>(a, c, args),
        8 => tile::<8>(a, c, args),
        9 => tile::<9>(a, c, args),
        10 => tile::<10>(a, c, args),
        11 => tile::<11>(a, c, args),
        _ => tile::<12>(a, c, args),
    }
}

/// [`kernel_12x16`] for `R` rows.
#[inline(always)]
unsafe fn tile<const R: usize>(
    a: &[*const f32],
    c: &[*mut f32],
    (k0, panel, kc, col, ns, accumulate): (usize, &[f32], usize, usize, usize, bool),
) {
    let mask = mask16(ns);
    let ap: [*const f32; R] = std::array::from_fn(|r| a[r].add(k0));
    let cp: [*mut f32; R] = std::array::from_fn(|r| c[r].add(col));
    let mut acc = [_mm512_setzero_ps(); R];
    if accumulate {
        for r in 0..R {
            acc[r] = _mm512_maskz_loadu_ps(mask, cp[r]);
        }
    }
    let mut b = panel.as_ptr();
    for kk in 0..kc {
        let bv = _mm512_loadu_ps(b);
        for r in 0..R {
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*ap[r].add(kk)), bv, acc[r]);
        }
        b = b.add(16);
    }
    for r in 0..R {
        _mm512_mask_storeu_ps(cp[r], mask, acc[r]);
    }
}

/// Whether the packed kernels should multiply in 512-bit f32 FMAs rather
/// than `vdpbf16ps`: AVX-512F without BF16, or BF16 that runs fewer
/// products per second than the FMAs (timed once, a fraction of a
/// millisecond: twelve independent chains of each, best of three).
pub(crate) fn fma_beats_dpbf16() -> bool {
    static FMA: OnceLock<bool> = OnceLock::new();
    *FMA.get_or_init(|| {
        if !is_x86_feature_detected!("avx512f") {
            return false;
        }
        if !super::bf16_avx512::available() {
            return true;
        }
        // SAFETY: the features were just checked.
        let (fma, dp) = unsafe { (best_of(time_fma), best_of(time_dpbf16)) };
        // products per second: 16 per FMA, 32 per vdpbf16ps
        16.0 / fma > 32.0 / dp
    })
}

const CALIBRATION_STEPS: usize = 20_000;

/// # Safety
/// The CPU has the features `f` needs.
unsafe fn best_of(f: unsafe fn() -> f64) -> f64 {
    (0..3).map(|_| f()).fold(f64::MAX, f64::min)
}

#[target_feature(enable = "avx512f")]
unsafe fn time_fma() -> f64 {
    let mut acc = [_mm512_setzero_ps(); 12];
    let (w, x) = (_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
    let t = std::time::Instant::now();
    for _ in 0..CALIBRATION_STEPS {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, w, x);
        }
        // keeps the loop a loop (no memory traffic)
        std::arch::asm!("", options(nomem, nostack));
    }
    let e = t.elapsed().as_secs_f64();
    std::hint::black_box(acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum::<f32>());
    e
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn time_dpbf16() -> f64 {
    let mut acc = [_mm512_setzero_ps(); 12];
    let w: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f00));
    let t = std::time::Instant::now();
    for _ in 0..CALIBRATION_STEPS {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, w, w);
        }
        // keeps the loop a loop (no memory traffic)
        std::arch::asm!("", options(nomem, nostack));
    }
    let e = t.elapsed().as_secs_f64();
    std::hint::black_box(acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum::<f32>());
    e
}
