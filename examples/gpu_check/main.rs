//! GPU verification in one binary (build with `--features cuda`): every CUDA op
//! against its CPU twin on fresh random inputs (every grouped-GEMM kernel
//! forced in turn, each weight format, blocks of 16 and 64 rows; set
//! `CANDLE_MOE_CUDA_GEMM` to force one kernel everywhere), the FusedMoe layer on vLLM's
//! test shapes (bf16 2e-2 abs, FP8 block 0.035 rel, MXFP4), the tiny
//! transformers checkpoints on cuda against their references, and a benchmark
//! of the layer at Qwen3-30B-A3B dims (achieved HBM bandwidth for decode,
//! TFLOP/s for prefill), also against candle-transformers' `FusedMoe`
//! (candle's `moe_gemm`) on the same weights, and the whole model's decode
//! step at those dims (its prompt logits against the CPU's first). Prints a
//! table and writes JSON.
//!
//!     cargo build --release --features cuda --example gpu_check
//!     gpu_check [--out gpu.json] [--fixtures tests/fixtures] [--quick]
//!
//! Without a usable CUDA device it says so and exits with status 2.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_moe::format::PackedWeights;
use candle_moe::ops::{
    grouped_gemm, grouped_gemm_with_kernel, moe_align_block_size, router_weights, topk_select,
    CudaGemmKernel, GroupedGemmArgs, ScoringFunc,
};
use candle_moe::quant::QuantScheme;
use candle_moe::{FusedMoe, FusedMoeConfig};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

mod bench;
mod kernels;
mod model;
use bench::{bench, bench_vs_candle};
use kernels::{bench_kernels, kernel_checks};
use model::model_step;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale)
            .collect()
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if a.len() != b.len() {
        bail!("lengths differ: {} vs {}", a.len(), b.len())
    }
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let mean_abs_diff =
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len().max(1) as f32;
    let mean_abs = b.iter().map(|y| y.abs()).sum::<f32>() / b.len().max(1) as f32;
    Ok((err, mean_abs_diff / mean_abs.max(1e-30)))
}

struct Report {
    rows: Vec<Value>,
    failed: usize,
}

impl Report {
    fn add(&mut self, check: &str, params: Value, err: f32, tol: f32, metric: &str) {
        let ok = err <= tol && err.is_finite();
        if !ok {
            self.failed += 1;
        }
        println!(
            "{:<5} {check:<28} {metric} {err:.3e} (tol {tol:.1e})  {params}",
            if ok { "ok" } else { "FAIL" }
        );
        self.rows.push(json!({"check": check, "params": params, "metric": metric, "value": err, "tol": tol, "pass": ok}));
    }
}

