//! The Qwen2 tokenizer bundled with the tiny model against llama.cpp's 46
//! reference encodings; sampling rules; the generation loop against
//! transformers' greedy continuation; batched greedy equal to batch size 1.

use candle_core::{DType, Device};
use candle_moe_models::sampling::argmax;
use candle_moe_models::{
    generate, generate_batch_greedy, Checkpoint, QwenMoeForCausalLM, Sampler, SamplingParams,
};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tokenizer_matches_llama_cpp_vectors() {
    let tk = tokenizers::Tokenizer::from_file(root().join("models/tiny-qwen2-moe/tokenizer.json"))
        .unwrap();
    let dir = root().join("tests/fixtures/qwen2-tokenizer");
    let inp = std::fs::read_to_string(dir.join("ggml-vocab-qwen2.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("ggml-vocab-qwen2.gguf.out")).unwrap();
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let outputs: Vec<&str> = out.lines().collect();
    assert_eq!(inputs.len(), 46);
    assert_eq!(outputs.len(), 46);
    for (i, (text, want)) in inputs.iter().zip(&outputs).enumerate() {
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let got = tk.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "case {i}: {text:?}");
    }
    let got = tk
        .encode("Hello world! 你好", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(got, vec![9707, 1879, 0, 220, 108386]);
}

#[test]
fn sampler_rules() {
    let logits = vec![0.1f32, 2.0, 1.9, -1.0, 0.5];
    let greedy = |p: SamplingParams| Sampler::new(p).sample(&logits, &[]);
    assert_eq!(greedy(SamplingParams::default()), 1);
    // top-k 1 and a tiny top-p both reduce sampling to the best token
    for p in [
        SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        },
        SamplingParams {
            temperature: 5.0,
            top_p: Some(1e-6),
            ..Default::default()
        },
    ] {
        let mut s = Sampler::new(p);
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
    }
    // the repeat penalty moves greedy off a seen token
    let p = SamplingParams {
        repeat_penalty: 1.2,
        ..Default::default()
    };
    assert_eq!(Sampler::new(p).sample(&logits, &[1]), 2);
    // same seed, same draws; sampling reaches more than one token at high temperature
    let p = SamplingParams {
        temperature: 3.0,
        seed: 42,
        ..Default::default()
    };
    let a: Vec<u32> = {
        let mut s = Sampler::new(p.clone());
        (0..64).map(|_| s.sample(&logits, &[])).collect()
    };
    let b: Vec<u32> = {
        let mut s = Sampler::new(p);
        (0..64).map(|_| s.sample(&logits, &[])).collect()
    };
    assert_eq!(a, b);
    assert!(a.iter().any(|&t| t != a[0]));
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
}

#[test]
fn generate_matches_transformers_greedy() {
    let dir = root().join("tests/fixtures/qwen3_moe_f32");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let m = QwenMoeForCausalLM::new(
        &ck.config,
        ck.var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let case = &exp["cases"][0];
    let prompt: Vec<u32> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<u32> = case["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let margins: Vec<f64> = case["top2_margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut seen = 0;
    let out = generate(
        &m,
        &prompt,
        want.len(),
        SamplingParams::default(),
        &[],
        |_| {
            seen += 1;
            true
        },
    )
    .unwrap();
    assert_eq!(out.prompt_last_logits.len(), ck.config.vocab_size);
    let last = case["prompt_logits"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_array()
        .unwrap();
    for (g, w) in out.prompt_last_logits.iter().zip(last) {
        assert!((g - w.as_f64().unwrap() as f32).abs() < 1e-3);
    }
    let n = margins.iter().position(|&m| m < 1e-3).unwrap_or(want.len());
    assert!(n >= 8, "too few decisive steps");
    assert_eq!(out.generated_ids[..n], want[..n]);
    assert_eq!(seen, want.len(), "the callback sees every token but an EOS");
}

#[test]
fn batched_greedy_equals_batch_of_one() {
    let dir = root().join("models/tiny-qwen2-moe");
    let ck = Checkpoint::open(&dir).unwrap();
    let m = QwenMoeForCausalLM::new(
        &ck.config,
        ck.var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![9707, 1879, 0],
        vec![785, 6722, 315, 9625, 374, 12095, 13],
        vec![220],
    ];
    let batched = generate_batch_greedy(&m, &prompts, 12, &ck.eos_token_ids).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let one =
            generate_batch_greedy(&m, std::slice::from_ref(p), 12, &ck.eos_token_ids).unwrap();
        assert_eq!(&one[0], b);
        let single = generate(
            &m,
            p,
            12,
            SamplingParams::default(),
            &ck.eos_token_ids,
            |_| true,
        )
        .unwrap();
        assert_eq!(&single.generated_ids, b);
    }
}

/// The block KV cache: 200 greedy tokens decoded one at a time through the
/// cache (blocks of 16, so 13 blocks) give the logits of the same sequence
/// recomputed in one forward with no cache, at every position.
#[test]
fn cached_decode_equals_recompute_without_cache() {
    use candle_moe_models::{Logits, Session};
    let dir = root().join("models/tiny-qwen2-moe");
    let ck = Checkpoint::open(&dir).unwrap();
    let m = QwenMoeForCausalLM::new(
        &ck.config,
        ck.var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let prompt = vec![785u32, 6722, 315, 9625, 374];
    let n = 200;
    let mut s = Session::new(&m, 1, prompt.len() + n).unwrap();
    let mut rows = vec![s
        .step(&[&prompt], Logits::Last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()];
    let mut seq = prompt.clone();
    while seq.len() < prompt.len() + n {
        let next = argmax(rows.last().unwrap());
        seq.push(next);
        let l = s.step(&[&[next]], Logits::Last).unwrap();
        rows.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert_eq!(s.len(0), prompt.len() + n);
    // one forward over the whole sequence, a fresh cache
    let full = Session::new(&m, 1, seq.len())
        .unwrap()
        .step(&[&seq], Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut judged = 0;
    for (i, got) in rows.iter().enumerate() {
        let want = &full[prompt.len() - 1 + i];
        let mag = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= 1e-4 * mag, "position {i}: err {err} vs {mag}");
        judged += 1;
    }
    assert_eq!(judged, n + 1);
    // the tokens really vary (a cache bug that repeats one state would not)
    let distinct: std::collections::HashSet<_> = seq[prompt.len()..].iter().collect();
    assert!(distinct.len() > 10, "{distinct:?}");
}
