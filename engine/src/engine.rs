//! The engine's one contract with a scheduler: "this step, run these token
//! ranges of these sequences with these block tables" -> "these tokens were
//! committed". Prefill chunks and decode tokens go through the same call.
//!
//! `Engine` owns the model, its KV storage, the live sequences (per
//! sequence only what sampling needs: the sampler and the token history for
//! the repetition penalty) and the speculation; KV placement is entirely
//! the caller's (block tables). `step` only orchestrates the stages of
//! `crate::step`, which own every decision.

use std::collections::HashMap;
use std::time::Instant;

use crate::batch::RaggedBatch;
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::metrics;
use crate::model::Model;
use crate::spec::setup::{measure_cost_curve, target_layout, Speculation};
pub use crate::spec::setup::{DrafterKind, SpecSetup, COST_CURVE_TOKENS, DRAFT_SCRATCH_SLOTS, MAX_VERIFY_NODES};
use crate::spec::{CostCurve, SpecMode, SpecPolicy};
use crate::step::accept::{accept_step, pickable_rows};
use crate::step::choose::choose_nodes;
use crate::step::commit::{Committer, Forwarded};
use crate::step::layout::lay_out_trees;
use crate::step::plan::{budget_candidates, is_decode_step, plan_drafts};
use crate::step::validate::{validate, Validated};
use crate::step::SeqState;
pub use crate::step::{SeqId, SeqResult, SeqStep};

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

/// A step's results, and the sequences it failed for on their own (with
/// the reason), from [`Engine::step_isolated`].
pub type StepOutcome = (Vec<SeqResult>, Vec<(SeqId, String)>);

/// Where the engine's steps spent their time, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Steps that ran a forward.
    pub steps: usize,
    /// Seconds spent choosing and growing draft trees.
    pub draft_secs: f64,
    /// Seconds spent in the forward pass.
    pub forward_secs: f64,
}

/// Model + KV storage + live sequences (+ speculation).
pub struct Engine {
    model: Model,
    kv: KvStorage,
    seqs: HashMap<SeqId, SeqState>,
    spec: Option<Speculation>,
    /// When set, every fixed-tree verification logs `(H, rank label)`.
    calibration_log: Option<Vec<(f32, f32)>>,
    /// Tests only: a sequence whose new tokens hold this id fails on its own.
    poison_token: Option<u32>,
    /// Tests only: drafting fails in a step whose new tokens hold this id.
    poison_draft_token: Option<u32>,
    times: StepTimes,
}

impl Engine {
    pub fn new(model: Model, config: EngineConfig) -> Result<Self> {
        Self::with_speculation(model, config, None)
    }

    /// An engine that speculates with `spec` (measuring its cost curve now
    /// unless given one).
    pub fn with_speculation(model: Model, config: EngineConfig, spec: Option<SpecSetup>) -> Result<Self> {
        let layout = target_layout(
            &model,
            spec.as_ref().map(|s| &s.drafter),
            config.block_size,
            config.kv_cache_bytes,
        )?;
        let mut kv = model.new_kv(layout)?;
        let spec = spec.map(|s| Speculation::build(s, &model, &mut kv)).transpose()?;
        Ok(Engine {
            model,
            kv,
            seqs: HashMap::new(),
            spec,
            calibration_log: None,
            poison_token: None,
            poison_draft_token: None,
            times: StepTimes::default(),
        })
    }

    /// Tests only: makes any sequence whose new tokens hold `token` fail on
    /// its own in [`Engine::step`] (to prove that one bad sequence fails
    /// one request and no other).
    pub fn set_poison_token(&mut self, token: Option<u32>) {
        self.poison_token = token;
    }

