//! Decode kernel (up to [`MAX_ROWS`] rows per sweep) for bf16 weights in
//! 512-bit f32 FMAs, for CPUs where those out-run `vdpbf16ps` (Intel cores
//! issue it at half the FMA rate). A weight line of 32 bf16 widens into
//! its even elements (a shift) and its odd ones (a mask), against
//! activation rows kept in the same even/odd order; the products are exact
//! f32, so f32 activations need no bf16 residual. Every weight is read and
//! widened once for all rows of a sweep.

use super::kernel_avx512::{even_odd_row, EvenOddRow};
use super::Tile;
use half::bf16;
use std::arch::x86_64::*;

/// Rows of one sweep: one sum per (row, weight row) in registers.
pub(crate) const MAX_ROWS: usize = 11;

/// Rows from which the packed kernels take over from sweeps of this one.
pub(crate) const PACKED_MIN_ROWS: usize = 24;

/// Whether the CPU runs this kernel and it is the one to use: AVX-512 F/BW
/// where 512-bit FMAs out-run `vdpbf16ps` (checked once).
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && super::kernel_avx512::fma_beats_dpbf16()
    })
}

/// Whether a tile of `rows` rows takes this kernel.
pub(crate) fn takes(rows: usize) -> bool {
    rows < PACKED_MIN_ROWS && available()
}

/// Prefetch distance in weight rows (the tile's rows are one stream).
const AHEAD_ROWS: usize = 8;

/// Activation bytes one K chunk of a sweep may hold, so they stay in L1
/// while the chunk meets every weight row of the tile (past that, 7–11
/// rows read their activations from L2 once per weight-row block).
const CHUNK_BYTES: usize = 32 << 10;

/// Adds groups `g0..g1` of `NW` weight rows from `n` times `M` even/odd
/// activation rows into the partial sums `acc[j * M + m]`; `tail`: the
/// chunk ends with K's last, partial group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const M: usize, const NW: usize>(
    rows: &[EvenOddRow],
    w: *const bf16,
    k: usize,
    n: usize,
    (g0, g1): (usize, usize),
    tail: bool,
    sums: *mut __m512,
) {
    let mut acc: [[__m512; NW]; M] =
        std::array::from_fn(|m| std::array::from_fn(|j| *sums.add(j * M + m)));
    let wp: [*const bf16; NW] = std::array::from_fn(|j| w.add((n + j) * k));
    let ap: [*const __m512; M] = std::array::from_fn(|m| rows[m].0.as_ptr());
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let widen = |x: __m512i| {
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
            _mm512_castsi512_ps(_mm512_and_si512(x, high)),
        )
    };
    for g in g0..g1 {
        // one cache line per weight row and group
        for p in wp {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(g * 32 + AHEAD_ROWS * k) as *const i8);
        }
        for j in 0..NW {
            let (even, odd) = widen(_mm512_loadu_si512(wp[j].add(g * 32) as *const _));
            for m in 0..M {
                acc[m][j] = _mm512_fmadd_ps(even, *ap[m].add(2 * g), acc[m][j]);
                acc[m][j] = _mm512_fmadd_ps(odd, *ap[m].add(2 * g + 1), acc[m][j]);
            }
        }
    }
    if tail {
        // missing weights load as zero (the activations are zero there too)
        let mask = (1u32 << (k - g1 * 32)) - 1;
        for j in 0..NW {
            let x = _mm512_maskz_loadu_epi16(mask, wp[j].add(g1 * 32) as *const i16);
            let (even, odd) = widen(x);
            for m in 0..M {
                acc[m][j] = _mm512_fmadd_ps(even, *ap[m].add(2 * g1), acc[m][j]);
                acc[m][j] = _mm512_fmadd_ps(odd, *ap[m].add(2 * g1 + 1), acc[m][j]);
            }
        }
    }
    for (m, acc) in acc.iter().enumerate() {
        for (j, v) in acc.iter().enumerate() {
            *sums.add(j * M + m) = *v;
        }
    }
}

/// The tile in K chunks of at most [`CHUNK_BYTES`] of activations; in each
/// the weight rows `NW` at a time, then one at a time. The partial sums
/// live in memory between chunks (one zmm per output).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_m<const M: usize, const NW: usize>(t: &Tile<'_, bf16>, rows: &[EvenOddRow]) {
    let cols = t.n1 - t.n0;
    let mut sums = vec![_mm512_setzero_ps(); cols * M];
    let full = t.k / 32;
    let chunk = (CHUNK_BYTES / (M * 128)).max(1);
    let mut g0 = 0;
    loop {
        let g1 = (g0 + chunk).min(full);
        let tail = g1 == full && full * 32 < t.k;
        let mut n = t.n0;
        while n < t.n1 {
            let s = sums.as_mut_ptr().add((n - t.n0) * M);
            if n + NW <= t.n1 {
                block::<M, NW>(rows, t.w.as_ptr(), t.k, n, (g0, g1), tail, s);
                n += NW;
            } else {
                block::<M, 1>(rows, t.w.as_ptr(), t.k, n, (g0, g1), tail, s);
                n += 1;
            }
        }
        if g1 == full {
            break;
        }
        g0 = g1;
    }
    for (col, s) in sums.chunks_exact(M).enumerate() {
        for (c, v) in t.c.iter().zip(s) {
            *c.add(col) = _mm512_reduce_add_ps(*v);
        }
    }
}

/// The tile's activation rows in even/odd order, for [`gemm_prepared`]
/// (callers running many column tiles of the same rows prepare them once).
///
/// # Safety
/// Every `a` pointer addresses `k` readable f32; the CPU has AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn prepare(a: &[*const f32], k: usize) -> Vec<EvenOddRow> {
    a.iter().map(|&a| even_odd_row(a, k)).collect()
}

/// Computes the tile (overwriting `c`) from its rows prepared by
/// [`prepare`], in sweeps of equal size of at most [`MAX_ROWS`] rows.
///
/// # Safety
/// As [`super::gemm_tile`]; `rows` are `t.a` prepared, and the CPU has
/// AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_prepared(t: &Tile<'_, bf16>, rows: &[EvenOddRow]) {
    let m = t.c.len().min(rows.len());
    let per = m.div_ceil(m.div_ceil(MAX_ROWS).max(1)).max(1);
    for (rows, c) in rows[..m].chunks(per).zip(t.c.chunks(per)) {
        let t = &Tile { c, ..*t };
        // weight rows per block: enough independent sums to hide the FMA
        // latency, few enough to stay in the 32 registers
        match rows.len() {
            1 => rows_m::<1, 8>(t, rows),
            2 => rows_m::<2, 8>(t, rows),
            3 => rows_m::<3, 8>(t, rows),
            4 => rows_m::<4, 4>(t, rows),
            5 => rows_m::<5, 4>(t, rows),
            6 => rows_m::<6, 4>(t, rows),
            7 => rows_m::<7, 2>(t, rows),
            8 => rows_m::<8, 2>(t, rows),
            9 => rows_m::<9, 2>(t, rows),
            10 => rows_m::<10, 2>(t, rows),
            _ => rows_m::<11, 2>(t, rows),
        }
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
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
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
