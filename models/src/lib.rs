//! Model loaders on top of candle-moe: Qwen1.5/Qwen2-MoE and Qwen3-MoE from
//! Hugging Face checkpoints, with every MoE layer a `candle_moe::FusedMoe`.
//!
//! ```
//! use candle_moe_models::{Arch, QwenMoeConfig};
//! // transformers 5.x writes rope_parameters and (for Qwen3) num_local_experts
//! let cfg = QwenMoeConfig::from_json_str(r#"{
//!     "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64,
//!     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
//!     "head_dim": 24, "moe_intermediate_size": 32, "num_local_experts": 12,
//!     "num_experts_per_tok": 3, "norm_topk_prob": true,
//!     "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}
//! }"#)?;
//! assert_eq!((cfg.arch, cfg.num_experts, cfg.head_dim), (Arch::Qwen3Moe, 12, 24));
//! assert_eq!(cfg.rope_theta, 1e6);
//! # Ok::<(), candle_moe_models::ModelError>(())
//! ```

mod block_pool;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod generation;
pub mod gsm8k;
pub mod kv_cache;
pub mod layers;
pub mod memory;
pub mod model;
pub mod qwen_moe;
pub mod rope;
pub mod safetensors_out;
pub mod sampling;
pub mod save_quantized;
pub mod text;

pub use checkpoint::Checkpoint;
pub use config::{Arch, QwenMoeConfig};
pub use engine::{Engine, EngineConfig, FinishReason, RequestOutput, RequestParams};
pub use error::{ModelError, Result};
pub use generation::{generate, generate_batch_greedy, Generation, Session};
pub use kv_cache::{BlockTable, KvCache, KvCacheShape};
pub use model::{CausalLm, Logits, ModelInfo, SeqInput};
pub use qwen_moe::{LoadOptions, LoadProgress, QwenMoeForCausalLM};
pub use sampling::{Sampler, SamplingParams, TokenLogprob};
pub use text::{HfTokenizer, TextCodec};
