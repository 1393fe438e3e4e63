//! N ranks in one process, one thread each: collectives through shared slots
//! and a barrier. For tests and CPU expert parallelism.

use super::Communicator;
use candle_core::{bail, Result, Tensor};
use std::sync::{Arc, Condvar, Mutex};

/// A reusable barrier that can be poisoned: when one rank fails, the others
/// get an error at their next collective instead of waiting forever.
#[derive(Debug, Default)]
struct Barrier {
    state: Mutex<(usize, u64, bool)>, // (arrived, generation, poisoned)
    cv: Condvar,
}

impl Barrier {
    fn wait(&self, n: usize) -> Result<()> {
        let lock_err = || candle_core::Error::Msg("expert-parallel world: a rank panicked".into());
        let mut st = self.state.lock().map_err(|_| lock_err())?;
        if st.2 {
            bail!("expert-parallel world poisoned: another rank failed")
        }
        let gen = st.1;
        st.0 += 1;
        if st.0 == n {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while st.1 == gen && !st.2 {
            st = self.cv.wait(st).map_err(|_| lock_err())?;
        }
        if st.1 == gen {
            bail!("expert-parallel world poisoned: another rank failed")
        }
        Ok(())
    }

    fn poison(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.2 = true;
        }
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
}

/// Creates the world: `ThreadWorld::new(n)` gives one communicator per rank.
pub struct ThreadWorld;

impl ThreadWorld {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::default(),
            slots: Mutex::new(vec![None; size]),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank's end of a [`ThreadWorld`].
#[derive(Debug, Clone)]
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Marks the world failed: every rank waiting in (or entering) a
    /// collective gets an error. Call it when this rank cannot go on.
    pub fn poison(&self) {
        self.shared.barrier.poison();
    }

    /// Publishes `t`, waits for all ranks, reads every slot, waits again so
    /// the slots can be reused by the next collective.
    fn exchange(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        {
            let mut s = self
                .shared
                .slots
                .lock()
                .map_err(|_| candle_core::Error::Msg("rank panicked".into()))?;
            s[self.rank] = Some(t.clone());
        }
        self.shared.barrier.wait(self.shared.size)?;
        let all: Vec<Option<Tensor>> = self
            .shared
            .slots
            .lock()
            .map_err(|_| candle_core::Error::Msg("rank panicked".into()))?
            .clone();
        self.shared.barrier.wait(self.shared.size)?;
        all.into_iter()
            .enumerate()
            .map(|(r, t)| {
                t.ok_or_else(|| candle_core::Error::Msg(format!("rank {r} published nothing")))
            })
            .collect()
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.size
    }
    fn all_gather_v(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let all = self.exchange(t)?;
        let counts = all.iter().map(|t| t.dim(0)).collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&all, 0)?, counts))
    }
    fn reduce_scatter_v(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
        if counts.len() != self.shared.size || counts.iter().sum::<usize>() != t.dim(0)? {
            bail!(
                "reduce_scatter_v: counts {counts:?} do not split {} rows over {} ranks",
                t.dim(0)?,
                self.shared.size
            )
        }
        let all = self.exchange(t)?;
        let start: usize = counts[..self.rank].iter().sum();
        let mut acc = all[0].narrow(0, start, counts[self.rank])?;
        for o in &all[1..] {
            acc = (acc + o.narrow(0, start, counts[self.rank])?)?;
        }
        Ok(acc)
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait(self.shared.size)
    }
}
