//! In-process continuous batching at the token level: the scheduling core
//! (`heterospec_kv::schedule`, the same one the router drives) admits
//! requests up to a batch size, chunks prompts, reserves lookahead slots
//! for speculation and gives back what a step did not commit; this runner
//! only moves its plans to `Engine::step` and the results back. Tests,
//! calibration, draft training and the speculation benchmark drive it.

use std::collections::HashMap;

use heterospec_kv::schedule::{NewSequence, ScheduleConfig, Scheduler, Verdict};
use heterospec_kv::{BlockPool, BlockPoolConfig};

use crate::engine::{Engine, SeqResult, SeqStep};
use crate::error::{EngineError, Result};
use crate::sampler::SamplingParams;
use crate::spec::{SpecMode, SpecOutcome};
/// One generation request, in tokens.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub speculation: SpecMode,
    pub max_new_tokens: usize,
    /// Generation ends after any of these (it is included).
    pub stop_token_ids: Vec<u32>,
}

/// Speculation counters of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecStats {
    /// Steps that committed tokens.
    pub steps: usize,
    /// Steps that verified a draft tree.
    pub spec_steps: usize,
    /// Draft tokens verified.
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
    /// Speculative steps that verified at least one draft token, and those
    /// whose first draft token was accepted.
    pub verified_steps: usize,
    pub first_accepted: usize,
    /// Steps per tier (`B0..B7`) and, last, fixed-tree steps.
    pub tier_steps: [usize; 9],
}

impl SpecStats {
    /// `1 + accepted / steps`.
    pub fn mean_acceptance_length(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            1.0 + self.accepted_tokens as f64 / self.steps as f64
        }
    }

    /// Counts one step that committed tokens.
    pub fn record(&mut self, spec: &SpecOutcome) {
        self.steps += 1;
        if spec.speculated {
            self.spec_steps += 1;
            self.draft_tokens += spec.num_draft_tokens;
            self.accepted_tokens += spec.num_accepted_tokens;
            self.verified_steps += usize::from(spec.num_draft_tokens > 0);
            self.first_accepted += usize::from(spec.num_accepted_tokens > 0);
            self.tier_steps[spec.tier.unwrap_or(8).min(8)] += 1;
        }
    }

    pub fn add(&mut self, other: &SpecStats) {
        self.steps += other.steps;
        self.spec_steps += other.spec_steps;
        self.draft_tokens += other.draft_tokens;
        self.accepted_tokens += other.accepted_tokens;
        self.verified_steps += other.verified_steps;
        self.first_accepted += other.first_accepted;
        for (a, b) in self.tier_steps.iter_mut().zip(other.tier_steps) {
            *a += b;
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenOutput {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub stats: SpecStats,
}

/// What the runner keeps per request inside the scheduling core.
struct Slot {
    index: usize,
    out: TokenOutput,
}

/// Drives an engine with its own block pool.
pub struct Runner<'e> {
    pub engine: &'e mut Engine,
    next_seq: u64,
}

impl<'e> Runner<'e> {
    pub fn new(engine: &'e mut Engine) -> Self {
        Runner { engine, next_seq: 0 }
    }

    /// Runs every request to completion, at most `max_batch` at a time,
    /// prompts in chunks of at most `chunk` tokens per step. Outputs are in
    /// request order.
    pub fn run(&mut self, requests: &[TokenRequest], max_batch: usize, chunk: usize) -> Result<Vec<TokenOutput>> {
        let layout = self.engine.kv_layout();
        let pool = BlockPool::new(BlockPoolConfig {
            num_blocks: layout.num_blocks,
            block_size: layout.block_size,
        });
        let config = ScheduleConfig {
            max_batch_tokens: max_batch.max(1).saturating_mul(chunk.max(1)),
            max_running: max_batch.max(1),
            max_prefill_chunk: chunk.max(1),
            max_lookahead: self.engine.max_lookahead(),
        };
        config.validate()?;
        let mut core: Scheduler<Slot> = Scheduler::new(config, pool, self.next_seq);
        for (index, r) in requests.iter().enumerate() {
            let seq = NewSequence {
                prompt_token_ids: r.prompt.clone(),
                max_new_tokens: r.max_new_tokens,
                speculate: r.speculation != SpecMode::Off,
                cache_salt: None,
            };
            let slot = Slot {
                index,
                out: TokenOutput::default(),
            };
            core.add(seq, slot)
                .map_err(|e| EngineError::Config(format!("request {index}: {e}")))?;
        }
        let mut outputs = vec![TokenOutput::default(); requests.len()];
        while !core.is_idle() {
            let plan = core.schedule();
            if !plan.rejected.is_empty() {
                return Err(EngineError::Config("the KV cache is too small for this batch".into()));
            }
            for seq_id in core.take_released() {
                self.engine.release(seq_id)?;
            }
            let steps: Vec<SeqStep> = plan
                .runs
                .into_iter()
                .map(|run| {
                    let r = &requests[core.get(run.seq_id).expect("scheduled").payload.index];
                    SeqStep::scheduled(run, &r.sampling, r.speculation)
                })
                .collect();
            self.next_seq = self
                .next_seq
                .max(steps.iter().map(|s| s.seq_id.0 + 1).max().unwrap_or(0));
            let results = self.engine.step(&steps)?;
            let committed = results.iter().map(SeqResult::committed).collect();
            let by_id: HashMap<_, &SeqResult> = results.iter().map(|r| (r.seq_id, r)).collect();
            let finished = core.update(committed, |seq, tokens| {
                let result = by_id[&seq.seq_id()];
                let r = &requests[seq.payload.index];
                let out = &mut seq.payload.out;
                out.stats.record(&result.spec);
                for (i, t) in result.tokens.iter().enumerate() {
                    out.token_ids.push(t.token_id);
                    out.logprobs.push(t.logprob);
                    if out.token_ids.len() >= r.max_new_tokens || r.stop_token_ids.contains(&t.token_id) {
                        return Verdict {
                            keep: i + 1,
                            finish: Some(()),
                        };
                    }
                }
                Verdict::keep_all(tokens.len())
            })?;
            for f in finished {
                let slot = f.sequence.payload;
                outputs[slot.index] = slot.out;
            }
            for seq_id in core.take_released() {
                self.engine.release(seq_id)?;
            }
        }
        Ok(outputs)
    }
}
