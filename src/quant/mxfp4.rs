//! MXFP4 experts (compressed-tensors `mxfp4-pack-quantized`, llm-compressor's
//! MXFP4A16): `weight_packed` U8 `[N, K/2]` (low nibble = even element) and
//! `weight_scale` U8 e8m0 `[N, K/32]`, kept packed (4.25 bits per weight) and
//! decoded inside the GEMM; activations stay float (W4A16). Float experts can
//! be quantized on load with the same rule llm-compressor applies.
//!
//! gpt-oss checkpoints store the same format per layer:
//! `gate_up_proj_blocks` `[E, 2I, H/32, 16]` with gate and up rows interleaved
//! (even rows gate, odd rows up), `gate_up_proj_scales` `[E, 2I, H/32]`,
//! `down_proj_blocks` / `down_proj_scales`, and f32/bf16 biases; they are read
//! (local experts only) and de-interleaved into the `[gate; up]` stack. gpt-oss's
//! clamped SwiGLU is not one of the activations here yet.

use super::loading::{
    check_local_ids, full_name, get_dtype, load_biases, tensor_bytes, FloatExperts,
};
use super::{ExpertLayerSpec, QuantMethod, TensorSpec};
use crate::error::{MoeError, Result};
use crate::format::float_rows::with_rows;
use crate::format::mxfp4::{quantize_mxfp4_rows, MX_GROUP};
use crate::format::PackedWeights;
use crate::modular::{Experts, GroupedGemmExperts};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mxfp4 {
    /// Read float weights and quantize them (instead of reading packed ones).
    pub on_load: bool,
}

impl Mxfp4 {
    pub fn quantize_on_load() -> Self {
        Self { on_load: true }
    }

    pub(crate) fn read_proj(vb: &VarBuilder, n: usize, k: usize) -> Result<(Vec<u8>, Vec<u8>)> {
        let pname = full_name(vb, "weight_packed");
        let q = tensor_bytes(
            &get_dtype(vb, &[n, k / 2], "weight_packed", DType::U8)?,
            &pname,
        )?;
        let sname = full_name(vb, "weight_scale");
        let s = tensor_bytes(
            &get_dtype(vb, &[n, k / MX_GROUP], "weight_scale", DType::U8)?,
            &sname,
        )?;
        if let Some(p) = s.iter().position(|&b| b == 255) {
            return Err(MoeError::weight(
                sname,
                format!("scale byte 255 (NaN in e8m0) at element {p}"),
            ));
        }
        Ok((q, s))
    }
}

/// Rows `[even..., odd...]` of a row-major `[2·half, width]` matrix.
fn deinterleave_rows<T: Copy>(m: &[T], half: usize, width: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(m.len());
    for parity in 0..2 {
        for r in 0..half {
            let row = 2 * r + parity;
            out.extend_from_slice(&m[row * width..(row + 1) * width]);
        }
    }
    out
}

impl Mxfp4 {
    fn load_gpt_oss(
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<Arc<dyn Experts>> {
        let (h, i, eg, e) = (
            s.hidden_size,
            s.intermediate_size,
            s.global_num_experts,
            local_ids.len(),
        );
        let (g13, g2) = (h / MX_GROUP, i / MX_GROUP);
        let t = |name: &str, shape: &[usize]| -> Result<Tensor> {
            get_dtype(vb, shape, name, DType::U8)
        };
        let n = &s.names;
        let name = |base: &str, suffix: &str| format!("{base}_{suffix}");
        let (gu_blocks, gu_scales) = (
            name(&n.fused_gate_up, "blocks"),
            name(&n.fused_gate_up, "scales"),
        );
        let (d_blocks, d_scales) = (name(&n.fused_down, "blocks"), name(&n.fused_down, "scales"));
        let b13 = t(&gu_blocks, &[eg, 2 * i, g13, 16])?;
        let s13 = t(&gu_scales, &[eg, 2 * i, g13])?;
        let b2 = t(&d_blocks, &[eg, h, g2, 16])?;
        let s2 = t(&d_scales, &[eg, h, g2])?;
        let (mut q13, mut sc13, mut q2, mut sc2) = (vec![], vec![], vec![], vec![]);
        for &g in local_ids {
            let bytes = |t: &Tensor, name: &str| tensor_bytes(&t.get(g)?, &full_name(vb, name));
            q13.extend(deinterleave_rows(&bytes(&b13, &gu_blocks)?, i, h / 2));
            sc13.extend(deinterleave_rows(&bytes(&s13, &gu_scales)?, i, g13));
            q2.extend(bytes(&b2, &d_blocks)?);
            sc2.extend(bytes(&s2, &d_scales)?);
        }
        for (v, name) in [(&sc13, &gu_scales), (&sc2, &d_scales)] {
            if let Some(p) = v.iter().position(|&b| b == 255) {
                return Err(MoeError::weight(
                    full_name(vb, name),
                    format!("scale byte 255 (NaN in e8m0) at local element {p}"),
                ));
            }
        }
        let (bias13, bias2) = if s.has_bias {
            let gu = get_dtype(vb, &[eg, 2 * i], &n.fused_gate_up_bias(), DType::F32)?;
            let d = get_dtype(vb, &[eg, h], &n.fused_down_bias(), DType::F32)?;
            let (mut v13, mut v2) = (vec![], vec![]);
            for &g in local_ids {
                v13.extend(deinterleave_rows(&gu.get(g)?.to_vec1::<f32>()?, i, 1));
                v2.extend(d.get(g)?.to_vec1::<f32>()?);
            }
            let dev = vb.device();
            (
                Some(Tensor::from_vec(v13, (e, 2 * i), dev)?),
                Some(Tensor::from_vec(v2, (e, h), dev)?),
            )
        } else {
            (None, None)
        };
        let dev = vb.device();
        Ok(Arc::new(GroupedGemmExperts::quantized(
            (
                Tensor::from_vec(q13, (e, 2 * i, h / 2), dev)?,
                Some(PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(sc13, (e, 2 * i, g13), dev)?,
                }),
            ),
            (
                Tensor::from_vec(q2, (e, h, i / 2), dev)?,
                Some(PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(sc2, (e, h, g2), dev)?,
                }),
            ),
            bias13,
            bias2,
            s.activation,
            None,
        )?))
    }
}

