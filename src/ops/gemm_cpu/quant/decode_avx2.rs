//! AVX2 decode kernels (1–4 activation rows): FP8 and MXFP4 weights widen
//! to f32 by integer shifts and masks alone — no F16C conversion, no byte
//! shuffle table. In L1 a core decodes ~1.6× the weights per second the
//! F16C / int8-table decoders did (those were bound on the shuffle ports).
//!
//! The shifts leave the weights in a fixed order within each chunk (32 FP8
//! bytes, 64 MXFP4 nibbles) and with an exponent bias short by a power of
//! two (FP8: values · 2⁻¹²⁰, MXFP4: · 2⁻¹²⁶), so each tile first copies its
//! activation rows into that order, scaled by `2^P` (as large as keeps them
//! finite); the sums take `2^(bias − P)` back at the end. Every step is a
//! power of two, so each product rounds as the dequantized reference's
//! does. Small weights come out as f32 subnormals, which FMA takes at
//! full speed on Zen 3 (a plain multiply does not, so none is used on them).

use super::super::avx2::{hsum, transpose8};
use super::{QTile, MX_GROUP, MX_HALF_SCALE};
use crate::format::fp8::E4M3_LUT;
use crate::format::PackedMat;
use crate::ops::prefetch;
use std::arch::x86_64::*;

/// The kernels read one weight row after another (one stream per thread:
/// 16–19 GB/s on two threads against 10–15 for four rows side by side) and
/// prefetch this far ahead; the hardware prefetcher alone leaves them
/// waiting on loads. Addresses past the matrix are fine (a prefetch never
/// faults; `wrapping_add` keeps it defined).
const AHEAD_BYTES: usize = 4096;

/// Activation rows one pass takes at most: each decoded chunk meets up to
/// this many rows before the next is decoded. Five or six rows spill the
/// registers and their prepared rows (48 KiB at 2048 columns) overflow
/// Zen 3's 32 KiB L1: six rows as 3 + 3 run 1.37× faster than as one pass.
pub(super) const MAX_ROWS: usize = 4;

/// FP8 chunk: 32 bytes → 4 vectors; vector `r` lane `i` is byte
/// `4i + [0, 2, 1, 3][r]` (even bytes move up 8 bits, odd ones stay; words
/// then split into dwords the same way).
const FP8_CHUNK: usize = 32;
/// e4m3 `s eeee mmm` in a word's high byte, shifted right 4 (arithmetic),
/// is bf16 `s eeee mmm` with a 4-bit exponent field: the value · 2⁻¹²⁰.
const FP8_BIAS: i32 = 120;

/// MXFP4 chunk: two 32-element groups (one per 128-bit lane), 64 nibbles;
/// vector `r` lane `l` is element `8l + [0, 4, 1, 5, 2, 6, 3, 7][r]`
/// (nibble `r / 2` of each word moved up, words split into dwords).
const MX_CHUNK: usize = 2 * MX_GROUP;
/// e2m1 `s ee m` at a word's bits 15..12, shifted right 6 (arithmetic), is
/// bf16 `s ee m` with a 2-bit exponent field: the value · 2⁻¹²⁶; the
/// group scales come from the shared halved table ([`MX_HALF_SCALE`]), one
/// more factor 2 short.
const MX_BIAS: i32 = 127;

/// 32 activations into FP8 chunk order, times `scale`: a 4×4 transpose per
/// 128-bit lane yields columns in lane order (0, 2, 4, 6 | 1, 3, 5, 7).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_permute(s: *const f32, d: *mut f32, scale: __m256) {
    let x: [__m256; 4] = std::array::from_fn(|u| _mm256_loadu_ps(s.add(8 * u)));
    let t0 = _mm256_unpacklo_ps(x[0], x[1]);
    let t1 = _mm256_unpackhi_ps(x[0], x[1]);
    let t2 = _mm256_unpacklo_ps(x[2], x[3]);
    let t3 = _mm256_unpackhi_ps(x[2], x[3]);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let cols = [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ];
    for (u, c) in cols.into_iter().enumerate() {
        let v = _mm256_permutevar8x32_ps(c, order);
        _mm256_storeu_ps(d.add(8 * u), _mm256_mul_ps(v, scale));
    }
}

/// 64 activations into MXFP4 chunk order, times `scale`: an 8×8 transpose.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mx_permute(s: *const f32, d: *mut f32, scale: __m256) {
    let x: [__m256; 8] = std::array::from_fn(|u| _mm256_loadu_ps(s.add(8 * u)));
    let cols = transpose8(x);
    for (u, c) in [0, 4, 1, 5, 2, 6, 3, 7].into_iter().enumerate() {
        _mm256_storeu_ps(d.add(8 * u), _mm256_mul_ps(cols[c], scale));
    }
}

