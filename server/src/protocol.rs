//! Request and response JSON of the OpenAI API as OpenAI and vLLM write it
//! (unknown fields are ignored), its validation into engine parameters, and
//! errors in OpenAI's error JSON.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use candle_moe_models::{RequestParams, SamplingParams, TokenLogprob};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An error as the OpenAI API returns it, with the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            404 => "NotFoundError",
            413 => "RequestTooLargeError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON body into an endpoint's own fields and the sampling
/// fields; a mismatch names the field (`messages[2].content`).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
    Ok((from_value(&v)?, from_value(&v)?))
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // a missing field is reported at its parent: name the field
        if let Some(f) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            path = if path == "." {
                f.to_string()
            } else {
                format!("{path}.{f}")
            };
        }
        if path == "." || path.is_empty() {
            ApiError::bad("body", inner)
        } else {
            ApiError::bad(&path, format!("{path}: {inner}"))
        }
    })
}

/// A string or a list of strings (`stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Alternatives per token (0–20).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
}

/// A message's content: text, or parts of which the text ones are used.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
}

/// Most alternatives per token a request may ask for.
pub const MAX_LOGPROBS: i64 = 20;

impl Sampling {
    /// Checks the fields and builds the engine's parameters; `default_max`:
    /// max_tokens when the request gives none; `room`: tokens the context
    /// leaves after the prompt.
    pub fn to_params(
        &self,
        default_max: usize,
        room: usize,
        logprobs: Option<i64>,
    ) -> Result<RequestParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad("n", "only n = 1 is supported"));
            }
        }
        let (field, max) = match (self.max_tokens, self.max_completion_tokens) {
            (Some(m), _) => ("max_tokens", Some(m)),
            (None, Some(m)) => ("max_completion_tokens", Some(m)),
            (None, None) => ("max_tokens", None),
        };
        let max_tokens = match max {
            None => default_max.min(room).max(1),
            Some(m) if m < 1 => {
                return Err(ApiError::bad(field, format!("{field} must be at least 1, got {m}")))
            }
            Some(m) if m as u64 > room as u64 => {
                return Err(ApiError::bad(
                    field,
                    format!(
                        "{field} = {m} exceeds the {room} tokens the model's context leaves after the prompt"
                    ),
                ))
            }
            Some(m) => m as usize,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature must be ≥ 0, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k < -1 => {
                return Err(ApiError::bad(
                    "top_k",
                    format!("top_k must be -1 (off) or ≥ 1, got {k}"),
                ))
            }
            Some(k) => Some(k as usize),
        };
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad(
                "min_p",
                format!("min_p must be in [0, 1], got {min_p}"),
            ));
        }
        let penalty = |name: &str, v: Option<f32>| -> Result<f32, ApiError> {
            let v = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad(
                    name,
                    format!("{name} must be in [-2, 2], got {v}"),
                ));
            }
            Ok(v)
        };
        let presence_penalty = penalty("presence_penalty", self.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", self.frequency_penalty)?;
        let repeat_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
            return Err(ApiError::bad(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {repeat_penalty}"),
            ));
        }
        let logprobs = match logprobs {
            None => None,
            Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => {
                return Err(ApiError::bad(
                    "logprobs",
                    format!("logprobs must be in [0, {MAX_LOGPROBS}], got {n}"),
                ))
            }
            Some(n) => Some(n as usize),
        };
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad("stop", "stop strings must not be empty"));
        }
        Ok(RequestParams {
            sampling: SamplingParams {
                temperature,
                top_p: (top_p < 1.0).then_some(top_p),
                top_k,
                min_p,
                repeat_penalty,
                // over prompt and output, as vLLM
                repeat_last_n: usize::MAX,
                presence_penalty,
                frequency_penalty,
                seed: self.seed.map_or_else(random_seed, |s| s as u64),
            },
            max_tokens,
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
            return_first_logits: false,
        })
    }
}

/// A seed for a request that gave none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is keyed from the OS's randomness
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Completions' `logprobs` object for some tokens.
pub fn completion_logprobs(lps: &[TokenLogprob], text_of: &dyn Fn(u32) -> String) -> Value {
    json!({
        "tokens": lps.iter().map(|l| text_of(l.token)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, p)| (text_of(*t), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": Vec::<usize>::new(),
    })
}

/// Chat's `logprobs` object for some tokens.
pub fn chat_logprobs(lps: &[TokenLogprob], text_of: &dyn Fn(u32) -> String) -> Value {
    json!({"content": lps.iter().map(|l| json!({
        "token": text_of(l.token),
        "logprob": l.logprob,
        "bytes": text_of(l.token).into_bytes(),
        "top_logprobs": l.top.iter().map(|(t, p)| json!({
            "token": text_of(*t), "logprob": p, "bytes": text_of(*t).into_bytes(),
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}
