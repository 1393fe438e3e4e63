//! Decode kernels on AVX-512. Where `vdpbf16ps` out-runs 512-bit FMAs (AMD
//! Zen 4), MXFP4 nibbles become bf16 pairs with one word permute and meet
//! the activations in `vdpbf16ps` (the activation split into a bf16 high
//! part and residual, so the products keep ~16 bits of it), and FP8 bytes
//! widen through f16 32 at a time into two sums per output. Elsewhere both
//! formats run in f32 FMAs over [`sweep`]: MXFP4 through a scaled f32
//! table, FP8 64 bytes at a time in even/odd order. The same widening
//! feeds the prefill's panel packer (`decode_row_even_odd`).

use super::super::bf16_avx512::{split_rows, SplitRow};
use super::super::sweep::{self, SweepBlock, SweepRows};
use super::skinny::{for_row_blocks, fp8_block, Lanes};
use super::*;
use std::arch::x86_64::*;

const AHEAD_ROWS: usize = 8;

/// For every e8m0 scale, the bf16 bits of the 16 e2m1 codes times that
/// scale (exact: a power of two), so a word permute yields scaled weights.
#[repr(C, align(64))]
pub(super) struct ScaledLut(pub(super) [u16; 32]);

pub(super) static MX_BF16_LUTS: LazyLock<Vec<ScaledLut>> = LazyLock::new(|| {
    (0..256)
        .map(|e| {
            let mut w = [0u16; 32];
            for (c, w) in w.iter_mut().take(16).enumerate() {
                let v = e2m1_to_f32(c as u8) * 2f32.powi(e - 127);
                *w = half::bf16::from_f32(v).to_bits();
            }
            ScaledLut(w)
        })
        .collect()
});

/// For every e8m0 scale, the 16 e2m1 codes times that scale in f32 (a
/// power of two: exact, as `e2m1_to_f32 · e8m0_to_f32`).
#[repr(C, align(64))]
pub(super) struct F32Lut([f32; 16]);

static MX_F32_LUTS: LazyLock<Vec<F32Lut>> = LazyLock::new(|| {
    (0..=255u8)
        .map(|e| {
            F32Lut(std::array::from_fn(|c| {
                e2m1_to_f32(c as u8) * crate::format::mxfp4::e8m0_to_f32(e)
            }))
        })
        .collect()
});

/// MXFP4 in f32 FMAs, for CPUs where 512-bit FMAs out-run `vdpbf16ps`:
/// a group's 16 bytes widen to dword lanes whose low 4 bits index its
/// scaled f32 table (`vpermps` reads only those bits) for the even
/// elements, shifted right 4 for the odd ones; the products are exact f32.
struct MxFma<'a> {
    q: &'a [u8],
    scales: &'a [u8],
    k: usize,
}

impl SweepBlock for MxFma<'_> {
    fn groups(&self) -> usize {
        self.k / MX_GROUP
    }

    #[inline(always)]
    unsafe fn block<const M: usize, const NW: usize>(
        &self,
        a: *const __m512,
        n: usize,
        (g0, g1): (usize, usize),
        sums: *mut __m512,
    ) {
        let (luts, k) = (&*MX_F32_LUTS, self.k);
        let mut acc = sweep::load_sums::<M, NW>(sums, g0);
        let wp: [*const u8; NW] = std::array::from_fn(|j| self.q.as_ptr().add((n + j) * k / 2));
        let sp: [*const u8; NW] =
            std::array::from_fn(|j| self.scales.as_ptr().add((n + j) * k / MX_GROUP));
        for gi in g0..g1 {
            if gi % 4 == 0 {
                for p in wp {
                    _mm_prefetch::<_MM_HINT_T0>(
                        p.wrapping_add(gi * 16 + AHEAD_ROWS * k / 2) as *const i8
                    );
                }
            }
            let wv: [(__m512, __m512); NW] = std::array::from_fn(|j| {
                let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(wp[j].add(gi * 16) as *const __m128i));
                // the scale byte indexes a table of 256: no bounds check needed
                let lut = _mm512_load_ps(luts.get_unchecked(*sp[j].add(gi) as usize).0.as_ptr());
                (
                    _mm512_permutexvar_ps(x, lut),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(x), lut),
                )
            });
            sweep::fma_group(&mut acc, a.add(gi * M * 2), &wv);
        }
        sweep::store_sums(&acc, sums);
    }
}

