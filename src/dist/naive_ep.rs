//! Naive DP/EP dispatch and combine (vLLM `naive_dp_ep`): every rank gathers
//! all ranks' hidden states, top-k ids and weights, computes only its local
//! experts (the expert map zeroes the rest), and the partial outputs are
//! reduce-scattered back so each rank gets its own tokens' rows.

use super::Communicator;
use crate::modular::{ActivationFormat, PrepareAndFinalize, Prepared, TopKWeightAndReduce};
use candle_core::{DType, Result, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct NaiveEpPrepareAndFinalize {
    comm: Arc<dyn Communicator>,
    /// Rows per rank of the forward in flight (set by prepare, read by finalize).
    counts: Mutex<Vec<usize>>,
}

impl NaiveEpPrepareAndFinalize {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            counts: Mutex::new(vec![]),
        }
    }
}

impl PrepareAndFinalize for NaiveEpPrepareAndFinalize {
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }

    fn num_dispatchers(&self) -> usize {
        self.comm.world_size()
    }

    fn prepare(
        &self,
        a1: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        _num_experts: usize,
        _expert_map: Option<&Tensor>,
    ) -> Result<Prepared> {
        let (a1q, counts) = self.comm.all_gather_v(&a1.contiguous()?)?;
        let (topk_ids, _) = self.comm.all_gather_v(topk_ids)?;
        let (topk_weights, _) = self.comm.all_gather_v(topk_weights)?;
        *self
            .counts
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = counts;
        Ok(Prepared {
            a1q,
            a1q_scale: None,
            // the align step counts local tokens per local expert
            expert_tokens_meta: None,
            topk_ids,
            topk_weights,
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
        // reduce in f32, convert once this rank's rows are summed
        let partial = weight_and_reduce.apply(fused_expert_output, topk_weights, DType::F32)?;
        let counts = self
            .counts
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone();
        self.comm
            .reduce_scatter_v(&partial, &counts)?
            .to_dtype(out_dtype)
    }

    fn output_is_reduced(&self) -> bool {
        false
    }
}
