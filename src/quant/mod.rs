//! Quant methods: what an MoE layer loads from a checkpoint, how it repacks
//! it, and which [`Experts`] implementation computes with it.

pub mod fp8;
pub mod linear;
pub(crate) mod loading;
pub mod mxfp4;
pub mod scheme;
pub mod unquantized;

pub use fp8::Fp8;
pub use linear::{qlinear, QLinear};
pub use mxfp4::Mxfp4;
pub use scheme::{QuantScheme, QuantizationConfig};
pub use unquantized::Unquantized;

use crate::error::Result;
use crate::modular::{Experts, FusedMoeKernel, PrepareAndFinalize};
use crate::names::ExpertNames;
use crate::ops::Activation;
use candle_core::DType;
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Shape of one MoE layer's experts.
#[derive(Clone, Debug)]
pub struct ExpertLayerSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub global_num_experts: usize,
    pub has_bias: bool,
    pub activation: Activation,
    /// The experts' tensor names (relative to the `experts` prefix).
    pub names: ExpertNames,
}

/// One checkpoint tensor a quant method reads (name relative to the layer's
/// `experts` prefix; `{e}` stands for the expert index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// `None`: any float dtype, converted to the layer's dtype.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
}

pub trait QuantMethod: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// The per-expert tensors this method reads.
    fn expert_tensors(&self, spec: &ExpertLayerSpec) -> Vec<TensorSpec>;

    /// Loads the experts in `local_ids` (global ids, in local order) from
    /// `vb` (the layer's `experts` prefix), one expert at a time, and builds
    /// the experts implementation that owns them.
    fn create_experts(
        &self,
        spec: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> Result<Arc<dyn Experts>>;

    /// The modular kernel for these experts behind `prepare_finalize`.
    fn build_kernel(
        &self,
        experts: Arc<dyn Experts>,
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
    ) -> Result<FusedMoeKernel> {
        Ok(FusedMoeKernel::new(prepare_finalize, experts)?)
    }
}
