//! Sampling, a [`Session`] of sequences over one KV cache, and the generation
//! loops (single sequence, streamed; greedy batches of ragged prompts).

use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockTable, KvCache, DEFAULT_BLOCK_SIZE};
use crate::model::{CausalLm, Logits, SeqInput};
use candle_core::Tensor;
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

    /// Whether sampling is a plain argmax (no temperature, no penalty).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 && self.params.repeat_penalty == 1.0
    }

    /// Samples from a `[V]` logits tensor; a greedy sampler takes the argmax
    /// where the logits are, without copying the vocabulary to the host.
    pub fn sample_tensor(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        if self.is_greedy() {
            return Ok(logits.argmax(0)?.to_scalar::<u32>()?);
        }
        Ok(self.sample(&logits.to_vec1::<f32>()?, context))
    }

    /// `context`: the tokens so far (prompt and generated), for the repeat penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let p = &self.params;
        let mut penalised: Option<Vec<f32>> = None;
        if p.repeat_penalty != 1.0 {
            let l = penalised.get_or_insert_with(|| logits.to_vec());
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
        let l: &[f32] = penalised.as_deref().unwrap_or(logits);
        if p.temperature <= 0.0 {
            return argmax(l);
        }
        let (temp, top_k, top_p) = (p.temperature, p.top_k, p.top_p);
        let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let weight = |x: f32| (((x - max) as f64) / temp).exp();
        // candidates, best first, found without sorting the vocabulary
        let by_logit = |a: &usize, b: &usize| l[*b].total_cmp(&l[*a]).then(a.cmp(b));
        let cands: Option<Vec<usize>> = match (top_k, top_p) {
            (None, None) => None,
            (Some(k), _) => Some(top_indices(l, k.max(1), by_logit)),
            (None, Some(tp)) => {
                // the smallest prefix holding top_p of the mass: try the best
                // 64, widen until it holds (a full sort only in the worst case)
                let total: f64 = l.iter().map(|&x| weight(x)).sum();
                let mut k = 64;
                loop {
                    let c = top_indices(l, k, by_logit);
                    let mass: f64 = c.iter().map(|&i| weight(l[i])).sum();
                    if mass >= tp * total || c.len() == l.len() {
                        break Some(c);
                    }
                    k *= 4;
                }
            }
        };
        let Some(mut idx) = cands else {
            // the full distribution, walked in vocabulary order
            let total: f64 = l.iter().map(|&x| weight(x)).sum();
            let mut r = self.uniform() * total;
            for (i, &x) in l.iter().enumerate() {
                let w = weight(x);
                if r < w {
                    return i as u32;
                }
                r -= w;
            }
            return argmax(l);
        };
        let mut probs: Vec<f64> = idx.iter().map(|&i| weight(l[i])).collect();
        if let Some(tp) = top_p {
            let sum: f64 = probs.iter().sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q / sum;
                if acc >= tp {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let sum: f64 = probs.iter().sum();
        let mut r = self.uniform() * sum;
        for (i, &q) in probs.iter().enumerate() {
            if r < q {
                return idx[i] as u32;
            }
            r -= q;
        }
        idx[probs.len() - 1] as u32
    }
}

/// The `k` best indices under `cmp`, best first: a selection, then a sort of
/// those `k` only.
fn top_indices(
    l: &[f32],
    k: usize,
    cmp: impl Fn(&usize, &usize) -> std::cmp::Ordering,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..l.len()).collect();
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, &cmp);
        idx.truncate(k);
    }
    idx.sort_by(&cmp);
    idx
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

/// Sequences decoded together over one KV cache: the simple driver behind
/// generation, evaluation and tests (the engine schedules many more).
pub struct Session<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
    tables: Vec<BlockTable>,
}

impl<'m> Session<'m> {
    /// Room for `num_seqs` sequences of up to `max_len` tokens each.
    pub fn new(model: &'m dyn CausalLm, num_seqs: usize, max_len: usize) -> Result<Self> {
        let bs = DEFAULT_BLOCK_SIZE;
        let blocks = (num_seqs * max_len.div_ceil(bs)).max(1);
        Ok(Self {
            cache: model.new_kv_cache(bs, blocks)?,
            model,
            tables: vec![BlockTable::new(); num_seqs],
        })
    }

