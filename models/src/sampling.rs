//! Turning logits into the next token: temperature, top-k, top-p, min-p,
//! the repetition penalty (over prompt and output, as vLLM and transformers),
//! presence and frequency penalties (over the output, as OpenAI), a seeded
//! generator per sampler, and log-probabilities for the API.

use crate::error::Result;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// Keep tokens whose probability is at least `min_p` times the best's (0 = off).
    pub min_p: f64,
    /// 1 = off; >1 discourages tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token the output holds (0 = off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output (0 = off).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
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
        let p = &self.params;
        p.temperature <= 0.0
            && p.repeat_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// `context`: the tokens so far (prompt and generated), for the repeat penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        self.sample_seq(logits, context, context.len())
    }

    /// As [`Sampler::sample`]; `tokens[prompt_len..]` is the output so far,
    /// which the presence and frequency penalties count.
    pub fn sample_seq(&mut self, logits: &[f32], tokens: &[u32], prompt_len: usize) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let context = tokens;
        let p = &self.params;
        let mut penalised: Option<Vec<f32>> = None;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let l = penalised.get_or_insert_with(|| logits.to_vec());
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in &tokens[prompt_len.min(tokens.len())..] {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, c) in counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * c;
                }
            }
        }
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
        let mut cands: Option<Vec<usize>> = match (top_k, top_p) {
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
        if p.min_p > 0.0 {
            // weight(best) = 1: keep what holds at least min_p of it
            let keep = |&i: &usize| weight(l[i]) >= p.min_p;
            cands = Some(match cands {
                Some(c) => c.into_iter().filter(keep).collect(),
                None => (0..l.len()).filter(keep).collect(),
            });
        }
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

/// A sampled token's log-probability and the `n` most likely alternatives
/// (under the model's raw distribution, before any penalty or temperature).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token`, and the top `n`.
pub fn token_logprob(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let top = if n == 0 {
        vec![]
    } else {
        top_indices(logits, n, by_logit)
    };
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| x - lse),
        top: top
            .into_iter()
            .map(|i| (i as u32, logits[i] - lse))
            .collect(),
    }
}

/// The greedy token of each row of F32 `[rows, V]` logits, computed where
/// the logits are (one small copy to the host).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openai_and_transformers() {
        let logits = [1.0f32, 0.9, 0.0];
        // presence: token 0 was generated → 1.0 - 0.5 < 0.9
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample_seq(&logits, &[0], 0), 1);
        // in the prompt only: no presence penalty
        assert_eq!(s.sample_seq(&logits, &[0], 1), 0);
        // frequency: twice 0.06 → 0.88 < 0.9; once 0.94 > 0.9
        let mut f = Sampler::new(SamplingParams {
            frequency_penalty: 0.06,
            ..Default::default()
        });
        assert_eq!(f.sample_seq(&logits, &[0, 0], 0), 1);
        assert_eq!(f.sample_seq(&logits, &[0], 0), 0);
        // repetition: a positive logit divided, over prompt too
        let mut r = Sampler::new(SamplingParams {
            repeat_penalty: 1.2,
            ..Default::default()
        });
        assert_eq!(r.sample_seq(&logits, &[0], 1), 1);
    }

    #[test]
    fn min_p_cuts_the_tail_and_logprobs_normalise() {
        // with min_p 0.5 only token 0 (p ∝ e^0) and token 1 (e^-0.1) survive
        let logits = [0.0f32, -0.1, -5.0, -5.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 7,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits, &[]) < 2);
        }
        let lp = token_logprob(&logits, 1, 2);
        let total: f64 = logits.iter().map(|&x| ((x - 0.0) as f64).exp()).sum();
        assert!((lp.logprob as f64 - (-0.1 - total.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
    }
}
