//! CPU GEMM over quantized expert weights, read in their packed form:
//! `C[r, n] = Σ_k A[r, k] · dequant(W)[n, k]` with f32 activations.
//!
//! - FP8 e4m3 with one f32 scale per `bn × bk` block (per-tensor, per-channel
//!   and 128×128 are all block shapes). Bytes are widened through f16
//!   (`e4m3 → f16` is a shift, exact for normals and subnormals; the missing
//!   2⁸ goes into the scale) and converted with F16C.
//! - MXFP4: 16 bytes hold a 32-element group; nibbles become `2·e2m1` int8 by
//!   a byte shuffle, then f32, and the group's partial sums take the
//!   `2^(e−128)` scale once.
//!
//! Decode steps (≤ 3 rows) fuse the decode into dot products, so every weight
//! byte is read once; larger segments decode a 16-column strip into the f32
//! panel of the dense packed kernel and reuse its 6×16 FMA tile.

use super::gemm_cpu::{has_avx2, KC, MR, NR, SKINNY_MAX_ROWS};
use crate::quant::fp8_codec::E4M3_LUT;
use crate::quant::mxfp4_codec::{e2m1_to_f32, MX_GROUP};
use std::sync::LazyLock;

/// `2^(e − 128)`: the e8m0 scale halved, because the decoder yields 2·e2m1.
static MX_HALF_SCALE: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|e| 2f32.powi(e as i32 - 128)));

/// One expert's quantized weight matrix `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub enum QMat<'a> {
    /// e4m3 bytes `[n, k]`; scales `[ceil(n/bn), ceil(k/bk)]`.
    Fp8 {
        q: &'a [u8],
        scales: &'a [f32],
        k: usize,
        bn: usize,
        bk: usize,
    },
    /// Packed e2m1 `[n, k/2]`; e8m0 scales `[n, k/32]`.
    Mxfp4 {
        q: &'a [u8],
        scales: &'a [u8],
        k: usize,
    },
}

impl QMat<'_> {
    pub fn k(&self) -> usize {
        match *self {
            Self::Fp8 { k, .. } | Self::Mxfp4 { k, .. } => k,
        }
    }

    /// Bytes of one weight row (scales excluded).
    pub fn row_bytes(&self) -> usize {
        match *self {
            Self::Fp8 { k, .. } => k,
            Self::Mxfp4 { k, .. } => k / 2,
        }
    }

    /// Portable decode of `out.len()` values of row `n` from column `k0`.
    fn decode_scalar(&self, n: usize, k0: usize, out: &mut [f32]) {
        match *self {
            Self::Fp8 {
                q,
                scales,
                k,
                bn,
                bk,
            } => {
                let kb = k.div_ceil(bk);
                for (j, o) in out.iter_mut().enumerate() {
                    let c = k0 + j;
                    *o = E4M3_LUT[q[n * k + c] as usize] * scales[(n / bn) * kb + c / bk];
                }
            }
            Self::Mxfp4 { q, scales, k } => {
                for (j, o) in out.iter_mut().enumerate() {
                    let c = k0 + j;
                    let b = q[(n * k + c) / 2];
                    let nib = if c.is_multiple_of(2) { b & 0xf } else { b >> 4 };
                    let s = MX_HALF_SCALE[scales[(n * k + c) / MX_GROUP] as usize] * 2.0;
                    *o = e2m1_to_f32(nib) * s;
                }
            }
        }
    }
}

