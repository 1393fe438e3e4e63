//! End-to-end generation speed: our Qwen2-MoE model in several weight formats
//! against candle-transformers 0.11.1's `qwen2_moe` (f32) on the same random
//! checkpoint, in the same run. The checkpoint has Qwen1.5-MoE-A2.7B's shapes
//! (hidden 2048, 16 heads, 60 experts top-4 of size 1408, shared expert 5632,
//! vocab 151936) truncated to `--layers`, stored in bf16 as the real one.
//!
//!     cargo run --release --example bench_generate -- --layers 4 --json
//!
//! Rows (`--variants`): `f32` (everything f32), `bf16` (weights, KV cache and
//! activations bf16), `fp8-experts` / `mxfp4-experts` (experts quantized on
//! load, the rest bf16), `fp8` (every linear FP8), `mxfp4-fp8` (MXFP4 experts,
//! FP8 dense layers). With `--json` the last stdout line is a JSON array of
//! rows: `model`, `weights`, `prompt_tok_s`, `gen_tok_s`, `prompt_vs_candle`,
//! `gen_vs_candle`, `bytes_per_token` (weights a decode step reads) and
//! `bandwidth_pct` (bytes_per_token × gen_tok_s over `read_gb_s`, the read
//! bandwidth probed right after that row's timed runs: this machine's
//! bandwidth drifts within a run, so each row is held to the probe nearest
//! in time; its 1 GiB buffer stays allocated through the run).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_moe::quant::QuantScheme;
use candle_moe_models::{Checkpoint, LoadOptions, Logits, QwenMoeForCausalLM, Session};
use candle_transformers::models::qwen2_moe;
use clap::Parser;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

mod common;
use common::{fill, probe_buffer, read_bandwidth_of};

#[derive(Parser, Debug)]
#[command(about = "End-to-end generation speed against candle-transformers' qwen2_moe")]
struct Args {
    /// Decoder layers of the Qwen1.5-MoE-A2.7B-shaped checkpoint.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Timed runs per model (the best counts).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Rounds of the whole set (the baseline, then every variant), each
    /// loading its models afresh; rows report each figure's median over the
    /// rounds, and each ratio's median over per-round ratios (the baseline
    /// measured minutes before a variant drifts on a noisy machine).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Our variants, comma-separated: f32, bf16, fp8-experts, mxfp4-experts, fp8, mxfp4-fp8.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,bf16,fp8-experts,mxfp4-experts,fp8,mxfp4-fp8"
    )]
    variants: Vec<String>,
    /// Skip the candle-transformers baseline (ratios are then absent).
    #[arg(long)]
    no_candle: bool,
    /// Print the rows as a JSON array on the last line.
    #[arg(long)]
    json: bool,
}

