//! The continuous-batching engine on the bundled tiny checkpoint: requests
//! joining mid-run, chunked prefill, prefix caching and preemption give each
//! request what it gets alone; batch-invariant mode is bit-identical under
//! any concurrency; stop conditions, aborts and bad requests.

use candle_core::{DType, Device};
use candle_moe_models::{
    generate_batch_greedy, Checkpoint, Engine, EngineConfig, FinishReason, HfTokenizer,
    QwenMoeForCausalLM, RequestOutput, RequestParams, SamplingParams, TextCodec,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> (QwenMoeForCausalLM, Vec<u32>) {
    let ck = Checkpoint::open(root().join("models/tiny-qwen2-moe")).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    (
        QwenMoeForCausalLM::new(&ck.config, vb).unwrap(),
        ck.eos_token_ids,
    )
}

/// Deterministic prompts of different lengths; the first `shared` tokens
/// are common to all.
fn prompts(n: usize, shared: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = shared + 3 + 7 * i;
            (0..len)
                .map(|j| {
                    let k = if j < shared { j } else { j * 31 + i * 97 };
                    (k as u32 * 2654435761 % 5000) + 100
                })
                .collect()
        })
        .collect()
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams {
        max_tokens,
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    }
}

/// Runs the engine, adding request `i` before step `arrive[i]`; returns
/// per request its tokens and their log-probabilities.
fn drive(
    engine: &mut Engine<'_>,
    ps: &[Vec<u32>],
    arrive: &[usize],
    params: &RequestParams,
) -> Vec<(Vec<u32>, Vec<f32>, Option<FinishReason>)> {
    let mut out = vec![(vec![], vec![], None); ps.len()];
    let mut step = 0;
    loop {
        for (i, p) in ps.iter().enumerate() {
            if arrive[i] == step {
                engine
                    .add_request(i as u64, p.clone(), params.clone())
                    .unwrap();
            }
        }
        let pending_arrivals = arrive.iter().any(|&a| a > step);
        if !engine.has_work() && !pending_arrivals {
            break;
        }
        for o in engine.step().unwrap() {
            assert!(o.error.is_none(), "{:?}", o.error);
            let r = &mut out[o.id as usize];
            r.0.extend(&o.tokens);
            r.1.extend(o.logprobs.iter().map(|l| l.logprob));
            if o.finish.is_some() {
                r.2 = o.finish;
            }
        }
        step += 1;
        assert!(step < 10_000, "the engine does not finish");
    }
    out
}

#[test]
fn joining_chunked_prefixed_and_preempted_requests_get_what_they_get_alone() {
    let (m, _) = model();
    let ps = prompts(6, 40);
    let alone = generate_batch_greedy(&m, &ps, 10, &[]).unwrap();
    // every request alone, through generate (batch of one)
    for (p, a) in ps.iter().zip(&alone) {
        let one = generate_batch_greedy(&m, std::slice::from_ref(p), 10, &[]).unwrap();
        assert_eq!(&one[0], a);
    }
    let base = EngineConfig::for_batch(&m, 6, 128);
    let arrive = [0, 0, 2, 3, 3, 7];
    let cases: Vec<(&str, EngineConfig)> = vec![
        ("continuous", base.clone()),
        (
            "chunked prefill (8 tokens a step)",
            EngineConfig {
                max_num_batched_tokens: 8,
                ..base.clone()
            },
        ),
        (
            "no prefix cache",
            EngineConfig {
                prefix_caching: false,
                ..base.clone()
            },
        ),
        (
            // 6 prompts of 43–78 tokens + 10 need 4–6 blocks each: 12 blocks
            // hold two or three at a time
            "preempting (12 blocks)",
            EngineConfig {
                num_blocks: 12,
                ..base.clone()
            },
        ),
        (
            "two at a time",
            EngineConfig {
                max_num_seqs: 2,
                ..base.clone()
            },
        ),
    ];
    let mut judged = 0;
    for (name, cfg) in cases {
        let mut e = Engine::new(&m, None, cfg).unwrap();
        let got = drive(&mut e, &ps, &arrive, &greedy(10));
        for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
            assert_eq!(&g.0, a, "{name}: request {i}");
            assert_eq!(g.2, Some(FinishReason::Length));
            judged += g.0.len();
        }
        let st = e.stats();
        assert_eq!(
            (st.running, st.waiting, st.kv_blocks_used),
            (0, 0, 0),
            "{name}"
        );
        if name.starts_with("preempting") {
            assert!(st.preemptions > 0, "{name}: nothing was preempted");
        }
        if name == "continuous" {
            // the 40 shared tokens are two whole blocks, found by the 4
            // requests that arrive after the first step
            assert_eq!(st.prompt_tokens_cached, 4 * 32, "{st:?}");
        }
    }
    assert!(judged >= 250, "judged {judged} tokens");
}