/// [`MxFma`] over the tile's rows (at most [`sweep::MAX_ROWS`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn mx_fma(t: &QTile<'_>, q: &[u8], scales: &[u8], k: usize) {
    let rows = SweepRows::new(t.a, k);
    sweep::sweep(&MxFma { q, scales, k }, &rows, (t.n0, t.n1), t.c)
}

/// MXFP4: `NW` rows from `n` against `M` split activation rows. Each
/// group's scale is folded into the looked-up bf16 weights, so the dot
/// products accumulate straight into one sum per (row, weight row), the
/// residual products (`RES`) into the same sum. Every weight group is
/// decoded once for all `M` rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn mx_block<const M: usize, const NW: usize, const RES: bool>(
    rows: &[SplitRow],
    q: &[u8],
    scales: &[u8],
    k: usize,
    n: usize,
    out: &mut [[f32; NW]; M],
) {
    let luts = &*MX_BF16_LUTS;
    let mut acc = [[_mm512_setzero_ps(); NW]; M];
    let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k / 2));
    let sp: [*const u8; NW] = std::array::from_fn(|j| scales.as_ptr().add((n + j) * k / MX_GROUP));
    let hi: [*const __m512bh; M] = std::array::from_fn(|m| rows[m].hi.as_ptr());
    let lo: [*const __m512bh; M] = std::array::from_fn(|m| rows[m].lo.as_ptr());
    let mask = _mm512_set1_epi32(0x000f_000f);
    for gi in 0..k / MX_GROUP {
        if gi % 4 == 0 {
            for p in wp {
                _mm_prefetch::<_MM_HINT_T0>(
                    p.wrapping_add(gi * 16 + AHEAD_ROWS * k / 2) as *const i8
                );
            }
        }
        for j in 0..NW {
            // byte b of the group → dword lane b: (lo nibble, hi nibble) word indices
            let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(wp[j].add(gi * 16) as *const __m128i));
            let idx = _mm512_ternarylogic_epi32::<0xA8>(x, _mm512_slli_epi32::<12>(x), mask);
            // the scale byte indexes a table of 256: no bounds check needed
            let lut = luts.get_unchecked(*sp[j].add(gi) as usize);
            let lut = _mm512_load_si512(lut.0.as_ptr() as *const _);
            let w: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(idx, lut));
            for m in 0..M {
                acc[m][j] = _mm512_dpbf16_ps(acc[m][j], w, *hi[m].add(gi));
                if RES {
                    acc[m][j] = _mm512_dpbf16_ps(acc[m][j], w, *lo[m].add(gi));
                }
            }
        }
    }
    for m in 0..M {
        for j in 0..NW {
            out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
        }
    }
}

/// 32 e4m3 bytes → two zmm of f32 equal to the values / 256.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn fp8_dec32(p: *const u8) -> [__m512; 2] {
    let b = _mm256_loadu_si256(p as *const __m256i);
    let t = _mm512_slli_epi16::<7>(_mm512_cvtepu8_epi16(b));
    let h = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
    [
        _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
    ]
}

/// 64 e4m3 bytes → f32 equal to the values / 256, as two groups of 32 in
/// even/odd order: `[g0 even, g0 odd, g1 even, g1 odd]`. The bytes are
/// moved into f16 place as the odd and even halves of 16-bit lanes (shifts
/// and a mask: no byte-to-word widening shuffle), so 64 weights take five
/// integer instructions and four conversions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn fp8_dec64_even_odd(x: __m512i) -> [__m512; 4] {
    // a byte at bits 8..16 of its lane, shifted right (arithmetic) by one:
    // sign at bits 14 and 15, exponent and mantissa at 7..14; the mask keeps
    // the sign at 15 and clears the other byte's bits
    let m = _mm512_set1_epi16(0xBF80u16 as i16);
    let odd = _mm512_and_si512(_mm512_srai_epi16::<1>(x), m);
    let even = _mm512_and_si512(_mm512_srai_epi16::<1>(_mm512_slli_epi16::<8>(x)), m);
    [
        _mm512_cvtph_ps(_mm512_castsi512_si256(even)),
        _mm512_cvtph_ps(_mm512_castsi512_si256(odd)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(even)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(odd)),
    ]
}

