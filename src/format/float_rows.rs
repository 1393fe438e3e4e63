//! A float matrix read in place, in the dtype it is stored in (f32, bf16 or
//! f16), so the on-load quantizers convert each block as they reach it on
//! their own threads instead of widening whole tensors first.

use crate::error::{MoeError, Result};
use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16};

#[derive(Clone, Copy)]
pub enum FloatRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl FloatRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens elements `start..start + out.len()` into `out`.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let r = start..start + out.len();
        match self {
            Self::F32(v) => out.copy_from_slice(&v[r]),
            Self::Bf16(v) => out.iter_mut().zip(&v[r]).for_each(|(o, x)| *o = x.to_f32()),
            Self::F16(v) => out.iter_mut().zip(&v[r]).for_each(|(o, x)| *o = x.to_f32()),
        }
    }
}

/// Runs `f` over the elements of a cpu float tensor without copying them
/// (a non-contiguous tensor is made contiguous first).
pub fn with_rows<R>(t: &Tensor, f: impl FnOnce(FloatRows<'_>) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let n = l.shape().elem_count();
    let off = l.start_offset();
    let Storage::Cpu(cpu) = &*st else {
        return Err(MoeError::config("on-load quantization reads cpu tensors"));
    };
    Ok(match cpu {
        CpuStorage::F32(v) => f(FloatRows::F32(&v[off..off + n])),
        CpuStorage::BF16(v) => f(FloatRows::Bf16(&v[off..off + n])),
        CpuStorage::F16(v) => f(FloatRows::F16(&v[off..off + n])),
        _ => {
            return Err(MoeError::config(format!(
                "on-load quantization needs float weights, found {:?}",
                t.dtype()
            )))
        }
    })
}
