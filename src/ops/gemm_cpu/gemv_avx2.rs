//! Decode and small-batch kernel for float weights on AVX2: the weight rows
//! of a tile are read one after another, in address order, so the whole tile
//! is one sequential stream (as the AVX-512 decode kernel reads them). Each
//! (activation row, 8-lane slot) pair keeps its own accumulator, so one
//! weight row alone has four independent FMA chains. For 4–11 rows it beats
//! packing panels (BENCHMARKS.md); for decode it streams as the four-rows-
//! side-by-side kernel it replaced did (15–16 GB/s on a bf16 `lm_head`).

use super::{Tile, WeightElem};
use std::arch::x86_64::*;

/// Activation rows in the lane order of `W::load16` (a copy only when that
/// order is permuted), 16-element blocks; the tail past the last full block
/// keeps its natural order.
struct Rows {
    copies: Vec<Vec<f32>>,
}

impl Rows {
    /// # Safety
    /// Every pointer of `a` addresses `k` readable f32; AVX2 is available.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn new<W: WeightElem>(a: &[*const f32], k: usize) -> Self {
        if !W::PERMUTED16 {
            return Self { copies: Vec::new() };
        }
        let k16 = k & !15;
        let copies = a
            .iter()
            .map(|&p| {
                let mut v = vec![0f32; k16];
                let mut i = 0;
                while i < k16 {
                    let [x, y] = super::permute16(p.add(i), true);
                    _mm256_storeu_ps(v.as_mut_ptr().add(i), x);
                    _mm256_storeu_ps(v.as_mut_ptr().add(i + 8), y);
                    i += 16;
                }
                v
            })
            .collect();
        Self { copies }
    }

    /// Row `m` for the 16-blocks (permuted when `W` needs it).
    fn blocks(&self, a: &[*const f32], m: usize) -> *const f32 {
        match self.copies.get(m) {
            Some(v) => v.as_ptr(),
            None => a[m],
        }
    }
}

/// `M` activation rows against weight row `n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row<W: WeightElem, const M: usize>(
    a: &[*const f32],
    blocks: &[*const f32; M],
    w: *const W,
    k: usize,
) -> [f32; M] {
    let mut acc = [[_mm256_setzero_ps(); 4]; M];
    let k32 = k & !31;
    let k16 = k & !15;
    let k8 = k & !7;
    let mut kk = 0;
    while kk < k32 {
        let w0 = W::load16(w.add(kk));
        let w1 = W::load16(w.add(kk + 16));
        for m in 0..M {
            let b = blocks[m].add(kk);
            acc[m][0] = _mm256_fmadd_ps(w0[0], _mm256_loadu_ps(b), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w0[1], _mm256_loadu_ps(b.add(8)), acc[m][1]);
            acc[m][2] = _mm256_fmadd_ps(w1[0], _mm256_loadu_ps(b.add(16)), acc[m][2]);
            acc[m][3] = _mm256_fmadd_ps(w1[1], _mm256_loadu_ps(b.add(24)), acc[m][3]);
        }
        kk += 32;
    }
    if kk < k16 {
        let w0 = W::load16(w.add(kk));
        for m in 0..M {
            let b = blocks[m].add(kk);
            acc[m][0] = _mm256_fmadd_ps(w0[0], _mm256_loadu_ps(b), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w0[1], _mm256_loadu_ps(b.add(8)), acc[m][1]);
        }
        kk += 16;
    }
    // past the 16-blocks the activations are read in natural order
    if kk < k8 {
        let wv = W::load8(w.add(kk));
        for m in 0..M {
            acc[m][2] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a[m].add(kk)), acc[m][2]);
        }
        kk += 8;
    }
    std::array::from_fn(|m| {
        let s = _mm256_add_ps(
            _mm256_add_ps(acc[m][0], acc[m][1]),
            _mm256_add_ps(acc[m][2], acc[m][3]),
        );
        let mut s = super::avx2::hsum(s);
        for q in kk..k {
            s += *a[m].add(q) * (*w.add(q)).to_f32();
        }
        s
    })
}

