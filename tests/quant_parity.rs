//! Quantized checkpoints made by llm-compressor (scripts/make_quant_fixtures.py)
//! against llm-compressor's in-memory quantized model, i.e. compressed-tensors'
//! own fake-quantized forward: FP8_BLOCK (W8A8, dynamic per-token-group-128
//! activations) within 1e-2 relative, MXFP4A16 within 1e-3; the same FP8 weights
//! in the Qwen3-*-FP8 `weight_scale_inv` layout; on-load quantization of the
//! float source against the same tools, and byte for byte against the tensors
//! they wrote.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::format::fp8::{quantize_fp8_block, SourcePrecision};
use candle_moe::format::mxfp4::quantize_mxfp4;
use candle_moe::quant::QuantScheme;
use candle_moe_models::{Checkpoint, LoadOptions, Logits, QwenMoeForCausalLM, Session};
use common::{argmax, expected_cases, fixture};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    fixture(name)
}

fn load(name: &str, quant: Option<QuantScheme>) -> QwenMoeForCausalLM {
    let ck = Checkpoint::open(dir(name)).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    let opts = LoadOptions {
        quant,
        ..Default::default()
    };
    QwenMoeForCausalLM::new_with_options(&ck.config, vb, &opts).unwrap()
}

/// Max |got − want| over max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite logits");
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    err / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

/// Prompt logits at every position within `tol`, then greedy tokens through
/// the KV cache equal to the reference's until its top-2 margin gets below
/// the logit error this tolerance allows.
fn check_model(m: &QwenMoeForCausalLM, expected: PathBuf, tol: f32, ctx: &str) -> f32 {
    let mut worst = 0f32;
    let mut judged = 0;
    for (ci, c) in expected_cases(&expected).iter().enumerate() {
        let mut s = Session::new(m, 1, c.prompt.len() + c.generated.len()).unwrap();
        let logits = s.step(&[&c.prompt], Logits::All).unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        assert_eq!(rows.len(), c.logits.len());
        for (p, (g, w)) in rows.iter().zip(&c.logits).enumerate() {
            let e = rel_err(g, w);
            worst = worst.max(e);
            assert!(
                e <= tol,
                "{ctx} case {ci} position {p}: rel err {e} > {tol}"
            );
        }
        let mag = c
            .logits
            .last()
            .unwrap()
            .iter()
            .fold(0f32, |a, b| a.max(b.abs()));
        let mut next = argmax(rows.last().unwrap());
        for (step, (&want, &margin)) in c.generated.iter().zip(&c.margins).enumerate() {
            if margin < 4.0 * tol * mag {
                break; // a near tie: either token is right within the tolerance
            }
            assert_eq!(next, want, "{ctx} case {ci}: greedy token {step}");
            judged += 1;
            let l = s
                .step(&[&[next]], Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap();
            next = argmax(&l.to_vec1::<f32>().unwrap());
        }
    }
    assert!(
        judged >= 16,
        "{ctx}: only {judged} decisive greedy tokens judged"
    );
    worst
}

/// Tolerances: the issue asks for 1e-2 (FP8 W8A8) and 1e-3 (MXFP4); the
/// kernels compute the same quantized products as compressed-tensors, so the
/// tests hold them to 1e-3 and 1e-4 (observed: ~1e-6).
const FP8_TOL: f32 = 1e-3;
const MXFP4_TOL: f32 = 1e-4;

#[test]
fn fp8_block_compressed_tensors_matches_llm_compressor() {
    let m = load("qwen3_moe_fp8_block", None);
    let expected = dir("qwen3_moe_fp8_block").join("expected.json");
    let e = check_model(&m, expected.clone(), FP8_TOL, "fp8 block");
    eprintln!("fp8 block (compressed-tensors): worst rel err {e:.2e}");

    // W8A16 on the same weights is visibly off the W8A8 reference (~8e-2 on
    // this random model): the check above does see the activation
    // quantization
    let w8a16 = QuantScheme::Fp8(candle_moe::quant::Fp8::compressed_tensors(
        candle_moe::format::Fp8Strategy::Block(128, 128),
        None,
    ));
    let m = load("qwen3_moe_fp8_block", Some(w8a16));
    let c = &expected_cases(&expected)[0];
    let rows = Session::new(&m, 1, c.prompt.len())
        .unwrap()
        .step(&[&c.prompt], Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let e16 = rows
        .iter()
        .zip(&c.logits)
        .map(|(g, w)| rel_err(g, w))
        .fold(0f32, f32::max);
    eprintln!("fp8 W8A16 vs the W8A8 reference: rel err {e16:.2e}");
    assert!(e16 > 10.0 * FP8_TOL, "W8A16 err {e16}, W8A8 err {e}");
}

#[test]
fn fp8_qwen3_native_layout_matches_llm_compressor() {
    let m = load("qwen3_moe_fp8_native", None);
    let e = check_model(
        &m,
        dir("qwen3_moe_fp8_native").join("expected.json"),
        FP8_TOL,
        "fp8 native",
    );
    eprintln!("fp8 weight_scale_inv layout: worst rel err {e:.2e}");
}

#[test]
fn mxfp4_compressed_tensors_matches_llm_compressor() {
    let m = load("qwen2_moe_mxfp4", None);
    let e = check_model(
        &m,
        dir("qwen2_moe_mxfp4").join("expected.json"),
        MXFP4_TOL,
        "mxfp4",
    );
    eprintln!("mxfp4 (shared expert, dense layer): worst rel err {e:.2e}");
}

#[test]
fn on_load_fp8_matches_llm_compressor_experts_only() {
    let base = dir("qwen3_moe_base_f32");
    let m = load(
        "qwen3_moe_base_f32",
        Some(QuantScheme::on_load("fp8").unwrap()),
    );
    let e = check_model(
        &m,
        base.join("expected_onload_fp8.json"),
        FP8_TOL,
        "on-load fp8",
    );
    eprintln!("on-load fp8: worst rel err {e:.2e}");
}

#[test]
fn on_load_mxfp4_matches_llm_compressor_experts_only() {
    let base = dir("qwen3_moe_base_f32");
    let m = load(
        "qwen3_moe_base_f32",
        Some(QuantScheme::on_load("mxfp4").unwrap()),
    );
    let e = check_model(
        &m,
        base.join("expected_onload_mxfp4.json"),
        MXFP4_TOL,
        "on-load mxfp4",
    );
    eprintln!("on-load mxfp4: worst rel err {e:.2e}");
}

fn st(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DType::U8 => t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        DType::F8E4M3 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<float8::F8E4M3>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits())
            .collect(),
        dt => panic!("unexpected dtype {dt:?}"),
    }
}

