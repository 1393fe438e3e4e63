//! Expert parallelism on one machine: worlds of ranks on threads, each holding
//! only its experts, with naive DP/EP dispatch/combine; every rank's output
//! equals the single-rank layer on its own tokens.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::dist::{NaiveEpPrepareAndFinalize, ThreadWorld};
use candle_moe::modular::{Experts, ReferenceExperts};
use candle_moe::quant::{ExpertLayerSpec, QuantMethod, QuantScheme, TensorSpec, Unquantized};
use candle_moe::{EpConfig, FusedMoe, FusedMoeConfig, PlacementStrategy};
use candle_nn::VarBuilder;
use common::*;
use std::collections::HashMap;
use std::sync::Arc;

fn checkpoint(
    rng: &mut Rng,
    e: usize,
    h: usize,
    i: usize,
    shared: Option<usize>,
) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for x in 0..e {
        m.insert(
            format!("experts.{x}.gate_proj.weight"),
            tensor(rng.randn(i * h, 0.1), &[i, h]),
        );
        m.insert(
            format!("experts.{x}.up_proj.weight"),
            tensor(rng.randn(i * h, 0.1), &[i, h]),
        );
        m.insert(
            format!("experts.{x}.down_proj.weight"),
            tensor(rng.randn(h * i, 0.1), &[h, i]),
        );
    }
    if let Some(s) = shared {
        m.insert(
            "shared_expert.gate_proj.weight".into(),
            tensor(rng.randn(s * h, 0.1), &[s, h]),
        );
        m.insert(
            "shared_expert.up_proj.weight".into(),
            tensor(rng.randn(s * h, 0.1), &[s, h]),
        );
        m.insert(
            "shared_expert.down_proj.weight".into(),
            tensor(rng.randn(h * s, 0.1), &[h, s]),
        );
        m.insert(
            "shared_expert_gate.weight".into(),
            tensor(rng.randn(h, 0.3), &[1, h]),
        );
    }
    m
}

/// Loads the local experts into [`ReferenceExperts`], which never reads the
/// expert map.
#[derive(Debug)]
struct MapIgnoring;

impl QuantMethod for MapIgnoring {
    fn name(&self) -> &'static str {
        "map-ignoring"
    }
    fn expert_tensors(&self, s: &ExpertLayerSpec) -> Vec<TensorSpec> {
        Unquantized.expert_tensors(s)
    }
    fn create_experts(
        &self,
        s: &ExpertLayerSpec,
        vb: &VarBuilder,
        local_ids: &[usize],
    ) -> candle_moe::Result<Arc<dyn Experts>> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        let mut w13 = vec![];
        let mut w2 = vec![];
        for &g in local_ids {
            let v = vb.pp(g);
            let gate = v.pp("gate_proj").get((i, h), "weight")?;
            let up = v.pp("up_proj").get((i, h), "weight")?;
            w13.push(Tensor::cat(&[&gate, &up], 0)?);
            w2.push(v.pp("down_proj").get((h, i), "weight")?);
        }
        Ok(Arc::new(ReferenceExperts::new(
            Tensor::stack(&w13, 0)?,
            Tensor::stack(&w2, 0)?,
            s.activation,
        )?))
    }
}

fn run_world(
    e: usize,
    top_k: usize,
    ep: usize,
    strategy: PlacementStrategy,
    tokens: &[usize],
    shared: Option<usize>,
) {
    let err = run_world_with(
        e,
        top_k,
        ep,
        strategy,
        tokens,
        shared,
        Arc::new(Unquantized),
        None,
        false,
    );
    assert!(err <= 1e-5, "E={e} ep={ep} {strategy}: rel err {err}");
}

