//! A checkpoint's quantization as config.json describes it
//! (`quantization_config`), or an on-load choice, turned into the experts'
//! [`QuantMethod`] and the treatment of the other linears.

use super::{Fp8, Mxfp4, QuantMethod};
use crate::error::{MoeError, Result};
use crate::format::Fp8Strategy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `quantization_config` of config.json (native `fp8` or `compressed-tensors`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: String,
    // native fp8 (Qwen3-*-FP8, DeepSeek-V3)
    #[serde(default)]
    pub fmt: Option<String>,
    #[serde(default)]
    pub activation_scheme: Option<String>,
    #[serde(default)]
    pub weight_block_size: Option<Vec<usize>>,
    // compressed-tensors
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub config_groups: BTreeMap<String, ConfigGroup>,
    #[serde(default)]
    pub ignore: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ConfigGroup {
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub weights: Option<QuantArgs>,
    #[serde(default)]
    pub input_activations: Option<QuantArgs>,
    #[serde(default)]
    pub format: Option<String>,
}

/// compressed-tensors `QuantizationArgs` (the fields that matter here).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct QuantArgs {
    pub num_bits: u32,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub group_size: Option<usize>,
    #[serde(default)]
    pub block_structure: Option<Vec<usize>>,
    #[serde(default)]
    pub dynamic: Dynamic,
    #[serde(default = "yes")]
    pub symmetric: bool,
}

fn yes() -> bool {
    true
}

/// `dynamic`: a bool, or the string `"local"`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Dynamic {
    Bool(bool),
    Str(String),
}

impl Default for Dynamic {
    fn default() -> Self {
        Self::Bool(false)
    }
}

impl Dynamic {
    fn is_dynamic(&self) -> bool {
        matches!(self, Self::Bool(true)) || matches!(self, Self::Str(s) if s == "local")
    }
}

/// How a model's weights are quantized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuantScheme {
    Fp8(Fp8),
    Mxfp4(Mxfp4),
}

fn unsupported(msg: impl Into<String>) -> MoeError {
    MoeError::config(format!("quantization_config: {}", msg.into()))
}

impl QuantScheme {
    /// The experts' quant method.
    pub fn expert_method(&self) -> Arc<dyn QuantMethod> {
        match self {
            Self::Fp8(f) => Arc::new(f.clone()),
            Self::Mxfp4(m) => Arc::new(m.clone()),
        }
    }

    /// On-load quantization of float experts: `fp8` (128×128 blocks, W8A8)
    /// or `mxfp4` (W4A16). Dense linears stay as the checkpoint has them.
    pub fn on_load(name: &str) -> Result<Self> {
        match name {
            "fp8" => Ok(Self::Fp8(Fp8::quantize_on_load())),
            "mxfp4" => Ok(Self::Mxfp4(Mxfp4::quantize_on_load())),
            o => Err(MoeError::config(format!(
                "unknown on-load quantization `{o}` (fp8, mxfp4)"
            ))),
        }
    }

    pub fn is_on_load(&self) -> bool {
        match self {
            Self::Fp8(f) => f.on_load,
            Self::Mxfp4(m) => m.on_load,
        }
    }

    pub fn from_config(qc: &QuantizationConfig) -> Result<Self> {
        match qc.quant_method.as_str() {
            "fp8" => {
                if let Some(f) = &qc.fmt {
                    if f != "e4m3" {
                        return Err(unsupported(format!("fp8 fmt `{f}` (only e4m3)")));
                    }
                }
                match qc.activation_scheme.as_deref() {
                    None | Some("dynamic") => {}
                    Some(o) => {
                        return Err(unsupported(format!(
                            "fp8 activation_scheme `{o}` (only dynamic)"
                        )))
                    }
                }
                match qc.weight_block_size.as_deref() {
                    Some(&[bn, bk]) => Ok(Self::Fp8(Fp8::block_scaled(bn, bk))),
                    Some(o) => Err(unsupported(format!("weight_block_size {o:?}"))),
                    None => Err(unsupported(
                        "fp8 without weight_block_size (per-tensor scales) is not supported",
                    )),
                }
            }
            "compressed-tensors" => Self::from_compressed_tensors(qc),
            o => Err(unsupported(format!(
                "quant_method `{o}` (supported: fp8, compressed-tensors)"
            ))),
        }
    }

    fn from_compressed_tensors(qc: &QuantizationConfig) -> Result<Self> {
        let groups: Vec<&ConfigGroup> = qc.config_groups.values().collect();
        let Some(g) = groups.first() else {
            return Err(unsupported("compressed-tensors without config_groups"));
        };
        if groups
            .iter()
            .any(|o| o.weights != g.weights || o.input_activations != g.input_activations)
        {
            return Err(unsupported(
                "several compressed-tensors config groups with different schemes",
            ));
        }
        let Some(w) = &g.weights else {
            return Err(unsupported("config group without weights"));
        };
        let format = g.format.as_deref().or(qc.format.as_deref()).unwrap_or("");
        if !w.symmetric {
            return Err(unsupported("asymmetric weights"));
        }
        match (w.kind.as_str(), w.num_bits) {
            ("float", 8) => {
                let strategy = match (w.strategy.as_deref(), w.block_structure.as_deref()) {
                    (Some("block"), Some(&[bn, bk])) => Fp8Strategy::Block(bn, bk),
                    (Some("channel"), _) => Fp8Strategy::Channel,
                    (Some("tensor"), _) => Fp8Strategy::Tensor,
                    (s, b) => {
                        return Err(unsupported(format!(
                            "fp8 weight strategy {s:?} with block_structure {b:?}"
                        )))
                    }
                };
                let act_group = match &g.input_activations {
                    None => None,
                    Some(a) => {
                        if (a.kind.as_str(), a.num_bits) != ("float", 8) || !a.dynamic.is_dynamic()
                        {
                            return Err(unsupported(format!(
                                "input activations {} {}-bit (dynamic: {:?}); only dynamic fp8 is supported",
                                a.kind, a.num_bits, a.dynamic
                            )));
                        }
                        match (a.strategy.as_deref(), a.group_size) {
                            (Some("group"), Some(gs)) if gs > 0 => Some(gs),
                            // one scale per token: the whole row is the group
                            (Some("token"), _) => Some(usize::MAX),
                            (s, gs) => {
                                return Err(unsupported(format!(
                                    "dynamic fp8 activations with strategy {s:?}, group {gs:?}"
                                )))
                            }
                        }
                    }
                };
                Ok(Self::Fp8(Fp8::compressed_tensors(strategy, act_group)))
            }
            ("float", 4) => {
                if format != "mxfp4-pack-quantized" || w.group_size != Some(32) {
                    return Err(unsupported(format!(
                        "4-bit float format `{format}` group {:?} (only mxfp4-pack-quantized, group 32)",
                        w.group_size
                    )));
                }
                if g.input_activations.is_some() {
                    return Err(unsupported(
                        "MXFP4 activations (W4A4) are not supported; use MXFP4A16",
                    ));
                }
                Ok(Self::Mxfp4(Mxfp4::default()))
            }
            (k, b) => Err(unsupported(format!("{b}-bit {k} weights"))),
        }
    }
}
