//! CPU GEMM engine behind the grouped expert GEMM: `C[r, n] = Σ_k A[r, k] · W[n, k]`
//! for a gathered set of f32 activation rows and one expert's weight matrix
//! stored row-major `[N, K]` in f32, bf16 or f16.
//!
//! Two kernels, both reading the weights in their stored form:
//! - *dot products* (fewer than [`PACKED_MIN_ROWS`] rows: decode and small
//!   expert segments, `gemv_avx2`): weight rows one after another, widened
//!   in registers, against chunks of ≤ 3 activation rows; every weight byte
//!   comes from memory once, which is what a memory-bound step needs. bf16
//!   weights have their own: `bf16_avx512` (`vdpbf16ps`, ≤ 3 rows) and, where
//!   512-bit FMAs out-run it, `bf16_fma` (sweeps of ≤ 11 rows, up to 23).
//! - *packed* (more rows): a 16-column strip of W is widened and transposed
//!   into a 16 KiB panel, then a 6×16 register-blocked FMA kernel runs over
//!   groups of 6 rows (the classic BLIS shape), or on AVX-512 CPUs that
//!   issue two 512-bit FMAs per cycle a tile of up to 12 rows × 32 over
//!   two strips' panels (`kernel_avx512`).
//!
//! AVX2+FMA+F16C is detected at run time; other CPUs use portable loops.

#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_fma;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_packed;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemv_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod kernel_avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod pack_avx512;
pub(crate) mod quant;
#[cfg(target_arch = "x86_64")]
pub(crate) mod sweep;

use half::{bf16, f16};

/// A weight element the kernels can widen to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Eight consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must point to 8 readable elements and the CPU must have AVX2+FMA+F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive elements widened to f32, possibly in the lane
    /// order of [`permute16`] (cheaper for bf16: two unpacks, no shifts).
    ///
    /// # Safety
    /// As [`WeightElem::load8`], for 16 elements.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        [Self::load8(p), Self::load8(p.add(8))]
    }
    /// Whether `load16` returns the permuted order.
    const PERMUTED16: bool = false;
    /// Runs the tile on a kernel specific to this element type, CPU and
    /// row count; false if there is none.
    ///
    /// # Safety
    /// As [`gemm_tile`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn special(_t: &Tile<'_, Self>) -> bool
    where
        Self: Sized,
    {
        false
    }
}

/// The element order `load16` uses for bf16: `[0..4, 8..12]`, `[4..8, 12..16]`.
///
/// # Safety
/// `a` must point to 16 readable f32 and the CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn permute16(a: *const f32, permuted: bool) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    let (x, y) = (_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8)));
    if permuted {
        [
            _mm256_permute2f128_ps::<0x20>(x, y),
            _mm256_permute2f128_ps::<0x31>(x, y),
        ]
    } else {
        [x, y]
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // bf16 is the high half of an f32: interleave with zeros
        let w = _mm256_loadu_si256(p as *const __m256i);
        let z = _mm256_setzero_si256();
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w)),
        ]
    }
    const PERMUTED16: bool = true;
    #[cfg(target_arch = "x86_64")]
    unsafe fn special(t: &Tile<'_, Self>) -> bool {
        if bf16_fma::takes(t.a.len()) {
            bf16_fma::gemm(t);
            return true;
        }
        if t.a.len() <= SKINNY_MAX_ROWS && bf16_avx512::available() {
            bf16_avx512::skinny(t);
            return true;
        }
        false
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Deterministic values in [-0.5, 0.5) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Rows from which bf16 × bf16 tiles take the packed AVX-512 BF16 kernel
/// ([`bf16_packed`]): past the skinny kernel's rows (it costs about the
/// same for 4 to 8 rows as for 3, bench_linear 1408×2048). Never where
/// 512-bit FMAs out-run `vdpbf16ps`: there the FMA decode sweeps take up to
/// 23 rows and the f32 FMA tile the rest, with the activations widened
/// to f32 (bench_linear bf16 × bf16, 24–128 rows: 0.77–0.97× the time of
/// the `vdpbf16ps` kernel).
#[cfg(target_arch = "x86_64")]
pub(crate) fn bf16_packed_min_rows() -> usize {
    if bf16_fma::available() {
        usize::MAX
    } else {
        SKINNY_MAX_ROWS + 1
    }
}

/// Rows handled by the skinny kernel at most.
pub const SKINNY_MAX_ROWS: usize = 3;
/// Rows from which the AVX2 packed kernel over float weights beats the
/// dot-product kernel run over chunks of 3 rows (bench_linear, 1408×2048 and
/// 2048×2048 bf16: 4 rows 0.41–0.46 ms against 0.73–0.88 packed; 12 rows
/// about even).
pub(crate) const PACKED_MIN_ROWS: usize = 12;
pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;
/// K block of the packed kernel: a 16 × 256 f32 panel is 16 KiB; the
/// 512-bit tile reads two (32 KiB, within this machine's 48 KiB L1d; not
/// measured on 32 KiB ones).
pub(crate) const KC: usize = 256;

/// Row groups `(start, len)` of at most `mr` rows each, as even as the
/// count allows (64 rows in tiles of 12: 11, 11, 11, 11, 10, 10; padding
/// them to 72 rows would cost 12 % more FMAs).
pub(crate) fn row_groups(m: usize, mr: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = m.div_ceil(mr.max(1));
    (0..groups).map(move |g| {
        let (s, e) = (g * m / groups, (g + 1) * m / groups);
        (s, e - s)
    })
}

/// One tile of work: rows `a` (each K long) times `w[n0..n1]ᵀ`, written to
/// `c[i] + (0..n1-n0)`. `c` rows must be distinct and not alias `a` or `w`.
pub struct Tile<'a, W> {
    pub a: &'a [*const f32],
    pub w: &'a [W],
    pub k: usize,
    pub n0: usize,
    pub n1: usize,
    pub c: &'a [*mut f32],
}

