//! Prefill GEMM for bf16 activations × bf16 weights on AVX-512 BF16:
//! `C[r, n] = Σ_k A[r, k] · W[n, k]`, both bf16 (exact products, f32 sums).
//! A 32-column strip of W is packed once per call into k-pairs
//! (`[K/2][32][2]`, L2-sized for any K a model has), then 8-row groups of A
//! run an 8×32 register tile: per pair of k, two panel loads, eight
//! broadcast activation pairs and sixteen `vdpbf16ps` (32 products each) —
//! twice the multiply-adds per instruction of the f32 FMA kernel.
//!
//! Used by the dense linear op when its input is bf16 (bf16 compute), so no
//! activation is rounded that was not bf16 already.

use super::bf16_avx512::mask16;
use half::bf16;
use std::arch::x86_64::*;

/// Columns per strip (two zmm of f32 accumulators per row).
pub(crate) const STRIP: usize = 32;
/// Rows per register tile.
const MR: usize = 8;

/// Packs columns `n0..n0 + STRIP` (zero past `n`) of `w` (`[n, k]`, `k`
/// even) into `panel`: for each k-pair, 32 columns × (k, k+1). Full
/// 16-column × 16-pair blocks go through a register transpose.
fn pack(w: &[bf16], n: usize, k: usize, n0: usize, panel: &mut Vec<u32>) {
    let kp = k / 2;
    panel.clear();
    panel.resize(kp * STRIP, 0);
    let cols = STRIP.min(n.saturating_sub(n0));
    let mut done = vec![0usize; cols.div_ceil(16)];
    for (h, d) in done.iter_mut().enumerate() {
        if cols >= 16 * (h + 1) {
            // SAFETY: rows n0 + 16h .. +16 exist (cols ≥ 16(h+1)) and hold
            // kp u32 pairs each; panel holds kp · STRIP u32; the caller
            // checked the CPU features.
            unsafe { pack16(w, k, n0 + 16 * h, 16 * h, panel) };
            *d = kp / 16 * 16;
        }
    }
    for c in 0..cols {
        let row = &w[(n0 + c) * k..(n0 + c + 1) * k];
        for p in done[c / 16]..kp {
            panel[p * STRIP + c] =
                row[2 * p].to_bits() as u32 | (row[2 * p + 1].to_bits() as u32) << 16;
        }
    }
}

/// Transposes 16 rows × (kp / 16 · 16) pairs of `w` from row `r0` into panel
/// columns `c0..c0 + 16`.
#[target_feature(enable = "avx512f")]
unsafe fn pack16(w: &[bf16], k: usize, r0: usize, c0: usize, panel: &mut [u32]) {
    let kp = k / 2;
    let base = w.as_ptr().add(r0 * k) as *const u32;
    let out = panel.as_mut_ptr();
    for pb in 0..kp / 16 {
        let r: [__m512i; 16] =
            std::array::from_fn(|i| _mm512_loadu_si512(base.add(i * kp + pb * 16) as *const _));
        let t = transpose16(r);
        for (j, v) in t.iter().enumerate() {
            _mm512_storeu_si512(out.add((pb * 16 + j) * STRIP + c0) as *mut _, *v);
        }
    }
}

/// 16×16 transpose of u32 lanes: `out[j][i] = r[i][j]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // pairs of rows → 2×2 blocks of u32
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    // → 4×4 blocks within each 128-bit lane
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let g = i / 4 * 4;
        let (x, y) = match i % 4 {
            0 | 1 => (a[g], a[g + 2]),
            _ => (a[g + 1], a[g + 3]),
        };
        if i % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // lane L of b[4g + j] = column 4L + j of rows 4g..4g+4: gather lanes
    let c: [__m512i; 16] = std::array::from_fn(|i| {
        let (j, half) = (i % 4, i / 4 % 2);
        let g = if i < 8 { 0 } else { 2 };
        let (x, y) = (b[4 * g + j], b[4 * (g + 1) + j]);
        if half == 0 {
            _mm512_shuffle_i32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_i32x4::<0xDD>(x, y)
        }
    });
    // c[j] (j < 4): lanes = (L0 of rows 0-3, L2 of 0-3, L0 of 4-7, L2 of 4-7) ...
    std::array::from_fn(|o| {
        // column o = 4L + j, L = o / 4, j = o % 4
        let (l, j) = (o / 4, o % 4);
        let half = l % 2; // lanes 0/2 → shuffle 0x88, lanes 1/3 → 0xDD
        let lo = c[half * 4 + j]; // rows 0..8
        let hi = c[8 + half * 4 + j]; // rows 8..16
        if l < 2 {
            _mm512_shuffle_i32x4::<0x88>(lo, hi)
        } else {
            _mm512_shuffle_i32x4::<0xDD>(lo, hi)
        }
    })
}

