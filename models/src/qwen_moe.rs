//! Qwen1.5/Qwen2-MoE and Qwen3-MoE causal LMs. Every MoE layer is a
//! `candle_moe::SparseMoeBlock` (gate + FusedMoe, shared expert included);
//! nothing here does MoE math.

use crate::config::{Arch, QwenMoeConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvCacheShape};
use crate::layers::Attention;
use crate::model::{CausalLm, Logits, ModelInfo, SeqInput};
use crate::rope::RotaryEmbedding;
use candle_core::{DType, Device, Module, Tensor};
use candle_moe::dist::{Communicator, NaiveEpPrepareAndFinalize};
use candle_moe::ops::{residual_add, PagedAttentionMeta, SeqSpan};
use candle_moe::quant::{qlinear, QLinear, QuantScheme};
use candle_moe::{Activation, EpConfig, FusedMoeConfig, GatedMlp, SparseMoeBlock};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};

use std::sync::Arc;

#[derive(Clone, Debug)]
enum Mlp {
    Dense(GatedMlp),
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
    /// Quantize every other float linear on load too (attention, dense and
    /// shared MLPs, an untied `lm_head`; not the embeddings or the router):
    /// an on-load scheme (`QuantScheme::on_load("fp8" | "mxfp4")`).
    pub quant_dense: Option<QuantScheme>,
    /// Told after each decoder layer is loaded.
    pub progress: Option<LoadProgress>,
}

/// A callback `(layers loaded, layers)`, e.g. for a progress bar.
#[derive(Clone)]
pub struct LoadProgress(pub Arc<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress")
    }
}

impl DecoderLayer {
    fn new(
        cfg: &QwenMoeConfig,
        moe: &FusedMoeConfig,
        opts: &LoadOptions,
        i: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let quant = moe
            .quant
            .as_ref()
            .filter(|q| !q.is_on_load())
            .or(opts.quant_dense.as_ref());
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
            Mlp::Dense(GatedMlp::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                moe.activation,
                &vb.pp("mlp"),
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
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        cache: &(Tensor, Tensor),
        meta: &PagedAttentionMeta,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope_cs, cache, meta)?;
        let x = residual_add(x, &h)?;
        let y = self.post_attention_layernorm.forward(&x)?;
        let y = match &self.mlp {
            Mlp::Dense(m) => m.forward(&y)?,
            Mlp::Moe(m) => m.forward(&y)?,
        };
        residual_add(&x, &y)
    }
}

/// A Qwen-MoE causal LM ([`CausalLm`]: one forward over a flat batch of
/// tokens from many sequences, over a block KV cache).
#[derive(Clone, Debug)]
pub struct QwenMoeForCausalLM {
    cfg: QwenMoeConfig,
    info: ModelInfo,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: QLinear,
    rope: RotaryEmbedding,
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
        if let Some(q) = &opts.quant_dense {
            if !q.is_on_load() {
                return Err(ModelError::Config(
                    "quant_dense takes an on-load scheme (fp8 or mxfp4)".into(),
                ));
            }
            if cfg.quantization_config.is_some() {
                return Err(ModelError::Config(
                    "the checkpoint is already quantized; on-load quantization needs a float checkpoint".into(),
                ));
            }
            moe.dense_quant = Some(q.clone());
        }
        if let Some((ep, _)) = &opts.ep {
            moe.ep = ep.clone();
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = DecoderLayer::new(cfg, &moe, opts, i, m.pp("layers").pp(i));
                if let Some(p) = &opts.progress {
                    (p.0)(i + 1, cfg.num_hidden_layers);
                }
                l
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            QLinear::new(embed_tokens.embeddings().clone(), None)
        } else {
            let q = moe
                .quant
                .as_ref()
                .filter(|q| !q.is_on_load())
                .or(opts.quant_dense.as_ref());
            qlinear(cfg.hidden_size, cfg.vocab_size, false, &vb.pp("lm_head"), q)?
        };
        let info = ModelInfo {
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            kv: KvCacheShape {
                num_layers: cfg.num_hidden_layers,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            dtype: vb.dtype(),
            eos_token_ids: cfg.eos_token_ids.clone(),
        };
        Ok(Self {
            cfg: cfg.clone(),
            info,
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            rope: RotaryEmbedding::new(
                &cfg.rope_scaling,
                cfg.rope_theta,
                cfg.head_dim,
                cfg.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            embed_tokens,
            layers,
            lm_head,
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

    /// Bytes of weights a token reads outside the routed experts: every
    /// linear (attention, dense MLPs, routers, shared experts, `lm_head`),
    /// not the embeddings (one row per token).
    pub fn dense_weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.self_attn.weight_bytes()
                    + match &l.mlp {
                        Mlp::Dense(m) => m.weight_bytes(),
                        Mlp::Moe(b) => b.dense_weight_bytes(),
                    }
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Weight bytes one decode step of one sequence reads: the dense weights
    /// and `top_k` of the `num_experts` experts of every MoE layer (on
    /// average, for this rank's share).
    pub fn decode_bytes_per_token(&self) -> usize {
        let e = self.cfg.num_experts.max(1);
        self.dense_weight_bytes() + self.expert_weight_bytes() * self.cfg.num_experts_per_tok / e
    }

    pub fn config(&self) -> &QwenMoeConfig {
        &self.cfg
    }
}

impl CausalLm for QwenMoeForCausalLM {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, seqs: &[SeqInput<'_>], cache: &mut KvCache) -> Result<Tensor> {
        if cache.shape() != self.info.kv {
            return Err(ModelError::Input(format!(
                "kv cache shaped {:?}, the model needs {:?}",
                cache.shape(),
                self.info.kv
            )));
        }
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let start = s.table.len();
            let end = start + s.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "sequence {i}: length {end} exceeds max_position_embeddings {}",
                    self.cfg.max_position_embeddings
                )));
            }
            if let Some(&t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Input(format!(
                    "sequence {i}: token id {t} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
            let first = ids.len() as u32;
            ids.extend_from_slice(s.tokens);
            match s.logits {
                Logits::None => {}
                Logits::Last if !s.tokens.is_empty() => rows.push(ids.len() as u32 - 1),
                Logits::Last => {}
                Logits::All => rows.extend(first..ids.len() as u32),
            }
            spans.push(SeqSpan {
                start,
                len: s.tokens.len(),
                blocks: s.table.blocks(),
            });
        }
        let vocab = self.cfg.vocab_size;
        if ids.is_empty() {
            return Ok(Tensor::zeros((0, vocab), DType::F32, &self.device)?);
        }
        let meta = PagedAttentionMeta::new(cache.block_size(), cache.num_blocks(), &spans)?;
        let pos = Tensor::new(meta.positions(), &self.device)?;
        let rope_cs = self.rope.at(&pos)?;
        let mut x = self
            .embed_tokens
            .forward(&Tensor::new(ids.as_slice(), &self.device)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(kv) = cache.layer(i) else {
                return Err(ModelError::Input(format!("kv cache has no layer {i}")));
            };
            x = layer.forward(&x, &rope_cs, kv, &meta)?;
        }
        if rows.is_empty() {
            return Ok(Tensor::zeros((0, vocab), DType::F32, &self.device)?);
        }
        let x = if rows.len() == ids.len() {
            x
        } else {
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}
