//! The HTTP routes: `/v1/completions` and `/v1/chat/completions` (both
//! with server-sent-event streaming), `/v1/models`, `/health`, `/metrics`,
//! and the API-key check on `/v1/*`.

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::protocol::{
    chat_logprobs, completion_logprobs, parse_body, ApiError, ChatRequest, CompletionRequest,
    Content, Prompt, Sampling, Usage,
};
use crate::worker::{EngineHandle, Event};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_moe_models::{FinishReason, RequestOutput, RequestParams, TextCodec};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Option<Arc<dyn TextCodec>>,
    pub template: ChatTemplate,
    pub model_name: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub api_key: Option<String>,
    pub created: u64,
}

type Shared = Arc<AppState>;

/// The router, with bodies limited to `max_body_bytes` (413 above).
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let state = Arc::new(state);
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// `Authorization: Bearer <key>` when the server has a key.
async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key")
                .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": s.created,
        "owned_by": "candle-moe", "root": s.model_name, "parent": null,
        "max_model_len": s.max_model_len,
    }]}))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let m = s.engine.metrics();
    let st = &m.stats;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP candle_moe:{name} {help}\n# TYPE candle_moe:{name} {kind}\ncandle_moe:{name}{{model_name=\"{}\"}} {v}\n",
            s.model_name.replace('"', "'")
        ));
    };
    put(
        "num_requests_running",
        "gauge",
        "Requests running.",
        st.running as f64,
    );
    put(
        "num_requests_waiting",
        "gauge",
        "Requests waiting.",
        st.waiting as f64,
    );
    put(
        "kv_cache_blocks_used",
        "gauge",
        "KV-cache blocks in use.",
        st.kv_blocks_used as f64,
    );
    put(
        "kv_cache_blocks_total",
        "gauge",
        "KV-cache blocks.",
        st.kv_blocks_total as f64,
    );
    let usage = st.kv_blocks_used as f64 / st.kv_blocks_total.max(1) as f64;
    put(
        "kv_cache_usage_perc",
        "gauge",
        "KV-cache usage (0-1).",
        usage,
    );
    put(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens computed.",
        st.prompt_tokens as f64,
    );
    put(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens found in the prefix cache.",
        st.prompt_tokens_cached as f64,
    );
    put(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        st.generation_tokens as f64,
    );
    put(
        "num_preemptions_total",
        "counter",
        "Sequences preempted.",
        st.preemptions as f64,
    );
    put(
        "prompt_tokens_per_second",
        "gauge",
        "Prompt tokens per second, last 10 s.",
        m.prompt_tokens_per_s,
    );
    put(
        "generation_tokens_per_second",
        "gauge",
        "Generated tokens per second, last 10 s.",
        m.generation_tokens_per_s,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

impl AppState {
    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != &self.model_name => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model `{m}` does not exist (this server serves `{}`).",
                    self.model_name
                ),
                param: Some("model".into()),
            }),
            _ => Ok(()),
        }
    }

    fn encode(&self, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
        let tk = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad(field, "this model has no tokenizer: send token ids"))?;
        tk.encode(text)
            .map_err(|e| ApiError::bad(field, format!("tokenizing: {e}")))
    }

    /// Checks a tokenized prompt and turns the request's fields into
    /// engine parameters.
    fn params(
        &self,
        ids: &[u32],
        field: &str,
        sampling: &Sampling,
        default_max: usize,
        logprobs: Option<i64>,
    ) -> Result<RequestParams, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::bad(field, format!("{field} is empty")));
        }
        if let Some(t) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(ApiError::bad(
                field,
                format!(
                    "token id {t} is outside the vocabulary ({})",
                    self.vocab_size
                ),
            ));
        }
        if ids.len() >= self.max_model_len {
            return Err(ApiError::bad(
                field,
                format!(
                    "This model's maximum context length is {} tokens; the prompt has {}",
                    self.max_model_len,
                    ids.len()
                ),
            ));
        }
        if sampling.stop.is_some() && self.tokenizer.is_none() {
            return Err(ApiError::bad("stop", "stop strings need a tokenizer"));
        }
        sampling.to_params(default_max, self.max_model_len - ids.len(), logprobs)
    }

    fn token_text(&self) -> impl Fn(u32) -> String + '_ {
        move |t| {
            self.tokenizer
                .as_ref()
                .and_then(|tk| tk.decode(&[t]).ok())
                .unwrap_or_default()
        }
    }
}

