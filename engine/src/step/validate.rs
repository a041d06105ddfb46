//! Stage 1: checks every sequence of a step against what the engine knows
//! and builds the causal ragged batch of their new tokens.
//!
//! Reads the live sequences, changes nothing: a step refused here leaves
//! the engine exactly as it was. Its output, `Staged`, holds each
//! sequence's history through its new tokens (a copy, moved into the
//! sequence by `commit`) and the sampler of a sequence seen for the first time.

use std::collections::HashMap;

use crate::batch::{RaggedBatch, SeqRun};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::sampler::Sampler;
use crate::step::{SeqId, SeqState, SeqStep, Staged};

/// The step's batch (new tokens only, before tree nodes join) and, per
/// sequence in step order, its staged state.
pub(crate) struct Validated {
    pub batch: RaggedBatch,
    pub staged: Vec<Staged>,
}

pub(crate) fn validate(
    seqs: &[SeqStep],
    live: &HashMap<SeqId, SeqState>,
    layout: KvLayout,
    config: &ModelConfig,
) -> Result<Validated> {
    let block_size = layout.block_size;
    let max_context = config.max_context;
    let mut ids: Vec<SeqId> = seqs.iter().map(|s| s.seq_id).collect();
    ids.sort_unstable();
    let mut batch = RaggedBatch::default();
    for s in seqs {
        let bad = |reason: String| EngineError::BadSequence {
            seq_id: s.seq_id.0,
            reason,
        };
        let known = match live.get(&s.seq_id) {
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
            return Err(bad(format!(
                "{total} tokens do not fit the context of {max_context} tokens"
            )));
        }
        if s.block_table.len() * block_size < total + s.lookahead {
            return Err(bad(format!(
                "block table of {} blocks cannot hold {total} tokens and a lookahead of {}",
                s.block_table.len(),
                s.lookahead
            )));
        }
        if let Some(b) = s.block_table.iter().find(|b| b.index() >= layout.num_blocks) {
            return Err(bad(format!("block {} is outside the KV storage", b.0)));
        }
        if let Some(params) = &s.sampling {
            params.validate().map_err(bad)?;
        }
        let mut run = SeqRun::causal(s.new_token_ids.clone(), s.num_computed, &s.block_table, block_size)
            .map_err(|e| bad(e.to_string()))?;
        if !s.sample {
            run.logits_rows.clear();
        }
        run.validate(block_size, layout.num_slots(), config.vocab_size)
            .map_err(|e| bad(e.to_string()))?;
        batch.seqs.push(run);
    }
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(EngineError::BadStep("a sequence appears twice in one step".into()));
    }
    let staged = seqs
        .iter()
        .map(|s| match live.get(&s.seq_id) {
            Some(state) => Staged {
                history: [state.history.as_slice(), &s.new_token_ids].concat(),
                new_sampler: None,
            },
            None => Staged {
                history: [s.cached_token_ids.as_slice(), &s.new_token_ids].concat(),
                new_sampler: Some(Sampler::new(s.sampling.clone().expect("checked above"))),
            },
        })
        .collect();
    Ok(Validated { batch, staged })
}
