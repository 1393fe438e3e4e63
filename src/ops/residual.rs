//! Residual sums over `[.., H]` rows: `a + b`, and `a + b · σ(g)` with one
//! gate logit per row (Qwen2-MoE's gated shared expert). Each sum is taken
//! in f32 and rounded once to the inputs' dtype.
//!
//! On CPU they replace candle's binary ops, which hand tensors of 64 Ki
//! elements or more to candle's own spinning thread pool: one `[64, 2048]`
//! bf16 add took 1.7–2.6 ms there, four of them per layer of a prompt. Here
//! rows go to rayon in chunks (the kernels' pool), or run inline when small.
//! Other devices use candle's ops.

use super::contiguous;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Elements per task (on rayon from [`super::PAR_MIN_ELEMS`]).
const CHUNK: usize = 16 << 10;

/// A float element summed in f32.
trait Val: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}

impl Val for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
}

impl Val for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        super::bf16_to_f32(self)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        super::bf16_from_f32(v)
    }
}

impl Val for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `out = a + b · gate[row]` in chunks of whole rows.
fn sum_rows<T: Val>(a: &[T], b: &[T], h: usize, gate: Option<&[f32]>) -> Vec<T> {
    let mut out = vec![T::put(0.0); a.len()];
    if h == 0 {
        return out;
    }
    let rows = (CHUNK / h).max(1);
    super::for_chunks(&mut out, rows * h, |ci, o| {
        let base = ci * rows * h;
        let (a, b) = (&a[base..base + o.len()], &b[base..base + o.len()]);
        for (r, ((o, a), b)) in o
            .chunks_mut(h)
            .zip(a.chunks(h))
            .zip(b.chunks(h))
            .enumerate()
        {
            match gate {
                Some(g) => {
                    let g = g[ci * rows + r];
                    for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
                        *o = T::put(x.get() + y.get() * g);
                    }
                }
                None => {
                    for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
                        *o = T::put(x.get() + y.get());
                    }
                }
            }
        }
    });
    out
}

/// Both operands as slices of one dtype, `a`'s row width, and the sums.
fn run(
    (sa, la): (&CpuStorage, &Layout),
    (sb, lb): (&CpuStorage, &Layout),
    gate: Option<&[f32]>,
    name: &str,
) -> Result<(CpuStorage, Shape)> {
    if la.shape() != lb.shape() {
        bail!(
            "{name}: operands shaped {:?} and {:?}",
            la.shape(),
            lb.shape()
        )
    }
    let dims = la.shape().dims();
    let h = dims.last().copied().unwrap_or(1);
    if let Some(g) = gate {
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if g.len() != rows {
            bail!("{name}: {} gate logits for {rows} rows", g.len())
        }
    }
    let (lhs, rhs) = (format!("{name} lhs"), format!("{name} rhs"));
    let out = match (sa, sb) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(sum_rows(
            contiguous::<f32>(sa, la, &lhs)?,
            contiguous::<f32>(sb, lb, &rhs)?,
            h,
            gate,
        )),
        (CpuStorage::BF16(_), CpuStorage::BF16(_)) => CpuStorage::BF16(sum_rows(
            contiguous::<bf16>(sa, la, &lhs)?,
            contiguous::<bf16>(sb, lb, &rhs)?,
            h,
            gate,
        )),
        (CpuStorage::F16(_), CpuStorage::F16(_)) => CpuStorage::F16(sum_rows(
            contiguous::<f16>(sa, la, &lhs)?,
            contiguous::<f16>(sb, lb, &rhs)?,
            h,
            gate,
        )),
        _ => bail!(
            "{name}: operands are {:?} and {:?}, expected one of f32, bf16, f16 for both",
            sa.dtype(),
            sb.dtype()
        ),
    };
    Ok((out, la.shape().clone()))
}

#[derive(Clone, Copy, Debug)]
struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "residual-add"
    }
    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        run((sa, la), (sb, lb), None, "residual_add")
    }
}

#[derive(Clone, Copy, Debug)]
struct GatedResidualAdd;

impl CustomOp3 for GatedResidualAdd {
    fn name(&self) -> &'static str {
        "gated-residual-add"
    }
    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = super::to_f32_cow(sg, lg, "gated_residual_add gate")?;
        // σ once per row, in f32
        let g: Vec<f32> = g.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
        run((sa, la), (sb, lb), Some(&g), "gated_residual_add")
    }
}

/// `a + b` (same shape and dtype; strided operands are copied first).
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() {
        return a + b;
    }
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &ResidualAdd)
}

