//! `FusedMoe`: routing, optional shared experts and the routed experts
//! through the modular kernel; `SparseMoeBlock` adds the gate linear and is a
//! `candle_nn::Module`.

use crate::error::{MoeError, Result};
use crate::expert_map::{EpConfig, ExpertMapManager};
use crate::modular::{
    ExpertTokensMetadata, FusedMoeKernel, LocalPrepareAndFinalize, PrepareAndFinalize,
};
use crate::names::{MoeNames, ProjNames};
use crate::ops::{Activation, ScoringFunc};
use crate::quant::{qlinear, ExpertLayerSpec, QLinear, QuantMethod, QuantScheme, Unquantized};
use crate::router::{Router, RouterConfig};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use std::sync::Arc;

/// Everything a fused MoE layer needs to know (not tied to one checkpoint
/// format: model loaders map their config.json onto it).
#[derive(Clone, Debug)]
pub struct FusedMoeConfig {
    pub hidden_size: usize,
    /// Per-expert intermediate size (HF `moe_intermediate_size`).
    pub intermediate_size: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// HF `norm_topk_prob`.
    pub renormalize: bool,
    pub scoring: ScoringFunc,
    pub num_expert_group: Option<usize>,
    pub topk_group: Option<usize>,
    /// Load `e_score_correction_bias` `[E]` (selection-only bias).
    pub use_correction_bias: bool,
    pub routed_scaling_factor: f64,
    pub activation: Activation,
    /// Experts have biases.
    pub has_bias: bool,
    /// Load the experts in this dtype instead of the VarBuilder's: e.g. keep a
    /// bf16 checkpoint's experts in bf16 (half the memory, read as bf16 by the
    /// kernels) while the rest of the model computes in f32 on CPU.
    pub expert_dtype: Option<DType>,
    /// Qwen2-MoE style shared expert of this intermediate size...
    pub shared_expert_intermediate_size: Option<usize>,
    /// ...gated by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert_gate: bool,
    pub ep: EpConfig,
    /// Quantized experts (and shared-expert linears) of the checkpoint, or
    /// float experts quantized on load; `None`: float experts.
    pub quant: Option<QuantScheme>,
    /// Quantize the shared expert's float linears on load (an on-load
    /// scheme, e.g. `QuantScheme::on_load("fp8")`); `None`: as `quant`
    /// prescribes for a quantized checkpoint, float otherwise.
    pub dense_quant: Option<QuantScheme>,
    /// The block's tensor names (transformers' Qwen-MoE names by default).
    pub names: MoeNames,
}

impl FusedMoeConfig {
    pub fn new(
        hidden_size: usize,
        intermediate_size: usize,
        num_experts: usize,
        top_k: usize,
    ) -> Self {
        Self {
            hidden_size,
            intermediate_size,
            num_experts,
            top_k,
            renormalize: false,
            scoring: ScoringFunc::Softmax,
            num_expert_group: None,
            topk_group: None,
            use_correction_bias: false,
            routed_scaling_factor: 1.0,
            activation: Activation::Silu,
            has_bias: false,
            expert_dtype: None,
            shared_expert_intermediate_size: None,
            shared_expert_gate: true,
            ep: EpConfig::default(),
            quant: None,
            dense_quant: None,
            names: MoeNames::default(),
        }
    }

    /// The experts' quant method: `quant`'s, or unquantized.
    pub fn expert_method(&self) -> Arc<dyn QuantMethod> {
        match &self.quant {
            Some(q) => q.expert_method(),
            None => Arc::new(Unquantized),
        }
    }

    fn router_config(&self) -> RouterConfig {
        RouterConfig {
            num_experts: self.num_experts,
            top_k: self.top_k,
            renormalize: self.renormalize,
            scoring: self.scoring,
            num_expert_group: self.num_expert_group,
            topk_group: self.topk_group,
            routed_scaling_factor: self.routed_scaling_factor,
        }
    }

