//! Launching the kernels of `kernels/moe_ops.cu` (feature `cuda`): one PTX
//! module, loaded once per device by candle, and helpers that turn candle
//! storages into kernel arguments. Optional pointer arguments are passed as a
//! valid dummy buffer plus a flag, never as null.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::{cudarc::driver::DeviceRepr, CudaDType, CudaDevice};
use candle_core::{bail, CudaStorage, DType, Layout, Result};

/// One PTX module: its name for candle's module cache and its text.
pub(crate) struct Ptx {
    pub name: &'static str,
    pub src: &'static str,
}

/// Routing, align, SIMT GEMMs and elementwise ops (kernels/moe_ops.cu).
pub(crate) const OPS: Ptx = Ptx {
    name: "candle_moe_ops",
    src: include_str!(concat!(env!("OUT_DIR"), "/moe_ops.ptx")),
};
/// The decode GEMV and the 64-row tensor-core GEMMs (kernels/moe_gemm.cu).
pub(crate) const GEMM: Ptx = Ptx {
    name: "candle_moe_gemm",
    src: include_str!(concat!(env!("OUT_DIR"), "/moe_gemm.ptx")),
};
/// FP8 tensor-core GEMM (kernels/moe_fp8_mma.cu), built for sm_89 or newer:
/// load it only on such a device.
pub(crate) const FP8_MMA: Ptx = Ptx {
    name: "candle_moe_fp8_mma",
    src: include_str!(concat!(env!("OUT_DIR"), "/moe_fp8_mma.ptx")),
};

/// `launch!(sig SIG; dev, "kernel", cfg, &arg1, &arg2, ...)` (a kernel of
/// [`OPS`]) or `launch!(in MODULE, sig SIG; ...)`: checks the arguments
/// against the kernel's parameter kinds `SIG` (from `ops::kernel_sigs`, which
/// a test holds to kernels/*.cu) — their number at compile time, their kinds
/// before the launch — and launches. Every argument must live until the end
/// of the enclosing statement block (bind values to locals).
macro_rules! launch {
    (in $m:expr, sig $sig:expr; $dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        const _: () = assert!($sig.len() == [$(stringify!($arg)),+].len());
        let kinds = [$($crate::cuda::arg_kind($arg)),+];
        if kinds[..] != *$sig.as_bytes() {
            candle_core::bail!(
                "kernel {}: arguments {:?} do not match its parameters {:?}",
                $name,
                String::from_utf8_lossy(&kinds),
                $sig
            )
        }
        $crate::cuda::launch!(in $m; $dev, $name, $cfg, $($arg),+)
    }};
    (in $m:expr; $dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let m = &$m;
        let f = $dev.get_or_load_custom_func($name, m.name, m.src)?;
        let mut b = f.builder();
        $( b.arg($arg); )+
        // SAFETY: the argument list matches the kernel's signature in
        // kernels/*.cu; buffers are sized by the caller.
        candle_core::cuda_backend::WrapErr::w(unsafe { b.launch($cfg) })?;
    }};
    (sig $sig:expr; $dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {
        $crate::cuda::launch!(in $crate::cuda::OPS, sig $sig; $dev, $name, $cfg, $($arg),+)
    };
}
pub(crate) use launch;

/// What a kernel argument is, as the signature strings of `launch!` name it.
pub(crate) trait KernelArg {
    const KIND: u8;
}
impl<T> KernelArg for CudaSlice<T> {
    const KIND: u8 = b'*';
}
impl<T> KernelArg for CudaView<'_, T> {
    const KIND: u8 = b'*';
}
impl KernelArg for i32 {
    const KIND: u8 = b'i';
}
impl KernelArg for f32 {
    const KIND: u8 = b'f';
}
pub(crate) fn arg_kind<T: KernelArg>(_: &T) -> u8 {
    T::KIND
}

/// A contiguous operand as a typed device view.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An operand as contiguous f32 (converted on the device when it is not).
pub(crate) struct F32Operand<'a> {
    owned: Option<CudaStorage>,
    orig: &'a CudaStorage,
    range: (usize, usize),
}

impl<'a> F32Operand<'a> {
    pub(crate) fn new(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<Self> {
        if s.dtype() == DType::F32 {
            let Some(range) = l.contiguous_offsets() else {
                bail!("{what} must be contiguous")
            };
            return Ok(Self {
                owned: None,
                orig: s,
                range,
            });
        }
        let owned = s.to_dtype(l, DType::F32)?;
        Ok(Self {
            owned: Some(owned),
            orig: s,
            range: (0, l.shape().elem_count()),
        })
    }
    pub(crate) fn view(&self) -> Result<CudaView<'_, f32>> {
        let s = self.owned.as_ref().unwrap_or(self.orig);
        Ok(s.as_cuda_slice::<f32>()?.slice(self.range.0..self.range.1))
    }
}

/// A zeroed device buffer (at least one element, so it can stand in for an
/// absent optional operand).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

/// Grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn i32_arg(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

/// The device's compute capability, `(major, minor)`.
pub(crate) fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    use candle_core::cuda_backend::WrapErr;
    dev.cuda_stream().context().compute_capability().w()
}

/// Whether a contiguous operand starts 16-byte aligned (device allocations
/// are; a view at an offset may not be).
pub(crate) fn aligned16(l: &Layout, dtype: DType) -> bool {
    (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(16)
}
