//! The engine's one contract with a scheduler: "this step, run these token
//! ranges of these sequences with these block tables" -> "these tokens were
//! committed". Prefill chunks and decode tokens go through the same call.
//!
//! The engine keeps, per live sequence, only what sampling needs: the
//! sampler (with its seeded random stream) and the token history for the
//! repetition penalty. KV placement is entirely the caller's (block tables).

use std::collections::HashMap;

use heterospec_kv::BlockId;

use crate::batch::{RaggedBatch, SeqRun};
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::model::Model;
use crate::sampler::{SampledToken, Sampler, SamplingParams};

/// Identifies a sequence between scheduler and engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Engine sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub block_size: usize,
    pub kv_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: heterospec_kv::DEFAULT_BLOCK_SIZE,
            kv_cache_bytes: crate::kv::DEFAULT_KV_CACHE_BYTES,
        }
    }
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqStep {
    pub seq_id: SeqId,
    /// Tokens to run now (a prompt chunk, or the last committed token).
    pub new_token_ids: Vec<u32>,
    /// Tokens of this sequence already in KV.
    pub num_computed: usize,
    /// Covers at least `num_computed + new_token_ids.len()` tokens.
    pub block_table: Vec<BlockId>,
    /// Required the first time the engine sees the sequence.
    pub sampling: Option<SamplingParams>,
    /// On first sight with `num_computed > 0` (a prefix-cache hit): the
    /// cached tokens, for the repetition penalty's history.
    pub cached_token_ids: Vec<u32>,
    /// Whether this run ends the known tokens, so the next one is sampled.
    pub sample: bool,
}

/// What a step committed for one sequence (empty for a mid-prompt chunk).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqResult {
    pub seq_id: SeqId,
    pub tokens: Vec<SampledToken>,
}

struct SeqState {
    sampler: Sampler,
    history: Vec<u32>,
}

/// Model + KV storage + live sequences.
pub struct Engine {
    model: Model,
    kv: KvStorage,
    seqs: HashMap<SeqId, SeqState>,
}

