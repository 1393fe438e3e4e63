//! The whole model on the GPU at Qwen3-30B-A3B dims (hidden 2048, 32 query
//! / 4 KV heads of 128, 128 experts of 768, top-8, vocabulary 151936), a
//! few layers of random bf16 weights: the GPU's prompt logits against the
//! CPU's on the same weights, then the decode step — tokens/s and the
//! bandwidth its weight bytes imply (dense weights, `lm_head` and the
//! experts a step routes to).

use super::*;
use candle_moe_models::{Logits, QwenMoeConfig, QwenMoeForCausalLM, Session};

const V: usize = 151936;
const H: usize = 2048;
const I: usize = 768;
const E: usize = 128;
const K: usize = 8;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const D: usize = 128;

fn config(layers: usize) -> Result<QwenMoeConfig> {
    Ok(QwenMoeConfig::from_json(&json!({
        "model_type": "qwen3_moe", "vocab_size": V, "hidden_size": H,
        "intermediate_size": 6144, "moe_intermediate_size": I, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": D,
        "num_experts": E, "num_experts_per_tok": K, "norm_topk_prob": true,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": false, "hidden_act": "silu", "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }))?)
}

/// Random bf16 weights (host), scaled so activations stay O(1); experts in
/// the fused 3-D layout.
fn weights(rng: &mut Rng, layers: usize) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    let rand = |shape: &[usize], scale: f32, rng: &mut Rng| -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(rng.vec(n, scale), shape, &Device::Cpu)?.to_dtype(DType::BF16)?)
    };
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    m.insert("model.embed_tokens.weight".into(), rand(&[V, H], 1.0, rng)?);
    m.insert("lm_head.weight".into(), rand(&[V, H], s(H), rng)?);
    let ones = |n: usize| Tensor::ones(n, DType::BF16, &Device::Cpu);
    m.insert("model.norm.weight".into(), ones(H)?);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        m.insert(format!("{p}.input_layernorm.weight"), ones(H)?);
        m.insert(format!("{p}.post_attention_layernorm.weight"), ones(H)?);
        m.insert(format!("{p}.self_attn.q_norm.weight"), ones(D)?);
        m.insert(format!("{p}.self_attn.k_norm.weight"), ones(D)?);
        m.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rand(&[HEADS * D, H], s(H), rng)?,
        );
        m.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rand(&[KV_HEADS * D, H], s(H), rng)?,
        );
        m.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rand(&[KV_HEADS * D, H], s(H), rng)?,
        );
        m.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rand(&[H, HEADS * D], s(HEADS * D), rng)?,
        );
        m.insert(format!("{p}.mlp.gate.weight"), rand(&[E, H], s(H), rng)?);
        m.insert(
            format!("{p}.mlp.experts.gate_up_proj"),
            rand(&[E, 2 * I, H], s(H), rng)?,
        );
        m.insert(
            format!("{p}.mlp.experts.down_proj"),
            rand(&[E, H, I], s(I), rng)?,
        );
    }
    Ok(m)
}

pub(super) fn model_step(
    gpu: &Device,
    r: &mut Report,
    rng: &mut Rng,
    quick: bool,
) -> Result<Vec<Value>> {
    let layers = if quick { 1 } else { 4 };
    let cfg = config(layers)?;
    let host = weights(rng, layers)?;
    let dev_w: HashMap<String, Tensor> = host
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(gpu)?)))
        .collect::<Result<_>>()?;
    let cpu_m = QwenMoeForCausalLM::new(
        &cfg,
        VarBuilder::from_tensors(host, DType::BF16, &Device::Cpu),
    )?;
    let gpu_m = QwenMoeForCausalLM::new(&cfg, VarBuilder::from_tensors(dev_w, DType::BF16, gpu))?;
    let prompt: Vec<u32> = (0..16).map(|_| (rng.next() % V as u64) as u32).collect();
    let want = Session::new(&cpu_m, 1, 64)?
        .step(&[&prompt], Logits::Last)?
        .to_dtype(DType::F32)?;
    let mut s = Session::new(&gpu_m, 1, 256)?;
    let got = s
        .step(&[&prompt], Logits::Last)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let (abs, _) = max_rel(&got, &want)?;
    let mag = want.abs()?.max_all()?.to_scalar::<f32>()?;
    // both compute in bf16 with their own summation orders
    r.add(
        "model prompt logits",
        json!({"dims": "qwen3-30b-a3b", "layers": layers, "tokens": prompt.len()}),
        abs / mag,
        3e-2,
        "max rel",
    );
    // decode: one token per step, greedy on the device
    let steps = if quick { 8 } else { 64 };
    let mut next = got.argmax(1)?.to_vec1::<u32>()?[0];
    let t0 = Instant::now();
    for _ in 0..steps {
        let l = s.step(&[&[next]], Logits::Last)?;
        next = l.argmax(1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?[0];
    }
    gpu.synchronize()?;
    let secs = t0.elapsed().as_secs_f64() / steps as f64;
    // weight bytes a step reads: every dense matrix and lm_head, top-8
    // experts per layer (bf16)
    let dense = (2 * HEADS * D * H + 2 * KV_HEADS * D * H + E * H) * layers + V * H;
    let bytes = 2.0 * (dense + layers * K * 3 * H * I) as f64;
    let row = json!({"bench": "model decode step qwen3-30b-a3b dims", "layers": layers,
        "ms": secs * 1e3, "tok_per_s": 1.0 / secs, "gb_per_s": bytes / secs / 1e9});
    println!(
        "bench model decode ({layers} layers): {:>8.3} ms/token {:>8.1} tok/s {:>8.1} GB/s",
        secs * 1e3,
        1.0 / secs,
        bytes / secs / 1e9
    );
    Ok(vec![row])
}
