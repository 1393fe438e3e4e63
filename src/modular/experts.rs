//! The expert compute of the modular kernel.

use super::metadata::ExpertTokensMetadata;
use crate::format::{ActQuant, PackedWeights};
use crate::ops::{
    act_and_mul, align_block_size, grouped_gemm, moe_align_block_size, Activation, GroupedGemmArgs,
};
use candle_core::{bail, Result, Tensor};

/// Sizes of one forward: `E` local experts, `M` tokens, `N` = 2·intermediate
/// (the w13 rows), `K` = hidden, `top_k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProblemSize {
    pub num_experts: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub top_k: usize,
}

/// Everything `apply` may use. An implementation that cannot use the expert
/// map just ignores it.
pub struct ExpertApplyArgs<'a> {
    pub hidden_states: &'a Tensor,
    pub topk_weights: &'a Tensor,
    pub topk_ids: &'a Tensor,
    pub global_num_experts: usize,
    pub expert_map: Option<&'a Tensor>,
    pub expert_tokens_meta: Option<&'a ExpertTokensMetadata>,
}

/// What `apply` returns: the expert output (`[T, k, H]`, unweighted: see
/// [`Experts::apply`]) and the token counts it used.
pub struct ExpertsOutput {
    pub output: Tensor,
    pub expert_tokens_meta: Option<ExpertTokensMetadata>,
}

pub trait Experts: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn local_num_experts(&self) -> usize;
    /// Bytes of expert weights this implementation holds (what a decode step
    /// may have to stream, and what expert parallelism divides).
    fn weight_bytes(&self) -> usize;
    fn problem_size(&self, a1: &Tensor, topk_ids: &Tensor) -> Result<ProblemSize>;
    /// The expert output `[T, k, H]`, unweighted: `finalize` applies the
    /// routing weights and sums over k. An implementation that cannot use
    /// `args.expert_map` ignores it; under expert parallelism the dispatch
    /// then has to deliver local ids.
    fn apply(&self, args: &ExpertApplyArgs<'_>) -> Result<ExpertsOutput>;
}

/// Experts as grouped GEMMs: align by expert → grouped GEMM (w13) → act·mul →
/// grouped GEMM (w2). Output `[T, k, H]` f32, reduced contiguously. The
/// weights are float, or FP8 / MXFP4 read in their packed form.
#[derive(Clone, Debug)]
pub struct GroupedGemmExperts {
    /// `[E_local, 2I, H]`: gate rows, then up rows (packed: see [`PackedWeights`]).
    pub w13: Tensor,
    /// `[E_local, H, I]`.
    pub w2: Tensor,
    pub w13_bias: Option<Tensor>,
    pub w2_bias: Option<Tensor>,
    pub activation: Activation,
    pub w13_quant: Option<PackedWeights>,
    pub w2_quant: Option<PackedWeights>,
    pub act_quant: Option<ActQuant>,
}

impl GroupedGemmExperts {
    pub fn new(
        w13: Tensor,
        w2: Tensor,
        w13_bias: Option<Tensor>,
        w2_bias: Option<Tensor>,
        activation: Activation,
    ) -> Result<Self> {
        Self::quantized((w13, None), (w2, None), w13_bias, w2_bias, activation, None)
    }

    /// Experts over quantized (or float, with `None`) weights.
    pub fn quantized(
        (w13, w13_quant): (Tensor, Option<PackedWeights>),
        (w2, w2_quant): (Tensor, Option<PackedWeights>),
        w13_bias: Option<Tensor>,
        w2_bias: Option<Tensor>,
        activation: Activation,
        act_quant: Option<ActQuant>,
    ) -> Result<Self> {
        let (e, n2, kw13) = w13.dims3()?;
        let (e2, h2, kw2) = w2.dims3()?;
        let h = w13_quant.as_ref().map_or(kw13, |q| q.k_of(kw13));
        let i = w2_quant.as_ref().map_or(kw2, |q| q.k_of(kw2));
        if e != e2 || h != h2 || n2 != 2 * i {
            bail!(
                "expert weights disagree: w13 {:?}, w2 {:?}",
                w13.dims(),
                w2.dims()
            )
        }
        // biases stay f32: the kernels add them in f32, with no per-call conversion
        let f32 = |b: Option<Tensor>| b.map(|b| b.to_dtype(candle_core::DType::F32)).transpose();
        Ok(Self {
            w13,
            w2,
            w13_bias: f32(w13_bias)?,
            w2_bias: f32(w2_bias)?,
            activation,
            w13_quant,
            w2_quant,
            act_quant,
        })
    }

