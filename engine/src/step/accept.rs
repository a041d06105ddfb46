//! Stage 6: the target's own next token(s) of every sampling sequence, from
//! the forward's logits (DESIGN §2 step 8): a plain sample where no tree was
//! verified, else the accepted path of the tree plus the target's token
//! after it.
//!
//! Pure given the logits: samplers are seeded by (seed, position), so what
//! is accepted here does not depend on the batch, and nothing is written.
//! A greedy sequence's rows may arrive as picks (the device found the
//! argmax): which rows may is a property of the sequence alone, so a
//! sequence reads its rows the same way in every batch.

use std::collections::HashMap;

use crate::backend::Rows;
use crate::batch::RaggedBatch;
use crate::sampler::{SampledToken, Sampler};
use crate::spec::verify::{accept, draw, pickable, AcceptRule};
use crate::step::layout::NodeRows;
use crate::step::plan::Plan;
use crate::step::{SeqId, SeqState, SeqStep, Staged};

/// What one sequence commits this step.
#[derive(Debug, Default)]
pub(crate) struct Acceptance {
    /// Committed tokens: accepted draft tokens, then the target's own.
    pub tokens: Vec<SampledToken>,
    /// The plan of a sequence that verified a tree.
    pub plan: Option<usize>,
    /// Accepted tree nodes, from the root's child down.
    pub accepted_nodes: Vec<usize>,
}

/// The sampler a staged sequence uses: its own if new, else its live one.
fn sampler_of<'a>(staged: &'a mut Staged, live: &'a mut HashMap<SeqId, SeqState>, seq_id: SeqId) -> &'a mut Sampler {
    match &mut staged.new_sampler {
        Some(s) => s,
        None => &mut live.get_mut(&seq_id).expect("validated as live").sampler,
    }
}

/// Per logits row of `batch`, whether verification may read it as a
/// greedy pick ([`pickable`]): its sequence samples greedily with no
/// penalty or alternatives, under the exact rule.
pub(crate) fn pickable_rows(
    seqs: &[SeqStep],
    batch: &RaggedBatch,
    staged: &mut [Staged],
    live: &mut HashMap<SeqId, SeqState>,
    rule: AcceptRule,
) -> Vec<bool> {
    let mut out = Vec::new();
    for ((s, run), staged) in seqs.iter().zip(&batch.seqs).zip(staged.iter_mut()) {
        let ok = s.sample && rule == AcceptRule::Exact && pickable(sampler_of(staged, live, s.seq_id).params());
        out.extend(std::iter::repeat_n(ok, run.logits_rows.len()));
    }
    out
}

/// One `Acceptance` per sequence, in step order (empty for mid-prompt
/// chunks). `rows` are the forward's logits rows (whole, or picked where
/// [`pickable_rows`] allowed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn accept_step(
    seqs: &[SeqStep],
    batch: &RaggedBatch,
    plans: &[Plan],
    node_rows: &[NodeRows],
    rows: &Rows,
    staged: &mut [Staged],
    live: &mut HashMap<SeqId, SeqState>,
    rule: AcceptRule,
) -> Vec<Acceptance> {
    let mut row_start = Vec::with_capacity(seqs.len());
    let mut next_row = 0;
    for run in &batch.seqs {
        row_start.push(next_row);
        next_row += run.logits_rows.len();
    }
    let row = |r: usize| rows.get(r);
    let mut planned = vec![None; seqs.len()];
    for (p, plan) in plans.iter().enumerate() {
        planned[plan.seq] = Some(p);
    }
    let mut out: Vec<Acceptance> = seqs.iter().map(|_| Acceptance::default()).collect();
    for (i, s) in seqs.iter().enumerate() {
        if !s.sample {
            continue;
        }
        let staged = &mut staged[i];
        let history = std::mem::take(&mut staged.history);
        let sampler = sampler_of(staged, live, s.seq_id);
        let Some(p) = planned[i] else {
            out[i].tokens.push(draw(row(row_start[i]), sampler, &history));
            staged.history = history;
            continue;
        };
        let plan = &plans[p];
        let node_row = &node_rows[p];
        let mut verified = vec![false; plan.tree.len()];
        for &v in &plan.nodes {
            verified[v] = true;
        }
        let base = row_start[i];
        let logits_of = |v: usize| row(base + node_row[&v]);
        let accepted = accept(
            &plan.tree,
            &verified,
            &logits_of,
            sampler,
            &history,
            plan.max_accept,
            rule,
        );
        staged.history = history;
        out[i] = Acceptance {
            tokens: accepted.tokens,
            plan: Some(p),
            accepted_nodes: accepted.nodes,
        };
    }
    out
}
