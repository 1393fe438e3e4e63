//! FP8 (e4m3) experts, kept as bytes with f32 block scales:
//! - Qwen3-*-FP8 / DeepSeek style (`quant_method: "fp8"`): `weight` F8_E4M3
//!   `[N, K]` and `weight_scale_inv` F32 `[ceil(N/128), ceil(K/128)]`;
//! - compressed-tensors `float-quantized` (llm-compressor FP8_BLOCK,
//!   FP8_DYNAMIC): `weight_scale` per block, channel or tensor;
//! - float experts quantized while loading, with llm-compressor's FP8_BLOCK
//!   rule (128×128 blocks, `scale = amax / 448`).
//!
//! In every case `W[n, k] = q[n, k] · s[n / bn, k / bk]`. Activations are
//! quantized per token and group of 128 (W8A8, as vLLM and the
//! checkpoints' dynamic scheme do) unless [`Fp8::weight_only`] asks for W8A16.

use super::loading::{
    check_local_ids, full_name, get_any, get_dtype, load_biases, tensor_bytes, FloatExperts,
};
use super::{ExpertLayerSpec, QuantMethod, TensorSpec};
use crate::error::{MoeError, Result};
use crate::format::float_rows::with_rows;
use crate::format::fp8::{quantize_fp8_block_rows, SourcePrecision};
use crate::format::{ActQuant, Fp8Strategy, PackedWeights};
use crate::modular::{Experts, GroupedGemmExperts};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8 {
    pub strategy: Fp8Strategy,
    /// `weight_scale_inv` (Qwen3-FP8) or `weight_scale` (compressed-tensors).
    pub scale_name: String,
    pub act_quant: Option<ActQuant>,
    /// Read float weights and quantize them (instead of reading FP8).
    pub on_load: bool,
}

impl Fp8 {
    /// Qwen3-*-FP8 checkpoints: `weight_block_size` blocks, dynamic
    /// activations per token and group of `bk`.
    pub fn block_scaled(bn: usize, bk: usize) -> Self {
        Self {
            strategy: Fp8Strategy::Block(bn, bk),
            scale_name: "weight_scale_inv".into(),
            act_quant: Some(ActQuant::Fp8PerTokenGroup { group: bk }),
            on_load: false,
        }
    }

    /// compressed-tensors `float-quantized`; `act_group`: the dynamic
    /// activation group size (None: weight-only).
    pub fn compressed_tensors(strategy: Fp8Strategy, act_group: Option<usize>) -> Self {
        Self {
            strategy,
            scale_name: "weight_scale".into(),
            act_quant: act_group.map(|group| ActQuant::Fp8PerTokenGroup { group }),
            on_load: false,
        }
    }

    /// Quantizes float experts while loading, as llm-compressor's FP8_BLOCK.
    pub fn quantize_on_load() -> Self {
        Self {
            on_load: true,
            ..Self::compressed_tensors(Fp8Strategy::Block(128, 128), Some(128))
        }
    }

    /// W8A16: keep activations in float.
    pub fn weight_only(mut self) -> Self {
        self.act_quant = None;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Fp8Strategy::Block(bn, bk) = self.strategy {
            if bn == 0 || bk == 0 || !bk.is_multiple_of(16) {
                return Err(MoeError::config(format!(
                    "fp8 block {bn}x{bk}: both must be positive and the column block a multiple of 16"
                )));
            }
        }
        if let Some(ActQuant::Fp8PerTokenGroup { group: 0 }) = self.act_quant {
            return Err(MoeError::config("fp8 activation group size 0"));
        }
        Ok(())
    }

    /// One `[n, k]` projection from the checkpoint: bytes and scales.
    pub(crate) fn read_proj(
        &self,
        vb: &VarBuilder,
        n: usize,
        k: usize,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let name = full_name(vb, "weight");
        let q = tensor_bytes(&get_dtype(vb, &[n, k], "weight", DType::F8E4M3)?, &name)?;
        if let Some(p) = q.iter().position(|b| b & 0x7f == 0x7f) {
            return Err(MoeError::weight(
                name,
                format!("NaN e4m3 byte at element {p}"),
            ));
        }
        let (bn, bk) = self.strategy.block(n, k);
        let (nb, kb) = (n.div_ceil(bn), k.div_ceil(bk));
        let st = get_any(vb, &self.scale_name, DType::F32)?;
        let sname = full_name(vb, &self.scale_name);
        if st.elem_count() != nb * kb {
            return Err(MoeError::weight(
                sname,
                format!(
                    "shape {:?} does not fit a [{n}, {k}] weight with {bn}x{bk} blocks (want [{nb}, {kb}])",
                    st.dims()
                ),
            ));
        }
        let s = super::loading::f32_vec(&st)?;
        if let Some(p) = s.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(MoeError::weight(
                sname,
                format!("invalid scale {} at {p}", s[p]),
            ));
        }
        Ok((q, s))
    }
}

