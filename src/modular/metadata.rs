//! Per-local-expert token counts, produced by dispatch / align and read by
//! experts implementations to size their work.

use candle_core::{DType, Result, Tensor};

#[derive(Clone, Debug)]
pub struct ExpertTokensMetadata {
    /// `[E_local]` U32 on the compute device.
    pub expert_num_tokens: Tensor,
    /// Host copy, present only where it costs nothing (CPU tensors).
    pub expert_num_tokens_cpu: Option<Vec<u32>>,
}

impl ExpertTokensMetadata {
    /// Wraps device counts; the host copy is filled only when the counts are
    /// already on the host, so no device sync is ever forced here.
    pub fn from_device(expert_num_tokens: Tensor) -> Result<Self> {
        let expert_num_tokens = expert_num_tokens.to_dtype(DType::U32)?;
        let expert_num_tokens_cpu = if expert_num_tokens.device().is_cpu() {
            Some(expert_num_tokens.to_vec1::<u32>()?)
        } else {
            None
        };
        Ok(Self {
            expert_num_tokens,
            expert_num_tokens_cpu,
        })
    }

    pub fn num_local_experts(&self) -> usize {
        self.expert_num_tokens.elem_count()
    }
}
