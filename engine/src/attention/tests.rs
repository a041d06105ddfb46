use super::*;
use crate::batch::SeqRun;
use crate::kv::{KvLayout, KvStorage};
use crate::testing::Lcg;
use heterospec_kv::BlockId;

/// Plain attention over contiguous per-sequence K/V: the reference.
fn contiguous_attention(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], shape: HeadShape, visible: &[usize]) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = vec![0.0; shape.num_heads * hd];
    for h in 0..shape.num_heads {
        let g = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let scores: Vec<f32> = visible
            .iter()
            .map(|&p| {
                qh.iter()
                    .zip(&k[p][g * hd..(g + 1) * hd])
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    / (hd as f32).sqrt()
            })
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for (w, &p) in e.iter().zip(visible) {
            for d in 0..hd {
                out[h * hd + d] += w / z * v[p][g * hd + d];
            }
        }
    }
    out
}

/// Sequences of various lengths crossing block boundaries, placed in
/// shuffled blocks, with several block sizes: paged == contiguous.
#[test]
fn paged_attention_equals_contiguous_reference() {
    for block_size in [1usize, 3, 4, 16] {
        let shape = HeadShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            block_size,
            scale: 1.0 / (8.0f32).sqrt(),
            window: None,
        };
        let kv_size = shape.num_kv_heads * shape.head_dim;
        let layout = KvLayout {
            num_blocks: 64,
            block_size,
            num_layers: 1,
            kv_size,
            scratch_slots: 0,
        };
        let mut storage = KvStorage::new(layout);
        let mut rng = Lcg(block_size as u64);
        // (cached, new) per sequence
        let lens = [(0usize, 5usize), (7, 1), (block_size * 2, 3), (13, 4)];
        let mut next_block = 63u32;
        let mut batch = RaggedBatch::default();
        let mut all_k = Vec::new();
        let mut all_v = Vec::new();
        for &(cached, new) in &lens {
            let total = cached + new;
            let nblocks = total.div_ceil(block_size);
            let table: Vec<BlockId> = (0..nblocks)
                .map(|_| {
                    next_block -= 1;
                    BlockId(next_block)
                })
                .collect();
            let ks: Vec<Vec<f32>> = (0..total).map(|_| (0..kv_size).map(|_| rng.f()).collect()).collect();
            let vs: Vec<Vec<f32>> = (0..total).map(|_| (0..kv_size).map(|_| rng.f()).collect()).collect();
            for p in 0..total {
                let slot = table[p / block_size].index() * block_size + p % block_size;
                storage.write(0, slot, &ks[p], &vs[p]);
            }
            let run = SeqRun::causal((0..new as u32).collect(), cached, &table, block_size).unwrap();
            batch.seqs.push(run);
            all_k.push(ks);
            all_v.push(vs);
        }
        let owner = batch.token_owners();
        let qsize = shape.num_heads * shape.head_dim;
        let q: Vec<f32> = (0..owner.len() * qsize).map(|_| rng.f()).collect();
        let mut out = vec![0.0; q.len()];
        paged_attention(&q, &batch, &owner, storage.layer(0), shape, &mut out);
        for (t, &(s, i)) in owner.iter().enumerate() {
            let visible: Vec<usize> = (0..=lens[s].0 + i).collect();
            let want = contiguous_attention(&q[t * qsize..(t + 1) * qsize], &all_k[s], &all_v[s], shape, &visible);
            for (a, b) in out[t * qsize..(t + 1) * qsize].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "block_size {block_size} token {t}: {a} vs {b}");
            }
        }
    }
}

