//! The C parameter lists of the CUDA kernels (kernels/*.cu), as kinds in
//! order: `*` pointer, `i` int, `f` float. `launch!` holds every launch to
//! its kernel's list (the count at compile time, the kinds before the
//! launch) and the test below holds the lists to the .cu sources, so an
//! argument list that drifts from its kernel fails without a GPU.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Router top-k (`moe_topk_select_*`, macro TOPK).
pub(crate) const TOPK: &str = "**i*iiiiii";
/// Routing weights of chosen experts (`moe_router_weights_*`, RW).
pub(crate) const ROUTER_WEIGHTS: &str = "***iiiiif";
/// `moe_align`.
pub(crate) const ALIGN: &str = "**i*iiiiii";
/// act(gate) · up (`moe_act_and_mul_*`, AM).
pub(crate) const ACT_AND_MUL: &str = "**iii";
/// Weighted top-k sum (`moe_weighted_sum_*`, WS).
pub(crate) const WEIGHTED_SUM: &str = "**i*iii";
/// FP8 quantize-dequantize per token group (`moe_fp8_group_quant_*`, FQ).
pub(crate) const FP8_GROUP_QUANT: &str = "**iii";
/// SIMT (`moe_gemm_f32_*`, GG), GEMV (`moe_gemv_*`, GV) and 64-row
/// tensor-core (`moe_gemm_tc64_*`, TC) grouped GEMMs.
pub(crate) const GEMM: &str = "*****i*i*iiiiiiiiii";
/// 16-row WMMA grouped GEMM (`moe_gemm_wmma_*`, GGW).
pub(crate) const GEMM_WMMA: &str = "****i*i*iiiiiii";
/// FP8 tensor-core grouped GEMM (`moe_gemm_fp8_mma_m*`, F8).
pub(crate) const GEMM_FP8_MMA: &str = "******i*i*iiiiiiiii";
/// Activations to e4m3 bytes and group scales (`moe_fp8_group_quant_bytes_*`, FQB).
pub(crate) const FP8_QUANT_BYTES: &str = "***iii";

#[cfg(test)]
mod tests {
    /// The parameter kinds of the kernel(s) `name` defines in `file`: a
    /// `#define name(NAME, ...)` template or a plain `void name(`.
    fn kernel_kinds(file: &str, name: &str) -> String {
        let path = format!("{}/kernels/{file}", env!("CARGO_MANIFEST_DIR"));
        let src = std::fs::read_to_string(&path).unwrap();
        let (at, open) = match src.find(&format!("#define {name}(")) {
            Some(at) => (at, "NAME("),
            None => (
                src.find(&format!("void {name}("))
                    .unwrap_or_else(|| panic!("{file}: no kernel {name}")),
                "(",
            ),
        };
        let body = &src[at..];
        let from = body.find(open).unwrap() + open.len();
        let to = from + body[from..].find(')').unwrap();
        body[from..to]
            .split(',')
            .map(|p| {
                let p = p.replace('\\', "");
                if p.contains('*') {
                    '*'
                } else if p.trim().starts_with("float") {
                    'f'
                } else {
                    'i'
                }
            })
            .collect()
    }

    #[test]
    fn signatures_match_the_kernels() {
        for (file, name, sig) in [
            ("moe_ops.cu", "TOPK", super::TOPK),
            ("moe_ops.cu", "RW", super::ROUTER_WEIGHTS),
            ("moe_ops.cu", "moe_align", super::ALIGN),
            ("moe_ops.cu", "AM", super::ACT_AND_MUL),
            ("moe_ops.cu", "WS", super::WEIGHTED_SUM),
            ("moe_ops.cu", "FQ", super::FP8_GROUP_QUANT),
            ("moe_ops.cu", "GG", super::GEMM),
            ("moe_gemm.cu", "GV", super::GEMM),
            ("moe_gemm.cu", "TC", super::GEMM),
            ("moe_ops.cu", "GGW", super::GEMM_WMMA),
            ("moe_fp8_mma.cu", "F8", super::GEMM_FP8_MMA),
            ("moe_fp8_mma.cu", "FQB", super::FP8_QUANT_BYTES),
        ] {
            assert_eq!(kernel_kinds(file, name), sig, "{file} {name}");
        }
    }
}
