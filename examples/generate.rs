//! Text generation with a Qwen-MoE checkpoint (every MoE layer a FusedMoe).
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
use candle_core::DType;
use candle_moe::dist::{Communicator, ThreadComm, ThreadWorld};
use candle_moe::{EpConfig, ExpertMapManager, PlacementStrategy};
use candle_moe_models::{
    generate, Checkpoint, LoadOptions, QwenMoeForCausalLM, Sampler, SamplingParams,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

mod common;
use clap::Parser;
use common::{
    compute_dtype, device, expert_dtype, non_negative, parse_dtype, positive_f32, quant_scheme,
    resolve, unit_interval,
};

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-qwen2-moe");
/// Text generation with a Qwen-MoE checkpoint (every MoE layer a FusedMoe).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Local checkpoint directory or hub id (default: the bundled tiny model).
    #[arg(long)]
    model: Option<String>,
    /// Hub revision to download.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Prompt text (default: "The capital of France is").
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as token ids (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the ChatML user/assistant template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
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
    /// Compute dtype (f32|bf16|f16; default: bf16 for a bf16 checkpoint or on cuda, else f32).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Experts' dtype (default: the checkpoint's bf16/f16 under f32 compute).
    #[arg(long)]
    expert_dtype: Option<String>,
    /// Quantize a float checkpoint's experts while loading (fp8|mxfp4).
    #[arg(long)]
    quant: Option<String>,
    /// Quantize every other linear but the embeddings and router too (fp8|mxfp4).
    #[arg(long)]
    quant_dense: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Expert-parallel ranks (threads on cpu, GPUs over NCCL on cuda).
    #[arg(long, default_value_t = 1)]
    ep_size: usize,
    #[arg(long, default_value = "linear")]
    ep_placement: PlacementStrategy,
    /// Print `{"prompt_ids", "generated_ids", "prompt_last_logits"}` as the last line.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k.map(|k| k as usize),
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = match &args.model {
        Some(m) => resolve(m, &args.revision)?,
        None => PathBuf::from(BUNDLED),
    };
    let dev = device(&args.device)?;
    let ck = Checkpoint::open(&dir)?;
    let dtype = compute_dtype(args.dtype, ck.config.stored_dtype(), &dev);
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path)
                .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?,
        )
    } else {
        None
    };
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
            let tk = tokenizer.as_ref().ok_or_else(|| {
                anyhow!("{} has no tokenizer.json: pass --prompt-ids", dir.display())
            })?;
            tk.encode(text, false)
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .get_ids()
                .to_vec()
        }
    };
    if prompt_ids.is_empty() {
        bail!("empty prompt");
    }
    if let Some(&bad) = prompt_ids
        .iter()
        .find(|&&t| t as usize >= ck.config.vocab_size)
    {
        bail!(
            "prompt id {bad} is outside the vocabulary ({})",
            ck.config.vocab_size
        );
    }

    let edt = expert_dtype(
        args.expert_dtype.as_deref(),
        ck.config.stored_dtype(),
        dtype,
    )?;
    if args.ep_size > 1 && !dev.is_cpu() && !cfg!(feature = "nccl") {
        bail!("--ep-size > 1 on cuda needs NCCL: build with --features nccl (on the cpu, ranks are threads)");
    }
    // expert parallelism: ranks 1.. run on threads in lock step with rank 0,
    // which prints; each rank loads only its experts. On the cpu the ranks
    // talk through a ThreadWorld; on cuda each rank takes GPU `rank` and NCCL.
    let mut comms: Vec<Option<RankComm>> = if args.ep_size <= 1 {
        vec![None]
    } else if dev.is_cpu() {
        ThreadWorld::new(args.ep_size)
            .into_iter()
            .map(|c| Some(RankComm::Thread(c)))
            .collect()
    } else {
        nccl_ranks(args.ep_size)?
    };
    let quant = quant_scheme(args.quant.as_deref())?;
    let quant_dense = quant_scheme(args.quant_dense.as_deref())?;
    // `dev`: the device this rank runs on (each rank builds its own once)
    let load = |comm: Option<RankComm>, dev: &candle_core::Device| -> Result<QwenMoeForCausalLM> {
        let ep = match comm {
            None => None,
            Some(c) => {
                let comm = c.connect(dev)?;
                let cfg = EpConfig::new(args.ep_size, comm.rank(), args.ep_placement);
                Some((cfg, comm))
            }
        };
        let opts = LoadOptions {
            expert_dtype: edt,
            ep,
            quant: quant.clone(),
            quant_dense: quant_dense.clone(),
        };
        Ok(QwenMoeForCausalLM::new_with_options(
            &ck.config,
            ck.var_builder(dtype, dev)?,
            &opts,
        )?)
    };
    if args.ep_size > 1 {
        let cfg = EpConfig::new(args.ep_size, 0, args.ep_placement);
        let mgr = ExpertMapManager::new(
            ck.config.num_experts,
            ck.config.num_experts_per_tok,
            cfg,
            &dev,
        )?;
        if let Some(why) = mgr.fallback_reason() {
            eprintln!("note: {why}");
        }
    }
    let t = std::time::Instant::now();
    let rank0 = comms.remove(0);
    std::thread::scope(|s| -> Result<()> {
        let followers: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (load, prompt_ids, args, ck, dev) = (&load, &prompt_ids, &args, &ck, &dev);
                s.spawn(move || -> Result<()> {
                    let guard = comm.as_ref().and_then(RankComm::thread).cloned();
                    let rank = comm.as_ref().map_or(0, RankComm::rank);
                    let dev = &rank_device(dev, rank)?;
                    let r = (|| -> Result<()> {
                        let m = load(comm, dev)?;
                        let mut sampler = Sampler::new(args.sampling());
                        generate(
                            &m,
                            prompt_ids,
                            args.max_new_tokens,
                            &mut sampler,
                            &ck.eos_token_ids,
                            |_| true,
                        )?;
                        Ok(())
                    })();
                    if r.is_err() {
                        // wake the other ranks instead of leaving them at a barrier
                        guard.iter().for_each(ThreadComm::poison);
                    }
                    r
                })
            })
            .collect();
        let guard = rank0.as_ref().and_then(RankComm::thread).cloned();
        let poison_on_err = |r: Result<()>| {
            if r.is_err() {
                guard.iter().for_each(ThreadComm::poison);
            }
            r
        };
        poison_on_err((|| -> Result<()> {
            let model = load(rank0, &dev)?;
            let kernel = model
                .moe_blocks()
                .next()
                .map_or("none", |b| b.moe().kernel().experts().name());
            eprintln!(
                "loaded {} ({:?}, {dtype:?}, experts {:?} via {kernel}, {:.2} MB of experts on this rank, ep {} {}) in {:.2}s",
                dir.display(),
                ck.config.arch,
                edt.unwrap_or(dtype),
                model.expert_weight_bytes() as f64 / 1e6,
                args.ep_size,
                args.ep_placement,
                t.elapsed().as_secs_f64()
            );
            run(&args, &model, &ck, tokenizer.as_ref(), &prompt_ids)?;
            Ok(())
        })())?;
        for f in followers {
            f.join()
                .map_err(|_| anyhow!("an expert-parallel rank panicked"))??;
        }
        Ok(())
    })
}

