//! A [`Communicator`] over NCCL (feature `nccl`), one rank per GPU: ranks are
//! threads of one process (share the [`NcclId`]) or processes (send rank 0's
//! id bytes to the others). Variable-length collectives pad every rank to the
//! largest row count; the counts themselves are exchanged first (one small
//! device-to-host copy per all-gather: the dispatch has to size its buffers).

use super::Communicator;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use std::sync::{Arc, Mutex};

pub use candle_core::cuda_backend::cudarc::nccl::safe::Id as NcclId;

/// The NCCL communicator handle is a raw pointer: it is only ever used under
/// the mutex, one collective at a time.
struct SharedComm(Comm);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct NcclComm {
    comm: Arc<Mutex<SharedComm>>,
    rank: usize,
    world: usize,
    device: Device,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("nccl: {e:?}"))
}

impl NcclComm {
    /// A fresh id for a new group (rank 0 makes it, every rank uses it).
    pub fn new_id() -> Result<NcclId> {
        NcclId::new().map_err(nccl_err)
    }

    /// Joins the group as `rank` of `world` on the CUDA `device`.
    pub fn new(device: &Device, rank: usize, world: usize, id: NcclId) -> Result<Self> {
        let Device::Cuda(d) = device else {
            bail!("nccl communicator needs a cuda device, got {device:?}")
        };
        if rank >= world {
            bail!("rank {rank} out of range for a world of {world}")
        }
        let comm = Comm::from_rank(d.cuda_stream(), rank, world, id).map_err(nccl_err)?;
        Ok(Self {
            comm: Arc::new(Mutex::new(SharedComm(comm))),
            rank,
            world,
            device: device.clone(),
        })
    }

    fn gather(&self, t: &Tensor) -> Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&Collective {
            comm: self.comm.clone(),
            kind: Kind::AllGather,
            world: self.world,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    AllGather,
    ReduceScatterSum,
}

struct Collective {
    comm: Arc<Mutex<SharedComm>>,
    kind: Kind,
    world: usize,
}

impl Collective {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits + NcclType>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let src = crate::cuda::view::<T>(s, l, "collective input")?;
        let dims = l.shape().dims().to_vec();
        let Some(&rows) = dims.first() else {
            bail!("collectives need at least one dimension")
        };
        let (out_len, out_rows) = match self.kind {
            Kind::AllGather => (src.len() * self.world, rows * self.world),
            Kind::ReduceScatterSum => {
                if rows % self.world != 0 {
                    bail!("reduce-scatter of {rows} rows over {} ranks", self.world)
                }
                (src.len() / self.world, rows / self.world)
            }
        };
        let mut out: CudaSlice<T> = s.device.alloc_zeros::<T>(out_len.max(1))?;
        let comm = self
            .comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("nccl communicator poisoned".into()))?;
        if out_len > 0 {
            match self.kind {
                Kind::AllGather => comm.0.all_gather(&src, &mut out).map_err(nccl_err)?,
                Kind::ReduceScatterSum => comm
                    .0
                    .reduce_scatter(&src, &mut out, &ReduceOp::Sum)
                    .map_err(nccl_err)?,
            };
        }
        let mut shape = dims;
        shape[0] = out_rows;
        Ok((
            CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            Shape::from(shape),
        ))
    }
}

impl CustomOp1 for Collective {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::AllGather => "nccl-all-gather",
            Kind::ReduceScatterSum => "nccl-reduce-scatter",
        }
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the nccl communicator works on cuda tensors; use ThreadWorld on the cpu")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match (self.kind, s.dtype()) {
            (_, DType::F32) => self.run::<f32>(s, l),
            (_, DType::BF16) => self.run::<half::bf16>(s, l),
            (_, DType::F16) => self.run::<half::f16>(s, l),
            (Kind::AllGather, DType::U32) => self.run::<u32>(s, l),
            (Kind::AllGather, DType::I64) => self.run::<i64>(s, l),
            (Kind::AllGather, DType::U8) => self.run::<u8>(s, l),
            (k, dt) => bail!("nccl {k:?}: unsupported dtype {dt:?}"),
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather_v(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let rows = t.dim(0)?;
        let count = Tensor::new(&[rows as u32], &self.device)?;
        let counts: Vec<usize> = self
            .gather(&count)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let max = counts.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok((t.clone(), counts));
        }
        let padded = t.pad_with_zeros(0, 0, max - rows)?;
        let all = self.gather(&padded)?;
        let parts = counts
            .iter()
            .enumerate()
            .map(|(r, &c)| all.narrow(0, r * max, c))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&parts, 0)?, counts))
    }
    fn reduce_scatter_v(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
        if counts.len() != self.world {
            bail!("{} counts for a world of {}", counts.len(), self.world)
        }
        if t.dim(0)? != counts.iter().sum::<usize>() {
            bail!(
                "{} rows, counts sum to {}",
                t.dim(0)?,
                counts.iter().sum::<usize>()
            )
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return t.narrow(0, 0, 0);
        }
        let mut start = 0;
        let mut parts = Vec::with_capacity(self.world);
        for &c in counts {
            parts.push(t.narrow(0, start, c)?.pad_with_zeros(0, 0, max - c)?);
            start += c;
        }
        let padded = Tensor::cat(&parts, 0)?.contiguous()?;
        let mine = padded.apply_op1_no_bwd(&Collective {
            comm: self.comm.clone(),
            kind: Kind::ReduceScatterSum,
            world: self.world,
        })?;
        mine.narrow(0, 0, counts[self.rank])
    }
    fn barrier(&self) -> Result<()> {
        // a collective every rank must reach, then wait for it
        let one = Tensor::new(&[1u32], &self.device)?;
        self.gather(&one)?.to_vec1::<u32>()?;
        Ok(())
    }
}
