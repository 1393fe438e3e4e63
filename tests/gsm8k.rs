//! GSM8K evaluation: answer extraction on tricky outputs, prompt format, and an
//! end-to-end run on the bundled tiny checkpoint (batch 1 and 4 identical).

use candle_core::{DType, Device};
use candle_moe_models::gsm8k::{
    build_prompt, evaluate, extract_answer, load_jsonl, truncate_at_stop, EvalOptions, Problem,
};
use candle_moe_models::TextCodec;
use candle_moe_models::{Checkpoint, Logits, ModelError, QwenMoeForCausalLM, Session};
use std::path::PathBuf;
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn extraction_on_tricky_outputs() {
    assert_eq!(extract_answer("The answer is 1,234."), Some(1234));
    assert_eq!(extract_answer("3 apples and 4 pears make 7"), Some(7));
    assert_eq!(extract_answer("no number here"), None);
    assert_eq!(extract_answer(""), None);
    assert_eq!(
        extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72"),
        Some(72)
    );
    assert_eq!(extract_answer("$18 a day.\n\n"), Some(18));
    assert_eq!(
        extract_answer("It costs 2,125 dollars, i.e. 2125"),
        Some(2125)
    );
    assert_eq!(
        extract_answer("-5 degrees"),
        Some(5),
        "like vLLM's \\d+, the sign is dropped"
    );
    assert_eq!(
        extract_answer("3.75"),
        Some(75),
        "like vLLM's \\d+, the last digit run"
    );
    // text after a stop word is cut before scoring
    let out = " She makes 9 * 2 = $18 every day.\n#### 18\n\nQuestion: A robe takes 2 bolts";
    let cut = truncate_at_stop(out);
    assert_eq!(cut, " She makes 9 * 2 = $18 every day.\n#### 18\n\n");
    assert_eq!(extract_answer(cut), Some(18));
    assert_eq!(extract_answer(out), Some(2));
    assert_eq!(truncate_at_stop("x Assistant: y <|separator|>"), "x ");
    assert_eq!(truncate_at_stop("12 <|separator|> Question"), "12 ");
}

#[test]
fn prompt_format() {
    let shots = vec![
        Problem {
            question: "Q1?".into(),
            answer: "A1\n#### 1".into(),
        },
        Problem {
            question: "Q2?".into(),
            answer: "A2\n#### 2".into(),
        },
    ];
    assert_eq!(
        build_prompt(&shots, "T?"),
        "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\nQuestion: T?\nAnswer:"
    );
    assert_eq!(build_prompt(&[], "T?"), "Question: T?\nAnswer:");
}

struct Codec(tokenizers::Tokenizer);

impl TextCodec for Codec {
    fn encode(&self, t: &str) -> candle_moe_models::Result<Vec<u32>> {
        self.0
            .encode(t, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Config(e.to_string()))
    }
    fn decode(&self, ids: &[u32]) -> candle_moe_models::Result<String> {
        self.0
            .decode(ids, true)
            .map_err(|e| ModelError::Config(e.to_string()))
    }
}