/// One request's final result (for non-streamed responses).
struct Finished {
    text: String,
    finish: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    logprobs: Vec<candle_moe_models::TokenLogprob>,
}

/// Waits for a request to end.
async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Finished, ApiError> {
    let mut f = Finished {
        text: String::new(),
        finish: FinishReason::Abort,
        prompt_tokens: 0,
        completion_tokens: 0,
        logprobs: vec![],
    };
    while let Some(ev) = rx.recv().await {
        let o = match ev {
            Event::Rejected(m) => return Err(ApiError::bad("prompt", m)),
            Event::Output(o) => o,
        };
        if let Some(e) = o.error {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e));
        }
        f.text.push_str(&o.text);
        f.logprobs.extend(o.logprobs);
        f.prompt_tokens = o.prompt_tokens;
        f.completion_tokens = o.completion_tokens;
        if let Some(r) = o.finish {
            f.finish = r;
            return Ok(f);
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine stopped",
    ))
}

fn stream_options(s: &Sampling) -> bool {
    s.stream_options.as_ref().is_some_and(|o| o.include_usage)
}

/// The body, or the reason it was refused (413 over the size limit).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError::new(r.status(), r.body_text()))
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let (req, sampling): (CompletionRequest, Sampling) = parse_body(&body)?;
    s.check_model(&sampling.model)?;
    if req.echo == Some(true) {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        Prompt::Text(t) => vec![s.encode(t, "prompt")?],
        Prompt::Texts(v) => v
            .iter()
            .map(|t| s.encode(t, "prompt"))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(v) => v.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad("prompt", "prompt is empty"));
    }
    let params = prompts
        .iter()
        .map(|p| s.params(p, "prompt", &sampling, 16, req.logprobs))
        .collect::<Result<Vec<_>, _>>()?;
    let id = format!("cmpl-{}", uuid_like());
    let rxs: Vec<_> = prompts
        .into_iter()
        .zip(params)
        .map(|(p, params)| s.engine.submit(p, params))
        .collect();
    let with_logprobs = req.logprobs.is_some();
    if sampling.stream {
        let usage = stream_options(&sampling);
        let st = s.clone();
        let chunk = move |i: usize, o: &RequestOutput| {
            let lp = with_logprobs.then(|| completion_logprobs(&o.logprobs, &st.token_text()));
            json!({"id": id, "object": "text_completion", "created": st.created, "model": st.model_name,
                   "choices": [{"index": i, "text": o.text, "logprobs": lp,
                                "finish_reason": o.finish.map(FinishReason::as_str), "stop_reason": null}]})
        };
        return Ok(sse(rxs, chunk, usage, s.clone(), None));
    }
    let mut choices = vec![];
    let (mut pt, mut ct) = (0, 0);
    for (i, rx) in rxs.into_iter().enumerate() {
        let f = collect(rx).await?;
        pt += f.prompt_tokens;
        ct += f.completion_tokens;
        let lp = with_logprobs.then(|| completion_logprobs(&f.logprobs, &s.token_text()));
        choices.push(json!({"index": i, "text": f.text, "logprobs": lp,
                            "finish_reason": f.finish.as_str(), "stop_reason": null}));
    }
    Ok(Json(
        json!({"id": id, "object": "text_completion", "created": now(), "model": s.model_name,
                   "choices": choices, "usage": Usage::new(pt, ct)}),
    )
    .into_response())
}

