//! FP8 e4m3 (`float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits,
//! no infinities, `S.1111.111` is NaN, largest finite 448.
//!
//! Encoding rounds to nearest, ties to even, after clamping to ±448 — what
//! compressed-tensors does (`clamp` then `tensor.to(float8_e4m3fn)`), so on-load
//! quantization produces the bytes llm-compressor would write.

use super::float_rows::FloatRows;
use std::sync::LazyLock;

pub const E4M3_MAX: f32 = 448.0;

/// The value of every byte (NaN for the two NaN encodings).
pub static E4M3_LUT: LazyLock<[f32; 256]> = LazyLock::new(|| {
    std::array::from_fn(|b| {
        let b = b as u8;
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0xf) as i32;
        let m = (b & 7) as f32;
        if b & 0x7f == 0x7f {
            f32::NAN
        } else if e == 0 {
            sign * m * 2f32.powi(-9)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        }
    })
});

#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_LUT[b as usize]
}

/// Nearest e4m3 (ties to even), saturating at ±448; NaN maps to NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    if a < 2f32.powi(-6) {
        // subnormal range: multiples of 2^-9 (8·2^-9 rounds up into the min normal)
        return sign | ((a * 512.0).round_ties_even() as u8);
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127;
    let mant = bits & 0x7f_ffff;
    let mut m3 = mant >> 20;
    let rest = mant & 0xf_ffff;
    let half = 0x8_0000;
    if rest > half || (rest == half && m3 & 1 == 1) {
        m3 += 1;
        if m3 == 8 {
            m3 = 0;
            exp += 1;
        }
    }
    // a <= 448 keeps exp <= 8, i.e. at most 0x7e
    sign | (((exp + 7) as u8) << 3) | m3 as u8
}

/// The e4m3 value nearest to `x` (ties to even, saturating at ±448) as an
/// f32, without going through the byte: `e4m3_to_f32(f32_to_e4m3(x))` in a
/// few branch-free bit operations, for quantize-dequantize of activations.
#[inline(always)]
pub fn round_to_e4m3(x: f32) -> f32 {
    let a = x.abs().min(E4M3_MAX);
    let r = if a < 0.015625 {
        // subnormal e4m3: multiples of 2^-9, the ulp of 2^14, so the
        // addition rounds to nearest even (no libm call)
        (a + 16384.0) - 16384.0
    } else {
        // keep 3 mantissa bits, rounding the 20 dropped ones to nearest even
        let b = a.to_bits();
        f32::from_bits((b + 0x7_ffff + ((b >> 20) & 1)) & 0xfff0_0000)
    };
    r.copysign(x)
}

/// How a quantizer rounds its intermediate `w / scale` and the scale itself:
/// torch computes them in the model's dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SourcePrecision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl SourcePrecision {
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
            Self::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
    fn eps(self) -> f32 {
        match self {
            Self::F32 => f32::EPSILON,
            Self::Bf16 => half::bf16::EPSILON.to_f32(),
            Self::F16 => half::f16::EPSILON.to_f32(),
        }
    }
    pub fn from_dtype(dt: candle_core::DType) -> Self {
        match dt {
            candle_core::DType::BF16 => Self::Bf16,
            candle_core::DType::F16 => Self::F16,
            _ => Self::F32,
        }
    }
}

/// Quantizes a row-major `[n, k]` matrix with one scale per `bn × bk` block
/// (compressed-tensors' symmetric float rule: `scale = amax / 448`, a zero
/// scale replaced by the dtype's epsilon). Returns the e4m3 bytes and the
/// `[ceil(n/bn), ceil(k/bk)]` scales.
pub fn quantize_fp8_block(
    w: &[f32],
    n: usize,
    k: usize,
    bn: usize,
    bk: usize,
    prec: SourcePrecision,
) -> (Vec<u8>, Vec<f32>) {
    quantize_fp8_block_rows(FloatRows::F32(w), n, k, bn, bk, prec)
}