/// max |x| over the row (NaN-blind, as the scale only needs the finite ones).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn abs_max(row: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr())));
    }
    let mut v = [0f32; 8];
    _mm256_storeu_ps(v.as_mut_ptr(), m);
    v.iter()
        .chain(chunks.remainder())
        .fold(0f32, |m, x| m.max(x.abs()))
}

/// A tile's activation rows in decode order, each scaled by `2^P` (and,
/// for FP8 blocks folded in, by the column block's weight scale).
struct Prepared {
    rows: Vec<f32>,
    k: usize,
    /// Per row: `2^(bias − P)`, what the chunk sums are multiplied by.
    undo: [f32; MAX_ROWS],
    /// Per row: `2^−P`, which takes the tail columns back to `a · s` (they
    /// meet the true weight values).
    tail_undo: [f32; MAX_ROWS],
}

/// How a tile's rows are laid out: every `seg`-wide segment of the row is
/// cut into chunks from its start, the columns left over at its end stay in
/// place; `col_scale`, if any, is a weight scale per `bk` columns that the
/// activations take on (`bk` a multiple of the chunk).
struct Layout<'a> {
    chunk: usize,
    permute: unsafe fn(*const f32, *mut f32, __m256),
    bias: i32,
    seg: usize,
    col_scale: Option<(&'a [f32], usize)>,
}

impl Prepared {
    /// Copies `a` (≤ [`MAX_ROWS`] rows of `k`) as `l` lays it out.
    #[inline(always)]
    unsafe fn new(a: &[*const f32], k: usize, l: &Layout<'_>) -> Self {
        let mut rows = vec![0f32; a.len() * k];
        let mut undo = [1f32; MAX_ROWS];
        let mut tail_undo = [1f32; MAX_ROWS];
        let smax = l
            .col_scale
            .map_or(1.0, |(s, _)| s.iter().fold(0f32, |m, x| m.max(x.abs())));
        let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
        for (r, (&ap, dst)) in a.iter().zip(rows.chunks_mut(k.max(1))).enumerate() {
            let row = std::slice::from_raw_parts(ap, k);
            // |a · s| < 2^(e+1) (within rounding): 2^P keeps it under 2^125
            let e = (((abs_max(row) * smax).to_bits() >> 23) & 0xff) as i32 - 127;
            let p = l.bias.min(123 - e).max(0);
            undo[r] = pow2(l.bias - p);
            tail_undo[r] = pow2(-p);
            let scale = |c: usize| pow2(p) * l.col_scale.map_or(1.0, |(s, bk)| s[c / bk]);
            for k0 in (0..k).step_by(l.seg.max(1)) {
                let k1 = (k0 + l.seg).min(k);
                let mut c = k0;
                while c + l.chunk <= k1 {
                    (l.permute)(ap.add(c), dst.as_mut_ptr().add(c), _mm256_set1_ps(scale(c)));
                    c += l.chunk;
                }
                for c in c..k1 {
                    dst[c] = row[c] * scale(c);
                }
            }
        }
        Prepared {
            rows,
            k,
            undo,
            tail_undo,
        }
    }

    #[inline(always)]
    fn row(&self, m: usize) -> *const f32 {
        self.rows[m * self.k..].as_ptr()
    }
}

/// 32 e4m3 bytes → 4 vectors of f32 (order of [`FP8_CHUNK`], values · 2⁻¹²⁰).
#[inline(always)]
unsafe fn fp8_dec32(p: *const u8) -> [__m256; 4] {
    let b = _mm256_loadu_si256(p as *const __m256i);
    // keep sign, the 4 exponent and 3 mantissa bits of each dword's high word
    let m = _mm256_set1_epi32(0x87f0_0000u32 as i32);
    let even = _mm256_srai_epi16::<4>(_mm256_slli_epi16::<8>(b));
    let odd = _mm256_srai_epi16::<4>(b);
    [
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<16>(even), m)),
        _mm256_castsi256_ps(_mm256_and_si256(even, m)),
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<16>(odd), m)),
        _mm256_castsi256_ps(_mm256_and_si256(odd, m)),
    ]
}

/// 32 MXFP4 bytes (two groups) → 8 vectors of f32 (order of [`MX_CHUNK`],
/// values · 2⁻¹²⁶).
#[inline(always)]
unsafe fn mx_dec64(p: *const u8) -> [__m256; 8] {
    let b = _mm256_loadu_si256(p as *const __m256i);
    let m = _mm256_set1_epi32(0x81c0_0000u32 as i32);
    // each word with the wanted nibble moved to bits 15..12
    let w = [
        _mm256_srai_epi16::<6>(_mm256_slli_epi16::<12>(b)),
        _mm256_srai_epi16::<6>(_mm256_slli_epi16::<8>(b)),
        _mm256_srai_epi16::<6>(_mm256_slli_epi16::<4>(b)),
        _mm256_srai_epi16::<6>(b),
    ];
    let lo = |x: __m256i| _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<16>(x), m));
    let hi = |x: __m256i| _mm256_castsi256_ps(_mm256_and_si256(x, m));
    [
        lo(w[0]),
        hi(w[0]),
        lo(w[1]),
        hi(w[1]),
        lo(w[2]),
        hi(w[2]),
        lo(w[3]),
        hi(w[3]),
    ]
}

