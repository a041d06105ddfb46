//! In-process continuous batching at the token level: admits requests up to
//! a batch size, chunks prompts, reserves lookahead slots for speculation
//! and gives back what a step did not commit. The router does the same over
//! gRPC with text, stop strings and the prefix cache; this runner is what
//! tests, calibration and the speculation benchmark drive directly.

use std::collections::VecDeque;

use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};

use crate::engine::{Engine, SeqId, SeqStep};
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
            self.tier_steps[spec.tier.unwrap_or(8).min(8)] += 1;
        }
    }

    pub fn add(&mut self, other: &SpecStats) {
        self.steps += other.steps;
        self.spec_steps += other.spec_steps;
        self.draft_tokens += other.draft_tokens;
        self.accepted_tokens += other.accepted_tokens;
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

struct Running {
    index: usize,
    seq_id: SeqId,
    tokens: Vec<u32>,
    num_prompt: usize,
    num_computed: usize,
    table: BlockTable,
    started: bool,
    out: TokenOutput,
}

/// Drives an engine with its own block pool.
pub struct Runner<'e> {
    pub engine: &'e mut Engine,
    pool: BlockPool,
    next_seq: u64,
}

impl<'e> Runner<'e> {
    pub fn new(engine: &'e mut Engine) -> Self {
        let layout = engine.kv_layout();
        Runner {
            engine,
            pool: BlockPool::new(BlockPoolConfig {
                num_blocks: layout.num_blocks,
                block_size: layout.block_size,
            }),
            next_seq: 0,
        }
    }

    /// Runs every request to completion, at most `max_batch` at a time,
    /// prompts in chunks of at most `chunk` tokens per step. Outputs are in
    /// request order.
    pub fn run(&mut self, requests: &[TokenRequest], max_batch: usize, chunk: usize) -> Result<Vec<TokenOutput>> {
        let mut outputs = vec![TokenOutput::default(); requests.len()];
        let mut waiting: VecDeque<usize> = (0..requests.len()).collect();
        let mut running: Vec<Running> = Vec::new();
        let max_lookahead = self.engine.max_lookahead();
        while !waiting.is_empty() || !running.is_empty() {
            while running.len() < max_batch.max(1) {
                let Some(index) = waiting.pop_front() else { break };
                let r = &requests[index];
                if r.prompt.is_empty() || r.max_new_tokens == 0 {
                    return Err(EngineError::Config(format!(
                        "request {index}: empty prompt or max_new_tokens 0"
                    )));
                }
                running.push(Running {
                    index,
                    seq_id: SeqId(self.next_seq),
                    tokens: r.prompt.clone(),
                    num_prompt: r.prompt.len(),
                    num_computed: 0,
                    table: BlockTable::new(),
                    started: false,
                    out: TokenOutput::default(),
                });
                self.next_seq += 1;
            }
            let mut steps = Vec::with_capacity(running.len());
            for seq in &mut running {
                let r = &requests[seq.index];
                let n = (seq.tokens.len() - seq.num_computed).min(chunk.max(1));
                let sample = seq.num_computed + n == seq.tokens.len();
                let remaining = r.max_new_tokens - seq.out.token_ids.len();
                let lookahead = if sample && r.speculation != SpecMode::Off {
                    max_lookahead.min(remaining - 1)
                } else {
                    0
                };
                self.pool
                    .allocate_slots(&mut seq.table, seq.num_computed + n + lookahead)
                    .ok_or_else(|| EngineError::Config("the KV cache is too small for this batch".into()))?;
                steps.push(SeqStep {
                    seq_id: seq.seq_id,
                    new_token_ids: seq.tokens[seq.num_computed..seq.num_computed + n].to_vec(),
                    num_computed: seq.num_computed,
                    block_table: seq.table.block_ids().to_vec(),
                    sampling: (!seq.started).then(|| r.sampling.clone()),
                    cached_token_ids: Vec::new(),
                    sample,
                    speculation: r.speculation,
                    lookahead,
                });
                seq.started = true;
            }
            let results = self.engine.step(&steps)?;
            let mut done = Vec::new();
            for (i, (seq, result)) in running.iter_mut().zip(results).enumerate() {
                let r = &requests[seq.index];
                let n = steps[i].new_token_ids.len();
                seq.num_computed += n + result.tokens.len().saturating_sub(1);
                if result.tokens.is_empty() {
                    continue;
                }
                seq.out.stats.record(&result.spec);
                let mut finished = false;
                for t in &result.tokens {
                    seq.out.token_ids.push(t.token_id);
                    seq.out.logprobs.push(t.logprob);
                    seq.tokens.push(t.token_id);
                    if seq.out.token_ids.len() >= r.max_new_tokens || r.stop_token_ids.contains(&t.token_id) {
                        finished = true;
                        break;
                    }
                }
                if finished {
                    done.push(i);
                } else {
                    self.pool.truncate(&mut seq.table, seq.num_computed);
                }
                debug_assert!(seq.tokens.len() >= seq.num_prompt);
            }
            for i in done.into_iter().rev() {
                let mut seq = running.remove(i);
                self.pool.free_table(&mut seq.table);
                self.engine.release(seq.seq_id)?;
                outputs[seq.index] = seq.out;
            }
        }
        Ok(outputs)
    }
}
