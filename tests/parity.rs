//! Tiny Qwen2-MoE / Qwen3-MoE checkpoints made by HF transformers
//! (scripts/make_fixtures.py) against transformers' own f32 outputs: prompt
//! logits within 1e-4 relative, greedy continuations token for token (until the
//! reference's top-2 margin drops below 1e-3), single and batched.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe_models::{Checkpoint, Logits, QwenMoeConfig, QwenMoeForCausalLM, Session};
use common::{argmax, expected_cases, fixture, Case};
use serde_json::Value;
use std::path::PathBuf;

const FIXTURES: &[&str] = &[
    "qwen2_moe_f32",
    "qwen2_moe_bf16",
    "qwen3_moe_f32",
    "qwen3_moe_bf16",
];

fn dir(name: &str) -> PathBuf {
    fixture(name)
}

fn load(name: &str) -> QwenMoeForCausalLM {
    load_with(name, None)
}

fn load_with(name: &str, expert_dtype: Option<DType>) -> QwenMoeForCausalLM {
    let ck = Checkpoint::open(dir(name)).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    QwenMoeForCausalLM::new_with_expert_dtype(&ck.config, vb, expert_dtype).unwrap()
}

/// Greedy tokens after `first` (the argmax of the prompt's last logits),
/// `n` in all, feeding one token at a time through the KV cache.
fn continue_greedy(s: &mut Session<'_>, first: u32, n: usize) -> Vec<u32> {
    let mut next = first;
    let mut got = vec![next];
    while got.len() < n {
        let l = s
            .step(&[&[next]], Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        next = argmax(&l);
        got.push(next);
    }
    got
}

fn assert_close(got: &[f32], want: &[f32], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{ctx}: non-finite logits"
    );
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let mag = want.iter().map(|b| b.abs()).fold(0f32, f32::max);
    assert!(err <= 1e-4 * mag, "{ctx}: max err {err} vs max |ref| {mag}");
}

/// Compares a greedy continuation until the reference's margin is too thin to call.
fn check_generation(got: &[u32], c: &Case, ctx: &str) -> usize {
    let mut compared = 0;
    for (step, (&g, &w)) in got.iter().zip(&c.generated).enumerate() {
        if c.margins[step] < 1e-3 {
            break;
        }
        assert_eq!(g, w, "{ctx}: step {step}");
        compared += 1;
    }
    compared
}

#[test]
fn single_sequence_matches_transformers() {
    // the bf16 checkpoints also with their experts kept in bf16 under f32 compute
    let runs = FIXTURES.iter().map(|n| (*n, None)).chain([
        ("qwen2_moe_bf16", Some(DType::BF16)),
        ("qwen3_moe_bf16", Some(DType::BF16)),
    ]);
    for (name, expert_dtype) in runs {
        let m = load_with(name, expert_dtype);
        let mut total = 0;
        for (ci, c) in expected_cases(&dir(name).join("expected.json"))
            .iter()
            .enumerate()
        {
            let mut s = Session::new(&m, 1, c.prompt.len() + c.generated.len()).unwrap();
            let logits = s
                .step(&[&c.prompt], Logits::All)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (p, (g, w)) in logits.iter().zip(&c.logits).enumerate() {
                assert_close(g, w, &format!("{name} case {ci} position {p}"));
            }
            let got = continue_greedy(&mut s, argmax(logits.last().unwrap()), c.generated.len());
            total += check_generation(&got, c, &format!("{name} case {ci}"));
        }
        assert!(
            total >= 40,
            "{name}: only {total} decisive greedy steps compared"
        );
    }
}

