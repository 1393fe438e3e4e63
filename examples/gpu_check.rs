//! GPU verification in one binary (build with `--features cuda`): every CUDA op
//! against its CPU twin on fresh random inputs (every grouped-GEMM kernel
//! forced in turn, each weight format, blocks of 16 and 64 rows; set
//! `CANDLE_MOE_CUDA_GEMM` to force one kernel everywhere), the FusedMoe layer on vLLM's
//! test shapes (bf16 2e-2 abs, FP8 block 0.035 rel, MXFP4), the tiny
//! transformers checkpoints on cuda against their references, and a benchmark
//! of the layer at Qwen3-30B-A3B dims (achieved HBM bandwidth for decode,
//! TFLOP/s for prefill), also against candle-transformers' `FusedMoe`
//! (candle's `moe_gemm`) on the same weights. Prints a table and writes JSON.
//!
//!     cargo build --release --features cuda --example gpu_check
//!     gpu_check [--out gpu.json] [--fixtures tests/fixtures] [--quick]
//!
//! Without a usable CUDA device it says so and exits with status 2.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_moe::ops::{
    grouped_gemm, moe_align_block_size, router_weights, topk_select, CudaGemmKernel,
    GroupedGemmArgs, ScoringFunc, WeightQuant,
};
use candle_moe::quant::QuantScheme;
use candle_moe::{FusedMoe, FusedMoeConfig};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

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
fn weights_as(
    w: &[f32],
    (e, n, k): (usize, usize, usize),
    fmt: &str,
    dev: &Device,
) -> Result<(Tensor, Option<WeightQuant>)> {
    use candle_moe::quant::fp8_codec::{quantize_fp8_block, SourcePrecision};
    use candle_moe::quant::mxfp4_codec::quantize_mxfp4;
    let per = n * k;
    Ok(match fmt {
        "f32" | "bf16" | "f16" => {
            let dt = match fmt {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                _ => DType::F16,
            };
            let t = Tensor::from_vec(w.to_vec(), (e, n, k), &Device::Cpu)?.to_dtype(dt)?;
            (t.to_device(dev)?, None)
        }
        "fp8" => {
            let (mut q, mut sc) = (vec![], vec![]);
            for x in 0..e {
                let (qe, se) = quantize_fp8_block(
                    &w[x * per..(x + 1) * per],
                    n,
                    k,
                    128,
                    128,
                    SourcePrecision::F32,
                );
                q.extend(qe);
                sc.extend(se);
            }
            let scales = Tensor::from_vec(sc, (e, n.div_ceil(128), k.div_ceil(128)), dev)?;
            (
                Tensor::from_vec(q, (e, n, k), dev)?,
                Some(WeightQuant::Fp8 {
                    scales,
                    block: (128, 128),
                }),
            )
        }
        _ => {
            let (mut q, mut sc) = (vec![], vec![]);
            for x in 0..e {
                let (qe, se) = quantize_mxfp4(&w[x * per..(x + 1) * per], n, k);
                q.extend(qe);
                sc.extend(se);
            }
            let scales = Tensor::from_vec(sc, (e, n, k / 32), dev)?;
            (
                Tensor::from_vec(q, (e, n, k / 2), dev)?,
                Some(WeightQuant::Mxfp4 { scales }),
            )
        }
    })
}

fn cpu_args(a: &GroupedGemmArgs) -> Result<GroupedGemmArgs> {
    let cpu = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(&Device::Cpu)).transpose();
    Ok(GroupedGemmArgs {
        bias: cpu(&a.bias)?,
        topk_weights: cpu(&a.topk_weights)?,
        quant: match &a.quant {
            None => None,
            Some(WeightQuant::Fp8 { scales, block }) => Some(WeightQuant::Fp8 {
                scales: scales.to_device(&Device::Cpu)?,
                block: *block,
            }),
            Some(WeightQuant::Mxfp4 { scales }) => Some(WeightQuant::Mxfp4 {
                scales: scales.to_device(&Device::Cpu)?,
            }),
        },
        ..a.clone()
    })
}

