//! Attention over paged KV for a ragged batch.
//!
//! Each (token, query head) is one task: it walks the keys its sequence may
//! see (cached prefix through the block table, then the new tokens its mask
//! allows), reading K/V in place from the paged storage, in chunks of
//! [`CHUNK`] keys: the chunk's scores, one rescale of the running sum when
//! the maximum grows, the chunk's exponentials (vectorized, no libm call),
//! then the weighted values. No copies of the context are made; the
//! per-task state lives on the stack. Compiled for AVX2 when the CPU has it.
//! Cost: O(tokens x heads x visible keys x head_dim).

use rayon::prelude::*;

use crate::batch::RaggedBatch;
use crate::config::MAX_HEAD_DIM;
use crate::kv::LayerKv;
use crate::ops::{dot, exp_nonpositive, has_avx2};

/// Keys scored together before their softmax weights are taken.
const CHUNK: usize = 32;

/// Head geometry for attention.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// The online softmax of one (token, head): running max, denominator and
/// weighted sum of values, fed a chunk of key slots at a time.
/// `HD` is the head dimension when specialized for it (64, 128: loops of
/// known length, the sum kept in registers), else `MAX_HEAD_DIM` with the
/// real one taken from `q`.
struct OnlineSoftmax<'a, const HD: usize> {
    q: &'a [f32],
    kv: LayerKv<'a>,
    kv_head: usize,
    scale: f32,
    /// Use the AVX2 dot product and update (the CPU has them).
    avx2: bool,
    acc: [f32; HD],
    max: f32,
    denom: f32,
    slots: [usize; CHUNK],
    pending: usize,
}

impl<'a, const HD: usize> OnlineSoftmax<'a, HD> {
    #[inline(always)]
    fn head_dim(&self) -> usize {
        if HD == MAX_HEAD_DIM {
            self.q.len()
        } else {
            HD
        }
    }

    #[inline(always)]
    fn push(&mut self, slot: usize) {
        self.slots[self.pending] = slot;
        self.pending += 1;
        if self.pending == CHUNK {
            self.flush();
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        let n = self.pending;
        if n == 0 {
            return;
        }
        self.pending = 0;
        let hd = self.head_dim();
        let simd = self.avx2 && hd % 8 == 0;
        let mut scores = [0.0f32; CHUNK];
        if simd {
            let mut keys = [std::ptr::null::<f32>(); CHUNK];
            for (k, &slot) in keys.iter_mut().zip(&self.slots[..n]) {
                *k = self.kv.key(slot, self.kv_head, hd).as_ptr();
            }
            // SAFETY: AVX2 present; `q` and every key hold `hd` values.
            unsafe { simd::dots(self.q.as_ptr(), &keys[..n], hd, &mut scores[..n]) };
            for s in &mut scores[..n] {
                *s *= self.scale;
            }
        } else {
            for (s, &slot) in scores.iter_mut().zip(&self.slots[..n]) {
                *s = self.scale * dot(&self.q[..hd], self.kv.key(slot, self.kv_head, hd));
            }
        }
        let chunk_max = scores[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if chunk_max > self.max {
            let rescale = exp_nonpositive(self.max - chunk_max);
            self.denom *= rescale;
            for a in &mut self.acc[..hd] {
                *a *= rescale;
            }
            self.max = chunk_max;
        }
        let max = self.max;
        for s in &mut scores[..n] {
            *s = exp_nonpositive(*s - max);
        }
        self.denom += scores[..n].iter().sum::<f32>();
        if simd {
            let mut values = [std::ptr::null::<f32>(); CHUNK];
            for (v, &slot) in values.iter_mut().zip(&self.slots[..n]) {
                *v = self.kv.value(slot, self.kv_head, hd).as_ptr();
            }
            // SAFETY: AVX2 present; `acc` and every value hold `hd` values.
            unsafe { simd::weighted_sum(&mut self.acc[..hd], &scores[..n], &values[..n]) };
        } else {
            for (&w, &slot) in scores[..n].iter().zip(&self.slots[..n]) {
                let v = self.kv.value(slot, self.kv_head, hd);
                for (a, &x) in self.acc[..hd].iter_mut().zip(v) {
                    *a += w * x;
                }
            }
        }
    }
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
    let avx2 = has_avx2();
    out.par_chunks_mut(head_dim)
        .zip(q.par_chunks(head_dim))
        .enumerate()
        .for_each(|(task, (out_head, q_head))| {
            let token = task / num_heads;
            let kv_head = (task % num_heads) / group;
            let (seq_idx, i) = token_owner[token];
            let one = Attend {
                q: q_head,
                seq: &batch.seqs[seq_idx],
                i,
                kv,
                kv_head,
                scale,
                block_size,
                avx2,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { one.run_avx2(out_head) };
            }
            one.run(out_head)
        });
}

/// One (token, query head) task.
struct Attend<'a> {
    q: &'a [f32],
    seq: &'a crate::batch::SeqRun,
    /// The token's index in its sequence's run.
    i: usize,
    kv: LayerKv<'a>,
    kv_head: usize,
    scale: f32,
    block_size: usize,
    avx2: bool,
}

impl Attend<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run(out)
    }

    #[inline(always)]
    fn run(&self, out: &mut [f32]) {
        match self.q.len() {
            64 => self.run_for::<64>(out),
            128 => self.run_for::<128>(out),
            _ => self.run_for::<MAX_HEAD_DIM>(out),
        }
    }

    #[inline(always)]
    fn run_for<const HD: usize>(&self, out: &mut [f32]) {
        let (seq, block_size) = (self.seq, self.block_size);
        let mut sm = OnlineSoftmax::<HD> {
            q: self.q,
            kv: self.kv,
            kv_head: self.kv_head,
            scale: self.scale,
            avx2: self.avx2,
            acc: [0.0; HD],
            max: f32::NEG_INFINITY,
            denom: 0.0,
            slots: [0; CHUNK],
            pending: 0,
        };
        for (b, block) in seq.block_table.iter().enumerate() {
            let start = b * block_size;
            if start >= seq.num_cached {
                break;
            }
            let base = block.index() * block_size;
            for offset in 0..block_size.min(seq.num_cached - start) {
                sm.push(base + offset);
            }
        }
        if let Some(extra) = seq.extra_slots.get(self.i) {
            for &slot in extra {
                sm.push(slot);
            }
        }
        for j in 0..seq.len() {
            if seq.attends(self.i, j) {
                sm.push(seq.slots[j]);
            }
        }
        sm.flush();
        let inv = if sm.denom > 0.0 { 1.0 / sm.denom } else { 0.0 };
        let hd = out.len();
        for (o, a) in out.iter_mut().zip(&sm.acc[..hd]) {
            *o = a * inv;
        }
    }
}

