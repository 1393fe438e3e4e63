//! Attention over a paged (block) KV cache, for a flat batch of tokens from
//! many sequences: each token attends causally to its own sequence's cached
//! keys `0..=pos`, found through the sequence's block table. GQA by index
//! (query head `h` reads KV head `h / (heads / kv_heads)`), never by repeating
//! K/V; an online softmax over the blocks, accumulated in f32.
//!
//! The cache of one layer is a pair of tensors `[num_blocks · block_size,
//! kv_heads, head_dim]` (any float dtype); slot `b · block_size + i` holds
//! position `i` of the block `b`. [`PagedAttentionMeta`] is built once per
//! forward and validated, so the kernels index the cache without checks.
//!
//! CPU: the kernel in `cpu.rs`. Other devices: the same math with candle
//! ops (one sequence at a time).

mod cpu;

use super::contiguous;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// One sequence's part of a flat batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan<'a> {
    /// Tokens the cache already holds for this sequence (the position of its
    /// first new token).
    pub start: usize,
    /// New tokens of this sequence in the batch (consecutive in the batch).
    pub len: usize,
    /// Physical blocks holding positions `0..start + len`, in order.
    pub blocks: &'a [u32],
}

#[derive(Debug)]
struct MetaInner {
    block_size: usize,
    /// Per token: its sequence.
    token_seq: Vec<u32>,
    /// Per token: its position in its sequence.
    token_pos: Vec<u32>,
    /// Per token: the cache slot its K/V go to.
    slots: Vec<u32>,
    /// Block tables, concatenated; sequence `s` is `tables[off[s]..off[s+1]]`.
    tables: Vec<u32>,
    table_off: Vec<usize>,
    num_slots: usize,
    /// The scatter index of [`write_kv`] (`[T, width]` slot ids), built by
    /// the first layer of a forward and reused by the others.
    slot_index: std::sync::OnceLock<Tensor>,
}

/// Where every token of a flat batch sits in the paged cache. Constructed
/// only by [`PagedAttentionMeta::new`], which checks every block id against
/// the cache size, so the attention kernels never index out of bounds.
#[derive(Clone, Debug)]
pub struct PagedAttentionMeta(Arc<MetaInner>);

