//! Dense linear `y = x · Wᵀ (+ b)` with `W [N, K]` read as stored: f32 / bf16 /
//! f16, or packed FP8 / MXFP4 (the formats of [`PackedWeights`]). The engines
//! are the grouped GEMM's (one weight matrix, every row), so a decode step
//! reads each weight byte once and prefill runs the packed FMA tiles; no
//! routing is built per call.
//!
//! CPU: rayon over (row chunk × column tile). Other devices: candle's matmul
//! for float weights, the one-expert grouped GEMM for packed ones.

use super::gemm_cpu::quant::{qgemm_tile, QTile};
use super::gemm_cpu::{gemm_tile, Tile, WeightElem, SKINNY_MAX_ROWS};
use super::grouped_gemm::{f32_field, packed_bytes, quant_mats, slice};
use super::{contiguous, f32_to_storage, for_chunks, to_f32_cow, SendPtr};
use crate::format::fp8::fake_quant_fp8_groups;
use crate::format::PackedWeights;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// How one dense linear reads its weight and input.
#[derive(Clone, Debug, Default)]
pub struct LinearArgs {
    /// `[N]` bias (any float dtype), added in f32.
    pub bias: Option<Tensor>,
    /// Set when the weight is packed FP8 (`[N, K]` bytes) or MXFP4 (`[N, K/2]`).
    pub quant: Option<PackedWeights>,
    /// Quantize the input to FP8 per token per group of this many columns
    /// first (dynamic W8A8, as the checkpoint's runtime does).
    pub act_quant_group: Option<usize>,
}

#[derive(Clone, Debug)]
struct DenseLinear {
    args: LinearArgs,
}

/// Rows of a row chunk of the packed kernel (its panel is reused this often).
const ROW_CHUNK: usize = 96;

/// A tile: input rows, columns `n0..n1`, output rows.
type RowTileFn<'a> = dyn Fn(&[*const f32], usize, usize, &[*mut f32]) + Sync + 'a;

/// Runs `tile(rows, n0, n1, out_rows)` over (row chunk × column tile).
fn run_tiles(a: &[f32], k: usize, n: usize, row_bytes: usize, tile: &RowTileFn<'_>) -> Vec<f32> {
    let m = a.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let (mb, nb) = if m <= SKINNY_MAX_ROWS {
        // ~256 KiB of weights per task: long enough to hide scheduling,
        // short enough to balance the threads
        (m, ((256 << 10) / row_bytes.max(1)).clamp(16, 512))
    } else {
        (ROW_CHUNK, 128)
    };
    let items: Vec<(usize, usize)> = (0..m)
        .step_by(mb)
        .flat_map(|r0| (0..n).step_by(nb).map(move |n0| (r0, n0)))
        .collect();
    let out_ptr = SendPtr(out.as_mut_ptr());
    items.into_par_iter().for_each(|(r0, n0)| {
        let (r1, n1) = ((r0 + mb).min(m), (n0 + nb).min(n));
        let ap: Vec<*const f32> = (r0..r1).map(|r| a[r * k..].as_ptr()).collect();
        // SAFETY: (row chunk, column tile) regions of `out` are disjoint and
        // in bounds (r < m, n1 ≤ n).
        let cp: Vec<*mut f32> = (r0..r1)
            .map(|r| unsafe { out_ptr.get().add(r * n + n0) })
            .collect();
        tile(&ap, n0, n1, &cp);
    });
    out
}

/// bf16 weights, fewer rows than the packed kernels take
/// ([`bf16_decode_takes`]): the rows are prepared for the decode kernel
/// once (even/odd order for the FMA kernel, split into bf16 parts for the
/// `vdpbf16ps` one), not once per column tile.
#[cfg(target_arch = "x86_64")]
fn bf16_decode(a: &[f32], k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    use super::gemm_cpu::{bf16_avx512, bf16_fma};
    let m = a.len().checked_div(k).unwrap_or(0);
    let ap: Vec<*const f32> = (0..m).map(|r| a[r * k..].as_ptr()).collect();
    // every tile of the decode path holds all m rows (run_tiles: one row
    // chunk, m < ROW_CHUNK), so the rows prepared here are the tile's
    if bf16_fma::takes(m) {
        // SAFETY: the rows are k long in `a`; `takes` checked the features
        let rows = unsafe { bf16_fma::prepare(&ap, k) };
        return run_tiles(a, k, n, 2 * k, &|ap, n0, n1, cp| {
            let t = Tile {
                a: ap,
                w,
                k,
                n0,
                n1,
                c: cp,
            };
            // SAFETY: as in `dense`; `rows` are the tile's rows prepared
            unsafe { bf16_fma::gemm_prepared(&t, &rows) }
        });
    }
    // SAFETY: the rows are k long in `a`; the caller checked the features
    let (rows, res) = unsafe { bf16_avx512::split_rows(&ap, k) };
    run_tiles(a, k, n, 2 * k, &|ap, n0, n1, cp| {
        let t = Tile {
            a: ap,
            w,
            k,
            n0,
            n1,
            c: cp,
        };
        // SAFETY: as in `dense`; `rows` are the tile's rows split
        unsafe { bf16_avx512::skinny_split(&t, &rows, res) }
    })
}

