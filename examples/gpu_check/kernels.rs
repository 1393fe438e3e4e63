//! Every grouped-GEMM kernel forced in turn against the CPU op, and their
//! benchmark at Qwen3-30B-A3B dims.

use super::*;

pub(super) fn weights_as(
    w: &[f32],
    (e, n, k): (usize, usize, usize),
    fmt: &str,
    dev: &Device,
) -> Result<(Tensor, Option<PackedWeights>)> {
    use candle_moe::format::fp8::{quantize_fp8_block, SourcePrecision};
    use candle_moe::format::mxfp4::quantize_mxfp4;
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
                Some(PackedWeights::Fp8 {
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
                Some(PackedWeights::Mxfp4 { scales }),
            )
        }
    })
}

pub(super) fn cpu_args(a: &GroupedGemmArgs) -> Result<GroupedGemmArgs> {
    let cpu = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(&Device::Cpu)).transpose();
    Ok(GroupedGemmArgs {
        bias: cpu(&a.bias)?,
        topk_weights: cpu(&a.topk_weights)?,
        quant: match &a.quant {
            None => None,
            Some(PackedWeights::Fp8 { scales, block }) => Some(PackedWeights::Fp8 {
                scales: scales.to_device(&Device::Cpu)?,
                block: *block,
            }),
            Some(PackedWeights::Mxfp4 { scales }) => Some(PackedWeights::Mxfp4 {
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
pub(super) fn kernel_checks(
    gpu: &Device,
    r: &mut Report,
    rng: &mut Rng,
    quick: bool,
) -> Result<()> {
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
                    };
                    let want = grouped_gemm(&a_cpu, &w_cpu, &rc, cpu_args(&args)?)?;
                    let got = match grouped_gemm_with_kernel(&a_gpu, &w_gpu, &rg, args, kernel) {
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
pub(super) fn bench_kernels(gpu: &Device, rng: &mut Rng, quick: bool) -> Result<Vec<Value>> {
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
                    ..Default::default()
                };
                match grouped_gemm_with_kernel(&a, &w, &routing, args.clone(), kernel) {
                    Ok(_) => {}
                    Err(err) if err.to_string().contains("cannot run this problem") => continue,
                    Err(err) => return Err(err.into()),
                }
                gpu.synchronize()?;
                let reps = if t >= 4096 { 10 } else { 100 };
                let t0 = Instant::now();
                for _ in 0..reps {
                    grouped_gemm_with_kernel(&a, &w, &routing, args.clone(), kernel)?;
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
