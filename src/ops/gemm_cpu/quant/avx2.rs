//! Prefill of the quantized GEMM: weight strips decoded into the f32
//! panels of the dense tiles — the 6×16 AVX2 one (AVX2 + FMA + F16C
//! widening, 8 × 8 transposes), or the 12×32 zmm one with panels from
//! `pack_avx512` where the format's scale blocks allow.

use super::super::avx2::{kernel_6x16, transpose8};
use super::super::kernel_avx512::{kernel_12x32, MR_WIDE, NR_WIDE, PANELS_LEN};
use super::super::{pack_avx512, row_groups};
use super::*;
use std::arch::x86_64::*;

/// 16 e4m3 bytes → 16 f32 equal to the values / 256.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_dec16(p: *const u8) -> [__m256; 2] {
    // x << 7 puts exponent and mantissa in f16 place (bits 7..13) and the
    // sign at bit 14; adding bit 14 to itself moves it to bit 15
    let t = _mm256_slli_epi16::<7>(_mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i)));
    let h = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
    ]
}

/// 16 packed bytes (32 e2m1) → 32 f32 equal to 2 · value, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mx_dec32(p: *const u8) -> [__m256; 4] {
    let lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    let b = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(b, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), mask);
    let v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
    let v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
    let cvt = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    [
        cvt(v0),
        cvt(_mm_srli_si128::<8>(v0)),
        cvt(v1),
        cvt(_mm_srli_si128::<8>(v1)),
    ]
}

/// Decodes `out.len()` values of row `n` from column `k0` (a multiple of
/// 32 for mxfp4, of 16 for fp8 blocks).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_row(w: &PackedMat<'_>, n: usize, k0: usize, out: &mut [f32]) {
    let len = out.len();
    let o = out.as_mut_ptr();
    match *w {
        PackedMat::Fp8 {
            q,
            scales,
            k,
            bn,
            bk,
        } => {
            let kb = k.div_ceil(bk);
            let srow = &scales[(n / bn) * kb..];
            let qp = q.as_ptr().add(n * k + k0);
            let mut j = 0;
            while j + 16 <= len {
                let s = _mm256_set1_ps(srow[(k0 + j) / bk] * 256.0);
                let v = fp8_dec16(qp.add(j));
                _mm256_storeu_ps(o.add(j), _mm256_mul_ps(v[0], s));
                _mm256_storeu_ps(o.add(j + 8), _mm256_mul_ps(v[1], s));
                j += 16;
            }
            w.decode_scalar(n, k0 + j, &mut out[j..]);
        }
        PackedMat::Mxfp4 { q, scales, k } => {
            let half = &*MX_HALF_SCALE;
            let mut j = 0;
            while j + 32 <= len {
                let c = n * k + k0 + j;
                let s = _mm256_set1_ps(half[scales[c / MX_GROUP] as usize]);
                let v = mx_dec32(q.as_ptr().add(c / 2));
                for (u, v) in v.iter().enumerate() {
                    _mm256_storeu_ps(o.add(j + 8 * u), _mm256_mul_ps(*v, s));
                }
                j += 32;
            }
            w.decode_scalar(n, k0 + j, &mut out[j..]);
        }
    }
}

/// Decodes rows `s..s+ns` over `k0..k0+kc` into the transposed panel
/// `panel[kk*16 + j]`, zero-filling rows `ns..16`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_strip(
    w: &PackedMat<'_>,
    s: usize,
    ns: usize,
    k0: usize,
    kc: usize,
    rows: &mut [f32],
    panel: &mut [f32],
) {
    for j in 0..NR {
        let r = &mut rows[j * KC..j * KC + kc];
        if j < ns {
            decode_row(w, s + j, k0, r);
        } else {
            r.fill(0.0);
        }
    }
    let kc8 = kc & !7;
    for half in 0..2 {
        let base = half * 8;
        let mut kk = 0;
        while kk < kc8 {
            let v: [__m256; 8] =
                std::array::from_fn(|j| _mm256_loadu_ps(rows.as_ptr().add((base + j) * KC + kk)));
            for (i, col) in transpose8(v).iter().enumerate() {
                _mm256_storeu_ps(panel.as_mut_ptr().add((kk + i) * NR + base), *col);
            }
            kk += 8;
        }
        for kk in kc8..kc {
            for j in 0..8 {
                panel[kk * NR + base + j] = rows[(base + j) * KC + kk];
            }
        }
    }
}

