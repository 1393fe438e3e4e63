//! Layer-level benchmark: `FusedMoe` against the per-expert loop that
//! candle-transformers 0.11.1 runs on CPU (its `qwen3_moe` sparse block:
//! softmax → arg-sort top-k on the host → for each expert index_select →
//! gate/up/down linears → weight → index_add), on the same weights, same run.
//!
//!     cargo run --release --example bench_moe [-- --json] [--cases qwen1.5,qwen3]
//!         [--tokens 1,16,512] [--dtypes f32,bf16,fp8,fp8-w8a16,mxfp4] [--reps N]
//!         [--only-fused]
//!
//! `fp8` (128×128 blocks, W8A8), `fp8-w8a16` and `mxfp4` (W4A16) rows quantize the
//! bf16 weights on load and run FusedMoe only; they report their speed against the
//! bf16 FusedMoe row of the same run (`vs_bf16`), with bf16 activations as input.
//!
//! Decode rows also report the share of the machine's read bandwidth (a
//! multi-threaded sum over 1 GiB, measured in the same run) that the bytes the
//! step must read (the distinct routed experts' weights) imply.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_moe::quant::{Fp8, QuantScheme};
use candle_moe::{FusedMoe, FusedMoeConfig};
use candle_nn::{Linear, VarBuilder};
use clap::Parser;
use std::collections::HashMap;
use std::time::Instant;

mod common;
use common::{fill, read_bandwidth};

struct Case {
    name: &'static str,
    h: usize,
    i: usize,
    e: usize,
    k: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "qwen1.5-moe-a2.7b",
        h: 2048,
        i: 1408,
        e: 60,
        k: 4,
    },
    Case {
        name: "qwen3-30b-a3b",
        h: 2048,
        i: 768,
        e: 128,
        k: 8,
    },
];

/// The candle-transformers CPU loop, expert by expert.
struct CandleLoop {
    experts: Vec<(Linear, Linear, Linear)>,
    top_k: usize,
}

