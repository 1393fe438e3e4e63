//! Helpers shared by the examples: device selection and model resolution.
#![allow(dead_code)]

pub mod load;

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

/// A local directory, or a hub repo downloaded into the hf-hub cache. A
/// path-like name (`./x`, `/x`, `~/x`, `x/y/z`) that is not a directory is an
/// error, not a hub id.
pub fn resolve(model: &str, revision: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let path_like = model.starts_with('.')
        || model.starts_with('/')
        || model.starts_with('~')
        || model.matches('/').count() != 1;
    if p.exists() {
        bail!("--model {model}: not a directory (expected a checkpoint directory or a hub id)");
    }
    if path_like {
        bail!("--model {model}: the directory does not exist");
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

/// clap value parser: a float ≥ 0.
pub fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` must be a number ≥ 0")),
    }
}

/// clap value parser: a float in (0, 1].
pub fn unit_interval(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("`{s}` must be in (0, 1]")),
    }
}

/// clap value parser: a float > 0.
pub fn positive_f32(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` must be a number > 0")),
    }
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

/// The compute dtype: the flag, else bf16 for a bf16 checkpoint (weights,
/// KV cache and activations stay bf16; the kernels widen inside) or on
/// cuda, else f32.
pub fn compute_dtype(flag: Option<DType>, stored: Option<DType>, dev: &Device) -> DType {
    flag.unwrap_or(if !dev.is_cpu() || stored == Some(DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    })
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

/// `n` pseudo-random values in `[-scale, scale)` (xorshift, per 64 Ki chunk).
pub fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for x in ch {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale;
        }
    });
    v
}

/// Read bandwidth in GB/s: best of 5 multi-threaded sums over 1 GiB.
pub fn read_bandwidth() -> f64 {
    read_bandwidth_of(&probe_buffer())
}

/// The 1 GiB [`read_bandwidth`] reads (kept by benchmarks that probe
/// several times).
pub fn probe_buffer() -> Vec<f32> {
    fill(1 << 28, 7, 1.0)
}

/// [`read_bandwidth`] over `v`.
pub fn read_bandwidth_of(v: &[f32]) -> f64 {
    use rayon::prelude::*;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        // 32 independent lanes so the sum vectorises and is bound by memory, not adds
        let s: f32 = v
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 32];
                for x in c.chunks_exact(32) {
                    acc.iter_mut().zip(x).for_each(|(a, x)| *a += x);
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((v.len() * 4) as f64 / dt / 1e9);
    }
    best
}
