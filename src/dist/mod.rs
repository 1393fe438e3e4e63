//! Expert parallelism across ranks: the collectives the dispatch / combine
//! needs, an in-process world of ranks on threads, and the naive DP/EP
//! prepare/finalize (all-gather tokens, run local experts, reduce-scatter).

pub mod naive_ep;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod thread_world;

pub use naive_ep::NaiveEpPrepareAndFinalize;
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclId};
pub use thread_world::{ThreadComm, ThreadWorld};

use candle_core::{Result, Tensor};

/// Collectives over the ranks of one expert-parallel group. Every rank calls
/// each collective in the same order.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Concatenates every rank's `t` along dim 0 (row counts may differ);
    /// returns the result and each rank's row count.
    fn all_gather_v(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)>;
    /// Sums the ranks' `t` (same shape), and returns this rank's rows:
    /// `counts[rank]` rows starting after the rows of lower ranks.
    fn reduce_scatter_v(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
}