/// Independent sums per activation row: four FMAs into one sum per 32
/// weights would wait on its latency (16 cycles against 8 of throughput
/// for four rows); two chains per row make 3–4 rows 1.3–1.6× faster.
const fn sums(m: usize) -> usize {
    match m {
        1 => 4,
        _ => 2,
    }
}

/// One FP8 chunk at column `kk` into the sums `g`.
#[inline(always)]
unsafe fn fp8_chunk<const M: usize>(
    wp: *const u8,
    ap: &[*const f32; M],
    kk: usize,
    g: &mut [[__m256; 4]; M],
) {
    let v = fp8_dec32(wp.add(kk));
    for m in 0..M {
        for (u, v) in v.iter().enumerate() {
            let s = u % sums(M);
            let a = _mm256_loadu_ps(ap[m].add(kk + 8 * u));
            g[m][s] = _mm256_fmadd_ps(*v, a, g[m][s]);
        }
    }
}

/// One MXFP4 chunk at column `kk`: its two group sums take their scales in
/// one multiply-add into `acc`.
#[inline(always)]
unsafe fn mx_chunk<const M: usize>(
    wp: *const u8,
    sp: *const u8,
    ap: &[*const f32; M],
    kk: usize,
    st: &[f32; 256],
    acc: &mut [__m256; M],
) {
    let v = mx_dec64(wp.add(kk / 2));
    let g = kk / MX_GROUP;
    // group g's scale in the low lane, g + 1's in the high one
    let sv = _mm256_blend_ps::<0xf0>(
        _mm256_broadcast_ss(&st[*sp.add(g) as usize]),
        _mm256_broadcast_ss(&st[*sp.add(g + 1) as usize]),
    );
    for m in 0..M {
        // the first products start from zero with an FMA: a plain
        // multiply of a subnormal weight is slow. Two chains of four: the
        // sums start afresh each chunk, so only `acc` carries from one
        // chunk to the next and chunks overlap; one add joins them.
        let mut s = [_mm256_setzero_ps(); 2];
        for (u, v) in v.iter().enumerate() {
            let a = _mm256_loadu_ps(ap[m].add(kk + 8 * u));
            s[u % 2] = _mm256_fmadd_ps(*v, a, s[u % 2]);
        }
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(s[0], s[1]), sv, acc[m]);
    }
}

/// FP8: weight row `wp` (`k` bytes) against `M` prepared rows, in
/// segments of `seg` columns whose sums take the scales `sp[i]` (a single
/// segment of scale 1 when the scales are folded into the activations).
#[inline(always)]
unsafe fn fp8_row<const M: usize>(
    p: &Prepared,
    wp: *const u8,
    k: usize,
    (seg, sp): (usize, *const f32),
) -> [f32; M] {
    let mut acc = [_mm256_setzero_ps(); M];
    let mut tail = [0f32; M];
    let ap: [*const f32; M] = std::array::from_fn(|m| p.row(m));
    for (i, k0) in (0..k).step_by(seg).enumerate() {
        let k1 = (k0 + seg).min(k);
        let mut g = [[_mm256_setzero_ps(); 4]; M];
        let mut kk = k0;
        while kk + 2 * FP8_CHUNK <= k1 {
            prefetch(wp.wrapping_add(kk + AHEAD_BYTES));
            fp8_chunk(wp, &ap, kk, &mut g);
            fp8_chunk(wp, &ap, kk + FP8_CHUNK, &mut g);
            kk += 2 * FP8_CHUNK;
        }
        if kk + FP8_CHUNK <= k1 {
            fp8_chunk(wp, &ap, kk, &mut g);
            kk += FP8_CHUNK;
        }
        let s = *sp.add(i);
        let sv = _mm256_set1_ps(s);
        for m in 0..M {
            let gs = g[m][..sums(M)]
                .iter()
                .fold(_mm256_setzero_ps(), |x, y| _mm256_add_ps(x, *y));
            acc[m] = _mm256_fmadd_ps(gs, sv, acc[m]);
            if kk < k1 {
                let (lut, tu) = (&*E4M3_LUT, p.tail_undo[m]);
                let r: f32 = (kk..k1)
                    .map(|c| *ap[m].add(c) * tu * lut[*wp.add(c) as usize])
                    .sum();
                tail[m] += r * s;
            }
        }
    }
    std::array::from_fn(|m| hsum(acc[m]) * p.undo[m] + tail[m])
}