/// Our quantizers give exactly the bytes and scales llm-compressor wrote for
/// the same float weights.
#[test]
fn on_load_quantizers_reproduce_llm_compressor_bytes() {
    let base = dir("qwen3_moe_base_f32");
    let float = st(base.join("model.safetensors"));
    let fp8 = st(base.join("layer0_experts_fp8.safetensors"));
    let mx = st(base.join("layer0_experts_mxfp4.safetensors"));
    let mut checked = 0;
    for e in 0..8 {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let pre = format!("model.layers.0.mlp.experts.{e}.{p}");
            let w = &float[&format!("{pre}.weight")];
            let (n, k) = w.dims2().unwrap();
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();

            let (q, s) = quantize_fp8_block(&v, n, k, 128, 128, SourcePrecision::F32);
            assert_eq!(q, bytes(&fp8[&format!("{pre}.weight")]), "{pre} fp8 bytes");
            let want_s = fp8[&format!("{pre}.weight_scale")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(s, want_s, "{pre} fp8 scales");

            let (q, s) = quantize_mxfp4(&v, n, k);
            assert_eq!(
                q,
                bytes(&mx[&format!("{pre}.weight_packed")]),
                "{pre} mxfp4 nibbles"
            );
            assert_eq!(
                s,
                bytes(&mx[&format!("{pre}.weight_scale")]),
                "{pre} mxfp4 scales"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
}

/// A quantized checkpoint with a broken tensor fails with an error that
/// names it, never a panic.
#[test]
fn bad_quantized_tensors_are_named_errors() {
    use candle_moe::quant::{ExpertLayerSpec, Mxfp4, QuantMethod};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let (h, i) = (64usize, 32usize);
    let spec = ExpertLayerSpec {
        hidden_size: h,
        intermediate_size: i,
        global_num_experts: 1,
        has_bias: false,
        activation: candle_moe::Activation::Silu,
        names: Default::default(),
    };
    let mk = |scale: u8, down_cols: usize| {
        let mut t = HashMap::new();
        for (p, n, k) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            let k = if p == "down_proj" { down_cols } else { k };
            t.insert(
                format!("0.{p}.weight_packed"),
                Tensor::zeros((n, k / 2), DType::U8, &dev).unwrap(),
            );
            t.insert(
                format!("0.{p}.weight_scale"),
                Tensor::full(scale, (n, k / 32), &dev).unwrap(),
            );
        }
        VarBuilder::from_tensors(t, DType::F32, &dev)
    };
    let ok = Mxfp4::default().create_experts(&spec, &mk(127, i), &[0]);
    assert!(ok.is_ok(), "{:?}", ok.err());
    let err = Mxfp4::default()
        .create_experts(&spec, &mk(255, i), &[0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0.gate_proj.weight_scale") && err.contains("255"),
        "{err}"
    );
    let err = Mxfp4::default()
        .create_experts(&spec, &mk(127, 2 * i), &[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("0.down_proj.weight_packed"), "{err}");

    // an unsupported scheme in config.json is a config error, not a panic
    let qc: candle_moe::quant::QuantizationConfig = serde_json::from_str(
        r#"{"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "format": "nvfp4-pack-quantized",
              "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}}}"#,
    )
    .unwrap();
    let err = QuantScheme::from_config(&qc).unwrap_err().to_string();
    assert!(err.contains("nvfp4-pack-quantized"), "{err}");
}

/// gpt-oss's MXFP4 layout (`*_blocks` / `*_scales` per layer, gate and up rows
/// interleaved, biases) gives exactly the layer that the compressed-tensors
/// per-expert layout of the same quantized weights gives.
#[test]
fn gpt_oss_blocks_layout_equals_compressed_tensors_layout() {
    use candle_moe::{FusedMoe, FusedMoeConfig};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let (h, i, e) = (64usize, 32usize, 4usize);
    let mut seed = 5u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let mut ct = HashMap::new();
    let (mut blocks13, mut scales13, mut blocks2, mut scales2) = (vec![], vec![], vec![], vec![]);
    let (mut bias13, mut bias2) = (vec![], vec![]);
    for x in 0..e {
        let (gate, up, down) = (rnd(i * h), rnd(i * h), rnd(h * i));
        let (bg, bu, bd) = (rnd(i), rnd(i), rnd(h));
        let (gq, gs) = quantize_mxfp4(&gate, i, h);
        let (uq, us) = quantize_mxfp4(&up, i, h);
        let (dq, ds) = quantize_mxfp4(&down, h, i);
        for (p, q, s, n, k, b) in [
            ("gate_proj", &gq, &gs, i, h, &bg),
            ("up_proj", &uq, &us, i, h, &bu),
            ("down_proj", &dq, &ds, h, i, &bd),
        ] {
            let pre = format!("experts.{x}.{p}");
            ct.insert(
                format!("{pre}.weight_packed"),
                Tensor::from_vec(q.clone(), (n, k / 2), &dev).unwrap(),
            );
            ct.insert(
                format!("{pre}.weight_scale"),
                Tensor::from_vec(s.clone(), (n, k / 32), &dev).unwrap(),
            );
            ct.insert(
                format!("{pre}.bias"),
                Tensor::from_vec(b.clone(), n, &dev).unwrap(),
            );
        }
        // gpt-oss: row 2r is gate row r, row 2r+1 is up row r
        for r in 0..i {
            blocks13.extend_from_slice(&gq[r * h / 2..(r + 1) * h / 2]);
            blocks13.extend_from_slice(&uq[r * h / 2..(r + 1) * h / 2]);
            scales13.extend_from_slice(&gs[r * h / 32..(r + 1) * h / 32]);
            scales13.extend_from_slice(&us[r * h / 32..(r + 1) * h / 32]);
            bias13.extend([bg[r], bu[r]]);
        }
        blocks2.extend(dq);
        scales2.extend(ds);
        bias2.extend(bd);
    }
    let oss = HashMap::from([
        (
            "experts.gate_up_proj_blocks".to_string(),
            Tensor::from_vec(blocks13, (e, 2 * i, h / 32, 16), &dev).unwrap(),
        ),
        (
            "experts.gate_up_proj_scales".to_string(),
            Tensor::from_vec(scales13, (e, 2 * i, h / 32), &dev).unwrap(),
        ),
        (
            "experts.down_proj_blocks".to_string(),
            Tensor::from_vec(blocks2, (e, h, i / 32, 16), &dev).unwrap(),
        ),
        (
            "experts.down_proj_scales".to_string(),
            Tensor::from_vec(scales2, (e, h, i / 32), &dev).unwrap(),
        ),
        (
            "experts.gate_up_proj_bias".to_string(),
            Tensor::from_vec(bias13, (e, 2 * i), &dev).unwrap(),
        ),
        (
            "experts.down_proj_bias".to_string(),
            Tensor::from_vec(bias2, (e, h), &dev).unwrap(),
        ),
    ]);
    let mut cfg = FusedMoeConfig::new(h, i, e, 2);
    cfg.has_bias = true;
    cfg.quant = Some(QuantScheme::Mxfp4(candle_moe::quant::Mxfp4::default()));
    let a = FusedMoe::new(&cfg, VarBuilder::from_tensors(ct, DType::F32, &dev)).unwrap();
    let b = FusedMoe::new(&cfg, VarBuilder::from_tensors(oss, DType::F32, &dev)).unwrap();
    let x = Tensor::from_vec(rnd(5 * h), (5, h), &dev).unwrap();
    let l = Tensor::from_vec(rnd(5 * e), (5, e), &dev).unwrap();
    let ya = a
        .forward(&x, &l)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let yb = b
        .forward(&x, &l)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(ya.iter().any(|v| v.abs() > 1e-3));
    assert_eq!(ya, yb);
}
