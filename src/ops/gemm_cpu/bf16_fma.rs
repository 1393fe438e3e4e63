//! Decode kernel for bf16 weights in 512-bit f32 FMAs, for CPUs where
//! those out-run `vdpbf16ps` (Intel cores issue it at half the FMA rate).
//! A weight line of 32 bf16 widens into its even elements (a shift) and its
//! odd ones (a mask), against activation rows kept in the same even/odd
//! order ([`SweepRows`]); the products are exact f32, so f32 activations
//! need no bf16 residual. Every weight is read and widened once for all
//! rows of a sweep (at most [`sweep::MAX_ROWS`]).

use super::sweep::{self, SweepBlock, SweepRows};
use super::Tile;
use half::bf16;
use std::arch::x86_64::*;

/// Rows from which the f32 FMA tile takes over from sweeps of this one
/// (bench_linear 1408×2048 and 2048×1408: the sweeps ran 0.79–0.88× the
/// tile's time at 24–32 rows with f32 activations and tied `bf16_packed`
/// at 24–48 with bf16 ones; one rule for both).
pub(crate) const PACKED_MIN_ROWS: usize = 24;

/// Whether the CPU runs this kernel and it is the one to use: AVX-512 F/BW
/// where 512-bit FMAs out-run `vdpbf16ps` (checked once).
pub(crate) fn available() -> bool {
    crate::cpu_features().avx512 && super::kernel_avx512::fma_beats_dpbf16()
}

/// Whether a tile of `rows` rows takes this kernel.
pub(crate) fn takes(rows: usize) -> bool {
    rows < PACKED_MIN_ROWS && available()
}

/// Prefetch distance in weight rows (the tile's rows are one stream).
const AHEAD_ROWS: usize = 8;

/// One bf16 weight matrix `[N, k]`.
struct Bf16Block {
    w: *const bf16,
    k: usize,
}

impl SweepBlock for Bf16Block {
    fn groups(&self) -> usize {
        self.k.div_ceil(32)
    }

    /// A group past K's last full one is the partial tail (missing weights
    /// load as zero, as do the activations there).
    #[inline(always)]
    unsafe fn block<const M: usize, const NW: usize>(
        &self,
        a: *const __m512,
        n: usize,
        (g0, g1): (usize, usize),
        sums: *mut __m512,
    ) {
        let k = self.k;
        let mut acc = sweep::load_sums::<M, NW>(sums, g0);
        let wp: [*const bf16; NW] = std::array::from_fn(|j| self.w.add((n + j) * k));
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let widen = |x: __m512i| {
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
                _mm512_castsi512_ps(_mm512_and_si512(x, high)),
            )
        };
        let full = k / 32;
        for g in g0..g1 {
            let wv: [(__m512, __m512); NW] = std::array::from_fn(|j| {
                let p = wp[j].add(g * 32);
                // one cache line per weight row and group
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_ROWS * k) as *const i8);
                widen(if g < full {
                    _mm512_loadu_si512(p as *const _)
                } else {
                    _mm512_maskz_loadu_epi16((1u32 << (k - full * 32)) - 1, p as *const i16)
                })
            });
            sweep::fma_group(&mut acc, a.add(g * M * 2), &wv);
        }
        sweep::store_sums(&acc, sums);
    }
}

/// The tile's activation rows prepared for [`gemm_prepared`], one
/// [`SweepRows`] per sweep (callers running many column tiles of the same
/// rows prepare them once).
///
/// # Safety
/// Every `a` pointer addresses `k` readable f32; the CPU has AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn prepare(a: &[*const f32], k: usize) -> Vec<SweepRows> {
    a.chunks(sweep::sweep_rows(a.len()))
        .map(|a| SweepRows::new(a, k))
        .collect()
}

/// Computes the tile (overwriting `c`) from its rows prepared by
/// [`prepare`].
///
/// # Safety
/// As [`super::gemm_tile`]; `sweeps` are `t.a` prepared, and the CPU has
/// AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_prepared(t: &Tile<'_, bf16>, sweeps: &[SweepRows]) {
    let kern = Bf16Block {
        w: t.w.as_ptr(),
        k: t.k,
    };
    let mut c = t.c;
    for rows in sweeps {
        let (now, rest) = c.split_at(rows.rows().min(c.len()));
        sweep::sweep(&kern, rows, (t.n0, t.n1), now);
        c = rest;
    }
}

/// Computes the tile (overwriting `c`).
///
/// # Safety
/// As [`gemm_prepared`], without the rows.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm(t: &Tile<'_, bf16>) {
    gemm_prepared(t, &prepare(t.a, t.k))
}

#[cfg(test)]
mod tests {
    use super::super::{test_rand as rand, Tile};
    use half::bf16;

    /// Against an f64 reference: every sweep size (1–23 rows, equal passes),
    /// K with and without a 32-tail, N not a multiple of the weight-row
    /// block, inputs scaled so sums are O(1).
    #[test]
    fn matches_reference() {
        if !crate::CpuFeatures::hardware().avx512 {
            eprintln!("no AVX-512 F/BW: skipped");
            return;
        }
        for (n, k) in [(37, 2048), (9, 100), (20, 32), (3, 7), (17, 1000)] {
            let w: Vec<bf16> = rand(n * k, 3).into_iter().map(bf16::from_f32).collect();
            for m in 1..super::PACKED_MIN_ROWS {
                let a: Vec<f32> = rand(m * k, 5 + m as u64)
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
                unsafe { super::gemm(&t) };
                for r in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|i| a[r * k + i] as f64 * w[j * k + i].to_f64());
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
