//! `--save-quantized` against what llm-compressor wrote for the same float
//! weights (tests/fixtures, scripts/make_quant_fixtures.py): every tensor's
//! name, dtype, shape and bytes; and the saved copy loads without
//! quantizing and gives the on-load quantized model's logits.

use candle_core::{DType, Device};
use candle_moe::quant::QuantScheme;
use candle_moe_models::save_quantized::{save_quantized, SaveOptions};
use candle_moe_models::{Checkpoint, LoadOptions, Logits, QwenMoeForCausalLM, Session};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// name → (dtype, shape, bytes) of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                k.clone(),
                (
                    v["dtype"].as_str().unwrap().to_string(),
                    shape,
                    data[s..e].to_vec(),
                ),
            )
        })
        .collect()
}

fn save(scheme: &str, dense: bool) -> (tempdir::Dir, Checkpoint) {
    let src = Checkpoint::open(root().join("tests/fixtures/qwen3_moe_base_f32")).unwrap();
    let out = tempdir::Dir::new(&format!("{scheme}-{dense}"));
    let o = SaveOptions {
        quant: QuantScheme::on_load(scheme).unwrap(),
        quant_dense: dense,
        shard_bytes: 1 << 30,
    };
    let mut calls = 0;
    save_quantized(&src, &out.0, &o, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0);
    (out, src)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("candle-moe-save-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn fp8_block_everywhere_equals_llm_compressor_byte_for_byte() {
    let (out, _) = save("fp8", true);
    let ours = tensors(&out.0.join("model.safetensors"));
    let theirs = tensors(&root().join("tests/fixtures/qwen3_moe_fp8_block/model.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut quantized = 0;
    for (k, t) in &theirs {
        assert_eq!(&ours[k], t, "{k}");
        quantized += (t.0 == "F8_E4M3") as usize;
    }
    assert!(quantized > 20, "{quantized} FP8 tensors compared");
    // the config says what llm-compressor's says
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("config.json")).unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/qwen3_moe_fp8_block/config.json"))
            .unwrap(),
    )
    .unwrap();
    let (q, w) = (&cfg["quantization_config"], &want["quantization_config"]);
    for k in ["quant_method", "format", "quantization_status"] {
        assert_eq!(q[k], w[k], "{k}");
    }
    let (mut qi, mut wi) = (
        q["ignore"].as_array().unwrap().clone(),
        w["ignore"].as_array().unwrap().clone(),
    );
    qi.sort_by_key(|v| v.to_string());
    wi.sort_by_key(|v| v.to_string());
    assert_eq!(qi, wi);
    let (g, h) = (
        &q["config_groups"]["group_0"],
        &w["config_groups"]["group_0"],
    );
    for k in [
        "num_bits",
        "type",
        "strategy",
        "block_structure",
        "dynamic",
        "symmetric",
    ] {
        assert_eq!(g["weights"][k], h["weights"][k], "weights.{k}");
    }
    for k in ["num_bits", "strategy", "group_size", "dynamic"] {
        assert_eq!(
            g["input_activations"][k], h["input_activations"][k],
            "input_activations.{k}"
        );
    }
}

#[test]
fn experts_only_equal_llm_compressor_and_reload_gives_on_load_logits() {
    for scheme in ["fp8", "mxfp4"] {
        let (out, src) = save(scheme, false);
        let ours = tensors(&out.0.join("model.safetensors"));
        let theirs = tensors(&root().join(format!(
            "tests/fixtures/qwen3_moe_base_f32/layer0_experts_{scheme}.safetensors"
        )));
        assert!(theirs.len() >= 8 * 3 * 2, "{scheme}");
        for (k, t) in &theirs {
            assert_eq!(ours.get(k), Some(t), "{scheme}: {k}");
        }
        // attention stays float
        assert_eq!(ours["model.layers.0.self_attn.q_proj.weight"].0, "F32");
        // the saved copy loads as a quantized checkpoint, no on-load pass
        let saved = Checkpoint::open(&out.0).unwrap();
        assert!(saved.config.quantization_config.is_some());
        let vb = saved.var_builder(DType::F32, &Device::Cpu).unwrap();
        let reloaded = QwenMoeForCausalLM::new(&saved.config, vb).unwrap();
        let opts = LoadOptions {
            quant: Some(QuantScheme::on_load(scheme).unwrap()),
            ..Default::default()
        };
        let vb = src.var_builder(DType::F32, &Device::Cpu).unwrap();
        let on_load = QwenMoeForCausalLM::new_with_options(&src.config, vb, &opts).unwrap();
        let logits = |m: &QwenMoeForCausalLM| {
            let ids = [1u32, 17, 42, 99, 3, 250, 7];
            Session::new(m, 1, ids.len())
                .unwrap()
                .step(&[&ids], Logits::All)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (logits(&reloaded), logits(&on_load));
        assert_eq!(a.len(), 7 * 256);
        assert_eq!(
            a, b,
            "{scheme}: the saved copy must compute what on-load quantization does"
        );
        // and it is not the float model's
        let vb = src.var_builder(DType::F32, &Device::Cpu).unwrap();
        let float = QwenMoeForCausalLM::new(&src.config, vb).unwrap();
        assert_ne!(logits(&float), a);
    }
}

/// The fused 3-D expert layout is refused with a clear error rather than
/// written as a checkpoint that claims quantized experts it does not hold.
#[test]
fn fused_expert_layout_is_refused() {
    let dir = tempdir::Dir::new("fused");
    std::fs::create_dir_all(&dir.0).unwrap();
    let base = root().join("tests/fixtures/qwen3_moe_base_f32");
    std::fs::copy(base.join("config.json"), dir.0.join("config.json")).unwrap();
    let t = candle_core::Tensor::zeros((8, 256, 128), DType::F32, &Device::Cpu).unwrap();
    let mut m = std::collections::HashMap::new();
    m.insert("model.layers.0.mlp.experts.gate_up_proj".to_string(), t);
    candle_core::safetensors::save(&m, dir.0.join("model.safetensors")).unwrap();
    let ck = Checkpoint::open(&dir.0).unwrap();
    let out = tempdir::Dir::new("fused-out");
    let o = SaveOptions {
        quant: QuantScheme::on_load("fp8").unwrap(),
        quant_dense: false,
        shard_bytes: 1 << 30,
    };
    let e = save_quantized(&ck, &out.0, &o, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("gate_up_proj") && e.contains("fused"), "{e}");
}