    fn expert_spec(&self) -> ExpertLayerSpec {
        ExpertLayerSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            global_num_experts: self.num_experts,
            has_bias: self.has_bias,
            activation: self.activation,
            names: self.names.expert.clone(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.hidden_size == 0 || self.intermediate_size == 0 {
            return Err(MoeError::config(
                "hidden_size and intermediate_size must be positive",
            ));
        }
        self.router_config().validate()
    }
}

/// A dense gated MLP: `down(act(gate(x)) · up(x))`, weights under
/// `gate_proj`, `up_proj`, `down_proj` (the decoders' dense MLPs and the MoE
/// blocks' shared experts).
#[derive(Clone, Debug)]
pub struct GatedMlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
    activation: Activation,
}

impl GatedMlp {
    /// `vb` at the MLP's prefix; `scheme` reads quantized linears where the
    /// checkpoint has them (or quantizes float ones on load).
    pub fn new(
        hidden: usize,
        intermediate: usize,
        activation: Activation,
        vb: &VarBuilder,
        scheme: Option<&QuantScheme>,
    ) -> Result<Self> {
        Self::with_names(
            hidden,
            intermediate,
            activation,
            vb,
            scheme,
            &ProjNames::default(),
        )
    }

    /// As `new`, the linears under `names`.
    pub fn with_names(
        hidden: usize,
        intermediate: usize,
        activation: Activation,
        vb: &VarBuilder,
        scheme: Option<&QuantScheme>,
        names: &ProjNames,
    ) -> Result<Self> {
        let lin = |i, o, name: &str| qlinear(i, o, false, &vb.pp(name), scheme);
        Ok(Self {
            gate_proj: lin(hidden, intermediate, &names.gate)?,
            up_proj: lin(hidden, intermediate, &names.up)?,
            down_proj: lin(intermediate, hidden, &names.down)?,
            activation,
        })
    }

    /// Bytes of weights (and scales) held.
    pub fn weight_bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .map(QLinear::weight_bytes)
            .iter()
            .sum()
    }
}

impl Module for GatedMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let g = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::Gelu => g.gelu_erf()?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

/// Qwen2-MoE's shared expert: a [`GatedMlp`] every token goes through,
/// optionally scaled by `sigmoid(shared_expert_gate(x))`.
#[derive(Clone, Debug)]
pub struct SharedExperts {
    mlp: GatedMlp,
    /// `shared_expert_gate` (`[1, H]`).
    gate: Option<QLinear>,
}

impl SharedExperts {
    /// `vb` is the MoE block's prefix: weights under `shared_expert.*` and
    /// `shared_expert_gate.weight`, as in Qwen2-MoE checkpoints (other names:
    /// [`Self::new_quantized`]).
    pub fn new(
        hidden: usize,
        intermediate: usize,
        activation: Activation,
        gated: bool,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let names = MoeNames::default();
        Self::new_quantized(hidden, intermediate, activation, gated, vb, None, &names)
    }

    /// As `new`, reading quantized linears where the checkpoint has them,
    /// under `names`' shared-expert names.
    pub fn new_quantized(
        hidden: usize,
        intermediate: usize,
        activation: Activation,
        gated: bool,
        vb: &VarBuilder,
        scheme: Option<&QuantScheme>,
        names: &MoeNames,
    ) -> Result<Self> {
        let mlp = GatedMlp::with_names(
            hidden,
            intermediate,
            activation,
            &vb.pp(&names.shared_expert),
            scheme,
            &names.shared_proj,
        )?;
        let gate = if gated {
            Some(qlinear(
                hidden,
                1,
                false,
                &vb.pp(&names.shared_expert_gate),
                scheme,
            )?)
        } else {
            None
        };
        Ok(Self { mlp, gate })
    }

    /// Bytes of weights (and scales) held.
    pub fn weight_bytes(&self) -> usize {
        self.mlp.weight_bytes() + self.gate.as_ref().map_or(0, QLinear::weight_bytes)
    }

    /// `y + forward(x)` in one pass over the rows (the gate's sigmoid and
    /// product included). In bf16 / f16 it rounds once where `forward`
    /// followed by `+` rounds after each op (as candle and transformers do).
    pub fn add_to(&self, y: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.mlp.forward(x)?;
        match &self.gate {
            None => crate::ops::residual_add(y, &s),
            Some(gate) => crate::ops::gated_residual_add(y, &s, &gate.forward(x)?),
        }
    }
}

impl Module for SharedExperts {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.mlp.forward(x)?;
        match &self.gate {
            None => Ok(y),
            Some(gate) => y.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?),
        }
    }
}

