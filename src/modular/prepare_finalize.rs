//! Dispatch and combine around the expert compute.

use super::metadata::ExpertTokensMetadata;
use super::weight_reduce::weight_and_reduce;
use candle_core::{DType, Result, Tensor};

/// What `prepare` hands to the experts, and back to `finalize` (the state of
/// one forward travels with the call, never in the dispatcher).
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Activations as the experts read them (possibly gathered from all ranks).
    pub a1q: Tensor,
    /// Per-local-expert counts when dispatch already knows them.
    pub expert_tokens_meta: Option<ExpertTokensMetadata>,
    /// Global ids, or local ids when [`Prepared::local_ids`] (non-local slots
    /// then carry weight 0).
    pub topk_ids: Tensor,
    pub topk_weights: Tensor,
    /// Whether `topk_ids` are already this rank's local expert ids (the
    /// kernel then passes no expert map to the experts).
    pub local_ids: bool,
    /// Rows each rank contributed to `a1q` (for the combine), when gathered.
    pub rows_per_rank: Option<Vec<usize>>,
}

/// Dispatch (`prepare`) and combine (`finalize`): single-rank pass-through or
/// expert-parallel exchange. Implementations are shared by all experts impls.
pub trait PrepareAndFinalize: Send + Sync + std::fmt::Debug {
    /// Number of ranks whose tokens one `prepare` gathers.
    fn num_dispatchers(&self) -> usize {
        1
    }

    fn prepare(
        &self,
        a1: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        num_experts: usize,
        expert_map: Option<&Tensor>,
    ) -> Result<Prepared>;

    /// Weights and reduces the experts' `[T, k, H]` output and returns this
    /// rank's `[T, H]` rows in `out_dtype`.
    fn finalize(
        &self,
        fused_expert_output: &Tensor,
        prepared: &Prepared,
        out_dtype: DType,
    ) -> Result<Tensor>;
}

/// Single rank: no exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalPrepareAndFinalize;

impl PrepareAndFinalize for LocalPrepareAndFinalize {
    fn prepare(
        &self,
        a1: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        _num_experts: usize,
        _expert_map: Option<&Tensor>,
    ) -> Result<Prepared> {
        Ok(Prepared {
            a1q: a1.contiguous()?,
            expert_tokens_meta: None,
            topk_ids: topk_ids.clone(),
            topk_weights: topk_weights.clone(),
            local_ids: false,
            rows_per_rank: None,
        })
    }

    fn finalize(
        &self,
        fused_expert_output: &Tensor,
        prepared: &Prepared,
        out_dtype: DType,
    ) -> Result<Tensor> {
        weight_and_reduce(fused_expert_output, &prepared.topk_weights, out_dtype)
    }
}
