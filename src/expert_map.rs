//! Expert placement over expert-parallel ranks, with vLLM's semantics
//! (`expert_map_manager.py`): which global experts this rank owns, the
//! global → local map handed to kernels, and the round-robin routing tables.

use crate::error::{MoeError, Result};
use candle_core::{Device, Tensor};
use std::fmt;
use std::str::FromStr;

/// How global experts are spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PlacementStrategy {
    /// Rank r owns a contiguous range of experts.
    #[default]
    Linear,
    /// Rank r owns r, r + ep, r + 2·ep, ...
    RoundRobin,
}

impl FromStr for PlacementStrategy {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "round_robin" => Ok(Self::RoundRobin),
            other => Err(MoeError::ExpertParallel(format!(
                "unknown expert placement strategy `{other}`, expected `linear` or `round_robin`"
            ))),
        }
    }
}

impl fmt::Display for PlacementStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::RoundRobin => "round_robin",
        })
    }
}

/// Expert-parallel settings of one layer (the parts of vLLM's
/// `FusedMoEParallelConfig` that placement depends on).
#[derive(Clone, Debug)]
pub struct EpConfig {
    pub ep_size: usize,
    pub ep_rank: usize,
    pub strategy: PlacementStrategy,
    /// Grouped top-k models (DeepSeek-style) have `Some(g)` with g > 1.
    pub num_expert_group: Option<usize>,
}

impl Default for EpConfig {
    fn default() -> Self {
        Self {
            ep_size: 1,
            ep_rank: 0,
            strategy: PlacementStrategy::Linear,
            num_expert_group: None,
        }
    }
}

impl EpConfig {
    pub fn new(ep_size: usize, ep_rank: usize, strategy: PlacementStrategy) -> Self {
        Self {
            ep_size,
            ep_rank,
            strategy,
            ..Self::default()
        }
    }
}

fn check_topology(ep_size: usize, ep_rank: usize, global_num_experts: usize) -> Result<()> {
    if ep_size == 0 {
        return Err(MoeError::ExpertParallel(
            "ep_size must be at least 1".into(),
        ));
    }
    if ep_rank >= ep_size {
        return Err(MoeError::ExpertParallel(format!(
            "ep_rank {ep_rank} is out of range for ep_size {ep_size}"
        )));
    }
    if global_num_experts == 0 {
        return Err(MoeError::ExpertParallel("the layer has no experts".into()));
    }
    if ep_size > global_num_experts {
        return Err(MoeError::ExpertParallel(format!(
            "ep_size {ep_size} is larger than the number of experts {global_num_experts}: \
             some ranks would own no expert"
        )));
    }
    Ok(())
}

/// Number of local experts and the global → local map (`None` when ep_size is 1).
///
/// The first `E % ep` ranks own one extra expert.
pub fn determine_expert_map(
    ep_size: usize,
    ep_rank: usize,
    global_num_experts: usize,
    strategy: PlacementStrategy,
) -> Result<(usize, Option<Vec<i32>>)> {
    check_topology(ep_size, ep_rank, global_num_experts)?;
    if ep_size == 1 {
        return Ok((global_num_experts, None));
    }
    let base = global_num_experts / ep_size;
    let rem = global_num_experts % ep_size;
    let local = base + usize::from(ep_rank < rem);
    let mut map = vec![-1i32; global_num_experts];
    match strategy {
        PlacementStrategy::Linear => {
            let start = ep_rank * base + ep_rank.min(rem);
            for (l, m) in map[start..start + local].iter_mut().enumerate() {
                *m = l as i32;
            }
        }
        PlacementStrategy::RoundRobin => {
            for (l, g) in (ep_rank..global_num_experts).step_by(ep_size).enumerate() {
                map[g] = l as i32;
            }
        }
    }
    Ok((local, Some(map)))
}

