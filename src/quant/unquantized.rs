//! f32 / f16 / bf16 experts, stored in the layer's dtype.

use super::{ExpertLayerSpec, QuantMethod, TensorSpec};
use crate::error::{MoeError, Result};
use crate::modular::{Experts, GroupedGemmExperts};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, Default)]
pub struct Unquantized;

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    vb.get(shape, name)
        .map_err(|e| MoeError::weight(format!("{}.{name}", vb.prefix()), e.to_string()))
}

/// Stacks per-expert tensors into a preallocated `[E_local, ...]` tensor,
/// so that at most one expert is held twice while loading.
struct Stacker {
    out: Tensor,
}

impl Stacker {
    fn new(e: usize, shape: &[usize], vb: &VarBuilder) -> Result<Self> {
        let mut dims = vec![e];
        dims.extend_from_slice(shape);
        Ok(Self {
            out: Tensor::zeros(dims, vb.dtype(), vb.device())?,
        })
    }
    fn set(&self, i: usize, t: &Tensor) -> Result<()> {
        Ok(self.out.slice_set(&t.unsqueeze(0)?, 0, i)?)
    }
}

impl Unquantized {
    fn load_per_expert(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Option<Tensor>)> {
        let (h, i, e) = (s.hidden_size, s.intermediate_size, local_ids.len());
        // every expert is there, and the first one has the configured shape,
        // before the stack is allocated from the config's sizes
        for &g in local_ids {
            let ve = vb.pp(g);
            let pn = &s.names.proj;
            for p in [&pn.gate, &pn.up, &pn.down] {
                if !ve.pp(p).contains_tensor("weight") {
                    return Err(MoeError::weight(
                        format!("{}.{p}.weight", ve.prefix()),
                        "missing from the checkpoint",
                    ));
                }
            }
        }
        if let Some(&g) = local_ids.first() {
            get(&vb.pp(g).pp(&s.names.proj.gate), &[i, h], "weight")?;
            get(&vb.pp(g).pp(&s.names.proj.down), &[h, i], "weight")?;
        }
        let w13 = Stacker::new(e, &[2 * i, h], vb)?;
        let w2 = Stacker::new(e, &[h, i], vb)?;
        let b13 = if s.has_bias {
            Some(Stacker::new(e, &[2 * i], vb)?)
        } else {
            None
        };
        let b2 = if s.has_bias {
            Some(Stacker::new(e, &[h], vb)?)
        } else {
            None
        };
        for (l, &g) in local_ids.iter().enumerate() {
            let (ve, p) = (vb.pp(g), &s.names.proj);
            let gate = get(&ve.pp(&p.gate), &[i, h], "weight")?;
            let up = get(&ve.pp(&p.up), &[i, h], "weight")?;
            w13.set(l, &Tensor::cat(&[&gate, &up], 0)?)?;
            w2.set(l, &get(&ve.pp(&p.down), &[h, i], "weight")?)?;
            if let (Some(b13), Some(b2)) = (&b13, &b2) {
                let bg = get(&ve.pp(&p.gate), &[i], "bias")?;
                let bu = get(&ve.pp(&p.up), &[i], "bias")?;
                b13.set(l, &Tensor::cat(&[&bg, &bu], 0)?)?;
                b2.set(l, &get(&ve.pp(&p.down), &[h], "bias")?)?;
            }
        }
        Ok((w13.out, w2.out, b13.map(|b| b.out), b2.map(|b| b.out)))
    }

    /// transformers 5.x layout: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`.
    fn load_fused(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Option<Tensor>)> {
        let (h, i, eg) = (s.hidden_size, s.intermediate_size, s.global_num_experts);
        let all_local = local_ids.iter().copied().eq(0..eg);
        let pick = |t: Tensor| -> Result<Tensor> {
            if all_local {
                return Ok(t);
            }
            let idx: Vec<u32> = local_ids.iter().map(|&g| g as u32).collect();
            let idx = Tensor::new(idx.as_slice(), t.device())?;
            Ok(t.index_select(&idx, 0)?)
        };
        let n = &s.names;
        let w13 = pick(get(vb, &[eg, 2 * i, h], &n.fused_gate_up)?)?;
        let w2 = pick(get(vb, &[eg, h, i], &n.fused_down)?)?;
        let (b13, b2) = if s.has_bias {
            (
                Some(pick(get(vb, &[eg, 2 * i], &n.fused_gate_up_bias())?)?),
                Some(pick(get(vb, &[eg, h], &n.fused_down_bias())?)?),
            )
        } else {
            (None, None)
        };
        Ok((w13, w2, b13, b2))
    }
}

impl QuantMethod for Unquantized {
    fn name(&self) -> &'static str {
        "unquantized"
    }

    fn expert_tensors(&self, s: &ExpertLayerSpec) -> Vec<TensorSpec> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        let p = &s.names.proj;
        let parts = [(&p.gate, i, h), (&p.up, i, h), (&p.down, h, i)];
        let mut v: Vec<TensorSpec> = parts
            .iter()
            .map(|&(name, n, k)| TensorSpec {
                name: format!("{{e}}.{name}.weight"),
                dtype: None,
                shape: vec![n, k],
            })
            .collect();
        if s.has_bias {
            v.extend(parts.iter().map(|&(name, n, _)| TensorSpec {
                name: format!("{{e}}.{name}.bias"),
                dtype: None,
                shape: vec![n],
            }));
        }
        v
    }

    fn create_experts(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<Arc<dyn Experts>> {
        if let Some(&g) = local_ids.iter().find(|&&g| g >= s.global_num_experts) {
            return Err(MoeError::config(format!(
                "local expert {g} out of range for {} experts",
                s.global_num_experts
            )));
        }
        let fused = vb.contains_tensor(&s.names.fused_gate_up);
        let (w13, w2, b13, b2) = if fused {
            self.load_fused(s, vb, local_ids)?
        } else {
            self.load_per_expert(s, vb, local_ids)?
        };
        Ok(Arc::new(GroupedGemmExperts::new(
            w13,
            w2,
            b13,
            b2,
            s.activation,
        )?))
    }
}
