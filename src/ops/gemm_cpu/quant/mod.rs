//! CPU GEMM over quantized expert weights, read in their packed form:
//! `C[r, n] = Σ_k A[r, k] · dequant(W)[n, k]` with f32 activations.
//!
//! - FP8 e4m3 with one f32 scale per `bn × bk` block (per-tensor, per-channel
//!   and 128×128 are all block shapes).
//! - MXFP4: 16 bytes hold a 32-element group with one e8m0 scale.
//!
//! Few rows (decode steps, small expert segments) run a decode kernel that
//! fuses the widening into dot products, every weight byte read once
//! (AVX2: [`decode_avx2`], shifts and masks; AVX-512: `avx512`, all of a
//! tile's rows in one sweep); more rows decode a 16-column strip into the
//! f32 panel of the dense packed kernel and reuse its FMA tile (6×16 on
//! AVX2, widening through F16C and a byte table; 12×32 over two strips on
//! AVX-512, packed by `pack_avx512`), or run `packed_bf16` where
//! `vdpbf16ps` out-runs 512-bit FMAs.

#[cfg(target_arch = "x86_64")]
mod skinny;

use super::{KC, MR, NR};
use crate::format::mxfp4::{e2m1_to_f32, MX_GROUP};
use crate::format::PackedMat;
use std::sync::LazyLock;

/// `2^(e − 128)`: the e8m0 scale halved, because the panel decoder yields
/// 2·e2m1 (the AVX2 decode kernel takes the factor into its bias).
static MX_HALF_SCALE: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|e| 2f32.powi(e as i32 - 128)));

/// One tile: activation rows `a` (each K long) times `dequant(w)[n0..n1]ᵀ`,
/// written to `c[i] + (0..n1-n0)`.
pub struct QTile<'a> {
    pub a: &'a [*const f32],
    /// The activations were FP8-quantized (and dequantized) per token in
    /// groups of this many columns (W8A8): a kernel may multiply their
    /// e4m3 codes and apply the group scales itself.
    pub act_group: Option<usize>,
    pub w: PackedMat<'a>,
    pub n0: usize,
    pub n1: usize,
    pub c: &'a [*mut f32],
}

/// Computes the tile (overwriting `c`).
///
/// # Safety
/// As [`super::gemm_tile`]; `w` must have passed [`PackedMat::check`]
/// for at least `n1` rows.
pub unsafe fn qgemm_tile(t: &QTile<'_>) {
    qgemm_tile_with(t, Isa::detect())
}

/// Rows of one AVX-512 decode sweep over `w` (more rows run as sweeps of
/// equal size, up to `Isa::packed_min_rows`): one sum per (row, weight
/// row) takes up to 11 (MXFP4, and FP8 in f32 FMAs with `fma`), the FP8
/// kernel that keeps two (the scale block's partial sum and the total) 6.
fn avx512_sweep_rows(w: &PackedMat<'_>, fma: bool) -> usize {
    match w {
        PackedMat::Fp8 { .. } if !(fma && avx512::fp8_fma_fits(w)) => 6,
        _ => super::sweep::MAX_ROWS,
    }
}

/// Instruction sets the kernels can use (tests run each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + BF16: the decode kernels, and prefill in
    /// `vdpbf16ps` (where it out-runs 512-bit FMAs, as on AMD Zen 4).
    Avx512Bf16,
    /// The same decode kernels, prefill in 512-bit f32 FMAs over AVX2's
    /// decoded panels (where those out-run `vdpbf16ps`, as on Intel cores).
    Avx512Fma,
}

