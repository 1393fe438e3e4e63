//! The dense linear op against `x · Wᵀ + b` computed in f64 from the weights
//! the kernel should see (rounded to their dtype, or dequantized from FP8 /
//! MXFP4): decode (1–3 rows, the skinny kernels) and prefill shapes (the
//! packed kernel, row chunks), K with and without SIMD tails, f32 / bf16 / f16
//! inputs. Planted faults (a 3 % weight scale error, a dropped bias, the last
//! K column ignored) must be rejected by the same comparison.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_moe::format::fp8::{e4m3_to_f32, quantize_fp8_block, SourcePrecision};
use candle_moe::format::mxfp4::{e2m1_to_f32, e8m0_to_f32, quantize_mxfp4};
use candle_moe::format::PackedWeights;
use candle_moe::ops::{linear, LinearArgs};
use common::Rng;

/// `[m, n]` in f64 of `x [m, k]` times `w [n, k]` plus `b`.
fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let s: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
            out[r * n + c] = (s + b.map_or(0.0, |b| b[c] as f64)) as f32;
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

/// Max error of each row over the max |ref| of that row (rows differ in scale).
fn row_rel_err(got: &[f32], want: &[f32], n: usize) -> f32 {
    got.chunks(n)
        .zip(want.chunks(n))
        .map(|(g, w)| {
            let mag = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / mag
        })
        .fold(0f32, f32::max)
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
}

const CASES: &[Case] = &[
    Case {
        m: 1,
        n: 37,
        k: 256,
    },
    Case {
        m: 2,
        n: 130,
        k: 96,
    },
    Case {
        m: 3,
        n: 19,
        k: 1000,
    },
    Case {
        m: 7,
        n: 50,
        k: 160,
    },
    // 4–11 rows run a dot-product kernel (chunks of 3 on AVX2, one sweep
    // for bf16 on AVX-512 FMA); K with 16-, 8- and scalar tails
    Case {
        m: 11,
        n: 40,
        k: 1051,
    },
    // bf16 on AVX-512 FMA: sweeps of 9 and 8 rows in several K chunks;
    // other weights: packed tiles of 9 and 8 rows
    Case {
        m: 17,
        n: 33,
        k: 2048,
    },
    // packed tiles of 9, 8 and 8 rows for every weight format
    Case {
        m: 25,
        n: 37,
        k: 320,
    },
    Case {
        m: 100,
        n: 140,
        k: 288,
    },
    // packed tiles for every format over K blocks that end in a partial
    // group of 32 (the AVX-512 packer widens whole groups, then the rest)
    Case {
        m: 30,
        n: 21,
        k: 301,
    },
];

/// Checks `got` against the right reference and against faulty ones.
fn judge(got: &[f32], x: &[f32], w: &[f32], b: &[f32], c: &Case, tol: f32, ctx: &str) {
    let want = reference(x, w, Some(b), c.m, c.n, c.k);
    let e = row_rel_err(got, &want, c.n);
    assert!(e <= tol, "{ctx}: row-relative error {e} > {tol}");
    let scaled: Vec<f32> = w.iter().map(|v| v * 1.03).collect();
    let mut last_col = w.to_vec();
    last_col
        .iter_mut()
        .skip(c.k - 1)
        .step_by(c.k)
        .for_each(|v| *v = 0.0);
    for (name, bad) in [
        (
            "3% weight scale",
            reference(x, &scaled, Some(b), c.m, c.n, c.k),
        ),
        ("dropped bias", reference(x, w, None, c.m, c.n, c.k)),
        (
            "last K column ignored",
            reference(x, &last_col, Some(b), c.m, c.n, c.k),
        ),
    ] {
        assert!(
            row_rel_err(got, &bad, c.n) > tol,
            "{ctx}: the comparison accepts a planted fault ({name})"
        );
    }
}