#[test]
fn batch_invariant_mode_is_bit_identical_under_any_concurrency() {
    let (m, _) = model();
    let ps = prompts(5, 20);
    let cfg = EngineConfig {
        batch_invariant: true,
        ..EngineConfig::for_batch(&m, 5, 96)
    };
    let alone: Vec<_> = ps
        .iter()
        .map(|p| {
            let mut e = Engine::new(&m, None, cfg.clone()).unwrap();
            drive(&mut e, std::slice::from_ref(p), &[0], &greedy(12)).remove(0)
        })
        .collect();
    for arrive in [[0, 0, 0, 0, 0], [0, 1, 1, 4, 9]] {
        let mut e = Engine::new(&m, None, cfg.clone()).unwrap();
        let got = drive(&mut e, &ps, &arrive, &greedy(12));
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.0, a.0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g.1), bits(&a.1), "log-probabilities differ in bits");
        }
    }
}

#[test]
fn stop_conditions_abort_and_bad_requests() {
    let (m, _) = model();
    let tk: Arc<dyn TextCodec> = Arc::new(
        HfTokenizer::from_file(&root().join("models/tiny-qwen2-moe/tokenizer.json")).unwrap(),
    );
    let cfg = EngineConfig::for_batch(&m, 4, 64);
    let p = prompts(1, 0).remove(0);
    // the free-running continuation, and its text
    let mut e = Engine::new(&m, Some(tk.clone()), cfg.clone()).unwrap();
    let free = drive(&mut e, std::slice::from_ref(&p), &[0], &greedy(12))
        .remove(0)
        .0;
    let text = tk.decode(&free).unwrap();
    assert!(text.chars().count() > 6, "{text:?}");
    // a stop token: the output ends with it, finish = stop
    let stop_tok = free[4];
    let first = free.iter().position(|&t| t == stop_tok).unwrap();
    let params = RequestParams {
        stop_token_ids: vec![stop_tok],
        ..greedy(12)
    };
    let got = drive(&mut e, std::slice::from_ref(&p), &[0], &params).remove(0);
    assert_eq!(got.0, free[..=first]);
    assert_eq!(got.2, Some(FinishReason::Stop));
    // a stop string from the middle of the text: text ends right before it
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[4..6].iter().collect();
    let cut = text.find(&stop).unwrap();
    e.add_request(
        9,
        p.clone(),
        RequestParams {
            stop: vec![stop.clone()],
            ..greedy(12)
        },
    )
    .unwrap();
    let outs: Vec<RequestOutput> = e.run_to_completion().unwrap();
    let streamed: String = outs.iter().map(|o| o.text.as_str()).collect();
    assert_eq!(streamed, text[..cut], "stop {stop:?} in {text:?}");
    assert_eq!(outs.last().unwrap().finish, Some(FinishReason::Stop));
    // abort frees the blocks
    e.add_request(1, p.clone(), greedy(50)).unwrap();
    e.step().unwrap();
    assert!(e.stats().kv_blocks_used > 0);
    assert!(e.abort(1));
    assert!(!e.abort(1));
    assert_eq!(e.stats().kv_blocks_used, 0);
    // bad requests name what is wrong
    let errs: HashMap<&str, String> = [
        ("empty", vec![]),
        ("vocab", vec![1, 9_999_999]),
        ("context", vec![5; 2048]),
    ]
    .into_iter()
    .map(|(k, p)| (k, e.add_request(2, p, greedy(4)).unwrap_err().to_string()))
    .collect();
    assert!(errs["empty"].contains("prompt"), "{errs:?}");
    assert!(errs["vocab"].contains("9999999"), "{errs:?}");
    assert!(errs["context"].contains("context"), "{errs:?}");
    let zero = e.add_request(
        3,
        p.clone(),
        RequestParams {
            max_tokens: 0,
            ..greedy(1)
        },
    );
    assert!(zero.unwrap_err().to_string().contains("max_tokens"));
    let mut no_codec = Engine::new(&m, None, cfg).unwrap();
    let stop = RequestParams {
        stop: vec!["x".into()],
        ..greedy(4)
    };
    assert!(no_codec.add_request(4, p.clone(), stop).is_err());
    // sampling with a seed repeats itself
    let sampled = RequestParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: Some(0.9),
            seed: 5,
            ..Default::default()
        },
        ..greedy(8)
    };
    let a = drive(&mut e, std::slice::from_ref(&p), &[0], &sampled).remove(0);
    let b = drive(&mut e, std::slice::from_ref(&p), &[0], &sampled).remove(0);
    assert_eq!(a.0, b.0);
}

