//! `FusedMoeKernel` = `PrepareAndFinalize` × `Experts`.

use super::experts::{ExpertApplyArgs, Experts};
use super::metadata::ExpertTokensMetadata;
use super::prepare_finalize::PrepareAndFinalize;
use candle_core::{bail, DType, Result, Tensor};
use std::sync::Arc;

/// Global top-k ids → local ids through `expert_map` (`[E]`, -1 where not
/// local), with non-local slots sent to local expert 0 at weight 0. Candle
/// ops only: runs on the routing tensors' device, no host round-trip.
pub fn localize_topk(
    topk_weights: &Tensor,
    topk_ids: &Tensor,
    expert_map: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let shape = topk_ids.shape().clone();
    let local = expert_map
        .to_dtype(DType::I64)?
        .index_select(&topk_ids.flatten_all()?, 0)?
        .reshape(shape)?;
    let owned = local.ge(0i64)?;
    let zeros_i = local.zeros_like()?;
    let ids = owned.where_cond(&local, &zeros_i)?.to_dtype(DType::U32)?;
    let w = topk_weights.to_dtype(DType::F32)?;
    let weights = owned.where_cond(&w, &w.zeros_like()?)?;
    Ok((weights, ids))
}

#[derive(Clone, Debug)]
pub struct FusedMoeKernel {
    prepare_finalize: Arc<dyn PrepareAndFinalize>,
    experts: Arc<dyn Experts>,
}

impl FusedMoeKernel {
    /// Fails when the two halves disagree on the activation format.
    pub fn new(
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
        experts: Arc<dyn Experts>,
    ) -> Result<Self> {
        if prepare_finalize.activation_format() != experts.activation_format() {
            bail!(
                "prepare/finalize produces {:?} activations but experts `{}` expect {:?}",
                prepare_finalize.activation_format(),
                experts.name(),
                experts.activation_format()
            )
        }
        Ok(Self {
            prepare_finalize,
            experts,
        })
    }

    pub fn experts(&self) -> &Arc<dyn Experts> {
        &self.experts
    }
    pub fn prepare_finalize(&self) -> &Arc<dyn PrepareAndFinalize> {
        &self.prepare_finalize
    }

    /// Routed-expert output `[T, H]` in the dtype of `hidden_states`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        global_num_experts: usize,
        expert_map: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with_metadata(
                hidden_states,
                topk_weights,
                topk_ids,
                global_num_experts,
                expert_map,
            )?
            .0)
    }

    /// As `forward`, also returning the per-local-expert token counts used.
    pub fn forward_with_metadata(
        &self,
        hidden_states: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        global_num_experts: usize,
        expert_map: Option<&Tensor>,
    ) -> Result<(Tensor, Option<ExpertTokensMetadata>)> {
        let p = self.prepare_finalize.prepare(
            hidden_states,
            topk_weights,
            topk_ids,
            global_num_experts,
            expert_map,
        )?;
        // experts that cannot read the map get local ids (and zero weights
        // for slots this rank does not own)
        let (topk_weights, topk_ids, num_experts, expert_map) = match expert_map {
            Some(map) if !self.experts.supports_expert_map() => {
                let (w, ids) = localize_topk(&p.topk_weights, &p.topk_ids, map)?;
                (w, ids, self.experts.local_num_experts(), None)
            }
            _ => (
                p.topk_weights.clone(),
                p.topk_ids.clone(),
                global_num_experts,
                expert_map,
            ),
        };
        let out = self.experts.apply(&ExpertApplyArgs {
            hidden_states: &p.a1q,
            a1q_scale: p.a1q_scale.as_ref(),
            topk_weights: &topk_weights,
            topk_ids: &topk_ids,
            global_num_experts: num_experts,
            expert_map,
            expert_tokens_meta: p.expert_tokens_meta.as_ref(),
        })?;
        let y = self.prepare_finalize.finalize(
            &out.output,
            &topk_weights,
            &topk_ids,
            self.experts.finalize_weight_and_reduce(),
            hidden_states.dtype(),
        )?;
        Ok((y, out.expert_tokens_meta))
    }
}
