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

// Parameter kinds of the kernels' C signatures (`*` pointer, `i` int), in
// order; `launch!` holds every launch to them and a test to kernels/*.cu.
/// SIMT (`moe_gemm_f32_*`), GEMV (`moe_gemv_*`) and 64-row tensor-core
/// (`moe_gemm_tc64_*`) grouped GEMMs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SIG_GEMM: &str = "*****i*i*iiiiiiiiii";
/// 16-row WMMA (`moe_gemm_wmma_*`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SIG_WMMA: &str = "****i*i*iiiiiii";
/// FP8 tensor-core GEMM (`moe_gemm_fp8_mma_m*`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SIG_FP8_MMA: &str = "******i*i*iiiiiiiii";
/// Activations to e4m3 bytes and group scales (`moe_fp8_group_quant_bytes_*`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SIG_FP8_QUANT: &str = "***iii";

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
    use candle_core::DType;
    let (want, want_dt) = match fmt {
        WeightFormat::Fp8 { bn, bk } => {
            if bn == 0 || bk == 0 {
                candle_core::bail!("grouped gemm: fp8 block {bn}x{bk} must be positive");
            }
            (e_local * n.div_ceil(bn) * k.div_ceil(bk), DType::F32)
        }
        WeightFormat::Mxfp4 => {
            if !k.is_multiple_of(32) {
                candle_core::bail!("grouped gemm: mxfp4 needs K % 32 == 0, got {k}")
            }
            (e_local * n * k / 32, DType::U8)
        }
        _ => candle_core::bail!("grouped gemm: {} weights have no scales", fmt.name()),
    };
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
mod launch {
    use super::{check_scales, pick, CudaGemmKernel as K, Problem};
    use super::{SIG_FP8_MMA, SIG_FP8_QUANT, SIG_GEMM, SIG_WMMA};
    use crate::cuda::{aligned16, compute_capability, i32_arg, launch, view, zeros, F32Operand};
    use crate::cuda::{FP8_MMA, GEMM};
    use crate::format::WeightFormat;
    use crate::ops::align::AlignLayout;
    use crate::ops::grouped_gemm::GroupedGemmArgs;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
    use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, Tensor};
    use half::{bf16, f16};

    /// The f32 device view behind a held storage guard, or `dummy` when absent.
    fn opt_view<'a, G: std::ops::Deref<Target = Storage>>(
        g: &'a Option<(G, &Layout)>,
        dummy: &'a CudaSlice<f32>,
    ) -> Result<CudaView<'a, f32>> {
        match g {
            None => Ok(dummy.slice(..)),
            Some((st, lay)) => match &**st {
                Storage::Cuda(c) => view::<f32>(c, lay, "optional operand"),
                _ => bail!("grouped gemm: operand not on the gpu"),
            },
        }
    }

    /// An optional operand as a contiguous f32 gpu tensor of `len` elements.
    fn f32_operand(t: &Option<Tensor>, what: &str, len: usize) -> Result<Option<Tensor>> {
        let Some(t) = t else { return Ok(None) };
        if !matches!(t.device(), candle_core::Device::Cuda(_)) {
            bail!("grouped gemm: {what} must be on the gpu like the activations")
        }
        if t.elem_count() != len {
            bail!(
                "grouped gemm: {what} has {} elements, expected {len}",
                t.elem_count()
            )
        }
        Ok(Some(t.to_dtype(DType::F32)?.contiguous()?))
    }

    /// The grouped GEMM on the gpu; returns `[numel, n]` f32 and the kernel
    /// that ran.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        layout: &AlignLayout,
        args: &GroupedGemmArgs,
        requested: K,
        (sa, la): (&CudaStorage, &Layout),
        (sw, lw): (&CudaStorage, &Layout),
        (sr, lr): (&CudaStorage, &Layout),
        (e_local, n, k): (usize, usize, usize),
    ) -> Result<(CudaSlice<f32>, K)> {
        let l = layout;
        let dev = &sa.device;
        let fmt = WeightFormat::of(sw.dtype(), args.quant.as_ref()).ok_or_else(|| {
            candle_core::Error::Msg(match args.quant {
                None => format!("grouped gemm: unsupported weight dtype {:?}", sw.dtype()),
                Some(_) => format!(
                    "grouped gemm: quantized weights must be U8 (or F8E4M3 for fp8), got {:?}",
                    sw.dtype()
                ),
            })
        })?;
        if let Some(q) = &args.quant {
            check_scales(
                fmt,
                q.scales().dtype(),
                q.scales().elem_count(),
                (e_local, n, k),
            )?;
        }
        if let Some(0) = args.act_quant_group {
            bail!("grouped gemm: activation quant group size 0")
        }
        let act_f32 = sa.dtype() == DType::F32;
        let p = Problem {
            fmt,
            k,
            block_size: l.block_size,
            rows_per_expert: l.numel as f64 / l.num_experts.max(1) as f64,
            act_group: args.act_quant_group,
            // a converted or quantized activation copy starts at offset 0
            aligned: aligned16(lw, sw.dtype())
                && (!act_f32 || args.act_quant_group.is_some() || aligned16(la, DType::F32)),
            cc: compute_capability(dev)?,
        };
        let kernel = pick(requested, &p, cfg!(moe_wmma))?;

        let routing = view::<u32>(sr, lr, "routing")?;
        let bias_t = f32_operand(&args.bias, "bias", e_local * n)?;
        let wts_t = f32_operand(&args.topk_weights, "topk weights", l.numel)?;
        let dummy = zeros::<f32>(dev, 1)?;
        let bias_g = bias_t.as_ref().map(|t| t.storage_and_layout());
        let wts_g = wts_t.as_ref().map(|t| t.storage_and_layout());
        let bias_v = opt_view(&bias_g, &dummy)?;
        let wts_v = opt_view(&wts_g, &dummy)?;
        let has_bias: i32 = bias_t.is_some().into();
        let has_w: i32 = wts_t.is_some().into();
        let scales_g = args.quant.as_ref().map(|q| q.scales().storage_and_layout());
        let out = zeros::<f32>(dev, l.numel * n)?;
        // every non-empty align block lies below numel blocks
        let blocks = l.max_num_blocks.min(l.numel);
        if blocks == 0 || n == 0 || k == 0 {
            return Ok((out, kernel));
        }
        let (ni, ki) = (i32_arg(n, "N")?, i32_arg(k, "K")?);
        let row_div = i32_arg(args.row_div.max(1), "row_div")?;
        let numel = i32_arg(l.numel, "rows")?;
        let bs = i32_arg(l.block_size, "block size")?;
        let mp = i32_arg(l.max_num_tokens_padded, "padded rows")?;
        let mb = i32_arg(l.max_num_blocks, "blocks")?;
        let nl = i32_arg(e_local, "local experts")?;
        let (bn, bk) = fmt.scale_block().unwrap_or((1, 1));
        let (bni, bki) = (i32_arg(bn, "block rows")?, i32_arg(bk, "block cols")?);
        let grid = |cols: usize, threads: u32| LaunchConfig {
            grid_dim: (blocks as u32, n.div_ceil(cols) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };

        // activations: f32 (quantize-dequantized for W8A8), or e4m3 bytes +
        // scales for the FP8 tensor-core kernel
        if kernel == K::Fp8Mma {
            let (rows_a, _) = la.shape().dims2()?;
            let groups = k.div_ceil(bk);
            let q = zeros::<u8>(dev, rows_a * k)?;
            let qs = zeros::<f32>(dev, rows_a * groups)?;
            let items = rows_a * groups;
            if items > 0 {
                let cfg = LaunchConfig {
                    grid_dim: (items.div_ceil(8) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (ri, gi) = (i32_arg(rows_a, "rows")?, i32_arg(bk, "group")?);
                macro_rules! quant {
                    ($t:ty, $name:expr) => {{
                        let xv = view::<$t>(sa, la, "activations")?;
                        launch!(in FP8_MMA, sig SIG_FP8_QUANT; dev, $name, cfg, &xv, &q, &qs, &ri, &ki, &gi);
                    }};
                }
                match sa.dtype() {
                    DType::F32 => quant!(f32, "moe_fp8_group_quant_bytes_f32"),
                    DType::BF16 => quant!(bf16, "moe_fp8_group_quant_bytes_bf16"),
                    DType::F16 => quant!(f16, "moe_fp8_group_quant_bytes_f16"),
                    dt => bail!("grouped gemm: activations must be f32/bf16/f16, got {dt:?}"),
                }
            }
            let Some((sst, sl)) = &scales_g else {
                bail!("grouped gemm: fp8 weights without scales")
            };
            let Storage::Cuda(sc) = &**sst else {
                bail!("grouped gemm: weight scales must be on the gpu like the weights")
            };
            let sv = view::<f32>(sc, sl, "weight scales")?;
            let name = if l.block_size == 16 {
                "moe_gemm_fp8_mma_m16"
            } else {
                "moe_gemm_fp8_mma_m64"
            };
            macro_rules! go {
                ($t:ty) => {{
                    let wv = view::<$t>(sw, lw, "weights")?;
                    launch!(
                        in FP8_MMA, sig SIG_FP8_MMA; dev, name, grid(64, 128), &q, &qs, &wv, &sv, &routing,
                        &bias_v, &has_bias, &wts_v, &has_w, &out, &ni, &ki, &row_div, &numel,
                        &mp, &mb, &nl, &bni, &bki
                    );
                }};
            }
            if sw.dtype() == DType::U8 {
                go!(u8)
            } else {
                go!(float8::F8E4M3)
            }
            return Ok((out, kernel));
        }

        let a_dq: CudaSlice<f32>;
        let a_op: F32Operand<'_>;
        let av: CudaView<'_, f32> = match args.act_quant_group {
            Some(g) => {
                a_dq = crate::ops::act_quant::cuda_quant_dequant(sa, la, g)?;
                a_dq.slice(..)
            }
            None => {
                a_op = F32Operand::new(sa, la, "activations")?;
                a_op.view()?
            }
        };
        let sc_storage = match &scales_g {
            Some((st, sl)) => match &**st {
                Storage::Cuda(c) => Some((c, *sl)),
                _ => bail!("grouped gemm: weight scales must be on the gpu like the weights"),
            },
            None => None,
        };
        // SIMT, GEMV and tc64 share one signature; float weights get a dummy
        // scale buffer
        macro_rules! go {
            ($t:ty, $s:ty, $module:expr, $name:expr, $cfg:expr) => {{
                let wv = view::<$t>(sw, lw, "weights")?;
                let dummy_s = zeros::<$s>(dev, 1)?;
                let sv = match sc_storage {
                    Some((c, sl)) => view::<$s>(c, sl, "weight scales")?,
                    None => dummy_s.slice(..),
                };
                launch!(in $module, sig SIG_GEMM; dev, $name, $cfg, &av, &wv, &sv, &routing, &bias_v,
                    &has_bias, &wts_v, &has_w, &out, &ni, &ki, &row_div, &numel, &bs, &mp,
                    &mb, &nl, &bni, &bki);
            }};
        }
        // dispatch on the weight storage dtype
        macro_rules! by_dtype {
            ($module:expr, $name:expr, $cfg:expr) => {{
                match (fmt, sw.dtype()) {
                    (WeightFormat::F32, _) => go!(f32, u8, $module, $name, $cfg),
                    (WeightFormat::Bf16, _) => go!(bf16, u8, $module, $name, $cfg),
                    (WeightFormat::F16, _) => go!(f16, u8, $module, $name, $cfg),
                    (WeightFormat::Fp8 { .. }, DType::F8E4M3) => {
                        go!(float8::F8E4M3, f32, $module, $name, $cfg)
                    }
                    (WeightFormat::Fp8 { .. }, _) => go!(u8, f32, $module, $name, $cfg),
                    (WeightFormat::Mxfp4, _) => go!(u8, u8, $module, $name, $cfg),
                }
            }};
        }
        match kernel {
            K::Simt => {
                let name = format!("moe_gemm_f32_{}", fmt.name());
                by_dtype!(crate::cuda::OPS, &name, grid(64, 256));
            }
            K::Gemv => {
                let name = format!("moe_gemv_{}", fmt.name());
                by_dtype!(GEMM, &name, grid(16, 256));
            }
            K::Tc64 => {
                let name = format!("moe_gemm_tc64_{}", fmt.name());
                by_dtype!(GEMM, &name, grid(128, 256));
            }
            K::Wmma16 => {
                let name = format!("moe_gemm_wmma_{}", fmt.name());
                let cfg = grid(64, 128);
                macro_rules! wmma {
                    ($t:ty) => {{
                        let wv = view::<$t>(sw, lw, "weights")?;
                        launch!(
                            in crate::cuda::OPS, sig SIG_WMMA; dev, &name, cfg, &av, &wv, &routing, &bias_v, &has_bias, &wts_v,
                            &has_w, &out, &ni, &ki, &row_div, &numel, &mp, &mb, &nl
                        );
                    }};
                }
                if fmt == WeightFormat::Bf16 {
                    wmma!(bf16)
                } else {
                    wmma!(f16)
                }
            }
            K::Auto | K::Fp8Mma => bail!("grouped gemm: kernel {kernel} not dispatched"),
        }
        Ok((out, kernel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The parameter kinds of every kernel defined by `macro_name` in `file`.
    fn kernel_kinds(file: &str, macro_name: &str) -> String {
        let path = format!("{}/kernels/{file}", env!("CARGO_MANIFEST_DIR"));
        let src = std::fs::read_to_string(&path).unwrap();
        let def = src
            .find(&format!("#define {macro_name}("))
            .unwrap_or_else(|| panic!("{file}: no macro {macro_name}"));
        let body = &src[def..];
        let open = body.find("NAME(").unwrap() + "NAME(".len();
        let close = open + body[open..].find(')').unwrap();
        body[open..close]
            .split(',')
            .map(|p| if p.contains('*') { '*' } else { 'i' })
            .collect()
    }

    #[test]
    fn launch_signatures_match_the_kernels() {
        for (file, mac) in [
            ("moe_ops.cu", "GG"),
            ("moe_gemm.cu", "GV"),
            ("moe_gemm.cu", "TC"),
        ] {
            assert_eq!(kernel_kinds(file, mac), SIG_GEMM, "{file} {mac}");
        }
        assert_eq!(kernel_kinds("moe_ops.cu", "GGW"), SIG_WMMA);
        assert_eq!(kernel_kinds("moe_fp8_mma.cu", "F8"), SIG_FP8_MMA);
        assert_eq!(kernel_kinds("moe_fp8_mma.cu", "FQB"), SIG_FP8_QUANT);
    }

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
