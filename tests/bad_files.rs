//! Bad files, tried wholesale: thousands of seeded random mutations of a tiny
//! checkpoint — config.json values, keys and types; the safetensors header
//! JSON, offsets, dtype tags, lengths and truncation; tokenizer.json's model,
//! pre-tokenizer, decoder and added tokens — each loaded and run (load, a
//! 3-token prompt, one decode step; text encoded and decoded). Every one must end in `Ok` or a
//! typed error naming what is wrong; a panic fails the test (it is not
//! caught: the harness reports it with the mutation's seed).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe_models::{Checkpoint, Logits, QwenMoeForCausalLM, Session};
use common::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const V: usize = 48;
const H: usize = 16;
const E: usize = 4;

fn base_config(qwen3: bool) -> Value {
    let mut c = json!({
        "model_type": if qwen3 { "qwen3_moe" } else { "qwen2_moe" },
        "vocab_size": V, "hidden_size": H, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
        "hidden_act": "silu", "moe_intermediate_size": 8, "num_experts": E,
        "num_experts_per_tok": 2, "norm_topk_prob": true, "decoder_sparse_step": 1,
        "mlp_only_layers": [1], "eos_token_id": [1, 2], "bos_token_id": 0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "dtype": "float32"
    });
    if !qwen3 {
        c["shared_expert_intermediate_size"] = json!(12);
    } else {
        c["head_dim"] = json!(8);
    }
    c
}

fn tensors(qwen3: bool, rng: &mut Rng) -> HashMap<String, Tensor> {
    let d = if qwen3 { 8 } else { H / 4 };
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let n = shape.iter().product();
        let v = Tensor::from_vec(rng.randn(n, 0.3), shape, &Device::Cpu).unwrap();
        t.insert(name, v);
    };
    put("model.embed_tokens.weight".into(), &[V, H]);
    put("lm_head.weight".into(), &[V, H]);
    put("model.norm.weight".into(), &[H]);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[H]);
        put(format!("{p}.post_attention_layernorm.weight"), &[H]);
        put(format!("{p}.self_attn.q_proj.weight"), &[4 * d, H]);
        put(format!("{p}.self_attn.k_proj.weight"), &[2 * d, H]);
        put(format!("{p}.self_attn.v_proj.weight"), &[2 * d, H]);
        put(format!("{p}.self_attn.o_proj.weight"), &[H, 4 * d]);
        if qwen3 {
            put(format!("{p}.self_attn.q_norm.weight"), &[d]);
            put(format!("{p}.self_attn.k_norm.weight"), &[d]);
        } else {
            put(format!("{p}.self_attn.q_proj.bias"), &[4 * d]);
            put(format!("{p}.self_attn.k_proj.bias"), &[2 * d]);
            put(format!("{p}.self_attn.v_proj.bias"), &[2 * d]);
        }
        if l == 1 {
            for n in ["gate", "up"] {
                put(format!("{p}.mlp.{n}_proj.weight"), &[24, H]);
            }
            put(format!("{p}.mlp.down_proj.weight"), &[H, 24]);
            continue;
        }
        put(format!("{p}.mlp.gate.weight"), &[E, H]);
        for e in 0..E {
            put(format!("{p}.mlp.experts.{e}.gate_proj.weight"), &[8, H]);
            put(format!("{p}.mlp.experts.{e}.up_proj.weight"), &[8, H]);
            put(format!("{p}.mlp.experts.{e}.down_proj.weight"), &[H, 8]);
        }
        if !qwen3 {
            put(format!("{p}.mlp.shared_expert.gate_proj.weight"), &[12, H]);
            put(format!("{p}.mlp.shared_expert.up_proj.weight"), &[12, H]);
            put(format!("{p}.mlp.shared_expert.down_proj.weight"), &[H, 12]);
            put(format!("{p}.mlp.shared_expert_gate.weight"), &[1, H]);
        }
    }
    t
}

/// Loads the checkpoint in `dir` and runs a prompt and a decode step.
fn load_and_run(dir: &Path) -> Result<(), String> {
    let ck = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let vb = ck
        .var_builder(DType::F32, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    let m = QwenMoeForCausalLM::new(&ck.config, vb).map_err(|e| e.to_string())?;
    let mut s = Session::new(&m, 1, 8).map_err(|e| e.to_string())?;
    let l = s
        .step(&[&[3, 1, 4]], Logits::Last)
        .map_err(|e| e.to_string())?;
    let next = l
        .flatten_all()
        .and_then(|l| l.argmax(0))
        .and_then(|t| t.to_scalar::<u32>())
        .map_err(|e| e.to_string())?;
    s.step(&[&[next]], Logits::Last)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A random JSON value of a random type.
fn random_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(0),
        3 => json!(u64::MAX),
        4 => json!(1e300),
        5 => json!(-0.5),
        6 => json!("sixteen"),
        7 => json!([1, 2]),
        8 => json!({"a": 1}),
        9 => json!(true),
        10 => json!(rng.below(100)),
        _ => json!(1u64 << (20 + rng.below(40))),
    }
}

