//! The block KV cache: every layer's K and V preallocated once as
//! `[num_blocks · block_size, kv_heads, head_dim]` in the compute dtype, and a
//! free list of blocks. A sequence owns a [`BlockTable`] (its blocks in
//! order); a step writes only its new tokens' slots, so nothing is copied per
//! step and sequences of any lengths share one step (the layout vLLM's
//! PagedAttention uses, served by `candle_moe::ops::paged_attention`).
//! Sequences with a common prompt prefix can share its full blocks
//! ([`KvCache::match_prefix`] / [`KvCache::commit_prefix`]).

use crate::block_pool::{BlockPool, ROOT};
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The physical blocks of one sequence, in position order, and how many
/// positions they hold.
#[derive(Clone, Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// Leading blocks keyed in the prefix index, and the last one's hash.
    keyed: usize,
    last_hash: u64,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }
    /// Positions written so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
    /// Marks `n` more positions as written (after a forward that wrote them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Shape of a model's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    shape: KvCacheShape,
    block_size: usize,
    num_blocks: usize,
    pool: BlockPool,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for every layer.
    pub fn new(
        shape: KvCacheShape,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Config(format!(
                "kv cache: block size ({block_size}) and block count ({num_blocks}) must be positive"
            )));
        }
        if num_blocks > u32::MAX as usize / block_size {
            return Err(ModelError::Config(format!(
                "kv cache: {num_blocks} blocks of {block_size} exceed 2^32 slots"
            )));
        }
        let slots = num_blocks * block_size;
        let layers = (0..shape.num_layers)
            .map(|_| {
                let z = || Tensor::zeros((slots, shape.kv_heads, shape.head_dim), dtype, device);
                Ok((z()?, z()?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            shape,
            block_size,
            num_blocks,
            pool: BlockPool::new(num_blocks),
        })
    }

    /// Bytes one token occupies over all layers (K and V).
    pub fn bytes_per_token(shape: KvCacheShape, dtype: DType) -> usize {
        2 * shape.num_layers * shape.kv_heads * shape.head_dim * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Blocks a sequence can still get (free, or holding an idle cached prefix).
    pub fn free_blocks(&self) -> usize {
        self.pool.available()
    }
    pub fn shape(&self) -> KvCacheShape {
        self.shape
    }
    /// Layer `i`'s (K, V) tensors.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i)
    }

    /// Blocks needed to grow `table` to `len` positions.
    pub fn blocks_needed(&self, table: &BlockTable, len: usize) -> usize {
        len.div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    /// Gives `table` enough blocks for `len` positions; an error (and no
    /// change) when the cache has too few free blocks.
    pub fn reserve(&mut self, table: &mut BlockTable, len: usize) -> Result<()> {
        let need = self.blocks_needed(table, len);
        match self.pool.alloc(need) {
            Some(b) => {
                table.blocks.extend(b);
                Ok(())
            }
            None => Err(ModelError::CacheFull {
                needed: need,
                free: self.pool.available(),
            }),
        }
    }

    /// Drops `table`'s hold on its blocks and empties it (blocks holding a
    /// cached prefix stay findable until they are needed).
    pub fn release(&mut self, table: &mut BlockTable) {
        self.pool.release(&table.blocks);
        *table = BlockTable::default();
    }

    /// Starts empty `table` on the cached blocks of `tokens`' longest cached
    /// prefix of whole blocks, leaving at least one token to compute; returns
    /// the positions it now holds.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        if !table.blocks.is_empty() {
            return table.len;
        }
        let bs = self.block_size;
        let mut parent = ROOT;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            match self.pool.lookup(parent, chunk) {
                Some((b, h)) => {
                    table.blocks.push(b);
                    parent = h;
                }
                None => break,
            }
        }
        table.keyed = table.blocks.len();
        table.last_hash = parent;
        table.len = table.blocks.len() * bs;
        table.len
    }

    /// Keys `table`'s full blocks (holding `tokens[..table.len()]`) in the
    /// prefix index.
    pub fn commit_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) {
        let bs = self.block_size;
        let full = table.len.min(tokens.len()) / bs;
        while table.keyed < full {
            let k = table.keyed;
            let parent = if k == 0 { ROOT } else { table.last_hash };
            let h = self
                .pool
                .register(table.blocks[k], parent, &tokens[k * bs..(k + 1) * bs]);
            table.last_hash = h;
            table.keyed += 1;
        }
    }

    /// Forgets every cached prefix.
    pub fn clear_prefixes(&mut self) {
        self.pool.clear_prefixes();
    }
}