/// bf16 end to end (weights, KV cache and activations between ops in bf16;
/// the kernels accumulate in f32) against transformers' f32 outputs. Each op
/// rounds its output to bf16 (relative error ≤ 2⁻⁹ ≈ 2e-3); through two
/// decoder layers, the final norm and the head these add up to 1–2 % of the
/// largest logit (observed 0.6–4.3 %), so positions must be within
/// 5e-2 · max|ref|. A router near-tie can flip an expert under that rounding
/// (observed once in 48 positions: 10.5 %), so at most one position in ten
/// may exceed it, and none 0.2. Greedy tokens are judged where the
/// reference's top-2 margin exceeds twice the bound.
#[test]
fn bf16_compute_matches_transformers_within_bf16_tolerance() {
    const TOL: f32 = 5e-2;
    let (mut judged, mut positions, mut over) = (0, 0, 0);
    for name in FIXTURES {
        let ck = Checkpoint::open(dir(name)).unwrap();
        let vb = ck.var_builder(DType::BF16, &Device::Cpu).unwrap();
        let m = QwenMoeForCausalLM::new(&ck.config, vb).unwrap();
        let mut worst = 0f32;
        for c in expected_cases(&dir(name).join("expected.json")).iter() {
            let mut s = Session::new(&m, 1, c.prompt.len() + c.generated.len()).unwrap();
            let logits = s
                .step(&[&c.prompt], Logits::All)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (g, w) in logits.iter().zip(&c.logits) {
                let mag = w.iter().fold(0f32, |a, b| a.max(b.abs()));
                let err = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                worst = worst.max(err / mag);
                assert!(err <= 0.2 * mag, "{name}: err {err} vs max|ref| {mag}");
                positions += 1;
                over += usize::from(err > TOL * mag);
            }
            let mag = c
                .logits
                .last()
                .unwrap()
                .iter()
                .fold(0f32, |a, b| a.max(b.abs()));
            let mut next = argmax(logits.last().unwrap());
            for (step, (&want, &margin)) in c.generated.iter().zip(&c.margins).enumerate() {
                if margin < 2.0 * TOL * mag {
                    break;
                }
                assert_eq!(next, want, "{name}: greedy token {step}");
                judged += 1;
                let l = s.step(&[&[next]], Logits::Last).unwrap();
                next = argmax(&l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        eprintln!("{name} in bf16: worst logit error {worst:.2e} of max|ref|");
    }
    eprintln!("{over} of {positions} positions above {TOL}; {judged} greedy tokens judged");
    assert!(
        over * 10 <= positions,
        "{over} of {positions} positions above {TOL}"
    );
    assert!(judged >= 20, "only {judged} decisive greedy tokens judged");
}

/// All cases of a fixture as one ragged batch (prompts of different lengths
/// side by side, no padding), then decoded together; each row must give its
/// single-sequence reference.
#[test]
fn ragged_batch_matches_transformers() {
    for name in FIXTURES {
        let m = load(name);
        let cs = expected_cases(&dir(name).join("expected.json"));
        assert!(
            cs.windows(2)
                .any(|w| w[0].prompt.len() != w[1].prompt.len()),
            "{name}: the batch must be ragged"
        );
        let n = cs[0].generated.len();
        let max = cs.iter().map(|c| c.prompt.len()).max().unwrap();
        let mut s = Session::new(&m, cs.len(), max + n).unwrap();
        let prompts: Vec<&[u32]> = cs.iter().map(|c| c.prompt.as_slice()).collect();
        let logits = s
            .step(&prompts, Logits::Last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (bi, c) in cs.iter().enumerate() {
            assert_close(
                &logits[bi],
                c.logits.last().unwrap(),
                &format!("{name} batch row {bi}"),
            );
        }
        let mut gen: Vec<Vec<u32>> = vec![vec![]; cs.len()];
        let mut cur: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for _ in 0..n {
            for (g, &c) in gen.iter_mut().zip(&cur) {
                g.push(c);
            }
            let feed: Vec<[u32; 1]> = cur.iter().map(|&t| [t]).collect();
            let feed: Vec<&[u32]> = feed.iter().map(|t| t.as_slice()).collect();
            let l = s
                .step(&feed, Logits::Last)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            cur = l.iter().map(|l| argmax(l)).collect();
        }
        let judged: usize = cs
            .iter()
            .enumerate()
            .map(|(bi, c)| check_generation(&gen[bi], c, &format!("{name} batch row {bi}")))
            .sum();
        assert!(
            judged >= 20,
            "{name}: only {judged} decisive greedy steps judged"
        );
    }
}

#[test]
fn config_4x_and_5x_agree() {
    for name in FIXTURES {
        let text = std::fs::read_to_string(dir(name).join("config.json")).unwrap();
        let v5: Value = serde_json::from_str(&text).unwrap();
        let mut v4 = v5.clone();
        let o = v4.as_object_mut().unwrap();
        let theta = o.remove("rope_parameters").unwrap()["rope_theta"].clone();
        o.insert("rope_theta".into(), theta);
        let dt = o.remove("dtype").unwrap();
        o.insert("torch_dtype".into(), dt);
        if let Some(n) = o.remove("num_local_experts") {
            o.insert("num_experts".into(), n);
        }
        o.remove("qkv_bias");
        o.insert("some_future_key".into(), Value::from(3));
        let a = QwenMoeConfig::from_json(&v5).unwrap();
        let b = QwenMoeConfig::from_json(&v4).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{name}");
    }
    let bad = serde_json::json!({"model_type": "qwen3_moe", "vocab_size": 8});
    let e = QwenMoeConfig::from_json(&bad).unwrap_err().to_string();
    assert!(e.contains("missing required key `hidden_size`"), "{e}");
}

#[test]
fn checkpoint_errors_name_file_and_tensor() {
    let tmp = std::env::temp_dir().join(format!("candle-moe-ckpt-{}", std::process::id()));
    let src = dir("qwen3_moe_f32");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    // a checkpoint missing one expert tensor
    let st = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut st2 = st.clone();
    st2.remove("model.layers.1.mlp.experts.5.up_proj.weight");
    // writes `tensors` as the checkpoint and returns the model's load error
    let load_err = |tensors: &std::collections::HashMap<String, Tensor>| {
        candle_core::safetensors::save(tensors, tmp.join("model.safetensors")).unwrap();
        let ck = Checkpoint::open(&tmp).unwrap();
        let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
        QwenMoeForCausalLM::new(&ck.config, vb)
            .unwrap_err()
            .to_string()
    };
    let e = load_err(&st2);
    assert!(
        e.contains("model.layers.1.mlp.experts.5.up_proj.weight"),
        "{e}"
    );
    // a mis-shaped one names the file too
    let mut st3 = st.clone();
    st3.insert(
        "model.layers.0.self_attn.q_norm.weight".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&st3);
    assert!(
        e.contains("q_norm.weight") && e.contains("model.safetensors") && e.contains("[7]"),
        "{e}"
    );
    // missing shard file
    std::fs::remove_file(tmp.join("model.safetensors")).unwrap();
    let e = Checkpoint::open(&tmp).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

/// Expert parallelism through the whole model: 2 and 3 ranks on threads, each
/// holding only its experts, give transformers' greedy tokens and logits.
#[test]
fn expert_parallel_model_matches_transformers() {
    use candle_moe::dist::{Communicator, ThreadWorld};
    use candle_moe::{EpConfig, PlacementStrategy};
    use candle_moe_models::LoadOptions;
    use std::sync::Arc;
    for (name, ep) in [("qwen2_moe_f32", 2usize), ("qwen3_moe_f32", 3)] {
        let c = &expected_cases(&dir(name).join("expected.json"))[0];
        let comms = ThreadWorld::new(ep);
        let outs: Vec<(Vec<f32>, Vec<u32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let prompt = c.prompt.clone();
                    let n = c.generated.len();
                    s.spawn(move || {
                        let ck = Checkpoint::open(dir(name)).unwrap();
                        let rank = comm.rank();
                        let comm: Arc<dyn Communicator> = Arc::new(comm);
                        let opts = LoadOptions {
                            expert_dtype: None,
                            ep: Some((EpConfig::new(ep, rank, PlacementStrategy::Linear), comm)),
                            ..Default::default()
                        };
                        let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
                        let m =
                            QwenMoeForCausalLM::new_with_options(&ck.config, vb, &opts).unwrap();
                        let mut s = Session::new(&m, 1, prompt.len() + n).unwrap();
                        let logits = s
                            .step(&[&prompt], Logits::Last)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap();
                        let gen = continue_greedy(&mut s, argmax(&logits), n);
                        (logits, gen)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (logits, gen)) in outs.iter().enumerate() {
            assert_close(
                logits,
                c.logits.last().unwrap(),
                &format!("{name} ep={ep} rank {rank}"),
            );
            assert!(check_generation(gen, c, &format!("{name} ep={ep} rank {rank}")) >= 8);
        }
    }
}
