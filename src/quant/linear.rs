//! Linear layers of quantized checkpoints outside the experts (attention,
//! dense and shared MLPs). Their weights are dequantized once at load into
//! the layer's dtype — they are a small part of an MoE model — while FP8 W8A8
//! schemes still quantize the input per token group, so results match what
//! the checkpoint's runtime computes.

use super::fp8_codec::e4m3_to_f32;
use super::loading::{full_name, get_any, get_dtype, tensor_bytes};
use super::mxfp4_codec::{e2m1_to_f32, e8m0_to_f32, MX_GROUP};
use super::QuantScheme;
use crate::error::{MoeError, Result};
use crate::modular::ActQuant;
use crate::ops::fp8_group_quant_dequant;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Clone, Debug)]
pub struct QLinear {
    inner: Linear,
    act: Option<ActQuant>,
}

impl QLinear {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.act {
            None => self.inner.forward(x),
            Some(ActQuant::Fp8PerTokenGroup { group }) => {
                let q = fp8_group_quant_dequant(&x.contiguous()?, group)?.to_dtype(x.dtype())?;
                self.inner.forward(&q)
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
    let mut act = None;
    let w = match scheme {
        Some(QuantScheme::Fp8(f)) if !f.on_load && vb.contains_tensor(&f.scale_name) => {
            let name = full_name(vb, "weight");
            let q = tensor_bytes(
                &get_dtype(vb, &[out_dim, in_dim], "weight", DType::F8E4M3)?,
                &name,
            )?;
            let (bn, bk) = f.strategy.block(out_dim, in_dim);
            let kb = in_dim.div_ceil(bk);
            let s = get_any(vb, &f.scale_name, DType::F32)?;
            if s.elem_count() != out_dim.div_ceil(bn) * kb {
                return Err(MoeError::weight(
                    full_name(vb, &f.scale_name),
                    format!(
                        "shape {:?} does not fit a [{out_dim}, {in_dim}] weight with {bn}x{bk} blocks",
                        s.dims()
                    ),
                ));
            }
            let s = super::loading::f32_vec(&s)?;
            let v: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    let (r, c) = (i / in_dim, i % in_dim);
                    e4m3_to_f32(b) * s[(r / bn) * kb + c / bk]
                })
                .collect();
            act = f.act_quant;
            Tensor::from_vec(v, (out_dim, in_dim), vb.device())?.to_dtype(dt)?
        }
        Some(QuantScheme::Mxfp4(m)) if !m.on_load && vb.contains_tensor("weight_packed") => {
            if !in_dim.is_multiple_of(MX_GROUP) {
                return Err(MoeError::weight(
                    full_name(vb, "weight_packed"),
                    format!("input size {in_dim} is not a multiple of 32"),
                ));
            }
            let pn = full_name(vb, "weight_packed");
            let q = tensor_bytes(
                &get_dtype(vb, &[out_dim, in_dim / 2], "weight_packed", DType::U8)?,
                &pn,
            )?;
            let sn = full_name(vb, "weight_scale");
            let s = tensor_bytes(
                &get_dtype(vb, &[out_dim, in_dim / MX_GROUP], "weight_scale", DType::U8)?,
                &sn,
            )?;
            if let Some(p) = s.iter().position(|&b| b == 255) {
                return Err(MoeError::weight(
                    sn,
                    format!("scale byte 255 (NaN in e8m0) at element {p}"),
                ));
            }
            let v: Vec<f32> = (0..out_dim * in_dim)
                .map(|i| {
                    let b = q[i / 2];
                    let nib = if i % 2 == 0 { b & 0xf } else { b >> 4 };
                    e2m1_to_f32(nib) * e8m0_to_f32(s[i / MX_GROUP])
                })
                .collect();
            // W4A16: mark as quantized without an activation quantizer
            Tensor::from_vec(v, (out_dim, in_dim), vb.device())?.to_dtype(dt)?
        }
        _ => get_dtype(vb, &[out_dim, in_dim], "weight", dt)?,
    };
    let b = if bias {
        Some(get_dtype(vb, &[out_dim], "bias", dt)?)
    } else {
        None
    };
    Ok(QLinear {
        inner: Linear::new(w, b),
        act,
    })
}
