//! Attention over paged KV for a ragged batch.
//!
//! Each (token, query head) row walks the keys its sequence may see (cached
//! prefix through the block table, then the new tokens its mask allows;
//! in a sliding-window layer, only those within the window),
//! reading K/V in place from the paged storage, in chunks of [`CHUNK`] keys:
//! the chunk's scores, one rescale of the running sum when the maximum
//! grows, the chunk's exponentials (vectorized, no libm call), then the
//! weighted values. A task holds the rows of a few tokens of one sequence
//! that read one KV head, and adds each cached value to all of them at once
//! (see [`paged_attention`]). No copies of the context are made. Compiled
//! for AVX2 when the CPU has it.
//! Cost: O(tokens x heads x visible keys x head_dim).

use rayon::prelude::*;

use crate::batch::{RaggedBatch, SeqRun};
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
    /// Scores are `q . k * scale` (`1 / sqrt(head_dim)` in most models).
    pub scale: f32,
    /// A token sees only keys less than this many positions behind it
    /// (itself included); `None`: the whole context.
    pub window: Option<usize>,
}

impl HeadShape {
    /// The first position a token at `position` sees.
    fn first_visible(&self, position: usize) -> usize {
        self.window.map_or(0, |w| (position + 1).saturating_sub(w))
    }
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
        let (n, weights) = self.take_weights();
        if n > 0 {
            self.add_values(n, &weights);
        }
    }

    /// Scores the pending chunk, moves the running maximum (rescaling the
    /// sum) and returns the chunk's softmax weights; the chunk's slots stay
    /// in `slots[..n]` for [`add_values`](Self::add_values).
    #[inline(always)]
    fn take_weights(&mut self) -> (usize, [f32; CHUNK]) {
        let n = self.pending;
        let mut scores = [0.0f32; CHUNK];
        if n == 0 {
            return (0, scores);
        }
        self.pending = 0;
        let hd = self.head_dim();
        let simd = self.avx2 && hd % 8 == 0;
        if simd {
            let mut keys = [std::ptr::null::<f32>(); CHUNK];
            for (k, &slot) in keys.iter_mut().zip(&self.slots[..n]) {
                *k = self.kv.key(slot, self.kv_head, hd).as_ptr();
            }
            // SAFETY: AVX2 present; `q` and every key hold `hd` values.
            unsafe { simd::dots(self.q.as_ptr(), &keys[..n], hd, &mut scores[..n]) };
        } else {
            for (s, &slot) in scores.iter_mut().zip(&self.slots[..n]) {
                *s = dot(&self.q[..hd], self.kv.key(slot, self.kv_head, hd));
            }
        }
        self.weights_from_dots(n, scores)
    }

    /// The softmax weights of a chunk of `n` keys from their dot products
    /// with `q` (moving the running maximum and denominator).
    #[inline(always)]
    fn weights_from_dots(&mut self, n: usize, mut scores: [f32; CHUNK]) -> (usize, [f32; CHUNK]) {
        let hd = self.head_dim();
        for s in &mut scores[..n] {
            *s *= self.scale;
        }
        // Whole-chunk loops over 8 lanes (they vectorize): padding scores
        // are -inf for the maximum and 0 for the sum.
        for s in &mut scores[n..] {
            *s = f32::NEG_INFINITY;
        }
        let mut lanes = [f32::NEG_INFINITY; 8];
        for eight in scores.chunks_exact(8) {
            for (m, &v) in lanes.iter_mut().zip(eight) {
                *m = m.max(v);
            }
        }
        let chunk_max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if chunk_max > self.max {
            let rescale = exp_nonpositive(self.max - chunk_max);
            self.denom *= rescale;
            for a in &mut self.acc[..hd] {
                *a *= rescale;
            }
            self.max = chunk_max;
        }
        let max = self.max;
        for s in &mut scores {
            *s = exp_nonpositive(*s - max);
        }
        for s in &mut scores[n..] {
            *s = 0.0;
        }
        let mut sums = [0.0f32; 8];
        for eight in scores.chunks_exact(8) {
            for (a, &v) in sums.iter_mut().zip(eight) {
                *a += v;
            }
        }
        self.denom += sums.iter().sum::<f32>();
        (n, scores)
    }

    /// `acc += sum_j weights[j] v(slots[j])` over the chunk's `n` keys.
    #[inline(always)]
    fn add_values(&mut self, n: usize, weights: &[f32; CHUNK]) {
        let hd = self.head_dim();
        if self.avx2 && hd % 8 == 0 {
            let mut values = [std::ptr::null::<f32>(); CHUNK];
            for (v, &slot) in values.iter_mut().zip(&self.slots[..n]) {
                *v = self.kv.value(slot, self.kv_head, hd).as_ptr();
            }
            // SAFETY: AVX2 present; `acc` and every value hold `hd` values,
            // a multiple of 8. One row: the same operations as a grouped row.
            unsafe {
                simd::grouped_sum(
                    &[self.acc.as_mut_ptr()],
                    std::slice::from_ref(weights),
                    &values[..n],
                    hd,
                )
            };
        } else {
            for (&w, &slot) in weights[..n].iter().zip(&self.slots[..n]) {
                let v = self.kv.value(slot, self.kv_head, hd);
                for (a, &x) in self.acc[..hd].iter_mut().zip(v) {
                    *a += w * x;
                }
            }
        }
    }

    /// Feeds the keys after the first `skip` cached ones (those went through
    /// [`grouped_chunks`]) and its window's first, then the token's extra
    /// slots and the new tokens its mask and window allow, and writes the
    /// normalized result.
    #[inline(always)]
    fn finish(mut self, seq: &SeqRun, i: usize, shape: &HeadShape, skip: usize, out: &mut [f32]) {
        let first = shape.first_visible(seq.positions[i]);
        for pos in skip.max(first)..seq.num_cached {
            self.push(seq.cached_slot(pos, shape.block_size));
        }
        if let Some(extra) = seq.extra_slots.get(i) {
            for &slot in extra {
                self.push(slot);
            }
        }
        for j in 0..seq.len() {
            if seq.attends(i, j) && seq.positions[j] >= first {
                self.push(seq.slots[j]);
            }
        }
        self.flush();
        let inv = if self.denom > 0.0 { 1.0 / self.denom } else { 0.0 };
        let hd = out.len();
        for (o, a) in out.iter_mut().zip(&self.acc[..hd]) {
            *o = a * inv;
        }
    }
}

