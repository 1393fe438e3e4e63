//! Router top-k: expert selection (softmax or sigmoid scores, optional
//! correction bias, optional grouped top-k) and the routing weights of the
//! selected experts. Ties go to the lower expert index, as in vLLM.

use super::contiguous;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScoringFunc {
    #[default]
    Softmax,
    Sigmoid,
}

impl std::str::FromStr for ScoringFunc {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            o => Err(format!(
                "unknown scoring function `{o}` (softmax | sigmoid)"
            )),
        }
    }
}

/// Scores of one row of logits, in f32.
fn scores_into(logits: &[f32], scoring: ScoringFunc, out: &mut [f32]) {
    match scoring {
        ScoringFunc::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &l) in out.iter_mut().zip(logits) {
                *o = (l - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            out.iter_mut().for_each(|o| *o *= inv);
        }
        ScoringFunc::Sigmoid => {
            for (o, &l) in out.iter_mut().zip(logits) {
                *o = 1.0 / (1.0 + (-l).exp());
            }
        }
    }
}

/// Index of the largest value among candidates; ties → lower index.
fn argmax_where(vals: &[f32], mut ok: impl FnMut(usize) -> bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in vals.iter().enumerate() {
        if !ok(i) {
            continue;
        }
        match best {
            None => best = Some(i),
            Some(b) if v > vals[b] => best = Some(i),
            _ => {}
        }
    }
    best
}

fn logits_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(super::to_f32_cow(s, l, "router logits")?.into_owned())
}

fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.shape().dims() {
        &[t, e] => Ok((t, e)),
        d => bail!("{what} must be 2-D [tokens, experts], got {d:?}"),
    }
}

/// Selects `top_k` expert ids per token (U32 `[T, top_k]`).
#[derive(Clone, Debug)]
pub struct TopKSelect {
    pub top_k: usize,
    pub scoring: ScoringFunc,
    /// 1 = plain top-k.
    pub num_expert_group: usize,
    pub topk_group: usize,
}

impl TopKSelect {
    fn validate(&self, e: usize) -> Result<()> {
        if self.top_k == 0 || self.top_k > e {
            bail!("top_k {} must be in 1..={e}", self.top_k)
        }
        let g = self.num_expert_group.max(1);
        if g > 1 {
            if !e.is_multiple_of(g) {
                bail!("{e} experts cannot be split into {g} groups")
            }
            if self.topk_group == 0 || self.topk_group > g {
                bail!("topk_group {} must be in 1..={g}", self.topk_group)
            }
            if self.top_k > self.topk_group * (e / g) {
                bail!(
                    "top_k {} exceeds the experts of the {} selected groups",
                    self.top_k,
                    self.topk_group
                )
            }
        }
        Ok(())
    }

    fn run(&self, logits: &[f32], bias: Option<&[f32]>, t: usize, e: usize) -> Vec<u32> {
        let k = self.top_k;
        let g = self.num_expert_group.max(1);
        let mut ids = vec![0u32; t * k];
        let work = |(row, out): (usize, &mut [u32])| {
            let mut sel = vec![0f32; e];
            scores_into(&logits[row * e..(row + 1) * e], self.scoring, &mut sel);
            if let Some(b) = bias {
                sel.iter_mut().zip(b).for_each(|(s, b)| *s += b);
            }
            let mut allowed = vec![true; e];
            if g > 1 {
                let per = e / g;
                let gscore: Vec<f32> = sel
                    .chunks(per)
                    .map(|c| {
                        if bias.is_some() {
                            // sum of the two best, as DeepSeek-V3 / vLLM do with a bias
                            let a = argmax_where(c, |_| true).unwrap_or(0);
                            let b = argmax_where(c, |i| i != a);
                            c[a] + b.map_or(0.0, |b| c[b])
                        } else {
                            c.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                        }
                    })
                    .collect();
                let mut gsel = vec![false; g];
                for _ in 0..self.topk_group {
                    if let Some(i) = argmax_where(&gscore, |i| !gsel[i]) {
                        gsel[i] = true;
                    }
                }
                for (i, a) in allowed.iter_mut().enumerate() {
                    *a = gsel[i / per];
                }
            }
            for slot in out.iter_mut() {
                // validate() guarantees enough allowed experts
                let i = argmax_where(&sel, |i| allowed[i]).unwrap_or(0);
                allowed[i] = false;
                *slot = i as u32;
            }
        };
        if t >= 64 {
            ids.par_chunks_mut(k).enumerate().for_each(work);
        } else {
            ids.chunks_mut(k).enumerate().for_each(work);
        }
        ids
    }
}

