//! Grouped expert GEMM over the blocks of [`super::moe_align_block_size`]:
//! `out[s, :] = A[s / row_div, :] · W[expert(s)]ᵀ (+ bias[expert]) (· weight[s])`
//! for every valid sorted row `s`. Rows of non-local experts (-1 blocks) stay 0.
//!
//! CPU: consecutive blocks of one expert are merged into a segment; rayon runs
//! over (segment × N tile) so each weight tile is read once per step and no
//! weight is ever copied per routed row. Activations and the result are f32.

mod cuda;

pub use cuda::CudaGemmKernel;

use super::align::{AlignLayout, AlignedRouting, NON_LOCAL_EXPERT};
#[cfg(target_arch = "x86_64")]
use super::gemm_cpu::bf16_packed_min_rows;
use super::gemm_cpu::quant::{qgemm_tile, QTile};
use super::gemm_cpu::{gemm_tile, Tile, WeightElem, SKINNY_MAX_ROWS};
use super::{contiguous, SendPtr};
use crate::format::fp8::fake_quant_fp8_groups;
use crate::format::{PackedMat, PackedWeights, WeightFormat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

/// Segments under this many rows run the decode sweeps on AVX-512 (the
/// packed kernels take over from 24 rows: `bf16_fma::PACKED_MIN_ROWS`,
/// `Isa::packed_min_rows`).
const SWEEP_MAX_ROWS: usize = 24;
use rayon::prelude::*;

/// Options of one grouped GEMM.
#[derive(Clone, Debug, Default)]
pub struct GroupedGemmArgs {
    /// Activation row of sorted row `s` is `s / row_div` (top-k for the first
    /// GEMM, whose input is per token; 1 for the second).
    pub row_div: usize,
    /// `[E_local, N]` bias, added before the routing weight.
    pub bias: Option<Tensor>,
    /// `[numel]` (or `[T, k]`) F32 routing weights multiplied into each row.
    pub topk_weights: Option<Tensor>,
    /// Set when `w` holds quantized weights (read packed, never dequantized
    /// as a whole).
    pub quant: Option<PackedWeights>,
    /// Quantize the activations to FP8 e4m3 per token per group of this many
    /// columns first (dynamic W8A8, as [`super::fp8_group_quant_dequant`]).
    /// The FP8 tensor-core kernel multiplies them as e4m3.
    pub act_quant_group: Option<usize>,
}

#[derive(Clone, Debug)]
struct GroupedGemm {
    layout: AlignLayout,
    args: GroupedGemmArgs,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: CudaGemmKernel,
}

/// A run of sorted rows that share one expert.
struct Segment {
    expert: usize,
    rows: Vec<u32>,
}

fn segments(
    buf: &[u32],
    l: &AlignLayout,
    num_a_rows: usize,
    row_div: usize,
    e_local: usize,
) -> Result<Vec<Segment>> {
    let post_pad = buf[l.post_pad_offset()] as usize;
    if post_pad > l.max_num_tokens_padded || !post_pad.is_multiple_of(l.block_size) {
        bail!("grouped gemm: corrupt routing (num_tokens_post_padded = {post_pad})")
    }
    let sorted = &buf[..l.max_num_tokens_padded];
    let expert_ids = &buf[l.expert_ids_offset()..l.expert_ids_offset() + l.max_num_blocks];
    let mut segs: Vec<Segment> = Vec::new();
    for b in 0..post_pad / l.block_size {
        let e = expert_ids[b];
        if e == NON_LOCAL_EXPERT {
            continue;
        }
        let e = e as usize;
        if e >= e_local {
            bail!("grouped gemm: block {b} names expert {e}, but the weights hold {e_local}")
        }
        let rows = sorted[b * l.block_size..(b + 1) * l.block_size]
            .iter()
            .copied()
            .filter(|&s| (s as usize) < l.numel);
        match segs.last_mut() {
            Some(seg) if seg.expert == e => seg.rows.extend(rows),
            _ => segs.push(Segment {
                expert: e,
                rows: rows.collect(),
            }),
        }
    }
    // output rows are written from parallel tasks: each must be in bounds
    // and appear once
    let mut seen = vec![false; l.numel];
    for seg in &segs {
        for &s in &seg.rows {
            if s as usize / row_div >= num_a_rows {
                bail!("grouped gemm: sorted row {s} has no activation row ({num_a_rows} rows, row_div {row_div})")
            }
            if std::mem::replace(&mut seen[s as usize], true) {
                bail!("grouped gemm: corrupt routing (row {s} appears twice)")
            }
        }
    }
    segs.retain(|s| !s.rows.is_empty());
    Ok(segs)
}

/// The f32 slice behind a held storage guard.
pub(super) fn slice<'a, G: std::ops::Deref<Target = Storage>>(
    g: &'a Option<(G, &Layout)>,
    what: &str,
) -> Result<Option<&'a [f32]>> {
    match g {
        None => Ok(None),
        Some((st, l)) => match &**st {
            Storage::Cpu(c) => Ok(Some(contiguous::<f32>(c, l, what)?)),
            _ => bail!("{what} must be on the cpu"),
        },
    }
}