/// A token's output is the same bits whether it runs with the tokens
/// before it (a verify forward, grouped rows) or alone after them (plain
/// decoding), for several head groupings and sliding windows (one that
/// reaches back to position 0 for some rows of a task and not others):
/// speculation relies on it. Each equals the contiguous reference over the
/// keys its window sees.
#[test]
fn a_tokens_result_does_not_depend_on_its_batch() {
    for (num_heads, num_kv_heads) in [(9usize, 3usize), (4, 4), (16, 1)] {
        for window in [None, Some(95), Some(40), Some(5)] {
            let shape = HeadShape {
                num_heads,
                num_kv_heads,
                head_dim: 16,
                block_size: 16,
                scale: 1.0 / (16.0f32).sqrt(),
                window,
            };
            let kv_size = num_kv_heads * shape.head_dim;
            let layout = KvLayout {
                num_blocks: 16,
                block_size: 16,
                num_layers: 1,
                kv_size,
                scratch_slots: 0,
            };
            let mut storage = KvStorage::new(layout);
            let mut rng = Lcg(num_heads as u64);
            let table: Vec<BlockId> = (1..8).map(BlockId).collect();
            // 90 cached: alone, the last tokens see a third whole chunk of
            // cached keys that the batch saw as new tokens.
            let (cached, new) = (90usize, 8usize);
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for p in 0..cached + new {
                let k: Vec<f32> = (0..kv_size).map(|_| rng.f() * 2.0).collect();
                let v: Vec<f32> = (0..kv_size).map(|_| rng.f()).collect();
                storage.write(0, table[p / 16].index() * 16 + p % 16, &k, &v);
                ks.push(k);
                vs.push(v);
            }
            let qsize = num_heads * shape.head_dim;
            let q: Vec<f32> = (0..new * qsize).map(|_| rng.f() * 2.0).collect();
            let batch = RaggedBatch {
                seqs: vec![SeqRun::causal((0..new as u32).collect(), cached, &table, 16).unwrap()],
            };
            let owner: Vec<(usize, usize)> = (0..new).map(|i| (0, i)).collect();
            let mut together = vec![0.0; q.len()];
            paged_attention(&q, &batch, &owner, storage.layer(0), shape, &mut together);
            for i in 0..new {
                let alone_batch = RaggedBatch {
                    seqs: vec![SeqRun::causal(vec![0], cached + i, &table, 16).unwrap()],
                };
                let mut alone = vec![0.0; qsize];
                let qi = &q[i * qsize..(i + 1) * qsize];
                paged_attention(qi, &alone_batch, &[(0, 0)], storage.layer(0), shape, &mut alone);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let got = &together[i * qsize..(i + 1) * qsize];
                assert_eq!(
                    bits(&alone),
                    bits(got),
                    "heads {num_heads}/{num_kv_heads}, window {window:?}, token {i}"
                );
                let p = cached + i;
                let visible: Vec<usize> = (shape.first_visible(p)..=p).collect();
                let want = contiguous_attention(qi, &ks, &vs, shape, &visible);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "window {window:?} token {i}: {a} vs {b}");
                }
            }
        }
    }
}

/// A tree mask restricts each new token to its ancestors.
#[test]
fn tree_mask_limits_visible_new_tokens() {
    let shape = HeadShape {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 4,
        scale: 1.0 / (4.0f32).sqrt(),
        window: None,
    };
    let layout = KvLayout {
        num_blocks: 4,
        block_size: 4,
        num_layers: 1,
        kv_size: 4,
        scratch_slots: 0,
    };
    let mut storage = KvStorage::new(layout);
    let mut rng = Lcg(9);
    let table = vec![BlockId(1), BlockId(2)];
    // cached 2 tokens, then tree n0 -> (n1, n2): n2 must not see n1
    let ks: Vec<Vec<f32>> = (0..5).map(|_| (0..4).map(|_| rng.f()).collect()).collect();
    let vs: Vec<Vec<f32>> = (0..5).map(|_| (0..4).map(|_| rng.f()).collect()).collect();
    for p in 0..5 {
        storage.write(0, 4 + p, &ks[p], &vs[p]);
    }
    let mut run = SeqRun::causal(vec![0, 0, 0], 2, &table, 4).unwrap();
    run.positions = vec![2, 3, 3];
    run.mask = Some(vec![true, false, false, true, true, false, true, false, true]);
    let batch = RaggedBatch { seqs: vec![run] };
    let q: Vec<f32> = (0..12).map(|_| rng.f()).collect();
    let mut out = vec![0.0; 12];
    paged_attention(&q, &batch, &[(0, 0), (0, 1), (0, 2)], storage.layer(0), shape, &mut out);
    let want = contiguous_attention(&q[8..12], &ks, &vs, shape, &[0, 1, 2, 4]);
    for (a, b) in out[8..12].iter().zip(&want) {
        assert!((a - b).abs() < 1e-5);
    }
}
