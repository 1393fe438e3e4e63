//! Paged attention against a reference written from the math (f64, per
//! token, per head, over a contiguous copy of each sequence's K/V): GQA,
//! ragged sequences, several blocks in shuffled physical order, causal
//! prefill chunks after cached tokens, f32 / bf16 / f16 caches. Each case also
//! checks that references with one planted fault (off-by-one causality, the
//! wrong KV head, a dropped block) are rejected, so the comparison can fail.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::ops::{paged_attention, write_kv, PagedAttentionMeta, SeqSpan};
use common::Rng;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Attends to one position past its own.
    CausalOffByOne,
    /// Query head h reads KV head h % kv_heads instead of h / rep.
    WrongKvHead,
    /// Ignores the keys of the first block.
    DropFirstBlock,
}

/// Per sequence: K and V `[len, kvh, d]` (all positions), and queries of the
/// new tokens `[n, heads, d]`; returns `[n, heads, d]`.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n: usize,
    (heads, kvh, d): (usize, usize, usize),
    bs: usize,
    fault: Fault,
) -> Vec<f32> {
    let rep = heads / kvh;
    let mut out = vec![0f32; n * heads * d];
    let total = k.len() / (kvh * d);
    for i in 0..n {
        let pos = start + i;
        for h in 0..heads {
            let g = match fault {
                Fault::WrongKvHead => h % kvh,
                _ => h / rep,
            };
            let last = match fault {
                Fault::CausalOffByOne => (pos + 1).min(total - 1),
                _ => pos,
            };
            let first = if fault == Fault::DropFirstBlock && last >= bs {
                bs
            } else {
                0
            };
            let qv = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
            let scores: Vec<f64> = (first..=last)
                .map(|j| {
                    let kv = &k[(j * kvh + g) * d..(j * kvh + g + 1) * d];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (jj, j) in (first..=last).enumerate() {
                let vv = &v[(j * kvh + g) * d..(j * kvh + g + 1) * d];
                for c in 0..d {
                    out[(i * heads + h) * d + c] += (e[jj] / z * vv[c] as f64) as f32;
                }
            }
        }
    }
    out
}

fn round(v: &[f32], dt: DType) -> Vec<f32> {
    Tensor::new(v, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Runs `steps` (tokens per sequence per step) through the paged cache and
/// compares every step's output with the reference.
fn run_case(
    seqs_total: &[usize],
    chunks: &[Vec<usize>],
    dims: (usize, usize, usize),
    bs: usize,
    dt: DType,
    seed: u64,
) {
    let (heads, kvh, d) = dims;
    let mut rng = Rng::new(seed);
    let dev = Device::Cpu;
    // K, V, Q of every position of every sequence; queries scaled so scores are O(1)
    let k_all: Vec<Vec<f32>> = seqs_total
        .iter()
        .map(|&l| round(&rng.randn(l * kvh * d, 1.0), dt))
        .collect();
    let v_all: Vec<Vec<f32>> = seqs_total
        .iter()
        .map(|&l| round(&rng.randn(l * kvh * d, 1.0), dt))
        .collect();
    let q_all: Vec<Vec<f32>> = seqs_total
        .iter()
        .map(|&l| round(&rng.randn(l * heads * d, 1.5), dt))
        .collect();
    // block tables: physical blocks handed out in a shuffled order
    let blocks_per: Vec<usize> = seqs_total.iter().map(|l| l.div_ceil(bs)).collect();
    let num_blocks = blocks_per.iter().sum::<usize>() + 3;
    let perm = rng.distinct(num_blocks, num_blocks);
    let mut next = 0;
    let tables: Vec<Vec<u32>> = blocks_per
        .iter()
        .map(|&nb| {
            let t = perm[next..next + nb].iter().map(|&b| b as u32).collect();
            next += nb;
            t
        })
        .collect();
    let slots = num_blocks * bs;
    let kc = Tensor::zeros((slots, kvh, d), dt, &dev).unwrap();
    let vc = Tensor::zeros((slots, kvh, d), dt, &dev).unwrap();
    let mut done = vec![0usize; seqs_total.len()];
    let tol = match dt {
        DType::F32 => 1e-5,
        // the output is rounded to the query dtype
        DType::BF16 => 1e-2,
        _ => 2e-3,
    };
    for step in chunks {
        let mut spans = vec![];
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for (s, &n) in step.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let a = done[s];
            q.extend_from_slice(&q_all[s][a * heads * d..(a + n) * heads * d]);
            k.extend_from_slice(&k_all[s][a * kvh * d..(a + n) * kvh * d]);
            v.extend_from_slice(&v_all[s][a * kvh * d..(a + n) * kvh * d]);
            spans.push((s, a, n));
        }
        let span_refs: Vec<SeqSpan> = spans
            .iter()
            .map(|&(s, a, n)| SeqSpan {
                start: a,
                len: n,
                blocks: &tables[s],
            })
            .collect();
        let meta = PagedAttentionMeta::new(bs, num_blocks, &span_refs).unwrap();
        let t = q.len() / (heads * d);
        let tq = Tensor::from_vec(q, (t, heads, d), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let tk = Tensor::from_vec(k, (t, kvh, d), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let tv = Tensor::from_vec(v, (t, kvh, d), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        write_kv(&kc, &vc, &tk, &tv, &meta).unwrap();
        let out = paged_attention(&tq, &kc, &vc, &meta, 1.0 / (d as f32).sqrt())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut row = 0;
        for &(s, a, n) in &spans {
            let got = &out[row * heads * d..(row + n) * heads * d];
            let kk = &k_all[s][..(a + n) * kvh * d];
            let vv = &v_all[s][..(a + n) * kvh * d];
            let qq = &q_all[s][a * heads * d..(a + n) * heads * d];
            let want = reference(qq, kk, vv, a, n, dims, bs, Fault::None);
            let mag = max_abs(&want);
            let err = max_err(got, &want);
            assert!(
                err <= tol * mag,
                "{dt:?} seq {s} positions {a}..{}: err {err} vs max|ref| {mag}",
                a + n
            );
            // the comparison rejects each planted fault where it changes the math
            for fault in [
                Fault::CausalOffByOne,
                Fault::WrongKvHead,
                Fault::DropFirstBlock,
            ] {
                let bad = reference(qq, kk, vv, a, n, dims, bs, fault);
                let differs = max_err(&bad, &want) > 10.0 * tol * mag;
                if differs {
                    assert!(
                        max_err(got, &bad) > tol * mag,
                        "a faulty reference passes ({dt:?} seq {s})"
                    );
                }
            }
            row += n;
        }
        for &(s, _, n) in &spans {
            done[s] += n;
        }
    }
}

#[test]
fn ragged_gqa_prefill_then_decode_matches_reference() {
    // 3 sequences of different lengths: a prefill chunk, a second chunk on
    // top of the cached one, then single-token decode steps, mixed in one batch
    let totals = [23usize, 9, 14];
    let chunks = vec![
        vec![10, 9, 0],
        vec![8, 0, 12],
        vec![1, 0, 1],
        vec![1, 0, 1],
        vec![3, 0, 0],
    ];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        // 8 query heads over 2 KV heads, d a multiple of 8 and not
        run_case(&totals, &chunks, (8, 2, 32), 4, dt, 1);
        run_case(&totals, &chunks, (6, 3, 20), 5, dt, 2);
    }
    // multi-head (no grouping), one block per sequence
    run_case(&[7, 5], &[vec![7, 5]], (4, 4, 16), 16, DType::F32, 3);
}

#[test]
fn bad_layouts_are_errors() {
    let blocks = [0u32, 1];
    // too few blocks for the positions
    let e = PagedAttentionMeta::new(
        4,
        4,
        &[SeqSpan {
            start: 6,
            len: 3,
            blocks: &blocks,
        }],
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs 3 blocks"), "{e}");
    // a block id outside the cache
    let e = PagedAttentionMeta::new(
        4,
        1,
        &[SeqSpan {
            start: 0,
            len: 5,
            blocks: &blocks,
        }],
    )
    .unwrap_err();
    assert!(e.to_string().contains("block 1"), "{e}");
    // two sequences writing the same slots would race on them
    let s = SeqSpan {
        start: 0,
        len: 2,
        blocks: &blocks[..1],
    };
    let e = PagedAttentionMeta::new(4, 4, &[s, s]).unwrap_err();
    assert!(e.to_string().contains("write cache slot"), "{e}");
    // sharing a prefix block they only read is fine (prefix caching)
    let (b1, b2) = ([0u32, 1], [0u32, 2]);
    let reader = |b| SeqSpan {
        start: 4,
        len: 1,
        blocks: b,
    };
    assert!(PagedAttentionMeta::new(4, 4, &[reader(&b1), reader(&b2)]).is_ok());
    // but one table naming a block twice is a broken table
    let twice = [3u32, 3];
    let e = PagedAttentionMeta::new(4, 4, &[reader(&twice)]).unwrap_err();
    assert!(e.to_string().contains("block 3 twice"), "{e}");
    assert!(PagedAttentionMeta::new(0, 4, &[s]).is_err());
    // shapes that do not match the layout
    let meta = PagedAttentionMeta::new(4, 4, &[s]).unwrap();
    let dev = Device::Cpu;
    let kc = Tensor::zeros((16, 2, 8), DType::F32, &dev).unwrap();
    let q = Tensor::zeros((3, 4, 8), DType::F32, &dev).unwrap();
    assert!(paged_attention(&q, &kc, &kc, &meta, 1.0).is_err());
    let q = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
    assert!(paged_attention(&q, &kc, &kc, &meta, 1.0).is_err());
    let k = Tensor::zeros((2, 2, 8), DType::BF16, &dev).unwrap();
    assert!(write_kv(&kc, &kc.clone(), &k, &k, &meta).is_err());
    // a head_dim of 0 is empty output, not a panic
    let (q0, kc0) = (
        Tensor::zeros((2, 4, 0), DType::F32, &dev).unwrap(),
        Tensor::zeros((16, 2, 0), DType::F32, &dev).unwrap(),
    );
    let o = paged_attention(&q0, &kc0, &kc0, &meta, 1.0).unwrap();
    assert_eq!(o.dims(), [2, 4, 0]);
}
