//! The KV cache's block allocator: reference counts, so sequences can share
//! the blocks of a common prefix, and a prefix index over whole blocks (the
//! scheme of vLLM's automatic prefix caching). A full block is keyed by its
//! tokens and the key of the block before it, so a hit means the whole prefix
//! up to and including it is the same. Blocks no sequence holds keep their
//! contents and key until the allocator needs them (least recently released
//! first), so a prefix seen earlier is found again.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Key of the chain before the first block.
pub(crate) const ROOT: u64 = 0x6b76_5f70_7265_6669;

/// A cached block's identity: its parent's chain hash and its tokens.
type Key = (u64, Box<[u32]>);

#[derive(Debug)]
pub(crate) struct BlockPool {
    refs: Vec<u32>,
    /// Unkeyed blocks nobody holds (popped from the back).
    free: Vec<u32>,
    /// Keyed blocks nobody holds, by release tick (oldest evicted first).
    idle: BTreeMap<u64, u32>,
    /// Per block: its key, chain hash and idle tick.
    meta: Vec<Option<(Key, u64)>>,
    idle_tick: Vec<u64>,
    index: HashMap<Key, u32>,
    tick: u64,
}

/// The chain hash of a block after `parent` holding `tokens`.
pub(crate) fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize) -> Self {
        Self {
            refs: vec![0; num_blocks],
            // handed out in increasing order
            free: (0..num_blocks as u32).rev().collect(),
            idle: BTreeMap::new(),
            meta: vec![None; num_blocks],
            idle_tick: vec![0; num_blocks],
            index: HashMap::new(),
            tick: 0,
        }
    }

    /// Blocks an allocation can take (free, or idle and evictable).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// `n` blocks, each with one reference; `None` (and no change) when fewer
    /// are available.
    pub(crate) fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.available() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.idle.pop_first()?;
                    if let Some((key, _)) = self.meta[b as usize].take() {
                        self.index.remove(&key);
                    }
                    b
                }
            };
            self.refs[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Drops one reference to each block.
    pub(crate) fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            let Some(r) = self.refs.get_mut(i) else {
                continue;
            };
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.meta[i].is_some() {
                    self.tick += 1;
                    self.idle_tick[i] = self.tick;
                    self.idle.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// The cached block after `parent` holding `tokens`, with a new
    /// reference, and its chain hash.
    pub(crate) fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        let key: Key = (parent, tokens.into());
        let b = *self.index.get(&key)?;
        let i = b as usize;
        if self.refs[i] == 0 {
            self.idle.remove(&self.idle_tick[i]);
        }
        self.refs[i] += 1;
        Some((b, self.meta[i].as_ref().map_or(ROOT, |m| m.1)))
    }

    /// Keys full block `b` (after `parent`, holding `tokens`) so later
    /// sequences find it; returns its chain hash. A block already keyed, or
    /// content already cached in another block, is left as is.
    pub(crate) fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let i = b as usize;
        if let Some((_, h)) = &self.meta[i] {
            return *h;
        }
        let h = chain_hash(parent, tokens);
        let key: Key = (parent, tokens.into());
        if !self.index.contains_key(&key) {
            self.index.insert(key.clone(), b);
            self.meta[i] = Some((key, h));
        }
        h
    }

    /// Forgets every cached prefix (idle blocks become free).
    pub(crate) fn clear_prefixes(&mut self) {
        self.index.clear();
        for (_, b) in std::mem::take(&mut self.idle) {
            self.free.push(b);
        }
        for m in &mut self.meta {
            *m = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_blocks_are_found_and_evicted_last_released_last() {
        let mut p = BlockPool::new(3);
        let a = p.alloc(2).unwrap();
        let h0 = p.register(a[0], ROOT, &[1, 2]);
        p.register(a[1], h0, &[3, 4]);
        assert_eq!(p.available(), 1);
        // a second holder of the first block
        assert_eq!(p.lookup(ROOT, &[1, 2]), Some((a[0], h0)));
        assert_eq!(p.lookup(ROOT, &[9, 9]), None);
        // a different parent is a different prefix
        assert_eq!(p.lookup(ROOT, &[3, 4]), None);
        p.release(&a);
        // block 0 still held once; block 1 idle but cached
        assert_eq!(p.available(), 2);
        assert!(p.lookup(h0, &[3, 4]).is_some());
        p.release(&[a[1], a[0]]);
        assert_eq!(p.available(), 3);
        // the free block goes first, then the oldest idle one (a[1]), whose
        // key is dropped
        let b = p.alloc(2).unwrap();
        assert_eq!(b[1], a[1]);
        assert_eq!(p.lookup(h0, &[3, 4]), None);
        assert!(p.lookup(ROOT, &[1, 2]).is_some());
        assert!(p.alloc(1).is_none());
    }
}
