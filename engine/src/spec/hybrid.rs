//! The hybrid drafter: one tree whose candidates come from a draft head and
//! from prompt lookup at once, so text that repeats its context (code,
//! summaries, lists) gets long copied runs and new text gets the head.
//!
//! Both sources score on one scale, the probability that the target's
//! greedy choice is the candidate: the head's own probabilities, and for an
//! n-gram follower the acceptance measured for matches of its length
//! ([`SpecPolicy::ngram_acceptance`](crate::spec::SpecPolicy), fitted by
//! `heterospec calibrate` from the target's greedy outputs) for the match's
//! most frequent follower, and in proportion to their counts for the others. A token both propose keeps
//! the higher score. The node's entropy is the lower of the two (a long,
//! reliable match makes a step predictable whatever the head thinks).
//!
//! A node whose lookup is sure (a long, reliable match) is extended by the
//! lookup alone, without a head forward: copied runs draft for free. The
//! head cannot extend below such a node (it has no feature there), so the
//! run goes on by lookup or ends.
//!
//! A sequence the budget rule found not paying for the head's drafts
//! lately (`free_only`) is drafted by the lookup alone: it still gets its
//! copied runs, at no drafting cost.
//!
//! Invariant: the head expands every root it drafts for, and every node below which it
//! drafts, so its features and KV follow the tree exactly as with
//! `--drafter head`; the lookup only adds candidates and never reads the
//! target.

use heterospec_kv::SeqId;

use crate::backend::FeatureTap;
use crate::error::Result;
use crate::features::Features;
use crate::spec::drafter::{node_context, DraftInput, Drafter, ModelDrafter, NgramDrafter, Proposal, TargetView};
use crate::spec::tree::DraftTree;

/// A lookup candidate at least this likely extends its node without the
/// head (about a match of three or more tokens, by the shipped scale).
const SURE_LOOKUP: f32 = 0.6;

pub struct HybridDrafter {
    head: ModelDrafter,
    ngram: NgramDrafter,
    /// Acceptance of a match's most frequent follower, by match length
    /// (index `n - 1`); empty: the lookup's own count-based estimate.
    acceptance: Vec<f32>,
}

impl HybridDrafter {
    pub fn new(head: ModelDrafter, ngram: NgramDrafter, acceptance: Vec<f32>) -> Self {
        HybridDrafter {
            head,
            ngram,
            acceptance,
        }
    }

    /// The lookup's proposal for the token after `seq`, on the acceptance scale.
    pub fn lookup(&self, seq: &[u32], k: usize) -> Option<Proposal> {
        let (n, counts) = self.ngram.followers(seq)?;
        let Some(&top) = self.acceptance.get(n - 1) else {
            return Some(self.ngram.propose(seq, k));
        };
        // The measured figure is the most frequent follower's; the others
        // in proportion to their counts.
        let most = counts[0].1 as f32;
        let probs: Vec<(u32, f32)> = counts
            .iter()
            .map(|&(t, c)| (t, (top * c as f32 / most).clamp(1e-6, 1.0)))
            .collect();
        Some(self.ngram.proposal(&probs, k))
    }
}