/// `M` rows (pointers to `k` bf16 each) against the packed panel; writes
/// columns `0..cols` of each output row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const M: usize>(
    a: &[*const bf16],
    panel: &[u32],
    k: usize,
    c: &[*mut f32],
    cols: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let pp = panel.as_ptr();
    let ap: [*const u32; M] = std::array::from_fn(|r| a[r] as *const u32);
    for p in 0..k / 2 {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pp.add(p * STRIP) as *const _));
        let w1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(pp.add(p * STRIP + 16) as *const _));
        for r in 0..M {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap[r].add(p) as i32));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, x);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, x);
        }
    }
    for r in 0..M {
        let lo = mask16(cols);
        let hi = mask16(cols.saturating_sub(16));
        _mm512_mask_storeu_ps(c[r], lo, acc[r][0]);
        _mm512_mask_storeu_ps(c[r].wrapping_add(16), hi, acc[r][1]);
    }
}

/// Computes columns `n0..n1` of rows `a` into `c` (overwriting), `k` even.
///
/// # Safety
/// Every `a` pointer addresses `k` readable bf16 (`k` even), every `c`
/// pointer `n1 - n0` writable f32 no other thread touches, `w` holds rows
/// `n0..n1` of `[n, k]`, and [`super::bf16_avx512::available`] is true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn gemm(
    a: &[*const bf16],
    w: &[bf16],
    (n, k): (usize, usize),
    (n0, n1): (usize, usize),
    c: &[*mut f32],
) {
    debug_assert!(k % 2 == 0 && w.len() >= n * k);
    let mut panel = Vec::new();
    let mut s = n0;
    while s < n1 {
        let cols = STRIP.min(n1 - s);
        pack(w, n.min(n1), k, s, &mut panel);
        let mut r = 0;
        while r < a.len() {
            let m = MR.min(a.len() - r);
            let cs: Vec<*mut f32> = c[r..r + m].iter().map(|p| p.add(s - n0)).collect();
            let ar = &a[r..r + m];
            match m {
                8 => tile::<8>(ar, &panel, k, &cs, cols),
                7 => tile::<7>(ar, &panel, k, &cs, cols),
                6 => tile::<6>(ar, &panel, k, &cs, cols),
                5 => tile::<5>(ar, &panel, k, &cs, cols),
                4 => tile::<4>(ar, &panel, k, &cs, cols),
                3 => tile::<3>(ar, &panel, k, &cs, cols),
                2 => tile::<2>(ar, &panel, k, &cs, cols),
                _ => tile::<1>(ar, &panel, k, &cs, cols),
            }
            r += m;
        }
        s += cols;
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    #[test]
    fn matches_reference() {
        if !super::super::bf16_avx512::available() {
            eprintln!("no AVX-512 BF16: skipped");
            return;
        }
        let mut s = 7u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        };
        for (m, n, k) in [(9, 70, 64), (16, 32, 2), (1, 5, 100), (20, 33, 256)] {
            let a: Vec<bf16> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| rnd()).collect();
            let (n0, n1) = (1.min(n - 1), n);
            let mut c = vec![f32::NAN; m * (n1 - n0)];
            let ap: Vec<*const bf16> = (0..m).map(|r| a[r * k..].as_ptr()).collect();
            let cp: Vec<*mut f32> = (0..m)
                .map(|r| unsafe { c.as_mut_ptr().add(r * (n1 - n0)) })
                .collect();
            unsafe { super::gemm(&ap, &w, (n, k), (n0, n1), &cp) };
            for r in 0..m {
                for j in n0..n1 {
                    let want: f64 = (0..k)
                        .map(|i| a[r * k + i].to_f64() * w[j * k + i].to_f64())
                        .sum();
                    let got = c[r * (n1 - n0) + j - n0] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}x{n}x{k} r {r} c {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod transpose_tests {
    #[test]
    fn transpose16_is_a_transpose() {
        if !super::super::bf16_avx512::available() {
            return;
        }
        use std::arch::x86_64::*;
        let m: Vec<u32> = (0..256).collect();
        unsafe {
            let r: [__m512i; 16] =
                std::array::from_fn(|i| _mm512_loadu_si512(m.as_ptr().add(16 * i) as *const _));
            let t = super::transpose16(r);
            let mut out = vec![0u32; 256];
            for (j, v) in t.iter().enumerate() {
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * j) as *mut _, *v);
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(out[16 * j + i], m[16 * i + j], "({i}, {j})");
                }
            }
        }
    }
}
