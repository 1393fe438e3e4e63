//! The modular fused-MoE kernel (vLLM `modular_kernel.py`): a
//! [`PrepareAndFinalize`] (dispatch / combine, local or expert-parallel)
//! composed with an [`Experts`] implementation (the compute), passing
//! [`ExpertTokensMetadata`] between them.

pub mod experts;
pub mod kernel;
pub mod metadata;
pub mod prepare_finalize;
pub mod reference_experts;
pub mod weight_reduce;

pub use experts::{ExpertApplyArgs, Experts, GroupedGemmExperts, ProblemSize};
pub use kernel::FusedMoeKernel;
pub use metadata::ExpertTokensMetadata;
pub use prepare_finalize::{LocalPrepareAndFinalize, PrepareAndFinalize, Prepared};
pub use reference_experts::ReferenceExperts;
pub use weight_reduce::weight_and_reduce;