#[test]
fn float_weights_match_reference() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    for c in CASES {
        // inputs scaled so outputs are O(1)
        let x = rng.randn(c.m * c.k, 1.0);
        let w = rng.randn(c.n * c.k, 1.0 / (c.k as f32).sqrt());
        let b = rng.randn(c.n, 1.0);
        for (wdt, xdt, tol) in [
            (DType::F32, DType::F32, 1e-5),
            (DType::BF16, DType::F32, 1e-5),
            (DType::F16, DType::F32, 1e-5),
            // bf16 / f16 activations: the output is rounded to that dtype
            (DType::BF16, DType::BF16, 8e-3),
            (DType::F16, DType::F16, 2e-3),
        ] {
            let (xr, wr) = (round(&x, xdt), round(&w, wdt));
            let tx = Tensor::from_vec(x.clone(), (c.m, c.k), &dev)
                .unwrap()
                .to_dtype(xdt)
                .unwrap();
            let tw = Tensor::from_vec(w.clone(), (c.n, c.k), &dev)
                .unwrap()
                .to_dtype(wdt)
                .unwrap();
            let args = LinearArgs {
                bias: Some(Tensor::new(b.as_slice(), &dev).unwrap()),
                ..Default::default()
            };
            let y = linear(&tx, &tw, &args).unwrap();
            assert_eq!(y.dims(), &[c.m, c.n]);
            assert_eq!(y.dtype(), xdt);
            let got = y
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ctx = format!("m {} n {} k {} w {wdt:?} x {xdt:?}", c.m, c.n, c.k);
            judge(&got, &xr, &wr, &b, c, tol, &ctx);
        }
    }
}

#[test]
fn packed_weights_match_dequantized_reference() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    for c in CASES {
        let x = rng.randn(c.m * c.k, 1.0);
        let w = rng.randn(c.n * c.k, 1.0 / (c.k as f32).sqrt());
        let b = rng.randn(c.n, 1.0);
        let bias = Some(Tensor::new(b.as_slice(), &dev).unwrap());
        // FP8 with 128×128 blocks (W8A16)
        let (q, s) = quantize_fp8_block(&w, c.n, c.k, 128, 128, SourcePrecision::F32);
        let kb = c.k.div_ceil(128);
        let deq: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &v)| e4m3_to_f32(v) * s[(i / c.k / 128) * kb + (i % c.k) / 128])
            .collect();
        let args = LinearArgs {
            bias: bias.clone(),
            quant: Some(PackedWeights::Fp8 {
                scales: Tensor::from_vec(s, (1, c.n.div_ceil(128), kb), &dev).unwrap(),
                block: (128, 128),
            }),
            act_quant_group: None,
        };
        let tx = Tensor::from_vec(x.clone(), (c.m, c.k), &dev).unwrap();
        let tw = Tensor::from_vec(q, (c.n, c.k), &dev).unwrap();
        let got = linear(&tx, &tw, &args)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        judge(
            &got,
            &x,
            &deq,
            &b,
            c,
            1e-5,
            &format!("fp8 m {} n {} k {}", c.m, c.n, c.k),
        );
        // MXFP4 (W4A16): K in whole groups of 32
        if c.k % 32 != 0 {
            continue;
        }
        let (q, s) = quantize_mxfp4(&w, c.n, c.k);
        let deq: Vec<f32> = (0..c.n * c.k)
            .map(|i| {
                let byte = q[i / 2];
                let nib = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
                e2m1_to_f32(nib) * e8m0_to_f32(s[i / 32])
            })
            .collect();
        let args = LinearArgs {
            bias,
            quant: Some(PackedWeights::Mxfp4 {
                scales: Tensor::from_vec(s, (1, c.n, c.k / 32), &dev).unwrap(),
            }),
            act_quant_group: None,
        };
        let tw = Tensor::from_vec(q, (c.n, c.k / 2), &dev).unwrap();
        let got = linear(&tx, &tw, &args)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        judge(
            &got,
            &x,
            &deq,
            &b,
            c,
            1e-5,
            &format!("mxfp4 m {} n {} k {}", c.m, c.n, c.k),
        );
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((3, 9), DType::F32, &dev).unwrap();
    let e = linear(&x, &w, &LinearArgs::default()).unwrap_err();
    assert!(e.to_string().contains("K = 8"), "{e}");
    let w = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
    let args = LinearArgs {
        bias: Some(Tensor::zeros(4, DType::F32, &dev).unwrap()),
        ..Default::default()
    };
    assert!(linear(&x, &w, &args).is_err());
    // a leading batch shape is kept
    let x = Tensor::zeros((2, 5, 8), DType::F32, &dev).unwrap();
    let y = linear(&x, &w, &LinearArgs::default()).unwrap();
    assert_eq!(y.dims(), &[2, 5, 3]);
}