/// Whether `m` rows over bf16 weights take [`bf16_decode`].
#[cfg(target_arch = "x86_64")]
fn bf16_decode_takes(m: usize) -> bool {
    use super::gemm_cpu::{bf16_avx512, bf16_fma};
    bf16_fma::takes(m) || (m <= SKINNY_MAX_ROWS && bf16_avx512::available())
}

fn dense<W: WeightElem>(a: &[f32], k: usize, w: &[W], n: usize) -> Vec<f32> {
    run_tiles(a, k, n, k * std::mem::size_of::<W>(), &|ap, n0, n1, cp| {
        // SAFETY: `w` holds n·k elements (checked by the caller); `ap` rows
        // are k long; `cp` rows are disjoint (run_tiles).
        unsafe {
            gemm_tile(&Tile {
                a: ap,
                w,
                k,
                n0,
                n1,
                c: cp,
            })
        }
    })
}

impl DenseLinear {
    /// The f32-activation path: every weight format, any row count.
    fn f32_input(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        (m, n, k): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut a = to_f32_cow(sx, lx, "linear input")?;
        if let Some(group) = self.args.act_quant_group {
            if group == 0 {
                bail!("linear: activation quant group size 0")
            }
            if k > 0 {
                for_chunks(a.to_mut(), k, |_, row| fake_quant_fp8_groups(row, group));
            }
        }
        Ok(match &self.args.quant {
            Some(quant) => {
                let w = packed_bytes(sw, lw)?;
                let st = quant.scales().storage_and_layout();
                let Storage::Cpu(sc) = &*st.0 else {
                    bail!("linear: weight scales must be on the cpu like the weight")
                };
                let mats = quant_mats(quant, sc, st.1, w, 1, n, k)?;
                let wm = mats[0];
                run_tiles(&a, k, n, wm.row_bytes(), &|ap, n0, n1, cp| {
                    // SAFETY: `wm` passed PackedMat::check in quant_mats; rows and
                    // outputs as in `dense`.
                    unsafe {
                        qgemm_tile(&QTile {
                            a: ap,
                            act_group: self.args.act_quant_group,
                            w: wm,
                            n0,
                            n1,
                            c: cp,
                        })
                    }
                })
            }
            None => match sw.dtype() {
                DType::F32 => dense(&a, k, contiguous::<f32>(sw, lw, "linear weight")?, n),
                #[cfg(target_arch = "x86_64")]
                DType::BF16 if bf16_decode_takes(m) => {
                    bf16_decode(&a, k, contiguous::<bf16>(sw, lw, "linear weight")?, n)
                }
                DType::BF16 => dense(&a, k, contiguous::<bf16>(sw, lw, "linear weight")?, n),
                DType::F16 => dense(&a, k, contiguous::<f16>(sw, lw, "linear weight")?, n),
                dt => bail!("linear: unsupported weight dtype {dt:?}"),
            },
        })
    }
}

/// bf16 × bf16 prefill on AVX-512 BF16: rayon over (row chunk × 128-column
/// tile), each tile packed once per row chunk.
#[cfg(target_arch = "x86_64")]
fn bf16_prefill(x: &[bf16], w: &[bf16], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let nb = 4 * super::gemm_cpu::bf16_packed::STRIP;
    let items: Vec<(usize, usize)> = (0..m)
        .step_by(ROW_CHUNK)
        .flat_map(|r0| (0..n).step_by(nb).map(move |n0| (r0, n0)))
        .collect();
    let out_ptr = SendPtr(out.as_mut_ptr());
    items.into_par_iter().for_each(|(r0, n0)| {
        let (r1, n1) = ((r0 + ROW_CHUNK).min(m), (n0 + nb).min(n));
        let ap: Vec<*const bf16> = (r0..r1).map(|r| x[r * k..].as_ptr()).collect();
        // SAFETY: disjoint in-bounds output regions per item (as run_tiles);
        // rows are k bf16 with k even (checked by the caller); the caller
        // checked the CPU features.
        let cp: Vec<*mut f32> = (r0..r1)
            .map(|r| unsafe { out_ptr.get().add(r * n + n0) })
            .collect();
        unsafe { super::gemm_cpu::bf16_packed::gemm(&ap, w, (n, k), (n0, n1), &cp) }
    });
    out
}