/// An optional operand as a flat, contiguous f32 cpu tensor: a cheap handle
/// (no copy) when it already is one, as the experts keep their biases.
pub(super) fn f32_field(t: &Option<Tensor>, what: &str, len: usize) -> Result<Option<Tensor>> {
    let Some(t) = t else { return Ok(None) };
    if t.elem_count() != len {
        bail!("{what} has {} elements, expected {len}", t.elem_count())
    }
    if !t.device().is_cpu() {
        bail!("{what} must be on the cpu like the activations")
    }
    Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?))
}

/// A tile of one expert: activation rows, output rows, columns `n0..n1`.
type TileFn<'a> = dyn Fn(usize, &[*const f32], usize, usize, &[*mut f32]) + Sync + 'a;

impl GroupedGemm {
    /// Runs `tile` over (segment × row chunk × column tile) with rayon and
    /// applies bias / routing weights; `row_bytes` sizes the decode tiles.
    #[allow(clippy::too_many_arguments)]
    fn run_tiles(
        &self,
        a: &[f32],
        k: usize,
        n: usize,
        e_local: usize,
        row_bytes: usize,
        buf: &[u32],
        tile: &TileFn<'_>,
    ) -> Result<Vec<f32>> {
        let num_a_rows = a.len().checked_div(k).unwrap_or(0);
        let l = &self.layout;
        let row_div = self.args.row_div.max(1);
        let segs = segments(buf, l, num_a_rows, row_div, e_local)?;
        let bias_t = f32_field(&self.args.bias, "grouped gemm bias", e_local * n)?;
        let weights_t = f32_field(
            &self.args.topk_weights,
            "grouped gemm topk weights",
            l.numel,
        )?;
        let bias_g = bias_t.as_ref().map(|t| t.storage_and_layout());
        let weights_g = weights_t.as_ref().map(|t| t.storage_and_layout());
        let bias = slice(&bias_g, "bias")?;
        let weights = slice(&weights_g, "topk weights")?;
        let mut out = vec![0f32; l.numel * n];
        let out_ptr = SendPtr(out.as_mut_ptr());
        // work items: (segment, row chunk, column tile)
        let mut items = Vec::new();
        for (si, seg) in segs.iter().enumerate() {
            let m = seg.rows.len();
            // skinny tiles stream ~256 KiB of weights each per activation row
            // (1–3 rows here): long enough to hide the scheduling cost and
            // the sweep's preparation of its rows, short enough to balance
            // the threads
            let per_tile = (256 << 10) * m.max(1);
            let skinny_nb = (per_tile / row_bytes.max(1)).clamp(16, 1024);
            let (nb, mb) = if m <= SKINNY_MAX_ROWS {
                (skinny_nb, m)
            } else if m < SWEEP_MAX_ROWS {
                // a decode sweep prepares its rows once per tile: 1 MiB of
                // weights per tile, not 128 columns
                (((1 << 20) / row_bytes.max(1)).clamp(128, 1024), m)
            } else {
                (128, 96)
            };
            for r0 in (0..m).step_by(mb) {
                for n0 in (0..n).step_by(nb) {
                    items.push((si, r0, (r0 + mb).min(m), n0, (n0 + nb).min(n)));
                }
            }
        }
        let a_ptr = SendPtr(a.as_ptr() as *mut f32);
        items.into_par_iter().for_each(|(si, r0, r1, n0, n1)| {
            let seg = &segs[si];
            let rows = &seg.rows[r0..r1];
            let ap: Vec<*const f32> = rows
                .iter()
                .map(|&s| unsafe { a_ptr.get().add((s as usize / row_div) * k) as *const f32 })
                .collect();
            let cp: Vec<*mut f32> = rows
                .iter()
                .map(|&s| unsafe { out_ptr.get().add(s as usize * n + n0) })
                .collect();
            // rows were bounds-checked in `segments`; every sorted row appears
            // once, so (row, column tile) regions are disjoint.
            tile(seg.expert, &ap, n0, n1, &cp);
            if bias.is_none() && weights.is_none() {
                return;
            }
            for (&s, &c) in rows.iter().zip(&cp) {
                let c = unsafe { std::slice::from_raw_parts_mut(c, n1 - n0) };
                if let Some(b) = bias {
                    let b = &b[seg.expert * n + n0..seg.expert * n + n1];
                    c.iter_mut().zip(b).for_each(|(c, b)| *c += b);
                }
                if let Some(wt) = weights {
                    let wt = wt[s as usize];
                    c.iter_mut().for_each(|c| *c *= wt);
                }
            }
        });
        Ok(out)
    }