/// Computes the tile (overwriting `c`).
///
/// # Safety
/// Every `a` pointer addresses `k` readable f32, every `c` pointer `n1 - n0`
/// writable f32 that no other thread touches, and `w` holds rows `n0..n1`.
pub unsafe fn gemm_tile<W: WeightElem>(t: &Tile<'_, W>) {
    debug_assert!(t.w.len() >= t.n1 * t.k);
    #[cfg(target_arch = "x86_64")]
    if W::special(t) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_features().avx2
        && t.a.len() >= PACKED_MIN_ROWS
        && kernel_avx512::fma_beats_dpbf16()
    {
        return avx2::packed(t, true);
    }
    gemm_tile_avx2(t)
}

/// [`gemm_tile`] without the element-specific decode kernels (AVX2 or
/// portable), for tests that compare the two.
///
/// # Safety
/// As [`gemm_tile`].
pub(crate) unsafe fn gemm_tile_avx2<W: WeightElem>(t: &Tile<'_, W>) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_features().avx2 {
        if t.a.len() < PACKED_MIN_ROWS {
            return gemv_avx2::gemm(t);
        }
        return avx2::packed(t, false);
    }
    portable(t)
}

unsafe fn portable<W: WeightElem>(t: &Tile<'_, W>) {
    for n in t.n0..t.n1 {
        let wr = &t.w[n * t.k..(n + 1) * t.k];
        for (&a, &c) in t.a.iter().zip(t.c) {
            let a = std::slice::from_raw_parts(a, t.k);
            let mut acc = 0f32;
            for (x, y) in a.iter().zip(wr) {
                acc += x * y.to_f32();
            }
            *c.add(n - t.n0) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// Packs `W[s..s+ns, k0..k0+kc]` transposed into `buf[kk*16 + j]` (f32),
    /// zero-filling columns `ns..16`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack_strip<W: WeightElem>(
        w: &[W],
        k: usize,
        s: usize,
        ns: usize,
        k0: usize,
        kc: usize,
        buf: &mut [f32],
    ) {
        let kc8 = kc & !7;
        for half in 0..2 {
            let base = half * 8;
            let valid = ns.saturating_sub(base).min(8);
            if valid == 8 {
                // the common case: eight real rows, no per-row checks in the loop
                let rows: [*const W; 8] =
                    std::array::from_fn(|j| w.as_ptr().add((s + base + j) * k + k0));
                let mut kk = 0;
                while kk < kc8 {
                    let v: [__m256; 8] = std::array::from_fn(|j| W::load8(rows[j].add(kk)));
                    let tv = transpose8(v);
                    for (i, col) in tv.iter().enumerate() {
                        _mm256_storeu_ps(buf.as_mut_ptr().add((kk + i) * NR + base), *col);
                    }
                    kk += 8;
                }
                for kk in kc8..kc {
                    for (j, r) in rows.iter().enumerate() {
                        buf[kk * NR + base + j] = (*r.add(kk)).to_f32();
                    }
                }
            } else {
                for kk in 0..kc {
                    for j in 0..8 {
                        buf[kk * NR + base + j] = if j < valid {
                            (*w.as_ptr().add((s + base + j) * k + k0 + kk)).to_f32()
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }

    /// Columns `s..s+ns` over `k0..k0+kc` of one weight matrix.
    #[derive(Clone, Copy)]
    struct Strip {
        s: usize,
        ns: usize,
        k0: usize,
        kc: usize,
    }

    /// Asks for part `part` of `parts` of strip `st` of `w` to be brought into
    /// cache, so the next pack overlaps this one's FMAs.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prefetch_strip<W: WeightElem>(
        w: &[W],
        k: usize,
        st: Strip,
        part: usize,
        parts: usize,
    ) {
        let per_line = 64 / std::mem::size_of::<W>();
        let lines_per_row = st.kc.div_ceil(per_line);
        let total = st.ns * lines_per_row;
        let (a, b) = (total * part / parts, total * (part + 1) / parts);
        for l in a..b {
            let (r, c) = (l / lines_per_row, l % lines_per_row);
            _mm_prefetch::<_MM_HINT_T0>(
                w.as_ptr().add((st.s + r) * k + st.k0 + c * per_line) as *const i8
            );
        }
    }

    /// `C[0..6, 0..16] (+)= A[0..6, k0..k0+kc] · panel`; only `mr` rows and
    /// `ns` columns are stored.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn kernel_6x16(
        a: [*const f32; MR],
        panel: &[f32],
        kc: usize,
        c: [*mut f32; MR],
        mr: usize,
        ns: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut tmp = [0f32; NR];
        if accumulate {
            for r in 0..mr {
                if ns == NR {
                    acc[r][0] = _mm256_loadu_ps(c[r]);
                    acc[r][1] = _mm256_loadu_ps(c[r].add(8));
                } else {
                    std::ptr::copy_nonoverlapping(c[r], tmp.as_mut_ptr(), ns);
                    acc[r][0] = _mm256_loadu_ps(tmp.as_ptr());
                    acc[r][1] = _mm256_loadu_ps(tmp.as_ptr().add(8));
                }
            }
        }
        let mut b = panel.as_ptr();
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for r in 0..MR {
                let av = _mm256_broadcast_ss(&*a[r].add(kk));
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
            b = b.add(NR);
        }
        for r in 0..mr {
            if ns == NR {
                _mm256_storeu_ps(c[r], acc[r][0]);
                _mm256_storeu_ps(c[r].add(8), acc[r][1]);
            } else {
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r][0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[r][1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), c[r], ns);
            }
        }
    }

    /// `wide`: the 12 × 32 512-bit tile ([`super::kernel_avx512`]; the
    /// caller checked AVX-512F) over pairs of strips, else the 6-row AVX2
    /// one over single strips.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn packed<W: WeightElem>(t: &Tile<'_, W>, wide: bool) {
        let m = t.a.len();
        let (mr_max, step) = if wide {
            (kernel_avx512::MR_WIDE, kernel_avx512::NR_WIDE)
        } else {
            (MR, NR)
        };
        let mut panel = vec![0f32; kernel_avx512::PANELS_LEN];
        let mut k0 = 0;
        while k0 < t.k {
            let kc = KC.min(t.k - k0);
            let mut s = t.n0;
            while s < t.n1 {
                let ns = step.min(t.n1 - s);
                let (first, second) = panel.split_at_mut(KC * NR);
                pack_strip(t.w, t.k, s, ns.min(NR), k0, kc, first);
                if ns > NR {
                    pack_strip(t.w, t.k, s + NR, ns - NR, k0, kc, second);
                }
                // the next strips of this k block, or the first of the next one
                let next = if s + step < t.n1 {
                    Some(Strip {
                        s: s + step,
                        ns: step.min(t.n1 - s - step),
                        k0,
                        kc,
                    })
                } else if k0 + KC < t.k {
                    Some(Strip {
                        s: t.n0,
                        ns: step.min(t.n1 - t.n0),
                        k0: k0 + KC,
                        kc: KC.min(t.k - k0 - KC),
                    })
                } else {
                    None
                };
                let groups = m.div_ceil(mr_max);
                for (gi, (mg, mr)) in row_groups(m, mr_max).enumerate() {
                    if let Some(st) = next {
                        prefetch_strip(t.w, t.k, st, gi, groups);
                    }
                    let (a, c) = (&t.a[mg..mg + mr], &t.c[mg..mg + mr]);
                    if wide {
                        kernel_avx512::kernel_12x32(a, k0, &panel, kc, c, s - t.n0, ns, k0 > 0);
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
}