impl PagedAttentionMeta {
    /// `seqs` in batch order (their tokens consecutive); the cache holds
    /// `num_blocks` blocks of `block_size` slots.
    pub fn new(block_size: usize, num_blocks: usize, seqs: &[SeqSpan<'_>]) -> Result<Self> {
        if block_size == 0 {
            bail!("paged attention: block size must be positive")
        }
        let n_tok: usize = seqs.iter().map(|s| s.len).sum();
        let mut m = MetaInner {
            block_size,
            token_seq: Vec::with_capacity(n_tok),
            token_pos: Vec::with_capacity(n_tok),
            slots: Vec::with_capacity(n_tok),
            tables: Vec::new(),
            table_off: vec![0],
            num_slots: num_blocks * block_size,
            slot_index: std::sync::OnceLock::new(),
        };
        for (si, s) in seqs.iter().enumerate() {
            let end = s.start + s.len;
            let need = end.div_ceil(block_size);
            if s.blocks.len() < need {
                bail!(
                    "paged attention: sequence {si} needs {need} blocks for {end} positions, its table has {}",
                    s.blocks.len()
                )
            }
            if end > u32::MAX as usize {
                bail!("paged attention: sequence {si} is longer than 2^32 positions")
            }
            let table = &s.blocks[..need];
            if let Some(b) = table.iter().find(|&&b| b as usize >= num_blocks) {
                bail!("paged attention: sequence {si} names block {b}, the cache has {num_blocks}")
            }
            for p in s.start..end {
                m.token_seq.push(si as u32);
                m.token_pos.push(p as u32);
                m.slots
                    .push(table[p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
            m.tables.extend_from_slice(table);
            m.table_off.push(m.tables.len());
        }
        // a table names each block once (sequences may share blocks: a
        // common prefix, read only) ...
        let mut mark = vec![0u32; num_blocks];
        for s in 0..seqs.len() {
            for &b in &m.tables[m.table_off[s]..m.table_off[s + 1]] {
                if std::mem::replace(&mut mark[b as usize], s as u32 + 1) == s as u32 + 1 {
                    bail!("paged attention: sequence {s} names block {b} twice")
                }
            }
        }
        // ... and one token writes each slot
        let mut written = m.slots.clone();
        written.sort_unstable();
        if let Some(w) = written.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "paged attention: two tokens of the batch write cache slot {} (block {})",
                w[0],
                w[0] as usize / block_size
            )
        }
        Ok(Self(Arc::new(m)))
    }

    pub fn num_tokens(&self) -> usize {
        self.0.slots.len()
    }

    /// The cache slot of every token, in batch order.
    pub fn slots(&self) -> &[u32] {
        &self.0.slots
    }

    /// The position of every token in its sequence.
    pub fn positions(&self) -> &[u32] {
        &self.0.token_pos
    }
}

/// Writes `k` and `v` (`[T, kv_heads, head_dim]`) into their tokens' slots of
/// one layer's cache (`[slots, kv_heads, head_dim]`, same dtype).
pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &PagedAttentionMeta,
) -> Result<()> {
    let (slots, kvh, d) = k_cache.dims3()?;
    let t = meta.num_tokens();
    if slots != meta.0.num_slots {
        bail!(
            "kv cache has {slots} slots, the batch was laid out for {}",
            meta.0.num_slots
        )
    }
    for (name, x, c) in [("k", k, k_cache), ("v", v, v_cache)] {
        if x.dims() != [t, kvh, d] || c.dims() != [slots, kvh, d] {
            bail!(
                "write_kv: {name} {:?} does not fit a cache {:?} for {t} tokens",
                x.dims(),
                c.dims()
            )
        }
        if x.dtype() != c.dtype() {
            bail!(
                "write_kv: {name} is {:?}, the cache {:?}",
                x.dtype(),
                c.dtype()
            )
        }
    }
    if t == 0 {
        return Ok(());
    }
    let w = kvh * d;
    let build = || -> Result<Tensor> {
        let idx: Vec<u32> = meta
            .slots()
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, w))
            .collect();
        Tensor::from_vec(idx, (t, w), k.device())
    };
    // every layer of a forward writes the same slots: one index per forward
    let idx = match meta.0.slot_index.get() {
        Some(i) if i.dims() == [t, w] && i.device().same_device(k.device()) => i.clone(),
        Some(_) => build()?,
        None => {
            let i = build()?;
            meta.0.slot_index.set(i.clone()).ok();
            i
        }
    };
    k_cache
        .reshape((slots, w))?
        .scatter_set(&idx, &k.reshape((t, w))?.contiguous()?, 0)?;
    v_cache
        .reshape((slots, w))?
        .scatter_set(&idx, &v.reshape((t, w))?.contiguous()?, 0)?;
    Ok(())
}

#[derive(Debug)]
struct PagedAttention {
    meta: PagedAttentionMeta,
    scale: f32,
}

/// One cache's storage and layout.
type CacheRef<'a> = (&'a CpuStorage, &'a Layout);

impl PagedAttention {
    /// The CPU kernel over a K/V cache of element type `C`.
    fn attend<C: cpu::CacheElem + candle_core::WithDType>(
        &self,
        q: &[f32],
        ((sk, lk), (sv, lv)): (CacheRef<'_>, CacheRef<'_>),
        dims: (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        Ok(cpu::Attn {
            m: &self.meta.0,
            q,
            kc: contiguous::<C>(sk, lk, "k cache")?,
            vc: contiguous::<C>(sv, lv, "v cache")?,
            dims,
            scale: self.scale,
        }
        .attend())
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "moe-paged-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, heads, d) = lq.shape().dims3()?;
        let (_, kvh, _) = lk.shape().dims3()?;
        let q = super::to_f32_cow(sq, lq, "attention queries")?;
        let kv = ((sk, lk), (sv, lv));
        let dims = (heads, kvh, d);
        let out = match (sk, sv) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.attend::<f32>(&q, kv, dims)?,
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.attend::<bf16>(&q, kv, dims)?,
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.attend::<f16>(&q, kv, dims)?,
            _ => bail!(
                "paged attention: k/v cache dtypes {:?}/{:?} (expected one float dtype)",
                sk.dtype(),
                sv.dtype()
            ),
        };
        let dt = match sq.dtype() {
            dt @ (DType::BF16 | DType::F16) => dt,
            _ => DType::F32,
        };
        Ok((
            super::f32_to_storage(out, dt, "paged attention")?,
            Shape::from((t, heads, d)),
        ))
    }
}

