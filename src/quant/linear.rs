//! Linear layers of quantized checkpoints outside the experts (attention,
//! dense and shared MLPs). FP8 and MXFP4 weights stay packed, as in the
//! experts: the layer is run as a one-expert grouped GEMM (every row routed
//! to expert 0), so the same kernels read the bytes and FP8 W8A8 schemes
//! quantize the input per token group, as the checkpoint's runtime does.

use super::loading::{full_name, get_dtype};
use super::mxfp4_codec::MX_GROUP;
use super::{Mxfp4, QuantScheme};
use crate::error::{MoeError, Result};
use crate::modular::ActQuant;
use crate::ops::{
    align_block_size, grouped_gemm, moe_align_block_size, CudaGemmKernel, GroupedGemmArgs,
    WeightQuant,
};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Clone, Debug)]
enum Inner {
    Float(Linear),
    Packed {
        /// `[1, out, in]` e4m3 bytes or `[1, out, in/2]` packed e2m1.
        w: Tensor,
        quant: WeightQuant,
        /// `[1, out]` f32.
        bias: Option<Tensor>,
        act: Option<ActQuant>,
        out_dim: usize,
    },
}

#[derive(Clone, Debug)]
pub struct QLinear {
    inner: Inner,
}

impl QLinear {
    /// Whether the weights are held packed (FP8 / MXFP4).
    pub fn is_quantized(&self) -> bool {
        matches!(self.inner, Inner::Packed { .. })
    }

    /// Bytes of weights (and scales) held.
    pub fn weight_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.inner {
            Inner::Float(l) => b(l.weight()) + l.bias().map_or(0, b),
            Inner::Packed { w, quant, bias, .. } => {
                b(w) + b(quant.scales()) + bias.as_ref().map_or(0, b)
            }
        }
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Float(l) => l.forward(x),
            Inner::Packed {
                w,
                quant,
                bias,
                act,
                out_dim,
            } => {
                let dims = x.dims();
                let Some((&in_dim, lead)) = dims.split_last() else {
                    candle_core::bail!("linear: scalar input")
                };
                let rows: usize = lead.iter().product();
                let a = x.reshape((rows, in_dim))?.contiguous()?;
                // every row to the one expert
                let ids = Tensor::zeros((rows, 1), DType::U32, x.device())?;
                let bs = align_block_size(x.device(), rows, 1, 1);
                let routing = moe_align_block_size(&ids, bs, 1, 1, None)?;
                let y = grouped_gemm(
                    &a,
                    w,
                    &routing,
                    GroupedGemmArgs {
                        row_div: 1,
                        bias: bias.clone(),
                        topk_weights: None,
                        quant: Some(quant.clone()),
                        act_quant_group: act.map(|ActQuant::Fp8PerTokenGroup { group }| group),
                        kernel: CudaGemmKernel::Auto,
                    },
                )?;
                let mut shape = lead.to_vec();
                shape.push(*out_dim);
                y.to_dtype(x.dtype())?.reshape(shape)
            }
        }
    }
}