/// `a + b · σ(g)` for `a`, `b` of shape `[.., H]` and one gate logit per
/// row (`g` of shape `[.., 1]` or `[..]`, any float dtype).
pub fn gated_residual_add(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() {
        let g = candle_nn::ops::sigmoid(g)?;
        let g = g.reshape(
            b.dims()[..b.rank().saturating_sub(1)]
                .iter()
                .copied()
                .chain([1])
                .collect::<Vec<_>>(),
        )?;
        return a + b.broadcast_mul(&g.to_dtype(b.dtype())?)?;
    }
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &g.contiguous()?, &GatedResidualAdd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn vals(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Against the sums written out per element, over row counts that run
    /// inline and in rayon chunks (a partial last chunk), in every dtype.
    #[test]
    fn sums_match_reference() {
        let dev = Device::Cpu;
        for (rows, h) in [(1usize, 7usize), (3, 2048), (37, 1000)] {
            let a = crate::ops::gemm_cpu::test_rand(rows * h, 1);
            let b = crate::ops::gemm_cpu::test_rand(rows * h, 2);
            let g: Vec<f32> = (0..rows).map(|r| r as f32 * 0.7 - 3.0).collect();
            for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
                let ta = Tensor::from_vec(a.clone(), (rows, h), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let tb = Tensor::from_vec(b.clone(), (rows, h), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let tg = Tensor::from_vec(g.clone(), (rows, 1), &dev).unwrap();
                let (ra, rb) = (vals(&ta), vals(&tb));
                let plain = vals(&residual_add(&ta, &tb).unwrap());
                let gated = vals(&gated_residual_add(&ta, &tb, &tg).unwrap());
                for i in 0..rows * h {
                    let s = 1.0 / (1.0 + (-g[i / h]).exp());
                    let (p, q) = (ra[i] + rb[i], ra[i] + rb[i] * s);
                    assert!(
                        (plain[i] - p).abs() <= tol * (1.0 + p.abs()),
                        "{dt:?} add [{i}]"
                    );
                    assert!(
                        (gated[i] - q).abs() <= tol * (1.0 + q.abs()),
                        "{dt:?} gated [{i}]"
                    );
                }
            }
        }
    }

    /// Gates shaped `[T]` and `[B, S, 1]`, and a transposed (strided) operand.
    #[test]
    fn gate_shapes_and_strided_operands() {
        let dev = Device::Cpu;
        let (b_, s_, h) = (2usize, 3usize, 5usize);
        let a = crate::ops::gemm_cpu::test_rand(b_ * s_ * h, 3);
        let b = crate::ops::gemm_cpu::test_rand(b_ * s_ * h, 4);
        let g: Vec<f32> = (0..b_ * s_).map(|r| r as f32 - 2.0).collect();
        let ta = Tensor::from_vec(a.clone(), (b_, s_, h), &dev).unwrap();
        let tb = Tensor::from_vec(b.clone(), (b_, s_, h), &dev).unwrap();
        let want: Vec<f32> = (0..a.len())
            .map(|i| a[i] + b[i] / (1.0 + (-g[i / h]).exp()))
            .collect();
        for tg in [
            Tensor::from_vec(g.clone(), (b_, s_, 1), &dev).unwrap(),
            Tensor::from_vec(g.clone(), b_ * s_, &dev).unwrap(),
        ] {
            let got = vals(&gated_residual_add(&ta, &tb, &tg).unwrap());
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "[{i}] {x} vs {y}");
            }
        }
        // a transposed operand: the sum follows the logical layout
        let tt = Tensor::from_vec(b.clone(), (h, b_ * s_), &dev)
            .unwrap()
            .t()
            .unwrap();
        let ta2 = ta.reshape((b_ * s_, h)).unwrap();
        let got = vals(&residual_add(&ta2, &tt).unwrap());
        for r in 0..b_ * s_ {
            for c in 0..h {
                let want = a[r * h + c] + b[c * b_ * s_ + r];
                assert!((got[r * h + c] - want).abs() <= 1e-6, "[{r}, {c}]");
            }
        }
    }

    #[test]
    fn bad_operands_are_errors() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let e = residual_add(&a, &b).unwrap_err().to_string();
        assert!(e.contains("residual_add") && e.contains("shaped"), "{e}");
        let c = Tensor::zeros((2, 4), DType::BF16, &dev).unwrap();
        let e = residual_add(&a, &c).unwrap_err().to_string();
        assert!(e.contains("BF16"), "{e}");
        let g = Tensor::zeros((3, 1), DType::F32, &dev).unwrap();
        let e = gated_residual_add(&a, &a, &g).unwrap_err().to_string();
        assert!(e.contains("gate logits"), "{e}");
    }
}