/// Rows `m0..m0 + M` of the tile against its weight rows `n0..n1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_m<W: WeightElem, const M: usize>(
    t: &Tile<'_, W>,
    rows: &Rows,
    m0: usize,
    (n0, n1): (usize, usize),
) {
    let a = &t.a[m0..m0 + M];
    let blocks: [*const f32; M] = std::array::from_fn(|m| rows.blocks(t.a, m0 + m));
    for n in n0..n1 {
        let out = row::<W, M>(a, &blocks, t.w.as_ptr().add(n * t.k), t.k);
        for (c, v) in t.c[m0..m0 + M].iter().zip(out) {
            *c.add(n - t.n0) = v;
        }
    }
}

/// Bytes of weight rows one pass over the activation chunks reuses (they
/// stay in L1 / L2 for the chunks after the first).
const BLOCK_BYTES: usize = 32 << 10;

/// Computes the tile (overwriting `c`) for any row count: chunks of 3
/// activation rows, each against a block of weight rows while that block is
/// in cache. Every weight byte comes from memory once; 4–11 rows cost 2–4
/// passes over cached weights, less than packing panels for so few rows
/// (bench_linear, BENCHMARKS.md).
///
/// # Safety
/// As [`super::gemm_tile`]; AVX2 + FMA + F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm<W: WeightElem>(t: &Tile<'_, W>) {
    let m = t.a.len().min(t.c.len());
    let rows = Rows::new::<W>(&t.a[..m], t.k);
    let nb = (BLOCK_BYTES / (t.k * std::mem::size_of::<W>()).max(1)).max(1);
    let mut n0 = t.n0;
    while n0 < t.n1 {
        let n1 = (n0 + nb).min(t.n1);
        let mut m0 = 0;
        while m0 < m {
            match m - m0 {
                1 => rows_m::<W, 1>(t, &rows, m0, (n0, n1)),
                2 => rows_m::<W, 2>(t, &rows, m0, (n0, n1)),
                _ => rows_m::<W, 3>(t, &rows, m0, (n0, n1)),
            }
            m0 += 3;
        }
        n0 = n1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_rand as rand, Tile, WeightElem};
    use half::{bf16, f16};

    /// Every row count the kernel takes (1 to 11: one chunk, several, and a
    /// last chunk of 1 or 2), K with and without 32/16/8/scalar tails, N past
    /// a weight block, against an f64 reference; a tile that starts past
    /// column 0 writes only its own columns.
    fn check<W: WeightElem>(from: fn(f32) -> W) {
        for (n, k) in [(37usize, 59usize), (9, 2075), (300, 64), (5, 7)] {
            let w: Vec<W> = rand(n * k, 3).into_iter().map(from).collect();
            for m in 1..=11 {
                let a = rand(m * k, 5 + m as u64);
                let (n0, n1) = (n / 3, n);
                let width = n1 - n0;
                let mut c = vec![f32::NAN; m * width];
                let ap: Vec<*const f32> = (0..m).map(|r| a[r * k..].as_ptr()).collect();
                let cp: Vec<*mut f32> = (0..m)
                    .map(|r| unsafe { c.as_mut_ptr().add(r * width) })
                    .collect();
                let t = Tile {
                    a: &ap,
                    w: &w,
                    k,
                    n0,
                    n1,
                    c: &cp,
                };
                unsafe { super::gemm(&t) };
                for r in 0..m {
                    for j in n0..n1 {
                        let terms =
                            (0..k).map(|i| a[r * k + i] as f64 * w[j * k + i].to_f32() as f64);
                        let want: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        let got = c[r * width + j - n0] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "m {m} n {n} k {k} row {r} col {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference_for_every_weight_type() {
        if !crate::CpuFeatures::hardware().avx2 {
            eprintln!("no AVX2: skipped");
            return;
        }
        check::<f32>(|x| x);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }
}