    /// Tests only: makes drafting fail in any step where a sequence's new
    /// tokens hold `token` (to prove that a drafter failure loses nothing).
    pub fn set_poison_draft_token(&mut self, token: Option<u32>) {
        self.poison_draft_token = token;
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

    /// Most draft tokens one step accepts for a sequence (0: no drafter).
    pub fn max_lookahead(&self) -> usize {
        self.spec.as_ref().map_or(0, |s| s.policy.max_depth())
    }

    pub fn policy(&self) -> Option<&SpecPolicy> {
        self.spec.as_ref().map(|s| &s.policy)
    }

    pub fn cost_curve(&self) -> Option<&CostCurve> {
        self.spec.as_ref().map(|s| &s.curve)
    }

    /// Time spent drafting and in forwards since the engine started.
    pub fn step_times(&self) -> StepTimes {
        self.times
    }

    pub fn drafter_name(&self) -> Option<&'static str> {
        self.spec.as_ref().map(|s| s.drafter.name())
    }

    /// Starts logging `(H, rank label)` of fixed-tree steps (calibration).
    pub fn log_calibration_samples(&mut self) {
        self.calibration_log = Some(Vec::new());
    }

    pub fn take_calibration_samples(&mut self) -> Vec<(f32, f32)> {
        self.calibration_log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Test hook: verify with a deliberately biased rule.
    #[cfg(any(test, feature = "testing"))]
    pub fn use_biased_acceptance_for_tests(&mut self) {
        if let Some(s) = &mut self.spec {
            s.rule = crate::spec::verify::AcceptRule::BiasedForTests;
        }
    }

    /// Seconds per forward of each size of the cost curve, measured now.
    /// Runs before any sequence exists, so it may write anywhere in KV.
    pub fn measure_cost_curve(&mut self) -> Result<CostCurve> {
        measure_cost_curve(&self.model, &mut self.kv)
    }

    /// Runs every sequence's tokens in one forward pass (with the draft
    /// trees of speculating sequences) and commits the next token(s) where
    /// asked: validate → plan → choose → lay out → forward → accept →
    /// commit. A step that fails leaves every sequence as it was.
    pub fn step(&mut self, seqs: &[SeqStep]) -> Result<Vec<SeqResult>> {
        let layout = self.kv.layout();
        if let Some(poisoned) = self
            .poison_token
            .and_then(|t| seqs.iter().find(|s| s.new_token_ids.contains(&t)))
        {
            return Err(EngineError::BadSequence {
                seq_id: poisoned.seq_id.0,
                reason: "poisoned token (--test-poison-token)".into(),
            });
        }
        let Validated { mut batch, mut staged } = validate(seqs, &self.seqs, layout, self.model.config())?;

        let draft_start = Instant::now();
        let mut drafting_failed = false;
        let poisoned_draft = self
            .poison_draft_token
            .is_some_and(|t| seqs.iter().any(|s| s.new_token_ids.contains(&t)));
        let mut plans = match &mut self.spec {
            Some(spec) => {
                let drafted = if poisoned_draft {
                    Err(EngineError::Config("drafter fault (--test-poison-draft-token)".into()))
                } else {
                    plan_drafts(spec, seqs, &staged, &self.model, &mut self.kv)
                };
                match drafted {
                    Ok(plans) => plans,
                    // Drafts only ever propose: without them the step is
                    // plain decoding, with the same output. The drafter
                    // forgets these sequences (it catches up from their
                    // history next time), so no half-done state is reused.
                    Err(e) => {
                        tracing::warn!(error = %e, "drafting failed: this step verifies no drafts");
                        drafting_failed = true;
                        metrics::record_draft_failure();
                        for s in seqs {
                            spec.drafter.release(s.seq_id);
                        }
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        let draft_secs = draft_start.elapsed().as_secs_f64();
        if let Some(spec) = &self.spec {
            choose_nodes(spec, seqs, &mut plans, batch.num_tokens());
        }
        let plain_tokens = batch.num_tokens();
        let node_rows = lay_out_trees(&mut batch, &plans, layout);

        let rule = self
            .spec
            .as_ref()
            .map_or(crate::spec::verify::AcceptRule::Exact, |s| s.rule);
        let pickable = pickable_rows(seqs, &batch, &mut staged, &mut self.seqs, rule);
        let forward_start = Instant::now();
        let tap = self.spec.as_ref().and_then(|s| s.drafter.feature_tap());
        let (rows, features) = self.model.forward_rows(&batch, &mut self.kv, tap.as_ref(), &pickable)?;
        let forward_secs = forward_start.elapsed().as_secs_f64();

        let acceptances = accept_step(
            seqs,
            &batch,
            &plans,
            &node_rows,
            &rows,
            &mut staged,
            &mut self.seqs,
            rule,
        );
        let results = Committer {
            kv: &mut self.kv,
            live: &mut self.seqs,
            spec: self.spec.as_mut(),
            calibration_log: self.calibration_log.as_mut(),
        }
        .commit(Forwarded {
            seqs,
            batch: &batch,
            plans: &plans,
            node_rows: &node_rows,
            acceptances,
            staged,
            features: tap.is_some().then_some(&features),
            draft_secs,
        })?;
        metrics::record_forward(forward_secs);
        if let Some(spec) = self.spec.as_mut().filter(|s| s.adaptive && is_decode_step(seqs)) {
            spec.curve.observe(batch.num_tokens(), forward_secs);
            // Steps the budget rule decided (a fixed tree is forced), and
            // drafting that did not fail.
            let ruled = budget_candidates(seqs) > 0 && seqs.iter().all(|s| s.speculation != SpecMode::Fixed);
            if ruled && !drafting_failed {
                spec.rates.record(
                    seqs.len(),
                    !plans.is_empty(),
                    results.iter().map(|r| r.tokens.len()).sum(),
                    draft_secs + forward_secs,
                    spec.curve.cost(plain_tokens),
                );
            }
        }
        self.times.steps += 1;
        self.times.draft_secs += draft_secs;
        self.times.forward_secs += forward_secs;
        Ok(results)
    }

    /// [`Engine::step`], leaving out each sequence the step fails for on
    /// its own (a [`EngineError::BadSequence`]: a bad token id, a block
    /// table that does not fit, accounting that disagrees): such a sequence
    /// is forgotten and returned with the reason, and the others run. A
    /// refused step changes nothing, so running it again without that
    /// sequence is the step the others would have had. Other errors fail
    /// the whole step. Continuations (`SeqStep::continues`, which
    /// [`Engine::step`] refuses) are resolved here first; one the engine
    /// holds no pending token for fails alone the same way.
    pub fn step_isolated(&mut self, seqs: &[SeqStep]) -> Result<StepOutcome> {
        // A copy only once something failed, or to resolve continuations.
        let mut rest: Option<Vec<SeqStep>> = None;
        let mut failed = Vec::new();
        if seqs.iter().any(|s| s.continues) {
            let mut resolved = Vec::with_capacity(seqs.len());
            for mut s in seqs.iter().cloned() {
                match s.resolve(self.seqs.get(&s.seq_id)) {
                    Ok(()) => resolved.push(s),
                    Err(reason) => failed.push(self.fail_alone(s.seq_id, reason)),
                }
            }
            if resolved.is_empty() {
                return Ok((Vec::new(), failed));
            }
            rest = Some(resolved);
        }
        loop {
            let current = rest.as_deref().unwrap_or(seqs);
            match self.step(current) {
                Ok(results) => return Ok((results, failed)),
                Err(EngineError::BadSequence { seq_id, reason }) if current.iter().any(|s| s.seq_id.0 == seq_id) => {
                    let mut left = rest.take().unwrap_or_else(|| seqs.to_vec());
                    left.retain(|s| s.seq_id.0 != seq_id);
                    failed.push(self.fail_alone(SeqId(seq_id), reason));
                    if left.is_empty() {
                        return Ok((Vec::new(), failed));
                    }
                    rest = Some(left);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets a sequence that failed on its own; its failure as a step
    /// reports it.
    fn fail_alone(&mut self, seq_id: SeqId, reason: String) -> (SeqId, String) {
        tracing::warn!(seq = seq_id.0, %reason, "a sequence failed alone; the step runs without it");
        let _ = self.release(seq_id);
        (seq_id, reason)
    }

    /// Forgets a sequence. Its KV blocks belong to the caller's pool.
    pub fn release(&mut self, seq_id: SeqId) -> Result<()> {
        if let Some(spec) = &mut self.spec {
            spec.drafter.release(seq_id);
            spec.seq_gains.release(seq_id);
        }
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
    use crate::sampler::SamplingParams;
    use crate::spec::SpecMode;
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
            speculation: SpecMode::Off,
            lookahead: 0,
            continues: false,
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
        let mut computed = [0usize; 3];
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
    fn a_continuation_runs_the_token_committed_last_and_an_unknown_one_fails_alone() {
        let (mut e, mut pool) = engine();
        let (mut explicit, _) = engine();
        let mut t = BlockTable::new();
        pool.allocate_slots(&mut t, 16).unwrap();
        let prompt = step(1, vec![3, 4, 5], 0, &t, Some(SamplingParams::greedy()));
        let first = e.step(std::slice::from_ref(&prompt)).unwrap();
        assert_eq!(explicit.step(&[prompt]).unwrap(), first);
        let mut computed = 3;
        let mut last = first[0].tokens[0].token_id;
        for _ in 0..3 {
            let want = explicit.step(&[step(1, vec![last], computed, &t, None)]).unwrap();
            let mut next = step(1, vec![], 0, &t, None);
            next.continues = true;
            let mut unknown = step(9, vec![], 0, &t, None);
            unknown.continues = true;
            let (got, failed) = e.step_isolated(&[next, unknown]).unwrap();
            assert_eq!(got, want);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, SeqId(9));
            assert!(failed[0].1.contains("unknown sequence"), "{}", failed[0].1);
            computed += 1;
            last = got[0].tokens[0].token_id;
        }
        // A continuation claiming more computed tokens than the engine has fails alone.
        let mut ahead = step(1, vec![], computed + 1, &t, None);
        ahead.continues = true;
        let (got, failed) = e.step_isolated(&[ahead]).unwrap();
        assert!(got.is_empty() && failed.len() == 1, "{failed:?}");
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

    #[test]
    fn a_sequence_that_fails_alone_is_left_out_and_the_others_match_their_solo_step() {
        let (mut e, mut pool) = engine();
        let tables: Vec<BlockTable> = (0..3)
            .map(|_| {
                let mut t = BlockTable::new();
                pool.allocate_slots(&mut t, 8).unwrap();
                t
            })
            .collect();
        let greedy = Some(SamplingParams::greedy());
        let prompts = [vec![1, 2, 3], vec![4, 5], vec![6, 7, 8]];
        let solo: Vec<u32> = [0, 2]
            .iter()
            .map(|&i| {
                let (mut alone, _) = engine();
                alone
                    .step(&[step(
                        i,
                        prompts[i as usize].clone(),
                        0,
                        &tables[i as usize],
                        greedy.clone(),
                    )])
                    .unwrap()[0]
                    .tokens[0]
                    .token_id
            })
            .collect();
        // Sequence 1 claims tokens the engine never saw: it fails alone.
        let steps: Vec<SeqStep> = (0..3u64)
            .map(|i| {
                let computed = if i == 1 { 4 } else { 0 };
                step(
                    i,
                    prompts[i as usize].clone(),
                    computed,
                    &tables[i as usize],
                    greedy.clone(),
                )
            })
            .collect();
        let (results, failed) = e.step_isolated(&steps).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, SeqId(1));
        assert!(failed[0].1.contains("4 computed tokens"), "{}", failed[0].1);
        let got: Vec<(u64, u32)> = results.iter().map(|r| (r.seq_id.0, r.tokens[0].token_id)).collect();
        assert_eq!(got, vec![(0, solo[0]), (2, solo[1])]);
        assert_eq!(e.num_live_sequences(), 2, "the failed sequence is forgotten");
    }
}