/// Writes the random checkpoint tensor by tensor into `dir` (once).
fn write_checkpoint(dir: &Path, layers: usize) -> Result<()> {
    let (h, heads, inter, moe_i, shared, e, k, vocab) = DIMS;
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    eprintln!(
        "writing a random {layers}-layer checkpoint to {}",
        dir.display()
    );
    std::fs::create_dir_all(dir)?;
    let mut t = HashMap::new();
    let mut seed = 1;
    let mut put = |name: String, shape: &[usize], scale: f32| -> Result<()> {
        seed += 1;
        let n = shape.iter().product();
        let v = Tensor::from_vec(fill(n, seed, scale), shape, &Device::Cpu)?;
        t.insert(name, v.to_dtype(DType::BF16)?);
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
        let se = format!("{p}.mlp.shared_expert");
        put(format!("{se}.gate_proj.weight"), &[shared, h], 0.02)?;
        put(format!("{se}.up_proj.weight"), &[shared, h], 0.02)?;
        put(format!("{se}.down_proj.weight"), &[h, shared], 0.02)?;
        for x in 0..e {
            let ex = format!("{p}.mlp.experts.{x}");
            put(format!("{ex}.gate_proj.weight"), &[moe_i, h], 0.02)?;
            put(format!("{ex}.up_proj.weight"), &[moe_i, h], 0.02)?;
            put(format!("{ex}.down_proj.weight"), &[h, moe_i], 0.02)?;
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
        "sliding_window": 8192, "max_window_layers": 28, "use_sliding_window": false,
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    Ok(())
}

/// hidden, heads, dense intermediate, expert intermediate, shared expert,
/// experts, top-k, vocabulary of Qwen1.5-MoE-A2.7B.
const DIMS: (usize, usize, usize, usize, usize, usize, usize, usize) =
    (2048, 16, 5632, 1408, 5632, 60, 4, 151936);

/// (compute dtype, expert dtype, expert quant, dense quant) of a variant.
type Variant = (
    DType,
    Option<DType>,
    Option<&'static str>,
    Option<&'static str>,
);

fn variant(name: &str) -> Result<Variant> {
    Ok(match name {
        "f32" => (DType::F32, Some(DType::F32), None, None),
        "bf16" => (DType::BF16, None, None, None),
        "fp8-experts" => (DType::BF16, None, Some("fp8"), None),
        "mxfp4-experts" => (DType::BF16, None, Some("mxfp4"), None),
        "fp8" => (DType::BF16, None, Some("fp8"), Some("fp8")),
        "mxfp4-fp8" => (DType::BF16, None, Some("mxfp4"), Some("fp8")),
        o => bail!("--variants: unknown `{o}`"),
    })
}

/// Best (prompt seconds, generation seconds) over `runs` runs of `step`:
/// `step(None)` prefills and returns the first token, `step(Some(t))` decodes.
fn time_runs(
    runs: usize,
    gen: usize,
    reset: &mut dyn FnMut() -> Result<()>,
    step: &mut dyn FnMut(Option<(u32, usize)>) -> Result<u32>,
) -> Result<(f64, f64)> {
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..runs.max(1) {
        reset()?;
        let t = Instant::now();
        let mut next = step(None)?;
        let tp = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..gen {
            next = step(Some((next, i)))?;
        }
        best = (best.0.min(tp), best.1.min(t.elapsed().as_secs_f64()));
    }
    Ok(best)
}

/// candle-transformers' `qwen2_moe` in f32 on the checkpoint: best (prompt,
/// generation) seconds and the weight bytes a decode step reads.
fn candle_run(args: &Args, dir: &Path, prompt: &[u32]) -> Result<((f64, f64), usize)> {
    let (h, heads, inter, moe_i, shared, e, k, vocab) = DIMS;
    let dev = Device::Cpu;
    let cfg = qwen2_moe::Config {
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: inter,
        num_hidden_layers: args.layers,
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
    // SAFETY: the file is ours and not modified while mapped
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &dev,
        )?
    };
    let m = std::cell::RefCell::new(qwen2_moe::Model::new(&cfg, vb)?);
    let x = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
    let argmax = |l: Tensor| -> Result<u32> {
        Ok(l.flatten_all()?
            .to_dtype(DType::F32)?
            .argmax(0)?
            .to_scalar::<u32>()?)
    };
    let best = time_runs(
        args.runs,
        args.gen,
        &mut || {
            m.borrow_mut().clear_kv_cache();
            Ok(())
        },
        &mut |s| match s {
            None => argmax(m.borrow_mut().forward(&x, 0)?),
            Some((t, i)) => argmax(
                m.borrow_mut()
                    .forward(&Tensor::new(&[[t]], &dev)?, args.prompt + i)?,
            ),
        },
    )?;
    // f32 weights: attention, shared experts, routers, lm_head, and the
    // top-k of the experts
    let per_layer = 4 * h * h + 3 * h * shared + h + e * h + k * 3 * moe_i * h;
    let bytes = 4 * (args.layers * per_layer + vocab * h);
    Ok((best, bytes))
}

/// One of our variants on the checkpoint, as [`candle_run`].
fn ours_run(
    args: &Args,
    ck: &Checkpoint,
    name: &str,
    prompt: &[u32],
) -> Result<((f64, f64), usize)> {
    let dev = Device::Cpu;
    let (dt, edt, q, qd) = variant(name)?;
    let opts = LoadOptions {
        expert_dtype: edt,
        quant: q.map(QuantScheme::on_load).transpose()?,
        quant_dense: qd.map(QuantScheme::on_load).transpose()?,
        ..Default::default()
    };
    let m = QwenMoeForCausalLM::new_with_options(&ck.config, ck.var_builder(dt, &dev)?, &opts)?;
    let s = std::cell::RefCell::new(Session::new(&m, 1, args.prompt + args.gen + 1)?);
    let best = time_runs(
        args.runs,
        args.gen,
        &mut || {
            s.borrow_mut().reset();
            Ok(())
        },
        &mut |x| {
            let l = match x {
                None => s.borrow_mut().step(&[prompt], Logits::Last)?,
                Some((t, _)) => s.borrow_mut().step(&[&[t]], Logits::Last)?,
            };
            Ok(l.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
        },
    )?;
    Ok((best, m.decode_bytes_per_token()))
}

/// Each row's speed over the baseline's row of the same round.
fn add_ratios(rows: &mut [serde_json::Value]) {
    let base = rows
        .iter()
        .find(|r| r["model"] == "candle-transformers qwen2_moe")
        .map(|r| (r["prompt_tok_s"].as_f64(), r["gen_tok_s"].as_f64()));
    if let Some((Some(bp), Some(bg))) = base {
        for r in rows.iter_mut() {
            let (p, g) = (r["prompt_tok_s"].as_f64(), r["gen_tok_s"].as_f64());
            if let (Some(p), Some(g)) = (p, g) {
                r["prompt_vs_candle"] = serde_json::json!(p / bp);
                r["gen_vs_candle"] = serde_json::json!(g / bg);
            }
        }
    }
}

/// The rounds' rows (same order in each) as one row per model: every
/// figure the median over the rounds, with `rounds` the count and, from two
/// rounds, each figure's per-round values under `<figure>_rounds`.
fn medians(rounds: &[Vec<serde_json::Value>]) -> Vec<serde_json::Value> {
    let Some(first) = rounds.first() else {
        return vec![];
    };
    let keys = [
        "prompt_tok_s",
        "gen_tok_s",
        "read_gb_s",
        "bandwidth_pct",
        "prompt_vs_candle",
        "gen_vs_candle",
    ];
    let mut out = first.clone();
    for (i, row) in out.iter_mut().enumerate() {
        for key in keys {
            let each: Vec<f64> = rounds.iter().filter_map(|r| r[i][key].as_f64()).collect();
            if each.is_empty() {
                continue;
            }
            let mut v = each.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let m = if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            };
            row[key] = serde_json::json!(m);
            if rounds.len() > 1 {
                row[format!("{key}_rounds")] = serde_json::json!(each);
            }
        }
        row["rounds"] = serde_json::json!(rounds.len());
    }
    out
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let vocab = DIMS.7;
    let dir = std::env::temp_dir().join(format!("candle-moe-bench-qwen15-{}l", args.layers));
    write_checkpoint(&dir, args.layers)?;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect();
    let ck = Checkpoint::open(&dir)?;
    let probe = probe_buffer();
    eprintln!(
        "read bandwidth {:.1} GB/s, {} threads",
        read_bandwidth_of(&probe),
        rayon::current_num_threads()
    );
    let row = |model: &str, weights: &str, (tp, tg): (f64, f64), bytes: usize| {
        let gen_tok_s = args.gen as f64 / tg;
        let bw = read_bandwidth_of(&probe);
        serde_json::json!({
            "model": model,
            "weights": weights,
            "prompt_tok_s": args.prompt as f64 / tp,
            "gen_tok_s": gen_tok_s,
            "bytes_per_token": bytes,
            "read_gb_s": bw,
            "bandwidth_pct": 100.0 * bytes as f64 * gen_tok_s / (bw * 1e9),
        })
    };

    let mut rounds = vec![];
    for round in 0..args.rounds.max(1) {
        if args.rounds > 1 {
            eprintln!("round {} of {}", round + 1, args.rounds);
        }
        let mut rows: Vec<serde_json::Value> = vec![];
        if !args.no_candle {
            let (best, bytes) = candle_run(&args, &dir, &prompt)?;
            rows.push(row("candle-transformers qwen2_moe", "f32", best, bytes));
        }
        for name in &args.variants {
            let (best, bytes) = ours_run(&args, &ck, name, &prompt)?;
            rows.push(row("candle-moe", name, best, bytes));
        }
        add_ratios(&mut rows);
        rounds.push(rows);
    }
    let rows = medians(&rounds);
    println!(
        "{} layers, prompt {} tokens, {} generated (best of {}, median of {} round(s)); read GB/s probed after each row",
        args.layers, args.prompt, args.gen, args.runs, args.rounds.max(1)
    );
    println!(
        "{:<30} {:<14} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "model",
        "weights",
        "prompt t/s",
        "gen t/s",
        "prompt×",
        "gen×",
        "MB/token",
        "read GB/s",
        "bw %"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<30} {:<14} {:>10.1} {:>9.2} {:>8.2} {:>8.2} {:>9.0} {:>9.1} {:>6.1}",
            r["model"].as_str().unwrap_or(""),
            r["weights"].as_str().unwrap_or(""),
            f("prompt_tok_s"),
            f("gen_tok_s"),
            f("prompt_vs_candle"),
            f("gen_vs_candle"),
            f("bytes_per_token") / 1e6,
            f("read_gb_s"),
            f("bandwidth_pct"),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::from(rows));
    }
    Ok(())
}
