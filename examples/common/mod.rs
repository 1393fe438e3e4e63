//! Helpers shared by the examples: device selection and model resolution.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// `cpu`, `cuda` or `cuda:N`.
pub fn device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        s => match s.strip_prefix("cuda:") {
            Some(n) => Ok(Device::new_cuda(n.parse().context("--device cuda:N")?)?),
            None => bail!("--device {s}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// A local directory, or a hub repo downloaded into the hf-hub cache.
pub fn resolve(model: &str, revision: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        model.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let cfg = repo
        .get("config.json")
        .with_context(|| format!("{model}: not a local directory, and the hub download failed"))?;
    for f in ["generation_config.json", "tokenizer.json"] {
        let _ = repo.get(f); // optional
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            for f in files {
                repo.get(&f)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")?;
        }
    }
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Parses `f32|bf16|f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        o => bail!("dtype {o}: expected f32, bf16 or f16"),
    }
}

/// Expert weights' dtype: the flag, else the checkpoint's stored bf16/f16
/// when computing in f32 (widening is exact, and the experts stay half size).
pub fn expert_dtype(
    flag: Option<&str>,
    stored: Option<DType>,
    compute: DType,
) -> Result<Option<DType>> {
    if let Some(f) = flag {
        return Ok(Some(parse_dtype(f)?));
    }
    Ok(match (stored, compute) {
        (Some(s @ (DType::BF16 | DType::F16)), DType::F32) => Some(s),
        _ => None,
    })
}

/// `--quant fp8|mxfp4`: quantize the float experts while loading.
pub fn quant_scheme(flag: Option<&str>) -> Result<Option<candle_moe::quant::QuantScheme>> {
    flag.map(|q| Ok(candle_moe::quant::QuantScheme::on_load(q)?))
        .transpose()
}
