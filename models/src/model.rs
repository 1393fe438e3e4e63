//! The interface every causal LM of this crate implements, so generation,
//! evaluation, the engine and the server take any model: one forward over a
//! flat batch of new tokens from many sequences, each with its block table in
//! a shared [`KvCache`].

use crate::error::Result;
use crate::kv_cache::{BlockTable, KvCache, KvCacheShape};
use candle_core::{DType, Device, Tensor};

/// Which logits a sequence of the batch wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The last new token's.
    Last,
    /// Every new token's.
    All,
}

/// One sequence's new tokens in a step. The cache already holds
/// `table.len()` positions of it; the forward writes the new ones after them
/// (the table must have room: [`KvCache::reserve`]) but does not advance the
/// table: the caller does, once the step succeeded.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub table: &'a BlockTable,
    pub logits: Logits,
}

/// What callers need to know about a model without knowing which it is.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub kv: KvCacheShape,
    /// The dtype of activations and of the KV cache.
    pub dtype: DType,
    pub eos_token_ids: Vec<u32>,
}

pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn device(&self) -> &Device;

    /// Runs one step over `seqs` (their tokens concatenated in order); returns
    /// F32 logits `[rows, vocab]`, the rows each sequence asked for, in order.
    fn forward(&self, seqs: &[SeqInput<'_>], cache: &mut KvCache) -> Result<Tensor>;

    /// A cache of `num_blocks` blocks of `block_size` tokens for this model.
    fn new_kv_cache(&self, block_size: usize, num_blocks: usize) -> Result<KvCache> {
        let i = self.info();
        KvCache::new(i.kv, block_size, num_blocks, i.dtype, self.device())
    }
}
