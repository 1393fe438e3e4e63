//! Writes a random checkpoint with the exact shapes of Qwen1.5-MoE-A2.7B or
//! Qwen3-30B-A3B (any number of layers), as transformers lays it out:
//! safetensors shards of ≤ `--shard-gb` with `model.safetensors.index.json`
//! (the library's sharded writer),
//! `config.json`, `generation_config.json` and the bundled Qwen tokenizer.
//! Tensors are generated and written one at a time (never the model in RAM).
//! `--format fp8` writes what llm-compressor's FP8_BLOCK scheme saves
//! instead (e4m3 weights + 128×128 block `weight_scale`, router, embeddings
//! and lm_head kept in bf16), `--format mxfp4` what its MXFP4A16 scheme
//! saves (`weight_packed` e2m1 pairs + `weight_scale` e8m0 per 32): the way
//! to a Qwen3-30B-A3B-shaped checkpoint when 61 GB of bf16 do not fit.
//!
//!     cargo run --release --example make_checkpoint -- --shape qwen1.5-moe-a2.7b --out DIR
//!     cargo run --release --example make_checkpoint -- --shape qwen3-30b-a3b --format fp8 --out DIR

use anyhow::{bail, Context, Result};
use candle_moe::format::fp8::{quantize_fp8_block, SourcePrecision};
use candle_moe::format::mxfp4::quantize_mxfp4;
use candle_moe_models::safetensors_out::{write_sharded, OutTensor};
use candle_moe_models::save_quantized::{quantization_config, Kind};
use clap::Parser;
use half::bf16;
use serde_json::json;
use std::path::{Path, PathBuf};

mod common;
use common::fill;

#[derive(Parser, Debug)]
#[command(about = "Random checkpoints with real MoE shapes, streamed to disk")]
struct Args {
    /// qwen1.5-moe-a2.7b | qwen3-30b-a3b
    #[arg(long)]
    shape: String,
    /// Decoder layers (default: the model's).
    #[arg(long)]
    layers: Option<usize>,
    /// bf16 | fp8 (FP8_BLOCK) | mxfp4 (MXFP4A16), as compressed-tensors writes them
    #[arg(long, default_value = "bf16")]
    format: String,
    #[arg(long, default_value_t = 5.0)]
    shard_gb: f64,
    #[arg(long)]
    out: PathBuf,
}

/// The dimensions that decide the tensors.
struct Shape {
    arch: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    moe_inter: usize,
    experts: usize,
    top_k: usize,
    /// Shared expert intermediate size (Qwen2-MoE), 0 for none.
    shared: usize,
    dense_inter: usize,
    vocab: usize,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "qwen1.5-moe-a2.7b" => Shape {
            arch: "qwen2_moe",
            hidden: 2048,
            layers: 24,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            moe_inter: 1408,
            experts: 60,
            top_k: 4,
            shared: 5632,
            dense_inter: 5632,
            vocab: 151936,
        },
        "qwen3-30b-a3b" => Shape {
            arch: "qwen3_moe",
            hidden: 2048,
            layers: 48,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            moe_inter: 768,
            experts: 128,
            top_k: 8,
            shared: 0,
            dense_inter: 6144,
            vocab: 151936,
        },
        s => bail!("--shape {s}: expected qwen1.5-moe-a2.7b or qwen3-30b-a3b"),
    })
}

/// One tensor to write: name, shape, value scale, and whether it is a
/// linear weight that FP8 quantizes.
struct Spec {
    name: String,
    shape: Vec<usize>,
    /// Values are `center ± scale`.
    center: f32,
    scale: f32,
    quantized: bool,
}

