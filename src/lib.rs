//! candle-moe: vLLM-style fused Mixture-of-Experts for Candle.
//!
//! [`FusedMoe`] routes tokens ([`router`]), runs optional shared experts and
//! computes the routed experts through a [`modular`] kernel
//! (`PrepareAndFinalize` × `Experts`) built by a [`quant`] method. Expert
//! placement over expert-parallel ranks lives in [`expert_map`]. Every op
//! ([`ops`]) is a candle custom op with a CPU implementation; the tensor's
//! device picks the implementation at run time.

pub mod error;
pub mod expert_map;
pub mod layer;
pub mod modular;
pub mod ops;
pub mod quant;
pub mod router;

pub use error::{MoeError, Result};
pub use expert_map::{EpConfig, ExpertMapManager, PlacementStrategy};
pub use layer::{FusedMoe, FusedMoeConfig, SharedExperts, SparseMoeBlock};
pub use modular::{ExpertTokensMetadata, FusedMoeKernel};
pub use ops::{Activation, ScoringFunc};
pub use router::{Router, RouterConfig};