/// Expert parallelism under the engine: rank 0 schedules and samples, rank 1
/// follows its plans (`engine::follow`); continuous batching with requests
/// joining mid-run gives the single-rank tokens.
#[test]
fn expert_parallel_ranks_follow_rank_0() {
    use candle_moe::dist::{Communicator, ThreadWorld};
    use candle_moe::{EpConfig, PlacementStrategy};
    use candle_moe_models::engine::follow;
    use candle_moe_models::LoadOptions;
    let (single, _) = model();
    let ps = prompts(4, 10);
    let arrive = [0, 0, 1, 5];
    let cfg = EngineConfig::for_batch(&single, 4, 64);
    let mut e = Engine::new(&single, None, cfg.clone()).unwrap();
    let want = drive(&mut e, &ps, &arrive, &greedy(8));
    let ck = Checkpoint::open(root().join("models/tiny-qwen2-moe")).unwrap();
    let load = |comm: Arc<dyn Communicator>| {
        let opts = LoadOptions {
            ep: Some((
                EpConfig::new(2, comm.rank(), PlacementStrategy::Linear),
                comm,
            )),
            ..Default::default()
        };
        let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
        QwenMoeForCausalLM::new_with_options(&ck.config, vb, &opts).unwrap()
    };
    let mut comms = ThreadWorld::new(2);
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let got = std::thread::scope(|s| {
        let follower = s.spawn(|| follow(&load(Arc::new(c1)), rx));
        let m0 = load(Arc::new(c0));
        let mut e = Engine::new(&m0, None, cfg)
            .unwrap()
            .with_followers(vec![tx]);
        let got = drive(&mut e, &ps, &arrive, &greedy(8));
        drop(e);
        follower.join().unwrap().unwrap();
        got
    });
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
        assert_eq!(g.0.len(), 8);
    }
}

/// A model that fails any forward holding a poisoned token.
struct Poisoned<'a>(&'a QwenMoeForCausalLM, u32);

impl candle_moe_models::CausalLm for Poisoned<'_> {
    fn info(&self) -> &candle_moe_models::ModelInfo {
        self.0.info()
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
    fn forward(
        &self,
        seqs: &[candle_moe_models::SeqInput<'_>],
        cache: &mut candle_moe_models::KvCache,
    ) -> candle_moe_models::Result<candle_core::Tensor> {
        if seqs.iter().any(|s| s.tokens.contains(&self.1)) {
            return Err(candle_moe_models::ModelError::Input("poisoned".into()));
        }
        self.0.forward(seqs, cache)
    }
}

/// A request whose forward fails is aborted alone (the batch is retried one
/// sequence at a time); the others finish with their own tokens.
#[test]
fn a_request_that_fails_in_the_engine_fails_alone() {
    let (m, _) = model();
    let ps = prompts(4, 0);
    let want = generate_batch_greedy(&m, &ps, 6, &[]).unwrap();
    let poison = 4242;
    let mut bad = ps.clone();
    bad[2].push(poison);
    let pm = Poisoned(&m, poison);
    let mut e = Engine::new(&pm, None, EngineConfig::for_batch(&m, 4, 64)).unwrap();
    for (i, p) in bad.iter().enumerate() {
        e.add_request(i as u64, p.clone(), greedy(6)).unwrap();
    }
    let mut got = vec![vec![]; 4];
    let mut errors = vec![None; 4];
    for o in e.run_to_completion().unwrap() {
        got[o.id as usize].extend(o.tokens);
        if o.error.is_some() {
            errors[o.id as usize] = o.error;
        }
    }
    assert_eq!(errors[2].as_deref(), Some("poisoned"));
    for i in [0, 1, 3] {
        assert!(errors[i].is_none(), "{i}: {:?}", errors[i]);
        assert_eq!(got[i], want[i], "request {i}");
    }
    assert!(got[2].is_empty());
    assert_eq!(e.stats().kv_blocks_used, 0);
}
