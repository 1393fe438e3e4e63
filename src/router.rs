//! Routing: softmax / sigmoid top-k, optional grouped top-k and score
//! correction bias, renormalisation and scaling.

use crate::error::{MoeError, Result};
use crate::ops::topk::{RouterWeights, TopKSelect};
use crate::ops::{router_weights, topk_select, ScoringFunc};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// HF `norm_topk_prob`: divide the k weights by their sum.
    pub renormalize: bool,
    pub scoring: ScoringFunc,
    /// Grouped top-k (DeepSeek): experts split into this many groups...
    pub num_expert_group: Option<usize>,
    /// ...of which this many best groups are eligible.
    pub topk_group: Option<usize>,
    pub routed_scaling_factor: f64,
}

impl RouterConfig {
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            num_experts,
            top_k,
            renormalize: false,
            scoring: ScoringFunc::Softmax,
            num_expert_group: None,
            topk_group: None,
            routed_scaling_factor: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 {
            return Err(MoeError::config("num_experts must be positive"));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(MoeError::config(format!(
                "top_k {} must be in 1..={e} (the number of experts)",
                self.top_k
            )));
        }
        match (self.num_expert_group.unwrap_or(1), self.topk_group) {
            (0, _) => return Err(MoeError::config("num_expert_group must be positive")),
            (1, _) => {}
            (g, tg) => {
                if !e.is_multiple_of(g) {
                    return Err(MoeError::config(format!(
                        "{e} experts cannot be split into {g} groups"
                    )));
                }
                let tg = tg.ok_or_else(|| {
                    MoeError::config("num_expert_group is set but topk_group is not")
                })?;
                if tg == 0 || tg > g {
                    return Err(MoeError::config(format!(
                        "topk_group {tg} must be in 1..={g}"
                    )));
                }
                if self.top_k > tg * (e / g) {
                    return Err(MoeError::config(format!(
                        "top_k {} exceeds the {} experts of {tg} selected groups",
                        self.top_k,
                        tg * (e / g)
                    )));
                }
            }
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(MoeError::config("routed_scaling_factor must be finite"));
        }
        Ok(())
    }
}

/// Turns router logits `[T, E]` into F32 weights and U32 expert ids `[T, k]`.
#[derive(Clone, Debug)]
pub struct Router {
    cfg: RouterConfig,
    /// `e_score_correction_bias` `[E]`: shifts selection only, not the weights.
    correction_bias: Option<Tensor>,
}

impl Router {
    pub fn new(cfg: RouterConfig, correction_bias: Option<Tensor>) -> Result<Self> {
        cfg.validate()?;
        if let Some(b) = &correction_bias {
            if b.dims() != [cfg.num_experts] {
                return Err(MoeError::weight(
                    "e_score_correction_bias",
                    format!("expected shape [{}], got {:?}", cfg.num_experts, b.dims()),
                ));
            }
        }
        Ok(Self {
            cfg,
            correction_bias,
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// `(topk_weights F32 [T, k], topk_ids U32 [T, k])`.
    pub fn route(&self, router_logits: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, e) = router_logits.dims2().map_err(|_| {
            MoeError::input(format!(
                "router logits must be [T, E], got {:?}",
                router_logits.dims()
            ))
        })?;
        if e != self.cfg.num_experts {
            return Err(MoeError::input(format!(
                "router logits have {e} experts, the layer {}",
                self.cfg.num_experts
            )));
        }
        let logits = router_logits.contiguous()?;
        let ids = topk_select(
            &logits,
            self.correction_bias.as_ref(),
            TopKSelect {
                top_k: self.cfg.top_k,
                scoring: self.cfg.scoring,
                num_expert_group: self.cfg.num_expert_group.unwrap_or(1),
                topk_group: self.cfg.topk_group.unwrap_or(1),
            },
        )?;
        let weights = router_weights(
            &logits,
            &ids,
            RouterWeights {
                scoring: self.cfg.scoring,
                renormalize: self.cfg.renormalize,
                scaling: self.cfg.routed_scaling_factor as f32,
            },
        )?;
        Ok((weights, ids))
    }
}