impl Engine {
    pub fn new(model: Model, config: EngineConfig) -> Result<Self> {
        let layout = KvLayout::for_budget(model.config(), config.block_size, config.kv_cache_bytes)?;
        Ok(Engine {
            model,
            kv: KvStorage::new(layout),
            seqs: HashMap::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.kv.layout()
    }

    pub fn num_live_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Runs every sequence's tokens in one forward pass and samples the next
    /// token where asked. Validates everything before touching KV.
    pub fn step(&mut self, seqs: &[SeqStep]) -> Result<Vec<SeqResult>> {
        let block_size = self.kv.layout().block_size;
        let max_context = self.model.config().max_context;
        let mut batch = RaggedBatch::default();
        for s in seqs {
            let bad = |reason: String| EngineError::BadSequence {
                seq_id: s.seq_id.0,
                reason,
            };
            let known = match self.seqs.get(&s.seq_id) {
                Some(state) => state.history.len(),
                None => {
                    if s.sampling.is_none() {
                        return Err(bad("unknown sequence (never started, or released)".into()));
                    }
                    if s.cached_token_ids.len() != s.num_computed {
                        return Err(bad(format!(
                            "new sequence with {} computed tokens but {} cached token ids",
                            s.num_computed,
                            s.cached_token_ids.len()
                        )));
                    }
                    s.num_computed
                }
            };
            if known != s.num_computed {
                return Err(bad(format!(
                    "num_computed {} but the engine has seen {known} tokens",
                    s.num_computed
                )));
            }
            if s.new_token_ids.is_empty() {
                return Err(bad("no new tokens".into()));
            }
            let total = s.num_computed + s.new_token_ids.len();
            if total > max_context {
                return Err(EngineError::ContextOverflow {
                    num_tokens: total,
                    max_context,
                });
            }
            if let Some(params) = &s.sampling {
                params.validate().map_err(bad)?;
            }
            let mut run = SeqRun::causal(s.new_token_ids.clone(), s.num_computed, &s.block_table, block_size)
                .map_err(|e| bad(e.to_string()))?;
            if !s.sample {
                run.logits_rows.clear();
            }
            run.validate(block_size, self.kv.layout().num_slots(), self.model.config().vocab_size)
                .map_err(|e| bad(e.to_string()))?;
            batch.seqs.push(run);
        }
        let mut ids: Vec<SeqId> = seqs.iter().map(|s| s.seq_id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(EngineError::Config("a sequence appears twice in one step".into()));
        }

        let logits = self.model.forward(&batch, &mut self.kv)?;
        let vocab = self.model.config().vocab_size;
        let mut rows = logits.chunks_exact(vocab);
        let mut results = Vec::with_capacity(seqs.len());
        for s in seqs {
            let state = self.seqs.entry(s.seq_id).or_insert_with(|| SeqState {
                sampler: Sampler::new(s.sampling.clone().expect("checked above")),
                history: s.cached_token_ids.clone(),
            });
            state.history.extend_from_slice(&s.new_token_ids);
            let mut tokens = Vec::new();
            if s.sample {
                let row = rows.next().expect("one logits row per sampling sequence");
                tokens.push(state.sampler.sample(row, &state.history));
            }
            results.push(SeqResult {
                seq_id: s.seq_id,
                tokens,
            });
        }
        Ok(results)
    }

    /// Forgets a sequence. Its KV blocks belong to the caller's pool.
    pub fn release(&mut self, seq_id: SeqId) -> Result<()> {
        self.seqs
            .remove(&seq_id)
            .map(|_| ())
            .ok_or_else(|| EngineError::BadSequence {
                seq_id: seq_id.0,
                reason: "unknown sequence (never started, or released)".into(),
            })
    }

    /// Runs a raw ragged batch (for tests and benchmarks of the forward).
    pub fn forward(&mut self, batch: &RaggedBatch) -> Result<Vec<f32>> {
        self.model.forward(batch, &mut self.kv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_model;
    use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};

    fn engine() -> (Engine, BlockPool) {
        let engine = Engine::new(
            tiny_model(5).unwrap(),
            EngineConfig {
                block_size: 4,
                kv_cache_bytes: 1 << 20,
            },
        )
        .unwrap();
        let layout = engine.kv_layout();
        let pool = BlockPool::new(BlockPoolConfig {
            num_blocks: layout.num_blocks,
            block_size: layout.block_size,
        });
        (engine, pool)
    }

    fn step(
        seq: u64,
        tokens: Vec<u32>,
        num_computed: usize,
        table: &BlockTable,
        sampling: Option<SamplingParams>,
    ) -> SeqStep {
        SeqStep {
            seq_id: SeqId(seq),
            new_token_ids: tokens,
            num_computed,
            block_table: table.block_ids().to_vec(),
            sampling,
            cached_token_ids: vec![],
            sample: true,
        }
    }

    #[test]
    fn chunked_prefill_and_batched_decode_give_solo_greedy_tokens() {
        let prompts: Vec<Vec<u32>> = vec![(1..12).collect(), vec![7, 8], (20..40).collect()];
        let solo = |p: &Vec<u32>| {
            let (mut e, mut pool) = engine();
            let mut t = BlockTable::new();
            pool.allocate_slots(&mut t, p.len() + 8).unwrap();
            let mut out = vec![];
            let mut next = p.clone();
            let mut computed = 0;
            for i in 0..8 {
                let sampling = (i == 0).then(SamplingParams::greedy);
                let r = e.step(&[step(0, next.clone(), computed, &t, sampling)]).unwrap();
                computed += next.len();
                next = vec![r[0].tokens[0].token_id];
                out.push(next[0]);
            }
            out
        };
        let want: Vec<Vec<u32>> = prompts.iter().map(solo).collect();

        // All three together, prompts in chunks of 5 mixed with decodes.
        let (mut e, mut pool) = engine();
        let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::new()).collect();
        let mut computed = vec![0usize; 3];
        let mut pending: Vec<Vec<u32>> = prompts.clone();
        let mut got: Vec<Vec<u32>> = vec![vec![]; 3];
        while got.iter().any(|g| g.len() < 8) {
            let mut steps = vec![];
            for s in 0..3 {
                if got[s].len() == 8 {
                    continue;
                }
                let n = pending[s].len().min(5);
                let chunk: Vec<u32> = pending[s].drain(..n).collect();
                pool.allocate_slots(&mut tables[s], computed[s] + n).unwrap();
                let mut st = step(
                    s as u64,
                    chunk,
                    computed[s],
                    &tables[s],
                    (computed[s] == 0).then(SamplingParams::greedy),
                );
                st.sample = pending[s].is_empty();
                computed[s] += n;
                steps.push(st);
            }
            for r in e.step(&steps).unwrap() {
                let s = r.seq_id.0 as usize;
                if let Some(t) = r.tokens.first() {
                    got[s].push(t.token_id);
                    pending[s] = vec![t.token_id];
                } else {
                    assert!(!pending[s].is_empty(), "mid-prompt chunks commit nothing");
                }
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn unknown_released_and_inconsistent_sequences_are_errors() {
        let (mut e, mut pool) = engine();
        let mut t = BlockTable::new();
        pool.allocate_slots(&mut t, 8).unwrap();
        let err = e.step(&[step(1, vec![1, 2], 0, &t, None)]).unwrap_err();
        assert!(err.to_string().contains("unknown sequence"), "{err}");
        e.step(&[step(1, vec![1, 2], 0, &t, Some(SamplingParams::greedy()))])
            .unwrap();
        let err = e.step(&[step(1, vec![3], 5, &t, None)]).unwrap_err();
        assert!(err.to_string().contains("num_computed 5"), "{err}");
        let err = e
            .step(&[step(1, vec![3], 2, &t, None), step(1, vec![3], 2, &t, None)])
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = e.step(&[step(1, vec![3; 9], 2, &t, None)]).unwrap_err();
        assert!(err.to_string().contains("block table"), "{err}");
        e.release(SeqId(1)).unwrap();
        assert!(e.release(SeqId(1)).is_err());
        let err = e.step(&[step(1, vec![3], 2, &t, None)]).unwrap_err();
        assert!(err.to_string().contains("unknown sequence"), "{err}");
        assert_eq!(e.num_live_sequences(), 0);
    }
}
