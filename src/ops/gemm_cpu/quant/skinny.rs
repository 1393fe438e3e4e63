//! The structure of the AVX-512 decode kernels — walking a tile's weight
//! rows in register blocks, the FP8 block-scaled dot product over a vector
//! type ([`Lanes`]). The bodies are
//! `inline(always)` so they compile inside the ISA's `target_feature`
//! wrappers, with its intrinsics inlined.

use super::QTile;
use crate::format::fp8::E4M3_LUT;
use crate::ops::prefetch;

/// One SIMD vector of f32 lanes and the operations the kernels need.
pub(super) trait Lanes: Copy {
    /// f32 lanes per vector.
    const WIDTH: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// `a · b + c`
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn sum(self) -> f32;
    /// `2 · WIDTH` e4m3 bytes → their values / 256 (a shift into f16).
    unsafe fn fp8_decode(p: *const u8) -> [Self; 2];
}

/// FP8: dot products of `NW` weight rows from `n` with `M` activation rows;
/// each `bn × bk` block's partial sums take its scale once, columns past the
/// last full vector pair go through the table.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn fp8_block<V: Lanes, const M: usize, const NW: usize>(
    a: &[*const f32],
    (q, scales): (&[u8], &[f32]),
    (k, bn, bk): (usize, usize, usize),
    n: usize,
    ahead: usize,
    out: &mut [[f32; NW]; M],
) {
    let step = 2 * V::WIDTH;
    let kb = k.div_ceil(bk);
    let mut acc = [[V::zero(); NW]; M];
    let mut tail = [[0f32; NW]; M];
    let wp: [*const u8; NW] = std::array::from_fn(|j| q.as_ptr().add((n + j) * k));
    // each row's scale row, found once (no division in the K loop)
    let sp: [*const f32; NW] = std::array::from_fn(|j| scales.as_ptr().add(((n + j) / bn) * kb));
    let (mut k0, mut blk) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut g = [[V::zero(); NW]; M];
        let mut kk = k0;
        while kk + step <= k1 {
            if kk.is_multiple_of(64) {
                for p in wp {
                    prefetch(p.wrapping_add(kk + ahead * k));
                }
            }
            let wv: [[V; 2]; NW] = std::array::from_fn(|j| V::fp8_decode(wp[j].add(kk)));
            for m in 0..M {
                let a0 = V::load(a[m].add(kk));
                let a1 = V::load(a[m].add(kk + V::WIDTH));
                for j in 0..NW {
                    g[m][j] = V::fmadd(wv[j][0], a0, g[m][j]);
                    g[m][j] = V::fmadd(wv[j][1], a1, g[m][j]);
                }
            }
            kk += step;
        }
        for j in 0..NW {
            let s = *sp[j].add(blk);
            let sv = V::splat(s * 256.0);
            for m in 0..M {
                acc[m][j] = V::fmadd(g[m][j], sv, acc[m][j]);
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
            out[m][j] = acc[m][j].sum() + tail[m][j];
        }
    }
}

/// Runs `block` over the tile's weight rows `NW` at a time and `one` over
/// the rows left, writing each result into the tile's output rows.
#[inline(always)]
pub(super) unsafe fn for_row_blocks<const M: usize, const NW: usize>(
    t: &QTile<'_>,
    mut block: impl FnMut(usize, &mut [[f32; NW]; M]),
    mut one: impl FnMut(usize, &mut [[f32; 1]; M]),
) {
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
    while n < t.n1 {
        let mut out = [[0f32; 1]; M];
        one(n, &mut out);
        for (c, o) in t.c.iter().zip(&out) {
            *c.add(n - t.n0) = o[0];
        }
        n += 1;
    }
}