    /// `a`: `[rows, k]` f32; `w`: `[E_local, n, k]`; `buf`: the align buffer.
    fn run<W: WeightElem>(
        &self,
        a: &[f32],
        k: usize,
        w: &[W],
        n: usize,
        buf: &[u32],
    ) -> Result<Vec<f32>> {
        let e_local = w.len().checked_div(n * k).unwrap_or(0);
        let row_bytes = k * std::mem::size_of::<W>();
        self.run_tiles(a, k, n, e_local, row_bytes, buf, &|e, ap, n0, n1, cp| {
            let ew = &w[e * n * k..(e + 1) * n * k];
            // SAFETY: see run_tiles; `ew` holds all n rows of expert e.
            unsafe {
                gemm_tile(&Tile {
                    a: ap,
                    w: ew,
                    k,
                    n0,
                    n1,
                    c: cp,
                })
            }
        })
    }

    /// [`Self::run`] for bf16 weights with bf16 activations `a16` (the same
    /// values as `a`) on AVX-512 BF16: segments of at least
    /// [`bf16_packed_min_rows`] rows (none where FMAs out-run `vdpbf16ps`)
    /// run the bf16 × bf16 packed kernel, the others [`gemm_tile`] on the
    /// f32 rows (decode sweeps, or the f32 FMA tile).
    #[cfg(target_arch = "x86_64")]
    fn run_bf16(
        &self,
        (a, a16): (&[f32], &[bf16]),
        k: usize,
        w: &[bf16],
        n: usize,
        buf: &[u32],
    ) -> Result<Vec<f32>> {
        let e_local = w.len().checked_div(n * k).unwrap_or(0);
        let base = a.as_ptr() as usize;
        let packed_min = bf16_packed_min_rows();
        let b16 = SendPtr(a16.as_ptr() as *mut bf16);
        self.run_tiles(a, k, n, e_local, 2 * k, buf, &|e, ap, n0, n1, cp| {
            let ew = &w[e * n * k..(e + 1) * n * k];
            if ap.len() >= packed_min {
                // the same row of the bf16 copy: the same element offset
                let ap16: Vec<*const bf16> = ap
                    .iter()
                    .map(|&p| b16.get().wrapping_add((p as usize - base) / 4) as *const bf16)
                    .collect();
                // SAFETY: see run_tiles; `a16` mirrors `a` row for row, rows
                // are k bf16 with k even and the CPU has AVX-512 BF16 (both
                // checked by the caller).
                unsafe { super::gemm_cpu::bf16_packed::gemm(&ap16, ew, (n, k), (n0, n1), cp) }
            } else {
                // SAFETY: as in `run`.
                unsafe {
                    gemm_tile(&Tile {
                        a: ap,
                        w: ew,
                        k,
                        n0,
                        n1,
                        c: cp,
                    })
                }
            }
        })
    }

