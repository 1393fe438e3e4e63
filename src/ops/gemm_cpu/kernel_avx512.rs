//! The packed kernels' register tile in 512-bit FMAs: up to 12 rows × 32
//! columns, two zmm per row, over two f32 panels of 16 columns each (the
//! same panels as the AVX2 6×16 tile). Where the CPU issues two 512-bit
//! FMAs per cycle it multiplies twice as much per cycle as the AVX2 tile,
//! and on Intel cores also twice as much as `vdpbf16ps`, which they run at
//! one per two cycles (measured here: 1.3 G/s against 5.4 G/s FMAs per
//! core); AMD Zen 4 is the other way round, so [`fma_beats_dpbf16`]
//! measures it. Two panels share each broadcast of A: a 12 × 16 tile ran
//! at 3.2–3.5 G FMA/s per core over 60 rows at an 8 KiB stride, the 12 ×
//! 32 one at 4.0–4.6 (standalone microbenchmark of the loop).

use super::bf16_avx512::mask16;
use super::{KC, NR};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows of the tile at most.
pub(crate) const MR_WIDE: usize = 12;
/// Columns of the tile at most: two panels.
pub(crate) const NR_WIDE: usize = 2 * NR;
/// f32 in the two panels of [`kernel_12x32`]: the second starts at `KC * NR`.
pub(crate) const PANELS_LEN: usize = 2 * KC * NR;

/// `C[r, 0..ns] (+)= A[r, k0..k0+kc] · [panel₀ | panel₁]`, where panel `p`
/// holds columns `16p..16p+16` as `panel[p * KC * 16 + kk * 16 + j]`, for
/// the rows `r` of `a` (at most [`MR_WIDE`]; every row is a real one: a
/// group of fewer rows runs a tile of that height, no padding rows); only
/// `ns` (≤ 32) columns are stored, at `c[r] + col`, and the second panel is
/// not read when `ns ≤ 16`.
///
/// # Safety
/// AVX-512F available; every `a[r] + k0` addresses `kc` readable f32,
/// `kc <= KC`, `panel` holds [`PANELS_LEN`] f32, and every `c[r] + col`
/// addresses `ns` writable f32; `c` is as long as `a`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_12x32(
    a: &[*const f32],
    k0: usize,
    panel: &[f32],
    kc: usize,
    c: &[*mut f32],
    col: usize,
    ns: usize,
    accumulate: bool,
) {
    debug_assert!(panel.len() >= PANELS_LEN && kc <= KC && ns <= NR_WIDE && c.len() == a.len());
    let args = (k0, panel, kc, col, ns, accumulate);
    if ns <= NR {
        return rows::<1>(a, c, args);
    }
    rows::<2>(a, c, args)
}

/// [`kernel_12x32`] over `P` panels.
///
/// # Safety
/// As [`kernel_12x32`], with `P == 2` only where `ns > 16`.
#[inline(always)]
unsafe fn rows<const P: usize>(a: &[*const f32], c: &[*mut f32], args: Args<'_>) {
    match a.len() {
        0 => {}
        1 => tile::<1, P>(a, c, args),
        2 => tile::<2, P>(a, c, args),
        3 => tile::<3, P>(a, c, args),
        4 => tile::<4, P>(a, c, args),
        5 => tile::<5, P>(a, c, args),
        6 => tile::<6, P>(a, c, args),
        7 => tile::<7, P>(a, c, args),
        8 => tile::<8, P>(a, c, args),
        9 => tile::<9, P>(a, c, args),
        10 => tile::<10, P>(a, c, args),
        11 => tile::<11, P>(a, c, args),
        _ => tile::<12, P>(a, c, args),
    }
}

/// `(k0, panel, kc, col, ns, accumulate)` of [`kernel_12x32`].
type Args<'a> = (usize, &'a [f32], usize, usize, usize, bool);

