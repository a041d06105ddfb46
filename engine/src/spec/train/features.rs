//! The target's side of training data: its states at every position
//! (one sequence, or many packed into each forward), the sub-vocabulary of
//! its answers, and the features' scale.
//!
//! Invariant: features are what the engine's forward computes for the same
//! tokens (a packed forward attends within each sequence only; it sums in
//! another order, so values agree to rounding).

use std::collections::HashMap;

use crate::backend::FeatureTap;
use crate::batch::{RaggedBatch, SeqRun};
use crate::error::Result;
use crate::kv::KvLayout;
use crate::model::Model;

use super::TrainSequence;

/// The target's states of `tap` at every position of `tokens`.
pub fn target_features(model: &Model, tokens: &[u32], chunk: usize, tap: &FeatureTap) -> Result<Vec<f32>> {
    let c = model.config();
    let block_size = 16;
    let layout = KvLayout {
        num_blocks: tokens.len().div_ceil(block_size).max(1),
        block_size,
        num_layers: c.num_layers,
        kv_size: c.kv_size(),
        scratch_slots: 0,
    };
    let mut kv = model.new_kv(layout)?;
    let table: Vec<_> = (0..layout.num_blocks as u32).map(heterospec_kv::BlockId).collect();
    let mut out = Vec::with_capacity(tokens.len() * tap.width(c.hidden_size));
    for start in (0..tokens.len()).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(tokens.len());
        let run = SeqRun::causal(tokens[start..end].to_vec(), start, &table, block_size)?;
        let (_, features) = model.forward_with_features(&RaggedBatch { seqs: vec![run] }, &mut kv, tap)?;
        out.extend(features);
    }
    Ok(out)
}

/// The target's states of `tap` at every position of each of `seqs`,
/// several sequences per forward (up to `max_tokens` tokens, or one longer
/// sequence alone, in chunks); `done(n)` after each forward with the
/// sequences it finished.
pub fn target_features_packed(
    model: &Model,
    seqs: &[&[u32]],
    max_tokens: usize,
    tap: &FeatureTap,
    mut done: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let c = model.config();
    let width = tap.width(c.hidden_size);
    let block_size = 16;
    let max_tokens = max_tokens.max(1);
    let mut out = Vec::with_capacity(seqs.len());
    let mut at = 0;
    while at < seqs.len() {
        let mut end = at + 1;
        let mut total = seqs[at].len();
        while end < seqs.len() && total + seqs[end].len() <= max_tokens {
            total += seqs[end].len();
            end += 1;
        }
        if end == at + 1 {
            out.push(target_features(model, seqs[at], max_tokens, tap)?);
        } else {
            let blocks: Vec<usize> = seqs[at..end]
                .iter()
                .map(|s| s.len().div_ceil(block_size).max(1))
                .collect();
            let layout = KvLayout {
                num_blocks: blocks.iter().sum(),
                block_size,
                num_layers: c.num_layers,
                kv_size: c.kv_size(),
                scratch_slots: 0,
            };
            let mut kv = model.new_kv(layout)?;
            let mut first = 0u32;
            let mut runs = Vec::new();
            for (s, &n) in seqs[at..end].iter().zip(&blocks) {
                let table: Vec<_> = (first..first + n as u32).map(heterospec_kv::BlockId).collect();
                runs.push(SeqRun::causal(s.to_vec(), 0, &table, block_size)?);
                first += n as u32;
            }
            let (_, features) = model.forward_with_features(&RaggedBatch { seqs: runs }, &mut kv, tap)?;
            let mut from = 0;
            for s in &seqs[at..end] {
                out.push(features[from * width..(from + s.len()) * width].to_vec());
                from += s.len();
            }
        }
        done(end - at);
        at = end;
    }
    Ok(out)
}

/// The `size` most frequent answer tokens (ties by id), then the lowest
/// unused ids up to `size` (BPE numbers its merges roughly by frequency, and
/// the output rows start as the target's, so unseen tokens still rank
/// sensibly); and the share of answer tokens covered.
pub fn frequent_tokens(data: &[TrainSequence], size: usize, vocab_size: usize) -> (Vec<u32>, f64) {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut total = 0;
    for s in data {
        for &t in &s.tokens[s.answer_start.max(1)..] {
            *counts.entry(t).or_default() += 1;
            total += 1;
        }
    }
    let mut ranked: Vec<(u32, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let size = size.min(vocab_size);
    ranked.truncate(size);
    let covered: usize = ranked.iter().map(|r| r.1).sum();
    let mut ids: Vec<u32> = ranked.iter().map(|r| r.0).collect();
    let mut taken: std::collections::HashSet<u32> = ids.iter().copied().collect();
    let mut next = 0u32;
    while ids.len() < size {
        if taken.insert(next) {
            ids.push(next);
        }
        next += 1;
    }
    (ids, covered as f64 / total.max(1) as f64)
}

/// RMS of all features (the scale the input noise is relative to).
pub fn feature_rms(data: &[TrainSequence]) -> f32 {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in data {
        sum += s.features.iter().map(|&f| (f as f64) * (f as f64)).sum::<f64>();
        n += s.features.len();
    }
    (sum / n.max(1) as f64).sqrt() as f32
}
