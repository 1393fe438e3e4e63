//! Decode (≤ 3 rows) kernel for bf16 weights on AVX-512 BF16: each weight
//! cache line (32 bf16) meets the activations in one `vdpbf16ps` (32
//! products), where the AVX2 path widens, permutes and issues four FMAs.
//! Activations are split into a bf16 high part and a bf16 residual, so
//! products keep ~16 bits of an f32 activation; activations that are bf16
//! already (bf16 compute) have no residual and take one instruction.

use super::Tile;
use half::bf16;
use std::arch::x86_64::*;

/// Whether the CPU runs these kernels (checked once).
pub(crate) fn available() -> bool {
    crate::cpu_features().avx512bf16
}

/// One activation row as bf16 (high, residual) pairs, 32 per zmm; the tail
/// past K is zero.
pub(crate) struct SplitRow {
    pub(crate) hi: Vec<__m512bh>,
    pub(crate) lo: Vec<__m512bh>,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn widen_bf16(h: __m512bh) -> [__m512; 2] {
    let h: __m512i = std::mem::transmute(h);
    let lo = _mm512_castsi512_si256(h);
    let hi = _mm512_extracti64x4_epi64::<1>(h);
    [
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(lo))),
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi))),
    ]
}

/// Lanes `[0, n)` of a 16-lane mask.
#[inline]
pub(crate) fn mask16(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Splits `k` f32 at `a`; returns the row and whether any residual is
/// non-zero.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn split_row(a: *const f32, k: usize) -> (SplitRow, bool) {
    let groups = k.div_ceil(32);
    let (mut hi, mut lo) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    // integer ORs: `_mm512_or_ps` is AVX-512 DQ, outside these features
    // (it would be a call per group)
    let mut any = _mm512_setzero_si512();
    for g in 0..groups {
        let c = 32 * g;
        let x0 = _mm512_maskz_loadu_ps(mask16(k - c), a.add(c));
        // wrapping: past the row's end the mask loads nothing
        let x1 = _mm512_maskz_loadu_ps(mask16(k.saturating_sub(c + 16)), a.wrapping_add(c + 16));
        let h = _mm512_cvtne2ps_pbh(x1, x0);
        let [h0, h1] = widen_bf16(h);
        let (r0, r1) = (_mm512_sub_ps(x0, h0), _mm512_sub_ps(x1, h1));
        let r = _mm512_or_si512(_mm512_castps_si512(r0), _mm512_castps_si512(r1));
        any = _mm512_or_si512(any, r);
        hi.push(h);
        lo.push(_mm512_cvtne2ps_pbh(r1, r0));
    }
    // any bit set: a residual of -0.0 counts, harmlessly
    let nonzero = _mm512_test_epi32_mask(any, any) != 0;
    (SplitRow { hi, lo }, nonzero)
}

/// `NW` weight rows from `n` against `M` split rows; `RES`: add the
/// residuals. Each (row, weight row) pair keeps two accumulators (even and
/// odd lines) so one row alone still hides the `vdpbf16ps` latency, and the
/// rows of a tile are read in address order, a single stream.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block<const M: usize, const NW: usize, const RES: bool>(
    rows: &[SplitRow],
    w: *const bf16,
    k: usize,
    n: usize,
    out: &mut [[f32; NW]; M],
) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; NW]; M];
    let wp: [*const bf16; NW] = std::array::from_fn(|j| w.add((n + j) * k));
    let full = k / 32;
    let dot = |acc: &mut [[[__m512; 2]; NW]; M], j: usize, u: usize, wv: __m512bh, g: usize| {
        for m in 0..M {
            acc[m][j][u] = _mm512_dpbf16_ps(acc[m][j][u], wv, rows[m].hi[g]);
            if RES {
                acc[m][j][u] = _mm512_dpbf16_ps(acc[m][j][u], wv, rows[m].lo[g]);
            }
        }
    };
    for (j, &row) in wp.iter().enumerate() {
        let mut g = 0;
        while g + 2 <= full {
            for u in 0..2 {
                let p = row.add((g + u) * 32);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(p as *const _));
                dot(&mut acc, j, u, wv, g + u);
            }
            g += 2;
        }
        if g < full {
            let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(g * 32) as *const _));
            dot(&mut acc, j, 0, wv, g);
        }
        if full * 32 < k {
            let mask = (1u32 << (k - full * 32)) - 1;
            let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                mask,
                row.add(full * 32) as *const i16,
            ));
            dot(&mut acc, j, 1, wv, full);
        }
    }
    for m in 0..M {
        for j in 0..NW {
            out[m][j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][j][0], acc[m][j][1]));
        }
    }
}

