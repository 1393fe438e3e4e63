//! `config.json` of Qwen2-MoE / Qwen3-MoE checkpoints as transformers 4.x and
//! 5.x write them (5.x: `rope_parameters.rope_theta`, `dtype`, `qkv_bias`,
//! Qwen3 `num_local_experts`). Unknown keys are ignored; a missing required key
//! is an error naming it.

use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Qwen1.5-MoE / Qwen2-MoE: q/k/v bias, shared expert with a sigmoid gate.
    Qwen2Moe,
    /// Qwen3-MoE: per-head RMSNorm on q and k, explicit head_dim, no bias.
    Qwen3Moe,
}

#[derive(Clone, Debug)]
pub struct QwenMoeConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Dense MLP size (layers in `mlp_only_layers` or off the sparse step).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// `rope_scaling` / `rope_parameters` (linear, yarn).
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub hidden_act: String,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// `dtype` / `torch_dtype` as written.
    pub dtype: Option<String>,
    /// `quantization_config` (native fp8 or compressed-tensors), if any.
    pub quantization_config: Option<candle_moe::quant::QuantizationConfig>,
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => {
            Err(ModelError::Config(format!("missing required key `{key}`")))
        }
        Some(x) => match x.as_u64() {
            // sizes index tensors with 32-bit ids on some paths
            Some(n) if n <= i32::MAX as u64 => Ok(n as usize),
            Some(n) => Err(ModelError::Config(format!(
                "`{key}` = {n} is out of range (at most {})",
                i32::MAX
            ))),
            None => Err(ModelError::Config(format!(
                "`{key}` must be a non-negative integer, got {x}"
            ))),
        },
    }
}

/// `key`'s value must lie in `lo..=hi`.
fn check_range(key: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if v < lo || v > hi {
        return Err(ModelError::Config(format!(
            "`{key}` = {v} is out of range ({lo}..={hi})"
        )));
    }
    Ok(())
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => req_usize(v, key).map(Some),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("`{key}` must be a number, got {x}"))),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("`{key}` must be a boolean, got {x}"))),
    }
}

/// `key` (`eos_token_id`, `bos_token_id`): one id, a list, or null; ids
/// must fit u32.
pub(crate) fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ModelError::Config(format!("`{key}`: {x} is not a token id (0..2^32)")))
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Keys whose meaning this loader does not implement: their presence with a
/// non-default value is an error naming the key, never silently ignored.
fn reject_unsupported(v: &Value) -> Result<()> {
    if opt_bool(v, "use_sliding_window")? == Some(true) {
        return Err(ModelError::Config(
            "`use_sliding_window` = true is not supported: attention here is full".into(),
        ));
    }
    Ok(())
}

