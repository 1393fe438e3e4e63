//! Will it fit? The resident bytes a load would take — every tensor of the
//! checkpoint in the format it will be held in, the KV cache, a workspace —
//! estimated from the safetensors headers before anything is read, against
//! the memory the system (or the CUDA device) says is available.

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvCacheShape};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::DType;
use candle_moe::quant::QuantScheme;

/// How the weights will be held.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    /// Compute dtype (activations, KV cache, unquantized weights).
    pub dtype: DType,
    pub expert_dtype: Option<DType>,
    pub quant: Option<QuantScheme>,
    pub quant_dense: Option<QuantScheme>,
    /// Expert-parallel ranks in this process (dense weights are replicated
    /// on each, experts split between them).
    pub ep_size: usize,
    /// Tokens the KV cache holds.
    pub kv_tokens: usize,
}

/// Estimated resident bytes of a loaded model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryEstimate {
    pub experts: u64,
    pub dense: u64,
    pub kv_cache: u64,
    /// Activations, logits and allocator slack.
    pub workspace: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.experts + self.dense + self.kv_cache + self.workspace
    }
}

/// Bytes per element of a weight held as `q` (block scales included), or
/// `float` bytes when not quantized.
fn held_bytes(q: Option<&QuantScheme>, float: f64) -> f64 {
    match q {
        // e4m3 + an f32 scale per 128×128 block
        Some(QuantScheme::Fp8(_)) => 1.0 + 4.0 / (128.0 * 128.0),
        // e2m1 nibbles + an e8m0 scale per 32
        Some(QuantScheme::Mxfp4(_)) => 0.5 + 1.0 / 32.0,
        None => float,
    }
}

/// The estimate for loading `ck` with `o`.
pub fn estimate(ck: &Checkpoint, o: &HoldOptions) -> Result<MemoryEstimate> {
    // SAFETY: read-only inputs; only the headers are read.
    let st = unsafe { MmapedSafetensors::multi(&ck.files) }
        .map_err(|e| ModelError::file(&ck.files[0], e))?;
    let compute = o.dtype.size_in_bytes() as f64;
    let expert_float = o.expert_dtype.unwrap_or(o.dtype).size_in_bytes() as f64;
    let on_load = |q: &Option<QuantScheme>| q.clone().filter(QuantScheme::is_on_load);
    let (quant, quant_dense) = (on_load(&o.quant), on_load(&o.quant_dense));
    let (mut experts, mut dense) = (0f64, 0f64);
    for (name, view) in st.tensors() {
        let n: usize = view.shape().iter().product();
        let n = n as f64;
        let stored = view.dtype();
        let packed = matches!(
            stored,
            safetensors::Dtype::F8_E4M3 | safetensors::Dtype::U8 | safetensors::Dtype::I8
        );
        let scale = name.ends_with("_scale") || name.ends_with("_scales");
        let is_expert = name.contains(".experts.") || name.contains(".experts_");
        let linear = view.shape().len() >= 2
            && (name.ends_with("proj.weight") || name.ends_with("lm_head.weight"));
        let bytes = if packed || scale {
            // a quantized checkpoint's tensors stay as stored
            n * stored.bitsize() as f64 / 8.0
        } else if is_expert {
            n * held_bytes(quant.as_ref(), expert_float)
        } else if linear {
            n * held_bytes(quant_dense.as_ref(), compute)
        } else {
            n * compute
        };
        if is_expert {
            experts += bytes;
        } else {
            dense += bytes;
        }
    }
    let cfg = &ck.config;
    let kv = KvCacheShape {
        num_layers: cfg.num_hidden_layers,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
    };
    let kv_cache = (KvCache::bytes_per_token(kv, o.dtype) * o.kv_tokens) as u64;
    let dense = dense * o.ep_size.max(1) as f64;
    Ok(MemoryEstimate {
        experts: experts as u64,
        dense: dense as u64,
        kv_cache,
        // logits and activations are small next to the weights: 3 % + 256 MB
        workspace: ((experts + dense) * 0.03) as u64 + (256 << 20),
    })
}

/// Memory a load onto `dev` can use: `MemAvailable` for the cpu, the
/// device's free memory for a CUDA device (with the `cuda` feature).
pub fn device_available(dev: &candle_core::Device) -> Option<u64> {
    match dev {
        candle_core::Device::Cpu => mem_available(),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where there is none).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gb(b: u64) -> String {
    format!("{:.1} GB", b as f64 / 1e9)
}

/// Ok when the load fits in `available` bytes; otherwise one line with the
/// estimate and the options that would fit.
pub fn check_fits(ck: &Checkpoint, o: &HoldOptions, available: u64) -> Result<MemoryEstimate> {
    let e = estimate(ck, o)?;
    if e.total() <= available {
        return Ok(e);
    }
    let mut fits = vec![];
    let quantized = ck.config.quantization_config.is_some();
    for (flag, q) in [("--quant fp8", "fp8"), ("--quant mxfp4", "mxfp4")] {
        if quantized || o.quant.is_some() {
            break;
        }
        let alt = HoldOptions {
            quant: Some(QuantScheme::on_load(q)?),
            ..o.clone()
        };
        let a = estimate(ck, &alt)?;
        if a.total() <= available {
            fits.push(format!("{flag} (~{})", gb(a.total())));
        }
    }
    if e.kv_cache > 0 && e.total() - e.kv_cache / 2 <= available {
        fits.push(format!(
            "a KV cache of half the tokens (--max-seq-len / --kv-cache-gb: saves {})",
            gb(e.kv_cache / 2)
        ));
    }
    let hint = if fits.is_empty() {
        "no option here makes it fit".to_string()
    } else {
        format!("would fit: {}", fits.join(", "))
    };
    Err(ModelError::Input(format!(
        "{} needs ~{} resident (experts {}, other weights {}, KV cache {}, workspace {}) but {} is available; {hint}; --force-load tries anyway",
        ck.dir.display(),
        gb(e.total()),
        gb(e.experts),
        gb(e.dense),
        gb(e.kv_cache),
        gb(e.workspace),
        gb(available),
    )))
}
