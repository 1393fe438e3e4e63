//! Weighted top-k reduction: `out[t] = Σ_j w[t, j] · y[t·k + j]`, the
//! "contiguous" weight-and-reduce of the modular kernel (vLLM `moe_sum` when
//! the weights were already applied).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

#[derive(Clone, Debug)]
struct WeightedSum {
    top_k: usize,
    out_dtype: DType,
}

impl WeightedSum {
    fn run(&self, y: &[f32], l: &Layout, w: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (rows, h) = l.shape().dims2()?;
        let k = self.top_k;
        if k == 0 || rows % k != 0 {
            bail!("moe_weighted_sum: {rows} rows is not a multiple of top_k {k}")
        }
        let t = rows / k;
        if let Some(w) = w {
            if w.len() != rows {
                bail!("moe_weighted_sum: {} weights for {rows} rows", w.len())
            }
        }
        let mut out = vec![0f32; t * h];
        if h > 0 {
            super::for_chunks(&mut out, h, |ti, o| {
                for j in 0..k {
                    let r = ti * k + j;
                    let wt = w.map_or(1.0, |w| w[r]);
                    let yr = &y[r * h..(r + 1) * h];
                    o.iter_mut().zip(yr).for_each(|(o, y)| *o += wt * y);
                }
            });
        }
        Ok((
            super::f32_to_storage(out, self.out_dtype, "moe_weighted_sum")?,
            Shape::from((t, h)),
        ))
    }
}

#[cfg(feature = "cuda")]
impl WeightedSum {
    fn cuda_run(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        w: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{elementwise, i32_arg, launch, zeros, F32Operand};
        use candle_core::CudaStorage;
        use half::{bf16, f16};
        let (rows, h) = l.shape().dims2()?;
        let k = self.top_k;
        if k == 0 || rows % k != 0 {
            bail!("moe_weighted_sum: {rows} rows is not a multiple of top_k {k}")
        }
        let t = rows / k;
        let dev = &s.device;
        let y = F32Operand::new(s, l, "expert output")?;
        let yv = y.view()?;
        let dummy = zeros::<f32>(dev, 1)?;
        let wop = match w {
            Some((ws, wl)) => {
                if wl.shape().elem_count() != rows {
                    bail!(
                        "moe_weighted_sum: {} weights for {rows} rows",
                        wl.shape().elem_count()
                    )
                }
                Some(F32Operand::new(ws, wl, "topk weights")?)
            }
            None => None,
        };
        let has_w: i32 = wop.is_some().into();
        let wv = match &wop {
            Some(w) => w.view()?,
            None => dummy.slice(..),
        };
        let (ti, ki, hi) = (
            i32_arg(t, "tokens")?,
            i32_arg(k, "top_k")?,
            i32_arg(h, "hidden")?,
        );
        let cfg = elementwise(t * h);
        let out = match self.out_dtype {
            DType::F32 => {
                let o = zeros::<f32>(dev, t * h)?;
                launch!(
                sig crate::ops::kernel_sigs::WEIGHTED_SUM;
                dev,
                "moe_weighted_sum_f32",
                        cfg,
                        &yv,
                        &wv,
                        &has_w,
                        &o,
                        &ti,
                        &ki,
                        &hi
                    );
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            }
            DType::BF16 => {
                let o = zeros::<bf16>(dev, t * h)?;
                launch!(
                sig crate::ops::kernel_sigs::WEIGHTED_SUM;
                dev,
                "moe_weighted_sum_bf16",
                        cfg,
                        &yv,
                        &wv,
                        &has_w,
                        &o,
                        &ti,
                        &ki,
                        &hi
                    );
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            }
            DType::F16 => {
                let o = zeros::<f16>(dev, t * h)?;
                launch!(
                sig crate::ops::kernel_sigs::WEIGHTED_SUM;
                dev,
                "moe_weighted_sum_f16",
                        cfg,
                        &yv,
                        &wv,
                        &has_w,
                        &o,
                        &ti,
                        &ki,
                        &hi
                    );
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            }
            dt => bail!("moe_weighted_sum: unsupported output dtype {dt:?}"),
        };
        Ok((out, Shape::from((t, h))))
    }
}

impl CustomOp1 for WeightedSum {
    fn name(&self) -> &'static str {
        "moe-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = super::to_f32_cow(s, l, "expert output")?;
        self.run(&y, l, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(s, l, None)
    }
}

impl CustomOp2 for WeightedSum {
    fn name(&self) -> &'static str {
        "moe-weighted-sum"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = super::to_f32_cow(s, l, "expert output")?;
        let w = super::to_f32_cow(sw, lw, "topk weights")?;
        self.run(&y, l, Some(&w))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(s, l, Some((sw, lw)))
    }
}

/// Reduces `expert_out` (`[T·k, H]`) over the k slots of each token, weighting
/// by `topk_weights` (`[T, k]`) when given; returns `[T, H]` in `out_dtype`.
pub fn moe_weighted_sum(
    expert_out: &Tensor,
    topk_weights: Option<&Tensor>,
    top_k: usize,
    out_dtype: DType,
) -> Result<Tensor> {
    let op = WeightedSum { top_k, out_dtype };
    match topk_weights {
        None => expert_out.apply_op1_no_bwd(&op),
        Some(w) => expert_out.apply_op2_no_bwd(w, &op),
    }
}