    /// Tokens sequence `i` holds.
    pub fn len(&self, i: usize) -> usize {
        self.tables.get(i).map_or(0, BlockTable::len)
    }

    /// Forgets every sequence (the cache stays allocated).
    pub fn reset(&mut self) {
        for t in &mut self.tables {
            self.cache.release(t);
        }
    }

    /// Feeds `inputs[i]` to sequence `i` (empty: it sits this step out);
    /// returns the F32 logits rows `logits` asks for, sequences in order.
    pub fn step(&mut self, inputs: &[&[u32]], logits: Logits) -> Result<Tensor> {
        if inputs.len() > self.tables.len() {
            return Err(ModelError::Input(format!(
                "{} inputs for a session of {} sequences",
                inputs.len(),
                self.tables.len()
            )));
        }
        for (t, x) in self.tables.iter_mut().zip(inputs) {
            let len = t.len() + x.len();
            self.cache.reserve(t, len)?;
        }
        let seqs: Vec<SeqInput<'_>> = inputs
            .iter()
            .zip(&self.tables)
            .filter(|(x, _)| !x.is_empty())
            .map(|(x, t)| SeqInput {
                tokens: x,
                table: t,
                logits,
            })
            .collect();
        let out = self.model.forward(&seqs, &mut self.cache)?;
        for (t, x) in self.tables.iter_mut().zip(inputs) {
            t.advance(x.len());
        }
        Ok(out)
    }
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
    model: &dyn CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    let mut session = Session::new(model, 1, prompt.len() + max_new_tokens)?;
    let t0 = Instant::now();
    let first = session.step(&[prompt], Logits::Last)?.squeeze(0)?;
    let prompt_last_logits = first.to_vec1::<f32>()?;
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut context = prompt.to_vec();
    let mut generated = Vec::new();
    let mut logits = first;
    while generated.len() < max_new_tokens {
        let next = sampler.sample_tensor(&logits, &context)?;
        generated.push(next);
        context.push(next);
        if eos.contains(&next) || !on_token(next) || generated.len() == max_new_tokens {
            break;
        }
        logits = session.step(&[&[next]], Logits::Last)?.squeeze(0)?;
    }
    Ok(Generation {
        generated_ids: generated,
        prompt_last_logits,
        prompt_seconds,
        generation_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// Greedy generation for several prompts in one batch (each its own
/// sequence; finished ones leave the step). Each result stops at its first
/// EOS (included) or after `max_new_tokens`.
pub fn generate_batch_greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    generate_batch_greedy_until(model, prompts, max_new_tokens, eos, &mut |_, _| false)
}

/// As [`generate_batch_greedy`]; `stop(row, generated)` ends a row early
/// (e.g. on a stop string); the batch ends when every row has.
pub fn generate_batch_greedy_until(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = Session::new(model, b, len + max_new_tokens)?;
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done: Vec<bool> = prompts.iter().map(|p| p.is_empty()).collect();
    let mut logits = session.step(&inputs, Logits::Last)?;
    // row r of `logits` belongs to the r-th sequence that took part
    let mut active: Vec<usize> = (0..b).filter(|&i| !done[i]).collect();
    while !active.is_empty() && max_new_tokens > 0 {
        let next = logits.argmax(1)?.to_vec1::<u32>()?;
        for (&i, &t) in active.iter().zip(&next) {
            out[i].push(t);
            done[i] = eos.contains(&t) || out[i].len() == max_new_tokens || stop(i, &out[i]);
        }
        let mut feed: Vec<Vec<u32>> = vec![vec![]; b];
        for (&i, &t) in active.iter().zip(&next) {
            if !done[i] {
                feed[i].push(t);
            }
        }
        active.retain(|&i| !done[i]);
        if active.is_empty() {
            break;
        }
        let feed: Vec<&[u32]> = feed.iter().map(Vec::as_slice).collect();
        logits = session.step(&feed, Logits::Last)?;
    }
    Ok(out)
}
