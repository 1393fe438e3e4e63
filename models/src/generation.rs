//! Sampling and the generation loop (single sequence, streamed; and greedy
//! left-padded batches, whose results equal batch size 1).

use crate::error::Result;
use crate::qwen_moe::QwenMoeForCausalLM;
use candle_core::{Device, Tensor};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// 1 = off; >1 discourages tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299792458,
        }
    }
}

/// Picks the next token from f32 logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let state = params.seed ^ 0x9E37_79B9_7F4A_7C15;
        Self { params, state }
    }

    fn uniform(&mut self) -> f64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `context`: the tokens so far (prompt and generated), for the repeat penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let mut l = logits.to_vec();
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            let start = context.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &context[start..] {
                if let Some(x) = l.get_mut(t as usize) {
                    if seen.insert(t) {
                        *x = if *x >= 0.0 {
                            *x / p.repeat_penalty
                        } else {
                            *x * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&l);
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k {
            idx.truncate(k.max(1));
        }
        let max = l[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - max) as f64) / p.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let mut r = self.uniform();
        for (i, &q) in probs.iter().enumerate() {
            if r < q {
                return idx[i] as u32;
            }
            r -= q;
        }
        idx[probs.len() - 1] as u32
    }
}

/// Index of the largest logit; ties → lower index.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    /// f32 logits at the last prompt position, before sampling.
    pub prompt_last_logits: Vec<f32>,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
}

/// Generates up to `max_new_tokens` after `prompt`, stopping at any `eos`;
/// `on_token` sees each new token but an EOS (return false to stop).
pub fn generate(
    model: &mut QwenMoeForCausalLM,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    device: &Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    model.clear_kv_cache();
    let t0 = Instant::now();
    let x = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let prompt_last_logits = model.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut context = prompt.to_vec();
    let mut generated = Vec::new();
    let mut logits = prompt_last_logits.clone();
    while generated.len() < max_new_tokens {
        let next = sampler.sample(&logits, &context);
        generated.push(next);
        context.push(next);
        if eos.contains(&next) || !on_token(next) || generated.len() == max_new_tokens {
            break;
        }
        let x = Tensor::new(&[[next]], device)?;
        logits = model.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(Generation {
        generated_ids: generated,
        prompt_last_logits,
        prompt_seconds,
        generation_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// Greedy generation for several prompts in one left-padded batch. Each
/// result stops at its first EOS (included) or after `max_new_tokens`.
pub fn generate_batch_greedy(
    model: &mut QwenMoeForCausalLM,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    generate_batch_greedy_until(
        model,
        prompts,
        max_new_tokens,
        eos,
        pad_id,
        device,
        &mut |_, _| false,
    )
}

/// As [`generate_batch_greedy`]; `stop(row, generated)` ends a row early
/// (e.g. on a stop string); the batch ends when every row has.
pub fn generate_batch_greedy_until(
    model: &mut QwenMoeForCausalLM,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    pad_id: u32,
    device: &Device,
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
    let mut rows = Vec::with_capacity(b * len);
    for (p, &pad) in prompts.iter().zip(&pads) {
        rows.extend(std::iter::repeat_n(pad_id, pad));
        rows.extend(p);
    }
    model.start_batch(&pads);
    let x = Tensor::from_vec(rows, (b, len), device)?;
    let mut logits = model.forward(&x, true)?.squeeze(1)?.to_vec2::<f32>()?;
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    for _ in 0..max_new_tokens {
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        for i in 0..b {
            if !done[i] {
                out[i].push(next[i]);
                done[i] =
                    eos.contains(&next[i]) || out[i].len() == max_new_tokens || stop(i, &out[i]);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let x = Tensor::from_vec(next, (b, 1), device)?;
        logits = model.forward(&x, true)?.squeeze(1)?.to_vec2::<f32>()?;
    }
    Ok(out)
}
