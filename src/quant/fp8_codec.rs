//! FP8 e4m3 (`float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits,
//! no infinities, `S.1111.111` is NaN, largest finite 448.
//!
//! Encoding rounds to nearest, ties to even, after clamping to ±448 — what
//! compressed-tensors does (`clamp` then `tensor.to(float8_e4m3fn)`), so on-load
//! quantization produces the bytes llm-compressor would write.

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
    #[inline]
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
    assert_eq!(w.len(), n * k, "quantize_fp8_block: {} != {n}x{k}", w.len());
    let (nb, kb) = (n.div_ceil(bn), k.div_ceil(bk));
    let mut scales = vec![0f32; nb * kb];
    for (i, s) in scales.iter_mut().enumerate() {
        let (r, c) = (i / kb, i % kb);
        let mut amax = 0f32;
        for row in r * bn..((r + 1) * bn).min(n) {
            for v in &w[row * k + c * bk..row * k + ((c + 1) * bk).min(k)] {
                amax = amax.max(v.abs());
            }
        }
        let sc = prec.round(amax / E4M3_MAX);
        *s = if sc == 0.0 { prec.eps() } else { sc };
    }
    let q = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = scales[(i / k / bn) * kb + (i % k) / bk];
            f32_to_e4m3(prec.round(v / s))
        })
        .collect();
    (q, scales)
}

/// Fake-quantizes `x` in place per group of `group` consecutive values, as a
/// dynamic per-token-group FP8 activation quantizer does (vLLM
/// `per_token_group_quant_fp8`, compressed-tensors dynamic `group`):
/// `s = max(amax, 1e-10) / 448`, `x ← e4m3(x / s) · s`.
pub fn fake_quant_fp8_groups(x: &mut [f32], group: usize) {
    for g in x.chunks_mut(group.max(1)) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax.max(1e-10) / E4M3_MAX;
        for v in g.iter_mut() {
            *v = e4m3_to_f32(f32_to_e4m3(*v / s)) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