fn specs(s: &Shape) -> Vec<Spec> {
    let mut v = vec![];
    let mut put = |name: String, shape: Vec<usize>, scale: f32, quantized: bool| {
        // norm weights (1-D, scale 1) sit around 1
        let norm = shape.len() == 1 && scale == 1.0;
        v.push(Spec {
            name,
            shape,
            center: if norm { 1.0 } else { 0.0 },
            scale: if norm { 0.1 } else { scale },
            quantized,
        })
    };
    let (h, hd) = (s.hidden, s.head_dim);
    put(
        "model.embed_tokens.weight".into(),
        vec![s.vocab, h],
        0.5,
        false,
    );
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 1.0, false);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            false,
        );
        let a = format!("{p}.self_attn");
        put(
            format!("{a}.q_proj.weight"),
            vec![s.heads * hd, h],
            0.02,
            true,
        );
        put(
            format!("{a}.k_proj.weight"),
            vec![s.kv_heads * hd, h],
            0.02,
            true,
        );
        put(
            format!("{a}.v_proj.weight"),
            vec![s.kv_heads * hd, h],
            0.02,
            true,
        );
        put(
            format!("{a}.o_proj.weight"),
            vec![h, s.heads * hd],
            0.02,
            true,
        );
        if s.arch == "qwen2_moe" {
            for n in ["q", "k", "v"] {
                let rows = if n == "q" { s.heads } else { s.kv_heads } * hd;
                put(format!("{a}.{n}_proj.bias"), vec![rows], 0.02, false);
            }
        } else {
            put(format!("{a}.q_norm.weight"), vec![hd], 1.0, false);
            put(format!("{a}.k_norm.weight"), vec![hd], 1.0, false);
        }
        put(
            format!("{p}.mlp.gate.weight"),
            vec![s.experts, h],
            0.05,
            false,
        );
        if s.shared > 0 {
            put(
                format!("{p}.mlp.shared_expert_gate.weight"),
                vec![1, h],
                0.02,
                false,
            );
            let se = format!("{p}.mlp.shared_expert");
            put(
                format!("{se}.gate_proj.weight"),
                vec![s.shared, h],
                0.02,
                true,
            );
            put(
                format!("{se}.up_proj.weight"),
                vec![s.shared, h],
                0.02,
                true,
            );
            put(
                format!("{se}.down_proj.weight"),
                vec![h, s.shared],
                0.02,
                true,
            );
        }
        for x in 0..s.experts {
            let ex = format!("{p}.mlp.experts.{x}");
            put(
                format!("{ex}.gate_proj.weight"),
                vec![s.moe_inter, h],
                0.02,
                true,
            );
            put(
                format!("{ex}.up_proj.weight"),
                vec![s.moe_inter, h],
                0.02,
                true,
            );
            put(
                format!("{ex}.down_proj.weight"),
                vec![h, s.moe_inter],
                0.02,
                true,
            );
        }
    }
    put("model.norm.weight".into(), vec![h], 1.0, false);
    put("lm_head.weight".into(), vec![s.vocab, h], 0.02, false);
    v
}

/// A tensor as stored: name, dtype tag, shape, and how to make its bytes.
struct Stored {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    /// (spec index, which part: 0 = weight/value, 1 = FP8 scale)
    src: (usize, u8),
}