/// [`quantize_fp8_block`] reading the weights as stored: each task widens
/// its own row block.
pub fn quantize_fp8_block_rows(
    w: FloatRows<'_>,
    n: usize,
    k: usize,
    bn: usize,
    bk: usize,
    prec: SourcePrecision,
) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    assert_eq!(w.len(), n * k, "quantize_fp8_block: {} != {n}x{k}", w.len());
    let kb = k.div_ceil(bk);
    let mut q = vec![0u8; n * k];
    let mut scales = vec![0f32; n.div_ceil(bn) * kb];
    // one row block per task: its scales, then its bytes
    q.par_chunks_mut(bn * k)
        .zip(scales.par_chunks_mut(kb))
        .enumerate()
        .for_each(|(b, (q, s))| {
            let mut wb = vec![0f32; q.len()];
            w.read(b * bn * k, &mut wb);
            let w = &wb;
            let rows = w.len() / k;
            for (c, s) in s.iter_mut().enumerate() {
                let cols = c * bk..((c + 1) * bk).min(k);
                let mut amax = 0f32;
                for r in 0..rows {
                    for v in &w[r * k + cols.start..r * k + cols.end] {
                        amax = amax.max(v.abs());
                    }
                }
                let sc = prec.round(amax / E4M3_MAX);
                *s = if sc == 0.0 { prec.eps() } else { sc };
            }
            // per row and column block: one scale, a straight loop
            for (qr, wr) in q.chunks_mut(k).zip(w.chunks(k)) {
                for ((qc, wc), &sc) in qr.chunks_mut(bk).zip(wr.chunks(bk)).zip(s.iter()) {
                    encode_block(qc, wc, sc, prec);
                }
            }
        });
    (q, scales)
}

/// `q[j] = e4m3(round_prec(w[j] / scale))`. Under bf16 the rounded
/// quotient is a bf16, whose byte a 64 Ki-entry table gives (the same bytes
/// as [`f32_to_e4m3`], without its branches).
#[inline]
fn encode_block(q: &mut [u8], w: &[f32], scale: f32, prec: SourcePrecision) {
    match prec {
        SourcePrecision::Bf16 => {
            let lut = &*BF16_TO_E4M3;
            for (q, &v) in q.iter_mut().zip(w) {
                *q = lut[bf16_bits(v / scale) as usize];
            }
        }
        _ => {
            for (q, &v) in q.iter_mut().zip(w) {
                *q = f32_to_e4m3(prec.round(v / scale));
            }
        }
    }
}

/// The bf16 nearest to `x` (ties to even), as bits; NaN stays NaN.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The e4m3 byte of every bf16 value.
static BF16_TO_E4M3: LazyLock<Box<[u8; 65536]>> = LazyLock::new(|| {
    let mut t = Box::new([0u8; 65536]);
    for (b, q) in t.iter_mut().enumerate() {
        *q = f32_to_e4m3(f32::from_bits((b as u32) << 16));
    }
    t
});

/// The scale of a dynamic activation group whose largest magnitude is
/// `amax`: it maps `amax` to 448 (the floor keeps an all-zero group finite).
pub fn act_group_scale(amax: f32) -> f32 {
    amax.max(1e-10) / E4M3_MAX
}