    /// The quantized twin of [`Self::run`]: `w` is the packed weight bytes.
    fn run_quant(
        &self,
        a: &[f32],
        k: usize,
        w: &[u8],
        (e_local, n): (usize, usize),
        buf: &[u32],
    ) -> Result<Vec<f32>> {
        let Some(quant) = &self.args.quant else {
            bail!("grouped gemm: quantized weights without a format")
        };
        let st = quant.scales().storage_and_layout();
        let Storage::Cpu(sc) = &*st.0 else {
            bail!("grouped gemm: weight scales must be on the cpu like the weights")
        };
        let mats = quant_mats(quant, sc, st.1, w, e_local, n, k)?;
        let row_bytes = mats.first().map_or(k, |m| m.row_bytes());
        self.run_tiles(a, k, n, e_local, row_bytes, buf, &|e, ap, n0, n1, cp| {
            // SAFETY: see run_tiles; every expert matrix passed PackedMat::check
            // (same shapes as the first).
            unsafe {
                qgemm_tile(&QTile {
                    a: ap,
                    act_group: self.args.act_quant_group,
                    w: mats[e],
                    n0,
                    n1,
                    c: cp,
                })
            }
        })
    }
}

/// The packed bytes of FP8 (U8 or F8E4M3) or MXFP4 (U8) weight storage.
pub(crate) fn packed_bytes<'a>(sw: &'a CpuStorage, lw: &Layout) -> Result<&'a [u8]> {
    Ok(match sw {
        CpuStorage::U8(_) => contiguous::<u8>(sw, lw, "weights")?,
        CpuStorage::F8E4M3(_) => {
            let v = contiguous::<float8::F8E4M3>(sw, lw, "weights")?;
            // SAFETY: F8E4M3 is a repr(transparent) u8
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }
        }
        _ => bail!(
            "quantized weights must be U8 or F8E4M3, got {:?}",
            sw.dtype()
        ),
    })
}

/// One checked [`PackedMat`] per expert of packed weights `w` (`e_local` × `[n, k]`).
pub(crate) fn quant_mats<'a>(
    quant: &PackedWeights,
    sc: &'a CpuStorage,
    sl: &Layout,
    w: &'a [u8],
    e_local: usize,
    n: usize,
    k: usize,
) -> Result<Vec<PackedMat<'a>>> {
    let mats: Vec<PackedMat<'a>> = match quant {
        PackedWeights::Fp8 { block, .. } => {
            let (bn, bk) = *block;
            let scales = contiguous::<f32>(sc, sl, "fp8 weight scales")?;
            let per = WeightFormat::Fp8 { bn, bk }.scales_per_matrix(n, k);
            if scales.len() != e_local * per || w.len() != e_local * n * k {
                bail!(
                    "fp8 weights ({} bytes) / scales ({}) do not fit [{e_local}, {n}, {k}] with block {bn}x{bk}",
                    w.len(),
                    scales.len()
                )
            }
            (0..e_local)
                .map(|e| PackedMat::Fp8 {
                    q: &w[e * n * k..(e + 1) * n * k],
                    scales: &scales[e * per..(e + 1) * per],
                    k,
                    bn,
                    bk,
                })
                .collect()
        }
        PackedWeights::Mxfp4 { .. } => {
            let scales = contiguous::<u8>(sc, sl, "mxfp4 weight scales")?;
            let (pw, ps) = (n * k / 2, WeightFormat::Mxfp4.scales_per_matrix(n, k));
            if scales.len() != e_local * ps || w.len() != e_local * pw {
                bail!(
                    "mxfp4 weights ({} bytes) / scales ({}) do not fit [{e_local}, {n}, {k}]",
                    w.len(),
                    scales.len()
                )
            }
            (0..e_local)
                .map(|e| PackedMat::Mxfp4 {
                    q: &w[e * pw..(e + 1) * pw],
                    scales: &scales[e * ps..(e + 1) * ps],
                    k,
                })
                .collect()
        }
    };
    if let Some(m) = mats.first() {
        m.check(n)
            .map_err(|e| candle_core::Error::Msg(format!("quantized gemm: {e}")))?;
    }
    Ok(mats)
}

