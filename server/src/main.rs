//! `candle-moe-server`: an OpenAI-compatible server with continuous batching.
//!
//!     cargo run --release -p candle-moe-server -- --model DIR|HUB_ID [--port 8000]
//!
//! Without `--model` it serves the bundled tiny checkpoint.

use anyhow::{anyhow, Result};
use candle_moe_models::{CausalLm, EngineConfig, TextCodec};
use candle_moe_server::{channel, router, serve, shutdown_signal, AppState, ChatTemplate};
use clap::Parser;
use std::path::Path;
use std::sync::Arc;

#[path = "../../examples/common/mod.rs"]
mod common;
use common::load::ModelArgs;

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-qwen2-moe");

/// An OpenAI-compatible server with continuous batching.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients send (default: --model, or "tiny-qwen2-moe").
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "CANDLE_MOE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// KV-cache size in GB.
    #[arg(long, default_value_t = 1.0)]
    kv_cache_gb: f64,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_num_seqs: u64,
    /// Tokens per forward (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_num_batched_tokens: u64,
    /// Prompt plus output at most (default: the model's context).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Bit-identical outputs whatever else runs (one sequence per forward).
    #[arg(long)]
    batch_invariant: bool,
    /// Do not share KV blocks of common prompt prefixes.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Request bodies above this many bytes get 413.
    #[arg(long, default_value_t = candle_moe_server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let o = args.model.open(Path::new(BUNDLED))?;
    let template = ChatTemplate::load(&o.dir).map_err(|e| anyhow!(e))?;
    let name = args
        .served_model_name
        .clone()
        .or_else(|| args.model.model.clone())
        .unwrap_or_else(|| "tiny-qwen2-moe".into());
    let codec = o.tokenizer.clone().map(|t| t as Arc<dyn TextCodec>);
    if args.kv_cache_gb.is_nan() || args.kv_cache_gb <= 0.0 {
        anyhow::bail!("--kv-cache-gb must be positive");
    }
    let kv_tokens = o.kv_tokens_for_bytes((args.kv_cache_gb * 1e9) as usize);
    args.model.run(&o, kv_tokens, |model, followers| {
        let mut cfg = EngineConfig::for_model(&model, (args.kv_cache_gb * 1e9) as usize);
        cfg.max_num_seqs = args.max_num_seqs as usize;
        cfg.max_num_batched_tokens = args.max_num_batched_tokens as usize;
        if let Some(l) = args.max_model_len {
            cfg.max_model_len = l.min(cfg.max_model_len);
        }
        // no more blocks than every sequence at full length needs
        let most = cfg.max_num_seqs * cfg.max_model_len.div_ceil(cfg.block_size);
        cfg.num_blocks = cfg.num_blocks.min(most.max(1));
        cfg.batch_invariant = args.batch_invariant;
        cfg.prefix_caching = !args.no_prefix_caching;
        let (handle, worker) = channel();
        let state = AppState {
            engine: handle.clone(),
            tokenizer: codec.clone(),
            template,
            model_name: name,
            max_model_len: cfg.max_model_len,
            vocab_size: model.info().vocab_size,
            api_key: args.api_key.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        eprintln!(
            "kv cache: {} blocks of {} tokens; up to {} sequences, {} tokens per step{}",
            cfg.num_blocks,
            cfg.block_size,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            if cfg.batch_invariant {
                ", batch invariant"
            } else {
                ""
            }
        );
        let app = router(state, args.max_body_bytes);
        let addr = format!("{}:{}", args.host, args.port);
        std::thread::scope(|s| -> Result<()> {
            let engine = s.spawn(|| worker.run(&model, codec, cfg, followers));
            let served = (|| -> Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let listener = tokio::net::TcpListener::bind(&addr)
                        .await
                        .map_err(|e| anyhow!("binding {addr}: {e}"))?;
                    eprintln!("serving {} on http://{addr}", o.dir.display());
                    serve(listener, app, shutdown_signal()).await?;
                    eprintln!("stopping: no new requests; finishing the running ones");
                    Ok(())
                })
            })();
            handle.shutdown();
            engine
                .join()
                .map_err(|_| anyhow!("the engine thread panicked"))??;
            served
        })
    })
}
