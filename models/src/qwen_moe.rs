//! Qwen1.5/Qwen2-MoE and Qwen3-MoE causal LMs. Every MoE layer is a
//! `candle_moe::SparseMoeBlock` (gate + FusedMoe, shared expert included);
//! nothing here does MoE math.

use crate::config::{Arch, QwenMoeConfig};
use crate::error::{ModelError, Result};
use crate::layers::{
    attention_mask, last_position, positions, Attention, DenseMlp, RotaryEmbedding,
};
use candle_core::{DType, Device, Module, Tensor};
use candle_moe::dist::{Communicator, NaiveEpPrepareAndFinalize};
use candle_moe::quant::{qlinear, QLinear, QuantScheme};
use candle_moe::{Activation, EpConfig, FusedMoeConfig, SparseMoeBlock};
use candle_nn::{embedding, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

/// The output projection: the embeddings (tied) or its own, possibly
/// quantized, weight.
#[derive(Clone, Debug)]
enum QLinearOrTied {
    Tied(Linear),
    Own(QLinear),
}

impl Module for QLinearOrTied {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Tied(l) => l.forward(x),
            Self::Own(l) => l.forward(x),
        }
    }
}
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Mlp {
    Dense(DenseMlp),
    Moe(Box<SparseMoeBlock>),
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// The layer's FusedMoe settings from config.json.
pub fn moe_config(cfg: &QwenMoeConfig) -> Result<FusedMoeConfig> {
    let mut m = FusedMoeConfig::new(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
    );
    m.renormalize = cfg.norm_topk_prob;
    m.activation = cfg
        .hidden_act
        .parse::<Activation>()
        .map_err(|e| ModelError::Config(format!("hidden_act: {e}")))?;
    if cfg.arch == Arch::Qwen2Moe && cfg.shared_expert_intermediate_size > 0 {
        m.shared_expert_intermediate_size = Some(cfg.shared_expert_intermediate_size);
        m.shared_expert_gate = true;
    }
    Ok(m)
}

/// How a model is loaded beyond its config.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Hold the routed experts in this dtype (see `FusedMoeConfig::expert_dtype`).
    pub expert_dtype: Option<DType>,
    /// Expert parallelism: this rank's place and the group's communicator.
    /// Each rank loads only its experts; dense weights are replicated.
    pub ep: Option<(EpConfig, Arc<dyn Communicator>)>,
    /// Quantize the float experts while loading (`QuantScheme::on_load`), or
    /// override how a quantized checkpoint is computed (e.g.
    /// `Fp8::weight_only` for W8A16). `None`: the checkpoint's own
    /// `quantization_config`, if any.
    pub quant: Option<QuantScheme>,
}

impl DecoderLayer {
    fn new(
        cfg: &QwenMoeConfig,
        moe: &FusedMoeConfig,
        opts: &LoadOptions,
        i: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let quant = moe.quant.as_ref().filter(|q| !q.is_on_load());
        let mlp = if cfg.is_moe_layer(i) {
            let block = match &opts.ep {
                None => SparseMoeBlock::new(moe, vb.pp("mlp"))?,
                Some((_, comm)) => SparseMoeBlock::with_prepare_finalize(
                    moe,
                    vb.pp("mlp"),
                    Arc::new(NaiveEpPrepareAndFinalize::new(comm.clone())),
                )?,
            };
            Mlp::Moe(Box::new(block))
        } else {
            Mlp::Dense(DenseMlp::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("mlp"),
                quant,
            )?)
        };
        Ok(Self {
            self_attn: Attention::new(cfg, cfg.arch == Arch::Qwen3Moe, vb.pp("self_attn"), quant)?,
            mlp,
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &mut self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        pos: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, pos, mask)?;
        let x = (x + h)?;
        let y = self.post_attention_layernorm.forward(&x)?;
        let y = match &self.mlp {
            Mlp::Dense(m) => m.forward(&y)?,
            Mlp::Moe(m) => m.forward(&y)?,
        };
        x + y
    }
}

/// A Qwen-MoE causal LM with a KV cache. Sequences of one batch share a
/// length; shorter prompts are left-padded and their padding masked.
#[derive(Clone, Debug)]
pub struct QwenMoeForCausalLM {
    cfg: QwenMoeConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: QLinearOrTied,
    rope: RotaryEmbedding,
    left_pad: Vec<usize>,
    seqlen_offset: usize,
    device: Device,
}

impl QwenMoeForCausalLM {
    /// `vb` at the checkpoint root (`model.*`, `lm_head.weight`).
    pub fn new(cfg: &QwenMoeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_expert_dtype(cfg, vb, None)
    }

