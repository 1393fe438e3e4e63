//! With the `cuda` feature, compiles kernels/*.cu to PTX with nvcc (from
//! `CUDA_HOME/bin` or PATH) for `CUDA_COMPUTE_CAP` (default 80; PTX is JIT-
//! compiled by the driver for newer GPUs). Without it, does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    // the tensor-core kernels exist in the PTX only for sm_80 and newer
    println!("cargo:rustc-check-cfg=cfg(moe_wmma)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    if cap.parse::<u32>().is_ok_and(|c| c >= 80) {
        println!("cargo:rustc-cfg=moe_wmma");
    }
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // one PTX module per .cu file; the FP8 tensor-core kernels need sm_89
    let cap_n: u32 = cap.parse().unwrap_or(80);
    let kernels = [
        ("moe_ops", cap_n),
        ("moe_gemm", cap_n),
        ("moe_fp8_mma", cap_n.max(89)),
    ];
    for (name, arch) in kernels {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-Ikernels"])
            .arg(format!("-arch=sm_{arch}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {src} ({s})"),
            Err(e) => panic!(
                "cannot run nvcc ({}): {e}; set CUDA_HOME or PATH (see README, CUDA)",
                nvcc.display()
            ),
        }
    }
}
