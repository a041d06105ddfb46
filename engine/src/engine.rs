//! The engine's one contract with a scheduler: "this step, run these token
//! ranges of these sequences with these block tables" -> "these tokens were
//! committed". Prefill chunks and decode tokens go through the same call.
//!
//! The engine keeps, per live sequence, only what sampling needs: the
//! sampler (with its seeded random stream) and the token history for the
//! repetition penalty. KV placement is entirely the caller's (block tables).

use std::collections::HashMap;
use std::time::Instant;

use heterospec_kv::BlockId;

use crate::batch::{RaggedBatch, SeqRun};
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::metrics;
use crate::model::Model;
use crate::sampler::{SampledToken, Sampler, SamplingParams};
use crate::spec::budget::{select, RateModel, SeqCandidates};
use crate::spec::calibrate::rank_label;
use crate::spec::drafter::{DraftInput, Drafter, ModelDrafter, NgramDrafter, TargetView};
use crate::spec::head::DraftHead;
use crate::spec::tree::{grow, DraftTree};
use crate::spec::verify::{accept, AcceptRule};
use crate::spec::{CostCurve, SpecMode, SpecOutcome, SpecPolicy};

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

/// Most tree nodes (besides roots) one step verifies: the target's scratch.
pub const MAX_VERIFY_NODES: usize = 256;
/// Scratch slots of a model drafter's tree nodes per step.
pub const DRAFT_SCRATCH_SLOTS: usize = 1024;
/// Forward sizes measured at start-up for the cost curve.
pub const COST_CURVE_TOKENS: [usize; 8] = [1, 2, 4, 8, 16, 32, 48, 64];

/// Which drafter an engine runs.
pub enum DrafterKind {
    Ngram,
    /// The target's first `num_layers` layers.
    SelfDraft {
        num_layers: usize,
    },
    /// A separate model with the target's vocabulary.
    Model(Box<Model>),
    /// An EAGLE-style draft head on the target's features.
    Head(Box<DraftHead>),
}

/// Speculation settings of an engine.
pub struct SpecSetup {
    pub drafter: DrafterKind,
    pub policy: SpecPolicy,
    /// Cap on tree tokens (roots and nodes) per step; `None`: the largest
    /// size of the cost curve.
    pub verify_budget: Option<usize>,
    /// `None`: measured at start-up.
    pub cost_curve: Option<CostCurve>,
}

struct Speculation {
    drafter: Box<dyn Drafter>,
    policy: SpecPolicy,
    curve: CostCurve,
    verify_budget: usize,
    /// Test hook: a deliberately wrong acceptance rule.
    rule: AcceptRule,
    /// Decaying sums of accepted draft tokens and of their predicted
    /// number (`Σ exp(score)` of verified nodes).
    accepted_ema: f64,
    predicted_ema: f64,
    /// Decaying mean of drafting seconds per drafted sequence.
    draft_secs_per_seq: f64,
    /// Decaying sums over sequences the budget rule drafted for: how many,
    /// their accepted tokens and their verified draft nodes.
    budget_drafted: f64,
    budget_accepted: f64,
    budget_nodes: f64,
}

/// Per-step decay of the acceptance sums (a memory of a few hundred steps).
const ACCEPTANCE_DECAY: f64 = 0.995;

impl Speculation {
    /// Measured over predicted acceptance, with a prior of one token each;
    /// it only ever lowers the drafter's estimates (raising them was
    /// measured to verify more nodes that do not pay: the nodes chosen are
    /// the most confident, which are the overconfident ones).
    fn gain_scale(&self) -> f64 {
        ((self.accepted_ema + 1.0) / (self.predicted_ema + 1.0)).clamp(0.05, 1.0)
    }