#[cfg(feature = "cuda")]
impl TopKSelect {
    fn cuda_run(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        bias: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{i32_arg, launch, zeros, F32Operand};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (t, e) = dims2(l, "router logits")?;
        self.validate(e)?;
        let g = self.num_expert_group.max(1);
        if g > 64 {
            bail!("grouped top-k on cuda supports at most 64 groups, got {g}")
        }
        let dev = &s.device;
        let x = F32Operand::new(s, l, "router logits")?;
        let xv = x.view()?;
        let dummy = zeros::<f32>(dev, 1)?;
        let b = match bias {
            Some((bs, bl)) => {
                if bl.shape().dims() != [e] {
                    bail!(
                        "e_score_correction_bias must be [{e}], got {:?}",
                        bl.shape().dims()
                    )
                }
                Some(F32Operand::new(bs, bl, "e_score_correction_bias")?)
            }
            None => None,
        };
        let has_bias: i32 = b.is_some().into();
        let bv = match &b {
            Some(b) => b.view()?,
            None => dummy.slice(..),
        };
        let ids = zeros::<u32>(dev, t * self.top_k)?;
        if t > 0 {
            // one warp per token; each warp keeps its scores in shared memory
            let per_warp = (e + g) * 4;
            let warps = (40_000 / per_warp).clamp(1, 4);
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(warps) as u32, 1, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: (warps * per_warp) as u32,
            };
            if per_warp > 48 * 1024 {
                bail!("{e} experts exceed the top-k kernel's shared memory")
            }
            let sigmoid: i32 = (self.scoring == ScoringFunc::Sigmoid).into();
            let (ti, ei, ki) = (
                i32_arg(t, "tokens")?,
                i32_arg(e, "experts")?,
                i32_arg(self.top_k, "top_k")?,
            );
            let (gi, tg) = (g as i32, i32_arg(self.topk_group.max(1), "topk_group")?);
            launch!(
            sig crate::ops::kernel_sigs::TOPK;
            dev,
            "moe_topk_select_f32",
                cfg,
                &xv,
                &bv,
                &has_bias,
                &ids,
                &ti,
                &ei,
                &ki,
                &sigmoid,
                &gi,
                &tg
            );
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(ids, dev.clone()),
            Shape::from((t, self.top_k)),
        ))
    }
}

impl CustomOp1 for TopKSelect {
    fn name(&self) -> &'static str {
        "moe-topk-select"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, e) = dims2(l, "router logits")?;
        self.validate(e)?;
        let logits = logits_f32(s, l)?;
        let ids = self.run(&logits, None, t, e);
        Ok((CpuStorage::U32(ids), Shape::from((t, self.top_k))))
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