/// Asks for part `part` of `parts` of the packed bytes (and MXFP4 scales)
/// of weight rows `s..s+ns`, columns `k0..k0+kc`: the strip packed after
/// this one, whose short rows the hardware prefetcher does not pick up.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch_strip(
    w: &PackedMat<'_>,
    (s, ns, k0, kc): (usize, usize, usize, usize),
    (part, parts): (usize, usize),
) {
    let (q, k, scales, half) = match *w {
        PackedMat::Fp8 { q, k, .. } => (q, k, None, false),
        PackedMat::Mxfp4 { q, scales, k } => (q, k, Some(scales), true),
    };
    let bytes = |c: usize| if half { c / 2 } else { c };
    let lines = bytes(kc).div_ceil(64);
    let (a, b) = (ns * lines * part / parts, ns * lines * (part + 1) / parts);
    for l in a..b {
        let (r, c) = (l / lines, l % lines);
        let p = q.as_ptr().wrapping_add(bytes((s + r) * k + k0) + 64 * c);
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
        if let (Some(sc), 0) = (scales, c) {
            let p = sc.as_ptr().wrapping_add(((s + r) * k + k0) / MX_GROUP);
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
        }
    }
}

/// `wide`: the 12 × 32 512-bit tile over pairs of strips (the caller
/// checked AVX-512F), else the 6-row AVX2 one over single strips.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn packed(t: &QTile<'_>, wide: bool) {
    let m = t.a.len();
    let k = t.w.k();
    let mut panel = vec![0f32; PANELS_LEN];
    let mut rows = vec![0f32; pack_avx512::ROWS_LEN];
    let (mr_max, step) = if wide { (MR_WIDE, NR_WIDE) } else { (MR, NR) };
    // the AVX-512 packer where the 512-bit tile runs (the caller checked
    // AVX-512F/BW/VL/BF16 with `wide`)
    let wide_pack = wide && super::avx512::even_odd_rows_fit(&t.w);
    let groups = m.div_ceil(mr_max);
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let mut s = t.n0;
        while s < t.n1 {
            let ns = step.min(t.n1 - s);
            for (p, panel) in panel.chunks_exact_mut(KC * NR).enumerate() {
                let (sp, nsp) = (s + p * NR, ns.saturating_sub(p * NR).min(NR));
                if nsp == 0 {
                    break;
                }
                if wide_pack {
                    let even_odd = kc / 32 * 32;
                    pack_avx512::pack(nsp, kc, even_odd, &mut rows, panel, |j, out| {
                        super::avx512::decode_row_even_odd(&t.w, sp + j, k0, out);
                    });
                } else {
                    pack_strip(&t.w, sp, nsp, k0, kc, &mut rows, panel);
                }
            }
            // the next strips of this k block, or the first of the next one
            let next = if s + step < t.n1 {
                Some((s + step, step.min(t.n1 - s - step), k0, kc))
            } else if k0 + KC < k {
                Some((t.n0, step.min(t.n1 - t.n0), k0 + KC, KC.min(k - k0 - KC)))
            } else {
                None
            };
            for (gi, (mg, mr)) in row_groups(m, mr_max).enumerate() {
                if let Some(st) = next {
                    prefetch_strip(&t.w, st, (gi, groups));
                }
                let (a, c) = (&t.a[mg..mg + mr], &t.c[mg..mg + mr]);
                if wide {
                    kernel_12x32(a, k0, &panel, kc, c, s - t.n0, ns, k0 > 0);
                } else {
                    // missing rows re-read row 0; their results are not stored
                    let row = |r: usize| if r < mr { r } else { 0 };
                    let a = std::array::from_fn(|r| a[row(r)].add(k0));
                    let c = std::array::from_fn(|r| c[row(r)].add(s - t.n0));
                    kernel_6x16(a, &panel, kc, c, mr, ns, k0 > 0);
                }
            }
            s += step;
        }
        k0 += KC;
    }
}
