//! Stage 7: the one place a step changes the engine (DESIGN §2 step 9).
//! Accepted tree nodes' KV moves from scratch to the sequence's next slots,
//! the drafter observes the target's states of every token now in KV, and
//! then, infallibly, each sequence's history grows by its new and accepted
//! tokens (new sequences become live), and the step's speculation counters
//! reach the estimates, the metrics and the calibration log.
//!
//! Invariant: the fallible writes (KV moves, features) come first, so a
//! step that fails leaves every sequence's state as it was before the step.

use std::collections::HashMap;

use crate::batch::RaggedBatch;
use crate::error::Result;
use crate::features::Features;
use crate::kv::KvStorage;
use crate::metrics;
use crate::spec::calibrate::rank_label;
use crate::spec::estimates::StepTally;
use crate::spec::setup::Speculation;
use crate::spec::SpecOutcome;
use crate::step::accept::Acceptance;
use crate::step::layout::NodeRows;
use crate::step::plan::Plan;
use crate::step::{SeqId, SeqResult, SeqState, SeqStep, Staged};

/// A step after its forward: what ran and what was accepted.
pub(crate) struct Forwarded<'a> {
    pub seqs: &'a [SeqStep],
    pub batch: &'a RaggedBatch,
    pub plans: &'a [Plan],
    pub node_rows: &'a [NodeRows],
    pub acceptances: Vec<Acceptance>,
    pub staged: Vec<Staged>,
    /// The drafter's tap of every batch token (on the host or left on the
    /// device); `None` when the drafter observes no features.
    pub features: Option<&'a Features>,
    pub draft_secs: f64,
}

/// What `commit` writes.
pub(crate) struct Committer<'a> {
    pub kv: &'a mut KvStorage,
    pub live: &'a mut HashMap<SeqId, SeqState>,
    pub spec: Option<&'a mut Speculation>,
    pub calibration_log: Option<&'a mut Vec<(f32, f32)>>,
}

impl Committer<'_> {
    pub(crate) fn commit(self, step: Forwarded<'_>) -> Result<Vec<SeqResult>> {
        let Forwarded {
            seqs,
            batch,
            plans,
            node_rows,
            acceptances,
            staged,
            features,
            draft_secs,
        } = step;
        let block_size = self.kv.layout().block_size;
        let mut token_start = Vec::with_capacity(seqs.len());
        let mut next_token = 0;
        for run in &batch.seqs {
            token_start.push(next_token);
            next_token += run.len();
        }
        // Accepted nodes: (scratch slot, destination slot, batch token).
        let mut moves: Vec<(usize, usize, usize)> = Vec::new();
        for (i, (s, a)) in seqs.iter().zip(&acceptances).enumerate() {
            let Some(p) = a.plan else { continue };
            let m = s.new_token_ids.len();
            let root_pos = s.num_computed + m - 1;
            for (d, v) in a.accepted_nodes.iter().enumerate() {
                let row = m + node_rows[p][v] - 1;
                let run = &batch.seqs[i];
                let dst = run.cached_slot(root_pos + d + 1, block_size);
                moves.push((run.slots[row], dst, token_start[i] + row));
            }
        }
        let src: Vec<usize> = moves.iter().map(|m| m.0).collect();
        let dst: Vec<usize> = moves.iter().map(|m| m.1).collect();
        self.kv.copy_slots(&src, &dst)?;
        let mut spec = self.spec;
        if let (Some(features), Some(spec)) = (features, spec.as_deref_mut()) {
            // The new tokens' states, then the accepted nodes' at their new slots.
            let mut slots = Vec::new();
            let mut rows = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                let new = &batch.seqs[i].slots[..s.new_token_ids.len()];
                slots.extend_from_slice(new);
                rows.extend((0..new.len()).map(|t| token_start[i] + t));
            }
            slots.extend(moves.iter().map(|m| m.1));
            rows.extend(moves.iter().map(|m| m.2));
            if !slots.is_empty() {
                spec.drafter.observe_features(&slots, features, &rows)?;
            }
        }

        // Nothing below fails.
        let mut tally = StepTally {
            num_drafted: plans.len(),
            draft_secs,
            ..StepTally::default()
        };
        let mut budget_tokens = 0;
        let mut calibration_log = self.calibration_log;
        let mut results = Vec::with_capacity(seqs.len());
        for ((s, a), mut staged) in seqs.iter().zip(acceptances).zip(staged) {
            let mut outcome = SpecOutcome::default();
            if let Some(p) = a.plan {
                let plan = &plans[p];
                let n_acc = a.accepted_nodes.len();
                tally.predicted += plan
                    .nodes
                    .iter()
                    .map(|&v| (plan.tree.nodes[v].score as f64).exp())
                    .sum::<f64>();
                tally.num_accepted += n_acc;
                if plan.free_only {
                    tally.num_free_only += 1;
                } else if !plan.fixed {
                    if let Some(spec) = spec.as_deref_mut() {
                        spec.seq_gains.record(s.seq_id, n_acc, plan.nodes.len());
                    }
                    tally.num_budget_drafted += 1;
                    tally.num_budget_accepted += n_acc;
                    tally.num_budget_nodes += plan.nodes.len();
                }
                outcome = SpecOutcome {
                    speculated: true,
                    tier: plan.tier,
                    num_draft_tokens: plan.nodes.len(),
                    num_accepted_tokens: n_acc,
                };
                budget_tokens += 1 + plan.nodes.len();
                metrics::record_spec(plan.tier, plan.nodes.len(), n_acc);
                if plan.fixed && !plan.nodes.is_empty() {
                    if let Some(log) = calibration_log.as_deref_mut() {
                        let scores: Vec<f32> = plan.nodes.iter().map(|&v| plan.tree.nodes[v].score).collect();
                        let last = a.accepted_nodes.last().map(|&v| plan.tree.nodes[v].score);
                        log.push((plan.entropy, rank_label(&scores, last)));
                    }
                }
                let accepted = &a.tokens[..n_acc];
                staged.history.extend(accepted.iter().map(|t| t.token_id));
            }
            match staged.new_sampler {
                Some(sampler) => {
                    self.live.insert(
                        s.seq_id,
                        SeqState {
                            sampler,
                            history: staged.history,
                            pending: a.tokens.last().map(|t| t.token_id),
                        },
                    );
                }
                None => {
                    let state = self.live.get_mut(&s.seq_id).expect("validated as live");
                    state.history = staged.history;
                    state.pending = a.tokens.last().map(|t| t.token_id);
                }
            }
            results.push(SeqResult {
                seq_id: s.seq_id,
                tokens: a.tokens,
                spec: outcome,
            });
        }
        if let Some(spec) = spec {
            if !plans.is_empty() {
                metrics::record_spec_step(budget_tokens, draft_secs);
                spec.estimates.record(&tally);
            }
        }
        Ok(results)
    }
}
