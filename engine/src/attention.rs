//! Attention over paged KV for a ragged batch.
//!
//! Each (token, query head) is one task: it streams over the keys its
//! sequence may see (cached prefix through the block table, then the new
//! tokens its mask allows) with an online softmax, reading K/V in place from
//! the paged storage. No copies of the context are made; the only per-task
//! state is a `head_dim` accumulator on the stack.
//! Cost: O(tokens x heads x visible keys x head_dim).

use rayon::prelude::*;

use crate::batch::RaggedBatch;
use crate::config::MAX_HEAD_DIM;
use crate::kv::LayerKv;
use crate::ops::{dot, scale_add};

/// Head geometry for attention.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// `out (tokens, num_heads * head_dim) <- softmax(q k^T / sqrt(d)) v`, with
/// the keys of each token chosen by its sequence's cache and mask. `q` is
/// laid out like `out`; `token_owner[t] = (seq index, index in its run)`.
pub fn paged_attention(
    q: &[f32],
    batch: &RaggedBatch,
    token_owner: &[(usize, usize)],
    kv: LayerKv<'_>,
    shape: HeadShape,
    out: &mut [f32],
) {
    let HeadShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .zip(q.par_chunks(head_dim))
        .enumerate()
        .for_each(|(task, (out_head, q_head))| {
            let token = task / num_heads;
            let kv_head = (task % num_heads) / group;
            let (seq_idx, i) = token_owner[token];
            let seq = &batch.seqs[seq_idx];

            let mut acc = [0.0f32; MAX_HEAD_DIM];
            let acc = &mut acc[..head_dim];
            let mut max = f32::NEG_INFINITY;
            let mut denom = 0.0f32;
            let mut visit = |slot: usize| {
                let s = dot(q_head, kv.key(slot, kv_head, head_dim)) * scale;
                let v = kv.value(slot, kv_head, head_dim);
                if s > max {
                    let rescale = (max - s).exp();
                    denom = denom * rescale + 1.0;
                    scale_add(acc, rescale, 1.0, v);
                    max = s;
                } else {
                    let w = (s - max).exp();
                    denom += w;
                    scale_add(acc, 1.0, w, v);
                }
            };
            for (b, block) in seq.block_table.iter().enumerate() {
                let start = b * block_size;
                if start >= seq.num_cached {
                    break;
                }
                let base = block.index() * block_size;
                for offset in 0..block_size.min(seq.num_cached - start) {
                    visit(base + offset);
                }
            }
            if let Some(extra) = seq.extra_slots.get(i) {
                for &slot in extra {
                    visit(slot);
                }
            }
            for j in 0..seq.len() {
                if seq.attends(i, j) {
                    visit(seq.slots[j]);
                }
            }
            let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
            for (o, a) in out_head.iter_mut().zip(acc.iter()) {
                *o = a * inv;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::{KvLayout, KvStorage};
    use crate::testing::Lcg;
    use heterospec_kv::BlockId;

    /// Plain attention over contiguous per-sequence K/V: the reference.
    fn contiguous_attention(
        q: &[f32],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        shape: HeadShape,
        visible: &[usize],
    ) -> Vec<f32> {
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
            let owner: Vec<(usize, usize)> = batch
                .seqs
                .iter()
                .enumerate()
                .flat_map(|(s, r)| (0..r.len()).map(move |i| (s, i)))
                .collect();
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

    /// A tree mask restricts each new token to its ancestors.
    #[test]
    fn tree_mask_limits_visible_new_tokens() {
        let shape = HeadShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
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
}
