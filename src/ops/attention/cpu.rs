//! The CPU kernel of paged attention: rayon over (token, KV head); the `rep`
//! query heads sharing a KV head read each cached key and value row once,
//! widened to f32, with an online softmax per block. The per-task body is
//! compiled once per instruction set (AVX-512, AVX2 + FMA, baseline) so its
//! loops vectorise at the width the CPU has; the set is detected per call.

use super::MetaInner;
use crate::ops::activation::fast_exp;
use half::{bf16, f16};
use rayon::prelude::*;

/// A cache element the kernel widens to f32.
pub(super) trait CacheElem: Copy + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
}
impl CacheElem for f32 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}
impl CacheElem for bf16 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = crate::ops::bf16_to_f32(s))
    }
}
impl CacheElem for f16 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32())
    }
}

/// Vector widths the task body is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let f = crate::cpu_features();
            if f.avx512 {
                return Simd::Avx512;
            }
            if f.avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

/// One call's operands: queries `[T, heads, d]` f32, one layer's K/V cache.
pub(super) struct Attn<'a, C> {
    pub(super) m: &'a MetaInner,
    pub(super) q: &'a [f32],
    pub(super) kc: &'a [C],
    pub(super) vc: &'a [C],
    /// (heads, kv heads, head dim)
    pub(super) dims: (usize, usize, usize),
    pub(super) scale: f32,
}