    /// Accepted tokens and verified nodes per sequence the budget rule
    /// drafted for, recently, each with a prior of one (so a new engine, or
    /// one that stopped drafting long enough ago, tries drafting again).
    fn budget_gain(&self) -> (f64, f64) {
        let n = self.budget_drafted + 1.0;
        ((self.budget_accepted + 1.0) / n, (self.budget_nodes + 1.0) / n)
    }

    fn decay_budget_gain(&mut self) {
        self.budget_drafted *= ACCEPTANCE_DECAY;
        self.budget_accepted *= ACCEPTANCE_DECAY;
        self.budget_nodes *= ACCEPTANCE_DECAY;
    }

    fn rate_model(&self, base_tokens: usize, base_committed: usize) -> RateModel<'_> {
        RateModel {
            curve: &self.curve,
            base_tokens,
            overhead_secs: 0.0,
            base_committed: base_committed as f64,
            gain_scale: self.gain_scale(),
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
    /// Covers at least `num_computed + new_token_ids.len() + lookahead` tokens.
    pub block_table: Vec<BlockId>,
    /// Required the first time the engine sees the sequence.
    pub sampling: Option<SamplingParams>,
    /// On first sight with `num_computed > 0` (a prefix-cache hit): the
    /// cached tokens, for the repetition penalty's history.
    pub cached_token_ids: Vec<u32>,
    /// Whether this run ends the known tokens, so the next one is sampled.
    pub sample: bool,
    pub speculation: SpecMode,
    /// Slots reserved after the new tokens: at most this many draft tokens
    /// are accepted (so at most `lookahead + 1` tokens are committed).
    pub lookahead: usize,
}

/// What a step committed for one sequence (empty for a mid-prompt chunk).
/// KV now holds the new tokens and every committed token but the last.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqResult {
    pub seq_id: SeqId,
    pub tokens: Vec<SampledToken>,
    pub spec: SpecOutcome,
}

struct SeqState {
    sampler: Sampler,
    /// Every token whose KV exists (after a step: through the new tokens
    /// and accepted draft tokens).
    history: Vec<u32>,
}

/// One speculating sequence's plan for this step.
struct Plan {
    /// Index into the step's sequences.
    seq: usize,
    tree: DraftTree,
    fixed: bool,
    tier: Option<usize>,
    entropy: f32,
    max_accept: usize,
    max_nodes: usize,
    nodes: Vec<usize>,
}

/// Model + KV storage + live sequences (+ drafter).
pub struct Engine {
    model: Model,
    kv: KvStorage,
    seqs: HashMap<SeqId, SeqState>,
    spec: Option<Speculation>,
    /// When set, every fixed-tree verification logs `(H, rank label)`.
    calibration_log: Option<Vec<(f32, f32)>>,
}

impl Engine {
    pub fn new(model: Model, config: EngineConfig) -> Result<Self> {
        Self::with_speculation(model, config, None)
    }