#[allow(clippy::too_many_arguments)]
fn run_world_with(
    e: usize,
    top_k: usize,
    ep: usize,
    strategy: PlacementStrategy,
    tokens: &[usize],
    shared: Option<usize>,
    method: Arc<dyn QuantMethod>,
    quant: Option<QuantScheme>,
    local_ids: bool,
) -> f32 {
    let (h, i) = (48, 24);
    let mut rng = Rng::new((e * 100 + ep * 10 + tokens.len()) as u64);
    let ckpt = checkpoint(&mut rng, e, h, i, shared);
    let mut cfg = FusedMoeConfig::new(h, i, e, top_k);
    cfg.renormalize = true;
    cfg.shared_expert_intermediate_size = shared;
    // the single-rank reference: cfg.quant's experts (float when None)
    cfg.quant = quant;
    let single = FusedMoe::new(
        &cfg,
        VarBuilder::from_tensors(ckpt.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let inputs: Vec<(Tensor, Tensor)> = tokens
        .iter()
        .map(|&t| {
            (
                tensor(rng.randn(t * h, 0.5), &[t, h]),
                tensor(rng.randn(t * e, 1.0), &[t, e]),
            )
        })
        .collect();
    let comms = ThreadWorld::new(ep);
    let outs: Vec<(Tensor, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let mut cfg = cfg.clone();
                // a group count only to let vLLM's rule keep round_robin
                cfg.ep = EpConfig {
                    num_expert_group: Some(2),
                    ..EpConfig::new(ep, rank, strategy)
                };
                let ckpt = ckpt.clone();
                let (x, l) = inputs[rank].clone();
                let method = method.clone();
                s.spawn(move || {
                    let pf = Arc::new(if local_ids {
                        NaiveEpPrepareAndFinalize::with_local_ids(Arc::new(comm))
                    } else {
                        NaiveEpPrepareAndFinalize::new(Arc::new(comm))
                    });
                    let vb = VarBuilder::from_tensors(ckpt, DType::F32, &Device::Cpu);
                    let moe = FusedMoe::with_quant(&cfg, vb, method, pf).unwrap();
                    assert_eq!(moe.expert_map_manager().placement_strategy(), strategy);
                    let y = moe.forward(&x, &l).unwrap();
                    (y, moe.kernel().experts().weight_bytes())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut bytes = 0;
    let mut worst = 0f32;
    for ((y, b), (x, l)) in outs.iter().zip(&inputs) {
        bytes += b;
        let want = single.forward(x, l).unwrap();
        assert_eq!(y.dims(), want.dims());
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        if want.is_empty() {
            continue;
        }
        let (err, mag) = max_err(&got, &want);
        worst = worst.max(err / mag);
    }
    // each rank holds ~1/ep of the experts, and together each expert once
    assert_eq!(bytes, single.kernel().experts().weight_bytes());
    worst
}

#[test]
fn two_ranks_nine_experts() {
    for s in [PlacementStrategy::Linear, PlacementStrategy::RoundRobin] {
        run_world(9, 2, 2, s, &[5, 11], None);
    }
}

#[test]
fn four_ranks_sixty_experts_uneven_tokens_shared_expert() {
    for s in [PlacementStrategy::Linear, PlacementStrategy::RoundRobin] {
        run_world(60, 4, 4, s, &[7, 1, 20, 0], Some(32));
    }
}

#[test]
fn more_ranks_than_experts_is_an_error() {
    let comms = ThreadWorld::new(5);
    let mut cfg = FusedMoeConfig::new(8, 4, 4, 2);
    cfg.ep = EpConfig::new(5, 0, PlacementStrategy::Linear);
    let mut rng = Rng::new(9);
    let vb = VarBuilder::from_tensors(
        checkpoint(&mut rng, 4, 8, 4, None),
        DType::F32,
        &Device::Cpu,
    );
    let pf = Arc::new(NaiveEpPrepareAndFinalize::new(Arc::new(comms[0].clone())));
    let e = FusedMoe::with_quant(&cfg, vb, Arc::new(Unquantized), pf)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ep_size 5 is larger than the number of experts 4"),
        "{e}"
    );
}

#[test]
fn update_from_two_to_four_ranks_reloads_experts() {
    let (e, h, i, k) = (12usize, 32usize, 16usize, 3usize);
    let mut rng = Rng::new(77);
    let ckpt = checkpoint(&mut rng, e, h, i, None);
    let cfg = FusedMoeConfig::new(h, i, e, k);
    let single = FusedMoe::new(
        &cfg,
        VarBuilder::from_tensors(ckpt.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let tokens = [3usize, 6, 2, 5];
    let inputs: Vec<(Tensor, Tensor)> = tokens
        .iter()
        .map(|&t| {
            (
                tensor(rng.randn(t * h, 0.5), &[t, h]),
                tensor(rng.randn(t * e, 1.0), &[t, e]),
            )
        })
        .collect();
    // four threads; ranks 0..2 first form an ep=2 world, then all four an ep=4 world
    let small = ThreadWorld::new(2);
    let big = ThreadWorld::new(4);
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|rank| {
                let (ckpt, cfg) = (ckpt.clone(), cfg.clone());
                let (x, l) = inputs[rank].clone();
                let small = small.get(rank).cloned();
                let big = big[rank].clone();
                s.spawn(move || {
                    let vb = VarBuilder::from_tensors(ckpt, DType::F32, &Device::Cpu);
                    let mut moe = if let Some(comm) = small {
                        let mut c = cfg.clone();
                        c.ep = EpConfig::new(2, rank, PlacementStrategy::Linear);
                        let pf = Arc::new(NaiveEpPrepareAndFinalize::new(Arc::new(comm)));
                        let m = FusedMoe::with_quant(&c, vb.clone(), Arc::new(Unquantized), pf)
                            .unwrap();
                        assert_eq!(m.kernel().experts().local_num_experts(), 6);
                        m.forward(&x, &l).unwrap();
                        m
                    } else {
                        FusedMoe::new(&cfg, vb.clone()).unwrap()
                    };
                    let pf = Arc::new(NaiveEpPrepareAndFinalize::new(Arc::new(big)));
                    moe.update_ep(4, rank, &vb, pf).unwrap();
                    assert_eq!(moe.kernel().experts().local_num_experts(), 3);
                    assert_eq!(
                        moe.expert_map_manager().local_expert_ids(),
                        (3 * rank..3 * rank + 3).collect::<Vec<_>>()
                    );
                    moe.forward(&x, &l)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, got) in results.iter().enumerate() {
        let want: Vec<f32> = single
            .forward(&inputs[rank].0, &inputs[rank].1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (err, mag) = max_err(got, &want);
        assert!(err <= 1e-5 * mag, "rank {rank}: err {err}");
    }
}

#[test]
fn a_failed_rank_poisons_the_world_instead_of_hanging() {
    use candle_moe::dist::Communicator;
    let comms = ThreadWorld::new(3);
    let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let errs: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let t = t.clone();
                s.spawn(move || {
                    // one clean collective, then rank 2 gives up
                    c.all_gather_v(&t).unwrap();
                    if c.rank() == 2 {
                        c.poison();
                        return true;
                    }
                    c.all_gather_v(&t).is_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(errs, vec![true, true, true]);
}

/// An experts implementation that ignores the expert map (plain candle ops)
/// behind the naive EP dispatch that delivers local ids: every rank gets the
/// single-rank output. Behind the global-id dispatch the same experts are
/// wrong (they would need the map), so the test sees where the ids come from.
#[test]
fn experts_that_ignore_the_expert_map() {
    for (e, ep, s) in [
        (9, 2, PlacementStrategy::Linear),
        (9, 2, PlacementStrategy::RoundRobin),
        (60, 4, PlacementStrategy::Linear),
        (60, 4, PlacementStrategy::RoundRobin),
    ] {
        let tokens: Vec<usize> = (0..ep).map(|r| [5, 0, 13, 2][r % 4]).collect();
        let run = |local| {
            run_world_with(
                e,
                4,
                ep,
                s,
                &tokens,
                Some(16),
                Arc::new(MapIgnoring),
                None,
                local,
            )
        };
        let err = run(true);
        assert!(err <= 1e-5, "E={e} ep={ep} {s}: rel err {err}");
        // global ids reach the experts: an error (an id past the local
        // experts) or a wrong output, never the single-rank one
        let wrong = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(false)));
        assert!(
            wrong.map_or(true, |err| err > 1e-2),
            "E={e} ep={ep} {s}: global ids must not work for map-ignoring experts"
        );
    }
}

/// Expert parallelism over FP8 experts (quantized on load, W8A8): each rank
/// holds its experts' bytes and scales, and the output is the single-rank one.
#[test]
fn fp8_experts_over_ranks() {
    for (e, ep, s) in [
        (9, 2, PlacementStrategy::Linear),
        (60, 4, PlacementStrategy::RoundRobin),
    ] {
        let q = QuantScheme::on_load("fp8").unwrap();
        let tokens: Vec<usize> = (0..ep).map(|r| [7, 3, 0, 11][r % 4]).collect();
        let err = run_world_with(
            e,
            4,
            ep,
            s,
            &tokens,
            None,
            q.expert_method(),
            Some(q),
            false,
        );
        assert!(err <= 1e-5, "E={e} ep={ep} {s}: rel err {err}");
    }
}
