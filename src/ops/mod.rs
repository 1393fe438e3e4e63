//! Custom ops, one per file: a struct implementing candle's `CustomOp*` with a
//! CPU forward (and, with the `cuda` feature, a CUDA one), plus a thin wrapper.
//! The tensor's device picks the implementation at run time.

pub mod act_quant;
pub mod activation;
pub mod align;
pub mod attention;
pub(crate) mod gemm_cpu;
pub mod grouped_gemm;
mod kernel_sigs;
pub mod linear;
pub mod reduce;
pub mod residual;
pub mod topk;

pub use act_quant::fp8_group_quant_dequant;
pub use activation::{act_and_mul, Activation};
pub use align::{align_block_size, moe_align_block_size, AlignedRouting};
pub use attention::{paged_attention, write_kv, PagedAttentionMeta, SeqSpan};
pub use grouped_gemm::{grouped_gemm, grouped_gemm_with_kernel, CudaGemmKernel, GroupedGemmArgs};
pub use linear::{linear, LinearArgs};
pub use reduce::moe_weighted_sum;
pub use residual::{gated_residual_add, residual_add};
pub use topk::{router_weights, topk_select, ScoringFunc};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, WithDType};

/// Elements from which the light passes around the kernels (rounding,
/// bias, activation quantization, the activation, the weighted sum) go to
/// rayon. A decode step's passes are smaller: handing one to the pool from
/// the calling thread cost more than the pass (bench_linear, one bf16 row
/// over 64×2048: 35–115 µs per call with the output's rounding on rayon,
/// 10 µs inline).
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// `f(index, chunk)` over the `chunk`-long pieces of `x` (`chunk > 0`): on
/// rayon from [`PAR_MIN_ELEMS`] elements, else inline.
pub(crate) fn for_chunks<T: Send>(
    x: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_chunks_from(x, chunk, PAR_MIN_ELEMS, f)
}

/// [`for_chunks`] going to rayon from `min_par` elements (passes that cost
/// more per element than a rounding).
pub(crate) fn for_chunks_from<T: Send>(
    x: &mut [T],
    chunk: usize,
    min_par: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    debug_assert!(chunk > 0);
    if x.len() < min_par {
        x.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        x.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The contiguous slice a layout addresses, or an error naming the operand.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what} must be contiguous"),
    }
}

/// f32 results as storage of `dt`: f32 kept, f16 / bf16 rounded once (on
/// rayon from [`PAR_MIN_ELEMS`] elements); `what` names the op in the error
/// for other dtypes.
pub(crate) fn f32_to_storage(out: Vec<f32>, dt: DType, what: &str) -> Result<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(out),
        DType::BF16 => CpuStorage::BF16(convert(&out, bf16_from_f32)),
        DType::F16 => CpuStorage::F16(convert(&out, half::f16::from_f32)),
        dt => bail!("{what}: unsupported output dtype {dt:?}"),
    })
}

/// `f` over every element (on rayon from [`PAR_MIN_ELEMS`]), compiled for
/// AVX-512 where the CPU has it so bit-operation conversions such as
/// [`bf16_from_f32`] run 16 lanes wide.
fn convert<S: Copy + Sync, D: Copy + Default + Send>(
    x: &[S],
    f: impl Fn(S) -> D + Copy + Sync,
) -> Vec<D> {
    #[inline(always)]
    fn body<S: Copy, D>(x: &[S], d: &mut [D], f: impl Fn(S) -> D) {
        d.iter_mut().zip(x).for_each(|(d, &x)| *d = f(x))
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512<S: Copy, D>(x: &[S], d: &mut [D], f: impl Fn(S) -> D) {
        body(x, d, f)
    }
    const CHUNK: usize = 4096;
    let mut v = vec![D::default(); x.len()];
    #[cfg(target_arch = "x86_64")]
    let wide = crate::cpu_features().avx512;
    for_chunks(&mut v, CHUNK, |i, d| {
        let x = &x[i * CHUNK..];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the features were detected at run time
            return unsafe { avx512(x, d, f) };
        }
        body(x, d, f)
    });
    v
}

/// `half::bf16::from_f32` (nearest even; a NaN stays NaN, made quiet) in
/// bit operations that vectorise.
#[inline(always)]
pub(crate) fn bf16_from_f32(x: f32) -> half::bf16 {
    let b = x.to_bits();
    let nearest = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    half::bf16::from_bits(if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        nearest
    } as u16)
}

/// `half::bf16::to_f32` (exact; a NaN made quiet) in bit operations that
/// vectorise.
#[inline(always)]
pub(crate) fn bf16_to_f32(x: half::bf16) -> f32 {
    let b = x.to_bits() as u32;
    let b = if b & 0x7FFF > 0x7F80 { b | 0x40 } else { b };
    f32::from_bits(b << 16)
}

/// Reads any float storage as f32 rows (a copy only for f16/bf16).
pub(crate) fn to_f32_cow<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    use std::borrow::Cow;
    Ok(match s.dtype() {
        DType::F32 => Cow::Borrowed(contiguous::<f32>(s, l, what)?),
        DType::BF16 => Cow::Owned(convert(contiguous(s, l, what)?, bf16_to_f32)),
        DType::F16 => Cow::Owned(convert(contiguous(s, l, what)?, half::f16::to_f32)),
        dt => bail!("{what}: unsupported dtype {dt:?}, expected f32, bf16 or f16"),
    })
}

/// Prefetches the cache line at `p` into L1 (a hint: never dereferenced, so
/// addresses past a buffer are fine; nothing off x86_64).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A raw pointer that rayon tasks may share because each writes disjoint rows.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// A method (not field access) so closures capture the whole wrapper.
    #[inline(always)]
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rounding gives half's bits for every bf16 neighbourhood:
    /// each f32 that is a bf16 and the values around it (ties, halfway
    /// points, NaN payloads, infinities, subnormals).
    #[test]
    fn bf16_rounding_matches_half() {
        let mut x = Vec::new();
        for hi in 0..=u16::MAX as u32 {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                x.push(f32::from_bits(hi << 16 | lo));
            }
        }
        let got = match f32_to_storage(x.clone(), DType::BF16, "test").unwrap() {
            CpuStorage::BF16(v) => v,
            _ => unreachable!(),
        };
        for (g, &v) in got.iter().zip(&x) {
            assert_eq!(
                g.to_bits(),
                half::bf16::from_f32(v).to_bits(),
                "{:#x}",
                v.to_bits()
            );
        }
    }

    /// The vectorised widening gives half's bits for every bf16.
    #[test]
    fn bf16_widening_matches_half() {
        let x: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
        let s = CpuStorage::BF16(x.clone());
        let got = to_f32_cow(&s, &Layout::contiguous(x.len()), "test").unwrap();
        for (g, v) in got.iter().zip(&x) {
            assert_eq!(g.to_bits(), v.to_f32().to_bits(), "{:#x}", v.to_bits());
        }
    }
}
