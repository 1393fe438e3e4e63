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

use anyhow::{anyhow, bail, Context, Result};
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
use common::{device, expert_dtype, parse_dtype, quant_scheme, resolve};

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-qwen2-moe");
const HELP: &str =
    "options: --model DIR|HUB_ID [--revision REV] [--prompt TEXT | --prompt-ids 1,2,3] [--chat]
  [--max-new-tokens N (64)] [--temperature T (0 = greedy)] [--top-p P] [--top-k K] [--seed S]
  [--repeat-penalty R (1.0)] [--dtype f32|bf16|f16] [--expert-dtype f32|bf16|f16]
  [--device cpu|cuda[:N]] [--ep-size N] [--ep-placement linear|round_robin] [--json]
  [--quant fp8|mxfp4] (quantize a float checkpoint's experts while loading)
  --dtype defaults to f32 on cpu, bf16 on cuda; --expert-dtype to the checkpoint's bf16/f16
  when computing in f32 (exact, half the expert memory), else to --dtype";

struct Args {
    model: Option<String>,
    revision: String,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    chat: bool,
    max_new_tokens: usize,
    sampling: SamplingParams,
    dtype: Option<DType>,
    expert_dtype: Option<String>,
    quant: Option<String>,
    device: String,
    ep_size: usize,
    ep_placement: PlacementStrategy,
    json: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        model: None,
        revision: "main".into(),
        prompt: None,
        prompt_ids: None,
        chat: false,
        max_new_tokens: 64,
        sampling: SamplingParams::default(),
        dtype: None,
        expert_dtype: None,
        quant: None,
        device: "cpu".into(),
        ep_size: 1,
        ep_placement: PlacementStrategy::Linear,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{HELP}"))
        };
        match flag.as_str() {
            "--model" => a.model = Some(val()?),
            "--revision" => a.revision = val()?,
            "--prompt" => a.prompt = Some(val()?),
            "--prompt-ids" => {
                let v = val()?;
                a.prompt_ids = Some(
                    v.split(',')
                        .map(|x| {
                            x.trim()
                                .parse::<u32>()
                                .with_context(|| format!("--prompt-ids: `{x}`"))
                        })
                        .collect::<Result<_>>()?,
                )
            }
            "--chat" => a.chat = true,
            "--json" => a.json = true,
            "--max-new-tokens" => a.max_new_tokens = val()?.parse().context("--max-new-tokens")?,
            "--temperature" => a.sampling.temperature = val()?.parse().context("--temperature")?,
            "--top-p" => a.sampling.top_p = Some(val()?.parse().context("--top-p")?),
            "--top-k" => a.sampling.top_k = Some(val()?.parse().context("--top-k")?),
            "--seed" => a.sampling.seed = val()?.parse().context("--seed")?,
            "--repeat-penalty" => {
                a.sampling.repeat_penalty = val()?.parse().context("--repeat-penalty")?
            }
            "--dtype" => a.dtype = Some(parse_dtype(&val()?)?),
            "--expert-dtype" => a.expert_dtype = Some(val()?),
            "--quant" => a.quant = Some(val()?),
            "--ep-size" => a.ep_size = val()?.parse().context("--ep-size")?,
            "--ep-placement" => a.ep_placement = val()?.parse()?,
            "--device" => a.device = val()?,
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0)
            }
            o => bail!("unknown option {o}\n{HELP}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse()?;
    let dir = match &args.model {
        Some(m) => resolve(m, &args.revision)?,
        None => PathBuf::from(BUNDLED),
    };
    let dev = device(&args.device)?;
    let dtype = args.dtype.unwrap_or(if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let ck = Checkpoint::open(&dir)?;
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
                        let mut sampler = Sampler::new(args.sampling.clone());
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
    let mut sampler = Sampler::new(args.sampling.clone());
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
