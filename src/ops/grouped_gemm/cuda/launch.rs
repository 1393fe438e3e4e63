//! Launching the grouped GEMM kernels (feature `cuda`): operand checks, the
//! kernel [`super::pick`]ed for the problem, and its argument list.

use super::{check_scales, pick, CudaGemmKernel as K, Problem};
use crate::cuda::{aligned16, compute_capability, i32_arg, launch, view, zeros, F32Operand};
use crate::cuda::{FP8_MMA, GEMM};
use crate::format::WeightFormat;
use crate::ops::align::AlignLayout;
use crate::ops::grouped_gemm::GroupedGemmArgs;
use crate::ops::kernel_sigs;
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
                    launch!(in FP8_MMA, sig kernel_sigs::FP8_QUANT_BYTES; dev, $name, cfg, &xv, &q, &qs, &ri, &ki, &gi);
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
                    in FP8_MMA, sig kernel_sigs::GEMM_FP8_MMA; dev, name, grid(64, 128), &q, &qs, &wv, &sv, &routing,
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
            launch!(in $module, sig kernel_sigs::GEMM; dev, $name, $cfg, &av, &wv, &sv, &routing, &bias_v,
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
                        in crate::cuda::OPS, sig kernel_sigs::GEMM_WMMA; dev, &name, cfg, &av, &wv, &routing, &bias_v, &has_bias, &wts_v,
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