/// The fused MoE layer.
#[derive(Clone, Debug)]
pub struct FusedMoe {
    cfg: FusedMoeConfig,
    router: Router,
    expert_map: ExpertMapManager,
    quant: Arc<dyn QuantMethod>,
    kernel: FusedMoeKernel,
    shared: Option<SharedExperts>,
}

impl FusedMoe {
    /// Experts from `vb` (the MoE block prefix, e.g. `model.layers.3.mlp`):
    /// `experts.{e}.{gate,up,down}_proj.weight` or the fused
    /// `experts.gate_up_proj` / `experts.down_proj` (or the names in
    /// `cfg.names`), or the quantized tensors of `cfg.quant`.
    pub fn new(cfg: &FusedMoeConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_quant(
            cfg,
            vb,
            cfg.expert_method(),
            Arc::new(LocalPrepareAndFinalize),
        )
    }

    pub fn with_quant(
        cfg: &FusedMoeConfig,
        vb: VarBuilder,
        quant: Arc<dyn QuantMethod>,
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
    ) -> Result<Self> {
        cfg.validate()?;
        let expert_map =
            ExpertMapManager::new(cfg.num_experts, cfg.top_k, cfg.ep.clone(), vb.device())?;
        let bias = if cfg.use_correction_bias {
            let name = &cfg.names.correction_bias;
            let b = vb
                .get_with_hints_dtype(cfg.num_experts, name, Default::default(), DType::F32)
                .map_err(|e| MoeError::weight(format!("{}.{name}", vb.prefix()), e.to_string()))?;
            Some(b)
        } else {
            None
        };
        let router = Router::new(cfg.router_config(), bias)?;
        let kernel = Self::load_kernel(cfg, &vb, &expert_map, quant.as_ref(), prepare_finalize)?;
        let shared = match cfg.shared_expert_intermediate_size {
            Some(i) => Some(SharedExperts::new_quantized(
                cfg.hidden_size,
                i,
                cfg.activation,
                cfg.shared_expert_gate,
                &vb,
                cfg.quant
                    .as_ref()
                    .filter(|q| !q.is_on_load())
                    .or(cfg.dense_quant.as_ref()),
                &cfg.names,
            )?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            router,
            expert_map,
            quant,
            kernel,
            shared,
        })
    }

    /// Loads this rank's experts (one at a time) and builds the kernel.
    fn load_kernel(
        cfg: &FusedMoeConfig,
        vb: &VarBuilder,
        expert_map: &ExpertMapManager,
        quant: &dyn QuantMethod,
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
    ) -> Result<FusedMoeKernel> {
        let vb_experts = match cfg.expert_dtype {
            Some(dt) => vb.pp(&cfg.names.experts).set_dtype(dt),
            None => vb.pp(&cfg.names.experts),
        };
        let experts = quant.create_experts(
            &cfg.expert_spec(),
            &vb_experts,
            &expert_map.local_expert_ids(),
        )?;
        quant.build_kernel(experts, prepare_finalize)
    }

    /// Moves the layer to a new expert-parallel topology (e.g. ep 2 → 4):
    /// recomputes the map and tables, then reloads this rank's experts from
    /// `vb` (the same prefix as at construction) behind `prepare_finalize`.
    /// On error the layer is unchanged.
    pub fn update_ep(
        &mut self,
        ep_size: usize,
        ep_rank: usize,
        vb: &VarBuilder,
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
    ) -> Result<()> {
        let mut map = self.expert_map.clone();
        map.update(ep_size, ep_rank)?;
        let mut cfg = self.cfg.clone();
        cfg.ep.ep_size = ep_size;
        cfg.ep.ep_rank = ep_rank;
        // the old share stays until the new one has loaded, so a failure leaves
        // a working layer (transiently 1/ep_old + 1/ep_new of the experts)
        self.kernel = Self::load_kernel(&cfg, vb, &map, self.quant.as_ref(), prepare_finalize)?;
        self.expert_map = map;
        self.cfg = cfg;
        Ok(())
    }