/// Mutates one value somewhere in `v` (objects and arrays, recursively).
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            let keys: Vec<String> = o.keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            match rng.below(5) {
                0 => {
                    o.remove(k);
                }
                1 if o[k].is_object() || o[k].is_array() => mutate_json(&mut o[k], rng),
                2 => {
                    o.insert(format!("junk_{}", rng.below(9)), random_value(rng));
                }
                _ => {
                    o.insert(k.clone(), random_value(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            if rng.below(2) == 0 {
                mutate_json(&mut a[i], rng)
            } else {
                a[i] = random_value(rng)
            }
        }
        other => *other = random_value(rng),
    }
}

/// `text` truncated at a random byte, or with one random bit flipped.
fn damage(text: &str, truncate: bool, rng: &mut Rng) -> String {
    let mut b = text.as_bytes().to_vec();
    if truncate {
        b.truncate(rng.below(b.len()));
    } else {
        let p = rng.below(b.len());
        b[p] ^= 1 << rng.below(8);
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle-moe-bad-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// config.json: values of every type, keys removed or added, text truncated
/// or with flipped bytes.
#[test]
fn mutated_configs_load_or_fail_cleanly() {
    let dir = tmp_dir("config");
    let mut rng = Rng::new(1);
    let mut outcomes = (0, 0);
    for qwen3 in [false, true] {
        let st = tensors(qwen3, &mut rng);
        candle_core::safetensors::save(&st, dir.join("model.safetensors")).unwrap();
        let base = base_config(qwen3);
        std::fs::write(dir.join("config.json"), base.to_string()).unwrap();
        load_and_run(&dir).expect("the unmutated checkpoint runs");
        for i in 0..1200 {
            let text = if i % 10 < 8 {
                let mut c = base.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_json(&mut c, &mut rng);
                }
                c.to_string()
            } else {
                damage(&base.to_string(), i % 2 == 0, &mut rng)
            };
            std::fs::write(dir.join("config.json"), &text).unwrap();
            match load_and_run(&dir) {
                Ok(()) => outcomes.0 += 1,
                Err(e) => {
                    assert!(!e.is_empty(), "empty error for {text}");
                    outcomes.1 += 1
                }
            }
        }
    }
    eprintln!("configs: {} ran, {} were errors", outcomes.0, outcomes.1);
    assert!(outcomes.0 > 100 && outcomes.1 > 100, "{outcomes:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// model.safetensors: header JSON (dtype tags, shapes, offsets, names), the
/// header length, truncation and flipped bytes.
#[test]
fn mutated_safetensors_load_or_fail_cleanly() {
    let dir = tmp_dir("st");
    let mut rng = Rng::new(2);
    let mut outcomes = (0, 0);
    for qwen3 in [false, true] {
        let st = tensors(qwen3, &mut rng);
        let file = dir.join("model.safetensors");
        candle_core::safetensors::save(&st, &file).unwrap();
        std::fs::write(dir.join("config.json"), base_config(qwen3).to_string()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
        let data = &bytes[8 + hlen..];
        for i in 0..1000 {
            let out: Vec<u8> = match i % 5 {
                // a mutated header, re-serialised with its length
                0..=2 => {
                    let mut h = header.clone();
                    let o = h.as_object_mut().unwrap();
                    let names: Vec<String> = o.keys().cloned().collect();
                    let name = &names[rng.below(names.len())];
                    if name != "__metadata__" {
                        let t = &mut o[name];
                        match rng.below(4) {
                            0 => {
                                t["dtype"] = json!(
                                    ["F16", "BF16", "I64", "U8", "F8_E4M3", "XX", "F64"]
                                        [rng.below(7)]
                                )
                            }
                            1 => {
                                let s = &mut t["shape"];
                                mutate_json(s, &mut rng)
                            }
                            2 => {
                                let s = &mut t["data_offsets"];
                                mutate_json(s, &mut rng)
                            }
                            _ => mutate_json(t, &mut rng),
                        }
                    }
                    let hb = serde_json::to_vec(&h).unwrap();
                    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
                    out.extend(hb);
                    out.extend_from_slice(data);
                    out
                }
                // truncated anywhere
                3 => bytes[..rng.below(bytes.len())].to_vec(),
                // flipped bytes in the length or the header
                _ => {
                    let mut b = bytes.clone();
                    let p = rng.below(8 + hlen);
                    b[p] ^= 1 << rng.below(8);
                    b
                }
            };
            std::fs::write(&file, &out).unwrap();
            match load_and_run(&dir) {
                Ok(()) => outcomes.0 += 1,
                Err(e) => {
                    assert!(!e.is_empty());
                    outcomes.1 += 1
                }
            }
        }
    }
    eprintln!(
        "safetensors: {} ran, {} were errors",
        outcomes.0, outcomes.1
    );
    assert!(outcomes.1 > 500, "{outcomes:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Keys the loader does not implement, or values out of range, are errors
/// that name the key a user can fix.
#[test]
fn config_errors_name_the_key() {
    use candle_moe_models::QwenMoeConfig;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": 4.0}),
            "rope_scaling",
        ),
        (
            "rope_parameters",
            json!({"rope_theta": 1e4, "rope_type": "longrope"}),
            "rope_type",
        ),
        ("use_sliding_window", json!(true), "use_sliding_window"),
        ("eos_token_id", json!([1, 5000000000u64]), "eos_token_id"),
        ("num_experts_per_tok", json!(9), "num_experts_per_tok"),
        ("hidden_size", json!(1u64 << 40), "hidden_size"),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
    ];
    for (key, val, want) in cases {
        let mut c = base_config(false);
        c[key] = val;
        let e = QwenMoeConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
    // hidden_act is checked when the layer is built
    let mut c = base_config(false);
    c["hidden_act"] = json!("swish2");
    let dir = tmp_dir("act");
    let mut rng = Rng::new(5);
    candle_core::safetensors::save(&tensors(false, &mut rng), dir.join("model.safetensors"))
        .unwrap();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let e = load_and_run(&dir).unwrap_err();
    assert!(e.contains("hidden_act"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A small tokenizer.json with the bundled Qwen tokenizer's structure (NFC,
/// the Split regex + ByteLevel pre-tokenizer, byte-level BPE, added special
/// tokens): its first 1000 tokens and the merges among them.
fn small_tokenizer() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny-qwen2-moe/tokenizer.json"
    );
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let keep = 1000u64;
    let vocab: serde_json::Map<String, Value> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| id.as_u64().unwrap() < keep)
        .map(|(k, id)| (k.clone(), id.clone()))
        .collect();
    let merges: Vec<Value> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let m = m.as_str().unwrap();
            let (a, b) = m.split_once(' ').unwrap();
            [a, b, &format!("{a}{b}")]
                .iter()
                .all(|p| vocab.contains_key(*p))
        })
        .cloned()
        .collect();
    assert!(merges.len() > 300, "{}", merges.len());
    t["model"]["vocab"] = Value::Object(vocab);
    t["model"]["merges"] = Value::Array(merges);
    for (i, a) in t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        a["id"] = json!(keep + i as u64);
    }
    t
}

/// Loads a tokenizer and runs it both ways, as the engine and server do.
fn tokenize(path: &Path) -> Result<(), String> {
    use candle_moe_models::{HfTokenizer, TextCodec};
    let t = HfTokenizer::from_file(path).map_err(|e| e.to_string())?;
    for text in [
        "Hello world, 12 apples!",
        "<|im_start|>user\nhi<|im_end|>",
        "",
        "é 中 \u{0}",
    ] {
        let ids = t.encode(text).map_err(|e| e.to_string())?;
        t.decode(&ids).map_err(|e| e.to_string())?;
    }
    t.decode(&[0, 999, 1000, 1001, 5000, u32::MAX])
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// tokenizer.json: values of every type in the model, pre-tokenizer,
/// normalizer, decoder and added tokens; keys removed or added; text
/// truncated or with flipped bytes.
#[test]
fn mutated_tokenizers_load_or_fail_cleanly() {
    let dir = tmp_dir("tokenizer");
    let path = dir.join("tokenizer.json");
    let base = small_tokenizer();
    std::fs::write(&path, base.to_string()).unwrap();
    tokenize(&path).expect("the unmutated tokenizer runs");
    let mut rng = Rng::new(7);
    let mut outcomes = (0, 0);
    // aim most JSON mutations below the top level, where the structure is
    let parts = [
        "model",
        "pre_tokenizer",
        "normalizer",
        "decoder",
        "added_tokens",
        "post_processor",
    ];
    for i in 0..2000 {
        let text = if i % 10 < 8 {
            let mut t = base.clone();
            for _ in 0..1 + rng.below(3) {
                if rng.below(4) == 0 {
                    mutate_json(&mut t, &mut rng);
                } else {
                    let part = parts[rng.below(parts.len())];
                    if let (true, Some(model)) = (
                        part == "model" && rng.below(2) == 0,
                        t["model"].as_object_mut(),
                    ) {
                        // the model's own keys, not its 1000 vocabulary entries
                        let keys: Vec<String> = model.keys().cloned().collect();
                        let k = keys[rng.below(keys.len())].clone();
                        model.insert(k, random_value(&mut rng));
                    } else {
                        mutate_json(&mut t[part], &mut rng);
                    }
                }
            }
            t.to_string()
        } else {
            damage(&base.to_string(), i % 2 == 0, &mut rng)
        };
        std::fs::write(&path, &text).unwrap();
        match tokenize(&path) {
            Ok(()) => outcomes.0 += 1,
            Err(e) => {
                assert!(e.contains("tokenizer.json"), "error without the file: {e}");
                outcomes.1 += 1
            }
        }
    }
    eprintln!("tokenizers: {} ran, {} were errors", outcomes.0, outcomes.1);
    assert!(outcomes.0 > 100 && outcomes.1 > 300, "{outcomes:?}");
    std::fs::remove_dir_all(&dir).ok();
}
