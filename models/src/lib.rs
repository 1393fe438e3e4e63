//! Model loaders on top of candle-moe: Qwen1.5/Qwen2-MoE and Qwen3-MoE from
//! Hugging Face checkpoints, with every MoE layer a `candle_moe::FusedMoe`.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
pub mod layers;
pub mod qwen_moe;

pub use checkpoint::Checkpoint;
pub use config::{Arch, QwenMoeConfig};
pub use error::{ModelError, Result};
pub use generation::{generate, generate_batch_greedy, Generation, Sampler, SamplingParams};
pub use qwen_moe::QwenMoeForCausalLM;