/// Prefetch distance in elements (8 KiB ahead of the stream).
const PREFETCH: usize = 4096;

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rows_m<const M: usize, const NW: usize, const RES: bool>(
    t: &Tile<'_, bf16>,
    rows: &[SplitRow],
) {
    let mut n = t.n0;
    while n < t.n1 {
        if n + NW <= t.n1 {
            let mut out = [[0f32; NW]; M];
            block::<M, NW, RES>(rows, t.w.as_ptr(), t.k, n, &mut out);
            for (c, o) in t.c.iter().zip(&out) {
                for (j, v) in o.iter().enumerate() {
                    *c.add(n - t.n0 + j) = *v;
                }
            }
            n += NW;
        } else {
            let mut out = [[0f32; 1]; M];
            block::<M, 1, RES>(rows, t.w.as_ptr(), t.k, n, &mut out);
            for (c, o) in t.c.iter().zip(&out) {
                *c.add(n - t.n0) = o[0];
            }
            n += 1;
        }
    }
}

/// Computes a tile of 1–3 rows (overwriting `c`).
///
/// # Safety
/// As [`super::gemm_tile`]; [`available`] must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn skinny(t: &Tile<'_, bf16>) {
    let (rows, res) = split_rows(t.a, t.k);
    skinny_split(t, &rows, res)
}

/// The rows `a` (each `k` long) split; whether any has a residual.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn split_rows(a: &[*const f32], k: usize) -> (Vec<SplitRow>, bool) {
    let split: Vec<(SplitRow, bool)> = a.iter().map(|&a| split_row(a, k)).collect();
    let res = split.iter().any(|s| s.1);
    (split.into_iter().map(|s| s.0).collect(), res)
}

/// [`skinny`] with the tile's rows split already ([`split_rows`]): callers
/// that run many column tiles of the same rows split them once.
///
/// # Safety
/// As [`skinny`]; `rows` are `t.a` split.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn skinny_split(t: &Tile<'_, bf16>, rows: &[SplitRow], res: bool) {
    let rows = &rows[..t.c.len().min(rows.len())];
    match (rows.len(), res) {
        (0, _) => {}
        (1, false) => rows_m::<1, 4, false>(t, rows),
        (1, true) => rows_m::<1, 4, true>(t, rows),
        (2, false) => rows_m::<2, 4, false>(t, rows),
        (2, true) => rows_m::<2, 4, true>(t, rows),
        (_, false) => rows_m::<3, 4, false>(t, rows),
        (_, true) => rows_m::<3, 4, true>(t, rows),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{gemm_tile_avx2, test_rand as rand, Tile};
    use half::bf16;

    /// Against an f64 reference and the AVX2 kernel, with f32 activations
    /// (residuals) and bf16-exact ones, K with and without a 32-tail.
    #[test]
    fn matches_reference_and_avx2() {
        if !super::available() {
            eprintln!("no AVX-512 BF16: skipped");
            return;
        }
        for (m, n, k) in [
            (1, 37, 2048),
            (2, 9, 100),
            (3, 20, 32),
            (1, 3, 7),
            (3, 17, 1000),
        ] {
            let w: Vec<bf16> = rand(n * k, 3).into_iter().map(bf16::from_f32).collect();
            for exact in [false, true] {
                let mut a = rand(m * k, 5 + m as u64);
                if exact {
                    a.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
                }
                let run = |special: bool| {
                    let mut c = vec![0f32; m * n];
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
                    unsafe {
                        if special {
                            super::skinny(&t)
                        } else {
                            gemm_tile_avx2(&t)
                        }
                    }
                    c
                };
                let (got, avx2) = (run(true), run(false));
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| a[r * k + i] as f64 * w[j * k + i].to_f64())
                            .sum();
                        let scale: f64 = (0..k)
                            .map(|i| (a[r * k + i] as f64 * w[j * k + i].to_f64()).abs())
                            .sum();
                        let g = got[r * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * scale,
                            "m {m} n {n} k {k} exact {exact}: {g} vs {want}"
                        );
                        assert!((g - avx2[r * n + j] as f64).abs() <= 2e-5 * scale);
                    }
                }
            }
        }
    }
}
