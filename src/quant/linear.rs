//! Linear layers outside the experts (attention, dense and shared MLPs, the
//! output head). Weights stay as stored — f32 / bf16 / f16, or FP8 and MXFP4
//! packed as in the experts — and run through the dense linear op, so the
//! same kernels read the bytes and FP8 W8A8 schemes quantize the input per
//! token group, as the checkpoint's runtime does.

use super::loading::{full_name, get_dtype};
use super::{Mxfp4, QuantScheme};
use crate::error::{MoeError, Result};
use crate::format::fp8::{quantize_fp8_block, SourcePrecision};
use crate::format::mxfp4::{quantize_mxfp4, MX_GROUP};
use crate::format::{ActQuant, PackedWeights};
use crate::ops::{linear, LinearArgs};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

/// A linear layer whose weight stays in its stored format (f32 / bf16 /
/// f16, FP8, MXFP4) and runs through [`crate::ops::linear()`].
#[derive(Clone, Debug)]
pub struct QLinear {
    /// `[out, in]`, or packed bytes `[out, in]` (FP8) / `[out, in/2]` (MXFP4).
    w: Tensor,
    args: LinearArgs,
}

impl QLinear {
    /// A float linear over `w` (`[out, in]`) and an optional `[out]` bias.
    /// The bias is kept in f32 (the kernels add it in f32; no conversion per
    /// call); an f32 bias is not copied.
    pub fn new(w: Tensor, bias: Option<Tensor>) -> Self {
        let bias = bias.map(|b| b.to_dtype(DType::F32).unwrap_or(b));
        Self {
            w,
            args: LinearArgs {
                bias,
                ..Default::default()
            },
        }
    }

    /// Whether the weights are held packed (FP8 / MXFP4).
    pub fn is_quantized(&self) -> bool {
        self.args.quant.is_some()
    }

    /// The weight as held (packed bytes for FP8 / MXFP4).
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// Bytes of weights (and scales) held.
    pub fn weight_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        b(&self.w)
            + self.args.quant.as_ref().map_or(0, |q| b(q.scales()))
            + self.args.bias.as_ref().map_or(0, b)
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.w, &self.args)
    }
}

/// `weight` `[out, in]` as f32 values (for quantizing on load).
fn read_f32(vb: &VarBuilder, out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
    Ok(get_dtype(vb, &[out_dim, in_dim], "weight", vb.dtype())?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Loads `vb` (`weight`, optional `bias`) as a `[out, in]` linear, reading
/// FP8 or MXFP4 storage when the checkpoint has it and `scheme` says so; an
/// on-load scheme quantizes a float weight while loading (rounding in the
/// VarBuilder's dtype).
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
        bias.then(|| get_dtype(vb, &[out_dim], "bias", DType::F32))
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
                Tensor::from_vec(q, (out_dim, in_dim), dev)?,
                PackedWeights::Fp8 {
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
                Tensor::from_vec(q, (out_dim, in_dim / 2), dev)?,
                PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(s, (1, out_dim, in_dim / MX_GROUP), dev)?,
                },
                None,
            ))
        }
        Some(QuantScheme::Fp8(f)) if f.on_load => {
            // llm-compressor's FP8_BLOCK: 128×128 weight blocks, dynamic
            // activations per token and group of 128
            let (bn, bk) = (128, 128);
            let w = read_f32(vb, out_dim, in_dim)?;
            let (q, s) =
                quantize_fp8_block(&w, out_dim, in_dim, bn, bk, SourcePrecision::from_dtype(dt));
            let (nb, kb) = (out_dim.div_ceil(bn), in_dim.div_ceil(bk));
            Some((
                Tensor::from_vec(q, (out_dim, in_dim), dev)?,
                PackedWeights::Fp8 {
                    scales: Tensor::from_vec(s, (1, nb, kb), dev)?,
                    block: (bn, bk),
                },
                f.act_quant,
            ))
        }
        // MXFP4A16; a linear whose input is not a multiple of 32 stays float
        Some(QuantScheme::Mxfp4(m)) if m.on_load && in_dim.is_multiple_of(MX_GROUP) => {
            let w = read_f32(vb, out_dim, in_dim)?;
            let (q, s) = quantize_mxfp4(&w, out_dim, in_dim);
            Some((
                Tensor::from_vec(q, (out_dim, in_dim / 2), dev)?,
                PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(s, (1, out_dim, in_dim / MX_GROUP), dev)?,
                },
                None,
            ))
        }
        _ => None,
    };
    Ok(match packed {
        Some((w, quant, act)) => QLinear {
            w,
            args: LinearArgs {
                bias: load_bias()?,
                quant: Some(quant),
                act_quant_group: act.map(|ActQuant::Fp8PerTokenGroup { group }| group),
            },
        },
        None => {
            let w = get_dtype(vb, &[out_dim, in_dim], "weight", dt)?;
            let b = if bias {
                Some(get_dtype(vb, &[out_dim], "bias", dt)?)
            } else {
                None
            };
            QLinear::new(w, b)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fp8::{e4m3_to_f32, quantize_fp8_block, SourcePrecision};
    use crate::format::Fp8Strategy;
    use crate::ops::fp8_group_quant_dequant;
    use crate::quant::Fp8;
    use candle_core::Device;
    use candle_nn::Linear;
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