impl CustomOp3 for GroupedGemm {
    fn name(&self) -> &'static str {
        "moe-grouped-gemm"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, k) = la.shape().dims2()?;
        let (e_local, n, kw) = lw.shape().dims3()?;
        let k_w = self.args.quant.as_ref().map_or(kw, |q| q.k_of(kw));
        if k != k_w {
            bail!("grouped gemm: activations have K = {k}, weights [{e_local}, {n}, {kw}] hold K = {k_w}")
        }
        if lr.shape().elem_count() != self.layout.len() {
            bail!("grouped gemm: routing buffer does not match its layout")
        }
        let mut a = super::to_f32_cow(sa, la, "activations")?;
        if let Some(group) = self.args.act_quant_group {
            if group == 0 {
                bail!("grouped gemm: activation quant group size 0")
            }
            if k > 0 {
                super::for_chunks(a.to_mut(), k, |_, row| fake_quant_fp8_groups(row, group));
            }
        }
        let buf = contiguous::<u32>(sr, lr, "routing")?;
        if self.args.quant.is_some() {
            let w = packed_bytes(sw, lw)?;
            let out = self.run_quant(&a, k, w, (e_local, n), buf)?;
            return Ok((CpuStorage::F32(out), Shape::from((self.layout.numel, n))));
        }
        #[cfg(target_arch = "x86_64")]
        if sa.dtype() == DType::BF16
            && sw.dtype() == DType::BF16
            && self.args.act_quant_group.is_none()
            && k % 2 == 0
            && super::gemm_cpu::bf16_avx512::available()
        {
            let a16 = contiguous::<bf16>(sa, la, "activations")?;
            let w = contiguous::<bf16>(sw, lw, "weights")?;
            let out = self.run_bf16((&a, a16), k, w, n, buf)?;
            return Ok((CpuStorage::F32(out), Shape::from((self.layout.numel, n))));
        }
        let out = match sw.dtype() {
            DType::F32 => self.run(&a, k, contiguous::<f32>(sw, lw, "weights")?, n, buf)?,
            DType::BF16 => self.run(&a, k, contiguous::<bf16>(sw, lw, "weights")?, n, buf)?,
            DType::F16 => self.run(&a, k, contiguous::<f16>(sw, lw, "weights")?, n, buf)?,
            dt => bail!("grouped gemm: unsupported weight dtype {dt:?}"),
        };
        Ok((CpuStorage::F32(out), Shape::from((self.layout.numel, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sr: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, k) = la.shape().dims2()?;
        let (e_local, n, kw) = lw.shape().dims3()?;
        let k_w = self.args.quant.as_ref().map_or(kw, |q| q.k_of(kw));
        if k != k_w {
            bail!("grouped gemm: activations have K = {k}, weights [{e_local}, {n}, {kw}] hold K = {k_w}")
        }
        if lr.shape().elem_count() != self.layout.len() {
            bail!("grouped gemm: routing buffer does not match its layout")
        }
        // the kernels read activation row s / row_div for every sorted row
        // s < numel: the activations must have them all
        if self.layout.numel > rows * self.args.row_div.max(1) {
            bail!(
                "grouped gemm: {} routed rows need {} activation rows (row_div {}), got {rows}",
                self.layout.numel,
                self.layout.numel.div_ceil(self.args.row_div.max(1)),
                self.args.row_div
            )
        }
        let (out, _kernel) = cuda::run(
            &self.layout,
            &self.args,
            self.kernel,
            (sa, la),
            (sw, lw),
            (sr, lr),
            (e_local, n, k),
        )?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, sa.device.clone()),
            Shape::from((self.layout.numel, n)),
        ))
    }
}

/// Runs the grouped GEMM of `a` (`[rows, K]`) with the stacked expert weights
/// `w` (`[E_local, N, K]`) over `routing`; returns F32 `[T·k, N]`.
pub fn grouped_gemm(
    a: &Tensor,
    w: &Tensor,
    routing: &AlignedRouting,
    args: GroupedGemmArgs,
) -> Result<Tensor> {
    grouped_gemm_with_kernel(a, w, routing, args, CudaGemmKernel::Auto)
}

/// [`grouped_gemm`] on one chosen CUDA kernel (tests and benchmarks of the
/// kernels); an error when it cannot run the problem, or when a kernel other
/// than `Auto` is asked of CPU tensors.
pub fn grouped_gemm_with_kernel(
    a: &Tensor,
    w: &Tensor,
    routing: &AlignedRouting,
    args: GroupedGemmArgs,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] kernel: CudaGemmKernel,
) -> Result<Tensor> {
    if kernel != CudaGemmKernel::Auto && !a.device().is_cuda() {
        bail!("grouped gemm: the {kernel} kernel needs CUDA tensors")
    }
    let op = GroupedGemm {
        layout: *routing.layout(),
        args,
        kernel,
    };
    a.apply_op3_no_bwd(w, routing.buffer(), &op)
}
