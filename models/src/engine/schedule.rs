//! Which tokens the next step runs: running sequences first (oldest first,
//! decode tokens and unfinished prefill chunks), then waiting ones admitted
//! in arrival order while the token budget, sequence slots and KV blocks
//! last. A sequence that cannot grow preempts the newest running one (its
//! blocks freed, its tokens recomputed when it is admitted again).

use super::request::{FinishReason, RequestOutput};
use super::sequence::Sequence;
use super::Engine;

/// `(index into running, tokens to compute)` per sequence of the step.
pub(super) type Plan = Vec<(usize, usize)>;

impl Engine<'_> {
    pub(super) fn schedule(&mut self) -> (Plan, Vec<RequestOutput>) {
        if self.isolate > 0 {
            self.isolate -= 1;
            return self.schedule_one(false);
        }
        if self.cfg.batch_invariant {
            return self.schedule_one(true);
        }
        let mut plan = Plan::new();
        let mut outputs = vec![];
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].pending().min(budget);
            match self.grow(i, n, &mut outputs) {
                Grown::Yes => {
                    plan.push((i, n));
                    budget -= n;
                    i += 1;
                }
                // `i` left running: the same index is the next sequence
                Grown::Removed => {}
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(n) = self.admit(budget) else { break };
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        if plan.is_empty() {
            self.drop_unfittable(&mut outputs);
        }
        (plan, outputs)
    }

    /// With nothing running, a waiting sequence that still cannot be
    /// admitted needs more than the whole cache: it ends by length.
    fn drop_unfittable(&mut self, outputs: &mut Vec<RequestOutput>) {
        if !self.running.is_empty() {
            return;
        }
        if let Some(s) = self.waiting.pop_front() {
            outputs.push(self.end(s, FinishReason::Length, None));
        }
    }

    /// One sequence per step (batch-invariant mode, or finding which request
    /// failed a batch), its pending tokens at once, running sequences taking
    /// turns.
    fn schedule_one(&mut self, admit: bool) -> (Plan, Vec<RequestOutput>) {
        let mut outputs = vec![];
        if admit && self.running.len() < self.cfg.max_num_seqs {
            if let Some(n) = self.admit(usize::MAX) {
                return (vec![(self.running.len() - 1, n)], outputs);
            }
        }
        while !self.running.is_empty() {
            let i = self.turn % self.running.len();
            self.turn = self.turn.wrapping_add(1);
            let n = self.running[i].pending();
            if let Grown::Yes = self.grow(i, n, &mut outputs) {
                return (vec![(i, n)], outputs);
            }
        }
        self.drop_unfittable(&mut outputs);
        (vec![], outputs)
    }

    /// Moves the first waiting sequence to running with blocks for up to
    /// `budget` of its tokens; `None` when it does not fit now.
    fn admit(&mut self, budget: usize) -> Option<usize> {
        let s = self.waiting.front_mut()?;
        if self.cfg.prefix_caching && s.table.is_empty() && s.output_len() == 0 {
            s.cached_tokens = self.cache.match_prefix(&mut s.table, &s.tokens);
            self.stats.prompt_tokens_cached += s.cached_tokens as u64;
        }
        let n = s.pending().min(budget);
        let want = s.table.len() + n;
        if self.cache.reserve(&mut s.table, want).is_err() {
            // keep no blocks while waiting
            self.cache.release(&mut s.table);
            return None;
        }
        let s = self.waiting.pop_front()?;
        self.running.push(s);
        Some(n)
    }

    /// Gives running sequence `i` blocks for `n` more tokens, preempting the
    /// newest other sequences as needed. When `i` itself must go (it is the
    /// newest, or alone and the cache cannot hold it) it is removed.
    fn grow(&mut self, i: usize, n: usize, outputs: &mut Vec<RequestOutput>) -> Grown {
        loop {
            let s = &mut self.running[i];
            let want = s.table.len() + n;
            if self.cache.reserve(&mut s.table, want).is_ok() {
                return Grown::Yes;
            }
            if self.running.len() > i + 1 {
                if let Some(victim) = self.running.pop() {
                    self.preempt(victim);
                }
                continue;
            }
            let s = self.running.remove(i);
            if self.running.is_empty() && self.waiting.is_empty() {
                // alone and still too big: the cache is its limit
                outputs.push(self.end(s, FinishReason::Length, None));
            } else {
                self.preempt(s);
            }
            return Grown::Removed;
        }
    }

    /// Frees `s`'s blocks and puts it first in line, to be recomputed.
    fn preempt(&mut self, mut s: Sequence) {
        self.cache.release(&mut s.table);
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }
}

enum Grown {
    Yes,
    Removed,
}