    pub fn config(&self) -> &FusedMoeConfig {
        &self.cfg
    }
    pub fn router(&self) -> &Router {
        &self.router
    }
    pub fn expert_map_manager(&self) -> &ExpertMapManager {
        &self.expert_map
    }
    pub fn kernel(&self) -> &FusedMoeKernel {
        &self.kernel
    }
    pub fn quant_method(&self) -> &Arc<dyn QuantMethod> {
        &self.quant
    }

    /// `hidden` `[T, H]` or `[B, S, H]`, `router_logits` `[T, E]` or
    /// `[B, S, E]`; returns the shape of `hidden`.
    pub fn forward(&self, hidden: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_metadata(hidden, router_logits)?.0)
    }

    /// As `forward`, also returning the per-local-expert token counts.
    pub fn forward_with_metadata(
        &self,
        hidden: &Tensor,
        router_logits: &Tensor,
    ) -> Result<(Tensor, Option<ExpertTokensMetadata>)> {
        let dims = hidden.dims().to_vec();
        let h = *dims
            .last()
            .ok_or_else(|| MoeError::input("hidden states must not be a scalar"))?;
        if h != self.cfg.hidden_size || !(2..=3).contains(&dims.len()) {
            return Err(MoeError::input(format!(
                "hidden states must be [T, {0}] or [B, S, {0}], got {dims:?}",
                self.cfg.hidden_size
            )));
        }
        let t = hidden.elem_count() / h;
        let e = self.cfg.num_experts;
        if router_logits.elem_count() != t * e || router_logits.dims().last() != Some(&e) {
            return Err(MoeError::input(format!(
                "router logits {:?} do not match {t} tokens × {e} experts",
                router_logits.dims()
            )));
        }
        // with expert parallelism a rank without tokens still joins the collectives
        if t == 0 && self.kernel.prepare_finalize().num_dispatchers() == 1 {
            return Ok((hidden.zeros_like()?, None));
        }
        let x = hidden.reshape((t, h))?;
        let logits = router_logits.reshape((t, e))?;
        let (weights, ids) = self.router.route(&logits)?;
        let (mut y, meta) = self.kernel.forward_with_metadata(
            &x,
            &weights,
            &ids,
            self.cfg.num_experts,
            self.expert_map.expert_map(),
        )?;
        if let Some(shared) = &self.shared {
            y = shared.add_to(&y, &x)?;
        }
        Ok((y.reshape(dims)?, meta))
    }
}

/// Gate linear + [`FusedMoe`]: the MoE MLP of a decoder layer, its tensors
/// under `cfg.names` (transformers' `gate`, `experts`, `shared_expert`,
/// `shared_expert_gate` by default).
#[derive(Clone, Debug)]
pub struct SparseMoeBlock {
    gate: QLinear,
    moe: FusedMoe,
}

impl SparseMoeBlock {
    pub fn new(cfg: &FusedMoeConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_prepare_finalize(cfg, vb, Arc::new(LocalPrepareAndFinalize))
    }

    /// As `new`, with the routed experts behind `prepare_finalize` (e.g. the
    /// naive expert-parallel dispatch of [`crate::dist`]).
    pub fn with_prepare_finalize(
        cfg: &FusedMoeConfig,
        vb: VarBuilder,
        prepare_finalize: Arc<dyn PrepareAndFinalize>,
    ) -> Result<Self> {
        // the router stays float: routing decisions are sensitive to it
        let gate = qlinear(
            cfg.hidden_size,
            cfg.num_experts,
            false,
            &vb.pp(&cfg.names.gate),
            None,
        )?;
        Ok(Self {
            gate,
            moe: FusedMoe::with_quant(cfg, vb, cfg.expert_method(), prepare_finalize)?,
        })
    }

    pub fn from_parts(gate: Linear, moe: FusedMoe) -> Self {
        Self {
            gate: QLinear::new(gate.weight().clone(), gate.bias().cloned()),
            moe,
        }
    }

    pub fn moe(&self) -> &FusedMoe {
        &self.moe
    }

    /// Bytes every token reads outside the routed experts: the router gate
    /// and the shared expert.
    pub fn dense_weight_bytes(&self) -> usize {
        self.gate.weight_bytes()
            + self
                .moe
                .shared
                .as_ref()
                .map_or(0, SharedExperts::weight_bytes)
    }
}

impl Module for SparseMoeBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.gate.forward(xs)?;
        Ok(self.moe.forward(xs, &logits)?)
    }
}