#[test]
fn end_to_end_on_tiny_checkpoint_batch_1_equals_4() {
    let data = root().join("tests/fixtures/gsm8k");
    let train = load_jsonl(&data.join("train.jsonl")).unwrap();
    let test = load_jsonl(&data.join("test.jsonl")).unwrap();
    assert_eq!((train.len(), test.len()), (5, 6));
    let dir = root().join("models/tiny-qwen2-moe");
    let ck = Checkpoint::open(&dir).unwrap();
    let codec = Arc::new(Codec(
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
    ));
    let m = QwenMoeForCausalLM::new(
        &ck.config,
        ck.var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let run = |m: &QwenMoeForCausalLM, bs: usize| {
        let opts = EvalOptions {
            num_fewshot: 3,
            batch_size: bs,
            max_new_tokens: 24,
            eos: ck.eos_token_ids.clone(),
            model_name: "tiny".into(),
            batch_invariant: false,
        };
        let mut calls = 0;
        let r = evaluate(
            m,
            codec.clone(),
            &train,
            &test[..5],
            &opts,
            vec![],
            &mut |_, _| calls += 1,
        )
        .unwrap();
        assert_eq!(calls, 5, "progress once per question");
        r
    };
    let r1 = run(&m, 1);
    let r4 = run(&m, 4);
    let v = serde_json::to_value(&r4).unwrap();
    for k in [
        "model",
        "num_questions",
        "num_fewshot",
        "accuracy",
        "stderr",
        "invalid_rate",
        "latency_s",
        "tokens_per_s",
        "per_question",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(r4.num_questions, 5);
    assert_eq!(r4.num_fewshot, 3);
    let labels: Vec<Option<u64>> = r4.per_question.iter().map(|q| q.label).collect();
    assert_eq!(
        labels,
        vec![Some(18), Some(3), Some(70000), Some(540), Some(20)]
    );
    for (i, q) in r4.per_question.iter().enumerate() {
        assert_eq!(q.index, i);
        assert_eq!(q.pred, extract_answer(&q.generated));
        assert_eq!(q.correct, q.pred.is_some() && q.pred == q.label);
    }
    let acc = r4.per_question.iter().filter(|q| q.correct).count() as f64 / 5.0;
    assert_eq!(r4.accuracy, acc);
    assert!(r4.prompt_tokens > 5 * 200 && r4.generated_tokens > 0);
    let g1: Vec<&str> = r1
        .per_question
        .iter()
        .map(|q| q.generated.as_str())
        .collect();
    let g4: Vec<&str> = r4
        .per_question
        .iter()
        .map(|q| q.generated.as_str())
        .collect();
    assert_eq!(g1, g4, "batch size 4 must give the batch-1 results");
}

/// `--quant fp8`: the evaluation runs on experts quantized at load, and still
/// gives batch-size-independent results.
#[test]
fn end_to_end_with_fp8_experts_batch_1_equals_3() {
    let data = root().join("tests/fixtures/gsm8k");
    let train = load_jsonl(&data.join("train.jsonl")).unwrap();
    let test = load_jsonl(&data.join("test.jsonl")).unwrap();
    let dir = root().join("models/tiny-qwen2-moe");
    let ck = Checkpoint::open(&dir).unwrap();
    let codec = Arc::new(Codec(
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
    ));
    let opts = candle_moe_models::LoadOptions {
        quant: Some(candle_moe::quant::QuantScheme::on_load("fp8").unwrap()),
        ..Default::default()
    };
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    let m = QwenMoeForCausalLM::new_with_options(&ck.config, vb, &opts).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    let float = QwenMoeForCausalLM::new(&ck.config, vb).unwrap();
    let run = |m: &QwenMoeForCausalLM, bs: usize| {
        let opts = EvalOptions {
            num_fewshot: 2,
            batch_size: bs,
            max_new_tokens: 16,
            eos: ck.eos_token_ids.clone(),
            model_name: "tiny-fp8".into(),
            batch_invariant: false,
        };
        evaluate(
            m,
            codec.clone(),
            &train,
            &test[..3],
            &opts,
            vec![],
            &mut |_, _| {},
        )
        .unwrap()
        .per_question
        .into_iter()
        .map(|q| q.generated)
        .collect::<Vec<_>>()
    };
    let g1 = run(&m, 1);
    assert_eq!(g1, run(&m, 3), "batch size 3 must give the batch-1 results");
    assert!(g1.iter().any(|g| !g.is_empty()));
    // it ran on FP8 experts: one byte per weight plus block scales, against
    // the float model's f32 experts
    for b in m.moe_blocks() {
        assert_eq!(b.moe().kernel().experts().name(), "grouped-gemm-fp8-w8a8");
    }
    let (q, f) = (m.expert_weight_bytes(), float.expert_weight_bytes());
    assert!(
        q * 4 >= f && q * 4 < f * 11 / 10,
        "fp8 {q} bytes vs f32 {f}"
    );
    // FP8 against float on the evaluation's own prompts: the last prompt
    // position's logits agree to FP8 W8A8's precision (e4m3 keeps 3 mantissa
    // bits: ~3 % per weight and activation, averaging down over the sums;
    // observed 3.3–5.4 % of max|logit|). Greedy tokens are not compared: this
    // random model's top-2 margins are thinner than that error.
    for p in &test[..3] {
        let ids = codec
            .encode(&candle_moe_models::gsm8k::build_prompt(
                &train[..2],
                &p.question,
            ))
            .unwrap();
        let last = |m: &QwenMoeForCausalLM| {
            Session::new(m, 1, ids.len())
                .unwrap()
                .step(&[&ids], Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (lq, lf) = (last(&m), last(&float));
        let mag = lf.iter().fold(0f32, |a, b| a.max(b.abs()));
        let err = lq
            .iter()
            .zip(&lf)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!("fp8 vs float logits: err {err:.3e} of max {mag:.3e}");
        assert!(
            err <= FP8_VS_FLOAT * mag,
            "fp8 vs float: err {err} vs max|float| {mag}"
        );
        // and it is not the float model itself
        assert!(
            err > 1e-3 * mag,
            "fp8 logits equal the float ones: no quantization ran"
        );
    }
}

/// FP8 W8A8 against the float model, relative to max|logit| (observed values
/// are printed by the test).
const FP8_VS_FLOAT: f32 = 0.1;