/// MXFP4: weight row `n` against `M` prepared rows. With `k` an odd number
/// of groups the last one goes through the table.
#[inline(always)]
unsafe fn mx_row<const M: usize>(
    p: &Prepared,
    (q, scales, k): (&[u8], &[u8], usize),
    n: usize,
) -> [f32; M] {
    let st = &*MX_HALF_SCALE;
    let mut acc = [_mm256_setzero_ps(); M];
    let wp = q.as_ptr().add(n * k / 2);
    let sp = scales.as_ptr().add(n * k / MX_GROUP);
    let ap: [*const f32; M] = std::array::from_fn(|m| p.row(m));
    let full = k / MX_CHUNK * MX_CHUNK;
    let mut kk = 0;
    while kk < full {
        // 64 bytes of weights per prefetch: two chunks, or the last one
        prefetch(wp.wrapping_add(kk / 2 + AHEAD_BYTES));
        mx_chunk(wp, sp, &ap, kk, st, &mut acc);
        if kk + MX_CHUNK < full {
            mx_chunk(wp, sp, &ap, kk + MX_CHUNK, st, &mut acc);
        }
        kk += 2 * MX_CHUNK;
    }
    let mut tail = [0f32; M];
    if full < k {
        let mut row = [0f32; MX_GROUP];
        PackedMat::Mxfp4 { q, scales, k }.decode_scalar(n, full, &mut row);
        for (m, tl) in tail.iter_mut().enumerate() {
            let a = std::slice::from_raw_parts(ap[m].add(full), MX_GROUP);
            let tu = p.tail_undo[m];
            *tl = a.iter().zip(&row).map(|(x, y)| x * tu * y).sum();
        }
    }
    std::array::from_fn(|m| hsum(acc[m]) * p.undo[m] + tail[m])
}

/// FP8 weight scales are folded into the activations when a row block
/// spans at least this many rows (one preparation each): one sum per row
/// instead of one per 128 columns, and each product rounds once after the
/// scale, as the dequantized reference's `a · (q · s)` does (W8A8 models
/// are discontinuous in their activations: with the scale after the sum,
/// one activation's FP8 rounding flips in tests/quant_parity.rs's on-load
/// FP8 model and its logits miss llm-compressor's by 1.1e-2, not 2e-6).
const FOLD_MIN_ROWS: usize = 16;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn skinny_m<const M: usize>(t: &QTile<'_>) {
    let store = |n: usize, r: [f32; M]| {
        for (c, r) in t.c.iter().zip(r) {
            *c.add(n - t.n0) = r;
        }
    };
    match t.w {
        PackedMat::Fp8 {
            q,
            scales,
            k,
            bn,
            bk,
        } => {
            let kb = k.div_ceil(bk);
            let mut l = Layout {
                chunk: FP8_CHUNK,
                permute: fp8_permute,
                bias: FP8_BIAS,
                seg: bk,
                col_scale: None,
            };
            if bn >= FOLD_MIN_ROWS && bk.is_multiple_of(FP8_CHUNK) {
                l.seg = k;
                let one = 1f32;
                let mut n = t.n0;
                while n < t.n1 {
                    let (rb, end) = (n / bn, ((n / bn + 1) * bn).min(t.n1));
                    l.col_scale = Some((&scales[rb * kb..(rb + 1) * kb], bk));
                    let p = Prepared::new(t.a, k, &l);
                    for n in n..end {
                        store(n, fp8_row::<M>(&p, q[n * k..].as_ptr(), k, (k, &one)));
                    }
                    n = end;
                }
            } else {
                let p = Prepared::new(t.a, k, &l);
                for n in t.n0..t.n1 {
                    let sp = scales[(n / bn) * kb..].as_ptr();
                    store(n, fp8_row::<M>(&p, q[n * k..].as_ptr(), k, (bk, sp)));
                }
            }
        }
        PackedMat::Mxfp4 { q, scales, k } => {
            let l = Layout {
                chunk: MX_CHUNK,
                permute: mx_permute,
                bias: MX_BIAS,
                seg: k,
                col_scale: None,
            };
            let p = Prepared::new(t.a, k, &l);
            for n in t.n0..t.n1 {
                store(n, mx_row::<M>(&p, (q, scales, k), n));
            }
        }
    }
}

/// The decode kernel over ≤ [`MAX_ROWS`] activation rows.
///
/// # Safety
/// As [`super::qgemm_tile`]; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn skinny(t: &QTile<'_>) {
    match t.a.len() {
        0 => {}
        1 => skinny_m::<1>(t),
        2 => skinny_m::<2>(t),
        3 => skinny_m::<3>(t),
        _ => skinny_m::<4>(t),
    }
}
