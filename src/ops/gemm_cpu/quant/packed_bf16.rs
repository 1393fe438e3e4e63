//! Prefill (more than the skinny kernel's rows) over FP8 / MXFP4 weights on
//! AVX-512 BF16, through `vdpbf16ps` as the bf16 prefill does: a 32-column
//! strip of the weights is decoded once per call into bf16 k-pairs —
//! MXFP4 with each group's e8m0 scale folded in (e2m1 · 2^e is exact in
//! bf16), FP8 as its e4m3 codes / 256 (exact) with the block scales applied
//! per k-block to the partial sums — then groups of rows run a 6 × 32
//! register tile. Activations are split into a bf16 high part and a bf16
//! residual (~16 bits of each f32, as the decode kernels keep); rows that
//! are bf16 already (bf16 compute) have no residual and take one
//! instruction per pair.

use super::super::bf16_avx512::{mask16, split_row, SplitRow};
use super::super::bf16_packed::transpose16;
use super::avx512::{fp8_dec32, MX_BF16_LUTS};
use super::QTile;
use crate::format::fp8::E4M3_LUT;
use crate::format::mxfp4::MX_GROUP;
use crate::format::PackedMat;
use std::arch::x86_64::*;
use std::sync::LazyLock;

/// Columns per strip (two zmm of accumulators per row).
const STRIP: usize = 32;
/// Rows per register tile.
const MR: usize = 6;

/// bf16 bits of every e4m3 byte / 256 (the scalar twin of [`fp8_dec32`]).
static E4M3_BF16_DIV256: LazyLock<[u16; 256]> =
    LazyLock::new(|| std::array::from_fn(|b| half::bf16::from_f32(E4M3_LUT[b] / 256.0).to_bits()));

/// Whether [`gemm`] runs `w`: k-pairs need an even K, and FP8 blocks must
/// not split a pair.
pub(super) fn supports(w: &PackedMat<'_>) -> bool {
    match *w {
        PackedMat::Fp8 { k, bk, .. } => k.is_multiple_of(2) && (bk >= k || bk.is_multiple_of(2)),
        PackedMat::Mxfp4 { .. } => true,
    }
}

/// 16 k-pairs (32 k from `c0`, a multiple of 32) of weight row `n`, as u32
/// lanes of two bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn row_pairs(w: &PackedMat<'_>, n: usize, c0: usize) -> __m512i {
    match *w {
        PackedMat::Fp8 { q, k, .. } => {
            let [x0, x1] = fp8_dec32(q.as_ptr().add(n * k + c0));
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0))
        }
        PackedMat::Mxfp4 { q, scales, k } => {
            let e = n * k + c0;
            let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(e / 2) as *const __m128i));
            let idx = _mm512_ternarylogic_epi32::<0xA8>(
                x,
                _mm512_slli_epi32::<12>(x),
                _mm512_set1_epi32(0x000f_000f),
            );
            let lut = _mm512_load_si512(
                MX_BF16_LUTS[scales[e / MX_GROUP] as usize].0.as_ptr() as *const _
            );
            _mm512_permutexvar_epi16(idx, lut)
        }
    }
}

/// The pair `(c, c + 1)` of weight row `n` (the scalar tail past the last
/// 32 columns; FP8 only, MXFP4 rows are whole groups).
fn tail_pair(w: &PackedMat<'_>, n: usize, c: usize) -> u32 {
    match *w {
        PackedMat::Fp8 { q, k, .. } => {
            let t = &*E4M3_BF16_DIV256;
            t[q[n * k + c] as usize] as u32 | (t[q[n * k + c + 1] as usize] as u32) << 16
        }
        PackedMat::Mxfp4 { .. } => unreachable!("MXFP4 rows are whole 32-element groups"),
    }
}