/// AVX2 kernels for head dimensions that are multiples of 8.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// `out[j] = q · keys[j]`, four keys at a time (one horizontal sum per
    /// four dot products).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(q: *const f32, keys: &[*const f32], hd: usize, out: &mut [f32]) {
        let mut j = 0;
        while j + 4 <= keys.len() {
            let mut s = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < hd {
                let qv = _mm256_loadu_ps(q.add(i));
                for (acc, k) in s.iter_mut().zip(&keys[j..j + 4]) {
                    *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(i)), *acc);
                }
                i += 8;
            }
            // Pairwise adds leave lane l of each half holding key l's partial sums.
            let h01 = _mm256_hadd_ps(s[0], s[1]);
            let h23 = _mm256_hadd_ps(s[2], s[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(out.as_mut_ptr().add(j), four);
            j += 4;
        }
        for (o, k) in out[j..].iter_mut().zip(&keys[j..]) {
            let mut s = _mm256_setzero_ps();
            let mut i = 0;
            while i < hd {
                s = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), s);
                i += 8;
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            *o = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        }
    }

    /// `acc += sum_j w[j] values[j]`, 64 columns of `acc` held in registers
    /// across all values at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(acc: &mut [f32], w: &[f32], values: &[*const f32]) {
        let hd = acc.len();
        let mut c = 0;
        while c < hd {
            let width = (hd - c).min(64) / 8;
            let mut r = [_mm256_setzero_ps(); 8];
            for (l, reg) in r.iter_mut().enumerate().take(width) {
                *reg = _mm256_loadu_ps(acc.as_ptr().add(c + 8 * l));
            }
            for (&wj, v) in w.iter().zip(values) {
                let wv = _mm256_set1_ps(wj);
                for (l, reg) in r.iter_mut().enumerate().take(width) {
                    *reg = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.add(c + 8 * l)), *reg);
                }
            }
            for (l, reg) in r.iter().enumerate().take(width) {
                _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * l), *reg);
            }
            c += 8 * width;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub unsafe fn dots(_: *const f32, _: &[*const f32], _: usize, _: &mut [f32]) {
        unreachable!("AVX2 only on x86-64")
    }
    pub unsafe fn weighted_sum(_: &mut [f32], _: &[f32], _: &[*const f32]) {
        unreachable!("AVX2 only on x86-64")
    }
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