/// Local experts' bytes and scales, filled expert by expert.
struct Fp8Stack {
    q: Vec<u8>,
    s: Vec<f32>,
}

impl QuantMethod for Fp8 {
    fn name(&self) -> &'static str {
        if self.on_load {
            "fp8-on-load"
        } else {
            "fp8"
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
                continue;
            }
            let (bn, bk) = self.strategy.block(n, k);
            v.push(TensorSpec {
                name: format!("{{e}}.{p}.weight"),
                dtype: Some(DType::F8E4M3),
                shape: vec![n, k],
            });
            v.push(TensorSpec {
                name: format!("{{e}}.{p}.{}", self.scale_name),
                dtype: Some(DType::F32),
                shape: vec![n.div_ceil(bn), k.div_ceil(bk)],
            });
        }
        v
    }

    fn create_experts(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<Arc<dyn Experts>> {
        self.validate()?;
        check_local_ids(s, local_ids)?;
        let (h, i, e) = (s.hidden_size, s.intermediate_size, local_ids.len());
        let strategy = if self.on_load {
            Fp8Strategy::Block(128, 128)
        } else {
            self.strategy
        };
        let (bn13, bk13) = strategy.block(i, h);
        let (bn2, bk2) = strategy.block(h, i);
        // gate and up rows are stacked: blocks stay aligned when I is a
        // multiple of the row block; otherwise scales are kept per row
        let row_scales = !i.is_multiple_of(bn13);
        let kb13 = h.div_ceil(bk13);
        let per13 = if row_scales {
            2 * i * kb13
        } else {
            2 * i.div_ceil(bn13) * kb13
        };
        let per2 = h.div_ceil(bn2) * i.div_ceil(bk2);
        let mut w13 = Fp8Stack {
            q: Vec::with_capacity(e * 2 * i * h),
            s: Vec::with_capacity(e * per13),
        };
        let mut w2 = Fp8Stack {
            q: Vec::with_capacity(e * h * i),
            s: Vec::with_capacity(e * per2),
        };
        let float = if self.on_load {
            Some(FloatExperts::open(s, vb)?)
        } else {
            None
        };
        let prec = SourcePrecision::from_dtype(vb.dtype());
        for &g in local_ids {
            let [(gq, gs), (uq, us), (dq, ds)] = match &float {
                Some(f) => {
                    let x = f.expert(s, vb, g)?;
                    let q = |t: &Tensor, n, k, bn, bk| {
                        with_rows(t, |w| quantize_fp8_block_rows(w, n, k, bn, bk, prec))
                    };
                    [
                        q(&x.gate, i, h, bn13, bk13)?,
                        q(&x.up, i, h, bn13, bk13)?,
                        q(&x.down, h, i, bn2, bk2)?,
                    ]
                }
                None => {
                    let ve = vb.pp(g);
                    [
                        self.read_proj(&ve.pp(&s.names.proj.gate), i, h)?,
                        self.read_proj(&ve.pp(&s.names.proj.up), i, h)?,
                        self.read_proj(&ve.pp(&s.names.proj.down), h, i)?,
                    ]
                }
            };
            w13.q.extend_from_slice(&gq);
            w13.q.extend_from_slice(&uq);
            for sc in [&gs, &us] {
                if row_scales {
                    for r in 0..i {
                        let b = (r / bn13) * kb13;
                        w13.s.extend_from_slice(&sc[b..b + kb13]);
                    }
                } else {
                    w13.s.extend_from_slice(sc);
                }
            }
            w2.q.extend_from_slice(&dq);
            w2.s.extend_from_slice(&ds);
        }
        let dev = vb.device();
        let bn13 = if row_scales { 1 } else { bn13 };
        let w13_s = Tensor::from_vec(w13.s, (e, per13 / kb13, kb13), dev)?;
        let w2_s = Tensor::from_vec(w2.s, (e, h.div_ceil(bn2), i.div_ceil(bk2)), dev)?;
        let (b13, b2) = load_biases(s, vb, local_ids)?;
        Ok(Arc::new(GroupedGemmExperts::quantized(
            (
                Tensor::from_vec(w13.q, (e, 2 * i, h), dev)?,
                Some(PackedWeights::Fp8 {
                    scales: w13_s,
                    block: (bn13, bk13),
                }),
            ),
            (
                Tensor::from_vec(w2.q, (e, h, i), dev)?,
                Some(PackedWeights::Fp8 {
                    scales: w2_s,
                    block: (bn2, bk2),
                }),
            ),
            b13,
            b2,
            s.activation,
            self.act_quant,
        )?))
    }
}