impl CandleLoop {
    fn forward(&self, xs: &Tensor, logits: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = xs.dim(1)?;
        let probs = candle_nn::ops::softmax_last_dim(logits)?;
        let ids = probs
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, self.top_k)?
            .contiguous()?;
        let w = probs
            .gather(&ids, D::Minus1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let ids = ids.to_vec2::<u32>()?;
        let mut rows = vec![vec![]; self.experts.len()];
        let mut wts = vec![vec![]; self.experts.len()];
        for (t, (w, ids)) in w.iter().zip(&ids).enumerate() {
            for (&w, &e) in w.iter().zip(ids) {
                rows[e as usize].push(t as u32);
                wts[e as usize].push(w);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (e, (gate, up, down)) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
            let wt = Tensor::new(wts[e].as_slice(), xs.device())?
                .reshape(((), 1))?
                .to_dtype(xs.dtype())?;
            let x = xs.index_select(&idx, 0)?.reshape(((), hidden))?;
            let a = candle_nn::ops::silu(&gate.forward(&x)?)?;
            let y = down.forward(&(a * up.forward(&x)?)?)?;
            ys = ys.index_add(&idx, &y.broadcast_mul(&wt)?, 0)?;
        }
        Ok(ys)
    }
}

fn median_ms(mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

#[derive(Parser, Debug)]
#[command(about = "FusedMoe against candle-transformers' per-expert loop, same weights, same run")]
struct Args {
    /// Print the rows as a JSON array on the last line.
    #[arg(long)]
    json: bool,
    /// Skip the candle baseline (profiling aid).
    #[arg(long)]
    only_fused: bool,
    /// Layer shapes: qwen1.5, qwen3.
    #[arg(long, value_delimiter = ',', default_value = "qwen1.5,qwen3")]
    cases: Vec<String>,
    /// Tokens per forward.
    #[arg(long, value_delimiter = ',', default_value = "1,16,512")]
    tokens: Vec<usize>,
    /// Expert formats: f32, bf16, f16, fp8, fp8-w8a16, mxfp4.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<String>,
    /// Timed repetitions (default: 24 for ≤ 16 tokens, 3 beyond).
    #[arg(long)]
    reps: Option<usize>,
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let Args {
        json,
        only_fused,
        cases,
        tokens,
        dtypes,
        reps,
    } = Args::parse();
    let dev = Device::Cpu;
    let bw = read_bandwidth();
    eprintln!(
        "read bandwidth: {bw:.1} GB/s, threads: {}",
        rayon::current_num_threads()
    );
    let mut rows = Vec::new();
    for case in CASES
        .iter()
        .filter(|c| cases.iter().any(|n| c.name.starts_with(n.as_str())))
    {
        for dts in &dtypes {
            let (dt, quant) = match dts.as_str() {
                "f32" => (DType::F32, None),
                "bf16" => (DType::BF16, None),
                "f16" => (DType::F16, None),
                "fp8" => (DType::BF16, Some(QuantScheme::on_load("fp8")?)),
                "fp8-w8a16" => (
                    DType::BF16,
                    Some(QuantScheme::Fp8(Fp8::quantize_on_load().weight_only())),
                ),
                "mxfp4" => (DType::BF16, Some(QuantScheme::on_load("mxfp4")?)),
                o => bail!("unknown dtype {o}"),
            };
            // bytes of one expert's weights (scales included) as the kernels read them
            let expert_bytes = |h: usize, i: usize| -> f64 {
                let n = (3 * h * i) as f64;
                match dts.as_str() {
                    "fp8" | "fp8-w8a16" => n + n / (128.0 * 128.0) * 4.0,
                    "mxfp4" => n / 2.0 + n / 32.0,
                    _ => n * dt.size_in_bytes() as f64,
                }
            };
            let only_fused = only_fused || quant.is_some();
            let (h, i, e, k) = (case.h, case.i, case.e, case.k);
            let w13 = Tensor::from_vec(fill(e * 2 * i * h, 1, 0.03), (e, 2 * i, h), &dev)?
                .to_dtype(dt)?;
            let w2 = Tensor::from_vec(fill(e * h * i, 2, 0.03), (e, h, i), &dev)?.to_dtype(dt)?;
            let experts = (0..if only_fused { 0 } else { e })
                .map(|x| -> Result<_> {
                    let g = w13.get(x)?;
                    // separate tensors per expert, as candle-transformers loads them
                    Ok((
                        Linear::new(g.narrow(0, 0, i)?.affine(1.0, 0.0)?, None),
                        Linear::new(g.narrow(0, i, i)?.affine(1.0, 0.0)?, None),
                        Linear::new(w2.get(x)?.affine(1.0, 0.0)?, None),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let baseline = CandleLoop { experts, top_k: k };
            let vb = VarBuilder::from_tensors(
                HashMap::from([
                    ("experts.gate_up_proj".to_string(), w13.clone()),
                    ("experts.down_proj".to_string(), w2.clone()),
                ]),
                dt,
                &dev,
            );
            let mut cfg = FusedMoeConfig::new(h, i, e, k);
            cfg.quant = quant.clone();
            let t_load = Instant::now();
            let moe = FusedMoe::new(&cfg, vb)?;
            if quant.is_some() {
                eprintln!(
                    "{} {dts}: quantized on load in {:.1} s",
                    case.name,
                    t_load.elapsed().as_secs_f64()
                );
            }
            for &t in &tokens {
                // a few different inputs so decode does not re-read the same experts from cache
                let n_inputs = if t <= 16 { 8 } else { 2 };
                let inputs: Vec<(Tensor, Tensor)> = (0..n_inputs)
                    .map(|s| -> Result<_> {
                        Ok((
                            Tensor::from_vec(fill(t * h, 100 + s as u64, 1.0), (t, h), &dev)?
                                .to_dtype(dt)?,
                            Tensor::from_vec(fill(t * e, 200 + s as u64, 2.0), (t, e), &dev)?
                                .to_dtype(dt)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                // bytes the step must read: the distinct routed experts
                let mut distinct = 0f64;
                for (_, l) in &inputs {
                    let (_, ids) = moe.router().route(l)?;
                    let mut used = vec![false; e];
                    for id in ids.flatten_all()?.to_vec1::<u32>()? {
                        used[id as usize] = true;
                    }
                    distinct += used.iter().filter(|&&u| u).count() as f64;
                }
                let bytes = distinct / n_inputs as f64 * expert_bytes(h, i);
                let flops = (t * k * 3 * 2 * h * i) as f64;
                let reps = reps.unwrap_or(if t <= 16 { 24 } else { 3 });
                let mut j = 0;
                let ms_loop = if only_fused {
                    f64::NAN
                } else {
                    median_ms(
                        || {
                            let (x, l) = &inputs[j % n_inputs];
                            j += 1;
                            std::hint::black_box(baseline.forward(x, l)?);
                            Ok(())
                        },
                        reps,
                    )?
                };
                let mut j = 0;
                let ms_fused = median_ms(
                    || {
                        let (x, l) = &inputs[j % n_inputs];
                        j += 1;
                        std::hint::black_box(moe.forward(x, l)?);
                        Ok(())
                    },
                    reps,
                )?;
                let mut impls = vec![("fused_moe", ms_fused)];
                if !only_fused {
                    impls.insert(0, ("candle_loop", ms_loop));
                }
                let bf16_ms = rows
                    .iter()
                    .find(|r: &&serde_json::Value| {
                        r["case"] == case.name
                            && r["tokens"] == t
                            && r["dtype"] == "bf16"
                            && r["impl"] == "fused_moe"
                    })
                    .and_then(|r| r["ms"].as_f64());
                for (name, ms) in impls {
                    let mut row = serde_json::json!({
                        "case": case.name, "tokens": t, "dtype": dts, "impl": name,
                        "ms": (ms * 1000.0).round() / 1000.0,
                        "speedup_vs_candle_loop": ((ms_loop / ms) * 100.0).round() / 100.0,
                        "gflops": ((flops / ms / 1e6) * 10.0).round() / 10.0,
                        "bytes_read_mb": (bytes / 1e5).round() / 10.0,
                    });
                    if let Some(b) = bf16_ms {
                        row["vs_bf16"] = serde_json::json!(((b / ms) * 100.0).round() / 100.0);
                    }
                    if t <= 16 {
                        row["bandwidth_pct"] = serde_json::json!(
                            ((bytes / (ms / 1e3) / 1e9 / bw) * 1000.0).round() / 10.0
                        );
                    }
                    if !json {
                        eprintln!("{row}");
                    }
                    rows.push(row);
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:<20} {:>6} {:>9} {:<12} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8}",
            "case",
            "tokens",
            "dtype",
            "impl",
            "ms",
            "speedup",
            "GFLOP/s",
            "bw %",
            "MB read",
            "vs bf16"
        );
        for r in &rows {
            println!(
                "{:<20} {:>6} {:>9} {:<12} {:>10.3} {:>8.2} {:>8.1} {:>7} {:>8} {:>8}",
                r["case"].as_str().unwrap_or(""),
                r["tokens"],
                r["dtype"].as_str().unwrap_or(""),
                r["impl"].as_str().unwrap_or(""),
                r["ms"].as_f64().unwrap_or(0.0),
                r["speedup_vs_candle_loop"].as_f64().unwrap_or(0.0),
                r["gflops"].as_f64().unwrap_or(0.0),
                r.get("bandwidth_pct")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                r["bytes_read_mb"],
                r.get("vs_bf16").map(|v| v.to_string()).unwrap_or_default(),
            );
        }
    }
    Ok(())
}