/// Checks that `m` can run through these kernels; returns a reason if not.
pub fn check_qmat(m: &QMat<'_>, n: usize) -> Result<(), String> {
    match *m {
        QMat::Fp8 {
            q,
            scales,
            k,
            bn,
            bk,
        } => {
            if bn == 0 || bk == 0 {
                return Err("fp8 block size must be positive".into());
            }
            if bk < k && !bk.is_multiple_of(16) {
                return Err(format!(
                    "fp8 block size along K ({bk}) must be a multiple of 16 or cover K ({k})"
                ));
            }
            if q.len() < n * k || scales.len() < n.div_ceil(bn) * k.div_ceil(bk) {
                return Err("fp8 weights or scales too short".into());
            }
        }
        QMat::Mxfp4 { q, scales, k } => {
            if !k.is_multiple_of(MX_GROUP) {
                return Err(format!("mxfp4 needs K ({k}) to be a multiple of 32"));
            }
            if q.len() < n * k / 2 || scales.len() < n * k / MX_GROUP {
                return Err("mxfp4 weights or scales too short".into());
            }
        }
    }
    Ok(())
}

/// One tile: activation rows `a` (each K long) times `dequant(w)[n0..n1]ᵀ`,
/// written to `c[i] + (0..n1-n0)`.
pub struct QTile<'a> {
    pub a: &'a [*const f32],
    pub w: QMat<'a>,
    pub n0: usize,
    pub n1: usize,
    pub c: &'a [*mut f32],
}

/// Computes the tile (overwriting `c`).
///
/// # Safety
/// As [`super::gemm_cpu::gemm_tile`]; `w` must have passed [`check_qmat`]
/// for at least `n1` rows.
pub unsafe fn qgemm_tile(t: &QTile<'_>) {
    qgemm_tile_with(t, Isa::detect())
}

/// Instruction sets the kernels can use (tests run each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + BF16 for the decode kernels (AVX2 for the rest).
    Avx512Bf16,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                if !has_avx2() {
                    Isa::Portable
                } else if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bf16")
                {
                    Isa::Avx512Bf16
                } else {
                    Isa::Avx2
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Isa::Portable
        }
    }
}

/// [`qgemm_tile`] with an explicit instruction set.
///
/// # Safety
/// As [`qgemm_tile`], and the CPU must support `isa` (at most [`Isa::detect`]).
pub unsafe fn qgemm_tile_with(t: &QTile<'_>, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Bf16 if t.a.len() <= SKINNY_MAX_ROWS => return avx512::skinny(t),
        Isa::Avx2 | Isa::Avx512Bf16 => {
            if t.a.len() <= SKINNY_MAX_ROWS {
                return avx2::skinny(t);
            }
            return avx2::packed(t);
        }
        Isa::Portable => {}
    }
    portable(t)
}