impl QuantMethod for Mxfp4 {
    fn name(&self) -> &'static str {
        if self.on_load {
            "mxfp4-on-load"
        } else {
            "mxfp4"
        }
    }

    fn expert_tensors(&self, s: &ExpertLayerSpec) -> Vec<TensorSpec> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        let mut v = Vec::new();
        let pn = &s.names.proj;
        for (p, n, k) in [(&pn.gate, i, h), (&pn.up, i, h), (&pn.down, h, i)] {
            if self.on_load {
                v.push(TensorSpec {
                    name: format!("{{e}}.{p}.weight"),
                    dtype: None,
                    shape: vec![n, k],
                });
            } else {
                v.push(TensorSpec {
                    name: format!("{{e}}.{p}.weight_packed"),
                    dtype: Some(DType::U8),
                    shape: vec![n, k / 2],
                });
                v.push(TensorSpec {
                    name: format!("{{e}}.{p}.weight_scale"),
                    dtype: Some(DType::U8),
                    shape: vec![n, k / MX_GROUP],
                });
            }
        }
        v
    }

    fn create_experts(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<Arc<dyn Experts>> {
        check_local_ids(s, local_ids)?;
        let (h, i, e) = (s.hidden_size, s.intermediate_size, local_ids.len());
        if !h.is_multiple_of(MX_GROUP) || !i.is_multiple_of(MX_GROUP) {
            return Err(MoeError::config(format!(
                "mxfp4 needs hidden ({h}) and intermediate ({i}) sizes that are multiples of 32"
            )));
        }
        if vb.contains_tensor(&format!("{}_blocks", s.names.fused_gate_up)) && !self.on_load {
            return Self::load_gpt_oss(s, vb, local_ids);
        }
        let mut q13 = Vec::with_capacity(e * i * h);
        let mut s13 = Vec::with_capacity(e * 2 * i * h / MX_GROUP);
        let mut q2 = Vec::with_capacity(e * h * i / 2);
        let mut s2 = Vec::with_capacity(e * h * i / MX_GROUP);
        let float = if self.on_load {
            Some(FloatExperts::open(s, vb)?)
        } else {
            None
        };
        for &g in local_ids {
            let [(gq, gs), (uq, us), (dq, ds)] = match &float {
                Some(f) => {
                    let x = f.expert(s, vb, g)?;
                    let q = |t: &Tensor, n, k| with_rows(t, |w| quantize_mxfp4_rows(w, n, k));
                    [q(&x.gate, i, h)?, q(&x.up, i, h)?, q(&x.down, h, i)?]
                }
                None => {
                    let ve = vb.pp(g);
                    [
                        Self::read_proj(&ve.pp(&s.names.proj.gate), i, h)?,
                        Self::read_proj(&ve.pp(&s.names.proj.up), i, h)?,
                        Self::read_proj(&ve.pp(&s.names.proj.down), h, i)?,
                    ]
                }
            };
            q13.extend_from_slice(&gq);
            q13.extend_from_slice(&uq);
            s13.extend_from_slice(&gs);
            s13.extend_from_slice(&us);
            q2.extend_from_slice(&dq);
            s2.extend_from_slice(&ds);
        }
        let dev = vb.device();
        let (b13, b2) = load_biases(s, vb, local_ids)?;
        Ok(Arc::new(GroupedGemmExperts::quantized(
            (
                Tensor::from_vec(q13, (e, 2 * i, h / 2), dev)?,
                Some(PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(s13, (e, 2 * i, h / MX_GROUP), dev)?,
                }),
            ),
            (
                Tensor::from_vec(q2, (e, h, i / 2), dev)?,
                Some(PackedWeights::Mxfp4 {
                    scales: Tensor::from_vec(s2, (e, h, i / MX_GROUP), dev)?,
                }),
            ),
            b13,
            b2,
            s.activation,
            None,
        )?))
    }
}