/// vLLM's fallback rule: round-robin placement only for models with several
/// expert groups (redundant experts and EPLB, which also force linear there,
/// do not exist here). Returns the strategy to use and, when it differs from
/// the request, why.
pub fn determine_expert_placement_strategy(
    requested: PlacementStrategy,
    cfg: &EpConfig,
) -> (PlacementStrategy, Option<String>) {
    if requested != PlacementStrategy::RoundRobin || cfg.num_expert_group.is_some_and(|g| g > 1) {
        return (requested, None);
    }
    (
        PlacementStrategy::Linear,
        Some(
            "round-robin expert placement is only supported for models with multiple \
             expert groups; falling back to linear"
                .into(),
        ),
    )
}

/// Round-robin routing tables: where each global expert physically lives
/// (rank-major order), the inverse, and this rank's local → global ids.
#[derive(Clone, Debug)]
pub struct RoutingTables {
    pub global_to_physical: Vec<u32>,
    pub physical_to_global: Vec<u32>,
    pub local_to_global: Vec<u32>,
    /// The same three tables on the layer's device.
    pub device: (Tensor, Tensor, Tensor),
}

/// Placement, expert map and routing tables of one MoE layer; `update` swaps
/// all of them together when the topology changes.
#[derive(Clone, Debug)]
pub struct ExpertMapManager {
    global_num_experts: usize,
    top_k: usize,
    cfg: EpConfig,
    strategy: PlacementStrategy,
    fallback_reason: Option<String>,
    device: Device,
    local_num_experts: usize,
    map_cpu: Option<Vec<i32>>,
    map: Option<Tensor>,
    routing_tables: Option<RoutingTables>,
}

impl ExpertMapManager {
    /// Validates the topology (ep_size 0, rank out of range, more ranks than
    /// experts and top_k > E are errors) and computes map and tables.
    pub fn new(
        global_num_experts: usize,
        top_k: usize,
        cfg: EpConfig,
        device: &Device,
    ) -> Result<Self> {
        if top_k == 0 || top_k > global_num_experts {
            return Err(MoeError::config(format!(
                "top_k {top_k} must be in 1..={global_num_experts} (the number of experts)"
            )));
        }
        let mut s = Self {
            global_num_experts,
            top_k,
            cfg: cfg.clone(),
            strategy: PlacementStrategy::Linear,
            fallback_reason: None,
            device: device.clone(),
            local_num_experts: global_num_experts,
            map_cpu: None,
            map: None,
            routing_tables: None,
        };
        s.recompute(cfg)?;
        Ok(s)
    }

    /// Computes everything into temporaries first so a failed update leaves
    /// the manager as it was.
    fn recompute(&mut self, cfg: EpConfig) -> Result<()> {
        check_topology(cfg.ep_size, cfg.ep_rank, self.global_num_experts)?;
        let (mut strategy, mut reason) = if cfg.ep_size > 1 {
            determine_expert_placement_strategy(cfg.strategy, &cfg)
        } else {
            (cfg.strategy, None)
        };
        if strategy == PlacementStrategy::RoundRobin && cfg.ep_size == 1 {
            strategy = PlacementStrategy::Linear;
            reason = None;
        }
        let (local, map_cpu) =
            determine_expert_map(cfg.ep_size, cfg.ep_rank, self.global_num_experts, strategy)?;
        let map = match &map_cpu {
            Some(m) => Some(Tensor::from_slice(m, m.len(), &self.device)?),
            None => None,
        };
        let tables = if strategy == PlacementStrategy::RoundRobin && map_cpu.is_some() {
            Some(self.round_robin_tables(&cfg, local)?)
        } else {
            None
        };
        self.cfg = cfg;
        self.strategy = strategy;
        self.fallback_reason = reason;
        self.local_num_experts = local;
        self.map_cpu = map_cpu;
        self.map = map;
        self.routing_tables = tables;
        Ok(())
    }

