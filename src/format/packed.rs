//! The packed weight formats' tensors and views, and how activations are
//! quantized next to them.

use super::fp8::E4M3_LUT;
use super::mxfp4::{e2m1_to_f32, e8m0_to_f32, MX_GROUP};
use candle_core::{DType, Tensor};

/// What one scale covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Strategy {
    /// `bn × bk` blocks (rows × columns).
    Block(usize, usize),
    /// One scale per output row.
    Channel,
    /// One scale per matrix.
    Tensor,
}

impl Fp8Strategy {
    /// The `(bn, bk)` block of an `[n, k]` matrix.
    pub fn block(self, n: usize, k: usize) -> (usize, usize) {
        match self {
            Self::Block(bn, bk) => (bn, bk),
            Self::Channel => (1, k.max(1)),
            Self::Tensor => (n.max(1), k.max(1)),
        }
    }
}

/// How the inputs of both expert GEMMs are quantized on the fly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    /// Dynamic FP8 e4m3, one scale per token per `group` columns (W8A8).
    Fp8PerTokenGroup { group: usize },
}

/// Packed weights' format with their scales, as tensors: what an op is
/// given next to the `[E, N, K·]` weight tensor (read packed, never
/// dequantized as a whole).
#[derive(Clone, Debug)]
pub enum PackedWeights {
    /// `w`: e4m3 bytes (U8 or F8E4M3) `[E, N, K]`; `scales`: F32
    /// `[E, ceil(N/bn), ceil(K/bk)]` with `block = (bn, bk)`.
    Fp8 {
        scales: Tensor,
        block: (usize, usize),
    },
    /// `w`: U8 `[E, N, K/2]` (two e2m1 per byte, low nibble first);
    /// `scales`: U8 e8m0 `[E, N, K/32]`.
    Mxfp4 { scales: Tensor },
}

impl PackedWeights {
    pub fn scales(&self) -> &Tensor {
        match self {
            Self::Fp8 { scales, .. } | Self::Mxfp4 { scales } => scales,
        }
    }
    /// K of a weight tensor whose last dimension is `kw`.
    pub fn k_of(&self, kw: usize) -> usize {
        match self {
            Self::Fp8 { .. } => kw,
            Self::Mxfp4 { .. } => 2 * kw,
        }
    }
}

/// A weight format as the kernels see it: float in its dtype, or packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    F16,
    /// e4m3 bytes, one f32 scale per `bn × bk` block.
    Fp8 {
        bn: usize,
        bk: usize,
    },
    /// e2m1 pairs per byte, one e8m0 scale per 32 elements of a row.
    Mxfp4,
}

impl WeightFormat {
    /// Scales of one `[n, k]` matrix (0 for float formats).
    pub fn scales_per_matrix(self, n: usize, k: usize) -> usize {
        match self {
            Self::Fp8 { bn, bk } => n.div_ceil(bn.max(1)) * k.div_ceil(bk.max(1)),
            Self::Mxfp4 => n * k / MX_GROUP,
            _ => 0,
        }
    }

    /// The dtype its scales are stored in (`None` for float formats).
    pub fn scale_dtype(self) -> Option<DType> {
        match self {
            Self::Fp8 { .. } => Some(DType::F32),
            Self::Mxfp4 => Some(DType::U8),
            _ => None,
        }
    }

    /// The format of weights stored as `dtype`, packed as `packed` says;
    /// `None` for a combination no kernel reads.
    pub fn of(dtype: DType, packed: Option<&PackedWeights>) -> Option<Self> {
        match (packed, dtype) {
            (None, DType::F32) => Some(Self::F32),
            (None, DType::BF16) => Some(Self::Bf16),
            (None, DType::F16) => Some(Self::F16),
            (Some(PackedWeights::Fp8 { block, .. }), DType::U8 | DType::F8E4M3) => {
                Some(Self::Fp8 {
                    bn: block.0,
                    bk: block.1,
                })
            }
            (Some(PackedWeights::Mxfp4 { .. }), DType::U8) => Some(Self::Mxfp4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Fp8 { .. } => "fp8",
            Self::Mxfp4 => "mxfp4",
        }
    }

    /// Elements in 16 bytes of a weight row.
    pub fn elems_per_16_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 8,
            Self::Fp8 { .. } => 16,
            Self::Mxfp4 => 32,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::Bf16 | Self::F16)
    }

    /// The `(rows, columns)` one scale covers (`None` for float formats).
    pub fn scale_block(self) -> Option<(usize, usize)> {
        match self {
            Self::Fp8 { bn, bk } => Some((bn, bk)),
            Self::Mxfp4 => Some((1, MX_GROUP)),
            _ => None,
        }
    }
}

/// One expert's packed weight matrix `[n, k]`, borrowed: what the CPU
/// kernels read.
#[derive(Clone, Copy, Debug)]
pub enum PackedMat<'a> {
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

impl PackedMat<'_> {
    pub fn format(&self) -> WeightFormat {
        match *self {
            Self::Fp8 { bn, bk, .. } => WeightFormat::Fp8 { bn, bk },
            Self::Mxfp4 { .. } => WeightFormat::Mxfp4,
        }
    }

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
    pub fn decode_scalar(&self, n: usize, k0: usize, out: &mut [f32]) {
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
                    let s = e8m0_to_f32(scales[(n * k + c) / MX_GROUP]);
                    *o = e2m1_to_f32(nib) * s;
                }
            }
        }
    }

    /// Checks that `n` rows of this matrix are in bounds and that the CPU
    /// kernels can run it; returns a reason if not.
    pub fn check(&self, n: usize) -> Result<(), String> {
        match *self {
            PackedMat::Fp8 {
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
                if q.len() < n * k || scales.len() < self.format().scales_per_matrix(n, k) {
                    return Err("fp8 weights or scales too short".into());
                }
            }
            PackedMat::Mxfp4 { q, scales, k } => {
                if !k.is_multiple_of(MX_GROUP) {
                    return Err(format!("mxfp4 needs K ({k}) to be a multiple of 32"));
                }
                if q.len() < n * k / 2 || scales.len() < self.format().scales_per_matrix(n, k) {
                    return Err("mxfp4 weights or scales too short".into());
                }
            }
        }
        Ok(())
    }
}
