//! vLLM `tests/kernels/moe/test_moe.py::test_fused_moe` cases that fit two
//! cores, against a reference built from the math (softmax, top-k,
//! silu_and_mul(a·w1ᵀ)·w2ᵀ, weighted sum), with and without an expert map.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::modular::{FusedMoeKernel, GroupedGemmExperts, LocalPrepareAndFinalize};
use candle_moe::{Activation, Router, RouterConfig};
use common::*;
use std::sync::Arc;

struct Weights {
    e: usize,
    n: usize,
    k: usize,
    w1: Tensor,
    w2: Tensor,
}

fn make_weights(rng: &mut Rng, e: usize, n: usize, k: usize) -> Weights {
    Weights {
        e,
        n,
        k,
        // scaled so activations and outputs are O(1)
        w1: tensor(
            rng.randn(e * 2 * n * k, 1.0 / (k as f32).sqrt()),
            &[e, 2 * n, k],
        ),
        w2: tensor(rng.randn(e * k * n, 2.0 / (n as f32).sqrt()), &[e, k, n]),
    }
}

/// Runs one case; `local` = Some(global ids kept on this "rank").
fn run_case(
    rng: &mut Rng,
    w: &Weights,
    m: usize,
    top_k: usize,
    dt: DType,
    local: Option<&[usize]>,
) {
    let (e, k) = (w.e, w.k);
    let a = round_to(&tensor(rng.randn(m * k, 1.0), &[m, k]), dt);
    let logits = rng.randn(m * e, 1.0);
    let (w1, w2) = (round_to(&w.w1, dt), round_to(&w.w2, dt));
    // expert map as vLLM's test builds it: random local subset
    let (map, w1l, w2l) = match local {
        None => (None, w1.clone(), w2.clone()),
        Some(ids) => {
            let mut map = vec![-1i32; e];
            for (l, &g) in ids.iter().enumerate() {
                map[g] = l as i32;
            }
            let idx = Tensor::new(
                ids.iter().map(|&g| g as u32).collect::<Vec<_>>().as_slice(),
                &Device::Cpu,
            )
            .unwrap();
            (
                Some(map),
                w1.index_select(&idx, 0).unwrap(),
                w2.index_select(&idx, 0).unwrap(),
            )
        }
    };
    let reference = |f: Fault| {
        reference_moe_with(
            &a,
            &w1l,
            &w2l,
            &logits,
            (e, top_k, false),
            map.as_deref(),
            f,
        )
    };

    let experts = GroupedGemmExperts::new(
        w1l.to_dtype(dt).unwrap(),
        w2l.to_dtype(dt).unwrap(),
        None,
        None,
        Activation::Silu,
    )
    .unwrap();
    let kernel = FusedMoeKernel::new(Arc::new(LocalPrepareAndFinalize), Arc::new(experts)).unwrap();
    let router = Router::new(RouterConfig::new(e, top_k), None).unwrap();
    let lt = tensor(logits.clone(), &[m, e]);
    let (tw, ti) = router.route(&lt).unwrap();
    let map_t = map
        .as_ref()
        .map(|m| Tensor::new(m.as_slice(), &Device::Cpu).unwrap());
    let (y, meta) = kernel
        .forward_with_metadata(&a.to_dtype(dt).unwrap(), &tw, &ti, e, map_t.as_ref())
        .unwrap();
    assert_eq!(y.dtype(), dt);
    assert_eq!(y.dims(), &[m, k]);
    let got: Vec<f32> = y
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ctx = format!(
        "m={m} n={} k={k} e={e} topk={top_k} {dt:?} map={}",
        w.n,
        local.is_some()
    );
    // f32: summation order only; bf16 / f16: the output is rounded to that
    // dtype (relative 2⁻⁹ / 2⁻¹²) after f32 accumulation
    let tol = match dt {
        DType::F32 => 1e-4,
        DType::BF16 => 1e-2,
        _ => 2e-3,
    };
    // planted faults on one case shape per weight set (they cost a reference each)
    let faults = (m == 33 && top_k == 2) || dt == DType::F16;
    judge_with_faults(&got, k, tol, &reference, faults, &ctx);
    let mag = got.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(
        mag > 0.1 || local.is_some(),
        "{ctx}: output is not O(1) ({mag})"
    );

    // metadata: routed pairs per local expert
    let meta = meta.expect("metadata");
    let counts = meta
        .expert_num_tokens_cpu
        .clone()
        .expect("host counts on cpu");
    let ids: Vec<u32> = ti.flatten_all().unwrap().to_vec1().unwrap();
    let mut want_counts = vec![0u32; counts.len()];
    for &g in &ids {
        let l = match &map {
            None => Some(g as usize),
            Some(mp) => usize::try_from(mp[g as usize]).ok(),
        };
        if let Some(l) = l {
            want_counts[l] += 1;
        }
    }
    assert_eq!(counts, want_counts, "{ctx}: expert token counts");
}

fn grid(dt: DType, with_map: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    for &e in &[8usize, 64] {
        for &n in &[128usize, 511, 1024] {
            for &k in &[128usize, 511, 1024] {
                let w = make_weights(&mut rng, e, n, k);
                for &m in &[1usize, 33, 222] {
                    for &top_k in &[2usize, 6] {
                        let local = with_map.then(|| {
                            let local_e = e / 4 + 1;
                            rng.distinct(e, local_e)
                        });
                        run_case(&mut rng, &w, m, top_k, dt, local.as_deref());
                    }
                }
            }
        }
    }
}

#[test]
fn fused_moe_f32() {
    grid(DType::F32, false, 1);
}

#[test]
fn fused_moe_bf16() {
    grid(DType::BF16, false, 2);
}

#[test]
fn fused_moe_f32_expert_map() {
    grid(DType::F32, true, 3);
}

#[test]
fn fused_moe_bf16_expert_map() {
    grid(DType::BF16, true, 4);
}

#[test]
fn fused_moe_f16_small() {
    let mut rng = Rng::new(5);
    let w = make_weights(&mut rng, 8, 128, 256);
    for &m in &[1usize, 7, 40] {
        run_case(&mut rng, &w, m, 2, DType::F16, None);
    }
}
