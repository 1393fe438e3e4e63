//! Every CUDA kernel (kernels/*.cu) compiled as host C++ under a CUDA
//! emulation (kernels/emu/) and checked against double-precision references,
//! so their tiling, fragment layouts, scales and epilogues are proven on
//! machines without a GPU. Needs a C++20 compiler (`CXX`, default g++), as
//! building Rust on Linux does.

use std::process::Command;

#[test]
fn cuda_kernels_match_references_under_emulation() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::env::temp_dir().join(format!("candle-moe-kernel-emu-{}", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing"])
        .arg(format!("-I{root}/kernels/emu/include"))
        .arg(format!("-I{root}/kernels"))
        .arg(format!("{root}/kernels/emu/check.cpp"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx}: {e}"));
    assert!(
        build.status.success(),
        "{cxx} failed on kernels/emu/check.cpp:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&out)
        .output()
        .expect("run the emulated kernels");
    let _ = std::fs::remove_file(&out);
    let log = String::from_utf8_lossy(&run.stdout);
    println!("{log}");
    assert!(
        run.status.success(),
        "emulated kernels disagree with their references:\n{log}"
    );
    // every check ran: codec, gemv x5, tc64 x4, (quant + fp8 mma) x2, topk +
    // router weights x2, align x2, simt x10, wmma16 x2, act x3, sums x2, quant
    let ok = log.lines().filter(|l| l.starts_with("ok")).count();
    assert_eq!(ok, 38, "{log}");
}