async fn chat(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let (req, sampling): (ChatRequest, Sampling) = parse_body(&body)?;
    s.check_model(&sampling.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages", "messages is empty"));
    }
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(p)) => p
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.clone())
                    .collect::<Vec<_>>()
                    .join(""),
            },
        })
        .collect();
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let text = s
        .template
        .render(
            &messages,
            req.add_generation_prompt.unwrap_or(true),
            &kwargs,
        )
        .map_err(|e| ApiError::bad("messages", format!("chat template: {e}")))?;
    let ids = s.encode(&text, "messages")?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), n) => Some(n.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        _ => None,
    };
    // chat's default: whatever the context leaves
    let params = s.params(&ids, "messages", &sampling, usize::MAX, logprobs)?;
    let id = format!("chatcmpl-{}", uuid_like());
    let id2 = id.clone();
    let rx = s.engine.submit(ids, params);
    if sampling.stream {
        let usage = stream_options(&sampling);
        let st = s.clone();
        let with_lp = logprobs.is_some();
        let chunk = move |_: usize, o: &RequestOutput| {
            let lp = with_lp.then(|| chat_logprobs(&o.logprobs, &st.token_text()));
            json!({"id": id, "object": "chat.completion.chunk", "created": st.created, "model": st.model_name,
                   "choices": [{"index": 0, "delta": {"content": o.text}, "logprobs": lp,
                                "finish_reason": o.finish.map(FinishReason::as_str)}]})
        };
        return Ok(sse(vec![rx], chunk, usage, s.clone(), Some(id2)));
    }
    let f = collect(rx).await?;
    let lp = logprobs.map(|_| chat_logprobs(&f.logprobs, &s.token_text()));
    Ok(Json(
        json!({"id": id, "object": "chat.completion", "created": now(), "model": s.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f.text},
                     "logprobs": lp, "finish_reason": f.finish.as_str()}],
        "usage": Usage::new(f.prompt_tokens, f.completion_tokens)}),
    )
    .into_response())
}

/// Server-sent events from several requests' receivers: one chunk per
/// output (for chat, `chat_id`, first a chunk with the role), a usage chunk
/// when asked, then `[DONE]`. An error ends the stream with an error event.
fn sse(
    rxs: Vec<UnboundedReceiver<Event>>,
    chunk: impl Fn(usize, &RequestOutput) -> Value + Send + Sync + 'static,
    include_usage: bool,
    s: Shared,
    chat_id: Option<String>,
) -> Response {
    let is_chat = chat_id.is_some();
    let object = if is_chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chat_id = chat_id.unwrap_or_default();
    let merged = stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| (i, e))
    }));
    let usage = Arc::new(std::sync::Mutex::new((0usize, 0usize)));
    let u2 = usage.clone();
    let first_role = Arc::new(std::sync::atomic::AtomicBool::new(is_chat));
    let body = merged.map(move |(i, ev)| -> Vec<Value> {
        match ev {
            Event::Rejected(m) => vec![ApiError::bad("prompt", m).body()],
            Event::Output(o) => {
                if let Some(e) = &o.error {
                    return vec![ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone()).body()];
                }
                let mut out = vec![];
                if first_role.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    out.push(json!({"id": chat_id, "object": object, "created": s.created, "model": s.model_name,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": null, "finish_reason": null}]}));
                }
                if o.finish.is_some() {
                    if let Ok(mut u) = u2.lock() {
                        u.0 += o.prompt_tokens;
                        u.1 += o.completion_tokens;
                    }
                }
                out.push(chunk(i, &o));
                out
            }
        }
    });
    let tail = stream::once(async move {
        let mut v = vec![];
        if include_usage {
            let (p, c) = usage.lock().map(|u| *u).unwrap_or_default();
            v.push(SseEvent::default().data(
                json!({"object": object, "choices": [], "usage": Usage::new(p, c)}).to_string(),
            ));
        }
        v.push(SseEvent::default().data("[DONE]"));
        v
    });
    let events = body
        .map(|vals| {
            vals.into_iter()
                .map(|v| SseEvent::default().data(v.to_string()))
                .collect::<Vec<_>>()
        })
        .chain(tail)
        .flat_map(|v| stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    sse_response(events)
}

fn sse_response(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events).into_response()
}

/// A request id: time and a process-wide counter.
fn uuid_like() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{:06x}", now(), n)
}