    /// An engine that speculates with `spec` (measuring its cost curve now
    /// unless given one).
    pub fn with_speculation(model: Model, config: EngineConfig, spec: Option<SpecSetup>) -> Result<Self> {
        let draft_bytes = match spec.as_ref().map(|s| &s.drafter) {
            Some(DrafterKind::Model(m)) => ModelDrafter::bytes_per_block(m, config.block_size),
            Some(DrafterKind::Head(h)) => h.bytes_per_block(config.block_size),
            _ => 0,
        };
        let target_bytes = ModelDrafter::bytes_per_block(&model, config.block_size);
        // The KV budget covers both models' blocks.
        let share = config.kv_cache_bytes / (target_bytes + draft_bytes).max(1) * target_bytes;
        let mut layout = KvLayout::for_budget(model.config(), config.block_size, share)?;
        if let Some(s) = &spec {
            layout.scratch_slots = MAX_VERIFY_NODES
                + match s.drafter {
                    DrafterKind::SelfDraft { .. } => DRAFT_SCRATCH_SLOTS,
                    _ => 0,
                };
        }
        let mut engine = Engine {
            kv: model.new_kv(layout)?,
            seqs: HashMap::new(),
            spec: None,
            calibration_log: None,
            model,
        };
        let Some(setup) = spec else { return Ok(engine) };
        setup.policy.validate().map_err(EngineError::Config)?;
        let k = setup.policy.entropy_top_k;
        let drafter: Box<dyn Drafter> = match setup.drafter {
            DrafterKind::Ngram => Box::new(NgramDrafter {
                entropy_top_k: k,
                ..NgramDrafter::default()
            }),
            DrafterKind::SelfDraft { num_layers } => {
                if num_layers == 0 || num_layers >= engine.model.config().num_layers {
                    return Err(EngineError::Config(format!(
                        "self-draft layers must be in 1..{}, got {num_layers}",
                        engine.model.config().num_layers
                    )));
                }
                Box::new(ModelDrafter::self_draft(num_layers).with_entropy_top_k(k))
            }
            DrafterKind::Model(m) => Box::new(
                ModelDrafter::with_model(*m, layout, engine.model.config().vocab_size, DRAFT_SCRATCH_SLOTS)?
                    .with_entropy_top_k(k),
            ),
            DrafterKind::Head(h) => {
                if h.hidden_size() != engine.model.config().hidden_size {
                    return Err(EngineError::Config(format!(
                        "the draft head's hidden size is {}, the target's {}",
                        h.hidden_size(),
                        engine.model.config().hidden_size
                    )));
                }
                Box::new(ModelDrafter::with_head(*h, layout, DRAFT_SCRATCH_SLOTS).with_entropy_top_k(k))
            }
        };
        let curve = match setup.cost_curve {
            Some(c) => c,
            None => engine.measure_cost_curve()?,
        };
        let verify_budget = setup.verify_budget.unwrap_or(curve.max_tokens()).max(1);
        tracing::info!(
            drafter = drafter.name(),
            verify_budget,
            cost_curve_ms = ?curve.points().iter().map(|&(t, s)| (t, (s * 1e4).round() / 10.0)).collect::<Vec<_>>(),
            "speculation ready"
        );
        engine.spec = Some(Speculation {
            drafter,
            policy: setup.policy,
            curve,
            verify_budget,
            rule: AcceptRule::Exact,
            accepted_ema: 0.0,
            predicted_ema: 0.0,
            draft_secs_per_seq: 0.0,
            budget_drafted: 0.0,
            budget_accepted: 0.0,
            budget_nodes: 0.0,
        });
        Ok(engine)
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
    #[doc(hidden)]
    pub fn use_biased_acceptance_for_tests(&mut self) {
        if let Some(s) = &mut self.spec {
            s.rule = AcceptRule::BiasedForTests;
        }
    }

    /// Seconds per forward of `T` tokens after a 128-token context (best of
    /// two runs), for `T` in [`COST_CURVE_TOKENS`]. Runs before any sequence
    /// exists, so it may write anywhere in KV.
    pub fn measure_cost_curve(&mut self) -> Result<CostCurve> {
        let layout = self.kv.layout();
        let bs = layout.block_size;
        let max_t = *COST_CURVE_TOKENS.last().expect("non-empty");
        let blocks_available = layout.num_blocks - 1;
        let context = 128.min((blocks_available * bs).saturating_sub(max_t));
        let num_blocks = (context + max_t).div_ceil(bs).min(blocks_available);
        let table: Vec<BlockId> = (1..=num_blocks as u32).map(BlockId).collect();
        let mut points = Vec::new();
        for &t in COST_CURVE_TOKENS.iter().filter(|&&t| context + t <= num_blocks * bs) {
            let run = SeqRun::causal(vec![1; t], context, &table, bs)?.with_all_logits();
            let batch = RaggedBatch { seqs: vec![run] };
            let mut best = f64::INFINITY;
            for _ in 0..2 {
                let start = Instant::now();
                self.model.forward(&batch, &mut self.kv)?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            points.push((t, best));
        }
        Ok(CostCurve::new(points))
    }

    /// Runs every sequence's tokens in one forward pass (with the draft
    /// trees of speculating sequences) and commits the next token(s) where
    /// asked. Validates everything before touching KV.
    pub fn step(&mut self, seqs: &[SeqStep]) -> Result<Vec<SeqResult>> {
        let layout = self.kv.layout();
        let block_size = layout.block_size;
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
            run.validate(block_size, layout.num_slots(), self.model.config().vocab_size)
                .map_err(|e| bad(e.to_string()))?;
            batch.seqs.push(run);
        }
        let mut ids: Vec<SeqId> = seqs.iter().map(|s| s.seq_id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(EngineError::Config("a sequence appears twice in one step".into()));
        }

        // Every sequence's history now runs through its new tokens.
        for s in seqs {
            let state = self.seqs.entry(s.seq_id).or_insert_with(|| SeqState {
                sampler: Sampler::new(s.sampling.clone().expect("checked above")),
                history: s.cached_token_ids.clone(),
            });
            state.history.extend_from_slice(&s.new_token_ids);
        }

        let draft_start = Instant::now();
        let mut plans = self.draft(seqs)?;
        let draft_secs = draft_start.elapsed().as_secs_f64();
        self.choose_nodes(seqs, &mut plans, &batch);
        // Tree nodes join their sequence's run: they see all its new tokens
        // and their selected ancestors; positions continue from the root.
        let mut node_rows: Vec<HashMap<usize, usize>> = Vec::with_capacity(plans.len());
        let mut next_scratch = 0;
        for plan in &plans {
            let run = &mut batch.seqs[plan.seq];
            let m = run.len();
            let root_pos = run.positions[m - 1];
            let mut rows = HashMap::new();
            rows.insert(0, 0);
            for (i, &v) in plan.nodes.iter().enumerate() {
                let node = &plan.tree.nodes[v];
                run.token_ids.push(node.token);
                run.positions.push(root_pos + node.depth);
                run.slots.push(layout.scratch_slot(next_scratch));
                next_scratch += 1;
                run.logits_rows.push(m + i);
                rows.insert(v, i + 1);
            }
            let n = run.len();
            if n > m {
                let mut mask = vec![false; n * n];
                for i in 0..n {
                    for j in 0..=i.min(m - 1) {
                        mask[i * n + j] = true;
                    }
                }
                let index_of: HashMap<usize, usize> = plan.nodes.iter().enumerate().map(|(i, &v)| (v, m + i)).collect();
                for (i, &v) in plan.nodes.iter().enumerate() {
                    let row = m + i;
                    mask[row * n + row] = true;
                    for a in plan.tree.ancestors(v) {
                        mask[row * n + index_of[&a]] = true;
                    }
                }
                run.mask = Some(mask);
            }
            node_rows.push(rows);
        }

        let forward_start = Instant::now();
        let tap = self.spec.as_ref().and_then(|s| s.drafter.feature_tap());
        let (logits, features) = if let Some(tap) = &tap {
            self.model.forward_with_features(&batch, &mut self.kv, tap)?
        } else {
            (self.model.forward(&batch, &mut self.kv)?, Vec::new())
        };
        let forward_secs = forward_start.elapsed().as_secs_f64();
        // Features of the tokens now committed to KV: (slot, batch token).
        let mut feature_slots: Vec<(usize, usize)> = Vec::new();
        let mut token_start = Vec::with_capacity(seqs.len());
        let mut next_token = 0;
        for (run, s) in batch.seqs.iter().zip(seqs) {
            token_start.push(next_token);
            if tap.is_some() {
                let m = s.new_token_ids.len();
                feature_slots.extend(
                    run.slots[..m]
                        .iter()
                        .enumerate()
                        .map(|(t, &slot)| (slot, next_token + t)),
                );
            }
            next_token += run.len();
        }
        let vocab = self.model.config().vocab_size;
        let mut row_start = Vec::with_capacity(seqs.len());
        let mut next_row = 0;
        for run in &batch.seqs {
            row_start.push(next_row);
            next_row += run.logits_rows.len();
        }
        let row = |r: usize| &logits[r * vocab..(r + 1) * vocab];

        let mut results: Vec<SeqResult> = seqs
            .iter()
            .map(|s| SeqResult {
                seq_id: s.seq_id,
                tokens: Vec::new(),
                spec: SpecOutcome::default(),
            })
            .collect();
        let mut planned = vec![None; seqs.len()];
        for (p, plan) in plans.iter().enumerate() {
            planned[plan.seq] = Some(p);
        }
        let mut budget_tokens = 0;
        let (mut predicted, mut accepted_total) = (0.0, 0usize);
        let (mut budget_drafted, mut budget_accepted, mut budget_nodes) = (0usize, 0usize, 0usize);
        for (i, s) in seqs.iter().enumerate() {
            if !s.sample {
                continue;
            }
            let state = self.seqs.get_mut(&s.seq_id).expect("created above");
            let Some(p) = planned[i] else {
                let token = state.sampler.sample(row(row_start[i]), &state.history);
                results[i].tokens.push(token);
                continue;
            };
            let plan = &plans[p];
            let rows = &node_rows[p];
            let mut verified = vec![false; plan.tree.len()];
            for &v in &plan.nodes {
                verified[v] = true;
            }
            let base = row_start[i];
            let logits_of = |v: usize| row(base + rows[&v]);
            let rule = self.spec.as_ref().expect("plans imply a drafter").rule;
            let accepted = accept(
                &plan.tree,
                &verified,
                &logits_of,
                &mut state.sampler,
                &state.history,
                plan.max_accept,
                rule,
            );
            // Move the accepted nodes' KV from scratch to their positions.
            let root_pos = s.num_computed + s.new_token_ids.len() - 1;
            let src: Vec<usize> = accepted
                .nodes
                .iter()
                .map(|v| batch.seqs[i].slots[s.new_token_ids.len() + rows[v] - 1])
                .collect();
            let dst: Vec<usize> = (1..=accepted.nodes.len())
                .map(|d| {
                    let pos = root_pos + d;
                    s.block_table[pos / block_size].index() * block_size + pos % block_size
                })
                .collect();
            self.kv.copy_slots(&src, &dst)?;
            if tap.is_some() {
                for (v, &slot) in accepted.nodes.iter().zip(&dst) {
                    feature_slots.push((slot, token_start[i] + s.new_token_ids.len() + rows[v] - 1));
                }
            }
            let n_acc = accepted.nodes.len();
            predicted += plan
                .nodes
                .iter()
                .map(|&v| (plan.tree.nodes[v].score as f64).exp())
                .sum::<f64>();
            accepted_total += n_acc;
            if !plan.fixed {
                budget_drafted += 1;
                budget_accepted += n_acc;
                budget_nodes += plan.nodes.len();
            }
            state
                .history
                .extend(accepted.tokens[..n_acc].iter().map(|t| t.token_id));
            results[i].tokens = accepted.tokens;
            results[i].spec = SpecOutcome {
                speculated: true,
                tier: plan.tier,
                num_draft_tokens: plan.nodes.len(),
                num_accepted_tokens: n_acc,
            };
            budget_tokens += 1 + plan.nodes.len();
            metrics::record_spec(plan.tier, plan.nodes.len(), n_acc);
            if plan.fixed && !plan.nodes.is_empty() {
                if let Some(log) = &mut self.calibration_log {
                    let scores: Vec<f32> = plan.nodes.iter().map(|&v| plan.tree.nodes[v].score).collect();
                    let last = accepted.nodes.last().map(|&v| plan.tree.nodes[v].score);
                    log.push((plan.entropy, rank_label(&scores, last)));
                }
            }
        }
        if let Some(tap) = &tap {
            let h = tap.width(self.model.config().hidden_size);
            let mut values = Vec::with_capacity(feature_slots.len() * h);
            for &(_, t) in &feature_slots {
                values.extend_from_slice(&features[t * h..(t + 1) * h]);
            }
            let slots: Vec<usize> = feature_slots.iter().map(|f| f.0).collect();
            if let Some(spec) = &mut self.spec {
                spec.drafter.observe_features(&slots, &values)?;
            }
        }
        if !plans.is_empty() {
            metrics::record_spec_step(budget_tokens, draft_secs);
            let spec = self.spec.as_mut().expect("plans imply a drafter");
            spec.accepted_ema = spec.accepted_ema * ACCEPTANCE_DECAY + accepted_total as f64;
            spec.predicted_ema = spec.predicted_ema * ACCEPTANCE_DECAY + predicted;
            if budget_drafted > 0 {
                spec.decay_budget_gain();
                spec.budget_drafted += budget_drafted as f64;
                spec.budget_accepted += budget_accepted as f64;
                spec.budget_nodes += budget_nodes as f64;
            }
            let per_seq = draft_secs / plans.len() as f64;
            spec.draft_secs_per_seq = 0.9 * spec.draft_secs_per_seq + 0.1 * per_seq;
        }
        metrics::record_forward(forward_secs);
        Ok(results)
    }

    /// Grows the draft trees of speculating sequences: base depth for all,
    /// then deeper for low-entropy tiers (HeteroSpec sequences).
    fn draft(&mut self, seqs: &[SeqStep]) -> Result<Vec<Plan>> {
        let Some(spec) = &mut self.spec else {
            return Ok(Vec::new());
        };
        let max_context = self.model.config().max_context;
        let block_size = self.kv.layout().block_size;
        // Under the budget rule, draft only if a sure draft token could pay
        // for its share of this step's forward (a large batch already fills
        // the machine), and if what drafting recently gained per sequence
        // pays for the drafting time and the extra verified tokens, against
        // not drafting at all.
        let base_tokens: usize = seqs.iter().map(|s| s.new_token_ids.len()).sum();
        let sampling = seqs.iter().filter(|s| s.sample).count();
        let candidates = seqs
            .iter()
            .filter(|s| s.sample && s.speculation != SpecMode::Off && s.speculation != SpecMode::Fixed)
            .count();
        let mut rate = spec.rate_model(base_tokens, sampling);
        rate.overhead_secs = spec.draft_secs_per_seq * candidates as f64;
        let (gain, nodes) = spec.budget_gain();
        let budget_may_pay = rate.may_pay() && rate.drafting_pays(candidates, gain, nodes);
        if candidates > 0 && !budget_may_pay {
            // Not drafting: the measured gain fades towards the prior, so
            // the rule tries again after a few hundred steps.
            spec.decay_budget_gain();
        }
        let policy = &spec.policy;
        let mut plans = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if !s.sample || s.speculation == SpecMode::Off || s.lookahead == 0 {
                continue;
            }
            // The budget rule drafts on decode steps only: at the end of a
            // prompt chunk the drafts' estimates are least reliable (n-gram
            // matches against the chat template) while the chunk makes
            // extra tokens look free.
            if s.speculation != SpecMode::Fixed && (!budget_may_pay || s.new_token_ids.len() > 1) {
                continue;
            }
            let total = s.num_computed + s.new_token_ids.len();
            let max_accept = s
                .lookahead
                .min(policy.max_depth())
                .min(max_context.saturating_sub(total + 1))
                .min(s.block_table.len() * block_size - total);
            if max_accept == 0 {
                continue;
            }
            plans.push(Plan {
                seq: i,
                tree: DraftTree::new(*s.new_token_ids.last().expect("non-empty")),
                fixed: s.speculation == SpecMode::Fixed,
                tier: None,
                entropy: 0.0,
                max_accept,
                max_nodes: policy.num_nodes,
                nodes: Vec::new(),
            });
        }
        if plans.is_empty() {
            return Ok(plans);
        }
        let inputs: Vec<DraftInput<'_>> = plans
            .iter()
            .map(|p| {
                let s = &seqs[p.seq];
                DraftInput {
                    seq_id: s.seq_id,
                    tokens: &self.seqs[&s.seq_id].history,
                    num_computed: s.num_computed,
                    block_table: &s.block_table,
                }
            })
            .collect();
        let layout = self.kv.layout();
        let mut target = TargetView {
            model: &self.model,
            kv: &mut self.kv,
            scratch: MAX_VERIFY_NODES..layout.scratch_slots,
        };
        let mut trees: Vec<DraftTree> = plans.iter().map(|p| p.tree.clone()).collect();
        let base: Vec<usize> = plans.iter().map(|p| policy.depth.min(p.max_accept)).collect();
        grow(
            spec.drafter.as_mut(),
            &mut target,
            &inputs,
            &mut trees,
            &base,
            policy.top_k,
        )?;
        let mut deeper = base.clone();
        for (p, plan) in plans.iter_mut().enumerate() {
            plan.entropy = trees[p].path_entropy();
            if !plan.fixed {
                let tier = policy.tier(plan.entropy);
                let shape = policy.shape(tier);
                plan.tier = Some(tier);
                plan.max_nodes = shape.max_nodes;
                deeper[p] = shape.depth.min(plan.max_accept);
            }
        }
        if deeper != base {
            grow(
                spec.drafter.as_mut(),
                &mut target,
                &inputs,
                &mut trees,
                &deeper,
                policy.top_k,
            )?;
        }
        for (plan, tree) in plans.iter_mut().zip(trees) {
            plan.tree = tree;
        }
        // A drafter with nothing to propose leaves a plain decoding step.
        plans.retain(|p| p.tree.len() > 1);
        Ok(plans)
    }