unsafe fn portable(t: &QTile<'_>) {
    let k = t.w.k();
    let mut row = vec![0f32; k];
    for n in t.n0..t.n1 {
        t.w.decode_scalar(n, 0, &mut row);
        for (&a, &c) in t.a.iter().zip(t.c) {
            let a = std::slice::from_raw_parts(a, k);
            *c.add(n - t.n0) = a.iter().zip(&row).map(|(x, y)| x * y).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::gemm_cpu::avx2::{hsum, kernel_6x16, transpose8};
    use super::*;
    use std::arch::x86_64::*;

    /// The decode kernels prefetch the rows this many rows ahead, at the
    /// position they are reading: the hardware prefetcher alone leaves them
    /// waiting on loads (~2× slower). Addresses past the matrix are fine for a
    /// prefetch (never dereferenced; `wrapping_add` keeps the arithmetic defined).
    const AHEAD_ROWS: usize = 4;

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

    /// FP8: dot products of `NW` rows from `n` with `M` activation rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn fp8_block<const M: usize, const NW: usize>(
        a: &[*const f32],
        q: &[u8],
        scales: &[f32],
        k: usize,
        bn: usize,
        bk: usize,
        n: usize,
        out: &mut [[f32; NW]; M],
    ) {
        let kb = k.div_ceil(bk);
        let mut acc = [[_mm256_setzero_ps(); NW]; M];
        let mut tail = [[0f32; NW]; M];
        let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k));
        // each row's scale row, found once (no division in the K loop)
        let sp: [*const f32; NW] =
            std::array::from_fn(|j| scales.as_ptr().add(((n + j) / bn) * kb));
        let mut k0 = 0;
        let mut blk = 0;
        while k0 < k {
            let k1 = (k0 + bk).min(k);
            let s: [f32; NW] = std::array::from_fn(|j| *sp[j].add(blk));
            let mut g = [[_mm256_setzero_ps(); NW]; M];
            let mut kk = k0;
            while kk + 16 <= k1 {
                if kk % 64 == 0 {
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(
                            p.wrapping_add(kk + AHEAD_ROWS * k) as *const i8
                        );
                    }
                }
                let wv: [[__m256; 2]; NW] = std::array::from_fn(|j| fp8_dec16(wp[j].add(kk)));
                for m in 0..M {
                    let a0 = _mm256_loadu_ps(a[m].add(kk));
                    let a1 = _mm256_loadu_ps(a[m].add(kk + 8));
                    for j in 0..NW {
                        g[m][j] = _mm256_fmadd_ps(wv[j][0], a0, g[m][j]);
                        g[m][j] = _mm256_fmadd_ps(wv[j][1], a1, g[m][j]);
                    }
                }
                kk += 16;
            }
            for j in 0..NW {
                let sv = _mm256_set1_ps(s[j] * 256.0);
                for m in 0..M {
                    acc[m][j] = _mm256_fmadd_ps(g[m][j], sv, acc[m][j]);
                    let mut t = 0f32;
                    for c in kk..k1 {
                        t += *a[m].add(c) * E4M3_LUT[*wp[j].add(c) as usize];
                    }
                    tail[m][j] += t * s[j];
                }
            }
            k0 = k1;
            blk += 1;
        }
        for m in 0..M {
            for j in 0..NW {
                out[m][j] = hsum(acc[m][j]) + tail[m][j];
            }
        }
    }

    /// MXFP4: dot products of `NW` rows from `n` with `M` activation rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mx_block<const M: usize, const NW: usize>(
        a: &[*const f32],
        q: &[u8],
        scales: &[u8],
        k: usize,
        n: usize,
        out: &mut [[f32; NW]; M],
    ) {
        let half = &*MX_HALF_SCALE;
        let mut acc = [[_mm256_setzero_ps(); NW]; M];
        let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k / 2));
        let sp: [*const u8; NW] =
            std::array::from_fn(|j| scales.as_ptr().add((n + j) * k / MX_GROUP));
        for gi in 0..k / MX_GROUP {
            if gi % 4 == 0 {
                for p in wp {
                    _mm_prefetch::<_MM_HINT_T0>(
                        p.wrapping_add(gi * 16 + AHEAD_ROWS * k / 2) as *const i8
                    );
                }
            }
            let wv: [[__m256; 4]; NW] = std::array::from_fn(|j| mx_dec32(wp[j].add(gi * 16)));
            for m in 0..M {
                let ap = a[m].add(gi * MX_GROUP);
                let av: [__m256; 4] = std::array::from_fn(|u| _mm256_loadu_ps(ap.add(8 * u)));
                for j in 0..NW {
                    let g0 = _mm256_fmadd_ps(wv[j][1], av[1], _mm256_mul_ps(wv[j][0], av[0]));
                    let g1 = _mm256_fmadd_ps(wv[j][3], av[3], _mm256_mul_ps(wv[j][2], av[2]));
                    let s = _mm256_set1_ps(half[*sp[j].add(gi) as usize]);
                    acc[m][j] = _mm256_fmadd_ps(_mm256_add_ps(g0, g1), s, acc[m][j]);
                }
            }
        }
        for m in 0..M {
            for j in 0..NW {
                out[m][j] = hsum(acc[m][j]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const M: usize, const NW: usize>(
        t: &QTile<'_>,
        n: usize,
        out: &mut [[f32; NW]; M],
    ) {
        match t.w {
            QMat::Fp8 {
                q,
                scales,
                k,
                bn,
                bk,
            } => fp8_block::<M, NW>(t.a, q, scales, k, bn, bk, n, out),
            QMat::Mxfp4 { q, scales, k } => mx_block::<M, NW>(t.a, q, scales, k, n, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn skinny_m<const M: usize, const NW: usize>(t: &QTile<'_>) {
        let mut n = t.n0;
        while n + NW <= t.n1 {
            let mut out = [[0f32; NW]; M];
            block::<M, NW>(t, n, &mut out);
            for (c, o) in t.c.iter().zip(&out) {
                for (j, v) in o.iter().enumerate() {
                    *c.add(n - t.n0 + j) = *v;
                }
            }
            n += NW;
        }
        while n < t.n1 {
            let mut out = [[0f32; 1]; M];
            block::<M, 1>(t, n, &mut out);
            for (c, o) in t.c.iter().zip(&out) {
                *c.add(n - t.n0) = o[0];
            }
            n += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn skinny(t: &QTile<'_>) {
        match t.a.len() {
            0 => {}
            1 => skinny_m::<1, 4>(t),
            2 => skinny_m::<2, 2>(t),
            _ => skinny_m::<3, 2>(t),
        }
    }

    /// Decodes `out.len()` values of row `n` from column `k0` (a multiple of
    /// 32 for mxfp4, of 16 for fp8 blocks).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_row(w: &QMat<'_>, n: usize, k0: usize, out: &mut [f32]) {
        let len = out.len();
        let o = out.as_mut_ptr();
        match *w {
            QMat::Fp8 {
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
            QMat::Mxfp4 { q, scales, k } => {
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
        w: &QMat<'_>,
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
                let v: [__m256; 8] = std::array::from_fn(|j| {
                    _mm256_loadu_ps(rows.as_ptr().add((base + j) * KC + kk))
                });
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn packed(t: &QTile<'_>) {
        let m = t.a.len();
        let k = t.w.k();
        let mut panel = vec![0f32; KC * NR];
        let mut rows = vec![0f32; KC * NR];
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let mut s = t.n0;
            while s < t.n1 {
                let ns = NR.min(t.n1 - s);
                pack_strip(&t.w, s, ns, k0, kc, &mut rows, &mut panel);
                let mut mg = 0;
                while mg < m {
                    let mr = MR.min(m - mg);
                    let a: [*const f32; MR] =
                        std::array::from_fn(|r| t.a[mg + if r < mr { r } else { 0 }].add(k0));
                    let c: [*mut f32; MR] =
                        std::array::from_fn(|r| t.c[mg + if r < mr { r } else { 0 }].add(s - t.n0));
                    kernel_6x16(a, &panel, kc, c, mr, ns, k0 > 0);
                    mg += MR;
                }
                s += NR;
            }
            k0 += KC;
        }
    }
}

/// Decode kernels on AVX-512: MXFP4 nibbles become bf16 pairs with one word
/// permute and meet the activations in `vdpbf16ps` (32 products per
/// instruction; the activation is split into a bf16 high part and a bf16
/// residual, so the products keep ~16 bits of the f32 activation); FP8 bytes
/// widen through f16 32 at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    const AHEAD_ROWS: usize = 8;

    /// For every e8m0 scale, the bf16 bits of the 16 e2m1 codes times that
    /// scale (exact: a power of two), so a word permute yields scaled weights.
    #[repr(C, align(64))]
    struct ScaledLut([u16; 32]);

    static MX_BF16_LUTS: LazyLock<Vec<ScaledLut>> = LazyLock::new(|| {
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

    /// One activation row as bf16 high parts and residuals, 32 per zmm.
    struct SplitRow {
        hi: Vec<__m512bh>,
        lo: Vec<__m512bh>,
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn split_row(a: *const f32, k: usize) -> SplitRow {
        let n = k / 32;
        let (mut hi, mut lo) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for g in 0..n {
            let x0 = _mm512_loadu_ps(a.add(32 * g));
            let x1 = _mm512_loadu_ps(a.add(32 * g + 16));
            let h = _mm512_cvtne2ps_pbh(x1, x0);
            // widen the high parts back to f32 (bf16 is the top half of an f32)
            let hb = _mm512_castsi512_si256(std::mem::transmute::<__m512bh, __m512i>(h));
            let hb1 = _mm512_extracti64x4_epi64::<1>(std::mem::transmute::<__m512bh, __m512i>(h));
            let h0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hb)));
            let h1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hb1)));
            let l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0));
            hi.push(h);
            lo.push(l);
        }
        SplitRow { hi, lo }
    }

    /// MXFP4: `NW` rows from `n` against `M` split activation rows. Each
    /// group's scale is folded into the looked-up bf16 weights, so the dot
    /// products accumulate straight into (separate high / residual) sums.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn mx_block<const M: usize, const NW: usize>(
        rows: &[SplitRow],
        q: &[u8],
        scales: &[u8],
        k: usize,
        n: usize,
        out: &mut [[f32; NW]; M],
    ) {
        let luts = &*MX_BF16_LUTS;
        let mut acc_hi = [[_mm512_setzero_ps(); NW]; M];
        let mut acc_lo = [[_mm512_setzero_ps(); NW]; M];
        let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k / 2));
        let sp: [*const u8; NW] =
            std::array::from_fn(|j| scales.as_ptr().add((n + j) * k / MX_GROUP));
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
                let lut = _mm512_load_si512(luts[*sp[j].add(gi) as usize].0.as_ptr() as *const _);
                let w: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(idx, lut));
                for m in 0..M {
                    acc_hi[m][j] = _mm512_dpbf16_ps(acc_hi[m][j], w, rows[m].hi[gi]);
                    acc_lo[m][j] = _mm512_dpbf16_ps(acc_lo[m][j], w, rows[m].lo[gi]);
                }
            }
        }
        for m in 0..M {
            for j in 0..NW {
                out[m][j] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[m][j], acc_lo[m][j]));
            }
        }
    }

    /// 32 e4m3 bytes → two zmm of f32 equal to the values / 256.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn fp8_dec32(p: *const u8) -> [__m512; 2] {
        let t = _mm512_slli_epi16::<7>(_mm512_cvtepu8_epi16(_mm256_loadu_si256(
            p as *const __m256i,
        )));
        let h = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
        [
            _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
        ]
    }

    /// FP8: `NW` rows from `n` against `M` f32 activation rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn fp8_block<const M: usize, const NW: usize>(
        a: &[*const f32],
        q: &[u8],
        scales: &[f32],
        k: usize,
        bn: usize,
        bk: usize,
        n: usize,
        out: &mut [[f32; NW]; M],
    ) {
        let kb = k.div_ceil(bk);
        let mut acc = [[_mm512_setzero_ps(); NW]; M];
        let mut tail = [[0f32; NW]; M];
        let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k));
        // each row's scale row, found once (no division in the K loop)
        let sp: [*const f32; NW] =
            std::array::from_fn(|j| scales.as_ptr().add(((n + j) / bn) * kb));
        let mut k0 = 0;
        let mut blk = 0;
        while k0 < k {
            let k1 = (k0 + bk).min(k);
            let mut g = [[_mm512_setzero_ps(); NW]; M];
            let mut kk = k0;
            while kk + 32 <= k1 {
                if kk.is_multiple_of(64) {
                    for p in wp {
                        _mm_prefetch::<_MM_HINT_T0>(
                            p.wrapping_add(kk + AHEAD_ROWS * k) as *const i8
                        );
                    }
                }
                let wv: [[__m512; 2]; NW] = std::array::from_fn(|j| fp8_dec32(wp[j].add(kk)));
                for m in 0..M {
                    let a0 = _mm512_loadu_ps(a[m].add(kk));
                    let a1 = _mm512_loadu_ps(a[m].add(kk + 16));
                    for j in 0..NW {
                        g[m][j] = _mm512_fmadd_ps(wv[j][0], a0, g[m][j]);
                        g[m][j] = _mm512_fmadd_ps(wv[j][1], a1, g[m][j]);
                    }
                }
                kk += 32;
            }
            for j in 0..NW {
                let s = *sp[j].add(blk);
                let sv = _mm512_set1_ps(s * 256.0);
                for m in 0..M {
                    acc[m][j] = _mm512_fmadd_ps(g[m][j], sv, acc[m][j]);
                    let mut t = 0f32;
                    for c in kk..k1 {
                        t += *a[m].add(c) * E4M3_LUT[*wp[j].add(c) as usize];
                    }
                    tail[m][j] += t * s;
                }
            }
            k0 = k1;
            blk += 1;
        }
        for m in 0..M {
            for j in 0..NW {
                out[m][j] = _mm512_reduce_add_ps(acc[m][j]) + tail[m][j];
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn skinny_m<const M: usize, const NW: usize>(t: &QTile<'_>) {
        let split: Vec<SplitRow> = match t.w {
            QMat::Mxfp4 { k, .. } => t.a.iter().map(|&a| split_row(a, k)).collect(),
            QMat::Fp8 { .. } => vec![],
        };
        let block = |n: usize, out: &mut [[f32; NW]; M]| match t.w {
            QMat::Fp8 {
                q,
                scales,
                k,
                bn,
                bk,
            } => fp8_block::<M, NW>(t.a, q, scales, k, bn, bk, n, out),
            QMat::Mxfp4 { q, scales, k } => mx_block::<M, NW>(&split, q, scales, k, n, out),
        };
        let mut n = t.n0;
        while n + NW <= t.n1 {
            let mut out = [[0f32; NW]; M];
            block(n, &mut out);
            for (c, o) in t.c.iter().zip(&out) {
                for (j, v) in o.iter().enumerate() {
                    *c.add(n - t.n0 + j) = *v;
                }
            }
            n += NW;
        }
        // the last rows one at a time
        while n < t.n1 {
            let mut out = [[0f32; NW]; M];
            match t.w {
                QMat::Fp8 {
                    q,
                    scales,
                    k,
                    bn,
                    bk,
                } => {
                    let mut o1 = [[0f32; 1]; M];
                    fp8_block::<M, 1>(t.a, q, scales, k, bn, bk, n, &mut o1);
                    for m in 0..M {
                        out[m][0] = o1[m][0];
                    }
                }
                QMat::Mxfp4 { q, scales, k } => {
                    let mut o1 = [[0f32; 1]; M];
                    mx_block::<M, 1>(&split, q, scales, k, n, &mut o1);
                    for m in 0..M {
                        out[m][0] = o1[m][0];
                    }
                }
            }
            for (c, o) in t.c.iter().zip(&out) {
                *c.add(n - t.n0) = o[0];
            }
            n += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn skinny(t: &QTile<'_>) {
        // rows per block sized so accumulators and decoded weights stay in
        // the 32 zmm registers (FP8 keeps two sums and two decoded vectors
        // per row, MXFP4 two sums)
        let mx = matches!(t.w, QMat::Mxfp4 { .. });
        match (t.a.len(), mx) {
            (0, _) => {}
            (1, true) => skinny_m::<1, 8>(t),
            (1, false) => skinny_m::<1, 4>(t),
            (2, _) => skinny_m::<2, 4>(t),
            (_, true) => skinny_m::<3, 4>(t),
            (_, false) => skinny_m::<3, 2>(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::fp8_codec::e4m3_to_f32;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn f(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }

    /// Every kernel path (skinny 1-3 rows, packed) against a scalar dot
    /// product over the dequantized weights.
    fn isas() -> Vec<Isa> {
        let best = Isa::detect();
        let mut v = vec![Isa::Portable];
        if best != Isa::Portable {
            v.push(Isa::Avx2);
        }
        if best == Isa::Avx512Bf16 {
            v.push(Isa::Avx512Bf16);
        }
        v
    }

    fn check(w: QMat<'_>, n: usize, deq: &dyn Fn(usize, usize) -> f32) {
        for isa in isas() {
            check_isa(w, n, deq, isa);
        }
    }

    fn check_isa(w: QMat<'_>, n: usize, deq: &dyn Fn(usize, usize) -> f32, isa: Isa) {
        let k = w.k();
        let mut rng = Lcg(7);
        for m in [1usize, 2, 3, 5, 13] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
            let mut c = vec![0f32; m * n];
            let ap: Vec<*const f32> = (0..m).map(|r| unsafe { a.as_ptr().add(r * k) }).collect();
            let cp: Vec<*mut f32> = (0..m)
                .map(|r| unsafe { c.as_mut_ptr().add(r * n) })
                .collect();
            unsafe {
                qgemm_tile_with(
                    &QTile {
                        a: &ap,
                        w,
                        n0: 0,
                        n1: n,
                        c: &cp,
                    },
                    isa,
                )
            };
            for r in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|x| a[r * k + x] * deq(j, x)).sum();
                    let terms: f32 = (0..k).map(|x| (a[r * k + x] * deq(j, x)).abs()).sum();
                    let got = c[r * n + j];
                    // f32 paths: rounding of the sum; the bf16 dot product
                    // keeps ~16 bits of each activation (high part + residual)
                    let rel = if isa == Isa::Avx512Bf16 && matches!(w, QMat::Mxfp4 { .. }) {
                        3e-5
                    } else {
                        1e-6
                    };
                    assert!(
                        (got - want).abs() <= rel * terms + 1e-6,
                        "{isa:?} m={m} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn fp8_paths_match_dequantized_reference() {
        // odd sizes: partial blocks in N and K, a K tail that is not a multiple of 16
        for (n, k, bn, bk) in [
            (37usize, 300usize, 128usize, 128usize),
            (21, 77, 1, 77),
            (9, 48, 9, 48),
            (20, 64, 16, 32),
        ] {
            let mut rng = Lcg(n as u64);
            let q: Vec<u8> = (0..n * k)
                .map(|_| {
                    let b = (rng.next() % 256) as u8;
                    if b & 0x7f == 0x7f {
                        0
                    } else {
                        b
                    }
                })
                .collect();
            let kb = k.div_ceil(bk);
            let scales: Vec<f32> = (0..n.div_ceil(bn) * kb)
                .map(|_| 0.001 + rng.f().abs() * 0.01)
                .collect();
            let w = QMat::Fp8 {
                q: &q,
                scales: &scales,
                k,
                bn,
                bk,
            };
            check_qmat(&w, n).unwrap();
            check(w, n, &|r, c| {
                e4m3_to_f32(q[r * k + c]) * scales[(r / bn) * kb + c / bk]
            });
        }
    }

    #[test]
    fn mxfp4_paths_match_dequantized_reference() {
        for (n, k) in [(19usize, 96usize), (33, 288)] {
            let mut rng = Lcg(k as u64);
            let q: Vec<u8> = (0..n * k / 2).map(|_| (rng.next() % 256) as u8).collect();
            let scales: Vec<u8> = (0..n * k / 32)
                .map(|_| 120 + (rng.next() % 10) as u8)
                .collect();
            let w = QMat::Mxfp4 {
                q: &q,
                scales: &scales,
                k,
            };
            check_qmat(&w, n).unwrap();
            check(w, n, &|r, c| {
                let b = q[(r * k + c) / 2];
                let nib = if c % 2 == 0 { b & 0xf } else { b >> 4 };
                e2m1_to_f32(nib) * crate::quant::mxfp4_codec::e8m0_to_f32(scales[(r * k + c) / 32])
            });
        }
    }
}
