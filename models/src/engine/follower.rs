//! Expert parallelism under the engine: rank 0 schedules and samples; every
//! other rank runs the same forwards in lock step (the MoE layers exchange
//! tokens inside them) from the plans rank 0 sends, so ranks cannot diverge.

use crate::error::Result;
use crate::kv_cache::{BlockTable, KvCache};
use crate::model::{CausalLm, Logits, SeqInput};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// One step's sequences as rank 0 runs them.
#[derive(Clone, Debug)]
pub struct StepPlan {
    /// Rank 0's cache: (block size, blocks).
    cache: (usize, usize),
    seqs: Vec<(Vec<u32>, BlockTable, Logits)>,
}

impl StepPlan {
    pub(crate) fn from_inputs(cache: (usize, usize), inputs: &[SeqInput<'_>]) -> Self {
        Self {
            cache,
            seqs: inputs
                .iter()
                .map(|s| (s.tokens.to_vec(), s.table.clone(), s.logits))
                .collect(),
        }
    }
}

/// Runs rank 0's plans on `model` (a follower rank) over a cache shaped as
/// rank 0's, until rank 0's engine is dropped.
pub fn follow(model: &dyn CausalLm, plans: Receiver<Arc<StepPlan>>) -> Result<()> {
    let mut cache: Option<KvCache> = None;
    while let Ok(plan) = plans.recv() {
        let (bs, nb) = plan.cache;
        let cache = match &mut cache {
            Some(c) if (c.block_size(), c.num_blocks()) == (bs, nb) => c,
            slot => slot.insert(model.new_kv_cache(bs, nb)?),
        };
        let inputs: Vec<SeqInput<'_>> = plan
            .seqs
            .iter()
            .map(|(tokens, table, logits)| SeqInput {
                tokens,
                table,
                logits: *logits,
            })
            .collect();
        model.forward(&inputs, cache)?;
    }
    Ok(())
}
