//! Experts written with plain candle ops (`index_select`, `matmul`,
//! `index_add`). It ignores any expert map (vLLM PR #43108: experts that
//! cannot use a map ignore it), so under expert parallelism it needs a
//! dispatch that delivers local ids; and since it uses no custom op it runs on
//! any device candle supports. It groups rows on the host: a reference, not a
//! fast path.

use super::experts::{ExpertApplyArgs, Experts, ExpertsOutput, ProblemSize};
use super::metadata::ExpertTokensMetadata;
use crate::ops::Activation;
use candle_core::{bail, DType, Result, Tensor};

#[derive(Clone, Debug)]
pub struct ReferenceExperts {
    /// `[E_local, 2I, H]`: gate rows, then up rows.
    w13: Tensor,
    /// `[E_local, H, I]`.
    w2: Tensor,
    activation: Activation,
}

impl ReferenceExperts {
    pub fn new(w13: Tensor, w2: Tensor, activation: Activation) -> Result<Self> {
        let (e, n2, h) = w13.dims3()?;
        let (e2, h2, i) = w2.dims3()?;
        if e != e2 || h != h2 || n2 != 2 * i {
            bail!(
                "expert weights disagree: w13 {:?}, w2 {:?}",
                w13.dims(),
                w2.dims()
            )
        }
        Ok(Self {
            w13: w13.to_dtype(DType::F32)?,
            w2: w2.to_dtype(DType::F32)?,
            activation,
        })
    }

    fn act(&self, gate: &Tensor) -> Result<Tensor> {
        match self.activation {
            Activation::Silu => candle_nn::ops::silu(gate),
            Activation::Gelu => gate.gelu_erf(),
            Activation::GeluTanh => gate.gelu(),
        }
    }
}

impl Experts for ReferenceExperts {
    fn name(&self) -> &'static str {
        "reference-candle-ops"
    }
    fn local_num_experts(&self) -> usize {
        self.w13.dims()[0]
    }
    fn weight_bytes(&self) -> usize {
        (self.w13.elem_count() + self.w2.elem_count()) * 4
    }
    fn problem_size(&self, a1: &Tensor, topk_ids: &Tensor) -> Result<ProblemSize> {
        let (m, k) = a1.dims2()?;
        let (mi, top_k) = topk_ids.dims2()?;
        if mi != m {
            bail!("{m} tokens but {mi} rows of topk ids")
        }
        let (e, n, kw) = self.w13.dims3()?;
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
        let dev = args.hidden_states.device();
        let ids = args.topk_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut rows: Vec<Vec<u32>> = vec![vec![]; p.num_experts];
        let mut slots: Vec<Vec<u32>> = vec![vec![]; p.num_experts];
        for (t, r) in ids.iter().enumerate() {
            for (j, &e) in r.iter().enumerate() {
                let Some(rs) = rows.get_mut(e as usize) else {
                    bail!("topk id {e} is not a local expert (0..{})", p.num_experts)
                };
                rs.push(t as u32);
                slots[e as usize].push((t * p.top_k + j) as u32);
            }
        }
        let a = args.hidden_states.to_dtype(DType::F32)?;
        let i = p.n / 2;
        let mut out = Tensor::zeros((p.m * p.top_k, p.k), DType::F32, dev)?;
        for (e, (r, s)) in rows.iter().zip(&slots).enumerate() {
            if r.is_empty() {
                continue;
            }
            let x = a.index_select(&Tensor::new(r.as_slice(), dev)?, 0)?;
            let h = x.matmul(&self.w13.get(e)?.t()?)?;
            let act = (self.act(&h.narrow(1, 0, i)?)? * h.narrow(1, i, i)?)?;
            let y = act.matmul(&self.w2.get(e)?.t()?)?;
            out = out.index_add(&Tensor::new(s.as_slice(), dev)?, &y, 0)?;
        }
        let counts: Vec<u32> = rows.iter().map(|r| r.len() as u32).collect();
        Ok(ExpertsOutput {
            output: out.reshape((p.m, p.top_k, p.k))?,
            expert_tokens_meta: Some(ExpertTokensMetadata::from_device(Tensor::new(
                counts.as_slice(),
                dev,
            )?)?),
        })
    }
}
