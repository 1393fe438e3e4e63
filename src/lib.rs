//! candle-moe: vLLM-style fused Mixture-of-Experts for Candle.
//!
//! [`FusedMoe`] routes tokens ([`router`]), runs optional shared experts and
//! computes the routed experts through a [`modular`] kernel
//! (`PrepareAndFinalize` × `Experts`) built by a [`quant`] method. Expert
//! placement over expert-parallel ranks lives in [`expert_map`]. Every op
//! ([`ops`]) is a candle custom op with a CPU implementation; the tensor's
//! device picks the implementation at run time.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_moe::{FusedMoe, FusedMoeConfig};
//! use candle_nn::VarBuilder;
//! use std::collections::HashMap;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let (h, i, e) = (8, 4, 4);
//! // an MoE block in the transformers 5.x fused layout (per-expert tensors work too)
//! let vb = VarBuilder::from_tensors(
//!     HashMap::from([
//!         ("experts.gate_up_proj".to_string(), Tensor::ones((e, 2 * i, h), DType::F32, &dev)?),
//!         ("experts.down_proj".to_string(), Tensor::ones((e, h, i), DType::F32, &dev)?),
//!     ]),
//!     DType::F32,
//!     &dev,
//! );
//! let mut cfg = FusedMoeConfig::new(h, i, e, 2);
//! cfg.renormalize = true;
//! let moe = FusedMoe::new(&cfg, vb)?;
//! let x = Tensor::full(0.1f32, (3, h), &dev)?;
//! let logits = Tensor::zeros((3, e), DType::F32, &dev)?;
//! let y = moe.forward(&x, &logits)?;
//! assert_eq!(y.dims(), &[3, h]);
//! // every expert computes silu(0.8)·0.8 per intermediate unit, summed over 4 units
//! let want = 4.0 * 0.8 / (1.0 + (-0.8f32).exp()) * 0.8;
//! assert!((y.to_vec2::<f32>()?[0][0] - want).abs() < 1e-5);
//! # Ok(())
//! # }
//! ```

pub mod cpu_features;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod dist;
pub mod error;
pub mod expert_map;
pub mod format;
pub mod huge_pages;
pub mod layer;
pub mod modular;
pub mod names;
pub mod ops;
pub mod quant;
pub mod router;

pub use cpu_features::{cpu_features, CpuFeatures};
pub use error::{MoeError, Result};
pub use expert_map::{EpConfig, ExpertMapManager, PlacementStrategy};
pub use huge_pages::HugePageAlloc;
pub use layer::{FusedMoe, FusedMoeConfig, GatedMlp, SharedExperts, SparseMoeBlock};
pub use modular::{ExpertTokensMetadata, FusedMoeKernel};
pub use names::{ExpertNames, MoeNames, ProjNames};
pub use ops::{Activation, ScoringFunc};
pub use router::{Router, RouterConfig};
