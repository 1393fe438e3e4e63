//! Blocks shared by the Qwen-MoE decoders: attention over the block KV cache (GQA, optional q/k/v bias, optional per-head q/k
//! RMSNorm); the dense MLP is `candle_moe::GatedMlp`.

use crate::config::QwenMoeConfig;
use candle_core::{Module, Result, Tensor};
use candle_moe::ops::{paged_attention, write_kv, PagedAttentionMeta};
use candle_moe::quant::{qlinear, QLinear, QuantScheme};
use candle_nn::{rms_norm, RmsNorm, VarBuilder};

/// Rotates `x` (`[T, heads, D]`) by the rows `cs` of
/// [`crate::rope::RotaryEmbedding::at`].
fn rope(x: &Tensor, cs: &(Tensor, Tensor)) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &cs.0, &cs.1)?.squeeze(0)
}

#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(
        cfg: &QwenMoeConfig,
        qk_norm: bool,
        vb: VarBuilder,
        quant: Option<&QuantScheme>,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let b = cfg.attention_bias;
        let (q_norm, k_norm) = if qk_norm {
            (
                Some(rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: qlinear(h, nh * d, b, &vb.pp("q_proj"), quant)?,
            k_proj: qlinear(h, nkv * d, b, &vb.pp("k_proj"), quant)?,
            v_proj: qlinear(h, nkv * d, b, &vb.pp("v_proj"), quant)?,
            o_proj: qlinear(nh * d, h, false, &vb.pp("o_proj"), quant)?,
            q_norm,
            k_norm,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        })
    }

    /// Bytes of the projections' weights (and scales).
    pub fn weight_bytes(&self) -> usize {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .map(QLinear::weight_bytes)
            .iter()
            .sum()
    }

    /// `x` `[T, H]`, the batch's new tokens; writes their K/V into this
    /// layer's `cache` and attends over it.
    pub fn forward(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        cache: &(Tensor, Tensor),
        meta: &PagedAttentionMeta,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let d = self.head_dim;
        let q = self.q_proj.forward(x)?.reshape((t, self.heads, d))?;
        let k = self.k_proj.forward(x)?.reshape((t, self.kv_heads, d))?;
        let v = self.v_proj.forward(x)?.reshape((t, self.kv_heads, d))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = rope(&q, rope_cs)?;
        let k = rope(&k, rope_cs)?;
        write_kv(&cache.0, &cache.1, &k, &v, meta)?;
        let o = paged_attention(&q, &cache.0, &cache.1, meta, 1.0 / (d as f32).sqrt())?;
        self.o_proj.forward(&o.reshape((t, self.heads * d))?)
    }
}