/// One expert-parallel rank's link to the others.
enum RankComm {
    Thread(ThreadComm),
    #[cfg(feature = "nccl")]
    Nccl {
        rank: usize,
        world: usize,
        id: candle_moe::dist::NcclId,
    },
}

impl RankComm {
    fn rank(&self) -> usize {
        match self {
            Self::Thread(c) => c.rank(),
            #[cfg(feature = "nccl")]
            Self::Nccl { rank, .. } => *rank,
        }
    }
    fn thread(&self) -> Option<&ThreadComm> {
        match self {
            Self::Thread(c) => Some(c),
            #[cfg(feature = "nccl")]
            Self::Nccl { .. } => None,
        }
    }
    /// The communicator, on `dev` (this rank's GPU with NCCL: joining the
    /// group blocks until every rank has called it).
    #[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
    fn connect(self, dev: &candle_core::Device) -> Result<Arc<dyn Communicator>> {
        match self {
            Self::Thread(c) => Ok(Arc::new(c)),
            #[cfg(feature = "nccl")]
            Self::Nccl { rank, world, id } => Ok(Arc::new(candle_moe::dist::NcclComm::new(
                dev, rank, world, id,
            )?)),
        }
    }
}

#[cfg(feature = "nccl")]
fn nccl_ranks(n: usize) -> Result<Vec<Option<RankComm>>> {
    let id = candle_moe::dist::NcclComm::new_id()?;
    Ok((0..n)
        .map(|rank| Some(RankComm::Nccl { rank, world: n, id }))
        .collect())
}

#[cfg(not(feature = "nccl"))]
fn nccl_ranks(_: usize) -> Result<Vec<Option<RankComm>>> {
    bail!("multi-GPU expert parallelism needs --features nccl")
}

/// The device a follower rank runs on: GPU `rank` with NCCL, else `dev`.
fn rank_device(dev: &candle_core::Device, rank: usize) -> Result<candle_core::Device> {
    Ok(if dev.is_cpu() {
        dev.clone()
    } else {
        candle_core::Device::new_cuda(rank)?
    })
}

/// Generates on rank 0 (or the only rank), streaming and reporting.
fn run(
    args: &Args,
    model: &QwenMoeForCausalLM,
    ck: &Checkpoint,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompt_ids: &[u32],
) -> Result<()> {
    // stream: print the new suffix of the decoded text after each token
    let mut printed = String::new();
    let mut all: Vec<u32> = vec![];
    let stream = !args.json && tokenizer.is_some();
    let mut sampler = Sampler::new(args.sampling());
    let out = generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        &mut sampler,
        &ck.eos_token_ids,
        |tok| {
            if stream {
                all.push(tok);
                if let Some(Ok(text)) = tokenizer.map(|t| t.decode(&all, true)) {
                    if text.len() > printed.len() && text.is_char_boundary(printed.len()) {
                        print!("{}", &text[printed.len()..]);
                        let _ = std::io::stdout().flush();
                        printed = text;
                    }
                }
            }
            true
        },
    )?;
    if stream {
        // an EOS is not passed to the callback; flush whatever decoding still holds
        if let Some(Ok(text)) = tokenizer
            .as_ref()
            .map(|t| t.decode(&out.generated_ids, true))
        {
            if text.len() > printed.len() && text.is_char_boundary(printed.len()) {
                print!("{}", &text[printed.len()..]);
            }
        }
        println!();
    }
    let n = out.generated_ids.len();
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generation: {n} tokens, {:.1} tokens/s",
        prompt_ids.len(),
        prompt_ids.len() as f64 / out.prompt_seconds,
        n.saturating_sub(1) as f64 / out.generation_seconds.max(1e-9),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_ids": prompt_ids,
                "generated_ids": out.generated_ids,
                "prompt_last_logits": out.prompt_last_logits,
            })
        );
    } else if !stream {
        println!("{:?}", out.generated_ids);
    }
    Ok(())
}
