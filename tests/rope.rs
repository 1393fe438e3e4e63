//! RoPE scaling against transformers: the inverse frequencies and attention
//! factor its `ROPE_INIT_FUNCTIONS` compute for linear and YaRN configs
//! (tests/fixtures/rope, made by scripts/make_rope_fixtures.py), and the
//! cos / sin tables built from them.

use candle_core::{DType, Device, Tensor};
use candle_moe_models::rope::{RopeScaling, RotaryEmbedding};
use candle_moe_models::QwenMoeConfig;
use serde_json::{json, Value};

fn cases() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rope/rope_scaling.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn inverse_frequencies_match_transformers() {
    let cases = cases();
    assert!(cases.len() >= 6);
    let mut kinds = (0, 0);
    for case in &cases {
        let cfg = QwenMoeConfig::from_json(&case["config"]).unwrap();
        match cfg.rope_scaling {
            RopeScaling::Linear { .. } => kinds.0 += 1,
            RopeScaling::Yarn { .. } => kinds.1 += 1,
            RopeScaling::None => panic!("{}: scaling not read", case["config"]),
        }
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let (got, af) = cfg.rope_scaling.inv_freq(cfg.rope_theta, cfg.head_dim);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = (*g as f64 - w).abs() / w.abs();
            assert!(rel < 1e-5, "{}: inv_freq[{i}] {g} vs {w}", case["config"]);
        }
        let want_af = case["attention_factor"].as_f64().unwrap();
        assert!(
            (af as f64 - want_af).abs() < 1e-6 * want_af,
            "{}: attention factor {af} vs {want_af}",
            case["config"]
        );
        // the tables: cos(p · inv) · factor at a few positions
        let rope = RotaryEmbedding::new(
            &cfg.rope_scaling,
            cfg.rope_theta,
            cfg.head_dim,
            4096,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let pos = [0u32, 1, 17, 1000, 4095];
        let (cos, sin) = rope
            .at(&Tensor::new(&pos[..], &Device::Cpu).unwrap())
            .unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        for (r, &p) in pos.iter().enumerate() {
            for (i, w) in want.iter().enumerate() {
                let a = p as f64 * w;
                assert!(
                    (cos[r][i] as f64 - a.cos() * want_af).abs() < 2e-3,
                    "cos {p} {i}"
                );
                assert!(
                    (sin[r][i] as f64 - a.sin() * want_af).abs() < 2e-3,
                    "sin {p} {i}"
                );
            }
        }
    }
    assert!(kinds.0 >= 2 && kinds.1 >= 4, "{kinds:?}");
}

fn config_with(key: &str, val: Value) -> Value {
    let mut c = json!({
        "model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64,
        "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 1, "vocab_size": 32, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    });
    c[key] = val;
    c
}

#[test]
fn unsupported_scaling_names_the_key() {
    let cases = [
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": 2.0}),
            "rope_scaling.rope_type",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
            "llama3",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "longrope"}),
            "rope_parameters.rope_type",
        ),
        (
            "rope_scaling",
            json!({"type": "linear"}),
            "rope_scaling.factor",
        ),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 0.5}),
            "rope_scaling.factor",
        ),
        (
            "rope_scaling",
            json!({"type": "yarn", "factor": "4"}),
            "rope_scaling.factor",
        ),
        (
            "rope_scaling",
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
            "original_max_position_embeddings",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
        ("rope_scaling", json!([1, 2]), "rope_scaling"),
    ];
    for (key, val, want) in cases {
        let e = QwenMoeConfig::from_json(&config_with(key, val.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{val}: {e}");
    }
    // null and the default type are the plain RoPE
    for (key, val) in [
        ("rope_scaling", Value::Null),
        (
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 1e6}),
        ),
    ] {
        let cfg = QwenMoeConfig::from_json(&config_with(key, val)).unwrap();
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
    }
}
