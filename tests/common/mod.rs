#![allow(dead_code)]
//! Shared helpers: a seeded RNG and a reference MoE written from the math,
//! independent of the library's kernels (candle matmuls, plain-Rust routing).

use candle_core::{DType, Device, Tensor};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Standard normal (Box–Muller), scaled.
    pub fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f32::consts::PI * u2;
            v.push(r * th.cos() * scale);
            v.push(r * th.sin() * scale);
        }
        v.truncate(n);
        v
    }
    /// `k` distinct values below `n`.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            p.swap(i, j);
        }
        p.truncate(k);
        p
    }
}

pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// Rounds through `dt` and back to f32 (what the kernel sees in that dtype).
pub fn round_to(t: &Tensor, dt: DType) -> Tensor {
    t.to_dtype(dt)
        .and_then(|x| x.to_dtype(DType::F32))
        .expect("round")
}

/// Top-k by (score desc, index asc) of one row.
pub fn topk_row(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

pub fn softmax_row(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// vLLM `torch_moe`: softmax → top-k → Σ w · (silu(x·w1gᵀ) · x·w1uᵀ)·w2ᵀ over
/// the experts; `expert_map[g] < 0` experts contribute zero. `w1` is
/// `[E, 2n, k]` indexed by *local* id when a map is given.
#[allow(clippy::too_many_arguments)]
pub fn reference_moe(
    a: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
    renormalize: bool,
    expert_map: Option<&[i32]>,
) -> Vec<f32> {
    reference_moe_with(
        a,
        w1,
        w2,
        logits,
        (num_experts, top_k, renormalize),
        expert_map,
        Fault::None,
    )
}

/// A planted fault in the reference: a kernel with this bug would compute
/// what the faulty reference does, so a test must reject it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The second of each token's top-k experts is dropped.
    DropSecondExpert,
    /// Gate and up rows of w1 are swapped.
    SwapGateUp,
    /// The routing weight is not applied (every expert weighs 1).
    NoRoutingWeight,
    /// Within each expert's run, outputs land one row off (an align bug).
    OffByOneRow,
}

pub const FAULTS: [Fault; 4] = [
    Fault::DropSecondExpert,
    Fault::SwapGateUp,
    Fault::NoRoutingWeight,
    Fault::OffByOneRow,
];

/// [`reference_moe`] with `fault` planted; `(num_experts, top_k, renormalize)`.
pub fn reference_moe_with(
    a: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    logits: &[f32],
    (num_experts, top_k, renormalize): (usize, usize, bool),
    expert_map: Option<&[i32]>,
    fault: Fault,
) -> Vec<f32> {
    let (m, hk) = a.dims2().unwrap();
    let n = w2.dims()[2];
    let mut out = vec![0f32; m * hk];
    // group tokens by expert
    let mut per_expert: Vec<Vec<(usize, f32)>> = vec![vec![]; num_experts];
    for t in 0..m {
        let s = softmax_row(&logits[t * num_experts..(t + 1) * num_experts]);
        let ids = topk_row(&s, top_k);
        let sum: f32 = ids.iter().map(|&i| s[i]).sum();
        for (slot, &i) in ids.iter().enumerate() {
            if fault == Fault::DropSecondExpert && slot == 1 {
                continue;
            }
            let w = if renormalize { s[i] / sum } else { s[i] };
            let w = if fault == Fault::NoRoutingWeight {
                1.0
            } else {
                w
            };
            per_expert[i].push((t, w));
        }
    }
    for (g, toks) in per_expert.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let l = match expert_map {
            None => g,
            Some(mp) if mp[g] >= 0 => mp[g] as usize,
            Some(_) => continue,
        };
        let idx: Vec<u32> = toks.iter().map(|&(t, _)| t as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
        let x = a.index_select(&idx, 0).unwrap();
        let h = x.matmul(&w1.get(l).unwrap().t().unwrap()).unwrap();
        let (g0, u0) = if fault == Fault::SwapGateUp {
            (n, 0)
        } else {
            (0, n)
        };
        let gate = h.narrow(1, g0, n).unwrap();
        let up = h.narrow(1, u0, n).unwrap();
        let act = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let y = act.matmul(&w2.get(l).unwrap().t().unwrap()).unwrap();
        let mut y = y.to_vec2::<f32>().unwrap();
        if fault == Fault::OffByOneRow && y.len() > 1 {
            y.rotate_left(1);
        }
        for (row, &(t, w)) in y.iter().zip(toks) {
            for (o, v) in out[t * hk..(t + 1) * hk].iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
    out
}

/// The largest error of a row over the largest |value| of that row in
/// `want` (rows differ in scale; all-zero rows must be zero).
pub fn row_rel_err(got: &[f32], want: &[f32], width: usize) -> f32 {
    assert_eq!(got.len(), want.len());
    got.chunks(width)
        .zip(want.chunks(width))
        .map(|(g, w)| {
            let mag = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            if mag == 0.0 {
                if err == 0.0 {
                    0.0
                } else {
                    f32::INFINITY
                }
            } else {
                err / mag
            }
        })
        .fold(0f32, f32::max)
}

/// `got` within `tol` (row-relative) of `reference(Fault::None)`, and outside
/// it for every planted fault that changes the reference by more than
/// `2·tol`: the comparison can fail.
pub fn judge_with_faults(
    got: &[f32],
    width: usize,
    tol: f32,
    reference: &dyn Fn(Fault) -> Vec<f32>,
    check_faults: bool,
    ctx: &str,
) {
    let want = reference(Fault::None);
    let e = row_rel_err(got, &want, width);
    assert!(e <= tol, "{ctx}: row-relative error {e} > {tol}");
    if !check_faults {
        return;
    }
    for f in FAULTS {
        let bad = reference(f);
        if row_rel_err(&bad, &want, width) > 2.0 * tol {
            assert!(
                row_rel_err(got, &bad, width) > tol,
                "{ctx}: the comparison accepts a planted fault ({f:?})"
            );
        }
    }
}

/// max |got - want| and max |want|.
pub fn max_err(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let e = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let m = want.iter().map(|b| b.abs()).fold(0f32, f32::max);
    (e, m)
}

/// A tiny checkpoint under tests/fixtures.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One prompt of an `expected.json` written by scripts/make_*fixtures.py:
/// the reference's logits at every prompt position and its greedy
/// continuation with the top-2 margin of each step.
pub struct Case {
    pub prompt: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub generated: Vec<u32>,
    pub margins: Vec<f32>,
}

pub fn expected_cases(path: &std::path::Path) -> Vec<Case> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let fl = |x: &Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt_ids"]),
            logits: c["prompt_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(fl)
                .collect(),
            generated: ids(&c["generated_ids"]),
            margins: fl(&c["top2_margins"]),
        })
        .collect()
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