impl Isa {
    /// Rows from which decoding weight strips into panels for the packed
    /// kernel beats running the decode kernel over passes of its rows
    /// (bench_linear, 2816×2048 / 2048×1408 / 2048×2048). On AVX-512
    /// (MXFP4 in one sweep of ≤ 11 rows, FP8 then in passes of ≤ 6; FP8
    /// sweeps of ≤ 11 rows since) the decode kernel wins up to 22 rows and
    /// ties at 32 (BENCHMARKS.md run 10). On
    /// AVX2 (passes of ≤ 4 rows, shift-and-mask decode) FP8 decode passes
    /// win up to 19 rows and tie at 20–24, MXFP4 ones win up to 12 rows and
    /// tie at 13–16 (42240×2048, BENCHMARKS.md run 9).
    fn packed_min_rows(self, w: &PackedMat<'_>) -> usize {
        match (self, w) {
            (Isa::Avx512Bf16 | Isa::Avx512Fma, _) => 24,
            (_, PackedMat::Fp8 { .. }) => 20,
            _ => 14,
        }
    }

    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                let f = crate::cpu_features();
                if !f.avx2 {
                    Isa::Portable
                } else if f.avx512bf16 {
                    if super::kernel_avx512::fma_beats_dpbf16() {
                        Isa::Avx512Fma
                    } else {
                        Isa::Avx512Bf16
                    }
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
        // few rows on AVX-512: the decode kernel, all rows in one sweep
        Isa::Avx512Bf16 | Isa::Avx512Fma if t.a.len() < isa.packed_min_rows(&t.w) => {
            // passes of equal size, each at most one sweep (6 rows for the
            // FP8 kernel that keeps two sums per output: measured faster than
            // a sweep over one weight row at a time)
            let max = avx512_sweep_rows(&t.w, isa == Isa::Avx512Fma);
            let per = t.a.len().div_ceil(t.a.len().div_ceil(max).max(1)).max(1);
            for (a, c) in t.a.chunks(per).zip(t.c.chunks(per)) {
                avx512::skinny(&QTile { a, c, ..*t }, isa == Isa::Avx512Fma)
            }
            return;
        }
        // few rows on AVX2: the decode kernel over passes of its rows (the
        // tile's weights stay in L2 after the first pass)
        Isa::Avx2 if t.a.len() < isa.packed_min_rows(&t.w) => {
            // passes of equal size, each at most what the kernel takes
            let max = decode_avx2::MAX_ROWS;
            let per = t.a.len().div_ceil(t.a.len().div_ceil(max).max(1)).max(1);
            for (a, c) in t.a.chunks(per).zip(t.c.chunks(per)) {
                decode_avx2::skinny(&QTile { a, c, ..*t })
            }
            return;
        }
        Isa::Avx512Bf16 if packed_bf16::supports(&t.w) => return packed_bf16::gemm(t),
        Isa::Avx2 => return avx2::packed(t, false),
        Isa::Avx512Bf16 | Isa::Avx512Fma => return avx2::packed(t, true),
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
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod decode_avx2;

#[cfg(target_arch = "x86_64")]
mod packed_bf16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fp8::e4m3_to_f32;

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
        if matches!(best, Isa::Avx512Bf16 | Isa::Avx512Fma) {
            v.extend([Isa::Avx512Bf16, Isa::Avx512Fma]);
        }
        v
    }

    fn check(w: PackedMat<'_>, n: usize, deq: &dyn Fn(usize, usize) -> f32) {
        for isa in isas() {
            check_isa(w, n, deq, isa, None);
        }
    }

