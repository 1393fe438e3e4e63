//! Dispatch and combine around the expert compute.

use super::metadata::ExpertTokensMetadata;
use super::weight_reduce::TopKWeightAndReduce;
use candle_core::{DType, Result, Tensor};

/// How activations are laid out for the experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationFormat {
    /// `[T, H]` rows plus top-k ids / weights (what align + grouped GEMM use).
    Standard,
    /// `[E_local, max_tokens, H]`, one padded batch per expert.
    BatchedExperts,
}

/// What `prepare` hands to the experts.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Activations as the experts read them (possibly gathered from all ranks
    /// and/or quantized).
    pub a1q: Tensor,
    /// Activation scales when `a1q` is quantized.
    pub a1q_scale: Option<Tensor>,
    /// Per-local-expert counts when dispatch already knows them.
    pub expert_tokens_meta: Option<ExpertTokensMetadata>,
    pub topk_ids: Tensor,
    pub topk_weights: Tensor,
}

/// Dispatch (`prepare`) and combine (`finalize`): single-rank pass-through or
/// expert-parallel exchange. Implementations are shared by all experts impls.
pub trait PrepareAndFinalize: Send + Sync + std::fmt::Debug {
    fn activation_format(&self) -> ActivationFormat;

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

    /// Applies `weight_and_reduce` to the experts' output and returns this
    /// rank's `[T, H]` rows in `out_dtype`.
    fn finalize(
        &self,
        fused_expert_output: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        weight_and_reduce: TopKWeightAndReduce,
        out_dtype: DType,
    ) -> Result<Tensor>;

    /// True when `finalize` leaves rows that still need a cross-rank reduction
    /// by the caller (not the case for local or naive EP combine).
    fn output_is_reduced(&self) -> bool;
}

/// Single rank: no exchange, no activation quantization.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalPrepareAndFinalize;

impl PrepareAndFinalize for LocalPrepareAndFinalize {
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }

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
            a1q_scale: None,
            expert_tokens_meta: None,
            topk_ids: topk_ids.clone(),
            topk_weights: topk_weights.clone(),
        })
    }

    fn finalize(
        &self,
        fused_expert_output: &Tensor,
        topk_weights: &Tensor,
        _topk_ids: &Tensor,
        weight_and_reduce: TopKWeightAndReduce,
        out_dtype: DType,
    ) -> Result<Tensor> {
        weight_and_reduce.apply(fused_expert_output, topk_weights, out_dtype)
    }

    fn output_is_reduced(&self) -> bool {
        false
    }
}