    /// As `new`, with the routed experts held in `expert_dtype` (see
    /// [`candle_moe::FusedMoeConfig::expert_dtype`]).
    pub fn new_with_expert_dtype(
        cfg: &QwenMoeConfig,
        vb: VarBuilder,
        expert_dtype: Option<DType>,
    ) -> Result<Self> {
        Self::new_with_options(
            cfg,
            vb,
            &LoadOptions {
                expert_dtype,
                ..Default::default()
            },
        )
    }

    /// As `new`, with [`LoadOptions`] (expert dtype, expert parallelism).
    pub fn new_with_options(
        cfg: &QwenMoeConfig,
        vb: VarBuilder,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let mut moe = moe_config(cfg)?;
        moe.expert_dtype = opts.expert_dtype;
        moe.quant = match &opts.quant {
            Some(q) if q.is_on_load() => {
                if cfg.quantization_config.is_some() {
                    return Err(ModelError::Config(
                        "the checkpoint is already quantized; on-load quantization needs a float checkpoint".into(),
                    ));
                }
                // quantize from the stored values, rounding as the tools do
                // for a model of the stored dtype
                if moe.expert_dtype.is_none() {
                    moe.expert_dtype = cfg.stored_dtype();
                }
                Some(q.clone())
            }
            // how to read and compute the checkpoint's quantized tensors
            // (e.g. FP8 weight-only instead of W8A8)
            Some(q) => Some(q.clone()),
            None => cfg.quant_scheme()?,
        };
        if let Some((ep, _)) = &opts.ep {
            moe.ep = ep.clone();
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, &moe, opts, i, m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            QLinearOrTied::Tied(Linear::new(embed_tokens.embeddings().clone(), None))
        } else {
            let q = moe.quant.as_ref().filter(|q| !q.is_on_load());
            QLinearOrTied::Own(qlinear(
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                &vb.pp("lm_head"),
                q,
            )?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            rope: RotaryEmbedding::new(cfg, vb.dtype(), vb.device())?,
            embed_tokens,
            layers,
            lm_head,
            left_pad: vec![],
            seqlen_offset: 0,
            device: vb.device().clone(),
        })
    }

    /// The MoE layers' blocks (gate + FusedMoe), in layer order.
    pub fn moe_blocks(&self) -> impl Iterator<Item = &SparseMoeBlock> {
        self.layers.iter().filter_map(|l| match &l.mlp {
            Mlp::Moe(m) => Some(m.as_ref()),
            Mlp::Dense(_) => None,
        })
    }

    /// Bytes of routed-expert weights (scales included) this model holds.
    pub fn expert_weight_bytes(&self) -> usize {
        self.moe_blocks()
            .map(|b| b.moe().kernel().experts().weight_bytes())
            .sum()
    }

    pub fn config(&self) -> &QwenMoeConfig {
        &self.cfg
    }

    /// Forgets the KV cache; the next `forward` starts new sequences.
    pub fn clear_kv_cache(&mut self) {
        self.layers
            .iter_mut()
            .for_each(|l| l.self_attn.clear_cache());
        self.left_pad.clear();
        self.seqlen_offset = 0;
    }

    /// Starts a batch whose row `b` has `left_pad[b]` padding tokens in front.
    pub fn start_batch(&mut self, left_pad: &[usize]) {
        self.clear_kv_cache();
        self.left_pad = left_pad.to_vec();
    }

    pub fn seqlen_offset(&self) -> usize {
        self.seqlen_offset
    }

    /// Feeds `input_ids` (`[B, L]` U32) after what the cache holds; returns
    /// F32 logits `[B, L, V]`, or `[B, 1, V]` for the last position only.
    pub fn forward(&mut self, input_ids: &Tensor, last_only: bool) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l == 0 {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "empty input".into(),
            )));
        }
        let offset = self.seqlen_offset;
        if offset + l > self.cfg.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                offset + l,
                self.cfg.max_position_embeddings
            )));
        }
        if self.left_pad.len() != b {
            self.left_pad.resize(b, 0);
        }
        let pos = positions(b, l, offset, &self.left_pad, &self.device)?;
        let needs_mask = l > 1 || self.left_pad.iter().any(|&p| p > 0);
        let mask = if needs_mask {
            Some(attention_mask(b, l, offset, &self.left_pad, &self.device)?)
        } else {
            None
        };
        let mut x = self.embed_tokens.forward(input_ids)?;
        for layer in self.layers.iter_mut() {
            x = layer.forward(&x, &self.rope, &pos, mask.as_ref())?;
        }
        self.seqlen_offset += l;
        let x = if last_only { last_position(&x)? } else { x };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}
