//! End-to-end generation speed: our Qwen2-MoE loader (FusedMoe layers) against
//! candle-transformers 0.11.1's `qwen2_moe` on the same random checkpoint in
//! the same run. The checkpoint has Qwen1.5-MoE-A2.7B's shapes (hidden 2048,
//! 16 heads, 60 experts top-4 of size 1408, shared expert 5632, vocab 151936),
//! truncated to a few layers.
//!
//!     cargo run --release --example bench_generate [-- --layers 2 --prompt 64 --gen 32 --dtype f32]
//!
//! Our model runs four times: experts in the compute dtype, experts kept in
//! the checkpoint's bf16 (exact widening in the kernels, half the expert
//! bytes), and experts quantized on load to FP8 (W8A8) and MXFP4 (W4A16).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_moe::quant::QuantScheme;
use candle_moe_models::{Checkpoint, LoadOptions, Logits, QwenMoeForCausalLM, Session};
use candle_transformers::models::qwen2_moe;
use std::collections::HashMap;
use std::time::Instant;

fn arg(name: &str, default: &str) -> String {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.into())
}

fn rand_tensor(shape: &[usize], seed: u64, scale: f32, dt: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dt)?)
}

fn main() -> Result<()> {
    let layers: usize = arg("--layers", "2").parse().context("--layers")?;
    let prompt_len: usize = arg("--prompt", "64").parse().context("--prompt")?;
    let gen: usize = arg("--gen", "32").parse().context("--gen")?;
    let dt = match arg("--dtype", "f32").as_str() {
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let (h, heads, inter, moe_i, shared, e, k, vocab) = (2048, 16, 5632, 1408, 5632, 60, 4, 151936);
    // the checkpoint is stored in bf16, as the real one; `--dtype` is the compute dtype
    let dir = std::env::temp_dir().join(format!("candle-moe-bench-qwen15-{layers}l"));
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "writing a random {layers}-layer checkpoint to {}",
            dir.display()
        );
        std::fs::create_dir_all(&dir)?;
        let mut t = HashMap::new();
        let mut seed = 1;
        let mut put = |name: String, shape: &[usize], scale: f32| -> Result<()> {
            seed += 1;
            t.insert(name, rand_tensor(shape, seed, scale, DType::BF16)?);
            Ok(())
        };
        put("model.embed_tokens.weight".into(), &[vocab, h], 0.5)?;
        put("lm_head.weight".into(), &[vocab, h], 0.02)?;
        put("model.norm.weight".into(), &[h], 1.0)?;
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            for n in ["q", "k", "v", "o"] {
                put(format!("{p}.self_attn.{n}_proj.weight"), &[h, h], 0.02)?;
            }
            for n in ["q", "k", "v"] {
                put(format!("{p}.self_attn.{n}_proj.bias"), &[h], 0.02)?;
            }
            put(format!("{p}.input_layernorm.weight"), &[h], 1.0)?;
            put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0)?;
            put(format!("{p}.mlp.gate.weight"), &[e, h], 0.05)?;
            put(format!("{p}.mlp.shared_expert_gate.weight"), &[1, h], 0.02)?;
            put(
                format!("{p}.mlp.shared_expert.gate_proj.weight"),
                &[shared, h],
                0.02,
            )?;
            put(
                format!("{p}.mlp.shared_expert.up_proj.weight"),
                &[shared, h],
                0.02,
            )?;
            put(
                format!("{p}.mlp.shared_expert.down_proj.weight"),
                &[h, shared],
                0.02,
            )?;
            for x in 0..e {
                put(
                    format!("{p}.mlp.experts.{x}.gate_proj.weight"),
                    &[moe_i, h],
                    0.02,
                )?;
                put(
                    format!("{p}.mlp.experts.{x}.up_proj.weight"),
                    &[moe_i, h],
                    0.02,
                )?;
                put(
                    format!("{p}.mlp.experts.{x}.down_proj.weight"),
                    &[h, moe_i],
                    0.02,
                )?;
            }
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
        let cfg = serde_json::json!({
            "model_type": "qwen2_moe", "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false, "hidden_act": "silu", "decoder_sparse_step": 1,
            "moe_intermediate_size": moe_i, "shared_expert_intermediate_size": shared,
            "num_experts_per_tok": k, "num_experts": e, "norm_topk_prob": false, "mlp_only_layers": [],
            "sliding_window": 8192, "max_window_layers": 28, "use_sliding_window": false
        });
        std::fs::write(dir.join("config.json"), cfg.to_string())?;
    }
    let dev = Device::Cpu;
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect();
    let x = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
    let ck = Checkpoint::open(&dir)?;
    let mut rows = vec![];

    // ours: experts in the compute dtype, kept in the checkpoint's bf16, and
    // quantized on load to FP8 (W8A8) / MXFP4 (W4A16)
    for (label, edt, quant) in [
        ("candle-moe (FusedMoe)", None, None),
        ("candle-moe, bf16 experts", Some(DType::BF16), None),
        ("candle-moe, fp8 experts", None, Some("fp8")),
        ("candle-moe, mxfp4 experts", None, Some("mxfp4")),
    ] {
        if edt == Some(dt) {
            continue;
        }
        let opts = LoadOptions {
            expert_dtype: edt,
            quant: quant.map(QuantScheme::on_load).transpose()?,
            ..Default::default()
        };
        let m = QwenMoeForCausalLM::new_with_options(&ck.config, ck.var_builder(dt, &dev)?, &opts)?;
        let mut best = (f64::MAX, f64::MAX);
        let mut s = Session::new(&m, 1, prompt_len + gen + 1)?;
        for _ in 0..2 {
            s.reset();
            let t = Instant::now();
            let mut l = s.step(&[&prompt], Logits::Last)?;
            let tp = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..gen {
                let next = l.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
                l = s.step(&[&[next]], Logits::Last)?;
            }
            let tg = t.elapsed().as_secs_f64();
            best = (best.0.min(tp), best.1.min(tg));
        }
        rows.push((label, prompt_len as f64 / best.0, gen as f64 / best.1));
    }
    // candle-transformers
    if std::env::var("ONLY_OURS").is_err() {
        let cfg = qwen2_moe::Config {
            vocab_size: vocab,
            hidden_size: h,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            max_position_embeddings: 8192,
            sliding_window: 8192,
            max_window_layers: 28,
            tie_word_embeddings: false,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            use_sliding_window: false,
            hidden_act: candle_nn::Activation::Silu,
            decoder_sparse_step: 1,
            moe_intermediate_size: moe_i,
            shared_expert_intermediate_size: shared,
            num_experts_per_tok: k,
            num_experts: e,
            norm_topk_prob: false,
        };
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                dt,
                &dev,
            )?
        };
        let mut m = qwen2_moe::Model::new(&cfg, vb)?;
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..2 {
            m.clear_kv_cache();
            let t = Instant::now();
            let mut l = m.forward(&x, 0)?;
            let tp = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for i in 0..gen {
                let next = l
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .argmax(0)?
                    .to_scalar::<u32>()?;
                l = m.forward(&Tensor::new(&[[next]], &dev)?, prompt_len + i)?;
            }
            let tg = t.elapsed().as_secs_f64();
            best = (best.0.min(tp), best.1.min(tg));
        }
        rows.push((
            "candle-transformers qwen2_moe",
            prompt_len as f64 / best.0,
            gen as f64 / best.1,
        ));
    }
    println!("{layers} layers, {dt:?}, prompt {prompt_len} tokens, {gen} generated (best of 2)");
    println!("{:<32} {:>14} {:>14}", "model", "prompt tok/s", "gen tok/s");
    for (n, p, g) in &rows {
        println!("{n:<32} {p:>14.1} {g:>14.2}");
    }
    if let Some(base) = rows.iter().find(|r| r.0.starts_with("candle-transformers")) {
        for r in rows.iter().filter(|r| r.0.starts_with("candle-moe")) {
            println!(
                "{} / candle-transformers: prompt {:.2}x, generation {:.2}x",
                r.0,
                r.1 / base.1,
                r.2 / base.2
            );
        }
    }
    Ok(())
}