fn routing_checks(gpu: &Device, r: &mut Report, rng: &mut Rng, quick: bool) -> Result<()> {
    let tokens: &[usize] = if quick { &[1, 33] } else { &[1, 33, 4096] };
    for &t in tokens {
        for &(e, k, groups, tg, sigmoid) in &[
            (8usize, 2usize, 1usize, 1usize, false),
            (60, 4, 1, 1, false),
            (128, 8, 1, 1, false),
            (256, 8, 8, 4, true),
        ] {
            let logits = Tensor::from_vec(rng.vec(t * e, 3.0), (t, e), &Device::Cpu)?;
            let bias = if sigmoid {
                Some(Tensor::from_vec(rng.vec(e, 0.1), e, &Device::Cpu)?)
            } else {
                None
            };
            let scoring = if sigmoid {
                ScoringFunc::Sigmoid
            } else {
                ScoringFunc::Softmax
            };
            let op = candle_moe::ops::topk::TopKSelect {
                top_k: k,
                scoring,
                num_expert_group: groups,
                topk_group: tg,
            };
            let ids_c = topk_select(&logits, bias.as_ref(), op.clone())?;
            let lg = logits.to_device(gpu)?;
            let bg = bias.as_ref().map(|b| b.to_device(gpu)).transpose()?;
            let ids_g = topk_select(&lg, bg.as_ref(), op)?;
            let mism = ids_c
                .flatten_all()?
                .to_vec1::<u32>()?
                .iter()
                .zip(
                    ids_g
                        .to_device(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<u32>()?,
                )
                .filter(|(a, b)| **a != *b)
                .count();
            let p = json!({"tokens": t, "experts": e, "top_k": k, "groups": groups, "sigmoid": sigmoid});
            r.add("topk_select ids", p.clone(), mism as f32, 0.0, "mismatches");
            let wop = candle_moe::ops::topk::RouterWeights {
                scoring,
                renormalize: true,
                scaling: 1.0,
            };
            let wc = router_weights(&logits, &ids_c, wop.clone())?;
            let wg = router_weights(&lg, &ids_c.to_device(gpu)?, wop)?;
            r.add("router_weights", p, max_rel(&wg, &wc)?.0, 1e-5, "max abs");
            // align, with and without a random expert map
            let local: Vec<i32> = (0..e)
                .map(|x| {
                    if x % 3 == 0 {
                        -1
                    } else {
                        (x - x / 3 - 1) as i32
                    }
                })
                .collect();
            let n_local = local.iter().filter(|&&v| v >= 0).count();
            for map in [None, Some(local.clone())] {
                let m_c = map
                    .as_ref()
                    .map(|m| Tensor::new(m.as_slice(), &Device::Cpu))
                    .transpose()?;
                let m_g = m_c.as_ref().map(|m| m.to_device(gpu)).transpose()?;
                let nl = if map.is_some() { n_local } else { e };
                let a_c = moe_align_block_size(&ids_c, 16, e, nl, m_c.as_ref())?;
                let a_g = moe_align_block_size(&ids_c.to_device(gpu)?, 16, e, nl, m_g.as_ref())?;
                let v = |t: &Tensor| -> Result<Vec<u32>> {
                    Ok(t.to_device(&Device::Cpu)?.to_vec1::<u32>()?)
                };
                let mut bad = 0usize;
                bad += (v(&a_c.num_tokens_post_padded()?)? != v(&a_g.num_tokens_post_padded()?)?)
                    as usize;
                bad += (v(&a_c.expert_ids()?)? != v(&a_g.expert_ids()?)?) as usize;
                bad += (v(&a_c.expert_num_tokens()?)? != v(&a_g.expert_num_tokens()?)?) as usize;
                // rows may be ordered differently inside an expert's run: compare per block as sets
                let (sc, sg) = (v(&a_c.sorted_token_ids()?)?, v(&a_g.sorted_token_ids()?)?);
                let post = v(&a_c.num_tokens_post_padded()?)?[0] as usize;
                let mut xc = sc[..post].to_vec();
                let mut xg = sg[..post].to_vec();
                // runs of one expert are contiguous: sort within each run of equal expert ids
                let eids = v(&a_c.expert_ids()?)?;
                let mut b0 = 0;
                while b0 < post / 16 {
                    let mut b1 = b0 + 1;
                    while b1 < post / 16 && eids[b1] == eids[b0] {
                        b1 += 1;
                    }
                    xc[b0 * 16..b1 * 16].sort_unstable();
                    xg[b0 * 16..b1 * 16].sort_unstable();
                    b0 = b1;
                }
                bad += (xc != xg) as usize;
                r.add(
                    "align_block_size",
                    json!({"tokens": t, "experts": e, "top_k": k, "map": map.is_some()}),
                    bad as f32,
                    0.0,
                    "mismatched sections",
                );
            }
        }
    }
    Ok(())
}

/// A random MoE layer in the fused 3-D layout.
fn layer(
    rng: &mut Rng,
    e: usize,
    n: usize,
    k: usize,
    dt: DType,
) -> Result<HashMap<String, Tensor>> {
    Ok(HashMap::from([
        (
            "experts.gate_up_proj".to_string(),
            Tensor::from_vec(rng.vec(e * 2 * n * k, 0.1), (e, 2 * n, k), &Device::Cpu)?
                .to_dtype(dt)?,
        ),
        (
            "experts.down_proj".to_string(),
            Tensor::from_vec(rng.vec(e * k * n, 0.1), (e, k, n), &Device::Cpu)?.to_dtype(dt)?,
        ),
    ]))
}

fn layer_checks(gpu: &Device, r: &mut Report, rng: &mut Rng, quick: bool) -> Result<()> {
    // (m, n = intermediate, k = hidden, e, top_k): vLLM test_moe / test_block_fp8 shapes
    let shapes: &[(usize, usize, usize, usize, usize)] = if quick {
        &[(1, 128, 128, 8, 2), (33, 1024, 511, 8, 6)]
    } else {
        &[
            (1, 128, 128, 8, 2),
            (33, 1024, 511, 8, 6),
            (222, 2048, 1024, 64, 2),
            (1024, 1024, 2048, 64, 6),
            (8192, 768, 2048, 128, 8),
        ]
    };
    for &(m, n, k, e, top_k) in shapes {
        for (name, dt, quant, tol, metric) in [
            ("fused_moe f32", DType::F32, None, 1e-4f32, "max abs"),
            ("fused_moe bf16", DType::BF16, None, 2e-2, "max abs"),
            ("fused_moe f16", DType::F16, None, 2e-2, "max abs"),
            (
                "fused_moe fp8 block",
                DType::BF16,
                Some("fp8"),
                0.035,
                "mean rel",
            ),
            (
                "fused_moe mxfp4",
                DType::BF16,
                Some("mxfp4"),
                1e-3,
                "mean rel",
            ),
        ] {
            if quant == Some("mxfp4") && (k % 32 != 0 || n % 32 != 0) {
                continue;
            }
            let w = layer(rng, e, n, k, dt)?;
            let mut cfg = FusedMoeConfig::new(k, n, e, top_k);
            cfg.renormalize = true;
            cfg.quant = quant.map(QuantScheme::on_load).transpose()?;
            let cpu = FusedMoe::new(&cfg, VarBuilder::from_tensors(w.clone(), dt, &Device::Cpu))?;
            let wg: HashMap<String, Tensor> = w
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_device(gpu)?)))
                .collect::<Result<_>>()?;
            let cuda = FusedMoe::new(&cfg, VarBuilder::from_tensors(wg, dt, gpu))?;
            let x = Tensor::from_vec(rng.vec(m * k, 1.0), (m, k), &Device::Cpu)?.to_dtype(dt)?;
            let l = Tensor::from_vec(rng.vec(m * e, 2.0), (m, e), &Device::Cpu)?;
            let want = cpu.forward(&x, &l)?;
            let got = cuda.forward(&x.to_device(gpu)?, &l.to_device(gpu)?)?;
            let (abs, rel) = max_rel(&got, &want)?;
            let v = if metric == "mean rel" { rel } else { abs };
            r.add(
                name,
                json!({"m": m, "n": n, "k": k, "e": e, "top_k": top_k}),
                v,
                tol,
                metric,
            );
        }
    }
    Ok(())
}

