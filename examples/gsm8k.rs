//! GSM8K accuracy of a Qwen-MoE checkpoint, the way vLLM's CI measures it.
//!
//!     cargo run --release --example gsm8k -- --model DIR|HUB_ID [--data-dir DIR] [--limit N]
//!         [--num-fewshot 5] [--batch-size 8] [--max-new-tokens 256] [--dtype f32|bf16]
//!         [--quant fp8|mxfp4] [--quant-dense fp8|mxfp4] [--device cpu|cuda[:N]]
//!         [--out results.json]      (--help lists every option)
//!
//! Without `--data-dir`, openai/grade-school-math's test/train files are
//! downloaded once into `~/.cache/candle-moe/gsm8k`.

use anyhow::{anyhow, Context, Result};
use candle_moe_models::gsm8k::{evaluate, load_jsonl, EvalOptions};
use candle_moe_models::TextCodec;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;
use clap::Parser;
use common::load::ModelArgs;

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-qwen2-moe");

const DATA_URL: &str =
    "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data";

fn data_dir(arg: Option<&str>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| anyhow!("no --data-dir and no HOME for a cache"))?;
    let dir = base.join("candle-moe/gsm8k");
    std::fs::create_dir_all(&dir)?;
    for f in ["test.jsonl", "train.jsonl"] {
        let p = dir.join(f);
        if !p.exists() {
            eprintln!("downloading {f} into {}", dir.display());
            let body = ureq::get(&format!("{DATA_URL}/{f}"))
                .call()
                .with_context(|| format!("downloading {f} (use --data-dir to work offline)"))?
                .into_string()?;
            let tmp = dir.join(format!("{f}.part"));
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &p)?;
        }
    }
    Ok(dir)
}

/// GSM8K accuracy of a Qwen-MoE checkpoint, the way vLLM's CI measures it.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory with test.jsonl / train.jsonl (default: downloaded once).
    #[arg(long)]
    data_dir: Option<String>,
    /// Evaluate the first N test questions.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 5)]
    num_fewshot: usize,
    /// Questions running at once (continuous batching).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Bit-identical answers whatever runs beside them (as `server --batch-invariant`).
    #[arg(long)]
    batch_invariant: bool,
    /// Write every question's result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Weights on transparent huge pages: decode streams them ~20 % faster here
/// (candle_moe::huge_pages).
#[global_allocator]
static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;

fn main() -> Result<()> {
    let args = Args::parse();
    let data = data_dir(args.data_dir.as_deref())?;
    let train = load_jsonl(&data.join("train.jsonl"))?;
    let mut test = load_jsonl(&data.join("test.jsonl"))?;
    if let Some(l) = args.limit {
        test.truncate(l);
    }
    let o = args.model.open(Path::new(BUNDLED))?;
    let codec: Arc<dyn TextCodec> = o
        .tokenizer
        .clone()
        .ok_or_else(|| anyhow!("{} has no tokenizer.json", o.dir.display()))?;
    let opts = EvalOptions {
        num_fewshot: args.num_fewshot,
        batch_size: args.batch_size as usize,
        max_new_tokens: args.max_new_tokens,
        eos: o.ck.eos_token_ids.clone(),
        model_name: o.dir.display().to_string(),
        batch_invariant: args.batch_invariant,
    };
    // each running question: a few-shot prompt (~1k tokens at 5 shots) + its answer
    let kv_tokens = args.batch_size as usize * (256 * (args.num_fewshot + 1) + args.max_new_tokens);
    let report = args.model.run(&o, kv_tokens, |m, followers| {
        let bar = indicatif::ProgressBar::new(test.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} questions, eta {eta}",
            )?
            .progress_chars("#>-"),
        );
        let r = evaluate(
            &m,
            codec,
            &train,
            &test,
            &opts,
            followers,
            &mut |done, _| bar.set_position(done as u64),
        )?;
        bar.finish();
        Ok(r)
    })?;
    println!(
        "accuracy {:.4} ± {:.4}  invalid {:.4}  questions {}  wall {:.1}s  prompt {:.1} tok/s  generated {:.1} tok/s",
        report.accuracy,
        report.stderr,
        report.invalid_rate,
        report.num_questions,
        report.latency_s,
        report.prompt_tokens_per_s,
        report.generated_tokens_per_s
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
