//! The inference engine: continuous batching over the block KV cache.
//!
//! Every [`Engine::step`] runs one forward over a flat list of tokens from
//! many sequences — decode tokens of the running ones and prefill chunks of
//! new ones, mixed, within a token budget — so all of a step's tokens share
//! one read of each layer's weights. Requests join between steps (admitted
//! while KV blocks and sequence slots last, with whole-block prefix caching)
//! and leave when they finish; when the cache runs out, the newest running
//! sequence is preempted and later recomputed. Sampling, stop conditions and
//! text are per request.

mod follower;
mod request;
mod schedule;
mod sequence;

pub use follower::{follow, StepPlan};
pub use request::{FinishReason, RequestId, RequestOutput, RequestParams};

use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, DEFAULT_BLOCK_SIZE};
use crate::model::{CausalLm, Logits, SeqInput};
use crate::sampling::{argmax_rows, token_logprob};
use crate::text::TextCodec;
use sequence::Sequence;
use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// The engine's limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    /// KV-cache blocks (the cache holds `num_blocks · block_size` tokens).
    pub num_blocks: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens in one forward (prefill is chunked to fit).
    pub max_num_batched_tokens: usize,
    /// Prompt plus output, at most.
    pub max_model_len: usize,
    /// Share the KV blocks of common prompt prefixes.
    pub prefix_caching: bool,
    /// One sequence per forward, its whole prompt at once, no prefix cache:
    /// a sequence's tokens are then bit-identical whatever else is running.
    pub batch_invariant: bool,
}

impl EngineConfig {
    /// Limits for `model` with a KV cache of `kv_cache_bytes`.
    pub fn for_model(model: &dyn CausalLm, kv_cache_bytes: usize) -> Self {
        let info = model.info();
        let per_token = KvCache::bytes_per_token(info.kv, info.dtype).max(1);
        let bs = DEFAULT_BLOCK_SIZE;
        Self {
            block_size: bs,
            num_blocks: (kv_cache_bytes / per_token / bs).max(1),
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: info.max_position_embeddings,
            prefix_caching: true,
            batch_invariant: false,
        }
    }

    /// Room for `num_seqs` sequences of `max_len` tokens each, all at once.
    pub fn for_batch(model: &dyn CausalLm, num_seqs: usize, max_len: usize) -> Self {
        let bs = DEFAULT_BLOCK_SIZE;
        Self {
            block_size: bs,
            num_blocks: (num_seqs.max(1) * max_len.div_ceil(bs).max(1)),
            max_num_seqs: num_seqs.max(1),
            max_num_batched_tokens: (num_seqs * max_len).clamp(1, 8192),
            max_model_len: model.info().max_position_embeddings,
            prefix_caching: true,
            batch_invariant: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |k: &str, v: usize| {
            Err(ModelError::Input(format!(
                "engine: {k} must be positive (got {v})"
            )))
        };
        for (k, v) in [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
        ] {
            if v == 0 {
                return bad(k, v);
            }
        }
        Ok(())
    }
}

/// Counters for monitoring.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Prompt tokens computed (not found in the prefix cache), since start.
    pub prompt_tokens: u64,
    pub prompt_tokens_cached: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
}

pub struct Engine<'m> {
    model: &'m dyn CausalLm,
    codec: Option<Arc<dyn TextCodec>>,
    cfg: EngineConfig,
    cache: KvCache,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    followers: Vec<Sender<Arc<StepPlan>>>,
    stats: EngineStats,
    /// Next running sequence's turn in one-sequence steps.
    turn: usize,
    /// One-sequence steps left after a failed batch, to find the request
    /// that fails (it alone is aborted).
    isolate: usize,
}

impl<'m> Engine<'m> {
    /// `codec` decodes output text (needed for stop strings).
    pub fn new(
        model: &'m dyn CausalLm,
        codec: Option<Arc<dyn TextCodec>>,
        mut cfg: EngineConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        cfg.max_model_len = cfg.max_model_len.min(model.info().max_position_embeddings);
        if cfg.batch_invariant {
            cfg.prefix_caching = false;
        }
        let cache = model.new_kv_cache(cfg.block_size, cfg.num_blocks)?;
        Ok(Self {
            model,
            codec,
            cfg,
            cache,
            waiting: VecDeque::new(),
            running: vec![],
            followers: vec![],
            stats: EngineStats::default(),
            turn: 0,
            isolate: 0,
        })
    }

    /// Expert-parallel followers: each step's plan is sent to them before
    /// rank 0 runs it (see [`follow`]).
    pub fn with_followers(mut self, followers: Vec<Sender<Arc<StepPlan>>>) -> Self {
        self.followers = followers;
        self
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn codec(&self) -> Option<&dyn TextCodec> {
        self.codec.as_deref()
    }

    /// Queues a request; an error names what about it cannot be served.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: RequestParams,
    ) -> Result<()> {
        let vocab = self.model.info().vocab_size;
        let input = |m: String| Err(ModelError::Input(m));
        if prompt.is_empty() {
            return input("prompt: empty".into());
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return input(format!(
                "prompt: token id {t} is outside the vocabulary ({vocab})"
            ));
        }
        if prompt.len() >= self.cfg.max_model_len {
            return input(format!(
                "prompt: {} tokens leave no room to generate in the model's context of {}",
                prompt.len(),
                self.cfg.max_model_len
            ));
        }
        let capacity = self.cfg.num_blocks * self.cfg.block_size;
        if prompt.len() >= capacity {
            return input(format!(
                "prompt: {} tokens do not fit the KV cache ({capacity} tokens)",
                prompt.len()
            ));
        }
        if params.max_tokens == 0 {
            return input("max_tokens: must be at least 1".into());
        }
        if !params.stop.is_empty() && self.codec.is_none() {
            return input("stop: stop strings need a tokenizer".into());
        }
        if self.has_request(id) {
            return input(format!("request id {id} is already in use"));
        }
        self.waiting.push_back(Sequence::new(id, prompt, params));
        Ok(())
    }

