//! The server on an ephemeral port with the bundled tiny checkpoint:
//! completions and chat, streamed and not, against the engine in process;
//! stop strings split across tokens; max_tokens; concurrent requests; every
//! error case; a client that disconnects mid-stream; 200 connections at
//! once; API keys, body limits, graceful shutdown.

use candle_core::{DType, Device};
use candle_moe_models::{
    Checkpoint, Engine, EngineConfig, HfTokenizer, QwenMoeForCausalLM, RequestParams, TextCodec,
};
use candle_moe_server::{channel, router, serve, AppState, ChatTemplate, EngineHandle};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-qwen2-moe")
}

fn load() -> (Arc<QwenMoeForCausalLM>, Arc<HfTokenizer>) {
    let ck = Checkpoint::open(tiny()).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    let m = QwenMoeForCausalLM::new(&ck.config, vb).unwrap();
    let tk = HfTokenizer::from_file(&tiny().join("tokenizer.json")).unwrap();
    (Arc::new(m), Arc::new(tk))
}

#[derive(Clone, Default)]
struct Opts {
    api_key: Option<String>,
    max_body: Option<usize>,
    batch_invariant: bool,
}

struct Server {
    url: String,
    handle: EngineHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<std::thread::JoinHandle<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
}

fn start(o: Opts) -> Server {
    let (model, tk) = load();
    let codec: Arc<dyn TextCodec> = tk;
    let mut cfg = EngineConfig::for_model(model.as_ref(), 64 << 20);
    cfg.batch_invariant = o.batch_invariant;
    let (handle, worker) = channel();
    let state = AppState {
        engine: handle.clone(),
        tokenizer: Some(codec.clone()),
        template: ChatTemplate::chatml(),
        model_name: "tiny".into(),
        max_model_len: cfg.max_model_len,
        vocab_size: 151646,
        api_key: o.api_key,
        created: 0,
    };
    let m = model.clone();
    let engine = std::thread::spawn(move || {
        worker.run(m.as_ref(), Some(codec), cfg, vec![]).unwrap();
    });
    let app = router(state, o.max_body.unwrap_or(1 << 20));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let http = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            serve(l, app, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Server {
        url: format!("http://{addr}"),
        handle,
        stop: Some(stop),
        http: Some(http),
        engine: Some(engine),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        self.handle.shutdown();
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
    }
}

impl Server {
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.post_with(path, body, None)
    }
    fn post_with(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut r =
            ureq::post(&format!("{}{path}", self.url)).set("content-type", "application/json");
        if let Some(k) = key {
            r = r.set("authorization", &format!("Bearer {k}"));
        }
        let resp = match r.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        let code = resp.status();
        let text = resp.into_string().unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    /// The `data:` payloads of a streamed response, `[DONE]` included.
    fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let resp = ureq::post(&format!("{}{path}", self.url))
            .send_json(body)
            .unwrap();
        assert!(resp
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/event-stream"));
        BufReader::new(resp.into_reader())
            .lines()
            .map(|l| l.unwrap())
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("candle_moe:{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }
}

/// Greedy text of `prompt` from the engine in process.
fn in_process(prompt: &str, max_tokens: usize, stop: &[&str]) -> (String, usize) {
    let (m, tk) = load();
    let ids = tk.encode(prompt).unwrap();
    let mut e = Engine::new(
        m.as_ref(),
        Some(tk as Arc<dyn TextCodec>),
        EngineConfig::for_batch(m.as_ref(), 1, 4096),
    )
    .unwrap();
    let params = RequestParams {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    e.add_request(0, ids, params).unwrap();
    let outs = e.run_to_completion().unwrap();
    let text = outs.iter().map(|o| o.text.as_str()).collect();
    (text, outs.last().unwrap().completion_tokens)
}

const PROMPT: &str = "The capital of France is";

#[test]
fn completions_and_chat_streamed_or_not_equal_the_engine() {
    let s = start(Opts::default());
    let (want, n) = in_process(PROMPT, 12, &[]);
    assert_eq!(n, 12);
    let body = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "unknown_field": [1]});
    let (code, v) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 17);
    // the same as token ids, and a list of two prompts
    let (m, tk) = load();
    drop(m);
    let ids = tk.encode(PROMPT).unwrap();
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 12, "temperature": 0}).to_string(),
    );
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": [PROMPT, "Hello"], "max_tokens": 12, "temperature": 0}).to_string(),
    );
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][1]["index"], 1);
    // streamed: the deltas add up to the same text, then [DONE]
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/completions", body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    // chat: the ChatML prompt, streamed or not
    let chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let (want, _) = in_process(chatml, 8, &[]);
    let chat =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0});
    let (code, v) = s.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    let mut chat = chat.clone();
    chat["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", chat);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && chunks.iter().all(|c| c["id"] == id));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    // logprobs: one per token, each ≤ 0, with the alternatives asked for
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}).to_string(),
    );
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert!(lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64().unwrap() <= 0.0));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
}

