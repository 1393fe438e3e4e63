//! Router: top-k ids and weights against a plain reference, vLLM tie rule,
//! grouped top-k (with and without correction bias), sigmoid, scaling, errors.

mod common;

use candle_core::{Device, Tensor};
use candle_moe::{Router, RouterConfig, ScoringFunc};
use common::*;

fn route(
    cfg: RouterConfig,
    bias: Option<Vec<f32>>,
    logits: &[f32],
    t: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let e = cfg.num_experts;
    let bias = bias.map(|b| Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
    let r = Router::new(cfg, bias).unwrap();
    let lt = Tensor::from_slice(logits, (t, e), &Device::Cpu).unwrap();
    let (w, i) = r.route(&lt).unwrap();
    (w.to_vec2().unwrap(), i.to_vec2().unwrap())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// DeepSeek / vLLM `grouped_topk` written from its definition.
fn grouped_reference(
    l: &[f32],
    groups: usize,
    topk_group: usize,
    k: usize,
    scoring: ScoringFunc,
    bias: Option<&[f32]>,
) -> Vec<usize> {
    let e = l.len();
    let scores: Vec<f32> = match scoring {
        ScoringFunc::Softmax => softmax_row(l),
        ScoringFunc::Sigmoid => l.iter().map(|&x| sigmoid(x)).collect(),
    };
    let sel: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    let per = e / groups;
    let gscore: Vec<f32> = (0..groups)
        .map(|g| {
            let c = &sel[g * per..(g + 1) * per];
            if bias.is_some() {
                let top = topk_row(c, 2);
                top.iter().map(|&i| c[i]).sum()
            } else {
                c.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            }
        })
        .collect();
    let keep = topk_row(&gscore, topk_group);
    let masked: Vec<f32> = (0..e)
        .map(|i| {
            if keep.contains(&(i / per)) {
                sel[i]
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    topk_row(&masked, k)
}

#[test]
fn softmax_topk_matches_reference() {
    let mut rng = Rng::new(21);
    for &(t, e, k) in &[
        (1usize, 8usize, 2usize),
        (37, 60, 4),
        (300, 128, 8),
        (5, 257, 16),
    ] {
        let logits = rng.randn(t * e, 2.0);
        for renorm in [false, true] {
            let mut cfg = RouterConfig::new(e, k);
            cfg.renormalize = renorm;
            let (w, ids) = route(cfg, None, &logits, t);
            for r in 0..t {
                let s = softmax_row(&logits[r * e..(r + 1) * e]);
                let want = topk_row(&s, k);
                let got: Vec<usize> = ids[r].iter().map(|&x| x as usize).collect();
                assert_eq!(got, want, "row {r}");
                let sum: f32 = want.iter().map(|&i| s[i]).sum();
                for (j, &i) in want.iter().enumerate() {
                    let ww = if renorm { s[i] / sum } else { s[i] };
                    assert!(
                        (w[r][j] - ww).abs() <= 1e-6 * ww.max(1e-3),
                        "weight {r},{j}"
                    );
                }
            }
        }
    }
}

#[test]
fn ties_go_to_lower_index() {
    let logits = vec![1.0f32, 3.0, 3.0, 0.5, 3.0, 3.0, -1.0, 0.0];
    let (w, ids) = route(RouterConfig::new(8, 3), None, &logits, 1);
    assert_eq!(ids[0], vec![1, 2, 4]);
    assert!((w[0][0] - w[0][2]).abs() < 1e-7);
    let (_, ids) = route(RouterConfig::new(8, 8), None, &[0.0; 8], 1);
    assert_eq!(ids[0], (0..8).collect::<Vec<u32>>());
}

#[test]
fn grouped_topk_ids_exact() {
    let mut rng = Rng::new(22);
    for &(e, groups, tg, k) in &[
        (64usize, 8usize, 3usize, 6usize),
        (256, 8, 4, 8),
        (32, 4, 2, 4),
        (16, 16, 4, 4),
    ] {
        for scoring in [ScoringFunc::Softmax, ScoringFunc::Sigmoid] {
            for with_bias in [false, true] {
                let t = 50;
                let logits = rng.randn(t * e, 1.5);
                let bias = with_bias.then(|| rng.randn(e, 0.1));
                let mut cfg = RouterConfig::new(e, k);
                cfg.scoring = scoring;
                cfg.num_expert_group = Some(groups);
                cfg.topk_group = Some(tg);
                cfg.renormalize = true;
                cfg.routed_scaling_factor = 2.5;
                let (w, ids) = route(cfg, bias.clone(), &logits, t);
                for r in 0..t {
                    let l = &logits[r * e..(r + 1) * e];
                    let want = grouped_reference(l, groups, tg, k, scoring, bias.as_deref());
                    let got: Vec<usize> = ids[r].iter().map(|&x| x as usize).collect();
                    assert_eq!(
                        got, want,
                        "E={e} G={groups} {scoring:?} bias={with_bias} row {r}"
                    );
                    // weights: unbiased scores of the chosen experts, renormalised, scaled
                    let s: Vec<f32> = match scoring {
                        ScoringFunc::Softmax => softmax_row(l),
                        ScoringFunc::Sigmoid => l.iter().map(|&x| sigmoid(x)).collect(),
                    };
                    let sum: f32 = want.iter().map(|&i| s[i]).sum();
                    for (j, &i) in want.iter().enumerate() {
                        let ww = s[i] / sum * 2.5;
                        assert!(
                            (w[r][j] - ww).abs() < 1e-5,
                            "weight row {r} slot {j}: {} vs {ww}",
                            w[r][j]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn sigmoid_without_renorm() {
    let logits = vec![0.3f32, -2.0, 1.0, 0.9];
    let mut cfg = RouterConfig::new(4, 2);
    cfg.scoring = ScoringFunc::Sigmoid;
    let (w, ids) = route(cfg, None, &logits, 1);
    assert_eq!(ids[0], vec![2, 3]);
    assert!((w[0][0] - sigmoid(1.0)).abs() < 1e-6 && (w[0][1] - sigmoid(0.9)).abs() < 1e-6);
}

#[test]
fn bf16_logits_are_accepted() {
    let logits = Tensor::new(&[[0.1f32, 2.0, -1.0, 0.5]], &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
    let r = Router::new(RouterConfig::new(4, 2), None).unwrap();
    let (_, ids) = r.route(&logits).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![1, 3]]);
}

#[test]
fn config_errors() {
    let bad = |cfg: RouterConfig, needle: &str| {
        let e = Router::new(cfg, None).unwrap_err().to_string();
        assert!(e.contains(needle), "`{e}` lacks `{needle}`");
    };
    bad(RouterConfig::new(8, 9), "top_k 9 must be in 1..=8");
    bad(RouterConfig::new(8, 0), "top_k 0");
    bad(RouterConfig::new(0, 1), "num_experts must be positive");
    let mut c = RouterConfig::new(10, 2);
    c.num_expert_group = Some(4);
    c.topk_group = Some(1);
    bad(c, "cannot be split into 4 groups");
    let mut c = RouterConfig::new(16, 2);
    c.num_expert_group = Some(4);
    bad(c, "topk_group is not");
    let mut c = RouterConfig::new(16, 2);
    c.num_expert_group = Some(4);
    c.topk_group = Some(5);
    bad(c, "topk_group 5 must be in 1..=4");
    let mut c = RouterConfig::new(16, 9);
    c.num_expert_group = Some(4);
    c.topk_group = Some(2);
    bad(c, "exceeds");
    let r = Router::new(
        RouterConfig::new(4, 2),
        Some(Tensor::new(&[0f32; 3], &Device::Cpu).unwrap()),
    );
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("e_score_correction_bias"));
    let r = Router::new(RouterConfig::new(4, 2), None).unwrap();
    let e = r
        .route(&Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("5 experts"), "{e}");
}
