//! The x86 vector extensions the CPU kernels may use: detected once, and
//! capped by the `CANDLE_MOE_ISA` environment variable so that the narrower
//! paths run (and are tested) on a wider CPU. A cap only removes features,
//! so every `target_feature` function called under these flags is sound.
//!
//! `CANDLE_MOE_ISA`:
//! - `portable`: no SIMD kernels (the loops any CPU runs);
//! - `avx2`: AVX2 + FMA + F16C;
//! - `avx512`: and AVX-512 F/BW/VL, without BF16 (Skylake-X, Ice Lake);
//! - `avx512-bf16`: and AVX-512 BF16, with the `vdpbf16ps` kernels preferred
//!   over 512-bit FMAs without timing them (the choice AMD Zen 4 makes);
//! - unset or `native`: everything the CPU has, the choice timed.

use std::sync::OnceLock;

/// What `CANDLE_MOE_ISA` allows, widest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaCap {
    Portable,
    Avx2,
    Avx512,
    Avx512Bf16,
    Native,
}

impl IsaCap {
    /// The cap a `CANDLE_MOE_ISA` value names (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => IsaCap::Portable,
            "avx2" => IsaCap::Avx2,
            "avx512" => IsaCap::Avx512,
            "avx512-bf16" | "avx512bf16" => IsaCap::Avx512Bf16,
            "" | "native" => IsaCap::Native,
            _ => return None,
        })
    }
}

/// Feature sets the kernels are compiled for, each implying the ones above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2 + FMA + F16C.
    pub avx2: bool,
    /// AVX-512 F/BW/VL (with `avx2`).
    pub avx512: bool,
    /// AVX-512 BF16 (with `avx512`).
    pub avx512bf16: bool,
    /// Prefer `vdpbf16ps` to 512-bit FMAs without timing (`avx512-bf16`).
    pub prefer_dpbf16: bool,
}

impl CpuFeatures {
    /// What this CPU has.
    pub fn hardware() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            CpuFeatures {
                avx2,
                avx512,
                avx512bf16: avx512 && is_x86_feature_detected!("avx512bf16"),
                prefer_dpbf16: false,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures {
                avx2: false,
                avx512: false,
                avx512bf16: false,
                prefer_dpbf16: false,
            }
        }
    }

    /// These features without the ones above `cap` (never adds one).
    pub fn capped(self, cap: IsaCap) -> Self {
        let avx512bf16 = self.avx512bf16 && cap >= IsaCap::Avx512Bf16;
        CpuFeatures {
            avx2: self.avx2 && cap >= IsaCap::Avx2,
            avx512: self.avx512 && cap >= IsaCap::Avx512,
            avx512bf16,
            prefer_dpbf16: avx512bf16 && (self.prefer_dpbf16 || cap == IsaCap::Avx512Bf16),
        }
    }
}

/// The features the kernels use: the hardware's, capped by `CANDLE_MOE_ISA`
/// (read once; an unknown value is reported on stderr and ignored).
pub fn cpu_features() -> CpuFeatures {
    static F: OnceLock<CpuFeatures> = OnceLock::new();
    *F.get_or_init(|| {
        let cap = match std::env::var("CANDLE_MOE_ISA") {
            Err(_) => IsaCap::Native,
            Ok(v) => IsaCap::parse(&v).unwrap_or_else(|| {
                eprintln!(
                    "CANDLE_MOE_ISA={v:?} is not one of portable, avx2, avx512, avx512-bf16, \
                     native: ignored"
                );
                IsaCap::Native
            }),
        };
        CpuFeatures::hardware().capped(cap)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CpuFeatures = CpuFeatures {
        avx2: true,
        avx512: true,
        avx512bf16: true,
        prefer_dpbf16: false,
    };

    #[test]
    fn caps_remove_features_and_never_add_them() {
        let f = |a, b, c, d| CpuFeatures {
            avx2: a,
            avx512: b,
            avx512bf16: c,
            prefer_dpbf16: d,
        };
        assert_eq!(ALL.capped(IsaCap::Portable), f(false, false, false, false));
        assert_eq!(ALL.capped(IsaCap::Avx2), f(true, false, false, false));
        assert_eq!(ALL.capped(IsaCap::Avx512), f(true, true, false, false));
        assert_eq!(ALL.capped(IsaCap::Avx512Bf16), f(true, true, true, true));
        assert_eq!(ALL.capped(IsaCap::Native), ALL);
        let avx2_cpu = f(true, false, false, false);
        for cap in [IsaCap::Avx512, IsaCap::Avx512Bf16, IsaCap::Native] {
            assert_eq!(avx2_cpu.capped(cap), avx2_cpu, "{cap:?}");
        }
    }

    #[test]
    fn parses_the_documented_values() {
        assert_eq!(IsaCap::parse("AVX2"), Some(IsaCap::Avx2));
        assert_eq!(IsaCap::parse("avx512-bf16"), Some(IsaCap::Avx512Bf16));
        assert_eq!(IsaCap::parse(" portable "), Some(IsaCap::Portable));
        assert_eq!(IsaCap::parse("native"), Some(IsaCap::Native));
        assert_eq!(IsaCap::parse("sse9"), None);
    }

    /// The process-wide features follow the environment (CI runs the
    /// suites with each cap).
    #[test]
    fn follows_the_environment() {
        let cap = std::env::var("CANDLE_MOE_ISA")
            .ok()
            .and_then(|v| IsaCap::parse(&v))
            .unwrap_or(IsaCap::Native);
        assert_eq!(cpu_features(), CpuFeatures::hardware().capped(cap));
    }
}
