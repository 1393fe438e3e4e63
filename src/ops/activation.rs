//! `act(gate) · up` over rows laid out `[gate (I) | up (I)]`, as the fused
//! `w13` GEMM produces them.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Silu,
    /// Exact (erf) GELU, HF `gelu`.
    Gelu,
    /// Tanh approximation, HF `gelu_pytorch_tanh` / `gelu_new`.
    GeluTanh,
}

impl std::str::FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "silu" | "swiglu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh" => Ok(Self::GeluTanh),
            o => Err(format!(
                "unsupported activation `{o}` (silu, gelu, gelu_pytorch_tanh)"
            )),
        }
    }
}

/// exp(x) for f32 with ~1 ulp error, written so the loop around it vectorises.
/// `FMA`: the polynomial in fused multiply-adds, for callers compiled with
/// FMA; without it, separate multiplies and adds (`mul_add` would be a libm
/// call per step there, on the portable path and pre-Haswell CPUs).
#[inline(always)]
pub(crate) fn fast_exp<const FMA: bool>(x: f32) -> f32 {
    let mad = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = mad(p, r, 1.398_199_9e-3);
    let p = mad(p, r, 8.333_452e-3);
    let p = mad(p, r, 4.166_579_6e-2);
    let p = mad(p, r, 1.666_666_5e-1);
    let p = mad(p, r, 0.5);
    let p = mad(p, r * r, r) + 1.0;
    f32::from_bits(p.to_bits().wrapping_add(((n as i32) << 23) as u32))
}

#[inline(always)]
fn silu_mul_row<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + fast_exp::<FMA>(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_row_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_row::<true>(gate, up, out)
}

fn act_row(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match act {
        Activation::Silu => {
            #[cfg(target_arch = "x86_64")]
            if crate::cpu_features().avx2 {
                // SAFETY: the features were detected at run time.
                return unsafe { silu_mul_row_avx2(gate, up, out) };
            }
            silu_mul_row::<false>(gate, up, out)
        }
        Activation::Gelu => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                let e = candle_core::cpu::erf::erf_f64(g as f64 / std::f64::consts::SQRT_2) as f32;
                *o = 0.5 * g * (1.0 + e) * u;
            }
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = 0.5 * g * (1.0 + (C * (g + 0.044715 * g * g * g)).tanh()) * u;
            }
        }
    }
}

#[derive(Clone, Debug)]
struct ActAndMul {
    act: Activation,
}

impl CustomOp1 for ActAndMul {
    fn name(&self) -> &'static str {
        "moe-act-and-mul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, n2) = l.shape().dims2()?;
        if n2 % 2 != 0 {
            bail!("act_and_mul: last dim {n2} is odd")
        }
        let i = n2 / 2;
        let x = super::to_f32_cow(s, l, "act_and_mul input")?;
        let mut out = vec![0f32; r * i];
        if let Some(rows_per_task) = 16384usize.checked_div(i) {
            let rows_per_task = rows_per_task.max(1);
            let x = &x[..];
            // exact GELU calls erf in f64, ~16× a SiLU's cost
            let min_par = match self.act {
                Activation::Silu => super::PAR_MIN_ELEMS,
                _ => super::PAR_MIN_ELEMS / 16,
            };
            super::for_chunks_from(&mut out, i * rows_per_task, min_par, |c, o| {
                let x = &x[c * n2 * rows_per_task..];
                for (o, x) in o.chunks_mut(i).zip(x.chunks(n2)) {
                    act_row(self.act, &x[..i], &x[i..], o);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((r, i))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{elementwise, i32_arg, launch, zeros, F32Operand};
        let (r, n2) = l.shape().dims2()?;
        if n2 % 2 != 0 {
            bail!("act_and_mul: last dim {n2} is odd")
        }
        let i = n2 / 2;
        let dev = &s.device;
        let x = F32Operand::new(s, l, "act_and_mul input")?;
        let xv = x.view()?;
        let out = zeros::<f32>(dev, r * i)?;
        let (ri, ii) = (i32_arg(r, "rows")?, i32_arg(i, "intermediate")?);
        let act: i32 = match self.act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
        };
        launch!(
            sig crate::ops::kernel_sigs::ACT_AND_MUL;
            dev,
            "moe_act_and_mul_f32",
            elementwise(r * i),
            &xv,
            &out,
            &ri,
            &ii,
            &act
        );
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((r, i)),
        ))
    }
}

/// `[R, 2I]` → F32 `[R, I]`: `act(x[:, :I]) · x[:, I:]`.
pub fn act_and_mul(x: &Tensor, act: Activation) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("act_and_mul: unsupported dtype {:?}", x.dtype())
    }
    x.apply_op1_no_bwd(&ActAndMul { act })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_matches_std() {
        let fused: fn(f32) -> f32 = super::fast_exp::<true>;
        for (fma, exp) in [(true, fused), (false, super::fast_exp::<false>)] {
            let mut worst = 0f32;
            let mut x = -80f32;
            while x < 80.0 {
                let (a, b) = (exp(x), x.exp());
                worst = worst.max(((a - b) / b).abs());
                x += 0.0137;
            }
            assert!(worst < 3e-7, "fma {fma}: relative error {worst}");
        }
    }
}
