//! `moe_align_block_size` against vLLM's test grid: tokens {1, 3, 256},
//! E {32, 160, 257}, top-k {1, 2, 16}, block {32, 128}; with and without an
//! expert map.

mod common;

use candle_core::{Device, Tensor};
use candle_moe::ops::align::NON_LOCAL_EXPERT;
use candle_moe::ops::moe_align_block_size;
use common::Rng;
use std::collections::BTreeSet;

fn check(rng: &mut Rng, t: usize, e: usize, k: usize, bs: usize, map: Option<Vec<i32>>) {
    let ctx = format!("T={t} E={e} k={k} block={bs} map={}", map.is_some());
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        ids.extend(rng.distinct(e, k).into_iter().map(|x| x as u32));
    }
    let ids_t = Tensor::from_vec(ids.clone(), (t, k), &Device::Cpu).unwrap();
    let num_local = map
        .as_ref()
        .map_or(e, |m| m.iter().filter(|&&x| x >= 0).count());
    let map_t = map
        .as_ref()
        .map(|m| Tensor::new(m.as_slice(), &Device::Cpu).unwrap());
    let r = moe_align_block_size(&ids_t, bs, e, num_local, map_t.as_ref()).unwrap();
    let sorted: Vec<u32> = r.sorted_token_ids().unwrap().to_vec1().unwrap();
    let experts: Vec<u32> = r.expert_ids().unwrap().to_vec1().unwrap();
    let post: u32 = r
        .num_tokens_post_padded()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()[0];
    let counts: Vec<u32> = r.expert_num_tokens().unwrap().to_vec1().unwrap();
    let numel = t * k;

    // padded total: every expert's run rounded up to the block
    let mut per = vec![0usize; e];
    for &i in &ids {
        per[i as usize] += 1;
    }
    let want_post: usize = per.iter().map(|c| c.div_ceil(bs) * bs).sum();
    assert_eq!(post as usize, want_post, "{ctx}: num_tokens_post_padded");
    assert_eq!(post as usize % bs, 0, "{ctx}");
    assert!(sorted.len() >= want_post, "{ctx}: buffer too small");

    // every block holds one expert's tokens, padded with the sentinel
    let mut seen: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); e];
    for b in 0..post as usize / bs {
        let blk = &sorted[b * bs..(b + 1) * bs];
        let valid: Vec<u32> = blk
            .iter()
            .copied()
            .filter(|&s| (s as usize) < numel)
            .collect();
        assert!(!valid.is_empty(), "{ctx}: block {b} is all padding");
        assert!(
            blk.iter().all(|&s| (s as usize) <= numel),
            "{ctx}: bad entry"
        );
        // padding only at the end of a block
        let first_pad = blk.iter().position(|&s| s as usize == numel).unwrap_or(bs);
        assert!(
            blk[first_pad..].iter().all(|&s| s as usize == numel),
            "{ctx}: padding inside block {b}"
        );
        let g = ids[valid[0] as usize] as usize;
        for &s in &valid {
            assert_eq!(
                ids[s as usize] as usize, g,
                "{ctx}: block {b} mixes experts"
            );
            assert!(seen[g].insert(s), "{ctx}: row {s} twice");
        }
        let want_tag = match &map {
            None => g as u32,
            Some(m) if m[g] >= 0 => m[g] as u32,
            Some(_) => NON_LOCAL_EXPERT,
        };
        assert_eq!(experts[b], want_tag, "{ctx}: expert id of block {b}");
    }
    // per-expert token sets
    for (g, seen_g) in seen.iter().enumerate() {
        let want: BTreeSet<u32> = ids
            .iter()
            .enumerate()
            .filter(|(_, &x)| x as usize == g)
            .map(|(i, _)| i as u32)
            .collect();
        assert_eq!(seen_g, &want, "{ctx}: token set of expert {g}");
    }
    // counts per local expert
    let mut want_counts = vec![0u32; num_local];
    for g in 0..e {
        let l = match &map {
            None => Some(g),
            Some(m) => usize::try_from(m[g]).ok(),
        };
        if let Some(l) = l {
            want_counts[l] = per[g] as u32;
        }
    }
    assert_eq!(counts, want_counts, "{ctx}: expert_num_tokens");
    assert!(
        sorted[post as usize..].iter().all(|&s| s as usize == numel),
        "{ctx}: tail not padding"
    );
}

#[test]
fn align_grid() {
    let mut rng = Rng::new(11);
    for &t in &[1usize, 3, 256] {
        for &e in &[32usize, 160, 257] {
            for &k in &[1usize, 2, 16] {
                for &bs in &[32usize, 128] {
                    check(&mut rng, t, e, k, bs, None);
                    // vLLM-style map: a random half of the experts, in random local order
                    let local = rng.distinct(e, e / 2);
                    let mut map = vec![-1i32; e];
                    for (l, &g) in local.iter().enumerate() {
                        map[g] = l as i32;
                    }
                    check(&mut rng, t, e, k, bs, Some(map));
                }
            }
        }
    }
}

#[test]
fn align_rejects_out_of_range_ids() {
    let ids = Tensor::new(&[[0u32, 9]], &Device::Cpu).unwrap();
    let err = moe_align_block_size(&ids, 16, 8, 8, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("topk id 9 out of range for 8 experts"),
        "{err}"
    );
}

#[test]
fn align_rejects_wrong_dtypes() {
    let ids = Tensor::new(&[[0i64, 1]], &Device::Cpu).unwrap();
    assert!(moe_align_block_size(&ids, 16, 8, 8, None).is_err());
    let ids = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
    let map = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    assert!(moe_align_block_size(&ids, 16, 3, 3, Some(&map)).is_err());
    assert!(moe_align_block_size(&ids, 0, 8, 8, None).is_err());
}

/// The routing buffer is shared with views a caller can reach; a corrupted
/// one (a row listed twice, which would let two threads write one output row)
/// is an error from the grouped GEMM, not a race.
#[test]
fn grouped_gemm_rejects_a_routing_with_a_repeated_row() {
    use candle_core::DType;
    use candle_moe::ops::{grouped_gemm, GroupedGemmArgs};
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[0u32], [0], [1]], &dev).unwrap();
    let r = moe_align_block_size(&ids, 4, 2, 2, None).unwrap();
    let a = Tensor::ones((3, 8), DType::F32, &dev).unwrap();
    let w = Tensor::ones((2, 4, 8), DType::F32, &dev).unwrap();
    let args = || GroupedGemmArgs {
        row_div: 1,
        ..Default::default()
    };
    assert!(grouped_gemm(&a, &w, &r, args()).is_ok());
    // expert 0's block lists rows 0, 1: make it 0, 0
    r.sorted_token_ids()
        .unwrap()
        .slice_set(&Tensor::new(&[0u32], &dev).unwrap(), 0, 1)
        .unwrap();
    let e = grouped_gemm(&a, &w, &r, args()).unwrap_err().to_string();
    assert!(e.contains("appears twice"), "{e}");
}
