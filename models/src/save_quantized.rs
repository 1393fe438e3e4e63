//! `--save-quantized`: a float checkpoint quantized the way on-load
//! quantization does it (same quantizers, same bytes), written as the
//! compressed-tensors checkpoint llm-compressor would write — FP8_BLOCK
//! (`weight` e4m3 + `weight_scale` per 128×128 block, in the source dtype)
//! or MXFP4A16 (`weight_packed` + `weight_scale` e8m0 per 32) — with
//! `quantization_config` (`format`, `config_groups`, `ignore`) in
//! config.json and the tokenizer and generation config copied. Loading it
//! needs no quantization. Streams tensor by tensor from the mmapped source.

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::safetensors_out::{write_sharded, OutTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_moe::format::float_rows::with_rows;
use candle_moe::format::fp8::{quantize_fp8_block_rows, SourcePrecision};
use candle_moe::format::mxfp4::{quantize_mxfp4_rows, MX_GROUP};
use candle_moe::quant::QuantScheme;
use serde_json::json;
use std::path::Path;

/// What to quantize: the routed experts (`quant`) and every other linear
/// but router, embeddings and lm_head (`quant_dense`, same format).
#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub quant: QuantScheme,
    pub quant_dense: bool,
    pub shard_bytes: usize,
}

/// The compressed-tensors formats written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// FP8_BLOCK: e4m3 + a scale per 128×128 block, dynamic per-token-group
    /// FP8 activations.
    Fp8,
    /// MXFP4A16: e2m1 pairs + an e8m0 scale per 32.
    Mxfp4,
}

/// How one source tensor is written.
enum Plan {
    Copy,
    Quantize,
}

fn tag(dt: safetensors::Dtype) -> Result<&'static str> {
    use safetensors::Dtype as D;
    Ok(match dt {
        D::F32 => "F32",
        D::BF16 => "BF16",
        D::F16 => "F16",
        D::U8 => "U8",
        D::F8_E4M3 => "F8_E4M3",
        d => {
            return Err(ModelError::Input(format!(
                "--save-quantized: unsupported dtype {d:?}"
            )))
        }
    })
}

fn is_router(name: &str) -> bool {
    name.ends_with("mlp.gate.weight") || name.ends_with("shared_expert_gate.weight")
}

