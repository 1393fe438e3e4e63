//! Rotary position embedding: the frequency scaling config.json asks for
//! (`rope_scaling` in transformers 4.x, `rope_parameters` in 5.x), computed
//! as transformers' `ROPE_INIT_FUNCTIONS` do, and the cos / sin tables.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// How the inverse frequencies of RoPE are scaled.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear { factor: f64 },
    /// YaRN: high frequencies kept, low ones divided by `factor`, a linear
    /// ramp between (from `beta_fast` / `beta_slow` rotations over the
    /// original context), cos / sin multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

fn err(key: &str, what: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("`{key}` {what}"))
}

/// `obj[name]` as a number (`None` when absent or null); errors name `key.name`.
/// `key` empty: a top-level key.
fn num(obj: &Value, key: &str, name: &str) -> Result<Option<f64>> {
    let path = if key.is_empty() {
        name.to_string()
    } else {
        format!("{key}.{name}")
    };
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| err(&path, format!("must be a number, got {x}"))),
    }
}

impl RopeScaling {
    /// Reads the scaling of config.json `v` (whose `max_position_embeddings`
    /// is `max_pos`): `rope_parameters` (5.x) or `rope_scaling` (4.x).
    /// Types this crate does not compute (`dynamic`, `llama3`, `longrope`,
    /// partial rotary) are errors naming the key.
    pub fn from_config(v: &Value, max_pos: usize) -> Result<Self> {
        let mut found = Self::None;
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(p) = v.get(key).filter(|p| !p.is_null()) else {
                continue;
            };
            let this = Self::parse(v, key, p, max_pos)?;
            if this != Self::None {
                if found != Self::None && found != this {
                    return Err(err(
                        key,
                        "disagrees with `rope_parameters`: give the scaling once",
                    ));
                }
                found = this;
            }
        }
        Ok(found)
    }

    fn parse(v: &Value, key: &str, p: &Value, max_pos: usize) -> Result<Self> {
        if !p.is_object() {
            return Err(err(key, format!("must be an object, got {p}")));
        }
        if let Some(f) =
            num(p, key, "partial_rotary_factor")?.or(num(v, "", "partial_rotary_factor")?)
        {
            if f != 1.0 {
                return Err(err(
                    &format!("{key}.partial_rotary_factor"),
                    format!("= {f}: partial rotary embeddings are not supported"),
                ));
            }
        }
        let ty = match p.get("rope_type").or_else(|| p.get("type")) {
            None | Some(Value::Null) => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(x) => {
                return Err(err(
                    &format!("{key}.rope_type"),
                    format!("must be a string, got {x}"),
                ))
            }
        };
        let factor = |required: bool| -> Result<Option<f64>> {
            match num(p, key, "factor")? {
                Some(f) if f >= 1.0 => Ok(Some(f)),
                Some(f) => Err(err(
                    &format!("{key}.factor"),
                    format!("= {f} must be at least 1"),
                )),
                None if required => Err(err(&format!("{key}.factor"), "is required")),
                None => Ok(None),
            }
        };
        match ty {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: factor(true)?.unwrap_or(1.0),
            }),
            "yarn" => {
                // a top-level original_max_position_embeddings wins (Phi-3
                // style), as in transformers' standardize_rope_params
                let orig = match v
                    .get("original_max_position_embeddings")
                    .filter(|x| !x.is_null())
                {
                    Some(_) => num(v, "", "original_max_position_embeddings")?,
                    None => num(p, key, "original_max_position_embeddings")?,
                };
                let orig = match orig {
                    None => max_pos,
                    Some(o) if o >= 1.0 && o.fract() == 0.0 => o as usize,
                    Some(o) => {
                        return Err(err(
                            &format!("{key}.original_max_position_embeddings"),
                            format!("= {o} must be a positive integer"),
                        ))
                    }
                };
                let factor = factor(false)?.unwrap_or(max_pos as f64 / orig as f64);
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match num(p, key, "attention_factor")? {
                    Some(a) => a,
                    None => match (num(p, key, "mscale")?, num(p, key, "mscale_all_dim")?) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            mscale(factor, m) / mscale(factor, a)
                        }
                        _ => mscale(factor, 1.0),
                    },
                };
                // transformers: `get("beta_fast") or 32`, so 0 means the default too
                let nonzero = |x: Option<f64>, d: f64| x.filter(|&b| b != 0.0).unwrap_or(d);
                let truncate = match p.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => {
                        return Err(err(
                            &format!("{key}.truncate"),
                            format!("must be a boolean, got {x}"),
                        ))
                    }
                };
                Ok(Self::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: nonzero(num(p, key, "beta_fast")?, 32.0),
                    beta_slow: nonzero(num(p, key, "beta_slow")?, 1.0),
                    attention_factor,
                    truncate,
                })
            }
            "dynamic" => Err(err(
                &format!("{key}.rope_type"),
                "= dynamic is not supported: its frequencies change with each batch's longest \
                 sequence, so cached keys would disagree with the queries",
            )),
            other => Err(err(
                &format!("{key}.rope_type"),
                format!("= {other} is not supported (default, linear, yarn)"),
            )),
        }
    }

    /// The `head_dim / 2` inverse frequencies for base `theta`, and the
    /// factor cos and sin are multiplied by.
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> (Vec<f32>, f32) {
        let d = head_dim as f64;
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d))
            .collect();
        match *self {
            Self::None => (base.iter().map(|&f| f as f32).collect(), 1.0),
            Self::Linear { factor } => (base.iter().map(|&f| (f / factor) as f32).collect(), 1.0),
            Self::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                // the dimension at which `rotations` turns fit in the original context
                let dim_of = |rotations: f64| {
                    d * (orig as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut lo, mut hi) = (dim_of(beta_fast), dim_of(beta_slow));
                if truncate {
                    (lo, hi) = (lo.floor(), hi.ceil());
                }
                let (lo, mut hi) = (lo.max(0.0), hi.min(d - 1.0));
                if lo == hi {
                    hi += 0.001;
                }
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        (f / factor * ramp + f * extrapolate) as f32
                    })
                    .collect();
                (inv, attention_factor as f32)
            }
        }
    }
}

/// cos / sin tables of the non-interleaved ("rotate half") RoPE.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for positions `0..max_pos` of a `head_dim` head.
    pub fn new(
        scaling: &RopeScaling,
        theta: f64,
        head_dim: usize,
        max_pos: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let (inv, mult) = scaling.inv_freq(theta, head_dim);
        let half = inv.len();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, max_pos as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let f = pos.matmul(&inv)?;
        let (cos, sin) = if mult == 1.0 {
            (f.cos()?, f.sin()?)
        } else {
            ((f.cos()? * mult as f64)?, (f.sin()? * mult as f64)?)
        };
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }

    /// The (cos, sin) rows `[T, D/2]` of `positions` (`[T]` U32), gathered
    /// once per forward for every layer.
    pub fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}