impl QwenMoeConfig {
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s)
            .map_err(|e| ModelError::Config(format!("not valid JSON: {e}")))?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "" => {
                return Err(ModelError::Config(
                    "missing required key `model_type`".into(),
                ))
            }
            o => {
                return Err(ModelError::Config(format!(
                    "model_type `{o}` is not supported (qwen2_moe, qwen3_moe)"
                )))
            }
        };
        reject_unsupported(v)?;
        let max_position_embeddings = opt_usize(v, "max_position_embeddings")?.unwrap_or(32768);
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(ModelError::Config(
                "`num_attention_heads` must be positive".into(),
            ));
        }
        let num_key_value_heads =
            opt_usize(v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::Config(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = opt_usize(v, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        // 5.x: rope_parameters.rope_theta; 4.x: rope_theta
        let rope_theta = match v.get("rope_parameters").and_then(|r| r.get("rope_theta")) {
            Some(t) => t.as_f64().ok_or_else(|| {
                ModelError::Config(format!(
                    "`rope_parameters.rope_theta` must be a number, got {t}"
                ))
            })?,
            None => opt_f64(v, "rope_theta")?.unwrap_or(10000.0),
        };
        // 5.x Qwen3 writes num_local_experts
        let num_experts = match opt_usize(v, "num_experts")? {
            Some(n) => n,
            None => opt_usize(v, "num_local_experts")?
                .ok_or_else(|| ModelError::Config("missing required key `num_experts`".into()))?,
        };
        let attention_bias = match arch {
            // 4.x Qwen2-MoE always has q/k/v biases; 5.x writes qkv_bias
            Arch::Qwen2Moe => opt_bool(v, "qkv_bias")?.unwrap_or(true),
            Arch::Qwen3Moe => opt_bool(v, "attention_bias")?.unwrap_or(false),
        };
        let mlp_only_layers = match v.get("mlp_only_layers") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|x| x as usize).ok_or_else(|| {
                        ModelError::Config(format!(
                            "`mlp_only_layers` entries must be integers, got {x}"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            Some(x) => {
                return Err(ModelError::Config(format!(
                    "`mlp_only_layers` must be a list, got {x}"
                )))
            }
        };
        let cfg = Self {
            arch,
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: opt_usize(v, "intermediate_size")?.unwrap_or(0),
            num_hidden_layers: req_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rope_theta,
            rope_scaling: RopeScaling::from_config(v, max_position_embeddings)?,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            hidden_act: v
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu")
                .to_string(),
            moe_intermediate_size: req_usize(v, "moe_intermediate_size")?,
            shared_expert_intermediate_size: opt_usize(v, "shared_expert_intermediate_size")?
                .unwrap_or(0),
            num_experts,
            num_experts_per_tok: req_usize(v, "num_experts_per_tok")?,
            norm_topk_prob: opt_bool(v, "norm_topk_prob")?.unwrap_or(false),
            decoder_sparse_step: opt_usize(v, "decoder_sparse_step")?.unwrap_or(1).max(1),
            mlp_only_layers,
            eos_token_ids: token_ids(v, "eos_token_id")?,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            dtype: v
                .get("dtype")
                .or_else(|| v.get("torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            quantization_config: match v.get("quantization_config") {
                None | Some(Value::Null) => None,
                Some(q) => Some(
                    serde_json::from_value(q.clone())
                        .map_err(|e| ModelError::Config(format!("quantization_config: {e}")))?,
                ),
            },
        };
        check_range("hidden_size", cfg.hidden_size, 1, 1 << 20)?;
        check_range("head_dim", cfg.head_dim, 1, 1 << 12)?;
        check_range("vocab_size", cfg.vocab_size, 1, 1 << 24)?;
        check_range("num_hidden_layers", cfg.num_hidden_layers, 1, 1 << 12)?;
        check_range("num_attention_heads", cfg.num_attention_heads, 1, 1 << 12)?;
        check_range(
            "max_position_embeddings",
            cfg.max_position_embeddings,
            1,
            1 << 24,
        )?;
        check_range("num_experts", cfg.num_experts, 0, 1 << 16)?;
        check_range(
            "moe_intermediate_size",
            cfg.moe_intermediate_size,
            1,
            1 << 20,
        )?;
        check_range("intermediate_size", cfg.intermediate_size, 0, 1 << 20)?;
        check_range(
            "shared_expert_intermediate_size",
            cfg.shared_expert_intermediate_size,
            0,
            1 << 20,
        )?;
        if cfg.num_experts > 0 {
            check_range(
                "num_experts_per_tok",
                cfg.num_experts_per_tok,
                1,
                cfg.num_experts,
            )?;
        }
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0) {
            return Err(ModelError::Config(format!(
                "`rms_norm_eps` = {} must be a finite non-negative number",
                cfg.rms_norm_eps
            )));
        }
        if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
            return Err(ModelError::Config(format!(
                "`rope_theta` = {} must be a finite positive number",
                cfg.rope_theta
            )));
        }
        Ok(cfg)
    }

    /// The checkpoint's quantization scheme, if it is quantized.
    pub fn quant_scheme(&self) -> Result<Option<candle_moe::quant::QuantScheme>> {
        self.quantization_config
            .as_ref()
            .map(candle_moe::quant::QuantScheme::from_config)
            .transpose()
            .map_err(|e| ModelError::Config(e.to_string()))
    }

    /// The dtype the weights are stored in, from `dtype` / `torch_dtype`.
    pub fn stored_dtype(&self) -> Option<candle_core::DType> {
        match self.dtype.as_deref()? {
            "float32" => Some(candle_core::DType::F32),
            "bfloat16" => Some(candle_core::DType::BF16),
            "float16" => Some(candle_core::DType::F16),
            _ => None,
        }
    }

    /// Whether decoder layer `i` is an MoE layer (HF's rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }
}
