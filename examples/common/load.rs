//! The model options generate, gsm8k and the server share (`--model`,
//! `--dtype`, `--quant`, `--ep-size`, …) and loading a checkpoint on every
//! expert-parallel rank: rank 0 runs the engine, the other ranks follow its
//! plans on threads (cpu) or on their own GPU over NCCL (cuda).

use super::{compute_dtype, device, expert_dtype, parse_dtype, quant_scheme, resolve};
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use candle_moe::dist::{Communicator, ThreadComm, ThreadWorld};
use candle_moe::{EpConfig, ExpertMapManager, PlacementStrategy};
use candle_moe_models::engine::{follow, StepPlan};
use candle_moe_models::memory::{check_fits, device_available, HoldOptions};
use candle_moe_models::save_quantized::{save_quantized, SaveOptions};
use candle_moe_models::{Checkpoint, HfTokenizer, LoadOptions, LoadProgress, QwenMoeForCausalLM};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Local checkpoint directory or hub id (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision to download.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Compute dtype (f32|bf16|f16; default: bf16 for a bf16 checkpoint or on cuda, else f32).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Experts' dtype (default: the checkpoint's bf16/f16 under f32 compute).
    #[arg(long)]
    pub expert_dtype: Option<String>,
    /// Quantize a float checkpoint's experts while loading (fp8|mxfp4).
    #[arg(long)]
    pub quant: Option<String>,
    /// Quantize every other linear but the embeddings and router too (fp8|mxfp4).
    #[arg(long)]
    pub quant_dense: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Expert-parallel ranks (threads on cpu, GPUs over NCCL on cuda).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub ep_size: u64,
    #[arg(long, default_value = "linear")]
    pub ep_placement: PlacementStrategy,
    /// Load even when the memory estimate says it will not fit.
    #[arg(long)]
    pub force_load: bool,
    /// Write the `--quant` (and `--quant-dense`) quantized checkpoint here as
    /// compressed-tensors (llm-compressor's layout), then load that copy.
    #[arg(long)]
    pub save_quantized: Option<PathBuf>,
}

/// A resolved checkpoint and the choices made for it.
pub struct Opened {
    pub dir: PathBuf,
    pub ck: Checkpoint,
    pub dev: Device,
    pub dtype: DType,
    pub expert_dtype: Option<DType>,
    /// `tokenizer.json`, when the checkpoint has one.
    pub tokenizer: Option<Arc<HfTokenizer>>,
    /// The checkpoint is a copy `--save-quantized` just wrote: no on-load
    /// quantization left to do.
    pub saved: bool,
}

impl Opened {
    /// Tokens a KV cache of `bytes` holds for this checkpoint.
    pub fn kv_tokens_for_bytes(&self, bytes: usize) -> usize {
        let c = &self.ck.config;
        let shape = candle_moe_models::KvCacheShape {
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        bytes / candle_moe_models::KvCache::bytes_per_token(shape, self.dtype).max(1)
    }
}

impl ModelArgs {
    /// Resolves the checkpoint (`bundled` when no `--model`) and its tokenizer.
    pub fn open(&self, bundled: &Path) -> Result<Opened> {
        let mut dir = match &self.model {
            Some(m) => resolve(m, &self.revision)?,
            None => bundled.to_path_buf(),
        };
        let saved = self.save_quantized.is_some();
        if let Some(out) = &self.save_quantized {
            dir = self.save(&dir, out)?;
        }
        let dev = device(&self.device)?;
        let ck = Checkpoint::open(&dir)?;
        let dtype = compute_dtype(self.dtype, ck.config.stored_dtype(), &dev);
        let edt = expert_dtype(
            self.expert_dtype.as_deref(),
            ck.config.stored_dtype(),
            dtype,
        )?;
        let tok = dir.join("tokenizer.json");
        let tokenizer = if tok.is_file() {
            Some(Arc::new(HfTokenizer::from_file(&tok)?))
        } else {
            None
        };
        Ok(Opened {
            dir,
            ck,
            dev,
            dtype,
            expert_dtype: edt,
            tokenizer,
            saved,
        })
    }

