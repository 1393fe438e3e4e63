//! How the per-(token, slot) expert outputs become one row per token.

use crate::ops::moe_weighted_sum;
use candle_core::{DType, Result, Tensor};

/// The combine every experts implementation here needs: `[T, k, H]`
/// unweighted rows times the top-k weights, summed over k.
pub fn weight_and_reduce(
    fused_expert_output: &Tensor,
    topk_weights: &Tensor,
    out_dtype: DType,
) -> Result<Tensor> {
    let (t, k, h) = fused_expert_output.dims3()?;
    let y = fused_expert_output.reshape((t * k, h))?;
    moe_weighted_sum(&y, Some(topk_weights), k, out_dtype)
}