/// Decodes rows `n0..n0 + cols` (zero past `cols`) into `panel`
/// (`[K/2][STRIP]` u32 pairs).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack(w: &PackedMat<'_>, n0: usize, cols: usize, panel: &mut [u32]) {
    let k = w.k();
    let (kp, full) = (k / 2, k / 32);
    for half in 0..2 {
        let (r0, rows) = (n0 + 16 * half, cols.saturating_sub(16 * half).min(16));
        if rows == 0 {
            for p in 0..kp {
                panel[p * STRIP + 16 * half..p * STRIP + 16 * half + 16].fill(0);
            }
            continue;
        }
        for g in 0..full {
            let v: [__m512i; 16] = std::array::from_fn(|i| {
                if i < rows {
                    row_pairs(w, r0 + i, 32 * g)
                } else {
                    _mm512_setzero_si512()
                }
            });
            for (j, t) in transpose16(v).iter().enumerate() {
                let at = (16 * g + j) * STRIP + 16 * half;
                _mm512_storeu_si512(panel.as_mut_ptr().add(at) as *mut _, *t);
            }
        }
        for p in 16 * full..kp {
            for i in 0..16 {
                panel[p * STRIP + 16 * half + i] = if i < rows {
                    tail_pair(w, r0 + i, 2 * p)
                } else {
                    0
                };
            }
        }
    }
}

/// `M` activation rows against the panel: per k-block `b` (pairs `p0..p1`)
/// the partial sums take that block's column scales `sc` (two zmm) and,
/// with `ROW_SCALES`, the row's scale of the block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile<const M: usize, const RES: bool, const ROW_SCALES: bool>(
    rows: &[ActRow],
    panel: &[u32],
    blocks: &[((usize, usize), [__m512; 2])],
    c: &[*mut f32],
    cols: usize,
) {
    let pp = panel.as_ptr();
    let hi: [*const u32; M] = std::array::from_fn(|r| rows[r].split.hi.as_ptr() as *const u32);
    let lo: [*const u32; M] = std::array::from_fn(|r| rows[r].split.lo.as_ptr() as *const u32);
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    for (b, &((p0, p1), sc)) in blocks.iter().enumerate() {
        let mut g = [[_mm512_setzero_ps(); 2]; M];
        for p in p0..p1 {
            let w0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(pp.add(p * STRIP) as *const _));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(pp.add(p * STRIP + 16) as *const _));
            for r in 0..M {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*hi[r].add(p) as i32));
                g[r][0] = _mm512_dpbf16_ps(g[r][0], w0, x);
                g[r][1] = _mm512_dpbf16_ps(g[r][1], w1, x);
                if RES {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*lo[r].add(p) as i32));
                    g[r][0] = _mm512_dpbf16_ps(g[r][0], w0, x);
                    g[r][1] = _mm512_dpbf16_ps(g[r][1], w1, x);
                }
            }
        }
        for r in 0..M {
            let sc = if ROW_SCALES {
                let rs = _mm512_set1_ps(rows[r].scales[b]);
                [_mm512_mul_ps(sc[0], rs), _mm512_mul_ps(sc[1], rs)]
            } else {
                sc
            };
            acc[r][0] = _mm512_fmadd_ps(g[r][0], sc[0], acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(g[r][1], sc[1], acc[r][1]);
        }
    }
    for r in 0..M {
        _mm512_mask_storeu_ps(c[r], mask16(cols), acc[r][0]);
        // (wrapping: past a narrow strip's end the mask stores nothing)
        _mm512_mask_storeu_ps(
            c[r].wrapping_add(16),
            mask16(cols.saturating_sub(16)),
            acc[r][1],
        );
    }
}

/// One activation row as bf16 pairs: its values split into high part and
/// residual, or (W8A8) its e4m3 codes with one scale per k-block.
struct ActRow {
    split: SplitRow,
    scales: Vec<f32>,
}