impl<C: CacheElem> Attn<'_, C> {
    /// [`Self::run`] at the widest vectors this CPU has.
    pub(super) fn attend(&self) -> Vec<f32> {
        // SAFETY: `detect` found the features
        unsafe { self.run(Simd::detect()) }
    }

    /// `[T, heads, d]` f32.
    ///
    /// # Safety
    /// The CPU has `simd`'s features: [`Simd::detect`] or less.
    pub(super) unsafe fn run(&self, simd: Simd) -> Vec<f32> {
        let (heads, kvh, d) = self.dims;
        let rep = heads / kvh;
        let mut out = vec![0f32; self.m.slots.len() * heads * d];
        // one task per (token, kv head): its `rep` query heads, contiguous in
        // `out`; the scratch is per rayon job, not per task
        out.par_chunks_mut(rep * d).enumerate().for_each_init(
            || Scratch::new(rep, self.m.block_size, d),
            |sc, (i, o)| match simd {
                Simd::Baseline => task::<C, false>(self, i, o, sc),
                // SAFETY: the caller guarantees the features
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { task_avx2(self, i, o, sc) },
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { task_avx512(self, i, o, sc) },
            },
        );
        out
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<C: CacheElem>(a: &Attn<'_, C>, i: usize, o: &mut [f32], sc: &mut Scratch) {
    task::<C, true>(a, i, o, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn task_avx512<C: CacheElem>(a: &Attn<'_, C>, i: usize, o: &mut [f32], sc: &mut Scratch) {
    task::<C, true>(a, i, o, sc)
}

/// A task's running max, denominator and scores per query head, and one
/// widened cache row.
struct Scratch {
    mx: Vec<f32>,
    den: Vec<f32>,
    s: Vec<f32>,
    row: Vec<f32>,
}

impl Scratch {
    fn new(rep: usize, bs: usize, d: usize) -> Self {
        Self {
            mx: vec![0.0; rep],
            den: vec![0.0; rep],
            s: vec![0.0; rep * bs],
            row: vec![0.0; d],
        }
    }
}

/// Cached positions ahead whose keys a task prefetches.
const AHEAD: usize = 16;

/// Prefetches the `d` elements of `x` from `off` (a hint: never faults).
#[inline(always)]
fn prefetch_row<C>(x: &[C], off: usize, d: usize) {
    let p = x.as_ptr().wrapping_add(off) as *const u8;
    for b in (0..d * std::mem::size_of::<C>()).step_by(64) {
        crate::ops::prefetch(p.wrapping_add(b))
    }
}

/// `Σ a·b` with 16 independent partial sums (vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ x` with 16 independent partial sums (vectorises).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let c = x.chunks_exact(16);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Task `i` (token `i / kvh`, KV head `i % kvh`): its query heads' outputs
/// into `o` (`rep · d`). `FMA`: compiled with FMA ([`fast_exp`]).
#[inline(always)]
fn task<C: CacheElem, const FMA: bool>(a: &Attn<'_, C>, i: usize, o: &mut [f32], sc: &mut Scratch) {
    let (heads, kvh, d) = a.dims;
    let (m, rep) = (a.m, heads / kvh);
    let bs = m.block_size;
    let (ti, g) = (i / kvh, i % kvh);
    let seq = m.token_seq[ti] as usize;
    let ctx = m.token_pos[ti] as usize + 1;
    let table = &m.tables[m.table_off[seq]..m.table_off[seq + 1]];
    let qs = &a.q[(ti * heads + g * rep) * d..(ti * heads + (g + 1) * rep) * d];
    let Scratch { mx, den, s, row } = sc;
    mx.fill(f32::NEG_INFINITY);
    den.fill(0.0);
    for (bi, &blk) in table.iter().enumerate() {
        let p0 = bi * bs;
        if p0 >= ctx {
            break;
        }
        let n = bs.min(ctx - p0);
        let slot0 = blk as usize * bs;
        for j in 0..n {
            let off = ((slot0 + j) * kvh + g) * d;
            // rows sit a whole cache row apart (often 4 KiB, where hardware
            // prefetchers stop): fetch the keys `AHEAD` positions on, and
            // this position's values for the pass below
            let pa = p0 + j + AHEAD;
            if pa < ctx {
                let slot = table[pa / bs] as usize * bs + pa % bs;
                prefetch_row(a.kc, (slot * kvh + g) * d, d);
            }
            prefetch_row(a.vc, off, d);
            C::widen(&a.kc[off..off + d], row);
            for r in 0..rep {
                s[r * bs + j] = dot(&qs[r * d..(r + 1) * d], row) * a.scale;
            }
        }
        for r in 0..rep {
            let sr = &mut s[r * bs..r * bs + n];
            let bmax = sr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new = mx[r].max(bmax);
            // exact exp here: exp(-inf) of the first block is 0
            let corr = (mx[r] - new).exp();
            if corr != 1.0 {
                den[r] *= corr;
                o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
            }
            mx[r] = new;
            sr.iter_mut().for_each(|x| *x = fast_exp::<FMA>(*x - new));
            den[r] += sum(sr);
        }
        for j in 0..n {
            let off = ((slot0 + j) * kvh + g) * d;
            C::widen(&a.vc[off..off + d], row);
            for r in 0..rep {
                let p = s[r * bs + j];
                o[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(row.iter())
                    .for_each(|(x, v)| *x += p * v);
            }
        }
    }
    for r in 0..rep {
        let inv = 1.0 / den[r];
        o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{PagedAttentionMeta, SeqSpan};

    /// Every instruction set this CPU has gives the baseline's result (the
    /// integration tests check the detected one against the math).
    #[test]
    fn every_simd_width_matches_baseline() {
        let (heads, kvh, d, bs) = (8, 2, 40, 4);
        let blocks: Vec<u32> = vec![3, 0, 5, 1, 4, 2];
        let spans = [SeqSpan {
            start: 17,
            len: 4,
            blocks: &blocks,
        }];
        let meta = PagedAttentionMeta::new(bs, 6, &spans).unwrap();
        let slots = 6 * bs;
        let val = |i: usize, f: f32| (i as f32 * f).sin() * 1.5;
        let q: Vec<f32> = (0..4 * heads * d).map(|i| val(i, 0.37)).collect();
        let kc: Vec<bf16> = (0..slots * kvh * d)
            .map(|i| bf16::from_f32(val(i, 0.11)))
            .collect();
        let vc: Vec<bf16> = (0..slots * kvh * d)
            .map(|i| bf16::from_f32(val(i, 0.23)))
            .collect();
        let a = Attn {
            m: &meta.0,
            q: &q,
            kc: &kc,
            vc: &vc,
            dims: (heads, kvh, d),
            scale: 1.0 / (d as f32).sqrt(),
        };
        // SAFETY: the baseline needs no feature; the others are detected below
        let want = unsafe { a.run(Simd::Baseline) };
        let mag = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(mag > 0.1);
        #[allow(unused_mut)]
        let mut widths = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            // every width the hardware runs, whatever CANDLE_MOE_ISA caps
            let hw = crate::CpuFeatures::hardware();
            if hw.avx2 {
                widths.push(Simd::Avx2);
            }
            if hw.avx512 {
                widths.push(Simd::Avx512);
            }
        }
        for simd in widths {
            let got = unsafe { a.run(simd) };
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(err <= 1e-5 * mag, "{simd:?}: err {err} vs max {mag}");
        }
    }
}
