//! The dense linear op (`ops::linear`) against candle's matmul on the same
//! weights, same run: decode (1 row) and prefill (64 rows) for f32 / bf16
//! weights and FP8 / MXFP4 packed ones, with f32 or bf16 activations.
//!
//!     cargo run --release --example bench_linear -- --json
//!
//! Rows: `shape` (N×K), `weights`, `act`, `rows`, `ms`, `gb_s` (weight bytes
//! read per second), `bw_pct` (of the read bandwidth probed in the same run),
//! `gflop_s`, `vs_candle` (candle's `x.matmul(wᵀ)` in the activations' dtype
//! over f32/bf16 weights of the same values; absent for packed formats).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_moe::format::fp8::{quantize_fp8_block, SourcePrecision};
use candle_moe::format::mxfp4::quantize_mxfp4;
use candle_moe::format::PackedWeights;
use candle_moe::ops::{linear, LinearArgs};
use clap::Parser;
use std::time::Instant;

mod common;
use common::{fill, read_bandwidth};

#[derive(Parser, Debug)]
struct Args {
    /// Weight shapes N×K, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2048x2048,5632x2048,151936x2048"
    )]
    shapes: Vec<String>,
    /// Activation rows, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    rows: Vec<usize>,
    /// Weight formats: f32, bf16, fp8, mxfp4.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,fp8,mxfp4")]
    weights: Vec<String>,
    /// Timed repetitions (median).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

fn median_ms(reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let bw = read_bandwidth();
    let mut rows = vec![];
    for shape in &args.shapes {
        let (n, k) = shape
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("--shapes: `{shape}` is not NxK"))?;
        let wf = fill(n * k, 3, 0.03);
        for wname in &args.weights {
            let (w, args_l, bytes, float) = match wname.as_str() {
                "f32" | "bf16" => {
                    let dt = if wname == "f32" {
                        DType::F32
                    } else {
                        DType::BF16
                    };
                    let w = Tensor::from_slice(&wf, (n, k), &dev)?.to_dtype(dt)?;
                    let b = n * k * dt.size_in_bytes();
                    (w, LinearArgs::default(), b, true)
                }
                "fp8" => {
                    let (q, s) = quantize_fp8_block(&wf, n, k, 128, 128, SourcePrecision::Bf16);
                    let sc = Tensor::from_vec(s, (1, n.div_ceil(128), k.div_ceil(128)), &dev)?;
                    let b = n * k + sc.elem_count() * 4;
                    let a = LinearArgs {
                        quant: Some(PackedWeights::Fp8 {
                            scales: sc,
                            block: (128, 128),
                        }),
                        act_quant_group: Some(128),
                        ..Default::default()
                    };
                    (Tensor::from_vec(q, (n, k), &dev)?, a, b, false)
                }
                "mxfp4" => {
                    let (q, s) = quantize_mxfp4(&wf, n, k);
                    let b = q.len() + s.len();
                    let a = LinearArgs {
                        quant: Some(PackedWeights::Mxfp4 {
                            scales: Tensor::from_vec(s, (1, n, k / 32), &dev)?,
                        }),
                        ..Default::default()
                    };
                    (Tensor::from_vec(q, (n, k / 2), &dev)?, a, b, false)
                }
                o => anyhow::bail!("--weights: unknown `{o}`"),
            };
            for &m in &args.rows {
                for act in [DType::F32, DType::BF16] {
                    let x = Tensor::from_vec(fill(m * k, 5, 1.0), (m, k), &dev)?.to_dtype(act)?;
                    let ms = median_ms(args.reps, &mut || {
                        std::hint::black_box(linear(&x, &w, &args_l)?);
                        Ok(())
                    })?;
                    let base = if float {
                        let wc = w.to_dtype(act)?;
                        Some(median_ms(args.reps.min(5), &mut || {
                            std::hint::black_box(x.matmul(&wc.t()?)?);
                            Ok(())
                        })?)
                    } else {
                        None
                    };
                    let gb_s = bytes as f64 / ms / 1e6;
                    rows.push(serde_json::json!({
                        "shape": shape, "weights": wname, "act": format!("{act:?}").to_lowercase(),
                        "rows": m, "ms": ms, "gb_s": gb_s, "bw_pct": 100.0 * gb_s / bw,
                        "gflop_s": 2.0 * (m * n * k) as f64 / ms / 1e6,
                        "vs_candle": base.map(|b| b / ms),
                    }));
                }
            }
        }
    }
    println!("read bandwidth {bw:.1} GB/s");
    println!(
        "{:<13} {:<6} {:<5} {:>5} {:>9} {:>7} {:>6} {:>8} {:>8}",
        "shape", "w", "act", "rows", "ms", "GB/s", "bw%", "GFLOP/s", "vs cndl"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<13} {:<6} {:<5} {:>5} {:>9.3} {:>7.1} {:>6.1} {:>8.1} {:>8.2}",
            r["shape"].as_str().unwrap_or(""),
            r["weights"].as_str().unwrap_or(""),
            r["act"].as_str().unwrap_or(""),
            f("rows"),
            f("ms"),
            f("gb_s"),
            f("bw_pct"),
            f("gflop_s"),
            f("vs_candle"),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::from(rows));
    }
    Ok(())
}
