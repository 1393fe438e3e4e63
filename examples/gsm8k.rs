//! GSM8K accuracy of a Qwen-MoE checkpoint, the way vLLM's CI measures it.
//!
//!     cargo run --release --example gsm8k -- --model DIR|HUB_ID [--data-dir DIR] [--limit N]
//!         [--num-fewshot 5] [--batch-size 8] [--max-new-tokens 256] [--dtype f32|bf16]
//!         [--expert-dtype f32|bf16]
//!         [--device cpu|cuda[:N]] [--out results.json]
//!
//! Without `--data-dir`, openai/grade-school-math's test/train files are
//! downloaded once into `~/.cache/candle-moe/gsm8k`.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use candle_moe_models::gsm8k::{evaluate, load_jsonl, EvalOptions, TextCodec};
use candle_moe_models::{Checkpoint, LoadOptions, ModelError, QwenMoeForCausalLM};
use std::io::Write;
use std::path::{Path, PathBuf};

mod common;
use common::{device, expert_dtype, parse_dtype, quant_scheme, resolve};

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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opt = std::collections::HashMap::new();
    let mut i = 0;
    while i < args.len() {
        let k = args[i].as_str();
        if !k.starts_with("--") {
            bail!("unexpected argument {k}");
        }
        let v = args
            .get(i + 1)
            .ok_or_else(|| anyhow!("{k} needs a value"))?;
        opt.insert(k.to_string(), v.clone());
        i += 2;
    }
    let known = [
        "--model",
        "--revision",
        "--data-dir",
        "--limit",
        "--num-fewshot",
        "--batch-size",
        "--max-new-tokens",
        "--quant",
        "--dtype",
        "--expert-dtype",
        "--device",
        "--out",
    ];
    if let Some(k) = opt.keys().find(|k| !known.contains(&k.as_str())) {
        bail!("unknown option {k} (known: {})", known.join(" "));
    }
    let get = |k: &str| opt.get(k).map(String::as_str);
    let num = |k: &str, d: usize| -> Result<usize> {
        get(k).map_or(Ok(d), |v| v.parse().with_context(|| k.to_string()))
    };
    let quant = quant_scheme(get("--quant"))?;
    let model = get("--model").ok_or_else(|| anyhow!("--model is required"))?;
    let dir = resolve(model, get("--revision").unwrap_or("main"))?;
    let dev = device(get("--device").unwrap_or("cpu"))?;
    let dtype = match get("--dtype") {
        None => {
            if dev.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            }
        }
        Some(d) => parse_dtype(d)?,
    };
    let data = data_dir(get("--data-dir"))?;
    let train = load_jsonl(&data.join("train.jsonl"))?;
    let mut test = load_jsonl(&data.join("test.jsonl"))?;
    if let Some(l) = get("--limit") {
        test.truncate(l.parse().context("--limit")?);
    }
    let ck = Checkpoint::open(&dir)?;
    let tok_path = dir.join("tokenizer.json");
    let codec = Codec(
        tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?,
    );
    let edt = expert_dtype(get("--expert-dtype"), ck.config.stored_dtype(), dtype)?;
    let opts = LoadOptions {
        expert_dtype: edt,
        quant,
        ..Default::default()
    };
    let m = QwenMoeForCausalLM::new_with_options(&ck.config, ck.var_builder(dtype, &dev)?, &opts)?;
    let opts = EvalOptions {
        num_fewshot: num("--num-fewshot", 5)?,
        batch_size: num("--batch-size", 8)?,
        max_new_tokens: num("--max-new-tokens", 256)?,
        eos: ck.eos_token_ids.clone(),
        model_name: model.to_string(),
    };
    let report = evaluate(&m, &codec, &train, &test, &opts, &mut |done, total| {
        let w = 30;
        let f = done * w / total.max(1);
        eprint!("\r[{}{}] {done}/{total}", "#".repeat(f), " ".repeat(w - f));
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();
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
    if let Some(out) = get("--out") {
        std::fs::write(Path::new(out), serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {out}");
    }
    Ok(())
}