/// Writes `ck` quantized per `o` into `out`; `progress(done, total)` after
/// each tensor.
pub fn save_quantized(
    ck: &Checkpoint,
    out: &Path,
    o: &SaveOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if ck.config.quantization_config.is_some() {
        return Err(ModelError::Input(
            "--save-quantized: the checkpoint is already quantized".into(),
        ));
    }
    let kind = match &o.quant {
        QuantScheme::Fp8(f) if f.on_load => Kind::Fp8,
        QuantScheme::Mxfp4(m) if m.on_load => Kind::Mxfp4,
        _ => {
            return Err(ModelError::Input(
                "--save-quantized takes an on-load scheme (fp8 or mxfp4)".into(),
            ))
        }
    };
    // SAFETY: read-only inputs, as the loader maps them.
    let st = unsafe { MmapedSafetensors::multi(&ck.files) }
        .map_err(|e| ModelError::file(&ck.files[0], e))?;
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    let mut plans = vec![];
    let mut layout: Vec<OutTensor> = vec![];
    let mut ignore = vec![];
    for name in &names {
        let view = st
            .get(name)
            .map_err(|e| ModelError::file(&ck.files[0], e))?;
        let dims = view.shape().to_vec();
        let dtype = view.dtype();
        if name.contains(".mlp.experts.") && dims.len() == 3 {
            return Err(ModelError::Input(format!(
                "--save-quantized: `{name}` is in the fused expert layout (transformers 5.x), which the saver does not write yet"
            )));
        }
        // lm_head stays as stored, as llm-compressor's schemes leave it
        // (`ignore: ["lm_head"]`) and vLLM expects
        let linear = dims.len() == 2 && (name.ends_with("proj.weight") || name == "lm_head.weight");
        let lm_head = name == "lm_head.weight";
        let expert = name.contains(".mlp.experts.");
        let wanted = linear && !is_router(name) && !lm_head && (expert || o.quant_dense);
        let fits = kind == Kind::Fp8 || dims.get(1).is_some_and(|k| k % MX_GROUP == 0);
        let float = matches!(
            dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
        );
        if wanted && fits && float {
            let (n, k) = (dims[0], dims[1]);
            let base = name.trim_end_matches(".weight");
            match kind {
                Kind::Fp8 => {
                    layout.push(OutTensor {
                        name: name.clone(),
                        dtype: "F8_E4M3",
                        shape: dims.clone(),
                    });
                    layout.push(OutTensor {
                        name: format!("{base}.weight_scale"),
                        dtype: tag(dtype)?,
                        shape: vec![n.div_ceil(128), k.div_ceil(128)],
                    });
                }
                Kind::Mxfp4 => {
                    layout.push(OutTensor {
                        name: format!("{base}.weight_packed"),
                        dtype: "U8",
                        shape: vec![n, k / 2],
                    });
                    layout.push(OutTensor {
                        name: format!("{base}.weight_scale"),
                        dtype: "U8",
                        shape: vec![n, k / MX_GROUP],
                    });
                }
            }
            plans.push((name.clone(), Plan::Quantize));
        } else {
            if linear || is_router(name) {
                ignore.push(name.trim_end_matches(".weight").to_string());
            }
            layout.push(OutTensor {
                name: name.clone(),
                dtype: tag(dtype)?,
                shape: dims,
            });
            plans.push((name.clone(), Plan::Copy));
        }
    }
    // tensor i of the layout → (source plan, part: 0 weight, 1 scale)
    let mut src = vec![];
    for (p, (_, plan)) in plans.iter().enumerate() {
        match plan {
            Plan::Copy => src.push((p, 0u8)),
            Plan::Quantize => {
                src.push((p, 0));
                src.push((p, 1));
            }
        }
    }
    let total = layout.len();
    let mut cache: Option<(usize, Vec<u8>, Vec<u8>)> = None;
    let mut make = |i: usize| -> Result<Vec<u8>> {
        let (p, part) = src[i];
        let (name, plan) = &plans[p];
        let view = st
            .get(name)
            .map_err(|e| ModelError::file(&ck.files[0], e))?;
        // each source tensor is read once: its pages leave after this
        let _release = ReleaseOnDrop(view.data());
        if let Plan::Copy = plan {
            return Ok(view.data().to_vec());
        }
        if cache.as_ref().map(|c| c.0) != Some(p) {
            let t = st
                .load(name, &Device::Cpu)
                .map_err(|e| ModelError::file(&ck.files[0], e))?;
            let (n, k) = t.dims2()?;
            let dt = t.dtype();
            let (q, s) = match kind {
                Kind::Fp8 => {
                    let prec = SourcePrecision::from_dtype(dt);
                    let (q, s) =
                        with_rows(&t, |w| quantize_fp8_block_rows(w, n, k, 128, 128, prec))?;
                    // the scales in the source dtype, as torch keeps them
                    let s = candle_core::Tensor::from_vec(
                        s,
                        (n.div_ceil(128), k.div_ceil(128)),
                        &Device::Cpu,
                    )?
                    .to_dtype(dt)?;
                    (q, raw_bytes(&s)?)
                }
                Kind::Mxfp4 => with_rows(&t, |w| quantize_mxfp4_rows(w, n, k))?,
            };
            cache = Some((p, q, s));
        }
        let c = cache
            .as_ref()
            .map(|c| if part == 0 { c.1.clone() } else { c.2.clone() });
        Ok(c.unwrap_or_default())
    };
    write_sharded(out, &layout, o.shard_bytes, &mut make, &mut |i| {
        progress(i + 1, total)
    })?;
    write_config(ck, out, kind, ignore)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let p = ck.dir.join(f);
        if p.is_file() {
            std::fs::copy(&p, out.join(f)).map_err(|e| ModelError::file(&p, e))?;
        }
    }
    Ok(())
}

/// Releases mapped pages when dropped (see `checkpoint::release_mapped`).
struct ReleaseOnDrop<'a>(&'a [u8]);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        crate::checkpoint::release_mapped(self.0);
    }
}

/// A cpu tensor's bytes, little endian.
fn raw_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        d => {
            return Err(ModelError::Input(format!(
                "--save-quantized: scales in {d:?}"
            )))
        }
    })
}

/// config.json's `quantization_config` for `kind`, every Linear but
/// `ignore` (module names) quantized — as llm-compressor writes it.
pub fn quantization_config(kind: Kind, ignore: Vec<String>) -> serde_json::Value {
    let (format, group) = match kind {
        Kind::Fp8 => (
            "float-quantized",
            json!({"targets": ["Linear"], "format": "float-quantized",
                   "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "block",
                               "block_structure": [128, 128], "dynamic": false},
                   "input_activations": {"num_bits": 8, "type": "float", "symmetric": true,
                                         "strategy": "group", "group_size": 128, "dynamic": true}}),
        ),
        Kind::Mxfp4 => (
            "mxfp4-pack-quantized",
            json!({"targets": ["Linear"], "format": "mxfp4-pack-quantized",
                   "weights": {"num_bits": 4, "type": "float", "symmetric": true, "strategy": "group",
                               "group_size": 32, "dynamic": false, "scale_dtype": "torch.uint8"},
                   "input_activations": null}),
        ),
    };
    json!({
        "quant_method": "compressed-tensors", "format": format,
        "quantization_status": "compressed", "ignore": ignore,
        "config_groups": {"group_0": group},
    })
}

fn write_config(ck: &Checkpoint, out: &Path, kind: Kind, ignore: Vec<String>) -> Result<()> {
    let src = ck.dir.join("config.json");
    let text = std::fs::read_to_string(&src).map_err(|e| ModelError::file(&src, e))?;
    let mut c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::file(&src, e))?;
    c["quantization_config"] = quantization_config(kind, ignore);
    let p = out.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap_or_default())
        .map_err(|e| ModelError::file(&p, e))
}