    /// Fixed trees take their top-N; HeteroSpec sequences share what is
    /// left of the budget best-first, sized by the cost curve.
    fn choose_nodes(&self, seqs: &[SeqStep], plans: &mut [Plan], batch: &RaggedBatch) {
        let Some(spec) = &self.spec else { return };
        let mut nodes_left = MAX_VERIFY_NODES;
        let mut base_tokens = batch.num_tokens();
        for plan in plans.iter_mut().filter(|p| p.fixed) {
            let sel = select(
                &[SeqCandidates {
                    tree: &plan.tree,
                    max_nodes: plan.max_nodes,
                }],
                nodes_left,
                None,
            );
            plan.nodes = sel.nodes.into_iter().next().unwrap_or_default();
            nodes_left -= plan.nodes.len();
            base_tokens += plan.nodes.len();
        }
        let hetero: Vec<usize> = (0..plans.len()).filter(|&p| !plans[p].fixed).collect();
        if hetero.is_empty() {
            return;
        }
        let cands: Vec<SeqCandidates<'_>> = hetero
            .iter()
            .map(|&p| SeqCandidates {
                tree: &plans[p].tree,
                max_nodes: plans[p].max_nodes,
            })
            .collect();
        let max_total = spec.verify_budget.saturating_sub(hetero.len()).min(nodes_left);
        let rate = spec.rate_model(base_tokens, seqs.iter().filter(|s| s.sample).count());
        let sel = select(&cands, max_total, Some(rate));
        for (&p, nodes) in hetero.iter().zip(sel.nodes) {
            plans[p].nodes = nodes;
        }
    }

    /// Forgets a sequence. Its KV blocks belong to the caller's pool.
    pub fn release(&mut self, seq_id: SeqId) -> Result<()> {
        if let Some(spec) = &mut self.spec {
            spec.drafter.release(seq_id);
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
