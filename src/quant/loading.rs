//! Shared loading helpers of the quant methods: reading one expert's float
//! projections (per-expert or fused 3-D layout), raw checkpoint tensors, and
//! stacking packed bytes expert by expert.

use super::ExpertLayerSpec;
use crate::error::{MoeError, Result};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use candle_nn::var_builder::VarBuilder;

pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    }
}

/// A tensor read in exactly `dtype` (no conversion happens when the
/// checkpoint stores that dtype).
pub(crate) fn get_dtype(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    dtype: DType,
) -> Result<Tensor> {
    vb.get_with_hints_dtype(shape, name, Default::default(), dtype)
        .map_err(|e| MoeError::weight(full_name(vb, name), e.to_string()))
}

/// A tensor of any shape, read as `dtype`.
pub(crate) fn get_any(vb: &VarBuilder, name: &str, dtype: DType) -> Result<Tensor> {
    vb.get_unchecked_dtype(name, dtype)
        .map_err(|e| MoeError::weight(full_name(vb, name), e.to_string()))
}

/// The bytes of a U8 or F8E4M3 tensor (on the cpu read from its storage in
/// one pass, no intermediate vector).
pub(crate) fn tensor_bytes(t: &Tensor, name: &str) -> Result<Vec<u8>> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let r = l.start_offset()..l.start_offset() + l.shape().elem_count();
    match &*st {
        Storage::Cpu(CpuStorage::U8(v)) => Ok(v[r].to_vec()),
        Storage::Cpu(CpuStorage::F8E4M3(v)) => Ok(v[r].iter().map(|x| x.to_bits()).collect()),
        // another device: through the host
        _ => match t.dtype() {
            DType::U8 => Ok(t.flatten_all()?.to_vec1::<u8>()?),
            DType::F8E4M3 => Ok(t
                .flatten_all()?
                .to_vec1::<float8::F8E4M3>()?
                .into_iter()
                .map(|v| v.to_bits())
                .collect()),
            dt => Err(MoeError::weight(
                name,
                format!("expected U8 or F8_E4M3 bytes, found {dt:?}"),
            )),
        },
    }
}

pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// One expert's float projections as read (in the loader's dtype, not
/// widened): gate `[I, H]`, up `[I, H]`, down `[H, I]`.
pub(crate) struct FloatExpert {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// Reads float experts from either checkpoint layout. The fused 3-D layout
/// (transformers 5.x) is read one layer at a time and sliced per expert.
pub(crate) enum FloatExperts {
    PerExpert,
    Fused { gate_up: Tensor, down: Tensor },
}

impl FloatExperts {
    pub fn open(s: &ExpertLayerSpec, vb: &VarBuilder) -> Result<Self> {
        let n = &s.names;
        if !vb.contains_tensor(&n.fused_gate_up) {
            return Ok(Self::PerExpert);
        }
        let (h, i, e) = (s.hidden_size, s.intermediate_size, s.global_num_experts);
        Ok(Self::Fused {
            gate_up: get_dtype(vb, &[e, 2 * i, h], &n.fused_gate_up, vb.dtype())?,
            down: get_dtype(vb, &[e, h, i], &n.fused_down, vb.dtype())?,
        })
    }

    pub fn expert(&self, s: &ExpertLayerSpec, vb: &VarBuilder, g: usize) -> Result<FloatExpert> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        match self {
            Self::PerExpert => {
                let (ve, p) = (vb.pp(g), &s.names.proj);
                let dt = vb.dtype();
                Ok(FloatExpert {
                    gate: get_dtype(&ve.pp(&p.gate), &[i, h], "weight", dt)?,
                    up: get_dtype(&ve.pp(&p.up), &[i, h], "weight", dt)?,
                    down: get_dtype(&ve.pp(&p.down), &[h, i], "weight", dt)?,
                })
            }
            Self::Fused { gate_up, down } => {
                let gu = gate_up.get(g)?;
                Ok(FloatExpert {
                    gate: gu.narrow(0, 0, i)?,
                    up: gu.narrow(0, i, i)?,
                    down: down.get(g)?,
                })
            }
        }
    }
}

/// Biases of the local experts (`[E_local, 2I]`, `[E_local, H]`), per-expert
/// or fused layout, as f32.
pub(crate) fn load_biases(
    s: &ExpertLayerSpec,
    vb: &VarBuilder,
    local_ids: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !s.has_bias {
        return Ok((None, None));
    }
    let (h, i) = (s.hidden_size, s.intermediate_size);
    let mut b13 = Vec::with_capacity(local_ids.len() * 2 * i);
    let mut b2 = Vec::with_capacity(local_ids.len() * h);
    let n = &s.names;
    if vb.contains_tensor(&n.fused_gate_up_bias()) {
        let e = s.global_num_experts;
        let gu = get_dtype(vb, &[e, 2 * i], &n.fused_gate_up_bias(), DType::F32)?;
        let d = get_dtype(vb, &[e, h], &n.fused_down_bias(), DType::F32)?;
        for &g in local_ids {
            b13.extend(f32_vec(&gu.get(g)?)?);
            b2.extend(f32_vec(&d.get(g)?)?);
        }
    } else {
        for &g in local_ids {
            let ve = vb.pp(g);
            b13.extend(f32_vec(&get_dtype(
                &ve.pp(&n.proj.gate),
                &[i],
                "bias",
                DType::F32,
            )?)?);
            b13.extend(f32_vec(&get_dtype(
                &ve.pp(&n.proj.up),
                &[i],
                "bias",
                DType::F32,
            )?)?);
            b2.extend(f32_vec(&get_dtype(
                &ve.pp(&n.proj.down),
                &[h],
                "bias",
                DType::F32,
            )?)?);
        }
    }
    let dev = vb.device();
    let e = local_ids.len();
    Ok((
        Some(Tensor::from_vec(b13, (e, 2 * i), dev)?),
        Some(Tensor::from_vec(b2, (e, h), dev)?),
    ))
}

pub(crate) fn check_local_ids(s: &ExpertLayerSpec, local_ids: &[usize]) -> Result<()> {
    if let Some(&g) = local_ids.iter().find(|&&g| g >= s.global_num_experts) {
        return Err(MoeError::config(format!(
            "local expert {g} out of range for {} experts",
            s.global_num_experts
        )));
    }
    Ok(())
}
