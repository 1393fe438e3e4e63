//! Weight formats, described once: the FP8 (e4m3) and MXFP4 (e2m1 + e8m0)
//! codecs, how their scales cover a matrix, and the tensor and slice forms
//! the ops read. A leaf: ops, quant and modular all depend on it, it on
//! nothing of theirs.

pub mod float_rows;
pub mod fp8;
pub mod mxfp4;
mod packed;

pub use packed::{ActQuant, Fp8Strategy, PackedMat, PackedWeights, WeightFormat};
