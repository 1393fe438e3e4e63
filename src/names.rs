//! Tensor names of an MoE block, relative to its prefix (e.g.
//! `model.layers.3.mlp`). The defaults are transformers' Qwen2/3-MoE names;
//! a model file states its own (Mixtral's `w1` / `w3` / `w2`, DeepSeek's
//! plural `shared_experts` and `gate.e_score_correction_bias`), so a new
//! architecture is a config and one file, not a copy of the loaders.

/// The three linears of a gated MLP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjNames {
    pub gate: String,
    pub up: String,
    pub down: String,
}

impl Default for ProjNames {
    fn default() -> Self {
        Self {
            gate: "gate_proj".into(),
            up: "up_proj".into(),
            down: "down_proj".into(),
        }
    }
}

impl ProjNames {
    /// Mixtral's experts: `w1` (gate), `w3` (up), `w2` (down).
    pub fn mixtral() -> Self {
        Self {
            gate: "w1".into(),
            up: "w3".into(),
            down: "w2".into(),
        }
    }
}

/// Names of the routed experts under their prefix (`experts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertNames {
    /// Per-expert linears: `{e}.{gate}.weight` ...
    pub proj: ProjNames,
    /// The fused 3-D layout (transformers 5.x): `[E, 2I, H]` ...
    pub fused_gate_up: String,
    /// ... and `[E, H, I]`; biases add `_bias`.
    pub fused_down: String,
}

impl Default for ExpertNames {
    fn default() -> Self {
        Self {
            proj: ProjNames::default(),
            fused_gate_up: "gate_up_proj".into(),
            fused_down: "down_proj".into(),
        }
    }
}

impl ExpertNames {
    pub fn fused_gate_up_bias(&self) -> String {
        format!("{}_bias", self.fused_gate_up)
    }
    pub fn fused_down_bias(&self) -> String {
        format!("{}_bias", self.fused_down)
    }
}

/// Every tensor name of an MoE block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeNames {
    /// The router linear.
    pub gate: String,
    /// The selection-only bias `[E]` (`use_correction_bias`).
    pub correction_bias: String,
    pub experts: String,
    pub expert: ExpertNames,
    pub shared_expert: String,
    pub shared_proj: ProjNames,
    /// The shared expert's `sigmoid` gate (Qwen2-MoE).
    pub shared_expert_gate: String,
}

impl Default for MoeNames {
    fn default() -> Self {
        Self {
            gate: "gate".into(),
            correction_bias: "gate.e_score_correction_bias".into(),
            experts: "experts".into(),
            expert: ExpertNames::default(),
            shared_expert: "shared_expert".into(),
            shared_proj: ProjNames::default(),
            shared_expert_gate: "shared_expert_gate".into(),
        }
    }
}

impl MoeNames {
    /// Mixtral (`block_sparse_moe` prefix): `gate`, `experts.{e}.w1/w3/w2`.
    pub fn mixtral() -> Self {
        Self {
            expert: ExpertNames {
                proj: ProjNames::mixtral(),
                ..ExpertNames::default()
            },
            ..Self::default()
        }
    }

    /// DeepSeek-V2/V3: plural `shared_experts`, bias under the gate.
    pub fn deepseek() -> Self {
        Self {
            shared_expert: "shared_experts".into(),
            ..Self::default()
        }
    }
}