/// Whether [`decode_row_even_odd`] takes `w`: MXFP4, or FP8 whose scale
/// blocks hold whole groups of 32 along K.
pub(super) fn even_odd_rows_fit(w: &PackedMat<'_>) -> bool {
    matches!(w, PackedMat::Mxfp4 { .. }) || fp8_fma_fits(w)
}

/// Row `n` of `w` from column `k0` (a multiple of 32) into `out` (the
/// panel packer's row), scaled: its first `out.len() / 32 * 32` columns in
/// even/odd order per group of 32, the rest in order.
///
/// # Safety
/// [`even_odd_rows_fit`]; row `n` exists and `k0 + out.len() <= K`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn decode_row_even_odd(w: &PackedMat<'_>, n: usize, k0: usize, out: &mut [f32]) {
    let full = out.len() / 32;
    let o = out.as_mut_ptr();
    match *w {
        PackedMat::Fp8 {
            q,
            scales,
            k,
            bn,
            bk,
        } => {
            let srow = scales.as_ptr().add((n / bn) * k.div_ceil(bk));
            let scale = |g: usize| _mm512_set1_ps(*srow.add((k0 + 32 * g) / bk) * 256.0);
            let qp = q.as_ptr().add(n * k + k0);
            let mut g = 0;
            while g < full {
                let two = g + 2 <= full;
                let x = if two {
                    _mm512_loadu_si512(qp.add(32 * g) as *const _)
                } else {
                    _mm512_maskz_loadu_epi8(u32::MAX as u64, qp.add(32 * g) as *const i8)
                };
                let d = fp8_dec64_even_odd(x);
                let s0 = scale(g);
                _mm512_storeu_ps(o.add(32 * g), _mm512_mul_ps(d[0], s0));
                _mm512_storeu_ps(o.add(32 * g + 16), _mm512_mul_ps(d[1], s0));
                if two {
                    let s1 = scale(g + 1);
                    _mm512_storeu_ps(o.add(32 * g + 32), _mm512_mul_ps(d[2], s1));
                    _mm512_storeu_ps(o.add(32 * g + 48), _mm512_mul_ps(d[3], s1));
                }
                g += 2;
            }
        }
        PackedMat::Mxfp4 { q, scales, k } => {
            let luts = &*MX_F32_LUTS;
            let e = n * k + k0;
            for g in 0..full {
                let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    q.as_ptr().add(e / 2 + 16 * g) as *const __m128i
                ));
                // the scale byte indexes a table of 256: no bounds check needed
                let lut = luts.get_unchecked(scales[e / MX_GROUP + g] as usize);
                let lut = _mm512_load_ps(lut.0.as_ptr());
                _mm512_storeu_ps(o.add(32 * g), _mm512_permutexvar_ps(x, lut));
                let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(x), lut);
                _mm512_storeu_ps(o.add(32 * g + 16), odd);
            }
        }
    }
    w.decode_scalar(n, k0 + 32 * full, &mut out[32 * full..]);
}

/// FP8 in one sweep of f32 FMAs (where FMAs out-run `vdpbf16ps`): pairs
/// of groups (64 bytes) widen through f16 in even/odd order
/// ([`fp8_dec64_even_odd`]), and every (row, weight row) keeps one sum.
/// The scale is applied where it costs least:
/// - one block along K (per channel, per tensor): to the finished sums;
/// - blocks along K, under 4 rows: the pair's products are summed apart
///   and folded in with one FMA per (row, weight row);
/// - 4 rows or more: to the widened weights (one multiply per vector,
///   shared by the rows).
///
/// Needs scale blocks that hold whole groups of 32 ([`fp8_fma_fits`]).
struct Fp8Fma<'a> {
    q: &'a [u8],
    scales: &'a [f32],
    k: usize,
    bn: usize,
    bk: usize,
}

