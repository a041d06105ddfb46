//! Timing the device forward at a model's real sizes (`bench forward
//! --device cuda --synthetic NAME`): prefill of a context, forwards of T
//! new tokens after it (logits for all T, as verification needs), and
//! decode steps of B sequences at once, each after its own context.
//!
//! Each figure is the median of `repeats` runs; a forward's time includes
//! copying its logits back (what the engine does with them today).
//! Sequences own disjoint blocks; repeated runs overwrite the same slots.

use std::time::Instant;

use serde::Serialize;

use super::{Backend, DeviceKv, GpuModel};
use crate::batch::{RaggedBatch, SeqRun};
use crate::error::Result;
use crate::kv::KvLayout;
use heterospec_kv::BlockId;

const BLOCK_SIZE: usize = 16;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tokens of context before each measured forward.
    pub context: usize,
    /// New-token counts T of the single-sequence forwards.
    pub new_tokens: Vec<usize>,
    /// Sequence counts B of the batched decode steps.
    pub batches: Vec<usize>,
    pub repeats: usize,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            context: 256,
            new_tokens: vec![1, 2, 4, 8, 16, 32, 64],
            batches: vec![1, 16, 64],
            repeats: 10,
        }
    }
}

/// Medians, in milliseconds and tokens per second.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub prefill_tokens_per_second: f64,
    /// (T, ms per forward of T new tokens after the context).
    pub forward_ms: Vec<(usize, f64)>,
    /// (B, tokens per second of decode steps of B sequences).
    pub batch_decode_tokens_per_second: Vec<(usize, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Token ids of a run of `n` tokens (spread over the vocabulary).
fn ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % vocab) as u32).collect()
}

/// Runs `plan` on `model` (any backend: the tests use the emulator).
pub fn measure<B: Backend>(model: &GpuModel<B>, plan: &Plan) -> Result<Report> {
    let c = model.config();
    let vocab = c.vocab_size;
    let longest = plan.new_tokens.iter().copied().max().unwrap_or(1);
    let seqs = plan.batches.iter().copied().max().unwrap_or(1).max(1);
    let per_seq = (plan.context + longest).div_ceil(BLOCK_SIZE);
    let layout = KvLayout {
        num_blocks: 1 + seqs * per_seq,
        block_size: BLOCK_SIZE,
        num_layers: c.num_layers,
        kv_size: c.kv_size(),
        scratch_slots: 0,
    };
    let mut kv = DeviceKv::new(model.backend().clone(), layout)?;
    let table = |s: usize| -> Vec<BlockId> {
        (1 + s * per_seq..1 + (s + 1) * per_seq)
            .map(|b| BlockId(b as u32))
            .collect()
    };
    let mut run = |batch: &RaggedBatch| -> Result<f64> {
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        let start = Instant::now();
        model.forward_on(batch, &mut kv, c.num_layers, None, &rows)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let context = |s: usize| -> Result<RaggedBatch> {
        Ok(RaggedBatch {
            seqs: vec![SeqRun::causal(ids(plan.context, s, vocab), 0, &table(s), BLOCK_SIZE)?],
        })
    };
    // Every sequence's context; the first one's, timed.
    for s in 1..seqs {
        run(&context(s)?)?;
    }
    let mut prefill = Vec::new();
    for _ in 0..plan.repeats.max(1) {
        prefill.push(run(&context(0)?)?);
    }
    let prefill_tokens_per_second = plan.context as f64 / median(prefill);
    let mut forward_ms = Vec::new();
    for &t in &plan.new_tokens {
        let batch = RaggedBatch {
            seqs: vec![SeqRun::causal(ids(t, 1000, vocab), plan.context, &table(0), BLOCK_SIZE)?.with_all_logits()],
        };
        let times = (0..plan.repeats.max(1))
            .map(|_| run(&batch))
            .collect::<Result<Vec<_>>>()?;
        forward_ms.push((t, 1e3 * median(times)));
    }
    let mut batch_decode_tokens_per_second = Vec::new();
    for &b in &plan.batches {
        let batch = RaggedBatch {
            seqs: (0..b)
                .map(|s| SeqRun::causal(ids(1, 2000 + s, vocab), plan.context, &table(s), BLOCK_SIZE))
                .collect::<Result<Vec<_>>>()?,
        };
        let times = (0..plan.repeats.max(1))
            .map(|_| run(&batch))
            .collect::<Result<Vec<_>>>()?;
        batch_decode_tokens_per_second.push((b, b as f64 / median(times)));
    }
    Ok(Report {
        prefill_tokens_per_second,
        forward_ms,
        batch_decode_tokens_per_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{synthetic, Emulator};
    use std::sync::Arc;

    /// The plan runs end to end on a small synthetic model under the
    /// emulator: every T and B measured, in order, with positive rates.
    #[test]
    fn the_device_bench_runs_its_plan() {
        let c = synthetic::tiny_config(50);
        let model = GpuModel::synthetic(Arc::new(Emulator), c, 3).unwrap();
        let plan = Plan {
            context: 20,
            new_tokens: vec![1, 3],
            batches: vec![1, 3],
            repeats: 1,
        };
        let r = measure(&model, &plan).unwrap();
        assert!(r.prefill_tokens_per_second > 0.0);
        assert_eq!(r.forward_ms.iter().map(|&(t, _)| t).collect::<Vec<_>>(), [1, 3]);
        assert!(r.forward_ms.iter().all(|&(_, ms)| ms > 0.0));
        let b: Vec<usize> = r.batch_decode_tokens_per_second.iter().map(|&(b, _)| b).collect();
        assert_eq!(b, [1, 3]);
    }
}