#[test]
fn stop_strings_split_across_tokens_and_max_tokens() {
    let s = start(Opts::default());
    let (m, tk) = load();
    drop(m);
    let (free, _) = in_process(PROMPT, 16, &[]);
    // a stop string made of the end of one token and the start of the next
    let ids = tk.encode(&format!("{PROMPT}{free}")).unwrap();
    let prompt_len = tk.encode(PROMPT).unwrap().len();
    let gen = &ids[prompt_len..];
    let mut stop = None;
    let mut offset = 0;
    for w in gen.windows(2) {
        let (a, b) = (tk.decode(&w[..1]).unwrap(), tk.decode(&w[1..]).unwrap());
        offset += a.len();
        if let (Some(x), Some(y)) = (a.chars().last(), b.chars().next()) {
            if a.chars().count() >= 2 && !x.is_whitespace() && !y.is_whitespace() {
                stop = Some((format!("{x}{y}"), offset - x.len_utf8()));
                break;
            }
        }
    }
    let (stop, _) = stop.expect("no token boundary to split a stop string over");
    let cut = free.find(&stop).unwrap();
    let body = json!({"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": stop});
    let (_, v) = s.post("/v1/completions", &body.to_string());
    assert_eq!(
        v["choices"][0]["text"],
        &free[..cut],
        "stop {stop:?} in {free:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut body = body;
    body["stream"] = json!(true);
    let events = s.stream("/v1/completions", body);
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        text,
        free[..cut],
        "streamed text must hold back the stop string's start"
    );
    // max_tokens is what comes back
    for n in [1, 3, 7] {
        let (_, v) = s.post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0}).to_string(),
        );
        assert_eq!(v["usage"]["completion_tokens"], n);
    }
}

#[test]
fn concurrent_requests_of_different_lengths_get_their_own_answers() {
    let s = Arc::new(start(Opts {
        batch_invariant: true,
        ..Default::default()
    }));
    let prompts: Vec<(String, usize)> = (0..12)
        .map(|i| {
            (
                format!("{PROMPT} {}", "and then ".repeat(i)),
                3 + (i * 5) % 17,
            )
        })
        .collect();
    let want: Vec<(String, usize)> = prompts
        .iter()
        .map(|(p, n)| in_process(p, *n, &[]))
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|(p, n)| {
            let s = s.clone();
            std::thread::spawn(move || {
                let (code, v) = s.post(
                    "/v1/completions",
                    &json!({"prompt": p, "max_tokens": n, "temperature": 0}).to_string(),
                );
                assert_eq!(code, 200, "{v}");
                (
                    v["choices"][0]["text"].as_str().unwrap().to_string(),
                    v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
                )
            })
        })
        .collect();
    let got: Vec<(String, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, want);
}

#[test]
fn two_hundred_connections_at_once_are_answered() {
    let s = Arc::new(start(Opts::default()));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let body =
                    json!({"prompt": format!("{i} {PROMPT}"), "max_tokens": 2, "temperature": 0});
                s.post("/v1/completions", &body.to_string()).0
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
}

#[test]
fn every_error_case_is_a_json_error_naming_the_field() {
    let s = start(Opts {
        max_body: Some(16 << 10),
        ..Default::default()
    });
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "body"),
        ("/v1/completions", "[1, 2]".into(), 400, "body"),
        (
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -1}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 1_000_000_000}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "a"}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -0.5}).to_string(),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 0}).to_string(),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 1.5}).to_string(),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_k": -3}).to_string(),
            400,
            "top_k",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 2}).to_string(),
            400,
            "n",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 50}).to_string(),
            400,
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": [""]}).to_string(),
            400,
            "stop",
        ),
        (
            "/v1/completions",
            json!({"prompt": vec![5u32; 2100]}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 999_999_999]}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": ""}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "gpt-4"}).to_string(),
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 3}]}).to_string(),
            400,
            "messages[0].content",
        ),
        (
            "/v1/completions",
            format!("{{\"prompt\": \"{}\"}}", "x".repeat(20_000)),
            413,
            "",
        ),
    ];
    for (path, body, code, param) in cases {
        let (got, v) = s.post(path, &body);
        assert_eq!(got, code, "{body:.80}: {v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        if code == 413 {
            continue;
        }
        assert_eq!(v["error"]["param"], param, "{body:.80}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // the server is still up
    let (code, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1}).to_string(),
    );
    assert_eq!(code, 200);
}

#[test]
fn api_key_guards_v1_only() {
    let s = start(Opts {
        api_key: Some("sekret".into()),
        ..Default::default()
    });
    let body = json!({"prompt": "x", "max_tokens": 1}).to_string();
    assert_eq!(s.post("/v1/completions", &body).0, 401);
    assert_eq!(s.post_with("/v1/completions", &body, Some("wrong")).0, 401);
    assert_eq!(s.post_with("/v1/completions", &body, Some("sekret")).0, 200);
    let models = ureq::get(&format!("{}/v1/models", s.url)).call();
    assert!(matches!(models, Err(ureq::Error::Status(401, _))));
    assert_eq!(
        ureq::get(&format!("{}/health", s.url))
            .call()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let s = start(Opts::default());
    let addr = s.url.trim_start_matches("http://").to_string();
    let body = json!({"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": true, "ignore_eos": true}).to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    // streaming: the sequence holds blocks
    let t = Instant::now();
    while s.metric("num_requests_running") < 1.0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(c);
    let t = Instant::now();
    while s.metric("num_requests_running") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the sequence was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("kv_cache_blocks_used"), 0.0);
    let generated = s.metric("generation_tokens_total");
    assert!(generated < 2000.0, "it ran to the end: {generated} tokens");
}

#[test]
fn shutdown_drains_running_requests() {
    let mut s = start(Opts::default());
    let url = s.url.clone();
    let client = std::thread::spawn(move || {
        let body =
            json!({"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": true});
        let v: Value = ureq::post(&format!("{url}/v1/completions"))
            .send_json(body)
            .unwrap()
            .into_json()
            .unwrap();
        v["usage"]["completion_tokens"].as_u64()
    });
    let t = Instant::now();
    while s.metric("num_requests_running") < 1.0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(stop) = s.stop.take() {
        stop.send(()).unwrap();
    }
    assert_eq!(
        client.join().unwrap(),
        Some(300),
        "the running request finished"
    );
}
