//! The CUDA grouped GEMM: which kernel runs a problem, and its launch.
//!
//! As vLLM's `get_default_config` picks tiles by M, the align block size is
//! picked by rows per expert ([`align_block_size`]) and the kernel by block
//! size, rows and weight format ([`CudaGemmKernel::Auto`]):
//! - blocks of 16 rows (decode, `M·top_k ≤ 8·E`): the GEMV (`moe_gemv_*`)
//!   streams each routed expert's weights once, packed, for all the rows of
//!   its block; float weights with more than 4 rows per expert on average go
//!   to the 16-row WMMA kernel instead.
//! - blocks of 64 rows (prefill): FP8 W8A8 on FP8 tensor cores on sm_89+
//!   (`moe_gemm_fp8_mma_*`), everything else but f32 on the 64×128 WMMA
//!   kernel (`moe_gemm_tc64_*`, weights decoded to bf16/f16 in the tile).
//! - anything else (f32 weights, odd K, unaligned views): the SIMT kernel.

use std::fmt;

/// Which CUDA kernel runs a grouped GEMM; the CPU ignores it. `Auto` picks as
/// the module doc says (the environment variable `CANDLE_MOE_CUDA_GEMM`,
/// set to one of the other names, overrides it); the others force one kernel
/// and fail with an error saying why when it cannot run the problem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CudaGemmKernel {
    #[default]
    Auto,
    /// f32 SIMT tiles, any format, blocks of up to 64 rows.
    Simt,
    /// Decode GEMV, any format, blocks of up to 16 rows.
    Gemv,
    /// WMMA m16n16k16 on 16-row blocks, bf16 / f16 weights (sm_80+).
    Wmma16,
    /// WMMA on 64-row blocks, 64×128 tiles; bf16 / f16 / FP8 / MXFP4 weights
    /// (sm_80+).
    Tc64,
    /// FP8 W8A8 on FP8 tensor cores (sm_89+), blocks of 16 or 64 rows.
    Fp8Mma,
}

impl CudaGemmKernel {
    pub const ALL: [Self; 5] = [
        Self::Simt,
        Self::Gemv,
        Self::Wmma16,
        Self::Tc64,
        Self::Fp8Mma,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Simt => "simt",
            Self::Gemv => "gemv",
            Self::Wmma16 => "wmma16",
            Self::Tc64 => "tc64",
            Self::Fp8Mma => "fp8mma",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Auto]
            .into_iter()
            .chain(Self::ALL)
            .find(|k| k.name() == s)
    }

    /// The kernel `CANDLE_MOE_CUDA_GEMM` names (read once), if any.
    pub fn from_env() -> candle_core::Result<Option<Self>> {
        static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let v = ENV.get_or_init(|| std::env::var("CANDLE_MOE_CUDA_GEMM").ok());
        match v.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => Self::from_name(s).map(Some).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "CANDLE_MOE_CUDA_GEMM={s}: expected one of auto, simt, gemv, wmma16, tc64, fp8mma"
                ))
            }),
        }
    }
}

impl fmt::Display for CudaGemmKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

use crate::format::WeightFormat;
use candle_core::Result;
use CudaGemmKernel as K;

/// What the kernel choice depends on.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Problem {
    pub fmt: WeightFormat,
    pub k: usize,
    pub block_size: usize,
    /// routed rows per expert, on average over all (global) experts
    pub rows_per_expert: f64,
    pub act_group: Option<usize>,
    /// weights and activations start 16-byte aligned
    pub aligned: bool,
    pub cc: (i32, i32),
}