/// Stacked `[e, n, k]` weights of one format from f32 values: the weight
/// tensor and, for FP8 (128×128 blocks) / MXFP4, its quant description.
fn parity_checks(gpu: &Device, r: &mut Report, dir: &std::path::Path) -> Result<()> {
    use candle_moe_models::{Checkpoint, LoadOptions, QwenMoeForCausalLM};
    for name in [
        "qwen2_moe_f32",
        "qwen3_moe_f32",
        "qwen2_moe_bf16",
        "qwen3_moe_fp8_block",
        "qwen2_moe_mxfp4",
    ] {
        let d = dir.join(name);
        let exp: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("expected.json"))
                .with_context(|| format!("{}", d.display()))?,
        )?;
        let ck = Checkpoint::open(&d)?;
        let m = QwenMoeForCausalLM::new_with_options(
            &ck.config,
            ck.var_builder(DType::F32, gpu)?,
            &LoadOptions::default(),
        )?;
        let mut worst = 0f32;
        for c in exp["cases"].as_array().context("cases")? {
            let ids: Vec<u32> = c["prompt_ids"]
                .as_array()
                .context("ids")?
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect();
            let got = candle_moe_models::Session::new(&m, 1, ids.len())?
                .step(&[&ids], candle_moe_models::Logits::All)?
                .to_device(&Device::Cpu)?;
            let want: Vec<Vec<f32>> = serde_json::from_value(c["prompt_logits"].clone())?;
            let want = Tensor::new(want, &Device::Cpu)?;
            let (abs, _) = max_rel(&got, &want)?;
            let mag = want.abs()?.max_all()?.to_scalar::<f32>()?;
            worst = worst.max(abs / mag);
        }
        let tol = if name.contains("fp8") { 1e-3 } else { 1e-4 };
        r.add(
            "checkpoint parity",
            json!({"fixture": name}),
            worst,
            tol,
            "max rel",
        );
    }
    Ok(())
}

/// GPU checks and benchmarks (see the module doc).
#[derive(clap::Parser)]
struct Args {
    /// Where the JSON report goes.
    #[arg(long, default_value = "gpu_check.json")]
    out: String,
    /// The transformers-made checkpoints with their expected logits.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: std::path::PathBuf,
    /// Fewer shapes and repetitions (and a 1-layer model).
    #[arg(long)]
    quick: bool,
}

fn main() -> Result<()> {
    let Args {
        out,
        fixtures,
        quick,
    } = <Args as clap::Parser>::parse();
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_check: no usable CUDA device ({e}); build with --features cuda and run on a GPU machine");
            std::process::exit(2);
        }
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut r = Report {
        rows: vec![],
        failed: 0,
    };
    let t0 = Instant::now();
    routing_checks(&gpu, &mut r, &mut rng, quick)?;
    kernel_checks(&gpu, &mut r, &mut rng, quick)?;
    layer_checks(&gpu, &mut r, &mut rng, quick)?;
    if fixtures.exists() {
        parity_checks(&gpu, &mut r, &fixtures)?;
    } else {
        println!(
            "skipping checkpoint parity: {} not found",
            fixtures.display()
        );
    }
    let mut b = bench_kernels(&gpu, &mut rng, quick)?;
    b.extend(bench(&gpu, &mut rng, quick)?);
    b.extend(bench_vs_candle(&gpu, &mut r, &mut rng, quick)?);
    b.extend(model_step(&gpu, &mut r, &mut rng, quick)?);
    let v = json!({"checks": r.rows, "failed": r.failed, "bench": b, "seconds": t0.elapsed().as_secs_f64()});
    std::fs::write(&out, serde_json::to_string_pretty(&v)?)?;
    println!("{} checks, {} failed; wrote {out}", r.rows.len(), r.failed);
    if r.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
