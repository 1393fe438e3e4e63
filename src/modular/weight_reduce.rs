//! How the per-(token, slot) expert outputs become one row per token.

use crate::ops::moe_weighted_sum;
use candle_core::{bail, DType, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKWeightAndReduce {
    /// The experts already weighted and reduced: output is `[T, H]`.
    NoOp,
    /// Output is `[T, k, H]` unweighted: apply the top-k weights and sum.
    Contiguous,
}

impl TopKWeightAndReduce {
    /// Applies the reduction, returning `[T, H]` in `out_dtype`.
    pub fn apply(
        &self,
        fused_expert_output: &Tensor,
        topk_weights: &Tensor,
        out_dtype: DType,
    ) -> Result<Tensor> {
        match self {
            Self::NoOp => {
                if fused_expert_output.rank() != 2 {
                    bail!("NoOp weight-and-reduce expects a reduced [T, H] expert output")
                }
                fused_expert_output.to_dtype(out_dtype)
            }
            Self::Contiguous => {
                let (t, k, h) = fused_expert_output.dims3()?;
                let y = fused_expert_output.reshape((t * k, h))?;
                moe_weighted_sum(&y, Some(topk_weights), k, out_dtype)
            }
        }
    }
}