    /// Writes the quantized copy of `src` into `out`; returns `out`.
    fn save(&self, src: &Path, out: &Path) -> Result<PathBuf> {
        let quant = quant_scheme(self.quant.as_deref())?
            .ok_or_else(|| anyhow!("--save-quantized needs --quant fp8|mxfp4"))?;
        if self.quant_dense.is_some() && self.quant_dense != self.quant {
            bail!("--save-quantized: --quant-dense must be the --quant format (one scheme per checkpoint)");
        }
        let ck = Checkpoint::open(src)?;
        let t = std::time::Instant::now();
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "quantizing {elapsed_precise} [{bar:30}] tensor {pos}/{len} eta {eta}",
            )?
            .progress_chars("#>-"),
        );
        let opts = SaveOptions {
            quant,
            quant_dense: self.quant_dense.is_some(),
            shard_bytes: 5_000_000_000,
        };
        save_quantized(&ck, out, &opts, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        eprintln!(
            "saved the quantized copy to {} in {:.1}s",
            out.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(out.to_path_buf())
    }

    /// Loads the model on every rank and runs `lead` with rank 0's model and
    /// the followers' plan channels (for `Engine::with_followers`); returns
    /// when every rank is done. First checks that the weights and a KV cache
    /// of `kv_tokens` fit in memory (`--force-load` skips the check).
    pub fn run<R>(
        &self,
        o: &Opened,
        kv_tokens: usize,
        lead: impl FnOnce(QwenMoeForCausalLM, Vec<Sender<Arc<StepPlan>>>) -> Result<R>,
    ) -> Result<R> {
        let ep_size = self.ep_size as usize;
        if ep_size > 1 && !o.dev.is_cpu() && !cfg!(feature = "nccl") {
            bail!("--ep-size > 1 on cuda needs NCCL: build with --features nccl (on the cpu, ranks are threads)");
        }
        // a saved copy is already quantized
        let on_load = |f: &Option<String>| {
            if o.saved {
                Ok(None)
            } else {
                quant_scheme(f.as_deref())
            }
        };
        let quant = on_load(&self.quant)?;
        let quant_dense = on_load(&self.quant_dense)?;
        let hold = HoldOptions {
            dtype: o.dtype,
            expert_dtype: o.expert_dtype,
            quant: quant.clone(),
            quant_dense: quant_dense.clone(),
            // ranks on cpu threads share this memory
            ep_size,
            kv_tokens,
        };
        // (NCCL ranks each hold a share of the experts on their own GPU: not
        // estimated yet, no check)
        let checked = o.dev.is_cpu() || ep_size == 1;
        if let (Some(avail), false, true) = (device_available(&o.dev), self.force_load, checked) {
            let e = check_fits(&o.ck, &hold, avail)?;
            eprintln!(
                "memory: ~{:.1} GB estimated of {:.1} GB available",
                e.total() as f64 / 1e9,
                avail as f64 / 1e9
            );
        }
        let layers = o.ck.config.num_hidden_layers;
        let bar = indicatif::ProgressBar::new(layers as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "loading {elapsed_precise} [{bar:30}] layer {pos}/{len} eta {eta}",
            )?
            .progress_chars("#>-"),
        );
        // after each layer: the bar, and its source pages leave this process
        let progress = {
            let (bar, pages) = (bar.clone(), o.ck.mapped_pages());
            LoadProgress(Arc::new(move |done, _| {
                bar.set_position(done as u64);
                pages.release(&format!("model.layers.{}.", done - 1));
            }))
        };
        let load = |comm: Option<RankComm>, dev: &Device| -> Result<QwenMoeForCausalLM> {
            let ep = match comm {
                None => None,
                Some(c) => {
                    let comm = c.connect(dev)?;
                    let cfg = EpConfig::new(ep_size, comm.rank(), self.ep_placement);
                    Some((cfg, comm))
                }
            };
            // rank 0 draws the bar
            let rank0 = ep.as_ref().is_none_or(|(c, _)| c.ep_rank == 0);
            let opts = LoadOptions {
                expert_dtype: o.expert_dtype,
                ep,
                quant: quant.clone(),
                quant_dense: quant_dense.clone(),
                progress: rank0.then(|| progress.clone()),
            };
            Ok(QwenMoeForCausalLM::new_with_options(
                &o.ck.config,
                o.ck.var_builder(o.dtype, dev)?,
                &opts,
            )?)
        };
        if ep_size > 1 {
            let cfg = EpConfig::new(ep_size, 0, self.ep_placement);
            let mgr = ExpertMapManager::new(
                o.ck.config.num_experts,
                o.ck.config.num_experts_per_tok,
                cfg,
                &o.dev,
            )?;
            if let Some(why) = mgr.fallback_reason() {
                eprintln!("note: {why}");
            }
        }
        let mut comms: Vec<Option<RankComm>> = if ep_size <= 1 {
            vec![None]
        } else if o.dev.is_cpu() {
            ThreadWorld::new(ep_size)
                .into_iter()
                .map(|c| Some(RankComm::Thread(c)))
                .collect()
        } else {
            nccl_ranks(ep_size)?
        };
        let t = std::time::Instant::now();
        let rank0 = comms.remove(0);
        std::thread::scope(|s| -> Result<R> {
            let mut senders = vec![];
            let followers: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (tx, rx) = channel::<Arc<StepPlan>>();
                    senders.push(tx);
                    let (load, dev) = (&load, &o.dev);
                    s.spawn(move || -> Result<()> {
                        let guard = comm.as_ref().and_then(RankComm::thread).cloned();
                        let rank = comm.as_ref().map_or(0, RankComm::rank);
                        let r = (|| -> Result<()> {
                            let dev = &rank_device(dev, rank)?;
                            let m = load(comm, dev)?;
                            follow(&m, rx)?;
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
            let r = (|| -> Result<R> {
                let model = load(rank0, &o.dev)?;
                bar.finish_and_clear();
                let kernel = model
                    .moe_blocks()
                    .next()
                    .map_or("none", |b| b.moe().kernel().experts().name());
                eprintln!(
                    "loaded {} ({:?}, {:?} compute, experts via {kernel}, {:.2} MB of experts on this rank, ep {} {}) in {:.2}s",
                    o.dir.display(),
                    o.ck.config.arch,
                    o.dtype,
                    model.expert_weight_bytes() as f64 / 1e6,
                    ep_size,
                    self.ep_placement,
                    t.elapsed().as_secs_f64()
                );
                lead(model, senders)
            })();
            if r.is_err() {
                guard.iter().for_each(ThreadComm::poison);
            }
            for f in followers {
                f.join()
                    .map_err(|_| anyhow!("an expert-parallel rank panicked"))??;
            }
            r
        })
    }
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
    fn connect(self, dev: &Device) -> Result<Arc<dyn Communicator>> {
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
fn rank_device(dev: &Device, rank: usize) -> Result<Device> {
    Ok(if dev.is_cpu() {
        dev.clone()
    } else {
        Device::new_cuda(rank)?
    })
}
