//! GSM8K evaluation as vLLM's CI runs it (`tests/evals/gsm8k/gsm8k_eval.py`):
//! `num_fewshot` train items as "Question: …\nAnswer: …\n\n" shots, greedy,
//! stop at "Question", "Assistant:", "<|separator|>" or EOS; the score is the
//! last integer of the output (commas removed) against the label's.

use crate::engine::{Engine, EngineConfig, RequestParams, StepPlan};
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::text::TextCodec;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

pub const STOP_STRINGS: &[&str] = &["Question", "Assistant:", "<|separator|>"];

#[derive(Clone, Debug)]
pub struct Problem {
    pub question: String,
    pub answer: String,
}

/// Reads a GSM8K jsonl file (`{"question", "answer"}` per line).
pub fn load_jsonl(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| ModelError::file(path, format!("line {}: {e}", i + 1)))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ModelError::file(path, format!("line {}: no string `{k}`", i + 1))
                    })
            };
            Ok(Problem {
                question: field("question")?,
                answer: field("answer")?,
            })
        })
        .collect()
}

/// The last run of digits after removing commas, as vLLM's `get_answer_value`;
/// `None` when there is none (an invalid answer).
pub fn extract_answer(text: &str) -> Option<u64> {
    let t = text.replace(',', "");
    let bytes = t.as_bytes();
    let mut end = bytes.len();
    while end > 0 && !bytes[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 && bytes[start - 1].is_ascii_digit() {
        start -= 1;
    }
    // a run too long for u64 is still an answer, just not a matching one
    Some(t[start..end].parse::<u64>().unwrap_or(u64::MAX))
}

/// Few-shot prefix + the question.
pub fn build_prompt(shots: &[Problem], question: &str) -> String {
    let mut p = String::new();
    for s in shots {
        p.push_str(&format!(
            "Question: {}\nAnswer: {}\n\n",
            s.question, s.answer
        ));
    }
    p.push_str(&format!("Question: {question}\nAnswer:"));
    p
}

/// Cuts generated text at the first stop string.
pub fn truncate_at_stop(text: &str) -> &str {
    let cut = STOP_STRINGS
        .iter()
        .filter_map(|s| text.find(s))
        .min()
        .unwrap_or(text.len());
    &text[..cut]
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct QuestionResult {
    pub index: usize,
    pub generated: String,
    pub pred: Option<u64>,
    pub label: Option<u64>,
    pub correct: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub num_questions: usize,
    pub num_fewshot: usize,
    pub accuracy: f64,
    pub stderr: f64,
    pub invalid_rate: f64,
    pub latency_s: f64,
    /// Prompt plus generated tokens per second of wall time.
    pub tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    pub generated_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub per_question: Vec<QuestionResult>,
}

pub struct EvalOptions {
    pub num_fewshot: usize,
    /// Sequences running at once.
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub eos: Vec<u32>,
    pub model_name: String,
    /// Bit-identical per question whatever runs beside it (see
    /// [`EngineConfig::batch_invariant`]), as the server runs with the flag.
    pub batch_invariant: bool,
}

/// Runs the evaluation over `test` with shots from `train` on the engine
/// (every question queued at once, the shots' KV blocks shared through the
/// prefix cache; `followers`: expert-parallel ranks, see
/// [`crate::engine::follow`]); `progress(done, total)` is called as
/// questions finish.
pub fn evaluate(
    model: &dyn CausalLm,
    codec: Arc<dyn TextCodec>,
    train: &[Problem],
    test: &[Problem],
    opts: &EvalOptions,
    followers: Vec<Sender<Arc<StepPlan>>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    if opts.num_fewshot > train.len() {
        return Err(ModelError::Config(format!(
            "num_fewshot {} exceeds the {} train problems",
            opts.num_fewshot,
            train.len()
        )));
    }
    let shots = &train[..opts.num_fewshot];
    let t0 = Instant::now();
    let prompts = test
        .iter()
        .map(|p| codec.encode(&build_prompt(shots, &p.question)))
        .collect::<Result<Vec<_>>>()?;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cfg = EngineConfig::for_batch(model, opts.batch_size, longest + opts.max_new_tokens);
    cfg.batch_invariant = opts.batch_invariant;
    let mut engine = Engine::new(model, Some(codec), cfg)?.with_followers(followers);
    for (i, p) in prompts.into_iter().enumerate() {
        let params = RequestParams {
            max_tokens: opts.max_new_tokens,
            stop: STOP_STRINGS.iter().map(|s| s.to_string()).collect(),
            ignore_eos: true,
            stop_token_ids: opts.eos.clone(),
            ..Default::default()
        };
        engine.add_request(i as u64, p, params)?;
    }
    let mut texts = vec![String::new(); test.len()];
    let (mut done, mut generated_tokens) = (0, 0);
    while engine.has_work() {
        for o in engine.step()? {
            let i = o.id as usize;
            texts[i].push_str(&o.text);
            if o.finish.is_some() {
                if let Some(e) = o.error {
                    return Err(ModelError::Input(format!("question {i}: {e}")));
                }
                generated_tokens += o.completion_tokens;
                done += 1;
                progress(done, test.len());
            }
        }
    }
    let results: Vec<QuestionResult> = test
        .iter()
        .zip(texts)
        .enumerate()
        .map(|(index, (p, generated))| {
            let pred = extract_answer(&generated);
            let label = extract_answer(&p.answer);
            QuestionResult {
                index,
                correct: pred.is_some() && pred == label,
                generated,
                pred,
                label,
            }
        })
        .collect();
    let latency_s = t0.elapsed().as_secs_f64();
    let n = results.len().max(1) as f64;
    let accuracy = results.iter().filter(|r| r.correct).count() as f64 / n;
    Ok(Report {
        model: opts.model_name.clone(),
        num_questions: results.len(),
        num_fewshot: opts.num_fewshot,
        accuracy,
        stderr: (accuracy * (1.0 - accuracy) / n).sqrt(),
        invalid_rate: results.iter().filter(|r| r.pred.is_none()).count() as f64 / n,
        latency_s,
        tokens_per_s: (prompt_tokens + generated_tokens) as f64 / latency_s.max(1e-9),
        prompt_tokens_per_s: prompt_tokens as f64 / latency_s.max(1e-9),
        generated_tokens_per_s: generated_tokens as f64 / latency_s.max(1e-9),
        prompt_tokens,
        generated_tokens,
        per_question: results,
    })
}
