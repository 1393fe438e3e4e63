//! Dynamic per-token-group FP8 activation quantization (vLLM
//! `per_token_group_quant_fp8`, compressed-tensors dynamic `group`), applied
//! as quantize-dequantize: the following GEMM then computes exactly the
//! W8A8 product `Σ q_a·s_a · q_w·s_w`, accumulated in f32.

use crate::format::fp8::fake_quant_fp8_groups;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[derive(Clone, Debug)]
struct Fp8GroupQuant {
    group: usize,
}

impl CustomOp1 for Fp8GroupQuant {
    fn name(&self) -> &'static str {
        "fp8-per-token-group-quant"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let Some(&k) = dims.last() else {
            bail!("fp8 group quant: scalar input")
        };
        if self.group == 0 {
            bail!("fp8 group quant: group size 0")
        }
        let mut x = super::to_f32_cow(s, l, "activations")?.into_owned();
        if k > 0 {
            super::for_chunks(&mut x, k, |_, row| fake_quant_fp8_groups(row, self.group));
        }
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda_quant_dequant(s, l, self.group)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

/// The CUDA quantize-dequantize of `s` (rows of its last dimension), F32.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_quant_dequant(
    s: &candle_core::CudaStorage,
    l: &Layout,
    group: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
    use crate::cuda::{i32_arg, launch, zeros, F32Operand};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    let dims = l.shape().dims();
    let Some(&k) = dims.last() else {
        bail!("fp8 group quant: scalar input")
    };
    if group == 0 {
        bail!("fp8 group quant: group size 0")
    }
    let n = l.shape().elem_count();
    let rows = n.checked_div(k).unwrap_or(0);
    let group = group.min(k.max(1));
    let dev = &s.device;
    let x = F32Operand::new(s, l, "activations")?;
    let xv = x.view()?;
    let out = zeros::<f32>(dev, n)?;
    let items = rows * k.div_ceil(group);
    if items > 0 {
        // 8 warps per block, one warp per (row, group)
        let cfg = LaunchConfig {
            grid_dim: (items.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, ki, gi) = (
            i32_arg(rows, "rows")?,
            i32_arg(k, "cols")?,
            i32_arg(group, "group")?,
        );
        launch!(
            sig crate::ops::kernel_sigs::FP8_GROUP_QUANT;
            dev,
            "moe_fp8_group_quant_f32",
            cfg,
            &xv,
            &out,
            &ri,
            &ki,
            &gi
        );
    }
    Ok(out)
}

/// Quantizes each `group` consecutive values of every row of `x` to e4m3 with
/// their own scale `max(amax, 1e-10) / 448` and returns the dequantized F32.
pub fn fp8_group_quant_dequant(x: &Tensor, group: usize) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Fp8GroupQuant { group })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn groups_are_quantized_independently() -> Result<()> {
        // one group holds 448 and a value that is not an e4m3 number; the other
        // group's scale is tiny, so its values survive on their own grid
        let x = Tensor::new(&[[448f32, 1.3, 0.001, 0.0017]], &Device::Cpu)?;
        let y = fp8_group_quant_dequant(&x, 2)?.to_vec2::<f32>()?;
        assert_eq!(y[0][0], 448.0);
        assert_eq!(y[0][1], 1.25); // 1.3 → nearest e4m3 at scale 1
        let s = 0.0017f32 / 448.0;
        let q =
            |v: f32| crate::format::fp8::e4m3_to_f32(crate::format::fp8::f32_to_e4m3(v / s)) * s;
        assert_eq!(y[0][2], q(0.001));
        assert!((y[0][3] - 0.0017).abs() < 1e-9);
        Ok(())
    }
}
