//! Blocks shared by the Qwen-MoE decoders: rotary embedding, attention with a
//! KV cache (GQA, optional q/k/v bias, optional per-head q/k RMSNorm) and the
//! dense gated MLP.

use crate::config::QwenMoeConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_moe::quant::{qlinear, QLinear, QuantScheme};
use candle_nn::{rms_norm, RmsNorm, VarBuilder};

/// cos / sin tables of the non-interleaved ("rotate half") RoPE.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(cfg: &QwenMoeConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / d as f32))
            .collect();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, d / 2), dev)?;
        let pos = Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let f = pos.matmul(&inv)?;
        Ok(Self {
            cos: f.cos()?.to_dtype(dtype)?,
            sin: f.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `q`, `k` (`[B, heads, L, D]`) at `positions` (`[B, L]` U32).
    pub fn apply(&self, q: &Tensor, k: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, l, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, l, ()))?;
        let q = candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;
        Ok((q, k))
    }
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
    cache: Option<(Tensor, Tensor)>,
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
            cache: None,
        })
    }

    pub fn clear_cache(&mut self) {
        self.cache = None;
    }

    /// `x` `[B, L, H]`; `mask` additive `[B, 1, L, S]` (None = no masking needed).
    pub fn forward(
        &mut self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        positions: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let d = self.head_dim;
        let q = self.q_proj.forward(x)?.reshape((b, l, self.heads, d))?;
        let k = self.k_proj.forward(x)?.reshape((b, l, self.kv_heads, d))?;
        let v = self.v_proj.forward(x)?.reshape((b, l, self.kv_heads, d))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (q, k) = rope.apply(&q, &k, positions)?;
        let (k, v) = match &self.cache {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.cache = Some((k.clone(), v.clone()));
        let dt = x.dtype();
        // attention math in f32
        let rep = self.heads / self.kv_heads;
        let expand = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            if rep == 1 {
                return Ok(t);
            }
            let (b, kvh, s, d) = t.dims4()?;
            t.unsqueeze(2)?
                .expand((b, kvh, rep, s, d))?
                .reshape((b, kvh * rep, s, d))
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let q = q.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = p.matmul(&v.contiguous()?)?.to_dtype(dt)?;
        let o = o.transpose(1, 2)?.reshape((b, l, self.heads * d))?;
        self.o_proj.forward(&o)
    }
}

/// Dense gated MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Clone, Debug)]
pub struct DenseMlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
}

impl DenseMlp {
    pub fn new(
        hidden: usize,
        intermediate: usize,
        vb: VarBuilder,
        quant: Option<&QuantScheme>,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: qlinear(hidden, intermediate, false, &vb.pp("gate_proj"), quant)?,
            up_proj: qlinear(hidden, intermediate, false, &vb.pp("up_proj"), quant)?,
            down_proj: qlinear(intermediate, hidden, false, &vb.pp("down_proj"), quant)?,
        })
    }
}

impl Module for DenseMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

/// Additive mask `[B, 1, L, offset + L]`: causal, and key positions inside
/// each row's left padding masked out.
pub fn attention_mask(
    b: usize,
    l: usize,
    offset: usize,
    left_pad: &[usize],
    dev: &Device,
) -> Result<Tensor> {
    let s = offset + l;
    let mut m = vec![0f32; b * l * s];
    for bi in 0..b {
        let pad = left_pad.get(bi).copied().unwrap_or(0);
        for i in 0..l {
            for j in 0..s {
                if j > offset + i || j < pad {
                    // finite, as HF does: a row that sees only padding stays NaN-free
                    m[(bi * l + i) * s + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, s), dev)
}

/// Position ids `[B, L]`: `offset + i - pad[b]`, 0 inside the padding.
pub fn positions(
    b: usize,
    l: usize,
    offset: usize,
    left_pad: &[usize],
    dev: &Device,
) -> Result<Tensor> {
    let mut p = Vec::with_capacity(b * l);
    for bi in 0..b {
        let pad = left_pad.get(bi).copied().unwrap_or(0);
        for i in 0..l {
            p.push((offset + i).saturating_sub(pad) as u32);
        }
    }
    Tensor::from_vec(p, (b, l), dev)
}

pub(crate) fn last_position(x: &Tensor) -> Result<Tensor> {
    let l = x.dim(1)?;
    x.narrow(1, l - 1, 1)
}
