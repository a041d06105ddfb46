//! The budget rule's running estimates: how many draft tokens were accepted
//! against how many the drafter predicted, how long drafting takes, and what
//! drafting recently gained per sequence the rule drafted for.
//!
//! Every estimate is a decaying sum (or mean) updated once per step that
//! verified drafts, so the rule follows the traffic of the last few hundred
//! steps. Each estimate carries a prior of one token, so a fresh engine (or
//! one that stopped drafting long enough ago) tries drafting again.

use crate::spec::budget::{CostCurve, RateModel};

/// Per-step decay of the acceptance sums: a memory of a few hundred steps
/// (`1 / (1 - 0.995)` = 200), long enough to smooth one request's bursts,
/// short enough to follow a change of traffic within seconds.
const ACCEPTANCE_DECAY: f64 = 0.995;
/// Weight of the newest step in the drafting-time mean: drafting time
/// follows the batch shape closely, so a short memory (about ten steps).
const DRAFT_TIME_WEIGHT: f64 = 0.1;

/// What one step's verification did, for the estimates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTally {
    /// Sequences that verified a tree this step.
    pub num_drafted: usize,
    /// Draft tokens accepted, over every verified tree.
    pub num_accepted: usize,
    /// `Σ exp(score)` of the verified nodes: what the drafter predicted.
    pub predicted: f64,
    /// Sequences the budget rule (not a fixed tree) drafted for, their
    /// accepted draft tokens and their verified nodes.
    pub num_budget_drafted: usize,
    pub num_budget_accepted: usize,
    pub num_budget_nodes: usize,
    /// Of `num_drafted`, those drafted with free candidates only (their
    /// drafting time is nil, and their gain is not what full drafts gain).
    pub num_free_only: usize,
    /// Seconds spent drafting this step.
    pub draft_secs: f64,
}

/// The running estimates (DESIGN §2 step 6 sizes the budget with them).
#[derive(Debug, Clone, Default)]
pub struct AcceptanceEstimates {
    /// Decaying sums of accepted draft tokens and of their predicted number.
    accepted: f64,
    predicted: f64,
    /// Decaying mean of drafting seconds per drafted sequence.
    draft_secs_per_seq: f64,
    /// Decaying sums over sequences the budget rule drafted for: how many,
    /// their accepted tokens and their verified draft nodes.
    budget_drafted: f64,
    budget_accepted: f64,
    budget_nodes: f64,
}

impl AcceptanceEstimates {
    /// Measured over predicted acceptance, with a prior of one token each;
    /// it only ever lowers the drafter's estimates (raising them was
    /// measured to verify more nodes that do not pay: the nodes chosen are
    /// the most confident, which are the overconfident ones).
    pub fn gain_scale(&self) -> f64 {
        ((self.accepted + 1.0) / (self.predicted + 1.0)).clamp(0.05, 1.0)
    }

    /// Accepted tokens and verified nodes per sequence the budget rule
    /// drafted for, recently, each with a prior of one.
    pub fn budget_gain(&self) -> (f64, f64) {
        let n = self.budget_drafted + 1.0;
        ((self.budget_accepted + 1.0) / n, (self.budget_nodes + 1.0) / n)
    }

    /// Seconds drafting takes per drafted sequence, recently.
    pub fn draft_secs_per_seq(&self) -> f64 {
        self.draft_secs_per_seq
    }

    /// A step where the rule chose not to draft: the measured gain fades
    /// towards its prior, so the rule tries again after a few hundred steps.
    pub fn fade_budget_gain(&mut self) {
        self.budget_drafted *= ACCEPTANCE_DECAY;
        self.budget_accepted *= ACCEPTANCE_DECAY;
        self.budget_nodes *= ACCEPTANCE_DECAY;
    }

    /// Folds in a step that verified at least one tree.
    pub fn record(&mut self, tally: &StepTally) {
        if tally.num_drafted == 0 {
            return;
        }
        self.accepted = self.accepted * ACCEPTANCE_DECAY + tally.num_accepted as f64;
        self.predicted = self.predicted * ACCEPTANCE_DECAY + tally.predicted;
        if tally.num_budget_drafted > 0 {
            self.fade_budget_gain();
            self.budget_drafted += tally.num_budget_drafted as f64;
            self.budget_accepted += tally.num_budget_accepted as f64;
            self.budget_nodes += tally.num_budget_nodes as f64;
        }
        let full = tally.num_drafted - tally.num_free_only;
        if full > 0 {
            let per_seq = tally.draft_secs / full as f64;
            self.draft_secs_per_seq = (1.0 - DRAFT_TIME_WEIGHT) * self.draft_secs_per_seq + DRAFT_TIME_WEIGHT * per_seq;
        }
    }

    /// The rate model of a step whose forward runs `base_tokens` anyway and
    /// commits `base_committed` tokens anyway.
    pub fn rate_model<'a>(&self, curve: &'a CostCurve, base_tokens: usize, base_committed: usize) -> RateModel<'a> {
        RateModel {
            curve,
            base_tokens,
            overhead_secs: 0.0,
            base_committed: base_committed as f64,
            gain_scale: self.gain_scale(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gain_scale_only_lowers_estimates_and_starts_at_one() {
        let mut e = AcceptanceEstimates::default();
        assert_eq!(e.gain_scale(), 1.0);
        let tally = StepTally {
            num_drafted: 1,
            num_accepted: 1,
            predicted: 4.0,
            ..StepTally::default()
        };
        e.record(&tally);
        assert!((e.gain_scale() - 2.0 / 5.0).abs() < 1e-12);
        let over = StepTally {
            num_drafted: 1,
            num_accepted: 50,
            predicted: 0.0,
            ..StepTally::default()
        };
        e.record(&over);
        assert_eq!(e.gain_scale(), 1.0);
    }

    #[test]
    fn the_budget_gain_fades_back_to_its_prior_while_not_drafting() {
        let mut e = AcceptanceEstimates::default();
        e.record(&StepTally {
            num_drafted: 4,
            num_budget_drafted: 4,
            num_budget_nodes: 40,
            ..StepTally::default()
        });
        let (accepted, nodes) = e.budget_gain();
        assert!((accepted - 1.0 / 5.0).abs() < 1e-12 && (nodes - 41.0 / 5.0).abs() < 1e-12);
        for _ in 0..5000 {
            e.fade_budget_gain();
        }
        let (accepted, nodes) = e.budget_gain();
        assert!(
            (accepted - 1.0).abs() < 1e-3 && (nodes - 1.0).abs() < 1e-2,
            "{accepted} {nodes}"
        );
    }
}