    fn round_robin_tables(&self, cfg: &EpConfig, local: usize) -> Result<RoutingTables> {
        let e = self.global_num_experts;
        let (ep, base, rem) = (cfg.ep_size, e / cfg.ep_size, e % cfg.ep_size);
        let global_to_physical: Vec<u32> = (0..e)
            .map(|g| {
                let owner = g % ep;
                (owner * base + owner.min(rem) + g / ep) as u32
            })
            .collect();
        let mut physical_to_global = vec![0u32; e];
        for (g, &p) in global_to_physical.iter().enumerate() {
            physical_to_global[p as usize] = g as u32;
        }
        let local_to_global: Vec<u32> = (cfg.ep_rank..e)
            .step_by(ep)
            .take(local)
            .map(|g| g as u32)
            .collect();
        let dev = &self.device;
        let device = (
            Tensor::from_slice(&global_to_physical, e, dev)?,
            Tensor::from_slice(&physical_to_global, e, dev)?,
            Tensor::from_slice(&local_to_global, local_to_global.len(), dev)?,
        );
        Ok(RoutingTables {
            global_to_physical,
            physical_to_global,
            local_to_global,
            device,
        })
    }

    /// Moves to a new topology (elastic scaling): map and tables change together.
    pub fn update(&mut self, ep_size: usize, ep_rank: usize) -> Result<()> {
        let cfg = EpConfig {
            ep_size,
            ep_rank,
            ..self.cfg.clone()
        };
        self.recompute(cfg)
    }

    pub fn global_num_experts(&self) -> usize {
        self.global_num_experts
    }
    pub fn local_num_experts(&self) -> usize {
        self.local_num_experts
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    pub fn ep_size(&self) -> usize {
        self.cfg.ep_size
    }
    pub fn ep_rank(&self) -> usize {
        self.cfg.ep_rank
    }
    pub fn use_ep(&self) -> bool {
        self.cfg.ep_size > 1
    }
    /// The strategy in effect (after the fallback rules).
    pub fn placement_strategy(&self) -> PlacementStrategy {
        self.strategy
    }
    /// Why the requested strategy was replaced, if it was.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }
    /// Global → local map as an I32 tensor on the layer's device; `None` when ep_size is 1.
    pub fn expert_map(&self) -> Option<&Tensor> {
        self.map.as_ref()
    }
    /// The same map on the host.
    pub fn expert_map_host(&self) -> Option<&[i32]> {
        self.map_cpu.as_deref()
    }
    /// Round-robin routing tables (only with round-robin placement, as in vLLM).
    pub fn routing_tables(&self) -> Option<&RoutingTables> {
        self.routing_tables.as_ref()
    }

    fn check_global(&self, global_id: usize) -> Result<()> {
        if global_id >= self.global_num_experts {
            return Err(MoeError::input(format!(
                "expert id {global_id} out of range (the layer has {} experts)",
                self.global_num_experts
            )));
        }
        Ok(())
    }

    /// Local index of a global expert, `None` if another rank owns it.
    pub fn map_global_to_local(&self, global_id: usize) -> Result<Option<usize>> {
        self.check_global(global_id)?;
        Ok(match &self.map_cpu {
            None => Some(global_id),
            Some(m) => usize::try_from(m[global_id]).ok(),
        })
    }

    pub fn is_local_expert(&self, global_id: usize) -> Result<bool> {
        Ok(self.map_global_to_local(global_id)?.is_some())
    }

    /// Global ids of this rank's experts, in local order.
    pub fn local_expert_ids(&self) -> Vec<usize> {
        match &self.map_cpu {
            None => (0..self.global_num_experts).collect(),
            Some(m) => {
                let mut ids = vec![0usize; self.local_num_experts];
                for (g, &l) in m.iter().enumerate() {
                    if let Ok(l) = usize::try_from(l) {
                        ids[l] = g;
                    }
                }
                ids
            }
        }
    }

    /// `local->global` pairs, for logs.
    pub fn compressed_map_string(&self) -> String {
        match &self.map_cpu {
            None => format!("[0..{}]", self.global_num_experts - 1),
            Some(_) => self
                .local_expert_ids()
                .iter()
                .enumerate()
                .map(|(l, g)| format!("{l}->{g}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}