    /// `act_group`: the activations are FP8 fake-quantized in groups of
    /// this many columns first (W8A8), as the ops do.
    fn check_isa(
        w: PackedMat<'_>,
        n: usize,
        deq: &dyn Fn(usize, usize) -> f32,
        isa: Isa,
        act_group: Option<usize>,
    ) {
        let k = w.k();
        let mut rng = Lcg(7);
        // f32 activations, and bf16 ones (bf16 compute: no residual part);
        // activations of 2^40 make the AVX2 decode kernels scale them less
        for (m, bf16_act, mag) in [1usize, 2, 3, 4, 5, 6, 7, 9, 11, 13, 19, 25]
            .into_iter()
            .flat_map(|m| [(m, false, 1.0), (m, true, 1.0), (m, false, 2f32.powi(40))])
        {
            let mut a: Vec<f32> = (0..m * k)
                .map(|_| {
                    let v = rng.f() * mag;
                    if bf16_act {
                        half::bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect();
            if let Some(g) = act_group {
                a.chunks_mut(k)
                    .for_each(|row| crate::format::fp8::fake_quant_fp8_groups(row, g));
            }
            let mut c = vec![0f32; m * n];
            let ap: Vec<*const f32> = (0..m).map(|r| unsafe { a.as_ptr().add(r * k) }).collect();
            let cp: Vec<*mut f32> = (0..m)
                .map(|r| unsafe { c.as_mut_ptr().add(r * n) })
                .collect();
            unsafe {
                qgemm_tile_with(
                    &QTile {
                        a: &ap,
                        act_group,
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
                    // f32 paths (all of Avx512Fma) and W8A8 codes (exact
                    // products): rounding of the sum; the bf16 dot products
                    // of f32 activations (Avx512Bf16: MXFP4 decode and the
                    // prefill) keep ~16 bits of each (high part + residual)
                    let codes =
                        matches!(w, PackedMat::Fp8 { bk, .. } if act_group == Some(bk.min(k)));
                    let packed = m >= isa.packed_min_rows(&w);
                    let rel = if isa == Isa::Avx512Bf16
                        && (matches!(w, PackedMat::Mxfp4 { .. }) || packed && !codes)
                    {
                        3e-5
                    } else {
                        2e-6
                    };
                    assert!(
                        (got - want).abs() <= rel * terms + 1e-6,
                        "{isa:?} {act_group:?} m={m} row {r} col {j}: {got} vs {want}"
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
            // row scales over column blocks; blocks not a multiple of 32
            (18, 160, 1, 64),
            (24, 200, 8, 48),
            // tiny experts: rows shorter than a chunk, exactly one chunk
            (32, 16, 1, 128),
            (32, 32, 1, 128),
            (256, 128, 128, 128),
            // sweeps of 2–11 rows in several K chunks, with scale blocks
            // along K and with one per row (applied to the finished sums)
            (19, 2048, 128, 128),
            (19, 2048, 1, 2048),
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
            let w = PackedMat::Fp8 {
                q: &q,
                scales: &scales,
                k,
                bn,
                bk,
            };
            w.check(n).unwrap();
            let deq =
                |r: usize, c: usize| e4m3_to_f32(q[r * k + c]) * scales[(r / bn) * kb + c / bk];
            check(w, n, &deq);
            // W8A8 with activation groups as wide as the weight blocks (the
            // AVX-512 prefill multiplies codes) and narrower ones
            for isa in isas() {
                for g in [bk.min(k), 16] {
                    check_isa(w, n, &deq, isa, Some(g));
                }
            }
        }
    }

    #[test]
    fn mxfp4_paths_match_dequantized_reference() {
        // K = 2048: sweeps of 2–11 rows run in several K chunks
        for (n, k) in [(19usize, 96usize), (33, 288), (21, 2048)] {
            let mut rng = Lcg(k as u64);
            let q: Vec<u8> = (0..n * k / 2).map(|_| (rng.next() % 256) as u8).collect();
            let scales: Vec<u8> = (0..n * k / 32)
                .map(|_| 120 + (rng.next() % 10) as u8)
                .collect();
            let w = PackedMat::Mxfp4 {
                q: &q,
                scales: &scales,
                k,
            };
            w.check(n).unwrap();
            check(w, n, &|r, c| {
                let b = q[(r * k + c) / 2];
                let nib = if c % 2 == 0 { b & 0xf } else { b >> 4 };
                e2m1_to_f32(nib) * crate::format::mxfp4::e8m0_to_f32(scales[(r * k + c) / 32])
            });
        }
    }
}