/// Every CUDA grouped-GEMM kernel, forced, against the CPU op on the same
/// routing: each weight format (FP8 as W8A16 and W8A8), align blocks of 16
/// and 64 rows, bias and routing weights in the epilogue. Kernels that do
/// not apply to a problem say why and are listed as skipped. Tolerances
/// (mean rel): f32-activation kernels 1e-4, bf16/f16 tensor-core kernels
/// 1.5e-2 (activations rounded to 16 bits, as vLLM computes), FP8 mma 1e-3.
fn kernel_checks(gpu: &Device, r: &mut Report, rng: &mut Rng, quick: bool) -> Result<()> {
    // (m, n, k, e, top_k)
    let shapes: &[(usize, usize, usize, usize, usize)] = if quick {
        &[(1, 256, 256, 8, 2), (70, 512, 384, 8, 3)]
    } else {
        &[
            (1, 256, 256, 8, 2),
            (70, 512, 384, 8, 3),
            (3, 1536, 2048, 128, 8),
            (256, 1536, 2048, 128, 8),
            (1024, 7168, 4096, 32, 6),
            (64, 4096, 7168, 16, 2),
        ]
    };
    let mut skipped = 0;
    for &(m, n, k, e, top_k) in shapes {
        let wf = rng.vec(e * n * k, 0.1);
        let a_cpu = Tensor::from_vec(rng.vec(m * k, 1.0), (m, k), &Device::Cpu)?;
        let a_gpu = a_cpu.to_device(gpu)?;
        let ids: Vec<u32> = (0..m * top_k)
            .map(|i| ((rng.next() % e as u64) as u32 + (i % top_k) as u32) % e as u32)
            .collect();
        let ids_cpu = Tensor::from_vec(ids, (m, top_k), &Device::Cpu)?;
        let ids_gpu = ids_cpu.to_device(gpu)?;
        let bias = Tensor::from_vec(rng.vec(e * n, 0.5), (e, n), gpu)?;
        let topk_w = Tensor::from_vec(rng.vec(m * top_k, 1.0), m * top_k, gpu)?;
        for fmt in ["f32", "bf16", "f16", "fp8", "fp8-w8a8", "mxfp4"] {
            let (w_gpu, quant) = weights_as(&wf, (e, n, k), fmt.trim_end_matches("-w8a8"), gpu)?;
            let w_cpu = w_gpu.to_device(&Device::Cpu)?;
            for bs in [16usize, 64] {
                let rc = moe_align_block_size(&ids_cpu, bs, e, e, None)?;
                let rg = moe_align_block_size(&ids_gpu, bs, e, e, None)?;
                for kernel in CudaGemmKernel::ALL {
                    let args = GroupedGemmArgs {
                        row_div: top_k,
                        bias: Some(bias.clone()),
                        topk_weights: Some(topk_w.clone()),
                        quant: quant.clone(),
                        act_quant_group: fmt.ends_with("w8a8").then_some(128),
                        kernel,
                    };
                    let want = grouped_gemm(&a_cpu, &w_cpu, &rc, cpu_args(&args)?)?;
                    let got = match grouped_gemm(&a_gpu, &w_gpu, &rg, args) {
                        Ok(t) => t,
                        Err(err) if err.to_string().contains("cannot run this problem") => {
                            skipped += 1;
                            continue;
                        }
                        Err(err) => return Err(err.into()),
                    };
                    let (_, rel) = max_rel(&got, &want)?;
                    let tol = match kernel {
                        CudaGemmKernel::Wmma16 | CudaGemmKernel::Tc64 => 1.5e-2,
                        CudaGemmKernel::Fp8Mma => 1e-3,
                        _ => 1e-4,
                    };
                    r.add(
                        &format!("gemm {kernel} {fmt}"),
                        json!({"m": m, "n": n, "k": k, "e": e, "top_k": top_k, "block": bs}),
                        rel,
                        tol,
                        "mean rel",
                    );
                }
            }
        }
    }
    println!("({skipped} kernel/problem pairs skipped: the kernel does not apply)");
    Ok(())
}

