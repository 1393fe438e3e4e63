//! Serving throughput: the server in process on an ephemeral port, N
//! clients each streaming one completion at once, for N in `--concurrency`;
//! prints a JSON row per N: aggregate generated tokens/s, its ratio to one
//! request's in the same run, and time to first token.
//!
//!     cargo run --release -p candle-moe-server --example bench_serve -- \
//!         --model /tmp/candle-moe-bench-qwen15-4l --concurrency 1,8,32,64 [--dtype bf16]

use anyhow::{anyhow, Result};
use candle_core::Device;
use candle_moe_models::{CausalLm, Checkpoint, EngineConfig, LoadOptions, QwenMoeForCausalLM};
use candle_moe_server::{channel, router, serve, AppState, ChatTemplate};
use clap::Parser;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Checkpoint directory (no tokenizer needed: prompts are token ids).
    #[arg(long)]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 64)]
    gen: usize,
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    #[arg(long)]
    batch_invariant: bool,
    /// Quantize the experts while loading (fp8|mxfp4).
    #[arg(long)]
    quant: Option<String>,
    /// Compute dtype (f32|bf16).
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

struct Run {
    ttft: f64,
    tokens: usize,
}

/// One streamed completion; time to its first chunk and its token count.
fn one(url: &str, prompt: Vec<u32>, gen: usize) -> Result<Run> {
    let t = Instant::now();
    let body = json!({"prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let resp = ureq::post(&format!("{url}/v1/completions")).send_json(body)?;
    let mut ttft = None;
    let mut tokens = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if ttft.is_none() && v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
            ttft = Some(t.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Ok(Run {
        ttft: ttft.ok_or_else(|| anyhow!("no tokens streamed"))?,
        tokens,
    })
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let ck = Checkpoint::open(&args.model)?;
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        d => anyhow::bail!("--dtype {d}: expected f32 or bf16"),
    };
    let opts = LoadOptions {
        quant: args
            .quant
            .as_deref()
            .map(candle_moe::quant::QuantScheme::on_load)
            .transpose()?,
        ..Default::default()
    };
    let model = QwenMoeForCausalLM::new_with_options(
        &ck.config,
        ck.var_builder(dtype, &Device::Cpu)?,
        &opts,
    )?;
    let most = *args.concurrency.iter().max().unwrap_or(&1);
    let mut cfg = EngineConfig::for_batch(&model, most.max(1), args.prompt + args.gen);
    cfg.max_num_seqs = args.max_num_seqs;
    cfg.max_num_batched_tokens = args.max_num_batched_tokens;
    cfg.batch_invariant = args.batch_invariant;
    // distinct prompts: no prefix is shared
    cfg.prefix_caching = false;
    let vocab = model.info().vocab_size;
    let (handle, worker) = channel();
    let state = AppState {
        engine: handle.clone(),
        tokenizer: None,
        template: ChatTemplate::chatml(),
        model_name: "bench".into(),
        max_model_len: cfg.max_model_len,
        vocab_size: vocab,
        api_key: None,
        created: 0,
    };
    let app = router(state, 1 << 20);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<()> {
        let m = &model;
        s.spawn(move || worker.run(m, None, cfg, vec![]));
        s.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(l.local_addr()?)?;
                serve(l, app, async move {
                    let _ = stopped.await;
                })
                .await?;
                Ok(())
            })
        });
        let url = format!("http://{}", addr_rx.recv()?);
        let prompt = |r: usize| -> Vec<u32> {
            (0..args.prompt)
                .map(|j| ((r * 7919 + j * 104729) % (vocab - 1)) as u32 + 1)
                .collect()
        };
        // warm-up
        one(&url, prompt(999), 4)?;
        let mut base = None;
        for &c in &args.concurrency {
            let t = Instant::now();
            let runs: Vec<Result<Run>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..c)
                    .map(|r| {
                        let (url, p) = (&url, prompt(r));
                        s.spawn(move || one(url, p, args.gen))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().map_err(|_| anyhow!("client panicked"))?)
                    .collect()
            });
            let wall = t.elapsed().as_secs_f64();
            let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
            let tokens: usize = runs.iter().map(|r| r.tokens).sum();
            let tps = tokens as f64 / wall;
            let base_tps = *base.get_or_insert(tps);
            let mut ttft: Vec<f64> = runs.iter().map(|r| r.ttft).collect();
            ttft.sort_by(f64::total_cmp);
            println!(
                "{}",
                json!({
                    "concurrency": c, "prompt_tokens": args.prompt, "gen_tokens": args.gen,
                    "generated": tokens, "wall_s": wall, "gen_tokens_per_s": tps,
                    "ratio_vs_first": tps / base_tps,
                    "ttft_mean_s": ttft.iter().sum::<f64>() / ttft.len() as f64,
                    "ttft_p50_s": ttft[ttft.len() / 2], "ttft_max_s": ttft[ttft.len() - 1],
                    "batch_invariant": args.batch_invariant, "dtype": args.dtype,
                })
            );
        }
        let _ = stop.send(());
        handle.shutdown();
        Ok(())
    })
}