/// Attention of `q` (`[T, heads, head_dim]`, the batch's new tokens after
/// RoPE) over one layer's cache (`[slots, kv_heads, head_dim]`, already
/// holding the new tokens' K/V, see [`write_kv`]); returns `[T, heads,
/// head_dim]` in `q`'s dtype. `scale` multiplies the scores (usually
/// `1/√head_dim`).
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedAttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    let (t, heads, d) = q.dims3()?;
    let (slots, kvh, dk) = k_cache.dims3()?;
    if v_cache.dims() != k_cache.dims() || dk != d {
        bail!(
            "paged attention: q {:?}, k cache {:?}, v cache {:?} do not agree",
            q.dims(),
            k_cache.dims(),
            v_cache.dims()
        )
    }
    if kvh == 0 || heads % kvh != 0 {
        bail!("paged attention: {heads} query heads are not a multiple of {kvh} kv heads")
    }
    if t != meta.num_tokens() || slots != meta.0.num_slots {
        bail!(
            "paged attention: {t} queries / {slots} cache slots, the batch was laid out for {} / {}",
            meta.num_tokens(),
            meta.0.num_slots
        )
    }
    if t == 0 || d == 0 {
        // nothing to attend with (the CPU kernel splits its output by head_dim)
        return Tensor::zeros((t, heads, d), q.dtype(), q.device());
    }
    let op = PagedAttention {
        meta: meta.clone(),
        scale,
    };
    match q.device() {
        Device::Cpu => {
            q.contiguous()?
                .apply_op3_no_bwd(&k_cache.contiguous()?, &v_cache.contiguous()?, &op)
        }
        _ => by_sequence(q, k_cache, v_cache, meta, scale),
    }
}

/// The same math with candle ops, one sequence at a time (devices without a
/// fused kernel): gather the sequence's K/V slots, scores with a causal mask,
/// softmax in f32, weighted sum of V.
fn by_sequence(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedAttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    let m = &*meta.0;
    let (_, heads, d) = q.dims3()?;
    let kvh = k_cache.dim(1)?;
    let rep = heads / kvh;
    let dev = q.device();
    let mut outs = Vec::new();
    let mut t0 = 0;
    while t0 < m.slots.len() {
        let seq = m.token_seq[t0] as usize;
        let n = m.token_seq[t0..]
            .iter()
            .take_while(|&&s| s as usize == seq)
            .count();
        let ctx = m.token_pos[t0 + n - 1] as usize + 1;
        let table = &m.tables[m.table_off[seq]..m.table_off[seq + 1]];
        let slots: Vec<u32> = (0..ctx)
            .map(|p| table[p / m.block_size] * m.block_size as u32 + (p % m.block_size) as u32)
            .collect();
        let idx = Tensor::from_vec(slots, ctx, dev)?;
        // [kvh, ctx, d]
        let k = k_cache
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?;
        let v = v_cache
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?;
        // [kvh, n·rep, d]: token-major, then the heads of one kv group
        let qs = q
            .narrow(0, t0, n)?
            .to_dtype(DType::F32)?
            .reshape((n, kvh, rep, d))?
            .permute((1, 0, 2, 3))?
            .reshape((kvh, n * rep, d))?;
        let scores = (qs.matmul(&k.t()?.contiguous()?)? * scale as f64)?;
        let mut mask = vec![0f32; n * rep * ctx];
        for i in 0..n {
            let pos = m.token_pos[t0 + i] as usize;
            for r in 0..rep {
                mask[(i * rep + r) * ctx + pos + 1..(i * rep + r + 1) * ctx]
                    .iter_mut()
                    .for_each(|x| *x = f32::NEG_INFINITY);
            }
        }
        let mask = Tensor::from_vec(mask, (1, n * rep, ctx), dev)?;
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let o = p.matmul(&v.contiguous()?)?; // [kvh, n·rep, d]
        let o = o
            .reshape((kvh, n, rep, d))?
            .permute((1, 0, 2, 3))?
            .reshape((n, heads, d))?;
        outs.push(o.to_dtype(q.dtype())?);
        t0 += n;
    }
    Tensor::cat(&outs, 0)
}