/// A row fake-quantized to FP8 per `group` columns back to its codes (exact
/// in bf16) and group scales: a group's largest magnitude is 448 · its
/// scale (the quantizer maps the amax to 448), so `a / (amax / 448)` is the
/// code to within an f32 rounding, which the bf16 rounding removes.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn code_row(a: *const f32, k: usize, group: usize) -> ActRow {
    let mut scales = Vec::with_capacity(k.div_ceil(group));
    let mut t = vec![0f32; k.div_ceil(32) * 32];
    for c0 in (0..k).step_by(group) {
        let c1 = (c0 + group).min(k);
        let mut m = _mm512_setzero_ps();
        for c in (c0..c1).step_by(16) {
            let v = _mm512_maskz_loadu_ps(mask16(c1 - c), a.add(c));
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
        }
        let s = crate::format::fp8::act_group_scale(_mm512_reduce_max_ps(m));
        // a multiply by 1/s is within a few f32 ulps of the code: the bf16
        // rounding below removes them
        let inv = _mm512_set1_ps(1.0 / s);
        for c in (c0..c1).step_by(16) {
            let mk = mask16(c1 - c);
            let v = _mm512_maskz_loadu_ps(mk, a.add(c));
            _mm512_mask_storeu_ps(t.as_mut_ptr().add(c), mk, _mm512_mul_ps(v, inv));
        }
        scales.push(s);
    }
    let hi = t
        .chunks_exact(32)
        .map(|c| {
            _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(c.as_ptr().add(16)),
                _mm512_loadu_ps(c.as_ptr()),
            )
        })
        .collect();
    ActRow {
        split: SplitRow { hi, lo: Vec::new() },
        scales,
    }
}

/// The k-blocks of strip `n0..n0 + cols` and their column scales.
#[target_feature(enable = "avx512f")]
unsafe fn strip_blocks(
    w: &PackedMat<'_>,
    n0: usize,
    cols: usize,
) -> Vec<((usize, usize), [__m512; 2])> {
    match *w {
        PackedMat::Fp8 {
            scales, k, bn, bk, ..
        } => {
            let kb = k.div_ceil(bk);
            (0..kb)
                .map(|b| {
                    let s: [f32; STRIP] = std::array::from_fn(|c| {
                        // the codes were decoded as value / 256
                        let n = n0 + c.min(cols.saturating_sub(1));
                        scales[(n / bn) * kb + b] * 256.0
                    });
                    let p = (b * bk / 2, ((b + 1) * bk).min(k) / 2);
                    (
                        p,
                        [
                            _mm512_loadu_ps(s.as_ptr()),
                            _mm512_loadu_ps(s.as_ptr().add(16)),
                        ],
                    )
                })
                .collect()
        }
        PackedMat::Mxfp4 { k, .. } => vec![((0, k / 2), [_mm512_set1_ps(1.0); 2])],
    }
}

/// Computes the tile (overwriting `c`).
///
/// # Safety
/// As [`super::qgemm_tile`], with [`supports`] true and AVX-512 BF16
/// available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn gemm(t: &QTile<'_>) {
    let k = t.w.k();
    // W8A8 with activation groups as wide as the weight blocks: multiply
    // the codes, scale per block
    let codes = match (t.w, t.act_group) {
        (PackedMat::Fp8 { bk, .. }, Some(g)) => g == bk.min(k),
        _ => false,
    };
    let mut residual = false;
    let rows: Vec<ActRow> =
        t.a.iter()
            .map(|&a| {
                if codes {
                    return code_row(a, k, t.act_group.unwrap_or(k));
                }
                let (split, res) = split_row(a, k);
                residual |= res;
                ActRow {
                    split,
                    scales: Vec::new(),
                }
            })
            .collect();
    let mut panel = vec![0u32; k / 2 * STRIP];
    let mut s = t.n0;
    while s < t.n1 {
        let cols = STRIP.min(t.n1 - s);
        pack(&t.w, s, cols, &mut panel);
        let blocks = strip_blocks(&t.w, s, cols);
        let mut r = 0;
        while r < rows.len() {
            let m = MR.min(rows.len() - r);
            let cs: Vec<*mut f32> = t.c[r..r + m].iter().map(|p| p.add(s - t.n0)).collect();
            let rr = &rows[r..r + m];
            macro_rules! go {
                ($m:literal) => {
                    match (codes, residual) {
                        (true, _) => tile::<$m, false, true>(rr, &panel, &blocks, &cs, cols),
                        (false, true) => tile::<$m, true, false>(rr, &panel, &blocks, &cs, cols),
                        (false, false) => tile::<$m, false, false>(rr, &panel, &blocks, &cs, cols),
                    }
                };
            }
            match m {
                6 => go!(6),
                5 => go!(5),
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
            r += m;
        }
        s += cols;
    }
}
