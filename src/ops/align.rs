//! `moe_align_block_size`: sort the (token, slot) pairs by expert and pad each
//! expert's run to a multiple of the block size, so a grouped GEMM can walk
//! blocks that each belong to one expert (vLLM semantics).
//!
//! The op writes one U32 buffer; [`AlignedRouting`] holds views into it:
//! `sorted_token_ids` (padding = `numel`), `expert_ids` per block (local id, or
//! -1 stored as `u32::MAX` for experts another rank owns), the padded token
//! count, and the token count of every local expert (the data behind
//! `ExpertTokensMetadata`).

use super::contiguous;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `expert_ids` entry for a block whose expert lives on another rank.
pub const NON_LOCAL_EXPERT: u32 = u32::MAX;

/// Sizes of the sections of the align buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlignLayout {
    pub block_size: usize,
    pub num_experts: usize,
    pub num_local_experts: usize,
    /// Number of (token, slot) pairs, `T · top_k`; also the padding sentinel.
    pub numel: usize,
    pub max_num_tokens_padded: usize,
    pub max_num_blocks: usize,
}

impl AlignLayout {
    /// The layout of `numel` rows in blocks of `block_size` (> 0).
    pub fn new(
        numel: usize,
        block_size: usize,
        num_experts: usize,
        num_local_experts: usize,
    ) -> Result<Self> {
        if block_size == 0 {
            bail!("align: block_size must be positive")
        }
        let mut max_padded = numel + num_experts * (block_size - 1);
        if numel < num_experts {
            // at most `numel` experts are used, each padded to one block at most
            max_padded = max_padded.min(numel * block_size);
        }
        Ok(Self {
            block_size,
            num_experts,
            num_local_experts,
            numel,
            max_num_tokens_padded: max_padded,
            max_num_blocks: max_padded.div_ceil(block_size),
        })
    }
    pub fn expert_ids_offset(&self) -> usize {
        self.max_num_tokens_padded
    }
    pub fn post_pad_offset(&self) -> usize {
        self.expert_ids_offset() + self.max_num_blocks
    }
    pub fn counts_offset(&self) -> usize {
        self.post_pad_offset() + 1
    }
    pub fn len(&self) -> usize {
        self.counts_offset() + self.num_local_experts
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The align op: input top-k ids `[T, k]` (U32), optional expert map `[E]` (I32).
#[derive(Clone, Debug)]
pub struct MoeAlign {
    pub layout: AlignLayout,
}

impl MoeAlign {
    fn run(&self, ids: &[u32], map: Option<&[i32]>) -> Result<Vec<u32>> {
        let l = &self.layout;
        let (bs, e) = (l.block_size, l.num_experts);
        let mut counts = vec![0usize; e];
        for &id in ids {
            match counts.get_mut(id as usize) {
                Some(c) => *c += 1,
                None => bail!("topk id {id} out of range for {e} experts"),
            }
        }
        let mut out = vec![0u32; l.len()];
        let (sorted, rest) = out.split_at_mut(l.max_num_tokens_padded);
        let (expert_ids, rest) = rest.split_at_mut(l.max_num_blocks);
        let (post_pad, local_counts) = rest.split_at_mut(1);
        sorted.fill(l.numel as u32);
        expert_ids.fill(NON_LOCAL_EXPERT);
        let mut starts = vec![0usize; e + 1];
        for x in 0..e {
            starts[x + 1] = starts[x] + counts[x].div_ceil(bs) * bs;
        }
        post_pad[0] = starts[e] as u32;
        for x in 0..e {
            let local = match map {
                None => Some(x),
                Some(m) => usize::try_from(m[x]).ok(),
            };
            let tag = match local {
                Some(lx) => {
                    if lx >= l.num_local_experts {
                        bail!("expert map sends expert {x} to local {lx}, but there are {} local experts", l.num_local_experts)
                    }
                    local_counts[lx] = counts[x] as u32;
                    lx as u32
                }
                None => NON_LOCAL_EXPERT,
            };
            expert_ids[starts[x] / bs..starts[x + 1] / bs].fill(tag);
        }
        let mut pos = starts;
        for (i, &id) in ids.iter().enumerate() {
            let p = &mut pos[id as usize];
            sorted[*p] = i as u32;
            *p += 1;
        }
        Ok(out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_run(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        map: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{i32_arg, launch, view, zeros};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let lay = &self.layout;
        let dev = &s.device;
        let ids = view::<u32>(s, l, "topk ids")?;
        let dummy = zeros::<i32>(dev, 1)?;
        let mv = match map {
            Some((ms, ml)) => view::<i32>(ms, ml, "expert map")?,
            None => dummy.slice(..),
        };
        let has_map: i32 = map.is_some().into();
        let out = zeros::<u32>(dev, lay.len())?;
        let shared = (3 * lay.num_experts + 1) * 4;
        if shared > 48 * 1024 {
            bail!(
                "align: {} experts exceed the kernel's shared memory",
                lay.num_experts
            )
        }
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let numel = i32_arg(lay.numel, "topk ids")?;
        let bs = i32_arg(lay.block_size, "block size")?;
        let ne = i32_arg(lay.num_experts, "experts")?;
        let nl = i32_arg(lay.num_local_experts, "local experts")?;
        let mp = i32_arg(lay.max_num_tokens_padded, "padded tokens")?;
        let mb = i32_arg(lay.max_num_blocks, "blocks")?;
        launch!(
            sig crate::ops::kernel_sigs::ALIGN;
            dev,
            "moe_align",
            cfg,
            &ids,
            &mv,
            &has_map,
            &out,
            &numel,
            &bs,
            &ne,
            &nl,
            &mp,
            &mb
        );
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(lay.len()),
        ))
    }

    fn check_ids(&self, l: &Layout) -> Result<()> {
        if l.shape().elem_count() != self.layout.numel {
            bail!(
                "align: expected {} topk ids, got shape {:?}",
                self.layout.numel,
                l.shape()
            )
        }
        Ok(())
    }
}

impl CustomOp1 for MoeAlign {
    fn name(&self) -> &'static str {
        "moe-align-block-size"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check_ids(l)?;
        let ids = contiguous::<u32>(s, l, "topk ids")?;
        let out = self.run(ids, None)?;
        let n = out.len();
        Ok((CpuStorage::U32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check_ids(l)?;
        self.cuda_run(s, l, None)
    }
}

impl CustomOp2 for MoeAlign {
    fn name(&self) -> &'static str {
        "moe-align-block-size-mapped"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check_ids(l)?;
        if lm.shape().dims() != [self.layout.num_experts] {
            bail!(
                "expert map must be [{}], got {:?}",
                self.layout.num_experts,
                lm.shape().dims()
            )
        }
        let ids = contiguous::<u32>(s, l, "topk ids")?;
        let map = contiguous::<i32>(sm, lm, "expert map")?;
        let out = self.run(ids, Some(map))?;
        let n = out.len();
        Ok((CpuStorage::U32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check_ids(l)?;
        if lm.shape().dims() != [self.layout.num_experts] {
            bail!(
                "expert map must be [{}], got {:?}",
                self.layout.num_experts,
                lm.shape().dims()
            )
        }
        self.cuda_run(s, l, Some((sm, lm)))
    }
}

/// Result of [`moe_align_block_size`]: views into one device buffer. Only
/// the align op builds one, so the grouped GEMM's row lists come from it (the
/// CPU GEMM still checks them: rows in bounds, each at most once).
#[derive(Clone, Debug)]
pub struct AlignedRouting {
    layout: AlignLayout,
    top_k: usize,
    buffer: Tensor,
}

impl AlignedRouting {
    pub fn layout(&self) -> &AlignLayout {
        &self.layout
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// The whole buffer (what the grouped GEMM reads).
    pub fn buffer(&self) -> &Tensor {
        &self.buffer
    }
    /// `[max_num_tokens_padded]`: (token, slot) rows sorted by expert,
    /// padding = `numel`.
    pub fn sorted_token_ids(&self) -> Result<Tensor> {
        self.buffer.narrow(0, 0, self.layout.max_num_tokens_padded)
    }
    /// Local expert per block; `u32::MAX` (-1) for non-local experts.
    pub fn expert_ids(&self) -> Result<Tensor> {
        self.buffer.narrow(
            0,
            self.layout.expert_ids_offset(),
            self.layout.max_num_blocks,
        )
    }
    /// `[1]`: number of valid entries of `sorted_token_ids`.
    pub fn num_tokens_post_padded(&self) -> Result<Tensor> {
        self.buffer.narrow(0, self.layout.post_pad_offset(), 1)
    }
    /// `[E_local]`: routed (token, slot) pairs per local expert.
    pub fn expert_num_tokens(&self) -> Result<Tensor> {
        self.buffer.narrow(
            0,
            self.layout.counts_offset(),
            self.layout.num_local_experts,
        )
    }
}

/// Sorts `topk_ids` (`[T, k]`, U32) by expert; `expert_map` (`[E]`, I32) maps
/// global to local ids (-1 = not on this rank).
pub fn moe_align_block_size(
    topk_ids: &Tensor,
    block_size: usize,
    num_experts: usize,
    num_local_experts: usize,
    expert_map: Option<&Tensor>,
) -> Result<AlignedRouting> {
    if block_size == 0 {
        bail!("block_size must be positive")
    }
    if topk_ids.dtype() != DType::U32 {
        bail!("topk ids must be u32, got {:?}", topk_ids.dtype())
    }
    let (_, top_k) = topk_ids.dims2()?;
    let layout = AlignLayout::new(
        topk_ids.elem_count(),
        block_size,
        num_experts,
        num_local_experts,
    )?;
    let op = MoeAlign { layout };
    let buffer = match expert_map {
        None => topk_ids.apply_op1_no_bwd(&op)?,
        Some(m) => {
            if m.dtype() != DType::I32 {
                bail!("expert map must be i32, got {:?}", m.dtype())
            }
            topk_ids.apply_op2_no_bwd(m, &op)?
        }
    };
    Ok(AlignedRouting {
        layout,
        top_k,
        buffer,
    })
}

/// Rows per align block for `m` tokens routed to `top_k` of `num_experts`
/// experts on `device`: 16 while experts average at most 8 rows (decode),
/// 64 beyond on CUDA. The CPU GEMM merges an expert's blocks, so there a
/// small block only bounds padding: always 16.
pub fn align_block_size(
    device: &candle_core::Device,
    m: usize,
    top_k: usize,
    num_experts: usize,
) -> usize {
    if device.is_cuda() && m * top_k > 8 * num_experts.max(1) {
        64
    } else {
        16
    }
}
