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
use candle_core::DType;
use candle_moe_models::gsm8k::{evaluate, load_jsonl, EvalOptions, TextCodec};
use candle_moe_models::{Checkpoint, LoadOptions, ModelError, QwenMoeForCausalLM};
use std::path::PathBuf;

mod common;
use clap::Parser;
use common::{compute_dtype, device, expert_dtype, parse_dtype, quant_scheme, resolve};

const DATA_URL: &str =
    "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data";

struct Codec(tokenizers::Tokenizer);

impl TextCodec for Codec {
    fn encode(&self, text: &str) -> candle_moe_models::Result<Vec<u32>> {
        self.0
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Config(format!("tokenizer: {e}")))
    }
    fn decode(&self, ids: &[u32]) -> candle_moe_models::Result<String> {
        self.0
            .decode(ids, true)
            .map_err(|e| ModelError::Config(format!("tokenizer: {e}")))
    }
}

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
    /// Local checkpoint directory or hub id.
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "main")]
    revision: String,
    /// Directory with test.jsonl / train.jsonl (default: downloaded once).
    #[arg(long)]
    data_dir: Option<String>,
    /// Evaluate the first N test questions.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 5)]
    num_fewshot: usize,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Quantize a float checkpoint's experts while loading (fp8|mxfp4).
    #[arg(long)]
    quant: Option<String>,
    /// Quantize every other linear but the embeddings and router too (fp8|mxfp4).
    #[arg(long)]
    quant_dense: Option<String>,
    /// Compute dtype (default: bf16 for a bf16 checkpoint or on cuda, else f32).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Experts' dtype (default: the checkpoint's bf16/f16 under f32 compute).
    #[arg(long)]
    expert_dtype: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write every question's result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let quant = quant_scheme(args.quant.as_deref())?;
    let quant_dense = quant_scheme(args.quant_dense.as_deref())?;
    let model = args.model.as_str();
    let dir = resolve(model, &args.revision)?;
    let dev = device(&args.device)?;
    let data = data_dir(args.data_dir.as_deref())?;
    let train = load_jsonl(&data.join("train.jsonl"))?;
    let mut test = load_jsonl(&data.join("test.jsonl"))?;
    if let Some(l) = args.limit {
        test.truncate(l);
    }
    let ck = Checkpoint::open(&dir)?;
    let dtype = compute_dtype(args.dtype, ck.config.stored_dtype(), &dev);
    let tok_path = dir.join("tokenizer.json");
    let codec = Codec(
        tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?,
    );
    let edt = expert_dtype(
        args.expert_dtype.as_deref(),
        ck.config.stored_dtype(),
        dtype,
    )?;
    let opts = LoadOptions {
        expert_dtype: edt,
        quant,
        quant_dense,
        ..Default::default()
    };
    let m = QwenMoeForCausalLM::new_with_options(&ck.config, ck.var_builder(dtype, &dev)?, &opts)?;
    let opts = EvalOptions {
        num_fewshot: args.num_fewshot,
        batch_size: args.batch_size as usize,
        max_new_tokens: args.max_new_tokens,
        eos: ck.eos_token_ids.clone(),
        model_name: model.to_string(),
    };
    let bar = indicatif::ProgressBar::new(test.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} questions, eta {eta}",
        )?
        .progress_chars("#>-"),
    );
    let report = evaluate(&m, &codec, &train, &test, &opts, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish();
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
