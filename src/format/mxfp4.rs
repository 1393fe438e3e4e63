//! MXFP4 (OCP microscaling): e2m1 elements, two per byte (low nibble = even
//! element), one e8m0 scale `2^(e − 127)` per 32 consecutive elements of a row.
//!
//! Quantization follows compressed-tensors (llm-compressor's MXFP4A16): the
//! group's amax is rounded to a power of two (up only when its significand is
//! ≥ 1.75), the scale exponent is that power minus 2 (6 = 1.5·2²), and the
//! elements are rounded to nearest e2m1 with ties to even, saturating at ±6.

use super::float_rows::FloatRows;

/// e2m1 magnitudes by 3-bit code.
pub const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
pub const MX_GROUP: usize = 32;

#[inline]
pub fn e2m1_to_f32(nibble: u8) -> f32 {
    let v = E2M1_VALUES[(nibble & 7) as usize];
    if nibble & 8 != 0 {
        -v
    } else {
        v
    }
}

/// `2^(e − 127)`; byte 255 is NaN (rejected at load).
#[inline]
pub fn e8m0_to_f32(e: u8) -> f32 {
    if e == 255 {
        f32::NAN
    } else {
        2f32.powi(e as i32 - 127)
    }
}

/// Nearest e2m1 code (ties to even), saturating at ±6; the sign bit follows
/// the sign of `x` (negative values that round to zero give `-0`, as
/// compressed-tensors' packer does).
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = x.abs();
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if x.is_sign_negative() {
        code | 8
    } else {
        code
    }
}

/// The e8m0 scale exponent compressed-tensors picks for a group with this
/// amax: `floor(log2(round_to_power_2(amax))) − 2 + 127`, clamped to `0..=254`.
pub fn mx_scale_exponent(amax: f32) -> u8 {
    // round_to_power_2 on the f32 bits: add half of the e2m1 mantissa step
    // below the dropped bits, keep sign and exponent
    let p2 = (amax.abs().to_bits().wrapping_add(1 << 21)) >> 23;
    let field = (p2 & 0xff) as i32;
    if field == 0 {
        return 0; // log2(0) = -inf, clamped to the smallest scale
    }
    (field - 2).clamp(0, 254) as u8
}

/// Quantizes a row-major `[n, k]` matrix (`k` a multiple of 32): returns the
/// packed bytes `[n, k/2]` and the e8m0 scales `[n, k/32]`.
pub fn quantize_mxfp4(w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    quantize_mxfp4_rows(FloatRows::F32(w), n, k)
}

/// [`quantize_mxfp4`] reading the weights as stored: each task widens its
/// own groups.
pub fn quantize_mxfp4_rows(w: FloatRows<'_>, n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    use rayon::prelude::*;
    assert!(k.is_multiple_of(MX_GROUP), "quantize_mxfp4: k = {k}");
    assert_eq!(w.len(), n * k, "quantize_mxfp4: {} != {n}x{k}", w.len());
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * k / MX_GROUP];
    const TASK: usize = 1024; // groups per rayon task
    packed
        .par_chunks_mut(TASK * MX_GROUP / 2)
        .zip(scales.par_chunks_mut(TASK))
        .enumerate()
        .for_each(|(t, (p, s))| {
            let mut wb = vec![0f32; p.len() * 2];
            w.read(t * TASK * MX_GROUP, &mut wb);
            for ((g, s), p) in wb.chunks(MX_GROUP).zip(s).zip(p.chunks_mut(MX_GROUP / 2)) {
                let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                *s = mx_scale_exponent(amax);
                let inv = e8m0_to_f32(*s);
                for (pair, b) in g.chunks(2).zip(p) {
                    let lo = f32_to_e2m1((pair[0] / inv).clamp(-6.0, 6.0));
                    let hi = f32_to_e2m1((pair[1] / inv).clamp(-6.0, 6.0));
                    *b = lo | (hi << 4);
                }
            }
        });
    (packed, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in 0..16u8 {
            let v = e2m1_to_f32(c);
            assert_eq!(f32_to_e2m1(v), c, "code {c}");
        }
    }

    #[test]
    fn ties_go_to_even_codes() {
        for (x, want) in [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (5.01, 7),
            (100.0, 7),
        ] {
            assert_eq!(f32_to_e2m1(x), want, "{x}");
        }
    }

    #[test]
    fn scale_rule_matches_compressed_tensors() {
        // amax 6 (1.5·2²) → 2^(2−2) = 1; amax 1.75·2² rounds up to 2³ → 2^1
        assert_eq!(mx_scale_exponent(6.0), 127);
        assert_eq!(mx_scale_exponent(7.0), 128);
        assert_eq!(mx_scale_exponent(1.7), 125);
        assert_eq!(mx_scale_exponent(0.0), 0);
    }

    #[test]
    fn representable_groups_are_exact() {
        let k = 64;
        let w: Vec<f32> = (0..2 * k)
            .map(|i| e2m1_to_f32((i % 16) as u8) * if i < k { 1.0 } else { 0.125 })
            .collect();
        let (p, s) = quantize_mxfp4(&w, 2, k);
        for (i, &v) in w.iter().enumerate() {
            let nib = (p[i / 2] >> (4 * (i % 2))) & 0xf;
            let got = e2m1_to_f32(nib) * e8m0_to_f32(s[i / 32]);
            assert_eq!(got, v, "element {i}");
        }
    }
}