/// Loads `vb` (`weight`, optional `bias`) as a `[out, in]` linear, reading
/// FP8 or MXFP4 storage when the checkpoint has it and `scheme` says so.
pub fn qlinear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: &VarBuilder,
    scheme: Option<&QuantScheme>,
) -> Result<QLinear> {
    let dt = vb.dtype();
    let dev = vb.device();
    let load_bias = || -> Result<Option<Tensor>> {
        bias.then(|| {
            get_dtype(vb, &[out_dim], "bias", DType::F32)?
                .reshape((1, out_dim))
                .map_err(Into::into)
        })
        .transpose()
    };
    let packed = match scheme {
        Some(QuantScheme::Fp8(f)) if !f.on_load && vb.contains_tensor(&f.scale_name) => {
            // the experts' loader: same tensors, same checks
            f.validate()?;
            let (q, s) = f.read_proj(vb, out_dim, in_dim)?;
            let (bn, bk) = f.strategy.block(out_dim, in_dim);
            let (nb, kb) = (out_dim.div_ceil(bn), in_dim.div_ceil(bk));
            Some((
                Tensor::from_vec(q, (1, out_dim, in_dim), dev)?,
                WeightQuant::Fp8 {
                    scales: Tensor::from_vec(s, (1, nb, kb), dev)?,
                    block: (bn, bk),
                },
                f.act_quant,
            ))
        }
        Some(QuantScheme::Mxfp4(m)) if !m.on_load && vb.contains_tensor("weight_packed") => {
            if !in_dim.is_multiple_of(MX_GROUP) {
                return Err(MoeError::weight(
                    full_name(vb, "weight_packed"),
                    format!("input size {in_dim} is not a multiple of 32"),
                ));
            }
            let (q, s) = Mxfp4::read_proj(vb, out_dim, in_dim)?;
            Some((
                Tensor::from_vec(q, (1, out_dim, in_dim / 2), dev)?,
                WeightQuant::Mxfp4 {
                    scales: Tensor::from_vec(s, (1, out_dim, in_dim / MX_GROUP), dev)?,
                },
                None,
            ))
        }
        _ => None,
    };
    let inner = match packed {
        Some((w, quant, act)) => Inner::Packed {
            w,
            quant,
            bias: load_bias()?,
            act,
            out_dim,
        },
        None => {
            let w = get_dtype(vb, &[out_dim, in_dim], "weight", dt)?;
            let b = if bias {
                Some(get_dtype(vb, &[out_dim], "bias", dt)?)
            } else {
                None
            };
            Inner::Float(Linear::new(w, b))
        }
    };
    Ok(QLinear { inner })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fp8_group_quant_dequant;
    use crate::quant::fp8_codec::{e4m3_to_f32, quantize_fp8_block, SourcePrecision};
    use crate::quant::{Fp8, Fp8Strategy};
    use candle_core::Device;
    use std::collections::HashMap;

    /// An FP8 linear stays packed (1 byte per weight + block scales) and
    /// computes x · dequant(W)ᵀ + b, on W8A16 and (with the input quantized
    /// the same way) W8A8.
    #[test]
    fn fp8_linear_stays_packed_and_matches_dequantized() -> Result<()> {
        let dev = Device::Cpu;
        let (o, i) = (40usize, 160usize);
        let w: Vec<f32> = (0..o * i)
            .map(|x| ((x * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let (q, s) = quantize_fp8_block(&w, o, i, 128, 128, SourcePrecision::F32);
        let deq: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(x, &b)| e4m3_to_f32(b) * s[(x / i / 128) * 2 + (x % i) / 128])
            .collect();
        let bias: Vec<f32> = (0..o).map(|x| x as f32 * 0.01).collect();
        // as safetensors' F8_E4M3 loads
        let qt = Tensor::from_vec(
            q.into_iter()
                .map(float8::F8E4M3::from_bits)
                .collect::<Vec<_>>(),
            (o, i),
            &dev,
        )?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), qt),
                (
                    "weight_scale".to_string(),
                    Tensor::from_vec(s, (1, 2), &dev)?,
                ),
                ("bias".to_string(), Tensor::new(bias.as_slice(), &dev)?),
            ]),
            DType::F32,
            &dev,
        );
        let x = Tensor::from_vec(
            (0..3 * i)
                .map(|x| (x % 17) as f32 * 0.1 - 0.8)
                .collect::<Vec<_>>(),
            (1, 3, i),
            &dev,
        )?;
        let dense = Linear::new(
            Tensor::from_vec(deq, (o, i), &dev)?,
            Some(Tensor::new(bias.as_slice(), &dev)?),
        );
        for act in [None, Some(128)] {
            let scheme =
                QuantScheme::Fp8(Fp8::compressed_tensors(Fp8Strategy::Block(128, 128), act));
            let l = qlinear(i, o, true, &vb, Some(&scheme))?;
            assert!(l.is_quantized());
            assert_eq!(l.weight_bytes(), o * i + 2 * 4 + o * 4);
            let xin = match act {
                Some(g) => fp8_group_quant_dequant(&x.reshape((3, i))?, g)?.reshape((1, 3, i))?,
                None => x.clone(),
            };
            let want = dense.forward(&xin)?.flatten_all()?.to_vec1::<f32>()?;
            let got = l.forward(&x)?;
            assert_eq!(got.dims(), &[1, 3, o]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{g} vs {w} (act {act:?})"
                );
            }
        }
        Ok(())
    }
}