/// Whether [`Fp8Fma`] takes `w`: FP8 whose scale blocks span whole groups
/// of 32 along K (128 × 128 blocks, per channel, per tensor).
pub(super) fn fp8_fma_fits(w: &PackedMat<'_>) -> bool {
    matches!(*w, PackedMat::Fp8 { k, bk, .. } if bk % 32 == 0 || bk >= k)
}

impl SweepBlock for Fp8Fma<'_> {
    const PAIRS: bool = true;

    fn groups(&self) -> usize {
        self.k.div_ceil(32)
    }

    /// A group past K's last full one is the partial tail (missing bytes
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
        let kb = k.div_ceil(self.bk);
        let mut acc = sweep::load_sums::<M, NW>(sums, g0);
        let wp: [*const u8; NW] = std::array::from_fn(|j| self.q.as_ptr().add((n + j) * k));
        let sp: [*const f32; NW] =
            std::array::from_fn(|j| self.scales.as_ptr().add(((n + j) / self.bn) * kb));
        // groups per scale block (one block: all of them)
        let per = if kb == 1 { usize::MAX } else { self.bk / 32 };
        let full = k / 32;
        let mut g = g0;
        while g < g1 {
            let blk = g.checked_div(per).unwrap_or(0);
            let end = blk.saturating_add(1).saturating_mul(per).min(g1);
            let sv: [__m512; NW] = std::array::from_fn(|j| _mm512_set1_ps(*sp[j].add(blk) * 256.0));
            while g < end {
                // two whole groups of this scale block, or one (maybe the tail)
                let two = g + 2 <= end && g + 2 <= full;
                let wv: [[__m512; 4]; NW] = std::array::from_fn(|j| {
                    let p = wp[j].add(32 * g);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD_ROWS * k) as *const i8);
                    let x = if two {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        let bytes = (k - 32 * g).min(32);
                        _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, p as *const i8)
                    };
                    fp8_dec64_even_odd(x)
                });
                let ag = a.add(g * M * 2);
                if kb > 1 && M < 4 {
                    for (m, acc) in acc.iter_mut().enumerate() {
                        let (x0, x1) = (*ag.add(2 * m), *ag.add(2 * m + 1));
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let mut p = _mm512_mul_ps(wv[j][0], x0);
                            p = _mm512_fmadd_ps(wv[j][1], x1, p);
                            if two {
                                let ag1 = ag.add(M * 2);
                                p = _mm512_fmadd_ps(wv[j][2], *ag1.add(2 * m), p);
                                p = _mm512_fmadd_ps(wv[j][3], *ag1.add(2 * m + 1), p);
                            }
                            *acc = _mm512_fmadd_ps(p, sv[j], *acc);
                        }
                    }
                } else {
                    let scale = |v: __m512, j: usize| {
                        if kb > 1 {
                            _mm512_mul_ps(v, sv[j])
                        } else {
                            v
                        }
                    };
                    let w0: [(__m512, __m512); NW] =
                        std::array::from_fn(|j| (scale(wv[j][0], j), scale(wv[j][1], j)));
                    sweep::fma_group(&mut acc, ag, &w0);
                    if two {
                        let w1: [(__m512, __m512); NW] =
                            std::array::from_fn(|j| (scale(wv[j][2], j), scale(wv[j][3], j)));
                        sweep::fma_group(&mut acc, ag.add(M * 2), &w1);
                    }
                }
                g += if two { 2 } else { 1 };
            }
        }
        // one scale per row: the sums take it once they are complete
        if kb == 1 && g1 == self.groups() {
            for acc in acc.iter_mut() {
                for (j, v) in acc.iter_mut().enumerate() {
                    *v = _mm512_mul_ps(*v, _mm512_set1_ps(*sp[j] * 256.0));
                }
            }
        }
        sweep::store_sums(&acc, sums);
    }
}