/// The whole chunks of a sequence's cached keys for several rows (query
/// heads and tokens) that share a KV head: each row takes its weights as it
/// would alone, then one pass adds the values to all rows, loading each
/// value once. Per row, the same operations in the same order as
/// [`OnlineSoftmax::push`] would do, so the result is the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn grouped_chunks<const HD: usize>(rows: &mut [OnlineSoftmax<'_, HD>], seq: &SeqRun, block_size: usize) -> usize {
    let whole = seq.num_cached / CHUNK * CHUNK;
    let Some(first) = rows.first() else { return 0 };
    let (kv, kv_head) = (first.kv, first.kv_head);
    let hd = first.head_dim();
    let mut weights = vec![[0.0f32; CHUNK]; rows.len()];
    for start in (0..whole).step_by(CHUNK) {
        let mut slots = [0usize; CHUNK];
        for (j, slot) in slots.iter_mut().enumerate() {
            *slot = seq.cached_slot(start + j, block_size);
        }
        let mut keys = [std::ptr::null::<f32>(); CHUNK];
        for (k, &slot) in keys.iter_mut().zip(&slots) {
            *k = kv.key(slot, kv_head, hd).as_ptr();
        }
        for (rows, w) in rows.chunks_mut(simd::DOT_ROWS).zip(weights.chunks_mut(simd::DOT_ROWS)) {
            let mut qs = [std::ptr::null::<f32>(); simd::DOT_ROWS];
            for (q, row) in qs.iter_mut().zip(rows.iter()) {
                *q = row.q.as_ptr();
            }
            // SAFETY: only called on the AVX2 path; every query and key
            // holds `hd` values, a multiple of 8.
            unsafe { simd::grouped_dots(&qs[..rows.len()], &keys, hd, w) };
            for (row, w) in rows.iter_mut().zip(w.iter_mut()) {
                *w = row.weights_from_dots(CHUNK, *w).1;
            }
        }
        let mut values = [std::ptr::null::<f32>(); CHUNK];
        for (v, &slot) in values.iter_mut().zip(&slots) {
            *v = kv.value(slot, kv_head, hd).as_ptr();
        }
        for (rows, w) in rows.chunks_mut(simd::GROUP_ROWS).zip(weights.chunks(simd::GROUP_ROWS)) {
            let mut accs = [std::ptr::null_mut::<f32>(); simd::GROUP_ROWS];
            for (a, row) in accs.iter_mut().zip(rows.iter_mut()) {
                *a = row.acc.as_mut_ptr();
            }
            // SAFETY: only called on the AVX2 path; every `acc` and value
            // holds `hd` values, a multiple of 8.
            unsafe { simd::grouped_sum(&accs[..rows.len()], w, &values, hd) };
        }
    }
    whole
}