    fn hidden_size(&self) -> usize {
        let kw = self.w13.dims().last().copied().unwrap_or(0);
        self.w13_quant.as_ref().map_or(kw, |q| q.k_of(kw))
    }

    /// The group size of on-the-fly FP8 activation quantization (W8A8).
    fn act_quant_group(&self) -> Option<usize> {
        self.act_quant
            .map(|ActQuant::Fp8PerTokenGroup { group }| group)
    }
}

impl Experts for GroupedGemmExperts {
    fn name(&self) -> &'static str {
        match (&self.w13_quant, self.act_quant) {
            (None, _) => "grouped-gemm",
            (Some(PackedWeights::Fp8 { .. }), Some(_)) => "grouped-gemm-fp8-w8a8",
            (Some(PackedWeights::Fp8 { .. }), None) => "grouped-gemm-fp8-w8a16",
            (Some(PackedWeights::Mxfp4 { .. }), _) => "grouped-gemm-mxfp4-w4a16",
        }
    }
    fn local_num_experts(&self) -> usize {
        self.w13.dims()[0]
    }
    fn weight_bytes(&self) -> usize {
        [
            Some(&self.w13),
            Some(&self.w2),
            self.w13_bias.as_ref(),
            self.w2_bias.as_ref(),
            self.w13_quant.as_ref().map(|q| q.scales()),
            self.w2_quant.as_ref().map(|q| q.scales()),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
    }
    fn problem_size(&self, a1: &Tensor, topk_ids: &Tensor) -> Result<ProblemSize> {
        let (m, k) = a1.dims2()?;
        let (mi, top_k) = topk_ids.dims2()?;
        if mi != m {
            bail!("{m} tokens but {mi} rows of topk ids")
        }
        let (e, n, _) = self.w13.dims3()?;
        let kw = self.hidden_size();
        if kw != k {
            bail!("hidden size {k} does not match the experts' {kw}")
        }
        Ok(ProblemSize {
            num_experts: e,
            m,
            n,
            k,
            top_k,
        })
    }
    fn apply(&self, args: &ExpertApplyArgs<'_>) -> Result<ExpertsOutput> {
        let p = self.problem_size(args.hidden_states, args.topk_ids)?;
        let block_size = align_block_size(
            args.hidden_states.device(),
            p.m,
            p.top_k,
            args.global_num_experts,
        );
        let routing = moe_align_block_size(
            args.topk_ids,
            block_size,
            args.global_num_experts,
            p.num_experts,
            args.expert_map,
        )?;
        let meta = match args.expert_tokens_meta {
            Some(m) => m.clone(),
            None => ExpertTokensMetadata::from_device(routing.expert_num_tokens()?)?,
        };
        let c1 = grouped_gemm(
            args.hidden_states,
            &self.w13,
            &routing,
            GroupedGemmArgs {
                row_div: p.top_k,
                bias: self.w13_bias.clone(),
                topk_weights: None,
                quant: self.w13_quant.clone(),
                act_quant_group: self.act_quant_group(),
            },
        )?;
        let c2 = act_and_mul(&c1, self.activation)?;
        // bf16 compute rounds the intermediate to bf16, as the reference
        // models do; the second GEMM then multiplies bf16 × bf16
        let c2 =
            if args.hidden_states.dtype() == candle_core::DType::BF16 && self.w2_quant.is_none() {
                c2.to_dtype(candle_core::DType::BF16)?
            } else {
                c2
            };
        let c3 = grouped_gemm(
            &c2,
            &self.w2,
            &routing,
            GroupedGemmArgs {
                row_div: 1,
                bias: self.w2_bias.clone(),
                topk_weights: None,
                quant: self.w2_quant.clone(),
                act_quant_group: self.act_quant_group(),
            },
        )?;
        Ok(ExpertsOutput {
            output: c3.reshape((p.m, p.top_k, p.k))?,
            expert_tokens_meta: Some(meta),
        })
    }
}