impl Stored {
    fn out(&self) -> OutTensor {
        OutTensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
    fn bytes(&self) -> usize {
        self.out().bytes()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Bf16,
    Fp8,
    Mxfp4,
}

fn layout(specs: &[Spec], format: Format) -> Vec<Stored> {
    let mut v = vec![];
    for (i, s) in specs.iter().enumerate() {
        if format == Format::Mxfp4 && s.quantized {
            let (n, k) = (s.shape[0], s.shape[1]);
            let base = s.name.trim_end_matches(".weight");
            v.push(Stored {
                name: format!("{base}.weight_packed"),
                dtype: "U8",
                shape: vec![n, k / 2],
                src: (i, 0),
            });
            v.push(Stored {
                name: format!("{base}.weight_scale"),
                dtype: "U8",
                shape: vec![n, k / 32],
                src: (i, 1),
            });
        } else if format == Format::Fp8 && s.quantized {
            let (n, k) = (s.shape[0], s.shape[1]);
            v.push(Stored {
                name: s.name.clone(),
                dtype: "F8_E4M3",
                shape: s.shape.clone(),
                src: (i, 0),
            });
            // in the weights' dtype (bf16), as llm-compressor and
            // `--save-quantized` write them
            v.push(Stored {
                name: format!("{}_scale", s.name),
                dtype: "BF16",
                shape: vec![n.div_ceil(128), k.div_ceil(128)],
                src: (i, 1),
            });
        } else {
            v.push(Stored {
                name: s.name.clone(),
                dtype: "BF16",
                shape: s.shape.clone(),
                src: (i, 0),
            });
        }
    }
    v
}

/// Spec `i`'s random values (seeded by its index), rounded to bf16.
fn values(spec: &Spec, i: usize) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    fill(n, i as u64 + 1, spec.scale)
        .into_iter()
        .map(|v| bf16::from_f32(spec.center + v).to_f32())
        .collect()
}

/// The bytes of tensor `t`: its spec's values as bf16, or their FP8 block /
/// MXFP4 quantization (weight or scale bytes; `cache` keeps the last spec
/// quantized, as a weight and its scale are written one after the other).
fn make(t: &Stored, specs: &[Spec], cache: &mut Option<(usize, Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let (i, part) = t.src;
    let spec = &specs[i];
    if part == 0 && t.dtype == "BF16" {
        return values(spec, i)
            .into_iter()
            .flat_map(|v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
    }
    let (q, s) = match cache {
        Some((j, q, s)) if *j == i => (q, s),
        slot => {
            let (n, k) = (spec.shape[0], spec.shape[1]);
            let mxfp4 = t.dtype == "U8";
            let (q, s) = if mxfp4 {
                quantize_mxfp4(&values(spec, i), n, k)
            } else {
                let (q, s) =
                    quantize_fp8_block(&values(spec, i), n, k, 128, 128, SourcePrecision::Bf16);
                let s = s
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes());
                (q, s.collect())
            };
            let (_, q, s) = slot.insert((i, q, s));
            (q, s)
        }
    };
    if part == 0 {
        q.clone()
    } else {
        s.clone()
    }
}

fn config(s: &Shape, format: Format, specs: &[Spec]) -> serde_json::Value {
    let mut c = json!({
        "architectures": [if s.arch == "qwen2_moe" { "Qwen2MoeForCausalLM" } else { "Qwen3MoeForCausalLM" }],
        "model_type": s.arch, "vocab_size": s.vocab, "hidden_size": s.hidden,
        "intermediate_size": s.dense_inter, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "max_position_embeddings": if s.arch == "qwen2_moe" { 8192 } else { 40960 },
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "hidden_act": "silu",
        "decoder_sparse_step": 1, "moe_intermediate_size": s.moe_inter,
        "num_experts_per_tok": s.top_k, "num_experts": s.experts,
        "norm_topk_prob": s.arch == "qwen3_moe", "mlp_only_layers": [],
        "use_sliding_window": false, "sliding_window": null, "max_window_layers": s.layers,
        "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    });
    if s.shared > 0 {
        c["shared_expert_intermediate_size"] = json!(s.shared);
    }
    let ignore: Vec<String> = specs
        .iter()
        .filter(|x| !x.quantized && x.shape.len() == 2 && x.name != "model.embed_tokens.weight")
        .map(|x| x.name.trim_end_matches(".weight").to_string())
        .collect();
    let kind = match format {
        Format::Bf16 => None,
        Format::Fp8 => Some(Kind::Fp8),
        Format::Mxfp4 => Some(Kind::Mxfp4),
    };
    if let Some(k) = kind {
        c["quantization_config"] = quantization_config(k, ignore);
    }
    c
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut s = shape(&args.shape)?;
    if let Some(l) = args.layers {
        s.layers = l;
    }
    let format = match args.format.as_str() {
        "bf16" => Format::Bf16,
        "fp8" => Format::Fp8,
        "mxfp4" => Format::Mxfp4,
        f => bail!("--format {f}: expected bf16, fp8 or mxfp4"),
    };
    let specs = specs(&s);
    let tensors = layout(&specs, format);
    let total: usize = tensors.iter().map(Stored::bytes).sum();
    let free = free_disk(&args.out);
    if let Some(free) = free {
        if free < total as u64 {
            bail!(
                "{}: {:.1} GB to write, {:.1} GB free",
                args.out.display(),
                total as f64 / 1e9,
                free as f64 / 1e9
            );
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )?
        .progress_chars("#>-"),
    );
    let layout: Vec<OutTensor> = tensors.iter().map(Stored::out).collect();
    let mut cache = None;
    write_sharded(
        &args.out,
        &layout,
        (args.shard_gb * 1e9) as usize,
        &mut |i| Ok(make(&tensors[i], &specs, &mut cache)),
        &mut |i| bar.inc(tensors[i].bytes() as u64),
    )?;
    bar.finish();
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&config(&s, format, &specs))?,
    )?;
    std::fs::write(
        args.out.join("generation_config.json"),
        json!({"bos_token_id": 151643, "eos_token_id": [151643, 151645]}).to_string(),
    )?;
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen2-moe/tokenizer.json");
    std::fs::copy(tok, args.out.join("tokenizer.json"))?;
    eprintln!(
        "wrote {} ({} layers, {:.2} GB)",
        args.out.display(),
        s.layers,
        total as f64 / 1e9
    );
    Ok(())
}

/// Free bytes on the filesystem holding `p` (or its nearest existing parent).
fn free_disk(p: &Path) -> Option<u64> {
    let mut dir = p.to_path_buf();
    while !dir.exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(&dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}