/// `out (tokens, num_heads * head_dim) <- softmax(q k^T * scale) v`, with
/// the keys of each token chosen by its sequence's cache, mask and window
/// (`shape`; extra slots are seen whole: the caller keeps them inside the
/// window). `q` is
/// laid out like `out`; `token_owner[t] = (seq index, index in its run)`.
///
/// One task per (sequence, few tokens, KV head): its rows are those tokens'
/// query heads that read that KV head, so the cached keys' values are
/// loaded once for all of them (on the AVX2 path; the portable path runs
/// each row on its own). Rows never mix their arithmetic, so a token's
/// result does not depend on which other tokens ran with it.
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
        ..
    } = shape;
    let group = num_heads / num_kv_heads;
    let tokens_per_task = (GROUP_TASK_ROWS / group).max(1);
    // A sequence's tasks go KV head by KV head, so that the tasks reading
    // one head's cache sit together and mostly run on one thread, which
    // then finds that cache warm (the weights streaming through evicted it).
    let mut tasks = Vec::new();
    let mut t = 0;
    while t < token_owner.len() {
        let seq = token_owner[t].0;
        let mut end = t;
        while end < token_owner.len() && token_owner[end].0 == seq {
            end += 1;
        }
        for h in 0..num_kv_heads {
            tasks.extend(
                (t..end)
                    .step_by(tokens_per_task)
                    .map(|s| (s..(s + tokens_per_task).min(end), h, h * group..(h + 1) * group)),
            );
        }
        t = end;
    }
    // Too few tasks to keep every thread busy (a decode step of one
    // sequence has one per KV head): one per query head instead. A row's
    // arithmetic is the same in any group, so this changes no bits.
    if tasks.len() < 2 * rayon::current_num_threads() && group > 1 {
        tasks = tasks
            .into_iter()
            .flat_map(|(tokens, h, heads)| heads.map(move |q| (tokens.clone(), h, q..q + 1)))
            .collect();
    }
    let avx2 = has_avx2() && head_dim % 8 == 0;
    let shared = crate::par::SharedOut::new(out);
    tasks.into_par_iter().for_each(|(tokens, kv_head, heads)| {
        // SAFETY: each task writes only the (token, head) rows it owns.
        let out = unsafe { shared.slice() };
        let task = Task {
            q,
            batch,
            token_owner,
            kv,
            shape,
            tokens,
            kv_head,
            heads,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { task.run_avx2(out) };
        }
        task.run(out, false)
    });
}

/// Query rows per task (tokens x heads sharing a KV head), at least one token.
const GROUP_TASK_ROWS: usize = 12;

/// Tokens `tokens` (consecutive, one sequence) and query heads `heads`
/// (all of `kv_head`'s, or one).
struct Task<'a> {
    q: &'a [f32],
    batch: &'a RaggedBatch,
    token_owner: &'a [(usize, usize)],
    kv: LayerKv<'a>,
    shape: HeadShape,
    tokens: std::ops::Range<usize>,
    kv_head: usize,
    /// The query heads of `kv_head` this task computes.
    heads: std::ops::Range<usize>,
}

impl Task<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run(out, true)
    }

    #[inline(always)]
    fn run(&self, out: &mut [f32], avx2: bool) {
        match self.shape.head_dim {
            64 => self.run_for::<64>(out, avx2),
            128 => self.run_for::<128>(out, avx2),
            _ => self.run_for::<MAX_HEAD_DIM>(out, avx2),
        }
    }

    #[inline(always)]
    fn run_for<const HD: usize>(&self, out: &mut [f32], avx2: bool) {
        let HeadShape {
            num_heads,
            head_dim: hd,
            scale,
            ..
        } = self.shape;
        let heads = self.heads.clone();
        let seq = &self.batch.seqs[self.token_owner[self.tokens.start].0];
        let cells: Vec<(usize, usize)> = self
            .tokens
            .clone()
            .flat_map(|t| heads.clone().map(move |h| (t, h)))
            .collect();
        let row_of = |(t, h): (usize, usize)| (t * num_heads + h) * hd..(t * num_heads + h + 1) * hd;
        let mut rows: Vec<OnlineSoftmax<'_, HD>> = cells
            .iter()
            .map(|&cell| OnlineSoftmax {
                q: &self.q[row_of(cell)],
                kv: self.kv,
                kv_head: self.kv_head,
                scale,
                avx2,
                acc: [0.0; HD],
                max: f32::NEG_INFINITY,
                denom: 0.0,
                slots: [0; CHUNK],
                pending: 0,
            })
            .collect();
        // The shared pass reads cached keys from position 0: only for rows
        // whose window reaches back that far.
        #[cfg(target_arch = "x86_64")]
        let skip = if avx2
            && self
                .tokens
                .clone()
                .all(|t| self.shape.first_visible(seq.positions[self.token_owner[t].1]) == 0)
        {
            grouped_chunks(&mut rows, seq, self.shape.block_size)
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let skip = 0;
        for (row, cell) in rows.into_iter().zip(cells) {
            let i = self.token_owner[cell.0].1;
            row.finish(seq, i, &self.shape, skip, &mut out[row_of(cell)]);
        }
    }
}

/// AVX2 kernels for head dimensions that are multiples of 8.
#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub unsafe fn dots(_: *const f32, _: &[*const f32], _: usize, _: &mut [f32]) {
        unreachable!("AVX2 only on x86-64")
    }
    pub unsafe fn grouped_sum(_: &[*mut f32], _: &[[f32; super::CHUNK]], _: &[*const f32], _: usize) {
        unreachable!("AVX2 only on x86-64")
    }
    pub const GROUP_ROWS: usize = 12;
    pub const DOT_ROWS: usize = 2;
    pub unsafe fn grouped_dots(
        _: &[*const f32],
        _: &[*const f32; super::CHUNK],
        _: usize,
        _: &mut [[f32; super::CHUNK]],
    ) {
        unreachable!("AVX2 only on x86-64")
    }
}

#[cfg(test)]
mod tests;
