//! Stage 3: the nodes each draft tree gets verified (DESIGN §2 step 6).
//! Fixed trees take their own top-N; HeteroSpec trees share what is left of
//! the step's global verification budget best-first by estimated acceptance,
//! each capped by its tier, with the budget sized by the cost curve.
//!
//! Invariant: every sequence's chosen nodes are ancestor-closed, and all
//! chosen nodes together fit the target's verification scratch.

use crate::spec::budget::{select, SeqCandidates};
use crate::spec::setup::{Speculation, MAX_VERIFY_NODES};
use crate::step::plan::Plan;
use crate::step::SeqStep;

/// Fills `plan.nodes` of every plan; `base_tokens` are the tokens the
/// forward runs anyway (prefill chunks, decodes, roots).
pub(crate) fn choose_nodes(spec: &Speculation, seqs: &[SeqStep], plans: &mut [Plan], base_tokens: usize) {
    let mut nodes_left = MAX_VERIFY_NODES;
    let mut base_tokens = base_tokens;
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
    let rate = spec
        .estimates
        .rate_model(&spec.curve, base_tokens, seqs.iter().filter(|s| s.sample).count());
    let sel = select(&cands, max_total, Some(rate));
    for (&p, nodes) in hetero.iter().zip(sel.nodes) {
        plans[p].nodes = nodes;
    }
}
