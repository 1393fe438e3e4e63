//! Naive DP/EP dispatch and combine (vLLM `naive_dp_ep`): every rank gathers
//! all ranks' hidden states, top-k ids and weights, computes only its local
//! experts, and the partial outputs are reduce-scattered back so each rank
//! gets its own tokens' rows. By default the experts get global ids and the
//! expert map (the grouped-GEMM experts skip non-local slots);
//! [`NaiveEpPrepareAndFinalize::with_local_ids`] delivers local ids instead,
//! as vLLM's all-to-all backends do, for experts that ignore the map.

use super::Communicator;
use crate::modular::{weight_and_reduce, PrepareAndFinalize, Prepared};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

#[derive(Debug)]
pub struct NaiveEpPrepareAndFinalize {
    comm: Arc<dyn Communicator>,
    local_ids: bool,
}

impl NaiveEpPrepareAndFinalize {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            local_ids: false,
        }
    }

    /// Delivers local expert ids (non-local slots: local expert 0 at weight
    /// 0), for experts that cannot use an expert map.
    pub fn with_local_ids(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            local_ids: true,
        }
    }
}

/// Global top-k ids → local ids through `expert_map` (`[E]`, -1 where not
/// local), with non-local slots sent to local expert 0 at weight 0. Candle
/// ops only: runs on the routing tensors' device, no host round-trip.
fn localize_topk(
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

impl PrepareAndFinalize for NaiveEpPrepareAndFinalize {
    fn num_dispatchers(&self) -> usize {
        self.comm.world_size()
    }

    fn prepare(
        &self,
        a1: &Tensor,
        topk_weights: &Tensor,
        topk_ids: &Tensor,
        _num_experts: usize,
        expert_map: Option<&Tensor>,
    ) -> Result<Prepared> {
        let (a1q, counts) = self.comm.all_gather_v(&a1.contiguous()?)?;
        let (topk_ids, _) = self.comm.all_gather_v(topk_ids)?;
        let (topk_weights, _) = self.comm.all_gather_v(topk_weights)?;
        let (topk_weights, topk_ids, local_ids) = match expert_map {
            Some(map) if self.local_ids => {
                let (w, ids) = localize_topk(&topk_weights, &topk_ids, map)?;
                (w, ids, true)
            }
            _ => (topk_weights, topk_ids, false),
        };
        Ok(Prepared {
            a1q,
            // the align step counts local tokens per local expert
            expert_tokens_meta: None,
            topk_ids,
            topk_weights,
            local_ids,
            rows_per_rank: Some(counts),
        })
    }

    fn finalize(
        &self,
        fused_expert_output: &Tensor,
        prepared: &Prepared,
        out_dtype: DType,
    ) -> Result<Tensor> {
        let Some(counts) = &prepared.rows_per_rank else {
            candle_core::bail!("naive EP finalize: the prepared batch has no row counts")
        };
        // reduce in f32, convert once this rank's rows are summed
        let partial = weight_and_reduce(fused_expert_output, &prepared.topk_weights, DType::F32)?;
        self.comm
            .reduce_scatter_v(&partial, counts)?
            .to_dtype(out_dtype)
    }
}