/// Fake-quantizes `x` in place per group of `group` consecutive values, as a
/// dynamic per-token-group FP8 activation quantizer does (vLLM
/// `per_token_group_quant_fp8`, compressed-tensors dynamic `group`):
/// `s = max(amax, 1e-10) / 448`, `x ← e4m3(x / s) · s`.
pub fn fake_quant_fp8_groups(x: &mut [f32], group: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_features().avx512 {
        // SAFETY: the feature was detected at run time
        return unsafe { fake_quant_avx512(x, group) };
    }
    fake_quant(x, group)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fake_quant_avx512(x: &mut [f32], group: usize) {
    fake_quant(x, group)
}

/// The loops of [`fake_quant_fp8_groups`], written to vectorise: the
/// maximum over 16 lanes (`f32::max`'s NaN rule keeps a fold scalar; a
/// comparison skips NaN the same way), the rounding branch-free.
#[inline(always)]
fn fake_quant(x: &mut [f32], group: usize) {
    for g in x.chunks_mut(group.max(1)) {
        let mut lanes = [0f32; 16];
        let c = g.chunks_exact(16);
        let mut amax = c
            .remainder()
            .iter()
            .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        for v in c {
            for (m, v) in lanes.iter_mut().zip(v) {
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        for m in lanes {
            amax = amax.max(m);
        }
        let s = act_group_scale(amax);
        for v in g.iter_mut() {
            *v = round_to_e4m3(*v / s) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bf16_table_path_gives_the_scalar_bytes() {
        // every bf16 bit pattern, and quotients around them
        let mut x = 0x9E37_79B9u32;
        for b in 0..=u16::MAX {
            let v = f32::from_bits((b as u32) << 16);
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let w = [v, f32::from_bits(x), v * 1.0001];
            for s in [1.0f32, 0.37, 3.1e-3] {
                let mut fast = [0u8; 3];
                encode_block(&mut fast, &w, s, SourcePrecision::Bf16);
                for (f, &v) in fast.iter().zip(&w) {
                    let slow = f32_to_e4m3(SourcePrecision::Bf16.round(v / s));
                    let nan = |q: u8| q & 0x7f == 0x7f;
                    assert!(
                        *f == slow || (nan(*f) && nan(slow)),
                        "{v} / {s}: {f} vs {slow}"
                    );
                }
            }
        }
    }

    /// The vectorised quantizer gives the definition's values, bit for bit,
    /// on every path (a group's 16-lane body and its tail).
    #[test]
    fn fake_quant_matches_the_definition() {
        let mut r = 0x2545_F491u32;
        let x: Vec<f32> = (0..1000)
            .map(|i| {
                r ^= r << 13;
                r ^= r >> 17;
                r ^= r << 5;
                let v = (r >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                v * 10f32.powi(i % 7 - 3)
            })
            .collect();
        // a group with NaN, one with an infinity, one all zero
        let mut x = x;
        x[3] = f32::NAN;
        x[150] = f32::NEG_INFINITY;
        x[256..384].iter_mut().for_each(|v| *v = 0.0);
        for group in [128, 37, 16, 5, 1000] {
            let mut want = x.clone();
            for g in want.chunks_mut(group) {
                let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = act_group_scale(amax);
                g.iter_mut().for_each(|v| *v = round_to_e4m3(*v / s) * s);
            }
            let mut got = x.clone();
            fake_quant_fp8_groups(&mut got, group);
            let mut base = x.clone();
            fake_quant(&mut base, group);
            for ((g, b), w) in got.iter().zip(&base).zip(&want) {
                assert_eq!(g.to_bits(), w.to_bits(), "group {group}");
                assert_eq!(b.to_bits(), w.to_bits(), "group {group}");
            }
        }
    }

    #[test]
    fn every_finite_byte_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                assert_eq!(b & 0x7f, 0x7f);
                continue;
            }
            let back = f32_to_e4m3(v);
            // +0 and -0 keep their sign bit
            assert_eq!(back, b, "byte {b:#04x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    }

    #[test]
    fn rounding_is_nearest_even_and_saturating() {
        // between 1.0 (0x38) and 1.125 (0x39): the tie goes to the even 1.0
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.0626), 0x39);
        // between 1.125 and 1.25: the tie goes to the even 1.25 (0x3a)
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-1e9), 0xfe);
        assert_eq!(f32_to_e4m3(464.0), 0x7e);
        // subnormal tie: 1.5·2^-9 → 2·2^-9
        assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(f32_to_e4m3(0.5 * 2f32.powi(-9)), 0x00);
        // carry from the top subnormal into the min normal
        assert_eq!(f32_to_e4m3(7.6 * 2f32.powi(-9)), 0x08);
    }

    #[test]
    fn fast_rounding_agrees_with_the_byte_path() {
        let mut x = 1e-5f32;
        let mut n = 0;
        while x < 600.0 {
            for v in [x, -x, x * 1.0001, x * 0.9999] {
                let want = e4m3_to_f32(f32_to_e4m3(v));
                assert_eq!(round_to_e4m3(v).to_bits(), want.to_bits(), "{v}");
                n += 1;
            }
            x *= 1.0009;
        }
        // every midpoint between neighbours (the ties)
        for b in 0..0x7eu8 {
            let mid = (e4m3_to_f32(b) + e4m3_to_f32(b + 1)) / 2.0;
            assert_eq!(
                round_to_e4m3(mid),
                e4m3_to_f32(f32_to_e4m3(mid)),
                "tie {mid}"
            );
        }
        assert_eq!(round_to_e4m3(0.0).to_bits(), 0);
        assert!(n > 10_000);
    }

    #[test]
    fn block_quantization_is_exact_on_representable_blocks() {
        // values that are e4m3 numbers times a power-of-two scale survive exactly
        let (n, k) = (3, 5);
        let w: Vec<f32> = (0..n * k)
            .map(|i| e4m3_to_f32([0x30u8, 0xb8, 0x7e, 0x11, 0x44][i % 5]) * 0.25)
            .collect();
        let (q, s) = quantize_fp8_block(&w, n, k, 128, 128, SourcePrecision::F32);
        assert_eq!(s.len(), 1);
        for (i, &b) in q.iter().enumerate() {
            assert_eq!(e4m3_to_f32(b) * s[0], w[i]);
        }
    }
}