/// Why `kernel` cannot run `p`, or `None` when it can.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn unfit(kernel: K, p: &Problem, wmma_built: bool) -> Option<String> {
    let wmma = wmma_built && p.cc >= (8, 0);
    let bs = p.block_size;
    match kernel {
        K::Auto => Some("auto is not a kernel".into()),
        K::Simt => (bs > 64).then(|| format!("align block size {bs} > 64")),
        K::Gemv => {
            if bs > 16 {
                Some(format!("align block size {bs} > 16"))
            } else if !p.k.is_multiple_of(p.fmt.elems_per_16_bytes()) {
                Some(format!(
                    "K = {} is not a multiple of {}",
                    p.k,
                    p.fmt.elems_per_16_bytes()
                ))
            } else if !p.aligned {
                Some("operands not 16-byte aligned".into())
            } else if let WeightFormat::Fp8 { bk, .. } = p.fmt {
                (!bk.is_multiple_of(16)).then(|| format!("fp8 block k {bk} % 16 != 0"))
            } else {
                None
            }
        }
        K::Wmma16 => {
            if !wmma {
                Some("needs sm_80+ (build and device)".into())
            } else if bs != 16 {
                Some(format!("align block size {bs} != 16"))
            } else if !matches!(p.fmt, WeightFormat::Bf16 | WeightFormat::F16) {
                Some(format!("{} weights", p.fmt.name()))
            } else {
                None
            }
        }
        K::Tc64 => {
            if !wmma {
                Some("needs sm_80+ (build and device)".into())
            } else if bs != 64 {
                Some(format!("align block size {bs} != 64"))
            } else if p.fmt == WeightFormat::F32 {
                Some("f32 weights".into())
            } else if !p.k.is_multiple_of(8) {
                Some(format!("K = {} is not a multiple of 8", p.k))
            } else if !p.aligned {
                Some("operands not 16-byte aligned".into())
            } else if let WeightFormat::Fp8 { bn, bk } = p.fmt {
                (!bn.is_multiple_of(32) || !bk.is_multiple_of(32))
                    .then(|| format!("fp8 block {bn}x{bk} not a multiple of 32"))
            } else {
                None
            }
        }
        K::Fp8Mma => {
            let WeightFormat::Fp8 { bk, .. } = p.fmt else {
                return Some(format!("{} weights", p.fmt.name()));
            };
            if p.cc < (8, 9) {
                Some(format!("needs sm_89+, device is sm_{}{}", p.cc.0, p.cc.1))
            } else if p.act_group != Some(bk) {
                Some(format!(
                    "needs fp8 activations in groups of the weight block k {bk} (W8A8), have {:?}",
                    p.act_group
                ))
            } else if !bk.is_multiple_of(64) {
                Some(format!("fp8 block k {bk} % 64 != 0"))
            } else if bs != 16 && bs != 64 {
                Some(format!("align block size {bs} is neither 16 nor 64"))
            } else if !p.k.is_multiple_of(16) {
                Some(format!("K = {} is not a multiple of 16", p.k))
            } else if !p.aligned {
                Some("operands not 16-byte aligned".into())
            } else {
                None
            }
        }
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn pick(requested: K, p: &Problem, wmma_built: bool) -> Result<K> {
    let requested = match requested {
        K::Auto => K::from_env()?.unwrap_or(K::Auto),
        k => k,
    };
    if requested != K::Auto {
        return match unfit(requested, p, wmma_built) {
            None => Ok(requested),
            Some(why) => {
                candle_core::bail!(
                    "grouped gemm: the {requested} kernel cannot run this problem: {why}"
                )
            }
        };
    }
    let order: &[K] = if p.block_size <= 16 {
        if p.fmt.is_float() && p.rows_per_expert > 4.0 {
            &[K::Wmma16, K::Gemv, K::Simt]
        } else {
            &[K::Gemv, K::Simt]
        }
    } else {
        &[K::Fp8Mma, K::Tc64, K::Simt]
    };
    for &k in order {
        if unfit(k, p, wmma_built).is_none() {
            return Ok(k);
        }
    }
    candle_core::bail!(
        "grouped gemm on cuda: no kernel for align block size {} (at most 64)",
        p.block_size
    )
}

/// Packed weights' scales must cover `[e_local, n, k]` exactly, in the dtype
/// of their format: the kernels index them unchecked.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn check_scales(
    fmt: WeightFormat,
    dtype: candle_core::DType,
    count: usize,
    (e_local, n, k): (usize, usize, usize),
) -> Result<()> {
    match fmt {
        WeightFormat::Fp8 { bn, bk } if bn == 0 || bk == 0 => {
            candle_core::bail!("grouped gemm: fp8 block {bn}x{bk} must be positive")
        }
        WeightFormat::Mxfp4 if !k.is_multiple_of(32) => {
            candle_core::bail!("grouped gemm: mxfp4 needs K % 32 == 0, got {k}")
        }
        _ => {}
    }
    let Some(want_dt) = fmt.scale_dtype() else {
        candle_core::bail!("grouped gemm: {} weights have no scales", fmt.name())
    };
    let want = e_local * fmt.scales_per_matrix(n, k);
    if count != want || dtype != want_dt {
        candle_core::bail!(
            "grouped gemm: {} scales are {dtype:?} x {count}, expected {want_dt:?} x {want} for [{e_local}, {n}, {k}]",
            fmt.name()
        )
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub(crate) use launch::run;

#[cfg(feature = "cuda")]
mod launch;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn problem(fmt: WeightFormat, block_size: usize, rows_per_expert: f64) -> Problem {
        Problem {
            fmt,
            k: 2048,
            block_size,
            rows_per_expert,
            act_group: None,
            aligned: true,
            cc: (9, 0),
        }
    }

    #[test]
    fn kernel_choice() {
        let fp8 = WeightFormat::Fp8 { bn: 128, bk: 128 };
        let pick_auto = |p: &Problem, wmma| pick(K::Auto, p, wmma).unwrap();
        // decode: the GEMV, float weights with many rows per expert on WMMA
        assert_eq!(
            pick_auto(&problem(WeightFormat::Bf16, 16, 1.0), true),
            K::Gemv
        );
        assert_eq!(
            pick_auto(&problem(WeightFormat::Bf16, 16, 6.0), true),
            K::Wmma16
        );
        assert_eq!(
            pick_auto(&problem(WeightFormat::Bf16, 16, 6.0), false),
            K::Gemv
        );
        assert_eq!(pick_auto(&problem(fp8, 16, 6.0), true), K::Gemv);
        // prefill: FP8 W8A8 on FP8 tensor cores from sm_89, tc64 below
        let mut p = problem(fp8, 64, 40.0);
        p.act_group = Some(128);
        assert_eq!(pick_auto(&p, true), K::Fp8Mma);
        p.cc = (8, 0);
        assert_eq!(pick_auto(&p, true), K::Tc64);
        p.cc = (7, 5);
        assert_eq!(pick_auto(&p, true), K::Simt);
        assert_eq!(pick_auto(&problem(fp8, 64, 40.0), true), K::Tc64);
        assert_eq!(
            pick_auto(&problem(WeightFormat::Mxfp4, 64, 40.0), true),
            K::Tc64
        );
        assert_eq!(
            pick_auto(&problem(WeightFormat::F32, 64, 40.0), true),
            K::Simt
        );
        // odd K or unaligned operands fall back to SIMT
        let mut p = problem(WeightFormat::Bf16, 16, 1.0);
        p.k = 2047;
        assert_eq!(pick_auto(&p, true), K::Simt);
        let mut p = problem(WeightFormat::Bf16, 64, 40.0);
        p.aligned = false;
        assert_eq!(pick_auto(&p, true), K::Simt);
        // a forced kernel that cannot run says why
        let err = pick(K::Gemv, &problem(WeightFormat::Bf16, 64, 40.0), true).unwrap_err();
        assert!(err
            .to_string()
            .contains("cannot run this problem: align block size 64 > 16"));
        let err = pick(K::Fp8Mma, &problem(fp8, 64, 40.0), true).unwrap_err();
        assert!(err.to_string().contains("W8A8"), "{err}");
        assert!(pick(K::Simt, &problem(WeightFormat::Bf16, 128, 1.0), true).is_err());
    }

    #[test]
    fn scale_checks() {
        let fp8 = WeightFormat::Fp8 { bn: 128, bk: 128 };
        // [4, 256, 300]: 2 × 3 blocks per expert
        assert!(check_scales(fp8, DType::F32, 4 * 2 * 3, (4, 256, 300)).is_ok());
        assert!(check_scales(fp8, DType::F32, 4 * 2 * 3 - 1, (4, 256, 300)).is_err());
        assert!(check_scales(fp8, DType::U8, 4 * 2 * 3, (4, 256, 300)).is_err());
        let zero = WeightFormat::Fp8 { bn: 0, bk: 128 };
        assert!(check_scales(zero, DType::F32, 0, (4, 256, 300)).is_err());
        let mx = WeightFormat::Mxfp4;
        assert!(check_scales(mx, DType::U8, 4 * 256 * 2, (4, 256, 64)).is_ok());
        assert!(check_scales(mx, DType::F32, 4 * 256 * 2, (4, 256, 64)).is_err());
        let err = check_scales(mx, DType::U8, 4 * 256, (4, 256, 48)).unwrap_err();
        assert!(err.to_string().contains("K % 32"), "{err}");
        assert!(check_scales(WeightFormat::Bf16, DType::F32, 1, (1, 1, 1)).is_err());
    }
}