/// The w13 grouped GEMM at Qwen3-30B-A3B dims with every kernel that applies,
/// timed: GB/s over the routed experts' weight bytes, TFLOP/s.
fn bench_kernels(gpu: &Device, rng: &mut Rng, quick: bool) -> Result<Vec<Value>> {
    let (h, n, e, top_k) = (2048usize, 1536usize, 128usize, 8usize);
    let wf = rng.vec(e * n * h, 0.05);
    let mut rows = vec![];
    for fmt in ["bf16", "fp8", "fp8-w8a8", "mxfp4"] {
        let (w, quant) = weights_as(&wf, (e, n, h), fmt.trim_end_matches("-w8a8"), gpu)?;
        let bytes_per_expert = (w.elem_count() * w.dtype().size_in_bytes()
            + quant.as_ref().map_or(0, |q| {
                q.scales().elem_count() * q.scales().dtype().size_in_bytes()
            })) as f64
            / e as f64;
        for &t in if quick {
            &[1usize, 256][..]
        } else {
            &[1usize, 16, 256, 4096][..]
        } {
            let a = Tensor::from_vec(rng.vec(t * h, 1.0), (t, h), &Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_device(gpu)?;
            let ids: Vec<u32> = (0..t)
                .flat_map(|_| {
                    let mut v: Vec<u32> = vec![];
                    while v.len() < top_k {
                        let x = (rng.next() % e as u64) as u32;
                        if !v.contains(&x) {
                            v.push(x)
                        }
                    }
                    v
                })
                .collect();
            let used = {
                let mut u = vec![false; e];
                ids.iter().for_each(|&i| u[i as usize] = true);
                u.iter().filter(|&&x| x).count()
            };
            let ids = Tensor::from_vec(ids, (t, top_k), gpu)?;
            let bs = candle_moe::ops::align_block_size(gpu, t, top_k, e);
            let routing = moe_align_block_size(&ids, bs, e, e, None)?;
            for kernel in [CudaGemmKernel::Auto]
                .into_iter()
                .chain(CudaGemmKernel::ALL)
            {
                let args = GroupedGemmArgs {
                    row_div: top_k,
                    quant: quant.clone(),
                    act_quant_group: fmt.ends_with("w8a8").then_some(128),
                    kernel,
                    ..Default::default()
                };
                match grouped_gemm(&a, &w, &routing, args.clone()) {
                    Ok(_) => {}
                    Err(err) if err.to_string().contains("cannot run this problem") => continue,
                    Err(err) => return Err(err.into()),
                }
                gpu.synchronize()?;
                let reps = if t >= 4096 { 10 } else { 100 };
                let t0 = Instant::now();
                for _ in 0..reps {
                    grouped_gemm(&a, &w, &routing, args.clone())?;
                }
                gpu.synchronize()?;
                let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
                let gbs = used as f64 * bytes_per_expert / (ms / 1e3) / 1e9;
                let tflops = (t * top_k * 2 * n * h) as f64 / (ms / 1e3) / 1e12;
                println!(
                    "bench w13 {fmt:<8} tokens {t:>5} block {bs:>2} {kernel:<7}: {ms:>8.4} ms {gbs:>8.1} GB/s {tflops:>7.2} TFLOP/s"
                );
                rows.push(json!({"bench": "w13 grouped gemm, qwen3-30b-a3b dims", "weights": fmt, "tokens": t,
                    "block": bs, "kernel": kernel.name(), "ms": ms, "gb_per_s": gbs, "tflop_per_s": tflops}));
            }
        }
    }
    Ok(rows)
}

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

fn bench(gpu: &Device, rng: &mut Rng, quick: bool) -> Result<Vec<Value>> {
    let (h, i, e, k) = (2048usize, 768usize, 128usize, 8usize);
    let mut rows = vec![];
    for (name, dt, quant) in [
        ("bf16", DType::BF16, None),
        ("fp8", DType::BF16, Some("fp8")),
        ("mxfp4", DType::BF16, Some("mxfp4")),
    ] {
        let w = layer(rng, e, i, h, dt)?;
        let wg: HashMap<String, Tensor> = w
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(gpu)?)))
            .collect::<Result<_>>()?;
        let mut cfg = FusedMoeConfig::new(h, i, e, k);
        cfg.quant = quant.map(QuantScheme::on_load).transpose()?;
        let moe = FusedMoe::new(&cfg, VarBuilder::from_tensors(wg, dt, gpu))?;
        let per_expert = moe.kernel().experts().weight_bytes() as f64 / e as f64;
        for &t in if quick {
            &[1usize, 256][..]
        } else {
            &[1usize, 16, 256, 4096][..]
        } {
            let x = Tensor::from_vec(rng.vec(t * h, 1.0), (t, h), &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(gpu)?;
            let l = Tensor::from_vec(rng.vec(t * e, 2.0), (t, e), &Device::Cpu)?.to_device(gpu)?;
            let (_, ids) = moe.router().route(&l)?;
            let mut used = vec![false; e];
            for id in ids
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<u32>()?
            {
                used[id as usize] = true;
            }
            let bytes = used.iter().filter(|&&u| u).count() as f64 * per_expert;
            moe.forward(&x, &l)?;
            gpu.synchronize()?;
            let reps = if t >= 4096 { 5 } else { 50 };
            let t0 = Instant::now();
            for _ in 0..reps {
                moe.forward(&x, &l)?;
            }
            gpu.synchronize()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let flops = (t * k * 3 * 2 * h * i) as f64;
            let row = json!({"bench": "fused_moe qwen3-30b-a3b dims", "weights": name, "tokens": t, "ms": ms,
                "gb_per_s": bytes / (ms / 1e3) / 1e9, "tflop_per_s": flops / (ms / 1e3) / 1e12});
            println!(
                "bench {name:<6} tokens {t:>5}: {ms:>9.3} ms  {:>8.1} GB/s  {:>7.2} TFLOP/s",
                bytes / (ms / 1e3) / 1e9,
                flops / (ms / 1e3) / 1e12
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// candle-transformers' `FusedMoe` (candle's WMMA `moe_gemm`) against our
/// `SparseMoeBlock` on the same bf16 weights at Qwen3-30B-A3B dims: outputs
/// compared (bf16 2e-2 abs) and both timed.
fn bench_vs_candle(gpu: &Device, r: &mut Report, rng: &mut Rng, quick: bool) -> Result<Vec<Value>> {
    use candle_moe::SparseMoeBlock;
    use candle_nn::Module;
    let (h, i, e, k) = (2048usize, 768usize, 128usize, 8usize);
    let dt = DType::BF16;
    let mut w = HashMap::new();
    w.insert(
        "gate.weight".to_string(),
        Tensor::from_vec(rng.vec(e * h, 0.05), (e, h), &Device::Cpu)?,
    );
    for x in 0..e {
        for (p, n, kk) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            w.insert(
                format!("experts.{x}.{p}.weight"),
                Tensor::from_vec(rng.vec(n * kk, 0.03), (n, kk), &Device::Cpu)?,
            );
        }
    }
    let wg: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dt)?.to_device(gpu)?)))
        .collect::<Result<_>>()?;
    let ours = SparseMoeBlock::new(
        &FusedMoeConfig::new(h, i, e, k),
        VarBuilder::from_tensors(wg.clone(), dt, gpu),
    )?;
    let cfg = candle_transformers::fused_moe::MoeCfg {
        hidden_size: h,
        num_experts: e,
        num_experts_per_tok: k,
        moe_intermediate_size: i,
        norm_topk_prob: false,
        act: candle_nn::Activation::Silu,
        decoder_sparse_step: None,
    };
    let theirs = candle_transformers::fused_moe::FusedMoe::new(
        &cfg,
        VarBuilder::from_tensors(wg, dt, gpu),
        dt,
    )?;
    let mut rows = vec![];
    for &t in if quick {
        &[1usize, 256][..]
    } else {
        &[1usize, 16, 256, 4096][..]
    } {
        let x = Tensor::from_vec(rng.vec(t * h, 1.0), (1, t, h), &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(gpu)?;
        let a = ours.forward(&x)?;
        let b = theirs.forward(&x, t > 1)?;
        r.add(
            "vs candle moe_gemm",
            json!({"tokens": t}),
            max_rel(&a, &b)?.0,
            2e-2,
            "max abs",
        );
        let reps = if t >= 4096 { 5 } else { 50 };
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64> {
            f()?;
            gpu.synchronize()?;
            let t0 = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            gpu.synchronize()?;
            Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
        };
        let ms_ours = time(&|| ours.forward(&x))?;
        let ms_theirs = time(&|| theirs.forward(&x, t > 1))?;
        println!("bench vs candle moe_gemm, tokens {t:>5}: ours {ms_ours:.3} ms, candle {ms_theirs:.3} ms, ratio {:.2}x", ms_theirs / ms_ours);
        rows.push(json!({"bench": "sparse block vs candle-transformers FusedMoe", "tokens": t, "ms": ms_ours, "candle_ms": ms_theirs, "speedup": ms_theirs / ms_ours}));
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = get("--out").unwrap_or_else(|| "gpu_check.json".into());
    let fixtures =
        std::path::PathBuf::from(get("--fixtures").unwrap_or_else(|| "tests/fixtures".into()));
    let quick = args.iter().any(|a| a == "--quick");
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
    let v = json!({"checks": r.rows, "failed": r.failed, "bench": b, "seconds": t0.elapsed().as_secs_f64()});
    std::fs::write(&out, serde_json::to_string_pretty(&v)?)?;
    println!("{} checks, {} failed; wrote {out}", r.rows.len(), r.failed);
    if r.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