/// Unused off x86-64 (the caller never takes the path).
#[cfg(not(target_arch = "x86_64"))]
fn bf16_prefill(_: &[bf16], _: &[bf16], (m, n, _): (usize, usize, usize)) -> Vec<f32> {
    vec![0f32; m * n]
}

impl CustomOp2 for DenseLinear {
    fn name(&self) -> &'static str {
        "moe-dense-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, kw) = lw.shape().dims2()?;
        let k_w = self.args.quant.as_ref().map_or(kw, |q| q.k_of(kw));
        if k != k_w {
            bail!("linear: input has K = {k}, weight [{n}, {kw}] holds K = {k_w}")
        }
        #[cfg(target_arch = "x86_64")]
        let packed_bf16 = self.args.quant.is_none()
            && self.args.act_quant_group.is_none()
            && sx.dtype() == DType::BF16
            && sw.dtype() == DType::BF16
            && m >= super::gemm_cpu::bf16_packed_min_rows()
            && k % 2 == 0
            && super::gemm_cpu::bf16_avx512::available();
        #[cfg(not(target_arch = "x86_64"))]
        let packed_bf16 = false;
        let mut out = if packed_bf16 {
            bf16_prefill(
                contiguous::<bf16>(sx, lx, "linear input")?,
                contiguous::<bf16>(sw, lw, "linear weight")?,
                (m, n, k),
            )
        } else {
            self.f32_input(sx, lx, sw, lw, (m, n, k))?
        };
        // an f32 bias (as QLinear keeps it) is read in place, not copied
        let bias_t = f32_field(&self.args.bias, "linear bias", n)?;
        let bias_g = bias_t.as_ref().map(|t| t.storage_and_layout());
        if let (Some(b), true) = (slice(&bias_g, "linear bias")?, n > 0) {
            for_chunks(&mut out, n, |_, r| {
                r.iter_mut().zip(b).for_each(|(o, b)| *o += b)
            });
        }
        let shape = Shape::from((m, n));
        let dt = match sx.dtype() {
            dt @ (DType::BF16 | DType::F16) => dt,
            _ => DType::F32,
        };
        Ok((f32_to_storage(out, dt, "linear")?, shape))
    }
}

/// `x · Wᵀ (+ b)` over the last dimension of `x` (`[..., K]`), in `x`'s dtype;
/// `w` is `[N, K]` as stored (see [`LinearArgs`]).
pub fn linear(x: &Tensor, w: &Tensor, args: &LinearArgs) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("linear: scalar input")
    };
    let rows: usize = lead.iter().product();
    let n = w.dim(0)?;
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let y = if x.device().is_cpu() {
        x2.apply_op2_no_bwd(&w.contiguous()?, &DenseLinear { args: args.clone() })?
    } else {
        accel(&x2, w, args)?
    };
    let mut shape = lead.to_vec();
    shape.push(n);
    y.reshape(shape)
}

/// Off the CPU: candle's matmul for float weights, the one-expert grouped
/// GEMM (the CUDA kernels) for packed ones.
fn accel(x: &Tensor, w: &Tensor, args: &LinearArgs) -> Result<Tensor> {
    let dt = x.dtype();
    match &args.quant {
        None => {
            let w = if w.dtype() == dt {
                w.clone()
            } else {
                w.to_dtype(dt)?
            };
            let y = x.matmul(&w.t()?)?;
            match &args.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(dt)?),
                None => Ok(y),
            }
        }
        Some(quant) => {
            use super::{align_block_size, grouped_gemm, moe_align_block_size};
            let rows = x.dim(0)?;
            let ids = Tensor::zeros((rows, 1), DType::U32, x.device())?;
            let routing =
                moe_align_block_size(&ids, align_block_size(x.device(), rows, 1, 1), 1, 1, None)?;
            let bias = args
                .bias
                .as_ref()
                .map(|b| b.to_dtype(DType::F32)?.reshape((1, ())))
                .transpose()?;
            let w3 = w.unsqueeze(0)?;
            grouped_gemm(
                x,
                &w3,
                &routing,
                super::GroupedGemmArgs {
                    row_div: 1,
                    bias,
                    topk_weights: None,
                    quant: Some(quant.clone()),
                    act_quant_group: args.act_quant_group,
                },
            )?
            .to_dtype(dt)
        }
    }
}