/// The union of two proposals' candidates (a shared token keeps the higher
/// log-probability), best first, at most `k`; the lower entropy.
pub fn merge(head: Proposal, lookup: Option<Proposal>, k: usize) -> Proposal {
    let Some(lookup) = lookup else { return head };
    if head.candidates.is_empty() {
        return lookup;
    }
    let mut candidates = head.candidates;
    for (token, lp) in lookup.candidates {
        match candidates.iter_mut().find(|c| c.0 == token) {
            Some(c) => c.1 = c.1.max(lp),
            None => candidates.push((token, lp)),
        }
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    candidates.truncate(k);
    Proposal {
        candidates,
        entropy: head.entropy.min(lookup.entropy),
    }
}

impl Drafter for HybridDrafter {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn expand(
        &mut self,
        target: &mut TargetView<'_>,
        inputs: &[DraftInput<'_>],
        trees: &[DraftTree],
        requests: &[(usize, usize)],
        k: usize,
    ) -> Result<Vec<Proposal>> {
        let lookups: Vec<Option<Proposal>> = requests
            .iter()
            .map(|&(s, node)| self.lookup(&node_context(&inputs[s], &trees[s], node), k))
            .collect();
        // Where the lookup is sure, its candidates alone extend the node:
        // the head's forward is the drafting time, and a copied run needs
        // none. Roots always go to the head (it catches up on the
        // sequence's new tokens and starts its step there).
        let sure: Vec<bool> = (0..requests.len())
            .map(|i| {
                inputs[requests[i].0].free_only
                    || requests[i].1 != 0
                        && lookups[i]
                            .as_ref()
                            .and_then(|p| p.candidates.first())
                            .is_some_and(|c| c.1 >= SURE_LOOKUP.ln())
            })
            .collect();
        let for_head: Vec<(usize, usize)> = (0..requests.len()).filter(|&i| !sure[i]).map(|i| requests[i]).collect();
        let from_head = if for_head.is_empty() {
            Vec::new()
        } else {
            self.head.expand(target, inputs, trees, &for_head, k)?
        };
        let mut from_head = from_head.into_iter();
        Ok(lookups
            .into_iter()
            .enumerate()
            .map(|(i, lookup)| {
                let head = if sure[i] {
                    Proposal::default()
                } else {
                    from_head.next().unwrap_or_default()
                };
                merge(head, lookup, k)
            })
            .collect())
    }

    fn drafts_for_free(&self) -> bool {
        true
    }

    fn release(&mut self, seq_id: SeqId) {
        self.head.release(seq_id);
    }

    fn feature_tap(&self) -> Option<FeatureTap> {
        self.head.feature_tap()
    }

    fn observe_features(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()> {
        self.head.observe_features(slots, features, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(c: &[(u32, f32)], entropy: f32) -> Proposal {
        Proposal {
            candidates: c.iter().map(|&(t, p)| (t, p.ln())).collect(),
            entropy,
        }
    }

    #[test]
    fn merged_candidates_are_the_union_on_one_scale() {
        let head = proposal(&[(1, 0.5), (2, 0.3), (3, 0.1)], 1.2);
        let lookup = proposal(&[(4, 0.9), (2, 0.05)], 0.4);
        let m = merge(head.clone(), Some(lookup), 3);
        let tokens: Vec<u32> = m.candidates.iter().map(|c| c.0).collect();
        assert_eq!(tokens, vec![4, 1, 2]);
        assert!((m.candidates[2].1 - 0.3f32.ln()).abs() < 1e-6, "the higher score stays");
        assert_eq!(m.entropy, 0.4);
        assert_eq!(merge(head.clone(), None, 3), head);
        let empty = Proposal::default();
        assert_eq!(merge(empty, Some(head.clone()), 3), head);
    }

    #[test]
    fn lookup_scores_a_match_by_its_measured_acceptance() {
        let ngram = NgramDrafter::default();
        let head = ModelDrafter::self_draft(1);
        let h = HybridDrafter::new(head, ngram.clone(), vec![0.2, 0.4, 0.6, 0.8]);
        // "1 2 3 4 ... 2 3" -> a 2-gram match followed once by 4.
        let seq = [1, 2, 3, 4, 7, 3, 9, 2, 3];
        let p = h.lookup(&seq, 4).unwrap();
        assert_eq!(p.candidates.len(), 1);
        assert!((p.candidates[0].1 - 0.4f32.ln()).abs() < 1e-6);
        // Two followers of "5" (2 twice, 1 once): the 1-gram's 0.2 for the
        // most frequent, half that for the other.
        let p = h.lookup(&[5, 1, 5, 2, 5, 2, 7, 5], 4).unwrap();
        assert!((p.candidates[0].1 - 0.2f32.ln()).abs() < 1e-6);
        assert!((p.candidates[1].1 - 0.1f32.ln()).abs() < 1e-6);
        assert!(h.lookup(&[1, 2, 3], 4).is_none());
        // Uncalibrated: the lookup's own estimate.
        let raw = HybridDrafter::new(ModelDrafter::self_draft(1), ngram.clone(), vec![]);
        assert_eq!(raw.lookup(&seq, 4).unwrap(), ngram.propose(&seq, 4));
    }
}
