//! What a client asks of the engine and what it gets back, step by step.

use crate::sampling::{SamplingParams, TokenLogprob};

pub type RequestId = u64;

/// Everything about one request but its prompt.
#[derive(Clone, Debug)]
pub struct RequestParams {
    pub sampling: SamplingParams,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Strings that end the output (not included in its text); needs a codec.
    pub stop: Vec<String>,
    /// Token ids that end the output (not included in its text).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's EOS tokens.
    pub ignore_eos: bool,
    /// Log-probability of each generated token and this many alternatives.
    pub logprobs: Option<usize>,
    /// Return the full logits behind the first generated token.
    pub return_first_logits: bool,
}

impl Default for RequestParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 16,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
            return_first_logits: false,
        }
    }
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token, a stop token or a stop string.
    Stop,
    /// `max_tokens`, the model's context, or a cache too small to grow into.
    Length,
    /// Aborted by the caller or failed in the engine (`RequestOutput::error`).
    Abort,
}

impl FinishReason {
    /// The OpenAI API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// What one step produced for one request.
#[derive(Clone, Debug, Default)]
pub struct RequestOutput {
    pub id: RequestId,
    /// Tokens generated this step (at most one).
    pub tokens: Vec<u32>,
    /// Text that became final this step (held back while it may still turn
    /// into a stop string or an incomplete character).
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    /// Why the engine failed this request (with `FinishReason::Abort`).
    pub error: Option<String>,
    pub prompt_tokens: usize,
    /// Tokens generated so far, the final stop token included.
    pub completion_tokens: usize,
    /// Prompt tokens found in the prefix cache (not computed).
    pub cached_tokens: usize,
    pub first_logits: Option<Vec<f32>>,
}