impl CustomOp2 for TopKSelect {
    fn name(&self) -> &'static str {
        "moe-topk-select-bias"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, e) = dims2(l, "router logits")?;
        self.validate(e)?;
        if lb.shape().dims() != [e] {
            bail!(
                "e_score_correction_bias must be [{e}], got {:?}",
                lb.shape().dims()
            )
        }
        let logits = logits_f32(s, l)?;
        let bias = super::to_f32_cow(sb, lb, "e_score_correction_bias")?;
        let ids = self.run(&logits, Some(&bias), t, e);
        Ok((CpuStorage::U32(ids), Shape::from((t, self.top_k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(s, l, Some((sb, lb)))
    }
}

/// Routing weights (F32 `[T, top_k]`) of the selected experts: their scores
/// (without any correction bias), renormalised if asked, times the scaling factor.
#[derive(Clone, Debug)]
pub struct RouterWeights {
    pub scoring: ScoringFunc,
    pub renormalize: bool,
    pub scaling: f32,
}

impl CustomOp2 for RouterWeights {
    fn name(&self) -> &'static str {
        "moe-router-weights"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, e) = dims2(l, "router logits")?;
        let (ti, k) = dims2(li, "topk ids")?;
        if ti != t {
            bail!("topk ids have {ti} rows, logits {t}")
        }
        let logits = logits_f32(s, l)?;
        let ids = contiguous::<u32>(si, li, "topk ids")?;
        let mut w = vec![0f32; t * k];
        let work = |(row, out): (usize, &mut [f32])| -> Result<()> {
            let lr = &logits[row * e..(row + 1) * e];
            let (max, inv) = match self.scoring {
                ScoringFunc::Softmax => {
                    let max = lr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = lr.iter().map(|&v| (v - max).exp()).sum();
                    (max, 1.0 / sum)
                }
                ScoringFunc::Sigmoid => (0.0, 1.0),
            };
            for (o, &id) in out.iter_mut().zip(&ids[row * k..(row + 1) * k]) {
                let Some(&v) = lr.get(id as usize) else {
                    bail!("expert id {id} out of range for {e} experts")
                };
                *o = match self.scoring {
                    ScoringFunc::Softmax => (v - max).exp() * inv,
                    ScoringFunc::Sigmoid => 1.0 / (1.0 + (-v).exp()),
                };
            }
            if self.renormalize {
                let sum: f32 = out.iter().sum();
                if sum > 0.0 {
                    out.iter_mut().for_each(|o| *o /= sum);
                }
            }
            if self.scaling != 1.0 {
                out.iter_mut().for_each(|o| *o *= self.scaling);
            }
            Ok(())
        };
        if t >= 64 {
            w.par_chunks_mut(k).enumerate().try_for_each(work)?;
        } else {
            w.chunks_mut(k).enumerate().try_for_each(work)?;
        }
        Ok((CpuStorage::F32(w), Shape::from((t, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        si: &candle_core::CudaStorage,
        li: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{i32_arg, launch, view, zeros, F32Operand};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (t, e) = dims2(l, "router logits")?;
        let (ti, k) = dims2(li, "topk ids")?;
        if ti != t {
            bail!("topk ids have {ti} rows, logits {t}")
        }
        let dev = &s.device;
        let x = F32Operand::new(s, l, "router logits")?;
        let xv = x.view()?;
        let ids = view::<u32>(si, li, "topk ids")?;
        let w = zeros::<f32>(dev, t * k)?;
        if t > 0 {
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let sigmoid: i32 = (self.scoring == ScoringFunc::Sigmoid).into();
            let renorm: i32 = self.renormalize.into();
            let (tt, ei, ki) = (
                i32_arg(t, "tokens")?,
                i32_arg(e, "experts")?,
                i32_arg(k, "top_k")?,
            );
            let scaling = self.scaling;
            launch!(
            sig crate::ops::kernel_sigs::ROUTER_WEIGHTS;
            dev,
            "moe_router_weights_f32",
                cfg,
                &xv,
                &ids,
                &w,
                &tt,
                &ei,
                &ki,
                &sigmoid,
                &renorm,
                &scaling
            );
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(w, dev.clone()),
            Shape::from((t, k)),
        ))
    }
}

/// Expert ids `[T, top_k]` (U32) chosen from router logits `[T, E]`.
pub fn topk_select(logits: &Tensor, bias: Option<&Tensor>, op: TopKSelect) -> Result<Tensor> {
    match bias {
        None => logits.apply_op1_no_bwd(&op),
        Some(b) => logits.apply_op2_no_bwd(b, &op),
    }
}

/// Routing weights `[T, top_k]` (F32) for the given ids.
pub fn router_weights(logits: &Tensor, ids: &Tensor, op: RouterWeights) -> Result<Tensor> {
    if ids.dtype() != DType::U32 {
        bail!("topk ids must be u32, got {:?}", ids.dtype())
    }
    logits.apply_op2_no_bwd(ids, &op)
}