impl Lanes for __m512 {
    const WIDTH: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self)
    }
    #[inline(always)]
    unsafe fn fp8_decode(p: *const u8) -> [Self; 2] {
        fp8_dec32(p)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn skinny_m<const M: usize, const NW: usize>(t: &QTile<'_>) {
    let (split, res): (Vec<SplitRow>, bool) = match t.w {
        PackedMat::Mxfp4 { k, .. } => split_rows(t.a, k),
        PackedMat::Fp8 { .. } => (vec![], false),
    };
    match t.w {
        PackedMat::Fp8 {
            q,
            scales,
            k,
            bn,
            bk,
        } => {
            let (w, shape) = ((q, scales), (k, bn, bk));
            for_row_blocks::<M, NW>(
                t,
                |n, out| fp8_block::<__m512, M, NW>(t.a, w, shape, n, AHEAD_ROWS, out),
                |n, out| fp8_block::<__m512, M, 1>(t.a, w, shape, n, AHEAD_ROWS, out),
            )
        }
        // bf16 activations (bf16 compute) have no residual to multiply
        PackedMat::Mxfp4 { q, scales, k } if res => for_row_blocks::<M, NW>(
            t,
            |n, out| mx_block::<M, NW, true>(&split, q, scales, k, n, out),
            |n, out| mx_block::<M, 1, true>(&split, q, scales, k, n, out),
        ),
        PackedMat::Mxfp4 { q, scales, k } => for_row_blocks::<M, NW>(
            t,
            |n, out| mx_block::<M, NW, false>(&split, q, scales, k, n, out),
            |n, out| mx_block::<M, 1, false>(&split, q, scales, k, n, out),
        ),
    }
}

/// All of the tile's rows (at most `avx512_sweep_rows`) in one sweep:
/// every weight is read and decoded once, its products with each row
/// accumulate in registers. `fma`: MXFP4 ([`MxFma`]) and FP8 whose scale
/// blocks fit ([`Fp8Fma`]) in f32 FMAs; else MXFP4 in `vdpbf16ps` and FP8
/// in the two-sum kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn skinny(t: &QTile<'_>, fma: bool) {
    // without `fma`, weight rows per block sized so the sums and decoded
    // weights stay in the 32 zmm registers: MXFP4 keeps one sum per (row,
    // weight row), FP8 two (the k-block's partial sum and the total) and
    // two decoded vectors per weight row
    let mx = matches!(t.w, PackedMat::Mxfp4 { .. });
    debug_assert!(t.a.len() <= avx512_sweep_rows(&t.w, fma));
    match (t.w, fma) {
        (PackedMat::Mxfp4 { q, scales, k }, true) => return mx_fma(t, q, scales, k),
        (
            PackedMat::Fp8 {
                q,
                scales,
                k,
                bn,
                bk,
            },
            true,
        ) if fp8_fma_fits(&t.w) => {
            let kern = Fp8Fma {
                q,
                scales,
                k,
                bn,
                bk,
            };
            let rows = SweepRows::new(t.a, k);
            return sweep::sweep(&kern, &rows, (t.n0, t.n1), t.c);
        }
        _ => {}
    }
    match (t.a.len(), mx) {
        (0, _) => {}
        (1, true) => skinny_m::<1, 8>(t),
        (2, true) => skinny_m::<2, 8>(t),
        (3, true) => skinny_m::<3, 8>(t),
        (4, true) => skinny_m::<4, 4>(t),
        (5, true) => skinny_m::<5, 4>(t),
        (6, true) => skinny_m::<6, 4>(t),
        (7, true) => skinny_m::<7, 2>(t),
        (8, true) => skinny_m::<8, 2>(t),
        (9, true) => skinny_m::<9, 2>(t),
        (10, true) => skinny_m::<10, 2>(t),
        (_, true) => skinny_m::<11, 2>(t),
        (1, false) => skinny_m::<1, 4>(t),
        (2, false) => skinny_m::<2, 4>(t),
        (3, false) => skinny_m::<3, 2>(t),
        (4, false) => skinny_m::<4, 2>(t),
        (5, false) => skinny_m::<5, 2>(t),
        (_, false) => skinny_m::<6, 2>(t),
    }
}
