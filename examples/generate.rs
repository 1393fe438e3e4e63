//! Text generation with a Qwen-MoE checkpoint (every MoE layer a FusedMoe),
//! on the engine the server uses.
//!
//!     cargo run --release --example generate                       # bundled tiny model
//!     cargo run --release --example generate -- --model Qwen/Qwen1.5-MoE-A2.7B-Chat \
//!         --chat --prompt "Why is the sky blue?" --dtype bf16
//!
//! `--model` is a local directory or a hub id (downloaded once through hf-hub,
//! `--revision` to pin). Machine mode: `--prompt-ids 1,2,3` needs no tokenizer,
//! and `--json` prints as the last stdout line
//! `{"prompt_ids": [...], "generated_ids": [...], "prompt_last_logits": [...]}`.

use anyhow::{anyhow, bail, Result};
use candle_moe_models::{
    Engine, EngineConfig, HfTokenizer, QwenMoeForCausalLM, RequestParams, SamplingParams, TextCodec,
};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

mod common;
use clap::Parser;
use common::load::ModelArgs;
use common::{non_negative, positive_f32, unit_interval};

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-qwen2-moe");

/// Text generation with a Qwen-MoE checkpoint (every MoE layer a FusedMoe).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (default: "The capital of France is").
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as token ids (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the ChatML user/assistant template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_new_tokens: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    temperature: f64,
    /// Nucleus sampling, in (0, 1].
    #[arg(long, value_parser = unit_interval)]
    top_p: Option<f64>,
    /// Sample among the k most likely tokens (k ≥ 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: Option<u64>,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// 1 = off; > 1 discourages tokens of the last 64.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f32)]
    repeat_penalty: f32,
    /// Print `{"prompt_ids", "generated_ids", "prompt_last_logits"}` as the last line.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn params(&self) -> RequestParams {
        RequestParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k.map(|k| k as usize),
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..Default::default()
            },
            max_tokens: self.max_new_tokens as usize,
            return_first_logits: self.json,
            ..Default::default()
        }
    }
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let o = args.model.open(Path::new(BUNDLED))?;
    let prompt_ids = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, p) => {
            let text = p
                .clone()
                .unwrap_or_else(|| "The capital of France is".into());
            let text = if args.chat {
                format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
            } else {
                text
            };
            let tk = o.tokenizer.as_ref().ok_or_else(|| {
                anyhow!(
                    "{} has no tokenizer.json: pass --prompt-ids",
                    o.dir.display()
                )
            })?;
            tk.encode(&text)?
        }
    };
    if prompt_ids.is_empty() {
        bail!("empty prompt");
    }
    if let Some(&bad) = prompt_ids
        .iter()
        .find(|&&t| t as usize >= o.ck.config.vocab_size)
    {
        bail!(
            "prompt id {bad} is outside the vocabulary ({})",
            o.ck.config.vocab_size
        );
    }
    let tokenizer = o.tokenizer.clone();
    let kv_tokens = prompt_ids.len() + args.max_new_tokens as usize;
    args.model.run(&o, kv_tokens, |model, followers| {
        run(&args, &model, tokenizer, &prompt_ids, followers)
    })
}

/// Generates on rank 0 (or the only rank), streaming and reporting.
fn run(
    args: &Args,
    model: &QwenMoeForCausalLM,
    tokenizer: Option<Arc<HfTokenizer>>,
    prompt_ids: &[u32],
    followers: Vec<std::sync::mpsc::Sender<Arc<candle_moe_models::engine::StepPlan>>>,
) -> Result<()> {
    let stream = !args.json && tokenizer.is_some();
    let codec = tokenizer.map(|t| t as Arc<dyn TextCodec>);
    let max_len = prompt_ids.len() + args.max_new_tokens as usize;
    let cfg = EngineConfig::for_batch(model, 1, max_len);
    let mut engine = Engine::new(model, codec, cfg)?.with_followers(followers);
    engine.add_request(0, prompt_ids.to_vec(), args.params())?;
    let t0 = std::time::Instant::now();
    let (mut generated, mut first_logits, mut prompt_s) = (Vec::<u32>::new(), vec![], 0.0);
    while engine.has_work() {
        for out in engine.step()? {
            if let Some(e) = out.error {
                bail!("generation failed: {e}");
            }
            if generated.is_empty() {
                prompt_s = t0.elapsed().as_secs_f64();
            }
            generated.extend(&out.tokens);
            if let Some(l) = out.first_logits {
                first_logits = l;
            }
            if stream {
                print!("{}", out.text);
                let _ = std::io::stdout().flush();
            }
        }
    }
    let gen_s = t0.elapsed().as_secs_f64() - prompt_s;
    if stream {
        println!();
    }
    let n = generated.len();
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generation: {n} tokens, {:.1} tokens/s",
        prompt_ids.len(),
        prompt_ids.len() as f64 / prompt_s.max(1e-9),
        n.saturating_sub(1) as f64 / gen_s.max(1e-9),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_ids": prompt_ids,
                "generated_ids": generated,
                "prompt_last_logits": first_logits,
            })
        );
    } else if !stream {
        println!("{generated:?}");
    }
    Ok(())
}
