//! Layer benchmarks at Qwen3-30B-A3B dims, and our block against
//! candle-transformers' `FusedMoe` on the same weights.

use super::*;

pub(super) fn bench(gpu: &Device, rng: &mut Rng, quick: bool) -> Result<Vec<Value>> {
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
pub(super) fn bench_vs_candle(
    gpu: &Device,
    r: &mut Report,
    rng: &mut Rng,
    quick: bool,
) -> Result<Vec<Value>> {
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
