//! Stage 6: the target's own next token(s) of every sampling sequence, from
//! the forward's logits (DESIGN §2 step 8): a plain sample where no tree was
//! verified, else the accepted path of the tree plus the target's token
//! after it.
//!
//! Pure given the logits: samplers are seeded by (seed, position), so what
//! is accepted here does not depend on the batch, and nothing is written.

use std::collections::HashMap;

use crate::batch::RaggedBatch;
use crate::sampler::{SampledToken, Sampler};
use crate::spec::verify::{accept, AcceptRule};
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

/// One `Acceptance` per sequence, in step order (empty for mid-prompt
/// chunks). `logits` are the forward's rows, `vocab` wide.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accept_step(
    seqs: &[SeqStep],
    batch: &RaggedBatch,
    plans: &[Plan],
    node_rows: &[NodeRows],
    logits: &[f32],
    vocab: usize,
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
    let row = |r: usize| &logits[r * vocab..(r + 1) * vocab];
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
            out[i].tokens.push(sampler.sample(row(row_start[i]), &history));
            staged.history = history;
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