/// [`kernel_12x32`] for `R` rows and `P` panels.
///
/// # Safety
/// As [`rows`], and `a` holds at least `R` rows.
#[inline(always)]
unsafe fn tile<const R: usize, const P: usize>(
    a: &[*const f32],
    c: &[*mut f32],
    (k0, panel, kc, col, ns, accumulate): Args<'_>,
) {
    let mask: [u16; P] = std::array::from_fn(|p| mask16(ns.saturating_sub(p * NR)));
    let ap: [*const f32; R] = std::array::from_fn(|r| a[r].add(k0));
    let cp: [*mut f32; R] = std::array::from_fn(|r| c[r].add(col));
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if accumulate {
        for r in 0..R {
            for p in 0..P {
                acc[r][p] = _mm512_maskz_loadu_ps(mask[p], cp[r].add(p * NR));
            }
        }
    }
    let mut b = panel.as_ptr();
    for kk in 0..kc {
        let bv: [__m512; P] = std::array::from_fn(|p| _mm512_loadu_ps(b.add(p * KC * NR)));
        for r in 0..R {
            let x = _mm512_set1_ps(*ap[r].add(kk));
            for p in 0..P {
                acc[r][p] = _mm512_fmadd_ps(x, bv[p], acc[r][p]);
            }
        }
        b = b.add(NR);
    }
    for r in 0..R {
        for p in 0..P {
            _mm512_mask_storeu_ps(cp[r].add(p * NR), mask[p], acc[r][p]);
        }
    }
}

/// Whether the packed kernels should multiply in 512-bit f32 FMAs rather
/// than `vdpbf16ps`: AVX-512 without BF16, or BF16 that runs fewer
/// products per second than the FMAs (timed once, a fraction of a
/// millisecond: twelve independent chains of each, best of three; not
/// under `CANDLE_MOE_ISA=avx512-bf16`, which prefers `vdpbf16ps`).
pub(crate) fn fma_beats_dpbf16() -> bool {
    static FMA: OnceLock<bool> = OnceLock::new();
    *FMA.get_or_init(|| {
        let f = crate::cpu_features();
        if !f.avx512 || f.prefer_dpbf16 {
            return false;
        }
        if !f.avx512bf16 {
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

#[cfg(test)]
mod tests {
    use super::super::{avx2, test_rand as rand, Tile};

    /// The float packed loop on the 12 × 32 tile, taken whatever
    /// [`super::fma_beats_dpbf16`] says on the host, against an f64
    /// reference: N ending in a partial pair (21, 37), in a lone strip (33,
    /// 16) and a partial one (7); K over one block and over several, with a
    /// partial last block (the accumulate path); 12–25 rows (row groups of
    /// 12 and fewer).
    #[test]
    fn wide_tile_matches_reference() {
        if !crate::CpuFeatures::hardware().avx512 {
            eprintln!("no AVX-512F: skipped");
            return;
        }
        for (n, k) in [(21, 100), (37, 600), (33, 256), (16, 300), (7, 513)] {
            let w: Vec<f32> = rand(n * k, 7);
            for m in [12, 13, 25] {
                let a: Vec<f32> = rand(m * k, 9 + m as u64)
                    .iter()
                    .map(|x| x * 4.0 / (k as f32).sqrt())
                    .collect();
                let mut c = vec![f32::NAN; m * n];
                let ap: Vec<*const f32> = (0..m).map(|r| a[r * k..].as_ptr()).collect();
                let cp: Vec<*mut f32> = (0..m)
                    .map(|r| unsafe { c.as_mut_ptr().add(r * n) })
                    .collect();
                let t = Tile {
                    a: &ap,
                    w: &w,
                    k,
                    n0: 0,
                    n1: n,
                    c: &cp,
                };
                // SAFETY: AVX2 and AVX-512F checked; rows k long, outputs n.
                unsafe { avx2::packed(&t, true) };
                for r in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|i| a[r * k + i] as f64 * w[j * k + i] as f64);
                        let want: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        let g = c[r * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * scale,
                            "m {m} n {n} k {k} row {r} col {j}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