    fn has_request(&self, id: RequestId) -> bool {
        self.waiting.iter().chain(&self.running).any(|s| s.id == id)
    }

    /// Drops a request wherever it is; whether it was there.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(mut s) = self.waiting.remove(i) {
                self.cache.release(&mut s.table);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.remove(i);
            self.cache.release(&mut s.table);
            return true;
        }
        false
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.cfg.num_blocks - self.cache.free_blocks(),
            kv_blocks_total: self.cfg.num_blocks,
            ..self.stats.clone()
        }
    }

    /// Runs one step; returns what each request that advanced produced. A
    /// failed forward of several sequences is retried one sequence per step;
    /// a sequence that fails alone ends with `FinishReason::Abort` and the
    /// error, and the engine goes on.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let (plan, mut outputs) = self.schedule();
        if plan.is_empty() {
            return Ok(outputs);
        }
        self.stats.steps += 1;
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let from = s.table.len();
                SeqInput {
                    tokens: &s.tokens[from..from + n],
                    table: &s.table,
                    logits: if from + n == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        if !self.followers.is_empty() {
            let dims = (self.cfg.block_size, self.cfg.num_blocks);
            let p = Arc::new(StepPlan::from_inputs(dims, &inputs));
            self.followers.retain(|f| f.send(p.clone()).is_ok());
        }
        let result = self.model.forward(&inputs, &mut self.cache);
        let sampling: Vec<usize> = plan
            .iter()
            .zip(&inputs)
            .filter(|(_, x)| x.logits == Logits::Last)
            .map(|(&(i, _), _)| i)
            .collect();
        drop(inputs);
        let logits = match result {
            Ok(l) => l,
            Err(_) if plan.len() > 1 => {
                // someone in the batch fails: take them one at a time
                self.isolate = plan.len();
                return Ok(outputs);
            }
            Err(e) => {
                let s = self.running.remove(plan[0].0);
                outputs.push(self.end(s, FinishReason::Abort, Some(e.to_string())));
                return Ok(outputs);
            }
        };
        for &(i, n) in &plan {
            let s = &mut self.running[i];
            if s.table.len() < s.prompt_len {
                self.stats.prompt_tokens += n.min(s.prompt_len - s.table.len()) as u64;
            }
            s.table.advance(n);
            if self.cfg.prefix_caching {
                self.cache.commit_prefix(&mut s.table, &s.tokens);
            }
        }
        self.sample(&sampling, &logits, &mut outputs)?;
        Ok(outputs)
    }

    /// Samples one token for each sequence of `rows` (in `logits`' row
    /// order), applies stop conditions, releases the finished.
    fn sample(
        &mut self,
        rows: &[usize],
        logits: &candle_core::Tensor,
        outputs: &mut Vec<RequestOutput>,
    ) -> Result<()> {
        let greedy = if rows.iter().any(|&i| self.running[i].sampler.is_greedy()) {
            argmax_rows(logits)?
        } else {
            vec![]
        };
        let eos = self.model.info().eos_token_ids.clone();
        let mut finished = vec![];
        for (r, &i) in rows.iter().enumerate() {
            let s = &mut self.running[i];
            let wants_row = !s.sampler.is_greedy()
                || s.params.logprobs.is_some()
                || (s.params.return_first_logits && s.output_len() == 0);
            let row = if wants_row {
                Some(logits.get(r)?.to_vec1::<f32>()?)
            } else {
                None
            };
            let token = match &row {
                Some(l) if !s.sampler.is_greedy() => {
                    s.sampler.sample_seq(l, &s.tokens, s.prompt_len)
                }
                _ => greedy[r],
            };
            let first_logits = match &row {
                Some(l) if s.params.return_first_logits && s.output_len() == 0 => Some(l.clone()),
                _ => None,
            };
            let logprobs = match (&row, s.params.logprobs) {
                (Some(l), Some(n)) => vec![token_logprob(l, token, n)],
                _ => vec![],
            };
            let mut out = RequestOutput {
                id: s.id,
                tokens: vec![token],
                logprobs,
                prompt_tokens: s.prompt_len,
                cached_tokens: s.cached_tokens,
                first_logits,
                ..Default::default()
            };
            match s.push(token, &eos, self.cfg.max_model_len, self.codec.as_deref()) {
                Ok((finish, text)) => {
                    out.finish = finish;
                    out.text = text;
                }
                Err(e) => {
                    out.finish = Some(FinishReason::Abort);
                    out.error = Some(e.to_string());
                }
            }
            out.completion_tokens = s.output_len();
            self.stats.generation_tokens += 1;
            if out.finish.is_some() {
                finished.push(i);
            }
            outputs.push(out);
        }
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let mut s = self.running.remove(i);
            self.cache.release(&mut s.table);
        }
        Ok(())
    }

    /// Frees `s`'s blocks; its final output.
    fn end(
        &mut self,
        mut s: Sequence,
        reason: FinishReason,
        error: Option<String>,
    ) -> RequestOutput {
        self.cache.release(&mut s.table);
        s.ended(reason, error)
    }

    /// Runs every queued request to the end; outputs in step order.
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>> {
        let mut all = vec![];
        while self.has_work() {
            all.extend(self.step()?);
        }
        Ok(all)
    }
}
