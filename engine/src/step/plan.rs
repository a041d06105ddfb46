//! Stage 2: which sequences draft this step, and their draft trees (DESIGN
//! §2 steps 2–5): the drafter grows every tree to the base depth, the
//! policy bins each tree's path entropy into a tier, and low-entropy
//! HeteroSpec trees grow deeper.
//!
//! Reads target logits never (any tree is lossless); writes only the
//! drafter's own state and the target's scratch KV slots.

use crate::error::Result;
use crate::kv::KvStorage;
use crate::model::Model;
use crate::spec::budget::RateModel;
use crate::spec::drafter::{DraftInput, TargetView};
use crate::spec::setup::{Speculation, MAX_VERIFY_NODES};
use crate::spec::tree::{grow, DraftTree};
use crate::spec::SpecMode;
use crate::step::{SeqStep, Staged};

/// One speculating sequence's plan for this step.
pub(crate) struct Plan {
    /// Index into the step's sequences.
    pub seq: usize,
    pub tree: DraftTree,
    /// A fixed tree (`SpecMode::Fixed`) rather than the budget rule's.
    pub fixed: bool,
    pub tier: Option<usize>,
    pub entropy: f32,
    /// Most draft tokens acceptable (lookahead, context and table room).
    pub max_accept: usize,
    /// The tier's cap on verified nodes.
    pub max_nodes: usize,
    /// Nodes chosen for verification (by `choose`), ancestor-closed.
    pub nodes: Vec<usize>,
    /// Drafted with free candidates only (its full drafts did not pay):
    /// its outcome does not count towards what full drafts gain it.
    pub free_only: bool,
}

/// A step of decodes only (one new token per sequence): the steps the
/// measured guards compare.
pub(crate) fn is_decode_step(seqs: &[SeqStep]) -> bool {
    seqs.iter().all(|s| s.new_token_ids.len() == 1 && s.sample)
}

/// Sequences the budget rule may draft for (sampling, AUTO or HETERO).
pub(crate) fn budget_candidates(seqs: &[SeqStep]) -> usize {
    seqs.iter()
        .filter(|s| s.sample && s.speculation != SpecMode::Off && s.speculation != SpecMode::Fixed)
        .count()
}

/// Grows the draft trees of speculating sequences: base depth for all,
/// then deeper for low-entropy tiers (HeteroSpec sequences). Empty when
/// nothing drafts (including when the budget rule says drafting does not
/// pay this step).
pub(crate) fn plan_drafts(
    spec: &mut Speculation,
    seqs: &[SeqStep],
    staged: &[Staged],
    model: &Model,
    kv: &mut KvStorage,
) -> Result<Vec<Plan>> {
    let max_context = model.config().max_context;
    let layout = kv.layout();
    let block_size = layout.block_size;
    // Under the budget rule, draft only if a sure draft token could pay
    // for its share of this step's forward (a large batch already fills
    // the machine), and if what drafting recently gained per sequence
    // pays for the drafting time and the extra verified tokens, against
    // not drafting at all. Then the measured guards (`spec::gate`): no
    // drafting at a batch size where drafted steps measure slower than
    // plain ones, and no full drafts for a sequence whose recent ones did
    // not pay (free ones only, where the drafter has them).
    let base_tokens: usize = seqs.iter().map(|s| s.new_token_ids.len()).sum();
    let sampling = seqs.iter().filter(|s| s.sample).count();
    let candidates = budget_candidates(seqs);
    let mut rate = spec.estimates.rate_model(&spec.curve, base_tokens, sampling);
    rate.overhead_secs = spec.estimates.draft_secs_per_seq() * candidates as f64;
    let (gain, nodes) = spec.estimates.budget_gain();
    let full_drafts_pay = rate.may_pay() && rate.drafting_pays(candidates, gain, nodes);
    if candidates > 0 && !full_drafts_pay {
        spec.estimates.fade_budget_gain();
    }
    // A drafter with free candidates drafts with those alone where its
    // full drafts do not pay.
    let free_drafts = spec.drafter.drafts_for_free();
    let mut budget_may_pay = rate.may_pay() && (full_drafts_pay || free_drafts);
    if budget_may_pay && candidates > 0 && spec.adaptive && is_decode_step(seqs) {
        budget_may_pay = spec.rates.allows_drafting(seqs.len());
    }
    let one_seq = RateModel {
        overhead_secs: spec.estimates.draft_secs_per_seq(),
        ..rate
    };
    let policy = &spec.policy;
    let mut plans = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        if !s.sample || s.speculation == SpecMode::Off || s.lookahead == 0 {
            continue;
        }
        let mut free_only = false;
        // The budget rule drafts on decode steps only: at the end of a
        // prompt chunk the drafts' estimates are least reliable (n-gram
        // matches against the chat template) while the chunk makes extra
        // tokens look free.
        if s.speculation != SpecMode::Fixed {
            if !budget_may_pay || s.new_token_ids.len() > 1 {
                continue;
            }
            let (seq_gain, seq_nodes) = spec.seq_gains.gain(s.seq_id, (gain, nodes));
            if !full_drafts_pay || !one_seq.drafting_pays(1, seq_gain, seq_nodes) {
                spec.seq_gains.skip(s.seq_id);
                if !free_drafts {
                    continue;
                }
                free_only = true;
            }
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
            free_only,
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
                tokens: &staged[p.seq].history,
                num_computed: s.num_computed,
                block_table: &s.block_table,
                free_only: p.free_only,
            }
        })
        .collect();
    let mut target = TargetView {
        model,
        kv,
        scratch: MAX_VERIFY_NODES..layout.scratch_slots,
    };
    let mut trees: Vec<DraftTree> = plans.iter().map(|p| p.tree.clone()).collect();
    let base: Vec<usize> = plans.iter().map(|p| policy.depth.min(p.max_accept)).collect();
    // Budget-rule trees grow only while a beam could still be verified
    // (the budget's own cut-off, on the cheapest stretch of the curve):
    // drafting nodes no budget would pick is time lost.
    let least = RateModel {
        overhead_secs: 0.0,
        ..rate
    }
    .least_paying_acceptance(spec.verify_budget);
    let min_score: Vec<f32> = plans
        .iter()
        .map(|p| if p.fixed { f32::NEG_INFINITY } else { least.ln() as f32 })
        .collect();
    grow(
        spec.drafter.as_mut(),
        &mut target,
        &inputs,
        &mut trees,
        &base,
        &min_score,
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
            &min_score,
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
