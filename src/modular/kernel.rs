//! `FusedMoeKernel` = `PrepareAndFinalize` × `Experts`.

use super::experts::{ExpertApplyArgs, Experts};
use super::metadata::ExpertTokensMetadata;
use super::prepare_finalize::PrepareAndFinalize;
use candle_core::{Result, Tensor};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct FusedMoeKernel {
    prepare_finalize: Arc<dyn PrepareAndFinalize>,
    experts: Arc<dyn Experts>,
}

impl FusedMoeKernel {
    pub fn new(
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
        experts: Arc<dyn Experts>,
    ) -> Result<Self> {
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
        // the dispatch decides which ids the experts see; an implementation
        // that cannot use the map ignores it
        let (num_experts, expert_map) = if p.local_ids {
            (self.experts.local_num_experts(), None)
        } else {
            (global_num_experts, expert_map)
        };
        let out = self.experts.apply(&ExpertApplyArgs {
            hidden_states: &p.a1q,
            topk_weights: &p.topk_weights,
            topk_ids: &p.topk_ids,
            global_num_experts: num_experts,
            expert_map,
            expert_tokens_meta: p.expert_tokens_meta.as_ref(),
        })?;
        let y = self
            .prepare_finalize
            .finalize(&out.output, &p, hidden_states.dtype())?;
        Ok((y, out.expert_tokens_meta))
    }
}
