//! A [`Session`] of sequences over one KV cache (the low-level driver tests
//! and benchmarks use), and generation helpers on the engine (one sequence,
//! streamed; greedy batches of ragged prompts).

use crate::engine::{Engine, EngineConfig, RequestParams};
use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockTable, KvCache, DEFAULT_BLOCK_SIZE};
use crate::model::{CausalLm, Logits, SeqInput};
use crate::sampling::SamplingParams;
use candle_core::Tensor;
use std::time::Instant;

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

/// Engine parameters that stop at `eos` (not the model's own list).
fn params_with_eos(sampling: SamplingParams, max_tokens: usize, eos: &[u32]) -> RequestParams {
    RequestParams {
        sampling,
        max_tokens,
        ignore_eos: true,
        stop_token_ids: eos.to_vec(),
        ..Default::default()
    }
}

/// Generates up to `max_new_tokens` after `prompt` on the engine, stopping
/// at any `eos`; `on_token` sees each new token but an EOS (return false to
/// stop).
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: SamplingParams,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    let mut generated = Vec::new();
    let mut prompt_last_logits = vec![];
    if max_new_tokens == 0 {
        return Ok(Generation {
            generated_ids: generated,
            prompt_last_logits,
            prompt_seconds: 0.0,
            generation_seconds: 0.0,
        });
    }
    let cfg = EngineConfig::for_batch(model, 1, prompt.len() + max_new_tokens);
    let mut engine = Engine::new(model, None, cfg)?;
    let mut params = params_with_eos(sampling, max_new_tokens, eos);
    params.return_first_logits = true;
    engine.add_request(0, prompt.to_vec(), params)?;
    let t0 = Instant::now();
    let mut prompt_seconds = 0.0;
    'outer: while engine.has_work() {
        for out in engine.step()? {
            if let Some(e) = out.error {
                return Err(ModelError::Input(e));
            }
            if let Some(l) = out.first_logits {
                prompt_last_logits = l;
                prompt_seconds = t0.elapsed().as_secs_f64();
            }
            for t in out.tokens {
                generated.push(t);
                if !eos.contains(&t) && !on_token(t) {
                    break 'outer;
                }
            }
        }
    }
    Ok(Generation {
        generated_ids: generated,
        prompt_last_logits,
        prompt_seconds,
        generation_seconds: t0.elapsed().as_secs_f64() - prompt_seconds,
    })
}

/// Greedy generation for several prompts on the engine (all in one batch).
/// Each result stops at its first EOS (included) or after `max_new_tokens`.
pub fn generate_batch_greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    if max_new_tokens == 0 || prompts.is_empty() {
        return Ok(out);
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let cfg = EngineConfig::for_batch(model, prompts.len(), len + max_new_tokens);
    let mut engine = Engine::new(model, None, cfg)?;
    for (i, p) in prompts.iter().enumerate() {
        if !p.is_empty() {
            let params = params_with_eos(SamplingParams::default(), max_new_tokens, eos);
            engine.add_request(i as u64, p.clone(), params)?;
        }
    }
    for o in engine.run_to_completion()? {
        if let Some(e) = o.error {
            return Err(ModelError::Input(e));
        }
        out[o.id as usize].extend(o.tokens);
    }
    Ok(out)
}
