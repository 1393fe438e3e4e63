//! Expert placement: vLLM's `tests/distributed/test_expert_placement.py`
//! vectors and invariants, the linear strategy, routing tables, `update`,
//! the strategy fallback rules and every error case.

use candle_core::Device;
use candle_moe::expert_map::{determine_expert_map, determine_expert_placement_strategy};
use candle_moe::{EpConfig, ExpertMapManager, PlacementStrategy};
use PlacementStrategy::{Linear, RoundRobin};

fn map(ep: usize, rank: usize, e: usize, s: PlacementStrategy) -> (usize, Vec<i32>) {
    let (n, m) = determine_expert_map(ep, rank, e, s).unwrap();
    (n, m.expect("map for ep > 1"))
}

type Case = (
    usize,
    usize,
    usize,
    PlacementStrategy,
    usize,
    &'static [i32],
);

#[test]
fn vllm_comprehensive_vectors() {
    let cases: &[Case] = &[
        (2, 0, 8, RoundRobin, 4, &[0, -1, 1, -1, 2, -1, 3, -1]),
        (2, 1, 8, RoundRobin, 4, &[-1, 0, -1, 1, -1, 2, -1, 3]),
        (2, 0, 9, RoundRobin, 5, &[0, -1, 1, -1, 2, -1, 3, -1, 4]),
        (2, 1, 9, RoundRobin, 4, &[-1, 0, -1, 1, -1, 2, -1, 3, -1]),
        (4, 0, 8, RoundRobin, 2, &[0, -1, -1, -1, 1, -1, -1, -1]),
        (4, 1, 8, RoundRobin, 2, &[-1, 0, -1, -1, -1, 1, -1, -1]),
        (4, 2, 8, RoundRobin, 2, &[-1, -1, 0, -1, -1, -1, 1, -1]),
        (4, 3, 8, RoundRobin, 2, &[-1, -1, -1, 0, -1, -1, -1, 1]),
        // from the issue: linear with a remainder (10 = 3 + 3 + 2 + 2)
        (4, 1, 10, Linear, 3, &[-1, -1, -1, 0, 1, 2, -1, -1, -1, -1]),
        (4, 0, 10, Linear, 3, &[0, 1, 2, -1, -1, -1, -1, -1, -1, -1]),
        (4, 2, 10, Linear, 2, &[-1, -1, -1, -1, -1, -1, 0, 1, -1, -1]),
        (4, 3, 10, Linear, 2, &[-1, -1, -1, -1, -1, -1, -1, -1, 0, 1]),
        (2, 1, 9, Linear, 4, &[-1, -1, -1, -1, -1, 0, 1, 2, 3]),
    ];
    for &(ep, rank, e, s, local, want) in cases {
        let (n, m) = map(ep, rank, e, s);
        assert_eq!(n, local, "ep={ep} rank={rank} E={e} {s}");
        assert_eq!(m, want, "ep={ep} rank={rank} E={e} {s}");
    }
}

/// vLLM `test_expert_placement_various_sizes`, for both strategies.
#[test]
fn various_sizes_partition_all_experts() {
    for (ep, sizes) in [
        (2usize, vec![4usize, 8, 9, 16, 17]),
        (4, vec![8, 16, 18, 32, 33]),
        (3, vec![60, 61, 62]),
    ] {
        for e in sizes {
            for s in [Linear, RoundRobin] {
                let mut owner = vec![None; e];
                for rank in 0..ep {
                    let (n, m) = map(ep, rank, e, s);
                    let base = e / ep;
                    assert_eq!(
                        n,
                        base + usize::from(rank < e % ep),
                        "E={e} ep={ep} rank={rank}"
                    );
                    assert_eq!(m.len(), e);
                    let mut locals: Vec<(i32, usize)> = m
                        .iter()
                        .enumerate()
                        .filter(|(_, &l)| l >= 0)
                        .map(|(g, &l)| (l, g))
                        .collect();
                    locals.sort();
                    assert_eq!(
                        locals.iter().map(|p| p.0).collect::<Vec<_>>(),
                        (0..n as i32).collect::<Vec<_>>()
                    );
                    for (l, g) in locals {
                        assert!(owner[g].is_none(), "expert {g} owned twice");
                        owner[g] = Some(rank);
                        if s == RoundRobin {
                            assert_eq!(g, rank + l as usize * ep);
                        }
                    }
                }
                assert!(
                    owner.iter().all(|o| o.is_some()),
                    "E={e} ep={ep} {s}: unowned expert"
                );
            }
        }
    }
}

#[test]
fn ep1_has_no_map() {
    let (n, m) = determine_expert_map(1, 0, 8, RoundRobin).unwrap();
    assert_eq!((n, m), (8, None));
    let mgr = ExpertMapManager::new(8, 2, EpConfig::default(), &Device::Cpu).unwrap();
    assert!(mgr.expert_map().is_none());
    assert!(mgr.routing_tables().is_none());
    assert_eq!(mgr.local_expert_ids(), (0..8).collect::<Vec<_>>());
    assert_eq!(mgr.map_global_to_local(5).unwrap(), Some(5));
    assert!(mgr.is_local_expert(7).unwrap());
    assert_eq!(mgr.compressed_map_string(), "[0..7]");
}

#[test]
fn errors_are_typed() {
    let e = |r: candle_moe::Result<ExpertMapManager>| r.unwrap_err();
    let d = Device::Cpu;
    assert!(matches!(
        e(ExpertMapManager::new(8, 2, EpConfig::new(0, 0, Linear), &d)),
        candle_moe::MoeError::ExpertParallel(_)
    ));
    let err = e(ExpertMapManager::new(8, 2, EpConfig::new(2, 2, Linear), &d)).to_string();
    assert!(
        err.contains("ep_rank 2 is out of range for ep_size 2"),
        "{err}"
    );
    let err = e(ExpertMapManager::new(8, 2, EpConfig::new(9, 0, Linear), &d)).to_string();
    assert!(
        err.contains("ep_size 9 is larger than the number of experts 8"),
        "{err}"
    );
    let err = e(ExpertMapManager::new(8, 9, EpConfig::default(), &d));
    assert!(
        matches!(err, candle_moe::MoeError::InvalidConfig(_)),
        "{err}"
    );
    assert!(determine_expert_map(0, 0, 8, Linear).is_err());
    assert!("diagonal".parse::<PlacementStrategy>().is_err());
    let mgr = ExpertMapManager::new(8, 2, EpConfig::new(2, 0, Linear), &d).unwrap();
    assert!(mgr.map_global_to_local(8).is_err());
}

fn grouped(ep: usize, rank: usize) -> EpConfig {
    EpConfig {
        num_expert_group: Some(4),
        ..EpConfig::new(ep, rank, RoundRobin)
    }
}

#[test]
fn manager_round_robin_tables() {
    let mgr = ExpertMapManager::new(9, 2, grouped(2, 1), &Device::Cpu).unwrap();
    assert_eq!(mgr.placement_strategy(), RoundRobin);
    assert_eq!(mgr.local_num_experts(), 4);
    assert_eq!(
        mgr.expert_map_host().unwrap(),
        &[-1, 0, -1, 1, -1, 2, -1, 3, -1]
    );
    assert_eq!(
        mgr.expert_map().unwrap().to_vec1::<i32>().unwrap(),
        vec![-1, 0, -1, 1, -1, 2, -1, 3, -1]
    );
    assert_eq!(mgr.local_expert_ids(), vec![1, 3, 5, 7]);
    assert_eq!(mgr.map_global_to_local(3).unwrap(), Some(1));
    assert_eq!(mgr.map_global_to_local(4).unwrap(), None);
    let t = mgr.routing_tables().expect("round-robin tables");
    // rank 0 holds 0,2,4,6,8 at physical 0..5; rank 1 holds 1,3,5,7 at 5..9
    assert_eq!(t.global_to_physical, vec![0, 5, 1, 6, 2, 7, 3, 8, 4]);
    assert_eq!(t.physical_to_global, vec![0, 2, 4, 6, 8, 1, 3, 5, 7]);
    assert_eq!(t.local_to_global, vec![1, 3, 5, 7]);
    assert_eq!(t.device.0.to_vec1::<u32>().unwrap(), t.global_to_physical);
    assert_eq!(mgr.compressed_map_string(), "0->1, 1->3, 2->5, 3->7");
}

#[test]
fn update_recomputes_map_and_tables_together() {
    let mut mgr = ExpertMapManager::new(16, 2, grouped(2, 0), &Device::Cpu).unwrap();
    assert_eq!(
        mgr.local_expert_ids(),
        (0..16).step_by(2).collect::<Vec<_>>()
    );
    mgr.update(4, 3).unwrap();
    assert_eq!(
        (mgr.ep_size(), mgr.ep_rank(), mgr.local_num_experts()),
        (4, 3, 4)
    );
    assert_eq!(mgr.local_expert_ids(), vec![3, 7, 11, 15]);
    let t = mgr.routing_tables().unwrap();
    assert_eq!(t.local_to_global, vec![3, 7, 11, 15]);
    assert_eq!(t.global_to_physical[15], 15);
    assert_eq!(t.global_to_physical[1], 4);
    // a failed update leaves everything as it was
    assert!(mgr.update(4, 4).is_err());
    assert_eq!(mgr.local_expert_ids(), vec![3, 7, 11, 15]);
    assert_eq!(
        mgr.routing_tables().unwrap().local_to_global,
        vec![3, 7, 11, 15]
    );
    // back to one rank: no map, no tables
    mgr.update(1, 0).unwrap();
    assert!(mgr.expert_map().is_none() && mgr.routing_tables().is_none());
    assert_eq!(mgr.placement_strategy(), Linear);
}

#[test]
fn strategy_fallback_rules() {
    // no expert groups → linear (vLLM: round robin only for multi-group models)
    let mgr = ExpertMapManager::new(8, 2, EpConfig::new(2, 0, RoundRobin), &Device::Cpu).unwrap();
    assert_eq!(mgr.placement_strategy(), Linear);
    assert!(mgr.fallback_reason().is_some());
    assert_eq!(
        mgr.expert_map_host().unwrap(),
        &[0, 1, 2, 3, -1, -1, -1, -1]
    );
    assert!(mgr.routing_tables().is_none());
    let base = grouped(2, 0);
    assert_eq!(
        determine_expert_placement_strategy(RoundRobin, &base).0,
        RoundRobin
    );
    let c = EpConfig {
        num_expert_group: Some(1),
        ..base.clone()
    };
    assert_eq!(
        determine_expert_placement_strategy(RoundRobin, &c).0,
        Linear
    );
    assert_eq!(
        determine_expert_placement_strategy(Linear, &base),
        (Linear, None)
    );
    let mgr = ExpertMapManager::new(8, 2, base, &Device::Cpu).unwrap();
    assert_eq!(mgr.placement_strategy(), RoundRobin);
    assert!(mgr.routing_tables().is_some());
}
